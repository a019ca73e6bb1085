//! Cleanup: a ConnectionOverride being deleted. The override it owns (`ownership`) is
//! deleted in DPC, then the finalizer released; or it is released at once, with no call to
//! DPC (Orphan, ObserveOnly, force-orphan, it owns nothing, another object manages the
//! override); or the deletion is held, saying why and how to release it, until
//! `spec.deletionTimeout` lets it go. Every rule of the account (its namespaces, projects,
//! hosts, credentials namespaces) holds for a deletion as for a write.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::accounts::ResolvedAccount;
use crate::api::conditions::Reason;
use crate::api::{
    ConnectionOverride, ConnectionOverrideStatus, DeletionPolicy, FINALIZER,
    FORCE_ORPHAN_ANNOTATION, ManagementPolicy, PAUSED_ANNOTATION,
};
use crate::context::Context;
use crate::key::ObjKey;

use super::outcome::{EventSpec, Outcome, classify};
use super::ownership::{self, How, Owned};
use super::{Error, annotation, same_api, write};

/// Runs the deletion of `obj`.
pub async fn cleanup(
    obj: &ConnectionOverride,
    key: &ObjKey,
    ctx: &Context,
) -> Result<Action, Error> {
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let owned = match to_delete(obj, key, ctx) {
        Ok(owned) => owned,
        Err((warning, reason, note)) => {
            write::remove_finalizer(&obj.metadata, ctx).await?;
            let event = EventSpec {
                warning,
                reason: reason.into(),
                note,
                action: "Delete".into(),
            };
            write::publish(ctx, &obj.object_ref(&()), event).await;
            ctx.forget(key);
            return Ok(Action::await_change());
        }
    };
    let old = obj.status.clone().unwrap_or_default();
    let deletion = Deletion {
        obj,
        key,
        ctx,
        handled: old.last_handled_reconcile_at.clone(),
        old,
        owned,
        deadline: deletion_deadline(obj),
    };
    deletion.run().await
}

/// The override this deletion is to delete, or why it releases the object without deleting
/// anything in DPC: `(warning, Event reason, Event note)`.
fn to_delete(
    obj: &ConnectionOverride,
    key: &ObjKey,
    ctx: &Context,
) -> Result<Owned, (bool, &'static str, String)> {
    let spec = &obj.spec;
    let target = format!(
        "the override of connection {} in environment {}",
        spec.connection_name, spec.environment_name
    );
    if annotation(obj, FORCE_ORPHAN_ANNOTATION) == Some("true") {
        let note =
            format!("released without deleting {target} in DPC ({FORCE_ORPHAN_ANNOTATION}=true)");
        return Err((true, "ForceOrphaned", note));
    }
    if spec.deletion_policy() == DeletionPolicy::Orphan {
        let note = format!("left {target} in DPC (deletionPolicy Orphan)");
        return Err((false, "Orphaned", note));
    }
    if spec.management_policy() == ManagementPolicy::ObserveOnly {
        let note = format!("left {target} in DPC (managementPolicy ObserveOnly never writes)");
        return Err((false, "Released", note));
    }
    let Some(owned) = ownership::owned(obj, ctx) else {
        let note = format!(
            "nothing was deleted in DPC: this object never wrote or adopted {target} (DPC never accepted a write of it), so whatever DPC holds there is left as it is"
        );
        return Err((false, "Released", note));
    };
    let Some(owner) = ctx.claims.other_owner(key) else {
        return Ok(owned);
    };
    let note = format!(
        "left {target} in DPC: ConnectionOverride {}/{} manages it",
        owner.0, owner.1
    );
    Err((false, "Released", note))
}

/// When a failing deletion gives up (spec.deletionTimeout after deletion began), if it does.
fn deletion_deadline(obj: &ConnectionOverride) -> Option<Timestamp> {
    let timeout = obj.spec.deletion_timeout.as_deref()?;
    let timeout = crate::api::duration::parse_duration(timeout).ok()?;
    let since = obj.metadata.deletion_timestamp.as_ref()?.0;
    let timeout = SignedDuration::try_from(timeout).ok()?;
    since.checked_add(timeout).ok()
}

/// One pass over an object whose remote override is to be deleted.
struct Deletion<'a> {
    obj: &'a ConnectionOverride,
    key: &'a ObjKey,
    ctx: &'a Context,
    old: ConnectionOverrideStatus,
    handled: Option<String>,
    /// The override to delete.
    owned: Owned,
    deadline: Option<Timestamp>,
}

