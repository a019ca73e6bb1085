//! A Kubernetes API emulator that speaks real HTTP on loopback, enough for kube-rs clients
//! and kubectl: discovery and OpenAPI, core namespaces, secrets, configmaps and events,
//! `events.k8s.io` events, leases, and CustomResourceDefinitions whose creation starts serving
//! the custom resource (with status subresource and printer columns).
//!
//! Knowingly not implemented: authentication and RBAC, admission (webhooks, CEL and schema
//! validation, defaulting, pruning), garbage collection by ownerReferences, conversion
//! between versions, strategic-merge list semantics (strategic patches merge like JSON merge
//! patches), server-side apply conflicts (every apply takes ownership), a consistent snapshot
//! across list pages, Table output on watches, and protobuf.

pub mod discovery;
pub mod selectors;
pub mod ssa;
pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::SinkExt;
use futures::channel::mpsc;
use hyper::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use dpc_http::{self as http, Body, Drop, Req, Server};
use selectors::{FieldSelector, LabelSelector};
use store::{ApiError, Change, ChangeKind, PatchKind, ResourceType, Store, WriteOptions};

/// Settings of an emulator.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// How many changes are kept for watches to resume from; older resourceVersions get
    /// `410 Gone`.
    pub history_limit: usize,
    /// Interval of BOOKMARK events on watches that allow them.
    pub bookmark_interval: Duration,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            history_limit: 20_000,
            bookmark_interval: Duration::from_secs(15),
        }
    }
}

struct State {
    store: Mutex<Store>,
    config: EmulatorConfig,
    /// Bumped to end every open watch.
    watch_epoch: watch::Sender<u64>,
    /// Requests served, by `verb resource`.
    requests: Mutex<BTreeMap<String, u64>>,
    /// Notified on every request.
    served: tokio::sync::Notify,
    /// Resources (plural names) whose list answers are held back until released.
    held: Mutex<std::collections::HashSet<String>>,
    released: tokio::sync::Notify,
}

/// A running emulator.
pub struct KubeEmulator {
    state: Arc<State>,
    server: Server,
}

