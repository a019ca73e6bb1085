//! The [`Context`] every reconcile shares: the clients, the configuration, the indexes and
//! caches the watches keep in step, the per-object state kept between passes, and the Event
//! publisher.

use std::collections::HashSet;

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
use kube::{Client, Resource};
use rand::Rng;

use crate::accounts::{AccountCache, Values};
use crate::api::ConnectionOverride;
use crate::claims::Claims;
use crate::config::OperatorConfig;
use crate::dpc::{AccountKey, ClientSettings, DpcClient};
use crate::drift::{DriftChecker, Journal};
use crate::index::{RefIndex, account_of};
use crate::key::{ObjKey, key_of};
use crate::metrics::Metrics;
use crate::stored::Stored;
use crate::watch::Watches;

mod events;
mod objects;

use events::{Reporter, publish_events};
pub use objects::{Gate, ObjectStates};

/// How long a resolved account is used without reading it again. The watches of accounts,
/// Secrets and namespaces drop an entry when what it was read from changes; this is the
/// backstop for a change no watch saw.
const ACCOUNT_TTL: Duration = Duration::from_secs(30 * 60);

/// A ConnectionOverride as the controllers queue it.
pub type GuardRef = ObjectRef<Stored>;

/// Everything a reconcile needs, built once by [`Context::new`] for the binary and the tests.
pub struct Context {
    pub client: Client,
    pub dpc: DpcClient,
    /// Events wait here for the publisher task: a reconcile waits only while it is full.
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
    /// Every watch's health, and the probe their retries wait on.
    pub watches: Arc<Watches>,
    /// Which object manages which remote override.
    pub claims: Claims,
    /// Resolved accounts, kept in step by the watches.
    pub accounts: AccountCache,
    /// The values read from Secrets and ConfigMaps, kept in step by the watches.
    pub values: Arc<Values>,
    /// Reads DPC back on each object's sync interval.
    pub drift: Arc<DriftChecker>,
    /// `--concurrency` permits: a pass holds one while it reads or writes DPC, not while it
    /// writes its status and Event (see [`Context::dpc_slot`]).
    dpc_slots: tokio::sync::Semaphore,
    /// The ConnectionOverride controllers' queues, one per watched scope.
    triggers: Mutex<Vec<(Option<String>, UnboundedSender<GuardRef>)>>,
    /// The account controllers' queues, for an account whose last user may have gone.
    account_triggers: Mutex<Vec<UnboundedSender<AccountKey>>>,
    /// The ConnectionOverride caches, one per watched scope.
    override_stores: Mutex<Vec<reflector::Store<Stored>>>,
    pending_scopes: AtomicUsize,
    running: AtomicBool,
    synced: AtomicBool,
    /// Set when the controllers of this term are stopping.
    stopping: AtomicBool,
    synced_changed: tokio::sync::Notify,
}

/// How many passes the ConnectionOverride controller runs at once for each DPC slot
/// (`--concurrency`): the passes beyond the slots are writing their status and Events, or
/// waiting for a slot.
pub const PASSES_PER_DPC_SLOT: u16 = 2;

