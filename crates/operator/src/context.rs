//! The [`Context`] every reconcile shares: the clients, the configuration, the indexes and
//! caches the watches keep in step, the per-object state kept between passes, and the Event
//! publisher.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::Event as KubeEvent;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use rand::Rng;
use tracing::warn;

use crate::accounts::AccountCache;
use crate::api::conditions::Reason;
use crate::api::{ConnectionOverride, FINALIZER};
use crate::claims::Claims;
use crate::config::OperatorConfig;
use crate::dpc::{AccountKey, ClientSettings, DpcClient};
use crate::drift::DriftChecker;
use crate::index::{RefIndex, account_of};
use crate::key::ObjKey;
use crate::metrics::Metrics;

/// A ConnectionOverride as the controllers queue it.
pub type GuardRef = ObjectRef<DeserializeGuard<ConnectionOverride>>;

/// Everything a reconcile needs, built once by [`Context::new`] for the binary and the tests.
pub struct Context {
    pub client: Client,
    pub dpc: DpcClient,
    /// Events wait here for the publisher task: a reconcile does not wait for them.
    events: tokio::sync::mpsc::Sender<(KubeEvent, ObjectReference)>,
    pub config: OperatorConfig,
    /// ConnectionOverrides by what they refer to.
    pub index: RefIndex,
    /// DpcAccounts by their credentials Secret.
    pub account_index: RefIndex,
    /// What is kept about each object between passes (backoff, a refused request, the hash
    /// last written); forgetting an object is one call, [`Context::forget`].
    pub objects: ObjectStates,
    pub metrics: Arc<Metrics>,
    /// Which object manages which remote override.
    pub claims: Claims,
    /// Resolved accounts, kept in step by the watches.
    pub accounts: AccountCache,
    /// Reads DPC back on each object's sync interval.
    pub drift: Arc<DriftChecker>,
    /// The ConnectionOverride controllers' queues, one per watched scope.
    triggers: Mutex<Vec<(Option<String>, UnboundedSender<GuardRef>)>>,
    /// The account controllers' queues, for an account whose last user may have gone.
    account_triggers: Mutex<Vec<UnboundedSender<AccountKey>>>,
    /// The ConnectionOverride caches, one per watched scope.
    override_stores: Mutex<Vec<reflector::Store<DeserializeGuard<ConnectionOverride>>>>,
    pending_scopes: AtomicUsize,
    running: AtomicBool,
    synced: AtomicBool,
    synced_changed: tokio::sync::Notify,
}

