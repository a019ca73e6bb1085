//! The override endpoints: create and update, list in every shape, delete.

use super::*;

pub(super) fn parent_of(
    inner: &Inner,
    project: &str,
    environment: &str,
    connection: &str,
) -> Result<ParentConnection, (String, String)> {
    if !inner.config.require_known_parents {
        return Ok(inner
            .connections
            .get(&(project.into(), connection.into()))
            .cloned()
            .unwrap_or_default());
    }
    if !inner.environments.iter().any(|(p, _)| p == project) {
        return Err(("Not Found".into(), format!("Project {project} not found")));
    }
    if !inner
        .environments
        .contains(&(project.into(), environment.into()))
    {
        return Err((
            "Not Found".into(),
            format!("Environment {environment} not found"),
        ));
    }
    inner
        .connections
        .get(&(project.into(), connection.into()))
        .cloned()
        .ok_or_else(|| {
            (
                "Not Found".into(),
                format!("Connection {connection} not found"),
            )
        })
}

pub(super) fn validate_body(body: &Value, parent: &ParentConnection) -> Vec<String> {
    let mut violations = Vec::new();
    let text = |v: &Value, name: &str, violations: &mut Vec<String>| match v.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => {}
        _ => violations.push(format!("{name} must not be blank")),
    };
    text(body, "environmentName", &mut violations);
    text(body, "connectionName", &mut violations);
    const AUTH_TYPES: [&str; 7] = [
        "GENERIC_SECRET",
        "CLOUD_PROVIDER_SECRET",
        "OAUTH_USER_TOKENS",
        "OAUTH_AUTHORIZATION_CODE",
        "OAUTH_CLIENT_CRED",
        "COMPOSITE_TOKEN",
        "OAUTH_1_0_X_ADS",
    ];
    match body.get("authType") {
        None | Some(Value::Null) => {}
        Some(Value::String(a)) if !AUTH_TYPES.contains(&a.as_str()) => {
            violations.push(format!("authType {a} is not a known auth type"));
        }
        Some(Value::String(a)) if *a != parent.auth_type => violations.push(format!(
            "authType {a} does not match the connection's authType {}",
            parent.auth_type
        )),
        Some(Value::String(_)) => {}
        Some(_) => violations.push("authType must be a string".into()),
    }
    let Some(overrides) = body.get("connectionOverrides").and_then(Value::as_object) else {
        violations.push("connectionOverrides is required".into());
        return violations;
    };
    match overrides
        .get("connectionProperties")
        .and_then(Value::as_object)
    {
        None => violations.push("connectionOverrides.connectionProperties is required".into()),
        Some(props) => {
            if props.values().any(|v| !v.is_string()) {
                violations
                    .push("connectionOverrides.connectionProperties values must be strings".into());
            }
            let required = match parent.platform_connection_type.as_str() {
                "CLOUD_PLATFORM_CREDENTIALS" => "credentialSecretName",
                _ => "secretName",
            };
            if !props.contains_key(required) {
                violations.push(format!(
                    "connectionOverrides.connectionProperties.{required} is required"
                ));
            }
        }
    }
    match overrides.get("secretsLocation") {
        None | Some(Value::Null) => {}
        Some(Value::Object(location)) if location.get("type").is_some_and(Value::is_string) => {}
        Some(_) => violations.push("connectionOverrides.secretsLocation.type is required".into()),
    }
    violations
}

pub(super) fn override_json(stored: &StoredOverride, parent: &ParentConnection) -> Value {
    json!({
        "name": stored.connection_name,
        "platformConnectionType": parent.platform_connection_type,
        "authProvider": parent.auth_provider,
        "authType": stored.auth_type.clone().unwrap_or_else(|| parent.auth_type.clone()),
        "createdBy": stored.created_by,
        "createdDate": stored.created_date,
        "projectId": stored.project_id,
        "connectionOverrides": stored.connection_overrides,
    })
}

pub(super) fn write(inner: &mut Inner, op: SimOp, project: &str, req: &Req) -> Response<Body> {
    let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
        return problem(
            &inner.config,
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "the body is not JSON",
            &[],
        );
    };
    let environment = body
        .get("environmentName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let connection = body
        .get("connectionName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let parent = match parent_of(inner, project, &environment, &connection) {
        Ok(parent) => parent,
        Err((title, detail)) => {
            return problem(&inner.config, StatusCode::NOT_FOUND, &title, &detail, &[]);
        }
    };
    let violations = validate_body(&body, &parent);
    if !violations.is_empty() {
        return problem(
            &inner.config,
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "Invalid environment connection override",
            &violations,
        );
    }
    let key = (project.to_string(), environment.clone(), connection.clone());
    let exists = inner.overrides.contains_key(&key);
    let status = match (op, exists, inner.config.post_upserts) {
        (SimOp::Create, true, false) => {
            return problem(
                &inner.config,
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "An override for connection {connection} already exists in environment {environment}"
                ),
                &[],
            );
        }
        (SimOp::Update, false, _) => {
            return problem(
                &inner.config,
                StatusCode::NOT_FOUND,
                "Not Found",
                &format!("No override for connection {connection} in environment {environment}"),
                &[],
            );
        }
        (SimOp::Create, _, _) => inner.config.create_status,
        _ => inner.config.update_status,
    };
    let auth_type = body
        .get("authType")
        .and_then(Value::as_str)
        .map(String::from);
    let overrides = body
        .get("connectionOverrides")
        .cloned()
        .unwrap_or(Value::Null);
    let created_by = match auth_seen(inner, req) {
        AuthSeen::Valid { client_id } => client_id,
        _ => "unknown".into(),
    };
    let stored = inner
        .overrides
        .entry(key)
        .or_insert_with(|| StoredOverride {
            project_id: project.into(),
            environment_name: environment.clone(),
            connection_name: connection.clone(),
            auth_type: None,
            connection_overrides: Value::Null,
            created_by,
            created_date: Timestamp::now().to_string(),
            writes: 0,
        });
    stored.auth_type = auth_type;
    stored.connection_overrides = overrides;
    stored.writes += 1;
    let answer = override_json(stored, &parent);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if status == StatusCode::NO_CONTENT {
        return Response::builder()
            .status(status)
            .body(http::full(""))
            .expect("a valid response");
    }
    http::json(status, &answer)
}

