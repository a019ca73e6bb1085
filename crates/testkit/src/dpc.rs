//! A DPC simulator that speaks real HTTP: the token flow and the environment connection
//! override endpoints with their documented codes and bodies, stateful, with knobs for
//! latency, rate limits, injected faults and the older POST-as-upsert behaviour. Every call
//! is recorded (without tokens or client secrets) so tests can assert the exact requests.
//!
//! Control endpoints under `/_sim/` let another process drive it (see `Control` below).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Method, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

use dpc_http::{self as http, Body, Drop, Req, Server};

/// What a call was, by path and method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimOp {
    Token,
    Create,
    Update,
    List,
    Delete,
    Other,
}

/// What the simulator made of a call's `Authorization` header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum AuthSeen {
    /// No header, or not `Bearer`.
    Missing,
    /// A token this simulator issued, still valid, to this client.
    Valid { client_id: String },
    /// A token this simulator issued that has expired or was revoked.
    Expired,
    /// A bearer value the simulator never issued.
    Unknown,
    /// Token requests carry no bearer.
    NotApplicable,
}

/// One recorded call.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Call {
    pub seq: u64,
    /// Arrival, in milliseconds since the simulator started.
    pub at_ms: u64,
    pub method: String,
    pub path: String,
    /// The raw (still encoded) query string.
    pub query: Option<String>,
    pub op: SimOp,
    pub auth: AuthSeen,
    pub account_id: Option<String>,
    pub content_type: Option<String>,
    /// The JSON body; for token calls the form fields, with `client_secret` replaced by
    /// `<matches>` or `<wrong>`.
    pub body: Option<Value>,
    /// The status answered; `None` while in flight or when the connection was dropped.
    pub status: Option<u16>,
    /// When the answer (or the dropped connection) left, in milliseconds since start.
    #[serde(default)]
    pub done_ms: Option<u64>,
    /// The injected fault, if one applied.
    pub fault: Option<String>,
}

impl Call {
    /// The call's arrival as a duration since the simulator started.
    pub fn at(&self) -> Duration {
        Duration::from_millis(self.at_ms)
    }

    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// Whether this call wrote (create, update or delete).
    pub fn is_write(&self) -> bool {
        matches!(self.op, SimOp::Create | SimOp::Update | SimOp::Delete)
    }
}

/// The shape of list answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum ListShape {
    /// A bare JSON array.
    Array,
    /// `{page, size, total, results}`, paged by `page`/`size` (default size `page_size`).
    #[default]
    Envelope,
    /// One object when exactly one override exists (as the documented example), else an array.
    Single,
}

/// A request-rate limit per client: at most `limit` calls per `window_ms`, then 429.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub limit: u32,
    pub window_ms: u64,
    /// `Retry-After` seconds to send; default: what is left of the window, rounded up.
    #[serde(default)]
    pub retry_after_secs: Option<u64>,
}

/// Random faults for soak runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RandomFaults {
    pub seed: u64,
    /// Probability of a 503 answer (the request is not applied).
    pub p_5xx: f64,
    /// Probability of dropping the connection without an answer.
    pub p_reset: f64,
    /// Probability of answering only after `timeout_ms`.
    pub p_timeout: f64,
    pub timeout_ms: u64,
    /// Probability of a 429 with `Retry-After: 1`.
    pub p_429: f64,
    /// Probability that the token endpoint answers 503.
    pub p_token_5xx: f64,
}

/// The simulator's behaviour; change it at run time with [`DpcSim::configure`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SimConfig {
    /// Delay before each answer.
    pub latency_ms: u64,
    /// `expires_in` of issued tokens.
    pub token_lifetime_secs: u64,
    /// What the token answer says as `expires_in` when it should not tell the truth (a
    /// broken or hostile server: `1e300`, a string, a negative number).
    pub announced_expires_in: Option<Value>,
    /// The older documented behaviour: POST creates or updates (never 409).
    pub post_upserts: bool,
    pub list_shape: ListShape,
    /// Envelope page size when the request asks for none.
    pub page_size: usize,
    /// The largest page an envelope answer holds, whatever was asked.
    pub max_page_size: usize,
    pub create_status: u16,
    pub update_status: u16,
    pub delete_status: u16,
    /// Status of a DELETE when none of the names has an override.
    pub delete_missing_status: u16,
    /// Media type of problem bodies.
    pub problem_media_type: String,
    /// Answer 404 for projects, environments and connections not registered with
    /// [`DpcSim::add_connection`]; otherwise every parent exists.
    pub require_known_parents: bool,
    pub rate_limit: Option<RateLimit>,
    pub random_faults: Option<RandomFaults>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            token_lifetime_secs: 1800,
            announced_expires_in: None,
            post_upserts: false,
            list_shape: ListShape::Envelope,
            page_size: 25,
            max_page_size: 100,
            create_status: 201,
            update_status: 200,
            delete_status: 204,
            delete_missing_status: 404,
            problem_media_type: "application/problem+json".into(),
            require_known_parents: false,
            rate_limit: None,
            random_faults: None,
        }
    }
}

