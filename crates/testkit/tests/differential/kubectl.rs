//! kubectl, a client nobody here wrote, against both servers: its exit codes and what it
//! prints (normalized) must be the same.

use super::target::{Ran, Target};
use super::*;

fn see_ran(seen: &mut Seen, label: &str, ran: &Ran) {
    seen.see(format!("{label}: exit"), ran.code);
    seen.see(format!("{label}: stdout"), ran.stdout.trim());
    seen.see(format!("{label}: stderr"), ran.stderr.trim());
}

/// Runs kubectl (with `stdin`) and sees what it did under `label`.
async fn see_kubectl(seen: &mut Seen, t: &Target, label: &str, args: &[&str], stdin: Option<&str>) {
    see_ran(seen, label, &t.kubectl(args, stdin).await);
}

fn yaml(value: &Value) -> String {
    serde_json::to_string(value).expect("JSON serializes")
}

#[tokio::test]
async fn kubectl_creates_built_in_objects_in_protobuf() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let ns = t.ns.clone();
        see_kubectl(
            &mut seen,
            &t,
            "create secret generic",
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
        see_kubectl(
            &mut seen,
            &t,
            "the secret",
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
        see_kubectl(
            &mut seen,
            &t,
            "create it again",
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
        see_kubectl(
            &mut seen,
            &t,
            "create configmap",
            &["create", "configmap", "settings", "--from-literal=a=b"],
            None,
        )
        .await;
        let other = format!("{ns}-extra");
        see_kubectl(
            &mut seen,
            &t,
            "create namespace",
            &["create", "namespace", &other],
            None,
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "the namespace",
            &["get", "namespace", &other, "-o", "jsonpath={.status.phase}"],
            None,
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "delete namespace",
            &["delete", "namespace", &other, "--wait=false"],
            None,
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "create serviceaccount",
            &["create", "serviceaccount", "robot"],
            None,
        )
        .await;
        let token = t.kubectl(&["create", "token", "robot"], None).await;
        seen.see("create token: exit", token.code);
        seen.see("create token: printed one", !token.stdout.trim().is_empty());
        see_kubectl(
            &mut seen,
            &t,
            "create token of a missing account",
            &["create", "token", "nobody"],
            None,
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "describe secret",
            &["describe", "secret", "demo"],
            None,
        )
        .await;
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
        see_kubectl(&mut seen, &t, "apply -f of a List", &["apply", "-f", "-"], Some(&yaml(&list))).await;
        let got = t.kubectl(&["get", "cov", "-o", "yaml"], None).await;
        seen.see("get -o yaml: exit", got.code);
        let got = t.kubectl(&["get", "cov", "-o", "json"], None).await;
        see_kubectl(&mut seen, &t, "get | apply", &["apply", "-f", "-"], Some(&got.raw)).await;
        let yaml_out = t.kubectl(&["get", "cov,cm", "-o", "yaml"], None).await;
        see_kubectl(&mut seen, &t, "get -o yaml | apply", &["apply", "-f", "-"], Some(&yaml_out.raw)).await;
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
        see_kubectl(
            &mut seen,
            &t,
            "apply of a bad UUID",
            &["apply", "-f", "-"],
            Some(&yaml(&bad)),
        )
        .await;
        let mut odd = cov("odd");
        odd["spec"]["colour"] = json!("blue");
        see_kubectl(
            &mut seen,
            &t,
            "apply of an unknown field",
            &["apply", "-f", "-"],
            Some(&yaml(&odd)),
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "server-side apply of an unknown field",
            &["apply", "--server-side", "-f", "-"],
            Some(&yaml(&odd)),
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "apply of a good one",
            &["apply", "-f", "-"],
            Some(&yaml(&cov("good"))),
        )
        .await;
        let mut moved = cov("good");
        moved["spec"]["environmentName"] = json!("DEV");
        see_kubectl(
            &mut seen,
            &t,
            "apply of a changed identity",
            &["apply", "-f", "-"],
            Some(&yaml(&moved)),
        )
        .await;
        let mut other = cov("good");
        other["spec"]["syncInterval"] = json!("6m");
        see_kubectl(
            &mut seen,
            &t,
            "server-side apply by a second manager",
            &["apply", "--server-side", "--field-manager=other", "-f", "-"],
            Some(&yaml(&other)),
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "second manager takes a field kubectl owns",
            &["apply", "--server-side", "--field-manager=other", "-f", "-"],
            Some(&yaml(&cov("good"))),
        )
        .await;
        seen
    })
    .await;
}

/// A Ready condition written on the status of `name`.
async fn mark_ready(t: &Target, name: &str) {
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True",
        "reason": "Available", "message": "in DPC", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let path = format!("{}/status", t.path("connectionoverrides", Some(name)));
    let reply = t.merge(&path, &status).await;
    assert_eq!(reply.code, 200, "{}", reply.body);
}

#[tokio::test]
async fn kubectl_waits_describes_and_explains() {
    compare(|t| async move {
        let mut seen = Seen::default();
        t.kubectl(&["apply", "-f", "-"], Some(&yaml(&cov("a"))))
            .await;
        mark_ready(&t, "a").await;
        see_kubectl(
            &mut seen,
            &t,
            "wait for Ready",
            &["wait", "--for=condition=Ready", "cov/a", "--timeout=20s"],
            None,
        )
        .await;
        let ran = t
            .kubectl(
                &["wait", "--for=condition=Synced", "cov/a", "--timeout=1s"],
                None,
            )
            .await;
        seen.see("wait for a condition that never comes: exit", ran.code);
        see_kubectl(&mut seen, &t, "describe", &["describe", "cov", "a"], None).await;
        see_kubectl(
            &mut seen,
            &t,
            "explain",
            &["explain", "connectionoverride.spec.projectId"],
            None,
        )
        .await;
        see_kubectl(
            &mut seen,
            &t,
            "explain a missing field",
            &["explain", "connectionoverride.spec.nothing"],
            None,
        )
        .await;
        see_kubectl(&mut seen, &t, "delete", &["delete", "cov", "a"], None).await;
        seen
    })
    .await;
}
