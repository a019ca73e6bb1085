//! The controller: the shared [`Context`], the watches that trigger reconciles (the
//! ConnectionOverrides themselves, metadata-only watches of Secrets and ConfigMaps through a
//! reverse index, and DpcAccounts), per-object backoff, and the error policy.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::Event as KubeEvent;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Api, Client, Resource, ResourceExt};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{AccountKind, ClusterDpcAccount, ConnectionOverride, DpcAccount, FINALIZER};
use crate::claims::Claims;
use crate::dpc::{AccountKey, ClientSettings, DpcClient};
use crate::drift::DriftChecker;
use crate::metrics::Metrics;
use crate::reconcile::account::AccountObject;
use crate::reconcile::resolve::AccountCache;
use crate::reconcile::{self, resolve::Reference};

/// The operator's settings.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// How many objects are reconciled at once.
    pub concurrency: u16,
    /// Allow plain-http DPC endpoints (tests and the sandbox only).
    pub allow_insecure_http: bool,
    /// The DPC hosts accounts may name (see [`ClientSettings::allowed_hosts`]).
    pub allowed_hosts: Vec<String>,
    /// Export the per-object condition gauge (one series per object and condition).
    pub per_object_metrics: bool,
    /// How often a Ready object is reconciled again locally (no DPC call: drift detection
    /// reads DPC on its own schedule).
    pub resync_interval: Duration,
    /// The sync interval of objects that set none.
    pub default_sync_interval: Duration,
    /// The shortest sync interval honoured (the CRD also refuses less than 30s).
    pub min_sync_interval: Duration,
    /// A list answer younger than this serves immediate reads of other objects too.
    pub drift_share_window: Duration,
    /// Only ConnectionOverrides with these labels (a label selector), for sharding.
    pub label_selector: Option<String>,
    /// A request whose rate-limit slot is further than this is requeued for its slot.
    pub max_admission_wait: Duration,
    /// First delay after a transient failure; it doubles up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Timeout of one DPC request.
    pub dpc_request_timeout: Duration,
    /// The name that reports Events.
    pub reporter: String,
    /// This instance (pod name), in Events.
    pub instance: Option<String>,
    /// The operator's own namespace ($POD_NAMESPACE): where ClusterDpcAccount credentials
    /// live unless `cluster_credentials_namespaces` says otherwise.
    pub operator_namespace: Option<String>,
    /// The namespaces a ClusterDpcAccount's credentials Secret may be in. Empty: the
    /// operator's own namespace only.
    pub cluster_credentials_namespaces: Vec<String>,
}

impl OperatorConfig {
    /// The namespaces ClusterDpcAccount credentials may be read from.
    pub fn cluster_credentials_namespaces(&self) -> Vec<String> {
        if self.cluster_credentials_namespaces.is_empty() {
            self.operator_namespace.iter().cloned().collect()
        } else {
            self.cluster_credentials_namespaces.clone()
        }
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            concurrency: 8,
            allow_insecure_http: false,
            allowed_hosts: ClientSettings::default().allowed_hosts,
            per_object_metrics: true,
            resync_interval: Duration::from_secs(3600),
            default_sync_interval: Duration::from_secs(600),
            min_sync_interval: Duration::from_secs(30),
            drift_share_window: Duration::from_secs(2),
            label_selector: None,
            max_admission_wait: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            dpc_request_timeout: Duration::from_secs(30),
            reporter: "dpc-operator".into(),
            instance: None,
            operator_namespace: None,
            cluster_credentials_namespaces: Vec::new(),
        }
    }
}

/// `(namespace, name)` of an object.
pub type ObjKey = (String, String);

/// Which objects refer to which Secrets, ConfigMaps and accounts, so a change of one of those
/// re-reconciles exactly the objects that use it.
#[derive(Default)]
pub struct RefIndex {
    inner: Mutex<IndexInner>,
}

#[derive(Default)]
struct IndexInner {
    forward: HashMap<ObjKey, Vec<Reference>>,
    reverse: HashMap<Reference, HashSet<ObjKey>>,
}

