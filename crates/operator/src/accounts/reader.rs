//! The reader of the values objects name in Secrets and ConfigMaps.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};

use crate::api::KeySelector;
use crate::dpc::SecretString;
use crate::index::Reference;

use super::values::{Lookup, Values};
use super::{ResolveError, kube_error};

/// Reads Secrets and ConfigMaps of one namespace, each at most once per pass, and through
/// [`Values`] when it is given: a key read before, whose object has not changed since, is
/// not read again.
pub(crate) struct Reader<'a> {
    client: &'a Client,
    namespace: String,
    values: Option<&'a Values>,
    /// What this pass read, with the [`Values::mark`] taken before each read.
    secrets: BTreeMap<String, (u64, Option<Secret>)>,
    config_maps: BTreeMap<String, (u64, Option<ConfigMap>)>,
}

/// The kinds a [`Reader`] reads values from.
trait Source:
    Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
{
    const NAME: &'static str;
    fn reference(namespace: &str, name: &str) -> Reference;
    fn lookup(&self, key: &str) -> Lookup;
}

fn text(bytes: Vec<u8>) -> Lookup {
    String::from_utf8(bytes).map_or(Lookup::NotText, |s| Lookup::Text(SecretString::new(s)))
}

impl Source for Secret {
    const NAME: &'static str = "Secret";
    fn reference(namespace: &str, name: &str) -> Reference {
        Reference::Secret {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
    fn lookup(&self, key: &str) -> Lookup {
        let data = self
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone());
        let string_data = || {
            let d = self.string_data.as_ref()?;
            d.get(key).map(|s| s.clone().into_bytes())
        };
        data.or_else(string_data).map_or(Lookup::NoKey, text)
    }
}

impl Source for ConfigMap {
    const NAME: &'static str = "ConfigMap";
    fn reference(namespace: &str, name: &str) -> Reference {
        Reference::ConfigMap {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
    fn lookup(&self, key: &str) -> Lookup {
        if let Some(value) = self.data.as_ref().and_then(|d| d.get(key)) {
            return Lookup::Text(SecretString::new(value.clone()));
        }
        let binary = self.binary_data.as_ref().and_then(|d| d.get(key));
        binary.map_or(Lookup::NoKey, |b| text(b.0.clone()))
    }
}

impl<'a> Reader<'a> {
    pub(crate) fn new(client: &'a Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            values: None,
            secrets: BTreeMap::new(),
            config_maps: BTreeMap::new(),
        }
    }

    /// Reads through `values`.
    pub(crate) fn cached(mut self, values: &'a Values) -> Self {
        self.values = Some(values);
        self
    }

    /// The key `selector` names, from `values` or read (and kept there).
    async fn lookup<K: Source>(
        client: &Client,
        namespace: &str,
        values: Option<&Values>,
        read: &mut BTreeMap<String, (u64, Option<K>)>,
        selector: &KeySelector,
    ) -> Result<Lookup, ResolveError> {
        let reference = K::reference(namespace, &selector.name);
        if let Some(lookup) = values.and_then(|v| v.get(&reference, &selector.key)) {
            return Ok(lookup);
        }
        if !read.contains_key(&selector.name) {
            let mark = values.map_or(0, Values::mark);
            let api: Api<K> = Api::namespaced(client.clone(), namespace);
            let what = format!("{} {namespace}/{}", K::NAME, selector.name);
            let object = api
                .get_opt(&selector.name)
                .await
                .map_err(kube_error(what))?;
            read.insert(selector.name.clone(), (mark, object));
        }
        let (mark, object) = &read[&selector.name];
        let lookup = object
            .as_ref()
            .map_or(Lookup::Absent, |o| o.lookup(&selector.key));
        if let Some(values) = values {
            values.put(*mark, &reference, &selector.key, lookup.clone());
        }
        Ok(lookup)
    }

    fn value<K: Source>(
        &self,
        lookup: Lookup,
        selector: &KeySelector,
        purpose: &str,
    ) -> Result<SecretString, ResolveError> {
        let (kind, namespace, name) = (K::NAME, self.namespace.clone(), selector.name.clone());
        let (key, purpose) = (selector.key.clone(), purpose.to_string());
        match lookup {
            Lookup::Text(value) => Ok(value),
            Lookup::Absent => Err(ResolveError::NotFound {
                kind,
                namespace,
                name,
                purpose,
            }),
            Lookup::NoKey => Err(ResolveError::KeyMissing {
                kind,
                namespace,
                name,
                key,
                purpose,
            }),
            Lookup::NotText => Err(ResolveError::NotText {
                kind,
                namespace,
                name,
                key,
                purpose,
            }),
        }
    }

    pub(crate) async fn secret_value(
        &mut self,
        selector: &KeySelector,
        purpose: &str,
    ) -> Result<SecretString, ResolveError> {
        let (client, namespace, values) = (self.client, self.namespace.as_str(), self.values);
        let lookup = Self::lookup(client, namespace, values, &mut self.secrets, selector).await?;
        self.value::<Secret>(lookup, selector, purpose)
    }

    pub(crate) async fn config_map_value(
        &mut self,
        selector: &KeySelector,
        purpose: &str,
    ) -> Result<String, ResolveError> {
        let (client, namespace, values) = (self.client, self.namespace.as_str(), self.values);
        let read = &mut self.config_maps;
        let lookup = Self::lookup(client, namespace, values, read, selector).await?;
        let value = self.value::<ConfigMap>(lookup, selector, purpose)?;
        Ok(value.expose().to_string())
    }
}
