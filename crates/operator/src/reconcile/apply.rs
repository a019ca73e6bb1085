//! Apply: the live pass of a ConnectionOverride, as stages chained by `?` with one report at
//! the end:
//!
//! validate → resolve → build → target (account rules, claim, refused requests) → read
//! (when DPC must be read now) → write (or observe) → report.
//!
//! Nothing is written to the object's metadata before every rule of its account allowed it
//! and its claim was taken: the cleanup finalizer (and, before a `POST`, the create-pending
//! annotation) go on just before the write they guard (`ownership`), so an object that never
//! got that far is deleted without a call to DPC.
//!
//! Each stage returns `Result<T, Stop>`; a [`Stop`] carries the outcome to report (or a
//! failure of the Kubernetes API for the error policy), so every way out of a pass writes its
//! status in one place.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use tracing::{debug, info, warn};

use crate::accounts::ResolvedAccount;
use crate::api::conditions::Reason;
use crate::api::{
    ConnectionOverride, ConnectionOverrideStatus, DriftPolicy, ManagedOverride, ManagementPolicy,
    RECONCILE_REQUESTED_ANNOTATION, RemoteStatus,
};
use crate::claims::RemoteKey;
use crate::context::{Context, Gate};
use crate::dpc::{AccountHandle, Operation};
use crate::drift::{self, Finding, Freshness, GroupKey, Member, Seen};
use crate::key::ObjKey;

use super::act::{self, ActError, Applied, Failure, Plan};
use super::build::{self, Desired};
use super::outcome::{Outcome, Verdict, at_slot, classify};
use super::ownership::Marks;
use super::resolve::{self, Resolved};
use super::{Error, same_api, validate, write};

/// One live pass over one object.
pub struct Pass<'a> {
    pub obj: &'a ConnectionOverride,
    pub key: &'a ObjKey,
    pub ctx: &'a Context,
    /// The status as written: its applied hash is the one this process last wrote when the
    /// watch cache has not caught up with that write yet.
    pub old: ConnectionOverrideStatus,
    /// The reconcile-requested annotation, recorded as handled by this pass.
    pub requested: Option<String>,
}

impl Pass<'_> {
    pub fn annotation(&self, name: &str) -> Option<&str> {
        let annotations = self.obj.metadata.annotations.as_ref()?;
        annotations.get(name).map(String::as_str)
    }

    fn observe_only(&self) -> bool {
        self.obj.spec.management_policy() == ManagementPolicy::ObserveOnly
    }
}

/// How a pass ends before its last stage.
pub enum Stop {
    /// Report this outcome, then take this next step.
    Report { outcome: Box<Outcome>, next: Action },
    /// The Kubernetes API failed: the error policy retries with backoff.
    Failed(Error),
}

impl Stop {
    /// Report `outcome` and wait for a change.
    pub fn report(outcome: Outcome) -> Self {
        Stop::Report {
            outcome: Box::new(outcome),
            next: Action::await_change(),
        }
    }
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        Stop::Failed(error)
    }
}

/// Where and as whom this pass writes, once the account is resolved and the claim taken.
struct Target {
    account: ResolvedAccount,
    /// The account's calls, shared with the drift checker.
    shared: AccountHandle,
    /// The account's calls on behalf of this object, knowing the values they send.
    dpc: AccountHandle,
    gate: Gate,
    group: GroupKey,
    member: Member,
    /// When this pass claimed the override, if it did.
    claimed: Option<Timestamp>,
}

/// The live pass: every stage, then the one report.
pub async fn apply(obj: &ConnectionOverride, key: &ObjKey, ctx: &Context) -> Result<Action, Error> {
    let mut old = obj.status.clone().unwrap_or_default();
    let uid = obj.metadata.uid.as_deref().unwrap_or_default();
    if let Some(hash) = ctx.objects.applied(key, uid) {
        old.applied_hash = Some(hash);
    }
    let mut pass = Pass {
        obj,
        key,
        ctx,
        old,
        requested: None,
    };
    pass.requested = pass
        .annotation(RECONCILE_REQUESTED_ANNOTATION)
        .map(String::from);
    // The DPC slot is held through the stages, which may call DPC, and given back before
    // the status write and the Event.
    let slot = ctx.dpc_slot().await;
    let (outcome, next) = match stages(&pass).await {
        Ok(done) => done,
        Err(Stop::Report { outcome, next }) => (*outcome, next),
        Err(Stop::Failed(error)) => return Err(error),
    };
    drop(slot);
    write::report(obj, ctx, &pass.old, outcome, pass.requested.clone()).await?;
    Ok(next)
}

