//! What a test does with its harness: apply objects and Secrets, wait for conditions and
//! calls, stop and restart the controller.

use dpc_operator::api::{ConnectionOverride, DpcAccount, DpcAccountSpec};
use dpc_operator::config::OperatorConfig;
use dpc_operator::context::Context;
use dpc_operator::controller;
use dpc_testkit::control_plane::{self, Endpoint};
use dpc_testkit::dpc::{DpcSim, SimConfig};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use tokio_util::sync::CancellationToken;

use super::*;

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
        let kubeconfig = cluster.kubeconfig_with_token("admin", &cluster.admin_token, &ns);
        // The operator's requests are counted; the test's own are not.
        let operator_client = counting::counted_client(&kubeconfig, &counter).await;
        let client = control_plane::client_from(&kubeconfig).await;
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
            ctx: Context::new(operator_client.clone(), config.clone()),
            operator_client,
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
        self.ctx = Context::new(self.operator_client.clone(), self.config.clone());
        self
    }

    /// An admin kubeconfig whose default namespace is the test's.
    pub fn kubeconfig(&self) -> String {
        self.cluster
            .kubeconfig_with_token("admin", &self.cluster.admin_token, &self.ns)
    }

    /// Someone edits the override of `connection` in PROD in the DPC UI: it then holds only
    /// `secretName: secret_name`.
    pub fn edit_in_dpc(&self, connection: &str, secret_name: &str) {
        self.sim.put_override(
            PROJECT,
            "PROD",
            connection,
            None,
            serde_json::json!({"connectionProperties": {"secretName": secret_name}}),
        );
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
        self.ctx = Context::new(self.operator_client.clone(), self.config.clone());
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
        let mut spec = dpc_operator::api::fixtures::account_spec(creds);
        spec.api_url = Some(self.sim.api_url());
        spec.token_url = Some(self.sim.token_url());
        spec.credentials_secret_ref.namespace = namespace.map(str::to_string);
        spec.requests_per_minute = Some(self.requests_per_minute);
        spec.request_burst = Some(100);
        spec
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
        self.put_account_spec(name, self.account_spec(creds, None))
            .await;
    }

    /// Applies the DpcAccount `name` with `spec`.
    pub async fn put_account_spec(&self, name: &str, spec: DpcAccountSpec) {
        let api: Api<DpcAccount> = Api::namespaced(self.client.clone(), &self.ns);
        let mut account = DpcAccount::new(name, spec);
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
        object.metadata.labels = (!cov.labels.is_empty()).then(|| cov.labels.clone());
        object.metadata.finalizers = (!cov.finalizers.is_empty()).then(|| cov.finalizers.clone());
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

    /// ConnectionOverride passes finished so far.
    pub fn passes_done(&self) -> u64 {
        *self.ctx.metrics.passes().borrow()
    }

    /// Waits until `n` ConnectionOverride passes have finished.
    pub async fn wait_passes(&self, n: u64) {
        let mut passes = self.ctx.metrics.passes();
        tokio::time::timeout(WAIT, passes.wait_for(|done| *done >= n))
            .await
            .unwrap_or_else(|_| panic!("fewer than {n} passes within {WAIT:?}"))
            .unwrap();
    }

    /// Runs one more pass of `name` (as the resync sweep or a drift check asks for one) and
    /// waits until it has finished.
    pub async fn pass(&self, name: &str) {
        let mut passes = self.ctx.metrics.passes();
        let target = *passes.borrow_and_update() + 1;
        self.ctx.trigger(&(self.ns.clone(), name.to_string()));
        tokio::time::timeout(WAIT, passes.wait_for(|n| *n >= target))
            .await
            .unwrap_or_else(|_| panic!("no pass of {name} within {WAIT:?}"))
            .unwrap();
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
