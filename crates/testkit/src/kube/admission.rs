//! Admission of custom resources, generic over any installed CRD, as kube-apiserver does it
//! from a version's structural `openAPIV3Schema`:
//!
//! 1. unknown fields are pruned (refused with `fieldValidation=Strict`), except under
//!    `x-kubernetes-preserve-unknown-fields`; a `null` where the schema is not `nullable` is
//!    dropped;
//! 2. `default`s are applied;
//! 3. the schema's constraints (types, `required`, `enum`, `pattern`, `format`, lengths,
//!    bounds, item and property counts) are checked by a JSON-schema validator, and the
//!    `x-kubernetes-validations` CEL rules (with `oldSelf` on updates, and
//!    `messageExpression`) by kube's CEL interpreter; a type error blocks the CEL rules;
//! 4. updates ratchet: a field left unchanged is not refused again for a rule it already
//!    broke (except `required` and transition rules).
//!
//! Failures are rendered as the API server renders them: one cause per field, each with the
//! reason kubectl and clients read (`FieldValueInvalid`, `FieldValueRequired`, ...).

use serde_json::{Map, Value, json};
use std::sync::{Arc, Mutex, OnceLock};

/// `fieldValidation` of a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    /// The server's default: unknown fields are dropped with a warning.
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Ignore") => Ok(Self::Ignore),
            Some("Strict") => Ok(Self::Strict),
            Some(other) => Err(format!(
                "fieldValidation parameter unsupported: {other}. Supported values are: Ignore, Warn, Strict"
            )),
        }
    }
}

/// One refused field, as in a `Status`'s `details.causes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub reason: &'static str,
    /// `spec.items[0].name`, or `<nil>` for the object itself.
    pub field: String,
    /// What is wrong, without the field: `Invalid value: "x": ...`, `Required value`.
    pub detail: String,
}

impl FieldError {
    fn new(reason: &'static str, field: &str, detail: String) -> Self {
        let field = if field.is_empty() { "<nil>" } else { field };
        Self {
            reason,
            field: field.into(),
            detail,
        }
    }

    /// `field: detail`, as the aggregate message lists it.
    pub fn message(&self) -> String {
        format!("{}: {}", self.field, self.detail)
    }
}

/// Why a write was refused.
#[derive(Debug)]
pub enum Refusal {
    /// `fieldValidation=Strict` and the body has fields the schema does not know.
    UnknownFields(Vec<String>),
    /// The object breaks its schema or its rules.
    Invalid(Vec<FieldError>),
}

/// Admits `new` (pruned and defaulted in place) against `schema`; `old` is the stored object
/// on updates. Returns the warnings to send back (unknown fields dropped).
pub fn admit(
    schema: &Value,
    old: Option<&Value>,
    new: &mut Value,
    validation: FieldValidation,
) -> Result<Vec<String>, Refusal> {
    let mut unknown = Vec::new();
    prune(schema, new, "", true, &mut unknown);
    if validation == FieldValidation::Strict && !unknown.is_empty() {
        return Err(Refusal::UnknownFields(unknown));
    }
    *new = kube::core::cel::apply_defaults(schema, new);
    let mut errors = schema_errors(schema, new);
    let blocked = errors
        .iter()
        .any(|e| e.error.detail.contains(" in body must be of type "));
    if blocked {
        errors.push(Found {
            error: FieldError::new(
                "FieldValueInvalid",
                "",
                "Invalid value: \"\": some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
            ),
            ratchets: false,
        });
    } else {
        errors.extend(rule_errors(schema, old, new));
    }
    if let Some(old) = old {
        errors.retain(|e| !e.ratchets || changed(old, new, &e.error.field));
    }
    let errors: Vec<FieldError> = errors.into_iter().map(|e| e.error).collect();
    if errors.is_empty() {
        let warnings = match validation {
            FieldValidation::Warn => unknown
                .iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect(),
            _ => Vec::new(),
        };
        Ok(warnings)
    } else {
        Err(Refusal::Invalid(errors))
    }
}

