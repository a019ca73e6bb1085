//! The operator's watches: list, then watch from the list's resourceVersion, yielding the
//! events kube-runtime's `watcher` yields (so reflectors and controllers take them), with
//! what a controller needs to ride out its API server:
//!
//! - **Its own backoff per watch**: 0.5 s doubling to 5 s, reset by the next event. A
//!   failure of one watch never pauses another (kube-runtime's controller shares one backoff
//!   over all its triggers; the controllers turn it off, see `controller.rs`).
//! - **Back at once**: a watch waiting to retry wakes when the one probe of `/readyz`
//!   ([`health::Watches`]) sees the API server answer again after it stopped answering, so
//!   every watch retries within the probe's interval (0.5 s) of the server's return, not at
//!   the end of its backoff. A request on its way at that moment that fails on a server
//!   still starting retries at once too, and for 10 s after a return a failing watch
//!   retries every 0.5 s (a restarted server ends watches while its caches fill).
//! - **A bounded cost while the server is down**: each watch makes at most one request per
//!   5 s after its first four retries (0.5, 1, 2, 4 s), and the probe two per second.
//! - **410 Gone relists at the newest version**: after a `410` the list is a consistent
//!   read (no resourceVersion), as client-go's reflector does, so the watch that follows
//!   starts from a version the server still holds; a list at `resourceVersion=0` may be
//!   served by a watch cache that restarted older than the version that expired. A watch
//!   that answers 410 again right after a list backs off rather than loop.
//! - **Seen to be alive**: bookmarks (the server sends one about every minute) count as
//!   progress; a watch with no event and no bookmark for [`IDLE_TIMEOUT`] is started again.
//!   Each watch reports its last progress, how long it has failed and its restarts
//!   ([`health::WatchHealth`]).
//!
//! Errors are not passed on: they are logged, counted and retried here.

pub mod health;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use kube::api::{ListParams, WatchEvent, WatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

pub use health::{Restart, WatchHealth, Watches};

/// The first retry delay of a failing watch.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// The longest retry delay of a failing watch.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long after the API server's return a failing watch keeps retrying every
/// [`BACKOFF_BASE`]: at most 20 requests per watch.
const SETTLING: Duration = Duration::from_secs(10);
/// A watch with no event and no bookmark for this long is started again (the server sends
/// a bookmark about once a minute; kube-apiserver ends a watch after `timeoutSeconds`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(150);
/// The server ends each watch after this long (it is then resumed from its version).
const WATCH_TIMEOUT_SECS: u32 = 290;
/// A watch closed sooner than this without an event counts as a failure (no busy loop on a
/// server that ends every watch at once).
const SHORT_WATCH: Duration = Duration::from_secs(1);
const PAGE_SIZE: u32 = 500;
/// The annotation of the bookmark that ends a streaming list.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// What a watch selects.
#[derive(Clone, Debug, Default)]
pub struct Selectors {
    pub labels: Option<String>,
    pub fields: Option<String>,
}

/// Where the watch is.
enum Phase<K> {
    /// List (from its first page when there is no continue token): at `resourceVersion=0`
    /// the first time, consistently after a 410.
    List {
        consistent: bool,
        continue_token: Option<String>,
    },
    /// Start a watch from this version.
    Watch {
        version: String,
        after_list: bool,
    },
    Watching(Open<K>),
}

/// A watch the server accepted, being read.
struct Open<K> {
    version: String,
    stream: futures::stream::BoxStream<'static, kube::Result<WatchEvent<K>>>,
    started: Instant,
    seen_event: bool,
    /// Started from the version of a list that had just completed.
    after_list: bool,
    /// Streaming the initial state (`sendInitialEvents`): its objects are the list's, and
    /// the bookmark that ends it carries the version to go on from.
    initial: bool,
}

impl<K> Open<K> {
    /// Nothing arrived since the list this watch started from: a 410 now means the list's
    /// version was already too old.
    fn fresh(&self) -> bool {
        self.after_list && !self.seen_event
    }

    /// Watch again from the last version seen; an initial stream that ended early starts
    /// over (its objects came in no order of version).
    fn rewatch(self) -> Phase<K> {
        if self.initial {
            return Phase::List {
                consistent: true,
                continue_token: None,
            };
        }
        Phase::Watch {
            version: self.version,
            after_list: false,
        }
    }
}

struct Watcher<K: Clone> {
    api: Api<K>,
    selectors: Selectors,
    phase: Phase<K>,
    out: VecDeque<Event<K>>,
    /// The delay before the next retry, if the last request failed.
    retry_in: Option<Duration>,
    backoff: Duration,
    /// The probe's count of the API server's returns when the current request began.
    returns_seen: u64,
    health: std::sync::Arc<WatchHealth>,
    watches: std::sync::Arc<Watches>,
    /// Get the initial state as a stream of watch events rather than a paged list.
    streaming: bool,
}

/// The watch `name` of `api`, registered in `watches`.
pub fn watch<K>(
    watches: &std::sync::Arc<Watches>,
    name: String,
    api: Api<K>,
    selectors: Selectors,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + use<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    watch_with(watches, name, api, selectors, Initial::List)
}

/// How a watch gets the initial state (and each relist's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initial {
    /// A list, page by page.
    List,
    /// One watch with `sendInitialEvents` (a streaming list, kube-apiserver 1.34 and later
    /// by default): one object at a time, never a page of them, so objects that may be
    /// large (Secrets: a Helm release is up to 1 MiB) never sit in memory together. A
    /// server that refuses it (400, 422: no `WatchList`) is listed page by page instead.
    Stream,
}

