//! End to end through the built binary: `dpc-operator run` as a separate process against the
//! real API server of the test run and the DPC simulator (in this test process), signed in as
//! the chart's ServiceAccount with exactly the RBAC the chart renders, checked through the
//! API server, the simulator's call log and the API server's audit log — including SIGKILL
//! at the worst moment and SIGTERM with work in flight.

mod control_plane;
mod flows;
mod import;
mod ownership;
mod processes;
mod sandbox;

use crate::common::audit;
use crate::common::identity::{self, Identity, Scope};
use crate::common::*;
use dpc_testkit::dpc::{Call, Fault, FaultKind, SimConfig, SimOp};
use kube::api::DeleteParams;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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

/// The call log of a simulator in another process (`GET {base}/_sim/calls`).
async fn sim_calls(http: &reqwest::Client, base: &str) -> Vec<Call> {
    http.get(format!("{base}/_sim/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn write_summary(calls: &[Call]) -> Vec<(SimOp, Option<u16>)> {
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
        .unwrap_or_else(|calls| panic!("fewer than {n} {op:?} calls: {:?}", write_summary(&calls)));
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
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Create, Some(201))]);

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
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Update, Some(200))]);

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
        write_summary(&h.sim.calls()),
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

/// How long a watch refused with 403 may take to try again once access is granted: kube-runtime's
/// default watcher backoff grows to 30 s and its jitter can double a delay, so one retry may
/// come up to 60 s after the last; a grant landing just after a retry waits that long.
const AFTER_A_GRANT: Duration = Duration::from_secs(75);

/// Polls an HTTP endpoint (nothing pushes readiness) until its status is `expect`.
async fn wait_status(url: &str, expect: u16) -> String {
    wait_status_within(url, expect, WAIT).await
}

/// [`wait_status`] with its own deadline.
async fn wait_status_within(url: &str, expect: u16, within: Duration) -> String {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + within;
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
