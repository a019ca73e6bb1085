//! `dpc-operator import` as a user runs it: the binary reads what the DPC simulator holds
//! (overrides made "in the UI", in two environments, with names Kubernetes cannot use as
//! they are), kubectl applies its output to the real API server, and taking the overrides
//! over — observed first, then managed — costs not one write to DPC.

use super::*;
use crate::kubectl::Kubectl;
use dpc_operator::api::conditions;
use serde_json::json;

/// Runs `dpc-operator import` with `args` and, of the DPC_* variables, exactly those `env`
/// gives (`env` may add others): exit code, stdout, stderr.
pub(super) async fn run_import(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dpc-operator"));
    command
        .arg("import")
        .args(args)
        .env_remove("DPC_CLIENT_ID")
        .env_remove("DPC_CLIENT_SECRET")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("import finishes")
        .expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).expect("UTF-8 YAML"),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// What the simulator holds before anyone uses the operator: two environments; names with
/// spaces, dots, underscores and capitals; two connections whose Kubernetes names would be
/// the same.
fn seed(sim: &dpc_testkit::dpc::DpcSim) {
    let aws = json!({"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"});
    let oauth = dpc_testkit::dpc::ParentConnection {
        auth_type: "OAUTH_CLIENT_CRED".into(),
        ..Default::default()
    };
    sim.add_connection(PROJECT, "Prod EU", "Sales Force (EU)", oauth);
    sim.put_override(
        PROJECT,
        "Prod EU",
        "Sales Force (EU)",
        Some("OAUTH_CLIENT_CRED"),
        json!({"secretsLocation": aws, "connectionProperties": {"secretName": "prod/sf", "secretKey": "yes"}}),
    );
    sim.put_override(
        PROJECT,
        "Prod EU",
        "snowflake_main.v2",
        None,
        json!({"connectionProperties": {"secretName": "prod/snowflake"}}),
    );
    sim.put_override(
        PROJECT,
        "dev",
        "sales force",
        None,
        json!({"connectionProperties": {"secretName": "dev/sf-a"}}),
    );
    sim.put_override(
        PROJECT,
        "dev",
        "Sales_Force",
        None,
        json!({"connectionProperties": {"secretName": "dev/sf-b"}}),
    );
}

const NAMES: [&str; 4] = [
    "dev-sales-force-", // two connections share it: both end in a hash
    "dev-sales-force-",
    "prod-eu-sales-force-eu",
    "prod-eu-snowflake-main-v2",
];

fn writes(h: &Harness) -> Vec<(SimOp, Option<u16>)> {
    write_summary(&h.sim.calls())
}

