//! Server-side apply, simplified: field ownership per manager recorded in `managedFields`
//! (FieldsV1), merge of maps and of list-maps keyed as the schema's
//! `x-kubernetes-list-map-keys` say (other lists are atomic), and removal of fields a manager
//! applied before and no longer applies, unless another manager owns them. An apply that
//! changes a field another manager owns is a conflict unless forced (the store raises it).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Seg {
    /// A field of an object: `f:name`.
    F(String),
    /// An item of a list-map, by its keys (canonical JSON): `k:{"type":"Ready"}`.
    K(String),
}

/// A path to a field.
pub type Path = Vec<Seg>;
/// The fields a manager owns: leaf paths, plus the paths of list-map items it set.
pub type FieldSet = BTreeSet<Path>;

/// Fields never tracked (identity and server-owned metadata).
fn ignored_top(path: &[Seg]) -> bool {
    match path {
        [Seg::F(f)] if f == "apiVersion" || f == "kind" => true,
        [Seg::F(m), Seg::F(f)] if m == "metadata" => matches!(
            f.as_str(),
            "name"
                | "namespace"
                | "uid"
                | "resourceVersion"
                | "generation"
                | "creationTimestamp"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
                | "managedFields"
                | "selfLink"
        ),
        _ => false,
    }
}

/// The sub-schema of a field, or of list items.
fn child_schema<'a>(schema: Option<&'a Value>, field: &str) -> Option<&'a Value> {
    let schema = schema?;
    schema
        .get("properties")
        .and_then(|p| p.get(field))
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

fn item_schema(schema: Option<&Value>) -> Option<&Value> {
    schema?.get("items")
}

fn list_map_keys(schema: Option<&Value>) -> Option<Vec<String>> {
    let schema = schema?;
    if schema.get("x-kubernetes-list-type").and_then(Value::as_str) != Some("map") {
        return None;
    }
    let keys: Vec<String> = schema
        .get("x-kubernetes-list-map-keys")?
        .as_array()?
        .iter()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    (!keys.is_empty()).then_some(keys)
}

fn key_of(item: &Value, keys: &[String]) -> Option<String> {
    let mut map = BTreeMap::new();
    for key in keys {
        map.insert(key.clone(), item.get(key)?.clone());
    }
    Some(serde_json::to_string(&map).expect("a key map serializes"))
}

/// The field set of an object (or apply configuration).
pub fn fields_of(value: &Value, schema: Option<&Value>) -> FieldSet {
    owned_by(value, schema, false)
}

/// The field set of `value`; with `objects`, the objects holding fields are members too
/// (FieldsV1's `.`), as an update that creates them owns them.
fn owned_by(value: &Value, schema: Option<&Value>, objects: bool) -> FieldSet {
    let mut set = FieldSet::new();
    collect(value, schema, objects, &mut Vec::new(), &mut set);
    set.retain(|p| !ignored_top(p) && !p.is_empty());
    // metadata itself is only a container.
    set
}

fn collect(
    value: &Value,
    schema: Option<&Value>,
    objects: bool,
    path: &mut Path,
    out: &mut FieldSet,
) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            if objects && !path.is_empty() && path.as_slice() != [Seg::F("metadata".into())] {
                out.insert(path.clone());
            }
            for (k, v) in map {
                path.push(Seg::F(k.clone()));
                if !ignored_top(path) {
                    collect(v, child_schema(schema, k), objects, path, out);
                }
                path.pop();
            }
        }
        Value::Array(items) => match list_map_keys(schema) {
            Some(keys) if !items.is_empty() => {
                for item in items {
                    match key_of(item, &keys) {
                        Some(key) => {
                            path.push(Seg::K(key));
                            out.insert(path.clone());
                            collect(item, item_schema(schema), objects, path, out);
                            path.pop();
                        }
                        None => {
                            out.insert(path.clone());
                        }
                    }
                }
            }
            _ => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at a path.
pub fn value_at<'a>(value: &'a Value, path: &[Seg], schema: Option<&Value>) -> Option<&'a Value> {
    let mut current = value;
    let mut schema = schema;
    for seg in path {
        match seg {
            Seg::F(field) => {
                current = current.get(field)?;
                schema = child_schema(schema, field);
            }
            Seg::K(key) => {
                let keys = list_map_keys(schema)?;
                current = current
                    .as_array()?
                    .iter()
                    .find(|item| key_of(item, &keys).as_deref() == Some(key.as_str()))?;
                schema = item_schema(schema);
            }
        }
    }
    Some(current)
}

