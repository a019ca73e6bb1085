//! Accounts: a DpcAccount or ClusterDpcAccount resolved to where to call DPC, with which
//! credentials (read from their Secret) and at which rate; the rules that say which
//! namespaces and projects may use a ClusterDpcAccount; and the cache that lets thousands of
//! objects of one account share one read of it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};
use kube::{Api, Client};

use crate::api::conditions::Reason;
use crate::api::{
    AccountKind, AccountRef, ClusterDpcAccount, DpcAccount, DpcAccountSpec, KeySelector,
};
use crate::dpc::{AccountKey, ClientSettings, Credentials, Endpoint, Rate};
use crate::index::Reference;

mod cache;
mod changes;
mod reader;
mod values;
pub use cache::AccountCache;
pub(crate) use reader::Reader;
pub use values::{Values, is_config_map, is_secret};

/// A resolved account: where to call, with which credentials, at which rate.
#[derive(Clone, Debug)]
pub struct ResolvedAccount {
    pub key: AccountKey,
    pub endpoint: Endpoint,
    pub credentials: Credentials,
    pub rate: Rate,
    /// The projects a ClusterDpcAccount allows (empty: all); none for a DpcAccount.
    pub allowed_projects: Vec<String>,
    /// The account is being deleted: it serves deletions only.
    pub deleting: bool,
}

impl ResolvedAccount {
    /// `DpcAccount ns/name` or `ClusterDpcAccount name`.
    pub fn describe(&self) -> String {
        match &self.key.namespace {
            Some(_) => format!("DpcAccount {}", self.key),
            None => format!("ClusterDpcAccount {}", self.key),
        }
    }

    /// Why the account may not serve `project`, if it may not (a ClusterDpcAccount's
    /// `allowedProjects`).
    pub fn refuses_project(&self, project: &str) -> Option<String> {
        let allowed = &self.allowed_projects;
        (!allowed.is_empty() && !allowed.iter().any(|p| p == project)).then(|| {
            format!(
                "ClusterDpcAccount {} does not allow project {project} (see its spec.allowedProjects)",
                self.key
            )
        })
    }
}

/// Why resolving failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{kind} {name} not found")]
    AccountNotFound { kind: &'static str, name: String },
    #[error("{kind} {name} cannot be used: {reason}")]
    AccountInvalid {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error(
        "ClusterDpcAccount {account} does not allow namespace {namespace} (see its spec.allowedNamespaces)"
    )]
    NotAllowed { account: String, namespace: String },
    #[error("{kind} {namespace}/{name} not found ({purpose})")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
        purpose: String,
    },
    #[error("{kind} {namespace}/{name} has no key {key:?} ({purpose})")]
    KeyMissing {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
        purpose: String,
    },
    #[error("{kind} {namespace}/{name} key {key:?} is not UTF-8 text ({purpose})")]
    NotText {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
        purpose: String,
    },
    #[error("reading {what} failed: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl ResolveError {
    /// Whether what failed is gone (the account, its credentials Secret or key), rather than
    /// refusing this use of it: only then may a deletion use the account as last resolved.
    pub fn is_gone(&self) -> bool {
        matches!(
            self,
            ResolveError::AccountNotFound { .. }
                | ResolveError::NotFound { .. }
                | ResolveError::KeyMissing { .. }
        )
    }

    /// The Ready reason for this failure; `None` for a failure of the Kubernetes API itself,
    /// which is retried with backoff.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            ResolveError::AccountNotFound { .. } | ResolveError::AccountInvalid { .. } => {
                Some(Reason::AccountNotReady)
            }
            ResolveError::NotAllowed { .. } => Some(Reason::AccountNotAllowed),
            ResolveError::NotFound { .. } => Some(Reason::SecretNotFound),
            ResolveError::KeyMissing { .. } => Some(Reason::SecretKeyMissing),
            ResolveError::NotText { .. } => Some(Reason::InvalidSpec),
            ResolveError::Kube { .. } => None,
        }
    }
}

fn kube_error(what: String) -> impl FnOnce(kube::Error) -> ResolveError {
    move |source| ResolveError::Kube { what, source }
}

/// Whether a label selector matches a set of labels (`matchLabels` and every
/// `matchExpressions` operator). An empty selector matches everything.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    // An operator kube does not know makes the selector match nothing.
    Selector::try_from(selector.clone()).is_ok_and(|selector| selector.matches(labels))
}