impl Context {
    /// The one way to build a context.
    pub fn new(client: Client, config: OperatorConfig) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(config.per_object_metrics));
        let observer: Arc<dyn crate::dpc::CallObserver> = metrics.clone();
        let dpc = DpcClient::with_observer(
            ClientSettings {
                allow_insecure_http: config.allow_insecure_http,
                allowed_hosts: config.allowed_hosts.clone(),
                request_timeout: config.dpc_request_timeout,
                max_admission_wait: config.max_admission_wait,
                ..ClientSettings::default()
            },
            Some(observer),
        );
        let reporter = Reporter {
            controller: config.reporter.clone(),
            instance: config
                .instance
                .clone()
                .unwrap_or_else(|| config.reporter.clone()),
        };
        let config_share_window = config.drift_share_window;
        let cluster_credentials = config.cluster_credentials_namespaces();
        let (events, queue) = tokio::sync::mpsc::channel(4096);
        // Events about a cluster-scoped object (a ClusterDpcAccount) can only go to `default`:
        // kube-apiserver refuses an events.k8s.io/v1 Event about a cluster-scoped object in
        // any namespace but `default` and `kube-system`. `kubectl describe` finds them there.
        let cluster_events_namespace = "default".to_string();
        tokio::spawn(publish_events(
            client.clone(),
            reporter,
            cluster_events_namespace,
            queue,
        ));
        Arc::new(Self {
            events,
            objects: ObjectStates::new(config.backoff_base, config.backoff_max),
            client,
            dpc,
            config,
            index: RefIndex::default(),
            account_index: RefIndex::default(),
            metrics,
            running: AtomicBool::new(false),
            claims: Claims::default(),
            accounts: AccountCache::new(Duration::from_secs(60), cluster_credentials),
            drift: Arc::new(DriftChecker::new(config_share_window)),
            triggers: Mutex::new(Vec::new()),
            account_triggers: Mutex::new(Vec::new()),
            override_stores: Mutex::new(Vec::new()),
            pending_scopes: AtomicUsize::new(0),
            synced: AtomicBool::new(false),
            synced_changed: tokio::sync::Notify::new(),
        })
    }

    /// Queues an Event for publishing. Events are informational: when the queue is full (a
    /// very busy API server) the Event is dropped with a warning rather than slowing
    /// reconciles.
    pub fn publish(&self, event: KubeEvent, reference: ObjectReference) {
        if self.events.try_send((event, reference)).is_err() {
            warn!("the Event queue is full; an Event was dropped");
        }
    }

    /// Whether the controllers are running (false on a follower waiting for the lease).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Whether every watch of ConnectionOverrides has delivered its first list.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Waits until [`Context::is_synced`].
    pub async fn wait_synced(&self) {
        loop {
            let changed = self.synced_changed.notified();
            if self.is_synced() {
                return;
            }
            changed.await;
        }
    }

    /// Starts a term of running the controllers over `scopes` watched scopes. A replica
    /// leading again starts afresh: the queues and caches of its last term are gone, and
    /// another replica may have written status meanwhile.
    pub(crate) fn begin_term(&self, scopes: usize) {
        self.pending_scopes.store(scopes, Ordering::Release);
        self.synced.store(scopes == 0, Ordering::Release);
        self.triggers.lock().expect("triggers lock").clear();
        self.account_triggers.lock().expect("triggers lock").clear();
        self.override_stores.lock().expect("stores lock").clear();
        self.objects.forget_applied_hashes();
        self.running.store(true, Ordering::Release);
    }

    /// Ends the term [`Context::begin_term`] started.
    pub(crate) fn end_term(&self) {
        self.running.store(false, Ordering::Release);
    }

    /// Wires the queue and the cache of the ConnectionOverride controller of one scope.
    pub(crate) fn add_scope(
        &self,
        scope: Option<String>,
        trigger: UnboundedSender<GuardRef>,
        store: reflector::Store<DeserializeGuard<ConnectionOverride>>,
    ) {
        self.triggers
            .lock()
            .expect("triggers lock")
            .push((scope, trigger));
        self.override_stores
            .lock()
            .expect("stores lock")
            .push(store);
    }

    /// Wires the queue of an account controller.
    pub(crate) fn add_account_trigger(&self, trigger: UnboundedSender<AccountKey>) {
        self.account_triggers
            .lock()
            .expect("triggers lock")
            .push(trigger);
    }

    pub(crate) fn scope_synced(&self) {
        if self.pending_scopes.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.synced.store(true, Ordering::Release);
            self.synced_changed.notify_waiters();
        }
    }

    /// Forgets everything kept about an object that is gone: its state between passes, what
    /// it refers to, its drift checks, its rate-limit tickets and its metric series.
    pub fn forget(&self, key: &ObjKey) {
        self.objects.forget(key);
        self.index.remove(key);
        self.drift.unregister(key);
        self.dpc.forget_object(key);
        self.metrics.forget_object(&key.0, &key.1);
    }

    /// Asks for a reconcile of an object now.
    pub fn trigger(&self, key: &ObjKey) {
        let triggers = self.triggers.lock().expect("triggers lock");
        for (scope, sender) in triggers.iter() {
            if scope.as_deref().is_none_or(|ns| ns == key.0) {
                let _ = sender.unbounded_send(ObjectRef::new(&key.1).within(&key.0));
            }
        }
    }

    /// Asks for a reconcile of an account now.
    pub fn trigger_account(&self, key: &AccountKey) {
        for sender in self.account_triggers.lock().expect("triggers lock").iter() {
            let _ = sender.unbounded_send(key.clone());
        }
    }

    /// The ConnectionOverrides that still need `account` to delete their remote override:
    /// those that name it and hold the cleanup finalizer.
    pub fn account_users(&self, account: &AccountKey) -> Vec<ObjKey> {
        let stores = self.override_stores.lock().expect("stores lock");
        let mut users: Vec<ObjKey> = stores
            .iter()
            .flat_map(|store| store.state())
            .filter_map(|guard| {
                let cov = guard.0.as_ref().ok()?;
                let holds = cov.finalizers().iter().any(|f| f == FINALIZER);
                (holds && account_of(cov) == *account).then(|| {
                    (
                        cov.metadata.namespace.clone().unwrap_or_default(),
                        cov.metadata.name.clone().unwrap_or_default(),
                    )
                })
            })
            .collect();
        users.sort();
        users
    }

    /// Keeps the claims index in step with the watch of one scope.
    pub(crate) fn observe_event(
        &self,
        scope: Option<&str>,
        event: &watcher::Event<DeserializeGuard<ConnectionOverride>>,
        relist: &Mutex<Option<HashSet<ObjKey>>>,
        first_sync: &AtomicBool,
    ) {
        let key_of = |obj: &DeserializeGuard<ConnectionOverride>| {
            let meta = obj.meta();
            (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            )
        };
        let mut triggers = Vec::new();
        match event {
            watcher::Event::Init => *relist.lock().expect("relist lock") = Some(HashSet::new()),
            watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                if let Some(seen) = relist.lock().expect("relist lock").as_mut() {
                    seen.insert(key_of(obj));
                }
                if let Ok(cov) = &obj.0 {
                    triggers = self.claims.observe(cov);
                }
            }
            watcher::Event::Delete(obj) => {
                let key = key_of(obj);
                self.forget(&key);
                triggers = self.claims.remove(&key);
                // Its account may be waiting for its last user to go.
                if let Ok(cov) = &obj.0 {
                    self.trigger_account(&account_of(cov));
                }
            }
            watcher::Event::InitDone => {
                // Objects that vanished while the watch was down no longer claim anything.
                if let Some(seen) = relist.lock().expect("relist lock").take() {
                    for key in self.claims.keys() {
                        let in_scope = scope.is_none_or(|ns| ns == key.0);
                        if in_scope && !seen.contains(&key) {
                            triggers.extend(self.claims.remove(&key));
                        }
                    }
                }
                if !first_sync.swap(true, Ordering::AcqRel) {
                    self.scope_synced();
                }
            }
        }
        for key in triggers {
            self.trigger(&key);
        }
    }

    /// The resync delay, jittered by ±10 % so objects created together spread out.
    pub fn resync(&self) -> Action {
        Action::requeue(
            self.config
                .resync_interval
                .mul_f64(rand::rng().random_range(0.9..1.1)),
        )
    }
}

