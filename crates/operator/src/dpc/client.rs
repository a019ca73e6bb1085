//! The DPC REST client: one shared HTTP client, and per account a token cache and the
//! `Retry-After` gate that holds every call of the account after a 429.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::Instrument;
use url::Url;

use super::error::{DpcError, Operation, transport_kind};
use super::limiter::{Admission, RateLimiter, Requester};
use super::secret::{SecretString, redact};
use super::types::{OverrideRequest, Problem, RemoteOverride, parse_list, parse_write_answer};
use crate::api::DpcAccountSpec;
use crate::key::ObjKey;

/// The documented token endpoint (Matillion's own Terraform provider uses it).
pub const DEFAULT_TOKEN_URL: &str = "https://id.core.matillion.com/oauth/dpc/token";
/// The documented token audience.
pub const DEFAULT_AUDIENCE: &str = "https://api.matillion.com";
/// Token lifetime assumed when the token answer has no `expires_in` (the documented 30 min).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(1800);
/// The longest token lifetime believed: a larger `expires_in` (even `1e300`) means a day.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest `Retry-After` honoured: a larger one holds the account for an hour.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The largest token answer read; a longer one is refused unread.
pub const MAX_TOKEN_BODY: usize = 64 * 1024;
/// The largest API answer read (a list page of 100 overrides is a few tens of KiB).
pub const MAX_API_BODY: usize = 8 * 1024 * 1024;
/// The DPC hosts an account may name by default: Matillion's own.
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &["*.matillion.com"];
/// The page size asked of list calls: the documented maximum of DPC's list endpoints.
const LIST_PAGE_SIZE: u64 = 100;
/// Longest URL we send; longer DELETEs are split (DPC answers 400 to over-long URLs).
const MAX_URL_LEN: usize = 2000;
/// Characters left as they are in a query value (RFC 3986 unreserved); everything else,
/// including space and comma, is percent-encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Settings shared by every account.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Allow `http://` API and token URLs (tests and the sandbox only).
    pub allow_insecure_http: bool,
    /// Timeout of one HTTP request, connection included.
    pub request_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
    /// How long to hold an account after a 429 that carries no usable `Retry-After`.
    pub default_retry_after: Duration,
    /// A request whose rate-limit slot is further away than this is not waited for: its
    /// object is told when to come back.
    pub max_admission_wait: Duration,
    /// The hosts an account's `apiUrl` and `tokenUrl` may name: exact names, or `*.domain`
    /// for any host under a domain. An account is a way to send its credentials and the
    /// values its objects read from Secrets to a host, so only these hosts are called.
    pub allowed_hosts: Vec<String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            allow_insecure_http: false,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            default_retry_after: Duration::from_secs(5),
            max_admission_wait: Duration::from_secs(5),
            allowed_hosts: DEFAULT_ALLOWED_HOSTS
                .iter()
                .map(|h| h.to_string())
                .collect(),
        }
    }
}

impl ClientSettings {
    /// Whether `host` is one the operator may call.
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allowed_hosts.iter().any(|pattern| {
            let pattern = pattern.trim().to_ascii_lowercase();
            match pattern.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                None => pattern == "*" || pattern == host,
            }
        })
    }
}

/// Where to call DPC for one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub api_url: Url,
    pub token_url: Url,
    pub audience: String,
    pub account_id: Option<String>,
}

impl Endpoint {
    /// The endpoint of a DpcAccount spec: the region's URL unless `apiUrl` is set. Plain
    /// http is refused unless the settings allow it, and so is a host not on their list.
    pub fn for_account(spec: &DpcAccountSpec, settings: &ClientSettings) -> Result<Self, String> {
        let api = match (&spec.api_url, spec.region) {
            (Some(url), _) => url.clone(),
            (None, Some(region)) => format!("https://{}.api.matillion.com/dpc", region.as_str()),
            (None, None) => return Err("the DpcAccount sets neither region nor apiUrl".into()),
        };
        let token = spec
            .token_url
            .clone()
            .unwrap_or_else(|| DEFAULT_TOKEN_URL.into());
        let api_url = parse_endpoint_url("apiUrl", &api, settings)?;
        let token_url = parse_endpoint_url("tokenUrl", &token, settings)?;
        Ok(Self {
            api_url,
            token_url,
            audience: spec
                .audience
                .clone()
                .unwrap_or_else(|| DEFAULT_AUDIENCE.into()),
            account_id: spec.account_id.clone().filter(|s| !s.is_empty()),
        })
    }
}

