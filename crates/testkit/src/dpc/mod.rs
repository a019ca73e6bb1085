//! A DPC simulator that speaks real HTTP: the token flow and the environment connection
//! override endpoints with their documented codes and bodies, stateful, with knobs for
//! latency, rate limits, injected faults and the older POST-as-upsert behaviour. Every call
//! is recorded (without tokens or client secrets) so tests can assert the exact requests.
//!
//! Control endpoints under `/_sim/` let another process drive it (see `Control` below).

use dpc_http::{self as http, Body, Hangup, Req, Server};
use hyper::{Method, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

mod control;
mod overrides;
mod serve;
use control::*;
use overrides::*;
use serve::*;

/// What a call was, by path and method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimOp {
    Token,
    Create,
    Update,
    List,
    Delete,
    /// `GET /v1/projects/{projectId}/environments`.
    Environments,
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
    /// Answer this status with exactly these bytes of `application/problem+json` (a body as
    /// a server with its own JSON escaping writes it), without applying the request.
    Raw { status: u16, body: String },
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

    /// Registers an environment of a project (listed by the environments endpoint, known to
    /// `require_known_parents`).
    pub fn add_environment(&self, project: &str, environment: &str) {
        self.lock()
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
