//! Writes: create, update, every kind of patch, and the commit that records a change.

use super::*;

impl Store {
    /// Creates an object.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        mut object: Value,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not an object"));
        }
        let namespace = Self::namespace_of(rt, ns);
        if let Some(body_ns) = meta_str(&object, "namespace")
            && rt.namespaced
            && !body_ns.is_empty()
            && body_ns != namespace
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let name = match meta_str(&object, "name").filter(|n| !n.is_empty()) {
            Some(name) => name.to_string(),
            None => match meta_str(&object, "generateName") {
                Some(prefix) => {
                    let suffix: String = (0..5)
                        .map(|_| {
                            char::from(
                                b"bcdfghjklmnpqrstvwxz2456789"[rand::rng().random_range(0..27)],
                            )
                        })
                        .collect();
                    format!("{prefix}{suffix}")
                }
                None => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                            rt.kind
                        ),
                    ));
                }
            },
        };
        self.check_namespace(rt, &namespace)?;
        // As kube-apiserver validates events.k8s.io/v1: an Event about a cluster-scoped
        // object may only be in `default` or `kube-system`.
        if rt.group == "events.k8s.io" {
            let regarding_ns = object
                .pointer("/regarding/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if regarding_ns.is_empty() && namespace != "default" && namespace != "kube-system" {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    format!(
                        "Event.events.k8s.io \"{name}\" is invalid: involvedObject.namespace: Invalid value: \"\": does not match event.namespace"
                    ),
                ));
            }
        }
        let key = (namespace.clone(), name.clone());
        if self.objects(rt).contains_key(&key) {
            let what = if rt.group.is_empty() {
                rt.plural.clone()
            } else {
                format!("{}.{}", rt.plural, rt.group)
            };
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{what} \"{name}\" already exists"),
            )
            .with_details(rt, &name));
        }
        if rt.is_crd() {
            validate_crd(&object)?;
        }
        normalize_secret(rt, &mut object);
        {
            let m = meta_mut(&mut object);
            m.insert("name".into(), Value::String(name.clone()));
            if rt.namespaced {
                m.insert("namespace".into(), Value::String(namespace.clone()));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), Value::String(new_uid()));
            m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
            m.remove("managedFields");
            if rt.tracks_generation() {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        if rt.status_subresource && rt.custom {
            object.as_object_mut().expect("checked").remove("status");
        }
        self.admit(rt, &name, None, &mut object, options)?;
        if rt.is_namespace() {
            object["status"] = json!({"phase": "Active"});
        }
        let manager = options.field_manager.clone();
        let fields = ssa::changed_fields(&Value::Null, &object, rt.schema.as_ref());
        let mut managed = Managed::default();
        if let Some(manager) = manager {
            managed.record_update(&manager, rt, None, fields);
        }
        managed.store(&mut object);
        self.commit(rt, key, None, object, options)
    }

    /// Replaces an object (or its status, for `subresource == Some("status")`).
    pub fn update(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        object: Value,
        subresource: Option<&str>,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        if !object.is_object() {
            return Err(ApiError::bad_request("the body is not an object"));
        }
        if let Some(body_name) = meta_str(&object, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let key = (Self::namespace_of(rt, ns), name.to_string());
        let current = self
            .objects(rt)
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(rv) = meta_str(&object, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&current, "resourceVersion")
        {
            return Err(conflict(rt, name));
        }
        let manager = options.field_manager.clone();
        self.write(
            rt,
            key,
            current,
            object,
            subresource,
            options,
            |managed, rt, old, new| {
                if let Some(manager) = &manager {
                    managed.record_update(
                        manager,
                        rt,
                        subresource,
                        ssa::changed_fields(old, new, rt.schema.as_ref()),
                    );
                }
            },
        )
    }

    /// Refuses an apply configuration with fields the schema does not declare or values of
    /// another type, whatever the `fieldValidation`, as the API server does: it cannot make
    /// the typed patch.
    fn check_apply_config(rt: &ResourceType, name: &str, applied: &Value) -> ApiResult<()> {
        let Some(compiled) = rt.admission.as_deref() else {
            return Ok(());
        };
        let Some(why) = admission::untypable(compiled, applied) else {
            return Ok(());
        };
        let body_ns = meta_str(applied, "namespace").unwrap_or_default();
        Err(ApiError::new(
            500,
            "",
            format!(
                "failed to create typed patch object ({body_ns}/{name}; {}, Kind={}): {why}",
                rt.api_version(),
                rt.kind
            ),
        ))
    }

    /// Patches an object; an apply patch creates it when missing.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        ns: Option<&str>,
        name: &str,
        kind: PatchKind,
        patch: Value,
        subresource: Option<&str>,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        if kind == PatchKind::Apply {
            Self::check_apply_config(rt, name, &patch)?;
        }
        let key = (Self::namespace_of(rt, ns), name.to_string());
        let current = self.objects(rt).get(&key).cloned();
        let Some(current) = current else {
            if kind == PatchKind::Apply && subresource.is_none() {
                let mut object = patch;
                meta_mut(&mut object).insert("name".into(), Value::String(name.to_string()));
                let manager = options.field_manager.clone().ok_or_else(|| {
                    ApiError::bad_request("fieldManager is required for apply requests")
                })?;
                let fields = ssa::fields_of(&object, rt.schema.as_ref());
                let created = self.create(
                    rt,
                    ns,
                    object,
                    &WriteOptions {
                        field_manager: None,
                        ..options.clone()
                    },
                )?;
                if options.dry_run {
                    return Ok(created);
                }
                // Record the applier as owner of what it applied.
                let mut stored = self.objects(rt).get(&key).cloned().expect("just created");
                let mut managed = Managed::load(&stored);
                managed.record_apply(&manager, rt, None, fields);
                managed.store(&mut stored);
                self.objects_mut(rt).insert(key, stored.clone());
                return Ok(Self::present(rt, &stored));
            }
            return Err(ApiError::not_found(rt, name));
        };
        match kind {
            PatchKind::Merge | PatchKind::Strategic => {
                let mut patch = patch;
                if kind == PatchKind::Strategic {
                    strip_directives(&mut patch);
                }
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                }
                if let Some(rv) = patch
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    && Some(rv) != meta_str(&current, "resourceVersion")
                {
                    return Err(conflict(rt, name));
                }
                let mut new = current.clone();
                json_patch::merge(&mut new, &patch);
                let manager = options.field_manager.clone();
                self.write(
                    rt,
                    key,
                    current,
                    new,
                    subresource,
                    options,
                    |managed, rt, old, new| {
                        if let Some(manager) = &manager {
                            managed.record_update(
                                manager,
                                rt,
                                subresource,
                                ssa::changed_fields(old, new, rt.schema.as_ref()),
                            );
                        }
                    },
                )
            }
            PatchKind::Json => {
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                let mut new = Self::present(rt, &current);
                json_patch::patch(&mut new, &ops).map_err(|e| {
                    ApiError::invalid(
                        rt,
                        name,
                        format!("the JSON patch could not be applied: {e}"),
                    )
                })?;
                let manager = options.field_manager.clone();
                self.write(
                    rt,
                    key,
                    current,
                    new,
                    subresource,
                    options,
                    |managed, rt, old, new| {
                        if let Some(manager) = &manager {
                            managed.record_update(
                                manager,
                                rt,
                                subresource,
                                ssa::changed_fields(old, new, rt.schema.as_ref()),
                            );
                        }
                    },
                )
            }
            PatchKind::Apply => {
                let manager = options.field_manager.clone().ok_or_else(|| {
                    ApiError::bad_request("fieldManager is required for apply requests")
                })?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request(
                        "an apply configuration must be an object",
                    ));
                }
                let schema = rt.schema.as_ref();
                // Only the part the endpoint writes counts: status on /status, the rest on
                // the main resource when status is a subresource.
                let mut applied = patch;
                if rt.status_subresource {
                    let obj = applied.as_object_mut().expect("checked");
                    if subresource == Some("status") {
                        obj.retain(|k, _| {
                            k == "status" || k == "apiVersion" || k == "kind" || k == "metadata"
                        });
                        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.retain(|k, _| k == "name" || k == "namespace");
                        }
                    } else {
                        obj.remove("status");
                    }
                }
                let new_fields = ssa::fields_of(&applied, schema);
                let mut managed = Managed::load(&current);
                let conflicts = managed.conflicts(
                    &manager,
                    subresource,
                    (&new_fields, &applied),
                    &current,
                    schema,
                );
                if !conflicts.is_empty() {
                    if !options.force {
                        return Err(apply_conflict(&conflicts));
                    }
                    managed.release(&manager, subresource, &conflicts);
                }
                let old_fields = managed.fields_of(&manager, "Apply", subresource);
                let mut new = current.clone();
                for stale in old_fields.difference(&new_fields) {
                    // A field goes when nobody else owns it; an object, when nothing under
                    // it is still wanted either.
                    let held = ssa::has_members(&new_fields, stale)
                        || managed.owned_elsewhere(&manager, subresource, stale);
                    if !held {
                        ssa::remove_at(&mut new, stale, schema);
                    }
                }
                ssa::merge(&mut new, &applied, schema);
                managed.record_apply(&manager, rt, subresource, new_fields);
                self.write(
                    rt,
                    key,
                    current,
                    new,
                    subresource,
                    options,
                    move |m, _, _, _| {
                        *m = managed.clone();
                    },
                )
            }
        }
    }

    /// Admits a custom resource's new state against its CRD (see [`admission`]); warnings
    /// are kept for the answer.
    fn admit(
        &mut self,
        rt: &ResourceType,
        name: &str,
        old: Option<&Value>,
        new: &mut Value,
        options: &WriteOptions,
    ) -> ApiResult<()> {
        let Some(compiled) = rt.admission.as_deref() else {
            return Ok(());
        };
        match admission::admit(compiled, old, new, options.field_validation) {
            Ok(warnings) => {
                self.warnings.extend(warnings);
                Ok(())
            }
            Err(refusal) => Err(refused(rt, name, refusal)),
        }
    }

    /// The common path of updates and patches.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write(
        &mut self,
        rt: &ResourceType,
        key: (String, String),
        current: Value,
        mut new: Value,
        subresource: Option<&str>,
        options: &WriteOptions,
        record: impl FnOnce(&mut Managed, &ResourceType, &Value, &Value),
    ) -> ApiResult<Value> {
        let name = key.1.clone();
        if !new.is_object() {
            return Err(ApiError::bad_request("the result is not an object"));
        }
        match subresource {
            Some("status") => {
                // Only status changes through /status.
                let status = new.get("status").cloned();
                new = current.clone();
                match status {
                    Some(status) => new["status"] = status,
                    None => {
                        new.as_object_mut().expect("an object").remove("status");
                    }
                }
            }
            Some(other) => {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("the server could not find the requested resource ({other})"),
                ));
            }
            None => {
                if rt.status_subresource {
                    match current.get("status") {
                        Some(status) => new["status"] = status.clone(),
                        None => {
                            new.as_object_mut().expect("an object").remove("status");
                        }
                    }
                }
            }
        }
        // Server-owned metadata.
        {
            let old_meta = meta(&current).cloned().unwrap_or_default();
            let m = meta_mut(&mut new);
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "name",
                "namespace",
                "resourceVersion",
            ] {
                match old_meta.get(field) {
                    Some(v) => {
                        m.insert(field.into(), v.clone());
                    }
                    None => {
                        m.remove(field);
                    }
                }
            }
            if subresource.is_some() {
                // Metadata does not change through a subresource.
                let managed = m.get("managedFields").cloned();
                *m = old_meta.clone();
                if let Some(managed) = managed {
                    m.insert("managedFields".into(), managed);
                }
            }
        }
        if meta_str(&current, "deletionTimestamp").is_some() {
            let before = finalizers(&current);
            let added: Vec<String> = finalizers(&new)
                .into_iter()
                .filter(|f| !before.contains(f))
                .map(|f| format!("{f:?}"))
                .collect();
            if !added.is_empty() {
                return Err(ApiError::invalid(
                    rt,
                    &name,
                    format!(
                        "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                        rt.qualified_kind(),
                        added.join(", ")
                    ),
                ));
            }
        }
        if rt.is_crd() {
            validate_crd(&new)?;
        }
        normalize_secret(rt, &mut new);
        self.admit(rt, &name, Some(&current), &mut new, options)?;
        if rt.tracks_generation() && spec_part(&new) != spec_part(&current) {
            let generation = meta(&current)
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        let mut managed = Managed::load(&current);
        record(&mut managed, rt, &current, &new);
        managed.store(&mut new);
        self.commit(rt, key, Some(current), new, options)
    }

    /// Stores `new` (unless nothing changed), records the change, and completes a deletion
    /// whose finalizers are gone.
    pub(super) fn commit(
        &mut self,
        rt: &ResourceType,
        key: (String, String),
        old: Option<Value>,
        mut new: Value,
        options: &WriteOptions,
    ) -> ApiResult<Value> {
        if rt.is_crd() {
            crd_status(&mut new);
        }
        if let Some(old) = &old
            && same_but_bookkeeping(old, &new)
        {
            return Ok(Self::present(rt, old));
        }
        if options.dry_run {
            return Ok(Self::present(rt, &new));
        }
        self.rv += 1;
        meta_mut(&mut new).insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        let stored = Self::present_owned(rt, new);
        self.objects_mut(rt).insert(key.clone(), stored.clone());
        let kind = if old.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.record(rt.key(), kind, stored.clone(), old);
        if rt.is_crd() {
            self.sync_crd(&stored);
        }
        if meta_str(&stored, "deletionTimestamp").is_some() && finalizers(&stored).is_empty() {
            if rt.is_namespace() && !self.namespace_empty(&key.1) {
                return Ok(stored);
            }
            self.remove(rt, &key);
        }
        Ok(stored)
    }
}
