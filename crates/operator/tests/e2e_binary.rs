//! End to end through the built binary: `dpc-operator run` as a separate process against the
//! real API server of the test run and the DPC simulator (in this test process), signed in as
//! the chart's ServiceAccount with exactly the RBAC the chart renders, checked through the
//! API server, the simulator's call log and the API server's audit log — including SIGKILL
//! at the worst moment and SIGTERM with work in flight.

mod common;

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::audit;
use common::identity::{self, Identity, Scope};
use common::*;
use dpc_testkit::dpc::{Call, Fault, FaultKind, SimConfig, SimOp};
use kube::api::DeleteParams;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

/// A running operator process and everything it printed.
struct Operator {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    printed: Arc<tokio::sync::Notify>,
    /// The tasks copying stdout and stderr; they end at the pipes' end.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

/// The operator as the chart's ServiceAccount before its Role is granted: every list is
/// refused, so no controller's cache fills and it is live but not ready. Returns the process,
/// the identity (to grant later) and the admin endpoints' base URL.
async fn ungranted_operator(h: &Harness) -> (Operator, Identity, String) {
    let id = identity::service_account_only(&h.client, h.cluster, &h.ns, Scope::Namespaced).await;
    let kubeconfig = kubeconfig_file(h, &id.kubeconfig);
    let operator = Operator::scoped(h, &kubeconfig, &["--allow-insecure-http"]);
    let admin = operator.admin_url().await;
    (operator, id, admin)
}

/// Leader election with a Lease in `namespace` and short timings (plain-http DPC allowed).
fn election_args(namespace: &str) -> Vec<&str> {
    vec![
        "--allow-insecure-http",
        "--leader-election",
        "--leader-election-namespace",
        namespace,
        "--lease-duration",
        "2s",
        "--lease-renew-period",
        "500ms",
        "--lease-retry-period",
        "200ms",
    ]
}

/// Writes `kubeconfig` to a file of the test's own.
fn kubeconfig_file(h: &Harness, kubeconfig: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dpc-e2e-{}", h.ns));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("kubeconfig-{:08x}", rand::random::<u32>()));
    std::fs::write(&path, kubeconfig).unwrap();
    path
}

/// The chart's identity for the test's namespace (its Role there), and a kubeconfig file of it.
async fn namespaced_operator(h: &Harness) -> (PathBuf, Identity) {
    let id = identity::install(&h.client, h.cluster, &h.ns, Scope::Namespaced).await;
    (kubeconfig_file(h, &id.kubeconfig), id)
}

impl Operator {
    fn start(kubeconfig: &PathBuf, extra: &[&str]) -> Self {
        Self::start_as("dpc-operator-test", kubeconfig, extra)
    }

    /// Starts the operator on the test's namespace only (`--namespaces`).
    fn scoped(h: &Harness, kubeconfig: &PathBuf, extra: &[&str]) -> Self {
        let mut args = vec!["--namespaces", h.ns.as_str()];
        args.extend_from_slice(extra);
        Self::start(kubeconfig, &args)
    }

    /// Starts a replica whose pod name (its lease identity) is `pod`.
    fn start_as(pod: &str, kubeconfig: &PathBuf, extra: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dpc-operator"));
        command.env("POD_NAME", pod);
        command
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--log-format",
                "json",
                "--backoff-base",
                "200ms",
                "--backoff-max",
                "2s",
                "--dpc-timeout",
                "5s",
                "--admin-addr",
                "127.0.0.1:0",
                // The DPC simulator listens on loopback.
                "--dpc-allowed-hosts",
                "127.0.0.1",
            ])
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("the operator binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        let printed = Arc::new(tokio::sync::Notify::new());
        let mut readers = Vec::new();
        for mut stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = output.clone();
            let notify = printed.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                    notify.notify_waiters();
                }
            }));
        }
        Self {
            child,
            output,
            printed,
            readers,
        }
    }

    /// Waits until the process has printed `needle`.
    async fn wait_output(&self, needle: &str) {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let printed = self.printed.notified();
                if self.output().contains(needle) {
                    return;
                }
                printed.await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "the operator never printed {needle:?}:\n{}",
            self.output()
        );
    }

    /// The base URL of the admin endpoints, from the log line that announces them.
    async fn admin_url(&self) -> String {
        self.wait_output("admin endpoints").await;
        let output = self.output();
        let line = output
            .lines()
            .find(|l| l.contains("admin endpoints"))
            .unwrap();
        let start = line.find("\"addr\":\"").expect("the addr field") + 8;
        let end = start + line[start..].find('"').unwrap();
        format!("http://{}", &line[start..end])
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.wait_exit(WAIT).await;
    }

    fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit and for everything it printed.
    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the operator did not exit within {within:?}"))
            .unwrap();
        for reader in self.readers.drain(..) {
            tokio::time::timeout(within, reader)
                .await
                .expect("the output pipes close after the exit")
                .unwrap();
        }
        status
    }
}

