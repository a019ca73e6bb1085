//! Discovery documents, the OpenAPI documents kubectl reads, and server-side printing
//! (`Table`) with printer columns evaluated by a small JSONPath subset.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::store::ResourceType;

/// The version the emulator reports; kubectl compares it with its own.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-dpc-operator-emulator",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

fn verbs(rt: &ResourceType) -> Vec<&'static str> {
    vec![
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ]
    .into_iter()
    .filter(|v| !(rt.group.is_empty() && rt.plural == "namespaces" && *v == "deletecollection"))
    .collect()
}

/// `GET /api`.
pub fn core_versions(server: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]
    })
}

/// `GET /api/v1` or `GET /apis/{group}/{version}`.
pub fn resource_list(group_version: &str, types: &[Arc<ResourceType>]) -> Value {
    let mut resources = Vec::new();
    for rt in types {
        let mut entry = json!({
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": verbs(rt),
        });
        if !rt.short_names.is_empty() {
            entry["shortNames"] = json!(rt.short_names);
        }
        if !rt.categories.is_empty() {
            entry["categories"] = json!(rt.categories);
        }
        resources.push(entry);
        if rt.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

fn group_entry(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
}

/// Named groups and their versions, preferred version first.
pub fn groups(types: &[Arc<ResourceType>]) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rt in types.iter().filter(|rt| !rt.group.is_empty()) {
        let versions = groups.entry(rt.group.clone()).or_default();
        if !versions.contains(&rt.version) {
            versions.push(rt.version.clone());
        }
    }
    for versions in groups.values_mut() {
        versions.sort_by(|a, b| b.cmp(a));
    }
    groups
}

/// `GET /apis`.
pub fn group_list(types: &[Arc<ResourceType>]) -> Value {
    let groups: Vec<Value> = groups(types)
        .iter()
        .map(|(g, vs)| group_entry(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/{group}`.
pub fn group(types: &[Arc<ResourceType>], name: &str) -> Option<Value> {
    let groups = groups(types);
    let versions = groups.get(name)?;
    let mut entry = group_entry(name, versions);
    entry["kind"] = json!("APIGroup");
    entry["apiVersion"] = json!("v1");
    Some(entry)
}

fn gv_path(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        "api/v1".into()
    } else {
        format!("apis/{}/{}", rt.group, rt.version)
    }
}

fn schema_name(rt: &ResourceType) -> String {
    let group = if rt.group.is_empty() {
        "core".to_string()
    } else {
        rt.group.clone()
    };
    format!("{}.{}.{}", group, rt.version, rt.kind)
}

fn gvk(rt: &ResourceType) -> Value {
    json!([{"group": rt.group, "version": rt.version, "kind": rt.kind}])
}

fn write_parameters() -> Value {
    json!([
        {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
    ])
}

fn operations(rt: &ResourceType, item: bool) -> Value {
    let reference = json!({"$ref": format!("#/components/schemas/{}", schema_name(rt))});
    let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": reference}}}});
    let mut ops = json!({
        "get": {"operationId": format!("get{}", rt.kind), "responses": ok, "x-kubernetes-group-version-kind": gvk(rt)[0]},
    });
    if item {
        ops["put"] = json!({"operationId": format!("replace{}", rt.kind), "parameters": write_parameters(), "responses": ok, "x-kubernetes-group-version-kind": gvk(rt)[0]});
        ops["patch"] = json!({"operationId": format!("patch{}", rt.kind), "parameters": write_parameters(), "responses": ok, "x-kubernetes-group-version-kind": gvk(rt)[0]});
        ops["delete"] = json!({"operationId": format!("delete{}", rt.kind), "responses": ok, "x-kubernetes-group-version-kind": gvk(rt)[0]});
    } else {
        ops["post"] = json!({"operationId": format!("create{}", rt.kind), "parameters": write_parameters(), "responses": ok, "x-kubernetes-group-version-kind": gvk(rt)[0]});
    }
    ops
}

/// The schema published for a type: a CRD's own schema, or an open object for built-ins.
fn published_schema(rt: &ResourceType) -> Value {
    let mut schema = rt
        .schema
        .clone()
        .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props
            .entry("apiVersion")
            .or_insert(json!({"type": "string"}));
        props.entry("kind").or_insert(json!({"type": "string"}));
        props
            .entry("metadata")
            .or_insert(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    }
    schema["x-kubernetes-group-version-kind"] = gvk(rt);
    schema
}

/// `GET /openapi/v3`: the index of group-version documents.
pub fn openapi_v3_index(types: &[Arc<ResourceType>]) -> Value {
    let mut paths = serde_json::Map::new();
    for rt in types {
        let path = gv_path(rt);
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash=0")}),
        );
    }
    json!({"paths": paths})
}

/// `GET /openapi/v3/{gv path}`: paths with their write parameters, and schemas.
pub fn openapi_v3_document(types: &[Arc<ResourceType>], gv: &str) -> Option<Value> {
    let members: Vec<&Arc<ResourceType>> = types.iter().filter(|rt| gv_path(rt) == gv).collect();
    if members.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let mut schemas = serde_json::Map::new();
    for rt in members {
        let base = if rt.namespaced {
            format!("/{}/namespaces/{{namespace}}/{}", gv_path(rt), rt.plural)
        } else {
            format!("/{}/{}", gv_path(rt), rt.plural)
        };
        paths.insert(base.clone(), operations(rt, false));
        paths.insert(format!("{base}/{{name}}"), operations(rt, true));
        if rt.status_subresource {
            paths.insert(format!("{base}/{{name}}/status"), operations(rt, true));
        }
        schemas.insert(schema_name(rt), published_schema(rt));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas}
    }))
}

/// `GET /openapi/v2`: definitions of every type.
pub fn openapi_v2(types: &[Arc<ResourceType>]) -> Value {
    let mut definitions = serde_json::Map::new();
    for rt in types {
        definitions.insert(schema_name(rt), published_schema(rt));
    }
    json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": {}, "definitions": definitions})
}

/// A human age, in the style kubectl prints: `45s`, `3m12s`, `5h`, `2d`.
pub fn human_age(since: &str) -> String {
    let Ok(then) = since.parse::<Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = Timestamp::now().duration_since(then).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0]`, `.a[*].b` and
/// `.a[?(@.k=="v")].b`.
pub fn jsonpath(object: &Value, path: &str) -> Vec<Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut current = vec![object.clone()];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            rest = &r[end..];
            if field.is_empty() {
                continue;
            }
            current = current
                .iter()
                .filter_map(|v| v.get(field).cloned())
                .collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return Vec::new();
            };
            let selector = &r[..end];
            rest = &r[end + 1..];
            let items: Vec<Value> = current
                .iter()
                .filter_map(|v| v.as_array().cloned())
                .flatten()
                .collect();
            current = if selector == "*" {
                items
            } else if let Ok(index) = selector.parse::<usize>() {
                items.into_iter().nth(index).into_iter().collect()
            } else if let Some(filter) = selector
                .strip_prefix("?(@.")
                .and_then(|f| f.strip_suffix(')'))
            {
                let Some((field, value)) = filter.split_once("==") else {
                    return Vec::new();
                };
                let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
                items
                    .into_iter()
                    .filter(|item| item.get(field.trim()).and_then(Value::as_str) == Some(value))
                    .collect()
            } else {
                return Vec::new();
            };
        } else {
            return Vec::new();
        }
    }
    current
}

