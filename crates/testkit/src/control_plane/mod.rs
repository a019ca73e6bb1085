//! A real Kubernetes control plane for the tests: etcd, kube-apiserver and
//! kube-controller-manager (namespace deletion and garbage collection), built from their Go
//! modules by `.ci/kube-tools` and started here as processes on free loopback ports, the way
//! envtest does with downloaded binaries.
//!
//! The API server runs with TLS (a CA generated here), RBAC, an admin token (group
//! `system:masters`), service-account signing keys (so `TokenRequest` and `kubectl create
//! token` work) and an audit log of every request made by a ServiceAccount. Everything lives
//! in one folder, described by `control-plane.json`, so other processes can attach to it:
//! `.ci/test` starts one for the whole test run with `dpc-control-plane` and exports its folder
//! as `DPC_TEST_CONTROL_PLANE`; a test process started without it starts its own.
//!
//! There is no kubelet: Deployments create no Pods. An operator under test runs as a process.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

mod audit;
mod support;
pub use audit::{audited_identity, audited_requests, service_account_token};
use support::*;
pub use support::{compact_etcd, install_crds, tools_dir};

/// The environment variable naming the folder of a running control plane to attach to.
pub const ENV_DIR: &str = "DPC_TEST_CONTROL_PLANE";
/// The environment variable naming the folder of the built binaries (else `.ci/kube-tools`
/// is run, which builds them the first time).
pub const ENV_TOOLS: &str = "DPC_KUBE_TOOLS";
/// The description of a running control plane, in its folder.
pub const DESCRIPTION: &str = "control-plane.json";

/// How long start-up may take: seconds usually, tens of seconds on a loaded two-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// What a client needs to reach a running control plane.
/// No `Debug`: it holds the admin token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// The CA that signed the serving certificate (PEM).
    pub ca_file: PathBuf,
    /// A kubeconfig of the admin user.
    pub kubeconfig: PathBuf,
    /// The admin user's bearer token (group `system:masters`).
    pub admin_token: String,
    /// The audit log: one JSON line per request of a ServiceAccount, at level Metadata.
    pub audit_log: PathBuf,
    /// `gitVersion` of `/version`.
    pub version: String,
    /// The folder that holds the binaries.
    pub tools: PathBuf,
    /// etcd's client URL (its v3 HTTP gateway answers there: `/v3/kv/compaction`).
    #[serde(default)]
    pub etcd_url: String,
}

impl Endpoint {
    /// Reads the description of a running control plane from its folder.
    pub fn read(dir: &Path) -> Result<Self, String> {
        let path = dir.join(DESCRIPTION);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not valid: {e}", path.display()))
    }

    /// A kubeconfig for `user` authenticated by `token` (the admin, or a ServiceAccount's
    /// TokenRequest token).
    pub fn kubeconfig_with_token(&self, user: &str, token: &str, namespace: &str) -> String {
        let ca = std::fs::read(&self.ca_file).expect("the control plane's CA file");
        kubeconfig(&self.server, &ca, user, token, namespace)
    }

    /// An admin kube client.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig_with_token("admin", &self.admin_token, "default")).await
    }
}

/// A kube client configuration from kubeconfig text.
pub async fn config_from(kubeconfig_yaml: &str) -> kube::Config {
    crate::install_crypto_provider();
    let parsed = kube::config::Kubeconfig::from_yaml(kubeconfig_yaml).expect("a valid kubeconfig");
    kube::Config::from_custom_kubeconfig(parsed, &kube::config::KubeConfigOptions::default())
        .await
        .expect("a client configuration from the kubeconfig")
}

/// A kube client from kubeconfig text.
pub async fn client_from(kubeconfig_yaml: &str) -> kube::Client {
    kube::Client::try_from(config_from(kubeconfig_yaml).await).expect("a kube client")
}

fn kubeconfig(server: &str, ca_pem: &[u8], user: &str, token: &str, namespace: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {user}\n    namespace: {namespace}\ncurrent-context: test\n"
    )
}

/// A control plane started by this process; its processes stop when it is dropped (and, as
/// they are started with a parent-death signal, when this process dies).
pub struct ControlPlane {
    pub endpoint: Endpoint,
    dir: PathBuf,
    keep_dir: bool,
    children: Vec<Process>,
}