/// An injected fault, applied to the next matching call(s).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Only calls of this kind; any call when absent.
    #[serde(default)]
    pub op: Option<SimOp>,
    pub kind: FaultKind,
    /// How many matching calls it applies to.
    #[serde(default = "one")]
    pub times: u32,
}

fn one() -> u32 {
    1
}

/// What an injected fault does.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum FaultKind {
    /// Answer this status with a problem body (or `body`), without applying the request.
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<String>,
        #[serde(default)]
        body: Option<Value>,
    },
    /// Close the connection without an answer, without applying the request.
    Reset,
    /// Apply the request but answer only after `ms` (clients time out first).
    Delay { ms: u64 },
    /// Apply the request and answer success with a body that is not JSON.
    Malformed,
}

impl Fault {
    /// A fault for the next call of `op`.
    pub fn on(op: SimOp, kind: FaultKind) -> Self {
        Self {
            op: Some(op),
            kind,
            times: 1,
        }
    }

    /// Applies to `times` matching calls.
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    /// A status answer with a problem body.
    pub fn status(op: SimOp, status: u16) -> Self {
        Self::on(
            op,
            FaultKind::Status {
                status,
                retry_after: None,
                body: None,
            },
        )
    }
}

/// A parent project connection the simulator knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentConnection {
    pub platform_connection_type: String,
    pub auth_provider: String,
    pub auth_type: String,
}

impl Default for ParentConnection {
    fn default() -> Self {
        Self {
            platform_connection_type: "COMPONENT_BASIC".into(),
            auth_provider: "NONE".into(),
            auth_type: "GENERIC_SECRET".into(),
        }
    }
}

/// An override as the simulator stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredOverride {
    pub project_id: String,
    pub environment_name: String,
    pub connection_name: String,
    pub auth_type: Option<String>,
    pub connection_overrides: Value,
    pub created_by: String,
    pub created_date: String,
    /// How many writes (create, update, upsert) it has seen.
    pub writes: u64,
}

type Key = (String, String, String);

struct TokenInfo {
    client_id: String,
    expires_at: Instant,
}

struct Inner {
    config: SimConfig,
    calls: Vec<Call>,
    overrides: BTreeMap<Key, StoredOverride>,
    faults: VecDeque<Fault>,
    clients: HashMap<String, String>,
    tokens: HashMap<String, TokenInfo>,
    issued: Vec<String>,
    connections: HashMap<(String, String), ParentConnection>,
    environments: HashSet<(String, String)>,
    windows: HashMap<String, (Instant, u32)>,
    rng: StdRng,
    next_seq: u64,
}

struct State {
    inner: Mutex<Inner>,
    changed: Notify,
    started: Instant,
}

/// A running simulator.
pub struct DpcSim {
    state: Arc<State>,
    server: Server,
}

impl DpcSim {
    /// Starts a simulator on a free loopback port.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Starts a simulator on `addr`.
    pub async fn start_on(addr: SocketAddr, config: SimConfig) -> std::io::Result<Self> {
        let seed = config.random_faults.map(|r| r.seed).unwrap_or(1);
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                config,
                calls: Vec::new(),
                overrides: BTreeMap::new(),
                faults: VecDeque::new(),
                clients: HashMap::new(),
                tokens: HashMap::new(),
                issued: Vec::new(),
                connections: HashMap::new(),
                environments: HashSet::new(),
                windows: HashMap::new(),
                rng: StdRng::seed_from_u64(seed),
                next_seq: 1,
            }),
            changed: Notify::new(),
            started: Instant::now(),
        });
        let handler_state = state.clone();
        let server = http::bind_and_serve(addr, move |req| {
            let state = handler_state.clone();
            async move { handle(state, req).await }
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
    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The API base URL to put in a DpcAccount's `apiUrl`.
    pub fn api_url(&self) -> String {
        format!("{}/dpc", self.base_url())
    }

    /// The token URL to put in a DpcAccount's `tokenUrl`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/dpc/token", self.base_url())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.inner.lock().expect("simulator lock")
    }

    /// Accepts this client id and secret at the token endpoint.
    pub fn add_client(&self, client_id: &str, client_secret: &str) {
        self.lock()
            .clients
            .insert(client_id.into(), client_secret.into());
    }

    /// Every token issued so far (valid or not), so tests can check none of them leaked.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.lock().issued.clone()
    }

    /// Invalidates every issued token (the next call with one gets 401).
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Registers a parent connection (and its environment) for `require_known_parents`.
    pub fn add_connection(
        &self,
        project: &str,
        environment: &str,
        name: &str,
        parent: ParentConnection,
    ) {
        let mut inner = self.lock();
        inner
            .connections
            .insert((project.into(), name.into()), parent);
        inner
            .environments
            .insert((project.into(), environment.into()));
    }

    /// Changes the configuration.
    pub fn configure(&self, change: impl FnOnce(&mut SimConfig)) {
        let mut inner = self.lock();
        change(&mut inner.config);
        if let Some(random) = inner.config.random_faults {
            inner.rng = StdRng::seed_from_u64(random.seed);
        }
    }

    /// Queues a fault.
    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Drops queued faults.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Calls of one kind.
    pub fn calls_of(&self, op: SimOp) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.op == op)
            .cloned()
            .collect()
    }

    /// Forgets the calls so far.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Waits until `done` holds for the calls (checked on every new call), or fails after
    /// `timeout` with the calls seen.
    pub async fn wait_for_calls(
        &self,
        timeout: Duration,
        done: impl Fn(&[Call]) -> bool,
    ) -> Result<Vec<Call>, Vec<Call>> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.state.changed.notified();
            {
                let inner = self.lock();
                if done(&inner.calls) {
                    return Ok(inner.calls.clone());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.calls());
            }
        }
    }

    /// The stored overrides.
    pub fn overrides(&self) -> Vec<StoredOverride> {
        self.lock().overrides.values().cloned().collect()
    }

    /// One stored override.
    pub fn get_override(
        &self,
        project: &str,
        environment: &str,
        connection: &str,
    ) -> Option<StoredOverride> {
        self.lock()
            .overrides
            .get(&(project.into(), environment.into(), connection.into()))
            .cloned()
    }

    /// Writes an override behind the operator's back (as a user of the DPC UI would).
    pub fn put_override(
        &self,
        project: &str,
        environment: &str,
        connection: &str,
        auth_type: Option<&str>,
        connection_overrides: Value,
    ) {
        let mut inner = self.lock();
        let key = (
            project.to_string(),
            environment.to_string(),
            connection.to_string(),
        );
        let entry = inner
            .overrides
            .entry(key)
            .or_insert_with(|| StoredOverride {
                project_id: project.into(),
                environment_name: environment.into(),
                connection_name: connection.into(),
                auth_type: None,
                connection_overrides: Value::Null,
                created_by: "ui-user".into(),
                created_date: Timestamp::now().to_string(),
                writes: 0,
            });
        entry.auth_type = auth_type.map(String::from);
        entry.connection_overrides = connection_overrides;
        entry.writes += 1;
        drop(inner);
        self.state.changed.notify_waiters();
    }

    /// Deletes an override behind the operator's back.
    pub fn remove_override(&self, project: &str, environment: &str, connection: &str) -> bool {
        self.lock()
            .overrides
            .remove(&(project.into(), environment.into(), connection.into()))
            .is_some()
    }

    /// Milliseconds since the simulator started.
    pub fn now_ms(&self) -> u64 {
        self.state.started.elapsed().as_millis() as u64
    }
}

