//! The controller wiring: the watches that trigger reconciles — the ConnectionOverrides
//! themselves, metadata-only watches of Secrets, ConfigMaps and namespaces through the
//! reverse index, and the accounts — and the periodic sweep. What a reconcile does is in
//! `reconcile/`; what it shares is in `context`.

use std::hash::{Hash, Hasher};
use std::sync::atomic::AtomicBool;

use futures::channel::mpsc::UnboundedSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, predicates};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{CREATE_PENDING_ANNOTATION, ClusterDpcAccount, ConnectionOverride, DpcAccount};
use crate::context::{Context, GuardRef, PASSES_PER_DPC_SLOT};
use crate::dpc::AccountKey;
use crate::index::Reference;
use crate::key::ObjKey;
use crate::reconcile;
use crate::reconcile::account::AccountObject;
use crate::stored::{self, Stored};
use crate::watch::{self, Selectors};

mod shared;

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
/// and the operator's annotations a user sets. Writes of our own (status, the finalizer, the
/// create-pending annotation) change none of these.
fn trigger_hash(obj: &DeserializeGuard<ConnectionOverride>) -> u64 {
    let meta = obj.meta();
    let annotations: Vec<(&String, &String)> = meta
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with("dpc-operator.io/") && *k != CREATE_PENDING_ANNOTATION)
        .collect();
    let parse_ok = obj.0.is_ok();
    hash_of(&(
        meta.generation,
        meta.deletion_timestamp.is_some(),
        annotations,
        parse_ok,
        meta.uid.as_deref(),
    ))
}

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
        .map(|key| ObjectRef::new(&key.1).within(&key.0))
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
    // A ClusterDpcAccount's credentials Secret is in the operator's namespace (or the
    // configured ones): Secrets are watched there and in every scope, each namespace once.
    let secret_scopes =
        shared::secret_scopes(&scopes, ctx.accounts.cluster_credentials_namespaces());
    // The first passes wait for the first lists of the ConnectionOverrides, the Secrets and
    // the accounts (a DpcAccount watch per scope, one of ClusterDpcAccounts).
    ctx.begin_term(2 * scopes.len() + secret_scopes.len() + 1);
    let mut tasks = Vec::new();
    // A pass waiting for the first lists when shutdown begins gives up, so graceful shutdown
    // (which waits for passes in flight) never waits for a list that will not come.
    let stopping = ctx.clone();
    let stop = shutdown.clone();
    tasks.push(
        async move {
            stop.cancelled().await;
            stopping.stop_waiting();
        }
        .boxed(),
    );
    let trigger_ctx = ctx.clone();
    let trigger: crate::drift::Trigger = Arc::new(move |key: &ObjKey| trigger_ctx.trigger(key));
    tasks.push(ctx.drift.clone().run(trigger, shutdown.clone()).boxed());
    for scope in &scopes {
        tasks.push(run_overrides(ctx.clone(), scope.clone(), shutdown.clone()).boxed());
        tasks
            .push(run_accounts::<DpcAccount>(ctx.clone(), scope.clone(), shutdown.clone()).boxed());
    }
    tasks.push(run_accounts::<ClusterDpcAccount>(ctx.clone(), None, shutdown.clone()).boxed());
    for scope in secret_scopes {
        tasks.push(shared::run_secrets(ctx.clone(), scope, shutdown.clone()).boxed());
    }
    futures::future::join_all(tasks).await;
    ctx.end_term();
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
    let ns = scope.as_deref();
    let (reader, writer) = reflector::store();
    let main = override_stream(&ctx, scope.clone(), writer);
    let Triggers {
        config_maps,
        namespaces,
    } = triggers(&ctx, ns);
    let (tx, rx) = futures::channel::mpsc::unbounded();
    let sweeper = tokio::spawn(sweep(
        reader.clone(),
        tx.clone(),
        ctx.config.resync_interval,
    ));
    ctx.add_scope(scope.clone(), tx, reader.clone());
    // A change of a ConfigMap or a namespace also drops what the caches read from it. Secrets
    // and accounts are watched once for every controller (`shared`).
    let users = |ctx: &Arc<Context>| {
        let ctx = ctx.clone();
        move |reference: Reference| {
            ctx.accounts.invalidate(&reference);
            ctx.values.invalidate(&reference);
            to_refs(ctx.index.users(&reference))
        }
    };
    let (config_map_users, namespace_users) = (users(&ctx), users(&ctx));
    let stop = shutdown.clone();
    let store = reader.clone();
    let passes = ctx.config.concurrency.saturating_mul(PASSES_PER_DPC_SLOT);
    let controller = Controller::for_stream(main, reader)
        .with_config(ControllerConfig::default().concurrency(passes))
        .trigger_backoff(EachWatchItsOwn)
        .reconcile_on(rx)
        .watches_stream(config_maps, move |c: PartialObjectMeta<ConfigMap>| {
            let (namespace, name) = (c.namespace().unwrap_or_default(), c.name_any());
            config_map_users(Reference::ConfigMap { namespace, name })
        })
        .watches_stream(namespaces, move |n: PartialObjectMeta<Namespace>| {
            namespace_users(Reference::Namespace { name: n.name_any() })
        })
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_counted, reconcile::error_policy, ctx)
        .for_each(log_result("ConnectionOverride"));
    run_until_stopped(controller, store, shutdown).await;
    sweeper.abort();
}

