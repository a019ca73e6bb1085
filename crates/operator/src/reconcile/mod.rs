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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use rand::Rng;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::api::conditions::{self, READY, Reason, SYNCED};
use crate::api::{
    ConnectionOverride, ConnectionOverrideStatus, DeletionPolicy, DriftPolicy, FIELD_MANAGER,
    FINALIZER, FORCE_ORPHAN_ANNOTATION, ManagedOverride, ManagementPolicy, PAUSED_ANNOTATION,
    RECONCILE_REQUESTED_ANNOTATION,
};
use crate::claims::RemoteKey;
use crate::controller::{Context, ObjKey};
use crate::dpc::{DpcError, ErrorClass, Operation};
use crate::drift::{self, Finding, GroupKey, Member};

use act::{ActError, Plan};
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
    #[error("the reconcile panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) | Error::Resolve(_) => "kubernetes",
            Error::Patch(_) | Error::Panicked(_) => "internal",
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
    warn!(namespace = %key.0, object = %key.1, error = %error, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}

/// Runs `pass`, turning a panic inside it into `Err` with the panic's text: a bug met by one
/// object must not end the process (and every other object's reconciliation with it).
pub async fn catch_panic<T>(pass: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(pass)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into())
        })
}

/// Reconciles one ConnectionOverride; a panic becomes the object's `InternalError`
/// condition and a retry with backoff.
pub async fn reconcile_guarded(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    match catch_panic(reconcile(guard.clone(), ctx.clone())).await {
        Ok(result) => result,
        Err(panic) => {
            let key = key_of(guard.meta());
            tracing::error!(namespace = %key.0, object = %key.1, panic = %panic, "a reconcile panicked; the object is retried with backoff");
            let message = format!(
                "dpc-operator failed internally while reconciling this object ({panic}); it is retried with backoff. Please report this as a bug."
            );
            let now = Time(Timestamp::now());
            let mut conditions = guard
                .0
                .as_ref()
                .ok()
                .and_then(|o| o.status.as_ref())
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let generation = guard.meta().generation;
            for type_ in [READY, SYNCED] {
                conditions::set_condition(
                    &mut conditions,
                    type_,
                    false,
                    Reason::InternalError,
                    message.clone(),
                    generation,
                    &now,
                );
            }
            let patch = json!({"status": {"conditions": conditions}});
            send_patch(
                &ctx,
                &key.0,
                &key.1,
                Some("status"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
            Ok(Action::requeue(ctx.backoff.next(&key)))
        }
    }
}

/// Reconciles one ConnectionOverride.
pub async fn reconcile(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Act only once every watch has listed what exists (conflicts need the whole picture).
    ctx.wait_synced().await;
    let meta = guard.meta();
    let key = key_of(meta);
    let span = info_span!("reconcile", namespace = %key.0, object = %key.1, generation = meta.generation.unwrap_or(0));
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

fn annotation<'a>(obj: &'a ConnectionOverride, name: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()?
        .get(name)
        .map(String::as_str)
}

/// The object's sync interval: its own (at least the configured minimum) or the default.
fn sync_interval(spec: &crate::api::ConnectionOverrideSpec, ctx: &Context) -> Duration {
    spec.sync_interval
        .as_deref()
        .and_then(|s| crate::api::duration::parse_duration(s).ok())
        .unwrap_or(ctx.config.default_sync_interval)
        .max(ctx.config.min_sync_interval)
}

async fn apply(obj: &ConnectionOverride, key: &ObjKey, ctx: &Context) -> Result<Action, Error> {
    let spec = &obj.spec;
    let mut old = obj.status.clone().unwrap_or_default();
    // The cache may not have our last status write yet (see `AppliedHashes`).
    if let Some(hash) = ctx
        .applied
        .get(key, obj.metadata.uid.as_deref().unwrap_or_default())
    {
        old.applied_hash = Some(hash);
    }
    let requested = annotation(obj, RECONCILE_REQUESTED_ANNOTATION).map(String::from);
    let handled = requested.clone();
    if annotation(obj, PAUSED_ANNOTATION) == Some("true") {
        ctx.drift.unregister(key);
        ctx.index.set(key, resolve::spec_references(&key.0, spec));
        finish(obj, ctx, &old, Outcome::Paused, handled).await?;
        return Ok(Action::await_change());
    }
    if let Err(e) = build::validate(&key.0, spec) {
        ctx.drift.unregister(key);
        ctx.index.set(key, resolve::spec_references(&key.0, spec));
        let outcome = Outcome::Failed {
            reason: Reason::InvalidSpec,
            message: e.to_string(),
        };
        finish(obj, ctx, &old, outcome, handled).await?;
        return Ok(Action::await_change());
    }
    // The key fields are immutable, but an edited CRD (or a status restored from elsewhere)
    // could let them change: the override this object manages is the one its status records.
    if let Some(managed) = &old.managed_override
        && !managed.names(
            &spec.project_id,
            &spec.environment_name,
            &spec.connection_name,
        )
    {
        ctx.drift.unregister(key);
        ctx.index.set(key, resolve::spec_references(&key.0, spec));
        let message = format!(
            "this object manages the override of connection {} in environment {} of project {} (status.managedOverride), but the spec now names connection {} in environment {} of project {}; nothing is written. Restore the spec, or delete this object (which deletes the override it manages) and create a new one",
            managed.connection_name,
            managed.environment_name,
            managed.project_id,
            spec.connection_name,
            spec.environment_name,
            spec.project_id
        );
        let outcome = Outcome::Failed {
            reason: Reason::InvalidSpec,
            message,
        };
        finish(obj, ctx, &old, outcome, handled).await?;
        return Ok(Action::await_change());
    }
    let observe_only = spec.management_policy() == ManagementPolicy::ObserveOnly;
    // The finalizer and the referenced objects are independent reads and writes: both go out at
    // once, and nothing reaches DPC unless the finalizer is in place.
    let finalizer = async {
        if observe_only {
            Ok(())
        } else {
            ensure_finalizer(obj, ctx).await
        }
    };
    let resolving = resolve::resolve(&ctx.client, &ctx.accounts, &key.0, spec, ctx.dpc.settings());
    let (finalizer, (resolved, refs)) = tokio::join!(finalizer, resolving);
    ctx.index.set(key, refs);
    finalizer?;

    let resolved = match resolved {
        Ok(resolved) => resolved,
        Err(e) => match e.reason() {
            Some(reason) => {
                info!(reason = %reason, detail = %e, "waiting for a referenced object");
                let outcome = Outcome::Failed {
                    reason,
                    message: e.to_string(),
                };
                finish(obj, ctx, &old, outcome, handled).await?;
                return Ok(Action::await_change());
            }
            None => return Err(Error::Resolve(e.to_string())),
        },
    };
    let desired = match build::build(&key.0, spec, &resolved.plain_values()) {
        Ok(desired) => desired,
        Err(e) => {
            let outcome = Outcome::Failed {
                reason: Reason::InvalidSpec,
                message: e.to_string(),
            };
            finish(obj, ctx, &old, outcome, handled).await?;
            return Ok(Action::await_change());
        }
    };
    let account = &resolved.account;
    if !account.allowed_projects.is_empty() && !account.allowed_projects.contains(&spec.project_id)
    {
        ctx.drift.unregister(key);
        let outcome = Outcome::Failed {
            reason: Reason::AccountNotAllowed,
            message: format!(
                "ClusterDpcAccount {} does not allow project {} (see its spec.allowedProjects)",
                account.key, spec.project_id
            ),
        };
        finish(obj, ctx, &old, outcome, handled).await?;
        return Ok(Action::await_change());
    }
    let remote_key = RemoteKey::resolved(
        account.endpoint.api_url.as_str(),
        account.endpoint.account_id.as_deref(),
        &spec.project_id,
        &spec.environment_name,
        &spec.connection_name,
    );
    let (owner, triggers) = ctx.claims.locate(key, &remote_key);
    for other in triggers {
        ctx.trigger(&other);
    }
    // An object that writes claims the override now, in one step with the check: of two
    // objects reconciled at once, exactly one goes on.
    let claimed = match owner {
        Some(owner) => Err(owner),
        None if observe_only => Ok(None),
        None => ctx.claims.claim(key).map(Some),
    };
    if let Err(owner) = &claimed {
        ctx.drift.unregister(key);
        let message = format!(
            "ConnectionOverride {}/{} already manages the override of {remote_key}; this object never writes it and waits until that one is gone",
            owner.0, owner.1
        );
        let outcome = Outcome::Failed {
            reason: Reason::Conflict,
            message,
        };
        finish(obj, ctx, &old, outcome, handled).await?;
        return Ok(Action::await_change());
    }
    let shared = ctx.dpc.account(
        account.key.clone(),
        account.endpoint.clone(),
        account.credentials.clone(),
        account.rate,
    );
    let dpc = shared
        .for_object(&key.0, &key.1)
        .with_secrets(resolved.secret_values());
    // A request DPC refused is not sent again until it, or the account, changes.
    let gate = format!("{}|{}|{observe_only}", desired.hash, dpc.fingerprint());
    if let Some((reason, message)) = ctx.failures.matching(key, &gate) {
        finish(obj, ctx, &old, Outcome::Failed { reason, message }, handled).await?;
        return Ok(Action::await_change());
    }
    let group = GroupKey {
        account: account.key.clone(),
        project: spec.project_id.clone(),
        environment: spec.environment_name.clone(),
    };
    let member = Member::new(
        &spec.connection_name,
        &desired.request,
        sync_interval(spec, ctx),
    );

    // Read DPC now when observing, or when a reconcile was requested; otherwise use what the
    // last periodic check found, if it needs attention.
    let read_now =
        observe_only || (requested.is_some() && requested != old.last_handled_reconcile_at);
    let finding = if read_now {
        match ctx
            .drift
            .read_now(&group, &dpc, &spec.connection_name)
            .await
        {
            Ok(remote) => {
                let finding = drift::compare(&member.expected, remote.as_ref());
                ctx.drift.note(key, &finding);
                Some((finding, remote))
            }
            Err(error) => {
                let failure = ActError {
                    error,
                    during: Operation::List,
                };
                return report_failure(obj, key, ctx, &old, failure, gate, handled).await;
            }
        }
    } else {
        ctx.drift.take_finding(key).map(|f| (f, None))
    };

    if observe_only {
        let (finding, remote) = finding.expect("observing reads DPC");
        ctx.drift.register(key, group, shared, member);
        let outcome = match finding {
            Finding::InSync => Outcome::Ready {
                desired_hash: None,
                applied: None,
                remote: remote.map(|seen| seen.status),
                corrected: None,
                observed: true,
                managed: None,
            },
            drift => Outcome::Drifted {
                finding: drift,
                observed: true,
            },
        };
        ctx.backoff.reset(key);
        finish(obj, ctx, &old, outcome, handled).await?;
        return Ok(Action::await_change());
    }

    let mut plan = act::plan(old.applied_hash.as_deref(), &desired.hash);
    let mut corrected = None;
    if let Some((finding, _)) = finding.filter(|(f, _)| f.is_drift())
        && plan == Plan::Nothing
    {
        match spec.drift_policy() {
            DriftPolicy::Correct => {
                info!(drift = %finding.describe(), "correcting drift");
                plan = if finding == Finding::Missing {
                    Plan::Create
                } else {
                    Plan::Update
                };
                corrected = Some(finding);
            }
            DriftPolicy::Report => {
                ctx.drift.register(key, group, shared, member);
                let outcome = Outcome::Drifted {
                    finding,
                    observed: false,
                };
                finish(obj, ctx, &old, outcome, handled).await?;
                return Ok(Action::await_change());
            }
        }
    }
    // The claim is taken before the first write, and recorded in status with its outcome:
    // from then on no other object takes this override over.
    let claimed_at = old
        .managed_override
        .as_ref()
        .filter(|m| {
            m.api_url == account.endpoint.api_url.as_str()
                && m.account_id == account.endpoint.account_id
        })
        .map(|m| m.claimed_at.clone())
        .or_else(|| claimed.ok().flatten().map(MicroTime))
        .unwrap_or_else(|| MicroTime(Timestamp::now()));
    let managed = ManagedOverride {
        api_url: account.endpoint.api_url.as_str().to_string(),
        account_id: account.endpoint.account_id.clone(),
        project_id: spec.project_id.clone(),
        environment_name: spec.environment_name.clone(),
        connection_name: spec.connection_name.clone(),
        claimed_at,
    };
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
                ctx.drift.note(key, &Finding::InSync);
            }
            ctx.drift.register(key, group, shared, member);
            let outcome = Outcome::Ready {
                desired_hash: Some(desired.hash),
                applied,
                remote,
                corrected,
                observed: false,
                managed: Some(Box::new(managed)),
            };
            finish(obj, ctx, &old, outcome, handled).await?;
            Ok(Action::await_change())
        }
        Err(failure) => report_failure(obj, key, ctx, &old, failure, gate, handled).await,
    }
}

