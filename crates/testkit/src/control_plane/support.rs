//! The files and processes of a control plane: certificates, the audit policy, free ports,
//! the binaries' folder, processes tied to this one's life, and etcd's compaction.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};

use std::time::Duration;

use super::ENV_TOOLS;

/// Every request of a ServiceAccount at level Metadata (who, verb, resource, namespace);
/// nothing else, so the log stays small and carries no object bodies.
pub(super) const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: [\"system:serviceaccounts\"]
- level: None
";

pub(super) fn serving_certificates() -> Result<(String, String, String), String> {
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

pub(super) fn args<const N: usize>(args: [&str; N]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Compacts the etcd at `etcd_url` to its current revision through its v3 HTTP gateway.
pub async fn compact_etcd(etcd_url: &str) -> Result<i64, String> {
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{etcd_url}{path}")).json(&body).send()
    };
    // Any range answers with the header's current revision ("AA==" is the key "\0").
    let answer: serde_json::Value = post("/v3/kv/range", serde_json::json!({"key": "AA=="}))
        .await
        .map_err(|e| format!("etcd range: {e}"))?
        .json()
        .await
        .map_err(|e| format!("etcd range answer: {e}"))?;
    let revision: i64 = answer["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| format!("etcd answered no revision: {answer}"))?;
    let compacted = post(
        "/v3/kv/compaction",
        serde_json::json!({"revision": revision.to_string(), "physical": true}),
    )
    .await
    .map_err(|e| format!("etcd compaction: {e}"))?;
    if !compacted.status().is_success() {
        return Err(format!("etcd compaction answered {}", compacted.status()));
    }
    Ok(revision)
}

/// Three loopback ports free a moment ago.
pub(super) fn free_ports() -> Result<[u16; 3], String> {
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

pub(super) fn log_tail(path: &Path) -> String {
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
pub(super) fn spawn_tied(command: Command) -> std::io::Result<Child> {
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
