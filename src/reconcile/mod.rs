//! Reconcile of one ConnectionOverride: resolve → build → act → report, and cleanup when it
//! is deleted. The middle (build, plan, next status) is pure and unit-tested in its module.
//!
//! Every outcome a user can act on is reported in status and the pass returns `Ok`; only a
//! failure of the Kubernetes API itself returns `Err`, for the error policy's backoff.

pub mod account;
pub mod act;
pub mod build;
pub mod report;
pub mod resolve;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use rand::Rng;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::api::conditions::{self, READY, Reason, SYNCED};
use crate::api::{
    ConnectionOverride, ConnectionOverrideStatus, DeletionPolicy, FIELD_MANAGER, FINALIZER,
    FORCE_ORPHAN_ANNOTATION,
};
use crate::controller::{Context, ObjKey};
use crate::dpc::secret::redact;
use crate::dpc::{DpcError, ErrorClass};

use act::ActError;
use report::{EventSpec, Outcome};

/// A failure that the error policy retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Resolve(String),
    #[error("could not build a patch: {0}")]
    Patch(#[from] serde_json::Error),
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) | Error::Resolve(_) => "kubernetes",
            Error::Patch(_) => "internal",
        }
    }
}

type Guarded = DeserializeGuard<ConnectionOverride>;