#[tokio::test]
async fn imported_overrides_are_taken_over_without_a_write_and_then_watched() {
    let config = dpc_operator::config::OperatorConfig {
        default_sync_interval: Duration::from_secs(1),
        min_sync_interval: Duration::from_millis(500),
        ..test_config()
    };
    let h = Harness::start_with(config, SimConfig::default()).await;
    seed(&h.sim);
    let kubeconfig = kubeconfig_file(&h, &h.kubeconfig());
    let account = format!("{}/{ACCOUNT}", h.ns);
    let kubeconfig_arg = kubeconfig.display().to_string();
    let base = [
        "--project",
        PROJECT,
        "--from-account",
        &account,
        "--kubeconfig",
        &kubeconfig_arg,
        "--allow-insecure-http",
        "--dpc-allowed-hosts",
        "127.0.0.1",
    ];

    // 1. Import: one object per override, the same bytes every time.
    let (code, yaml, stderr) = run_import(&base, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("environment \"Prod EU\": 2 override(s)"),
        "{stderr}"
    );
    assert_eq!(
        run_import(&base, &[]).await.1,
        yaml,
        "same state, same bytes"
    );
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    let mut names: Vec<String> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    for (name, expected) in names.iter().zip(NAMES) {
        assert!(name.starts_with(expected), "{names:?}");
    }
    assert_ne!(names[0], names[1]);
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["namespace"] == h.ns.as_str()
                && d["spec"]["managementPolicy"] == "ObserveOnly"
                && d["spec"]["accountRef"]["name"] == ACCOUNT)
    );
    let sales = docs
        .iter()
        .find(|d| d["spec"]["connectionName"] == "Sales Force (EU)")
        .unwrap();
    assert_eq!(
        sales["metadata"]["annotations"],
        json!({"dpc-operator.io/imported-connection": "Sales Force (EU)", "dpc-operator.io/imported-environment": "Prod EU"})
    );
    assert_eq!(sales["spec"]["authType"], "OAUTH_CLIENT_CRED");
    assert_eq!(
        sales["spec"]["connectionOverrides"],
        json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
               "connectionProperties": {"secretName": "prod/sf", "secretKey": "yes"}})
    );

    // A change in DPC shows in a re-import as that change alone.
    h.sim.put_override(
        PROJECT,
        "Prod EU",
        "snowflake_main.v2",
        None,
        json!({"connectionProperties": {"secretName": "prod/snowflake-2"}}),
    );
    let changed = run_import(&base, &[]).await.1;
    let differing: Vec<(&str, &str)> = yaml
        .lines()
        .zip(changed.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(
        differing,
        [(
            "      secretName: prod/snowflake",
            "      secretName: prod/snowflake-2"
        )]
    );
    h.sim.put_override(
        PROJECT,
        "Prod EU",
        "snowflake_main.v2",
        None,
        json!({"connectionProperties": {"secretName": "prod/snowflake"}}),
    );

    // 2. kubectl apply, and every object is Ready — observed, not written.
    let kubectl = Kubectl { kubeconfig };
    let h = h.run();
    h.sim.clear_calls();
    let (code, out, err) = kubectl.run_input(&["apply", "-f", "-"], &yaml).await;
    assert_eq!(code, 0, "{out}{err}");
    for name in &names {
        let obj = h.wait_ready(name).await;
        let ready = ready_condition(&obj);
        assert!(ready.message.starts_with("observed"), "{}", ready.message);
    }
    assert_eq!(writes(&h), [], "observing writes nothing");

    // 3. Manage: still not one write; each object now records what it manages.
    let mut manage = base.to_vec();
    manage.push("--manage");
    let managed_yaml = run_import(&manage, &[]).await.1;
    let (code, out, err) = kubectl
        .run_input(&["apply", "-f", "-"], &managed_yaml)
        .await;
    assert_eq!(code, 0, "{out}{err}");
    for name in &names {
        let obj = h
            .wait_for(name, "managed and Ready", |o| {
                is_ready(o) && o.status.as_ref().is_some_and(|s| s.applied_hash.is_some())
            })
            .await;
        assert!(obj.status.unwrap().managed_override.is_some());
        let (_, _, note) = h.wait_event(name, "Adopted").await;
        assert!(note.contains("nothing written"), "{note}");
    }
    assert_eq!(writes(&h), [], "adopting what DPC holds writes nothing");

    // 4. Someone edits an override in DPC: the drift check sees it (and, driftPolicy
    // Correct, writes the spec back — the one write of this test).
    h.sim.put_override(
        PROJECT,
        "dev",
        "sales force",
        None,
        json!({"connectionProperties": {"secretName": "edited-in-ui"}}),
    );
    let edited = names
        .iter()
        .find(|n| {
            docs.iter().any(|d| {
                d["metadata"]["name"] == n.as_str() && d["spec"]["connectionName"] == "sales force"
            })
        })
        .unwrap();
    let (_, _, note) = h.wait_event(edited, "DriftCorrected").await;
    assert!(note.contains("connectionProperties.secretName"), "{note}");
    assert_eq!(writes(&h), [(SimOp::Update, Some(200))]);
    let put = h.sim.calls_of(SimOp::Update).remove(0);
    assert_eq!(put.body.unwrap()["connectionName"], "sales force");
    let stored = h.sim.get_override(PROJECT, "dev", "sales force").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        "dev/sf-a"
    );
    let objects = h.covs().list(&Default::default()).await.unwrap();
    assert!(objects.items.iter().all(|o| conditions::is_true(
        &o.status.clone().unwrap_or_default().conditions,
        conditions::READY
    )));
    h.stop().await;
}