impl KubeEmulator {
    /// Starts an emulator on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            EmulatorConfig::default(),
        )
        .await
    }

    /// Starts an emulator on `addr` with `config`.
    pub async fn start_with(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<Self> {
        let (watch_epoch, _) = watch::channel(0);
        let state = Arc::new(State {
            store: Mutex::new(Store::new(config.history_limit)),
            config,
            watch_epoch,
            requests: Mutex::new(BTreeMap::new()),
            served: tokio::sync::Notify::new(),
            held: Mutex::new(std::collections::HashSet::new()),
            released: tokio::sync::Notify::new(),
        });
        let handler_state = state.clone();
        let server = http::bind_and_serve(addr, move |req| {
            let state = handler_state.clone();
            async move { Ok::<_, Drop>(handle(state, req).await) }
        })
        .await?;
        Ok(Self { state, server })
    }

    /// Stops serving.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// A kubeconfig that points kubectl or kube-rs at this emulator.
    pub fn kubeconfig(&self) -> String {
        kubeconfig_for(&self.url())
    }

    /// A kube client for this emulator.
    pub fn client(&self) -> kube::Client {
        crate::install_crypto_provider();
        let config = kube::Config::new(self.url().parse().expect("a valid URL"));
        kube::Client::try_from(config).expect("a client for the emulator")
    }

    /// Creates the operator's CustomResourceDefinitions, as `kubectl apply -f crds/` would.
    pub async fn install_crds(&self) -> Result<(), kube::Error> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(self.client());
        for crd in dpc_operator_api::crds() {
            crds.create(&Default::default(), &crd).await?;
        }
        Ok(())
    }

    /// Creates namespace `name`.
    pub async fn create_namespace(&self, name: &str) -> Result<(), kube::Error> {
        use k8s_openapi::api::core::v1::Namespace;
        let namespaces: kube::Api<Namespace> = kube::Api::all(self.client());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.into());
        namespaces.create(&Default::default(), &ns).await?;
        Ok(())
    }

    /// Forgets the change history: watches that resume from before now get `410 Gone`.
    pub fn compact(&self) {
        self.state.store.lock().expect("store lock").compact();
    }

    /// Holds back the answers to lists of `plural` (a slow API server) until [`release`].
    ///
    /// [`release`]: KubeEmulator::release
    pub fn hold_lists(&self, plural: &str) {
        self.state
            .held
            .lock()
            .expect("held lock")
            .insert(plural.into());
    }

    /// Answers the held lists of `plural`.
    pub fn release(&self, plural: &str) {
        self.state.held.lock().expect("held lock").remove(plural);
        self.state.released.notify_waiters();
    }

    /// Ends every open watch, as an API server restart or a load balancer would.
    pub fn drop_watches(&self) {
        self.state.watch_epoch.send_modify(|e| *e += 1);
    }

    /// The number of requests served so far, by `verb resource` (for example
    /// `patch connectionoverrides/status`).
    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.state.requests.lock().expect("requests lock").clone()
    }

    /// Waits until `done` holds for the request counts (checked after every request), or
    /// fails after `timeout` with the counts seen.
    pub async fn wait_for_requests(
        &self,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> Result<BTreeMap<String, u64>, BTreeMap<String, u64>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.served.notified();
            let counts = self.request_counts();
            if done(&counts) {
                return Ok(counts);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.request_counts());
            }
        }
    }

    /// How many stored objects of `(group, plural)` satisfy `pred`, without copying them.
    pub fn count_where(&self, group: &str, plural: &str, pred: impl Fn(&Value) -> bool) -> usize {
        self.state
            .store
            .lock()
            .expect("store lock")
            .count_where(group, plural, pred)
    }

    /// The objects of `(group, plural)` satisfying `pred` now, and every change after that
    /// (see [`store::Store::select_and_follow`]).
    pub fn select_and_follow(
        &self,
        group: &str,
        plural: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (
        std::collections::HashSet<(String, String)>,
        broadcast::Receiver<Arc<store::Change>>,
    ) {
        self.state
            .store
            .lock()
            .expect("store lock")
            .select_and_follow(group, plural, pred)
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state
            .store
            .lock()
            .expect("store lock")
            .resource_version()
    }
}

/// A kubeconfig with one cluster, one user without credentials and one context.
pub fn kubeconfig_for(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {url}\nusers:\n- name: emulator\n  user: {{}}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: emulator\n    namespace: default\ncurrent-context: emulator\n"
    )
}

fn status_response(error: &ApiError) -> Response<Body> {
    http::json(
        StatusCode::from_u16(error.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &error.to_status(),
    )
}

fn not_found_path() -> Response<Body> {
    status_response(&ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    ))
}

