//! Serving one request: the route, the fault plan, the token endpoint.

use super::*;

pub(super) fn problem(
    config: &SimConfig,
    status: StatusCode,
    title: &str,
    detail: &str,
    violations: &[String],
) -> Response<Body> {
    let mut body = json!({
        "type": "about:blank",
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "instance": "/dpc",
    });
    if !violations.is_empty() {
        body["violations"] = json!(violations);
    }
    http::json_typed(status, &body, &config.problem_media_type)
}

pub(super) fn classify(method: &Method, path: &str) -> SimOp {
    if path == "/oauth/dpc/token" && method == Method::POST {
        return SimOp::Token;
    }
    if overrides_project(path).is_some() {
        return match *method {
            Method::POST => SimOp::Create,
            Method::PUT => SimOp::Update,
            Method::GET => SimOp::List,
            Method::DELETE => SimOp::Delete,
            _ => SimOp::Other,
        };
    }
    if method == Method::GET && environments_project(path).is_some() {
        return SimOp::Environments;
    }
    SimOp::Other
}

/// The project id of `/dpc/v1/projects/{id}/environments`.
pub(super) fn environments_project(path: &str) -> Option<String> {
    project_path(path, "environments")
}

/// The project id of `/dpc/v1/projects/{id}/connections/environment-overrides`.
pub(super) fn overrides_project(path: &str) -> Option<String> {
    project_path(path, "connections/environment-overrides")
}

fn project_path(path: &str, expected_tail: &str) -> Option<String> {
    let rest = path.strip_prefix("/dpc/v1/projects/")?;
    let (project, tail) = rest.split_once('/')?;
    (tail == expected_tail).then(|| {
        percent_encoding::percent_decode_str(project)
            .decode_utf8_lossy()
            .into_owned()
    })
}

pub(super) enum Plan {
    Normal,
    Fault(FaultKind, String),
}

pub(super) async fn handle(state: Arc<State>, req: Req) -> Result<Response<Body>, Hangup> {
    let path = req.uri.path().to_string();
    if let Some(control) = path.strip_prefix("/_sim/") {
        return Ok(control_endpoint(&state, control, &req));
    }
    let op = classify(&req.method, &path);
    let (seq, latency, plan) = {
        let mut inner = state.inner.lock().expect("simulator lock");
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let auth = if op == SimOp::Token {
            AuthSeen::NotApplicable
        } else {
            auth_seen(&inner, &req)
        };
        let body = if op == SimOp::Token {
            Some(token_form_for_log(&inner, &req))
        } else {
            serde_json::from_slice(&req.body).ok()
        };
        let plan = pick_fault(&mut inner, op);
        let fault = match &plan {
            Plan::Fault(_, name) => Some(name.clone()),
            Plan::Normal => None,
        };
        inner.calls.push(Call {
            seq,
            at_ms: state.started.elapsed().as_millis() as u64,
            method: req.method.to_string(),
            path: path.clone(),
            query: req.query().map(String::from),
            op,
            auth,
            account_id: req.header("account-id").map(String::from),
            content_type: req.header("content-type").map(String::from),
            body,
            status: None,
            done_ms: None,
            fault,
        });
        (seq, Duration::from_millis(inner.config.latency_ms), plan)
    };
    state.changed.notify_waiters();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let result = match plan {
        Plan::Normal => Ok(respond(&state, op, &req)),
        Plan::Fault(FaultKind::Reset, _) => Err(Hangup),
        Plan::Fault(
            FaultKind::Status {
                status,
                retry_after,
                body,
            },
            _,
        ) => {
            let inner = state.inner.lock().expect("simulator lock");
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = match body {
                Some(body) => http::json_typed(status, &body, &inner.config.problem_media_type),
                None => problem(
                    &inner.config,
                    status,
                    status.canonical_reason().unwrap_or("Error"),
                    "injected by the simulator",
                    &[],
                ),
            };
            if let Some(value) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", value.parse().expect("a header value"));
            }
            Ok(response)
        }
        Plan::Fault(FaultKind::Raw { status, body }, _) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Ok(Response::builder()
                .status(status)
                .header("content-type", "application/problem+json")
                .body(http::full(body))
                .expect("a valid response"))
        }
        Plan::Fault(FaultKind::Delay { ms }, _) => {
            let response = respond(&state, op, &req);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(response)
        }
        Plan::Fault(FaultKind::Malformed, _) => {
            let response = respond(&state, op, &req);
            let status = response.status();
            Ok(Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(http::full("{\"name\": \"trunc"))
                .expect("a valid response"))
        }
    };
    {
        let mut inner = state.inner.lock().expect("simulator lock");
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        let done = state.started.elapsed().as_millis() as u64;
        if let Some(call) = inner.calls.iter_mut().rev().find(|c| c.seq == seq) {
            call.status = status;
            call.done_ms = Some(done);
        }
    }
    state.changed.notify_waiters();
    result
}

