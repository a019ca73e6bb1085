//! The world a benchmark or soak runs in: the Kubernetes API (the emulator, or the real
//! control plane of `.ci/kube-tools`), the simulator, the account, the objects, and the
//! operator as a process.

use super::*;
use dpc_testkit::control_plane::{ControlPlane, audited_identity, audited_requests};
use k8s_openapi::api::core::v1::Namespace;

/// A running operator process.
pub struct OperatorProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl OperatorProcess {
    /// Starts `binary run` against `kubeconfig` with `extra` flags, logging at `level`
    /// (`RUST_LOG`) to `log`.
    pub fn start(
        binary: &Path,
        kubeconfig: &Path,
        log: &Path,
        level: &str,
        extra: &[String],
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(binary)
            .arg("run")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--allow-insecure-http",
                "--dpc-allowed-hosts=127.0.0.1",
                "--log-format",
                "json",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", level)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGKILL, and wait for it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and wait up to `within`.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.pid().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()
    }
}

/// Peak resident memory (MiB) and CPU seconds (user + system) of a process, from /proc.
pub fn process_stats(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let hz = 100.0; // USER_HZ on Linux
    Some((hwm_kb / 1024.0, ticks / hz))
}

/// Which Kubernetes API the operator runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KubeKind {
    /// The in-process emulator (`dpc-testkit`).
    Emulator,
    /// etcd, kube-apiserver and kube-controller-manager built by `.ci/kube-tools`.
    Real,
}

/// The Kubernetes API of a run.
pub enum Kube {
    Emulator(KubeEmulator),
    Real(Box<ControlPlane>),
}

/// The test doubles, the namespace, the account and its credentials.
pub struct World {
    pub kube: Kube,
    pub sim: DpcSim,
    pub client: Client,
    pub kubeconfig: PathBuf,
    /// The operator's identity and the audit log (the real API server only).
    pub audit: Option<Audit>,
}

/// Who the operator is on the real API server, and where its requests are logged.
pub struct Audit {
    pub username: String,
    pub log: PathBuf,
}

async fn start_kube(
    work_dir: &Path,
    kind: KubeKind,
) -> std::io::Result<(Kube, Client, PathBuf, Option<Audit>)> {
    let kubeconfig = work_dir.join("kubeconfig");
    match kind {
        KubeKind::Emulator => {
            let emu = KubeEmulator::start_with(
                "127.0.0.1:0".parse().expect("an address"),
                EmulatorConfig {
                    history_limit: 200_000,
                    ..EmulatorConfig::default()
                },
            )
            .await?;
            std::fs::write(&kubeconfig, emu.kubeconfig())?;
            let client = emu.client();
            emu.install_crds().await.map_err(std::io::Error::other)?;
            emu.create_namespace(NAMESPACE)
                .await
                .map_err(std::io::Error::other)?;
            Ok((Kube::Emulator(emu), client, kubeconfig, None))
        }
        KubeKind::Real => {
            let plane = ControlPlane::start(Some(work_dir.join("control-plane")))
                .await
                .map_err(std::io::Error::other)?;
            let client = plane.endpoint.client().await;
            dpc_testkit::control_plane::install_crds(&client, &plane.endpoint.server).await;
            let namespaces: Api<Namespace> = Api::all(client.clone());
            let namespace =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}});
            namespaces
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(namespace).expect("a Namespace"),
                )
                .await
                .map_err(std::io::Error::other)?;
            // The operator runs as a ServiceAccount: the audit log records its requests.
            let (username, operator_kubeconfig) =
                audited_identity(&client, &plane.endpoint, NAMESPACE, "dpc-operator")
                    .await
                    .map_err(std::io::Error::other)?;
            std::fs::write(&kubeconfig, operator_kubeconfig)?;
            let log = plane.endpoint.audit_log.clone();
            let audit = Some(Audit { username, log });
            Ok((Kube::Real(Box::new(plane)), client, kubeconfig, audit))
        }
    }
}

