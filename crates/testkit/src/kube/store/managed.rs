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
            .find(|e| {
                e.manager == manager
                    && e.operation == operation
                    && e.subresource.as_deref() == subresource
            })
            .map(|e| e.fields.clone())
            .unwrap_or_default()
    }

    pub(super) fn owned_by_other(
        &self,
        manager: &str,
        subresource: Option<&str>,
        path: &ssa::Path,
    ) -> bool {
        self.0.iter().any(|e| {
            !(e.manager == manager
                && e.operation == "Apply"
                && e.subresource.as_deref() == subresource)
                && e.fields.contains(path)
        })
    }

    pub(super) fn take(
        &mut self,
        manager: &str,
        operation: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
    ) {
        for entry in &mut self.0 {
            if !(entry.manager == manager
                && entry.operation == operation
                && entry.subresource.as_deref() == subresource)
            {
                entry.fields.retain(|p| !fields.contains(p));
            }
        }
        let time = now_rfc3339();
        match self.0.iter_mut().find(|e| {
            e.manager == manager
                && e.operation == operation
                && e.subresource.as_deref() == subresource
        }) {
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
        self.take(manager, "Apply", rt, subresource, fields);
    }

    pub(super) fn record_update(
        &mut self,
        manager: &str,
        rt: &ResourceType,
        subresource: Option<&str>,
        fields: ssa::FieldSet,
    ) {
        if !fields.is_empty() {
            self.take(manager, "Update", rt, subresource, fields);
        }
    }
}