pub(super) fn auth_seen(inner: &Inner, req: &Req) -> AuthSeen {
    let Some(value) = req.header("authorization") else {
        return AuthSeen::Missing;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return AuthSeen::Missing;
    };
    match inner.tokens.get(token) {
        Some(info) if Instant::now() < info.expires_at => AuthSeen::Valid {
            client_id: info.client_id.clone(),
        },
        Some(_) => AuthSeen::Expired,
        None if token.starts_with("simtok-") => AuthSeen::Expired,
        None => AuthSeen::Unknown,
    }
}

pub(super) fn token_form_for_log(inner: &Inner, req: &Req) -> Value {
    let fields: BTreeMap<String, String> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    let mut logged = serde_json::Map::new();
    for (key, value) in &fields {
        let shown = if key == "client_secret" {
            let expected = fields.get("client_id").and_then(|id| inner.clients.get(id));
            if expected == Some(value) {
                "<matches>"
            } else {
                "<wrong>"
            }
            .to_string()
        } else {
            value.clone()
        };
        logged.insert(key.clone(), Value::String(shown));
    }
    Value::Object(logged)
}

pub(super) fn pick_fault(inner: &mut Inner, op: SimOp) -> Plan {
    if op == SimOp::Other {
        return Plan::Normal;
    }
    if let Some(index) = inner
        .faults
        .iter()
        .position(|f| f.op.is_none_or(|o| o == op))
    {
        let fault = &mut inner.faults[index];
        let kind = fault.kind.clone();
        fault.times = fault.times.saturating_sub(1);
        if fault.times == 0 {
            inner.faults.remove(index);
        }
        let name = fault_name(&kind);
        return Plan::Fault(kind, name);
    }
    if let Some(random) = inner.config.random_faults {
        let roll: f64 = inner.rng.random();
        let kind = if op == SimOp::Token {
            (roll < random.p_token_5xx).then_some(FaultKind::Status {
                status: 503,
                retry_after: None,
                body: None,
            })
        } else {
            let mut edge = random.p_5xx;
            if roll < edge {
                Some(FaultKind::Status {
                    status: 503,
                    retry_after: None,
                    body: None,
                })
            } else if roll < {
                edge += random.p_reset;
                edge
            } {
                Some(FaultKind::Reset)
            } else if roll < {
                edge += random.p_timeout;
                edge
            } {
                Some(FaultKind::Delay {
                    ms: random.timeout_ms,
                })
            } else if roll < edge + random.p_429 {
                Some(FaultKind::Status {
                    status: 429,
                    retry_after: Some("1".into()),
                    body: None,
                })
            } else {
                None
            }
        };
        if let Some(kind) = kind {
            let name = fault_name(&kind);
            return Plan::Fault(kind, name);
        }
    }
    Plan::Normal
}