/// The request a terminal failure was for. DPC is not asked again until the request (its
/// hash), the account (its fingerprint) or the mode changes; an object the operator cannot
/// read is not reported again until its generation or the error changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Request {
        hash: String,
        account: String,
        observe_only: bool,
    },
    Unreadable {
        generation: i64,
        error: String,
    },
}

/// A terminal failure: the request it was for and how it was reported.
#[derive(Clone, Debug)]
struct Refusal {
    gate: Gate,
    reason: Reason,
    message: String,
}

/// What the operator keeps about one object between passes.
#[derive(Default)]
struct ObjectState {
    /// Failures in a row: the exponent of the backoff.
    failures: u32,
    refusal: Option<Refusal>,
    /// `(hash of the uid, hash)` this process last wrote to `status.appliedHash`.
    applied: Option<(u64, Box<str>)>,
}

impl ObjectState {
    fn is_empty(&self) -> bool {
        self.failures == 0 && self.refusal.is_none() && self.applied.is_none()
    }
}

/// The per-object state of every object, in one map: forgetting an object is one call.
pub struct ObjectStates {
    backoff_base: Duration,
    backoff_max: Duration,
    inner: Mutex<HashMap<ObjKey, ObjectState>>,
}

impl ObjectStates {
    pub fn new(backoff_base: Duration, backoff_max: Duration) -> Self {
        Self {
            backoff_base,
            backoff_max,
            inner: Mutex::new(HashMap::new()),
        }
    }

