//! The simulator's own /_sim/ endpoints: faults, the call log, configuration.

use super::*;

/// Control endpoints for driving a simulator in another process:
/// `GET /_sim/calls`, `DELETE /_sim/calls`, `GET /_sim/overrides`, `PUT /_sim/overrides`
/// (`{projectId, environmentName, connectionName, authType?, connectionOverrides}`),
/// `DELETE /_sim/overrides?projectId=&environmentName=&connectionName=`, `POST /_sim/faults`
/// (a [`Fault`]), `PATCH /_sim/config` (fields of [`SimConfig`]), `POST /_sim/clients`
/// (`{clientId, clientSecret}`), `POST /_sim/revoke-tokens`.
pub(super) fn control_endpoint(state: &State, path: &str, req: &Req) -> Response<Body> {
    let ok = || http::json(StatusCode::OK, &json!({"ok": true}));
    let bad = |message: String| http::json(StatusCode::BAD_REQUEST, &json!({"error": message}));
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let mut inner = state.inner.lock().expect("simulator lock");
    let response = match (&req.method, path) {
        (&Method::GET, "calls") => http::json(
            StatusCode::OK,
            &serde_json::to_value(&inner.calls).expect("calls serialize"),
        ),
        (&Method::DELETE, "calls") => {
            inner.calls.clear();
            ok()
        }
        (&Method::GET, "overrides") => {
            let all: Vec<&StoredOverride> = inner.overrides.values().collect();
            http::json(
                StatusCode::OK,
                &serde_json::to_value(all).expect("overrides serialize"),
            )
        }
        (&Method::PUT, "overrides") => {
            let field = |name: &str| {
                body.get(name)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            let key = (
                field("projectId"),
                field("environmentName"),
                field("connectionName"),
            );
            let entry = inner
                .overrides
                .entry(key.clone())
                .or_insert_with(|| StoredOverride {
                    project_id: key.0.clone(),
                    environment_name: key.1.clone(),
                    connection_name: key.2.clone(),
                    auth_type: None,
                    connection_overrides: Value::Null,
                    created_by: "ui-user".into(),
                    created_date: Timestamp::now().to_string(),
                    writes: 0,
                });
            entry.auth_type = body
                .get("authType")
                .and_then(Value::as_str)
                .map(String::from);
            entry.connection_overrides = body
                .get("connectionOverrides")
                .cloned()
                .unwrap_or(Value::Null);
            entry.writes += 1;
            ok()
        }
        (&Method::DELETE, "overrides") => {
            let key = (
                req.param("projectId").unwrap_or_default(),
                req.param("environmentName").unwrap_or_default(),
                req.param("connectionName").unwrap_or_default(),
            );
            let removed = inner.overrides.remove(&key).is_some();
            http::json(StatusCode::OK, &json!({"removed": removed}))
        }
        (&Method::POST, "faults") => match serde_json::from_value::<Fault>(body) {
            Ok(fault) => {
                inner.faults.push_back(fault);
                ok()
            }
            Err(e) => bad(format!("not a fault: {e}")),
        },
        (&Method::DELETE, "faults") => {
            inner.faults.clear();
            ok()
        }
        (&Method::PATCH, "config") => {
            let mut current = serde_json::to_value(&inner.config).expect("config serializes");
            json_patch::merge(&mut current, &body);
            match serde_json::from_value::<SimConfig>(current) {
                Ok(config) => {
                    if let Some(random) = config.random_faults {
                        inner.rng = StdRng::seed_from_u64(random.seed);
                    }
                    inner.config = config;
                    ok()
                }
                Err(e) => bad(format!("not a configuration: {e}")),
            }
        }
        (&Method::GET, "config") => http::json(
            StatusCode::OK,
            &serde_json::to_value(&inner.config).expect("config serializes"),
        ),
        (&Method::POST, "clients") => {
            let id = body.get("clientId").and_then(Value::as_str);
            let secret = body.get("clientSecret").and_then(Value::as_str);
            match (id, secret) {
                (Some(id), Some(secret)) => {
                    inner.clients.insert(id.into(), secret.into());
                    ok()
                }
                _ => bad("clientId and clientSecret are required".into()),
            }
        }
        (&Method::POST, "revoke-tokens") => {
            inner.tokens.clear();
            ok()
        }
        _ => http::json(
            StatusCode::NOT_FOUND,
            &json!({"error": "no such control endpoint"}),
        ),
    };
    drop(inner);
    state.changed.notify_waiters();
    response
}
