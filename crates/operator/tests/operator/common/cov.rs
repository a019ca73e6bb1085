//! `Cov`: a ConnectionOverride to apply, built from the shared fixture.

use std::collections::BTreeMap;

use dpc_operator::api::{
    AuthType, ConnectionOverrideSpec, DeletionPolicy, KeySelector, PropertyFrom,
};

use super::*;

/// A ConnectionOverride fixture.
#[derive(Clone)]
pub struct Cov {
    pub name: String,
    pub spec: ConnectionOverrideSpec,
    pub annotations: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Finalizers the object is created with (as an older operator would have left them).
    pub finalizers: Vec<String>,
}

impl Cov {
    /// An override of connection `connection` in PROD with one literal property.
    pub fn new(name: &str, connection: &str) -> Self {
        Self {
            name: name.into(),
            spec: dpc_operator::api::fixtures::override_spec(ACCOUNT, "PROD", connection)
                .in_aws("eu-west-1")
                .with_literal("secretName", &format!("prod/{connection}")),
            annotations: BTreeMap::new(),
            labels: BTreeMap::new(),
            finalizers: Vec::new(),
        }
    }

    pub fn property(mut self, name: &str, value: &str) -> Self {
        self.spec = self.spec.with_literal(name, value);
        self
    }

    pub fn without_property(mut self, name: &str) -> Self {
        self.spec
            .connection_overrides
            .connection_properties
            .remove(name);
        self
    }

    pub fn property_from_secret(mut self, property: &str, secret: &str, key: &str) -> Self {
        self.spec = self.spec.with_secret_value(property, secret, key);
        self
    }

    pub fn property_from_config_map(mut self, property: &str, map: &str, key: &str) -> Self {
        self.spec
            .connection_overrides
            .connection_properties_from
            .push(PropertyFrom {
                property: property.into(),
                secret_key_ref: None,
                config_map_key_ref: Some(KeySelector {
                    name: map.into(),
                    key: key.into(),
                    namespace: None,
                }),
            });
        self
    }

    pub fn auth_type(mut self, auth_type: AuthType) -> Self {
        self.spec.auth_type = Some(auth_type);
        self
    }

    pub fn account(mut self, account: &str) -> Self {
        self.spec.account_ref.name = account.into();
        self
    }

    /// Uses the ClusterDpcAccount `account`.
    pub fn cluster_account(mut self, account: &str) -> Self {
        self.spec.account_ref.name = account.into();
        self.spec.account_ref.kind = Some(dpc_operator::api::AccountKind::ClusterDpcAccount);
        self
    }

    pub fn environment(mut self, environment: &str) -> Self {
        self.spec.environment_name = environment.into();
        self
    }

    pub fn orphan(mut self) -> Self {
        self.spec.deletion_policy = Some(DeletionPolicy::Orphan);
        self
    }

    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Created holding `finalizer` already.
    pub fn finalizer(mut self, finalizer: &str) -> Self {
        self.finalizers.push(finalizer.into());
        self
    }

    pub fn project(mut self, project: &str) -> Self {
        self.spec.project_id = project.into();
        self
    }

    pub fn observe_only(mut self) -> Self {
        self.spec.management_policy = Some(dpc_operator::api::ManagementPolicy::ObserveOnly);
        self
    }
}