fn cell_text(values: &[Value], column_type: &str) -> Value {
    let Some(first) = values.first() else {
        return Value::String(String::new());
    };
    if column_type == "date" {
        return Value::String(first.as_str().map(human_age).unwrap_or_default());
    }
    let texts: Vec<String> = values
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect();
    match column_type {
        "integer" | "number" if values.len() == 1 => first.clone(),
        _ => Value::String(texts.join(",")),
    }
}

/// Printer columns of a type: a CRD's own, or the usual ones of the built-ins.
fn columns(rt: &ResourceType) -> Vec<(String, String, String, i64)> {
    let age = (
        "Age".to_string(),
        "date".to_string(),
        ".metadata.creationTimestamp".to_string(),
        0,
    );
    if rt.custom {
        let mut cols: Vec<(String, String, String, i64)> = rt
            .printer_columns
            .iter()
            .map(|c| {
                (
                    c.get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    c.get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("string")
                        .to_string(),
                    c.get("jsonPath")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                )
            })
            .collect();
        if cols.is_empty() {
            cols.push(age);
        }
        return cols;
    }
    let col = |n: &str, t: &str, p: &str| (n.to_string(), t.to_string(), p.to_string(), 0);
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => vec![col("Status", "string", ".status.phase"), age],
        ("", "secrets") => vec![
            col("Type", "string", ".type"),
            col("Data", "integer", "@datacount"),
            age,
        ],
        ("", "configmaps") => vec![col("Data", "integer", "@datacount"), age],
        ("coordination.k8s.io", "leases") => {
            vec![col("Holder", "string", ".spec.holderIdentity"), age]
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![col("Created At", "string", ".metadata.creationTimestamp")]
        }
        _ => vec![age],
    }
}

