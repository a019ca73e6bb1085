//! kubectl — a real client nobody here wrote — with the operator running, against a real
//! kube-apiserver (a fresh control plane of its own: the quickstart's namespace and the CRDs'
//! first install are the test) and against the Kubernetes API emulator that `dpc-operator
//! sandbox` runs on, which must behave the same. kubectl applies the CRDs and the shipped
//! examples, reads them with their printer columns, waits for Ready, selects, applies
//! server-side, explains, and deletes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dpc_operator::config::OperatorConfig;
use dpc_operator::context::Context;
use dpc_operator::controller;
use dpc_testkit::control_plane::ControlPlane;
use dpc_testkit::dpc::{DpcSim, SimConfig, SimOp};
use dpc_testkit::kube::KubeEmulator;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub(crate) struct Kubectl {
    pub(crate) kubeconfig: PathBuf,
}

impl Kubectl {
    /// Runs kubectl; returns stdout, or panics with stderr when it fails.
    async fn ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.run(args).await;
        assert_eq!(
            code,
            0,
            "kubectl {} failed:\n{stderr}\n{stdout}",
            args.join(" ")
        );
        stdout
    }

    pub(crate) async fn run(&self, args: &[&str]) -> (i32, String, String) {
        self.run_input(args, "").await
    }

    /// Runs kubectl with `input` on its standard input: exit code, stdout, stderr.
    pub(crate) async fn run_input(&self, args: &[&str], input: &str) -> (i32, String, String) {
        use tokio::io::AsyncWriteExt;
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl is installed (it is on every machine of this kind)");
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(input.as_bytes())
            .await
            .expect("kubectl reads its input");
        drop(stdin);
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {} hung", args.join(" ")))
            .expect("kubectl ran");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

fn repo(path: &str) -> String {
    Path::new(
        &(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests")
            + "/../.."),
    )
    .join(path)
    .display()
    .to_string()
}

/// Splits `kubectl get` table output into rows of cells.
fn table(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_the_real_api_server_and_the_operator() {
    let plane = ControlPlane::start(None).await.expect("a control plane");
    let kubeconfig = std::fs::read_to_string(&plane.endpoint.kubeconfig).unwrap();
    let client = plane.endpoint.client().await;
    let version = format!("\"gitVersion\": \"{}\"", plane.endpoint.version);
    assert_eq!(plane.endpoint.version, "v1.36.3");
    kubectl_drives(&kubeconfig, client, &version).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_the_emulator_and_the_operator() {
    let emu = KubeEmulator::start().await.unwrap();
    kubectl_drives(
        &emu.kubeconfig(),
        emu.client(),
        "\"gitVersion\": \"v1.32.0-dpc-operator-emulator\"",
    )
    .await;
}

async fn kubectl_drives(kubeconfig_text: &str, client: kube::Client, version_line: &str) {
    let sim = DpcSim::start(SimConfig::default()).await.unwrap();
    // The example's placeholder credentials are what the simulator accepts.
    sim.add_client(
        "replace-with-your-client-id",
        "replace-with-your-client-secret",
    );
    let dir = std::env::temp_dir().join(format!(
        "dpc-kubectl-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_text).unwrap();
    let k = Kubectl { kubeconfig };

    let version = k.ok(&["version", "-o", "json"]).await;
    assert!(version.contains(version_line), "{version}");

    // CRDs, then the examples, all by kubectl apply.
    let out = k.ok(&["apply", "-f", &repo("crds/crds.yaml")]).await;
    assert!(out.contains("customresourcedefinition.apiextensions.k8s.io/connectionoverrides.dpc-operator.io created"), "{out}");
    k.ok(&[
        "wait",
        "--for",
        "condition=Established",
        "crd/connectionoverrides.dpc-operator.io",
        "crd/dpcaccounts.dpc-operator.io",
        "--timeout=20s",
    ])
    .await;
    let out = k
        .ok(&["apply", "-f", &repo("deploy/examples/quickstart.yaml")])
        .await;
    for line in [
        "namespace/data-platform created",
        "secret/dpc-api-credentials created",
        "dpcaccount.dpc-operator.io/matillion-eu created",
        "connectionoverride.dpc-operator.io/salesforce-prod created",
        "connectionoverride.dpc-operator.io/warehouse-password-prod created",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    // Applying again changes nothing.
    let again = k
        .ok(&["apply", "-f", &repo("deploy/examples/quickstart.yaml")])
        .await;
    assert!(
        again.contains("connectionoverride.dpc-operator.io/salesforce-prod unchanged"),
        "{again}"
    );
    point_account_at(&k, &sim).await;

    // Before the operator runs: the printer columns are there, the conditions empty.
    let before = table(&k.ok(&["get", "cov", "-n", "data-platform"]).await);
    assert_eq!(
        before[0],
        [
            "NAME",
            "READY",
            "SYNCED",
            "ENVIRONMENT",
            "CONNECTION",
            "AGE"
        ]
    );
    assert_eq!(before.len(), 3);

    let ctx = Context::new(
        client,
        OperatorConfig {
            allow_insecure_http: true,
            allowed_hosts: vec!["127.0.0.1".into()],
            backoff_base: Duration::from_millis(200),
            ..OperatorConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let operator = tokio::spawn(controller::run(ctx, stop.clone()));

    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "cov",
        "--all",
        "-n",
        "data-platform",
        "--timeout=30s",
    ])
    .await;
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "dpcacct/matillion-eu",
        "-n",
        "data-platform",
        "--timeout=30s",
    ])
    .await;

    let rows = table(&k.ok(&["get", "cov", "-n", "data-platform"]).await);
    assert_eq!(
        rows[1][..5],
        ["salesforce-prod", "True", "True", "PROD", "Salesforce"]
    );
    assert_eq!(
        rows[2][..5],
        [
            "warehouse-password-prod",
            "True",
            "True",
            "PROD",
            "warehouse-password"
        ]
    );
    let wide = table(
        &k.ok(&["get", "connectionoverrides", "-A", "-o", "wide"])
            .await,
    );
    assert_eq!(
        wide[0],
        [
            "NAMESPACE",
            "NAME",
            "READY",
            "SYNCED",
            "ENVIRONMENT",
            "CONNECTION",
            "REASON",
            "AGE"
        ]
    );
    assert_eq!(wide[1][6], "Available");
    let accounts = table(&k.ok(&["get", "dpcacct", "-n", "data-platform"]).await);
    assert_eq!(accounts[0], ["NAME", "READY", "REGION", "AGE"]);
    assert_eq!(accounts[1][..3], ["matillion-eu", "True", "eu1"]);

    let hash = k
        .ok(&[
            "get",
            "cov",
            "salesforce-prod",
            "-n",
            "data-platform",
            "-o",
            "jsonpath={.status.appliedHash}",
        ])
        .await;
    assert!(hash.starts_with("sha256:"), "{hash}");
    let explain = k
        .ok(&["explain", "connectionoverride.spec.deletionPolicy"])
        .await;
    assert!(explain.contains("Orphan leaves it in place"), "{explain}");
    let describe = k
        .ok(&["describe", "cov", "salesforce-prod", "-n", "data-platform"])
        .await;
    assert!(describe.contains("Normal  Created"), "{describe}");

    // Labels and selectors.
    k.ok(&[
        "label",
        "cov",
        "salesforce-prod",
        "-n",
        "data-platform",
        "team=crm",
    ])
    .await;
    let selected = table(
        &k.ok(&[
            "get",
            "cov",
            "-n",
            "data-platform",
            "-l",
            "team=crm",
            "-o",
            "name",
        ])
        .await,
    );
    assert_eq!(
        selected,
        [["connectionoverride.dpc-operator.io/salesforce-prod"]]
    );
    let excluded = table(
        &k.ok(&[
            "get",
            "cov",
            "-n",
            "data-platform",
            "-l",
            "team notin (crm)",
            "-o",
            "name",
        ])
        .await,
    );
    assert_eq!(
        excluded,
        [["connectionoverride.dpc-operator.io/warehouse-password-prod"]]
    );
    let by_field = table(
        &k.ok(&[
            "get",
            "cov",
            "-A",
            "--field-selector",
            "metadata.name=warehouse-password-prod",
            "-o",
            "name",
        ])
        .await,
    );
    assert_eq!(
        by_field,
        [["connectionoverride.dpc-operator.io/warehouse-password-prod"]]
    );

    // A server-side apply of a spec change reaches DPC as one PUT.
    sim.clear_calls();
    let manifest = dir.join("change.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: dpc-operator.io/v1alpha1\nkind: ConnectionOverride\nmetadata:\n  name: warehouse-password-prod\n  namespace: data-platform\nspec:\n  accountRef: {name: matillion-eu}\n  projectId: 3c90c3cc-0d44-4b50-8888-8dd25736052a\n  environmentName: PROD\n  connectionName: warehouse-password\n  authType: GENERIC_SECRET\n  connectionOverrides:\n    connectionProperties: {secretName: prod/warehouse-v2, secretKey: password}\n  deletionPolicy: Orphan\n",
    )
    .unwrap();
    k.ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        manifest.to_str().unwrap(),
    ])
    .await;
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.observedGeneration}=2",
        "cov/warehouse-password-prod",
        "-n",
        "data-platform",
        "--timeout=30s",
    ])
    .await;
    let ops: Vec<SimOp> = sim
        .calls()
        .iter()
        .filter(|c| c.is_write())
        .map(|c| c.op)
        .collect();
    assert_eq!(ops, [SimOp::Update]);

    // kubectl delete waits for the finalizer: the operator deletes in DPC first.
    sim.clear_calls();
    let out = k
        .ok(&[
            "delete",
            "cov",
            "salesforce-prod",
            "-n",
            "data-platform",
            "--timeout=30s",
        ])
        .await;
    assert!(
        out.contains("connectionoverride.dpc-operator.io \"salesforce-prod\" deleted"),
        "{out}"
    );
    let ops: Vec<SimOp> = sim
        .calls()
        .iter()
        .filter(|c| c.is_write())
        .map(|c| c.op)
        .collect();
    assert_eq!(ops, [SimOp::Delete]);
    let (code, _, stderr) = k
        .run(&["get", "cov", "salesforce-prod", "-n", "data-platform"])
        .await;
    assert_ne!(code, 0);
    assert!(
        stderr.contains("NotFound") && stderr.contains("\"salesforce-prod\" not found"),
        "{stderr}"
    );

    // Deleting the namespace releases what is left (the Orphan policy keeps the remote).
    k.ok(&["delete", "namespace", "data-platform", "--timeout=30s"])
        .await;
    let namespaces = k.ok(&["get", "ns", "-o", "name"]).await;
    assert!(!namespaces.contains("data-platform"), "{namespaces}");
    assert!(
        sim.get_override(
            "3c90c3cc-0d44-4b50-8888-8dd25736052a",
            "PROD",
            "warehouse-password"
        )
        .is_some()
    );

    stop.cancel();
    operator.await.unwrap();
}