    fn update<T>(&self, key: &ObjKey, change: impl FnOnce(&mut ObjectState) -> T) -> T {
        let mut inner = self.inner.lock().expect("object states lock");
        let state = inner.entry(key.clone()).or_default();
        let out = change(state);
        if state.is_empty() {
            inner.remove(key);
        }
        out
    }

    fn read<T>(&self, key: &ObjKey, look: impl FnOnce(&ObjectState) -> Option<T>) -> Option<T> {
        let inner = self.inner.lock().expect("object states lock");
        inner.get(key).and_then(look)
    }

    /// The delay before the next attempt after a failure: base × 2^failures, capped, ±20 %
    /// jitter. Counts the failure.
    pub fn next_backoff(&self, key: &ObjKey) -> Duration {
        let failures = self.update(key, |state| {
            state.failures = state.failures.saturating_add(1);
            state.failures - 1
        });
        let exp = self.backoff_base.saturating_mul(1u32 << failures.min(20));
        exp.min(self.backoff_max)
            .mul_f64(rand::rng().random_range(0.8..1.2))
    }

    /// A success: the next failure starts the backoff again from its base.
    pub fn reset_backoff(&self, key: &ObjKey) {
        self.update(key, |state| state.failures = 0);
    }

    /// Records a terminal failure of the request `gate` describes.
    pub fn refuse(&self, key: &ObjKey, gate: Gate, reason: Reason, message: String) {
        self.update(key, |state| {
            state.refusal = Some(Refusal {
                gate,
                reason,
                message,
            })
        });
    }

    /// The terminal failure recorded for this same request, if any.
    pub fn refused(&self, key: &ObjKey, gate: &Gate) -> Option<(Reason, String)> {
        self.read(key, |state| {
            let refusal = state.refusal.as_ref().filter(|r| r.gate == *gate)?;
            Some((refusal.reason, refusal.message.clone()))
        })
    }

    /// A request went through: no refusal stands.
    pub fn clear_refusal(&self, key: &ObjKey) {
        self.update(key, |state| state.refusal = None);
    }

    /// Records the hash this process wrote as the object's `status.appliedHash`.
    ///
    /// The watch cache delivers our own status write back some milliseconds later (on a
    /// real API server). A reconcile that runs in that window — a sweep, a Secret change —
    /// would read the object as it was before the write, take the override for unwritten and
    /// send it to DPC again; it takes the hash from here instead when the uid is the same.
    /// Only one process writes status (leader election); a new term starts empty.
    pub fn record_applied(&self, key: &ObjKey, uid: &str, hash: &str) {
        self.update(key, |state| {
            state.applied = Some((hash_of(&uid), hash.into()))
        });
    }

    /// The hash this process last wrote for this object (same uid), if any.
    pub fn applied(&self, key: &ObjKey, uid: &str) -> Option<String> {
        self.read(key, |state| {
            let (u, hash) = state.applied.as_ref()?;
            (*u == hash_of(&uid)).then(|| hash.to_string())
        })
    }

    /// Forgets every recorded applied hash (a new leadership term).
    pub fn forget_applied_hashes(&self) {
        let mut inner = self.inner.lock().expect("object states lock");
        inner.retain(|_, state| {
            state.applied = None;
            !state.is_empty()
        });
    }

    /// Forgets an object.
    pub fn forget(&self, key: &ObjKey) {
        self.inner.lock().expect("object states lock").remove(key);
    }
}

fn hash_of<T: Hash>(value: &T) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// Who reports Events.
#[derive(Clone)]
struct Reporter {
    controller: String,
    instance: String,
}