async fn stages(pass: &Pass<'_>) -> Result<(Outcome, Action), Stop> {
    validate::check(pass)?;
    let resolved = resolve_references(pass).await?;
    let desired = build_request(pass, &resolved)?;
    let target = target(pass, resolved, &desired)?;
    let finding = read(pass, &target).await?;
    if pass.observe_only() {
        return Ok(observed(pass, target, finding));
    }
    write_override(pass, target, desired, finding).await
}

/// Resolve: the account and every referenced value.
async fn resolve_references(pass: &Pass<'_>) -> Result<Resolved, Stop> {
    let (ctx, key, obj) = (pass.ctx, pass.key, pass.obj);
    let settings = ctx.dpc.settings();
    let (accounts, values) = (&ctx.accounts, &ctx.values);
    let resolving = resolve::resolve(&ctx.client, accounts, values, &key.0, &obj.spec, settings);
    let (resolved, refs) = resolving.await;
    ctx.refer(key, refs);
    resolved.map_err(|e| match e.reason() {
        Some(reason) => {
            info!(reason = %reason, detail = %e, "waiting for a referenced object");
            Stop::report(Outcome::failed(reason, e.to_string()))
        }
        None => Stop::Failed(Error::Resolve(e.to_string())),
    })
}

/// Build: the request and its hash.
fn build_request(pass: &Pass<'_>, resolved: &Resolved) -> Result<Desired, Stop> {
    build::build(&pass.key.0, &pass.obj.spec, &resolved.plain_values())
        .map_err(|e| Stop::report(Outcome::failed(Reason::InvalidSpec, e.to_string())))
}

/// Target: the account may serve this project; no other object manages this override (an
/// object that writes claims it here, in one step with the check); DPC has not refused this
/// same request before.
fn target(pass: &Pass<'_>, resolved: Resolved, desired: &Desired) -> Result<Target, Stop> {
    let (ctx, key, spec) = (pass.ctx, pass.key, &pass.obj.spec);
    let account = &resolved.account;
    if let Some(message) = account.refuses_project(&spec.project_id) {
        ctx.drift.unregister(key);
        return Err(Stop::report(Outcome::failed(
            Reason::AccountNotAllowed,
            message,
        )));
    }
    if account.deleting {
        ctx.drift.unregister(key);
        let message = format!(
            "{} is being deleted: it serves only the deletion of the overrides its objects own, and nothing is written through it",
            account.describe()
        );
        return Err(Stop::report(Outcome::failed(
            Reason::AccountNotReady,
            message,
        )));
    }
    let claimed = claim(pass, account)?;
    let shared = ctx.dpc.account(
        account.key.clone(),
        account.endpoint.clone(),
        account.credentials.clone(),
        account.rate,
    );
    let dpc = shared
        .for_object(&key.0, &key.1)
        .with_secrets(resolved.secret_values());
    let gate = Gate::Request {
        hash: desired.hash.clone(),
        account: dpc.fingerprint(),
        observe_only: pass.observe_only(),
    };
    if let Some((reason, message)) = ctx.objects.refused(key, &gate) {
        return Err(Stop::report(Outcome::failed(reason, message)));
    }
    let group = GroupKey {
        account: account.key.clone(),
        project: spec.project_id.clone(),
        environment: spec.environment_name.clone(),
    };
    let interval = super::sync_interval(spec, ctx);
    let member = Member::new(&spec.connection_name, &desired.request, interval);
    Ok(Target {
        account: resolved.account,
        shared,
        dpc,
        gate,
        group,
        member,
        claimed,
    })
}

/// Finds who manages the override this object names; an object that writes claims it when
/// no one does. Returns the claim time, if this pass claimed it.
fn claim(pass: &Pass<'_>, account: &ResolvedAccount) -> Result<Option<Timestamp>, Stop> {
    let (ctx, key, spec) = (pass.ctx, pass.key, &pass.obj.spec);
    // An observer never writes, so it claims nothing and blocks no one.
    if pass.observe_only() {
        return Ok(None);
    }
    let remote = RemoteKey::resolved(
        account.endpoint.api_url.as_str(),
        &spec.project_id,
        &spec.environment_name,
        &spec.connection_name,
    );
    let (owner, triggers) = ctx.claims.locate(key, &remote);
    for other in triggers {
        ctx.trigger(&other);
    }
    let claimed = match owner {
        Some(owner) => Err(owner),
        None => ctx.claims.claim(key).map(Some),
    };
    claimed.map_err(|owner| {
        ctx.drift.unregister(key);
        let message = format!(
            "ConnectionOverride {}/{} already manages the override of {remote}; this object never writes it and waits until that one is gone",
            owner.0, owner.1
        );
        Stop::report(Outcome::failed(Reason::Conflict, message))
    })
}