/// What a resource path names.
struct Target {
    rt: Arc<ResourceType>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(store: &Store, path: &str) -> Option<Target> {
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

fn count(state: &State, verb: &str, target: &Target) {
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

async fn handle(state: Arc<State>, req: Req) -> Response<Body> {
    let path = req.uri.path().to_string();
    let host = req.header("host").unwrap_or("127.0.0.1").to_string();
    let types = state.store.lock().expect("store lock").served_types();
    match (req.method.clone(), path.as_str()) {
        (Method::GET, "/version") => return http::json(StatusCode::OK, &discovery::version()),
        (Method::GET, "/healthz" | "/livez" | "/readyz") => {
            return http::text(StatusCode::OK, "ok");
        }
        (Method::GET, "/api") => {
            return http::json(StatusCode::OK, &discovery::core_versions(&host));
        }
        (Method::GET, "/api/v1") => {
            let core: Vec<_> = types
                .iter()
                .filter(|t| t.group.is_empty())
                .cloned()
                .collect();
            return http::json(StatusCode::OK, &discovery::resource_list("v1", &core));
        }
        (Method::GET, "/apis") => {
            return http::json(StatusCode::OK, &discovery::group_list(&types));
        }
        (Method::GET, "/openapi/v2") => {
            return http::json(StatusCode::OK, &discovery::openapi_v2(&types));
        }
        (Method::GET, "/openapi/v3") => {
            return http::json(StatusCode::OK, &discovery::openapi_v3_index(&types));
        }
        (Method::POST, "/_emu/compact") => {
            state.store.lock().expect("store lock").compact();
            return http::json(StatusCode::OK, &json!({"ok": true}));
        }
        (Method::POST, "/_emu/drop-watches") => {
            state.watch_epoch.send_modify(|e| *e += 1);
            return http::json(StatusCode::OK, &json!({"ok": true}));
        }
        (Method::GET, "/_emu/requests") => {
            let counts = state.requests.lock().expect("requests lock").clone();
            return http::json(StatusCode::OK, &json!(counts));
        }
        _ => {}
    }
    if req.method == Method::GET {
        if let Some(gv) = path.strip_prefix("/openapi/v3/") {
            return match discovery::openapi_v3_document(&types, gv) {
                Some(doc) => http::json(StatusCode::OK, &doc),
                None => not_found_path(),
            };
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            ["apis", group] => {
                return match discovery::group(&types, group) {
                    Some(doc) => http::json(StatusCode::OK, &doc),
                    None => not_found_path(),
                };
            }
            ["apis", group, version] => {
                let members: Vec<_> = types
                    .iter()
                    .filter(|t| t.group == *group && t.version == *version)
                    .cloned()
                    .collect();
                if members.is_empty() {
                    return not_found_path();
                }
                return http::json(
                    StatusCode::OK,
                    &discovery::resource_list(&format!("{group}/{version}"), &members),
                );
            }
            _ => {}
        }
    }
    let target = {
        let store = state.store.lock().expect("store lock");
        parse_target(&store, &path)
    };
    let Some(target) = target else {
        return not_found_path();
    };
    resource(state, req, target).await
}

fn write_options(req: &Req) -> WriteOptions {
    let manager = req
        .param("fieldManager")
        .filter(|m| !m.is_empty())
        .or_else(|| {
            req.header("user-agent")
                .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
                .filter(|m| !m.is_empty())
        });
    WriteOptions {
        dry_run: req.param("dryRun").is_some_and(|d| d == "All"),
        field_manager: manager,
        force: req.param("force").is_some_and(|f| f == "true"),
    }
}

fn parse_body(req: &Req) -> Result<Value, ApiError> {
    if req
        .header("content-type")
        .is_some_and(|c| c.contains("protobuf") || c.contains("cbor"))
    {
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
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
fn wants_metadata(req: &Req) -> bool {
    req.header("accept")
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
}

fn partial(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object.get("metadata").cloned().unwrap_or(json!({}))
    })
}

fn wants_table(req: &Req) -> bool {
    req.header("accept").is_some_and(|a| a.contains("as=Table"))
}

fn encode_continue(position: &(String, String)) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&json!([position.0, position.1])).expect("serializes"))
}

fn decode_continue(token: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(token)
        .ok()?;
    let pair: (String, String) = serde_json::from_slice(&bytes).ok()?;
    Some(pair)
}

