//! Wire types of the environment connection override endpoints, and tolerant parsing of
//! the shapes the API facts leave open (see `docs/dpc-api.md` §3.3, §5).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The body of a create (`POST`) or update (`PUT`) of an override. It may carry values read
/// from Kubernetes Secrets, so `Debug` does not print the properties.
#[derive(Serialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OverrideRequest {
    pub environment_name: String,
    pub connection_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<String>,
    pub connection_overrides: OverrideValues,
}

/// `connectionOverrides` of a request.
#[derive(Serialize, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OverrideValues {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secrets_location: Option<Value>,
    pub connection_properties: BTreeMap<String, String>,
}

impl fmt::Debug for OverrideRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverrideRequest")
            .field("environment_name", &self.environment_name)
            .field("connection_name", &self.connection_name)
            .field("auth_type", &self.auth_type)
            .field(
                "properties",
                &self
                    .connection_overrides
                    .connection_properties
                    .keys()
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl OverrideRequest {
    /// The body in canonical form: compact JSON with object keys sorted at every level, so the
    /// same desired state always gives the same bytes (and hash), whatever the map order.
    pub fn canonical_json(&self) -> String {
        let value = serde_json::to_value(self).expect("an override request serializes");
        canonical_json(&value)
    }

    /// `sha256:<hex>` of the canonical body: what `status.appliedHash` records.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.canonical_json().as_bytes());
        format!("sha256:{}", hex::encode(digest))
    }
}

/// Serializes `value` with object keys sorted at every level.
pub fn canonical_json(value: &Value) -> String {
    fn sorted(value: &Value) -> Value {
        match value {
            Value::Object(map) => {
                let ordered: BTreeMap<&String, Value> =
                    map.iter().map(|(k, v)| (k, sorted(v))).collect();
                let mut out = serde_json::Map::new();
                for (k, v) in ordered {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sorted(value)).expect("a JSON value serializes")
}

/// An override as DPC returns it. Every field is optional: the documented examples differ
/// between pages, and the response may be empty (204) or not echo every field.
#[derive(Deserialize, Clone, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RemoteOverride {
    /// The connection name (DPC calls it `name`; some shapes may say `connectionName`).
    #[serde(default, alias = "connectionName")]
    pub name: Option<String>,
    #[serde(default)]
    pub environment_name: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub platform_connection_type: Option<String>,
    #[serde(default)]
    pub auth_provider: Option<String>,
    #[serde(default)]
    pub auth_type: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub created_date: Option<String>,
    /// The override values as DPC holds them.
    #[serde(default)]
    pub connection_overrides: Option<Value>,
}

impl RemoteOverride {
    /// The remote fields DPC reported, as status shows them.
    pub fn status(&self) -> crate::api::RemoteStatus {
        crate::api::RemoteStatus {
            platform_connection_type: self.platform_connection_type.clone(),
            auth_provider: self.auth_provider.clone(),
            auth_type: self.auth_type.clone(),
            created_by: self.created_by.clone(),
            created_date: self.created_date.clone(),
        }
    }
}

impl fmt::Debug for RemoteOverride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteOverride")
            .field("name", &self.name)
            .field("environment_name", &self.environment_name)
            .field("auth_type", &self.auth_type)
            .field("created_date", &self.created_date)
            .finish_non_exhaustive()
    }
}

/// An RFC 7807 problem-details body, with Matillion's `violations` extension.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
pub struct Problem {
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default)]
    pub violations: Vec<Value>,
    /// OAuth2 token endpoints answer `{error, error_description}` instead.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub error_description: Option<String>,
}

impl Problem {
    /// Parses a problem body whatever its media type; `None` when the body is not a JSON
    /// object carrying at least one known field.
    pub fn parse(body: &[u8]) -> Option<Problem> {
        let problem: Problem = serde_json::from_slice(body).ok()?;
        let known = problem.title.is_some()
            || problem.detail.is_some()
            || !problem.violations.is_empty()
            || problem.error.is_some()
            || problem.type_.is_some();
        known.then_some(problem)
    }