/// What a ConnectionOverride reads, watched: changes trigger the objects that read it.
struct Triggers {
    config_maps: BoxStream<'static, Result<PartialObjectMeta<ConfigMap>, watcher::Error>>,
    namespaces: BoxStream<'static, Result<PartialObjectMeta<Namespace>, watcher::Error>>,
}

fn triggers(ctx: &Context, ns: Option<&str>) -> Triggers {
    let client = ctx.client.clone();
    let all = Selectors::default;
    // ConfigMaps pass on a new resourceVersion only: a relist after a 410 (an API server
    // restart) triggers the users of what changed, not of every ConfigMap; the relist drops
    // the values read from the scope's ConfigMaps (a deletion meanwhile is not in it).
    let values = ctx.values.clone();
    let scope = ns.map(str::to_string);
    let config_maps = watch::watch(
        &ctx.watches,
        watch_name::<ConfigMap>(ns, ""),
        scoped::<PartialObjectMeta<ConfigMap>>(&client, ns),
        all(),
    )
    .map_ok(move |event| {
        if matches!(event, watcher::Event::Init) {
            values.invalidate_scope(scope.as_deref(), crate::accounts::is_config_map);
        }
        event
    })
    .touched_objects()
    .predicate_filter(predicates::resource_version, Default::default());
    let namespace_config = Selectors {
        fields: ns.map(|ns| format!("metadata.name={ns}")),
        ..Selectors::default()
    };
    let all_namespaces = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
    let namespaces = touched(
        ctx,
        None,
        &scope_label(ns),
        all_namespaces,
        namespace_config,
    )
    .predicate_filter(predicates::labels, Default::default());
    Triggers {
        config_maps: config_maps.boxed(),
        namespaces: namespaces.boxed(),
    }
}

/// The watch of the ConnectionOverrides of one scope, slimmed, feeding the claims index and
/// the store (packed, see `stored`), and passing on only changes worth a reconcile.
fn override_stream(
    ctx: &Arc<Context>,
    scope: Option<String>,
    writer: reflector::store::Writer<Stored>,
) -> impl futures::Stream<Item = Result<Stored, watcher::Error>> + Send + use<> {
    let api: Api<DeserializeGuard<ConnectionOverride>> = scoped(&ctx.client, scope.as_deref());
    let selectors = Selectors {
        labels: ctx.config.label_selector.clone(),
        ..Selectors::default()
    };
    let hook = ctx.clone();
    let relist = Mutex::new(None);
    let first_sync = AtomicBool::new(false);
    let name = watch_name::<ConnectionOverride>(scope.as_deref(), "");
    watch::watch(&ctx.watches, name, api, selectors)
        // Keep only what reconciles read: the store holds every object.
        .modify(slim)
        .map_ok(move |event| {
            hook.observe_event(scope.as_deref(), &event, &relist, &first_sync);
            stored::pack_event(event, trigger_hash)
        })
        .reflect(writer)
        .applied_objects()
        .predicate_filter(|obj: &Stored| Some(obj.trigger()), Default::default())
}

/// `secrets (all namespaces)`, `dpcaccounts in team-a for …`: a watch's name in logs,
/// metrics and `/readyz`.
fn watch_name<K: Resource<DynamicType = ()>>(scope: Option<&str>, purpose: &str) -> String {
    let plural = K::plural(&());
    let mut name = match scope {
        Some(ns) => format!("{plural} in {ns}"),
        None => format!("{plural} (all namespaces)"),
    };
    if !purpose.is_empty() {
        name = format!("{name} {purpose}");
    }
    name
}