async fn resource(state: Arc<State>, req: Req, target: Target) -> Response<Body> {
    let is_list = req.method == Method::GET
        && target.name.is_none()
        && !req.param("watch").is_some_and(|w| w == "true" || w == "1");
    if is_list {
        loop {
            let released = state.released.notified();
            if !state
                .held
                .lock()
                .expect("held lock")
                .contains(&target.rt.plural)
            {
                break;
            }
            released.await;
        }
    }
    let rt = target.rt.clone();
    let ns = target.namespace.as_deref();
    let options = write_options(&req);
    let result: Result<Response<Body>, ApiError> = (|| match (
        &req.method,
        &target.name,
        target.subresource.as_deref(),
    ) {
        (&Method::GET, None, None) => {
            let labels = LabelSelector::parse(&req.param("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(&req.param("fieldSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            if req.param("watch").is_some_and(|w| w == "true" || w == "1") {
                count(&state, "watch", &target);
                return Ok(start_watch(
                    state.clone(),
                    &req,
                    rt.clone(),
                    target.namespace.clone(),
                    labels,
                    fields,
                ));
            }
            count(&state, "list", &target);
            let limit = req
                .param("limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0);
            let after = match req.param("continue").filter(|c| !c.is_empty()) {
                Some(token) => Some(
                    decode_continue(&token)
                        .ok_or_else(|| ApiError::bad_request("invalid continue token"))?,
                ),
                None => None,
            };
            let store = state.store.lock().expect("store lock");
            let (mut items, next) = store.list(&rt, ns, &labels, &fields, limit, after);
            if rt.group.is_empty() && rt.plural == "events" {
                items.extend(mirrored_events(&store, ns, &labels, &fields));
            }
            let rv = store.resource_version();
            drop(store);
            let token = next.as_ref().map(encode_continue);
            if wants_table(&req) {
                let include = req
                    .param("includeObject")
                    .unwrap_or_else(|| "Metadata".into());
                return Ok(http::json(
                    StatusCode::OK,
                    &discovery::table(&rt, &items, &include, rv, token.as_deref()),
                ));
            }
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if let Some(token) = token {
                metadata["continue"] = json!(token);
            }
            if wants_metadata(&req) {
                let items: Vec<Value> = items.iter().map(partial).collect();
                return Ok(http::json(
                    StatusCode::OK,
                    &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "items": items}),
                ));
            }
            Ok(http::json(
                StatusCode::OK,
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": metadata, "items": items}),
            ))
        }
        (&Method::POST, None, None) => {
            count(&state, "create", &target);
            let body = parse_body(&req)?;
            let created = state
                .store
                .lock()
                .expect("store lock")
                .create(&rt, ns, body, &options)?;
            Ok(http::json(StatusCode::CREATED, &created))
        }
        (&Method::DELETE, None, None) => {
            count(&state, "deletecollection", &target);
            let labels = LabelSelector::parse(&req.param("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(&req.param("fieldSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            let mut store = state.store.lock().expect("store lock");
            let (items, _) = store.list(&rt, ns, &labels, &fields, None, None);
            let mut deleted = Vec::new();
            for item in items {
                let name = item
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let item_ns = item
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .map(String::from);
                if let Ok(object) = store.delete(&rt, item_ns.as_deref(), &name, None, &options) {
                    deleted.push(object);
                }
            }
            let rv = store.resource_version();
            Ok(http::json(
                StatusCode::OK,
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
            ))
        }
        (&Method::GET, Some(name), sub) => {
            count(&state, "get", &target);
            if sub.is_some_and(|s| s != "status") {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ));
            }
            let object = state.store.lock().expect("store lock").get(&rt, ns, name)?;
            if wants_table(&req) && sub.is_none() {
                let rv = state.store.lock().expect("store lock").resource_version();
                let include = req
                    .param("includeObject")
                    .unwrap_or_else(|| "Metadata".into());
                return Ok(http::json(
                    StatusCode::OK,
                    &discovery::table(&rt, &[object], &include, rv, None),
                ));
            }
            if wants_metadata(&req) {
                return Ok(http::json(StatusCode::OK, &partial(&object)));
            }
            Ok(http::json(StatusCode::OK, &object))
        }
        (&Method::PUT, Some(name), sub) => {
            count(&state, "update", &target);
            check_subresource(&rt, sub)?;
            let body = parse_body(&req)?;
            let updated = state
                .store
                .lock()
                .expect("store lock")
                .update(&rt, ns, name, body, sub, &options)?;
            Ok(http::json(StatusCode::OK, &updated))
        }
        (&Method::PATCH, Some(name), sub) => {
            count(&state, "patch", &target);
            check_subresource(&rt, sub)?;
            let content_type = req.header("content-type").unwrap_or("");
            let kind = if content_type.starts_with("application/apply-patch") {
                PatchKind::Apply
            } else if content_type.starts_with("application/json-patch+json") {
                PatchKind::Json
            } else if content_type.starts_with("application/strategic-merge-patch+json") {
                PatchKind::Strategic
            } else if content_type.starts_with("application/merge-patch+json") {
                PatchKind::Merge
            } else {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {content_type:?})"
                    ),
                ));
            };
            let body = parse_body(&req)?;
            let patched = state
                .store
                .lock()
                .expect("store lock")
                .patch(&rt, ns, name, kind, body, sub, &options)?;
            Ok(http::json(StatusCode::OK, &patched))
        }
        (&Method::DELETE, Some(name), None) => {
            count(&state, "delete", &target);
            let preconditions = serde_json::from_slice::<Value>(&req.body)
                .ok()
                .and_then(|b| b.get("preconditions").cloned());
            let deleted = state.store.lock().expect("store lock").delete(
                &rt,
                ns,
                name,
                preconditions.as_ref(),
                &options,
            )?;
            Ok(http::json(StatusCode::OK, &deleted))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({})",
                req.method
            ),
        )),
    })();
    result.unwrap_or_else(|e| status_response(&e))
}

