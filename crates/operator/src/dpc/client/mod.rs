//! The DPC REST client: one shared HTTP client, and per account a token cache, a request
//! rate and the `Retry-After` gate that holds every call of the account after a 429.
//!
//! `endpoint`: where an account calls (settings, URLs, the host allow-list); `calls`: the
//! override endpoints (create, update, list, delete); `token`: the token cache; `transport`:
//! sending one request (fence, gate, rate, limits on answers, error bodies).

mod calls;
mod endpoint;
mod token;
mod transport;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::error::{DpcError, Operation};
use super::limiter::{RateLimiter, Requester};
use super::secret::SecretString;
use super::types::RemoteOverride;
use crate::key::ObjKey;

pub use endpoint::{
    ClientSettings, DEFAULT_ALLOWED_HOSTS, DEFAULT_AUDIENCE, DEFAULT_TOKEN_URL, Endpoint,
};
pub use token::{MAX_TOKEN_BODY, MAX_TOKEN_LIFETIME};
pub use transport::{MAX_API_BODY, MAX_RETRY_AFTER, parse_retry_after};

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

/// Where an override lives in DPC: behind an API URL (without a trailing `/`), in a project
/// (a UUID, unique in DPC) and an environment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Place {
    pub api_url: String,
    pub project: String,
    pub environment: String,
}

impl Place {
    pub fn new(api_url: &str, project: &str, environment: &str) -> Self {
        Self {
            api_url: api_url.trim_end_matches('/').to_string(),
            project: project.into(),
            environment: environment.into(),
        }
    }
}

/// What a finished write left in DPC for one connection.
#[derive(Clone, Copy, Debug)]
pub enum WriteEffect<'a> {
    /// DPC accepted it and holds this.
    Holds(&'a RemoteOverride),
    /// DPC deleted it (or it was not there).
    Gone,
    /// DPC refused it: nothing changed.
    Unchanged,
    /// No answer says what happened (a timeout, a reset, a 5xx).
    Unknown,
}

/// Sees every write to DPC begin and end, so that what was read of DPC before a write is
/// never taken for what DPC holds after it. Implemented by the drift checker's journal.
pub trait WriteObserver: Send + Sync {
    fn begin(&self, place: &Place, connections: &[&str]);
    fn end(&self, place: &Place, connections: &[&str], effect: WriteEffect<'_>);
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
    writes: Option<Arc<dyn WriteObserver>>,
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
        Self::with_observers(settings, observer, None)
    }

    /// A client that reports every call to `observer` and every write to `writes`.
    pub fn with_observers(
        settings: ClientSettings,
        observer: Option<Arc<dyn CallObserver>>,
        writes: Option<Arc<dyn WriteObserver>>,
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
                writes,
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
            admitted: Arc::new(AtomicBool::new(false)),
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
    /// Set by [`AccountHandle::admitted`]: the next API request has its rate-limit slot.
    admitted: Arc<AtomicBool>,
}

impl fmt::Debug for AccountHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccountHandle")
            .field("account", &self.state.key)
            .field("api_url", &self.state.endpoint.api_url.as_str())
            .finish_non_exhaustive()
    }
}

impl AccountHandle {
    /// The account this handle calls for.
    pub fn key(&self) -> &AccountKey {
        &self.state.key
    }

    /// The same handle, calling on behalf of the object `(namespace, name)`.
    pub fn for_object(&self, namespace: &str, name: &str) -> AccountHandle {
        AccountHandle {
            requester: Some(crate::key::obj_key(namespace, name)),
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

    /// Where an override of this account lives.
    pub fn place(&self, project: &str, environment: &str) -> Place {
        Place::new(self.state.endpoint.api_url.as_str(), project, environment)
    }

    /// The same handle, with the rate-limit slot of its next API request taken (waiting for
    /// a near one) and a token at hand: what happens between this and that request (the
    /// cluster told of a write about to go out) happens only once the request is sure to be
    /// sent. A far slot is `Throttled` and kept as this requester's ticket, as for any call.
    pub async fn admitted(&self, operation: Operation) -> Result<AccountHandle, DpcError> {
        self.check_fence(operation)?;
        self.check_gate(operation)?;
        self.ensure_token().await?;
        self.admit(operation).await?;
        Ok(AccountHandle {
            admitted: Arc::new(AtomicBool::new(true)),
            ..self.clone()
        })
    }

    /// A digest of the account's endpoint and credentials (not reversible): it changes when
    /// either does.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.state.fingerprint[..8])
    }
}