impl Context {
    /// The one way to build a context.
    pub fn new(client: Client, config: OperatorConfig) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(config.per_object_metrics));
        let observer: Arc<dyn crate::dpc::CallObserver> = metrics.clone();
        // Every write the client makes is journaled; the drift checker reads through it.
        let journal = Arc::new(Journal::default());
        let writes: Arc<dyn crate::dpc::WriteObserver> = journal.clone();
        let dpc = DpcClient::with_observers(
            ClientSettings {
                allow_insecure_http: config.allow_insecure_http,
                allowed_hosts: config.allowed_hosts.clone(),
                request_timeout: config.dpc_request_timeout,
                max_admission_wait: config.max_admission_wait,
                ..ClientSettings::default()
            },
            Some(observer),
            Some(writes),
        );
        let reporter = Reporter {
            controller: config.reporter.clone(),
            instance: config
                .instance
                .clone()
                .unwrap_or_else(|| config.reporter.clone()),
        };
        let config_share_window = config.drift_share_window;
        let dpc_slots = tokio::sync::Semaphore::new(usize::from(config.concurrency.max(1)));
        let cluster_credentials = config.cluster_credentials_namespaces();
        let (events, queue) = tokio::sync::mpsc::channel(events::QUEUE);
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
        let watches = Watches::new(client.clone(), metrics.clone());
        let values = Arc::new(Values::default());
        Arc::new(Self {
            events,
            objects: ObjectStates::new(config.backoff_base, config.backoff_max),
            client,
            dpc,
            config,
            index: RefIndex::default(),
            account_index: RefIndex::default(),
            watches,
            metrics,
            running: AtomicBool::new(false),
            claims: Claims::default(),
            accounts: AccountCache::new(ACCOUNT_TTL, cluster_credentials, values.clone()),
            values,
            drift: Arc::new(DriftChecker::new(config_share_window, journal)),
            dpc_slots,
            triggers: Mutex::new(Vec::new()),
            account_triggers: Mutex::new(Vec::new()),
            override_stores: Mutex::new(Vec::new()),
            pending_scopes: AtomicUsize::new(0),
            synced: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            synced_changed: tokio::sync::Notify::new(),
        })
    }

    /// Queues an Event for publishing, waiting for a slot while the queue is full (a busy
    /// API server): no Event is dropped, and the backlog stays bounded.
    pub async fn publish(&self, event: KubeEvent, reference: ObjectReference) {
        // Only fails once the publisher has stopped, with the runtime.
        let _ = self.events.send((event, reference)).await;
    }

    /// Whether the controllers are running (false on a follower waiting for the lease).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Whether every watch of ConnectionOverrides has delivered its first list.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Waits until [`Context::is_synced`]; `false` when the controllers are stopping first
    /// (a pass waiting here has nothing in flight, and graceful shutdown waits for it).
    pub async fn wait_synced(&self) -> bool {
        loop {
            let changed = self.synced_changed.notified();
            if self.is_synced() {
                return true;
            }
            if self.stopping.load(Ordering::Acquire) {
                return false;
            }
            changed.await;
        }
    }

    /// The controllers are stopping: passes still waiting for the first lists give up.
    pub(crate) fn stop_waiting(&self) {
        self.stopping.store(true, Ordering::Release);
        self.synced_changed.notify_waiters();
    }

    /// Starts a term of running the controllers, whose first passes wait for `lists` first
    /// lists. A replica leading again starts afresh: the queues and caches of its last term
    /// are gone (its watches stopped meanwhile), and another replica may have written status.
    pub(crate) fn begin_term(&self, lists: usize) {
        self.pending_scopes.store(lists, Ordering::Release);
        self.synced.store(lists == 0, Ordering::Release);
        self.values.clear();
        self.accounts.clear();
        self.triggers.lock().expect("triggers lock").clear();
        self.account_triggers.lock().expect("triggers lock").clear();
        self.override_stores.lock().expect("stores lock").clear();
        self.watches.clear();
        self.objects.forget_applied_hashes();
        self.stopping.store(false, Ordering::Release);
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
        store: reflector::Store<Stored>,
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
        self.values.release(&self.index.remove(key));
        self.drift.unregister(key);
        self.dpc.forget_object(key);
        self.metrics.forget_object(&key.0, &key.1);
    }

    /// Waits for one of the `--concurrency` slots for talking to DPC. The controller runs
    /// [`PASSES_PER_DPC_SLOT`] times as many passes at once, so a pass writing its status
    /// and Event on a busy API server does not keep the next pass from calling DPC: a
    /// rotation of more Secrets than slots waits for the calls before it, not for their
    /// status patches. `None` only if the semaphore were closed, which it never is.
    pub async fn dpc_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.dpc_slots.acquire().await.ok()
    }

    /// Records what an object refers to now, so a change of it triggers the object; the
    /// values of what no object refers to any longer are forgotten.
    pub fn refer(&self, key: &ObjKey, refs: Vec<crate::index::Reference>) {
        self.values.release(&self.index.set(key, refs));
    }

    /// Asks for a reconcile of the object `(namespace, name)` now.
    pub fn trigger(&self, key: &(String, String)) {
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

    /// The watched ConnectionOverrides that name `account` and for which `needs` says so
    /// (the account reconcile asks which still need it to delete their remote override).
    pub fn account_users(
        &self,
        account: &AccountKey,
        needs: impl Fn(&ConnectionOverride) -> bool,
    ) -> Vec<ObjKey> {
        let stores = self.override_stores.lock().expect("stores lock");
        let mut users: Vec<ObjKey> = stores
            .iter()
            .flat_map(|store| store.state())
            .filter_map(|stored| {
                let cov = stored.unpack().0.ok()?;
                (account_of(&cov) == *account && needs(&cov)).then(|| key_of(&cov.metadata))
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
        let key_of = |obj: &DeserializeGuard<ConnectionOverride>| crate::key::key_of(obj.meta());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn offline_client() -> Client {
        crate::install_crypto_provider();
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        Client::try_from(config).unwrap()
    }

    #[tokio::test]
    async fn a_pass_waiting_for_the_first_lists_gives_up_when_the_controllers_stop() {
        let ctx = Context::new(offline_client(), OperatorConfig::default());
        ctx.begin_term(1);
        let waiting = tokio::spawn({
            let ctx = ctx.clone();
            async move { ctx.wait_synced().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing has listed yet");
        ctx.stop_waiting();
        assert!(!waiting.await.unwrap(), "a stopped wait says so");
        // A new term waits again, and a first list lets it through.
        ctx.begin_term(1);
        assert!(!ctx.is_synced());
        ctx.scope_synced();
        assert!(ctx.wait_synced().await);
    }
}
