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
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
    children: Vec<(String, Child)>,
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
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(tools.join("etcd"));
        etcd.args([
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
        plane.spawn("etcd", etcd)?;
        plane
            .wait_until("etcd", || {
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
            .await?;

        // kube-apiserver
        let file = |name: &str| dir.join(name).display().to_string();
        let mut apiserver = Command::new(tools.join("kube-apiserver"));
        apiserver.args([
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
        plane.spawn("kube-apiserver", apiserver)?;
        let admin = plane.endpoint.client().await;
        plane
            .wait_until("kube-apiserver /readyz", || {
                let admin = admin.clone();
                async move {
                    let request = http::Request::get("/readyz").body(Vec::new()).ok()?;
                    admin.request_text(request).await.ok().map(|_| ())
                }
            })
            .await?;
        let version = admin
            .apiserver_version()
            .await
            .map_err(|e| format!("GET /version: {e}"))?;
        plane.endpoint.version = version.git_version;

        // kube-controller-manager: namespace deletion and garbage collection only.
        let mut kcm = Command::new(tools.join("kube-controller-manager"));
        kcm.args([
            &format!("--kubeconfig={}", file("admin.kubeconfig")),
            &format!("--authentication-kubeconfig={}", file("admin.kubeconfig")),
            &format!("--authorization-kubeconfig={}", file("admin.kubeconfig")),
            "--controllers=namespace-controller,garbage-collector-controller",
            "--leader-elect=false",
            "--secure-port=0",
        ]);
        plane.spawn("kube-controller-manager", kcm)?;

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

    fn spawn(&mut self, name: &str, mut command: Command) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))
            .map_err(|e| format!("{name}.log: {e}"))?;
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = spawn_tied(command).map_err(|e| format!("starting {name}: {e}"))?;
        self.children.push((name.into(), child));
        Ok(())
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
            for (name, child) in &mut self.children {
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
        for (_, child) in self.children.iter_mut().rev() {
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

/// Every request of a ServiceAccount at level Metadata (who, verb, resource, namespace);
/// nothing else, so the log stays small and carries no object bodies.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: [\"system:serviceaccounts\"]
- level: None
";

fn serving_certificates() -> Result<(String, String, String), String> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let e = |e: rcgen::Error| format!("generating certificates: {e}");
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "dpc-operator test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(e)?).map_err(e)?;
    let mut serving = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ])
    .map_err(e)?;
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let key = KeyPair::generate().map_err(e)?;
    let cert = serving.signed_by(&key, &ca).map_err(e)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// Three loopback ports free a moment ago.
fn free_ports() -> Result<[u16; 3], String> {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("no free port: {e}"))?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    Ok([ports[0], ports[1], ports[2]])
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The folder of the built binaries: `$DPC_KUBE_TOOLS`, or what `.ci/kube-tools` prints (it
/// builds them the first time, which takes 10–20 minutes).
pub fn tools_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os(ENV_TOOLS) {
        return Ok(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/kube-tools");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}): the tests need a kube-apiserver built from its Go module; install Go 1.26 and run `bash .ci/kube-tools` (its messages are above)",
            script.display(),
            output.status
        ));
    }
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Ok(PathBuf::from(dir))
}

/// Spawns `command` from a thread that lives as long as the process, with a parent-death
/// signal, so the child is killed when this process dies however it ends (a test binary
/// keeps its shared control plane in a static, which is never dropped).
fn spawn_tied(command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(spawn_with_parent_death_signal(&mut command));
                }
                // The senders live in a static: this loop never ends, and neither does the
                // thread whose death the children's signal is tied to.
            })
            .expect("a spawner thread");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    sender
        .lock()
        .expect("spawner lock")
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // the one unsafe block of the workspace: a pre-exec hook
fn spawn_with_parent_death_signal(command: &mut Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

#[cfg(not(target_os = "linux"))]
fn spawn_with_parent_death_signal(command: &mut Command) -> std::io::Result<Child> {
    command.spawn()
}

/// Installs (or upgrades to) the operator's CRDs on the API server `server` through `client`,
/// once per server and test process (every test binary applies the same CRDs with the same
/// field manager), and waits until they are established.
pub async fn install_crds(client: &kube::Client, server: &str) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    use std::collections::BTreeMap;
    use std::sync::{Arc, LazyLock, Mutex};
    const ESTABLISHED_WITHIN: Duration = Duration::from_secs(30);
    type Once = Arc<tokio::sync::OnceCell<()>>;
    static DONE: LazyLock<Mutex<BTreeMap<String, Once>>> = LazyLock::new(Default::default);
    let once = DONE
        .lock()
        .expect("the CRD install lock")
        .entry(server.to_string())
        .or_default()
        .clone();
    once.get_or_init(|| async {
        let api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in dpc_operator_api::crds() {
            let name = crd.metadata.name.clone().expect("a CRD has a name");
            api.patch(
                &name,
                &PatchParams::apply("dpc-operator-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .unwrap_or_else(|e| panic!("installing the CRD {name}: {e}"));
            let established = kube::runtime::wait::await_condition(
                api.clone(),
                &name,
                kube::runtime::conditions::is_crd_established(),
            );
            tokio::time::timeout(ESTABLISHED_WITHIN, established)
                .await
                .unwrap_or_else(|_| {
                    panic!("the CRD {name} was not established within {ESTABLISHED_WITHIN:?}")
                })
                .expect("the CRD is read");
        }
    })
    .await;
}