/// `for ConnectionOverrides in <ns>`: what a cluster-wide watch of one scope is for.
fn scope_label(scope: Option<&str>) -> String {
    match scope {
        Some(ns) => format!("for ConnectionOverrides in {ns}"),
        None => "for ConnectionOverrides".to_string(),
    }
}

/// The objects a watch sees change; its name says what it watches, where and what for.
fn touched<K>(
    ctx: &Context,
    scope: Option<&str>,
    purpose: &str,
    api: Api<K>,
    selectors: Selectors,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + use<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let name = watch_name::<K>(scope, purpose);
    watch::watch(&ctx.watches, name, api, selectors).touched_objects()
}

/// The backoff of a controller's merged triggers: none. Each watch backs off on its own
/// (`crate::watch`); the controller's default — one shared backoff over every watch —
/// paused all of them after an error of any one, and while paused their requests went
/// stale and failed in turn, so one 410 could blind the controller for minutes.
struct EachWatchItsOwn;

impl Iterator for EachWatchItsOwn {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        // Never `None`: that would end the controller.
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for EachWatchItsOwn {
    fn reset(&mut self) {}
}

/// One reconcile, counted in the metrics.
async fn reconcile_counted(
    obj: Arc<Stored>,
    ctx: Arc<Context>,
) -> Result<Action, reconcile::Error> {
    let started = std::time::Instant::now();
    let result = reconcile::reconcile_guarded(Arc::new(obj.unpack()), ctx.clone()).await;
    ctx.metrics
        .reconciled("connectionoverride", started.elapsed());
    if let Err(e) = &result {
        ctx.metrics.failed("connectionoverride", e.category());
    }
    result
}

/// How many parts the stored objects are split into, one part swept per
/// `resync_interval / SWEEP_PARTS`.
const SWEEP_PARTS: u64 = 64;

/// Asks once per resync interval for a reconcile of every stored ConnectionOverride, a
/// sixty-fourth of them (by a hash of the key) at a time: one timer for all objects rather than a
/// scheduled requeue per object, and the work spread evenly over the interval.
async fn sweep(
    reader: reflector::Store<Stored>,
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
/// The account `key` names, if a controller of kind `K` watching `scope` has it.
fn account_ref<K: AccountObject>(key: &AccountKey, scope: Option<&str>) -> Option<ObjectRef<K>> {
    let cluster = K::KIND == "ClusterDpcAccount";
    match (&key.namespace, cluster) {
        (None, true) => Some(ObjectRef::<K>::new(&key.name)),
        (Some(ns), false) if scope.is_none_or(|s| s == ns) => {
            Some(ObjectRef::<K>::new(&key.name).within(ns))
        }
        _ => None,
    }
}

/// One account reconcile, a panic turned into an error, counted in the metrics.
async fn reconcile_account_counted<K: AccountObject>(
    obj: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, reconcile::Error> {
    let started = std::time::Instant::now();
    let result = reconcile::catch_panic(reconcile::account::reconcile::<K>(obj, ctx.clone()))
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
}

async fn run_accounts<K: AccountObject>(
    ctx: Arc<Context>,
    scope: Option<String>,
    shutdown: CancellationToken,
) {
    let api = K::watch_api(ctx.client.clone(), scope.as_deref());
    let (reader, writer) = reflector::store();
    // A change of spec, and the start of a deletion (which holds for the in-use finalizer).
    // The same watch triggers the ConnectionOverrides using the account.
    let name = watch_name::<K>(scope.as_deref(), "");
    let main = watch::watch(&ctx.watches, name, api, Selectors::default())
        .map_ok(shared::account_changes::<K>(ctx.clone()))
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
    ctx.add_account_trigger(tx);
    let account_scope = scope.clone();
    let asked = rx.filter_map(move |key: AccountKey| {
        futures::future::ready(account_ref::<K>(&key, account_scope.as_deref()))
    });
    let stop = shutdown.clone();
    let store = reader.clone();
    let controller = Controller::for_stream(main, reader)
        .trigger_backoff(EachWatchItsOwn)
        .reconcile_on(asked)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(
            reconcile_account_counted::<K>,
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
