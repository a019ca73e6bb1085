//! Claims: one object manages one remote override; newcomers, twins created at once and
//! changed identities never write it.

use dpc_operator::api::{ClusterDpcAccount, conditions};
use dpc_testkit::dpc::SimOp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::common::*;

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
    let bodies: Vec<String> = write_calls(&h.sim.calls())
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
    assert!(
        write_calls(&h.sim.calls()).is_empty(),
        "{:?}",
        h.sim.calls()
    );

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

#[tokio::test]
async fn an_observer_never_blocks_the_object_that_manages_the_override() {
    let h = Harness::start().await.run();
    // The older object only observes; the newer one manages, and writes.
    h.apply(&Cov::new("watching", "Salesforce").observe_only())
        .await;
    h.wait_reason("watching", "Drifted").await;
    h.apply(&Cov::new("managing", "Salesforce")).await;
    h.wait_ready("managing").await;
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Create, Some(201))]);
    // The observer sees what the manager wrote; it never says it manages anything.
    h.apply(
        &Cov::new("watching", "Salesforce")
            .observe_only()
            .annotation(dpc_operator::api::RECONCILE_REQUESTED_ANNOTATION, "look"),
    )
    .await;
    let observed = h.wait_ready("watching").await;
    assert!(observed.status.unwrap().managed_override.is_none());
    // A second manager is the one in conflict, naming the manager, not the observer.
    h.apply(&Cov::new("late", "Salesforce").property("secretKey", "x"))
        .await;
    let late = h.wait_reason("late", "Conflict").await;
    let message = ready_condition(&late).message;
    assert!(message.contains(&format!("{}/managing", h.ns)), "{message}");
    assert_eq!(write_summary(&h.sim.calls()), [(SimOp::Create, Some(201))]);
    h.stop().await;
}