impl RefIndex {
    /// Records what `object` refers to now.
    pub fn set(&self, object: &ObjKey, refs: Vec<Reference>) {
        let mut inner = self.inner.lock().expect("index lock");
        if inner.forward.get(object) == Some(&refs) {
            return;
        }
        if let Some(old) = inner.forward.remove(object) {
            for r in old {
                if let Some(users) = inner.reverse.get_mut(&r) {
                    users.remove(object);
                    if users.is_empty() {
                        inner.reverse.remove(&r);
                    }
                }
            }
        }
        for r in &refs {
            inner
                .reverse
                .entry(r.clone())
                .or_default()
                .insert(object.clone());
        }
        inner.forward.insert(object.clone(), refs);
    }

    /// Forgets `object`.
    pub fn remove(&self, object: &ObjKey) {
        self.set(object, Vec::new());
        self.inner
            .lock()
            .expect("index lock")
            .forward
            .remove(object);
    }

    /// The objects that refer to `reference`.
    pub fn users(&self, reference: &Reference) -> Vec<ObjKey> {
        let inner = self.inner.lock().expect("index lock");
        inner
            .reverse
            .get(reference)
            .map(|users| users.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Per-object exponential backoff with jitter, reset on success.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempts: Mutex<HashMap<ObjKey, u32>>,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempts: Mutex::new(HashMap::new()),
        }
    }

    /// The delay before the next attempt: base × 2^failures, capped, ±20 % jitter.
    pub fn next(&self, key: &ObjKey) -> Duration {
        let mut attempts = self.attempts.lock().expect("backoff lock");
        let n = attempts.entry(key.clone()).or_default();
        let exp = self.base.saturating_mul(1u32 << (*n).min(20));
        *n += 1;
        let capped = exp.min(self.max);
        capped.mul_f64(rand::rng().random_range(0.8..1.2))
    }

    /// Forgets the failures of `key`.
    pub fn reset(&self, key: &ObjKey) {
        self.attempts.lock().expect("backoff lock").remove(key);
    }

    /// How many failures in a row `key` has had.
    pub fn failures(&self, key: &ObjKey) -> u32 {
        self.attempts
            .lock()
            .expect("backoff lock")
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

/// Terminal failures by object: the request that failed and how it was reported. The same
/// request is not sent again until the spec, a referenced value or the account changes.
#[derive(Default)]
pub struct TerminalFailures {
    inner: Mutex<HashMap<ObjKey, (String, crate::api::conditions::Reason, String)>>,
}

impl TerminalFailures {
    pub fn record(
        &self,
        key: &ObjKey,
        gate: String,
        reason: crate::api::conditions::Reason,
        message: String,
    ) {
        self.inner
            .lock()
            .expect("failures lock")
            .insert(key.clone(), (gate, reason, message));
    }

    /// The recorded failure, if it was for this same request.
    pub fn matching(
        &self,
        key: &ObjKey,
        gate: &str,
    ) -> Option<(crate::api::conditions::Reason, String)> {
        let inner = self.inner.lock().expect("failures lock");
        inner
            .get(key)
            .filter(|(g, _, _)| g == gate)
            .map(|(_, reason, message)| (*reason, message.clone()))
    }

    pub fn clear(&self, key: &ObjKey) {
        self.inner.lock().expect("failures lock").remove(key);
    }
}

/// The request hash this process last wrote to each object's `status.appliedHash`.
///
/// The watch cache delivers our own status write back some milliseconds later (on a real API
/// server; the emulator hid it by answering at once). A reconcile that runs in that window —
/// a sweep, a Secret change — would read the object as it was before the write, take the
/// override for unwritten and send it to DPC again. A reconcile therefore takes the hash from
/// here when it has one for the same object (same uid). Only one process writes status
/// (leader election); a new term starts empty.
#[derive(Default)]
pub struct AppliedHashes {
    inner: Mutex<HashMap<u64, (u64, Box<str>)>>,
}

impl AppliedHashes {
    pub fn record(&self, key: &ObjKey, uid: &str, hash: &str) {
        self.inner
            .lock()
            .expect("applied lock")
            .insert(hash_of(key), (hash_of(&uid), hash.into()));
    }

    /// The hash last written for this object, if this process wrote one.
    pub fn get(&self, key: &ObjKey, uid: &str) -> Option<String> {
        let inner = self.inner.lock().expect("applied lock");
        inner
            .get(&hash_of(key))
            .filter(|(u, _)| *u == hash_of(&uid))
            .map(|(_, hash)| hash.to_string())
    }

    pub fn forget(&self, key: &ObjKey) {
        self.inner
            .lock()
            .expect("applied lock")
            .remove(&hash_of(key));
    }

    pub fn clear(&self) {
        self.inner.lock().expect("applied lock").clear();
    }
}

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
    pub backoff: Backoff,
    pub failures: TerminalFailures,
    /// What this process last wrote as each object's applied hash.
    pub applied: AppliedHashes,
    pub metrics: Arc<Metrics>,
    /// Which object manages which remote override.
    pub claims: Claims,
    /// Resolved accounts, kept in step by the watches.
    pub accounts: AccountCache,
    /// Reads DPC back on each object's sync interval.
    pub drift: Arc<DriftChecker>,
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
            backoff: Backoff::new(config.backoff_base, config.backoff_max),
            client,
            dpc,
            config,
            index: RefIndex::default(),
            account_index: RefIndex::default(),
            failures: TerminalFailures::default(),
            applied: AppliedHashes::default(),
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

    fn expect_scopes(&self, n: usize) {
        self.pending_scopes.store(n, Ordering::Release);
        self.synced.store(n == 0, Ordering::Release);
    }

    fn scope_synced(&self) {
        if self.pending_scopes.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.synced.store(true, Ordering::Release);
            self.synced_changed.notify_waiters();
        }
    }

