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
//!    `messageExpression`) by kube's CEL interpreter; list-set and list-map duplicates are
//!    refused; a type, enum, required, length or count error holds the CEL rules back;
//! 4. updates ratchet: a field left unchanged is not refused again for a rule it already
//!    broke (except `required` and transition rules).
//!
//! Failures are rendered as the API server renders them: one cause per field, each with the
//! reason kubectl and clients read (`FieldValueInvalid`, `FieldValueRequired`, ...).

use serde_json::Value;

mod rules;
mod schema;
#[cfg(test)]
mod tests;
mod values;

use rules::rule_errors;
pub use schema::json_schema;
use schema::{schema_errors, structural_errors};
use values::changed;

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
    /// The query parameter's value; `None` for one the server does not know.
    pub fn parse(value: Option<&str>) -> Option<Self> {
        match value {
            None | Some("") | Some("Warn") => Some(Self::Warn),
            Some("Ignore") => Some(Self::Ignore),
            Some("Strict") => Some(Self::Strict),
            Some(_) => None,
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

/// A CRD version's schema, ready for admission: its JSON-schema validator and CEL rules are
/// compiled once, when the CRD is stored.
pub struct Compiled {
    schema: Value,
    validator: jsonschema::Validator,
    rules: rules::Rules,
}

impl Compiled {
    pub fn new(schema: &Value) -> Self {
        Self {
            schema: schema.clone(),
            validator: schema::validator(schema),
            rules: rules::Rules::new(schema),
        }
    }
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compiled(..)")
    }
}

/// Admits `new` (pruned and defaulted in place) against its CRD's schema; `old` is the stored
/// object on updates. Returns the warnings to send back (unknown fields dropped).
pub fn admit(
    compiled: &Compiled,
    old: Option<&Value>,
    new: &mut Value,
    validation: FieldValidation,
) -> Result<Vec<String>, Refusal> {
    let schema = &compiled.schema;
    let mut unknown = Vec::new();
    prune(schema, new, "", true, &mut unknown);
    if validation == FieldValidation::Strict && !unknown.is_empty() {
        return Err(Refusal::UnknownFields(unknown));
    }
    *new = kube::core::cel::apply_defaults(schema, new);
    let ratchet = |errors: &mut Vec<Found>| {
        if let Some(old) = old {
            errors.retain(|e| !e.ratchets || changed(old, new, &e.error.field));
        }
    };
    let (mut errors, duplicates) = structural_errors(schema, new);
    errors.extend(schema_errors(&compiled.validator, new));
    errors.extend(duplicates);
    ratchet(&mut errors);
    // As kube-apiserver: these errors leave the object too broken for the CEL rules to run.
    let blocking = [
        "FieldValueNotSupported",
        "FieldValueRequired",
        "FieldValueTooLong",
        "FieldValueTooMany",
        "FieldValueTypeInvalid",
    ];
    if errors.iter().any(|e| blocking.contains(&e.error.reason)) {
        errors.push(Found {
            error: FieldError::new(
                "FieldValueInvalid",
                "",
                "Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
            ),
            ratchets: false,
        });
    } else {
        let mut rules = rule_errors(&compiled.rules, schema, old, new);
        ratchet(&mut rules);
        errors.extend(rules);
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

/// Why an apply configuration cannot be made a typed patch, as server-side apply words it
/// (`.spec.x: field not declared in schema`, `.spec.n: expected numeric …`): the server names
/// one such field (of several, one at random); this names the first.
pub fn untypable(compiled: &Compiled, value: &Value) -> Option<String> {
    let schema = &compiled.schema;
    let mut unknown = Vec::new();
    prune(schema, &mut value.clone(), "", true, &mut unknown);
    unknown
        .first()
        .map(|field| format!(".{field}: field not declared in schema"))
        .or_else(|| schema::apply_type_errors(schema, value).into_iter().next())
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