    /// Every text of the problem passed through `clean` (the violations' strings, and the
    /// keys of their objects, included).
    pub fn map_texts(&mut self, clean: impl Fn(&str) -> String) {
        fn value(v: &mut Value, clean: &dyn Fn(&str) -> String) {
            match v {
                Value::String(text) => *text = clean(text),
                Value::Array(items) => items.iter_mut().for_each(|i| value(i, clean)),
                Value::Object(map) => {
                    let entries = std::mem::take(map);
                    for (k, mut v) in entries {
                        value(&mut v, clean);
                        map.insert(clean(&k), v);
                    }
                }
                _ => {}
            }
        }
        for text in [
            &mut self.type_,
            &mut self.title,
            &mut self.detail,
            &mut self.instance,
            &mut self.error,
            &mut self.error_description,
        ]
        .into_iter()
        .flatten()
        {
            *text = clean(text);
        }
        for v in &mut self.violations {
            value(v, &clean);
        }
    }

    /// One line for a condition message: `title: detail (violations: a; b)`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(title) = self.title.as_deref().or(self.error.as_deref()) {
            parts.push(title.to_string());
        }
        if let Some(detail) = self.detail.as_deref().or(self.error_description.as_deref()) {
            parts.push(detail.to_string());
        }
        let mut line = parts.join(": ");
        if !self.violations.is_empty() {
            let violations: Vec<String> = self
                .violations
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect();
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&format!("(violations: {})", violations.join("; ")));
        }
        line
    }
}

/// An environment of a project, as `GET /v1/projects/{projectId}/environments` lists it
/// (`docs/dpc-api.md` §7.2); only the name is used.
#[derive(Deserialize, Clone, Debug, PartialEq, Default)]
pub struct RemoteEnvironment {
    #[serde(default)]
    pub name: Option<String>,
}

/// One page of a list answer, whatever shape DPC used.
#[derive(Debug, PartialEq)]
pub struct ListPage<T = RemoteOverride> {
    pub items: Vec<T>,
    /// Present when the answer was a `{page, size, total, results}` envelope.
    pub page: Option<u64>,
    pub size: Option<u64>,
    pub total: Option<u64>,
}

impl<T> Default for ListPage<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            page: None,
            size: None,
            total: None,
        }
    }
}

impl<T> ListPage<T> {
    /// Whether the envelope says more pages follow this one.
    pub fn has_more(&self) -> bool {
        match (self.page, self.size, self.total) {
            (Some(page), Some(size), Some(total)) if size > 0 => {
                !self.items.is_empty() && (page + 1) * size < total
            }
            _ => false,
        }
    }
}

/// Parses a list answer: a bare array, an envelope with `results`, a single object, or an
/// empty body all work.
pub fn parse_list(body: &[u8]) -> Result<ListPage, String> {
    parse_page(body)
}

/// [`parse_list`] for any item type.
pub fn parse_page<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<ListPage<T>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ListPage::default());
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("list answer is not JSON: {e}"))?;
    let items_of = |v: Value| -> Result<Vec<T>, String> {
        serde_json::from_value(v).map_err(|e| format!("list item has an unexpected shape: {e}"))
    };
    match value {
        Value::Null => Ok(ListPage::default()),
        Value::Array(_) => Ok(ListPage {
            items: items_of(value)?,
            ..ListPage::default()
        }),
        Value::Object(mut map) if map.contains_key("results") => {
            let number = |v: Option<&Value>| v.and_then(Value::as_u64);
            let page = number(map.get("page"));
            let size = number(map.get("size"));
            let total = number(map.get("total"));
            let results = map.remove("results").unwrap_or(Value::Null);
            let items = match results {
                Value::Null => Vec::new(),
                Value::Array(_) => items_of(results)?,
                _ => return Err("list envelope's results is not an array".into()),
            };
            Ok(ListPage {
                items,
                page,
                size,
                total,
            })
        }
        Value::Object(map) if map.is_empty() => Ok(ListPage::default()),
        Value::Object(_) => {
            let item: T = serde_json::from_value(value)
                .map_err(|e| format!("list answer has an unexpected shape: {e}"))?;
            Ok(ListPage {
                items: vec![item],
                ..ListPage::default()
            })
        }
        _ => Err("list answer is neither an array nor an object".into()),
    }
}

