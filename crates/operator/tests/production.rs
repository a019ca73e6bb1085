//! Production behaviour through the emulator and the simulator: instant rotation, drift
//! detection with shared reads, ObserveOnly, pause, reconcile-requested-at, deletion timeout,
//! the account's request rate and 429s, conflicts, tenancy, sharding and malformed objects.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use dpc_operator::api::{ClusterDpcAccount, DriftPolicy, ManagementPolicy, conditions};
use dpc_operator::config::OperatorConfig;
use dpc_testkit::dpc::{Call, Fault, FaultKind, SimConfig, SimOp};
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

/// Drift checks every second. The CRD refuses a `syncInterval` under 30s, so the objects set
/// none and take the operator's default (the real API server enforces what the emulator let
/// through).
fn fast_drift() -> OperatorConfig {
    OperatorConfig {
        min_sync_interval: Duration::from_millis(200),
        default_sync_interval: Duration::from_secs(1),
        ..test_config()
    }
}

fn writes(calls: &[Call]) -> Vec<&Call> {
    calls.iter().filter(|c| c.is_write()).collect()
}

fn drifted(
    obj: &dpc_operator::api::ConnectionOverride,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions::find(&obj.status.as_ref()?.conditions, conditions::DRIFTED).cloned()
}

#[tokio::test]
async fn a_hundred_rotated_secrets_each_reach_dpc_as_one_put_with_the_new_value() {
    // The latency goal (p99 under a second) is measured by `dpc-bench bench`; here the worst
    // latency is printed, the behaviour asserted.
    let h = Harness::start_alone(test_config(), SimConfig::default()).await;
    for i in 0..100 {
        h.put_secret(&format!("refs-{i}"), &[("key", &format!("v1-{i}"))])
            .await;
    }
    let h = h.run();
    for i in 0..100 {
        h.apply(
            &Cov::new(&format!("o{i}"), &format!("C{i}")).property_from_secret(
                "secretKey",
                &format!("refs-{i}"),
                "key",
            ),
        )
        .await;
    }
    for i in 0..100 {
        h.wait_ready(&format!("o{i}")).await;
    }
    h.sim.clear_calls();

    // Every Secret changes at once; each change time is taken just before its write.
    let changes = futures::future::join_all((0..100).map(|i| {
        let h = &h;
        async move {
            let at = h.sim.now_ms();
            h.rotate_secret(&format!("refs-{i}"), "key", &format!("v2-{i}"))
                .await;
            (format!("C{i}"), at)
        }
    }))
    .await;
    let calls = h
        .sim
        .wait_for_calls(WAIT, |calls| {
            calls
                .iter()
                .filter(|c| c.op == SimOp::Update && c.status == Some(200))
                .count()
                >= 100
        })
        .await
        .unwrap_or_else(|c| {
            panic!(
                "only {} PUTs",
                c.iter().filter(|c| c.op == SimOp::Update).count()
            )
        });
    let puts: BTreeMap<String, &Call> = calls
        .iter()
        .filter(|c| c.op == SimOp::Update)
        .map(|c| {
            (
                c.body.as_ref().unwrap()["connectionName"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                c,
            )
        })
        .collect();
    assert_eq!(puts.len(), 100, "one PUT per object");
    assert_eq!(writes(&calls).len(), 100, "and no other write");
    let mut worst = 0;
    for (connection, changed_at) in changes {
        let put = puts[&connection];
        let latency = put.at_ms.saturating_sub(changed_at);
        worst = worst.max(latency);
        let index = connection.trim_start_matches('C');
        assert_eq!(
            put.body.as_ref().unwrap()["connectionOverrides"]["connectionProperties"]["secretKey"],
            format!("v2-{index}")
        );
    }
    println!("worst rotation latency: {worst} ms");
    h.stop().await;
}

#[tokio::test]
async fn quiet_sync_intervals_read_once_per_environment_and_write_nothing() {
    let h = Harness::start_alone(fast_drift(), SimConfig::default())
        .await
        .run();
    // Six objects in two environments.
    for (i, env) in ["PROD", "PROD", "PROD", "DEV", "DEV", "DEV"]
        .iter()
        .enumerate()
    {
        let cov = Cov::new(&format!("o{i}"), &format!("C{i}")).environment(env);
        h.apply(&cov).await;
    }
    for i in 0..6 {
        h.wait_ready(&format!("o{i}")).await;
    }
    h.sim.clear_calls();
    let start = h.sim.now_ms();
    let lists_of = |calls: &[Call], env: &str| -> Vec<u64> {
        calls
            .iter()
            .filter(|c| c.op == SimOp::List && c.param("environmentName").as_deref() == Some(env))
            .map(|c| c.at_ms)
            .collect()
    };
    // Three intervals: each environment has been read three times.
    let calls = h
        .sim
        .wait_for_calls(Duration::from_secs(10), |calls| {
            lists_of(calls, "PROD").len() >= 3 && lists_of(calls, "DEV").len() >= 3
        })
        .await
        .expect("each environment is read every interval");
    let elapsed = h.sim.now_ms() - start;
    assert!(writes(&calls).is_empty(), "no write when nothing changed");
    for env in ["PROD", "DEV"] {
        let lists = lists_of(&calls, env);
        // At most one list per interval (1 s, jittered by at most 10 %).
        for pair in lists.windows(2) {
            assert!(
                pair[1] - pair[0] >= 850,
                "{env} was read twice within an interval: {lists:?}"
            );
        }
        assert!(
            lists.len() as u64 <= elapsed / 900 + 1,
            "{env}: {} lists in {elapsed} ms",
            lists.len()
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn drift_is_written_back_with_driftpolicy_correct() {
    let h = Harness::start_with(fast_drift(), SimConfig::default())
        .await
        .run();
    let cov = Cov::new("sf", "Salesforce");
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    h.sim.clear_calls();

    h.sim.put_override(
        PROJECT,
        "PROD",
        "Salesforce",
        None,
        json!({"connectionProperties": {"secretName": "changed-in-the-ui"}}),
    );
    let calls = h
        .sim
        .wait_for_calls(WAIT, |c| c.iter().any(|c| c.op == SimOp::Update))
        .await
        .unwrap();
    let puts: Vec<&Call> = writes(&calls);
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].op, SimOp::Update);
    let (_, _, note) = h.wait_event("sf", "DriftCorrected").await;
    assert!(
        note.contains("connectionOverrides.connectionProperties.secretName"),
        "{note}"
    );
    let stored = h.sim.get_override(PROJECT, "PROD", "Salesforce").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        "prod/Salesforce"
    );

    // Deleted behind our back: recreated.
    h.sim.remove_override(PROJECT, "PROD", "Salesforce");
    h.sim
        .wait_for_calls(WAIT, |c| c.iter().any(|c| c.op == SimOp::Create))
        .await
        .unwrap();
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    h.stop().await;
}

#[tokio::test]
async fn drift_is_only_reported_with_driftpolicy_report() {
    let h = Harness::start_with(fast_drift(), SimConfig::default())
        .await
        .run();
    let mut cov = Cov::new("sf", "Salesforce").property("secretKey", "k");
    cov.spec.drift_policy = Some(DriftPolicy::Report);
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    h.sim.clear_calls();

    h.sim.put_override(PROJECT, "PROD", "Salesforce", None, json!({"connectionProperties": {"secretName": "prod/Salesforce", "secretKey": "ui"}, "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}));
    let obj = h
        .wait_for("sf", "Drifted", |o| {
            drifted(o).is_some_and(|d| d.status == "True")
        })
        .await;
    let condition = drifted(&obj).unwrap();
    assert!(
        condition
            .message
            .contains("connectionOverrides.connectionProperties.secretKey"),
        "{}",
        condition.message
    );
    assert!(!condition.message.contains("ui"), "values are not shown");
    assert_eq!(ready_reason(&obj).as_deref(), Some("Drifted"));
    // Another interval passes; still no write.
    let seen = h.sim.calls_of(SimOp::List).len();
    h.sim
        .wait_for_calls(WAIT, |c| {
            c.iter().filter(|c| c.op == SimOp::List).count() > seen
        })
        .await
        .unwrap();
    assert!(writes(&h.sim.calls()).is_empty(), "Report never writes");

    // Back in sync: the condition clears.
    h.sim.put_override(PROJECT, "PROD", "Salesforce", None, json!({"connectionProperties": {"secretName": "prod/Salesforce", "secretKey": "k"}, "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}));
    let obj = h
        .wait_for("sf", "in sync again", |o| {
            drifted(o).is_some_and(|d| d.status == "False")
        })
        .await;
    assert!(is_ready(&obj));
    h.stop().await;
}

#[tokio::test]
async fn observe_only_never_writes_and_ready_follows_dpc() {
    let h = Harness::start_with(fast_drift(), SimConfig::default())
        .await
        .run();
    let mut cov = Cov::new("watch", "Salesforce");
    cov.spec.management_policy = Some(ManagementPolicy::ObserveOnly);
    h.apply(&cov).await;
    let obj = h.wait_reason("watch", "Drifted").await;
    assert!(
        ready_condition(&obj)
            .message
            .contains("does not exist in DPC")
    );
    assert!(
        obj.metadata.finalizers.is_none(),
        "nothing to clean up: no finalizer"
    );

    h.sim.put_override(PROJECT, "PROD", "Salesforce", None, json!({"connectionProperties": {"secretName": "prod/Salesforce"}, "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}));
    let obj = h.wait_ready("watch").await;
    assert!(ready_condition(&obj).message.contains("ObserveOnly"));
    h.covs()
        .delete("watch", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("watch").await;
    assert!(
        writes(&h.sim.calls()).is_empty(),
        "ObserveOnly never writes"
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    h.stop().await;
}

#[tokio::test]
async fn a_paused_object_makes_no_call_until_unpaused() {
    let h = Harness::start().await.run();
    let cov = Cov::new("sf", "Salesforce");
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    h.sim.clear_calls();

    // Paused with the spec unchanged: what DPC holds is still the spec, Ready stays.
    let paused = cov.clone().annotation("dpc-operator.io/paused", "true");
    h.apply(&paused).await;
    let obj = h
        .wait_for("sf", "paused", |o| {
            o.status.as_ref().is_some_and(|s| {
                conditions::find(&s.conditions, conditions::SYNCED)
                    .is_some_and(|c| c.reason == "ReconcilePaused")
            })
        })
        .await;
    assert!(
        conditions::is_true(&obj.status.unwrap().conditions, conditions::READY),
        "Ready is kept while the spec is what DPC holds"
    );

    // A spec change while paused is not in DPC: Ready turns False until it is.
    h.apply(&paused.clone().property("secretKey", "new")).await;
    let waiting = h.wait_reason("sf", "Paused").await;
    assert_eq!(waiting.metadata.generation, Some(2));
    let ready = ready_condition(&waiting);
    assert_eq!(ready.status, "False");
    assert!(ready.message.contains("generation 2"), "{}", ready.message);
    assert!(h.sim.calls().is_empty(), "no call while paused");

    h.apply(&cov.property("secretKey", "new")).await;
    // The spec changed once while paused (generation 2); unpausing sends it.
    h.wait_for("sf", "Ready after unpausing", |o| {
        is_ready(o) && o.metadata.generation == Some(2)
    })
    .await;
    assert_eq!(
        writes(&h.sim.calls())
            .iter()
            .map(|c| c.op)
            .collect::<Vec<_>>(),
        [SimOp::Update]
    );
    h.stop().await;
}

#[tokio::test]
async fn reconcile_requested_at_reads_dpc_now_and_is_echoed() {
    let h = Harness::start().await.run();
    let cov = Cov::new("sf", "Salesforce");
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    h.sim.put_override(
        PROJECT,
        "PROD",
        "Salesforce",
        None,
        json!({"connectionProperties": {"secretName": "edited"}}),
    );
    h.sim.clear_calls();

    h.apply(&cov.annotation(
        "dpc-operator.io/reconcile-requested-at",
        "2026-11-22T10:00:00Z",
    ))
    .await;
    let obj = h
        .wait_for("sf", "handled", |o| {
            o.status
                .as_ref()
                .and_then(|s| s.last_handled_reconcile_at.as_deref())
                == Some("2026-11-22T10:00:00Z")
        })
        .await;
    assert!(is_ready(&obj));
    let ops: Vec<SimOp> = h.sim.calls().iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [SimOp::List, SimOp::Update],
        "read now, then the drift was corrected"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_deletion_that_cannot_reach_dpc_is_released_after_deletion_timeout() {
    let h = Harness::start().await.run();
    let mut cov = Cov::new("sf", "Salesforce");
    cov.spec.deletion_timeout = Some("2s".into());
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    h.sim
        .push_fault(Fault::status(SimOp::Delete, 503).times(1000));
    h.covs()
        .delete("sf", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_reason("sf", "Deleting").await;
    h.wait_gone("sf").await;
    let (kind, _, note) = h.wait_event("sf", "DeletionTimedOut").await;
    assert_eq!(kind, "Warning");
    assert!(
        note.contains("DPC answered 503 to delete") && note.contains("left in DPC"),
        "{note}"
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    assert!(
        h.sim.calls_of(SimOp::Delete).len() >= 2,
        "it kept trying until the timeout"
    );
    h.sim.clear_faults();
    h.stop().await;
}

#[tokio::test]
async fn the_accounts_request_rate_is_never_exceeded() {
    // Slots further than 300 ms away are not waited for in place: those objects are told to
    // come back at their slot (16 workers at 10 requests/s reserve up to ~1.6 s ahead).
    let config = OperatorConfig {
        max_admission_wait: Duration::from_millis(300),
        ..test_config()
    };
    let mut h = Harness::start_alone(config, SimConfig::default()).await;
    h.requests_per_minute = 600; // 10 per second
    h.put_account(ACCOUNT, CREDS).await;
    let api: Api<dpc_operator::api::DpcAccount> = Api::namespaced(h.client.clone(), &h.ns);
    let patch = json!({"spec": {"requestBurst": 2}});
    api.patch(ACCOUNT, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let h = h.run();
    // Some objects wait for their slot longer than they may wait in place: they say so. The
    // watch starts before the objects are created, so no passing state is missed.
    let waiting = {
        use futures::StreamExt;
        let stream = kube::runtime::watcher(h.covs(), Default::default());
        let mut stream = kube::runtime::WatchStreamExt::applied_objects(stream).boxed();
        tokio::spawn(async move {
            while let Some(Ok(o)) = stream.next().await {
                if ready_reason(&o).as_deref() == Some("Creating") {
                    return o;
                }
            }
            panic!("the watch ended");
        })
    };
    for i in 0..80 {
        h.apply(&Cov::new(&format!("o{i}"), &format!("C{i}"))).await;
    }
    let waiting = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("an object waits for its turn")
        .unwrap();
    assert!(
        ready_condition(&waiting)
            .message
            .contains("waits for the account's request rate")
    );
    for i in 0..80 {
        h.wait_ready(&format!("o{i}")).await;
    }
    let calls = h.sim.calls();
    let times: Vec<u64> = calls.iter().map(|c| c.at_ms).collect();
    // GCRA at 10/s with a burst of 2: any 1 s window holds at most 2 + 10 calls.
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|t| **t < start + 1000).count();
        assert!(in_window <= 12, "{in_window} calls in one second");
    }
    assert_eq!(writes(&calls).len(), 80, "exactly one write per object");
    h.stop().await;
}

#[tokio::test]
async fn a_429_holds_all_twenty_waiting_objects_for_retry_after() {
    let h = Harness::start_alone(test_config(), SimConfig::default()).await;
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 429,
            retry_after: Some("3".into()),
            body: None,
        },
    ));
    let h = h.run();
    for i in 0..20 {
        h.apply(&Cov::new(&format!("o{i}"), &format!("C{i}"))).await;
    }
    for i in 0..20 {
        h.wait_ready(&format!("o{i}")).await;
    }
    let calls = h.sim.calls();
    let limited = calls.iter().find(|c| c.status == Some(429)).unwrap();
    // From the moment the 429 was answered (calls already on their way may still arrive in
    // the few milliseconds the answer takes to reach the client).
    let answered = limited.done_ms.unwrap() + 20;
    let inside: Vec<&Call> = calls
        .iter()
        .filter(|c| c.at_ms > answered && c.at_ms < limited.done_ms.unwrap() + 3000)
        .collect();
    assert!(
        inside.is_empty(),
        "{} calls during Retry-After",
        inside.len()
    );
    assert_eq!(
        writes(&calls)
            .iter()
            .filter(|c| c.status == Some(201))
            .count(),
        20
    );
    h.stop().await;
}

#[tokio::test]
async fn two_objects_for_one_override_conflict_and_only_the_older_writes() {
    let h = Harness::start().await.run();
    h.apply(&Cov::new("first", "Salesforce").property("secretKey", "first"))
        .await;
    h.wait_ready("first").await;
    h.apply(&Cov::new("second", "Salesforce").property("secretKey", "second"))
        .await;
    let obj = h.wait_reason("second", "Conflict").await;
    let message = ready_condition(&obj).message;
    assert!(message.contains(&format!("{}/first", h.ns)), "{message}");
    let bodies: Vec<String> = writes(&h.sim.calls())
        .iter()
        .map(|c| {
            c.body.as_ref().unwrap()["connectionOverrides"]["connectionProperties"]["secretKey"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(bodies, ["first"], "the second never writes");

    // Deleting the loser deletes nothing in DPC; deleting the owner hands over.
    h.covs()
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("first").await;
    h.wait_ready("second").await;
    let stored = h.sim.get_override(PROJECT, "PROD", "Salesforce").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretKey"],
        "second"
    );
    h.stop().await;
}

/// The secretKey values of the writes DPC saw.
fn written_values(calls: &[Call]) -> Vec<String> {
    writes(calls)
        .iter()
        .map(|c| {
            c.body.as_ref().unwrap()["connectionOverrides"]["connectionProperties"]["secretKey"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn the_object_that_manages_an_override_keeps_it_against_a_newcomer_of_the_same_second() {
    let h = Harness::start().await.run();
    // Kubernetes records creation to the second: "alpha", created just after "zeta" wrote
    // its override, sorts first by name. Retried until both share a creation second (most
    // rounds do: zeta is Ready within a few tens of milliseconds).
    let mut round = 0;
    let (zeta, alpha, managing) = loop {
        round += 1;
        assert!(round <= 10, "never created two objects within one second");
        let (zeta, alpha) = (format!("zeta-{round}"), format!("alpha-{round}"));
        let connection = format!("Salesforce{round}");
        let a = h
            .apply(&Cov::new(&zeta, &connection).property("secretKey", "zeta"))
            .await;
        let managing = h.wait_ready(&zeta).await;
        h.sim.clear_calls();
        let b = h
            .apply(&Cov::new(&alpha, &connection).property("secretKey", "alpha"))
            .await;
        if a.metadata.creation_timestamp == b.metadata.creation_timestamp {
            break (zeta, alpha, managing);
        }
        for name in [&alpha, &zeta] {
            h.covs()
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
            h.wait_gone(name).await;
        }
    };
    h.wait_reason(&alpha, "Conflict").await;
    let managed = managing.status.unwrap().managed_override.unwrap();
    assert_eq!(managed.api_url, h.sim.api_url());
    assert_eq!(managed.connection_name, format!("Salesforce{round}"));
    assert!(
        written_values(&h.sim.calls()).is_empty(),
        "the newcomer never writes"
    );

    // A restarted operator reads the claim from status: the newcomer still never writes.
    let h = h.restart().await;
    let ask = |name: &str| {
        Cov::new(name, &format!("Salesforce{round}")).annotation(
            dpc_operator::api::RECONCILE_REQUESTED_ANNOTATION,
            "after-restart",
        )
    };
    h.apply(&ask(&alpha).property("secretKey", "alpha")).await;
    h.apply(&ask(&zeta).property("secretKey", "zeta")).await;
    let handled = |o: &dpc_operator::api::ConnectionOverride| {
        o.status
            .as_ref()
            .and_then(|s| s.last_handled_reconcile_at.as_deref())
            == Some("after-restart")
    };
    let loser = h.wait_for(&alpha, "the request handled", handled).await;
    assert_eq!(ready_condition(&loser).reason, "Conflict");
    let winner = h.wait_for(&zeta, "the request handled", handled).await;
    assert_eq!(ready_condition(&winner).reason, "Available");
    assert!(
        written_values(&h.sim.calls()).is_empty(),
        "the newcomer never writes"
    );
    let stored = h
        .sim
        .get_override(PROJECT, "PROD", &format!("Salesforce{round}"))
        .unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretKey"],
        "zeta"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_dpc_account_and_a_cluster_account_reaching_one_dpc_account_claim_once() {
    let h = Harness::start().await;
    let shared: Api<ClusterDpcAccount> = Api::all(h.client.clone());
    let shared_name = unique_name("same-dpc-");
    shared
        .create(
            &PostParams::default(),
            &h.cluster_account(&shared_name, json!({"names": [&h.ns]})),
        )
        .await
        .unwrap();
    let h = h.run();
    h.apply(&Cov::new("namespaced", "Salesforce").property("secretKey", "namespaced"))
        .await;
    h.wait_ready("namespaced").await;
    let via_cluster = Cov::new("via-cluster", "Salesforce")
        .property("secretKey", "cluster")
        .cluster_account(&shared_name);
    h.apply(&via_cluster).await;
    let loser = h.wait_reason("via-cluster", "Conflict").await;
    let message = ready_condition(&loser).message;
    assert!(
        message.contains(&format!("{}/namespaced", h.ns)),
        "{message}"
    );
    assert!(message.contains(&h.sim.api_url()), "{message}");
    assert_eq!(written_values(&h.sim.calls()), ["namespaced"]);
    shared
        .delete(&shared_name, &DeleteParams::default())
        .await
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_changed_identity_is_refused_and_deletion_deletes_the_override_it_manages() {
    let h = Harness::start().await.run();
    h.apply(&Cov::new("moved", "Salesforce")).await;
    h.wait_ready("moved").await;
    // Stopped while the status is rewritten: a pass in flight would write its own back.
    let h = h.halt().await;
    h.sim.clear_calls();
    // The CRD refuses the change; an edited CRD would not. Status is what the operator
    // trusts: a status written elsewhere naming another override stands in for that here.
    let status = json!({"status": {"managedOverride": {
        "apiUrl": h.sim.api_url(),
        "projectId": PROJECT,
        "environmentName": "PROD",
        "connectionName": "Postgres",
        "claimedAt": "2026-01-01T00:00:00.000000Z"
    }}});
    h.sim.put_override(
        PROJECT,
        "PROD",
        "Postgres",
        None,
        json!({"connectionProperties": {"secretName": "pg"}}),
    );
    h.covs()
        .patch_status("moved", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    h.apply(&Cov::new("moved", "Salesforce").property("secretKey", "changed"))
        .await;
    let h = h.run();
    let refused = h.wait_reason("moved", "InvalidSpec").await;
    let message = ready_condition(&refused).message;
    assert!(
        message.contains("manages the override of connection Postgres"),
        "{message}"
    );
    assert!(writes(&h.sim.calls()).is_empty(), "{:?}", h.sim.calls());

    h.covs()
        .delete("moved", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("moved").await;
    let deletes: Vec<Option<String>> = h
        .sim
        .calls_of(SimOp::Delete)
        .into_iter()
        .map(|c| c.query)
        .collect();
    assert_eq!(
        deletes,
        [Some(
            "environmentName=PROD&connectionNames=Postgres".to_string()
        )]
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Postgres").is_none());
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    h.stop().await;
}

#[tokio::test]
async fn credentials_deleted_while_the_operator_was_down_hold_the_deletion_until_force_orphan() {
    let h = Harness::start().await.run();
    h.apply(&Cov::new("stuck", "Salesforce")).await;
    h.wait_ready("stuck").await;
    let h = h.halt().await;
    h.delete_secret(CREDS).await;
    h.covs()
        .delete("stuck", &DeleteParams::default())
        .await
        .unwrap();
    let accounts: Api<dpc_operator::api::DpcAccount> = Api::namespaced(h.client.clone(), &h.ns);
    accounts
        .delete(ACCOUNT, &DeleteParams::default())
        .await
        .unwrap();
    h.sim.clear_calls();
    let h = h.run();
    let held = h.wait_reason("stuck", "Deleting").await;
    let message = ready_condition(&held).message;
    assert!(
        message.contains(&format!("Secret {}/{CREDS} not found", h.ns)),
        "{message}"
    );
    assert!(
        message.contains("dpc-operator.io/force-orphan"),
        "{message}"
    );
    // The account waits for its user.
    let waiting = accounts.get(ACCOUNT).await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some());
    h.apply(
        &Cov::new("stuck", "Salesforce")
            .annotation(dpc_operator::api::FORCE_ORPHAN_ANNOTATION, "true"),
    )
    .await;
    h.wait_gone("stuck").await;
    // With its last user gone the account is released too.
    let uid = waiting.metadata.uid.clone().unwrap();
    let gone = kube::runtime::wait::await_condition(
        accounts.clone(),
        ACCOUNT,
        kube::runtime::wait::conditions::is_deleted(&uid),
    );
    tokio::time::timeout(Duration::from_secs(30), gone)
        .await
        .expect("the account is released")
        .unwrap();
    assert!(writes(&h.sim.calls()).is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_cluster_account_serves_only_the_namespaces_it_allows() {
    let h = Harness::start().await;
    // Names of this test's own: the API server is shared with the other tests.
    let (team_b_ns, team_c_ns) = (unique_name("b-"), unique_name("c-"));
    let (team_b_ns, team_c_ns) = (team_b_ns.as_str(), team_c_ns.as_str());
    let shared_name = unique_name("shared-");
    let label = unique_name("dpc-");
    create_namespace(&h.client, team_b_ns, json!({})).await;
    create_namespace(&h.client, team_c_ns, json!({&label: "yes"})).await;

    let shared: Api<ClusterDpcAccount> = Api::all(h.client.clone());
    let account = h.cluster_account(
        &shared_name,
        json!({"names": [&h.ns], "selector": {"matchLabels": {&label: "yes"}}}),
    );
    shared
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let h = h.also_watch(&[team_b_ns, team_c_ns]).run();
    let cov = Cov::new("a", "A").cluster_account(&shared_name);
    h.apply(&cov).await;
    h.wait_ready("a").await;

    let in_ns = |ns: &str, name: &str, connection: &str| {
        let mut c = cov.clone();
        c.name = name.into();
        c.spec.connection_name = connection.into();
        let mut obj = dpc_operator::api::ConnectionOverride::new(name, c.spec);
        obj.metadata.namespace = Some(ns.into());
        obj
    };
    let team_b: Api<dpc_operator::api::ConnectionOverride> =
        Api::namespaced(h.client.clone(), team_b_ns);
    let team_c: Api<dpc_operator::api::ConnectionOverride> =
        Api::namespaced(h.client.clone(), team_c_ns);
    team_b
        .create(&PostParams::default(), &in_ns(team_b_ns, "b", "B"))
        .await
        .unwrap();
    team_c
        .create(&PostParams::default(), &in_ns(team_c_ns, "c", "C"))
        .await
        .unwrap();
    let wait = |api: Api<dpc_operator::api::ConnectionOverride>,
                name: &'static str,
                reason: &'static str| async move {
        let condition = move |o: Option<&dpc_operator::api::ConnectionOverride>| {
            o.and_then(ready_reason).as_deref() == Some(reason)
        };
        tokio::time::timeout(
            WAIT,
            kube::runtime::wait::await_condition(api, name, condition),
        )
        .await
        .unwrap()
        .unwrap()
        .unwrap()
    };
    let refused = wait(team_b.clone(), "b", "AccountNotAllowed").await;
    assert_eq!(
        ready_condition(&refused).message,
        format!(
            "ClusterDpcAccount {shared_name} does not allow namespace {team_b_ns} (see its spec.allowedNamespaces)"
        )
    );
    wait(team_c, "c", "Available").await;
    // Labelling team-b lets it in: the namespace watch re-checks its objects.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(h.client.clone());
    namespaces
        .patch(
            team_b_ns,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": {&label: "yes"}}})),
        )
        .await
        .unwrap();
    wait(team_b, "b", "Available").await;
    let client = h.client.clone();
    assert_eq!(h.sim.overrides().len(), 3);
    h.stop().await;
    Api::<ClusterDpcAccount>::all(client)
        .delete(&shared_name, &Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn references_to_other_namespaces_are_refused() {
    let h = Harness::start().await.run();
    let mut cov = Cov::new("x", "X").property_from_secret("secretKey", "refs", "key");
    cov.spec.connection_overrides.connection_properties_from[0]
        .secret_key_ref
        .as_mut()
        .unwrap()
        .namespace = Some("kube-system".into());
    h.apply(&cov).await;
    let obj = h.wait_reason("x", "InvalidSpec").await;
    assert!(
        ready_condition(&obj)
            .message
            .contains("references to other namespaces are refused")
    );
    assert!(
        h.sim.calls().iter().all(|c| c.op == SimOp::Token),
        "no override call: {:?}",
        h.sim.calls()
    );
    h.stop().await;
}

#[tokio::test]
async fn a_label_selector_shards_the_objects() {
    let config = OperatorConfig {
        label_selector: Some("shard=a".into()),
        ..test_config()
    };
    let h = Harness::start_with(config, SimConfig::default())
        .await
        .run();
    let covs = h.covs();
    for (name, shard) in [("mine", "a"), ("theirs", "b")] {
        let mut obj = dpc_operator::api::ConnectionOverride::new(name, Cov::new(name, name).spec);
        obj.metadata.labels = Some([("shard".to_string(), shard.to_string())].into());
        covs.create(&PostParams::default(), &obj).await.unwrap();
    }
    h.wait_ready("mine").await;
    // An object of the shard created after "theirs": once it is Ready, "theirs" would have
    // been reconciled too, had it been watched.
    let mut later =
        dpc_operator::api::ConnectionOverride::new("later", Cov::new("later", "later").spec);
    later.metadata.labels = Some([("shard".to_string(), "a".to_string())].into());
    covs.create(&PostParams::default(), &later).await.unwrap();
    h.wait_ready("later").await;
    let theirs = covs.get("theirs").await.unwrap();
    assert!(theirs.status.is_none(), "outside the selector: untouched");
    let names: Vec<String> = h
        .sim
        .overrides()
        .into_iter()
        .map(|o| o.connection_name)
        .collect();
    assert_eq!(names, ["later", "mine"]);
    h.stop().await;
}

#[tokio::test]
async fn a_malformed_object_is_reported_and_does_not_stop_the_others() {
    // The API server refuses such an object today; it stays stored from an older, looser CRD
    // after an upgrade. That takes a CRD change, so a control plane of this test's own.
    let plane = Box::leak(Box::new(
        dpc_testkit::control_plane::ControlPlane::start(None)
            .await
            .expect("a private control plane"),
    ));
    let admin = plane.endpoint.client().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(admin.clone());
    let mut loose = dpc_operator::api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "ConnectionOverride")
        .unwrap();
    let mut schema = serde_json::to_value(&loose.spec.versions[0].schema).unwrap();
    schema["openAPIV3Schema"]["properties"]["spec"] =
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    loose.spec.versions[0].schema = serde_json::from_value(schema).unwrap();
    let name = loose.metadata.name.clone().unwrap();
    crds.create(&PostParams::default(), &loose).await.unwrap();
    kube::runtime::wait::await_condition(
        crds.clone(),
        &name,
        kube::runtime::conditions::is_crd_established(),
    )
    .await
    .unwrap();
    create_namespace(&admin, "old", json!({})).await;
    let resource = kube::api::ApiResource::erase::<dpc_operator::api::ConnectionOverride>(&());
    let old: Api<DynamicObject> = Api::namespaced_with(admin, "old", &resource);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "dpc-operator.io/v1alpha1",
        "kind": "ConnectionOverride",
        "metadata": {"name": "bad"},
        "spec": {"accountRef": {"name": ACCOUNT}, "projectId": PROJECT, "environmentName": "PROD", "connectionName": "B",
                 "connectionOverrides": {"connectionProperties": "not-a-map"}}
    }))
    .unwrap();
    old.create(&PostParams::default(), &bad).await.unwrap();

    let logs = captured_logs();
    // The harness upgrades the CRDs to today's; the stored object stays as it was.
    let h = Harness::start_on(&plane.endpoint)
        .await
        .also_watch(&["old"])
        .run();
    let raw = old;
    h.apply(&Cov::new("good", "G")).await;
    h.wait_ready("good").await;

    // The API server refuses any status of such an object (it validates the whole object on
    // a status write too): a Warning Event is the report.
    let (kind, _, note) = h.wait_event_in("old", "bad", "InvalidSpec").await;
    assert_eq!(kind, "Warning");
    assert!(
        note.contains("does not match the ConnectionOverride schema"),
        "{note}"
    );
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("the API server refuses any status of this object"),
        "the refusal is logged"
    );
    assert!(raw.get("bad").await.unwrap().data.get("status").is_none());
    assert!(
        h.sim
            .calls()
            .iter()
            .all(|c| c.body.as_ref().is_none_or(|b| b["connectionName"] != "B"))
    );
    h.stop().await;
}

#[tokio::test]
async fn a_replica_that_loses_its_lease_makes_no_dpc_call_from_that_moment() {
    use dpc_operator::leader::{LeaseConfig, run_with_leadership};
    use k8s_openapi::api::coordination::v1::Lease;
    let h = Harness::start().await;
    let config = LeaseConfig {
        namespace: h.ns.clone(),
        name: "fence-test".into(),
        identity: "replica-a".into(),
        lease_duration: Duration::from_secs(10),
        renew_period: Duration::from_millis(200),
        retry_period: Duration::from_millis(100),
    };
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &h.ns);
    let dpc = h.ctx.dpc.clone();
    let (leading_tx, leading_rx) = tokio::sync::oneshot::channel();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let account = h.account_handle();
    // The work stands for a reconcile in flight: once told to stop it still tries a call.
    let work = move |stop: tokio_util::sync::CancellationToken| async move {
        let _ = leading_tx.send(());
        stop.cancelled().await;
        let _ = seen_tx.send(account.list(PROJECT, "PROD").await);
    };
    let fence_dpc = dpc.clone();
    let election = tokio::spawn(run_with_leadership(
        h.client.clone(),
        config,
        tokio_util::sync::CancellationToken::new(),
        work,
        move || fence_dpc.fence(),
    ));
    tokio::time::timeout(WAIT, leading_rx)
        .await
        .unwrap()
        .unwrap();
    // Another replica takes the lease over.
    let patch = json!({"spec": {"holderIdentity": "replica-b"}});
    leases
        .patch("fence-test", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let after_loss = tokio::time::timeout(WAIT, seen_rx).await.unwrap().unwrap();
    let err = after_loss.unwrap_err();
    assert!(err.to_string().contains("lost the leader lease"), "{err}");
    assert!(election.await.unwrap().is_err(), "the loss is reported");
    assert!(h.sim.calls().is_empty(), "{:?}", h.sim.calls());
    h.stop().await;
}

#[tokio::test]
async fn tenant_accounts_cannot_send_secrets_to_other_hosts_or_read_other_namespaces() {
    let h = Harness::start().await;
    // A host of the tenant's: it must never hear from the operator.
    let collector = dpc_testkit::dpc::DpcSim::start(SimConfig::default())
        .await
        .unwrap();
    let accounts: Api<dpc_operator::api::DpcAccount> = Api::namespaced(h.client.clone(), &h.ns);
    let mut evil = dpc_operator::api::DpcAccount::new("evil", h.account_spec(CREDS, None));
    evil.spec.token_url = Some(collector.token_url().replace("127.0.0.1", "localhost"));
    accounts
        .create(&PostParams::default(), &evil)
        .await
        .unwrap();

    // A ClusterDpcAccount naming credentials outside the operator's namespace.
    let elsewhere = unique_name("creds-");
    create_namespace(&h.client, &elsewhere, json!({})).await;
    let shared: Api<ClusterDpcAccount> = Api::all(h.client.clone());
    let outside = unique_name("outside-");
    let mut account = h.cluster_account(&outside, json!({"names": [&h.ns]}));
    account.spec.account.credentials_secret_ref.namespace = Some(elsewhere.clone());
    shared
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    // And one limited to another project.
    let limited = unique_name("limited-");
    let mut account = h.cluster_account(&limited, json!({"names": [&h.ns]}));
    account.spec.allowed_projects = vec!["11111111-2222-3333-4444-555555555555".into()];
    shared
        .create(&PostParams::default(), &account)
        .await
        .unwrap();

    let h = h.run();
    h.put_secret("refs", &[("key", "tenant-secret-value")])
        .await;
    h.apply(
        &Cov::new("leak", "Salesforce")
            .account("evil")
            .property_from_secret("secretKey", "refs", "key"),
    )
    .await;
    let refused = h.wait_reason("leak", "AccountNotReady").await;
    let message = ready_condition(&refused).message;
    assert!(
        message.contains("tokenUrl names host \"localhost\"")
            && message.contains("--dpc-allowed-hosts"),
        "{message}"
    );

    let by_cluster = |name: &str, account: &str| Cov::new(name, name).cluster_account(account);
    h.apply(&by_cluster("outside", &outside)).await;
    let refused = h.wait_reason("outside", "AccountNotReady").await;
    let message = ready_condition(&refused).message;
    assert!(
        message.contains(&format!("names namespace {elsewhere}"))
            && message.contains(&format!("read only from {}", h.ns)),
        "{message}"
    );
    h.apply(&by_cluster("limited", &limited)).await;
    let refused = h.wait_reason("limited", "AccountNotAllowed").await;
    let message = ready_condition(&refused).message;
    assert!(message.contains("does not allow project"), "{message}");

    assert!(collector.calls().is_empty(), "{:?}", collector.calls());
    // Only the accounts' token checks reached DPC: no override call.
    let calls = h.sim.calls();
    assert!(calls.iter().all(|c| c.op == SimOp::Token), "{calls:?}");
    for name in [&outside, &limited] {
        shared.delete(name, &DeleteParams::default()).await.unwrap();
    }
    h.stop().await;
}

#[tokio::test]
async fn a_huge_error_answer_leaves_a_short_condition_message() {
    let h = Harness::start().await;
    let detail = format!("field rejected: {}", "é".repeat(1_000_000));
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 400,
            retry_after: None,
            body: Some(json!({"title": "Bad Request", "detail": detail})),
        },
    ));
    let h = h.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let rejected = h.wait_reason("sf", "ApiRejected").await;
    let message = ready_condition(&rejected).message;
    let status = rejected.status.unwrap();
    for condition in &status.conditions {
        assert!(
            condition.message.len() <= dpc_operator::api::conditions::MAX_MESSAGE,
            "{} is {} bytes",
            condition.type_,
            condition.message.len()
        );
    }
    assert!(
        message.starts_with("DPC answered 400 to create"),
        "{message}"
    );
    assert!(message.ends_with('…'));
    let (_, _, note) = h.wait_event("sf", "ApiRejected").await;
    assert!(note.len() <= 1024, "{}", note.len());
    h.stop().await;
}

#[tokio::test]
async fn cluster_account_credentials_live_in_the_operators_namespace_and_events_in_default() {
    // The operator's own namespace is not one it watches for ConnectionOverrides.
    let home = unique_name("operator-");
    let config = OperatorConfig {
        operator_namespace: Some(home.clone()),
        ..test_config()
    };
    let h = Harness::start_with(config, SimConfig::default()).await;
    create_namespace(&h.client, &home, json!({})).await;
    put_secret_in(
        &h.client,
        &home,
        "shared-creds",
        &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
    )
    .await;
    let shared: Api<ClusterDpcAccount> = Api::all(h.client.clone());
    let name = unique_name("home-");
    let mut account = h.cluster_account(&name, json!({"names": [&h.ns]}));
    account.spec.account.credentials_secret_ref.name = "shared-creds".into();
    account.spec.account.credentials_secret_ref.namespace = Some(home.clone());
    shared
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let h = h.run();
    // kube-apiserver takes an Event about a cluster-scoped object only in `default` (or
    // `kube-system`): not in the operator's namespace.
    let (kind, _, note) = h.wait_event_in("default", &name, "TokenObtained").await;
    assert_eq!(kind, "Normal", "{note}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(h.client.clone(), &home);
    let elsewhere: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "probe", "namespace": &home},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "dpc-operator",
        "reportingInstance": "test",
        "action": "Probe",
        "reason": "Probe",
        "type": "Normal",
        "regarding": {"apiVersion": "dpc-operator.io/v1alpha1", "kind": "ClusterDpcAccount", "name": &name}
    }))
    .unwrap();
    let refused = events
        .create(&PostParams::default(), &elsewhere)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("does not match event.namespace"),
        "{refused}"
    );
    h.apply(&Cov::new("via-home", "Salesforce").cluster_account(&name))
        .await;
    h.wait_ready("via-home").await;
    shared
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    h.stop().await;
}

#[tokio::test]
async fn objects_created_at_once_for_one_override_make_exactly_one_write() {
    let h = Harness::start().await.run();
    let names: Vec<String> = (0..6).map(|i| format!("racer-{i}")).collect();
    let applies = names.iter().map(|name| {
        let cov = Cov::new(name, "Salesforce").property("secretKey", name);
        let h = &h;
        async move { h.apply(&cov).await }
    });
    futures::future::join_all(applies).await;
    let mut ready = Vec::new();
    for name in &names {
        let obj = h
            .wait_for(name, "Ready or Conflict", |o| {
                is_ready(o)
                    || o.status.as_ref().is_some_and(|s| {
                        conditions::find(&s.conditions, conditions::READY)
                            .is_some_and(|c| c.reason == "Conflict")
                    })
            })
            .await;
        if is_ready(&obj) {
            ready.push(name.clone());
        }
    }
    assert_eq!(ready.len(), 1, "exactly one manages: {ready:?}");
    assert_eq!(written_values(&h.sim.calls()), ready, "and only it writes");
    h.stop().await;
}