/// Points the quickstart's account at the simulator.
async fn point_account_at(k: &Kubectl, sim: &DpcSim) {
    let patch = format!(
        r#"{{"spec":{{"apiUrl":"{}","tokenUrl":"{}"}}}}"#,
        sim.api_url(),
        sim.token_url()
    );
    k.ok(&[
        "patch",
        "dpcacct",
        "matillion-eu",
        "-n",
        "data-platform",
        "--type=merge",
        "-p",
        &patch,
    ])
    .await;
}

/// Applies the quickstart, points its account at the simulator and waits until the operator
/// has it all Ready.
async fn quickstart_ready(k: &Kubectl, sim: &DpcSim) {
    k.ok(&["apply", "-f", &repo("deploy/examples/quickstart.yaml")])
        .await;
    point_account_at(k, sim).await;
    k.ok(&[
        "wait",
        "--for=condition=Ready",
        "cov",
        "--all",
        "-n",
        "data-platform",
        "--timeout=60s",
    ])
    .await;
    // The account carries the in-use finalizer before anything is deleted.
    k.ok(&[
        "wait",
        "--for=jsonpath={.metadata.finalizers[0]}=dpc-operator.io/in-use",
        "dpcacct/matillion-eu",
        "-n",
        "data-platform",
        "--timeout=30s",
    ])
    .await;
}