impl World {
    pub async fn start(
        work_dir: &Path,
        sim_config: SimConfig,
        requests_per_minute: u32,
        burst: u32,
        kind: KubeKind,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(work_dir)?;
        let (kube, client, kubeconfig, audit) = start_kube(work_dir, kind).await?;
        let sim = DpcSim::start(sim_config).await?;
        sim.add_client(CLIENT_ID, CLIENT_SECRET);
        let world = Self {
            kube,
            sim,
            client,
            kubeconfig,
            audit,
        };
        world
            .put_secret(
                "dpc-creds",
                &[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)],
            )
            .await;
        let accounts: Api<DpcAccount> = Api::namespaced(world.client.clone(), NAMESPACE);
        let mut account = DpcAccount::new(
            ACCOUNT,
            DpcAccountSpec {
                api_url: Some(world.sim.api_url()),
                token_url: Some(world.sim.token_url()),
                requests_per_minute: Some(requests_per_minute),
                request_burst: Some(burst),
                ..account_spec("dpc-creds")
            },
        );
        account.metadata.namespace = Some(NAMESPACE.into());
        accounts
            .create(&PostParams::default(), &account)
            .await
            .map_err(std::io::Error::other)?;
        Ok(world)
    }

    /// Creates or overwrites a Secret.
    pub async fn put_secret(&self, name: &str, data: &[(&str, &str)]) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), NAMESPACE);
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": data.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect::<serde_json::Map<_, _>>(),
        });
        api.patch(
            name,
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("writing a Secret");
    }

    /// The operator's requests the API server logged from byte `from` of its audit log on,
    /// by verb and resource, and where to read on from (the real API server only).
    pub fn operator_requests(&self, from: u64) -> Option<(BTreeMap<String, u64>, u64)> {
        let audit = self.audit.as_ref()?;
        match audited_requests(&audit.log, &audit.username, from) {
            Ok(counts) => Some(counts),
            Err(e) => {
                eprintln!("bench: {e}");
                None
            }
        }
    }

    /// CPU seconds used so far by kube-apiserver and etcd (0 on the emulator).
    pub fn control_plane_cpu(&self) -> f64 {
        let Kube::Real(plane) = &self.kube else {
            return 0.0;
        };
        ["kube-apiserver", "etcd"]
            .iter()
            .filter_map(|name| process_stats(plane.pid(name)?))
            .map(|(_, cpu)| cpu)
            .sum()
    }

    /// How many ConnectionOverrides exist, and how many are Ready for their current
    /// generation.
    pub async fn ready_count(&self) -> Result<(usize, usize), String> {
        match &self.kube {
            Kube::Emulator(emu) => Ok((
                emu.count_where("dpc-operator.io", "connectionoverrides", |_| true),
                emu.count_where("dpc-operator.io", "connectionoverrides", is_ready),
            )),
            Kube::Real(_) => {
                let api: Api<ConnectionOverride> = Api::namespaced(self.client.clone(), NAMESPACE);
                let mut params = kube::api::ListParams::default().limit(500);
                let (mut total, mut ready) = (0, 0);
                loop {
                    let page = api.list(&params).await.map_err(|e| e.to_string())?;
                    for obj in &page.items {
                        total += 1;
                        ready += usize::from(is_ready(&serde_json::to_value(obj).expect("json")));
                    }
                    match page.metadata.continue_.filter(|c| !c.is_empty()) {
                        Some(token) => params = params.continue_token(&token),
                        None => return Ok((total, ready)),
                    }
                }
            }
        }
    }

    /// Waits until `expected` ConnectionOverrides are Ready, following their changes (a scan
    /// of every object per look would hold the emulator's store lock the operator needs, or
    /// load the API server).
    pub async fn wait_ready(&self, expected: usize, timeout: Duration) -> Result<Duration, String> {
        match &self.kube {
            Kube::Emulator(emu) => wait_ready_emulated(emu, expected, timeout).await,
            Kube::Real(_) => wait_ready_watched(&self.client, expected, timeout).await,
        }
    }
}

