//! Reconcile of one DpcAccount or ClusterDpcAccount: its credentials resolve and DPC issues a
//! token with them. The `Ready` condition says so; the cached token then serves the
//! account's ConnectionOverrides.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{Instrument, info_span, warn};

use crate::accounts::{self, ResolveError, ResolvedAccount};
use crate::api::conditions::{self, READY, Reason};
use crate::api::{
    ClusterDpcAccount, ConnectionOverride, DpcAccount, DpcAccountSpec, DpcAccountStatus,
    FIELD_MANAGER, IN_USE_FINALIZER,
};
use crate::context::Context;
use crate::dpc::AccountKey;
use crate::index::Reference;
use crate::index::account_of;
use crate::key::{ObjKey, key_of};

use super::Error;
use super::outcome::{EventSpec, Verdict, classify};
use super::ownership;
use super::write::publish;

/// What the two account kinds have in common here.
pub trait AccountObject:
    Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    const KIND: &'static str;
    fn account_spec(&self) -> &DpcAccountSpec;
    fn account_status(&self) -> Option<&DpcAccountStatus>;
    /// The namespace of the credentials Secret, or why there is none (`cluster_credentials`:
    /// where ClusterDpcAccount credentials may be).
    fn credentials_namespace(&self, cluster_credentials: &[String]) -> Result<String, String>;
    fn account_key(&self) -> AccountKey;
    fn api(client: kube::Client, namespace: Option<&str>) -> Api<Self>;
    /// The Api to watch in a scope (one namespace, or all).
    fn watch_api(client: kube::Client, scope: Option<&str>) -> Api<Self>;
}

impl AccountObject for DpcAccount {
    const KIND: &'static str = "DpcAccount";
    fn account_spec(&self) -> &DpcAccountSpec {
        &self.spec
    }
    fn account_status(&self) -> Option<&DpcAccountStatus> {
        self.status.as_ref()
    }
    fn credentials_namespace(&self, _: &[String]) -> Result<String, String> {
        let own = self.namespace().unwrap_or_default();
        match self.spec.credentials_secret_ref.namespace.as_deref() {
            Some(other) if other != own => Err(format!(
                "its credentialsSecretRef names namespace {other}; a DpcAccount reads Secrets of its own namespace only (use a ClusterDpcAccount to share credentials)"
            )),
            _ => Ok(own),
        }
    }
    fn account_key(&self) -> AccountKey {
        AccountKey {
            namespace: self.namespace(),
            name: self.name_any(),
        }
    }
    fn api(client: kube::Client, namespace: Option<&str>) -> Api<Self> {
        Api::namespaced(client, namespace.unwrap_or_default())
    }
    fn watch_api(client: kube::Client, scope: Option<&str>) -> Api<Self> {
        match scope {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        }
    }
}

impl AccountObject for ClusterDpcAccount {
    const KIND: &'static str = "ClusterDpcAccount";
    fn account_spec(&self) -> &DpcAccountSpec {
        &self.spec.account
    }
    fn account_status(&self) -> Option<&DpcAccountStatus> {
        self.status.as_ref()
    }
    fn credentials_namespace(&self, cluster_credentials: &[String]) -> Result<String, String> {
        accounts::cluster_credentials_namespace(&self.spec, cluster_credentials)
    }
    fn account_key(&self) -> AccountKey {
        AccountKey {
            namespace: None,
            name: self.name_any(),
        }
    }
    fn api(client: kube::Client, _: Option<&str>) -> Api<Self> {
        Api::all(client)
    }
    fn watch_api(client: kube::Client, _: Option<&str>) -> Api<Self> {
        Api::all(client)
    }
}

fn index_key(key: &AccountKey) -> ObjKey {
    crate::key::obj_key(key.namespace.clone().unwrap_or_default(), key.name.clone())
}

/// Backoff keys of accounts are kept apart from those of ConnectionOverrides.
fn backoff_key(kind: &str, key: &AccountKey) -> ObjKey {
    crate::key::obj_key(
        format!("{kind}:{}", key.namespace.as_deref().unwrap_or("")),
        key.name.clone(),
    )
}

/// The error policy: retry with the account's backoff.
pub fn error_policy<K: AccountObject>(account: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = account.account_key();
    let delay = ctx.objects.next_backoff(&backoff_key(K::KIND, &key));
    warn!(kind = K::KIND, account = %key, error = %error, retry_in_ms = delay.as_millis() as u64, "account reconcile failed");
    Action::requeue(delay)
}

