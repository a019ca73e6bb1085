//! Touch only what it owns, through the binary on the real API server: an object deletes in
//! DPC only an override it wrote or adopted (a crash between the `POST` and the status
//! write included), every rule of its account holds for the deletion too, no decision comes
//! from a list older than the operator's own write, and two accounts reaching the same DPC
//! never both write one override.

use super::*;
use dpc_operator::api::{CREATE_PENDING_ANNOTATION, DpcAccount, DpcAccountSpec, FINALIZER};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

/// An override someone made by hand in the DPC UI: `secretName: by-hand/<connection>`.
fn made_by_hand(h: &Harness, connection: &str) {
    h.sim.put_override(
        PROJECT,
        "PROD",
        connection,
        None,
        json!({"connectionProperties": {"secretName": format!("by-hand/{connection}")}}),
    );
}

fn still_by_hand(h: &Harness, connection: &str) {
    let stored = h
        .sim
        .get_override(PROJECT, "PROD", connection)
        .unwrap_or_else(|| panic!("the override of {connection} was deleted"));
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        format!("by-hand/{connection}"),
        "the override of {connection} was changed"
    );
}

fn holds_finalizer(obj: &dpc_operator::api::ConnectionOverride) -> bool {
    obj.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

async fn delete_and_wait(h: &Harness, name: &str) {
    h.covs()
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone(name).await;
}

/// A DpcAccount like the harness's, with its own spec changes.
async fn put_account_with(h: &Harness, name: &str, change: impl FnOnce(&mut DpcAccountSpec)) {
    let mut spec = h.account_spec(CREDS, None);
    change(&mut spec);
    h.put_account_spec(name, spec).await;
}

#[tokio::test]
async fn objects_that_never_wrote_or_adopted_delete_nothing_in_dpc() {
    let h = Harness::start().await;
    for connection in ["Typo", "Rejected", "Waiting", "Legacy"] {
        made_by_hand(&h, connection);
    }
    // One request a minute: after the token, every call of this account waits its turn.
    put_account_with(&h, "slow", |spec| {
        spec.requests_per_minute = Some(1);
        spec.request_burst = Some(1);
    })
    .await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("manager", "Shared")).await;
    h.wait_ready("manager").await;
    // From now on DPC refuses every write.
    h.sim
        .push_fault(Fault::status(SimOp::Update, 422).times(1000));
    h.sim
        .push_fault(Fault::status(SimOp::Create, 404).times(1000));

    h.apply(&Cov::new("typo", "Typo").property_from_secret("secretKey", "no-such-secret", "k"))
        .await;
    h.apply(&Cov::new("rejected", "Rejected")).await;
    h.apply(&Cov::new("no-parent", "NoParent")).await;
    h.apply(&Cov::new("waiting", "Waiting").account("slow"))
        .await;
    h.apply(&Cov::new("conflict", "Shared").property("secretKey", "other"))
        .await;
    // As an older operator left it: the finalizer, and nothing it ever wrote.
    h.apply(
        &Cov::new("legacy", "Legacy")
            .property_from_secret("secretKey", "no-such-secret", "k")
            .finalizer(FINALIZER),
    )
    .await;
    h.wait_reason("typo", "SecretNotFound").await;
    h.wait_reason("rejected", "ApiRejected").await;
    h.wait_reason("no-parent", "ParentNotFound").await;
    h.wait_reason("waiting", "Creating").await;
    h.wait_reason("conflict", "Conflict").await;
    h.wait_reason("legacy", "SecretNotFound").await;
    // The POST DPC refused took its create-pending mark away again; then someone makes the
    // override by hand.
    h.wait_for(
        "no-parent",
        "refused, without the create-pending mark",
        |o| {
            ready_reason(o).as_deref() == Some("ParentNotFound")
                && !o
                    .metadata
                    .annotations
                    .iter()
                    .flatten()
                    .any(|(k, _)| k == CREATE_PENDING_ANNOTATION)
        },
    )
    .await;
    made_by_hand(&h, "NoParent");
    // Nothing that stopped before a write holds the cleanup finalizer.
    for name in ["typo", "waiting", "conflict"] {
        let obj = h.covs().get(name).await.unwrap();
        assert!(!holds_finalizer(&obj), "{name} holds the cleanup finalizer");
    }

    for name in [
        "typo",
        "rejected",
        "no-parent",
        "waiting",
        "conflict",
        "legacy",
    ] {
        delete_and_wait(&h, name).await;
    }
    for name in ["rejected", "no-parent", "legacy"] {
        let (_, _, note) = h.wait_event(name, "Released").await;
        assert!(
            note.contains("nothing was deleted in DPC"),
            "{name}: {note}"
        );
        assert!(note.contains("never wrote or adopted"), "{name}: {note}");
    }
    assert!(
        h.sim.calls_of(SimOp::Delete).is_empty(),
        "a deletion called DPC"
    );
    let accepted: Vec<_> = h
        .sim
        .calls()
        .into_iter()
        .filter(|c| c.is_write() && c.status.is_some_and(|s| s < 300))
        .collect();
    assert_eq!(
        write_summary(&accepted),
        [(SimOp::Create, Some(201))],
        "only the manager's write was ever accepted"
    );
    for connection in ["Typo", "Rejected", "NoParent", "Waiting", "Legacy"] {
        still_by_hand(&h, connection);
    }
    let shared = h.sim.get_override(PROJECT, "PROD", "Shared").unwrap();
    assert_eq!(
        shared.connection_overrides["connectionProperties"]["secretName"],
        "prod/Shared"
    );
    operator.kill().await;
    h.stop().await;
}

