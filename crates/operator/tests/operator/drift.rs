//! Drift: shared reads of DPC per environment on each sync interval, and what each drift
//! policy and ObserveOnly do with a difference.

use std::time::Duration;

use dpc_operator::api::{DriftPolicy, ManagementPolicy};
use dpc_testkit::dpc::{Call, SimConfig, SimOp};
use kube::api::DeleteParams;
use serde_json::json;

use crate::common::*;

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
    assert!(
        write_calls(&calls).is_empty(),
        "no write when nothing changed"
    );
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
    let puts: Vec<&Call> = write_calls(&calls);
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
    assert!(
        write_calls(&h.sim.calls()).is_empty(),
        "Report never writes"
    );

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
        write_calls(&h.sim.calls()).is_empty(),
        "ObserveOnly never writes"
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    h.stop().await;
}
