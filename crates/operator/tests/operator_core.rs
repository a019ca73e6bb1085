//! The reconcile behaviour of the operator core, end to end over HTTP: the real controller
//! against the Kubernetes API emulator and the DPC simulator. Assertions are on the exact
//! DPC requests (the simulator's call log) and on status.

mod common;

use std::time::Duration;

use common::*;
use dpc_operator::api::FORCE_ORPHAN_ANNOTATION;
use dpc_testkit::dpc::{AuthSeen, Call, Fault, FaultKind, SimOp};
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;

fn summary(calls: &[Call]) -> Vec<(SimOp, Option<u16>)> {
    calls.iter().map(|c| (c.op, c.status)).collect()
}

fn writes(calls: &[Call]) -> Vec<(SimOp, Option<u16>)> {
    summary(
        &calls
            .iter()
            .filter(|c| c.is_write())
            .cloned()
            .collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn new_object_gets_one_token_and_one_post_then_ready() {
    let h = Harness::start().await.run();
    let created = h
        .apply(&Cov::new("sf", "Salesforce").property("secretKey", "key"))
        .await;
    let obj = h.wait_ready("sf").await;

    let calls = h.sim.calls();
    assert_eq!(
        summary(&calls),
        [(SimOp::Token, Some(200)), (SimOp::Create, Some(201))]
    );
    let token = &calls[0];
    assert_eq!(
        token.body.as_ref().unwrap(),
        &json!({"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": "<matches>", "audience": "https://api.matillion.com"})
    );
    let post = &calls[1];
    assert_eq!(
        post.path,
        format!("/dpc/v1/projects/{PROJECT}/connections/environment-overrides")
    );
    assert_eq!(
        post.auth,
        AuthSeen::Valid {
            client_id: CLIENT_ID.into()
        }
    );
    assert_eq!(
        post.body.as_ref().unwrap(),
        &json!({
            "environmentName": "PROD",
            "connectionName": "Salesforce",
            "connectionOverrides": {
                "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
                "connectionProperties": {"secretName": "prod/Salesforce", "secretKey": "key"}
            }
        })
    );

    let status = obj.status.clone().unwrap();
    assert_eq!(status.observed_generation, created.metadata.generation);
    assert!(
        status
            .applied_hash
            .as_deref()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(status.last_sync_time.is_some());
    let remote = status.remote.unwrap();
    assert_eq!(remote.created_by.as_deref(), Some(CLIENT_ID));
    assert_eq!(
        remote.platform_connection_type.as_deref(),
        Some("COMPONENT_BASIC")
    );
    let ready = ready_condition(&obj);
    assert_eq!(
        (ready.reason.as_str(), ready.observed_generation),
        ("Available", created.metadata.generation)
    );
    assert!(
        obj.metadata
            .finalizers
            .unwrap()
            .contains(&"dpc-operator.io/cleanup".to_string())
    );
    let (kind, _, note) = h.wait_event("sf", "Created").await;
    assert_eq!(kind, "Normal");
    assert!(
        note.contains("Salesforce") && note.contains("PROD"),
        "{note}"
    );
    h.stop().await;
}

#[tokio::test]
async fn post_409_adopts_the_existing_override_with_one_put() {
    let h = Harness::start().await;
    h.sim.put_override(
        PROJECT,
        "PROD",
        "Salesforce",
        None,
        json!({"connectionProperties": {"secretName": "old"}}),
    );
    let h = h.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;

    assert_eq!(
        writes(&h.sim.calls()),
        [(SimOp::Create, Some(409)), (SimOp::Update, Some(200))]
    );
    let stored = h.sim.get_override(PROJECT, "PROD", "Salesforce").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        "prod/Salesforce"
    );
    h.wait_event("sf", "Adopted").await;
    h.stop().await;
}

#[tokio::test]
async fn spec_change_sends_exactly_one_put_and_an_unchanged_object_sends_nothing() {
    let h = Harness::start().await;
    h.put_secret("refs", &[("key", "k1")]).await;
    let h = h.run();
    let cov = Cov::new("sf", "Salesforce").property_from_secret("secretKey", "refs", "key");
    h.apply(&cov).await;
    let first = h.wait_ready("sf").await;
    h.sim.clear_calls();

    // A change of the spec: exactly one PUT, with the new body.
    h.apply(&cov.clone().property("region", "eu")).await;
    let second = h
        .wait_for("sf", "Ready at generation 2", |o| {
            is_ready(o) && o.metadata.generation == Some(2)
        })
        .await;
    let calls = h.sim.calls();
    assert_eq!(writes(&calls), [(SimOp::Update, Some(200))]);
    assert_eq!(
        calls.iter().filter(|c| c.op == SimOp::Token).count(),
        0,
        "the token is cached"
    );
    assert_eq!(
        calls[0].body.as_ref().unwrap()["connectionOverrides"]["connectionProperties"]["region"],
        "eu"
    );
    assert_ne!(
        first.status.unwrap().applied_hash,
        second.status.as_ref().unwrap().applied_hash
    );

    // Reconciled again with nothing changed (a label on the referenced Secret): no DPC call
    // and no status patch. Two touches: the second pass's read proves the first finished.
    h.sim.clear_calls();
    let status_patches = h.requests("patch connectionoverrides/status");
    let secret_reads = h.requests("get secrets");
    h.touch_secret("refs", "one").await;
    h.wait_requests("get secrets", secret_reads + 1).await;
    h.touch_secret("refs", "two").await;
    h.wait_requests("get secrets", secret_reads + 2).await;
    assert!(h.sim.calls().is_empty(), "{:?}", h.sim.calls());
    assert_eq!(
        h.requests("patch connectionoverrides/status"),
        status_patches
    );
    let after = h.covs().get("sf").await.unwrap();
    assert_eq!(after.status, second.status);
    h.stop().await;
}

#[tokio::test]
async fn put_404_recreates_with_post() {
    let h = Harness::start().await.run();
    let cov = Cov::new("sf", "Salesforce");
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    assert!(h.sim.remove_override(PROJECT, "PROD", "Salesforce"));
    h.sim.clear_calls();

    h.apply(&cov.property("secretKey", "new")).await;
    h.wait_for("sf", "Ready at generation 2", |o| {
        is_ready(o) && o.metadata.generation == Some(2)
    })
    .await;
    assert_eq!(
        writes(&h.sim.calls()),
        [(SimOp::Update, Some(404)), (SimOp::Create, Some(201))]
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    h.wait_event("sf", "Recreated").await;
    h.stop().await;
}

#[tokio::test]
async fn a_400_reports_the_problem_details_and_waits_for_a_spec_change() {
    let h = Harness::start().await;
    h.put_secret("refs", &[("key", "k1")]).await;
    let h = h.run();
    // No secretName: the simulator answers 400 with violations, as DPC documents.
    let bad = Cov::new("sf", "Salesforce")
        .without_property("secretName")
        .property("secretKey", "k")
        .property_from_secret("other", "refs", "key");
    h.apply(&bad).await;
    let obj = h.wait_reason("sf", "ApiRejected").await;
    let ready = ready_condition(&obj);
    assert_eq!(ready.status, "False");
    assert_eq!(
        ready.message,
        "DPC answered 400 to create: Bad Request: Invalid environment connection override \
         (violations: connectionOverrides.connectionProperties.secretName is required)"
    );
    assert_eq!(ready.observed_generation, obj.metadata.generation);
    let (kind, _, _) = h.wait_event("sf", "ApiRejected").await;
    assert_eq!(kind, "Warning");
    let posts = h.sim.calls_of(SimOp::Create).len();
    assert_eq!(posts, 1);

    // Nothing changed: reconciled again, but no call.
    let reads = h.requests("get secrets");
    h.touch_secret("refs", "one").await;
    h.wait_requests("get secrets", reads + 1).await;
    h.touch_secret("refs", "two").await;
    h.wait_requests("get secrets", reads + 2).await;
    assert_eq!(
        h.sim.calls_of(SimOp::Create).len(),
        posts,
        "no call until the spec changes"
    );

    // The spec changes: a new attempt, which succeeds.
    h.apply(&bad.property("secretName", "prod/sf")).await;
    h.wait_for("sf", "Ready at generation 2", |o| {
        is_ready(o) && o.metadata.generation == Some(2)
    })
    .await;
    assert_eq!(h.sim.calls_of(SimOp::Create).len(), posts + 1);
    h.stop().await;
}

#[tokio::test]
async fn a_401_gets_one_new_token_and_the_call_is_repeated_once() {
    let h = Harness::start().await.run();
    let cov = Cov::new("sf", "Salesforce");
    h.apply(&cov).await;
    h.wait_ready("sf").await;
    h.sim.revoke_tokens();
    h.sim.clear_calls();

    h.apply(&cov.property("secretKey", "rotated")).await;
    h.wait_for("sf", "Ready at generation 2", |o| {
        is_ready(o) && o.metadata.generation == Some(2)
    })
    .await;
    assert_eq!(
        summary(&h.sim.calls()),
        [
            (SimOp::Update, Some(401)),
            (SimOp::Token, Some(200)),
            (SimOp::Update, Some(200))
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn a_429_holds_every_call_of_the_account_until_retry_after() {
    let h = Harness::start().await;
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 429,
            retry_after: Some("2".into()),
            body: None,
        },
    ));
    let h = h.run();
    h.apply(&Cov::new("one", "First")).await;
    h.wait_reason("one", "RateLimited").await;
    h.apply(&Cov::new("two", "Second")).await;
    h.wait_ready("one").await;
    h.wait_ready("two").await;

    let calls = h.sim.calls();
    let limited = calls
        .iter()
        .find(|c| c.status == Some(429))
        .expect("the 429");
    let after: Vec<&Call> = calls.iter().filter(|c| c.seq > limited.seq).collect();
    assert!(!after.is_empty());
    for call in after {
        assert!(
            call.at() >= limited.at() + Duration::from_secs(2),
            "{:?} {} came {:?} after the 429",
            call.op,
            call.path,
            call.at() - limited.at()
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn transient_failures_back_off_with_growing_delays_and_success_resets_them() {
    let h = Harness::start().await;
    h.sim.push_fault(Fault::status(SimOp::Create, 503));
    h.sim.push_fault(Fault::on(SimOp::Create, FaultKind::Reset));
    h.sim.push_fault(Fault::status(SimOp::Create, 502));
    let h = h.run();
    let cov = Cov::new("sf", "Salesforce");
    h.apply(&cov).await;
    let obj = h.wait_ready("sf").await;

    let posts = h.sim.calls_of(SimOp::Create);
    assert_eq!(
        posts.iter().map(|c| c.status).collect::<Vec<_>>(),
        [Some(503), None, Some(502), Some(201)]
    );
    let gaps: Vec<Duration> = posts.windows(2).map(|w| w[1].at() - w[0].at()).collect();
    assert!(
        gaps[0] < gaps[1] && gaps[1] < gaps[2],
        "delays must grow: {gaps:?}"
    );
    assert!(obj.status.unwrap().applied_hash.is_some());

    // After a success the next failure starts again from the first delay.
    h.sim.push_fault(Fault::status(SimOp::Update, 503));
    h.apply(&cov.property("secretKey", "k")).await;
    h.wait_for("sf", "Ready at generation 2", |o| {
        is_ready(o) && o.metadata.generation == Some(2)
    })
    .await;
    let puts = h.sim.calls_of(SimOp::Update);
    assert_eq!(
        puts.iter().map(|c| c.status).collect::<Vec<_>>(),
        [Some(503), Some(200)]
    );
    let gap = puts[1].at() - puts[0].at();
    assert!(gap < gaps[2], "the delay was reset: {gap:?} vs {gaps:?}");
    h.stop().await;
}

#[tokio::test]
async fn a_transient_failure_is_reported_then_cleared() {
    let h = Harness::start().await;
    h.sim.push_fault(Fault::status(SimOp::Create, 503).times(3));
    let h = h.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let failing = h.wait_reason("sf", "ApiUnavailable").await;
    assert!(
        ready_condition(&failing)
            .message
            .contains("DPC answered 503 to create")
    );
    h.wait_ready("sf").await;
    h.stop().await;
}

#[tokio::test]
async fn missing_references_are_named_and_nothing_is_called() {
    let h = Harness::start().await.run();
    // The account's credentials Secret is missing.
    h.put_account("other", "other-creds").await;
    h.apply(&Cov::new("creds", "A").account("other")).await;
    let obj = h.wait_reason("creds", "SecretNotFound").await;
    assert_eq!(
        ready_condition(&obj).message,
        format!(
            "Secret {}/other-creds not found (credentials of DpcAccount other)",
            h.ns
        )
    );
    // A key is missing.
    h.put_secret("other-creds", &[("client_id", CLIENT_ID)])
        .await;
    let obj = h.wait_reason("creds", "SecretKeyMissing").await;
    assert_eq!(
        ready_condition(&obj).message,
        format!(
            "Secret {}/other-creds has no key \"client_secret\" (credentials of DpcAccount other)",
            h.ns
        )
    );
    // A connectionPropertiesFrom Secret, and a ConfigMap, are missing.
    h.apply(&Cov::new("from-secret", "B").property_from_secret("secretKey", "refs", "key"))
        .await;
    let obj = h.wait_reason("from-secret", "SecretNotFound").await;
    assert_eq!(
        ready_condition(&obj).message,
        format!("Secret {}/refs not found (property secretKey)", h.ns)
    );
    h.apply(&Cov::new("from-map", "C").property_from_config_map("secretKey", "names", "key"))
        .await;
    let obj = h.wait_reason("from-map", "SecretNotFound").await;
    assert_eq!(
        ready_condition(&obj).message,
        format!("ConfigMap {}/names not found (property secretKey)", h.ns)
    );
    h.put_config_map("names", &[("other", "x")]).await;
    let obj = h.wait_reason("from-map", "SecretKeyMissing").await;
    assert_eq!(
        ready_condition(&obj).message,
        format!(
            "ConfigMap {}/names has no key \"key\" (property secretKey)",
            h.ns
        )
    );
    // The account itself is missing.
    h.apply(&Cov::new("no-account", "D").account("absent"))
        .await;
    let obj = h.wait_reason("no-account", "AccountNotReady").await;
    assert_eq!(
        ready_condition(&obj).message,
        format!("DpcAccount {}/absent not found", h.ns)
    );

    assert!(
        h.sim.calls().iter().all(|c| c.op == SimOp::Token),
        "no override call: {:?}",
        h.sim.calls()
    );

    // Each becomes Ready once what it waits for appears: the watches re-trigger it.
    h.put_secret("other-creds", &[("client_secret", CLIENT_SECRET)])
        .await;
    h.put_secret("refs", &[("key", "k")]).await;
    h.put_config_map("names", &[("key", "v")]).await;
    h.put_account("absent", CREDS).await;
    for name in ["creds", "from-secret", "from-map", "no-account"] {
        h.wait_ready(name).await;
    }
    h.stop().await;
}

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
async fn a_malformed_write_answer_still_counts_as_written() {
    let h = Harness::start().await;
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Malformed));
    let h = h.run();
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let obj = h.wait_ready("sf").await;
    assert_eq!(writes(&h.sim.calls()), [(SimOp::Create, Some(201))]);
    assert_eq!(obj.status.unwrap().remote, None);
    h.stop().await;
}

/// The Ready objects' reconcile count, read from the operator's metrics.
fn reconciliations(h: &Harness) -> u64 {
    let text = h.ctx.metrics.encode();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(r#"dpc_operator_reconciliations_total{kind="connectionoverride"} "#)
        })
        .map_or(0, |n| n.parse().unwrap())
}

#[tokio::test]
async fn ready_objects_are_looked_at_again_every_resync_interval_without_dpc_calls() {
    // 64 parts of 10 ms: every object is swept about every 0.64 s.
    let config = dpc_operator::config::OperatorConfig {
        resync_interval: Duration::from_millis(640),
        ..test_config()
    };
    let h = Harness::start_with(config, Default::default()).await.run();
    h.apply(&Cov::new("sf", "Salesforce").property("secretKey", "key"))
        .await;
    h.apply(&Cov::new("pg", "Postgres").property("user", "u"))
        .await;
    h.wait_ready("sf").await;
    h.wait_ready("pg").await;
    let calls = h.sim.calls().len();
    let before = reconciliations(&h);

    // Polled: the sweep has no event to wait on. Two objects, each swept twice.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reconciliations(&h) < before + 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweep reconciled {} times in 10 s",
            reconciliations(&h) - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = h.sim.calls();
    assert_eq!(
        after.len(),
        calls,
        "a resync of a Ready object calls DPC: {:?}",
        &after[calls.min(after.len())..]
    );
    for name in ["sf", "pg"] {
        assert!(is_ready(&h.covs().get(name).await.unwrap()));
    }
}
