//! kubectl, a client nobody here wrote, against both servers: its exit codes and what it
//! prints (normalized) must be the same.

use super::target::{Ran, Target};
use super::*;

fn see_ran(seen: &mut Seen, label: &str, ran: &Ran) {
    seen.see(format!("{label}: exit"), ran.code);
    seen.see(format!("{label}: stdout"), ran.stdout.trim());
    seen.see(format!("{label}: stderr"), ran.stderr.trim());
}

fn yaml(value: &Value) -> String {
    serde_json::to_string(value).expect("JSON serializes")
}

#[tokio::test]
async fn kubectl_creates_built_in_objects_in_protobuf() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let ns = t.ns.clone();
        let ran = t
            .kubectl(
                &[
                    "create",
                    "secret",
                    "generic",
                    "demo",
                    "--from-literal=key=v",
                    "-n",
                    &ns,
                ],
                None,
            )
            .await;
        see_ran(&mut seen, "create secret generic", &ran);
        let ran = t
            .kubectl(
                &[
                    "get",
                    "secret",
                    "demo",
                    "-o",
                    "jsonpath={.type} {.data.key}",
                ],
                None,
            )
            .await;
        see_ran(&mut seen, "the secret", &ran);
        let ran = t
            .kubectl(
                &[
                    "create",
                    "secret",
                    "generic",
                    "demo",
                    "--from-literal=key=v",
                ],
                None,
            )
            .await;
        see_ran(&mut seen, "create it again", &ran);
        let ran = t
            .kubectl(
                &["create", "configmap", "settings", "--from-literal=a=b"],
                None,
            )
            .await;
        see_ran(&mut seen, "create configmap", &ran);
        let other = format!("{ns}-extra");
        let ran = t.kubectl(&["create", "namespace", &other], None).await;
        see_ran(&mut seen, "create namespace", &ran);
        let ran = t
            .kubectl(
                &["get", "namespace", &other, "-o", "jsonpath={.status.phase}"],
                None,
            )
            .await;
        see_ran(&mut seen, "the namespace", &ran);
        let ran = t
            .kubectl(&["delete", "namespace", &other, "--wait=false"], None)
            .await;
        see_ran(&mut seen, "delete namespace", &ran);
        let ran = t
            .kubectl(&["create", "serviceaccount", "robot"], None)
            .await;
        see_ran(&mut seen, "create serviceaccount", &ran);
        let token = t.kubectl(&["create", "token", "robot"], None).await;
        seen.see("create token: exit", token.code);
        seen.see("create token: printed one", !token.stdout.trim().is_empty());
        let ran = t.kubectl(&["create", "token", "nobody"], None).await;
        see_ran(&mut seen, "create token of a missing account", &ran);
        let ran = t.kubectl(&["describe", "secret", "demo"], None).await;
        see_ran(&mut seen, "describe secret", &ran);
        seen
    })
    .await;
}

#[tokio::test]
async fn kubectl_applies_lists_and_round_trips_what_it_gets() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": [
            cov("one"), cov("two"),
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "b"}}
        ]});
        let ran = t.kubectl(&["apply", "-f", "-"], Some(&yaml(&list))).await;
        see_ran(&mut seen, "apply -f of a List", &ran);
        let got = t.kubectl(&["get", "cov", "-o", "yaml"], None).await;
        seen.see("get -o yaml: exit", got.code);
        let got = t.kubectl(&["get", "cov", "-o", "json"], None).await;
        let ran = t.kubectl(&["apply", "-f", "-"], Some(&got.raw)).await;
        see_ran(&mut seen, "get | apply", &ran);
        let yaml_out = t.kubectl(&["get", "cov,cm", "-o", "yaml"], None).await;
        let ran = t.kubectl(&["apply", "-f", "-"], Some(&yaml_out.raw)).await;
        see_ran(&mut seen, "get -o yaml | apply", &ran);
        let ran = t.kubectl(&["get", "cov"], None).await;
        seen.see("get: exit", ran.code);
        seen.see("get: columns", ran.stdout.lines().next().unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" "));
        seen
    })
    .await;
}