/// Parses the answer to a create or update: `None` for an empty body (204) or a body that is
/// not an override object (the write itself succeeded either way).
pub fn parse_write_answer(body: &[u8]) -> Option<RemoteOverride> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    match serde_json::from_slice::<Value>(body).ok()? {
        value @ Value::Object(_) => serde_json::from_value(value).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request() -> OverrideRequest {
        OverrideRequest {
            environment_name: "PROD".into(),
            connection_name: "Salesforce".into(),
            auth_type: Some("OAUTH_CLIENT_CRED".into()),
            connection_overrides: OverrideValues {
                secrets_location: Some(
                    json!({"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}),
                ),
                connection_properties: [("secretName".to_string(), "prod/sf".to_string())].into(),
            },
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let a = json!({"b": 1, "a": {"z": [ {"y": 1, "x": 2} ], "c": null}});
        assert_eq!(
            canonical_json(&a),
            r#"{"a":{"c":null,"z":[{"x":2,"y":1}]},"b":1}"#
        );
    }

    #[test]
    fn request_body_has_the_documented_shape() {
        let body: Value = serde_json::from_str(&request().canonical_json()).unwrap();
        assert_eq!(
            body,
            json!({
                "environmentName": "PROD",
                "connectionName": "Salesforce",
                "authType": "OAUTH_CLIENT_CRED",
                "connectionOverrides": {
                    "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
                    "connectionProperties": {"secretName": "prod/sf"}
                }
            })
        );
    }

    #[test]
    fn hash_is_stable_and_follows_content() {
        let a = request();
        let mut b = request();
        assert_eq!(a.hash(), b.hash());
        assert!(a.hash().starts_with("sha256:"));
        assert_eq!(a.hash().len(), "sha256:".len() + 64);
        b.connection_overrides
            .connection_properties
            .insert("secretKey".into(), "k".into());
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn request_debug_hides_property_values() {
        let text = format!("{:?}", request());
        assert!(text.contains("secretName"));
        assert!(!text.contains("prod/sf"));
    }

    #[test]
    fn list_accepts_every_documented_shape() {
        let item = json!({"name": "A", "authType": "GENERIC_SECRET"});
        let bare = parse_list(json!([item, {"name": "B"}]).to_string().as_bytes()).unwrap();
        assert_eq!(bare.items.len(), 2);
        assert_eq!(bare.items[1].name.as_deref(), Some("B"));

        let envelope = json!({"page": 0, "size": 2, "total": 3, "results": [item, item]});
        let page = parse_list(envelope.to_string().as_bytes()).unwrap();
        assert_eq!(page.items.len(), 2);
        assert!(page.has_more());

        let single = parse_list(item.to_string().as_bytes()).unwrap();
        assert_eq!(single.items.len(), 1);
        assert_eq!(single.items[0].auth_type.as_deref(), Some("GENERIC_SECRET"));

        assert!(parse_list(b"").unwrap().items.is_empty());
        assert!(parse_list(b"{}").unwrap().items.is_empty());
        assert!(parse_list(b"null").unwrap().items.is_empty());
        assert!(parse_list(b"{\"results\": null}").unwrap().items.is_empty());
        assert!(parse_list(b"<html>").is_err());
        assert!(parse_list(b"42").is_err());
    }

    #[test]
    fn last_page_of_an_envelope_has_no_more() {
        let page = parse_list(br#"{"page": 1, "size": 2, "total": 3, "results": [{"name": "C"}]}"#)
            .unwrap();
        assert!(!page.has_more());
    }

    #[test]
    fn problem_summary_carries_title_detail_and_violations() {
        let body = br#"{"type":"about:blank","title":"Bad Request","status":400,"detail":"Invalid override","violations":["secretName must not be blank","region unknown"]}"#;
        let problem = Problem::parse(body).unwrap();
        assert_eq!(
            problem.summary(),
            "Bad Request: Invalid override (violations: secretName must not be blank; region unknown)"
        );
        let oauth =
            Problem::parse(br#"{"error":"invalid_client","error_description":"Bad credentials"}"#)
                .unwrap();
        assert_eq!(oauth.summary(), "invalid_client: Bad credentials");
        assert!(Problem::parse(b"not json").is_none());
        assert!(Problem::parse(b"{\"unrelated\": 1}").is_none());
    }

    #[test]
    fn write_answer_tolerates_empty_and_malformed_bodies() {
        assert!(parse_write_answer(b"").is_none());
        assert!(parse_write_answer(b"{not json").is_none());
        assert!(parse_write_answer(b"[1,2]").is_none());
        let remote = parse_write_answer(br#"{"name":"A","createdBy":"u1"}"#).unwrap();
        assert_eq!(remote.created_by.as_deref(), Some("u1"));
    }
}
