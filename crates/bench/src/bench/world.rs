//! The world a benchmark or soak runs in: the emulator, the simulator, the account, the objects, and the operator as a process.

use super::*;

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

/// The test doubles, the namespace, the account and its credentials.
pub struct World {
    pub emu: KubeEmulator,
    pub sim: DpcSim,
    pub client: Client,
    pub kubeconfig: PathBuf,
}

impl World {
    pub async fn start(
        work_dir: &Path,
        sim_config: SimConfig,
        requests_per_minute: u32,
        burst: u32,
    ) -> std::io::Result<Self> {
        let emu = KubeEmulator::start_with(
            "127.0.0.1:0".parse().expect("an address"),
            EmulatorConfig {
                history_limit: 200_000,
                ..EmulatorConfig::default()
            },
        )
        .await?;
        let sim = DpcSim::start(sim_config).await?;
        sim.add_client(CLIENT_ID, CLIENT_SECRET);
        std::fs::create_dir_all(work_dir)?;
        let kubeconfig = work_dir.join("kubeconfig");
        std::fs::write(&kubeconfig, emu.kubeconfig())?;
        let client = emu.client();
        emu.install_crds().await.map_err(std::io::Error::other)?;
        emu.create_namespace(NAMESPACE)
            .await
            .map_err(std::io::Error::other)?;
        let world = Self {
            emu,
            sim,
            client,
            kubeconfig,
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

    /// How many ConnectionOverrides are Ready for their current generation.
    pub fn ready_count(&self) -> usize {
        self.emu
            .count_where("dpc-operator.io", "connectionoverrides", is_ready)
    }

    /// Waits until `expected` ConnectionOverrides are Ready, following the emulator's changes
    /// (a scan of every object per look would hold the store lock the operator needs).
    pub async fn wait_ready(&self, expected: usize, timeout: Duration) -> Result<Duration, String> {
        use tokio::sync::broadcast::error::RecvError;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let follow = || {
            self.emu
                .select_and_follow("dpc-operator.io", "connectionoverrides", is_ready)
        };
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
