//! Ride out the control plane, through the binary on a control plane of the test's own
//! (the shared one cannot be stopped under the other tests): kube-apiserver stopped with
//! SIGTERM or SIGKILL and started again on the same etcd, etcd compacted to its current
//! revision, a change made while the operator's API server was down (through a second API
//! server on the same etcd, as an HA control plane has). After each, the next change
//! reaches DPC within two seconds, a change made while blind is written exactly once, and
//! `/readyz` and the metrics say when a watch has failed for too long.

use super::*;
use dpc_operator::api::ConnectionOverride;
use dpc_testkit::control_plane::{ControlPlane, Endpoint, Stop};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use std::time::Instant;

/// The operator's log must show a change reaching DPC within this long after the patch.
const RESUMED_WITHIN: Duration = Duration::from_secs(2);

/// Every list request of the operator, `(resource, status of the answer)`.
type ListRequests = Vec<(String, Option<u16>)>;

struct Rig {
    plane: ControlPlane,
    h: Harness,
    operator: Operator,
    admin: String,
    /// The operator's ServiceAccount (the audit log names it).
    id: crate::common::identity::Identity,
    /// The value the Secret holds now.
    generation: u32,
}

impl Rig {
    async fn start(extra: &[&str]) -> Self {
        let plane = ControlPlane::start(None).await.expect("a control plane");
        let endpoint: &'static Endpoint = Box::leak(Box::new(plane.endpoint.clone()));
        let h = Harness::start_on(endpoint).await;
        h.put_secret("refs", &[("key", "value-0")]).await;
        h.apply(&Cov::new("sf", "Salesforce").property_from_secret("secretKey", "refs", "key"))
            .await;
        let (kubeconfig, id) = namespaced_operator(&h).await;
        let mut args = vec!["--allow-insecure-http"];
        args.extend_from_slice(extra);
        let operator = Operator::scoped(&h, &kubeconfig, &args);
        let admin = operator.admin_url().await;
        h.wait_ready("sf").await;
        Self {
            plane,
            h,
            operator,
            admin,
            id,
            generation: 0,
        }
    }

    /// Rotates the Secret and returns how long until DPC saw the PUT of the new value.
    async fn rotation_reaches_dpc(&mut self) -> Duration {
        self.generation += 1;
        let value = format!("value-{}", self.generation);
        let started = Instant::now();
        self.h.rotate_secret("refs", "key", &value).await;
        self.wait_written(&value).await;
        started.elapsed()
    }

    /// Waits until DPC was written `value`; fails after the harness's wait.
    async fn wait_written(&self, value: &str) {
        let written = self
            .h
            .sim
            .wait_for_calls(WAIT, |calls| {
                written_values(calls).iter().any(|v| v == value)
            })
            .await;
        if let Err(calls) = written {
            panic!(
                "{value} never reached DPC; writes: {:?}; the operator printed:\n{}",
                written_values(&calls),
                tail(&self.operator.output())
            );
        }
    }

    /// The operator's list requests the API server answered so far, by resource (from its
    /// audit log), and every list request with its answer's status, for messages. A list
    /// refused while the API server is still starting (a 429 while its watch cache fills) is
    /// retried, and is no relist.
    fn lists(&self) -> (std::collections::BTreeMap<String, usize>, ListRequests) {
        let mut answered = std::collections::BTreeMap::new();
        let mut all = Vec::new();
        for request in audit::requests_of(&self.plane.endpoint.audit_log, &self.id.username) {
            let (_, resource, verb) = request.access;
            if verb == "list" {
                if request.code == Some(200) {
                    *answered.entry(resource.clone()).or_default() += 1;
                }
                all.push((resource, request.code));
            }
        }
        (answered, all)
    }

