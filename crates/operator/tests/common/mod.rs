//! The harness of the controller tests: the real Kubernetes API server of the test run
//! (kube-apiserver and etcd built from their Go modules, see `dpc_testkit::control_plane`)
//! with the CRDs installed and a namespace of the test's own, a DPC simulator over real HTTP
//! on loopback, a DpcAccount pointed at the simulator, and the real controller running
//! in-process, watching only that namespace — assembled by the same `Context::new` as the
//! binary.
#![allow(dead_code)]

pub mod audit;
pub mod counting;
pub mod identity;
#[path = "../tools/mod.rs"]
pub mod tools;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dpc_operator::api::{
    AccountRef, AuthType, ConnectionOverride, ConnectionOverrideSpec, ConnectionOverridesSpec,
    CredentialsSecretRef, DeletionPolicy, DpcAccount, DpcAccountSpec, KeySelector, PropertyFrom,
    SecretsLocation, conditions,
};
use dpc_operator::config::OperatorConfig;
use dpc_operator::context::Context;
use dpc_operator::controller;
use dpc_testkit::control_plane::{self, Endpoint};
use dpc_testkit::dpc::{DpcSim, SimConfig};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use kube::{Api, Client};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const PROJECT: &str = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
pub const ACCOUNT: &str = "dpc";
pub const CREDS: &str = "dpc-creds";
pub const CLIENT_ID: &str = "client-7f3a9";
pub const CLIENT_SECRET: &str = "cs-9d8e7f6a5b4c3d2e1f";
/// How long a test waits for the controller: generous, as the API server shares two cores with
/// the tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Every log line of this test process, for the secret-leak checks.
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,dpc_operator=trace",
            ))
            .json()
            .with_current_span(true)
            .with_writer(move || Capture(writer.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buffer
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Operator settings for tests: short backoff, insecure http allowed (the simulator).
pub fn test_config() -> OperatorConfig {
    OperatorConfig {
        allow_insecure_http: true,
        allowed_hosts: vec!["127.0.0.1".into()],
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_secs(5),
        dpc_request_timeout: Duration::from_secs(2),
        concurrency: 16,
        ..OperatorConfig::default()
    }
}

pub struct Harness {
    /// The request rate of the accounts this harness creates.
    pub requests_per_minute: u32,
    /// The test's own namespace; the controller watches it (and what `also_watch` adds).
    pub ns: String,
    pub cluster: &'static Endpoint,
    pub sim: DpcSim,
    /// An admin client whose requests (the test's and the in-process controller's) are counted.
    pub client: Client,
    pub counter: counting::RequestCounter,
    pub ctx: Arc<Context>,
    config: OperatorConfig,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    _scope: ScopeGuard,
}

/// Held shared by every harness, exclusively by `Harness::start_alone`.
static SCOPE: std::sync::LazyLock<Arc<tokio::sync::RwLock<()>>> =
    std::sync::LazyLock::new(Default::default);

enum ScopeGuard {
    Shared(tokio::sync::OwnedRwLockReadGuard<()>),
    Exclusive(tokio::sync::OwnedRwLockWriteGuard<()>),
}

/// Installs (or upgrades to) the CRDs on an API server, once per server and test process, and
/// waits until they are established.
pub async fn install_crds(client: &Client, server: &str) {
    static DONE: std::sync::LazyLock<Mutex<BTreeMap<String, Arc<tokio::sync::OnceCell<()>>>>> =
        std::sync::LazyLock::new(Default::default);
    let once = DONE
        .lock()
        .unwrap()
        .entry(server.to_string())
        .or_default()
        .clone();
    once.get_or_init(|| async {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in dpc_operator::api::crds() {
            let name = crd.metadata.name.clone().unwrap();
            api.patch(
                &name,
                &PatchParams::apply("dpc-operator-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .unwrap_or_else(|e| panic!("installing the CRD {name}: {e}"));
            tokio::time::timeout(
                WAIT,
                await_condition(api.clone(), &name, kube::runtime::conditions::is_crd_established()),
            )
            .await
            .unwrap_or_else(|_| panic!("the CRD {name} was not established within {WAIT:?}"))
            .unwrap();
        }
    })
    .await;
}

/// A namespace name of this test's own: the test's name, made a DNS label, and a random tail.
pub fn unique_name(prefix: &str) -> String {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let test = test.rsplit("::").next().unwrap_or(test);
    let mut base: String = format!("{prefix}{test}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    while base.ends_with('-') {
        base.pop();
    }
    format!("{base}-{:05x}", rand::random::<u32>() & 0xfffff)
}

/// Drops the finalizers of every object of `api`: no controller will release them.
async fn strip_finalizers<K>(api: &Api<K>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Ok(list) = api.list_metadata(&Default::default()).await else {
        return;
    };
    for obj in list.items {
        if obj
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| !f.is_empty())
        {
            let patch = serde_json::json!({"metadata": {"finalizers": null}});
            let _ = api
                .patch_metadata(
                    &obj.metadata.name.unwrap(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await;
        }
    }
}

/// Creates a namespace with `labels`.
pub async fn create_namespace(client: &Client, name: &str, labels: serde_json::Value) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let ns =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap();
    api.create(&PostParams::default(), &ns).await.unwrap();
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(test_config(), SimConfig::default()).await
    }

    pub async fn start_with(config: OperatorConfig, sim_config: SimConfig) -> Self {
        let guard = ScopeGuard::Shared(SCOPE.clone().read_owned().await);
        let cluster = control_plane::shared().await;
        Self::start_guarded(cluster, config, sim_config, guard).await
    }

    /// A harness on another API server (a private control plane of the test).
    pub async fn start_on(cluster: &'static Endpoint) -> Self {
        let guard = ScopeGuard::Shared(SCOPE.clone().read_owned().await);
        Self::start_guarded(cluster, test_config(), SimConfig::default(), guard).await
    }

    /// A harness no other harness of this process runs beside: for an operator that watches
    /// every namespace (it would act on the other tests' objects), and for tests that measure
    /// time or rates (two cores shared with the API server).
    pub async fn start_alone(config: OperatorConfig, sim_config: SimConfig) -> Self {
        let guard = ScopeGuard::Exclusive(SCOPE.clone().write_owned().await);
        let cluster = control_plane::shared().await;
        Self::start_guarded(cluster, config, sim_config, guard).await
    }

    async fn start_guarded(
        cluster: &'static Endpoint,
        config: OperatorConfig,
        sim_config: SimConfig,
        guard: ScopeGuard,
    ) -> Self {
        let ns = unique_name("");
        let counter = counting::RequestCounter::default();
        let client = counting::counted_client(
            &cluster.kubeconfig_with_token("admin", &cluster.admin_token, &ns),
            &counter,
        )
        .await;
        install_crds(&client, &cluster.server).await;
        create_namespace(&client, &ns, serde_json::json!({})).await;
        let sim = DpcSim::start(sim_config).await.unwrap();
        sim.add_client(CLIENT_ID, CLIENT_SECRET);
        let mut config = config;
        if config.namespaces.is_empty() {
            config.namespaces = vec![ns.clone()];
        }
        // The test's namespace stands for the operator's own: ClusterDpcAccount credentials
        // and Events live there.
        if config.operator_namespace.is_none() {
            config.operator_namespace = Some(ns.clone());
        }
        let h = Self {
            requests_per_minute: 60_000,
            ctx: Context::new(client.clone(), config.clone()),
            config,
            ns,
            cluster,
            sim,
            client,
            counter,
            shutdown: CancellationToken::new(),
            task: None,
            _scope: guard,
        };
        h.put_secret(
            CREDS,
            &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
        )
        .await;
        h.put_account(ACCOUNT, CREDS).await;
        h
    }

    /// Makes the controller watch `namespaces` too (before `run`).
    pub fn also_watch(mut self, namespaces: &[&str]) -> Self {
        assert!(self.task.is_none(), "also_watch before run");
        self.config
            .namespaces
            .extend(namespaces.iter().map(|n| n.to_string()));
        self.ctx = Context::new(self.client.clone(), self.config.clone());
        self
    }

    /// An admin kubeconfig whose default namespace is the test's.
    pub fn kubeconfig(&self) -> String {
        self.cluster
            .kubeconfig_with_token("admin", &self.cluster.admin_token, &self.ns)
    }

    /// Starts the controller (tests may prepare objects first).
    pub fn run(mut self) -> Self {
        let ctx = self.ctx.clone();
        let token = self.shutdown.clone();
        self.task = Some(tokio::spawn(controller::run(ctx, token)));
        self
    }

    /// Stops the controller and starts a new one with nothing in memory, as a restarted
    /// process would.
    pub async fn restart(self) -> Self {
        self.halt().await.run()
    }

    /// Cancels the controller and waits for it to end.
    async fn stop_controller(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the controller stops")
                .unwrap();
        }
    }

    /// Stops the controller; `run` then starts a new one with nothing in memory (the
    /// operator was down in between).
    pub async fn halt(mut self) -> Self {
        self.stop_controller().await;
        self.shutdown = CancellationToken::new();
        self.ctx = Context::new(self.client.clone(), self.config.clone());
        self
    }

    /// Stops the controller, then deletes the test's namespace (its objects' finalizers
    /// dropped, as no controller will release them), so the shared API server does not fill
    /// up with the objects of finished tests.
    pub async fn stop(mut self) {
        self.stop_controller().await;
        for ns in &self.config.namespaces {
            strip_finalizers(&Api::<ConnectionOverride>::namespaced(
                self.client.clone(),
                ns,
            ))
            .await;
            strip_finalizers(&Api::<DpcAccount>::namespaced(self.client.clone(), ns)).await;
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
                Api::all(self.client.clone());
            let _ = namespaces.delete(ns, &DeleteParams::default()).await;
        }
    }

    pub fn covs(&self) -> Api<ConnectionOverride> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn put_secret(&self, name: &str, data: &[(&str, &str)]) {
        put_secret_in(&self.client, &self.ns, name, data).await;
    }

    pub async fn put_config_map(&self, name: &str, data: &[(&str, &str)]) {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        api.patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&cm),
        )
        .await
        .unwrap();
    }

    /// Rotates a value of an existing Secret with one write.
    pub async fn rotate_secret(&self, name: &str, key: &str, value: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let patch = serde_json::json!({"stringData": {key: value}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Changes a label of a Secret: a metadata change that carries no new value.
    pub async fn touch_secret(&self, name: &str, label: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let patch = serde_json::json!({"metadata": {"labels": {"touched": label}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    pub async fn delete_secret(&self, name: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }

    /// An account spec pointed at this harness's simulator, with credentials from Secret
    /// `creds` (in `namespace`, for a ClusterDpcAccount).
    pub fn account_spec(&self, creds: &str, namespace: Option<&str>) -> DpcAccountSpec {
        DpcAccountSpec {
            region: None,
            api_url: Some(self.sim.api_url()),
            token_url: Some(self.sim.token_url()),
            audience: None,
            credentials_secret_ref: CredentialsSecretRef {
                name: creds.into(),
                namespace: namespace.map(str::to_string),
                client_id_key: "client_id".into(),
                client_secret_key: "client_secret".into(),
            },
            account_id: None,
            requests_per_minute: Some(self.requests_per_minute),
            request_burst: Some(100),
        }
    }

    /// A handle of the operator's own DPC client for this harness's account (calls made
    /// with it are the operator's calls: fencing, limits and tokens apply).
    pub fn account_handle(&self) -> dpc_operator::dpc::AccountHandle {
        let settings = self.ctx.dpc.settings();
        let spec = self.account_spec(CREDS, None);
        self.ctx.dpc.account(
            dpc_operator::dpc::AccountKey {
                namespace: Some(self.ns.clone()),
                name: ACCOUNT.into(),
            },
            dpc_operator::dpc::Endpoint::for_account(&spec, settings).unwrap(),
            dpc_operator::dpc::Credentials {
                client_id: dpc_operator::dpc::SecretString::new(CLIENT_ID),
                client_secret: dpc_operator::dpc::SecretString::new(CLIENT_SECRET),
            },
            dpc_operator::dpc::Rate {
                requests_per_minute: 60_000,
                burst: 100,
            },
        )
    }

    /// A ClusterDpcAccount named `name` with the harness's credentials and `allowed` as its
    /// `allowedNamespaces`.
    pub fn cluster_account(
        &self,
        name: &str,
        allowed: serde_json::Value,
    ) -> dpc_operator::api::ClusterDpcAccount {
        dpc_operator::api::ClusterDpcAccount::new(
            name,
            dpc_operator::api::ClusterDpcAccountSpec {
                account: self.account_spec(CREDS, Some(&self.ns)),
                allowed_namespaces: serde_json::from_value(allowed).unwrap(),
                allowed_projects: Vec::new(),
            },
        )
    }

    pub async fn put_account(&self, name: &str, creds: &str) {
        let api: Api<DpcAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let mut account = DpcAccount::new(name, self.account_spec(creds, None));
        account.metadata.namespace = Some(self.ns.clone());
        api.patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&account),
        )
        .await
        .unwrap();
    }

    /// Creates or updates a ConnectionOverride by apply.
    pub async fn apply(&self, cov: &Cov) -> ConnectionOverride {
        self.try_apply(cov).await.unwrap()
    }

    /// Applies a fixture, returning the API server's refusal when there is one.
    pub async fn try_apply(&self, cov: &Cov) -> kube::Result<ConnectionOverride> {
        let mut object = ConnectionOverride::new(&cov.name, cov.spec.clone());
        object.metadata.namespace = Some(self.ns.clone());
        object.metadata.annotations =
            (!cov.annotations.is_empty()).then(|| cov.annotations.clone());
        self.covs()
            .patch(
                &cov.name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&object),
            )
            .await
    }

    /// Waits until the object satisfies `done`; fails with its last state.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&ConnectionOverride) -> bool,
    ) -> ConnectionOverride {
        let condition = move |obj: Option<&ConnectionOverride>| obj.is_some_and(&done);
        match tokio::time::timeout(WAIT, await_condition(self.covs(), name, condition)).await {
            Ok(Ok(Some(obj))) => obj,
            other => {
                let current = self.covs().get_opt(name).await.unwrap();
                panic!(
                    "{name} did not become {what} within {WAIT:?} ({other:?}); status: {:#?}",
                    current.map(|c| c.status)
                );
            }
        }
    }

    /// Waits for Ready=True for the current generation.
    pub async fn wait_ready(&self, name: &str) -> ConnectionOverride {
        self.wait_for(name, "Ready", is_ready).await
    }

    /// Waits for Ready=False with `reason`.
    pub async fn wait_reason(&self, name: &str, reason: &'static str) -> ConnectionOverride {
        self.wait_for(name, reason, move |o| {
            ready_reason(o).as_deref() == Some(reason)
        })
        .await
    }

    /// Waits until the object is gone.
    pub async fn wait_gone(&self, name: &str) {
        let condition = |obj: Option<&ConnectionOverride>| obj.is_none();
        tokio::time::timeout(WAIT, await_condition(self.covs(), name, condition))
            .await
            .unwrap_or_else(|_| panic!("{name} was not deleted within {WAIT:?}"))
            .unwrap();
    }

    /// Events about `name`, as (type, reason, note).
    pub async fn events(&self, name: &str) -> Vec<(String, String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        let mut events: Vec<_> = api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect();
        events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
        events
            .into_iter()
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Waits until an Event with `reason` exists for `name` (watching Events).
    pub async fn wait_event(&self, name: &str, reason: &str) -> (String, String, String) {
        self.wait_event_in(&self.ns, name, reason).await
    }

    /// Waits until an Event with `reason` exists for `name` in `namespace`.
    pub async fn wait_event_in(
        &self,
        namespace: &str,
        name: &str,
        reason: &str,
    ) -> (String, String, String) {
        use futures::StreamExt;
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), namespace);
        let stream = kube::runtime::watcher(api, Default::default());
        let stream = kube::runtime::WatchStreamExt::applied_objects(stream);
        let mut stream = std::pin::pin!(stream);
        let found = tokio::time::timeout(WAIT, async {
            while let Some(Ok(e)) = stream.next().await {
                if e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.reason.as_deref() == Some(reason)
                {
                    return (
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.note.unwrap_or_default(),
                    );
                }
            }
            panic!("the Event watch ended");
        })
        .await;
        match found {
            Ok(event) => event,
            Err(_) => panic!(
                "no {reason} Event for {name}: {:?}",
                self.events(name).await
            ),
        }
    }

    /// Requests of `verb resource` sent through this harness's client.
    pub fn requests(&self, key: &str) -> u64 {
        self.counter.get(key)
    }

    /// Waits until at least `n` requests of `key` were sent.
    pub async fn wait_requests(&self, key: &str, n: u64) {
        let key = key.to_string();
        self.counter
            .wait_for(WAIT, |c| c.get(&key).copied().unwrap_or(0) >= n)
            .await
            .unwrap_or_else(|c| panic!("fewer than {n} {key} requests: {c:?}"));
    }
}

pub async fn put_secret_in(client: &Client, namespace: &str, name: &str, data: &[(&str, &str)]) {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    };
    match api.get_opt(name).await.unwrap() {
        Some(_) => {
            let patch = serde_json::json!({"stringData": secret.string_data});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap();
        }
        None => {
            api.create(&PostParams::default(), &secret).await.unwrap();
        }
    }
}

pub fn ready_reason(obj: &ConnectionOverride) -> Option<String> {
    let status = obj.status.as_ref()?;
    conditions::find(&status.conditions, conditions::READY).map(|c| c.reason.clone())
}

pub fn ready_condition(
    obj: &ConnectionOverride,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let status = obj.status.as_ref().expect("a status");
    conditions::find(&status.conditions, conditions::READY)
        .expect("a Ready condition")
        .clone()
}

/// Ready=True and Synced=True for the object's current generation.
pub fn is_ready(obj: &ConnectionOverride) -> bool {
    let Some(status) = obj.status.as_ref() else {
        return false;
    };
    status.observed_generation == obj.metadata.generation
        && conditions::is_true(&status.conditions, conditions::READY)
        && conditions::is_true(&status.conditions, conditions::SYNCED)
}

/// A ConnectionOverride fixture.
#[derive(Clone)]
pub struct Cov {
    pub name: String,
    pub spec: ConnectionOverrideSpec,
    pub annotations: BTreeMap<String, String>,
}

impl Cov {
    /// An override of connection `connection` in PROD with one literal property.
    pub fn new(name: &str, connection: &str) -> Self {
        Self {
            name: name.into(),
            spec: ConnectionOverrideSpec {
                account_ref: AccountRef {
                    name: ACCOUNT.into(),
                    kind: None,
                    namespace: None,
                },
                project_id: PROJECT.into(),
                environment_name: "PROD".into(),
                connection_name: connection.into(),
                auth_type: None,
                connection_overrides: ConnectionOverridesSpec {
                    secrets_location: Some(SecretsLocation {
                        type_: "AWS_SECRET_MANAGER".into(),
                        region: Some("eu-west-1".into()),
                        extra: BTreeMap::new(),
                    }),
                    connection_properties: [(
                        "secretName".to_string(),
                        format!("prod/{connection}"),
                    )]
                    .into(),
                    connection_properties_from: Vec::new(),
                },
                deletion_policy: None,
                sync_interval: None,
                drift_policy: None,
                management_policy: None,
                deletion_timeout: None,
            },
            annotations: BTreeMap::new(),
        }
    }

    pub fn property(mut self, name: &str, value: &str) -> Self {
        self.spec
            .connection_overrides
            .connection_properties
            .insert(name.into(), value.into());
        self
    }

    pub fn without_property(mut self, name: &str) -> Self {
        self.spec
            .connection_overrides
            .connection_properties
            .remove(name);
        self
    }

    pub fn property_from_secret(mut self, property: &str, secret: &str, key: &str) -> Self {
        self.spec
            .connection_overrides
            .connection_properties_from
            .push(PropertyFrom {
                property: property.into(),
                secret_key_ref: Some(KeySelector {
                    name: secret.into(),
                    key: key.into(),
                    namespace: None,
                }),
                config_map_key_ref: None,
            });
        self
    }

    pub fn property_from_config_map(mut self, property: &str, map: &str, key: &str) -> Self {
        self.spec
            .connection_overrides
            .connection_properties_from
            .push(PropertyFrom {
                property: property.into(),
                secret_key_ref: None,
                config_map_key_ref: Some(KeySelector {
                    name: map.into(),
                    key: key.into(),
                    namespace: None,
                }),
            });
        self
    }

    pub fn auth_type(mut self, auth_type: AuthType) -> Self {
        self.spec.auth_type = Some(auth_type);
        self
    }

    pub fn account(mut self, account: &str) -> Self {
        self.spec.account_ref.name = account.into();
        self
    }

    /// Uses the ClusterDpcAccount `account`.
    pub fn cluster_account(mut self, account: &str) -> Self {
        self.spec.account_ref.name = account.into();
        self.spec.account_ref.kind = Some(dpc_operator::api::AccountKind::ClusterDpcAccount);
        self
    }

    pub fn environment(mut self, environment: &str) -> Self {
        self.spec.environment_name = environment.into();
        self
    }

    pub fn orphan(mut self) -> Self {
        self.spec.deletion_policy = Some(DeletionPolicy::Orphan);
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }
}

/// The keys that appear more than once in one JSON object anywhere in `line` (serde_json
/// keeps the last of duplicates silently; log processors disagree on which wins).
pub fn duplicate_keys(line: &str) -> Vec<String> {
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    struct Keys(Vec<String>);
    struct Walk<'a>(&'a mut Vec<String>);
    impl<'de> serde::de::DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key.clone()) {
                    self.0.push(key);
                }
                map.next_value_seed(Walk(self.0))?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk(self.0))?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut keys = Keys(Vec::new());
    let mut de = serde_json::Deserializer::from_str(line);
    let _ = serde::de::DeserializeSeed::deserialize(Walk(&mut keys.0), &mut de);
    keys.0
}

/// Every line of a JSON log parses, and no object in it repeats a key.
pub fn assert_clean_json_log(output: &str) {
    let mut lines = 0;
    for line in output.lines().filter(|l| l.starts_with('{')) {
        lines += 1;
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let repeated = duplicate_keys(line);
        assert!(repeated.is_empty(), "keys {repeated:?} repeat in: {line}");
    }
    assert!(lines > 0, "no JSON log lines in:\n{output}");
}

#[test]
fn duplicate_keys_are_found_at_any_depth() {
    assert!(duplicate_keys(r#"{"a":1,"b":{"c":2}}"#).is_empty());
    assert_eq!(duplicate_keys(r#"{"a":1,"a":2}"#), ["a"]);
    assert_eq!(
        duplicate_keys(r#"{"span":{"name":"x","name":"reconcile"},"l":[{"m":1,"m":2}]}"#),
        ["name", "m"]
    );
}
