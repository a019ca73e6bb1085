//! The comparison of what an object wants DPC to hold with what DPC holds, both kept as field
//! names and digests of their values (never the values: tens of thousands of objects, and
//! some values come from Secrets).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde_json::Value;

use crate::api::RemoteStatus;
use crate::dpc::{OverrideRequest, RemoteOverride};
use crate::intern::{Shared, shared};

/// What a comparison found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    InSync,
    /// The override exists with these fields different from the desired state.
    Differs(Vec<String>),
    /// There is no override for the connection in DPC.
    Missing,
}

impl Finding {
    pub fn is_drift(&self) -> bool {
        !matches!(self, Finding::InSync)
    }

    /// A sentence for a condition or Event; names fields, never values.
    pub fn describe(&self) -> String {
        match self {
            Finding::InSync => "DPC holds the desired override".into(),
            Finding::Differs(fields) => format!(
                "the override in DPC differs from the spec in {}",
                fields.join(", ")
            ),
            Finding::Missing => "the override does not exist in DPC".into(),
        }
    }
}

fn digest<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn json_digest(value: &Value) -> u64 {
    digest(&crate::dpc::types::canonical_json(value))
}

/// The fields of `connectionOverrides` a ConnectionOverride can describe; DPC holding any
/// other is a difference no write of the spec would keep.
const DESCRIBED: [&str; 2] = ["connectionProperties", "secretsLocation"];

/// What an object wants DPC to hold, as field names and hashes of their values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    auth_type: Option<u64>,
    /// Every property, by name (sorted).
    properties: Box<[(Shared, u64)]>,
    /// The `secretsLocation` fields the spec sets.
    location: Box<[(Shared, u64)]>,
}

impl Expected {
    pub fn of(request: &OverrideRequest) -> Self {
        let properties = request
            .connection_overrides
            .connection_properties
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().into(),
                    digest(&Value::String(v.clone()).to_string()),
                )
            })
            .collect();
        let location = match &request.connection_overrides.secrets_location {
            Some(Value::Object(map)) => {
                let mut fields: Vec<(Shared, u64)> = map
                    .iter()
                    .map(|(k, v)| (shared(k), json_digest(v)))
                    .collect();
                fields.sort();
                fields.into_boxed_slice()
            }
            _ => Vec::new().into_boxed_slice(),
        };
        Self {
            auth_type: request.auth_type.as_deref().map(digest),
            properties,
            location,
        }
    }
}

/// An override as the last list answer showed it: the same form as [`Expected`], plus what
/// status reports about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    auth_type: Option<u64>,
    properties: Box<[(Shared, u64)]>,
    /// Every `secretsLocation` field DPC holds (sorted): a slice, not a map, since one is
    /// kept per override of a listed environment.
    location: Box<[(Shared, u64)]>,
    /// Fields of `connectionOverrides` beyond those a spec can describe (sorted).
    undescribed: Box<[Shared]>,
    /// What DPC reported, for status.
    status: HeldStatus,
}

/// What DPC reported of an override, for its object's status: the type, provider and
/// author shared (few distinct values across thousands of overrides), the date its own.
#[derive(Clone, Debug, PartialEq)]
struct HeldStatus {
    platform_connection_type: Option<Shared>,
    auth_provider: Option<Shared>,
    auth_type: Option<Shared>,
    created_by: Option<Shared>,
    created_date: Option<Box<str>>,
}

impl HeldStatus {
    fn of(remote: &RemoteOverride) -> Self {
        let short = |field: &Option<String>| field.as_deref().map(shared);
        Self {
            platform_connection_type: short(&remote.platform_connection_type),
            auth_provider: short(&remote.auth_provider),
            auth_type: short(&remote.auth_type),
            created_by: short(&remote.created_by),
            created_date: remote.created_date.as_deref().map(Box::from),
        }
    }
}

impl Seen {
    /// What DPC reported of the override, as status shows it.
    pub fn status(&self) -> RemoteStatus {
        let text = |field: &Option<Shared>| field.as_deref().map(String::from);
        let held = &self.status;
        RemoteStatus {
            platform_connection_type: text(&held.platform_connection_type),
            auth_provider: text(&held.auth_provider),
            auth_type: text(&held.auth_type),
            created_by: text(&held.created_by),
            created_date: held.created_date.as_deref().map(String::from),
        }
    }

