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
pub mod tools;

mod calls;
mod cov;
mod harness;
mod json_log;

pub use calls::*;
pub use cov::Cov;
pub use json_log::assert_clean_json_log;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dpc_operator::api::{ConnectionOverride, conditions};
use dpc_operator::config::OperatorConfig;
use dpc_operator::context::Context;
use dpc_testkit::control_plane::Endpoint;
use dpc_testkit::dpc::DpcSim;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
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
    /// The test's admin client (its requests are not counted).
    pub client: Client,
    /// The in-process controller's client, whose requests `counter` counts by verb and
    /// resource.
    operator_client: Client,
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

pub use dpc_testkit::control_plane::install_crds;

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