/// Removes the field (or list-map item) at `path`, if present.
pub fn remove_at(value: &mut Value, path: &[Seg], schema: Option<&Value>) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut current = value;
    let mut schema = schema;
    for seg in parents {
        match seg {
            Seg::F(field) => {
                let Some(next) = current.get_mut(field) else {
                    return;
                };
                current = next;
                schema = child_schema(schema, field);
            }
            Seg::K(key) => {
                let Some(keys) = list_map_keys(schema) else {
                    return;
                };
                let Some(items) = current.as_array_mut() else {
                    return;
                };
                let Some(next) = items
                    .iter_mut()
                    .find(|item| key_of(item, &keys).as_deref() == Some(key.as_str()))
                else {
                    return;
                };
                current = next;
                schema = item_schema(schema);
            }
        }
    }
    match last {
        Seg::F(field) => {
            if let Some(map) = current.as_object_mut() {
                map.remove(field);
            }
        }
        Seg::K(key) => {
            if let (Some(keys), Some(items)) = (list_map_keys(schema), current.as_array_mut()) {
                items.retain(|item| key_of(item, &keys).as_deref() != Some(key.as_str()));
            }
        }
    }
}

/// Merges an apply configuration into `current`: objects field by field, list-maps item by
/// item (by key), anything else replaced.
pub fn merge(current: &mut Value, applied: &Value, schema: Option<&Value>) {
    if let (Some(cur), Value::Object(app)) = (current.as_object_mut(), applied) {
        for (k, v) in app {
            let sub = child_schema(schema, k);
            match cur.get_mut(k) {
                Some(existing) if !existing.is_null() => merge(existing, v, sub),
                _ => {
                    cur.insert(k.clone(), v.clone());
                }
            }
        }
        return;
    }
    if let (Some(keys), Some(cur_items), Value::Array(app_items)) =
        (list_map_keys(schema), current.as_array_mut(), applied)
    {
        let sub = item_schema(schema);
        for item in app_items {
            let key = key_of(item, &keys);
            match cur_items
                .iter_mut()
                .find(|c| key.is_some() && key_of(c, &keys) == key)
            {
                Some(existing) => merge(existing, item, sub),
                None => cur_items.push(item.clone()),
            }
        }
        return;
    }
    *current = applied.clone();
}

/// A path as the API server prints it in conflicts: `.spec.name`,
/// `.status.conditions[type="Ready"]`.
pub fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::F(f) => {
                out.push('.');
                out.push_str(f);
            }
            Seg::K(k) => {
                let keys: BTreeMap<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = keys.iter().map(|(n, v)| format!("{n}={v}")).collect();
                out.push_str(&format!("[{}]", parts.join(",")));
            }
        }
    }
    out
}

/// Whether `set` holds paths strictly under `path` (then `path` is an object, not a leaf):
/// the smallest path after it in the set's order extends it, if any does.
pub fn has_members(set: &FieldSet, path: &Path) -> bool {
    set.range(path.clone()..)
        .find(|p| *p != path)
        .is_some_and(|next| next.starts_with(path))
}

/// The order the API server lists paths in: at each level, fields before the objects
/// holding more fields, each by name.
pub fn server_order(a: &Path, b: &Path) -> std::cmp::Ordering {
    for i in 0..a.len().min(b.len()) {
        let (a_leaf, b_leaf) = (i + 1 == a.len(), i + 1 == b.len());
        if a[i] != b[i] || a_leaf != b_leaf {
            if a_leaf != b_leaf {
                return if a_leaf {
                    std::cmp::Ordering::Less
                } else {
                    std::cmp::Ordering::Greater
                };
            }
            return a[i].cmp(&b[i]);
        }
    }
    a.len().cmp(&b.len())
}