impl Deletion<'_> {
    async fn run(&self) -> Result<Action, Error> {
        let (obj, key, ctx) = (self.obj, self.key, self.ctx);
        if annotation(obj, PAUSED_ANNOTATION) == Some("true") {
            let detail = format!("deletion waits: reconciliation is paused ({PAUSED_ANNOTATION})");
            return self.hold(detail, None).await;
        }
        let settings = ctx.dpc.settings();
        let account_ref = &obj.spec.account_ref;
        let resolving =
            ctx.accounts
                .resolve_for_deletion(&ctx.client, &key.0, account_ref, settings);
        let (account, account_refs) = resolving.await;
        let mut refs = crate::index::spec_references(&key.0, &obj.spec);
        refs.extend(account_refs);
        ctx.refer(key, refs);
        match account {
            Ok(account) => self.delete(&account).await,
            Err(e) if e.reason().is_none() => Err(Error::Resolve(e.to_string())),
            Err(e) => {
                let detail = format!("cannot delete the override in DPC: {e}");
                self.hold(detail, None).await
            }
        }
    }

    /// Deletes the override this object owns, whatever the spec says now, once the account
    /// may reach it.
    async fn delete(&self, account: &ResolvedAccount) -> Result<Action, Error> {
        let (obj, key, ctx) = (self.obj, self.key, self.ctx);
        let owned = &self.owned;
        let (project, environment, connection) =
            (&owned.project, &owned.environment, &owned.connection);
        if let Some(refusal) = account.refuses_project(project) {
            let detail = format!("the override is not deleted in DPC: {refusal}");
            return self.hold(detail, None).await;
        }
        let endpoint = &account.endpoint;
        if let Some(api_url) = &owned.api_url
            && !same_api(api_url, endpoint.api_url.as_str())
        {
            let detail = format!(
                "the override this object owns is at {api_url}, but its account now calls {}; point the account back to delete it",
                endpoint.api_url,
            );
            let retry = ctx.objects.next_backoff(key);
            return self.hold(detail, Some(retry)).await;
        }
        let dpc = ctx
            .dpc
            .account(
                account.key.clone(),
                endpoint.clone(),
                account.credentials.clone(),
                account.rate,
            )
            .for_object(&key.0, &key.1);
        let connections = std::slice::from_ref(connection);
        let slot = ctx.dpc_slot().await;
        let deleted = dpc.delete(project, environment, connections).await;
        drop(slot);
        if let Err(error) = deleted {
            let delay = classify(&error).retry_delay(|| ctx.objects.next_backoff(key));
            let detail = error.to_string();
            warn!(detail = %detail, "deleting the override in DPC failed");
            let detail = format!("deleting the override in DPC failed: {detail}; retrying");
            return self.hold(detail, Some(delay)).await;
        }
        info!("deleted the override in DPC");
        write::remove_finalizer(&obj.metadata, ctx).await?;
        let how = match owned.how {
            How::Recorded => "",
            How::CreatePending => {
                " (this object's create may have made it; its outcome had not been recorded)"
            }
        };
        let note = format!(
            "deleted the override of connection {connection} in environment {environment} in DPC{how}"
        );
        let event = EventSpec {
            warning: false,
            reason: "Deleted".into(),
            note,
            action: "Delete".into(),
        };
        write::publish(ctx, &obj.object_ref(&()), event).await;
        ctx.forget(key);
        Ok(Action::await_change())
    }

    /// Holds a deletion that cannot go ahead, reporting why and how to release it, and looks
    /// again after `retry` (or, waiting for a change, only to meet spec.deletionTimeout).
    /// Once spec.deletionTimeout has passed, releases the object instead, with a Warning
    /// Event: the override is left in DPC.
    async fn hold(&self, detail: String, retry: Option<Duration>) -> Result<Action, Error> {
        let (obj, key, ctx) = (self.obj, self.key, self.ctx);
        if let Some(deadline) = self.deadline
            && Timestamp::now() >= deadline
        {
            write::remove_finalizer(&obj.metadata, ctx).await?;
            let spec = &obj.spec;
            let note = format!(
                "could not delete the override of connection {} in environment {} within spec.deletionTimeout ({}): {detail}; released, the override is left in DPC",
                spec.connection_name,
                spec.environment_name,
                spec.deletion_timeout.as_deref().unwrap_or_default()
            );
            let event = EventSpec {
                warning: true,
                reason: "DeletionTimedOut".into(),
                note,
                action: "Delete".into(),
            };
            write::publish(ctx, &obj.object_ref(&()), event).await;
            ctx.forget(key);
            return Ok(Action::await_change());
        }
        let message = format!(
            "{detail}; set the annotation {FORCE_ORPHAN_ANNOTATION}: \"true\" to release the object without deleting the override"
        );
        let outcome = Outcome::failed(Reason::Deleting, message);
        write::report(obj, ctx, &self.old, outcome, self.handled.clone()).await?;
        Ok(self.next_look(retry))
    }

    /// A retry after `retry`, never past the deadline; without one, a look only to meet the
    /// deadline, if there is one.
    fn next_look(&self, retry: Option<Duration>) -> Action {
        let left = self.deadline.map(|deadline| {
            let left = deadline.duration_since(Timestamp::now());
            Duration::try_from(left).unwrap_or(Duration::ZERO)
        });
        let capped = |delay: Duration| {
            left.map_or(delay, |left| delay.min(left + Duration::from_millis(50)))
        };
        match (retry, left) {
            (Some(delay), _) => Action::requeue(capped(delay)),
            (None, Some(_)) => Action::requeue(capped(Duration::from_secs(3600))),
            (None, None) => Action::await_change(),
        }
    }
}
