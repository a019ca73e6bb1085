//! Reading a request: its target resource, options, body, and what answer shape it asks for.

use super::admission::FieldValidation;
use super::*;

pub(super) fn status_response(error: &ApiError) -> Response<Body> {
    http::json(status_code(error), &error.to_status())
}

pub(super) fn status_code(error: &ApiError) -> StatusCode {
    StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An answer in protobuf when the client asks for it first and the kind has a protobuf form,
/// in JSON otherwise.
pub(super) fn answer(req: &Req, code: StatusCode, value: &Value) -> Response<Body> {
    if protobuf::preferred(req.header("accept"))
        && let Some(bytes) = protobuf::encode(value)
    {
        return Response::builder()
            .status(code)
            .header("content-type", protobuf::MEDIA_TYPE)
            .body(http::full(bytes))
            .expect("a valid response");
    }
    http::json(code, value)
}

pub(super) fn not_found_path() -> Response<Body> {
    status_response(&ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    ))
}

/// What a resource path names.
pub(super) struct Target {
    pub(super) rt: Arc<ResourceType>,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
}

pub(super) fn parse_target(store: &Store, path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let resolve = |plural: &str| store.resolve(group, version, plural);
    let target = |rt, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Some(Target {
            rt,
            namespace: ns.map(decode),
            name: name.map(decode),
            subresource: sub.map(String::from),
        })
    };
    match rest {
        [plural] => target(resolve(plural)?, None, None, None),
        ["namespaces", ns, plural]
            if group.is_empty() && (*plural == "status" || *plural == "finalize") =>
        {
            target(resolve("namespaces")?, None, Some(ns), Some(plural))
        }
        ["namespaces", ns, plural] => {
            let rt = resolve(plural)?;
            rt.namespaced.then_some(())?;
            target(rt, Some(ns), None, None)
        }
        ["namespaces", ns, plural, name] => {
            let rt = resolve(plural)?;
            rt.namespaced.then_some(())?;
            target(rt, Some(ns), Some(name), None)
        }
        ["namespaces", ns, plural, name, sub] => {
            let rt = resolve(plural)?;
            rt.namespaced.then_some(())?;
            target(rt, Some(ns), Some(name), Some(sub))
        }
        [plural, name] => {
            let rt = resolve(plural)?;
            (!rt.namespaced).then_some(())?;
            target(rt, None, Some(name), None)
        }
        [plural, name, sub] => {
            let rt = resolve(plural)?;
            (!rt.namespaced).then_some(())?;
            target(rt, None, Some(name), Some(sub))
        }
        _ => None,
    }
}

pub(super) fn count(state: &State, verb: &str, target: &Target) {
    let resource = match &target.subresource {
        Some(sub) => format!("{}/{}", target.rt.plural, sub),
        None => target.rt.plural.clone(),
    };
    *state
        .requests
        .lock()
        .expect("requests lock")
        .entry(format!("{verb} {resource}"))
        .or_default() += 1;
    state.served.notify_waiters();
}

pub(super) fn write_options(req: &Req) -> Result<WriteOptions, ApiError> {
    let applying = req
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/apply-patch"));
    let options_kind = match req.method {
        Method::POST => "CreateOptions",
        Method::PUT => "UpdateOptions",
        Method::DELETE => "DeleteOptions",
        _ => "PatchOptions",
    };
    let invalid_options = |field: &str, reason: &'static str, detail: String| {
        let mut error = ApiError::new(
            422,
            "Invalid",
            format!("{options_kind}.meta.k8s.io \"\" is invalid: {field}: {detail}"),
        );
        error.details = Some(json!({"group": "meta.k8s.io", "kind": options_kind,
            "causes": [{"reason": reason, "message": detail, "field": field}]}));
        error
    };
    let named = req.param("fieldManager").filter(|m| !m.is_empty());
    if applying && named.is_none() && req.method == Method::PATCH {
        return Err(invalid_options(
            "fieldManager",
            "FieldValueRequired",
            "Required value: is required for apply patch".into(),
        ));
    }
    // As the API server: the user agent up to its first `/` names an unnamed manager.
    let manager = named.unwrap_or_else(|| {
        let agent = req.header("user-agent").unwrap_or_default();
        let prefix: String = agent
            .split('/')
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect();
        if prefix.is_empty() {
            "unknown".into()
        } else {
            prefix
        }
    });
    let validation = req.param("fieldValidation");
    let field_validation = FieldValidation::parse(validation.as_deref()).ok_or_else(|| {
        invalid_options(
            "fieldValidation",
            "FieldValueNotSupported",
            format!(
                "Unsupported value: {:?}: supported values: \"\", \"Ignore\", \"Strict\", \"Warn\"",
                validation.unwrap_or_default()
            ),
        )
    })?;
    Ok(WriteOptions {
        dry_run: req.param("dryRun").is_some_and(|d| d == "All"),
        field_manager: Some(manager),
        force: req.param("force").is_some_and(|f| f == "true"),
        field_validation,
    })
}

