//! managedFields: who owns which field, as server-side apply records it.

use super::*;

/// The `managedFields` of an object, read and written as field sets.
#[derive(Clone, Default)]
pub(super) struct Managed(Vec<ManagedEntry>);

#[derive(Clone)]
pub(super) struct ManagedEntry {
    manager: String,
    operation: String,
    subresource: Option<String>,
    api_version: String,
    time: String,
    fields: ssa::FieldSet,
}

impl ManagedEntry {
    fn is(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }

    /// The manager as a conflict names it.
    fn label(&self) -> String {
        let mut label = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            label.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            label.push_str(&format!(" using {}", self.api_version));
        }
        label
    }
}

/// `409 Conflict` for an apply that would change fields other managers own.
pub(super) fn apply_conflict(conflicts: &[(String, ssa::Path)]) -> ApiError {
    let message = match conflicts {
        [(who, path)] => format!(
            "Apply failed with 1 conflict: conflict with {who}: {}",
            ssa::path_string(path)
        ),
        _ => {
            let mut by_manager: BTreeMap<&str, Vec<&ssa::Path>> = BTreeMap::new();
            for (who, path) in conflicts {
                by_manager.entry(who).or_default().push(path);
            }
            let lines: Vec<String> = by_manager
                .into_iter()
                .map(|(who, mut paths)| {
                    paths.sort_by(|a, b| ssa::server_order(a, b));
                    let listed: Vec<String> = paths
                        .iter()
                        .map(|p| format!("- {}", ssa::path_string(p)))
                        .collect();
                    format!("conflicts with {who}:\n{}", listed.join("\n"))
                })
                .collect();
            format!(
                "Apply failed with {} conflicts: {}",
                conflicts.len(),
                lines.join("\n")
            )
        }
    };
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|(who, path)| {
            json!({"reason": "FieldManagerConflict", "message": format!("conflict with {who}"), "field": ssa::path_string(path)})
        })
        .collect();
    let mut error = ApiError::new(409, "Conflict", message);
    error.details = Some(json!({"causes": causes}));
    error
}

impl Managed {
    pub(super) fn load(object: &Value) -> Self {
        let entries = meta(object)
            .and_then(|m| m.get("managedFields"))
            .and_then(Value::as_array)
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| ManagedEntry {
                        manager: e
                            .get("manager")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                        operation: e
                            .get("operation")
                            .and_then(Value::as_str)
                            .unwrap_or("Update")
                            .into(),
                        subresource: e
                            .get("subresource")
                            .and_then(Value::as_str)
                            .map(String::from),
                        api_version: e
                            .get("apiVersion")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                        time: e.get("time").and_then(Value::as_str).unwrap_or("").into(),
                        fields: e
                            .get("fieldsV1")
                            .map(ssa::from_fields_v1)
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self(entries)
    }

    pub(super) fn store(&self, object: &mut Value) {
        let entries: Vec<Value> = self
            .0
            .iter()
            .filter(|e| !e.fields.is_empty())
            .map(|e| {
                let mut entry = json!({
                    "manager": e.manager,
                    "operation": e.operation,
                    "apiVersion": e.api_version,
                    "time": e.time,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": ssa::to_fields_v1(&e.fields),
                });
                if let Some(sub) = &e.subresource {
                    entry["subresource"] = Value::String(sub.clone());
                }
                entry
            })
            .collect();
        let m = meta_mut(object);
        if entries.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(entries));
        }
    }

    pub(super) fn fields_of(
        &self,
        manager: &str,
        operation: &str,
        subresource: Option<&str>,
    ) -> ssa::FieldSet {
        self.0
            .iter()
            .find(|e| e.is(manager, operation, subresource))
            .map(|e| e.fields.clone())
            .unwrap_or_default()
    }

    /// The entries of every manager but `manager`'s apply.
    fn others<'a>(
        &'a self,
        manager: &'a str,
        subresource: Option<&'a str>,
    ) -> impl Iterator<Item = &'a ManagedEntry> {
        self.0
            .iter()
            .filter(move |e| !e.is(manager, "Apply", subresource))
    }

    /// Whether another manager owns `path`, or a field under it.
    pub(super) fn owned_elsewhere(
        &self,
        manager: &str,
        subresource: Option<&str>,
        path: &ssa::Path,
    ) -> bool {
        self.others(manager, subresource)
            .any(|e| e.fields.contains(path) || ssa::has_members(&e.fields, path))
    }

    /// The fields of `applied` that another manager owns and the apply would change, each with
    /// that manager as the API server names it (`"m" using v1` for an update).
    pub(super) fn conflicts(
        &self,
        manager: &str,
        subresource: Option<&str>,
        (fields, applied): (&ssa::FieldSet, &Value),
        current: &Value,
        schema: Option<&Value>,
    ) -> Vec<(String, ssa::Path)> {
        let mut found = Vec::new();
        for entry in self.others(manager, subresource) {
            for path in fields.intersection(&entry.fields) {
                let wanted = ssa::value_at(applied, path, schema);
                if wanted.is_some_and(Value::is_object) {
                    continue;
                }
                if wanted != ssa::value_at(current, path, schema) {
                    found.push((entry.label(), path.clone()));
                }
            }
        }
        found
    }

    /// Takes `paths` away from every manager but `manager`'s apply (a forced apply wins them).
    pub(super) fn release(
        &mut self,
        manager: &str,
        subresource: Option<&str>,
        paths: &[(String, ssa::Path)],
    ) {
        for entry in &mut self.0 {
            if !entry.is(manager, "Apply", subresource) {
                entry
                    .fields
                    .retain(|p| !paths.iter().any(|(_, taken)| taken == p));
            }
        }
    }

    /// Records `fields` as owned by `manager`'s `operation`; with `exclusive` (an update),
    /// nobody else owns them any more, otherwise owners of the same values keep sharing them.
    pub(super) fn take(
        &mut self,
        manager: &str,
        operation: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
        exclusive: bool,
    ) {
        for entry in &mut self.0 {
            if exclusive && !entry.is(manager, operation, subresource) {
                entry.fields.retain(|p| !fields.contains(p));
            }
        }
        let time = now_rfc3339();
        match self
            .0
            .iter_mut()
            .find(|e| e.is(manager, operation, subresource))
        {
            Some(entry) => {
                if operation == "Apply" {
                    entry.fields = fields;
                } else {
                    entry.fields.extend(fields);
                }
                entry.time = time;
                entry.api_version = rt.api_version();
            }
            None => self.0.push(ManagedEntry {
                manager: manager.into(),
                operation: operation.into(),
                subresource: subresource.map(String::from),
                api_version: rt.api_version(),
                time,
                fields,
            }),
        }
    }

    pub(super) fn record_apply(
        &mut self,
        manager: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
    ) {
        // Owners of the same values keep sharing them; conflicts were settled before.
        self.take(manager, "Apply", rt, subresource, fields, false);
    }

    pub(super) fn record_update(
        &mut self,
        manager: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
    ) {
        if !fields.is_empty() {
            self.take(manager, "Update", rt, subresource, fields, true);
        }
    }
}
