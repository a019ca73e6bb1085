//! The differential suite: each case runs the same requests and kubectl commands against the
//! emulator (what `dpc-operator sandbox` runs on) and against the real kube-apiserver of the
//! test run, and the two must observe the same: status codes, reasons, messages, the fields
//! that matter. A case records what it sees as labelled observations, normalized (namespace,
//! names, times, uids and resourceVersions replaced by placeholders or by "moved"), and the two
//! records must be equal. Where the emulator knowingly differs, [`KNOWN_DIFFERENCES`] says so,
//! and no case compares it.

mod admission;
mod kubectl;
mod resources;
mod target;

use serde_json::{Value, json};
use std::future::Future;
use target::Target;

/// What the emulator knowingly does not do (repeated in docs/test-doubles.md).
pub const KNOWN_DIFFERENCES: &[&str] = &[
    "no authentication or authorization: every request is admin, RBAC objects are not served, and TokenRequest tokens are opaque strings nothing checks",
    "no garbage collection by ownerReferences and no kube-controller-manager (no ServiceAccount token Secrets, no root CA ConfigMaps, no namespace controller conditions)",
    "no admission webhooks, ValidatingAdmissionPolicies or conversion webhooks; one served version per CRD, and no selectableFields",
    "protobuf only for Secret, ConfigMap, Namespace, ServiceAccount, core Event, Lease and TokenRequest (their lists and Status too); watches always stream JSON",
    "strategic merge patches of built-in kinds merge like JSON merge patches (no patchMergeKey list semantics)",
    "list pages are not one consistent snapshot of the moment of the first page",
    "the watch history is the last N changes (EmulatorConfig::history_limit) since the type was first served, not etcd's compaction window",
    "no Warning headers other than for unknown fields dropped by admission",
    "the OpenAPI documents carry only the served kinds, with minimal schemas for built-in kinds",
    "CEL rules run in kube's CEL interpreter: no cost budget, a rule selecting a field named `namespace` is given to it escaped, and a rule that fails to run (a string that is no duration) reports the interpreter's error text",
    "messages that quote Go internals differ in wording (a malformed continue token, an undecodable body), of several untypable fields in an apply the server names one at random where the emulator names the first, and a wrongly typed string or boolean in an apply is worded differently (the numeric case matches)",
];

#[test]
fn the_known_differences_are_listed() {
    // Written past the test harness's capture, so every run shows the list.
    use std::io::Write as _;
    let mut listed = String::from(
        "differential suite: known differences of the emulator from kube-apiserver:\n",
    );
    for difference in KNOWN_DIFFERENCES {
        listed.push_str(&format!("  - {difference}\n"));
    }
    let _ = std::io::stderr().write_all(listed.as_bytes());
    let docs = std::fs::read_to_string(
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests")
            + "/../../docs/test-doubles.md",
    )
    .expect("docs/test-doubles.md");
    for difference in KNOWN_DIFFERENCES {
        assert!(
            docs.contains(difference),
            "docs/test-doubles.md does not list: {difference}"
        );
    }
}

/// Labelled observations of one case on one target.
#[derive(Default)]
pub struct Seen(Vec<(String, Value)>);

impl Seen {
    pub fn see(&mut self, label: impl Into<String>, value: impl Into<Value>) {
        self.0.push((label.into(), value.into()));
    }
}

/// Runs `case` on the emulator and on the real API server and asserts both saw the same.
pub async fn compare<F, Fut>(case: F)
where
    F: Fn(Target) -> Fut,
    Fut: Future<Output = Seen>,
{
    let emulator = Target::emulator().await;
    let real = Target::real().await;
    let on_emulator = case(emulator.clone()).await;
    let on_real = case(real.clone()).await;
    emulator.finish().await;
    real.finish().await;
    let render = |seen: &Seen| -> Vec<String> {
        seen.0
            .iter()
            .map(|(label, value)| format!("{label}: {value}"))
            .collect()
    };
    let (e, r) = (render(&on_emulator), render(&on_real));
    if e != r {
        let mut report = String::from("the emulator and kube-apiserver differ:\n");
        for i in 0..e.len().max(r.len()) {
            let (a, b) = (e.get(i), r.get(i));
            if a != b {
                report.push_str(&format!(
                    "  emulator: {}\n  real:     {}\n",
                    a.map_or("<nothing>", |s| s),
                    b.map_or("<nothing>", |s| s)
                ));
            }
        }
        panic!("{report}");
    }
    assert!(!e.is_empty(), "the case observed nothing");
}

/// Sets `pointer` of `object` to `value` (`null` removes it), creating parents.
pub fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    let (parent, field) = pointer.rsplit_once('/').expect("a pointer");
    let mut node = &mut object;
    for part in parent.split('/').skip(1) {
        if node.get(part).is_none() {
            node[part] = json!({});
        }
        node = node.get_mut(part).expect("just made");
    }
    if value.is_null() {
        node.as_object_mut().expect("an object").remove(field);
    } else {
        node[field] = value;
    }
    object
}

/// A valid ConnectionOverride named `name`.
pub fn cov(name: &str) -> Value {
    json!({
        "apiVersion": "dpc-operator.io/v1alpha1",
        "kind": "ConnectionOverride",
        "metadata": {"name": name, "labels": {"team": "data"}},
        "spec": {
            "accountRef": {"name": "dpc"},
            "projectId": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
            "environmentName": "PROD",
            "connectionName": "Salesforce",
            "connectionOverrides": {"connectionProperties": {"username": "svc"}}
        }
    })
}

/// A valid DpcAccount named `name`.
pub fn account(name: &str) -> Value {
    json!({
        "apiVersion": "dpc-operator.io/v1alpha1",
        "kind": "DpcAccount",
        "metadata": {"name": name},
        "spec": {"region": "eu1", "credentialsSecretRef": {"name": "dpc-credentials"}}
    })
}