#[tokio::test]
async fn kubectl_reports_invalid_objects_as_the_server_words_them() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let mut bad = cov("bad");
        bad["spec"]["projectId"] = json!("not-a-uuid");
        let ran = t.kubectl(&["apply", "-f", "-"], Some(&yaml(&bad))).await;
        see_ran(&mut seen, "apply of a bad UUID", &ran);
        let mut odd = cov("odd");
        odd["spec"]["colour"] = json!("blue");
        let ran = t.kubectl(&["apply", "-f", "-"], Some(&yaml(&odd))).await;
        see_ran(&mut seen, "apply of an unknown field", &ran);
        let ran = t
            .kubectl(&["apply", "--server-side", "-f", "-"], Some(&yaml(&odd)))
            .await;
        see_ran(&mut seen, "server-side apply of an unknown field", &ran);
        let ran = t
            .kubectl(&["apply", "-f", "-"], Some(&yaml(&cov("good"))))
            .await;
        see_ran(&mut seen, "apply of a good one", &ran);
        let mut moved = cov("good");
        moved["spec"]["environmentName"] = json!("DEV");
        let ran = t.kubectl(&["apply", "-f", "-"], Some(&yaml(&moved))).await;
        see_ran(&mut seen, "apply of a changed identity", &ran);
        let mut other = cov("good");
        other["spec"]["syncInterval"] = json!("6m");
        let ran = t
            .kubectl(
                &["apply", "--server-side", "--field-manager=other", "-f", "-"],
                Some(&yaml(&other)),
            )
            .await;
        see_ran(&mut seen, "server-side apply by a second manager", &ran);
        let ran = t
            .kubectl(
                &["apply", "--server-side", "--field-manager=other", "-f", "-"],
                Some(&yaml(&cov("good"))),
            )
            .await;
        see_ran(&mut seen, "second manager takes a field kubectl owns", &ran);
        seen
    })
    .await;
}

/// A Ready condition written on the status of `name`.
async fn mark_ready(t: &Target, name: &str) {
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True",
        "reason": "Available", "message": "in DPC", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let path = format!("{}/status", t.path("connectionoverrides", Some(name)));
    let reply = t
        .call(
            "PATCH",
            &path,
            Some("application/merge-patch+json"),
            Some(&status),
        )
        .await;
    assert_eq!(reply.code, 200, "{}", reply.body);
}

#[tokio::test]
async fn kubectl_waits_describes_and_explains() {
    compare(|t| async move {
        let mut seen = Seen::default();
        t.kubectl(&["apply", "-f", "-"], Some(&yaml(&cov("a"))))
            .await;
        mark_ready(&t, "a").await;
        let ran = t
            .kubectl(
                &["wait", "--for=condition=Ready", "cov/a", "--timeout=20s"],
                None,
            )
            .await;
        see_ran(&mut seen, "wait for Ready", &ran);
        let ran = t
            .kubectl(
                &["wait", "--for=condition=Synced", "cov/a", "--timeout=1s"],
                None,
            )
            .await;
        seen.see("wait for a condition that never comes: exit", ran.code);
        let ran = t.kubectl(&["describe", "cov", "a"], None).await;
        see_ran(&mut seen, "describe", &ran);
        let ran = t
            .kubectl(&["explain", "connectionoverride.spec.projectId"], None)
            .await;
        see_ran(&mut seen, "explain", &ran);
        let ran = t
            .kubectl(&["explain", "connectionoverride.spec.nothing"], None)
            .await;
        see_ran(&mut seen, "explain a missing field", &ran);
        let ran = t.kubectl(&["delete", "cov", "a"], None).await;
        see_ran(&mut seen, "delete", &ran);
        seen
    })
    .await;
}
