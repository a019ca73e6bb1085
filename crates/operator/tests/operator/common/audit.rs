//! Reads the API server's audit log (level Metadata, every request of a ServiceAccount) to
//! tell which API calls the operator made, and compares them with the RBAC rules the chart
//! grants: every rule used, nothing used that no rule grants, no write access to Secrets.

use std::collections::BTreeSet;

use serde_json::Value;

use super::Harness;
use super::identity::{Identity, Scope};

/// `(apiGroup, resource[/subresource], verb)`.
pub type Access = (String, String, String);

/// One request the audit log recorded.
#[derive(Debug)]
pub struct Request {
    pub access: Access,
    pub namespace: Option<String>,
    /// RBAC's verdict, from the event's `authorization.k8s.io/decision` annotation (a 403 may
    /// also be a create in a terminating namespace, which is no RBAC refusal).
    pub decision: Option<String>,
    /// The answer's HTTP status (`responseStatus.code`).
    pub code: Option<u16>,
}

/// The requests `username` made, as the audit log recorded them.
pub fn requests_of(log: &std::path::Path, username: &str) -> Vec<Request> {
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|e| panic!("reading the audit log {}: {e}", log.display()));
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["user"]["username"] == username)
        .filter_map(|event| {
            let object = &event["objectRef"];
            let resource = object["resource"].as_str()?;
            let resource = match object["subresource"].as_str() {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_string(),
            };
            Some(Request {
                access: (
                    object["apiGroup"].as_str().unwrap_or("").to_string(),
                    resource,
                    event["verb"].as_str()?.to_string(),
                ),
                namespace: object["namespace"].as_str().map(str::to_string),
                decision: event["annotations"]["authorization.k8s.io/decision"]
                    .as_str()
                    .map(str::to_string),
                code: event["responseStatus"]["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok()),
            })
        })
        .collect()
}

/// Every `(group, resource, verb)` the rules of the rendered Roles and ClusterRoles grant.
pub fn granted(rbac: &[Value]) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for doc in rbac {
        if doc["kind"] != "ClusterRole" && doc["kind"] != "Role" {
            continue;
        }
        for rule in doc["rules"].as_array().into_iter().flatten() {
            let strings = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for group in strings("apiGroups") {
                for resource in strings("resources") {
                    for verb in strings("verbs") {
                        out.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    out
}

/// The operator used every rule the chart grants and no other, was never refused, never wrote
/// a Secret, and in namespaced mode read Secrets in the watched namespace only.
pub fn assert_rules_match_use(h: &Harness, id: &Identity, scope: Scope) {
    let requests = requests_of(&h.cluster.audit_log, &id.username);
    assert!(
        !requests.is_empty(),
        "the audit log has no request of {}",
        id.username
    );
    let refused: Vec<&Request> = requests
        .iter()
        .filter(|r| r.decision.as_deref() == Some("forbid"))
        .collect();
    assert!(refused.is_empty(), "requests RBAC refused: {refused:#?}");
    let used: BTreeSet<Access> = requests.iter().map(|r| r.access.clone()).collect();
    let granted = granted(&id.rbac);
    let summary = |set: &BTreeSet<Access>| {
        set.iter()
            .map(|(g, r, v)| format!("{v} {g}/{r}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!("API calls of the operator ({scope:?}): {}", summary(&used));
    // Secrets are listed only by a server without streaming lists (before Kubernetes 1.34,
    // or 1.33 with WatchList off); this one streams them in a watch.
    let fallback: Access = (String::new(), "secrets".into(), "list".into());
    let unused: BTreeSet<Access> = granted
        .difference(&used)
        .filter(|access| **access != fallback)
        .cloned()
        .collect();
    assert!(
        unused.is_empty(),
        "the chart grants what the operator never used: {}",
        summary(&unused)
    );
    let ungranted: BTreeSet<Access> = used.difference(&granted).cloned().collect();
    assert!(
        ungranted.is_empty(),
        "the operator used what no rule grants: {}",
        summary(&ungranted)
    );
    for (group, resource, verb) in &granted {
        let secrets = group.is_empty() && (resource == "secrets" || resource == "*");
        assert!(
            !secrets || ["get", "list", "watch"].contains(&verb.as_str()),
            "the chart lets the operator {verb} Secrets"
        );
    }
    if scope == Scope::Namespaced {
        for doc in id.rbac.iter().filter(|d| d["kind"] == "ClusterRole") {
            assert!(
                !doc["rules"].to_string().contains("secrets"),
                "a namespaced install grants Secrets cluster-wide: {doc}"
            );
        }
        for request in &requests {
            if request.access.1 == "secrets" {
                assert_eq!(
                    request.namespace.as_deref(),
                    Some(h.ns.as_str()),
                    "a Secret read outside the watched namespace: {request:?}"
                );
            }
        }
    }
}