/// Publishes queued Events (`events.k8s.io/v1`) in order until every sender is gone. Nothing
/// is cached: Events are published on transitions, so there is little to aggregate, and a
/// cache of every object's last Event would grow with the number of objects.
async fn publish_events(
    client: Client,
    reporter: Reporter,
    cluster_events_namespace: String,
    mut queue: tokio::sync::mpsc::Receiver<(KubeEvent, ObjectReference)>,
) {
    use k8s_openapi::api::events::v1::Event;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    while let Some((event, reference)) = queue.recv().await {
        let now = k8s_openapi::jiff::Timestamp::now();
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| cluster_events_namespace.clone());
        let name = format!(
            "{}.{:x}",
            reference.name.as_deref().unwrap_or(&reporter.controller),
            now.as_nanosecond()
        );
        let record = Event {
            metadata: kube::api::ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            action: Some(event.action),
            reason: Some(event.reason),
            note: event.note,
            type_: Some(match event.type_ {
                kube::runtime::events::EventType::Normal => "Normal".into(),
                kube::runtime::events::EventType::Warning => "Warning".into(),
            }),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference),
            reporting_controller: Some(reporter.controller.clone()),
            reporting_instance: Some(reporter.instance.clone()),
            ..Default::default()
        };
        let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
        if let Err(e) = api.create(&kube::api::PostParams::default(), &record).await {
            warn!(error = %e, "could not publish an Event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjKey {
        ("ns".into(), name.into())
    }

    fn request(hash: &str) -> Gate {
        Gate::Request {
            hash: hash.into(),
            account: "fp".into(),
            observe_only: false,
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_a_success_starts_it_again() {
        let states = ObjectStates::new(Duration::from_secs(1), Duration::from_secs(8));
        let delays: Vec<Duration> = (0..6).map(|_| states.next_backoff(&key("a"))).collect();
        // ±20 % jitter around 1, 2, 4, 8, 8, 8 seconds.
        for (delay, base) in delays.iter().zip([1.0, 2.0, 4.0, 8.0, 8.0, 8.0]) {
            let seconds = delay.as_secs_f64();
            assert!(seconds >= base * 0.8 && seconds <= base * 1.2, "{delays:?}");
        }
        // Another object has its own count.
        assert!(states.next_backoff(&key("b")) <= Duration::from_millis(1200));
        states.reset_backoff(&key("a"));
        assert!(states.next_backoff(&key("a")) <= Duration::from_millis(1200));
    }

    #[test]
    fn a_refusal_stands_for_the_same_request_only() {
        let states = ObjectStates::new(Duration::from_secs(1), Duration::from_secs(8));
        states.refuse(&key("a"), request("h1"), Reason::ApiRejected, "no".into());
        assert_eq!(
            states.refused(&key("a"), &request("h1")),
            Some((Reason::ApiRejected, "no".to_string()))
        );
        assert_eq!(states.refused(&key("a"), &request("h2")), None);
        let observing = Gate::Request {
            hash: "h1".into(),
            account: "fp".into(),
            observe_only: true,
        };
        assert_eq!(states.refused(&key("a"), &observing), None);
        assert_eq!(states.refused(&key("b"), &request("h1")), None);
        states.clear_refusal(&key("a"));
        assert_eq!(states.refused(&key("a"), &request("h1")), None);
    }

    #[test]
    fn an_applied_hash_is_kept_per_uid_and_forgetting_an_object_drops_everything() {
        let states = ObjectStates::new(Duration::from_secs(1), Duration::from_secs(8));
        states.record_applied(&key("a"), "uid-1", "sha256:1");
        assert_eq!(
            states.applied(&key("a"), "uid-1").as_deref(),
            Some("sha256:1")
        );
        // A new object of the same name is another object.
        assert_eq!(states.applied(&key("a"), "uid-2"), None);
        states.next_backoff(&key("a"));
        states.refuse(&key("a"), request("h"), Reason::ApiRejected, "no".into());
        states.forget(&key("a"));
        assert_eq!(states.applied(&key("a"), "uid-1"), None);
        assert_eq!(states.refused(&key("a"), &request("h")), None);
        assert!(states.next_backoff(&key("a")) <= Duration::from_millis(1200));
        // A new leadership term forgets the hashes but keeps the rest.
        states.record_applied(&key("b"), "uid-b", "sha256:b");
        states.refuse(&key("b"), request("h"), Reason::ApiRejected, "no".into());
        states.forget_applied_hashes();
        assert_eq!(states.applied(&key("b"), "uid-b"), None);
        assert!(states.refused(&key("b"), &request("h")).is_some());
        assert!(states.inner.lock().unwrap().len() <= 2);
    }
}