/// Reports a failed DPC call and decides when to try again.
#[allow(clippy::too_many_arguments)]
async fn report_failure(
    obj: &ConnectionOverride,
    key: &ObjKey,
    ctx: &Context,
    old: &ConnectionOverrideStatus,
    failure: ActError,
    gate: String,
    handled: Option<String>,
) -> Result<Action, Error> {
    let ActError { error, during } = failure;
    // The client has removed credentials, token and values from whatever DPC wrote back.
    let message = error.to_string();
    if error.class() == ErrorClass::Queued {
        // The account's request rate has a slot reserved for this object: come back then.
        let reason = if old.applied_hash.is_none() {
            Reason::Creating
        } else {
            Reason::Updating
        };
        let wait = error.retry_after().unwrap_or(Duration::from_secs(1));
        finish(obj, ctx, old, Outcome::Waiting { reason, message }, handled).await?;
        return Ok(Action::requeue(wait + Duration::from_millis(5)));
    }
    let (reason, action) = failure_action(&error, key, ctx);
    if reason.is_terminal() {
        ctx.failures.record(key, gate, reason, message.clone());
    }
    warn!(reason = %reason, operation = %during, detail = %message, "DPC call failed");
    finish(obj, ctx, old, Outcome::Failed { reason, message }, handled).await?;
    Ok(action)
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
        ErrorClass::RateLimited | ErrorClass::Queued => {
            let wait = error.retry_after().unwrap_or(Duration::from_secs(1));
            (Reason::RateLimited, Action::requeue(jittered(wait)))
        }
        ErrorClass::Transient | ErrorClass::Conflict => (
            Reason::ApiUnavailable,
            Action::requeue(ctx.backoff.next(key)),
        ),
    }
}