/// Reconciles one account.
pub async fn reconcile<K: AccountObject>(
    account: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    if !ctx.wait_synced().await {
        return Ok(Action::await_change());
    }
    let key = account.account_key();
    let span = info_span!("reconcile_account", kind = K::KIND, account = %key);
    async {
        let credentials_namespace =
            account.credentials_namespace(ctx.accounts.cluster_credentials_namespaces());
        if let Ok(ns) = &credentials_namespace {
            let secret = Reference::Secret {
                namespace: ns.clone(),
                name: account.account_spec().credentials_secret_ref.name.clone(),
            };
            ctx.account_index.set(&index_key(&key), vec![secret]);
        }
        if account.meta().deletion_timestamp.is_some() {
            let Some((message, action)) = release_when_unused(&*account, &key, &ctx).await? else {
                return Ok(Action::await_change());
            };
            write_status(&*account, &key, &ctx, (false, Reason::Deleting, message)).await?;
            return Ok(action);
        }
        ensure_in_use_finalizer(&*account, &ctx).await?;
        let resolved = resolve_account(&*account, &key, &ctx, credentials_namespace).await;
        let (ready, reason, message, action) = match resolved {
            Err(e) => match e.reason() {
                Some(reason) => (false, reason, e.to_string(), Action::await_change()),
                None => return Err(Error::Resolve(e.to_string())),
            },
            Ok(resolved) => token_check::<K>(&key, &ctx, &resolved).await,
        };
        write_status(&*account, &key, &ctx, (ready, reason, message)).await?;
        Ok(action)
    }
    .instrument(span)
    .await
}

/// The account's endpoint, rate and credentials, read from its Secret.
async fn resolve_account<K: AccountObject>(
    account: &K,
    key: &AccountKey,
    ctx: &Context,
    credentials_namespace: Result<String, String>,
) -> Result<ResolvedAccount, ResolveError> {
    let namespace = credentials_namespace.map_err(|reason| ResolveError::AccountInvalid {
        kind: K::KIND,
        name: key.to_string(),
        reason,
    })?;
    let spec = account.account_spec();
    let settings = ctx.dpc.settings();
    accounts::account_from_spec(
        &ctx.client,
        Some(&ctx.values),
        key.clone(),
        K::KIND,
        spec,
        &namespace,
        settings,
    )
    .await
}

/// Whether DPC issues a token for the account: `(ready, reason, message, next step)`.
async fn token_check<K: AccountObject>(
    key: &AccountKey,
    ctx: &Context,
    resolved: &ResolvedAccount,
) -> (bool, Reason, String, Action) {
    let dpc = ctx.dpc.account(
        resolved.key.clone(),
        resolved.endpoint.clone(),
        resolved.credentials.clone(),
        resolved.rate,
    );
    let backoff_key = backoff_key(K::KIND, key);
    match dpc.ensure_token().await {
        Ok(()) => {
            ctx.objects.reset_backoff(&backoff_key);
            let host = resolved.endpoint.token_url.host_str();
            let host = host.unwrap_or("the token endpoint");
            let message = format!("obtained an access token from {host}");
            (true, Reason::TokenObtained, message, ctx.resync())
        }
        Err(e) => {
            let verdict = classify(&e);
            let backoff = || ctx.objects.next_backoff(&backoff_key);
            let (reason, delay) = match verdict {
                Verdict::Deferred(_) => (Reason::RateLimited, Some(verdict.retry_delay(backoff))),
                Verdict::Failed { reason, retry } => (reason, retry.delay(backoff)),
            };
            let next = delay.map_or(Action::await_change(), Action::requeue);
            (false, reason, e.to_string(), next)
        }
    }
}