#[tokio::test]
async fn import_failures_say_what_failed_and_exit_non_zero() {
    let h = Harness::start().await;
    seed(&h.sim);
    let api = h.sim.api_url();
    let token = h.sim.token_url();
    let args = |project: &'static str| {
        vec![
            "--project".to_string(),
            project.to_string(),
            "--api-url".into(),
            api.clone(),
            "--token-url".into(),
            token.clone(),
            "--allow-insecure-http".into(),
            "--dpc-allowed-hosts".into(),
            "127.0.0.1".into(),
        ]
    };
    let printed = std::sync::Mutex::new(String::new());
    let run = |args: Vec<String>, secret: &'static str| {
        let printed = &printed;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env = [("DPC_CLIENT_ID", CLIENT_ID), ("DPC_CLIENT_SECRET", secret)];
            let (code, out, err) = run_import(&args, &env).await;
            printed.lock().unwrap().push_str(&format!("{out}{err}"));
            (code, out, err)
        }
    };

    let wrong = "not-the-secret-0a9b8c";
    let (code, out, err) = run(args(PROJECT), wrong).await;
    assert_eq!((code, out.as_str()), (4, ""), "{err}");
    assert!(
        err.contains("DPC refused the credentials from DPC_CLIENT_ID/DPC_CLIENT_SECRET"),
        "{err}"
    );
    assert!(err.contains("401"), "{err}");

    let unknown = "00000000-0000-4000-8000-000000000000";
    let (code, out, err) = run(args(unknown), CLIENT_SECRET).await;
    assert_eq!((code, out.as_str()), (5, ""), "{err}");
    assert!(
        err.contains(&format!("project {unknown} not found")),
        "{err}"
    );

    let mut one = args(PROJECT);
    one.extend(["--environment".into(), "staging".into()]);
    let (code, _, err) = run(one, CLIENT_SECRET).await;
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("environment \"staging\" not found in project"),
        "{err}"
    );
    assert!(err.contains("it has: \"Prod EU\", \"dev\""), "{err}");

    h.sim
        .push_fault(Fault::on(SimOp::List, FaultKind::Malformed));
    let (code, out, err) = run(args(PROJECT), CLIENT_SECRET).await;
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(err.contains("could not read DPC's answer to list"), "{err}");

    let (code, _, err) = run_import(&["--project", PROJECT, "--api-url", &api], &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no credentials: set DPC_CLIENT_ID and DPC_CLIENT_SECRET"),
        "{err}"
    );

    // Not one of these printed a credential or a token.
    let printed = printed.into_inner().unwrap();
    let tokens = h.sim.issued_tokens();
    assert!(!tokens.is_empty());
    for secret in tokens
        .iter()
        .map(String::as_str)
        .chain([CLIENT_SECRET, wrong])
    {
        assert!(
            !printed.contains(secret),
            "a credential or token was printed"
        );
    }
    h.stop().await;
}