/// Why a deletion may release the object without deleting in DPC, if it may.
fn release_without_delete(
    obj: &ConnectionOverride,
    key: &ObjKey,
    ctx: &Context,
) -> Option<(bool, &'static str, String)> {
    let spec = &obj.spec;
    let target = format!(
        "the override of connection {} in environment {}",
        spec.connection_name, spec.environment_name
    );
    if annotation(obj, FORCE_ORPHAN_ANNOTATION) == Some("true") {
        return Some((
            true,
            "ForceOrphaned",
            format!("released without deleting {target} in DPC ({FORCE_ORPHAN_ANNOTATION}=true)"),
        ));
    }
    if spec.deletion_policy() == DeletionPolicy::Orphan {
        return Some((
            false,
            "Orphaned",
            format!("left {target} in DPC (deletionPolicy Orphan)"),
        ));
    }
    if spec.management_policy() == ManagementPolicy::ObserveOnly {
        return Some((
            false,
            "Released",
            format!("left {target} in DPC (managementPolicy ObserveOnly never writes)"),
        ));
    }
    if let Some(owner) = ctx.claims.other_owner(key) {
        return Some((
            false,
            "Released",
            format!(
                "left {target} in DPC: ConnectionOverride {}/{} manages it",
                owner.0, owner.1
            ),
        ));
    }
    None
}