    async fn readyz(&self) -> (u16, String) {
        let answer = reqwest::get(format!("{}/readyz", self.admin))
            .await
            .unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The API server down for `down` (stopped `how`), then started again.
    async fn outage(&mut self, how: Stop, down: Duration) {
        self.plane.stop("kube-apiserver", how).await;
        tokio::time::sleep(down).await;
        self.plane
            .restart("kube-apiserver")
            .await
            .expect("kube-apiserver starts again");
    }
}

fn tail(output: &str) -> String {
    let lines: Vec<&str> = output.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// What the operator printed about its watches.
fn watch_lines(output: &str) -> String {
    output
        .lines()
        .filter(|l| {
            l.contains("\"target\":\"dpc_operator::watch")
                && (l.contains("readyz") || !l.contains("\"DEBUG\""))
        })
        .map(|l| &l[..l.len().min(400)])
        .collect::<Vec<_>>()
        .join("\n")
}

/// The largest value of the series `name` (any labels) in a metrics text.
fn max_series(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

#[tokio::test]
async fn after_each_api_server_restart_and_compaction_the_next_change_reaches_dpc_within_two_seconds()
 {
    let mut rig = Rig::start(&["--watch-blind-after", "5s"]).await;
    let baseline = rig.rotation_reaches_dpc().await;
    let mut resumed = Vec::new();

    // SIGTERM: kube-apiserver drains and exits; started again on the same etcd.
    rig.outage(Stop::Term, Duration::ZERO).await;
    resumed.push((
        "SIGTERM, restarted at once",
        rig.rotation_reaches_dpc().await,
    ));

    // Down for 15 s: longer than --watch-blind-after, so /readyz and the metrics say so.
    let (lists_before, requests_before) = rig.lists();
    rig.plane.stop("kube-apiserver", Stop::Kill).await;
    let blind_at = Instant::now() + Duration::from_secs(15);
    let (status, why) = loop {
        let (status, why) = rig.readyz().await;
        if status == 503 || Instant::now() > blind_at {
            break (status, why);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 503, "/readyz while every watch fails: {why}");
    assert!(why.contains("has failed for"), "{why}");
    let metrics = rig.metrics().await;
    assert!(
        max_series(&metrics, "dpc_operator_watch_failing_seconds") > 5.0,
        "the failing watches show in the metrics:\n{metrics}"
    );
    tokio::time::sleep(blind_at.saturating_duration_since(Instant::now())).await;
    rig.plane.restart("kube-apiserver").await.unwrap();
    let back = Instant::now();
    resumed.push(("SIGKILL, down 15 s", rig.rotation_reaches_dpc().await));
    // Every watch is back within two seconds of the API server's return: none fails, and
    // /readyz says so.
    let (status, why, metrics) = loop {
        let (status, why) = rig.readyz().await;
        let metrics = rig.metrics().await;
        let failing = max_series(&metrics, "dpc_operator_watch_failing_seconds");
        if (status == 200 && failing == 0.0) || back.elapsed() > RESUMED_WITHIN {
            break (status, why, metrics);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (
            status,
            max_series(&metrics, "dpc_operator_watch_failing_seconds")
        ),
        (200, 0.0),
        "every watch back within {RESUMED_WITHIN:?} of the API server's return: {why}\n{metrics}\nthe operator printed:\n{}",
        watch_lines(&rig.operator.output())
    );
    // Each watch listed again at most once: a 410 after the restart never loops. (Two
    // watches each of Secrets, DpcAccounts and ClusterDpcAccounts; one of the others.)
    let (lists_after, requests_after) = rig.lists();
    let since_restart = &requests_after[requests_before.len().min(requests_after.len())..];
    for (resource, after) in &lists_after {
        let relists = after - lists_before.get(resource).copied().unwrap_or(0);
        let watches =
            if ["secrets", "dpcaccounts", "clusterdpcaccounts"].contains(&resource.as_str()) {
                2
            } else {
                1
            };
        assert!(
            relists <= watches,
            "{resource} was listed {relists} times after the restart ({watches} watches); the lists since (resource, status): {since_restart:?}"
        );
    }
    assert!(
        lists_after.values().sum::<usize>() > lists_before.values().sum::<usize>(),
        "the watches listed again after the restart (410)"
    );

    // SIGKILL, restarted at once: open watches break, nothing is drained.
    rig.outage(Stop::Kill, Duration::ZERO).await;
    resumed.push((
        "SIGKILL, restarted at once",
        rig.rotation_reaches_dpc().await,
    ));

    // etcd compacted to its current revision.
    rig.plane.compact_etcd().await.expect("etcd compacts");
    resumed.push(("etcd compaction", rig.rotation_reaches_dpc().await));

    println!("baseline: {baseline:?}; after each fault: {resumed:?}");
    for (fault, took) in &resumed {
        assert!(
            *took < RESUMED_WITHIN,
            "after {fault} the rotation took {took:?} to reach DPC (baseline {baseline:?}); the operator printed:\n{}",
            tail(&rig.operator.output())
        );
    }
    let metrics = rig.metrics().await;
    assert!(
        metrics.contains("dpc_operator_watch_restarts_total{"),
        "restarts are counted:\n{metrics}"
    );
    assert_no_secrets(&rig.operator.output(), &rig.h, &["value-0", "value-1"]);
    rig.operator.kill().await;
}

#[tokio::test]
async fn a_change_made_while_the_operator_was_blind_is_written_once_after() {
    let mut rig = Rig::start(&[]).await;
    // A second API server on the same etcd: the test changes objects through it while the
    // operator's own API server is down.
    let second = rig.plane.add_apiserver("kube-apiserver-b").await.unwrap();
    let mut other = rig.h.cluster.clone();
    other.server = second;
    let other_client = other.client().await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(other_client.clone(), &rig.h.ns);
    let covs: Api<ConnectionOverride> = Api::namespaced(other_client, &rig.h.ns);

    // SIGTERM drains for about a minute: one of each kind of stop, one change each.
    {
        let how = Stop::Term;
        // A Secret rotated while the operator's API server is down.
        let writes_before = write_calls(&rig.h.sim.calls()).len();
        rig.plane.stop("kube-apiserver", how).await;
        let value = "rotated-while-down".to_string();
        let patch = json!({"stringData": {"key": value}});
        secrets
            .patch("refs", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        rig.plane.restart("kube-apiserver").await.unwrap();
        rig.wait_written(&value).await;
        // No other write follows: wait for the operator to settle on the object, then count.
        rig.h.wait_ready("sf").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let calls = rig.h.sim.calls();
        let writes: Vec<_> = write_calls(&calls)[writes_before..].to_vec();
        assert_eq!(
            writes.len(),
            1,
            "after {how:?}: one write of the rotated value, got {:?}",
            written_values(&calls)[writes_before..].to_vec()
        );
        assert_eq!(writes[0].op, SimOp::Update);
    }
    {
        let how = Stop::Kill;
        // The object edited while the operator's API server is down.
        let writes_before = write_calls(&rig.h.sim.calls()).len();
        rig.plane.stop("kube-apiserver", how).await;
        let secret_name = "prod/edited-while-down".to_string();
        let patch = json!({"spec": {"connectionOverrides": {"connectionProperties": {"secretName": secret_name}}}});
        covs.patch("sf", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        rig.plane.restart("kube-apiserver").await.unwrap();
        let edited = rig
            .h
            .sim
            .wait_for_calls(WAIT, |calls| {
                write_calls(calls)[writes_before..].iter().any(|c| {
                    c.body.as_ref().unwrap()["connectionOverrides"]["connectionProperties"]
                        ["secretName"]
                        == secret_name.as_str()
                })
            })
            .await;
        assert!(edited.is_ok(), "the edit reached DPC after {how:?}");
        rig.h.wait_ready("sf").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let writes = write_calls(&rig.h.sim.calls()).len() - writes_before;
        assert_eq!(writes, 1, "after {how:?}: one write of the edit");
    }
    rig.operator.kill().await;
}