    pub fn of(remote: &RemoteOverride) -> Self {
        let overrides = remote
            .connection_overrides
            .as_ref()
            .and_then(Value::as_object);
        let mut properties: Vec<(Shared, u64)> = overrides
            .and_then(|o| o.get("connectionProperties"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (shared(k), digest(&v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        properties.sort();
        let mut location: Vec<(Shared, u64)> = overrides
            .and_then(|o| o.get("secretsLocation"))
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (shared(k), json_digest(v))).collect())
            .unwrap_or_default();
        location.sort();
        // A null says nothing is held there (Kubernetes drops nulls the same way).
        let mut undescribed: Vec<Shared> = overrides
            .into_iter()
            .flatten()
            .filter(|(k, v)| !DESCRIBED.contains(&k.as_str()) && !v.is_null())
            .map(|(k, _)| shared(k))
            .collect();
        undescribed.sort();
        Self {
            auth_type: remote.auth_type.as_deref().map(digest),
            properties: properties.into(),
            location: location.into(),
            undescribed: undescribed.into(),
            status: HeldStatus::of(remote),
        }
    }
}

/// Compares what DPC holds with what an object wants. Properties must match exactly (an
/// extra property in DPC is drift: a PUT would remove it), and so must the fields of
/// `connectionOverrides` a spec cannot describe (DPC holding one is drift: the spec does not
/// say what DPC holds); `secretsLocation` and `authType` are compared only where the spec
/// sets them (DPC may fill in defaults).
pub fn compare(expected: &Expected, seen: Option<&Seen>) -> Finding {
    let Some(seen) = seen else {
        return Finding::Missing;
    };
    let mut fields = Vec::new();
    if let Some(auth) = expected.auth_type
        && seen.auth_type != Some(auth)
    {
        fields.push("authType".to_string());
    }
    let mut names: Vec<&str> = expected
        .properties
        .iter()
        .chain(seen.properties.iter())
        .map(|(k, _)| &**k)
        .collect();
    names.sort_unstable();
    names.dedup();
    let value = |list: &[(Shared, u64)], name: &str| {
        list.iter().find(|(k, _)| &**k == name).map(|(_, v)| *v)
    };
    for name in names {
        if value(&expected.properties, name) != value(&seen.properties, name) {
            fields.push(format!("connectionOverrides.connectionProperties.{name}"));
        }
    }
    for (key, want) in expected.location.iter() {
        if value(&seen.location, key) != Some(*want) {
            fields.push(format!("connectionOverrides.secretsLocation.{key}"));
        }
    }
    for name in seen.undescribed.iter() {
        fields.push(format!("connectionOverrides.{name}"));
    }
    if fields.is_empty() {
        Finding::InSync
    } else {
        Finding::Differs(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpc::OverrideValues;
    use serde_json::json;

    fn desired() -> OverrideRequest {
        OverrideRequest {
            environment_name: "PROD".into(),
            connection_name: "C".into(),
            auth_type: Some("GENERIC_SECRET".into()),
            connection_overrides: OverrideValues {
                secrets_location: Some(
                    json!({"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}),
                ),
                connection_properties: [("secretName".to_string(), "s".to_string())].into(),
            },
        }
    }

    fn seen(overrides: Value, auth: Option<&str>) -> Seen {
        Seen::of(&RemoteOverride {
            name: Some("C".into()),
            auth_type: auth.map(String::from),
            connection_overrides: Some(overrides),
            ..RemoteOverride::default()
        })
    }

    #[test]
    fn equal_state_is_in_sync_and_server_defaults_are_ignored() {
        let same = seen(
            json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1", "addedByServer": 1}, "connectionProperties": {"secretName": "s"}}),
            Some("GENERIC_SECRET"),
        );
        assert_eq!(
            compare(&Expected::of(&desired()), Some(&same)),
            Finding::InSync
        );
        let mut no_auth = desired();
        no_auth.auth_type = None;
        no_auth.connection_overrides.secrets_location = None;
        let other_auth = seen(
            json!({"connectionProperties": {"secretName": "s"}, "secretsLocation": {"type": "X"}}),
            Some("OAUTH_CLIENT_CRED"),
        );
        assert_eq!(
            compare(&Expected::of(&no_auth), Some(&other_auth)),
            Finding::InSync,
            "unset fields are not compared"
        );
    }

    #[test]
    fn differences_are_named_by_field_without_values() {
        let changed = seen(
            json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "us-east-1"}, "connectionProperties": {"secretName": "other", "extra": "x"}}),
            Some("OAUTH_CLIENT_CRED"),
        );
        let finding = compare(&Expected::of(&desired()), Some(&changed));
        assert_eq!(
            finding,
            Finding::Differs(vec![
                "authType".into(),
                "connectionOverrides.connectionProperties.extra".into(),
                "connectionOverrides.connectionProperties.secretName".into(),
                "connectionOverrides.secretsLocation.region".into(),
            ])
        );
        let text = finding.describe();
        assert!(
            !text.contains("other") && !text.contains("us-east-1"),
            "{text}"
        );
        assert_eq!(compare(&Expected::of(&desired()), None), Finding::Missing);
    }

    #[test]
    fn a_value_that_is_not_a_string_in_dpc_differs() {
        let number = seen(
            json!({"connectionProperties": {"secretName": 5}, "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}),
            Some("GENERIC_SECRET"),
        );
        assert_eq!(
            compare(&Expected::of(&desired()), Some(&number)),
            Finding::Differs(vec![
                "connectionOverrides.connectionProperties.secretName".into()
            ])
        );
    }

    #[test]
    fn a_field_of_connection_overrides_no_spec_can_describe_is_a_difference() {
        let extra = seen(
            json!({"connectionProperties": {"secretName": "s"},
                   "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
                   "rotationPolicy": {"days": 30}, "keptNull": null}),
            Some("GENERIC_SECRET"),
        );
        assert_eq!(
            compare(&Expected::of(&desired()), Some(&extra)),
            Finding::Differs(vec!["connectionOverrides.rotationPolicy".into()]),
            "DPC holds a field the spec does not say; a null holds nothing"
        );
    }
}