/// When a failing deletion gives up (spec.deletionTimeout after deletion began), if it does.
fn deletion_deadline(obj: &ConnectionOverride) -> Option<Timestamp> {
    let timeout = obj.spec.deletion_timeout.as_deref()?;
    let timeout = crate::api::duration::parse_duration(timeout).ok()?;
    let since = obj.metadata.deletion_timestamp.as_ref()?.0;
    let timeout = k8s_openapi::jiff::SignedDuration::try_from(timeout).ok()?;
    since.checked_add(timeout).ok()
}

async fn cleanup(obj: &ConnectionOverride, key: &ObjKey, ctx: &Context) -> Result<Action, Error> {
    if !obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let spec = &obj.spec;
    let reference = obj.object_ref(&());
    if let Some((warning, reason, note)) = release_without_delete(obj, key, ctx) {
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
    let handled = old.last_handled_reconcile_at.clone();
    let until_deadline = deletion_deadline(obj).map(|d| {
        let left = d.duration_since(Timestamp::now());
        Duration::try_from(left).unwrap_or(Duration::ZERO)
    });
    let capped = |delay: Duration| {
        until_deadline.map_or(delay, |left| delay.min(left + Duration::from_millis(50)))
    };
    // What follows a deletion that could not go ahead: nothing once released; else a retry
    // after `retry`, or (waiting for a change) a look only to meet spec.deletionTimeout.
    let next = |released: bool, retry: Option<Duration>| match (released, retry) {
        (true, _) => Action::await_change(),
        (false, Some(delay)) => Action::requeue(capped(delay)),
        (false, None) => until_deadline.map_or(Action::await_change(), |_| {
            Action::requeue(capped(Duration::from_secs(3600)))
        }),
    };

    if annotation(obj, PAUSED_ANNOTATION) == Some("true") {
        let released = give_up(
            obj,
            key,
            ctx,
            &old,
            handled.clone(),
            format!("deletion waits: reconciliation is paused ({PAUSED_ANNOTATION})"),
        )
        .await?;
        return Ok(next(released, None));
    }
    let (account, account_refs) = ctx
        .accounts
        .resolve_for_deletion(&ctx.client, &key.0, &spec.account_ref, ctx.dpc.settings())
        .await;
    let mut refs = resolve::spec_references(&key.0, spec);
    refs.extend(account_refs);
    ctx.index.set(key, refs);
    let account = match account {
        Ok(account) => account,
        Err(e) if e.reason().is_none() => return Err(Error::Resolve(e.to_string())),
        Err(e) if old.applied_hash.is_none() => {
            // Nothing was ever accepted by DPC for this object, and DPC cannot be reached to
            // check: there is nothing to delete.
            info!(detail = %e, "released: no write was ever accepted for this object");
            remove_finalizer(obj, ctx).await?;
            forget(key, ctx);
            return Ok(Action::await_change());
        }
        Err(e) => {
            let released = give_up(
                obj,
                key,
                ctx,
                &old,
                handled.clone(),
                format!("cannot delete the override in DPC: {e}"),
            )
            .await?;
            return Ok(next(released, None));
        }
    };
    // The override to delete is the one this object manages, whatever the spec says now.
    let (project, environment, connection) = match &old.managed_override {
        Some(m) => (&m.project_id, &m.environment_name, &m.connection_name),
        None => (
            &spec.project_id,
            &spec.environment_name,
            &spec.connection_name,
        ),
    };
    if let Some(m) = &old.managed_override
        && (m.api_url != account.endpoint.api_url.as_str()
            || m.account_id != account.endpoint.account_id)
    {
        let released = give_up(
            obj,
            key,
            ctx,
            &old,
            handled.clone(),
            format!(
                "the override this object manages is at {} (account id {}), but its account now calls {} (account id {}); point the account back to delete it",
                m.api_url,
                m.account_id.as_deref().unwrap_or("none"),
                account.endpoint.api_url,
                account.endpoint.account_id.as_deref().unwrap_or("none"),
            ),
        )
        .await?;
        return Ok(next(released, Some(ctx.backoff.next(key))));
    }
    let dpc = ctx
        .dpc
        .account(
            account.key.clone(),
            account.endpoint.clone(),
            account.credentials.clone(),
            account.rate,
        )
        .for_object(&key.0, &key.1);
    match dpc
        .delete(project, environment, std::slice::from_ref(connection))
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
                        "deleted the override of connection {connection} in environment {environment} in DPC"
                    ),
                    action: "Delete".into(),
                },
            )
            .await;
            forget(key, ctx);
            Ok(Action::await_change())
        }
        Err(error) => {
            let detail = error.to_string();
            let delay = match error.class() {
                ErrorClass::Queued => {
                    error.retry_after().unwrap_or(Duration::from_secs(1)) + Duration::from_millis(5)
                }
                ErrorClass::RateLimited => {
                    jittered(error.retry_after().unwrap_or(Duration::from_secs(1)))
                }
                _ => ctx.backoff.next(key),
            };
            warn!(detail = %detail, "deleting the override in DPC failed");
            let released = give_up(
                obj,
                key,
                ctx,
                &old,
                handled.clone(),
                format!("deleting the override in DPC failed: {detail}; retrying"),
            )
            .await?;
            Ok(next(released, Some(delay)))
        }
    }
}