#[tokio::test]
async fn a_crash_between_the_post_and_the_status_write_still_deletes_what_was_created() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    // DPC applies the POST but answers late: the operator is killed before it writes status.
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 5000 }));
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("sf", "Salesforce")).await;
    wait_call(&h, SimOp::Create, 1).await;
    operator.kill().await;
    let marked = h.covs().get("sf").await.unwrap();
    assert!(holds_finalizer(&marked));
    let annotations = marked.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get(CREATE_PENDING_ANNOTATION)
            .map(String::as_str),
        Some(h.sim.api_url().trim_end_matches('/')),
        "the POST was announced before it was sent"
    );
    assert!(marked.status.and_then(|s| s.managed_override).is_none());
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());

    // Deleted while the operator is down; the next operator deletes what the POST made.
    h.covs()
        .delete("sf", &DeleteParams::default())
        .await
        .unwrap();
    h.sim.clear_calls();
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.wait_gone("sf").await;
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Delete, Some(204))]);
    assert!(h.sim.overrides().is_empty());
    let (_, _, note) = h.wait_event("sf", "Deleted").await;
    assert!(note.contains("outcome had not been recorded"), "{note}");
    operator.kill().await;
    h.stop().await;
}

const OTHER_PROJECT: &str = "7d1f0c2e-5a4b-4c3d-9e8f-1a2b3c4d5e6f";

