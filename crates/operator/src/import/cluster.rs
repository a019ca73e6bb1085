//! What the cluster of `--from-account` already holds, so the import neither prints an
//! override some ConnectionOverride there already names (its values, resolved from Secrets,
//! would be printed as literals into a file meant for Git; and two objects would name one
//! override) nor an account object that would replace a live one with placeholders.
//!
//! An object an earlier import printed, applied as it was (the import annotations, the same
//! namespace, nothing read from Secrets or ConfigMaps), is printed again: a re-import is how
//! a team sees what changed in DPC.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::{Failure, Found};
use crate::api::{
    AccountKind, ClusterDpcAccount, ConnectionOverride, DpcAccount, IMPORTED_CONNECTION_ANNOTATION,
    IMPORTED_ENVIRONMENT_ANNOTATION, ManagementPolicy,
};
use crate::dpc::Endpoint;

/// The ConnectionOverrides of the cluster that name an override of `project` and are not
/// this import's own earlier output, by (environment, connection): `(namespace/name, what it
/// does with it)`.
pub type Named = BTreeMap<(String, String), (String, &'static str)>;

/// Every ConnectionOverride the kubeconfig may list that names an override of `project`
/// behind `api_url`: in all namespaces, or — where listing them all is forbidden — in
/// `namespace`. An object whose DPC cannot be told (its account cannot be read) counts.
pub async fn named_overrides(
    client: &Client,
    project: &str,
    namespace: &str,
    api_url: &str,
) -> Result<Named, Failure> {
    let c = || client.clone();
    let listed: Vec<ConnectionOverride> =
        list_anywhere(Api::all(c()), Some(Api::namespaced(c(), namespace)), "ConnectionOverrides")
            .await?
            .unwrap_or_else(|| {
                eprintln!("may not list ConnectionOverrides: could not check which overrides the cluster already names");
                Vec::new()
            });
    let accounts: Vec<DpcAccount> = list_anywhere(
        Api::all(c()),
        Some(Api::namespaced(c(), namespace)),
        "DpcAccounts",
    )
    .await?
    .unwrap_or_default();
    let cluster_accounts: Vec<ClusterDpcAccount> =
        list_anywhere(Api::all(c()), None, "ClusterDpcAccounts")
            .await?
            .unwrap_or_default();
    let api_of = |cov: &ConnectionOverride| -> Option<String> {
        if let Some(m) = cov
            .status
            .as_ref()
            .and_then(|s| s.managed_override.as_ref())
        {
            return Some(m.api_url.clone());
        }
        let name = &cov.spec.account_ref.name;
        let spec = match cov.spec.account_kind() {
            AccountKind::DpcAccount => accounts
                .iter()
                .find(|a| {
                    a.metadata.namespace == cov.metadata.namespace
                        && a.metadata.name.as_ref() == Some(name)
                })
                .map(|a| &a.spec),
            AccountKind::ClusterDpcAccount => cluster_accounts
                .iter()
                .find(|a| a.metadata.name.as_ref() == Some(name))
                .map(|a| &a.spec.account),
        };
        Endpoint::api_base(spec?)
    };
    let same_dpc = |cov: &ConnectionOverride| {
        api_of(cov).is_none_or(|url| url.trim_end_matches('/') == api_url.trim_end_matches('/'))
    };
    let mut named = Named::new();
    for cov in listed
        .iter()
        .filter(|c| c.spec.project_id == project && !reimported(c, namespace) && same_dpc(c))
    {
        let role = match cov.spec.management_policy() {
            ManagementPolicy::Manage => "manages",
            ManagementPolicy::ObserveOnly => "observes",
        };
        let who = format!(
            "{}/{}",
            cov.metadata.namespace.as_deref().unwrap_or_default(),
            cov.metadata.name.as_deref().unwrap_or_default()
        );
        let pair = (
            cov.spec.environment_name.clone(),
            cov.spec.connection_name.clone(),
        );
        named.entry(pair).or_insert((who, role));
    }
    Ok(named)
}

/// Drops from `found` every override a ConnectionOverride of the cluster names already;
/// returns a line for each.
pub async fn drop_named(
    client: &Client,
    project: &str,
    namespace: &str,
    api_url: &str,
    found: &mut Vec<Found>,
) -> Result<Vec<String>, Failure> {
    let named = named_overrides(client, project, namespace, api_url).await?;
    let mut dropped = Vec::new();
    found.retain(|item| {
        let connection = item.remote.name.clone().unwrap_or_default();
        let pair = (item.environment.clone(), connection);
        let Some((who, role)) = named.get(&pair) else {
            return true;
        };
        dropped.push(format!(
            "the override of connection {:?} in environment {:?}: ConnectionOverride {who} in the cluster already {role} it",
            pair.1, pair.0
        ));
        false
    });
    Ok(dropped)
}

/// Whether `cov` is what an import into `namespace` printed, as it printed it.
fn reimported(cov: &ConnectionOverride, namespace: &str) -> bool {
    let annotation = |name: &str| {
        cov.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(name))
            .map(String::as_str)
    };
    cov.metadata.namespace.as_deref() == Some(namespace)
        && annotation(IMPORTED_ENVIRONMENT_ANNOTATION) == Some(cov.spec.environment_name.as_str())
        && annotation(IMPORTED_CONNECTION_ANNOTATION) == Some(cov.spec.connection_name.as_str())
        && cov
            .spec
            .connection_overrides
            .connection_properties_from
            .is_empty()
}

