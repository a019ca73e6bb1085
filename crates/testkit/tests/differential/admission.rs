//! Admission of our custom resources: every invalid object, immutable fields, unknown fields
//! under each `fieldValidation`, defaults, and server-side apply ownership and conflicts.

use super::target::Target;
use super::*;

const APPLY: &str = "application/apply-patch+yaml";

/// Creates each object (strictly, as kubectl does) and sees the answer and its causes.
async fn refusals(t: &Target, plural: &str, cases: Vec<(&str, Value)>) -> Seen {
    let mut seen = Seen::default();
    let path = format!("{}?fieldValidation=Strict", t.path(plural, None));
    for (i, (label, object)) in cases.into_iter().enumerate() {
        // Each its own name: one accepted must not make the next a duplicate.
        let object = with(object, "/metadata/name", json!(format!("{}-{i}", t.ns)));
        let reply = t.call("POST", &path, None, Some(&object)).await;
        seen.see(format!("{label}: answer"), reply.brief(t));
        seen.see(format!("{label}: causes"), reply.causes(t));
    }
    seen
}

/// Each `(label, pointer, value)` row as `base` with `pointer` set to `value` (`null` removes it).
fn variants(base: &Value, rows: Vec<(&'static str, &str, Value)>) -> Vec<(&'static str, Value)> {
    rows.into_iter()
        .map(|(label, pointer, value)| (label, with(base.clone(), pointer, value)))
        .collect()
}

#[tokio::test]
async fn every_invalid_connection_override_is_refused_as_the_server_refuses_it() {
    let from = "/spec/connectionOverrides/connectionPropertiesFrom";
    let secret = |property: &str, key: &str| json!({"property": property, "secretKeyRef": {"name": "s", "key": key}});
    let from_both = json!([{"property": "password",
        "secretKeyRef": {"name": "s", "key": "k"}, "configMapKeyRef": {"name": "c", "key": "k"}}]);
    let cases = variants(
        &cov("bad"),
        vec![
            (
                "a project id that is not a UUID",
                "/spec/projectId",
                json!("not-a-uuid"),
            ),
            ("an unknown authType", "/spec/authType", json!("FOO")),
            (
                "a negative syncInterval",
                "/spec/syncInterval",
                json!("-5m"),
            ),
            (
                "a syncInterval under 30s",
                "/spec/syncInterval",
                json!("10s"),
            ),
            (
                "a syncInterval over 24h",
                "/spec/syncInterval",
                json!("25h"),
            ),
            (
                "a deletionTimeout over a year",
                "/spec/deletionTimeout",
                json!("9000h"),
            ),
            (
                "a comma in the connection name",
                "/spec/connectionName",
                json!("a,b"),
            ),
            (
                "an empty environment name",
                "/spec/environmentName",
                json!(""),
            ),
            ("no project id", "/spec/projectId", Value::Null),
            ("no spec", "/spec", Value::Null),
            (
                "an unknown deletionPolicy",
                "/spec/deletionPolicy",
                json!("Keep"),
            ),
            ("a number for a string", "/spec/connectionName", json!(7)),
            ("an unknown field", "/spec/colour", json!("blue")),
            ("a property from a Secret and a ConfigMap", from, from_both),
            (
                "a property named twice",
                from,
                json!([secret("password", "k"), secret("password", "j")]),
            ),
            (
                "a property both literal and from a Secret",
                from,
                json!([secret("username", "k")]),
            ),
            (
                "an unknown account kind",
                "/spec/accountRef/kind",
                json!("Account"),
            ),
            (
                "an unknown driftPolicy",
                "/spec/driftPolicy",
                json!("Ignore"),
            ),
            (
                "an unknown managementPolicy",
                "/spec/managementPolicy",
                json!("Own"),
            ),
            (
                "a connection name over 255 bytes",
                "/spec/connectionName",
                json!("c".repeat(256)),
            ),
            (
                "a syncInterval over 32 bytes",
                "/spec/syncInterval",
                json!("1m".repeat(17)),
            ),
            (
                "a deletionTimeout that is no duration",
                "/spec/deletionTimeout",
                json!("soon"),
            ),
            (
                "a secrets location without a type",
                "/spec/connectionOverrides/secretsLocation",
                json!({"region": "eu-west-1"}),
            ),
            (
                "a Secret reference without a key",
                from,
                json!([{"property": "password", "secretKeyRef": {"name": "s"}}]),
            ),
            (
                "a null where a string is wanted",
                "/spec/authType",
                Value::Null,
            ),
        ],
    );
    compare(|t| {
        let cases = cases.clone();
        async move { refusals(&t, "connectionoverrides", cases).await }
    })
    .await;
}

#[tokio::test]
async fn every_invalid_account_is_refused_as_the_server_refuses_it() {
    let no_region = with(account("bad"), "/spec/region", Value::Null);
    let mut account_cases = variants(
        &account("bad"),
        vec![
            ("no credentials", "/spec/credentialsSecretRef", Value::Null),
            (
                "an empty credentials name",
                "/spec/credentialsSecretRef/name",
                json!(""),
            ),
            ("a zero rate", "/spec/requestsPerMinute", json!(0)),
            ("an unknown region", "/spec/region", json!("eu9")),
            ("a burst of zero", "/spec/requestBurst", json!(0)),
            (
                "a rate over int32",
                "/spec/requestsPerMinute",
                json!(3_000_000_000i64),
            ),
            ("a rate as a string", "/spec/requestsPerMinute", json!("60")),
        ],
    );
    account_cases.push(("neither region nor apiUrl", no_region.clone()));
    account_cases.push((
        "an apiUrl and no region",
        with(no_region, "/spec/apiUrl", json!("https://dpc.example.com")),
    ));
    let cluster = with(
        with(account("bad"), "/kind", json!("ClusterDpcAccount")),
        "/metadata/namespace",
        Value::Null,
    );
    let mut cluster_cases = variants(
        &cluster,
        vec![
            (
                "a namespace selector without an operator",
                "/spec/allowedNamespaces/selector",
                json!({"matchExpressions": [{"key": "team"}]}),
            ),
            (
                "a cluster account with one",
                "/spec/credentialsSecretRef/namespace",
                json!("dpc-system"),
            ),
        ],
    );
    cluster_cases.insert(
        0,
        ("a cluster account without a credentials namespace", cluster),
    );
    compare(|t| {
        let (account_cases, cluster_cases) = (account_cases.clone(), cluster_cases.clone());
        async move {
            let mut seen = refusals(&t, "dpcaccounts", account_cases).await;
            let names = cluster_cases.len();
            let created = refusals(&t, "clusterdpcaccounts", cluster_cases).await;
            seen.0.extend(created.0);
            // A cluster-scoped object outlives the case's namespace.
            for i in 0..names {
                let name = format!("{}-{i}", t.ns);
                t.call(
                    "DELETE",
                    &t.path("clusterdpcaccounts", Some(&name)),
                    None,
                    None,
                )
                .await;
            }
            seen
        }
    })
    .await;
}

#[tokio::test]
async fn identity_fields_are_immutable() {
    compare(|t| async move {
        let mut seen = Seen::default();
        t.create("connectionoverrides", &cov("a")).await;
        let one = t.path("connectionoverrides", Some("a"));
        for patch in [
            json!({"spec": {"projectId": "11111111-2222-4333-8444-555555555555"}}),
            json!({"spec": {"environmentName": "DEV"}}),
            json!({"spec": {"connectionName": "Other"}}),
            json!({"spec": {"accountRef": {"name": "other"}}}),
            json!({"spec": {"syncInterval": "5m"}}),
        ] {
            let reply = t.merge(&one, &patch).await;
            seen.see(format!("{patch}: answer"), reply.brief(&t));
            seen.see(format!("{patch}: causes"), reply.causes(&t));
        }
        // The same rules through an update and an apply.
        let current = t.call("GET", &one, None, None).await.body;
        let moved = with(current, "/spec/environmentName", json!("QA"));
        let put = t.call("PUT", &one, None, Some(&moved)).await;
        seen.see("update of an identity field", put.brief(&t));
        let applied = with(cov("a"), "/spec/driftPolicy", json!("Sometimes"));
        let path = format!("{one}?fieldManager=applier&force=true");
        let apply = t.call("PATCH", &path, Some(APPLY), Some(&applied)).await;
        seen.see("apply of an unknown driftPolicy", apply.brief(&t));
        seen.see("apply of an unknown driftPolicy: causes", apply.causes(&t));
        let status = json!({"apiVersion": "dpc-operator.io/v1alpha1", "kind": "ConnectionOverride",
            "metadata": {"name": "a"}, "status": {"observedGeneration": "first"}});
        let path = format!("{one}/status?fieldManager=reporter&force=true");
        let bad_status = t.call("PATCH", &path, Some(APPLY), Some(&status)).await;
        seen.see("apply of a bad status", bad_status.brief(&t));
        seen
    })
    .await;
}

#[tokio::test]
async fn unknown_fields_by_field_validation_and_defaults() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let all = t.path("connectionoverrides", None);
        for (name, mode) in [
            ("strict", "Strict"),
            ("warn", "Warn"),
            ("ignore", "Ignore"),
            ("unset", ""),
        ] {
            let object = with(
                with(cov(name), "/spec/colour", json!("blue")),
                "/spec/connectionOverrides/odd",
                json!(1),
            );
            let query = if mode.is_empty() {
                String::new()
            } else {
                format!("?fieldValidation={mode}")
            };
            let reply = t
                .call("POST", &format!("{all}{query}"), None, Some(&object))
                .await;
            seen.see(format!("{mode}: answer"), reply.brief(&t));
            let warnings: Vec<String> = reply
                .headers
                .get_all("warning")
                .iter()
                .map(|w| t.norm(w.to_str().unwrap_or_default()))
                .collect();
            seen.see(format!("{mode}: warnings"), json!(warnings));
            seen.see(
                format!("{mode}: stored spec keys"),
                reply
                    .at("/spec")
                    .as_object()
                    .map(|s| json!(s.keys().collect::<Vec<_>>()))
                    .unwrap_or_default(),
            );
        }
        let bad_mode = t
            .call(
                "POST",
                &format!("{all}?fieldValidation=Loose"),
                None,
                Some(&cov("x")),
            )
            .await;
        seen.see("an unknown fieldValidation", bad_mode.brief(&t));
        let defaulted = t.create("dpcaccounts", &account("defaults")).await;
        seen.see("defaults", defaulted.at("/spec"));
        seen
    })
    .await;
}

