//! What one ServiceAccount asked of the API server, read from its audit log: for the
//! benchmark's Kubernetes requests per object, counted by the server rather than the client.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::PostParams;
use kube::{Api, Client};

use super::Endpoint;

/// A ServiceAccount `namespace/name` bound to `cluster-admin`, and a kubeconfig holding a
/// TokenRequest token of it (valid for a day), so its requests are in the audit log.
pub async fn audited_identity(
    admin: &Client,
    endpoint: &Endpoint,
    namespace: &str,
    name: &str,
) -> Result<(String, String), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: kube::Error| format!("{what}: {err}")
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let account: ServiceAccount = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": namespace}
    }))
    .map_err(|e| e.to_string())?;
    accounts
        .create(&PostParams::default(), &account)
        .await
        .map_err(e("creating the ServiceAccount"))?;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{namespace}-{name}")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]
    }))
    .map_err(|e| e.to_string())?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .map_err(e("binding the ServiceAccount"))?;
    let token = service_account_token(admin, namespace, name, 86_400).await?;
    let username = format!("system:serviceaccount:{namespace}:{name}");
    Ok((
        username.clone(),
        endpoint.kubeconfig_with_token(&username, &token, namespace),
    ))
}

/// A TokenRequest token of ServiceAccount `namespace/name`, valid for `seconds` (what
/// `kubectl create token` gets).
pub async fn service_account_token(
    admin: &Client,
    namespace: &str,
    name: &str,
    seconds: i64,
) -> Result<String, String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(seconds),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer: TokenRequest = accounts
        .create_subresource("token", name, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("requesting a token of {namespace}/{name}: {e}"))?;
    Ok(answer.status.ok_or("the TokenRequest has no token")?.token)
}

/// The requests of `username` in the audit log from byte `from` on, as `verb
/// resource[/subresource]` counts, and the offset to read on from next time.
pub fn audited_requests(
    log: &Path,
    username: &str,
    from: u64,
) -> Result<(BTreeMap<String, u64>, u64), String> {
    let text = std::fs::read(log).map_err(|e| format!("reading {}: {e}", log.display()))?;
    let start = (from as usize).min(text.len());
    // Only whole lines: the server may be writing the last one.
    let end = text[start..]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(start, |i| start + i + 1);
    let mut counts = BTreeMap::new();
    for line in text[start..end].split(|b| *b == b'\n') {
        let Ok(event) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if event["user"]["username"] != username {
            continue;
        }
        let object = &event["objectRef"];
        let (Some(verb), Some(resource)) = (event["verb"].as_str(), object["resource"].as_str())
        else {
            continue;
        };
        let key = match object["subresource"].as_str() {
            Some(sub) => format!("{verb} {resource}/{sub}"),
            None => format!("{verb} {resource}"),
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    Ok((counts, end as u64))
}
