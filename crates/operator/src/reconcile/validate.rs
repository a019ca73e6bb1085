//! Validate: what can be decided from the object alone, before anything is read or sent — a
//! paused object, a spec DPC cannot take, a spec naming another override than the one this
//! object manages, and an object that does not match the schema at all.
//!
//! The CRD's schema and CEL rules catch most invalid specs at admission; these checks repeat
//! them so an object that bypassed admission (an older CRD, a cluster without CEL) is still
//! reported rather than sent.

use std::collections::BTreeSet;

use kube::Resource;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use tracing::warn;

use crate::api::conditions::Reason;
use crate::api::connection_override::{MAX_DELETION_TIMEOUT, MAX_SYNC_INTERVAL};
use crate::api::{
    AccountKind, ConnectionOverride, ConnectionOverrideSpec, FINALIZER, FORCE_ORPHAN_ANNOTATION,
    PAUSED_ANNOTATION,
};
use crate::context::{Context, Gate};
use crate::key::ObjKey;

use super::Error;
use super::apply::{Pass, Stop};
use super::build::BuildError;
use super::outcome::{EventSpec, Outcome};
use super::write;

/// The first stage of a live pass: paused, invalid, or naming another override stop it here.
pub fn check(pass: &Pass) -> Result<(), Stop> {
    let spec = &pass.obj.spec;
    let stop = |outcome: Outcome| {
        // Nothing of this spec is checked against DPC; its references still re-trigger it.
        pass.ctx.drift.unregister(pass.key);
        let refs = crate::index::spec_references(&pass.key.0, spec);
        pass.ctx.refer(pass.key, refs);
        Stop::report(outcome)
    };
    if pass.annotation(PAUSED_ANNOTATION) == Some("true") {
        return Err(stop(Outcome::Paused));
    }
    if let Err(e) = validate_spec(&pass.key.0, spec) {
        return Err(stop(Outcome::failed(Reason::InvalidSpec, e.to_string())));
    }
    // The key fields are immutable, but an edited CRD (or a status restored from elsewhere)
    // could let them change: the override this object manages is the one its status records.
    if let Some(managed) = &pass.old.managed_override
        && !managed.names(
            &spec.project_id,
            &spec.environment_name,
            &spec.connection_name,
        )
    {
        let message = format!(
            "this object manages the override of connection {} in environment {} of project {} (status.managedOverride), but the spec now names connection {} in environment {} of project {}; nothing is written. Restore the spec, or delete this object (which deletes the override it manages) and create a new one",
            managed.connection_name,
            managed.environment_name,
            managed.project_id,
            spec.connection_name,
            spec.environment_name,
            spec.project_id
        );
        return Err(stop(Outcome::failed(Reason::InvalidSpec, message)));
    }
    Ok(())
}

/// Checks the spec of an object in `namespace` (no resolved values needed).
pub fn validate_spec(namespace: &str, spec: &ConnectionOverrideSpec) -> Result<(), BuildError> {
    same_namespace(namespace, spec)?;
    durations(spec)?;
    names(spec)?;
    properties(spec)
}

/// References to other namespaces are refused.
fn same_namespace(namespace: &str, spec: &ConnectionOverrideSpec) -> Result<(), BuildError> {
    let other = |field: String, ns: &Option<String>| match ns.as_deref() {
        Some(ns) if ns != namespace => Err(BuildError::OtherNamespace {
            field,
            namespace: ns.to_string(),
        }),
        _ => Ok(()),
    };
    if spec.account_kind() == AccountKind::DpcAccount {
        other(
            "spec.accountRef.namespace".into(),
            &spec.account_ref.namespace,
        )?;
    }
    let froms = &spec.connection_overrides.connection_properties_from;
    for (i, from) in froms.iter().enumerate() {
        for (kind, selector) in [
            ("secretKeyRef", &from.secret_key_ref),
            ("configMapKeyRef", &from.config_map_key_ref),
        ] {
            if let Some(selector) = selector {
                let field = format!(
                    "spec.connectionOverrides.connectionPropertiesFrom[{i}].{kind}.namespace"
                );
                other(field, &selector.namespace)?;
            }
        }
    }
    Ok(())
}

/// `syncInterval` and `deletionTimeout` parse and stay within their bounds.
fn durations(spec: &ConnectionOverrideSpec) -> Result<(), BuildError> {
    for (field, value, max) in [
        ("syncInterval", &spec.sync_interval, MAX_SYNC_INTERVAL),
        (
            "deletionTimeout",
            &spec.deletion_timeout,
            MAX_DELETION_TIMEOUT,
        ),
    ] {
        let Some(value) = value else { continue };
        let error = |reason| BuildError::Duration {
            field,
            value: value.clone(),
            reason,
        };
        let parsed = crate::api::duration::parse_duration(value).map_err(error)?;
        if parsed > max {
            let hours = max.as_secs() / 3600;
            return Err(error(format!("it may be at most {hours}h")));
        }
    }
    Ok(())
}

