//! Build: the request body DPC should receive, and its hash. Pure functions of the spec and
//! the resolved values; the checks of the spec alone are in `validate`.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::api::ConnectionOverrideSpec;
use crate::dpc::{OverrideRequest, OverrideValues};

/// The request to send and its hash.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub request: OverrideRequest,
    pub hash: String,
}

/// Why a spec cannot become a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("spec.projectId {0:?} is not a lower-case UUID")]
    ProjectId(String),
    #[error("spec.{0} must not be empty")]
    Empty(&'static str),
    #[error("property {0:?} is set both in connectionProperties and in connectionPropertiesFrom")]
    Duplicate(String),
    #[error("property {0:?} appears more than once in connectionPropertiesFrom")]
    DuplicateFrom(String),
    #[error(
        "connectionPropertiesFrom entry {0:?} must set exactly one of secretKeyRef and configMapKeyRef"
    )]
    SourceCount(String),
    #[error("a property name in connectionProperties or connectionPropertiesFrom is empty")]
    EmptyPropertyName,
    #[error("no properties: set connectionProperties or connectionPropertiesFrom")]
    NoProperties,
    #[error("connectionOverrides.secretsLocation.type must not be empty")]
    LocationType,
    #[error("{field} names namespace {namespace}: references to other namespaces are refused")]
    OtherNamespace { field: String, namespace: String },
    #[error(
        "spec.connectionName {0:?} contains a comma: DPC deletes overrides by a comma-separated list of names, so it would be read as several (and could delete another override)"
    )]
    CommaInName(String),
    #[error("spec.{field} {value:?} is not a usable duration: {reason}")]
    Duration {
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// The request for `spec` with the values of `connectionPropertiesFrom` filled in.
pub fn build(
    namespace: &str,
    spec: &ConnectionOverrideSpec,
    values: &BTreeMap<String, String>,
) -> Result<Desired, BuildError> {
    super::validate::validate_spec(namespace, spec)?;
    let overrides = &spec.connection_overrides;
    let mut properties = overrides.connection_properties.clone();
    for from in &overrides.connection_properties_from {
        if let Some(value) = values.get(&from.property) {
            properties.insert(from.property.clone(), value.clone());
        }
    }
    let secrets_location = overrides.secrets_location.as_ref().map(|location| {
        let mut map = serde_json::Map::new();
        for (k, v) in &location.extra {
            map.insert(k.clone(), v.clone());
        }
        map.insert("type".into(), Value::String(location.type_.clone()));
        if let Some(region) = &location.region {
            map.insert("region".into(), Value::String(region.clone()));
        }
        Value::Object(map)
    });
    let request = OverrideRequest {
        environment_name: spec.environment_name.clone(),
        connection_name: spec.connection_name.clone(),
        auth_type: spec.auth_type.map(|a| a.as_str().to_string()),
        connection_overrides: OverrideValues {
            secrets_location,
            connection_properties: properties,
        },
    };
    let hash = request.hash();
    Ok(Desired { request, hash })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AuthType, KeySelector};
    use serde_json::json;

    fn spec() -> ConnectionOverrideSpec {
        let mut spec = crate::api::fixtures::override_spec("acct", "PROD", "Salesforce")
            .in_aws("eu-west-1")
            .with_literal("secretName", "prod/sf")
            .with_secret_value("secretKey", "refs", "k");
        spec.auth_type = Some(AuthType::OauthClientCred);
        spec.sync_interval = Some("10m".into());
        let location = spec.connection_overrides.secrets_location.as_mut().unwrap();
        location.extra.insert("vaultName".into(), json!("v1"));
        spec
    }

    fn values(v: &str) -> BTreeMap<String, String> {
        [("secretKey".to_string(), v.to_string())].into()
    }

    #[test]
    fn request_merges_literal_and_resolved_properties_and_keeps_unknown_location_fields() {
        let desired = build("ns", &spec(), &values("oauth-key")).unwrap();
        let body: Value = serde_json::from_str(&desired.request.canonical_json()).unwrap();
        assert_eq!(
            body,
            json!({
                "environmentName": "PROD",
                "connectionName": "Salesforce",
                "authType": "OAUTH_CLIENT_CRED",
                "connectionOverrides": {
                    "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1", "vaultName": "v1"},
                    "connectionProperties": {"secretName": "prod/sf", "secretKey": "oauth-key"}
                }
            })
        );
    }

    #[test]
    fn hash_changes_with_a_resolved_value_only() {
        let a = build("ns", &spec(), &values("one")).unwrap();
        let b = build("ns", &spec(), &values("one")).unwrap();
        let c = build("ns", &spec(), &values("two")).unwrap();
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
        let mut orphan = spec();
        orphan.deletion_policy = Some(crate::api::DeletionPolicy::Orphan);
        assert_eq!(
            build("ns", &orphan, &values("one")).unwrap().hash,
            a.hash,
            "deletionPolicy is not sent"
        );
    }

    #[test]
    fn invalid_specs_are_refused_with_the_field_named() {
        let mut s = spec();
        s.project_id = "3C90C3CC-0D44-4B50-8888-8DD25736052A".into();
        assert_eq!(
            build("ns", &s, &values("x")).unwrap_err(),
            BuildError::ProjectId(s.project_id.clone())
        );

        let mut s = spec();
        s.connection_overrides
            .connection_properties
            .insert("secretKey".into(), "lit".into());
        let err = build("ns", &s, &values("x")).unwrap_err();
        assert_eq!(err, BuildError::Duplicate("secretKey".into()));
        assert!(
            err.to_string()
                .contains("both in connectionProperties and in connectionPropertiesFrom")
        );

        let mut s = spec();
        s.connection_overrides.connection_properties_from[0].config_map_key_ref =
            Some(KeySelector {
                name: "cm".into(),
                key: "k".into(),
                namespace: None,
            });
        assert_eq!(
            build("ns", &s, &values("x")).unwrap_err(),
            BuildError::SourceCount("secretKey".into())
        );

        let mut s = spec();
        s.connection_overrides.connection_properties.clear();
        s.connection_overrides.connection_properties_from.clear();
        assert_eq!(
            build("ns", &s, &values("x")).unwrap_err(),
            BuildError::NoProperties
        );

        let mut s = spec();
        s.environment_name.clear();
        assert_eq!(
            build("ns", &s, &values("x")).unwrap_err(),
            BuildError::Empty("environmentName")
        );

        let mut s = spec();
        s.connection_overrides
            .secrets_location
            .as_mut()
            .unwrap()
            .type_
            .clear();
        assert_eq!(
            build("ns", &s, &values("x")).unwrap_err(),
            BuildError::LocationType
        );
    }

    #[test]
    fn references_to_other_namespaces_and_bad_durations_are_refused() {
        let mut s = spec();
        s.connection_overrides.connection_properties_from[0]
            .secret_key_ref
            .as_mut()
            .unwrap()
            .namespace = Some("ns".into());
        assert!(
            build("ns", &s, &values("x")).is_ok(),
            "its own namespace may be named"
        );
        s.connection_overrides.connection_properties_from[0]
            .secret_key_ref
            .as_mut()
            .unwrap()
            .namespace = Some("other".into());
        let err = build("ns", &s, &values("x")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.connectionOverrides.connectionPropertiesFrom[0].secretKeyRef.namespace names namespace other: references to other namespaces are refused"
        );
        let mut s = spec();
        s.account_ref.namespace = Some("other".into());
        assert!(matches!(
            build("ns", &s, &values("x")),
            Err(BuildError::OtherNamespace { .. })
        ));
        let mut s = spec();
        s.sync_interval = Some("ten minutes".into());
        assert!(matches!(
            build("ns", &s, &values("x")),
            Err(BuildError::Duration {
                field: "syncInterval",
                ..
            })
        ));
    }

    #[test]
    fn auth_type_is_omitted_when_unset() {
        let mut s = spec();
        s.auth_type = None;
        let body: Value = serde_json::from_str(
            &build("ns", &s, &values("x"))
                .unwrap()
                .request
                .canonical_json(),
        )
        .unwrap();
        assert!(body.get("authType").is_none());
    }
}
