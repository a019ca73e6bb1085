//! Write: everything a pass writes to Kubernetes — the status (server-side apply, only when it
//! differs), the cleanup finalizer, and Events — and nothing else writes a ConnectionOverride.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::conditions::{self, READY, Reason, SYNCED};
use crate::api::{
    CREATE_PENDING_ANNOTATION, ConnectionOverride, ConnectionOverrideStatus, FIELD_MANAGER,
    FINALIZER,
};
use crate::context::Context;
use crate::key::key_of;

use super::Error;
use super::outcome::{self, EventSpec, Outcome};

/// Writes the status a pass leads to (only when it differs from what is written), then
/// publishes the Event the transition deserves.
pub async fn report(
    obj: &ConnectionOverride,
    ctx: &Context,
    old: &ConnectionOverrideStatus,
    outcome: Outcome,
    handled: Option<String>,
) -> Result<(), Error> {
    let now = Time(Timestamp::now());
    let mut new = outcome::next_status(old, &obj.spec, obj.metadata.generation, &outcome, &now);
    if handled.is_some() {
        new.last_handled_reconcile_at = handled;
    }
    if let Outcome::Failed { reason, .. } = &outcome {
        ctx.metrics.failed("connectionoverride", reason.as_str());
    }
    let key = key_of(&obj.metadata);
    ctx.metrics.set_object_conditions(&key, &new.conditions);
    if new != *old {
        patch_status(ctx, &obj.metadata, &serde_json::to_value(&new)?).await?;
    }
    if let Some(hash) = &new.applied_hash {
        let uid = obj.metadata.uid.as_deref().unwrap_or_default();
        ctx.objects.record_applied(&key, uid, hash);
    }
    if let Some(event) = outcome::event_for(old, &obj.spec, &outcome) {
        publish(ctx, &obj.object_ref(&()), event).await;
    }
    Ok(())
}

/// Sets Ready and Synced to False (with their reasons and one message) by a merge patch of
/// the conditions alone, starting from `base`: for a pass that cannot build a whole status (a
/// panic, an object the operator cannot read), so what DPC last accepted (appliedHash,
/// remote) stays as it is. With `observed`, `observedGeneration` is written too.
pub async fn report_conditions_only(
    ctx: &Context,
    meta: &ObjectMeta,
    mut base: Vec<Condition>,
    (ready, synced): (Reason, Reason),
    message: &str,
    observed: bool,
) -> Result<(), kube::Error> {
    let now = Time(Timestamp::now());
    for (type_, reason) in [(READY, ready), (SYNCED, synced)] {
        let message = message.to_string();
        conditions::set_condition(
            &mut base,
            type_,
            false,
            reason,
            message,
            meta.generation,
            &now,
        );
    }
    let patch = if observed {
        json!({"status": {"conditions": base, "observedGeneration": meta.generation}})
    } else {
        json!({"status": {"conditions": base}})
    };
    let key = key_of(meta);
    send_patch(
        ctx,
        &key.0,
        &key.1,
        Some("status"),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
}

async fn patch_status(
    ctx: &Context,
    meta: &ObjectMeta,
    status: &serde_json::Value,
) -> Result<(), kube::Error> {
    let (namespace, name) = &*key_of(meta);
    let patch = json!({
        "apiVersion": ConnectionOverride::api_version(&()),
        "kind": ConnectionOverride::kind(&()),
        "status": status,
    });
    send_patch(
        ctx,
        namespace,
        name,
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

/// Queues an Event about `reference` (its note cut to 1,000 bytes).
pub async fn publish(ctx: &Context, reference: &ObjectReference, event: EventSpec) {
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
    ctx.publish(event, reference.clone()).await;
}

/// Adds the cleanup finalizer unless it is there (a JSON patch guarded by `test`).
pub async fn ensure_finalizer(obj: &ConnectionOverride, ctx: &Context) -> Result<(), Error> {
    if obj.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let patch = serde_json::Value::Array(add_finalizer_ops(obj));
    patch_finalizers(ctx, &obj.metadata, patch).await
}

/// Adds the cleanup finalizer (unless it is there) and the create-pending annotation in one
/// JSON patch, from the object as the pass read it: the `test` operations make it fail
/// rather than drop a finalizer or an annotation written since.
pub async fn add_finalizer_and_pending(
    obj: &ConnectionOverride,
    ctx: &Context,
    api_url: &str,
) -> Result<(), Error> {
    let mut ops = if obj.finalizers().iter().any(|f| f == FINALIZER) {
        Vec::new()
    } else {
        add_finalizer_ops(obj)
    };
    let key = CREATE_PENDING_ANNOTATION
        .replace('~', "~0")
        .replace('/', "~1");
    match &obj.metadata.annotations {
        // The watch keeps the annotation map (without others' annotations): it exists.
        Some(_) => ops.push(
            json!({"op": "add", "path": format!("/metadata/annotations/{key}"), "value": api_url}),
        ),
        None => {
            let rv = json!({"op": "test", "path": "/metadata/resourceVersion", "value": obj.metadata.resource_version});
            if !ops.contains(&rv) {
                ops.insert(0, rv);
            }
            ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {CREATE_PENDING_ANNOTATION: api_url}}));
        }
    }
    patch_finalizers(ctx, &obj.metadata, serde_json::Value::Array(ops)).await?;
    record_pending(ctx, &obj.metadata, true);
    Ok(())
}

/// Sets (`Some`) or removes (`None`) the create-pending annotation by a merge patch.
pub async fn set_pending(
    ctx: &Context,
    meta: &ObjectMeta,
    api_url: Option<&str>,
) -> Result<(), Error> {
    let patch = json!({"metadata": {"annotations": {CREATE_PENDING_ANNOTATION: api_url}}});
    let (namespace, name) = &*key_of(meta);
    let params = PatchParams::default();
    send_patch(ctx, namespace, name, None, &params, &Patch::Merge(&patch)).await?;
    record_pending(ctx, meta, api_url.is_some());
    Ok(())
}

fn record_pending(ctx: &Context, meta: &ObjectMeta, set: bool) {
    let key = key_of(meta);
    let uid = meta.uid.as_deref().unwrap_or_default();
    ctx.objects.record_pending(&key, uid, set);
}

/// The operations that add the cleanup finalizer to the object as read.
fn add_finalizer_ops(obj: &ConnectionOverride) -> Vec<serde_json::Value> {
    match &obj.metadata.finalizers {
        Some(list) if !list.is_empty() => vec![
            json!({"op": "test", "path": "/metadata/finalizers", "value": list}),
            json!({"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}),
        ],
        _ => vec![
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": obj.metadata.resource_version}),
            json!({"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}),
        ],
    }
}

/// Removes the cleanup finalizer; an object already gone is fine.
pub async fn remove_finalizer(meta: &ObjectMeta, ctx: &Context) -> Result<(), Error> {
    let list = meta.finalizers.clone().unwrap_or_default();
    let remaining: Vec<&String> = list.iter().filter(|f| *f != FINALIZER).collect();
    let patch = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": list},
        {"op": "replace", "path": "/metadata/finalizers", "value": remaining}
    ]);
    match patch_finalizers(ctx, meta, patch).await {
        // Already gone: nothing left to release.
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 404 => Ok(()),
        other => other,
    }
}

/// Sends a JSON patch of the finalizers (guarded by its `test` operations).
async fn patch_finalizers(
    ctx: &Context,
    meta: &ObjectMeta,
    operations: serde_json::Value,
) -> Result<(), Error> {
    let operations: Patch<()> = Patch::Json(serde_json::from_value(operations)?);
    let (namespace, name) = &*key_of(meta);
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