/// Renders a field set as FieldsV1 JSON.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for (i, seg) in path.iter().enumerate() {
            let name = match seg {
                Seg::F(f) => format!("f:{f}"),
                Seg::K(k) => format!("k:{k}"),
            };
            let entry = node
                .entry(name)
                .or_insert_with(|| Value::Object(Map::new()));
            let map = entry.as_object_mut().expect("field set nodes are objects");
            if i + 1 == path.len() && (matches!(seg, Seg::K(_)) || has_members(set, path)) {
                map.insert(".".into(), Value::Object(Map::new()));
            }
            node = map;
        }
    }
    Value::Object(root)
}

/// Reads FieldsV1 JSON back into a field set.
pub fn from_fields_v1(value: &Value) -> FieldSet {
    fn walk(node: &Map<String, Value>, path: &mut Path, out: &mut FieldSet) {
        for (name, child) in node {
            if name == "." {
                out.insert(path.clone());
                continue;
            }
            let seg = if let Some(f) = name.strip_prefix("f:") {
                Seg::F(f.into())
            } else if let Some(k) = name.strip_prefix("k:") {
                Seg::K(k.into())
            } else {
                continue;
            };
            path.push(seg);
            match child.as_object() {
                Some(map) if !map.is_empty() => walk(map, path, out),
                _ => {
                    out.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    if let Some(map) = value.as_object() {
        walk(map, &mut Vec::new(), &mut out);
    }
    out
}

/// The leaf paths whose values differ between `old` and `new` (added or changed), for
/// recording what an update operation took ownership of.
pub fn changed_fields(old: &Value, new: &Value, schema: Option<&Value>) -> FieldSet {
    owned_by(new, schema, true)
        .into_iter()
        .filter(|p| {
            let (before, after) = (value_at(old, p, schema), value_at(new, p, schema));
            // An object is taken over only by creating it, not by changing what it holds.
            match after {
                Some(Value::Object(_)) => before.is_none(),
                _ => before != after,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"properties": {"status": {"properties": {"conditions": {
            "type": "array",
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": {"type": "object"}
        }}}}})
    }

    #[test]
    fn list_maps_merge_by_key_and_other_lists_are_replaced() {
        let s = schema();
        let mut current = json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "Other", "status": "True"}
        ], "tags": ["a"]}});
        let applied =
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}], "tags": ["b"]}});
        merge(&mut current, &applied, Some(&s));
        assert_eq!(
            current,
            json!({"status": {"conditions": [
                {"type": "Ready", "status": "True"}, {"type": "Other", "status": "True"}
            ], "tags": ["b"]}})
        );
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let s = schema();
        let applied = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n", "labels": {"a": "1"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "hash": "h"}});
        let set = fields_of(&applied, Some(&s));
        let v1 = to_fields_v1(&set);
        assert_eq!(
            v1,
            json!({
                "f:metadata": {"f:labels": {"f:a": {}}},
                "f:status": {
                    "f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}, "f:type": {}}},
                    "f:hash": {}
                }
            })
        );
        assert_eq!(from_fields_v1(&v1), set);
    }

    #[test]
    fn removing_a_list_map_item_and_a_field() {
        let s = schema();
        let mut v =
            json!({"status": {"conditions": [{"type": "Ready"}, {"type": "Synced"}], "hash": "h"}});
        remove_at(
            &mut v,
            &[
                Seg::F("status".into()),
                Seg::F("conditions".into()),
                Seg::K("{\"type\":\"Synced\"}".into()),
            ],
            Some(&s),
        );
        remove_at(
            &mut v,
            &[Seg::F("status".into()), Seg::F("hash".into())],
            Some(&s),
        );
        assert_eq!(v, json!({"status": {"conditions": [{"type": "Ready"}]}}));
    }

    #[test]
    fn changed_fields_are_the_added_and_modified_leaves() {
        let old = json!({"spec": {"a": 1, "b": 2}});
        let new = json!({"spec": {"a": 1, "b": 3, "c": 4}});
        let changed = changed_fields(&old, &new, None);
        let expected: FieldSet = [
            vec![Seg::F("spec".into()), Seg::F("b".into())],
            vec![Seg::F("spec".into()), Seg::F("c".into())],
        ]
        .into_iter()
        .collect();
        assert_eq!(changed, expected);
    }
}
