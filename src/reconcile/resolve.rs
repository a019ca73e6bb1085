//! Resolve: read what an object refers to — its DpcAccount, the account's credentials
//! Secret, and every `connectionPropertiesFrom` value — from its own namespace. A missing
//! object or key is reported by name; nothing is called in DPC until everything resolves.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::api::conditions::Reason;
use crate::api::{ConnectionOverrideSpec, DpcAccount, KeySelector};
use crate::dpc::{AccountKey, Credentials, Endpoint, SecretString};

/// Something an object refers to, for the reverse index that re-triggers it on a change.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reference {
    Secret { namespace: String, name: String },
    ConfigMap { namespace: String, name: String },
    Account { namespace: String, name: String },
}

/// A resolved account: where to call and with which credentials.
#[derive(Clone, Debug)]
pub struct ResolvedAccount {
    pub key: AccountKey,
    pub endpoint: Endpoint,
    pub credentials: Credentials,
}

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
    /// Every secret value involved, for redaction.
    pub fn secrets(&self) -> Vec<&SecretString> {
        let mut secrets = vec![
            &self.account.credentials.client_id,
            &self.account.credentials.client_secret,
        ];
        secrets.extend(
            self.values
                .values()
                .filter(|v| v.from_secret)
                .map(|v| &v.value),
        );
        secrets
    }

    /// The property values as plain strings, for building the request.
    pub fn plain_values(&self) -> BTreeMap<String, String> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), v.value.expose().to_string()))
            .collect()
    }
}

/// Why resolving failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("DpcAccount {namespace}/{name} not found")]
    AccountNotFound { namespace: String, name: String },
    #[error("DpcAccount {namespace}/{name} cannot be used: {reason}")]
    AccountInvalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("{kind} {namespace}/{name} not found ({purpose})")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
        purpose: String,
    },
    #[error("{kind} {namespace}/{name} has no key {key:?} ({purpose})")]
    KeyMissing {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
        purpose: String,
    },
    #[error("{kind} {namespace}/{name} key {key:?} is not UTF-8 text ({purpose})")]
    NotText {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
        purpose: String,
    },
    #[error("reading {what} failed: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
}

impl ResolveError {
    /// The Ready reason for this failure; `None` for a failure of the Kubernetes API itself,
    /// which is retried with backoff.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            ResolveError::AccountNotFound { .. } | ResolveError::AccountInvalid { .. } => {
                Some(Reason::AccountNotReady)
            }
            ResolveError::NotFound { .. } => Some(Reason::SecretNotFound),
            ResolveError::KeyMissing { .. } => Some(Reason::SecretKeyMissing),
            ResolveError::NotText { .. } => Some(Reason::InvalidSpec),
            ResolveError::Kube { .. } => None,
        }
    }
}

/// The objects a spec refers to, known without reading anything (the account's own
/// credentials Secret is added once the account is read).
pub fn spec_references(namespace: &str, spec: &ConnectionOverrideSpec) -> Vec<Reference> {
    let mut refs = vec![Reference::Account {
        namespace: namespace.into(),
        name: spec.account_ref.name.clone(),
    }];
    for from in &spec.connection_overrides.connection_properties_from {
        if let Some(s) = &from.secret_key_ref {
            refs.push(Reference::Secret {
                namespace: namespace.into(),
                name: s.name.clone(),
            });
        }
        if let Some(c) = &from.config_map_key_ref {
            refs.push(Reference::ConfigMap {
                namespace: namespace.into(),
                name: c.name.clone(),
            });
        }
    }
    refs
}

fn kube_error(what: String) -> impl FnOnce(kube::Error) -> ResolveError {
    move |source| ResolveError::Kube { what, source }
}

/// Reads Secrets and ConfigMaps of one namespace, each at most once per pass.
struct Reader<'a> {
    client: &'a Client,
    namespace: &'a str,
    secrets: BTreeMap<String, Option<Secret>>,
    config_maps: BTreeMap<String, Option<ConfigMap>>,
}

impl<'a> Reader<'a> {
    fn new(client: &'a Client, namespace: &'a str) -> Self {
        Self {
            client,
            namespace,
            secrets: BTreeMap::new(),
            config_maps: BTreeMap::new(),
        }
    }

    fn missing(&self, kind: &'static str, selector: &KeySelector, purpose: &str) -> ResolveError {
        ResolveError::NotFound {
            kind,
            namespace: self.namespace.into(),
            name: selector.name.clone(),
            purpose: purpose.into(),
        }
    }

    fn key_missing(
        &self,
        kind: &'static str,
        selector: &KeySelector,
        purpose: &str,
    ) -> ResolveError {
        ResolveError::KeyMissing {
            kind,
            namespace: self.namespace.into(),
            name: selector.name.clone(),
            key: selector.key.clone(),
            purpose: purpose.into(),
        }
    }

    fn not_text(&self, kind: &'static str, selector: &KeySelector, purpose: &str) -> ResolveError {
        ResolveError::NotText {
            kind,
            namespace: self.namespace.into(),
            name: selector.name.clone(),
            key: selector.key.clone(),
            purpose: purpose.into(),
        }
    }

