//! The operator's identity as the chart ships it: the ServiceAccount, ClusterRole/Role and
//! bindings that `helm template` renders, applied to the real API server, and a kubeconfig
//! holding a TokenRequest token of that ServiceAccount — so the operator binary under test
//! has exactly the permissions a user's install gives it.

use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use serde_json::Value;

use super::tools;

/// How the chart is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `watchNamespaces` empty: one ClusterRole for everything.
    AllNamespaces,
    /// `watchNamespaces: [<the test's namespace>]`: a Role there, a ClusterRole for the
    /// cluster-scoped resources only.
    Namespaced,
}

/// What `install` applied.
pub struct Identity {
    /// `system:serviceaccount:<ns>:<name>`, as the audit log names the operator.
    pub username: String,
    /// A kubeconfig authenticated as the ServiceAccount.
    pub kubeconfig: String,
    /// The RBAC objects rendered by the chart (ClusterRole, Role, bindings).
    pub rbac: Vec<Value>,
}

/// Renders the chart for release `release` in `namespace` (the values of `scope`, leader
/// election on, CRDs left out: the harness installs them), the way `helm template` does.
pub fn render(release: &str, namespace: &str, scope: Scope) -> Vec<Value> {
    let watch = format!("watchNamespaces={{{namespace}}}");
    let mut args = vec![
        "template",
        release,
        "deploy/helm/dpc-operator",
        "--namespace",
        namespace,
        "--set",
        "crds.install=false",
        "--set",
        "leaderElection.enabled=true",
    ];
    if scope == Scope::Namespaced {
        args.extend(["--set", &watch]);
    }
    let yaml = tools::ok("helm", &args);
    serde_saphyr::from_multiple::<Value>(&yaml)
        .unwrap()
        .into_iter()
        .filter(|d| d.is_object())
        .collect()
}

/// Applies the chart's ServiceAccount and RBAC objects for the test's namespace and returns
/// a kubeconfig of that ServiceAccount. The release is named after the namespace, so the
/// cluster-scoped ClusterRole of one test is not another's.
pub async fn install(
    admin: &Client,
    cluster: &super::Endpoint,
    namespace: &str,
    scope: Scope,
) -> Identity {
    let id = service_account_only(admin, cluster, namespace, scope).await;
    grant(admin, &id).await;
    id
}

/// The chart's ServiceAccount alone, with its token: the RBAC objects are rendered but not
/// applied yet (see `grant`), so every request of it is refused.
pub async fn service_account_only(
    admin: &Client,
    cluster: &super::Endpoint,
    namespace: &str,
    scope: Scope,
) -> Identity {
    let mut rbac = Vec::new();
    let mut service_account = None;
    // Helm caps release names at 53 characters: the namespace's random tail keeps it unique.
    let release = format!("dpc-{}", namespace.rsplit('-').next().unwrap_or(namespace));
    for doc in render(&release, namespace, scope) {
        match doc["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                apply(admin, &doc).await;
                service_account = Some(doc["metadata"]["name"].as_str().unwrap().to_string());
            }
            "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" => rbac.push(doc),
            _ => {}
        }
    }
    let service_account = service_account.expect("the chart renders a ServiceAccount");
    let token = token_for(admin, namespace, &service_account).await;
    Identity {
        kubeconfig: cluster.kubeconfig_with_token(&service_account, &token, namespace),
        username: format!("system:serviceaccount:{namespace}:{service_account}"),
        rbac,
    }
}

/// Applies the chart's RBAC objects of `id`.
pub async fn grant(admin: &Client, id: &Identity) {
    for doc in &id.rbac {
        apply(admin, doc).await;
    }
}

/// A TokenRequest token of a ServiceAccount, valid for an hour (`kubectl create token`).
pub async fn token_for(admin: &Client, namespace: &str, service_account: &str) -> String {
    dpc_testkit::control_plane::service_account_token(admin, namespace, service_account, 3600)
        .await
        .expect("a TokenRequest for the operator's ServiceAccount")
}

/// Server-side applies one rendered object.
pub async fn apply(admin: &Client, doc: &Value) {
    let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            doc["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let kind = doc["kind"].as_str().unwrap();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, kind));
    let name = doc["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(admin.clone(), ns, &resource),
        None => Api::all_with(admin.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply("dpc-operator-tests").force(),
        &Patch::Apply(doc),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
}