/// A field error and whether an unchanged field is forgiven on update.
struct Found {
    error: FieldError,
    ratchets: bool,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Drops what the schema does not declare, recording the paths of unknown fields.
fn prune(schema: &Value, value: &mut Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
            let embedded = root || flag(schema, "x-kubernetes-embedded-resource");
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                if embedded && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child = properties.and_then(|p| p.get(&key)).or(additional);
                match child {
                    Some(child) => {
                        if map[&key].is_null() && !flag(child, "nullable") {
                            map.remove(&key);
                        } else {
                            let v = map.get_mut(&key).expect("listed");
                            prune(child, v, &join(path, &key), false, unknown);
                        }
                    }
                    None if preserve => {}
                    None => {
                        map.remove(&key);
                        unknown.push(join(path, &key));
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items").filter(|i| i.is_object()) {
                for (i, v) in items.iter_mut().enumerate() {
                    prune(item, v, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

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

fn schema_errors(schema: &Value, object: &Value) -> Vec<Found> {
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

/// The `x-kubernetes-validations` failures.
fn rule_errors(schema: &Value, old: Option<&Value>, new: &Value) -> Vec<Found> {
    use kube::core::cel::{CompiledSchema, Validator, compile_schema};
    use std::cell::RefCell;
    thread_local! {
        static VALIDATOR: Validator = Validator::new();
        static COMPILED: RefCell<Vec<(Value, Arc<CompiledSchema>)>> = const { RefCell::new(Vec::new()) };
    }
    let compiled = COMPILED.with_borrow_mut(|cache| {
        if let Some((_, c)) = cache.iter().find(|(s, _)| s == schema) {
            return c.clone();
        }
        let compiled = Arc::new(compile_schema(schema));
        if cache.len() > 64 {
            cache.clear();
        }
        cache.push((schema.clone(), compiled.clone()));
        compiled
    });
    let Err(errors) = VALIDATOR.with(|v| v.validate_compiled(&compiled, new, old)) else {
        return Vec::new();
    };
    errors
        .into_vec()
        .into_iter()
        .map(|e| {
            let field = e.field_path.clone();
            let got = lookup(new, &field).map_or_else(|| "null".into(), show);
            let (reason, detail) = match e.reason.as_deref() {
                Some("FieldValueRequired") => (
                    "FieldValueRequired",
                    format!("Required value: {}", e.message),
                ),
                Some("FieldValueForbidden") => {
                    ("FieldValueForbidden", format!("Forbidden: {}", e.message))
                }
                Some("FieldValueDuplicate") => {
                    ("FieldValueDuplicate", format!("Duplicate value: {got}"))
                }
                _ => (
                    "FieldValueInvalid",
                    format!("Invalid value: {got}: {}", e.message),
                ),
            };
            let transition = e.rule.contains("oldSelf");
            Found {
                error: FieldError::new(reason, &field, detail),
                ratchets: !transition,
            }
        })
        .collect()
}

/// Whether the value at `field` differs between `old` and `new`.
fn changed(old: &Value, new: &Value, field: &str) -> bool {
    let field = if field == "<nil>" { "" } else { field };
    lookup(old, field) != lookup(new, field)
}

/// The value at a field path like `spec.items[0].name` (`""` is the object).
fn lookup<'a>(object: &'a Value, field: &str) -> Option<&'a Value> {
    let mut current = object;
    if field.is_empty() {
        return Some(current);
    }
    for part in field.split('.') {
        let (name, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            current = current.get(name)?;
        }
        for index in indexes.split('[').filter(|s| !s.is_empty()) {
            let index = index.trim_end_matches(']');
            current = match index.parse::<usize>() {
                Ok(i) => current.get(i)?,
                Err(_) => current.get(index.trim_matches('"'))?,
            };
        }
    }
    Some(current)
}

/// A JSON pointer into `object` as a field path: `/spec/items/0/name` → `spec.items[0].name`.
fn field_path(object: &Value, pointer: &str) -> String {
    let mut path = String::new();
    let mut current = Some(object);
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        match current {
            Some(Value::Array(items)) => {
                path.push_str(&format!("[{token}]"));
                current = token.parse::<usize>().ok().and_then(|i| items.get(i));
            }
            _ => {
                path = join(&path, &token);
                current = current.and_then(|c| c.get(&token));
            }
        }
    }
    path
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn count(value: &Value) -> usize {
    match value {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    }
}

/// A bad value as the API server's field errors print it: strings quoted, numbers and
/// booleans bare, anything else as JSON.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => quote(s),
        Value::Number(_) => go_number(value),
        other => serde_json::to_string(other).expect("JSON serializes"),
    }
}

/// A supported value of an enum: quoted, whatever its type (`"null"` for null).
fn show_allowed(value: &Value) -> String {
    match value {
        Value::String(s) => quote(s),
        other => quote(&serde_json::to_string(other).expect("JSON serializes")),
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A number as Go's `%v` prints it: `1` for an integral float.
fn go_number(value: &Value) -> String {
    match value.as_f64() {
        Some(f) if value.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => format!("{}", f as i64),
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["id"],
                    "properties": {
                        "id": {"type": "string", "format": "uuid",
                               "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "id is immutable"}]},
                        "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "count": {"type": "integer", "minimum": 1, "nullable": true}
                    }
                }
            }
        })
    }

    fn admitted(old: Option<&Value>, mut new: Value, v: FieldValidation) -> Result<Value, Refusal> {
        admit(&schema(), old, &mut new, v).map(|_| new)
    }

    const ID: &str = "0b8e9f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";

    #[test]
    fn prunes_unknown_fields_keeps_preserved_ones_and_defaults() {
        let out = admitted(
            None,
            json!({"metadata": {"name": "x", "odd": 1}, "spec": {"id": ID, "extra": 1, "free": {"any": 1}, "count": null}}),
            FieldValidation::Warn,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"metadata": {"name": "x", "odd": 1}, "spec": {"id": ID, "mode": "A", "free": {"any": 1}, "count": null}})
        );
        let Err(Refusal::UnknownFields(fields)) = admitted(
            None,
            json!({"spec": {"id": ID, "extra": 1}}),
            FieldValidation::Strict,
        ) else {
            panic!("strict refuses unknown fields")
        };
        assert_eq!(fields, ["spec.extra"]);
    }

