//! The first write of an object: DPC is read first, so an override that already holds the
//! spec is adopted with no write, one that differs gets one PUT, and a failed read changes
//! nothing but the number of calls.

use std::time::Duration;

use dpc_operator::config::OperatorConfig;
use dpc_testkit::dpc::{Fault, SimConfig, SimOp};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn an_existing_override_that_differs_is_adopted_with_one_put() {
    let h = Harness::start().await;
    h.edit_in_dpc("Salesforce", "old");
    let h = h.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;

    let ops: Vec<SimOp> = h.sim.calls().iter().map(|c| c.op).collect();
    assert_eq!(ops, [SimOp::Token, SimOp::List, SimOp::Update]);
    let stored = h.sim.get_override(PROJECT, "PROD", "Salesforce").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        "prod/Salesforce"
    );
    let (_, _, note) = h.wait_event("sf", "Adopted").await;
    assert!(note.contains("and updated it"), "{note}");
    h.stop().await;
}

#[tokio::test]
async fn an_existing_override_equal_to_the_spec_is_adopted_without_a_write() {
    let h = Harness::start().await;
    h.sim.put_override(
        PROJECT,
        "PROD",
        "Salesforce",
        None,
        json!({"connectionProperties": {"secretName": "prod/Salesforce"},
               "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}),
    );
    let h = h.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let obj = h.wait_ready("sf").await;

    assert_eq!(write_summary(&h.sim.calls()), []);
    let status = obj.status.unwrap();
    assert!(
        status.applied_hash.is_some(),
        "the hash DPC holds is recorded"
    );
    assert_eq!(
        status.remote.unwrap().created_by.as_deref(),
        Some("ui-user")
    );
    assert_eq!(
        status
            .managed_override
            .map(|m| m.connection_name)
            .as_deref(),
        Some("Salesforce")
    );
    let (kind, _, note) = h.wait_event("sf", "Adopted").await;
    assert_eq!(kind, "Normal");
    assert!(note.contains("nothing written"), "{note}");

    // From then on it is managed: a change of the spec is one PUT.
    h.apply(&Cov::new("sf", "Salesforce").property("secretKey", "k"))
        .await;
    h.wait_for("sf", "Ready at generation 2", |o| {
        is_ready(o) && o.metadata.generation == Some(2)
    })
    .await;
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Update, Some(200))]);
    h.stop().await;
}

#[tokio::test]
async fn when_the_first_read_fails_post_409_still_adopts_with_one_put() {
    let h = Harness::start().await;
    h.edit_in_dpc("Salesforce", "old");
    h.sim.push_fault(Fault::status(SimOp::List, 503));
    let h = h.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;

    assert_eq!(
        summary(&h.sim.calls())[1..],
        [
            (SimOp::List, Some(503)),
            (SimOp::Create, Some(409)),
            (SimOp::Update, Some(200))
        ]
    );
    h.wait_event("sf", "Adopted").await;
    h.stop().await;
}

/// A configuration in which list answers are shared only by first writes.
fn unshared() -> OperatorConfig {
    OperatorConfig {
        drift_share_window: Duration::ZERO,
        ..test_config()
    }
}

#[tokio::test]
async fn adopting_without_a_write_trusts_only_a_recent_answer() {
    // Every answer is older than the share window at once: the read before a first write may
    // still use an older one, but not to conclude that nothing needs writing.
    let h = Harness::start_with(unshared(), SimConfig::default()).await;
    let held = json!({"connectionProperties": {"secretName": "prod/Salesforce"},
                      "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}});
    h.sim
        .put_override(PROJECT, "PROD", "Salesforce", None, held);
    let h = h.run();
    // Another object's first write lists PROD, while DPC still holds what "sf" will ask for.
    h.apply(&Cov::new("other", "Snowflake")).await;
    h.wait_ready("other").await;
    assert_eq!(h.sim.calls_of(SimOp::List).len(), 1);

    // Edited in the UI; then "sf" is applied.
    h.edit_in_dpc("Salesforce", "edited");
    h.sim.clear_calls();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;
    let ops: Vec<SimOp> = h.sim.calls().iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [SimOp::List, SimOp::Update],
        "the older list said 'already held'; a fresh one said otherwise, and it was written"
    );
    let stored = h.sim.get_override(PROJECT, "PROD", "Salesforce").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        "prod/Salesforce"
    );
    h.stop().await;
}

#[tokio::test]
async fn first_writes_in_one_environment_share_one_read() {
    // No sharing at all for other reads: only the window of a first write's read is left.
    let config = OperatorConfig {
        drift_share_window: Duration::ZERO,
        ..test_config()
    };
    let h = Harness::start_with(config, SimConfig::default())
        .await
        .run();
    for (name, connection) in [("a", "A"), ("b", "B"), ("c", "C")] {
        h.apply(&Cov::new(name, connection)).await;
        h.wait_ready(name).await;
    }
    let ops: Vec<SimOp> = h
        .sim
        .calls()
        .iter()
        .map(|c| c.op)
        .filter(|op| *op != SimOp::Token)
        .collect();
    assert_eq!(
        ops,
        [SimOp::List, SimOp::Create, SimOp::Create, SimOp::Create]
    );
    h.stop().await;
}

#[tokio::test]
async fn an_override_holding_a_field_no_spec_describes_is_never_taken_as_it_is() {
    let h = Harness::start().await;
    // Everything the spec says, and one more field a ConnectionOverride cannot hold.
    let held = json!({"connectionProperties": {"secretName": "prod/Salesforce"},
                      "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
                      "rotationPolicy": {"days": 30}});
    for connection in ["Salesforce", "Snowflake"] {
        let mut held = held.clone();
        held["connectionProperties"]["secretName"] = json!(format!("prod/{connection}"));
        h.sim.put_override(PROJECT, "PROD", connection, None, held);
    }
    let h = h.run();
    // Observed: not Ready, and the condition names the field.
    h.apply(&Cov::new("watching", "Snowflake").observe_only())
        .await;
    let observed = h.wait_reason("watching", "Drifted").await;
    let message = ready_condition(&observed).message;
    assert!(
        message.contains("connectionOverrides.rotationPolicy"),
        "{message}"
    );
    // Managed: not adopted with no write; DPC is made to hold what the spec says.
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Update, Some(200))]);
    let (_, _, note) = h.wait_event("sf", "Adopted").await;
    assert!(note.contains("and updated it"), "{note}");
    h.stop().await;
}