fn problem(
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

fn classify(method: &Method, path: &str) -> SimOp {
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
    SimOp::Other
}

/// The project id of `/dpc/v1/projects/{id}/connections/environment-overrides`.
fn overrides_project(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/dpc/v1/projects/")?;
    let (project, tail) = rest.split_once('/')?;
    (tail == "connections/environment-overrides").then(|| {
        percent_encoding::percent_decode_str(project)
            .decode_utf8_lossy()
            .into_owned()
    })
}

enum Plan {
    Normal,
    Fault(FaultKind, String),
}

async fn handle(state: Arc<State>, req: Req) -> Result<Response<Body>, Drop> {
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
        Plan::Fault(FaultKind::Reset, _) => Err(Drop),
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

fn auth_seen(inner: &Inner, req: &Req) -> AuthSeen {
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

fn token_form_for_log(inner: &Inner, req: &Req) -> Value {
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

fn pick_fault(inner: &mut Inner, op: SimOp) -> Plan {
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

fn fault_name(kind: &FaultKind) -> String {
    match kind {
        FaultKind::Status { status, .. } => format!("status {status}"),
        FaultKind::Reset => "reset".into(),
        FaultKind::Delay { ms } => format!("delay {ms}ms"),
        FaultKind::Malformed => "malformed".into(),
    }
}

fn respond(state: &State, op: SimOp, req: &Req) -> Response<Body> {
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

fn token(inner: &mut Inner, req: &Req) -> Response<Body> {
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

fn parent_of(
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

fn validate_body(body: &Value, parent: &ParentConnection) -> Vec<String> {
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

fn override_json(stored: &StoredOverride, parent: &ParentConnection) -> Value {
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

fn write(inner: &mut Inner, op: SimOp, project: &str, req: &Req) -> Response<Body> {
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

fn list(inner: &Inner, project: &str, req: &Req) -> Response<Body> {
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
        ListShape::Envelope => {
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
    };
    http::json(StatusCode::OK, &body)
}

fn delete(inner: &mut Inner, project: &str, req: &Req) -> Response<Body> {
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

/// Control endpoints for driving a simulator in another process:
/// `GET /_sim/calls`, `DELETE /_sim/calls`, `GET /_sim/overrides`, `PUT /_sim/overrides`
/// (`{projectId, environmentName, connectionName, authType?, connectionOverrides}`),
/// `DELETE /_sim/overrides?projectId=&environmentName=&connectionName=`, `POST /_sim/faults`
/// (a [`Fault`]), `PATCH /_sim/config` (fields of [`SimConfig`]), `POST /_sim/clients`
/// (`{clientId, clientSecret}`), `POST /_sim/revoke-tokens`.
fn control_endpoint(state: &State, path: &str, req: &Req) -> Response<Body> {
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