/// The account of a DpcAccount or ClusterDpcAccount spec: endpoint, rate and credentials
/// (read from `credentials_namespace`).
pub async fn account_from_spec(
    client: &Client,
    values: Option<&Values>,
    key: AccountKey,
    kind: &'static str,
    spec: &DpcAccountSpec,
    credentials_namespace: &str,
    settings: &ClientSettings,
) -> Result<ResolvedAccount, ResolveError> {
    let endpoint =
        Endpoint::for_account(spec, settings).map_err(|reason| ResolveError::AccountInvalid {
            kind,
            name: key.to_string(),
            reason,
        })?;
    let creds = &spec.credentials_secret_ref;
    let purpose = format!("credentials of {kind} {}", key.name);
    let mut reader = Reader::new(client, credentials_namespace);
    if let Some(values) = values {
        reader = reader.cached(values);
    }
    let selector = |key: &String| KeySelector {
        name: creds.name.clone(),
        key: key.clone(),
        namespace: None,
    };
    let client_id = reader
        .secret_value(&selector(&creds.client_id_key), &purpose)
        .await?;
    let client_secret = reader
        .secret_value(&selector(&creds.client_secret_key), &purpose)
        .await?;
    Ok(ResolvedAccount {
        key,
        endpoint,
        credentials: Credentials {
            client_id,
            client_secret,
        },
        rate: Rate {
            requests_per_minute: spec.requests_per_minute(),
            burst: spec.request_burst(),
        },
        allowed_projects: Vec::new(),
        deleting: false,
    })
}

/// Resolves the account an object in `namespace` refers to. The references are what to
/// watch for it, as far as resolving got.
pub async fn resolve_account_ref(
    client: &Client,
    values: Option<&Values>,
    namespace: &str,
    account_ref: &AccountRef,
    settings: &ClientSettings,
    cluster_credentials: &[String],
) -> (Result<ResolvedAccount, ResolveError>, Vec<Reference>) {
    let name = &account_ref.name;
    match account_ref.kind.unwrap_or_default() {
        AccountKind::DpcAccount => {
            resolve_dpc_account(client, values, namespace, name, settings).await
        }
        AccountKind::ClusterDpcAccount => {
            let mut refs = Vec::new();
            let resolved = resolve_cluster_account(
                client,
                values,
                namespace,
                name,
                settings,
                cluster_credentials,
                &mut refs,
            )
            .await;
            (resolved, refs)
        }
    }
}

/// A DpcAccount of the object's own namespace, with credentials from that namespace.
async fn resolve_dpc_account(
    client: &Client,
    values: Option<&Values>,
    namespace: &str,
    name: &str,
    settings: &ClientSettings,
) -> (Result<ResolvedAccount, ResolveError>, Vec<Reference>) {
    let account = match get_dpc_account(client, namespace, name).await {
        Ok(account) => account,
        Err(e) => return (Err(e), Vec::new()),
    };
    let refs = vec![Reference::Secret {
        namespace: namespace.into(),
        name: account.spec.credentials_secret_ref.name.clone(),
    }];
    let spec = &account.spec;
    let resolved = resolve_dpc_account_spec(client, values, namespace, name, spec, settings).await;
    let deleting = account.metadata.deletion_timestamp.is_some();
    let resolved = resolved.map(|r| ResolvedAccount { deleting, ..r });
    (resolved, refs)
}

/// A DpcAccount and its credentials, read once (`dpc-operator import --from-account`).
pub(crate) async fn read_dpc_account(
    client: &Client,
    namespace: &str,
    name: &str,
    settings: &ClientSettings,
) -> Result<(ResolvedAccount, DpcAccountSpec), ResolveError> {
    let account = get_dpc_account(client, namespace, name).await?;
    let resolved =
        resolve_dpc_account_spec(client, None, namespace, name, &account.spec, settings).await?;
    Ok((resolved, account.spec))
}

async fn get_dpc_account(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<DpcAccount, ResolveError> {
    let full_name = format!("{namespace}/{name}");
    let api: Api<DpcAccount> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(account)) => Ok(account),
        Ok(None) => Err(ResolveError::AccountNotFound {
            kind: "DpcAccount",
            name: full_name,
        }),
        Err(source) => Err(ResolveError::Kube {
            what: format!("DpcAccount {full_name}"),
            source,
        }),
    }
}

async fn resolve_dpc_account_spec(
    client: &Client,
    values: Option<&Values>,
    namespace: &str,
    name: &str,
    spec: &DpcAccountSpec,
    settings: &ClientSettings,
) -> Result<ResolvedAccount, ResolveError> {
    if let Some(other) = spec
        .credentials_secret_ref
        .namespace
        .as_deref()
        .filter(|n| *n != namespace)
    {
        return Err(ResolveError::AccountInvalid {
            kind: "DpcAccount",
            name: format!("{namespace}/{name}"),
            reason: format!(
                "its credentialsSecretRef names namespace {other}; a DpcAccount reads Secrets of its own namespace only (use a ClusterDpcAccount to share credentials)"
            ),
        });
    }
    let key = AccountKey {
        namespace: Some(namespace.into()),
        name: name.to_string(),
    };
    account_from_spec(client, values, key, "DpcAccount", spec, namespace, settings).await
}