async fn wait_ready_watched(
    client: &Client,
    expected: usize,
    timeout: Duration,
) -> Result<Duration, String> {
    use kube::runtime::watcher::{self, Event};
    let started = Instant::now();
    let api: Api<ConnectionOverride> = Api::namespaced(client.clone(), NAMESPACE);
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
    let mut ready = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while ready.len() < expected {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => {
                return Err(format!(
                    "only {} of {expected} objects became Ready within {timeout:?}",
                    ready.len()
                ));
            }
            Ok(None) => return Err("the watch ended".into()),
            // The watcher retries on its own.
            Ok(Some(Err(_))) => continue,
            Ok(Some(Ok(event))) => event,
        };
        match event {
            Event::Apply(obj) | Event::InitApply(obj) => {
                let name = obj.metadata.name.clone().unwrap_or_default();
                if is_ready(&serde_json::to_value(&obj).expect("json")) {
                    ready.insert(name);
                } else {
                    ready.remove(&name);
                }
            }
            Event::Delete(obj) => {
                ready.remove(&obj.metadata.name.clone().unwrap_or_default());
            }
            Event::Init => ready.clear(),
            Event::InitDone => {}
        }
    }
    Ok(started.elapsed())
}

async fn wait_ready_emulated(
    emu: &KubeEmulator,
    expected: usize,
    timeout: Duration,
) -> Result<Duration, String> {
    use tokio::sync::broadcast::error::RecvError;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let follow = || emu.select_and_follow("dpc-operator.io", "connectionoverrides", is_ready);
    let (mut ready, mut changes) = follow();
    while ready.len() < expected {
        let change = match tokio::time::timeout_at(deadline, changes.recv()).await {
            Err(_) => {
                let ready = ready.len();
                return Err(format!(
                    "only {ready} of {expected} objects became Ready within {timeout:?}"
                ));
            }
            Ok(Err(RecvError::Lagged(_))) => {
                (ready, changes) = follow();
                continue;
            }
            Ok(Err(RecvError::Closed)) => return Err("the emulator stopped".to_string()),
            Ok(Ok(change)) => change,
        };
        if change.type_key.1 != "connectionoverrides" {
            continue;
        }
        let meta = &change.object["metadata"];
        let key = (
            meta["namespace"].as_str().unwrap_or_default().to_string(),
            meta["name"].as_str().unwrap_or_default().to_string(),
        );
        if change.kind != ChangeKind::Deleted && is_ready(&change.object) {
            ready.insert(key);
        } else {
            ready.remove(&key);
        }
    }
    Ok(started.elapsed())
}

/// Ready=True for the object's current generation.
pub fn is_ready(obj: &Value) -> bool {
    let generation = obj.pointer("/metadata/generation");
    let status = obj.get("status");
    let observed = status.and_then(|s| s.get("observedGeneration"));
    observed.is_some()
        && observed == generation
        && status
            .and_then(|s| s.get("conditions"))
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
}

/// The Secret bench object `i` reads.
pub(super) fn secret_of(i: usize) -> String {
    format!("sec-{i}")
}

/// The spec of bench object `i`: objects below `with_secret` read `secretKey` from their
/// own Secret. No syncInterval: the CRD refuses less than 30s, so the benchmark shortens the
/// operator's default instead (`--default-sync-interval`).
pub fn spec_of(i: usize, environments: usize, with_secret: usize) -> ConnectionOverrideSpec {
    let mut spec = override_spec(
        ACCOUNT,
        &format!("ENV-{}", i % environments.max(1)),
        &format!("conn-{i}"),
    )
    .in_aws("eu-west-1")
    .with_literal("secretName", &format!("prod/conn-{i}"));
    if i < with_secret {
        spec = spec.with_secret_value("secretKey", &secret_of(i), "key");
    }
    spec
}

/// Creates objects `range` with up to 64 requests in flight.
pub async fn create_objects(
    client: &Client,
    range: std::ops::Range<usize>,
    spec: impl Fn(usize) -> ConnectionOverrideSpec,
) {
    let api: Api<ConnectionOverride> = Api::namespaced(client.clone(), NAMESPACE);
    futures::stream::iter(range.map(|i| {
        let mut obj = ConnectionOverride::new(&format!("cov-{i}"), spec(i));
        obj.metadata.namespace = Some(NAMESPACE.into());
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &obj)
                .await
                .expect("creating an object")
        }
    }))
    .buffer_unordered(64)
    .for_each(|_| async {})
    .await;
}
