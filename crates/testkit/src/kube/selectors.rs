//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!` not-exists) and field
//! selectors (`metadata.name`, `metadata.namespace` with `=`, `==`, `!=`).

use serde_json::Value;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set, found {rest:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the `labelSelector` query syntax.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            // A value may not hold an operator: `a===b` is `a == "=b"`, which the server
            // refuses as it reads it.
            let value_of = |v: &str| -> Result<String, String> {
                match v.trim().chars().find(|c| "=!".contains(*c)) {
                    Some(c) => Err(format!(
                        "unable to parse requirement: found '{c}', expected: identifier"
                    )),
                    None => Ok(v.trim().to_string()),
                }
            };
            let requirement = if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().into(), value_of(value)?)
            } else if let Some((key, value)) = part.split_once("==") {
                Requirement::Equals(key.trim().into(), value_of(value)?)
            } else if let Some((key, value)) = part.split_once('=') {
                Requirement::Equals(key.trim().into(), value_of(value)?)
            } else if let Some(idx) = part.find(" notin ") {
                Requirement::NotIn(part[..idx].trim().into(), parse_set(&part[idx + 7..])?)
            } else if let Some(idx) = part.find(" in ") {
                Requirement::In(part[..idx].trim().into(), parse_set(&part[idx + 4..])?)
            } else if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(key.trim().into())
            } else if part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
            {
                Requirement::Exists(part.into())
            } else {
                return Err(format!("unable to parse requirement: {part:?}"));
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    /// Whether an object's labels satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object);
        let get = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, set) => get(k).is_some_and(|v| set.iter().any(|s| s == v)),
            Requirement::NotIn(k, set) => get(k).is_none_or(|v| !set.iter().any(|s| s == v)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector. The API server accepts only the fields a type indexes
/// (`metadata.name`, `metadata.namespace`, and for Events `involvedObject.*`, `reason`,
/// `type`, …); the emulator accepts any dotted path of string, number or boolean values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses the `fieldSelector` query syntax.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector term {part:?}"));
            };
            let field = field.trim();
            if field.is_empty() || field.split('.').any(str::is_empty) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(terms))
    }

    /// Refuses fields the API server does not index for the type `(group, plural)`, with its
    /// message: every type has `metadata.name` and `metadata.namespace`; Secrets, Namespaces
    /// and Events add their own; custom resources add nothing (no selectableFields here).
    pub fn supported_by(&self, group: &str, plural: &str) -> Result<(), String> {
        const EVENT: &[&str] = &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ];
        let extra: &[&str] = match (group, plural) {
            ("", "secrets") => &["type"],
            ("", "namespaces") => &["status.phase"],
            ("" | "events.k8s.io", "events") => EVENT,
            _ => &[],
        };
        for (field, _, _) in &self.0 {
            if !matches!(field.as_str(), "metadata.name" | "metadata.namespace")
                && !extra.contains(&field.as_str())
            {
                return Err(format!("field label not supported: {field}"));
            }
        }
        Ok(())
    }

    /// Whether the object satisfies every term.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let pointer = format!("/{}", field.replace('.', "/"));
            let actual = match object.pointer(&pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => String::new(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns1", "labels": labels}})
    }

    #[test]
    fn label_selector_operators() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(ok(""));
        assert!(ok("app=web"));
        assert!(ok("app==web,tier=front"));
        assert!(!ok("app=db"));
        assert!(ok("app!=db"));
        assert!(ok("app in (web, db)"));
        assert!(!ok("app notin (web,db)"));
        assert!(ok("tier notin (back)"));
        assert!(ok("app"));
        assert!(!ok("missing"));
        assert!(ok("!missing"));
        assert!(!ok("!app"));
        assert!(ok("app in (web),!missing,tier"));
        assert!(LabelSelector::parse("app in web").is_err());
        assert_eq!(
            LabelSelector::parse("app===web").unwrap_err(),
            "unable to parse requirement: found '=', expected: identifier"
        );
    }

    #[test]
    fn field_selector_on_name_and_namespace() {
        let o = obj(json!({}));
        let ok = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(ok("metadata.name=a"));
        assert!(ok("metadata.name==a,metadata.namespace=ns1"));
        assert!(!ok("metadata.name=b"));
        assert!(ok("metadata.namespace!=other"));
        assert!(FieldSelector::parse("spec..x=1").is_err());
        let event = json!({"involvedObject": {"name": "a", "uid": "u1"}, "count": 2});
        assert!(
            FieldSelector::parse("involvedObject.name=a,involvedObject.uid=u1")
                .unwrap()
                .matches(&event)
        );
        assert!(FieldSelector::parse("count=2").unwrap().matches(&event));
        let spec = FieldSelector::parse("spec.x=1").unwrap();
        assert_eq!(
            spec.supported_by("dpc-operator.io", "connectionoverrides"),
            Err("field label not supported: spec.x".into())
        );
        let secret_type = FieldSelector::parse("type=Opaque").unwrap();
        assert!(secret_type.supported_by("", "secrets").is_ok());
    }
}