    /// Forgets everything kept about an object that is gone: what it refers to, its
    /// backoff, a refused request, its drift checks and its metric series.
    pub fn forget(&self, key: &ObjKey) {
        self.index.remove(key);
        self.backoff.reset(key);
        self.failures.clear(key);
        self.applied.forget(key);
        self.drift.unregister(key);
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
    fn observe_event(
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

/// The account a ConnectionOverride names.
pub fn account_of(cov: &ConnectionOverride) -> AccountKey {
    let name = cov.spec.account_ref.name.clone();
    match cov.spec.account_kind() {
        AccountKind::DpcAccount => AccountKey {
            namespace: cov.metadata.namespace.clone(),
            name,
        },
        AccountKind::ClusterDpcAccount => AccountKey {
            namespace: None,
            name,
        },
    }
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

/// Checks that the CRDs are installed; the error says how to install them.
///
/// It asks API discovery (`GET /apis/dpc-operator.io/v1alpha1`), which every authenticated
/// user may read: an install that watches some namespaces only has no right to list the
/// resources cluster-wide.
pub async fn check_crds(client: &Client) -> Result<(), String> {
    let api_version = ConnectionOverride::api_version(&());
    let resources = match client.list_api_group_resources(&api_version).await {
        Ok(list) => list.resources,
        Err(kube::Error::Api(status)) if status.code == 404 => Vec::new(),
        Err(e) => {
            return Err(format!(
                "could not check for the CRDs of {api_version}: {e}"
            ));
        }
    };
    for (kind, plural) in [
        ("ConnectionOverride", ConnectionOverride::plural(&())),
        ("DpcAccount", DpcAccount::plural(&())),
        ("ClusterDpcAccount", ClusterDpcAccount::plural(&())),
    ] {
        if !resources.iter().any(|r| r.name == plural) {
            return Err(format!(
                "the {kind} CustomResourceDefinition ({api_version}) is not installed in this cluster; install the CRDs with `kubectl apply -f crds/crds.yaml` from the dpc-operator repository (or `cargo run --bin crdgen | kubectl apply -f -`), then start the operator again"
            ));
        }
    }
    Ok(())
}

fn hash_of<T: Hash>(value: &T) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// What makes a ConnectionOverride worth reconciling again: its generation (spec), deletion,
/// and the operator's annotations. Status writes (our own) change none of these.
fn trigger_hash(obj: &DeserializeGuard<ConnectionOverride>) -> Option<u64> {
    let meta = obj.meta();
    let annotations: Vec<(&String, &String)> = meta
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("dpc-operator.io/"))
        .collect();
    let parse_ok = obj.0.is_ok();
    Some(hash_of(&(
        meta.generation,
        meta.deletion_timestamp.is_some(),
        annotations,
        parse_ok,
        meta.uid.as_deref(),
    )))
}

type GuardRef = ObjectRef<DeserializeGuard<ConnectionOverride>>;

/// Drops what the operator never reads from a watched object before it is stored:
/// `managedFields`, and annotations other than the operator's own (kubectl's
/// last-applied-configuration alone repeats the whole spec).
fn slim(obj: &mut DeserializeGuard<ConnectionOverride>) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k.starts_with("dpc-operator.io/"));
    }
}