pub(super) fn fault_name(kind: &FaultKind) -> String {
    match kind {
        FaultKind::Status { status, .. } => format!("status {status}"),
        FaultKind::Raw { status, .. } => format!("raw {status}"),
        FaultKind::Reset => "reset".into(),
        FaultKind::Delay { ms } => format!("delay {ms}ms"),
        FaultKind::Malformed => "malformed".into(),
    }
}

pub(super) fn respond(state: &State, op: SimOp, req: &Req) -> Response<Body> {
    let mut inner = state.inner.lock().expect("simulator lock");
    let now = Instant::now();
    // The rate limit counts every call of a client, token calls included.
    let client = match op {
        SimOp::Token => url::form_urlencoded::parse(&req.body)
            .find(|(k, _)| k == "client_id")
            .map(|(_, v)| v.into_owned()),
        _ => match auth_seen(&inner, req) {
            AuthSeen::Valid { client_id } => Some(client_id),
            _ => None,
        },
    };
    if let (Some(limit), Some(client)) = (inner.config.rate_limit, client.clone()) {
        let window = Duration::from_millis(limit.window_ms);
        let entry = inner.windows.entry(client).or_insert((now, 0));
        if now.duration_since(entry.0) >= window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if entry.1 > limit.limit {
            let left = window.saturating_sub(now.duration_since(entry.0));
            let secs = limit
                .retry_after_secs
                .unwrap_or_else(|| left.as_secs_f64().ceil().max(1.0) as u64);
            let mut response = problem(
                &inner.config,
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                "rate limit exceeded",
                &[],
            );
            response.headers_mut().insert(
                "retry-after",
                secs.to_string().parse().expect("a header value"),
            );
            return response;
        }
    }
    match op {
        SimOp::Token => token(&mut inner, req),
        SimOp::Other => problem(
            &inner.config,
            StatusCode::NOT_FOUND,
            "Not Found",
            "no such endpoint",
            &[],
        ),
        _ => {
            match auth_seen(&inner, req) {
                AuthSeen::Valid { .. } => {}
                _ => {
                    return problem(
                        &inner.config,
                        StatusCode::UNAUTHORIZED,
                        "Unauthorized",
                        "a valid bearer token is required",
                        &[],
                    );
                }
            }
            if op == SimOp::Environments {
                let project = environments_project(req.uri.path()).expect("classified");
                return environments(&inner, &project, req);
            }
            let project =
                overrides_project(req.uri.path()).expect("classified as an override call");
            match op {
                SimOp::Create | SimOp::Update => write(&mut inner, op, &project, req),
                SimOp::List => list(&inner, &project, req),
                SimOp::Delete => delete(&mut inner, &project, req),
                _ => unreachable!("handled above"),
            }
        }
    }
}

pub(super) fn token(inner: &mut Inner, req: &Req) -> Response<Body> {
    let fields: HashMap<String, String> = url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect();
    let oauth_error = |status: StatusCode, error: &str, description: &str| {
        http::json(
            status,
            &json!({"error": error, "error_description": description}),
        )
    };
    if fields.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be client_credentials",
        );
    }
    let (Some(id), Some(secret)) = (fields.get("client_id"), fields.get("client_secret")) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "client_id and client_secret are required",
        );
    };
    if inner.clients.get(id) != Some(secret) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "Unauthorized");
    }
    let token: String = format!("simtok-{:032x}", inner.rng.random::<u128>());
    inner.issued.push(token.clone());
    let lifetime = inner.config.token_lifetime_secs;
    inner.tokens.insert(
        token.clone(),
        TokenInfo {
            client_id: id.clone(),
            expires_at: Instant::now() + Duration::from_secs(lifetime),
        },
    );
    let announced = inner
        .config
        .announced_expires_in
        .clone()
        .unwrap_or_else(|| json!(lifetime));
    http::json(
        StatusCode::OK,
        &json!({"access_token": token, "token_type": "Bearer", "expires_in": announced, "scope": "pipeline-execution"}),
    )
}
