//! Builders of valid objects for tests and benchmarks (the `fixtures` feature; the operator
//! never needs them). Start from [`override_spec`] or [`account_spec`] and set what a test
//! is about; everything else stays at its default.

use std::collections::BTreeMap;

use crate::{
    AccountRef, ConnectionOverrideSpec, ConnectionOverridesSpec, CredentialsSecretRef,
    DpcAccountSpec, KeySelector, PropertyFrom, SecretsLocation,
};

/// A project id in the form DPC uses (a lower-case UUID).
pub const PROJECT: &str = "3c90c3cc-0d44-4b50-8888-8dd25736052a";

/// A spec for connection `connection` in environment `environment` of [`PROJECT`], through
/// DpcAccount `account`, without properties and with every policy at its default.
pub fn override_spec(account: &str, environment: &str, connection: &str) -> ConnectionOverrideSpec {
    ConnectionOverrideSpec {
        account_ref: AccountRef {
            name: account.into(),
            kind: None,
            namespace: None,
        },
        project_id: PROJECT.into(),
        environment_name: environment.into(),
        connection_name: connection.into(),
        auth_type: None,
        connection_overrides: ConnectionOverridesSpec::default(),
        deletion_policy: None,
        sync_interval: None,
        drift_policy: None,
        management_policy: None,
        deletion_timeout: None,
    }
}

impl ConnectionOverrideSpec {
    /// The same spec with its secrets in AWS Secrets Manager in `region`.
    pub fn in_aws(mut self, region: &str) -> Self {
        self.connection_overrides.secrets_location = Some(SecretsLocation {
            type_: "AWS_SECRET_MANAGER".into(),
            region: Some(region.into()),
            extra: BTreeMap::new(),
        });
        self
    }

    /// The same spec with property `name` set to `value`.
    pub fn with_literal(mut self, name: &str, value: &str) -> Self {
        let properties = &mut self.connection_overrides.connection_properties;
        properties.insert(name.into(), value.into());
        self
    }

    /// The same spec with property `name` read from key `key` of Secret `secret`.
    pub fn with_secret_value(mut self, name: &str, secret: &str, key: &str) -> Self {
        let from = &mut self.connection_overrides.connection_properties_from;
        from.push(PropertyFrom {
            property: name.into(),
            secret_key_ref: Some(KeySelector {
                name: secret.into(),
                key: key.into(),
                namespace: None,
            }),
            config_map_key_ref: None,
        });
        self
    }
}

/// An account spec with credentials from Secret `credentials` (keys `client_id` and
/// `client_secret`), no region or URLs, and the default rate.
pub fn account_spec(credentials: &str) -> DpcAccountSpec {
    DpcAccountSpec {
        region: None,
        api_url: None,
        token_url: None,
        audience: None,
        credentials_secret_ref: CredentialsSecretRef::named(credentials),
        account_id: None,
        requests_per_minute: None,
        request_burst: None,
    }
}