#[tokio::test]
async fn a_project_the_cluster_account_does_not_allow_is_never_touched_not_even_on_deletion() {
    let h = Harness::start().await;
    h.sim.put_override(
        OTHER_PROJECT,
        "PROD",
        "Salesforce",
        None,
        json!({"connectionProperties": {"secretName": "by-hand/other-team"}}),
    );
    let shared = unique_name("shared-");
    let mut account = h.cluster_account(&shared, json!({"names": [&h.ns]}));
    account.spec.allowed_projects = vec![PROJECT.into()];
    let accounts: Api<dpc_operator::api::ClusterDpcAccount> = Api::all(h.client.clone());
    accounts
        .create(&Default::default(), &account)
        .await
        .unwrap();
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let args = [
        "--allow-insecure-http",
        "--cluster-credentials-namespaces",
        &h.ns,
    ];
    let mut operator = Operator::scoped(&h, &kubeconfig, &args);

    // A project the account does not allow: refused before anything is written anywhere.
    h.apply(
        &Cov::new("forbidden", "Salesforce")
            .cluster_account(&shared)
            .project(OTHER_PROJECT),
    )
    .await;
    let refused = h.wait_reason("forbidden", "AccountNotAllowed").await;
    assert!(
        ready_condition(&refused)
            .message
            .contains("does not allow project"),
        "{:?}",
        refused.status
    );
    assert!(!holds_finalizer(&refused));
    delete_and_wait(&h, "forbidden").await;

    // An override written while the project was allowed; then the account stops allowing
    // it: the deletion waits, says why, and calls nothing.
    h.apply(&Cov::new("allowed", "Salesforce").cluster_account(&shared))
        .await;
    h.wait_ready("allowed").await;
    let patch = json!({"spec": {"allowedProjects": [OTHER_PROJECT]}});
    accounts
        .patch(&shared, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    h.covs()
        .delete("allowed", &DeleteParams::default())
        .await
        .unwrap();
    let held = h.wait_reason("allowed", "Deleting").await;
    let message = ready_condition(&held).message;
    assert!(message.contains("does not allow project"), "{message}");
    assert!(message.contains(FORCE_ORPHAN), "{message}");
    let patch = json!({"metadata": {"annotations": {FORCE_ORPHAN: "true"}}});
    h.covs()
        .patch("allowed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    h.wait_gone("allowed").await;
    assert!(h.sim.calls_of(SimOp::Delete).is_empty());
    let other = h
        .sim
        .get_override(OTHER_PROJECT, "PROD", "Salesforce")
        .unwrap();
    assert_eq!(
        other.connection_overrides["connectionProperties"]["secretName"],
        "by-hand/other-team"
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    accounts.delete(&shared, &Default::default()).await.unwrap();
    operator.kill().await;
    h.stop().await;
}

const FORCE_ORPHAN: &str = dpc_operator::api::FORCE_ORPHAN_ANNOTATION;

#[tokio::test]
async fn an_override_deleted_and_declared_again_at_once_is_written_again() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    // A list answer serves the environment for a minute: only the operator's own writes
    // can make it stale.
    let args = ["--allow-insecure-http", "--drift-share-window", "60s"];
    let mut operator = Operator::scoped(&h, &kubeconfig, &args);
    h.apply(&Cov::new("first", "Salesforce")).await;
    h.apply(&Cov::new("neighbour", "Snowflake")).await;
    h.wait_ready("first").await;
    h.wait_ready("neighbour").await;
    // A reconcile request reads the environment afresh: the answer lists Salesforce.
    h.apply(
        &Cov::new("neighbour", "Snowflake")
            .annotation(dpc_operator::api::RECONCILE_REQUESTED_ANNOTATION, "now"),
    )
    .await;
    h.wait_for("neighbour", "the request handled", |o| {
        o.status
            .as_ref()
            .and_then(|s| s.last_handled_reconcile_at.as_deref())
            == Some("now")
    })
    .await;
    h.sim.clear_calls();

    delete_and_wait(&h, "first").await;
    h.apply(&Cov::new("second", "Salesforce")).await;
    h.wait_ready("second").await;
    assert_eq!(
        write_summary(&h.sim.calls()),
        [(SimOp::Delete, Some(204)), (SimOp::Create, Some(201))],
        "the new object wrote what the old one's deletion removed"
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some());
    let events = h.events("second").await;
    assert!(
        events.iter().any(|(_, reason, _)| reason == "Created"),
        "{events:?}"
    );
    operator.kill().await;
    h.stop().await;
}

#[tokio::test]
async fn two_accounts_reaching_the_same_dpc_claim_one_override_once() {
    let h = Harness::start().await;
    // The same API URL and credentials; one of them sends an account id.
    put_account_with(&h, "with-id", |spec| {
        spec.account_id = Some("acct-2f9e".into());
    })
    .await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("first", "Salesforce")).await;
    h.wait_ready("first").await;
    h.apply(
        &Cov::new("second", "Salesforce")
            .account("with-id")
            .property("secretKey", "mine"),
    )
    .await;
    let conflict = h.wait_reason("second", "Conflict").await;
    let message = ready_condition(&conflict).message;
    assert!(
        message.contains(&format!("ConnectionOverride {}/first", h.ns)),
        "{message}"
    );
    h.sim.clear_calls();
    // Reconciles of either object, asked for twice, write nothing.
    for round in ["1", "2"] {
        for (name, cov) in [
            ("first", Cov::new("first", "Salesforce")),
            (
                "second",
                Cov::new("second", "Salesforce")
                    .account("with-id")
                    .property("secretKey", "mine"),
            ),
        ] {
            let requested = dpc_operator::api::RECONCILE_REQUESTED_ANNOTATION;
            h.apply(&cov.annotation(requested, round)).await;
            h.wait_for(name, "the request handled", |o| {
                o.status
                    .as_ref()
                    .and_then(|s| s.last_handled_reconcile_at.as_deref())
                    == Some(round)
            })
            .await;
        }
    }
    assert_eq!(write_summary(&h.sim.calls()), []);
    let stored = h.sim.get_override(PROJECT, "PROD", "Salesforce").unwrap();
    assert!(
        stored.connection_overrides["connectionProperties"]
            .get("secretKey")
            .is_none(),
        "the second account's value never reached DPC"
    );
    operator.kill().await;
    h.stop().await;
}

/// Waits until the DpcAccount `name` satisfies `done`.
async fn wait_account(
    h: &Harness,
    name: &str,
    what: &str,
    done: impl Fn(Option<&DpcAccount>) -> bool,
) -> Option<DpcAccount> {
    let api: Api<DpcAccount> = Api::namespaced(h.client.clone(), &h.ns);
    let waited = tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(api.clone(), name, done),
    )
    .await;
    match waited {
        Ok(Ok(account)) => account,
        _ => panic!(
            "DpcAccount {name} did not become {what}: {:?}",
            api.get_opt(name).await.unwrap().map(|a| a.status)
        ),
    }
}

