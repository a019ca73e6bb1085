//! The `x-kubernetes-validations` CEL rules, evaluated by kube's CEL interpreter.

use super::values::{lookup, show, type_name};
use super::{FieldError, Found, join};
use kube::core::cel::{CompiledSchema, ErrorKind, Validator, compile_schema};
use serde_json::Value;

/// A CRD version's rules, compiled once: by top-level field (`spec`, `status`) so a write
/// that leaves one alone does not run its rules (an unchanged field would be ratcheted
/// anyway), or whole when the root has rules of its own.
pub(super) struct Rules(Vec<(Option<String>, CompiledSchema)>);

impl Rules {
    pub(super) fn new(schema: &Value) -> Self {
        let has_rules = |s: &Value| s.to_string().contains("\"x-kubernetes-validations\"");
        if schema.get("x-kubernetes-validations").is_some() {
            return Self(vec![(None, compile_schema(&namespace_escaped(schema)))]);
        }
        let parts = schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, s)| has_rules(s))
            .map(|(name, s)| (Some(name.clone()), compile_schema(&namespace_escaped(s))))
            .collect();
        Self(parts)
    }
}

/// The `x-kubernetes-validations` failures of `new` (with `old` for transition rules).
pub(super) fn rule_errors(
    rules: &Rules,
    schema: &Value,
    old: Option<&Value>,
    new: &Value,
) -> Vec<Found> {
    thread_local! {
        static VALIDATOR: Validator = Validator::new();
    }
    let mut errors = Vec::new();
    for (part, compiled) in &rules.0 {
        let (value, before) = match part {
            None => (Some(new), old),
            Some(p) => (new.get(p), old.and_then(|o| o.get(p))),
        };
        let Some(value) = value else { continue };
        if old.is_some() && before == Some(value) {
            continue;
        }
        if let Err(failed) = VALIDATOR.with(|v| v.validate_compiled(compiled, value, before)) {
            errors.extend(failed.into_vec().into_iter().map(|mut e| {
                if let Some(p) = part {
                    e.field_path = match e.field_path.as_str() {
                        "" => p.clone(),
                        f if f.starts_with('[') => format!("{p}{f}"),
                        f => join(p, f),
                    };
                }
                e
            }));
        }
    }
    errors
        .into_iter()
        .map(|e| {
            let field = e.field_path.clone();
            // Objects and lists are not printed (the server omits them).
            let got = match lookup(new, &field) {
                Some(Value::Object(_) | Value::Array(_)) => None,
                Some(v) => Some(show(v)),
                None => Some("null".into()),
            };
            let with_value = |kind: &str, message: &str| match (&got, message) {
                (Some(got), "") => format!("{kind}: {got}"),
                (Some(got), _) => format!("{kind}: {got}: {message}"),
                (None, "") => kind.to_string(),
                (None, _) => format!("{kind}: {message}"),
            };
            if matches!(
                e.kind,
                ErrorKind::EvaluationError | ErrorKind::UnsupportedReference
            ) {
                // As the server words a rule that failed to run: the schema type as the value,
                // then the interpreter's error and the rule's message.
                let cause = e.message.trim_start_matches("rule evaluation error: ");
                let kind = lookup(new, &field).map_or("object", type_name);
                let detail = format!(
                    "Invalid value: \"{kind}\": {cause} evaluating rule: {}",
                    rule_message(schema, &e.rule)
                );
                return Found {
                    error: FieldError::new("FieldValueInvalid", &field, detail),
                    ratchets: false,
                };
            }
            let (reason, detail) = match e.reason.as_deref() {
                Some("FieldValueRequired") => (
                    "FieldValueRequired",
                    format!("Required value: {}", e.message),
                ),
                Some("FieldValueForbidden") => {
                    ("FieldValueForbidden", format!("Forbidden: {}", e.message))
                }
                Some("FieldValueDuplicate") => {
                    ("FieldValueDuplicate", with_value("Duplicate value", ""))
                }
                _ => ("FieldValueInvalid", with_value("Invalid value", &e.message)),
            };
            let transition = e.rule.contains("oldSelf");
            Found {
                error: FieldError::new(reason, &field, detail),
                ratchets: !transition,
            }
        })
        .collect()
}

/// The message of the rule whose expression is `rule` (or the server's default for a rule
/// without one).
fn rule_message(schema: &Value, rule: &str) -> String {
    fn find(schema: &Value, rule: &str) -> Option<String> {
        match schema {
            Value::Object(map) => {
                let own = map
                    .get("x-kubernetes-validations")
                    .and_then(Value::as_array)
                    .and_then(|rules| rules.iter().find(|r| r["rule"] == rule))
                    .map(|r| {
                        r.get("message")
                            .and_then(Value::as_str)
                            .map_or_else(|| format!("failed rule: {rule}"), String::from)
                    });
                own.or_else(|| map.values().find_map(|v| find(v, rule)))
            }
            Value::Array(items) => items.iter().find_map(|v| find(v, rule)),
            _ => None,
        }
    }
    find(schema, rule).unwrap_or_else(|| format!("failed rule: {rule}"))
}

/// The schema with `.namespace` in its rules written `.__namespace__`. kube-apiserver lets a
/// rule select a field named `namespace` directly (`self.metadata.namespace`) as well as
/// escaped; kube's CEL interpreter only knows the escaped name, so the rules are given to it
/// escaped (outside string literals).
fn namespace_escaped(schema: &Value) -> Value {
    fn escape(rule: &str) -> String {
        let mut out = String::with_capacity(rule.len());
        let mut quote: Option<char> = None;
        let mut rest = rule;
        while let Some(c) = rest.chars().next() {
            match quote {
                Some(_) if c == '\\' => {
                    let escaped: String = rest.chars().take(2).collect();
                    out.push_str(&escaped);
                    rest = &rest[escaped.len()..];
                    continue;
                }
                Some(q) if c == q => quote = None,
                None if c == '"' || c == '\'' => quote = Some(c),
                None if rest.starts_with(".namespace")
                    && !rest[".namespace".len()..]
                        .starts_with(|n: char| n.is_ascii_alphanumeric() || n == '_') =>
                {
                    out.push_str(".__namespace__");
                    rest = &rest[".namespace".len()..];
                    continue;
                }
                _ => {}
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }
    match schema {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = match (k.as_str(), v) {
                        ("rule" | "messageExpression", Value::String(rule)) => {
                            Value::String(escape(rule))
                        }
                        _ => namespace_escaped(v),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(namespace_escaped).collect()),
        other => other.clone(),
    }
}
