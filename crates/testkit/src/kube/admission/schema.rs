//! The structural schema of a CRD version, checked by the `jsonschema` crate, with the API
//! server's wording of each failure; and the list-type duplicates it checks besides.

use super::values::{count, field_path, go_number, show, show_allowed, type_name};
use super::{FieldError, Found, flag, join};
use serde_json::{Map, Value, json};
use std::sync::{Arc, Mutex, OnceLock};

/// A CRD schema as a JSON Schema (draft 2020-12): `nullable` becomes a `null` type,
/// `x-kubernetes-int-or-string` an `anyOf`, OpenAPI's boolean exclusive bounds numeric ones;
/// Kubernetes extensions, defaults and documentation are dropped (CEL rules are checked on
/// their own). The root's `metadata` is left to the server (it is ObjectMeta, not schema).
pub fn json_schema(schema: &Value) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (k, v) in map {
        match k.as_str() {
            "properties" | "patternProperties" => {
                let converted = v
                    .as_object()
                    .map(|p| p.iter().map(|(n, s)| (n.clone(), json_schema(s))).collect())
                    .unwrap_or_default();
                out.insert(k.clone(), Value::Object(converted));
            }
            "items" | "additionalProperties" | "not" => {
                out.insert(k.clone(), json_schema(v));
            }
            "allOf" | "anyOf" | "oneOf" => {
                let converted = v
                    .as_array()
                    .map(|a| a.iter().map(json_schema).collect())
                    .unwrap_or_default();
                out.insert(k.clone(), Value::Array(converted));
            }
            "exclusiveMinimum" | "exclusiveMaximum" | "nullable" | "default" | "example"
            | "description" | "title" | "externalDocs" => {}
            _ if k.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    for (exclusive, bound) in [
        ("exclusiveMinimum", "minimum"),
        ("exclusiveMaximum", "maximum"),
    ] {
        if flag(schema, exclusive)
            && let Some(limit) = out.remove(bound)
        {
            out.insert(exclusive.into(), limit);
        }
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        out.remove("type");
        let either = json!([{"type": "integer"}, {"type": "string"}]);
        match out.remove("anyOf") {
            Some(any) => {
                out.insert("allOf".into(), json!([{"anyOf": either}, {"anyOf": any}]));
            }
            None => {
                out.insert("anyOf".into(), either);
            }
        }
    }
    if flag(schema, "nullable")
        && let Some(Value::String(t)) = out.get("type").cloned()
    {
        out.insert("type".into(), json!([t, "null"]));
    }
    Value::Object(out)
}

/// The schema of a version with the root's `metadata` constraints removed.
fn without_metadata(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(p) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        p.remove("metadata");
    }
    schema
}

/// JSON-schema validators of the schemas seen so far (compiling one per write would make the
/// emulator slow under the benchmark's thousands of status writes).
fn validator(schema: &Value) -> Arc<jsonschema::Validator> {
    type Cache = Mutex<Vec<(Value, Arc<jsonschema::Validator>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().expect("validator cache lock");
    if let Some((_, v)) = cache.iter().find(|(s, _)| s == schema) {
        return v.clone();
    }
    let compiled = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&json_schema(&without_metadata(schema)))
        .unwrap_or_else(|e| panic!("a CRD schema the validator cannot compile: {e}"));
    let compiled = Arc::new(compiled);
    if cache.len() > 64 {
        cache.clear();
    }
    cache.push((schema.clone(), compiled.clone()));
    compiled
}