/// `events.k8s.io/v1` Events as the core `v1` API shows them (one store in a real API
/// server): `regarding` becomes `involvedObject`, `note` becomes `message`, and so on.
fn mirrored_events(
    store: &Store,
    ns: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> Vec<Value> {
    let Some(rt) = store.resolve("events.k8s.io", "v1", "events") else {
        return Vec::new();
    };
    let (items, _) = store.list(&rt, ns, labels, &FieldSelector::default(), None, None);
    items
        .into_iter()
        .map(|e| {
            let time = e
                .get("eventTime")
                .and_then(Value::as_str)
                .map(|t| format!("{}Z", &t[..t.len().min(19)]))
                .map(Value::String)
                .unwrap_or(Value::Null);
            let last = e
                .pointer("/series/lastObservedTime")
                .and_then(Value::as_str)
                .map(|t| Value::String(format!("{}Z", &t[..t.len().min(19)])))
                .unwrap_or_else(|| time.clone());
            let count = e
                .pointer("/series/count")
                .cloned()
                .or_else(|| e.get("deprecatedCount").cloned())
                .unwrap_or(json!(1));
            json!({
                "kind": "Event",
                "apiVersion": "v1",
                "metadata": e.get("metadata").cloned().unwrap_or(json!({})),
                "involvedObject": e.get("regarding").cloned().unwrap_or(json!({})),
                "related": e.get("related").cloned().unwrap_or(Value::Null),
                "reason": e.get("reason").cloned().unwrap_or(Value::Null),
                "message": e.get("note").cloned().unwrap_or(Value::Null),
                "type": e.get("type").cloned().unwrap_or(Value::Null),
                "action": e.get("action").cloned().unwrap_or(Value::Null),
                "source": {"component": e.get("reportingController").cloned().unwrap_or(Value::Null)},
                "reportingComponent": e.get("reportingController").cloned().unwrap_or(Value::Null),
                "reportingInstance": e.get("reportingInstance").cloned().unwrap_or(Value::Null),
                "eventTime": e.get("eventTime").cloned().unwrap_or(Value::Null),
                "firstTimestamp": time,
                "lastTimestamp": last,
                "count": count,
            })
        })
        .filter(|e| fields.matches(e))
        .collect()
}

fn check_subresource(rt: &ResourceType, sub: Option<&str>) -> Result<(), ApiError> {
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

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": kind, "object": object})).expect("serializes");
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(rt: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata}),
    )
}