/// A `Table` of `items` for kubectl's server-side printing.
pub fn table(
    rt: &ResourceType,
    items: &[Value],
    include_object: &str,
    resource_version: u64,
    continue_token: Option<&str>,
) -> Value {
    let cols = columns(rt);
    let mut definitions = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    for (name, column_type, _, priority) in &cols {
        definitions.push(json!({"name": name, "type": column_type, "format": "", "description": "", "priority": priority}));
    }
    let rows: Vec<Value> = items
        .iter()
        .map(|item| {
            let mut cells = vec![
                item.pointer("/metadata/name")
                    .cloned()
                    .unwrap_or(Value::Null),
            ];
            for (_, column_type, path, _) in &cols {
                let cell = if path == "@datacount" {
                    let count = item
                        .get("data")
                        .and_then(Value::as_object)
                        .map(|d| d.len())
                        .unwrap_or(0)
                        + item
                            .get("binaryData")
                            .and_then(Value::as_object)
                            .map(|d| d.len())
                            .unwrap_or(0);
                    json!(count)
                } else {
                    cell_text(&jsonpath(item, path), column_type)
                };
                cells.push(cell);
            }
            let object = match include_object {
                "None" => Value::Null,
                "Object" => item.clone(),
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": item.get("metadata").cloned().unwrap_or(json!({}))
                }),
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": definitions,
        "rows": rows
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"status": {"conditions": [
            {"type": "Synced", "status": "False"},
            {"type": "Ready", "status": "True"}
        ]}, "spec": {"n": 3}});
        assert_eq!(
            jsonpath(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![json!("True")]
        );
        assert_eq!(
            jsonpath(&o, ".status.conditions[0].type"),
            vec![json!("Synced")]
        );
        assert_eq!(
            jsonpath(&o, ".status.conditions[*].type"),
            vec![json!("Synced"), json!("Ready")]
        );
        assert_eq!(jsonpath(&o, ".spec.n"), vec![json!(3)]);
        assert!(jsonpath(&o, ".spec.missing").is_empty());
        assert!(jsonpath(&o, ".status.conditions[?(@.type==\"Gone\")].status").is_empty());
    }

    #[test]
    fn ages_read_like_kubectl() {
        let ago = |s: i64| {
            (Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(s)).to_string()
        };
        assert_eq!(human_age(&ago(5)), "5s");
        assert_eq!(human_age(&ago(200)), "3m20s");
        assert_eq!(human_age(&ago(3 * 86400)), "3d0h");
        assert_eq!(human_age("not a time"), "<unknown>");
    }
}