/// Every object of a kind through `all`, or — where that is forbidden — through `scoped`
/// (one namespace); `None` when both are forbidden (or there is no `scoped`).
async fn list_anywhere<K>(
    all: Api<K>,
    scoped: Option<Api<K>>,
    what: &str,
) -> Result<Option<Vec<K>>, Failure>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let forbidden = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 403);
    let listed = match (crate::list_all_pages(&all).await, scoped) {
        (Err(e), None) if forbidden(&e) => return Ok(None),
        (Err(e), Some(scoped)) if forbidden(&e) => {
            eprintln!("may not list {what} in every namespace; looking in one only");
            crate::list_all_pages(&scoped).await
        }
        (other, _) => other,
    };
    match listed {
        Ok(items) => Ok(Some(items)),
        Err(e) if forbidden(&e) => Ok(None),
        Err(e) => Err(Failure::Kube(format!(
            "listing the {what} already in the cluster failed: {e}"
        ))),
    }
}

/// Refuses to print, with `--with-account`, a DpcAccount or a credentials Secret that exists
/// in the cluster already: applying the output would replace it with placeholders.
pub async fn refuse_replacing(
    client: &Client,
    namespace: &str,
    account: &str,
    secret: &str,
) -> Result<(), Failure> {
    let kube_failure = |what: String| {
        move |e: kube::Error| {
            Failure::Kube(format!("looking for {what} in the cluster failed: {e}"))
        }
    };
    let accounts: Api<DpcAccount> = Api::namespaced(client.clone(), namespace);
    let found = accounts
        .get_metadata_opt(account)
        .await
        .map_err(kube_failure(format!("DpcAccount {namespace}/{account}")))?;
    let existing = match found {
        Some(_) => Some(format!("DpcAccount {namespace}/{account}")),
        None => {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
            secrets
                .get_metadata_opt(secret)
                .await
                .map_err(kube_failure(format!("Secret {namespace}/{secret}")))?
                .map(|_| format!("Secret {namespace}/{secret}"))
        }
    };
    match existing {
        Some(what) => Err(Failure::Usage(format!(
            "--with-account would print {what}, which exists in the cluster: applying the output would replace it with placeholders (and break every object using it). Leave out --with-account: the printed objects refer to the account as it is"
        ))),
        None => Ok(()),
    }
}