pub(super) fn parse_body(req: &Req) -> Result<Value, ApiError> {
    let content_type = req.header("content-type").unwrap_or_default();
    if content_type.starts_with(protobuf::MEDIA_TYPE) {
        return protobuf::decode(&req.body).map_err(|e| {
            ApiError::bad_request(format!("the protobuf body could not be decoded: {e}"))
        });
    }
    if content_type.contains("protobuf") || content_type.contains("cbor") {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf",
        ));
    }
    if let Ok(value) = serde_json::from_slice::<Value>(&req.body) {
        return Ok(value);
    }
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::bad_request(format!("the body is neither JSON nor YAML: {e}")))
}

/// Whether the client asked for metadata only (`as=PartialObjectMetadata[List]`).
pub(super) fn wants_metadata(req: &Req) -> bool {
    req.header("accept")
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

pub(super) fn partial(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object.get("metadata").cloned().unwrap_or(json!({}))
    })
}

pub(super) fn wants_table(req: &Req) -> bool {
    req.header("accept").is_some_and(|a| a.contains("as=Table"))
}

pub(super) fn encode_continue(position: &(String, String)) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&json!([position.0, position.1])).expect("serializes"))
}

pub(super) fn decode_continue(token: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let pair: (String, String) = serde_json::from_slice(&bytes).ok()?;
    Some(pair)
}

pub(super) fn check_subresource(rt: &ResourceType, sub: Option<&str>) -> Result<(), ApiError> {
    match sub {
        None => Ok(()),
        Some("status") if rt.status_subresource => Ok(()),
        Some(_) => Err(ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
    }
}

/// The answer to `serviceaccounts/{name}/token`: the emulator authenticates nobody, so the
/// token is an opaque random string with the lifetime asked for (an hour by default).
pub(super) fn token_request(request: &Value, name: &str, ns: Option<&str>) -> Value {
    let seconds = request
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    let audiences = request
        .pointer("/spec/audiences")
        .filter(|a| a.as_array().is_some_and(|a| !a.is_empty()))
        .cloned()
        .unwrap_or(json!(["https://kubernetes.default.svc.cluster.local"]));
    let expires =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(seconds);
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"audiences": audiences, "expirationSeconds": seconds},
        "status": {
            "token": format!("emulator.{token}"),
            "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
        }
    })
}

/// The `Status` of an object deleted at once.
pub(super) fn deleted_status(rt: &ResourceType, name: &str, object: &Value) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {
            "name": name,
            "group": rt.group,
            "kind": rt.plural,
            "uid": object.pointer("/metadata/uid").cloned().unwrap_or(Value::Null)
        }
    })
}

/// Runs a write under the store lock and answers with the object written and, as `Warning`
/// headers, what admission dropped.
pub(super) fn written(
    state: &State,
    req: &Req,
    write: impl FnOnce(&mut Store) -> Result<(StatusCode, Value), ApiError>,
) -> Result<Response<Body>, ApiError> {
    let mut store = state.store.lock().expect("store lock");
    let result = write(&mut store);
    let warnings = store.take_warnings();
    drop(store);
    let (code, object) = result?;
    let mut response = answer(req, code, &object);
    for warning in warnings {
        let quoted = serde_json::to_string(&warning).expect("a string serializes");
        if let Ok(value) = hyper::header::HeaderValue::from_str(&format!("299 - {quoted}")) {
            response.headers_mut().append("warning", value);
        }
    }
    Ok(response)
}

/// `/openapi/v2`, in protobuf when asked (kubectl always asks), else JSON.
pub(super) fn openapi_v2(req: &Req, types: &[Arc<ResourceType>]) -> Response<Body> {
    let document = discovery::openapi_v2(types);
    if req.header("accept").is_some_and(|a| a.contains("protobuf")) {
        return Response::builder()
            .status(StatusCode::OK)
            .header("content-type", openapi_pb::MEDIA_TYPE)
            .body(http::full(openapi_pb::encode(&document)))
            .expect("a valid response");
    }
    http::json(StatusCode::OK, &document)
}