fn applied(name: &str, interval: &str) -> Value {
    with(cov(name), "/spec/syncInterval", json!(interval))
}

#[tokio::test]
async fn server_side_apply_shares_owns_and_conflicts() {
    compare(|t| async move {
        let mut seen = Seen::default();
        let one = t.path("connectionoverrides", Some("a"));
        let apply = |manager: &str, force: bool| {
            format!(
                "{one}?fieldManager={manager}{}",
                if force { "&force=true" } else { "" }
            )
        };
        let first = t
            .call(
                "PATCH",
                &apply("alice", false),
                Some(APPLY),
                Some(&applied("a", "5m")),
            )
            .await;
        seen.see("alice creates", first.brief(&t));
        seen.see("alice creates: managers", first.managers());
        seen.see("alice creates: fields", first.fields_of("alice"));
        let same = t
            .call(
                "PATCH",
                &apply("bob", false),
                Some(APPLY),
                Some(&applied("a", "5m")),
            )
            .await;
        seen.see("bob applies the same values", same.brief(&t));
        seen.see("bob applies the same values: managers", same.managers());
        let other = t
            .call(
                "PATCH",
                &apply("bob", false),
                Some(APPLY),
                Some(&applied("a", "6m")),
            )
            .await;
        seen.see("bob changes a shared field", other.brief(&t));
        seen.see("bob changes a shared field: causes", other.causes(&t));
        let mut two = applied("a", "6m");
        two["spec"]["connectionOverrides"]["connectionProperties"]["username"] = json!("other");
        let both = t
            .call("PATCH", &apply("carol", false), Some(APPLY), Some(&two))
            .await;
        seen.see("carol changes two owned fields", both.brief(&t));
        seen.see("carol changes two owned fields: causes", both.causes(&t));
        let forced = t
            .call(
                "PATCH",
                &apply("bob", true),
                Some(APPLY),
                Some(&applied("a", "6m")),
            )
            .await;
        seen.see("bob forces", forced.brief(&t));
        seen.see("bob forces: value", forced.at("/spec/syncInterval"));
        seen.see("bob forces: managers", forced.managers());
        let back = t
            .call(
                "PATCH",
                &apply("alice", false),
                Some(APPLY),
                Some(&applied("a", "5m")),
            )
            .await;
        seen.see("alice applies her old value", back.brief(&t));
        let edit = t
            .merge(
                &format!("{one}?fieldManager=editor"),
                &json!({"spec": {"syncInterval": "7m"}}),
            )
            .await;
        seen.see("an editor changes it", edit.managers());
        let after_edit = t
            .call(
                "PATCH",
                &apply("bob", false),
                Some(APPLY),
                Some(&applied("a", "6m")),
            )
            .await;
        seen.see("bob applies over the edit", after_edit.brief(&t));
        let unknown = with(applied("a", "6m"), "/spec/colour", json!("blue"));
        // (With several unknown fields the server names one of them at random.)
        for (mode, body) in [("Strict", &unknown), ("Ignore", &unknown)] {
            let path = format!("{}&fieldValidation={mode}", apply("bob", true));
            let reply = t.call("PATCH", &path, Some(APPLY), Some(body)).await;
            seen.see(
                format!("an apply with unknown fields ({mode})"),
                reply.brief(&t),
            );
        }
        let no_manager = t
            .call("PATCH", &one, Some(APPLY), Some(&applied("a", "6m")))
            .await;
        seen.see("an apply without a field manager", no_manager.brief(&t));
        seen
    })
    .await;
}