/// A deletion that keeps failing: gives up after spec.deletionTimeout (releasing the object,
/// with a Warning Event), or reports why it waits and how to release it. Returns whether the
/// object was released.
async fn give_up(
    obj: &ConnectionOverride,
    key: &ObjKey,
    ctx: &Context,
    old: &ConnectionOverrideStatus,
    handled: Option<String>,
    detail: String,
) -> Result<bool, Error> {
    let spec = &obj.spec;
    if let Some(deadline) = deletion_deadline(obj)
        && Timestamp::now() >= deadline
    {
        remove_finalizer(obj, ctx).await?;
        let note = format!(
            "could not delete the override of connection {} in environment {} within spec.deletionTimeout ({}): {detail}; released, the override is left in DPC",
            spec.connection_name,
            spec.environment_name,
            spec.deletion_timeout.as_deref().unwrap_or_default()
        );
        publish(
            ctx,
            &obj.object_ref(&()),
            EventSpec {
                warning: true,
                reason: "DeletionTimedOut".into(),
                note,
                action: "Delete".into(),
            },
        )
        .await;
        forget(key, ctx);
        return Ok(true);
    }
    let message = format!(
        "{detail}; set the annotation {FORCE_ORPHAN_ANNOTATION}: \"true\" to release the object without deleting the override"
    );
    let outcome = Outcome::Failed {
        reason: Reason::Deleting,
        message,
    };
    finish(obj, ctx, old, outcome, handled).await?;
    Ok(false)
}

