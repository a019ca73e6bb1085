//! Failures: what DPC refuses or fails, what is missing in the cluster, and objects the
//! operator cannot read, each reported on the object and retried as its class says.

use std::time::Duration;

use dpc_testkit::dpc::{Fault, FaultKind, SimOp};
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::common::*;

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
    let passes = h.passes_done();
    h.touch_secret("refs", "one").await;
    h.wait_passes(passes + 1).await;
    h.touch_secret("refs", "two").await;
    h.wait_passes(passes + 2).await;
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
