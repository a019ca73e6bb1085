//! `dpc-operator sandbox` tried as a new user tries it: kubectl with the kubeconfig it writes
//! creates Secrets, is refused a bad object with the real server's words, and round-trips
//! what it gets.

use super::*;
use crate::kubectl::Kubectl;
use dpc_testkit::control_plane;
use tokio::io::AsyncBufReadExt;

/// A ConnectionOverride in `namespace` whose project id is not a UUID.
fn bad_uuid(namespace: &str) -> String {
    use dpc_operator::api::{ConnectionOverride, fixtures::override_spec};
    let mut spec = override_spec("dpc", "PROD", "Salesforce").with_literal("username", "svc");
    spec.project_id = "not-a-uuid".into();
    let mut object = ConnectionOverride::new("bad", spec);
    object.metadata.namespace = Some(namespace.into());
    serde_json::to_string(&object).unwrap()
}

/// What the real API server answers to the same bad object (in a namespace of the test's).
async fn real_refusal() -> (i32, String) {
    let cluster = control_plane::shared().await;
    let ns = unique_name("sandbox-oracle");
    let yaml = cluster.kubeconfig_with_token("admin", &cluster.admin_token, &ns);
    let client = control_plane::client_from(&yaml).await;
    install_crds(&client, &cluster.server).await;
    create_namespace(&client, &ns, serde_json::json!({})).await;
    let path = std::env::temp_dir().join(format!("{ns}.kubeconfig"));
    std::fs::write(&path, yaml).unwrap();
    let (code, _, stderr) = Kubectl { kubeconfig: path }
        .run_input(&["apply", "-f", "-"], &bad_uuid(&ns))
        .await;
    (code, stderr)
}

#[tokio::test]
async fn the_sandbox_answers_kubectl_as_a_cluster_does() {
    let dir = std::env::temp_dir().join(unique_name("sandbox"));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut sandbox = Command::new(env!("CARGO_BIN_EXE_dpc-operator"))
        .arg("sandbox")
        .arg("--kubeconfig-out")
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the sandbox starts");
    // Read everything it prints (a full pipe would stop it), and say when it is Ready.
    let mut lines = tokio::io::BufReader::new(sandbox.stdout.take().unwrap()).lines();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let printed = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = printed.clone();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().unwrap().push(line.clone());
            if line.contains("every example is Ready")
                && let Some(tx) = ready_tx.take()
            {
                let _ = tx.send(());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(120), ready)
        .await
        .expect("the examples are Ready within 120 s")
        .expect("the sandbox ran until its examples were Ready");
    let k = Kubectl { kubeconfig };

    let (code, stdout, stderr) = k
        .run(&[
            "create",
            "secret",
            "generic",
            "demo",
            "--from-literal=key=v",
            "-n",
            "data-platform",
        ])
        .await;
    assert_eq!(
        (code, stdout.trim()),
        (0, "secret/demo created"),
        "{stderr}"
    );
    let (_, data, _) = k
        .run(&[
            "get",
            "secret",
            "demo",
            "-n",
            "data-platform",
            "-o",
            "jsonpath={.type} {.data.key}",
        ])
        .await;
    assert_eq!(data, "Opaque dg==");

    let (code, _, stderr) = k
        .run_input(&["apply", "-f", "-"], &bad_uuid("data-platform"))
        .await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("spec.projectId: Invalid value: \"not-a-uuid\""),
        "{stderr}"
    );
    assert_eq!(
        (code, stderr),
        real_refusal().await,
        "the sandbox and kube-apiserver refuse alike"
    );

    let (code, all, stderr) = k.run(&["get", "cov", "-A", "-o", "yaml"]).await;
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = k.run_input(&["apply", "-f", "-"], &all).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("connectionoverride.dpc-operator.io/"))
            .count(),
        all.matches("kind: ConnectionOverride").count(),
        "{stdout}"
    );
    let lines = printed.lock().unwrap().clone();
    adopt_the_hand_made_overrides(&k, &lines).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's "Adopting existing overrides" against the sandbox: the import command it
/// prints, kubectl apply, Ready — and the simulator saw no write.
async fn adopt_the_hand_made_overrides(k: &Kubectl, printed: &[String]) {
    use dpc_operator::sandbox::HAND_MADE_PROJECT;
    let simulator = printed
        .iter()
        .find_map(|l| l.trim().strip_prefix("DPC simulator"))
        .expect("the sandbox prints where its simulator is")
        .trim()
        .trim_end_matches("/dpc")
        .to_string();
    assert!(
        printed.iter().any(|l| l.contains(&format!(
            "import --project {HAND_MADE_PROJECT} --from-account data-platform/matillion-eu"
        ))),
        "the sandbox says how to import"
    );
    let kubeconfig = k.kubeconfig.display().to_string();
    let (code, yaml, stderr) = super::import::run_import(
        &[
            "--project",
            HAND_MADE_PROJECT,
            "--from-account",
            "data-platform/matillion-eu",
            "--allow-insecure-http",
            "--dpc-allowed-hosts",
            "127.0.0.1",
        ],
        &[("KUBECONFIG", &kubeconfig)],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        yaml.matches("kind: ConnectionOverride").count(),
        3,
        "{yaml}"
    );

    let http = reqwest::Client::new();
    let calls = || sim_calls(&http, &simulator);
    let before = calls().await.len();
    let (code, _, stderr) = k.run_input(&["apply", "-f", "-"], &yaml).await;
    assert_eq!(code, 0, "{stderr}");
    for name in [
        "production-salesforce-eu",
        "production-snowflake-main-v2",
        "dev-salesforce-eu",
    ] {
        let (code, _, stderr) = k
            .run(&[
                "wait",
                "--for=condition=Ready",
                "-n",
                "data-platform",
                &format!("cov/{name}"),
                "--timeout=60s",
            ])
            .await;
        assert_eq!(code, 0, "{name}: {stderr}");
    }
    let after = calls().await;
    let writes: Vec<&Call> = after[before..].iter().filter(|c| c.is_write()).collect();
    assert!(writes.is_empty(), "{writes:?}");
    assert!(
        after[before..].iter().any(|c| c.op == SimOp::List),
        "DPC was read"
    );
}