/// As [`watch`], with the initial state got as `initial` says.
pub fn watch_with<K>(
    watches: &std::sync::Arc<Watches>,
    name: String,
    api: Api<K>,
    selectors: Selectors,
    initial: Initial,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + use<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let state = Watcher {
        streaming: initial == Initial::Stream,
        api,
        selectors,
        phase: Phase::List {
            consistent: false,
            continue_token: None,
        },
        out: VecDeque::new(),
        retry_in: None,
        backoff: BACKOFF_BASE,
        returns_seen: watches.returns(),
        health: watches.register(name),
        watches: watches.clone(),
    };
    futures::stream::unfold(state, |mut state| async move {
        let event = state.next_event().await;
        Some((Ok(event), state))
    })
}

impl<K> Watcher<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    async fn next_event(&mut self) -> Event<K> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return event;
            }
            if let Some(delay) = self.retry_in.take()
                && self.watches.pause(delay, self.returns_seen).await
            {
                // The server is back: the next failure starts the backoff over.
                self.backoff = BACKOFF_BASE;
            }
            self.returns_seen = self.watches.returns();
            let placeholder = Phase::List {
                consistent: true,
                continue_token: None,
            };
            let phase = std::mem::replace(&mut self.phase, placeholder);
            self.phase = match phase {
                Phase::List {
                    consistent,
                    continue_token,
                } => self.list(consistent, continue_token).await,
                Phase::Watch {
                    version,
                    after_list,
                } => self.start(version, after_list).await,
                Phase::Watching(open) => self.step(open).await,
            };
        }
    }

    fn failed(&mut self, error: &dyn std::fmt::Display) {
        self.health.failed(&error.to_string());
        self.health.restarted(Restart::Failed);
        self.retry_in = Some(self.backoff);
        // Just after the API server came back it may end or refuse watches for a few seconds
        // while its caches fill: retry at the first step's pace then, not ever more slowly.
        if !self.watches.returned_within(SETTLING) {
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn progressed(&mut self) {
        self.health.progressed();
        self.backoff = BACKOFF_BASE;
    }

    /// One page of the list: its objects are passed on at once (the next page is asked
    /// for when they are consumed), so no more than a page of full objects is held.
    async fn list(&mut self, consistent: bool, continue_token: Option<String>) -> Phase<K> {
        if self.streaming && continue_token.is_none() {
            return self.stream_initial(consistent).await;
        }
        let mut params = ListParams {
            label_selector: self.selectors.labels.clone(),
            field_selector: self.selectors.fields.clone(),
            limit: Some(PAGE_SIZE),
            continue_token: continue_token.clone(),
            ..ListParams::default()
        };
        if !consistent {
            params = params.match_any();
        }
        let page = match self.api.list(&params).await {
            Ok(page) => page,
            Err(e) => {
                // A continue token too old (410) or any failure: the list starts over,
                // consistently, after the backoff (a new `Init` drops what was passed on).
                self.failed(&e);
                return Phase::List {
                    consistent: true,
                    continue_token: None,
                };
            }
        };
        let version = page.metadata.resource_version.unwrap_or_default();
        let next = page.metadata.continue_.filter(|c| !c.is_empty());
        if next.is_none() && version.is_empty() {
            self.failed(&"the list had no resourceVersion");
            return Phase::List {
                consistent,
                continue_token: None,
            };
        }
        if continue_token.is_none() {
            self.out.push_back(Event::Init);
        }
        self.out
            .extend(page.items.into_iter().map(Event::InitApply));
        if let Some(token) = next {
            return Phase::List {
                consistent,
                continue_token: Some(token),
            };
        }
        self.out.push_back(Event::InitDone);
        self.health.progressed();
        self.backoff = BACKOFF_BASE;
        Phase::Watch {
            version,
            after_list: true,
        }
    }

    fn watch_params(&self) -> WatchParams {
        // Bookmarks are on by default.
        let mut params = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
        params.label_selector = self.selectors.labels.clone();
        params.field_selector = self.selectors.fields.clone();
        params
    }

    /// The initial state as a watch with `sendInitialEvents`: at any version the first
    /// time (the watch cache), consistently after a 410.
    async fn stream_initial(&mut self, consistent: bool) -> Phase<K> {
        let mut params = self.watch_params();
        params.send_initial_events = true;
        let version = if consistent { "" } else { "0" };
        match self.api.watch(&params, version).await {
            Ok(stream) => {
                self.health.progressed();
                self.out.push_back(Event::Init);
                Phase::Watching(Open {
                    version: String::new(),
                    stream: stream.boxed(),
                    started: Instant::now(),
                    seen_event: false,
                    after_list: true,
                    initial: true,
                })
            }
            Err(kube::Error::Api(status)) if status.code == 400 || status.code == 422 => {
                tracing::info!(watch = %self.health.name, answer = %status, "the API server does not stream lists; listing page by page");
                self.streaming = false;
                Phase::List {
                    consistent,
                    continue_token: None,
                }
            }
            Err(e) => {
                self.failed(&e);
                Phase::List {
                    consistent: true,
                    continue_token: None,
                }
            }
        }
    }

    /// An event of an initial stream: an object of the list, or the bookmark that ends it.
    fn initial_event(&mut self, mut open: Open<K>, event: WatchEvent<K>) -> Phase<K> {
        match event {
            WatchEvent::Added(obj) | WatchEvent::Modified(obj) => {
                self.out.push_back(Event::InitApply(obj));
            }
            WatchEvent::Bookmark(bookmark)
                if bookmark
                    .metadata
                    .annotations
                    .get(INITIAL_EVENTS_END)
                    .is_some_and(|v| v == "true") =>
            {
                open.version = bookmark.metadata.resource_version;
                open.initial = false;
                self.out.push_back(Event::InitDone);
                self.health.progressed();
                self.backoff = BACKOFF_BASE;
                return Phase::Watching(open);
            }
            WatchEvent::Bookmark(_) | WatchEvent::Deleted(_) => {}
            WatchEvent::Error(status) if status.code == 410 => return self.gone(false, &status),
            WatchEvent::Error(status) => {
                self.failed(&status);
                return open.rewatch();
            }
        }
        self.health.progressed();
        Phase::Watching(open)
    }

    async fn start(&mut self, version: String, after_list: bool) -> Phase<K> {
        match self.api.watch(&self.watch_params(), &version).await {
            Ok(stream) => {
                self.health.progressed();
                Phase::Watching(Open {
                    version,
                    stream: stream.boxed(),
                    started: Instant::now(),
                    seen_event: false,
                    after_list,
                    initial: false,
                })
            }
            Err(kube::Error::Api(status)) if status.code == 410 => self.gone(after_list, &status),
            Err(e) => {
                // A failed start ends "right after a list": a 410 once the server is back
                // means the server restarted, not that the list's version was stale.
                self.failed(&e);
                Phase::Watch {
                    version,
                    after_list: false,
                }
            }
        }
    }

    /// `410 Gone`: list again, consistently; at once, unless the watch of a fresh list
    /// already failed so (then after the backoff: never a loop).
    fn gone(&mut self, after_list: bool, status: &dyn std::fmt::Display) -> Phase<K> {
        if after_list {
            self.failed(status);
        } else {
            tracing::debug!(watch = %self.health.name, "resourceVersion expired (410); listing again");
        }
        self.health.restarted(Restart::Gone);
        Phase::List {
            consistent: true,
            continue_token: None,
        }
    }

    async fn step(&mut self, mut open: Open<K>) -> Phase<K> {
        let event = match tokio::time::timeout(IDLE_TIMEOUT, open.stream.next()).await {
            Err(_) => {
                self.health.restarted(Restart::Idle);
                return open.rewatch();
            }
            Ok(None) => {
                if !open.seen_event && open.started.elapsed() < SHORT_WATCH {
                    self.failed(&"the server ended the watch at once");
                }
                return open.rewatch();
            }
            // kube-client passes an ERROR event it cannot read as a watch event as an error:
            // a 410 comes either way.
            Ok(Some(Err(kube::Error::Api(status)))) if status.code == 410 => {
                return self.gone(open.fresh(), &status);
            }
            Ok(Some(Err(e))) => {
                self.failed(&e);
                return open.rewatch();
            }
            Ok(Some(Ok(event))) => event,
        };
        if open.initial {
            return self.initial_event(open, event);
        }
        match event {
            WatchEvent::Added(obj) | WatchEvent::Modified(obj) => {
                open.version = obj.meta().resource_version.clone().unwrap_or(open.version);
                self.out.push_back(Event::Apply(obj));
            }
            WatchEvent::Deleted(obj) => {
                open.version = obj.meta().resource_version.clone().unwrap_or(open.version);
                self.out.push_back(Event::Delete(obj));
            }
            WatchEvent::Bookmark(bookmark) => open.version = bookmark.metadata.resource_version,
            WatchEvent::Error(status) if status.code == 410 => {
                return self.gone(open.fresh(), &status);
            }
            WatchEvent::Error(status) => {
                self.failed(&status);
                return open.rewatch();
            }
        }
        open.seen_event = true;
        self.progressed();
        Phase::Watching(open)
    }
}