pub(super) fn list(inner: &Inner, project: &str, req: &Req) -> Response<Body> {
    let Some(environment) = req.param("environmentName").filter(|e| !e.is_empty()) else {
        return problem(
            &inner.config,
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "environmentName is required",
            &["environmentName must not be blank".into()],
        );
    };
    if inner.config.require_known_parents
        && !inner
            .environments
            .contains(&(project.into(), environment.clone()))
    {
        return problem(
            &inner.config,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("Environment {environment} not found"),
            &[],
        );
    }
    let items: Vec<Value> = inner
        .overrides
        .values()
        .filter(|o| o.project_id == project && o.environment_name == environment)
        .map(|o| {
            let parent = inner
                .connections
                .get(&(project.into(), o.connection_name.clone()))
                .cloned()
                .unwrap_or_default();
            override_json(o, &parent)
        })
        .collect();
    let body = match inner.config.list_shape {
        ListShape::Array => Value::Array(items),
        ListShape::Single if items.len() == 1 => items.into_iter().next().expect("one item"),
        ListShape::Single => Value::Array(items),
        ListShape::Envelope => envelope(inner, items, req),
    };
    http::json(StatusCode::OK, &body)
}

/// `GET /v1/projects/{projectId}/environments`: the environments registered for the project
/// and those its overrides name, in the documented envelope, paged. A project with neither
/// does not exist (every DPC project has an environment): 404.
pub(super) fn environments(inner: &Inner, project: &str, req: &Req) -> Response<Body> {
    let names: std::collections::BTreeSet<&str> = inner
        .environments
        .iter()
        .filter(|(p, _)| p == project)
        .map(|(_, e)| e.as_str())
        .chain(
            inner
                .overrides
                .values()
                .filter(|o| o.project_id == project)
                .map(|o| o.environment_name.as_str()),
        )
        .collect();
    if names.is_empty() {
        return problem(
            &inner.config,
            StatusCode::NOT_FOUND,
            "Not Found",
            &format!("Project {project} not found"),
            &[],
        );
    }
    let items: Vec<Value> = names
        .into_iter()
        .map(|name| json!({"name": name, "defaultAgentId": "9a3c5f0e-1b2d-4c6e-8f70-0a1b2c3d4e5f", "defaultAgentName": "Sim Agent"}))
        .collect();
    http::json(StatusCode::OK, &envelope(inner, items, req))
}

/// One page of `items` in the documented `{page, size, total, results}` envelope.
fn envelope(inner: &Inner, items: Vec<Value>, req: &Req) -> Value {
    let size = req
        .param("size")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(inner.config.page_size)
        .clamp(1, inner.config.max_page_size.max(1));
    let page = req
        .param("page")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0);
    let total = items.len();
    let results: Vec<Value> = items.into_iter().skip(page * size).take(size).collect();
    json!({"page": page, "size": size, "total": total, "results": results})
}

pub(super) fn delete(inner: &mut Inner, project: &str, req: &Req) -> Response<Body> {
    let Some(environment) = req.param("environmentName").filter(|e| !e.is_empty()) else {
        return problem(
            &inner.config,
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "environmentName is required",
            &[],
        );
    };
    // connectionNames is a comma-separated list. Like the common web frameworks, the query
    // value is decoded first and split afterwards, so even an encoded comma (%2C) separates
    // names: the worst case a client must be safe against.
    let decoded = req.param("connectionNames").unwrap_or_default();
    let names: Vec<String> = decoded
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if names.is_empty() {
        return problem(
            &inner.config,
            StatusCode::BAD_REQUEST,
            "Bad Request",
            "connectionNames is required",
            &[],
        );
    }
    let mut removed = 0;
    for name in &names {
        if inner
            .overrides
            .remove(&(project.to_string(), environment.clone(), name.clone()))
            .is_some()
        {
            removed += 1;
        }
    }
    if removed == 0 {
        let status = StatusCode::from_u16(inner.config.delete_missing_status)
            .unwrap_or(StatusCode::NOT_FOUND);
        if !status.is_success() {
            return problem(
                &inner.config,
                status,
                "Not Found",
                "No override found for the given connection names",
                &[],
            );
        }
    }
    let status = StatusCode::from_u16(inner.config.delete_status).unwrap_or(StatusCode::NO_CONTENT);
    if status == StatusCode::NO_CONTENT {
        Response::builder()
            .status(status)
            .body(http::full(""))
            .expect("a valid response")
    } else {
        http::json(
            status,
            &json!({"message": "Environment connection overrides successfully deleted"}),
        )
    }
}
