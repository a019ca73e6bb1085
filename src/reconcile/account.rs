//! Reconcile of one DpcAccount: its credentials resolve and DPC issues a token with them.
//! The `Ready` condition says so; the cached token then serves the account's
//! ConnectionOverrides.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument, info_span, warn};

use crate::api::conditions::{self, READY, Reason};
use crate::api::{DpcAccount, DpcAccountStatus, FIELD_MANAGER};
use crate::controller::{Context, ObjKey};
use crate::dpc::ErrorClass;
use crate::dpc::secret::redact;

use super::report::EventSpec;
use super::{Error, publish, resolve};

fn key_of(account: &DpcAccount) -> ObjKey {
    (account.namespace().unwrap_or_default(), account.name_any())
}

/// Backoff keys of accounts are kept apart from those of ConnectionOverrides.
fn backoff_key(key: &ObjKey) -> ObjKey {
    (format!("dpcaccount:{}", key.0), key.1.clone())
}

/// The error policy: retry with the account's backoff.
pub fn error_policy(account: Arc<DpcAccount>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key_of(&account);
    let delay = ctx.backoff.next(&backoff_key(&key));
    warn!(namespace = %key.0, name = %key.1, error = %error, retry_in_ms = delay.as_millis() as u64, "DpcAccount reconcile failed");
    Action::requeue(delay)
}

/// Reconciles one DpcAccount.
pub async fn reconcile(account: Arc<DpcAccount>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(&account);
    let span = info_span!("reconcile_account", namespace = %key.0, name = %key.1);
    async {
        let (resolved, secret_ref) =
            resolve::resolve_account(&ctx.client, &key.0, &key.1, ctx.config.allow_insecure_http)
                .await;
        ctx.account_index
            .set(&key, secret_ref.into_iter().collect());
        let (ready, reason, message, action) = match resolved {
            Err(e) => match e.reason() {
                Some(reason) => (false, reason, e.to_string(), Action::await_change()),
                None => return Err(Error::Resolve(e.to_string())),
            },
            Ok((_, resolved)) => {
                let creds = &resolved.credentials;
                let dpc = ctx.dpc.account(
                    resolved.key.clone(),
                    resolved.endpoint.clone(),
                    creds.clone(),
                );
                match dpc.ensure_token().await {
                    Ok(()) => {
                        ctx.backoff.reset(&backoff_key(&key));
                        let host = resolved
                            .endpoint
                            .token_url
                            .host_str()
                            .unwrap_or("the token endpoint")
                            .to_string();
                        (
                            true,
                            Reason::TokenObtained,
                            format!("obtained an access token from {host}"),
                            ctx.resync(),
                        )
                    }
                    Err(e) => {
                        let message =
                            redact(&e.to_string(), [&creds.client_id, &creds.client_secret]);
                        match e.class() {
                            ErrorClass::CredentialsRejected => (
                                false,
                                Reason::CredentialsRejected,
                                message,
                                Action::await_change(),
                            ),
                            ErrorClass::Misconfigured => (
                                false,
                                Reason::AccountNotReady,
                                message,
                                Action::await_change(),
                            ),
                            ErrorClass::RateLimited => {
                                let wait =
                                    e.retry_after().unwrap_or(std::time::Duration::from_secs(1));
                                (false, Reason::RateLimited, message, Action::requeue(wait))
                            }
                            _ => (
                                false,
                                Reason::ApiUnavailable,
                                message,
                                Action::requeue(ctx.backoff.next(&backoff_key(&key))),
                            ),
                        }
                    }
                }
            }
        };
        let old = account.status.clone().unwrap_or_default();
        let mut status = DpcAccountStatus {
            observed_generation: account.metadata.generation,
            ..old.clone()
        };
        let now = Time(Timestamp::now());
        conditions::set_condition(
            &mut status.conditions,
            READY,
            ready,
            reason,
            message.clone(),
            account.metadata.generation,
            &now,
        );
        if status != old {
            let api: Api<DpcAccount> = Api::namespaced(ctx.client.clone(), &key.0);
            let patch = json!({
                "apiVersion": DpcAccount::api_version(&()),
                "kind": DpcAccount::kind(&()),
                "status": status,
            });
            api.patch_status(
                &key.1,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
            let was = conditions::find(&old.conditions, READY);
            if was.is_none_or(|c| c.reason != reason.as_str() || (c.status == "True") != ready) {
                publish(
                    &ctx,
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
        Ok(action)
    }
    .instrument(span)
    .await
}