    async fn secret_value(
        &mut self,
        selector: &KeySelector,
        purpose: &str,
    ) -> Result<SecretString, ResolveError> {
        if !self.secrets.contains_key(&selector.name) {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
            let secret = api
                .get_opt(&selector.name)
                .await
                .map_err(kube_error(format!(
                    "Secret {}/{}",
                    self.namespace, selector.name
                )))?;
            self.secrets.insert(selector.name.clone(), secret);
        }
        let Some(secret) = self.secrets.get(&selector.name).and_then(Option::as_ref) else {
            return Err(self.missing("Secret", selector, purpose));
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&selector.key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&selector.key))
                    .map(|s| s.clone().into_bytes())
            })
            .ok_or_else(|| self.key_missing("Secret", selector, purpose))?;
        String::from_utf8(bytes)
            .map(SecretString::new)
            .map_err(|_| self.not_text("Secret", selector, purpose))
    }

    async fn config_map_value(
        &mut self,
        selector: &KeySelector,
        purpose: &str,
    ) -> Result<String, ResolveError> {
        if !self.config_maps.contains_key(&selector.name) {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
            let map = api
                .get_opt(&selector.name)
                .await
                .map_err(kube_error(format!(
                    "ConfigMap {}/{}",
                    self.namespace, selector.name
                )))?;
            self.config_maps.insert(selector.name.clone(), map);
        }
        let Some(map) = self
            .config_maps
            .get(&selector.name)
            .and_then(Option::as_ref)
        else {
            return Err(self.missing("ConfigMap", selector, purpose));
        };
        if let Some(value) = map.data.as_ref().and_then(|d| d.get(&selector.key)) {
            return Ok(value.clone());
        }
        match map.binary_data.as_ref().and_then(|d| d.get(&selector.key)) {
            Some(bytes) => String::from_utf8(bytes.0.clone())
                .map_err(|_| self.not_text("ConfigMap", selector, purpose)),
            None => Err(self.key_missing("ConfigMap", selector, purpose)),
        }
    }
}

/// Reads a DpcAccount and its credentials. Also returns the account's credentials Secret
/// reference, for the reverse index, whether or not reading it succeeded.
pub async fn resolve_account(
    client: &Client,
    namespace: &str,
    name: &str,
    allow_insecure_http: bool,
) -> (
    Result<(DpcAccount, ResolvedAccount), ResolveError>,
    Option<Reference>,
) {
    resolve_account_with(
        &mut Reader::new(client, namespace),
        name,
        allow_insecure_http,
    )
    .await
}

async fn resolve_account_with(
    reader: &mut Reader<'_>,
    name: &str,
    allow_insecure_http: bool,
) -> (
    Result<(DpcAccount, ResolvedAccount), ResolveError>,
    Option<Reference>,
) {
    let (client, namespace) = (reader.client, reader.namespace);
    let accounts: Api<DpcAccount> = Api::namespaced(client.clone(), namespace);
    let account = match accounts.get_opt(name).await {
        Ok(Some(account)) => account,
        Ok(None) => {
            return (
                Err(ResolveError::AccountNotFound {
                    namespace: namespace.into(),
                    name: name.into(),
                }),
                None,
            );
        }
        Err(source) => {
            return (
                Err(ResolveError::Kube {
                    what: format!("DpcAccount {namespace}/{name}"),
                    source,
                }),
                None,
            );
        }
    };
    let creds = &account.spec.credentials_secret_ref;
    let secret_ref = Reference::Secret {
        namespace: namespace.into(),
        name: creds.name.clone(),
    };
    let result = async {
        let endpoint =
            Endpoint::for_account(&account.spec, allow_insecure_http).map_err(|reason| {
                ResolveError::AccountInvalid {
                    namespace: namespace.into(),
                    name: name.into(),
                    reason,
                }
            })?;
        let purpose = format!("credentials of DpcAccount {name}");
        let id_selector = KeySelector {
            name: creds.name.clone(),
            key: creds.client_id_key.clone(),
        };
        let secret_selector = KeySelector {
            name: creds.name.clone(),
            key: creds.client_secret_key.clone(),
        };
        let client_id = reader.secret_value(&id_selector, &purpose).await?;
        let client_secret = reader.secret_value(&secret_selector, &purpose).await?;
        Ok(ResolvedAccount {
            key: AccountKey {
                namespace: Some(namespace.into()),
                name: name.into(),
            },
            endpoint,
            credentials: Credentials {
                client_id,
                client_secret,
            },
        })
    }
    .await;
    (result.map(|resolved| (account, resolved)), Some(secret_ref))
}

/// Resolves everything a ConnectionOverride refers to. The returned references are what to
/// watch for this object, complete as far as resolving got.
pub async fn resolve(
    client: &Client,
    namespace: &str,
    spec: &ConnectionOverrideSpec,
    allow_insecure_http: bool,
) -> (Result<Resolved, ResolveError>, Vec<Reference>) {
    let mut refs = spec_references(namespace, spec);
    let mut reader = Reader::new(client, namespace);
    let (account, secret_ref) =
        resolve_account_with(&mut reader, &spec.account_ref.name, allow_insecure_http).await;
    refs.extend(secret_ref);
    let account = match account {
        Ok((_, resolved)) => resolved,
        Err(e) => return (Err(e), refs),
    };
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
            (None, None) => {
                // The CRD's CEL rule forbids this; reported by build as InvalidSpec.
                continue;
            }
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