fn writes(calls: &[Call]) -> Vec<(SimOp, Option<u16>)> {
    calls
        .iter()
        .filter(|c| c.is_write())
        .map(|c| (c.op, c.status))
        .collect()
}

/// Waits until a call of `op` has arrived (whether or not it was answered).
async fn wait_call(h: &Harness, op: SimOp, n: usize) -> Call {
    let calls = h
        .sim
        .wait_for_calls(WAIT, |calls| {
            calls.iter().filter(|c| c.op == op).count() >= n
        })
        .await
        .unwrap_or_else(|calls| panic!("fewer than {n} {op:?} calls: {:?}", writes(&calls)));
    calls.into_iter().filter(|c| c.op == op).nth(n - 1).unwrap()
}

fn assert_no_secrets(output: &str, h: &Harness, extra: &[&str]) {
    assert!(
        output.contains("dpc-operator starting"),
        "the operator's logs were captured"
    );
    let mut secrets: Vec<String> = vec![CLIENT_SECRET.into(), CLIENT_ID.into()];
    secrets.extend(h.sim.issued_tokens());
    secrets.extend(extra.iter().map(|s| s.to_string()));
    for secret in &secrets {
        assert!(
            !output.contains(secret.as_str()),
            "a secret value appears in the operator's output"
        );
    }
}

#[tokio::test]
async fn the_full_flow_as_the_charts_namespaced_service_account() {
    full_flow(Scope::Namespaced).await;
}

#[tokio::test]
async fn the_full_flow_as_the_charts_cluster_wide_service_account() {
    full_flow(Scope::AllNamespaces).await;
}