/// Read: DPC now when observing, when a reconcile was requested, or before the first write
/// of an object that manages (DPC may already hold the override: made in the DPC UI and
/// imported, or written by this object before its status was lost); otherwise what the last
/// periodic check found, if it needs attention.
async fn read(pass: &Pass<'_>, target: &Target) -> Result<Option<(Finding, Option<Seen>)>, Stop> {
    let (ctx, key, old) = (pass.ctx, pass.key, &pass.old);
    let requested = pass.requested.is_some() && pass.requested != old.last_handled_reconcile_at;
    let first_write = !pass.observe_only() && old.applied_hash.is_none();
    if !(pass.observe_only() || requested || first_write) {
        return Ok(ctx.drift.take_finding(key).map(|f| (f, None)));
    }
    let connection = &pass.obj.spec.connection_name;
    let freshness = if requested {
        Freshness::Now
    } else if pass.observe_only() {
        Freshness::Shared
    } else {
        Freshness::FirstWrite
    };
    let (group, dpc) = (&target.group, &target.dpc);
    let mut result = ctx.drift.read_now(group, dpc, connection, freshness).await;
    if freshness == Freshness::FirstWrite
        && let Ok(remote) = &result
        && drift::compare(&target.member.expected, remote.as_ref()) == Finding::InSync
    {
        // "DPC holds it already" means no write at all: confirmed by a recent answer.
        result = ctx
            .drift
            .read_now(group, dpc, connection, Freshness::Shared)
            .await;
    }
    match result {
        Ok(remote) => {
            let finding = drift::compare(&target.member.expected, remote.as_ref());
            ctx.drift.note(key, &finding);
            Ok(Some((finding, remote)))
        }
        // Only a way to save writes: the first write goes ahead without it (POST, then PUT
        // on 409), and its own failure, if any, is what the object reports.
        Err(error) if freshness == Freshness::FirstWrite => {
            debug!(detail = %error, "reading DPC before the first write failed; writing without it");
            Ok(None)
        }
        Err(error) => {
            let during = Operation::List;
            Err(failed(
                pass,
                ActError {
                    error,
                    during,
                    maybe_created: false,
                },
                target.gate.clone(),
            ))
        }
    }
}

/// managementPolicy ObserveOnly: what DPC holds, compared, never written.
fn observed(
    pass: &Pass<'_>,
    target: Target,
    finding: Option<(Finding, Option<Seen>)>,
) -> (Outcome, Action) {
    let (finding, remote) = finding.expect("observing reads DPC");
    let ctx = pass.ctx;
    ctx.drift
        .register(pass.key, target.group, target.shared, target.member);
    let outcome = match finding {
        Finding::InSync => Outcome::Ready {
            desired_hash: None,
            applied: None,
            remote: remote.map(|seen| seen.status()),
            corrected: None,
            observed: true,
            managed: None,
        },
        drift => Outcome::Drifted {
            finding: drift,
            observed: true,
        },
    };
    ctx.objects.reset_backoff(pass.key);
    (outcome, Action::await_change())
}

/// Write: the plan from the applied hash, drift corrected or reported as the policy says,
/// then the write itself.
async fn write_override(
    pass: &Pass<'_>,
    target: Target,
    desired: Desired,
    finding: Option<(Finding, Option<Seen>)>,
) -> Result<(Outcome, Action), Stop> {
    let (ctx, key, spec) = (pass.ctx, pass.key, &pass.obj.spec);
    let mut plan = act::plan(pass.old.applied_hash.as_deref(), &desired.hash);
    let mut corrected = None;
    let mut marks = Marks::new(pass.obj, ctx, target.account.endpoint.api_url.as_str());
    match finding {
        // The first write of an object, and DPC already holds what it describes: adopted,
        // and from now on owned (its deletion deletes it).
        Some((Finding::InSync, seen)) if plan == Plan::Create => {
            marks.ensure_finalizer().await?;
            let managed = managed_override(pass, &target);
            let taken = Some((Applied::Taken, seen.map(|s| s.status())));
            return Ok(written(pass, target, desired, taken, None, managed));
        }
        Some((Finding::Differs(_), _)) if plan == Plan::Create => plan = Plan::Adopt,
        Some((finding, _)) if finding.is_drift() && plan == Plan::Nothing => {
            if spec.drift_policy() == DriftPolicy::Report {
                ctx.drift
                    .register(key, target.group, target.shared, target.member);
                let outcome = Outcome::Drifted {
                    finding,
                    observed: false,
                };
                return Ok((outcome, Action::await_change()));
            }
            info!(drift = %finding.describe(), "correcting drift");
            plan = match finding {
                Finding::Missing => Plan::Create,
                _ => Plan::Update,
            };
            corrected = Some(finding);
        }
        _ => {}
    }
    let managed = managed_override(pass, &target);
    match act::act(&target.dpc, &spec.project_id, &desired, plan, &mut marks).await {
        Ok(applied) => Ok(written(
            pass,
            target,
            desired,
            remote_status(applied),
            corrected,
            managed,
        )),
        Err(Failure::Kube(error)) => Err(Stop::Failed(error)),
        Err(Failure::Dpc(failure)) => {
            if !failure.maybe_created {
                marks.refused().await?;
            }
            Err(failed(pass, failure, target.gate))
        }
    }
}

