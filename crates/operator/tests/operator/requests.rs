//! What the operator asks of the Kubernetes API: a pass over an unchanged object asks
//! nothing, a rotation costs only the status write and the Event it causes, a new object
//! the finalizer patch, the status patch and the Event, and concurrent first passes of one
//! account share one read of it. The counts are of the operator's own requests (the
//! harness's client is not counted), on the real kube-apiserver.

use std::collections::BTreeMap;

use dpc_testkit::dpc::SimOp;

use crate::common::*;

/// The requests counted since `before`, without watches (the controller's watches are
/// started again now and then; a pass never starts one).
fn since(h: &Harness, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    h.counter
        .counts()
        .into_iter()
        .filter(|(key, _)| !key.starts_with("watch "))
        .filter_map(|(key, n)| {
            let new = n - before.get(&key).copied().unwrap_or(0);
            (new > 0).then_some((key, new))
        })
        .collect()
}

/// Creates the Secrets `refs-{i}` the objects of [`apply_ready`] read.
async fn put_refs(h: &Harness, n: usize) {
    for i in 0..n {
        h.put_secret(&format!("refs-{i}"), &[("key", "v1")]).await;
    }
}

/// Applies `n` objects, `sf-{i}` reading Secret `refs-{i}`, and waits until each is Ready
/// and its Event is published.
async fn apply_ready(h: &Harness, n: usize) {
    for i in 0..n {
        let cov = Cov::new(&format!("sf-{i}"), &format!("Salesforce {i}")).property_from_secret(
            "secretKey",
            &format!("refs-{i}"),
            "key",
        );
        h.apply(&cov).await;
    }
    for i in 0..n {
        h.wait_ready(&format!("sf-{i}")).await;
        h.wait_event(&format!("sf-{i}"), "Created").await;
    }
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

#[tokio::test]
async fn a_pass_over_an_unchanged_object_asks_the_api_server_nothing() {
    let h = Harness::start().await;
    h.put_secret("refs", &[("key", "v1")]).await;
    h.put_config_map("settings", &[("region", "eu")]).await;
    let h = h.run();
    let cov = Cov::new("sf", "Salesforce")
        .property_from_secret("secretKey", "refs", "key")
        .property_from_config_map("region", "settings", "region");
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    h.wait_event("sf", "Created").await;

    let before = h.counter.counts();
    // Passes as the resync sweep, a drift check or a restart of the queue ask for them.
    for _ in 0..3 {
        h.pass("sf").await;
    }
    assert_eq!(since(&h, &before), BTreeMap::new());
    h.stop().await;
}

#[tokio::test]
async fn a_rotation_costs_the_status_write_and_the_event_only() {
    let h = Harness::start().await;
    h.put_secret("refs", &[("key", "v1")]).await;
    let h = h.run();
    let cov = Cov::new("sf", "Salesforce").property_from_secret("secretKey", "refs", "key");
    h.apply(&cov).await;
    let first = h.wait_ready("sf").await;
    h.wait_event("sf", "Created").await;

    let before = h.counter.counts();
    h.sim.clear_calls();
    h.rotate_secret("refs", "key", "v2").await;
    let rotated = h
        .wait_for("sf", "Ready with the rotated value", |o| {
            is_ready(o)
                && o.status.as_ref().map(|s| &s.applied_hash)
                    != Some(&first.status.clone().unwrap().applied_hash)
        })
        .await;
    h.wait_event("sf", "Updated").await;
    let updates = h.sim.calls_of(SimOp::Update);
    assert_eq!(updates.len(), 1, "{updates:?}");
    let body = updates[0].body.as_ref().unwrap();
    assert_eq!(
        body["connectionOverrides"]["connectionProperties"]["secretKey"],
        "v2"
    );
    assert!(is_ready(&rotated));
    assert_eq!(
        since(&h, &before),
        counts(&[
            ("create events", 1),
            ("patch connectionoverrides/status", 1)
        ])
    );
    h.stop().await;
}

#[tokio::test]
async fn new_objects_of_one_account_cost_three_requests_each_and_one_read_of_the_account() {
    const OBJECTS: usize = 12;
    let h = Harness::start().await;
    put_refs(&h, OBJECTS).await;
    let before = h.counter.counts();
    let h = h.run();
    apply_ready(&h, OBJECTS).await;
    let asked = since(&h, &before);
    let n = OBJECTS as u64;
    // Each object: the finalizer patch (with the create-pending mark), the status patch
    // and the Event. No Secret of theirs is read: the watch brought the values.
    for (key, expected) in [
        ("patch connectionoverrides", n),
        ("patch connectionoverrides/status", n),
    ] {
        assert_eq!(asked.get(key), Some(&expected), "{key}: {asked:?}");
    }
    let events = asked.get("create events").copied().unwrap_or(0);
    // The account's own Event (its token) comes on top.
    assert!((n..=n + 1).contains(&events), "{asked:?}");
    // One read of the account and one of its credentials, however many passes needed them.
    assert_eq!(asked.get("get dpcaccounts"), Some(&1), "{asked:?}");
    assert!(
        asked.get("get secrets").copied().unwrap_or(0) <= 1,
        "{asked:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_restart_asks_nothing_per_object() {
    const OBJECTS: usize = 4;
    let h = Harness::start().await;
    put_refs(&h, OBJECTS).await;
    let h = h.run();
    apply_ready(&h, OBJECTS).await;

    let before = h.counter.counts();
    // A new process: nothing in memory; its first pass over each object finds it done.
    let h = h.restart().await;
    h.wait_passes(OBJECTS as u64).await;
    let asked = since(&h, &before);
    for per_object in [
        "patch connectionoverrides",
        "patch connectionoverrides/status",
        "create events",
        "get secrets",
        "get connectionoverrides",
    ] {
        assert!(!asked.contains_key(per_object), "{per_object}: {asked:?}");
    }
    // The account is read once for all of them.
    assert!(
        asked.get("get dpcaccounts").copied().unwrap_or(0) <= 1,
        "{asked:?}"
    );
    assert!(
        h.sim.calls_of(SimOp::Create).len() == OBJECTS,
        "no write after the restart"
    );
    h.stop().await;
}
