//! No secret value — the client secret, the client id, an access token, a value read from a
//! Secret — appears in any log line, status or Event, even when DPC echoes one back in an
//! error. The logs of this whole test process are captured at debug level (trace for the
//! operator) and searched.

use crate::common::*;
use dpc_testkit::dpc::{Fault, FaultKind, SimOp};
use kube::api::DeleteParams;
use serde_json::json;

const PROPERTY_VALUE: &str = "sv-4f1e2d-first-value";
const ROTATED_VALUE: &str = "sv-8a7b6c-second-value";
const WRONG_SECRET: &str = "cs-wrong/0a1b 2c3d+\"q\"";

#[tokio::test]
async fn no_secret_value_reaches_logs_status_or_events() {
    // Capture every log line of this process, from the start.
    captured_logs();
    let h = Harness::start().await;
    h.put_secret("refs", &[("key", PROPERTY_VALUE)]).await;
    // DPC echoes the submitted value in its problem details: it must be redacted.
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 400,
            retry_after: None,
            body: Some(json!({
                "title": "Bad Request",
                "detail": format!("secretKey {PROPERTY_VALUE} is not valid"),
                "violations": [format!("value {PROPERTY_VALUE} rejected")]
            })),
        },
    ));
    let h = h.run();
    let cov = Cov::new("sf", "Salesforce").property_from_secret("secretKey", "refs", "key");
    h.apply(&cov).await;
    let rejected = h.wait_reason("sf", "ApiRejected").await;
    let message = ready_condition(&rejected).message;
    // The message is not printed on failure: it would carry the secret value.
    assert!(
        message.contains("secretKey <redacted> is not valid"),
        "the echoed value was not redacted"
    );

    // A rotation of the value clears the gate and is written; then a revoked token.
    h.put_secret("refs", &[("key", ROTATED_VALUE)]).await;
    h.wait_ready("sf").await;
    h.sim.revoke_tokens();
    h.apply(&cov.clone().property("region", "eu")).await;
    h.wait_for("sf", "Ready at generation 2", |o| {
        is_ready(o) && o.metadata.generation == Some(2)
    })
    .await;
    // Transient failures and a deletion.
    h.sim.push_fault(Fault::status(SimOp::Delete, 503));
    h.covs()
        .delete("sf", &DeleteParams::default())
        .await
        .unwrap();
    h.wait_gone("sf").await;
    // An account whose secret DPC refuses, echoing it back past the first 200 characters,
    // form-encoded as it was sent and JSON-escaped.
    put_secret_in(
        &h.client,
        &h.ns,
        "bad-creds",
        &[("client_id", CLIENT_ID), ("client_secret", WRONG_SECRET)],
    )
    .await;
    let echo = format!(
        "{}client_secret={} rejected; you sent \"{WRONG_SECRET}\"",
        "x".repeat(220),
        url::form_urlencoded::byte_serialize(WRONG_SECRET.as_bytes()).collect::<String>()
    );
    h.sim.push_fault(
        Fault::on(
            SimOp::Token,
            FaultKind::Status {
                status: 401,
                retry_after: None,
                body: Some(json!({"error": "invalid_client", "error_description": echo})),
            },
        )
        .times(100),
    );
    h.put_account("bad", "bad-creds").await;
    h.apply(&Cov::new("bad", "Other").account("bad")).await;
    h.wait_reason("bad", "CredentialsRejected").await;

    let tokens = h.sim.issued_tokens();
    assert!(
        tokens.len() >= 2,
        "the scenario obtains a token twice: {}",
        tokens.len()
    );
    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.into(),
        CLIENT_ID.into(),
        PROPERTY_VALUE.into(),
        ROTATED_VALUE.into(),
        WRONG_SECRET.into(),
        // Its encoded forms, and its start (a cut before redaction would keep that).
        "cs-wrong%2F0a1b".into(),
        "cs-wrong/0a1b".into(),
    ];
    secrets.extend(tokens);

    let logs = String::from_utf8(captured_logs().lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("\"object\":\"sf\""),
        "the capture holds the reconcile logs"
    );
    assert!(logs.contains("DPC accepted the override"));
    assert!(
        logs.contains("<redacted>"),
        "the echoed value was logged redacted"
    );
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret value appears in the logs"
        );
    }

    let (events, statuses) = events_and_objects(&h).await;
    let accounts: kube::Api<dpc_operator::api::DpcAccount> =
        kube::Api::namespaced(h.client.clone(), &h.ns);
    let accounts =
        serde_json::to_string(&accounts.list(&Default::default()).await.unwrap().items).unwrap();
    assert!(events.contains("ApiRejected") && statuses.contains("CredentialsRejected"));
    for secret in &secrets {
        for (what, text) in [
            ("Events", &events),
            ("ConnectionOverrides", &statuses),
            ("DpcAccounts", &accounts),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "a secret value appears in {what}"
            );
        }
    }
    h.stop().await;
}

