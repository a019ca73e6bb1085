//! The Kubernetes API emulator's semantics, through a kube client over HTTP: what the
//! operator (and any client) relies on behaves as a real API server does.

use std::time::Duration;

use dpc_operator_api::ConnectionOverride;
use dpc_testkit::kube::{EmulatorConfig, KubeEmulator};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::{Api, Client};
use serde_json::{Value, json};

async fn setup() -> (KubeEmulator, Client) {
    let emu = KubeEmulator::start().await.unwrap();
    let client = emu.client();
    emu.install_crds().await.unwrap();
    emu.create_namespace("ns").await.unwrap();
    (emu, client)
}

fn cov(name: &str, connection: &str) -> Value {
    json!({
        "apiVersion": "dpc-operator.io/v1alpha1",
        "kind": "ConnectionOverride",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "accountRef": {"name": "a"},
            "projectId": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
            "environmentName": "PROD",
            "connectionName": connection,
            "connectionOverrides": {"connectionProperties": {"secretName": "s"}}
        }
    })
}

fn api(client: &Client) -> Api<ConnectionOverride> {
    Api::namespaced(client.clone(), "ns")
}

async fn create(client: &Client, name: &str) -> ConnectionOverride {
    let obj: ConnectionOverride = serde_json::from_value(cov(name, "C")).unwrap();
    api(client)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap()
}

fn api_error(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(status) => (status.code, status.reason.clone()),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn resource_version_moves_on_writes_and_a_stale_update_conflicts() {
    let (_emu, client) = setup().await;
    let created = create(&client, "a").await;
    let rv1: u64 = created
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    let mut changed = created.clone();
    changed.spec.sync_interval = Some("10m".into());
    let updated = api(&client)
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap();
    let rv2: u64 = updated
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1);
    // The stale copy (old resourceVersion) is refused.
    let err = api(&client)
        .replace("a", &PostParams::default(), &changed)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (409, "Conflict".into()));
    // A write that changes nothing keeps the resourceVersion.
    let same = api(&client)
        .replace("a", &PostParams::default(), &updated)
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        updated.metadata.resource_version
    );
}