/// A ClusterDpcAccount that allows the object's namespace, with credentials from where
/// the operator may read them. What was read is added to `refs` as it goes.
async fn resolve_cluster_account(
    client: &Client,
    values: Option<&Values>,
    namespace: &str,
    name: &str,
    settings: &ClientSettings,
    cluster_credentials: &[String],
    refs: &mut Vec<Reference>,
) -> Result<ResolvedAccount, ResolveError> {
    let api: Api<ClusterDpcAccount> = Api::all(client.clone());
    let account = match api.get_opt(name).await {
        Ok(Some(account)) => account,
        Ok(None) => {
            return Err(ResolveError::AccountNotFound {
                kind: "ClusterDpcAccount",
                name: name.to_string(),
            });
        }
        Err(source) => {
            let what = format!("ClusterDpcAccount {name}");
            return Err(ResolveError::Kube { what, source });
        }
    };
    if !allows_namespace(client, &account, namespace, refs).await? {
        return Err(ResolveError::NotAllowed {
            account: name.to_string(),
            namespace: namespace.into(),
        });
    }
    let creds = &account.spec.account.credentials_secret_ref;
    let creds_namespace = cluster_credentials_namespace(&account.spec, cluster_credentials)
        .map_err(|reason| ResolveError::AccountInvalid {
            kind: "ClusterDpcAccount",
            name: name.to_string(),
            reason,
        })?;
    refs.push(Reference::Secret {
        namespace: creds_namespace.clone(),
        name: creds.name.clone(),
    });
    let key = AccountKey {
        namespace: None,
        name: name.to_string(),
    };
    let spec = &account.spec.account;
    let mut resolved = account_from_spec(
        client,
        values,
        key,
        "ClusterDpcAccount",
        spec,
        &creds_namespace,
        settings,
    )
    .await?;
    resolved.allowed_projects = account.spec.allowed_projects.clone();
    resolved.deleting = account.metadata.deletion_timestamp.is_some();
    Ok(resolved)
}

/// Whether a ClusterDpcAccount allows `namespace`: by name, or by its labels (then the
/// namespace is a reference to watch).
async fn allows_namespace(
    client: &Client,
    account: &ClusterDpcAccount,
    namespace: &str,
    refs: &mut Vec<Reference>,
) -> Result<bool, ResolveError> {
    let allowed = &account.spec.allowed_namespaces;
    if allowed.names.iter().any(|n| n == namespace) {
        return Ok(true);
    }
    let Some(selector) = &allowed.selector else {
        return Ok(false);
    };
    refs.push(Reference::Namespace {
        name: namespace.into(),
    });
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let found = namespaces.get_opt(namespace).await;
    let found = found.map_err(kube_error(format!("Namespace {namespace}")))?;
    let labels = found.and_then(|n| n.metadata.labels).unwrap_or_default();
    Ok(selector_matches(selector, &labels))
}

/// The namespace of a ClusterDpcAccount's credentials Secret, if the operator may read it
/// there: a ClusterDpcAccount can be created by someone who cannot read Secrets, so it may
/// only name Secrets where the operator administrator keeps shared credentials.
pub fn cluster_credentials_namespace(
    spec: &crate::api::ClusterDpcAccountSpec,
    allowed: &[String],
) -> Result<String, String> {
    let Some(namespace) = spec.account.credentials_secret_ref.namespace.clone() else {
        return Err("credentialsSecretRef.namespace is required for a ClusterDpcAccount".into());
    };
    if allowed.contains(&namespace) {
        return Ok(namespace);
    }
    Err(format!(
        "its credentialsSecretRef names namespace {namespace}, but ClusterDpcAccount credentials are read only from {} (the operator's namespace, or --cluster-credentials-namespaces)",
        if allowed.is_empty() {
            "no namespace: the operator's namespace is unknown".to_string()
        } else {
            allowed.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selectors_match_labels_and_expressions() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("team", "data")])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "env".into(),
                    operator: "In".into(),
                    values: Some(vec!["prod".into(), "staging".into()]),
                },
                LabelSelectorRequirement {
                    key: "frozen".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert!(selector_matches(
            &selector,
            &labels(&[("team", "data"), ("env", "prod")])
        ));
        assert!(!selector_matches(
            &selector,
            &labels(&[("team", "data"), ("env", "dev")])
        ));
        assert!(!selector_matches(
            &selector,
            &labels(&[("team", "web"), ("env", "prod")])
        ));
        assert!(!selector_matches(
            &selector,
            &labels(&[("team", "data"), ("env", "prod"), ("frozen", "1")])
        ));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
        // An operator Kubernetes does not know matches nothing.
        let unknown = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: "Near".into(),
                values: Some(vec!["prod".into()]),
            }]),
            ..Default::default()
        };
        assert!(!selector_matches(&unknown, &labels(&[("env", "prod")])));
    }
}