fn to_refs(users: Vec<ObjKey>) -> Vec<GuardRef> {
    users
        .into_iter()
        .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
        .collect()
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controllers (ConnectionOverrides, DpcAccounts, ClusterDpcAccounts) and the drift
/// checker until `shutdown` is cancelled; in-flight reconciles finish before it returns.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let scopes: Vec<Option<String>> = if ctx.config.namespaces.is_empty() {
        vec![None]
    } else {
        ctx.config.namespaces.iter().cloned().map(Some).collect()
    };
    ctx.expect_scopes(scopes.len());
    // A replica leading again starts afresh: the queues and caches of its last term are gone.
    ctx.triggers.lock().expect("triggers lock").clear();
    ctx.account_triggers.lock().expect("triggers lock").clear();
    ctx.override_stores.lock().expect("stores lock").clear();
    // Another replica may have written status while this one was not leading.
    ctx.applied.clear();
    ctx.running.store(true, Ordering::Release);
    let mut tasks = Vec::new();
    let trigger_ctx = ctx.clone();
    let trigger: crate::drift::Trigger = Arc::new(move |key: &ObjKey| trigger_ctx.trigger(key));
    tasks.push(ctx.drift.clone().run(trigger, shutdown.clone()).boxed());
    for scope in &scopes {
        tasks.push(run_overrides(ctx.clone(), scope.clone(), shutdown.clone()).boxed());
        tasks.push(
            run_accounts::<DpcAccount>(
                ctx.clone(),
                scope.clone(),
                vec![scope.clone()],
                shutdown.clone(),
            )
            .boxed(),
        );
    }
    // A ClusterDpcAccount's credentials Secret is in the operator's namespace (or the
    // configured ones): Secrets are watched there only.
    let credential_scopes = ctx
        .accounts
        .cluster_credentials_namespaces()
        .iter()
        .cloned()
        .map(Some)
        .collect();
    tasks.push(
        run_accounts::<ClusterDpcAccount>(ctx.clone(), None, credential_scopes, shutdown.clone())
            .boxed(),
    );
    futures::future::join_all(tasks).await;
    ctx.running.store(false, Ordering::Release);
    info!("controllers stopped");
}

/// What a controller's stream yields for each reconcile.
type RunResult<K, E> =
    Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<E, watcher::Error>>;

fn log_result<K: Resource, E: std::fmt::Display>(
    kind: &'static str,
) -> impl Fn(RunResult<K, E>) -> futures::future::Ready<()> {
    move |result| {
        if let Err(e) = result {
            match e {
                kube::runtime::controller::Error::ObjectNotFound(_) => {}
                other => warn!(error = %other, "{kind} controller"),
            }
        }
        futures::future::ready(())
    }
}