/// The life of objects through the binary, signed in as the chart's ServiceAccount with
/// leader election on: create, a Secret rotated, drift corrected, a ClusterDpcAccount used,
/// deletion; then the audit log shows the operator used every rule the chart grants, and
/// nothing else.
async fn full_flow(scope: Scope) {
    let h = match scope {
        Scope::Namespaced => Harness::start().await,
        Scope::AllNamespaces => Harness::start_alone(test_config(), Default::default()).await,
    };
    let id = identity::install(&h.client, h.cluster, &h.ns, scope).await;
    h.put_secret("refs", &[("key", "value-one-6c1d")]).await;
    h.put_config_map("names", &[("region", "eu-west-1")]).await;
    let mut args = election_args(&h.ns);
    // The test's namespace stands for the operator's own (no POD_NAMESPACE outside a pod).
    args.extend(["--cluster-credentials-namespaces", &h.ns]);
    if scope == Scope::Namespaced {
        args.extend(["--namespaces", &h.ns]);
    }
    let mut operator = Operator::start(&kubeconfig_file(&h, &id.kubeconfig), &args);
    operator.wait_output("became the leader").await;

    let cov = Cov::new("sf", "Salesforce")
        .property_from_secret("secretKey", "refs", "key")
        .property_from_config_map("region", "names", "region");
    h.apply(&cov).await;
    let ready = h.wait_ready("sf").await;
    assert_eq!(writes(&h.sim.calls()), [(SimOp::Create, Some(201))]);

    // Rotation: only the Secret changes; one PUT with the new value (its latency goal is
    // measured by `dpc-bench bench`; printed here).
    h.sim.clear_calls();
    let changed_at = h.sim.now_ms();
    h.put_secret("refs", &[("key", "value-two-9f2e")]).await;
    let put = wait_call(&h, SimOp::Update, 1).await;
    println!(
        "rotation to PUT: {} ms",
        put.at_ms.saturating_sub(changed_at)
    );
    assert_eq!(
        put.body.as_ref().unwrap()["connectionOverrides"]["connectionProperties"]["secretKey"],
        "value-two-9f2e"
    );
    let after = h
        .wait_for("sf", "synced with the new value", |o| {
            o.status.as_ref().and_then(|s| s.applied_hash.clone())
                != ready.status.as_ref().and_then(|s| s.applied_hash.clone())
        })
        .await;
    assert_eq!(
        after.metadata.generation, ready.metadata.generation,
        "the ConnectionOverride itself did not change"
    );
    assert_eq!(writes(&h.sim.calls()), [(SimOp::Update, Some(200))]);

    // Drift: changed in DPC; a reconcile request reads DPC and writes the spec back.
    h.sim.clear_calls();
    h.sim.put_override(
        PROJECT,
        "PROD",
        "Salesforce",
        None,
        serde_json::json!({"connectionProperties": {"secretName": "changed-in-the-ui"}}),
    );
    h.apply(
        &cov.clone()
            .annotation("dpc-operator.io/reconcile-requested-at", "drift-1"),
    )
    .await;
    wait_call(&h, SimOp::Update, 1).await;
    h.wait_for("sf", "the reconcile request handled", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.last_handled_reconcile_at.as_deref())
            == Some("drift-1")
    })
    .await;
    let stored = h.sim.get_override(PROJECT, "PROD", "Salesforce").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        "prod/Salesforce"
    );

    // A ClusterDpcAccount that allows this namespace.
    let shared = unique_name("shared-");
    let account = h.cluster_account(&shared, serde_json::json!({"names": [&h.ns]}));
    let cluster_accounts: kube::Api<dpc_operator::api::ClusterDpcAccount> =
        kube::Api::all(h.client.clone());
    cluster_accounts
        .create(&Default::default(), &account)
        .await
        .unwrap();
    h.apply(&Cov::new("via-cluster", "Snowflake").cluster_account(&shared))
        .await;
    h.wait_ready("via-cluster").await;

    // Deletion: one DELETE each, then the objects are gone.
    h.sim.clear_calls();
    for name in ["sf", "via-cluster"] {
        h.covs()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
        h.wait_gone(name).await;
    }
    assert_eq!(
        writes(&h.sim.calls()),
        [(SimOp::Delete, Some(204)), (SimOp::Delete, Some(204))]
    );
    assert!(h.sim.overrides().is_empty());
    cluster_accounts
        .delete(&shared, &Default::default())
        .await
        .unwrap();

    // A graceful stop releases the lease.
    operator.terminate();
    assert!(operator.wait_exit(Duration::from_secs(10)).await.success());
    assert_eq!(lease_holder(&h).await, None);
    assert_no_secrets(
        &operator.output(),
        &h,
        &["value-one-6c1d", "value-two-9f2e"],
    );
    assert_clean_json_log(&operator.output());

    audit::assert_rules_match_use(&h, &id, scope);
    h.stop().await;
}

#[tokio::test]
async fn sigkill_between_the_dpc_write_and_the_status_write_converges() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    // DPC applies the POST but answers late: the operator is killed before it can write status.
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 4000 }));
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("sf", "Salesforce")).await;
    wait_call(&h, SimOp::Create, 1).await;
    assert!(
        h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some(),
        "DPC holds it already"
    );
    operator.kill().await;
    let orphaned = h.covs().get("sf").await.unwrap();
    assert!(
        orphaned.status.and_then(|s| s.applied_hash).is_none(),
        "no status was written"
    );

    h.sim.clear_calls();
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.wait_ready("sf").await;
    assert_eq!(
        writes(&h.sim.calls()),
        [(SimOp::Create, Some(409)), (SimOp::Update, Some(200))]
    );
    assert_eq!(h.sim.overrides().len(), 1, "no second remote object");

    // The same for a deletion: DPC deletes, the operator dies before releasing the object.
    h.sim
        .push_fault(Fault::on(SimOp::Delete, FaultKind::Delay { ms: 4000 }));
    h.covs()
        .delete("sf", &DeleteParams::default())
        .await
        .unwrap();
    wait_call(&h, SimOp::Delete, 1).await;
    operator.kill().await;
    assert!(h.sim.overrides().is_empty());
    let held = h.covs().get("sf").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some()
            && held.metadata.finalizers.is_some_and(|f| !f.is_empty())
    );

    h.sim.clear_calls();
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.wait_gone("sf").await;
    assert_eq!(
        writes(&h.sim.calls()),
        [(SimOp::Delete, Some(404))],
        "the deletion was not lost"
    );
    operator.kill().await;
}