fn account_ready_message(account: Option<&DpcAccount>) -> Option<(String, String)> {
    let status = account?.status.as_ref()?;
    let ready = dpc_operator::api::conditions::find(
        &status.conditions,
        dpc_operator::api::conditions::READY,
    )?;
    Some((ready.reason.clone(), ready.message.clone()))
}

#[tokio::test]
async fn an_account_waits_for_what_another_shard_owns_and_serves_only_deletions() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let shard = |s: &'static str| vec!["--allow-insecure-http", "--selector", s];
    // Shard b writes an override through the account, then stops for a while.
    let mut b = Operator::scoped(&h, &kubeconfig, &shard("shard=b"));
    h.apply(&Cov::new("owner-b", "Salesforce").label("shard", "b"))
        .await;
    h.wait_ready("owner-b").await;
    b.kill().await;
    let mut a = Operator::scoped(&h, &kubeconfig, &shard("shard=a"));
    // Shard a's own object leaves DPC alone when deleted: it needs no account then.
    h.apply(
        &Cov::new("orphan-a", "Snowflake")
            .label("shard", "a")
            .orphan(),
    )
    .await;
    h.wait_ready("orphan-a").await;
    let in_use = dpc_operator::api::IN_USE_FINALIZER;
    wait_account(&h, ACCOUNT, "in use", |a| {
        a.is_some_and(|a| a.metadata.finalizers.iter().flatten().any(|f| f == in_use))
    })
    .await;

    let accounts: Api<DpcAccount> = Api::namespaced(h.client.clone(), &h.ns);
    accounts
        .delete(ACCOUNT, &DeleteParams::default())
        .await
        .unwrap();
    // Shard a sees no object of its own that needs the account, and still keeps it.
    let waiting = wait_account(&h, ACCOUNT, "Deleting", |a| {
        account_ready_message(a).is_some_and(|(reason, _)| reason == "Deleting")
    })
    .await
    .unwrap();
    let (_, message) = account_ready_message(Some(&waiting)).unwrap();
    assert!(message.contains(&format!("{}/owner-b", h.ns)), "{message}");
    assert!(!message.contains("orphan-a"), "{message}");
    assert!(
        waiting
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == in_use)
    );

    // An account being deleted writes nothing more.
    h.apply(&Cov::new("late", "Late").label("shard", "a")).await;
    let late = h.wait_reason("late", "AccountNotReady").await;
    assert!(
        ready_condition(&late).message.contains("is being deleted"),
        "{:?}",
        late.status
    );
    assert!(h.sim.get_override(PROJECT, "PROD", "Late").is_none());

    // Shard b comes back and deletes its override; then the account goes.
    let mut b = Operator::scoped(&h, &kubeconfig, &shard("shard=b"));
    h.sim.clear_calls();
    delete_and_wait(&h, "owner-b").await;
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Delete, Some(204))]);
    wait_account(&h, ACCOUNT, "gone", |a| a.is_none()).await;
    for name in ["orphan-a", "late"] {
        delete_and_wait(&h, name).await;
    }
    assert_eq!(h.sim.calls_of(SimOp::Delete).len(), 1);
    assert!(h.sim.get_override(PROJECT, "PROD", "Snowflake").is_some());
    a.kill().await;
    b.kill().await;
    h.stop().await;
}
