//! `dpc-operator sandbox`: the whole operator working in a minute, without a cluster or a
//! DPC account. One process runs the Kubernetes API emulator, the DPC simulator and the real
//! controller; the shipped examples are applied (their DpcAccounts pointed at the
//! simulator); a kubeconfig is written so `kubectl` works from another terminal; conditions
//! and DPC calls are printed as they happen.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Zoned;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::api::conditions::{self, READY, SYNCED};
use crate::api::{ConnectionOverride, DpcAccount};
use crate::config::OperatorConfig;
use crate::context::Context;
use crate::controller;
use dpc_testkit::dpc::{Call, DpcSim, SimConfig};
use dpc_testkit::kube::{EmulatorConfig, KubeEmulator};

pub mod cli;

/// The examples the sandbox applies, as shipped in `deploy/examples/`.
pub const EXAMPLES: &[(&str, &str)] = &[(
    "quickstart.yaml",
    include_str!("../../../../deploy/examples/quickstart.yaml"),
)];

/// A project whose overrides were made by hand in the DPC UI before the operator came (the
/// simulator holds them from the start): what `dpc-operator import` is for (README,
/// "Adopting existing overrides").
pub const HAND_MADE_PROJECT: &str = "5b1e9c2a-7f3d-4e8a-9c61-2d4f8a0b3e71";

/// The overrides of [`HAND_MADE_PROJECT`]: two environments, connection names Kubernetes
/// cannot use as they are.
fn seed_hand_made(sim: &DpcSim) {
    let aws = serde_json::json!({"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"});
    for (environment, connection, secret) in [
        ("Production", "Salesforce (EU)", "prod/salesforce"),
        ("Production", "snowflake_main.v2", "prod/snowflake"),
        ("Dev", "Salesforce (EU)", "dev/salesforce"),
    ] {
        sim.put_override(
            HAND_MADE_PROJECT,
            environment,
            connection,
            None,
            serde_json::json!({"secretsLocation": aws, "connectionProperties": {"secretName": secret}}),
        );
    }
}

/// How to run the sandbox.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// Exit once every example is Ready (0), or after `timeout` with the reasons (1).
    pub once: bool,
    pub timeout: Duration,
    pub kube_addr: SocketAddr,
    pub dpc_addr: SocketAddr,
    /// Where to write the kubeconfig; default: a file in the temp directory.
    pub kubeconfig_out: Option<PathBuf>,
}

/// What the sandbox applied, for the readiness check.
struct Applied {
    overrides: Vec<(String, String)>,
    accounts: Vec<(String, String)>,
}

fn now() -> String {
    Zoned::now().strftime("%H:%M:%S").to_string()
}

fn api_resource(kind: &str) -> Option<ApiResource> {
    Some(match kind {
        "Namespace" => ApiResource::erase::<Namespace>(&()),
        "Secret" => ApiResource::erase::<Secret>(&()),
        "ConfigMap" => ApiResource::erase::<ConfigMap>(&()),
        "DpcAccount" => ApiResource::erase::<DpcAccount>(&()),
        "ConnectionOverride" => ApiResource::erase::<ConnectionOverride>(&()),
        _ => return None,
    })
}

/// The `stringData` of the example Secrets, by namespace and name.
fn example_secrets(docs: &[Value]) -> BTreeMap<(String, String), BTreeMap<String, String>> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    docs.iter()
        .filter(|d| d["kind"] == "Secret")
        .map(|doc| {
            let meta = &doc["metadata"];
            let namespace = meta["namespace"].as_str().unwrap_or("default").to_string();
            let data = doc["stringData"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), text(v))).collect())
                .unwrap_or_default();
            ((namespace, text(&meta["name"])), data)
        })
        .collect()
}