#[tokio::test]
async fn sigterm_lets_in_flight_work_finish_and_exits_zero() {
    let h = Harness::start().await;
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 1500 }));
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("sf", "Salesforce")).await;
    wait_call(&h, SimOp::Create, 1).await;

    operator.terminate();
    let status = operator.wait_exit(Duration::from_secs(8)).await;
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{}",
        operator.output()
    );
    let obj = h.covs().get("sf").await.unwrap();
    assert!(
        is_ready(&obj),
        "the in-flight reconcile finished and wrote status: {:?}",
        obj.status
    );
    assert!(operator.output().contains("SIGTERM received"));
}

/// On the emulator: the real API server of the test run is shared, and has the CRDs the
/// other tests need; a server without them would be a second control plane started for this
/// one check of a plain 404 on an unknown resource.
#[tokio::test]
async fn without_the_crds_the_binary_says_how_to_install_them() {
    let emu = dpc_testkit::kube::KubeEmulator::start().await.unwrap();
    let path = std::env::temp_dir().join(format!(
        "dpc-e2e-nocrd-{}-{}",
        std::process::id(),
        emu.addr().port()
    ));
    std::fs::write(&path, emu.kubeconfig()).unwrap();
    let mut operator = Operator::start(&path, &[]);
    let status = operator.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(3));
    let output = operator.output();
    assert!(output.contains("CustomResourceDefinition"), "{output}");
    assert!(
        output.contains("kubectl apply -f crds/crds.yaml"),
        "{output}"
    );
}

#[tokio::test]
async fn plain_http_dpc_urls_are_refused_without_the_flag() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(&h, &kubeconfig, &[]);
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let obj = h.wait_reason("sf", "AccountNotReady").await;
    let message = ready_condition(&obj).message;
    assert!(
        message.contains("plain http") && message.contains("--allow-insecure-http"),
        "{message}"
    );
    assert!(h.sim.calls().is_empty());
    operator.kill().await;
}

/// Starts `dpc-operator sim …` and returns the process and the first line it prints (its URL).
async fn start_double(args: &[&str]) -> (Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_dpc-operator"))
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let url = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (child, url)
}