#[tokio::test]
async fn generation_moves_only_on_spec_changes_and_status_is_a_subresource() {
    let (_emu, client) = setup().await;
    let created = create(&client, "a").await;
    assert_eq!(created.metadata.generation, Some(1));
    let labels = json!({"metadata": {"labels": {"x": "y"}}});
    let labelled = api(&client)
        .patch("a", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap();
    assert_eq!(
        labelled.metadata.generation,
        Some(1),
        "metadata does not move generation"
    );

    // Status through the main resource is ignored; through /status it is kept, spec ignored.
    let sneaky = json!({"status": {"appliedHash": "main"}, "spec": {"syncInterval": "7m"}});
    let main = api(&client)
        .patch("a", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    assert_eq!(main.status, None);
    assert_eq!(main.metadata.generation, Some(2));
    let status = json!({"status": {"appliedHash": "sub"}, "spec": {"syncInterval": "9m"}});
    let sub = api(&client)
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(sub.status.unwrap().applied_hash.as_deref(), Some("sub"));
    assert_eq!(sub.spec.sync_interval.as_deref(), Some("7m"));
    assert_eq!(
        sub.metadata.generation,
        Some(2),
        "status does not move generation"
    );
}

#[tokio::test]
async fn a_write_that_changes_nothing_keeps_the_resource_version_and_sends_no_event() {
    let (_emu, client) = setup().await;
    let created = create(&client, "a").await;
    let rv = created.metadata.resource_version.clone();
    let mut events = api(&client)
        .watch(&WatchParams::default(), rv.as_deref().unwrap())
        .await
        .unwrap()
        .boxed();

    // The same spec again, by merge patch and by status patch: nothing moves.
    let same = json!({"spec": {"environmentName": "PROD"}, "metadata": {"labels": null}});
    let after = api(&client)
        .patch("a", &PatchParams::default(), &Patch::Merge(&same))
        .await
        .unwrap();
    assert_eq!(after.metadata.resource_version, rv);
    let empty_status = json!({"status": null});
    let after = api(&client)
        .patch_status("a", &PatchParams::default(), &Patch::Merge(&empty_status))
        .await
        .unwrap();
    assert_eq!(after.metadata.resource_version, rv);

    // A label is a change: the version moves, and the watch's first event is that write.
    let label = json!({"metadata": {"labels": {"x": "y"}}});
    let labelled = api(&client)
        .patch("a", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    assert_ne!(labelled.metadata.resource_version, rv);
    let first = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event for the label")
        .unwrap()
        .unwrap();
    match first {
        WatchEvent::Modified(o) => {
            assert_eq!(
                o.metadata.resource_version,
                labelled.metadata.resource_version
            );
            assert_eq!(o.metadata.labels.unwrap()["x"], "y");
        }
        other => panic!("expected the label's Modified event, got {other:?}"),
    }
}

#[tokio::test]
async fn server_side_apply_merges_list_maps_and_drops_what_a_manager_stops_applying() {
    let (_emu, client) = setup().await;
    create(&client, "a").await;
    let condition = |type_: &str, status: &str| json!({"type": type_, "status": status, "reason": "R", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"});
    let apply = |status: Value| json!({"apiVersion": "dpc-operator.io/v1alpha1", "kind": "ConnectionOverride", "status": status});
    let pp = PatchParams::apply("one").force();
    api(&client)
        .patch_status(
            "a",
            &pp,
            &Patch::Apply(&apply(
                json!({"conditions": [condition("Ready", "True")], "appliedHash": "h1"}),
            )),
        )
        .await
        .unwrap();
    // Another manager adds its own condition: the list-map merges by type.
    api(&client)
        .patch_status(
            "a",
            &PatchParams::apply("two").force(),
            &Patch::Apply(&apply(json!({"conditions": [condition("Other", "False")]}))),
        )
        .await
        .unwrap();
    // The first manager no longer applies appliedHash: it is removed; Other stays.
    let obj = api(&client)
        .patch_status(
            "a",
            &pp,
            &Patch::Apply(&apply(json!({"conditions": [condition("Ready", "False")]}))),
        )
        .await
        .unwrap();
    let status = obj.status.unwrap();
    assert_eq!(status.applied_hash, None);
    let kinds: Vec<(String, String)> = status
        .conditions
        .iter()
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("Ready".to_string(), "False".to_string()),
            ("Other".to_string(), "False".to_string())
        ]
    );
    let managers: Vec<String> = obj
        .metadata
        .managed_fields
        .unwrap()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&"one".to_string()) && managers.contains(&"two".to_string()),
        "{managers:?}"
    );
}

#[tokio::test]
async fn json_patch_tests_guard_concurrent_finalizer_changes() {
    let (_emu, client) = setup().await;
    create(&client, "a").await;
    let add: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/finalizers", "value": ["someone-else"]},
        {"op": "add", "path": "/metadata/finalizers/-", "value": "mine"}
    ]))
    .unwrap();
    let err = api(&client)
        .patch("a", &PatchParams::default(), &Patch::Json::<()>(add))
        .await
        .unwrap_err();
    assert_eq!(api_error(err).0, 422);
}

