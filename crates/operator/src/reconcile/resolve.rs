//! Resolve: everything a ConnectionOverride refers to in the cluster — its account (through
//! the account cache) and each `connectionPropertiesFrom` value (through [`Values`]: read
//! once, then again only after its object changed).

use std::collections::BTreeMap;

use kube::Client;

use crate::accounts::{AccountCache, Reader, ResolveError, ResolvedAccount, Values};
use crate::api::ConnectionOverrideSpec;
use crate::dpc::{ClientSettings, SecretString};
use crate::index::{Reference, spec_references};

/// A value of `connectionPropertiesFrom`.
#[derive(Clone, Debug)]
pub struct ResolvedValue {
    pub value: SecretString,
    /// Read from a Secret (so it is redacted from any text DPC sends back).
    pub from_secret: bool,
}

/// Everything a ConnectionOverride needs from the cluster.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub account: ResolvedAccount,
    pub values: BTreeMap<String, ResolvedValue>,
}

impl Resolved {
    /// The values read from Secrets, which the DPC client removes from any answer's text.
    pub fn secret_values(&self) -> Vec<SecretString> {
        self.values
            .values()
            .filter(|v| v.from_secret)
            .map(|v| v.value.clone())
            .collect()
    }

    /// The property values as plain strings, for building the request.
    pub fn plain_values(&self) -> BTreeMap<String, String> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), v.value.expose().to_string()))
            .collect()
    }
}

/// Resolves everything a ConnectionOverride refers to. The returned references are what to
/// watch for this object, complete as far as resolving got.
pub async fn resolve(
    client: &Client,
    accounts: &AccountCache,
    values: &Values,
    namespace: &str,
    spec: &ConnectionOverrideSpec,
    settings: &ClientSettings,
) -> (Result<Resolved, ResolveError>, Vec<Reference>) {
    let mut refs = spec_references(namespace, spec);
    let (account, account_refs) = accounts
        .resolve(client, namespace, &spec.account_ref, settings)
        .await;
    refs.extend(account_refs);
    let account = match account {
        Ok(resolved) => resolved,
        Err(e) => return (Err(e), refs),
    };
    let mut reader = Reader::new(client, namespace).cached(values);
    let mut values = BTreeMap::new();
    for from in &spec.connection_overrides.connection_properties_from {
        let purpose = format!("property {}", from.property);
        let value = match (&from.secret_key_ref, &from.config_map_key_ref) {
            (Some(selector), _) => {
                reader
                    .secret_value(selector, &purpose)
                    .await
                    .map(|value| ResolvedValue {
                        value,
                        from_secret: true,
                    })
            }
            (None, Some(selector)) => {
                reader
                    .config_map_value(selector, &purpose)
                    .await
                    .map(|value| ResolvedValue {
                        value: SecretString::new(value),
                        from_secret: false,
                    })
            }
            // The CRD's CEL rule forbids this; build reports it as InvalidSpec.
            (None, None) => continue,
        };
        match value {
            Ok(value) => {
                values.insert(from.property.clone(), value);
            }
            Err(e) => return (Err(e), refs),
        }
    }
    (Ok(Resolved { account, values }), refs)
}