#[tokio::test]
async fn the_test_doubles_run_as_processes() {
    // The DPC simulator, driven through its control endpoints.
    let (mut dpc, url) = start_double(&[
        "sim",
        "dpc",
        "--listen",
        "127.0.0.1:0",
        "--client-id",
        "id-1",
        "--client-secret",
        "secret-1",
    ])
    .await;
    let http = reqwest::Client::new();
    let fault = serde_json::json!({"op": "list", "kind": {"type": "status", "status": 503}});
    let answer = http
        .post(format!("{url}/_sim/faults"))
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let token: serde_json::Value = http
        .post(format!("{url}/oauth/dpc/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "id-1"),
            ("client_secret", "secret-1"),
            ("audience", "x"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = token["access_token"].as_str().unwrap();
    let list = |expect: u16| {
        let request = http
            .get(format!("{url}/dpc/v1/projects/{PROJECT}/connections/environment-overrides?environmentName=PROD"))
            .bearer_auth(bearer);
        async move { assert_eq!(request.send().await.unwrap().status().as_u16(), expect) }
    };
    list(503).await;
    list(200).await;
    let calls: Vec<serde_json::Value> = http
        .get(format!("{url}/_sim/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seen: Vec<(&str, u64)> = calls
        .iter()
        .map(|c| (c["op"].as_str().unwrap(), c["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(seen, [("token", 200), ("list", 503), ("list", 200)]);
    dpc.kill().await.unwrap();

    // The Kubernetes API emulator, with the CRDs installed and a kubeconfig for kubectl.
    let dir = std::env::temp_dir().join(format!("dpc-e2e-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let (mut emu, _) = start_double(&[
        "sim",
        "kube",
        "--listen",
        "127.0.0.1:0",
        "--install-crds",
        "--kubeconfig-out",
        kubeconfig.to_str().unwrap(),
    ])
    .await;
    let output = Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["get", "crd", "-o", "name"])
        .output()
        .await
        .unwrap();
    let crds = String::from_utf8_lossy(&output.stdout);
    assert!(
        crds.contains(
            "customresourcedefinition.apiextensions.k8s.io/connectionoverrides.dpc-operator.io"
        ),
        "{crds}"
    );
    emu.kill().await.unwrap();
}

async fn lease_holder(h: &Harness) -> Option<String> {
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(h.client.clone(), &h.ns);
    leases
        .get_opt("dpc-operator")
        .await
        .unwrap()?
        .spec?
        .holder_identity
}

#[tokio::test]
async fn with_two_replicas_exactly_one_writes_and_killing_it_hands_over() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut election = election_args(&h.ns);
    election.extend(["--namespaces", &h.ns]);
    let mut one = Operator::start_as("replica-one", &kubeconfig, &election);
    // The first replica leads before the second starts.
    one.wait_output("became the leader").await;
    assert_eq!(lease_holder(&h).await.as_deref(), Some("replica-one"));
    let mut two = Operator::start_as("replica-two", &kubeconfig, &election);
    two.wait_output("waiting to become the leader").await;
    h.apply(&Cov::new("first", "First")).await;
    h.wait_ready("first").await;
    assert_eq!(lease_holder(&h).await.as_deref(), Some("replica-one"));
    one.wait_output("DPC accepted the override").await;
    assert!(
        !two.output().contains("DPC accepted the override"),
        "the follower wrote"
    );
    assert!(
        !two.output().contains("\"name\":\"first\""),
        "the follower reconciled"
    );

    // The leader dies without releasing the lease: the follower takes over after it expires.
    one.kill().await;
    let killed_at = tokio::time::Instant::now();
    h.apply(&Cov::new("second", "Second")).await;
    h.wait_ready("second").await;
    let took = killed_at.elapsed();
    assert_eq!(lease_holder(&h).await.as_deref(), Some("replica-two"));
    two.wait_output("became the leader").await;
    assert!(took < Duration::from_secs(8), "handover took {took:?}");
    let writes: Vec<_> = h.sim.calls().into_iter().filter(|c| c.is_write()).collect();
    assert_eq!(
        writes.len(),
        2,
        "one write per object, no duplicate from two leaders"
    );

    // A graceful stop releases the lease at once.
    two.terminate();
    assert!(two.wait_exit(Duration::from_secs(8)).await.success());
    assert_eq!(lease_holder(&h).await, None);
}

/// Polls an HTTP endpoint (nothing pushes readiness) until its status is `expect`.
async fn wait_status(url: &str, expect: u16) -> String {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(response) = http.get(url).send().await {
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            if status == expect {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url} stayed {status}: {body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Parses Prometheus text: every sample line is `name{labels} value` with a number.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {l}"));
            let name_end = series.find('{').unwrap_or(series.len());
            assert!(
                series[..name_end]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad name: {l}"
            );
            (series.to_string(), value)
        })
        .collect()
}

#[tokio::test]
async fn admin_endpoints_report_liveness_readiness_and_metrics() {
    let h = Harness::start().await;
    let (mut operator, id, admin) = ungranted_operator(&h).await;
    wait_status(&format!("{admin}/livez"), 200).await;
    let why = wait_status(&format!("{admin}/readyz"), 503).await;
    assert!(
        why.contains("have not delivered their first lists"),
        "{why}"
    );

    identity::grant(&h.client, &id).await;
    wait_status(&format!("{admin}/readyz"), 200).await;
    h.apply(&Cov::new("missing", "M").property_from_secret("secretKey", "absent", "k"))
        .await;
    h.wait_reason("missing", "SecretNotFound").await;
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;

    let text = wait_status(&format!("{admin}/metrics"), 200).await;
    let samples = samples(&text);
    let value = |series: &str| samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
    assert!(
        value(r#"dpc_operator_reconciliations_total{kind="connectionoverride"}"#).unwrap() >= 2.0
    );
    assert!(value(r#"dpc_operator_reconcile_failures_total{kind="connectionoverride",category="SecretNotFound"}"#).unwrap() >= 1.0);
    assert_eq!(
        value(r#"dpc_operator_dpc_requests_total{operation="create",outcome="success"}"#),
        Some(1.0)
    );
    assert!(
        value(r#"dpc_operator_dpc_request_duration_seconds_count{operation="create"}"#).is_some()
    );
    assert!(
        samples
            .iter()
            .any(|(s, _)| s.starts_with("dpc_operator_reconcile_duration_seconds_bucket{"))
    );
    assert!(value("dpc_operator_rate_limit_wait_seconds_total").is_some());
    assert_eq!(
        value(&format!(
            r#"dpc_operator_condition{{namespace="{}",name="sf",type="Ready",status="True"}}"#,
            h.ns
        )),
        Some(1.0)
    );
    assert_eq!(
        value(&format!(
            r#"dpc_operator_condition{{namespace="{}",name="missing",type="Ready",status="False"}}"#,
            h.ns
        )),
        Some(1.0)
    );
    assert!(!text.contains("not found ("), "no error text in labels");

    // Readiness turns false as soon as shutdown begins, while in-flight work finishes.
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 1500 }));
    h.apply(&Cov::new("slow", "Slow")).await;
    wait_call(&h, SimOp::Create, 2).await;
    operator.terminate();
    wait_status(&format!("{admin}/readyz"), 503).await;
    assert!(operator.wait_exit(Duration::from_secs(8)).await.success());
}

#[tokio::test]
async fn spans_are_exported_over_otlp_only_when_configured() {
    let received: Arc<Mutex<Vec<(String, String, bytes::Bytes)>>> = Arc::default();
    let sink = received.clone();
    let collector = dpc_http::bind_and_serve("127.0.0.1:0".parse().unwrap(), move |req| {
        let sink = sink.clone();
        async move {
            let content_type = req.header("content-type").unwrap_or("").to_string();
            sink.lock()
                .unwrap()
                .push((req.uri.path().to_string(), content_type, req.body.clone()));
            Ok(dpc_http::text(hyper::StatusCode::OK, ""))
        }
    })
    .await
    .unwrap();
    let h = Harness::start().await;
    let endpoint = format!("http://{}", collector.addr);
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(
        &h,
        &kubeconfig,
        &["--allow-insecure-http", "--otlp-endpoint", &endpoint],
    );
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;
    operator.terminate();
    assert!(operator.wait_exit(Duration::from_secs(10)).await.success());

    let exports = received.lock().unwrap().clone();
    assert!(
        !exports.is_empty(),
        "shutdown flushed the spans:\n{}",
        operator
            .output()
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut all = Vec::new();
    for (path, content_type, body) in &exports {
        assert_eq!(path, "/v1/traces");
        assert_eq!(content_type, "application/x-protobuf");
        all.extend_from_slice(body);
    }
    let contains = |needle: &str| all.windows(needle.len()).any(|w| w == needle.as_bytes());
    for name in ["reconcile", "dpc_request", "dpc-operator", "create", "sf"] {
        assert!(contains(name), "the exported spans lack {name:?}");
    }
    let mut secrets = vec![CLIENT_SECRET.to_string()];
    secrets.extend(h.sim.issued_tokens());
    for secret in &secrets {
        assert!(!contains(secret), "a secret value was exported in a span");
    }

    // Without an endpoint nothing is exported (and nothing tries to).
    let before = received.lock().unwrap().len();
    let mut quiet = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("other", "Other")).await;
    h.wait_ready("other").await;
    quiet.terminate();
    assert!(quiet.wait_exit(Duration::from_secs(10)).await.success());
    assert_eq!(received.lock().unwrap().len(), before);
}

#[tokio::test]
async fn sigterm_before_the_first_list_exits_at_once() {
    let h = Harness::start().await;
    let (mut operator, _, admin) = ungranted_operator(&h).await;
    wait_status(&format!("{admin}/readyz"), 503).await;
    operator.terminate();
    let status = operator.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}:\n{}", operator.output());
    assert!(
        operator.output().contains("stopping before the first list"),
        "{}",
        operator.output()
    );
    h.stop().await;
}

#[tokio::test]
async fn absurd_numbers_from_dpc_leave_the_process_up() {
    let h = Harness::start_with(
        test_config(),
        SimConfig {
            announced_expires_in: Some(serde_json::json!(1e300)),
            ..SimConfig::default()
        },
    )
    .await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 429,
            retry_after: Some("1e300".into()),
            body: None,
        },
    ));
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    let admin = operator.admin_url().await;
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let limited = h.wait_reason("sf", "RateLimited").await;
    let message = ready_condition(&limited).message;
    assert!(message.contains("429"), "{message}");
    wait_status(&format!("{admin}/livez"), 200).await;
    // The account is held for an hour at most, not for 1e300 seconds, and the process lives.
    let text = wait_status(&format!("{admin}/metrics"), 200).await;
    assert!(
        text.contains("dpc_operator_dpc_requests_total{operation=\"create\",outcome=\"429\"} 1"),
        "{text}"
    );
    assert!(
        !operator.output().contains("panicked"),
        "{}",
        operator.output()
    );
    operator.terminate();
    assert!(operator.wait_exit(Duration::from_secs(10)).await.success());
}