    #[test]
    fn schema_and_rule_failures_name_their_fields() {
        let Err(Refusal::Invalid(errors)) = admitted(
            None,
            json!({"spec": {"id": "nope", "mode": "C", "count": 0}}),
            FieldValidation::Strict,
        ) else {
            panic!("refused")
        };
        let messages: Vec<String> = errors.iter().map(FieldError::message).collect();
        assert!(
            messages.contains(
                &"spec.id: Invalid value: \"nope\": spec.id in body must be of type uuid: \"nope\""
                    .to_string()
            ),
            "{messages:?}"
        );
        assert!(
            messages.contains(
                &"spec.mode: Unsupported value: \"C\": supported values: \"A\", \"B\"".to_string()
            ),
            "{messages:?}"
        );
        assert!(messages.contains(&"spec.count: Invalid value: 0: spec.count in body should be greater than or equal to 1".to_string()), "{messages:?}");

        let Err(Refusal::Invalid(errors)) =
            admitted(None, json!({"spec": {}}), FieldValidation::Strict)
        else {
            panic!("refused")
        };
        assert_eq!(errors[0].message(), "spec.id: Required value");
        assert_eq!(errors[0].reason, "FieldValueRequired");
    }

    #[test]
    fn transition_rules_see_the_old_object_and_unchanged_fields_ratchet() {
        let old = json!({"spec": {"id": ID, "mode": "A"}});
        let other = "1b8e9f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
        let Err(Refusal::Invalid(errors)) = admitted(
            Some(&old),
            json!({"spec": {"id": other, "mode": "A"}}),
            FieldValidation::Strict,
        ) else {
            panic!("refused")
        };
        assert_eq!(
            errors[0].message(),
            format!("spec.id: Invalid value: \"{other}\": id is immutable")
        );
        // A stored object that already breaks a rule may still be updated elsewhere.
        let stored = json!({"spec": {"id": ID, "count": 0}});
        assert!(
            admitted(
                Some(&stored),
                json!({"spec": {"id": ID, "count": 0, "mode": "B"}}),
                FieldValidation::Strict
            )
            .is_ok()
        );
    }

    #[test]
    fn a_type_error_holds_the_rules_back() {
        let Err(Refusal::Invalid(errors)) = admitted(
            None,
            json!({"spec": {"id": ID, "count": "many"}}),
            FieldValidation::Strict,
        ) else {
            panic!("refused")
        };
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            errors[0].message(),
            "spec.count: Invalid value: \"string\": spec.count in body must be of type integer: \"string\""
        );
        assert!(
            errors[1]
                .detail
                .contains("some validation rules were not checked")
        );
    }
}