/// Points a DpcAccount at the simulator, and has the simulator accept the client in its
/// credentials Secret.
fn point_at_simulator(
    doc: &mut Value,
    namespace: &str,
    secrets: &BTreeMap<(String, String), BTreeMap<String, String>>,
    sim: &DpcSim,
) {
    doc["spec"]["apiUrl"] = Value::String(sim.api_url());
    doc["spec"]["tokenUrl"] = Value::String(sim.token_url());
    let creds = &doc["spec"]["credentialsSecretRef"];
    let secret_name = creds["name"].as_str().unwrap_or_default().to_string();
    let id_key = creds["clientIdKey"].as_str().unwrap_or("client_id");
    let secret_key = creds["clientSecretKey"].as_str().unwrap_or("client_secret");
    if let Some(data) = secrets.get(&(namespace.to_string(), secret_name))
        && let (Some(id), Some(secret)) = (data.get(id_key), data.get(secret_key))
    {
        sim.add_client(id, secret);
    }
}

/// Applies the examples; every DpcAccount is pointed at the simulator, whose accepted
/// clients are the ones in the accounts' credentials Secrets.
async fn apply_examples(client: &Client, sim: &DpcSim) -> Result<Applied, String> {
    let mut docs: Vec<Value> = Vec::new();
    for (name, text) in EXAMPLES {
        let parsed: Vec<Value> = serde_saphyr::from_multiple(text)
            .map_err(|e| format!("parsing example {name}: {e}"))?;
        docs.extend(parsed.into_iter().filter(|d| d.is_object()));
    }
    let secrets = example_secrets(&docs);
    let mut applied = Applied {
        overrides: Vec::new(),
        accounts: Vec::new(),
    };
    for mut doc in docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let namespace = doc["metadata"]["namespace"].as_str().map(String::from);
        let resource =
            api_resource(&kind).ok_or_else(|| format!("the sandbox cannot apply kind {kind}"))?;
        if kind == "DpcAccount" {
            let ns = namespace.clone().unwrap_or_else(|| "default".into());
            point_at_simulator(&mut doc, &ns, &secrets, sim);
            applied.accounts.push((ns, name.clone()));
        }
        if kind == "ConnectionOverride" {
            applied.overrides.push((
                namespace.clone().unwrap_or_else(|| "default".into()),
                name.clone(),
            ));
        }
        let api: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &name,
            &PatchParams::apply("dpc-operator-sandbox").force(),
            &Patch::Apply(&doc),
        )
        .await
        .map_err(|e| format!("applying {kind} {name}: {e}"))?;
        println!(
            "{}  applied {kind} {}{name}",
            now(),
            namespace.map(|n| format!("{n}/")).unwrap_or_default()
        );
    }
    Ok(applied)
}