/// One process of the control plane, and how to start it again.
struct Process {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// How a process of the control plane is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, and wait for it to exit (kube-apiserver shuts down gracefully).
    Term,
    /// SIGKILL.
    Kill,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager in `dir` (created; a new
    /// temporary folder when `None`) and waits until the API server is ready.
    pub async fn start(dir: Option<PathBuf>) -> Result<Self, String> {
        crate::install_crypto_provider();
        let tools = tools_dir()?;
        let keep_dir = dir.is_some();
        let dir = match dir {
            Some(dir) => dir,
            None => std::env::temp_dir().join(format!(
                "dpc-control-plane-{}-{}",
                std::process::id(),
                Instant::now().elapsed().as_nanos() ^ rand::random::<u64>() as u128
            )),
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let started = Instant::now();
        let mut plane = Self {
            endpoint: Endpoint {
                server: String::new(),
                ca_file: dir.join("ca.crt"),
                kubeconfig: dir.join("admin.kubeconfig"),
                admin_token: hex::encode(rand::random::<[u8; 24]>()),
                audit_log: dir.join("audit.log"),
                version: String::new(),
                tools: tools.clone(),
                etcd_url: String::new(),
            },
            dir: dir.clone(),
            keep_dir,
            children: Vec::new(),
        };
        let [etcd_port, peer_port, api_port] = free_ports()?;
        plane.endpoint.server = format!("https://127.0.0.1:{api_port}");
        plane.write_files()?;

        // etcd
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        plane.endpoint.etcd_url = etcd_url.clone();
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = args([
            "--name=default",
            &format!("--data-dir={}", dir.join("etcd").display()),
            &format!("--listen-client-urls={etcd_url}"),
            &format!("--advertise-client-urls={etcd_url}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]);
        plane.spawn("etcd", tools.join("etcd"), etcd)?;
        plane.wait_for_etcd().await?;

        // kube-apiserver
        let file = |name: &str| dir.join(name).display().to_string();
        let apiserver = args([
            &format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            &format!("--secure-port={api_port}"),
            &format!("--cert-dir={}", file("certs")),
            &format!("--tls-cert-file={}", file("serving.crt")),
            &format!("--tls-private-key-file={}", file("serving.key")),
            &format!("--client-ca-file={}", file("ca.crt")),
            "--authorization-mode=RBAC",
            &format!("--token-auth-file={}", file("tokens.csv")),
            &format!("--service-account-issuer={}", plane.endpoint.server),
            &format!("--service-account-key-file={}", file("sa.pub")),
            &format!("--service-account-signing-key-file={}", file("sa.key")),
            "--service-cluster-ip-range=10.0.0.0/24",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            &format!("--audit-policy-file={}", file("audit-policy.yaml")),
            &format!("--audit-log-path={}", file("audit.log")),
            "--audit-log-maxsize=0",
            "--profiling=false",
        ]);
        plane.spawn("kube-apiserver", tools.join("kube-apiserver"), apiserver)?;
        plane.wait_for_apiserver().await?;
        let admin = plane.endpoint.client().await;
        let version = admin
            .apiserver_version()
            .await
            .map_err(|e| format!("GET /version: {e}"))?;
        plane.endpoint.version = version.git_version;

        // kube-controller-manager: namespace deletion and garbage collection only.
        let kcm = args([
            &format!("--kubeconfig={}", file("admin.kubeconfig")),
            &format!("--authentication-kubeconfig={}", file("admin.kubeconfig")),
            &format!("--authorization-kubeconfig={}", file("admin.kubeconfig")),
            "--controllers=namespace-controller,garbage-collector-controller",
            "--leader-elect=false",
            "--secure-port=0",
        ]);
        plane.spawn(
            "kube-controller-manager",
            tools.join("kube-controller-manager"),
            kcm,
        )?;

        let description = serde_json::to_string_pretty(&plane.endpoint).expect("serializable");
        std::fs::write(dir.join(DESCRIPTION), description)
            .map_err(|e| format!("writing {DESCRIPTION}: {e}"))?;
        let _ = writeln!(
            std::io::stderr(),
            "control plane: kube-apiserver {} at {} ready in {:.1}s (folder {})",
            plane.endpoint.version,
            plane.endpoint.server,
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        Ok(plane)
    }

    /// The folder that holds the control plane's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write_files(&self) -> Result<(), String> {
        let dir = &self.dir;
        let write = |name: &str, contents: &[u8]| {
            std::fs::write(dir.join(name), contents).map_err(|e| format!("writing {name}: {e}"))
        };
        let (ca_pem, cert_pem, key_pem) = serving_certificates()?;
        write("ca.crt", ca_pem.as_bytes())?;
        write("serving.crt", cert_pem.as_bytes())?;
        write("serving.key", key_pem.as_bytes())?;
        let sa_key = rcgen::KeyPair::generate().map_err(|e| format!("service-account key: {e}"))?;
        write("sa.key", sa_key.serialize_pem().as_bytes())?;
        write("sa.pub", sa_key.public_key_pem().as_bytes())?;
        write(
            "tokens.csv",
            format!(
                "{},admin,admin-uid,system:masters\n",
                self.endpoint.admin_token
            )
            .as_bytes(),
        )?;
        write("audit-policy.yaml", AUDIT_POLICY.as_bytes())?;
        write(
            "admin.kubeconfig",
            kubeconfig(
                &self.endpoint.server,
                ca_pem.as_bytes(),
                "admin",
                &self.endpoint.admin_token,
                "default",
            )
            .as_bytes(),
        )?;
        Ok(())
    }

    fn spawn(&mut self, name: &str, program: PathBuf, args: Vec<String>) -> Result<(), String> {
        let mut process = Process {
            name: name.into(),
            program,
            args,
            child: None,
        };
        process.child = Some(self.launch(&process)?);
        self.children.push(process);
        Ok(())
    }

    fn launch(&self, process: &Process) -> Result<Child, String> {
        let name = &process.name;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .map_err(|e| format!("{name}.log: {e}"))?;
        let mut command = Command::new(&process.program);
        command
            .args(&process.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        spawn_tied(command).map_err(|e| format!("starting {name}: {e}"))
    }

    fn process(&mut self, name: &str) -> &mut Process {
        self.children
            .iter_mut()
            .find(|p| p.name == name)
            .expect("a process of the control plane")
    }

    /// Stops `name` (`etcd`, `kube-apiserver`, `kube-controller-manager`) and waits for it
    /// to exit (a graceful kube-apiserver takes up to a minute: it finishes its requests).
    pub async fn stop(&mut self, name: &str, how: Stop) {
        let Some(mut child) = self.process(name).child.take() else {
            return;
        };
        let signal = match how {
            Stop::Term => "-TERM",
            Stop::Kill => "-KILL",
        };
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }

    /// Starts `name` again with the same arguments (the same data, ports and certificates)
    /// and waits until it serves (`/readyz` of kube-apiserver, `/health` of etcd).
    pub async fn restart(&mut self, name: &str) -> Result<(), String> {
        let process = self.process(name);
        if process.child.is_some() {
            return Ok(());
        }
        let spec = Process {
            name: process.name.clone(),
            program: process.program.clone(),
            args: process.args.clone(),
            child: None,
        };
        let child = self.launch(&spec)?;
        self.process(name).child = Some(child);
        match name {
            "etcd" => self.wait_for_etcd().await,
            "kube-apiserver" => self.wait_for_apiserver().await,
            _ => Ok(()),
        }
    }

    /// Stops `name`, waits `down`, and starts it again (waiting until it serves).
    pub async fn outage(&mut self, name: &str, how: Stop, down: Duration) -> Result<(), String> {
        self.stop(name, how).await;
        tokio::time::sleep(down).await;
        self.restart(name).await
    }

    /// The process id of `name`, while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|p| p.name == name)?
            .child
            .as_ref()
            .map(Child::id)
    }

    /// Starts a second kube-apiserver on the same etcd (as an HA control plane has), named
    /// `name`, and returns its URL: a client of it keeps working while the first one is
    /// stopped.
    pub async fn add_apiserver(&mut self, name: &str) -> Result<String, String> {
        let [port, _, _] = free_ports()?;
        let server = format!("https://127.0.0.1:{port}");
        let first = self.process("kube-apiserver");
        let args = first
            .args
            .iter()
            .map(|a| {
                if a.starts_with("--secure-port=") {
                    format!("--secure-port={port}")
                } else if a.starts_with("--audit-log-path=") {
                    format!("{a}.{name}")
                } else {
                    a.clone()
                }
            })
            .collect();
        let program = first.program.clone();
        self.spawn(name, program, args)?;
        let mut endpoint = self.endpoint.clone();
        endpoint.server = server.clone();
        let admin = endpoint.client().await;
        self.wait_until(name, || {
            let admin = admin.clone();
            async move {
                let request = http::Request::get("/readyz").body(Vec::new()).ok()?;
                admin.request_text(request).await.ok().map(|_| ())
            }
        })
        .await?;
        Ok(server)
    }

    /// Compacts etcd's history up to its current revision (as etcd's periodic compaction
    /// does, all at once): a watch or a continue token from before it is `410 Gone` unless
    /// the API server's watch cache still holds it. Returns the revision.
    pub async fn compact_etcd(&self) -> Result<i64, String> {
        compact_etcd(&self.endpoint.etcd_url).await
    }

    async fn wait_for_etcd(&mut self) -> Result<(), String> {
        let etcd_url = self.endpoint.etcd_url.clone();
        self.wait_until("etcd", || {
            let etcd_url = etcd_url.clone();
            async move {
                let body = reqwest::get(format!("{etcd_url}/health"))
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                body.contains("\"true\"").then_some(())
            }
        })
        .await
    }

    async fn wait_for_apiserver(&mut self) -> Result<(), String> {
        let admin = self.endpoint.client().await;
        self.wait_until("kube-apiserver /readyz", || {
            let admin = admin.clone();
            async move {
                let request = http::Request::get("/readyz").body(Vec::new()).ok()?;
                admin.request_text(request).await.ok().map(|_| ())
            }
        })
        .await
    }

    /// Polls `ready` until it answers, failing early with the log of a process that exited.
    async fn wait_until<F, Fut>(&mut self, what: &str, ready: F) -> Result<(), String>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<()>>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready().await.is_some() {
                return Ok(());
            }
            for process in &mut self.children {
                let name = &process.name;
                let Some(child) = process.child.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "{name} exited ({status}) before {what} was ready; its log ends with:\n{}",
                        log_tail(&self.dir.join(format!("{name}.log")))
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what} was not ready within {START_TIMEOUT:?}; the kube-apiserver log ends with:\n{}",
                    log_tail(&self.dir.join("kube-apiserver.log"))
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, so nothing writes to a stopped etcd.
        for child in self
            .children
            .iter_mut()
            .rev()
            .filter_map(|p| p.child.as_mut())
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The control plane of this test run: the one `DPC_TEST_CONTROL_PLANE` names, else one this
/// process starts on first use and keeps until it exits. Prints, once per process, the
/// server's `/version` (past the test harness's output capture).
pub async fn shared() -> &'static Endpoint {
    static SHARED: tokio::sync::OnceCell<Result<(Endpoint, Option<ControlPlane>), String>> =
        tokio::sync::OnceCell::const_new();
    let shared = SHARED
        .get_or_init(|| async {
            match std::env::var_os(ENV_DIR) {
                Some(dir) => {
                    let endpoint = Endpoint::read(Path::new(&dir))?;
                    let version =
                        endpoint
                            .client()
                            .await
                            .apiserver_version()
                            .await
                            .map_err(|e| {
                                format!("the control plane in {dir:?} does not answer: {e}")
                            })?;
                    let _ = writeln!(
                        std::io::stderr(),
                        "control plane: kube-apiserver {} at {}",
                        version.git_version,
                        endpoint.server
                    );
                    Ok((endpoint, None))
                }
                None => {
                    remove_stale_folders();
                    let plane = ControlPlane::start(None).await?;
                    Ok((plane.endpoint.clone(), Some(plane)))
                }
            }
        })
        .await;
    match shared {
        Ok((endpoint, _)) => endpoint,
        Err(e) => panic!("no Kubernetes control plane: {e}"),
    }
}

/// Removes the folders of control planes whose process is gone (a test process never drops
/// its shared control plane; its children die with it, its folder stays).
fn remove_stale_folders() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("dpc-control-plane-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
