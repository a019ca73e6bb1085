//! Requests on resources: every verb and patch type on a custom resource, a Secret and a
//! ConfigMap; the status subresource; finalizers; selectors; paging; metadata-only lists and
//! watches; watch resume and `410 Gone`.

use super::target::{Reply, Target};
use super::*;

const JSON_PATCH: &str = "application/json-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const APPLY: &str = "application/apply-patch+yaml";
const METADATA: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";

/// Sees a write: its answer, whether resourceVersion moved from `before`, its generation and
/// managers.
fn see_write(seen: &mut Seen, t: &Target, label: &str, reply: &Reply, before: u64) {
    seen.see(label, reply.brief(t));
    if reply.code < 300 {
        seen.see(
            format!("{label}: resourceVersion moved"),
            reply.rv() > before,
        );
        seen.see(
            format!("{label}: generation"),
            reply.at("/metadata/generation"),
        );
        seen.see(format!("{label}: managers"), reply.managers());
    }
}

/// Create, get, list, update, every patch type, and delete on `plural`, starting from
/// `object` (named `a`); `field`/`value` is a field the patches change.
async fn every_verb(t: Target, plural: &str, object: Value, field: &str) -> Seen {
    let mut seen = Seen::default();
    let all = t.path(plural, None);
    let one = t.path(plural, Some("a"));
    let created = t
        .call(
            "POST",
            &format!("{all}?fieldManager=creator"),
            None,
            Some(&object),
        )
        .await;
    see_write(&mut seen, &t, "create", &created, 0);
    seen.see("fields of the creator", created.fields_of("creator"));
    let again = t.call("POST", &all, None, Some(&object)).await;
    seen.see("create again", again.brief(&t));
    let got = t.call("GET", &one, None, None).await;
    seen.see("get", got.brief(&t));
    seen.see("get is what create answered", got.rv() == created.rv());
    let listed = t.call("GET", &all, None, None).await;
    seen.see("list kind", listed.at("/kind"));
    seen.see(
        "list size",
        listed.at("/items").as_array().map_or(0, Vec::len),
    );

    let pointer = format!("/{}", field.replace('.', "/"));
    let changed = with(got.body.clone(), &pointer, json!("put"));
    let put = t
        .call(
            "PUT",
            &format!("{one}?fieldManager=updater"),
            None,
            Some(&changed),
        )
        .await;
    see_write(&mut seen, &t, "update", &put, got.rv());
    let stale = t.call("PUT", &one, None, Some(&changed)).await;
    seen.see("update with a stale resourceVersion", stale.brief(&t));
    let unchanged = t.call("PUT", &one, None, Some(&put.body)).await;
    see_write(
        &mut seen,
        &t,
        "update with nothing changed",
        &unchanged,
        put.rv(),
    );
    seen.see(
        "nothing changed keeps resourceVersion",
        unchanged.rv() == put.rv(),
    );

    let nested = |value: &str| {
        let mut patch = json!({});
        let mut node = &mut patch;
        let parts: Vec<&str> = field.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            node[*part] = if i + 1 == parts.len() {
                json!(value)
            } else {
                json!({})
            };
            node = &mut node[*part];
        }
        patch
    };
    let merge = t
        .merge(&format!("{one}?fieldManager=merger"), &nested("merge"))
        .await;
    see_write(&mut seen, &t, "merge patch", &merge, put.rv());
    let labels = t
        .merge(&one, &json!({"metadata": {"labels": {"x": "y"}}}))
        .await;
    see_write(&mut seen, &t, "merge patch of labels", &labels, merge.rv());
    let ops = json!([{"op": "replace", "path": pointer, "value": "json"}]);
    let json_patch = t
        .call(
            "PATCH",
            &format!("{one}?fieldManager=jsonpatcher"),
            Some(JSON_PATCH),
            Some(&ops),
        )
        .await;
    see_write(&mut seen, &t, "JSON patch", &json_patch, labels.rv());
    let failing = json!([{"op": "test", "path": pointer, "value": "not this"}]);
    let failed = t
        .call("PATCH", &one, Some(JSON_PATCH), Some(&failing))
        .await;
    seen.see("JSON patch whose test fails", failed.code);
    let strategic = t
        .call("PATCH", &one, Some(STRATEGIC), Some(&nested("strategic")))
        .await;
    see_write(
        &mut seen,
        &t,
        "strategic merge patch",
        &strategic,
        json_patch.rv(),
    );
    let applied = with(object.clone(), &pointer, json!("applied"));
    let apply = t
        .call(
            "PATCH",
            &format!("{one}?fieldManager=applier&force=true"),
            Some(APPLY),
            Some(&applied),
        )
        .await;
    see_write(&mut seen, &t, "forced apply", &apply, json_patch.rv());
    seen.see("value after apply", apply.at(&pointer));

    let deleted = t.call("DELETE", &one, None, None).await;
    seen.see("delete", deleted.brief(&t));
    seen.see("delete answers with", deleted.at("/kind"));
    let gone = t.call("GET", &one, None, None).await;
    seen.see("get after delete", gone.brief(&t));
    let twice = t.call("DELETE", &one, None, None).await;
    seen.see("delete again", twice.brief(&t));
    let missing = t.merge(&one, &json!({})).await;
    seen.see("patch of a missing object", missing.brief(&t));
    seen
}