/// The arguments of an import of the harness's project as its DpcAccount.
fn from_account_args(h: &Harness, kubeconfig: &std::path::Path) -> Vec<String> {
    [
        "--project",
        PROJECT,
        "--from-account",
        &format!("{}/{ACCOUNT}", h.ns),
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--allow-insecure-http",
        "--dpc-allowed-hosts",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn import_with(args: &[String], extra: &[&str]) -> (i32, String, String) {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    run_import(&all, &[]).await
}

#[tokio::test]
async fn an_import_prints_nothing_a_cluster_object_already_names_and_never_replaces_a_live_account()
{
    let h = Harness::start().await;
    seed(&h.sim);
    // Written by hand, reading its value from a Secret: DPC holds the resolved value.
    let resolved = "resolved-from-a-secret-5e2d";
    h.put_secret("refs", &[("key", resolved)]).await;
    h.sim.put_override(
        PROJECT,
        "Prod EU",
        "snowflake_main.v2",
        None,
        json!({"connectionProperties": {"secretName": resolved}}),
    );
    h.apply(
        &Cov::new("hand-written", "snowflake_main.v2")
            .environment("Prod EU")
            .without_property("secretName")
            .property_from_secret("secretName", "refs", "key"),
    )
    .await;
    let kubeconfig = kubeconfig_file(&h, &h.kubeconfig());
    let args = from_account_args(&h, &kubeconfig);

    let (code, yaml, stderr) = import_with(&args, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !yaml.contains(resolved),
        "a value read from a Secret was printed"
    );
    assert!(!yaml.contains("snowflake_main.v2"), "{yaml}");
    assert!(
        stderr.contains(&format!(
            "not imported (already in the cluster): the override of connection \"snowflake_main.v2\" in environment \"Prod EU\": ConnectionOverride {}/hand-written in the cluster already manages it",
            h.ns
        )),
        "{stderr}"
    );
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    assert_eq!(docs.len(), 3, "the other overrides are printed");

    // The account the import read is live: --with-account would replace it.
    let (code, yaml, stderr) = import_with(&args, &["--with-account"]).await;
    assert_eq!((code, yaml.as_str()), (2, ""), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--with-account would print DpcAccount {}/{ACCOUNT}, which exists in the cluster",
            h.ns
        )),
        "{stderr}"
    );
    // Another name whose credentials Secret exists is refused too; a new one is printed.
    h.put_secret("fresh-credentials", &[("client_id", "x")])
        .await;
    let (code, _, stderr) = import_with(&args, &["--with-account", "--account-ref", "fresh"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("Secret {}/fresh-credentials", h.ns)),
        "{stderr}"
    );
    let (code, yaml, stderr) =
        import_with(&args, &["--with-account", "--account-ref", "brand-new"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(yaml.contains("name: brand-new-credentials"), "{yaml}");
    h.stop().await;
}

#[tokio::test]
async fn an_import_names_every_object_uniquely_and_skips_fields_no_spec_can_hold() {
    let h = Harness::start().await;
    // Two names that make the same object name, and a third spelt as the first one's
    // hashed name.
    let hashed = object_names_of(&[("PROD", "Sales Force"), ("PROD", "sales-force")]);
    let third = format!("Sales Force {}", &hashed[0]["prod-sales-force-".len()..]);
    for connection in ["Sales Force", "sales-force", third.as_str()] {
        h.sim.put_override(
            PROJECT,
            "PROD",
            connection,
            None,
            json!({"connectionProperties": {"secretName": connection}}),
        );
    }
    h.sim.put_override(
        PROJECT,
        "PROD",
        "Rotating",
        None,
        json!({"connectionProperties": {"secretName": "r"}, "rotationPolicy": {"days": 30}}),
    );
    let kubeconfig = kubeconfig_file(&h, &h.kubeconfig());
    let args = from_account_args(&h, &kubeconfig);
    let (code, yaml, stderr) = import_with(&args, &[]).await;
    assert_eq!(code, 6, "{stderr}");
    assert!(
        stderr.contains("\"Rotating\"") && stderr.contains("connectionOverrides.rotationPolicy"),
        "{stderr}"
    );
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    let names: std::collections::BTreeSet<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    // kubectl applies all three: no object overwrites another's immutable connectionName.
    let kubectl = Kubectl { kubeconfig };
    let (code, out, err) = kubectl.run_input(&["apply", "-f", "-"], &yaml).await;
    assert_eq!(code, 0, "{out}{err}");
    let applied = h.covs().list(&Default::default()).await.unwrap().items;
    let connections: std::collections::BTreeSet<String> = applied
        .iter()
        .map(|o| o.spec.connection_name.clone())
        .collect();
    assert_eq!(
        connections,
        ["Sales Force", "sales-force", third.as_str()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    h.stop().await;
}

fn object_names_of(pairs: &[(&str, &str)]) -> Vec<String> {
    dpc_operator::import::object_names(pairs)
}