async fn run_overrides(ctx: Arc<Context>, scope: Option<String>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    let ns = scope.as_deref();
    let api: Api<DeserializeGuard<ConnectionOverride>> = scoped(&client, ns);
    let mut config = watcher::Config::default();
    if let Some(selector) = &ctx.config.label_selector {
        config = config.labels(selector);
    }
    let (reader, writer) = reflector::store();
    let hook = ctx.clone();
    let hook_scope = scope.clone();
    let relist = Mutex::new(None);
    let first_sync = AtomicBool::new(false);
    let main = watcher::watcher(api, config)
        .default_backoff()
        // Keep only what reconciles read: the store holds every object.
        .modify(slim)
        .map_ok(move |event| {
            hook.observe_event(hook_scope.as_deref(), &event, &relist, &first_sync);
            event
        })
        .reflect(writer)
        .applied_objects()
        .predicate_filter(trigger_hash, Default::default());

    let secrets = watcher::watcher(
        scoped::<PartialObjectMeta<Secret>>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    let config_maps = watcher::watcher(
        scoped::<PartialObjectMeta<ConfigMap>>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    let accounts = watcher::watcher(
        scoped::<DpcAccount>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(predicates::generation, Default::default());
    let cluster_accounts = watcher::watcher(
        Api::<ClusterDpcAccount>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(predicates::generation, Default::default());
    let namespace_config = match ns {
        Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
        None => watcher::Config::default(),
    };
    let namespaces = watcher::watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        namespace_config,
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(predicates::labels, Default::default());

    let (tx, rx) = futures::channel::mpsc::unbounded();
    let sweeper = tokio::spawn(sweep(
        reader.clone(),
        tx.clone(),
        ctx.config.resync_interval,
    ));
    ctx.triggers
        .lock()
        .expect("triggers lock")
        .push((scope.clone(), tx));
    ctx.override_stores
        .lock()
        .expect("stores lock")
        .push(reader.clone());
    // A change of an account, a Secret or a namespace also drops what the account cache read
    // from it.
    let users = |ctx: &Arc<Context>, reference: Reference| {
        ctx.accounts.invalidate(&reference);
        to_refs(ctx.index.users(&reference))
    };
    let (i1, i2, i3, i4, i5) = (
        ctx.clone(),
        ctx.clone(),
        ctx.clone(),
        ctx.clone(),
        ctx.clone(),
    );
    let stop = shutdown.clone();
    let store = reader.clone();
    let controller = Controller::for_stream(main, reader)
        .with_config(ControllerConfig::default().concurrency(ctx.config.concurrency))
        .reconcile_on(rx)
        .watches_stream(secrets, move |s: PartialObjectMeta<Secret>| {
            users(
                &i1,
                Reference::Secret {
                    namespace: s.namespace().unwrap_or_default(),
                    name: s.name_any(),
                },
            )
        })
        .watches_stream(config_maps, move |c: PartialObjectMeta<ConfigMap>| {
            users(
                &i2,
                Reference::ConfigMap {
                    namespace: c.namespace().unwrap_or_default(),
                    name: c.name_any(),
                },
            )
        })
        .watches_stream(accounts, move |a: DpcAccount| {
            users(
                &i3,
                Reference::Account {
                    namespace: a.namespace().unwrap_or_default(),
                    name: a.name_any(),
                },
            )
        })
        .watches_stream(cluster_accounts, move |a: ClusterDpcAccount| {
            users(&i4, Reference::ClusterAccount { name: a.name_any() })
        })
        .watches_stream(namespaces, move |n: PartialObjectMeta<Namespace>| {
            users(&i5, Reference::Namespace { name: n.name_any() })
        })
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(
            |obj, ctx: Arc<Context>| async move {
                let started = std::time::Instant::now();
                let result = reconcile::reconcile_guarded(obj, ctx.clone()).await;
                ctx.metrics
                    .reconciled("connectionoverride", started.elapsed());
                if let Err(e) = &result {
                    ctx.metrics.failed("connectionoverride", e.category());
                }
                result
            },
            reconcile::error_policy,
            ctx,
        )
        .for_each(log_result("ConnectionOverride"));
    run_until_stopped(controller, store, shutdown).await;
    sweeper.abort();
}

/// How many parts the stored objects are split into, one part swept per
/// `resync_interval / SWEEP_PARTS`.
const SWEEP_PARTS: u64 = 64;

/// Asks once per resync interval for a reconcile of every stored ConnectionOverride, a
/// sixty-fourth of them (by a hash of the key) at a time: one timer for all objects rather than a
/// scheduled requeue per object, and the work spread evenly over the interval.
async fn sweep(
    reader: reflector::Store<DeserializeGuard<ConnectionOverride>>,
    tx: UnboundedSender<GuardRef>,
    interval: Duration,
) {
    let tick = (interval / SWEEP_PARTS as u32).max(Duration::from_millis(10));
    let mut part = 0;
    loop {
        tokio::time::sleep(tick).await;
        for obj in reader.state() {
            let key = ObjectRef::from_obj(&*obj);
            if hash_of(&(&key.namespace, &key.name)) % SWEEP_PARTS == part
                && tx.unbounded_send(key).is_err()
            {
                return;
            }
        }
        part = (part + 1) % SWEEP_PARTS;
    }
}

/// Runs the controller of one account kind in `scope`, watching the Secrets of
/// `secret_scopes` (`None`: every namespace) for credential changes.
async fn run_accounts<K: AccountObject>(
    ctx: Arc<Context>,
    scope: Option<String>,
    secret_scopes: Vec<Option<String>>,
    shutdown: CancellationToken,
) {
    let client = ctx.client.clone();
    let cluster = K::KIND == "ClusterDpcAccount";
    let api = K::watch_api(client.clone(), scope.as_deref());
    let (reader, writer) = reflector::store();
    // A change of spec, and the start of a deletion (which holds for the in-use finalizer).
    let main = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(
            |account: &K| {
                let meta = account.meta();
                Some(hash_of(&(
                    meta.generation,
                    meta.deletion_timestamp.is_some(),
                )))
            },
            Default::default(),
        );
    let (tx, rx) = futures::channel::mpsc::unbounded::<AccountKey>();
    ctx.account_triggers.lock().expect("triggers lock").push(tx);
    let account_scope = scope.clone();
    let asked = rx.filter_map(move |key: AccountKey| {
        let r = match (&key.namespace, cluster) {
            (None, true) => Some(ObjectRef::<K>::new(&key.name)),
            (Some(ns), false) if account_scope.as_deref().is_none_or(|s| s == ns) => {
                Some(ObjectRef::<K>::new(&key.name).within(ns))
            }
            _ => None,
        };
        futures::future::ready(r)
    });
    let secrets = futures::stream::select_all(secret_scopes.iter().map(|ns| {
        watcher::watcher(
            scoped::<PartialObjectMeta<Secret>>(&client, ns.as_deref()),
            watcher::Config::default(),
        )
        .default_backoff()
        .touched_objects()
        .boxed()
    }));
    let index_ctx = ctx.clone();
    let stop = shutdown.clone();
    let store = reader.clone();
    let controller = Controller::for_stream(main, reader)
        .reconcile_on(asked)
        .watches_stream(secrets, move |s: PartialObjectMeta<Secret>| {
            index_ctx
                .account_index
                .users(&Reference::Secret {
                    namespace: s.namespace().unwrap_or_default(),
                    name: s.name_any(),
                })
                .into_iter()
                .filter(|(ns, _)| ns.is_empty() == cluster)
                .map(|(ns, name)| {
                    let r = ObjectRef::<K>::new(&name);
                    if cluster { r } else { r.within(&ns) }
                })
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(
            |obj, ctx: Arc<Context>| async move {
                let started = std::time::Instant::now();
                let result =
                    reconcile::catch_panic(reconcile::account::reconcile::<K>(obj, ctx.clone()))
                        .await
                        .unwrap_or_else(|panic| Err(reconcile::Error::Panicked(panic)));
                let kind = if K::KIND == "DpcAccount" {
                    "dpcaccount"
                } else {
                    "clusterdpcaccount"
                };
                ctx.metrics.reconciled(kind, started.elapsed());
                if let Err(e) = &result {
                    ctx.metrics.failed(kind, e.category());
                }
                result
            },
            reconcile::account::error_policy::<K>,
            ctx,
        )
        .for_each(log_result(K::KIND));
    run_until_stopped(controller, store, shutdown).await;
}

/// Runs a controller until it ends after `shutdown`.
///
/// kube-runtime holds every reconcile until the controller's store has listed once, and a
/// graceful shutdown stops the watch that would fill it: a shutdown before the first list
/// (a slow API server, RBAC refusing the list) would wait for ever, and a SIGTERM would never
/// end the process. Before that first list nothing can be in flight, so the controller is
/// dropped; after it, in-flight reconciles finish.
async fn run_until_stopped<K>(
    controller: impl std::future::Future<Output = ()>,
    store: reflector::Store<K>,
    shutdown: CancellationToken,
) where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let mut controller = std::pin::pin!(controller);
    tokio::select! {
        () = &mut controller => return,
        () = shutdown.cancelled() => {}
    }
    if store.wait_until_ready().now_or_never().is_some() {
        controller.await;
    } else {
        info!("stopping before the first list: nothing was in flight");
    }
}