fn parse_endpoint_url(field: &str, value: &str, settings: &ClientSettings) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("{field} {value:?} is not a URL: {e}"))?;
    let host = url.host_str().unwrap_or_default();
    if !settings.host_allowed(host) {
        return Err(format!(
            "{field} names host {host:?}, which is not one of the DPC hosts this operator may call ({}); an operator administrator adds hosts with --dpc-allowed-hosts (chart value dpc.allowedHosts)",
            settings.allowed_hosts.join(", ")
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if settings.allow_insecure_http => Ok(url),
        "http" => Err(format!(
            "{field} {value} uses plain http, which is refused; use https, or start the operator with --allow-insecure-http (tests and sandboxes only)"
        )),
        other => Err(format!(
            "{field} {value} has scheme {other}; only https is supported"
        )),
    }
}

/// The API credentials of an account, read from its Secret.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub client_id: SecretString,
    pub client_secret: SecretString,
}

/// Identifies an account: `namespace/name` of a DpcAccount.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountKey {
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Sees every DPC call: operation, outcome (`success`, a status code class, or a transport
/// failure) and duration. Implemented by the metrics registry.
pub trait CallObserver: Send + Sync {
    fn observe(&self, operation: Operation, outcome: &'static str, elapsed: Duration);
    /// Time a request waited for the account's rate limit.
    fn waited(&self, _elapsed: Duration) {}
}

/// The request rate of an account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub requests_per_minute: u32,
    pub burst: u32,
}

/// The DPC client. Cheap to clone; all clones share connections, tokens and gates.
#[derive(Clone)]
pub struct DpcClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    settings: ClientSettings,
    accounts: Mutex<HashMap<AccountKey, Arc<AccountState>>>,
    observer: Option<Arc<dyn CallObserver>>,
    token_ids: AtomicU64,
    /// Set when this replica stopped leading: no request is sent any more.
    fenced: std::sync::atomic::AtomicBool,
}

struct AccountState {
    key: AccountKey,
    endpoint: Endpoint,
    credentials: Credentials,
    fingerprint: [u8; 32],
    token: tokio::sync::Mutex<Option<CachedToken>>,
    limits: Arc<AccountLimits>,
}

/// Per-account state that outlives a change of endpoint or credentials.
struct AccountLimits {
    /// No call before this instant (set from a 429's `Retry-After`).
    blocked_until: Mutex<Option<Instant>>,
    limiter: Mutex<RateLimiter>,
}

struct CachedToken {
    id: u64,
    value: SecretString,
    refresh_at: Instant,
}

/// The answer to a successful create or update.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteAnswer {
    pub status: u16,
    /// The override as DPC echoed it, when the answer carried one.
    pub remote: Option<RemoteOverride>,
}

struct Answer {
    status: StatusCode,
    retry_after: Option<Duration>,
    body: bytes::Bytes,
}

impl DpcClient {
    /// A client with the given settings.
    pub fn new(settings: ClientSettings) -> Self {
        Self::with_observer(settings, None)
    }