/// A value with characters Gson's HTML-safe writer escapes (`=`, `<`, `&`, `>`) and some
/// that are not ASCII.
const ESCAPED_VALUE: &str = "Pässwörd=Zm9vYmFy<&>";
/// How such a server writes it inside a JSON string.
const AS_GSON_WRITES_IT: &str = r"P\u00e4ssw\u00f6rd\u003dZm9vYmFy\u003c\u0026\u003e";

#[tokio::test]
async fn a_value_dpc_echoes_in_json_escapes_is_redacted_where_it_is_shown() {
    captured_logs();
    let h = Harness::start().await;
    h.put_secret("refs", &[("key", ESCAPED_VALUE)]).await;
    // A problem body quoting the value, and a plain JSON body that is no problem at all.
    let problem = format!(
        r#"{{"title":"Unprocessable Entity","detail":"secretKey {AS_GSON_WRITES_IT} is not valid","violations":[{{"field":"secretKey","value":"{AS_GSON_WRITES_IT}"}}]}}"#
    );
    let h = h.run();
    let message = refused_with(&h, "problem", "Salesforce", 422, problem).await;
    assert!(
        message.contains("secretKey <redacted> is not valid"),
        "the escaped echo was not redacted"
    );
    let plain = format!(r#"{{"message":"bad value {AS_GSON_WRITES_IT}"}}"#);
    let message = refused_with(&h, "plain", "Snowflake", 400, plain).await;
    assert!(
        message.contains("bad value <redacted>"),
        "the escaped echo in a plain body was not redacted"
    );
    h.wait_event("plain", "ApiRejected").await;

    let (events, statuses) = events_and_objects(&h).await;
    let logs = String::from_utf8(captured_logs().lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("\"object\":\"problem\""),
        "the capture holds the logs"
    );
    // Neither the value nor a piece of it, in clear or escaped, in any form a reader decodes.
    for piece in [
        "Zm9vYmFy",
        "Pässwörd",
        r"P\u00e4ssw",
        r"\u003dZm9v",
        "P%C3%A4ss",
    ] {
        for (what, text) in [("Events", &events), ("status", &statuses), ("logs", &logs)] {
            assert!(
                !text.contains(piece),
                "a piece of the value appears in {what}"
            );
        }
    }
    h.stop().await;
}

/// Applies an object reading `refs/key` whose POST DPC refuses with `status` and exactly
/// `body`; returns its condition message.
async fn refused_with(
    h: &Harness,
    name: &str,
    connection: &str,
    status: u16,
    body: String,
) -> String {
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Raw { status, body }));
    h.apply(&Cov::new(name, connection).property_from_secret("secretKey", "refs", "key"))
        .await;
    let rejected = h.wait_reason(name, "ApiRejected").await;
    ready_condition(&rejected).message
}

/// Every Event of the test's namespace, and every ConnectionOverride there, as JSON text.
async fn events_and_objects(h: &Harness) -> (String, String) {
    let api: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(h.client.clone(), &h.ns);
    let events =
        serde_json::to_string(&api.list(&Default::default()).await.unwrap().items).unwrap();
    let objects =
        serde_json::to_string(&h.covs().list(&Default::default()).await.unwrap().items).unwrap();
    (events, objects)
}
