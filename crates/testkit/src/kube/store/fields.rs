//! Helpers over stored objects as JSON: metadata, bookkeeping fields, finalizers, conflicts.

use super::*;

pub(super) fn now_rfc3339() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub(super) fn new_uid() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    let h = hex::encode(bytes);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

pub(super) fn meta(object: &Value) -> Option<&Map<String, Value>> {
    object.get("metadata").and_then(Value::as_object)
}

pub(super) fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// Whether a write changes nothing but what the server keeps itself (`resourceVersion`, the
/// times in `managedFields`): such a write is a no-op, as on a real API server (a new owner
/// of a field is a change). Compared in place, since cloning both objects per write was most
/// of the emulator's time at 10,000 objects.
pub(super) fn same_but_bookkeeping(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    let empty = Map::new();
    fn meta_of(o: &Map<String, Value>) -> Option<&Map<String, Value>> {
        o.get("metadata").and_then(Value::as_object)
    }
    same_fields_except(a, b, &["metadata"])
        && same_fields_except(
            meta_of(a).unwrap_or(&empty),
            meta_of(b).unwrap_or(&empty),
            &["resourceVersion", "managedFields"],
        )
        && same_owners(
            meta_of(a).and_then(|m| m.get("managedFields")),
            meta_of(b).and_then(|m| m.get("managedFields")),
        )
}

/// Whether two `managedFields` name the same owners of the same fields.
fn same_owners(a: Option<&Value>, b: Option<&Value>) -> bool {
    let entries = |v: Option<&Value>| v.and_then(Value::as_array).map_or(0, Vec::len);
    if entries(a) != entries(b) {
        return false;
    }
    let (Some(a), Some(b)) = (a.and_then(Value::as_array), b.and_then(Value::as_array)) else {
        return true;
    };
    a.iter().zip(b).all(|(x, y)| {
        let (Some(x), Some(y)) = (x.as_object(), y.as_object()) else {
            return x == y;
        };
        same_fields_except(x, y, &["time"])
    })
}

/// Whether two maps hold the same fields, leaving out `skipped`.
pub(super) fn same_fields_except(
    a: &Map<String, Value>,
    b: &Map<String, Value>,
    skipped: &[&str],
) -> bool {
    let kept = |m: &Map<String, Value>| m.keys().filter(|k| !skipped.contains(&k.as_str())).count();
    kept(a) == kept(b)
        && a.iter()
            .filter(|(k, _)| !skipped.contains(&k.as_str()))
            .all(|(k, v)| b.get(k) == Some(v))
}

pub(super) fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    meta(object)?.get(field)?.as_str()
}

pub(super) fn finalizers(object: &Value) -> Vec<String> {
    meta(object)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Everything but metadata and status: what moves `generation`.
pub(super) fn spec_part(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
    }
    copy
}

/// Drops strategic-merge directives (`$patch`, `$setElementOrder/…`, `$retainKeys`).
pub(super) fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

pub(super) fn items_last_key(items: &[Value]) -> Option<(String, String)> {
    let last = items.last()?;
    Some((
        meta_str(last, "namespace").unwrap_or("").to_string(),
        meta_str(last, "name").unwrap_or("").to_string(),
    ))
}

pub(super) fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    let what = if rt.group.is_empty() {
        rt.plural.clone()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    };
    ApiError::new(
        409,
        "Conflict",
        format!("Operation cannot be fulfilled on {what} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
    )
    .with_details(rt, name)
}

/// Secrets: `stringData` is folded into `data` (base64) and `type` defaults to Opaque.
pub(super) fn normalize_secret(rt: &ResourceType, object: &mut Value) {
    if !(rt.group.is_empty() && rt.plural == "secrets") {
        return;
    }
    use base64::Engine as _;
    let string_data = object.as_object_mut().and_then(|o| o.remove("stringData"));
    if let Some(Value::Object(string_data)) = string_data {
        if !object.get("data").is_some_and(Value::is_object) {
            object["data"] = json!({});
        }
        let data = object["data"].as_object_mut().expect("just made an object");
        for (k, v) in string_data {
            let text = v.as_str().unwrap_or_default();
            data.insert(
                k,
                Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
    if object.get("type").is_none_or(|t| t.is_null() || t == "") {
        object["type"] = Value::String("Opaque".into());
    }
}