pub(crate) fn key_of(meta: &ObjectMeta) -> ObjKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The error policy: retry with the object's backoff.
pub fn error_policy(obj: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key_of(obj.meta());
    let delay = ctx.backoff.next(&key);
    warn!(namespace = %key.0, name = %key.1, error = %error, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}

/// Reconciles one ConnectionOverride.
pub async fn reconcile(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    let meta = guard.meta();
    let key = key_of(meta);
    let span = info_span!("reconcile", namespace = %key.0, name = %key.1, generation = meta.generation.unwrap_or(0));
    async {
        match &guard.0 {
            Err(invalid) => report_invalid(&guard, &invalid.error, &key, &ctx).await,
            Ok(obj) if obj.metadata.deletion_timestamp.is_some() => cleanup(obj, &key, &ctx).await,
            Ok(obj) => apply(obj, &key, &ctx).await,
        }
    }
    .instrument(span)
    .await
}

fn jittered(base: Duration) -> Duration {
    let extra = rand::rng().random_range(0.0..0.25);
    base + Duration::from_secs_f64(base.as_secs_f64().min(4.0) * extra)
}

async fn apply(obj: &ConnectionOverride, key: &ObjKey, ctx: &Context) -> Result<Action, Error> {
    let spec = &obj.spec;
    let old = obj.status.clone().unwrap_or_default();
    if let Err(e) = build::validate(spec) {
        ctx.index.set(key, resolve::spec_references(&key.0, spec));
        finish(
            obj,
            ctx,
            &old,
            Outcome::Failed {
                reason: Reason::InvalidSpec,
                message: e.to_string(),
            },
        )
        .await?;
        return Ok(Action::await_change());
    }
    ensure_finalizer(obj, ctx).await?;

    let (resolved, refs) =
        resolve::resolve(&ctx.client, &key.0, spec, ctx.config.allow_insecure_http).await;
    ctx.index.set(key, refs);
    let resolved = match resolved {
        Ok(resolved) => resolved,
        Err(e) => match e.reason() {
            Some(reason) => {
                info!(reason = %reason, message = %e, "waiting for a referenced object");
                finish(
                    obj,
                    ctx,
                    &old,
                    Outcome::Failed {
                        reason,
                        message: e.to_string(),
                    },
                )
                .await?;
                return Ok(Action::await_change());
            }
            None => return Err(Error::Resolve(e.to_string())),
        },
    };
    let desired = match build::build(spec, &resolved.plain_values()) {
        Ok(desired) => desired,
        Err(e) => {
            finish(
                obj,
                ctx,
                &old,
                Outcome::Failed {
                    reason: Reason::InvalidSpec,
                    message: e.to_string(),
                },
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let account = &resolved.account;
    let dpc = ctx.dpc.account(
        account.key.clone(),
        account.endpoint.clone(),
        account.credentials.clone(),
    );
    // A request DPC refused is not sent again until it, or the account, changes.
    let gate = format!("{}|{}", desired.hash, dpc.fingerprint());
    if let Some((reason, message)) = ctx.failures.matching(key, &gate) {
        finish(obj, ctx, &old, Outcome::Failed { reason, message }).await?;
        return Ok(Action::await_change());
    }

    let plan = act::plan(old.applied_hash.as_deref(), &desired.hash);
    match act::act(&dpc, &spec.project_id, &desired, plan).await {
        Ok(applied) => {
            ctx.backoff.reset(key);
            ctx.failures.clear(key);
            let (applied, remote) = match applied {
                Some((applied, remote)) => {
                    (Some(applied), remote.as_ref().map(report::remote_status))
                }
                None => (None, None),
            };
            if let Some(applied) = applied {
                info!(write = applied.event_reason(), "DPC accepted the override");
            }
            finish(
                obj,
                ctx,
                &old,
                Outcome::Ready {
                    desired_hash: desired.hash,
                    applied,
                    remote,
                },
            )
            .await?;
            Ok(ctx.resync())
        }
        Err(ActError { error, during }) => {
            let message = redact(&error.to_string(), resolved.secrets());
            let (reason, action) = failure_action(&error, key, ctx);
            if reason.is_terminal() {
                ctx.failures.record(key, gate, reason, message.clone());
            }
            warn!(reason = %reason, operation = %during, message = %message, "DPC call failed");
            finish(obj, ctx, &old, Outcome::Failed { reason, message }).await?;
            Ok(action)
        }
    }
}

/// The Ready reason and the next step for a failed DPC call.
fn failure_action(error: &DpcError, key: &ObjKey, ctx: &Context) -> (Reason, Action) {
    match error.class() {
        ErrorClass::Rejected => (Reason::ApiRejected, Action::await_change()),
        ErrorClass::CredentialsRejected => (Reason::CredentialsRejected, Action::await_change()),
        ErrorClass::Misconfigured => (Reason::AccountNotReady, Action::await_change()),
        // A parent may be created in DPC later; nothing in the cluster would tell us.
        ErrorClass::NotFound => (
            Reason::ParentNotFound,
            Action::requeue(ctx.backoff.next(key)),
        ),
        ErrorClass::RateLimited => {
            let wait = error.retry_after().unwrap_or(Duration::from_secs(1));
            (Reason::RateLimited, Action::requeue(jittered(wait)))
        }
        ErrorClass::Transient | ErrorClass::Conflict => (
            Reason::ApiUnavailable,
            Action::requeue(ctx.backoff.next(key)),
        ),
    }
}

async fn cleanup(obj: &ConnectionOverride, key: &ObjKey, ctx: &Context) -> Result<Action, Error> {
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let spec = &obj.spec;
    let reference = obj.object_ref(&());
    let forced = obj
        .annotations()
        .get(FORCE_ORPHAN_ANNOTATION)
        .is_some_and(|v| v == "true");
    let target = format!(
        "the override of connection {} in environment {}",
        spec.connection_name, spec.environment_name
    );
    let release = if forced {
        Some((
            true,
            "ForceOrphaned",
            format!("released without deleting {target} in DPC ({FORCE_ORPHAN_ANNOTATION}=true)"),
        ))
    } else if spec.deletion_policy() == DeletionPolicy::Orphan {
        Some((
            false,
            "Orphaned",
            format!("left {target} in DPC (deletionPolicy Orphan)"),
        ))
    } else {
        None
    };
    if let Some((warning, reason, note)) = release {
        remove_finalizer(obj, ctx).await?;
        let action = "Delete".into();
        let reason = reason.into();
        publish(
            ctx,
            &reference,
            EventSpec {
                warning,
                reason,
                note,
                action,
            },
        )
        .await;
        forget(key, ctx);
        return Ok(Action::await_change());
    }

    let old = obj.status.clone().unwrap_or_default();
    let (account, secret_ref) = resolve::resolve_account(
        &ctx.client,
        &key.0,
        &spec.account_ref.name,
        ctx.config.allow_insecure_http,
    )
    .await;
    let mut refs = resolve::spec_references(&key.0, spec);
    refs.extend(secret_ref);
    ctx.index.set(key, refs);
    let account = match account {
        Ok((_, account)) => account,
        Err(e) if e.reason().is_none() => return Err(Error::Resolve(e.to_string())),
        Err(e) if old.applied_hash.is_none() => {
            // Nothing was ever accepted by DPC for this object, and DPC cannot be reached to
            // check: there is nothing to delete.
            info!(message = %e, "released: no write was ever accepted for this object");
            remove_finalizer(obj, ctx).await?;
            forget(key, ctx);
            return Ok(Action::await_change());
        }
        Err(e) => {
            let message = format!(
                "cannot delete the override in DPC: {e}; fix that, or set the annotation {FORCE_ORPHAN_ANNOTATION}: \"true\" to release the object without deleting the override"
            );
            finish(
                obj,
                ctx,
                &old,
                Outcome::Failed {
                    reason: Reason::Deleting,
                    message,
                },
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    let dpc = ctx.dpc.account(
        account.key.clone(),
        account.endpoint.clone(),
        account.credentials.clone(),
    );
    match dpc
        .delete(
            &spec.project_id,
            &spec.environment_name,
            std::slice::from_ref(&spec.connection_name),
        )
        .await
    {
        Ok(()) => {
            info!("deleted the override in DPC");
            remove_finalizer(obj, ctx).await?;
            publish(
                ctx,
                &reference,
                EventSpec {
                    warning: false,
                    reason: "Deleted".into(),
                    note: format!(
                        "deleted the override of connection {} in environment {} in DPC",
                        spec.connection_name, spec.environment_name
                    ),
                    action: "Delete".into(),
                },
            )
            .await;
            forget(key, ctx);
            Ok(Action::await_change())
        }
        Err(error) => {
            let secrets = [
                &account.credentials.client_id,
                &account.credentials.client_secret,
            ];
            let detail = redact(&error.to_string(), secrets);
            let action = match error.class() {
                ErrorClass::RateLimited => Action::requeue(jittered(
                    error.retry_after().unwrap_or(Duration::from_secs(1)),
                )),
                _ => Action::requeue(ctx.backoff.next(key)),
            };
            warn!(message = %detail, "deleting the override in DPC failed");
            let message = format!(
                "deleting the override in DPC failed: {detail}; retrying. Set the annotation {FORCE_ORPHAN_ANNOTATION}: \"true\" to release the object without deleting the override"
            );
            finish(
                obj,
                ctx,
                &old,
                Outcome::Failed {
                    reason: Reason::Deleting,
                    message,
                },
            )
            .await?;
            Ok(action)
        }
    }
}

fn forget(key: &ObjKey, ctx: &Context) {
    ctx.index.remove(key);
    ctx.backoff.reset(key);
    ctx.failures.clear(key);
}

/// Writes the status a pass leads to (only when it differs from what is written), then
/// publishes the Event the transition deserves.
async fn finish(
    obj: &ConnectionOverride,
    ctx: &Context,
    old: &ConnectionOverrideStatus,
    outcome: Outcome,
) -> Result<(), Error> {
    let now = Time(Timestamp::now());
    let new = report::next_status(old, &obj.spec, obj.metadata.generation, &outcome, &now);
    if new != *old {
        patch_status(ctx, &obj.metadata, &serde_json::to_value(&new)?).await?;
    }
    if let Some(event) = report::event_for(old, &obj.spec, &outcome) {
        publish(ctx, &obj.object_ref(&()), event).await;
    }
    Ok(())
}

async fn patch_status(
    ctx: &Context,
    meta: &ObjectMeta,
    status: &serde_json::Value,
) -> Result<(), kube::Error> {
    let (namespace, name) = key_of(meta);
    let api: Api<Guarded> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": ConnectionOverride::api_version(&()),
        "kind": ConnectionOverride::kind(&()),
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

pub(crate) async fn publish(ctx: &Context, reference: &ObjectReference, event: EventSpec) {
    let mut note = event.note;
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push('…');
    }
    let event = Event {
        type_: if event.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: event.reason,
        note: Some(note),
        action: event.action,
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        warn!(error = %e, "could not publish an Event");
    }
}

async fn ensure_finalizer(obj: &ConnectionOverride, ctx: &Context) -> Result<(), Error> {
    if obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let (namespace, name) = key_of(&obj.metadata);
    let patch = match &obj.metadata.finalizers {
        Some(list) if !list.is_empty() => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": list},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}
        ]),
        _ => json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": obj.metadata.resource_version},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
        ]),
    };
    let api: Api<Guarded> = Api::namespaced(ctx.client.clone(), &namespace);
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Json::<()>(serde_json::from_value(patch)?),
    )
    .await?;
    Ok(())
}

async fn remove_finalizer(obj: &ConnectionOverride, ctx: &Context) -> Result<(), Error> {
    remove_finalizer_of(&obj.metadata, ctx).await
}

async fn remove_finalizer_of(meta: &ObjectMeta, ctx: &Context) -> Result<(), Error> {
    let list = meta.finalizers.clone().unwrap_or_default();
    let remaining: Vec<&String> = list.iter().filter(|f| *f != FINALIZER).collect();
    let (namespace, name) = key_of(meta);
    let patch = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": list},
        {"op": "replace", "path": "/metadata/finalizers", "value": remaining}
    ]);
    let api: Api<Guarded> = Api::namespaced(ctx.client.clone(), &namespace);
    match api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(patch)?),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: nothing left to release.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// An object that does not match the schema (it bypassed admission): reported, not sent.
