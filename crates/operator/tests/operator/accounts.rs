//! Accounts: what a DpcAccount and a ClusterDpcAccount let a namespace do, where their
//! credentials may live, and where their Events go.

use dpc_operator::api::ClusterDpcAccount;
use dpc_operator::config::OperatorConfig;
use dpc_testkit::dpc::{SimConfig, SimOp};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::common::*;

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