    /// A client that reports every call to `observer`.
    pub fn with_observer(
        settings: ClientSettings,
        observer: Option<Arc<dyn CallObserver>>,
    ) -> Self {
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("dpc-operator/", env!("CARGO_PKG_VERSION")))
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            // A redirect would carry the client secret, a token or values read from Secrets
            // to wherever it points: none is followed.
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!settings.allow_insecure_http)
            .build()
            .expect("the HTTP client builds with rustls");
        Self {
            inner: Arc::new(Inner {
                http,
                settings,
                accounts: Mutex::new(HashMap::new()),
                observer,
                token_ids: AtomicU64::new(1),
                fenced: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// The client's settings.
    pub fn settings(&self) -> &ClientSettings {
        &self.inner.settings
    }

    /// The handle for an account with this endpoint and these credentials. A change of either
    /// drops the cached token; the `Retry-After` gate and the rate limit of the account are
    /// kept (a changed rate applies from now on).
    pub fn account(
        &self,
        key: AccountKey,
        endpoint: Endpoint,
        credentials: Credentials,
        rate: Rate,
    ) -> AccountHandle {
        let fingerprint = fingerprint(&endpoint, &credentials);
        let mut accounts = self.inner.accounts.lock().expect("account map lock");
        let state = match accounts.get(&key) {
            Some(existing) if existing.fingerprint == fingerprint => existing.clone(),
            existing => {
                let limits = existing.map(|s| s.limits.clone()).unwrap_or_else(|| {
                    Arc::new(AccountLimits {
                        blocked_until: Mutex::new(None),
                        limiter: Mutex::new(RateLimiter::new(rate.requests_per_minute, rate.burst)),
                    })
                });
                let state = Arc::new(AccountState {
                    key: key.clone(),
                    endpoint,
                    credentials,
                    fingerprint,
                    token: tokio::sync::Mutex::new(None),
                    limits,
                });
                accounts.insert(key, state.clone());
                state
            }
        };
        {
            let mut limiter = state.limits.limiter.lock().expect("limiter lock");
            if limiter.requests_per_minute() != rate.requests_per_minute.max(1) {
                limiter.set_rate(rate.requests_per_minute, rate.burst);
            }
        }
        AccountHandle {
            client: self.clone(),
            state,
            requester: None,
            secrets: Arc::new([]),
        }
    }

    /// Refuses every request from now on (this replica lost its leader lease): calls fail
    /// as transient, without reaching DPC.
    pub fn fence(&self) {
        self.inner.fenced.store(true, Ordering::SeqCst);
    }

    /// Forgets an account (it was deleted).
    pub fn forget(&self, key: &AccountKey) {
        self.inner
            .accounts
            .lock()
            .expect("account map lock")
            .remove(key);
    }

    /// Drops the rate-limit tickets an object that went away held with any account.
    pub fn forget_object(&self, key: &ObjKey) {
        let accounts = self.inner.accounts.lock().expect("account map lock");
        for state in accounts.values() {
            state
                .limits
                .limiter
                .lock()
                .expect("limiter lock")
                .forget(key);
        }
    }
}

fn fingerprint(endpoint: &Endpoint, credentials: &Credentials) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [
        endpoint.api_url.as_str(),
        endpoint.token_url.as_str(),
        endpoint.audience.as_str(),
        endpoint.account_id.as_deref().unwrap_or(""),
        credentials.client_id.expose(),
        credentials.client_secret.expose(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// The calls of one account.
#[derive(Clone)]
pub struct AccountHandle {
    client: DpcClient,
    state: Arc<AccountState>,
    /// The object these calls are for: far rate-limit slots become its tickets.
    requester: Requester,
    /// Values the calls send that were read from Secrets: removed from any text DPC answers.
    secrets: Arc<[SecretString]>,
}

impl fmt::Debug for AccountHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountHandle")
            .field("account", &self.state.key)
            .field("api_url", &self.state.endpoint.api_url.as_str())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

impl AccountHandle {
    /// The account this handle calls for.
    pub fn key(&self) -> &AccountKey {
        &self.state.key
    }

    /// The same handle, calling on behalf of the object `(namespace, name)`.
    pub fn for_object(&self, namespace: &str, name: &str) -> AccountHandle {
        AccountHandle {
            requester: Some((namespace.to_string(), name.to_string())),
            ..self.clone()
        }
    }

    /// The same handle, knowing the values read from Secrets that its calls send: every
    /// text of an error answer comes back without them (and without the credentials and
    /// token), in any encoding.
    pub fn with_secrets(&self, secrets: impl IntoIterator<Item = SecretString>) -> AccountHandle {
        AccountHandle {
            secrets: secrets.into_iter().collect(),
            ..self.clone()
        }
    }

    /// A digest of the account's endpoint and credentials (not reversible): it changes when
    /// either does.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.state.fingerprint[..8])
    }

    /// Makes sure a valid token is cached (fetching one if needed).
    pub async fn ensure_token(&self) -> Result<(), DpcError> {
        self.token().await.map(|_| ())
    }

    /// `POST` a new override. 409 comes back as an error of class `Conflict`.
    pub async fn create(
        &self,
        project_id: &str,
        body: &OverrideRequest,
    ) -> Result<WriteAnswer, DpcError> {
        let url = self.overrides_url(project_id, &[]);
        let answer = self
            .send(Operation::Create, Method::POST, url, Some(body))
            .await?;
        Ok(WriteAnswer {
            status: answer.status.as_u16(),
            remote: parse_write_answer(&answer.body),
        })
    }

    /// `PUT` an existing override. 404 comes back as an error of class `NotFound`.
    pub async fn update(
        &self,
        project_id: &str,
        body: &OverrideRequest,
    ) -> Result<WriteAnswer, DpcError> {
        let url = self.overrides_url(project_id, &[]);
        let answer = self
            .send(Operation::Update, Method::PUT, url, Some(body))
            .await?;
        Ok(WriteAnswer {
            status: answer.status.as_u16(),
            remote: parse_write_answer(&answer.body),
        })
    }

    /// Every override of an environment, following envelope pages when the answer has them.
    pub async fn list(
        &self,
        project_id: &str,
        environment: &str,
    ) -> Result<Vec<RemoteOverride>, DpcError> {
        let mut items = Vec::new();
        let mut page_params: Option<(u64, u64)> = None;
        for _ in 0..1000 {
            let mut query = vec![("environmentName", environment.to_string())];
            match page_params {
                Some((page, size)) => {
                    query.push(("page", page.to_string()));
                    query.push(("size", size.to_string()));
                }
                // Ask for the largest page list endpoints document, so one call usually
                // answers for a whole environment.
                None => query.push(("size", LIST_PAGE_SIZE.to_string())),
            }
            let url = self.overrides_url(project_id, &query);
            let answer = self.send(Operation::List, Method::GET, url, None).await?;
            let page = parse_list(&answer.body).map_err(|reason| DpcError::Decode {
                operation: Operation::List,
                reason,
            })?;
            let more = page.has_more();
            let next = (page.page.unwrap_or(0) + 1, page.size.unwrap_or(100));
            items.extend(page.items);
            if !more {
                return Ok(items);
            }
            page_params = Some(next);
        }
        Ok(items)
    }

    /// `DELETE` the overrides of `connection_names` in an environment. 404 counts as done.
    /// Names are split over several calls when one URL would be too long.
    ///
    /// DPC takes the names as one comma-separated list: a name with a comma is never sent (a
    /// server that decodes before splitting would delete other overrides), and when a name
    /// holds anything beyond letters, digits, spaces and `-_.~` the environment is listed
    /// afterwards to confirm it is gone.
    pub async fn delete(
        &self,
        project_id: &str,
        environment: &str,
        connection_names: &[String],
    ) -> Result<(), DpcError> {
        if let Some(name) = connection_names.iter().find(|n| n.contains(',')) {
            return Err(DpcError::Misconfigured(format!(
                "connection name {name:?} contains a comma; DPC's delete call reads commas as separators, so it is never sent"
            )));
        }
        for chunk in self.delete_batches(project_id, environment, connection_names) {
            let url = self.overrides_url_raw(project_id, &chunk);
            match self
                .send(Operation::Delete, Method::DELETE, url, None)
                .await
            {
                Ok(_) => {}
                Err(DpcError::Api { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let unusual: Vec<&String> = connection_names
            .iter()
            .filter(|name| !is_plain_name(name))
            .collect();
        if !unusual.is_empty() {
            let listed = self.list(project_id, environment).await?;
            if let Some(name) = unusual.into_iter().find(|name| {
                listed
                    .iter()
                    .any(|o| o.name.as_deref() == Some(name.as_str()))
            }) {
                return Err(DpcError::StillPresent(name.clone()));
            }
        }
        Ok(())
    }

    fn delete_batches(&self, project_id: &str, environment: &str, names: &[String]) -> Vec<String> {
        let prefix = format!("environmentName={}&connectionNames=", encode(environment));
        let base_len = self.overrides_url(project_id, &[]).as_str().len() + 1 + prefix.len();
        let mut batches = Vec::new();
        let mut current = String::new();
        for name in names {
            let encoded = encode(name);
            if !current.is_empty() && base_len + current.len() + 1 + encoded.len() > MAX_URL_LEN {
                batches.push(format!("{prefix}{current}"));
                current.clear();
            }
            if !current.is_empty() {
                current.push(',');
            }
            current.push_str(&encoded);
        }
        if !current.is_empty() {
            batches.push(format!("{prefix}{current}"));
        }
        batches
    }

    fn overrides_url(&self, project_id: &str, query: &[(&str, String)]) -> Url {
        let raw: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        self.overrides_url_raw(project_id, &raw.join("&"))
    }

    fn overrides_url_raw(&self, project_id: &str, query: &str) -> Url {
        let mut url = self.state.endpoint.api_url.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has path segments")
            .pop_if_empty()
            .extend([
                "v1",
                "projects",
                project_id,
                "connections",
                "environment-overrides",
            ]);
        url.set_query((!query.is_empty()).then_some(query));
        url
    }

    async fn token(&self) -> Result<(u64, SecretString), DpcError> {
        let mut cached = self.state.token.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok((token.id, token.value.clone()));
        }
        let fresh = self.fetch_token().await?;
        let result = (fresh.id, fresh.value.clone());
        *cached = Some(fresh);
        Ok(result)
    }

    async fn invalidate_token(&self, id: u64) {
        let mut cached = self.state.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.id == id) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<CachedToken, DpcError> {
        let endpoint = &self.state.endpoint;
        ensure_scheme(
            &endpoint.token_url,
            self.client.settings().allow_insecure_http,
        )?;
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.state.credentials.client_id.expose()),
            (
                "client_secret",
                self.state.credentials.client_secret.expose(),
            ),
            ("audience", endpoint.audience.as_str()),
        ];
        let request = self
            .client
            .inner
            .http
            .post(endpoint.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        let answer = self.execute(Operation::Token, request).await?;
        if !answer.status.is_success() {
            return Err(self.api_error(Operation::Token, answer, None));
        }
        let parsed: TokenAnswer =
            serde_json::from_slice(&answer.body).map_err(|_| DpcError::Decode {
                operation: Operation::Token,
                reason: "the token answer has no access_token".into(),
            })?;
        let lifetime = parsed
            .expires_in
            .as_ref()
            .and_then(|v| {
                v.as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .filter(|secs| secs.is_finite() && *secs > 0.0)
            .map(|secs| Duration::from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64())))
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Refresh shortly before expiry: 5 minutes early for the documented 30-minute tokens,
        // a fifth of the lifetime for short ones.
        let margin = (lifetime / 5).min(Duration::from_secs(300));
        Ok(CachedToken {
            id: self.client.inner.token_ids.fetch_add(1, Ordering::Relaxed),
            value: SecretString::new(parsed.access_token),
            refresh_at: Instant::now() + lifetime - margin,
        })
    }

    fn check_fence(&self, operation: Operation) -> Result<(), DpcError> {
        if self.client.inner.fenced.load(Ordering::SeqCst) {
            return Err(DpcError::Fenced(operation));
        }
        Ok(())
    }

    fn check_gate(&self, operation: Operation) -> Result<(), DpcError> {
        let blocked = self.state.limits.blocked_until.lock().expect("gate lock");
        match *blocked {
            Some(until) if Instant::now() < until => Err(DpcError::Throttled {
                operation,
                remaining: until - Instant::now(),
                queued: false,
            }),
            _ => Ok(()),
        }
    }

    /// Waits for this request's rate-limit slot, or says when to come back for it.
    async fn admit(&self, operation: Operation) -> Result<(), DpcError> {
        let now = Instant::now();
        let max_wait = self.client.settings().max_admission_wait;
        let admission = self
            .state
            .limits
            .limiter
            .lock()
            .expect("limiter lock")
            .reserve(&self.requester, now, max_wait);
        match admission {
            Admission::SendAt(at) => {
                if at > now {
                    tokio::time::sleep_until(at).await;
                    if let Some(observer) = &self.client.inner.observer {
                        observer.waited(at - now);
                    }
                }
                Ok(())
            }
            Admission::ComeBackAt(at) => Err(DpcError::Throttled {
                operation,
                remaining: at - now,
                queued: true,
            }),
        }
    }

    fn hold_account(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut blocked = self.state.limits.blocked_until.lock().expect("gate lock");
        if blocked.is_none_or(|current| current < until) {
            *blocked = Some(until);
        }
        self.state
            .limits
            .limiter
            .lock()
            .expect("limiter lock")
            .hold_until(until);
    }

    /// When the account may call again, if it is held by a 429.
    pub fn blocked_for(&self) -> Option<Duration> {
        let blocked = self.state.limits.blocked_until.lock().expect("gate lock");
        blocked.and_then(|until| until.checked_duration_since(Instant::now()))
    }

    async fn send(
        &self,
        operation: Operation,
        method: Method,
        url: Url,
        body: Option<&OverrideRequest>,
    ) -> Result<Answer, DpcError> {
        ensure_scheme(&url, self.client.settings().allow_insecure_http)?;
        let (token_id, token) = self.token().await?;
        let answer = self
            .send_with(operation, &method, &url, body, &token)
            .await?;
        let (answer, token) = if answer.status == StatusCode::UNAUTHORIZED {
            // The token may have been revoked or expired early: one new token, one more try.
            self.invalidate_token(token_id).await;
            let (_, token) = self.token().await?;
            let answer = self
                .send_with(operation, &method, &url, body, &token)
                .await?;
            (answer, token)
        } else {
            (answer, token)
        };
        if answer.status.is_success() {
            Ok(answer)
        } else {
            Err(self.api_error(operation, answer, Some(&token)))
        }
    }

    async fn send_with(
        &self,
        operation: Operation,
        method: &Method,
        url: &Url,
        body: Option<&OverrideRequest>,
        token: &SecretString,
    ) -> Result<Answer, DpcError> {
        let mut request = self
            .client
            .inner
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(token.expose())
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/problem+json",
            );
        if let Some(account_id) = &self.state.endpoint.account_id {
            request = request.header("account-id", account_id);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.canonical_json());
        }
        self.execute(operation, request).await
    }

    /// Every HTTP request goes through here: the `Retry-After` gate, the rate limit, the
    /// call, its observation, and a new gate on 429.
    async fn execute(
        &self,
        operation: Operation,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, DpcError> {
        self.check_fence(operation)?;
        self.check_gate(operation)?;
        self.admit(operation).await?;
        self.check_gate(operation)?;
        // The admission may have waited: look again right before sending.
        self.check_fence(operation)?;
        let span = tracing::info_span!("dpc_request", operation = operation.as_str(), account = %self.state.key, outcome = tracing::field::Empty);
        let started = std::time::Instant::now();
        let limit = match operation {
            Operation::Token => MAX_TOKEN_BODY,
            _ => MAX_API_BODY,
        };
        let result = async {
            let response = request.send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = read_limited(response, limit).await?;
            Ok::<_, reqwest::Error>((status, retry_after, body))
        }
        .instrument(span.clone())
        .await;
        let outcome = match &result {
            Ok((status, _, _)) if status.is_success() => "success",
            Ok((status, _, _)) => status_outcome(status.as_u16()),
            Err(e) => match transport_kind(e) {
                super::error::TransportKind::Timeout => "timeout",
                super::error::TransportKind::Reset => "reset",
                super::error::TransportKind::Connect => "connect_error",
                super::error::TransportKind::Other => "transport_error",
            },
        };
        span.record("outcome", outcome);
        if let Some(observer) = &self.client.inner.observer {
            observer.observe(operation, outcome, started.elapsed());
        }
        let (status, retry_after, body) = result.map_err(|source| DpcError::Transport {
            operation,
            kind: transport_kind(&source),
            source: source.without_url(),
        })?;
        let Some(body) = body else {
            return Err(DpcError::Decode {
                operation,
                reason: format!(
                    "the answer ({status}) is larger than {limit} bytes; it was not read"
                ),
            });
        };
        let answer = Answer {
            status,
            retry_after,
            body,
        };
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            let wait = answer
                .retry_after
                .unwrap_or(self.client.settings().default_retry_after);
            self.hold_account(wait);
        }
        Ok(answer)
    }

    /// The error of a non-success answer. Whatever DPC wrote back is cleaned of the
    /// credentials, the token and the values read from Secrets first (in every encoding
    /// they could be echoed in), before anything is parsed or cut short.
    fn api_error(
        &self,
        operation: Operation,
        answer: Answer,
        token: Option<&SecretString>,
    ) -> DpcError {
        let credentials = &self.state.credentials;
        let secrets = [&credentials.client_id, &credentials.client_secret]
            .into_iter()
            .chain(token)
            .chain(self.secrets.iter());
        let clean = redact(&String::from_utf8_lossy(&answer.body), secrets);
        let problem = Problem::parse(clean.as_bytes()).map(Box::new);
        let body_excerpt = match problem {
            Some(_) => None,
            None if answer.status.is_redirection() => Some(
                "a redirect, which is never followed (it would carry the credentials and values along); set apiUrl or tokenUrl to the address that answers".into(),
            ),
            None => excerpt(clean.as_bytes()),
        };
        let retry_after = match answer.status {
            StatusCode::TOO_MANY_REQUESTS => Some(
                answer
                    .retry_after
                    .unwrap_or(self.client.settings().default_retry_after),
            ),
            _ => answer.retry_after,
        };
        DpcError::Api {
            operation,
            status: answer.status.as_u16(),
            problem,
            body_excerpt,
            retry_after,
        }
    }
}

fn ensure_scheme(url: &Url, allow_insecure_http: bool) -> Result<(), DpcError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure_http => Ok(()),
        _ => Err(DpcError::Misconfigured(format!(
            "refusing to call {} over plain http; start the operator with --allow-insecure-http to allow it",
            url.host_str().unwrap_or("?")
        ))),
    }
}

/// A bounded outcome label for an HTTP status.
fn status_outcome(status: u16) -> &'static str {
    match status {
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        422 => "422",
        429 => "429",
        402 | 405..=408 | 410..=421 | 423..=428 | 430..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// A name no server could read differently in a comma-separated query list.
fn is_plain_name(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.' | '~'))
}

fn encode(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// The start of a non-problem error body, for the condition message (HTML error pages are
/// reduced to a note, not pasted).
fn excerpt(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text.starts_with('<') {
        return Some("(an HTML page)".into());
    }
    let mut short: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        short.push('…');
    }
    Some(short.replace(['\n', '\r'], " "))
}

/// Reads an answer's body, at most `limit` bytes: `None` when it is longer (a declared
/// `Content-Length` over the limit is refused before reading anything).
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<bytes::Bytes>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Ok(None);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// `Retry-After` as delay-seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs >= 0.0 && secs.is_finite())
            .then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())));
    }
    let when = k8s_openapi::jiff::fmt::rfc2822::parse(value)
        .ok()?
        .timestamp();
    let now = k8s_openapi::jiff::Timestamp::now();
    let wait = when.duration_since(now);
    Some(
        Duration::try_from(wait)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CredentialsSecretRef, Region};

    fn spec() -> DpcAccountSpec {
        DpcAccountSpec {
            region: Some(Region::Eu1),
            api_url: None,
            token_url: None,
            audience: None,
            credentials_secret_ref: CredentialsSecretRef {
                name: "creds".into(),
                namespace: None,
                client_id_key: "client_id".into(),
                client_secret_key: "client_secret".into(),
            },
            account_id: None,
            requests_per_minute: None,
            request_burst: None,
        }
    }

    #[test]
    fn region_gives_the_documented_urls() {
        let endpoint = Endpoint::for_account(&spec(), &ClientSettings::default()).unwrap();
        assert_eq!(
            endpoint.api_url.as_str(),
            "https://eu1.api.matillion.com/dpc"
        );
        assert_eq!(endpoint.token_url.as_str(), DEFAULT_TOKEN_URL);
        assert_eq!(endpoint.audience, DEFAULT_AUDIENCE);
    }

    #[test]
    fn api_url_overrides_region_and_http_needs_the_flag() {
        let mut s = spec();
        s.api_url = Some("http://127.0.0.1:9/dpc".into());
        let local = |insecure| ClientSettings {
            allow_insecure_http: insecure,
            allowed_hosts: vec!["127.0.0.1".into(), "x".into(), "*.matillion.com".into()],
            ..ClientSettings::default()
        };
        let refused = Endpoint::for_account(&s, &local(false)).unwrap_err();
        assert!(refused.contains("plain http"), "{refused}");
        assert!(refused.contains("--allow-insecure-http"), "{refused}");
        let allowed = Endpoint::for_account(&s, &local(true)).unwrap();
        assert_eq!(allowed.api_url.as_str(), "http://127.0.0.1:9/dpc");
        s.api_url = Some("ftp://x".into());
        assert!(
            Endpoint::for_account(&s, &local(true))
                .unwrap_err()
                .contains("scheme ftp")
        );
    }

    #[test]
    fn only_allowed_hosts_may_be_named() {
        let settings = ClientSettings::default();
        for host in [
            "id.core.matillion.com",
            "eu1.api.matillion.com",
            "US1.API.Matillion.com.",
        ] {
            assert!(settings.host_allowed(host), "{host}");
        }
        for host in [
            "matillion.com.evil.io",
            "evilmatillion.com",
            "127.0.0.1",
            "",
            "matillion.com",
        ] {
            assert!(!settings.host_allowed(host), "{host}");
        }
        let mut s = spec();
        s.token_url = Some("https://collector.evil.example/token".into());
        let refused = Endpoint::for_account(&s, &settings).unwrap_err();
        assert!(
            refused.contains("tokenUrl names host \"collector.evil.example\""),
            "{refused}"
        );
        assert!(refused.contains("--dpc-allowed-hosts"), "{refused}");
    }

    #[test]
    fn huge_retry_after_is_capped_at_an_hour() {
        assert_eq!(parse_retry_after("1e300"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("99999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("inf"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(
            parse_retry_after("Tue, 31 Dec 2999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 1.5 "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later =
            k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(60);
        let text = k8s_openapi::jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&later)
            .unwrap();
        let wait = parse_retry_after(&text).unwrap();
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("Sales, EU"), "Sales%2C%20EU");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode("x/y&z=1+2"), "x%2Fy%26z%3D1%2B2");
    }

    #[test]
    fn error_excerpts_are_short_and_skip_html() {
        assert_eq!(
            excerpt(b"<html><body>502</body></html>").unwrap(),
            "(an HTML page)"
        );
        assert_eq!(excerpt(b"  ").as_deref(), None);
        let long = "x".repeat(500);
        assert_eq!(excerpt(long.as_bytes()).unwrap().chars().count(), 201);
    }
}