fn describe_conditions(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> String {
    let mut parts = Vec::new();
    for type_ in [READY, SYNCED] {
        if let Some(c) = conditions::find(conds, type_) {
            parts.push(format!("{type_}={} ({})", c.status, c.reason));
        }
    }
    let message = conditions::find(conds, READY)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    if message.is_empty() {
        parts.join("  ")
    } else {
        format!("{}  {message}", parts.join("  "))
    }
}

/// Prints a line whenever an object's conditions change.
async fn print_conditions<K>(
    api: Api<K>,
    conditions_of: fn(&K) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(Ok(obj)) = stream.next().await {
        let conds = conditions_of(&obj);
        if conds.is_empty() {
            continue;
        }
        let line = describe_conditions(&conds);
        let key = format!(
            "{} {}/{}",
            K::kind(&()),
            obj.namespace().unwrap_or_default(),
            obj.name_any()
        );
        if last.get(&key) != Some(&line) {
            println!("{}  {key}  {line}", now());
            last.insert(key, line);
        }
    }
}

fn describe_call(call: &Call) -> String {
    let path = match &call.query {
        Some(q) => format!("{}?{q}", call.path),
        None => call.path.clone(),
    };
    let status = call
        .status
        .map(|s| s.to_string())
        .unwrap_or_else(|| "no answer".into());
    format!("{} {path} -> {status}", call.method)
}

/// Prints every DPC call once it has an answer.
async fn print_calls(sim: Arc<DpcSim>, stop: CancellationToken) {
    let mut printed = 0usize;
    loop {
        let seen = printed;
        let wait = sim.wait_for_calls(Duration::from_secs(3600), |calls| {
            calls.len() > seen && calls[seen..].iter().any(|c| c.status.is_some())
        });
        let calls = tokio::select! {
            result = wait => match result {
                Ok(calls) | Err(calls) => calls,
            },
            _ = stop.cancelled() => return,
        };
        for call in &calls[printed..] {
            if call.status.is_none() && call.fault.is_none() {
                break;
            }
            println!("{}  DPC  {}", now(), describe_call(call));
            printed += 1;
        }
    }
}

/// Whether every applied object is Ready; with the reasons of those that are not.
async fn readiness(client: &Client, applied: &Applied) -> (bool, Vec<String>) {
    let mut waiting = Vec::new();
    for (ns, name) in &applied.overrides {
        let api: Api<ConnectionOverride> = Api::namespaced(client.clone(), ns);
        let obj = api.get_opt(name).await.ok().flatten();
        let ready = obj.as_ref().is_some_and(|o| {
            o.status.as_ref().is_some_and(|s| {
                s.observed_generation == o.metadata.generation
                    && conditions::is_true(&s.conditions, READY)
            })
        });
        if !ready {
            let why = obj
                .and_then(|o| o.status)
                .map(|s| describe_conditions(&s.conditions))
                .unwrap_or_else(|| "no status yet".into());
            waiting.push(format!("ConnectionOverride {ns}/{name}: {why}"));
        }
    }
    for (ns, name) in &applied.accounts {
        let api: Api<DpcAccount> = Api::namespaced(client.clone(), ns);
        let obj = api.get_opt(name).await.ok().flatten();
        if !obj.as_ref().is_some_and(|o| {
            o.status
                .as_ref()
                .is_some_and(|s| conditions::is_true(&s.conditions, READY))
        }) {
            let why = obj
                .and_then(|o| o.status)
                .map(|s| describe_conditions(&s.conditions))
                .unwrap_or_else(|| "no status yet".into());
            waiting.push(format!("DpcAccount {ns}/{name}: {why}"));
        }
    }
    (waiting.is_empty(), waiting)
}

/// Starts the emulator and the simulator, writes the kubeconfig and says where they are.
async fn start_doubles(options: &SandboxOptions) -> Result<(KubeEmulator, Arc<DpcSim>), String> {
    let emu = KubeEmulator::start_with(options.kube_addr, EmulatorConfig::default())
        .await
        .map_err(|e| {
            format!(
                "starting the Kubernetes API emulator on {}: {e}",
                options.kube_addr
            )
        })?;
    let sim = Arc::new(
        DpcSim::start_on(options.dpc_addr, SimConfig::default())
            .await
            .map_err(|e| format!("starting the DPC simulator on {}: {e}", options.dpc_addr))?,
    );
    seed_hand_made(&sim);
    let kubeconfig = match &options.kubeconfig_out {
        Some(path) => path.clone(),
        None => std::env::temp_dir()
            .join(format!("dpc-operator-sandbox-{}", std::process::id()))
            .join("kubeconfig"),
    };
    if let Some(dir) = kubeconfig.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(&kubeconfig, emu.kubeconfig())
        .map_err(|e| format!("writing {}: {e}", kubeconfig.display()))?;

    println!("dpc-operator sandbox");
    println!("  Kubernetes API emulator  {}", emu.url());
    println!("  DPC simulator            {}", sim.api_url());
    println!("  kubeconfig               {}", kubeconfig.display());
    println!();
    println!("From another terminal:");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get connectionoverrides -A        # or: kubectl get cov -A -o wide");
    println!();
    println!("DPC also holds overrides made by hand in project {HAND_MADE_PROJECT}; adopt them:");
    println!(
        "  cargo run -- import --project {HAND_MADE_PROJECT} --from-account data-platform/matillion-eu \\"
    );
    println!("      --allow-insecure-http --dpc-allowed-hosts 127.0.0.1 > imported.yaml");
    println!("  kubectl apply -f imported.yaml           # Ready, and not one write to DPC");
    println!();

    Ok((emu, sim))
}

/// Installs the CRDs in the emulator.
async fn install_crds(client: &Client) -> Result<(), String> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::api::crds() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("dpc-operator-sandbox").force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|e| format!("installing CRD {}: {e}", crd.name_any()))?;
        println!("{}  installed CRD {}", now(), crd.name_any());
    }
    Ok(())
}