#[tokio::test]
async fn finalizers_hold_a_deletion_until_they_are_removed() {
    let (_emu, client) = setup().await;
    create(&client, "a").await;
    let fin = json!({"metadata": {"finalizers": ["example.com/hold"]}});
    api(&client)
        .patch("a", &PatchParams::default(), &Patch::Merge(&fin))
        .await
        .unwrap();
    api(&client)
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    let held = api(&client).get("a").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    // No new finalizers on an object being deleted.
    let more = json!({"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}});
    let err = api(&client)
        .patch("a", &PatchParams::default(), &Patch::Merge(&more))
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (422, "Invalid".into()));
    let release = json!({"metadata": {"finalizers": null}});
    api(&client)
        .patch("a", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    assert!(api(&client).get_opt("a").await.unwrap().is_none());
}

#[tokio::test]
async fn errors_are_status_objects_with_reason_and_code() {
    let (_emu, client) = setup().await;
    assert_eq!(
        api_error(api(&client).get("missing").await.unwrap_err()),
        (404, "NotFound".into())
    );
    create(&client, "a").await;
    let obj: ConnectionOverride = serde_json::from_value(cov("a", "C")).unwrap();
    let err = api(&client)
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (409, "AlreadyExists".into()));
    // The body's namespace must match the URL's.
    let elsewhere: Api<ConnectionOverride> = Api::namespaced(client.clone(), "absent");
    let err = elsewhere
        .create(&PostParams::default(), &obj)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (400, "BadRequest".into()));
    // A namespace that does not exist.
    let mut unplaced = obj.clone();
    unplaced.metadata.namespace = None;
    let err = elsewhere
        .create(&PostParams::default(), &unplaced)
        .await
        .unwrap_err();
    assert_eq!(api_error(err), (404, "NotFound".into()));
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let (_emu, client) = setup().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    for (name, tier) in [("a", "web"), ("b", "db"), ("c", "web")] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": {"tier": tier}}}))
                .unwrap();
        maps.create(&PostParams::default(), &cm).await.unwrap();
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect()
    };
    assert_eq!(
        names(
            maps.list(&ListParams::default().labels("tier=web"))
                .await
                .unwrap()
        ),
        ["a", "c"]
    );
    assert_eq!(
        names(
            maps.list(&ListParams::default().labels("tier!=web"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    assert_eq!(
        names(
            maps.list(&ListParams::default().labels("tier in (db,cache)"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    assert_eq!(
        names(
            maps.list(&ListParams::default().fields("metadata.name!=a"))
                .await
                .unwrap()
        ),
        ["b", "c"]
    );
    // Pages.
    let first = maps.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().unwrap();
    let rest = maps
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(rest), ["c"]);
}

#[tokio::test]
async fn watches_resume_from_a_resource_version_and_too_old_ones_are_gone() {
    let emu = KubeEmulator::start_with(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig {
            history_limit: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let client = emu.client();
    emu.install_crds().await.unwrap();
    emu.create_namespace("ns").await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "ns");
    let start = maps
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    for name in ["a", "b"] {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        maps.create(&PostParams::default(), &cm).await.unwrap();
    }
    maps.delete("a", &DeleteParams::default()).await.unwrap();

    // Resuming from `start` replays exactly what happened since.
    let stream = maps
        .watch(&WatchParams::default().timeout(2), &start)
        .await
        .unwrap();
    let events: Vec<String> = stream
        .take(3)
        .map_ok(|e| match e {
            WatchEvent::Added(cm) => format!("ADDED {}", cm.metadata.name.unwrap()),
            WatchEvent::Deleted(cm) => format!("DELETED {}", cm.metadata.name.unwrap()),
            other => format!("{other:?}"),
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(events, ["ADDED a", "ADDED b", "DELETED a"]);

    // After compaction that resourceVersion is too old: 410 Gone.
    emu.compact();
    let mut stream = Box::pin(
        maps.watch(&WatchParams::default().timeout(2), &start)
            .await
            .unwrap(),
    );
    match tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
    {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}

#[tokio::test]
async fn deleting_a_crd_stops_serving_its_resource() {
    let (_emu, client) = setup().await;
    create(&client, "a").await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    crds.delete(
        "connectionoverrides.dpc-operator.io",
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    let err = api(&client).list(&ListParams::default()).await.unwrap_err();
    assert_eq!(api_error(err).0, 404);
}
