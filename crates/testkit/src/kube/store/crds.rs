//! CustomResourceDefinitions: registering the types they define, and their status.

use super::*;

impl Store {
    pub(super) fn sync_crd(&mut self, crd: &Value) {
        let Some(spec) = crd.get("spec") else { return };
        let group = spec
            .get("group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let names = spec.get("names").cloned().unwrap_or(Value::Null);
        let text = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_string();
        let list = |v: &Value, f: &str| -> Vec<String> {
            v.get(f)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let plural = text(&names, "plural");
        let kind = text(&names, "kind");
        let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
        let key = (group.clone(), plural.clone());
        if let Some(existing) = self.types.get_mut(&key) {
            existing.versions.clear();
        }
        for version in spec
            .get("versions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if version.get("served").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let singular = match text(&names, "singular") {
                s if s.is_empty() => kind.to_lowercase(),
                s => s,
            };
            self.register(ResourceType {
                group: group.clone(),
                version: text(version, "name"),
                kind: kind.clone(),
                plural: plural.clone(),
                singular,
                namespaced,
                short_names: list(&names, "shortNames"),
                categories: list(&names, "categories"),
                status_subresource: version.pointer("/subresources/status").is_some(),
                printer_columns: version
                    .get("additionalPrinterColumns")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
                schema: version.pointer("/schema/openAPIV3Schema").cloned(),
                admission: version
                    .pointer("/schema/openAPIV3Schema")
                    .map(|s| Arc::new(admission::Compiled::new(s))),
                custom: true,
            });
        }
    }

    pub(super) fn unregister_crd(&mut self, crd: &Value) {
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let key = (group, plural);
        let Some(state) = self.types.get(&key) else {
            return;
        };
        let Some(rt) = state.versions.values().next().cloned() else {
            self.types.remove(&key);
            return;
        };
        let keys: Vec<(String, String)> = state.objects.keys().cloned().collect();
        for object_key in keys {
            self.remove(&rt, &object_key);
        }
        self.types.remove(&key);
    }
}

pub(super) fn validate_crd(crd: &Value) -> ApiResult<()> {
    let name = meta_str(crd, "name").unwrap_or("");
    let group = crd
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or("");
    let plural = crd
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = crd
        .pointer("/spec/names/kind")
        .and_then(Value::as_str)
        .unwrap_or("");
    let rt = ResourceType::builtin(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        false,
        true,
        &[],
    );
    if plural.is_empty() || kind.is_empty() || group.is_empty() {
        return Err(ApiError::invalid(
            &rt,
            name,
            format!(
                "CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: spec.names.plural, spec.names.kind and spec.group are required"
            ),
        ));
    }
    if name != format!("{plural}.{group}") {
        return Err(ApiError::invalid(
            &rt,
            name,
            format!(
                "CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
            ),
        ));
    }
    Ok(())
}

/// A CRD's status as the API server reports it once the names are accepted.
pub(super) fn crd_status(crd: &mut Value) {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    let stored: Vec<Value> = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .map(|vs| {
            vs.iter()
                .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned())
                .collect()
        })
        .unwrap_or_default();
    let since = crd
        .pointer("/metadata/creationTimestamp")
        .cloned()
        .unwrap_or_else(|| Value::String(now_rfc3339()));
    crd["status"] = json!({
        "acceptedNames": names,
        "storedVersions": stored,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": since},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": since}
        ]
    });
}
