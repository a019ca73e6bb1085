//! Deletion: the override is deleted in DPC (or deliberately left), and a deletion that
//! cannot go ahead waits, says why, and can always be released.

use std::time::Duration;

use dpc_operator::api::FORCE_ORPHAN_ANNOTATION;
use dpc_testkit::dpc::{Fault, SimOp};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn delete_sends_one_url_encoded_delete_then_releases_the_object() {
    let h = Harness::start().await.run();
    h.apply(&Cov::new("plain", "Sales EU")).await;
    h.apply(&Cov::new("odd", "Sales & EU (100%)")).await;
    h.wait_ready("plain").await;
    h.wait_ready("odd").await;
    h.sim.clear_calls();

    h.covs()
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("plain").await;
    let calls = h.sim.calls();
    assert_eq!(summary(&calls), [(SimOp::Delete, Some(204))]);
    assert_eq!(
        calls[0].query.as_deref(),
        Some("environmentName=PROD&connectionNames=Sales%20EU")
    );
    h.sim.clear_calls();

    // A name beyond letters, digits, spaces and -_.~ is confirmed gone by a list before the
    // object is released.
    h.covs()
        .delete("odd", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("odd").await;
    let calls = h.sim.calls();
    assert_eq!(
        summary(&calls),
        [(SimOp::Delete, Some(204)), (SimOp::List, Some(200))]
    );
    assert_eq!(
        calls[0].query.as_deref(),
        Some("environmentName=PROD&connectionNames=Sales%20%26%20EU%20%28100%25%29")
    );
    assert!(h.sim.overrides().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_connection_name_with_a_comma_is_refused_by_the_api_server() {
    let h = Harness::start().await.run();
    let err = h
        .try_apply(&Cov::new("comma", "Sales, EU"))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("connectionName may not contain a comma"),
        "{message}"
    );
    assert!(h.sim.calls().is_empty());
    h.stop().await;
}

#[tokio::test]
async fn delete_of_an_override_already_gone_counts_as_done() {
    let h = Harness::start().await.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;
    h.sim.remove_override(PROJECT, "PROD", "Salesforce");
    h.sim.clear_calls();
    h.covs()
        .delete("sf", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("sf").await;
    assert_eq!(summary(&h.sim.calls()), [(SimOp::Delete, Some(404))]);
    h.stop().await;
}

#[tokio::test]
async fn orphan_policy_deletes_nothing_in_dpc() {
    let h = Harness::start().await.run();
    h.apply(&Cov::new("keep", "Warehouse").orphan()).await;
    h.wait_ready("keep").await;
    h.sim.clear_calls();
    h.covs()
        .delete("keep", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("keep").await;
    assert!(h.sim.calls().is_empty(), "{:?}", h.sim.calls());
    assert!(h.sim.get_override(PROJECT, "PROD", "Warehouse").is_some());
    h.stop().await;
}

#[tokio::test]
async fn a_deletion_dpc_refuses_waits_and_force_orphan_releases_it() {
    let h = Harness::start().await.run();
    h.apply(&Cov::new("stuck", "Salesforce")).await;
    h.wait_ready("stuck").await;
    h.sim
        .push_fault(Fault::status(SimOp::Delete, 403).times(1000));
    h.covs()
        .delete("stuck", &DeleteParams::default())
        .await
        .unwrap();
    let obj = h.wait_reason("stuck", "Deleting").await;
    let message = ready_condition(&obj).message;
    assert!(message.contains("DPC answered 403 to delete"), "{message}");
    assert!(message.contains(FORCE_ORPHAN_ANNOTATION), "{message}");

    let patch = json!({"metadata": {"annotations": {FORCE_ORPHAN_ANNOTATION: "true"}}});
    h.covs()
        .patch("stuck", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    h.wait_gone("stuck").await;
    assert!(
        h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some(),
        "force-orphan keeps the remote"
    );
    h.sim.clear_faults();
    // Events are published off the reconcile path: the object may be gone before its Event.
    let (kind, _, _) = h.wait_event("stuck", "ForceOrphaned").await;
    assert_eq!(kind, "Warning");
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
    assert!(write_calls(&h.sim.calls()).is_empty());
    h.stop().await;
}
