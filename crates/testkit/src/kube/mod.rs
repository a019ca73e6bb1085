//! A Kubernetes API emulator that speaks real HTTP on loopback, enough for kube-rs clients
//! and kubectl: discovery and OpenAPI, core namespaces, secrets, configmaps and events,
//! `events.k8s.io` events, leases, and CustomResourceDefinitions whose creation starts serving
//! the custom resource (with status subresource and printer columns).
//!
//! Custom resources go through admission (`admission`: pruning, defaults, schema and CEL
//! rules), applies raise conflicts, and the built-in kinds kubectl's typed clients send speak
//! protobuf (`protobuf`, `openapi_pb`). What it knowingly does not do is listed, and checked
//! against the real kube-apiserver, by the differential suite (`tests/differential/`) and in
//! docs/test-doubles.md: authentication and RBAC, garbage collection, webhooks, conversion,
//! strategic-merge list semantics, one consistent snapshot across list pages, among others.

use base64::Engine as _;
use bytes::Bytes;
use dpc_http::{self as http, Body, Hangup, Req, Server};
use futures::SinkExt;
use futures::channel::mpsc;
use hyper::{Method, Response, StatusCode};
use selectors::{FieldSelector, LabelSelector};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{ApiError, Change, ChangeKind, PatchKind, ResourceType, Store, WriteOptions};
use tokio::sync::{broadcast, watch};

pub mod admission;
pub mod discovery;
pub mod openapi_pb;
pub mod protobuf;
mod requests;
pub mod selectors;
pub mod ssa;
pub mod store;
mod watches;
use requests::*;
use watches::*;

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
            async move { Ok::<_, Hangup>(handle(state, req).await) }
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
            return openapi_v2(&req, &types);
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
    let options = match write_options(&req) {
        Ok(options) => options,
        Err(e) => return answer(&req, status_code(&e), &e.to_status()),
    };
    let result: Result<Response<Body>, ApiError> = (|| match (
        &req.method,
        &target.name,
        target.subresource.as_deref(),
    ) {
        (&Method::GET, None, None) => {
            let labels = LabelSelector::parse(&req.param("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(&req.param("fieldSelector").unwrap_or_default())
                .and_then(|f| f.supported_by(&rt.group, &rt.plural).map(|()| f))
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
            // As from etcd: how many are left, when no selector makes that unknown.
            let remaining = next
                .as_ref()
                .filter(|_| labels.is_empty() && fields.is_empty())
                .map(|position| store.count_after(&rt, ns, position));
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
            // Custom resource lists always carry `continue`, empty on the last page.
            if token.is_some() || rt.custom {
                metadata["continue"] = json!(token.unwrap_or_default());
            }
            if let Some(remaining) = remaining {
                metadata["remainingItemCount"] = json!(remaining);
            }
            if wants_metadata(&req) {
                let items: Vec<Value> = items.iter().map(partial).collect();
                return Ok(http::json(
                    StatusCode::OK,
                    &json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": metadata, "items": items}),
                ));
            }
            Ok(answer(
                &req,
                StatusCode::OK,
                &json!({"kind": format!("{}List", rt.kind), "apiVersion": rt.api_version(), "metadata": metadata, "items": items}),
            ))
        }
        (&Method::POST, None, None) => {
            count(&state, "create", &target);
            let body = parse_body(&req)?;
            written(&state, &req, |store| {
                Ok((StatusCode::CREATED, store.create(&rt, ns, body, &options)?))
            })
        }
        (&Method::DELETE, None, None) => {
            count(&state, "deletecollection", &target);
            let labels = LabelSelector::parse(&req.param("labelSelector").unwrap_or_default())
                .map_err(ApiError::bad_request)?;
            let fields = FieldSelector::parse(&req.param("fieldSelector").unwrap_or_default())
                .and_then(|f| f.supported_by(&rt.group, &rt.plural).map(|()| f))
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
            Ok(answer(&req, StatusCode::OK, &object))
        }
        (&Method::PUT, Some(name), sub) => {
            count(&state, "update", &target);
            check_subresource(&rt, sub)?;
            let body = parse_body(&req)?;
            written(&state, &req, |store| {
                Ok((
                    StatusCode::OK,
                    store.update(&rt, ns, name, body, sub, &options)?,
                ))
            })
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
            if kind == PatchKind::Strategic && rt.custom {
                // Custom resources have no strategic merge patch (no patch strategies).
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                ));
            }
            let body = parse_body(&req)?;
            written(&state, &req, |store| {
                // An apply that creates the object answers 201, as a create does.
                let code = match store.get(&rt, ns, name) {
                    Ok(_) => StatusCode::OK,
                    Err(_) => StatusCode::CREATED,
                };
                Ok((code, store.patch(&rt, ns, name, kind, body, sub, &options)?))
            })
        }
        (&Method::DELETE, Some(name), None) => {
            count(&state, "delete", &target);
            let preconditions = serde_json::from_slice::<Value>(&req.body)
                .ok()
                .and_then(|b| b.get("preconditions").cloned());
            let mut store = state.store.lock().expect("store lock");
            let deleted = store.delete(&rt, ns, name, preconditions.as_ref(), &options)?;
            // Gone at once: the server answers with a Status; held by finalizers: the object.
            if store.get(&rt, ns, name).is_err() && !options.dry_run {
                return Ok(answer(
                    &req,
                    StatusCode::OK,
                    &deleted_status(&rt, name, &deleted),
                ));
            }
            drop(store);
            Ok(answer(&req, StatusCode::OK, &deleted))
        }
        (&Method::POST, Some(name), Some("token"))
            if rt.group.is_empty() && rt.plural == "serviceaccounts" =>
        {
            count(&state, "create", &target);
            let request = parse_body(&req)?;
            state.store.lock().expect("store lock").get(&rt, ns, name)?;
            Ok(answer(
                &req,
                StatusCode::CREATED,
                &token_request(&request, name, ns),
            ))
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
    result.unwrap_or_else(|e| answer(&req, status_code(&e), &e.to_status()))
}