fn forget(key: &ObjKey, ctx: &Context) {
    ctx.forget(key);
}

/// Writes the status a pass leads to (only when it differs from what is written), then
/// publishes the Event the transition deserves.
async fn finish(
    obj: &ConnectionOverride,
    ctx: &Context,
    old: &ConnectionOverrideStatus,
    outcome: Outcome,
    handled: Option<String>,
) -> Result<(), Error> {
    let now = Time(Timestamp::now());
    let mut new = report::next_status(old, &obj.spec, obj.metadata.generation, &outcome, &now);
    if handled.is_some() {
        new.last_handled_reconcile_at = handled;
    }
    if let Outcome::Failed { reason, .. } = &outcome {
        ctx.metrics.failed("connectionoverride", reason.as_str());
    }
    let (namespace, name) = key_of(&obj.metadata);
    ctx.metrics
        .set_conditions(&namespace, &name, &new.conditions);
    if new != *old {
        patch_status(ctx, &obj.metadata, &serde_json::to_value(&new)?).await?;
    }
    if let Some(hash) = &new.applied_hash {
        ctx.applied.record(
            &(namespace.clone(), name.clone()),
            obj.metadata.uid.as_deref().unwrap_or_default(),
            hash,
        );
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
    let patch = json!({
        "apiVersion": ConnectionOverride::api_version(&()),
        "kind": ConnectionOverride::kind(&()),
        "status": status,
    });
    send_patch(
        ctx,
        &namespace,
        &name,
        Some("status"),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// Patches a ConnectionOverride (or its `subresource`) and drops the answer unread: the
/// watch brings the new object, and parsing every answer was a tenth of the operator's CPU
/// while 10,000 objects converged. Errors are the API's, as `Api::patch` returns them.
async fn send_patch<P: serde::Serialize + std::fmt::Debug>(
    ctx: &Context,
    namespace: &str,
    name: &str,
    subresource: Option<&str>,
    params: &PatchParams,
    patch: &Patch<P>,
) -> Result<(), kube::Error> {
    let request = kube::core::Request::new(ConnectionOverride::url_path(&(), Some(namespace)));
    let request = match subresource {
        Some(sub) => request.patch_subresource(sub, name, params, patch),
        None => request.patch(name, params, patch),
    }
    .map_err(kube::Error::BuildRequest)?;
    ctx.client.request_text(request).await.map(drop)
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
    ctx.publish(event, reference.clone());
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
    patch_finalizers(ctx, &namespace, &name, patch).await
}

/// Sends a JSON patch of the finalizers (guarded by its `test` operations).
async fn patch_finalizers(
    ctx: &Context,
    namespace: &str,
    name: &str,
    operations: serde_json::Value,
) -> Result<(), Error> {
    let operations: Patch<()> = Patch::Json(serde_json::from_value(operations)?);
    send_patch(
        ctx,
        namespace,
        name,
        None,
        &PatchParams::default(),
        &operations,
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
    match patch_finalizers(ctx, &namespace, &name, patch).await {
        // Already gone: nothing left to release.
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 404 => Ok(()),
        other => other,
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
    let written = send_patch(
        ctx,
        &key.0,
        &key.1,
        Some("status"),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await;
    match written {
        Ok(()) => {}
        // An object stored under an older CRD that today's schema or CEL rules refuse: the API
        // server validates the whole object on a status write too, so no condition can ever
        // be written. The Event below is then the only report; retrying would loop.
        Err(kube::Error::Api(status)) if status.code == 422 => {
            warn!(refused = %status.message, "the API server refuses any status of this object; reporting it by an Event only");
        }
        Err(e) => return Err(e.into()),
    }
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

#[cfg(test)]
mod tests {
    use super::catch_panic;

    #[tokio::test]
    async fn a_panic_in_a_pass_comes_back_as_its_text() {
        let ok = catch_panic(async { 7 }).await;
        assert_eq!(ok, Ok(7));
        let fixed = catch_panic(async { panic!("fixed text") }).await;
        assert_eq!(fixed, Err::<(), _>("fixed text".to_string()));
        let value = 3;
        let formatted = catch_panic(async move {
            if value == 3 {
                panic!("formatted {value}");
            }
        })
        .await;
        assert_eq!(formatted, Err("formatted 3".to_string()));
    }
}