/// The project id is a lower-case UUID; the names are set, and the connection name has no
/// comma (DPC deletes by a comma-separated list).
fn names(spec: &ConnectionOverrideSpec) -> Result<(), BuildError> {
    if spec.connection_name.contains(',') {
        return Err(BuildError::CommaInName(spec.connection_name.clone()));
    }
    if !is_project_id(&spec.project_id) {
        return Err(BuildError::ProjectId(spec.project_id.clone()));
    }
    for (field, value) in [
        ("environmentName", &spec.environment_name),
        ("connectionName", &spec.connection_name),
        ("accountRef.name", &spec.account_ref.name),
    ] {
        if value.is_empty() {
            return Err(BuildError::Empty(field));
        }
    }
    Ok(())
}

fn is_project_id(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    let lengths = [8, 4, 4, 4, 12];
    groups.len() == 5
        && groups.iter().zip(lengths).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Each property is named once, from one source; there is at least one; a secrets location
/// has a type.
fn properties(spec: &ConnectionOverrideSpec) -> Result<(), BuildError> {
    let overrides = &spec.connection_overrides;
    let mut seen = BTreeSet::new();
    for from in &overrides.connection_properties_from {
        if from.property.is_empty() {
            return Err(BuildError::EmptyPropertyName);
        }
        if from.secret_key_ref.is_some() == from.config_map_key_ref.is_some() {
            return Err(BuildError::SourceCount(from.property.clone()));
        }
        if overrides.connection_properties.contains_key(&from.property) {
            return Err(BuildError::Duplicate(from.property.clone()));
        }
        if !seen.insert(&from.property) {
            return Err(BuildError::DuplicateFrom(from.property.clone()));
        }
    }
    if overrides.connection_properties.keys().any(String::is_empty) {
        return Err(BuildError::EmptyPropertyName);
    }
    if overrides.connection_properties.is_empty() && overrides.connection_properties_from.is_empty()
    {
        return Err(BuildError::NoProperties);
    }
    let location = overrides.secrets_location.as_ref();
    if location.is_some_and(|l| l.type_.is_empty()) {
        return Err(BuildError::LocationType);
    }
    Ok(())
}

/// An object that does not match the schema (it bypassed admission): reported, never sent.
/// Its deletion is held (the remote cannot be named safely) unless force-orphan is set.
pub async fn unreadable(
    guard: &DeserializeGuard<ConnectionOverride>,
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
    let held = meta.finalizers.iter().flatten().any(|f| f == FINALIZER);
    if meta.deletion_timestamp.is_some() && (forced || !held) {
        if forced {
            write::remove_finalizer(meta, ctx).await?;
        }
        ctx.forget(key);
        return Ok(Action::await_change());
    }
    let message = format!("the object does not match the ConnectionOverride schema: {error}");
    let gate = Gate::Unreadable {
        generation: meta.generation.unwrap_or(0),
        error: message.clone(),
    };
    if ctx.objects.refused(key, &gate).is_some() {
        return Ok(Action::await_change());
    }
    let reasons = (Reason::InvalidSpec, Reason::ReconcileError);
    let written = write::report_conditions_only(ctx, meta, Vec::new(), reasons, &message, true);
    match written.await {
        Ok(()) => {}
        // An object stored under an older CRD that today's schema or CEL rules refuse: the API
        // server validates the whole object on a status write too, so no condition can ever
        // be written. The Event below is then the only report; retrying would loop.
        Err(kube::Error::Api(status)) if status.code == 422 => {
            warn!(refused = %status.message, "the API server refuses any status of this object; reporting it by an Event only");
        }
        Err(e) => return Err(e.into()),
    }
    let event = EventSpec {
        warning: true,
        reason: Reason::InvalidSpec.as_str().into(),
        note: message.clone(),
        action: "Reconcile".into(),
    };
    write::publish(ctx, &unreadable_reference(guard), event).await;
    ctx.objects.refuse(key, gate, Reason::InvalidSpec, message);
    Ok(Action::await_change())
}

/// The reference of an object known by its metadata only.
fn unreadable_reference(
    guard: &DeserializeGuard<ConnectionOverride>,
) -> k8s_openapi::api::core::v1::ObjectReference {
    let meta = guard.meta();
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(ConnectionOverride::api_version(&()).into()),
        kind: Some(ConnectionOverride::kind(&()).into()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    }
}
