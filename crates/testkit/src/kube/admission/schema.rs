//! The structural schema of a CRD version, checked by the `jsonschema` crate, with the API
//! server's wording of each failure; and the list-type duplicates it checks besides.

use super::values::{count, field_path, go_number, show, show_allowed, type_name};
use super::{FieldError, Found, flag, join};
use serde_json::{Map, Value, json};

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

/// The JSON-schema validator of a CRD version's schema.
pub(super) fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&json_schema(&without_metadata(schema)))
        .unwrap_or_else(|e| panic!("a CRD schema the validator cannot compile: {e}"))
}

pub(super) fn schema_errors(validator: &jsonschema::Validator, object: &Value) -> Vec<Found> {
    use jsonschema::error::ValidationErrorKind as K;
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

/// Calls `f` with every value of `value` that `schema` describes, its schema and its path.
fn visit(schema: &Value, value: &Value, path: &str, f: &mut dyn FnMut(&Value, &Value, &str)) {
    f(schema, value, path);
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if let Some(s) = properties.and_then(|p| p.get(key)).or(additional) {
                    visit(s, child, &join(path, key), f);
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items").filter(|i| i.is_object()) {
                for (i, item) in items.iter().enumerate() {
                    visit(s, item, &format!("{path}[{i}]"), f);
                }
            }
        }
        _ => {}
    }
}

/// What the server checks besides the JSON schema: integers within their `int32`/`int64`
/// format (reported first, without a field, as the server does), and duplicates in lists
/// that are sets (`x-kubernetes-list-type: set`) or maps by keys (`map`), each later
/// duplicate by its keys.
pub(super) fn structural_errors(schema: &Value, value: &Value) -> (Vec<Found>, Vec<Found>) {
    let (mut formats, mut duplicates) = (Vec::new(), Vec::new());
    visit(schema, value, "", &mut |schema, value, path| {
        if let Some(error) = format_error(schema, value, path) {
            formats.push(error);
        }
        if let Value::Array(items) = value {
            duplicates.extend(list_duplicates(schema, items, path));
        }
    });
    (formats, duplicates)
}

fn format_error(schema: &Value, value: &Value, path: &str) -> Option<Found> {
    let Value::Number(n) = value else {
        return None;
    };
    let format = schema.get("format").and_then(Value::as_str)?;
    // A fraction is a type error of its own; only whole numbers are checked here.
    let whole = n
        .as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
        .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i128))?;
    let fits = match format {
        "int32" => i32::try_from(whole).is_ok(),
        "int64" => i64::try_from(whole).is_ok(),
        _ => return None,
    };
    (!fits).then(|| Found {
        error: FieldError::new(
            "FieldValueInvalid",
            "",
            format!("Invalid value: \"\": Checked value must be of type integer with format {format} in {path}"),
        ),
        ratchets: false,
    })
}

fn list_duplicates(schema: &Value, items: &[Value], path: &str) -> Vec<Found> {
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
    let mut found = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(id) = identity(item) else {
            continue;
        };
        if seen.contains(&id) {
            found.push(Found {
                error: FieldError::new(
                    "FieldValueDuplicate",
                    &format!("{path}[{i}]"),
                    format!("Duplicate value: {}", show(&id)),
                ),
                ratchets: true,
            });
        } else {
            seen.push(id);
        }
    }
    found
}

/// What makes an apply configuration untypable, as server-side apply words it: a value of
/// another type than its schema's (`.status.n: expected numeric (int or float), got string`).
pub(super) fn apply_type_errors(schema: &Value, value: &Value) -> Vec<String> {
    let mut found = Vec::new();
    visit(schema, value, "", &mut |schema, value, path| {
        if value.is_null() || flag(schema, "x-kubernetes-int-or-string") {
            return;
        }
        let expected = match schema.get("type").and_then(Value::as_str) {
            Some("integer" | "number") if !value.is_number() => "numeric (int or float)",
            Some("string") if !value.is_string() => "string",
            Some("boolean") if !value.is_boolean() => "boolean",
            Some("object") if !value.is_object() => "map",
            Some("array") if !value.is_array() => "list",
            _ => return,
        };
        found.push(format!(
            ".{path}: expected {expected}, got {}",
            go_type(value)
        ));
    });
    found
}

/// The Go type an unstructured value decodes to, as `%T` prints it.
fn go_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "<nil>",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float64",
        Value::Number(_) => "int64",
        Value::String(_) => "string",
        Value::Array(_) => "[]interface {}",
        Value::Object(_) => "map[string]interface {}",
    }
}
