//! Field paths and values as the API server prints them in field errors.

use super::join;
use serde_json::Value;

/// Whether the value at `field` differs between `old` and `new`.
pub(super) fn changed(old: &Value, new: &Value, field: &str) -> bool {
    let field = if field == "<nil>" { "" } else { field };
    lookup(old, field) != lookup(new, field)
}

/// The value at a field path like `spec.items[0].name` (`""` is the object).
pub(super) fn lookup<'a>(object: &'a Value, field: &str) -> Option<&'a Value> {
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
pub(super) fn field_path(object: &Value, pointer: &str) -> String {
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

pub(super) fn type_name(value: &Value) -> &'static str {
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

pub(super) fn count(value: &Value) -> usize {
    match value {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    }
}

/// A bad value as the API server's field errors print it: strings quoted, numbers and
/// booleans bare, anything else as JSON.
pub(super) fn show(value: &Value) -> String {
    match value {
        Value::String(s) => quote(s),
        Value::Number(_) => go_number(value),
        other => serde_json::to_string(other).expect("JSON serializes"),
    }
}

/// A supported value of an enum: quoted, whatever its type (`"null"` for null).
pub(super) fn show_allowed(value: &Value) -> String {
    match value {
        Value::String(s) => quote(s),
        other => quote(&serde_json::to_string(other).expect("JSON serializes")),
    }
}

pub(super) fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// A number as Go's `%v` prints it: `1` for an integral float.
pub(super) fn go_number(value: &Value) -> String {
    match value.as_f64() {
        Some(f) if value.is_f64() && f.fract() == 0.0 && f.abs() < 1e21 => format!("{}", f as i64),
        _ => value.to_string(),
    }
}