/// Waits until the namespace is gone (the namespace controller empties it first).
async fn namespace_gone(k: &Kubectl) {
    k.ok(&[
        "wait",
        "--for=delete",
        "namespace/data-platform",
        "--timeout=90s",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_quickstart_at_once_deletes_the_remote_override_and_everything_goes() {
    let plane = ControlPlane::start(None).await.expect("a control plane");
    let kubeconfig = std::fs::read_to_string(&plane.endpoint.kubeconfig).unwrap();
    let client = plane.endpoint.client().await;
    let sim = DpcSim::start(SimConfig::default()).await.unwrap();
    sim.add_client(
        "replace-with-your-client-id",
        "replace-with-your-client-secret",
    );
    let dir = std::env::temp_dir().join(format!(
        "dpc-quickstart-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kubeconfig"), kubeconfig).unwrap();
    let k = Kubectl {
        kubeconfig: dir.join("kubeconfig"),
    };
    k.ok(&["apply", "--server-side", "-f", &repo("crds/crds.yaml")])
        .await;
    k.ok(&[
        "wait",
        "--for",
        "condition=Established",
        "crd/connectionoverrides.dpc-operator.io",
        "crd/dpcaccounts.dpc-operator.io",
        "--timeout=20s",
    ])
    .await;
    let ctx = Context::new(
        client,
        OperatorConfig {
            allow_insecure_http: true,
            allowed_hosts: vec!["127.0.0.1".into()],
            backoff_base: Duration::from_millis(200),
            ..OperatorConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let operator = tokio::spawn(controller::run(ctx, stop.clone()));
    let deletes = |sim: &DpcSim| -> Vec<Option<String>> {
        sim.calls_of(SimOp::Delete)
            .into_iter()
            .map(|c| c.query)
            .collect()
    };
    let salesforce = Some("environmentName=PROD&connectionNames=Salesforce".to_string());

    // One command deletes the namespace, the credentials Secret, the account and both
    // objects, in whatever order Kubernetes gets to them.
    quickstart_ready(&k, &sim).await;
    sim.clear_calls();
    k.ok(&[
        "delete",
        "-f",
        &repo("deploy/examples/quickstart.yaml"),
        "--wait=false",
    ])
    .await;
    namespace_gone(&k).await;
    assert_eq!(
        deletes(&sim),
        std::slice::from_ref(&salesforce),
        "{:#?}",
        sim.calls()
    );
    let project = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
    assert!(sim.get_override(project, "PROD", "Salesforce").is_none());
    // deletionPolicy Orphan keeps the other.
    assert!(
        sim.get_override(project, "PROD", "warehouse-password")
            .is_some()
    );

    // Deleting only the namespace: the same.
    quickstart_ready(&k, &sim).await;
    sim.clear_calls();
    k.ok(&["delete", "namespace", "data-platform", "--wait=false"])
        .await;
    namespace_gone(&k).await;
    assert_eq!(deletes(&sim), [salesforce], "{:#?}", sim.calls());
    assert!(sim.get_override(project, "PROD", "Salesforce").is_none());

    stop.cancel();
    operator.await.unwrap();
}