pub(super) fn schema_errors(schema: &Value, object: &Value) -> Vec<Found> {
    use jsonschema::error::ValidationErrorKind as K;
    let validator = validator(schema);
    let mut found = Vec::new();
    for e in validator.iter_errors(object) {
        let field = field_path(object, &e.instance_path().to_string());
        let value = e.instance();
        let shown = show(value);
        let (reason, field, detail, ratchets) = match e.kind() {
            K::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                (
                    "FieldValueRequired",
                    join(&field, name),
                    "Required value".to_string(),
                    false,
                )
            }
            K::Type { kind } => {
                let wanted = match kind {
                    jsonschema::error::TypeKind::Single(t) => t.to_string(),
                    jsonschema::error::TypeKind::Multiple(ts) => {
                        let names: Vec<String> = ts
                            .iter()
                            .map(|t| t.to_string())
                            .filter(|t| t != "null")
                            .collect();
                        names.join("/")
                    }
                };
                let got = type_name(value);
                (
                    "FieldValueTypeInvalid",
                    field.clone(),
                    format!(
                        "Invalid value: \"{got}\": {field} in body must be of type {wanted}: \"{got}\""
                    ),
                    true,
                )
            }
            K::Enum { options } => {
                let supported: Vec<String> = options
                    .as_array()
                    .map(|o| o.iter().map(show_allowed).collect())
                    .unwrap_or_default();
                (
                    "FieldValueNotSupported",
                    field,
                    format!(
                        "Unsupported value: {shown}: supported values: {}",
                        supported.join(", ")
                    ),
                    true,
                )
            }
            K::Pattern { pattern } => (
                "FieldValueInvalid",
                field.clone(),
                format!("Invalid value: {shown}: {field} in body should match '{pattern}'"),
                true,
            ),
            K::Format { format } => (
                "FieldValueInvalid",
                field.clone(),
                format!(
                    "Invalid value: {shown}: {field} in body must be of type {format}: {shown}"
                ),
                true,
            ),
            K::MaxLength { limit } => (
                "FieldValueTooLong",
                field,
                format!(
                    "Too long: may not be more than {limit} {}",
                    if *limit == 1 { "byte" } else { "bytes" }
                ),
                true,
            ),
            K::MinLength { limit } => (
                "FieldValueInvalid",
                field.clone(),
                format!(
                    "Invalid value: {shown}: {field} in body should be at least {limit} chars long"
                ),
                true,
            ),
            K::Minimum { limit } | K::ExclusiveMinimum { limit } => (
                "FieldValueInvalid",
                field.clone(),
                format!(
                    "Invalid value: {shown}: {field} in body should be greater than {}{}",
                    if matches!(e.kind(), K::Minimum { .. }) {
                        "or equal to "
                    } else {
                        ""
                    },
                    go_number(limit)
                ),
                true,
            ),
            K::Maximum { limit } | K::ExclusiveMaximum { limit } => (
                "FieldValueInvalid",
                field.clone(),
                format!(
                    "Invalid value: {shown}: {field} in body should be less than {}{}",
                    if matches!(e.kind(), K::Maximum { .. }) {
                        "or equal to "
                    } else {
                        ""
                    },
                    go_number(limit)
                ),
                true,
            ),
            K::MaxItems { limit } | K::MaxProperties { limit } => (
                "FieldValueTooMany",
                field,
                format!(
                    "Too many: {}: must have at most {limit} items",
                    count(value)
                ),
                true,
            ),
            K::MinItems { limit } => (
                "FieldValueInvalid",
                field.clone(),
                format!(
                    "Invalid value: {}: {field} in body should have at least {limit} items",
                    count(value)
                ),
                true,
            ),
            K::MinProperties { limit } => (
                "FieldValueInvalid",
                field.clone(),
                format!(
                    "Invalid value: {}: {field} in body should have at least {limit} properties",
                    count(value)
                ),
                true,
            ),
            _ => (
                "FieldValueInvalid",
                field,
                format!("Invalid value: {shown}: {e}"),
                true,
            ),
        };
        found.push(Found {
            error: FieldError::new(reason, &field, detail),
            ratchets,
        });
    }
    found
}

/// Duplicates in lists the schema says are sets (`x-kubernetes-list-type: set`) or maps by
/// keys (`map` with `x-kubernetes-list-map-keys`): each later duplicate, by its keys.
pub(super) fn list_errors(schema: &Value, value: &Value, path: &str, found: &mut Vec<Found>) {
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if let Some(s) = properties.and_then(|p| p.get(key)).or(additional) {
                    list_errors(s, child, &join(path, key), found);
                }
            }
        }
        Value::Array(items) => {
            let item_schema = schema.get("items").filter(|i| i.is_object());
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let identity = |item: &Value| -> Option<Value> {
                match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
                    Some("set") => Some(item.clone()),
                    Some("map") => Some(Value::Object(
                        keys.iter()
                            .filter_map(|k| item.get(*k).map(|v| (k.to_string(), v.clone())))
                            .collect(),
                    )),
                    _ => None,
                }
            };
            let mut seen: Vec<Value> = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let here = format!("{path}[{i}]");
                if let Some(id) = identity(item) {
                    if seen.contains(&id) {
                        found.push(Found {
                            error: FieldError::new(
                                "FieldValueDuplicate",
                                &here,
                                format!("Duplicate value: {}", show(&id)),
                            ),
                            ratchets: true,
                        });
                    } else {
                        seen.push(id);
                    }
                }
                if let Some(s) = item_schema {
                    list_errors(s, item, &here, found);
                }
            }
        }
        _ => {}
    }
}