/// Its deletion is held (the remote cannot be named safely) unless force-orphan is set.
async fn report_invalid(
    guard: &Guarded,
    error: &str,
    key: &ObjKey,
    ctx: &Context,
) -> Result<Action, Error> {
    let meta = guard.meta();
    let forced = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(FORCE_ORPHAN_ANNOTATION))
        .is_some_and(|v| v == "true");
    if meta.deletion_timestamp.is_some()
        && (forced || !meta.finalizers.iter().flatten().any(|f| f == FINALIZER))
    {
        if forced {
            remove_finalizer_of(meta, ctx).await?;
        }
        forget(key, ctx);
        return Ok(Action::await_change());
    }
    let message = format!("the object does not match the ConnectionOverride schema: {error}");
    let gate = format!("invalid|{}|{message}", meta.generation.unwrap_or(0));
    if ctx.failures.matching(key, &gate).is_some() {
        return Ok(Action::await_change());
    }
    let now = Time(Timestamp::now());
    let mut status = ConnectionOverrideStatus {
        observed_generation: meta.generation,
        ..Default::default()
    };
    conditions::set_condition(
        &mut status.conditions,
        READY,
        false,
        Reason::InvalidSpec,
        message.clone(),
        meta.generation,
        &now,
    );
    conditions::set_condition(
        &mut status.conditions,
        SYNCED,
        false,
        Reason::ReconcileError,
        message.clone(),
        meta.generation,
        &now,
    );
    // A merge patch, not an apply: what DPC last accepted (appliedHash, remote) stays as it
    // is, since this write cannot read it.
    let patch = json!({"status": {"conditions": status.conditions, "observedGeneration": status.observed_generation}});
    let api: Api<Guarded> = Api::namespaced(ctx.client.clone(), &key.0);
    api.patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let reference = ObjectReference {
        api_version: Some(ConnectionOverride::api_version(&()).into()),
        kind: Some(ConnectionOverride::kind(&()).into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    };
    publish(
        ctx,
        &reference,
        EventSpec {
            warning: true,
            reason: Reason::InvalidSpec.as_str().into(),
            note: message.clone(),
            action: "Reconcile".into(),
        },
    )
    .await;
    ctx.failures.record(key, gate, Reason::InvalidSpec, message);
    Ok(Action::await_change())
}