struct WatchFilter {
    metadata_only: bool,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl WatchFilter {
    fn matches(&self, object: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                != Some(ns.as_str())
        {
            return false;
        }
        self.labels.matches(object) && self.fields.matches(object)
    }

    /// The event a watcher sees for a change: an object that starts or stops matching the
    /// selectors is seen as added or deleted.
    fn event(&self, change: &Change) -> Option<Bytes> {
        let now = self.matches(&change.object);
        let before = change.previous.as_deref().map(|p| self.matches(p));
        let kind = match (change.kind, before, now) {
            (ChangeKind::Deleted, _, true) => ChangeKind::Deleted,
            (ChangeKind::Added, _, true) => ChangeKind::Added,
            (ChangeKind::Modified, Some(true), true) => ChangeKind::Modified,
            (ChangeKind::Modified, Some(false) | None, true) => ChangeKind::Added,
            (ChangeKind::Modified, Some(true), false) => ChangeKind::Deleted,
            _ => return None,
        };
        Some(self.line(kind.as_str(), &change.object))
    }

    fn line(&self, kind: &str, object: &Value) -> Bytes {
        if self.metadata_only {
            event_line(kind, &partial(object))
        } else {
            event_line(kind, object)
        }
    }
}

fn start_watch(
    state: Arc<State>,
    req: &Req,
    rt: Arc<ResourceType>,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
) -> Response<Body> {
    let filter = WatchFilter {
        metadata_only: wants_metadata(req),
        namespace,
        labels,
        fields,
    };
    let requested_rv = req.param("resourceVersion").unwrap_or_default();
    let send_initial = req.param("sendInitialEvents").is_some_and(|s| s == "true");
    let bookmarks = req
        .param("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = req
        .param("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    // Under the store lock: subscribe first, then read the state, so no change falls between.
    let (mut rx, initial, start_rv, gone) = {
        let store = state.store.lock().expect("store lock");
        let rx = store.tx.subscribe();
        let current_rv = store.resource_version();
        let mut initial: Vec<Bytes> = Vec::new();
        let mut gone = false;
        let start_rv;
        if requested_rv.is_empty() || requested_rv == "0" || send_initial {
            let ns = filter.namespace.as_deref();
            let (items, _) = store.list(&rt, ns, &filter.labels, &filter.fields, None, None);
            initial.extend(items.iter().map(|i| filter.line("ADDED", i)));
            if send_initial {
                initial.push(bookmark(&rt, current_rv, true));
            }
            start_rv = current_rv;
        } else {
            match requested_rv
                .parse::<u64>()
                .ok()
                .and_then(|rv| store.changes_since(&rt.key(), rv).map(|c| (rv, c)))
            {
                Some((_, changes)) => {
                    initial.extend(changes.iter().filter_map(|c| filter.event(c)));
                    start_rv = current_rv;
                }
                None => {
                    gone = true;
                    start_rv = current_rv;
                }
            }
        }
        (rx, initial, start_rv, gone)
    };
    let (mut tx, body_rx) = mpsc::channel::<Bytes>(256);
    let mut epoch = state.watch_epoch.subscribe();
    let bookmark_interval = state.config.bookmark_interval;
    tokio::spawn(async move {
        if gone {
            let status = ApiError::new(
                410,
                "Expired",
                format!("too old resource version: {requested_rv}"),
            )
            .to_status();
            let _ = tx.send(event_line("ERROR", &status)).await;
            return;
        }
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        let mut last_rv = start_rv;
        loop {
            tokio::select! {
                received = rx.recv() => match received {
                    Ok(change) => {
                        if change.rv <= start_rv {
                            continue;
                        }
                        last_rv = change.rv;
                        if change.type_key != rt.key() {
                            continue;
                        }
                        if let Some(line) = filter.event(&change)
                            && tx.send(line).await.is_err()
                        {
                            return;
                        }
                    }
                    // A watcher that falls behind is closed; the client resumes or relists.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(bookmark(&rt, last_rv.max(start_rv), false)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
                _ = epoch.changed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(http::streamed(body_rx))
        .expect("a valid response")
}