/// Waits until every example is Ready (looking on each change), the deadline of `--once`, or
/// shutdown. Returns whether all became Ready, and what the others wait for.
async fn wait_ready(
    client: &Client,
    applied: &Applied,
    options: &SandboxOptions,
    shutdown: &CancellationToken,
) -> (bool, Vec<String>) {
    let deadline = tokio::time::Instant::now() + options.timeout;
    let mut all_ready = false;
    let mut reasons = Vec::new();
    // Readiness is checked on each change of a ConnectionOverride or DpcAccount.
    let changes = futures::stream::select(
        watcher(
            Api::<ConnectionOverride>::all(client.clone()),
            watcher::Config::default(),
        )
        .map(|_| ()),
        watcher(
            Api::<DpcAccount>::all(client.clone()),
            watcher::Config::default(),
        )
        .map(|_| ()),
    );
    let mut changes = std::pin::pin!(changes);
    loop {
        let (ready, waiting) = readiness(client, applied).await;
        if ready {
            all_ready = true;
            break;
        }
        reasons = waiting;
        tokio::select! {
            _ = changes.next() => {}
            _ = tokio::time::sleep_until(deadline), if options.once => break,
            _ = shutdown.cancelled() => break,
        }
    }
    (all_ready, reasons)
}

/// Runs the sandbox. Returns whether every example became Ready (always true without
/// `--once`, which runs until Ctrl-C).
pub async fn run(options: SandboxOptions, shutdown: CancellationToken) -> Result<bool, String> {
    let (emu, sim) = start_doubles(&options).await?;
    let client = emu.client();
    install_crds(&client).await?;
    let applied = apply_examples(&client, &sim).await?;

    let config = OperatorConfig {
        allow_insecure_http: true,
        allowed_hosts: vec!["127.0.0.1".into(), "localhost".into()],
        backoff_base: Duration::from_millis(500),
        backoff_max: Duration::from_secs(10),
        dpc_request_timeout: Duration::from_secs(5),
        ..OperatorConfig::default()
    };
    let ctx = Context::new(client.clone(), config);
    let stop_controller = CancellationToken::new();
    let controller = tokio::spawn(controller::run(ctx, stop_controller.clone()));
    let printers = CancellationToken::new();
    let watch_covs = tokio::spawn(print_conditions::<ConnectionOverride>(
        Api::all(client.clone()),
        |o| {
            o.status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default()
        },
    ));
    let watch_accounts = tokio::spawn(print_conditions::<DpcAccount>(
        Api::all(client.clone()),
        |o| {
            o.status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default()
        },
    ));
    let calls = tokio::spawn(print_calls(sim.clone(), printers.clone()));

    let (all_ready, reasons) = wait_ready(&client, &applied, &options, &shutdown).await;
    if all_ready {
        println!();
        println!("{}  every example is Ready.", now());
    }
    if !options.once && !shutdown.is_cancelled() {
        println!(
            "The sandbox keeps running; change a Secret or a ConnectionOverride with kubectl and watch the operator follow. Ctrl-C stops it."
        );
        shutdown.cancelled().await;
    }
    stop_controller.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    printers.cancel();
    let _ = calls.await;
    watch_covs.abort();
    watch_accounts.abort();
    if options.once && !all_ready {
        eprintln!(
            "Not every example became Ready within {:?}:",
            options.timeout
        );
        for reason in &reasons {
            eprintln!("  {reason}");
        }
        return Ok(false);
    }
    let writes = sim.calls().iter().filter(|c| c.is_write()).count();
    println!("{}  sandbox stopped ({writes} DPC writes).", now());
    Ok(true)
}