/// The override this object manages, as status records it: claimed before the first
/// write, so from then on no other object takes it over.
fn managed_override(pass: &Pass<'_>, target: &Target) -> ManagedOverride {
    let endpoint = &target.account.endpoint;
    let spec = &pass.obj.spec;
    let claimed_at = pass
        .old
        .managed_override
        .as_ref()
        .filter(|m| same_api(&m.api_url, endpoint.api_url.as_str()))
        .map(|m| m.claimed_at.clone())
        .or_else(|| target.claimed.map(MicroTime))
        .unwrap_or_else(|| MicroTime(Timestamp::now()));
    ManagedOverride {
        api_url: endpoint.api_url.as_str().to_string(),
        account_id: endpoint.account_id.clone(),
        project_id: spec.project_id.clone(),
        environment_name: spec.environment_name.clone(),
        connection_name: spec.connection_name.clone(),
        claimed_at,
    }
}

/// DPC holds the desired override (written now, or already).
fn written(
    pass: &Pass<'_>,
    target: Target,
    desired: Desired,
    applied: Option<(Applied, Option<RemoteStatus>)>,
    corrected: Option<Finding>,
    managed: ManagedOverride,
) -> (Outcome, Action) {
    let (ctx, key) = (pass.ctx, pass.key);
    ctx.objects.reset_backoff(key);
    ctx.objects.clear_refusal(key);
    let (applied, remote) = match applied {
        Some((applied, remote)) => (Some(applied), remote),
        None => (None, None),
    };
    if let Some(applied) = applied {
        if applied == Applied::Taken {
            info!("DPC already holds the desired override; adopted without a write");
        } else {
            info!(write = applied.event_reason(), "DPC accepted the override");
        }
        ctx.drift.note(key, &Finding::InSync);
    }
    ctx.drift
        .register(key, target.group, target.shared, target.member);
    let outcome = Outcome::Ready {
        desired_hash: Some(desired.hash),
        applied,
        remote,
        corrected,
        observed: false,
        managed: Some(Box::new(managed)),
    };
    (outcome, Action::await_change())
}

/// What DPC echoed of a write, as status reports it.
fn remote_status(
    applied: Option<(Applied, Option<crate::dpc::RemoteOverride>)>,
) -> Option<(Applied, Option<RemoteStatus>)> {
    applied.map(|(applied, remote)| (applied, remote.map(|r| r.status())))
}

/// A failed DPC call: what to report and when to try again. A terminal failure is recorded
/// so the same request is not sent again until it, or the account, changes.
fn failed(pass: &Pass<'_>, failure: ActError, gate: Gate) -> Stop {
    let (ctx, key) = (pass.ctx, pass.key);
    let ActError { error, during, .. } = failure;
    // The client has removed credentials, token and values from whatever DPC wrote back.
    let message = error.to_string();
    let (reason, retry) = match classify(&error) {
        Verdict::Deferred(wait) => {
            // The account's request rate has a slot reserved for this object: come back then.
            let reason = if pass.old.applied_hash.is_none() {
                Reason::Creating
            } else {
                Reason::Updating
            };
            let next = Action::requeue(at_slot(wait));
            let outcome = Box::new(Outcome::Waiting { reason, message });
            return Stop::Report { outcome, next };
        }
        Verdict::Failed { reason, retry } => (reason, retry),
    };
    if reason.is_terminal() {
        ctx.objects.refuse(key, gate, reason, message.clone());
    }
    warn!(reason = %reason, operation = %during, detail = %message, "DPC call failed");
    let next = match retry.delay(|| ctx.objects.next_backoff(key)) {
        Some(delay) => Action::requeue(delay),
        None => Action::await_change(),
    };
    Stop::Report {
        outcome: Box::new(Outcome::failed(reason, message)),
        next,
    }
}