/// An account being deleted: released once no ConnectionOverride needs it to delete its
/// remote override, with what is kept of it in memory. Otherwise why it waits, and when to
/// look again (the deletion of each user asks too).
///
/// Needing it means: naming it, and calling DPC when deleted (it owns an override and its
/// policies let it delete; an Orphan or ObserveOnly object never calls). The watched objects
/// say so first; when none of them needs it, every ConnectionOverride the operator may read
/// is listed — without the `--selector`, so objects another shard or install reconciles
/// keep the account too.
async fn release_when_unused<K: AccountObject>(
    account: &K,
    key: &AccountKey,
    ctx: &Context,
) -> Result<Option<(String, Action)>, Error> {
    let finalizers = account.finalizers();
    if !finalizers.iter().any(|f| f == IN_USE_FINALIZER) {
        return Ok(None);
    }
    let mut users = ctx.account_users(key, |cov| ownership::will_delete(cov, ctx));
    if users.is_empty() {
        users = unwatched_users(key, ctx).await?;
    }
    if users.is_empty() {
        let remaining: Vec<&String> = finalizers
            .iter()
            .filter(|f| *f != IN_USE_FINALIZER)
            .collect();
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "replace", "path": "/metadata/finalizers", "value": remaining}
        ]);
        let api = K::api(ctx.client.clone(), key.namespace.as_deref());
        let patch: Patch<()> = Patch::Json(serde_json::from_value(patch)?);
        match api.patch(&key.name, &PatchParams::default(), &patch).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        ctx.accounts.forget_account(key);
        ctx.dpc.forget(key);
        return Ok(None);
    }
    let named: Vec<String> = users
        .iter()
        .take(5)
        .map(|key| format!("{}/{}", key.0, key.1))
        .collect();
    let more = if users.len() > named.len() {
        ", …"
    } else {
        ""
    };
    let message = format!(
        "deletion waits until no ConnectionOverride needs this account to delete its override in DPC: {} still do ({}{more})",
        users.len(),
        named.join(", ")
    );
    Ok(Some((message, Action::requeue(Duration::from_secs(60)))))
}

/// Every ConnectionOverride the operator may read that needs `key` to delete its override.
async fn unwatched_users(key: &AccountKey, ctx: &Context) -> Result<Vec<ObjKey>, Error> {
    let scopes: Vec<Option<String>> = match (&key.namespace, ctx.config.namespaces.is_empty()) {
        (Some(namespace), _) => vec![Some(namespace.clone())],
        (None, true) => vec![None],
        (None, false) => ctx.config.namespaces.iter().cloned().map(Some).collect(),
    };
    let mut users = Vec::new();
    for scope in scopes {
        let api: Api<ConnectionOverride> = match &scope {
            Some(namespace) => Api::namespaced(ctx.client.clone(), namespace),
            None => Api::all(ctx.client.clone()),
        };
        users.extend(
            crate::list_all_pages(&api)
                .await?
                .iter()
                .filter(|cov| account_of(cov) == *key && ownership::will_delete(cov, ctx))
                .map(|cov| key_of(&cov.metadata)),
        );
    }
    users.sort();
    Ok(users)
}

/// Adds the in-use finalizer: an account stays until its ConnectionOverrides no longer need
/// it (a namespace deletion removes everything at once).
async fn ensure_in_use_finalizer<K: AccountObject>(
    account: &K,
    ctx: &Context,
) -> Result<(), Error> {
    let finalizers = account.finalizers();
    if finalizers.iter().any(|f| f == IN_USE_FINALIZER) {
        return Ok(());
    }
    let key = account.account_key();
    let patch = if finalizers.is_empty() {
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": account.meta().resource_version},
            {"op": "add", "path": "/metadata/finalizers", "value": [IN_USE_FINALIZER]}
        ])
    } else {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "add", "path": "/metadata/finalizers/-", "value": IN_USE_FINALIZER}
        ])
    };
    let api = K::api(ctx.client.clone(), key.namespace.as_deref());
    let patch: Patch<()> = Patch::Json(serde_json::from_value(patch)?);
    api.patch(&key.name, &PatchParams::default(), &patch)
        .await?;
    Ok(())
}

/// Writes the account's Ready condition when it changed, with an Event on a transition.
async fn write_status<K: AccountObject>(
    account: &K,
    key: &AccountKey,
    ctx: &Context,
    (ready, reason, message): (bool, Reason, String),
) -> Result<(), Error> {
    {
        let old = account.account_status().cloned().unwrap_or_default();
        let generation = account.meta().generation;
        let mut status = DpcAccountStatus {
            observed_generation: generation,
            ..old.clone()
        };
        let now = Time(Timestamp::now());
        conditions::set_condition(
            &mut status.conditions,
            READY,
            ready,
            reason,
            message.clone(),
            generation,
            &now,
        );
        if status != old {
            let api = K::api(ctx.client.clone(), key.namespace.as_deref());
            let patch = json!({
                "apiVersion": K::api_version(&()),
                "kind": K::kind(&()),
                "status": status,
            });
            api.patch_status(
                &key.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
            let was = conditions::find(&old.conditions, READY);
            if was.is_none_or(|c| c.reason != reason.as_str() || (c.status == "True") != ready) {
                publish(
                    ctx,
                    &account.object_ref(&()),
                    EventSpec {
                        warning: !ready,
                        reason: reason.as_str().into(),
                        note: message,
                        action: "Authenticate".into(),
                    },
                )
                .await;
            }
        }
        Ok(())
    }
}