#[tokio::test]
async fn a_custom_resource_through_every_verb() {
    compare(|t| {
        every_verb(
            t,
            "connectionoverrides",
            cov("a"),
            "spec.connectionOverrides.connectionProperties.username",
        )
    })
    .await;
}

#[tokio::test]
async fn a_secret_through_every_verb() {
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}, "stringData": {"k": "v"}});
    compare(|t| every_verb(t, "secrets", secret.clone(), "metadata.annotations.note")).await;
}

#[tokio::test]
async fn a_config_map_through_every_verb() {
    let map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}});
    compare(|t| every_verb(t, "configmaps", map.clone(), "data.k")).await;
}

#[tokio::test]
async fn the_status_subresource_keeps_spec_and_status_apart() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let one = t.path("connectionoverrides", Some("a"));
        let created = t.create("connectionoverrides", &cov("a")).await;
        seen.see("create with status dropped", created.at("/status"));
        let mut both = created.body.clone();
        both["spec"]["syncInterval"] = json!("10m");
        both["status"] = json!({"observedGeneration": 1});
        let status = t.call("PUT", &format!("{one}/status?fieldManager=status-writer"), None, Some(&both)).await;
        see_write(&mut seen, &t, "update of status", &status, created.rv());
        seen.see("spec through status", status.at("/spec/syncInterval"));
        seen.see("status through status", status.at("/status"));
        let main = t.merge(&one, &json!({"status": {"observedGeneration": 7}, "spec": {"syncInterval": "11m"}}))
            .await;
        see_write(&mut seen, &t, "patch of the main resource", &main, status.rv());
        seen.see("status through the main resource", main.at("/status"));
        let apply = json!({"apiVersion": "dpc-operator.io/v1alpha1", "kind": "ConnectionOverride",
            "metadata": {"name": "a"}, "status": {"conditions": [{"type": "Ready", "status": "True",
            "reason": "Available", "message": "ok", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        let applied = t
            .call("PATCH", &format!("{one}/status?fieldManager=reporter&force=true"), Some(APPLY), Some(&apply))
            .await;
        see_write(&mut seen, &t, "apply of status", &applied, main.rv());
        seen.see("conditions", applied.at("/status/conditions/0/type"));
        seen.see("fields of the status apply", applied.fields_of("reporter"));
        seen.see("fields of the status update", applied.fields_of("status-writer"));
        let bad = json!({"status": {"conditions": [{"type": "Ready", "status": "Maybe"}]}});
        let refused = t.merge(&format!("{one}/status"), &bad).await;
        seen.see("invalid status", refused.brief(&t));
        seen.see("invalid status causes", refused.causes(&t));
        seen
    })
    .await;
}

#[tokio::test]
async fn finalizers_hold_a_deletion_until_removed() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let one = t.path("connectionoverrides", Some("a"));
        let mut object = cov("a");
        object["metadata"]["finalizers"] = json!(["example.com/hold"]);
        t.create("connectionoverrides", &object).await;
        let deleted = t.call("DELETE", &one, None, None).await;
        seen.see("delete", deleted.brief(&t));
        seen.see("delete answers with", deleted.at("/kind"));
        seen.see(
            "marked for deletion",
            deleted.at("/metadata/deletionTimestamp").is_string(),
        );
        let held = t.call("GET", &one, None, None).await;
        seen.see("still there", held.brief(&t));
        let more = json!({"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}});
        let added = t.merge(&one, &more).await;
        seen.see("a finalizer added during deletion", added.brief(&t));
        let spec = t
            .merge(&one, &json!({"spec": {"syncInterval": "9m"}}))
            .await;
        seen.see("a spec change during deletion", spec.brief(&t));
        let released = t
            .merge(&one, &json!({"metadata": {"finalizers": null}}))
            .await;
        seen.see("finalizer removed", released.brief(&t));
        let gone = t.call("GET", &one, None, None).await;
        seen.see("then gone", gone.brief(&t));
        seen
    })
    .await;
}

/// Creates ConnectionOverrides `c1`..`c3` with labels `team` a, a, b.
async fn three(t: &Target) {
    for (name, team) in [("c1", "a"), ("c2", "a"), ("c3", "b")] {
        let mut object = cov(name);
        object["metadata"]["labels"] = json!({"team": team});
        let created = t.create("connectionoverrides", &object).await;
        assert_eq!(created.code, 201, "{}", created.body);
    }
}

fn names(reply: &Reply) -> Value {
    let names: Vec<Value> = reply
        .at("/items")
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["metadata"]["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    json!(names)
}

#[tokio::test]
async fn label_and_field_selectors_pick_objects() {
    compare(|t| async move {
        let mut seen = Seen::default();
        three(&t).await;
        let all = t.path("connectionoverrides", None);
        for query in [
            "labelSelector=team%3Da",
            "labelSelector=team%21%3Da",
            "labelSelector=team%20in%20(a,b)",
            "labelSelector=!team",
            "labelSelector=team%3D%3D%3D",
            "fieldSelector=metadata.name%3Dc2",
            "fieldSelector=metadata.name%21%3Dc2",
            "fieldSelector=metadata.namespace%3Dnowhere",
            "fieldSelector=spec.connectionName%3DSalesforce",
        ] {
            let listed = t.call("GET", &format!("{all}?{query}"), None, None).await;
            seen.see(format!("{query}: answer"), listed.brief(&t));
            seen.see(format!("{query}: names"), names(&listed));
        }
        seen
    })
    .await;
}

/// A list's `continue`: `"token"`, `""`, or absent (`null`), and its `remainingItemCount`.
fn paging(reply: &Reply) -> Value {
    let token = match reply.at("/metadata/continue") {
        Value::String(t) if t.is_empty() => json!(""),
        Value::String(_) => json!("token"),
        other => other,
    };
    json!({"continue": token, "remainingItemCount": reply.at("/metadata/remainingItemCount")})
}

#[tokio::test]
async fn lists_come_in_pages() {
    compare(|t| async move {
        let mut seen = Seen::default();
        three(&t).await;
        for (name, _) in [("c1", ""), ("c2", ""), ("c3", "")] {
            let map = json!({"metadata": {"name": name, "labels": {"team": "a"}}});
            t.create("configmaps", &map).await;
        }
        for plural in ["connectionoverrides", "configmaps"] {
            let all = t.path(plural, None);
            let mut query = format!("{all}?limit=2");
            for page in 1..=3 {
                let reply = t.call("GET", &query, None, None).await;
                seen.see(format!("{plural} page {page}"), names(&reply));
                seen.see(format!("{plural} page {page} paging"), paging(&reply));
                match reply.at("/metadata/continue").as_str() {
                    Some(token) if !token.is_empty() => {
                        query = format!("{all}?limit=2&continue={token}");
                    }
                    _ => break,
                }
            }
            let selected = t
                .call(
                    "GET",
                    &format!("{all}?limit=1&labelSelector=team%3Da"),
                    None,
                    None,
                )
                .await;
            seen.see(format!("{plural} selected page paging"), paging(&selected));
            let whole = t.call("GET", &format!("{all}?limit=3"), None, None).await;
            seen.see(format!("{plural} a page of all"), paging(&whole));
            let unpaged = t.call("GET", &all, None, None).await;
            seen.see(format!("{plural} unpaged"), paging(&unpaged));
        }
        let bad = t
            .call(
                "GET",
                &format!(
                    "{}?limit=2&continue=bm90IGEgdG9rZW4",
                    t.path("configmaps", None)
                ),
                None,
                None,
            )
            .await;
        // (The server's message quotes its JSON decoder's error.)
        seen.see("a made-up token", json!([bad.code, bad.at("/reason")]));
        seen
    })
    .await;
}

/// Reads a watch that the server ends after `timeoutSeconds`: each event's type and the kind
/// and name of its object.
async fn watch_events(t: &Target, query: &str, accept: Option<&str>) -> Value {
    let path = format!(
        "{}?watch=true&timeoutSeconds=2&{query}",
        t.path("connectionoverrides", None)
    );
    let reply = t
        .send("GET", &path, "application/json", accept, Vec::new())
        .await;
    let text = match &reply.body {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let events: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let event: Value = serde_json::from_str(line).expect("a watch event is JSON");
            let object = &event["object"];
            json!([
                event["type"],
                object["kind"],
                object["metadata"]["name"],
                object["code"],
                object["reason"]
            ])
        })
        .filter(|e| e[0] != "BOOKMARK")
        .collect();
    json!({"code": reply.code, "events": events})
}

#[tokio::test]
async fn watches_resume_from_a_resource_version_and_old_ones_are_gone() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let created = t.create("connectionoverrides", &cov("a")).await;
        let one = t.path("connectionoverrides", Some("a"));
        t.merge(&one, &json!({"spec": {"syncInterval": "9m"}}))
            .await;
        t.call("DELETE", &one, None, None).await;
        let rv = created.rv();
        seen.see(
            "resumed",
            watch_events(&t, &format!("resourceVersion={rv}"), None).await,
        );
        seen.see(
            "from the start",
            watch_events(&t, "resourceVersion=1", None).await,
        );
        seen
    })
    .await;
}

#[tokio::test]
async fn metadata_only_lists_and_watches() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let created = t.create("connectionoverrides", &cov("a")).await;
        let all = t.path("connectionoverrides", None);
        let listed = t
            .send("GET", &all, "application/json", Some(METADATA), Vec::new())
            .await;
        seen.see("list kind", listed.at("/kind"));
        seen.see("item kind", listed.at("/items/0/kind"));
        seen.see("item has a spec", !listed.at("/items/0/spec").is_null());
        seen.see("item labels", listed.at("/items/0/metadata/labels"));
        let one = t.path("connectionoverrides", Some("a"));
        t.merge(&one, &json!({"metadata": {"labels": {"x": "y"}}}))
            .await;
        let accept = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";
        let query = format!("resourceVersion={}", created.rv());
        seen.see(
            "metadata-only watch",
            watch_events(&t, &query, Some(accept)).await,
        );
        seen
    })
    .await;
}
