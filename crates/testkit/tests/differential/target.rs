//! One API server a case runs against: the emulator, or the real kube-apiserver of the test
//! run (in a namespace of the case's own).

use dpc_testkit::control_plane;
use dpc_testkit::kube::KubeEmulator;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// How long a request, a kubectl command or a wait may take.
pub const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Target {
    pub client: kube::Client,
    /// The case's namespace.
    pub ns: String,
    kubeconfig: PathBuf,
    emulator: Option<Arc<KubeEmulator>>,
}

/// An answer: status code, body (JSON, or the raw text as a string), and headers.
pub struct Reply {
    pub code: u16,
    pub body: Value,
    pub headers: http::HeaderMap,
}

impl Reply {
    /// `{code, reason, message}` of an error answer, or `{code}` of a success.
    pub fn brief(&self, t: &Target) -> Value {
        if self.code < 300 {
            return json!({"code": self.code});
        }
        json!({
            "code": self.code,
            "reason": self.body.get("reason"),
            "message": self.body.get("message").and_then(Value::as_str).map(|m| t.norm(m)),
        })
    }

    /// The `details.causes` of an error answer, as `field: reason: message`, sorted.
    pub fn causes(&self, t: &Target) -> Value {
        let mut causes: Vec<String> = self
            .body
            .pointer("/details/causes")
            .and_then(Value::as_array)
            .map(|c| {
                c.iter()
                    .map(|c| {
                        let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("");
                        t.norm(&format!(
                            "{}: {}: {}",
                            s("field"),
                            s("reason"),
                            s("message")
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        causes.sort();
        json!(causes)
    }

    pub fn at(&self, pointer: &str) -> Value {
        self.body.pointer(pointer).cloned().unwrap_or(Value::Null)
    }

    /// `metadata.resourceVersion` as a number.
    pub fn rv(&self) -> u64 {
        self.body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0)
    }

    /// The `fieldsV1` of `manager`'s entry.
    pub fn fields_of(&self, manager: &str) -> Value {
        self.body
            .pointer("/metadata/managedFields")
            .and_then(Value::as_array)
            .and_then(|entries| entries.iter().find(|e| e["manager"] == manager))
            .map(|e| e["fieldsV1"].clone())
            .unwrap_or(Value::Null)
    }

    /// The managers of `managedFields`, as `manager/operation[/subresource]`, sorted.
    pub fn managers(&self) -> Value {
        let mut managers: Vec<String> = self
            .body
            .pointer("/metadata/managedFields")
            .and_then(Value::as_array)
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| {
                        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("");
                        match s("subresource") {
                            "" => format!("{}/{}", s("manager"), s("operation")),
                            sub => format!("{}/{}/{sub}", s("manager"), s("operation")),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        managers.sort();
        json!(managers)
    }
}

/// What kubectl did: its exit code, and what it printed, normalized (`raw` is stdout as
/// printed, for piping into another command).
pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub raw: String,
}

impl Target {
    pub async fn emulator() -> Self {
        let emulator = KubeEmulator::start().await.expect("the emulator starts");
        emulator.install_crds().await.expect("the CRDs install");
        let kubeconfig = emulator.kubeconfig();
        let client = emulator.client();
        Self::with_namespace(client, kubeconfig, Some(Arc::new(emulator))).await
    }

    pub async fn real() -> Self {
        let cluster = control_plane::shared().await;
        let kubeconfig = cluster.kubeconfig_with_token("admin", &cluster.admin_token, "default");
        let client = control_plane::client_from(&kubeconfig).await;
        control_plane::install_crds(&client, &cluster.server).await;
        Self::with_namespace(client, kubeconfig, None).await
    }

    async fn with_namespace(
        client: kube::Client,
        kubeconfig: String,
        emulator: Option<Arc<KubeEmulator>>,
    ) -> Self {
        let ns = unique("diff");
        let kubeconfig = kubeconfig.replace("namespace: default", &format!("namespace: {ns}"));
        let path = std::env::temp_dir().join(format!("{ns}.kubeconfig"));
        std::fs::write(&path, &kubeconfig).expect("the kubeconfig is written");
        let target = Self {
            client,
            ns: ns.clone(),
            kubeconfig: path,
            emulator,
        };
        let created = target
            .call(
                "POST",
                "/api/v1/namespaces",
                None,
                Some(&json!({"metadata": {"name": ns}})),
            )
            .await;
        assert_eq!(
            created.code, 201,
            "creating namespace {ns}: {}",
            created.body
        );
        target
    }

    /// Deletes the case's namespace (on the real server) and stops the emulator.
    pub async fn finish(self) {
        let _ = self
            .call(
                "DELETE",
                &format!("/api/v1/namespaces/{}", self.ns),
                None,
                None,
            )
            .await;
        let _ = std::fs::remove_file(&self.kubeconfig);
    }

    /// Whether this is the emulator (for the report only; cases never branch on it).
    pub fn is_emulator(&self) -> bool {
        self.emulator.is_some()
    }

    /// The path of `plural` (and object `name`) in the case's namespace: our CRDs' kinds,
    /// and the core kinds.
    pub fn path(&self, plural: &str, name: Option<&str>) -> String {
        let base = match plural {
            "connectionoverrides" | "dpcaccounts" => format!(
                "/apis/dpc-operator.io/v1alpha1/namespaces/{}/{plural}",
                self.ns
            ),
            "clusterdpcaccounts" => "/apis/dpc-operator.io/v1alpha1/clusterdpcaccounts".into(),
            "leases" => format!("/apis/coordination.k8s.io/v1/namespaces/{}/leases", self.ns),
            _ => format!("/api/v1/namespaces/{}/{plural}", self.ns),
        };
        match name {
            Some(name) => format!("{base}/{name}"),
            None => base,
        }
    }

    /// Creates `object` in `plural` (of the case's namespace).
    pub async fn create(&self, plural: &str, object: &Value) -> Reply {
        self.call("POST", &self.path(plural, None), None, Some(object))
            .await
    }

    /// A JSON merge patch of `path`.
    pub async fn merge(&self, path: &str, patch: &Value) -> Reply {
        let merge = "application/merge-patch+json";
        self.call("PATCH", path, Some(merge), Some(patch)).await
    }

    /// Sends one request (`content_type` defaults to JSON) and reads the whole answer.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let bytes = body
            .map(|b| serde_json::to_vec(b).expect("serializes"))
            .unwrap_or_default();
        self.send(
            method,
            path,
            content_type.unwrap_or("application/json"),
            None,
            bytes,
        )
        .await
    }

    /// Sends one request with raw bytes and an `Accept` header.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        accept: Option<&str>,
        bytes: Vec<u8>,
    ) -> Reply {
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", content_type);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let request = request
            .body(kube::client::Body::from(bytes))
            .expect("a request");
        let response = tokio::time::timeout(WAIT, self.client.send(request))
            .await
            .unwrap_or_else(|_| panic!("{method} {path} took over {WAIT:?}"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let code = response.status().as_u16();
        let headers = response.headers().clone();
        let raw = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .unwrap_or_else(|_| panic!("the answer to {method} {path} took over {WAIT:?}"))
            .expect("the answer is read")
            .to_bytes();
        let body = serde_json::from_slice(&raw)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()));
        Reply {
            code,
            body,
            headers,
        }
    }

    /// Runs kubectl with this target's kubeconfig (and `stdin`).
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Ran {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("KUBECTL_EXTERNAL_DIFF")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("kubectl is installed");
        let mut input = child.stdin.take().expect("piped");
        if let Some(text) = stdin {
            input
                .write_all(text.as_bytes())
                .await
                .expect("kubectl reads stdin");
        }
        drop(input);
        let output = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {} hung", args.join(" ")))
            .expect("kubectl ran");
        let raw = String::from_utf8_lossy(&output.stdout).into_owned();
        Ran {
            code: output.status.code().unwrap_or(-1),
            stdout: self.norm(&raw),
            stderr: self.norm(&String::from_utf8_lossy(&output.stderr)),
            raw,
        }
    }

    /// Text with what differs by run replaced: the namespace, times, uids, ages.
    pub fn norm(&self, text: &str) -> String {
        static TIME: LazyLock<regex::Regex> = LazyLock::new(|| {
            regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)").unwrap()
        });
        static UID: LazyLock<regex::Regex> = LazyLock::new(|| {
            regex::Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
                .unwrap()
        });
        static VERSION: LazyLock<regex::Regex> =
            LazyLock::new(|| regex::Regex::new(r"Resource Version:( +)\d+").unwrap());
        // A CEL rule that failed to run: the error is the interpreter's own wording (a known
        // difference); the value, the rule's message and the rest are compared.
        static RULE_ERROR: LazyLock<regex::Regex> = LazyLock::new(|| {
            regex::Regex::new(
                r#"(Invalid value: "(?:string|integer|number|boolean|object|array)": ).*? evaluating rule: "#,
            )
            .unwrap()
        });
        let text = text.replace(&self.ns, "NS");
        let text = RULE_ERROR.replace_all(&text, "${1}<error> evaluating rule: ");
        let text = TIME.replace_all(&text, "TIME");
        let text = VERSION.replace_all(&text, "Resource Version:${1}RV");
        UID.replace_all(&text, "UID").into_owned()
    }
}

/// A name no other case or run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}
