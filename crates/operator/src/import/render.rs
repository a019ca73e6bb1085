//! From the overrides DPC holds to the objects `dpc-operator import` prints: one
//! ConnectionOverride per override whose spec describes exactly what DPC holds, names valid
//! in Kubernetes and unique in the output, and (on request) the DpcAccount and a Secret stub
//! they need. Pure: the same input gives the same documents in the same order.

use std::collections::{BTreeMap, HashMap};

use kube::api::ObjectMeta;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::api::{
    AccountKind, AccountRef, AuthType, ConnectionOverride, ConnectionOverrideSpec,
    ConnectionOverridesSpec, DeletionPolicy, DpcAccountSpec, IMPORTED_CONNECTION_ANNOTATION,
    IMPORTED_ENVIRONMENT_ANNOTATION, ManagementPolicy, SecretsLocation,
};
use crate::dpc::RemoteOverride;

/// The longest object name written: a DNS-1123 label, readable in `kubectl get`.
const MAX_NAME: usize = 63;

/// What the printed objects share.
#[derive(Clone, Debug)]
pub struct Options {
    pub project_id: String,
    pub namespace: Option<String>,
    pub account: AccountRef,
    /// `managementPolicy: Manage` instead of `ObserveOnly`.
    pub manage: bool,
}

/// One override DPC holds, with the environment it was listed in.
#[derive(Clone, Debug)]
pub struct Found {
    pub environment: String,
    pub remote: RemoteOverride,
}

/// The objects to print, and what could not be printed.
#[derive(Debug, Default)]
pub struct Rendered {
    pub documents: Vec<Value>,
    /// Overrides that no ConnectionOverride can describe exactly, with the reason.
    pub skipped: Vec<String>,
    /// Remarks on overrides that were printed.
    pub notes: Vec<String>,
    /// Overrides not printed because an object in the cluster names them already.
    pub already: Vec<String>,
}

/// One ConnectionOverride per override, sorted by environment and connection name.
pub fn overrides(found: &[Found], options: &Options) -> Rendered {
    let mut rendered = Rendered::default();
    let mut specs = Vec::new();
    for item in found {
        let name = item.remote.name.clone().unwrap_or_default();
        let what = format!(
            "the override of connection {name:?} in environment {:?}",
            item.environment
        );
        match spec_of(item, options, &mut rendered.notes, &what) {
            Ok(spec) => specs.push(spec),
            Err(reason) => rendered.skipped.push(format!("{what}: {reason}")),
        }
    }
    specs.sort_by(|a, b| {
        (&a.environment_name, &a.connection_name).cmp(&(&b.environment_name, &b.connection_name))
    });
    specs.dedup_by(|a, b| {
        (&a.environment_name, &a.connection_name) == (&b.environment_name, &b.connection_name)
    });
    let pairs: Vec<(&str, &str)> = specs
        .iter()
        .map(|s| (s.environment_name.as_str(), s.connection_name.as_str()))
        .collect();
    let names = object_names(&pairs);
    for (spec, name) in specs.iter().zip(names) {
        let annotations = BTreeMap::from([
            (
                IMPORTED_ENVIRONMENT_ANNOTATION.to_string(),
                spec.environment_name.clone(),
            ),
            (
                IMPORTED_CONNECTION_ANNOTATION.to_string(),
                spec.connection_name.clone(),
            ),
        ]);
        let mut object = ConnectionOverride::new(&name, spec.clone());
        object.metadata = ObjectMeta {
            name: Some(name),
            namespace: options.namespace.clone(),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        };
        let value = serde_json::to_value(&object).expect("a ConnectionOverride serializes");
        rendered.documents.push(value);
    }
    rendered
}

/// The spec describing one override exactly, or why none can.
fn spec_of(
    item: &Found,
    options: &Options,
    notes: &mut Vec<String>,
    what: &str,
) -> Result<ConnectionOverrideSpec, String> {
    let remote = &item.remote;
    let connection = remote
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("DPC lists it without a connection name")?;
    if connection.contains(',') {
        return Err("the connection name contains a comma, which DPC's delete call reads as a separator; a ConnectionOverride cannot name it".into());
    }
    if connection.chars().count() > 255 {
        return Err("the connection name is longer than 255 characters".into());
    }
    let values = remote
        .connection_overrides
        .as_ref()
        .and_then(Value::as_object)
        .ok_or("DPC holds no connectionOverrides object for it")?;
    if let Some((field, _)) = values.iter().find(|(k, v)| {
        !matches!(k.as_str(), "connectionProperties" | "secretsLocation") && !v.is_null()
    }) {
        return Err(format!(
            "DPC holds connectionOverrides.{field}, which a ConnectionOverride cannot hold: the object would not describe what DPC holds, and a write of it could erase the field in DPC"
        ));
    }
    let connection_properties = properties(values.get("connectionProperties"))?;
    let secrets_location = location(values.get("secretsLocation"))?;
    let auth_type = match remote.auth_type.as_deref() {
        None => None,
        Some(text) => match serde_json::from_value::<AuthType>(json!(text)) {
            Ok(auth) => Some(auth),
            Err(_) => {
                notes.push(format!("{what}: authType {text:?} is not one the ConnectionOverride schema knows; left out (DPC keeps the connection's own)"));
                None
            }
        },
    };
    Ok(ConnectionOverrideSpec {
        account_ref: options.account.clone(),
        project_id: options.project_id.clone(),
        environment_name: item.environment.clone(),
        connection_name: connection,
        auth_type,
        connection_overrides: ConnectionOverridesSpec {
            secrets_location,
            connection_properties,
            connection_properties_from: Vec::new(),
        },
        // An override made by hand outlives the object that adopted it unless the user says
        // otherwise: deleting the imported object must not delete it in DPC.
        deletion_policy: Some(DeletionPolicy::Orphan),
        sync_interval: None,
        drift_policy: None,
        management_policy: Some(if options.manage {
            ManagementPolicy::Manage
        } else {
            ManagementPolicy::ObserveOnly
        }),
        deletion_timeout: None,
    })
}

fn properties(value: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let map = value
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
        .ok_or("it has no connectionProperties (a ConnectionOverride needs at least one)")?;
    map.iter()
        .map(|(key, value)| match value {
            Value::String(text) => Ok((key.clone(), text.clone())),
            other => Err(format!(
                "connectionProperties.{key} is a {}, not a string (the operator sends strings)",
                kind_of(other)
            )),
        })
        .collect()
}

fn location(value: Option<&Value>) -> Result<Option<SecretsLocation>, String> {
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(format!(
                "secretsLocation is a {}, not an object",
                kind_of(other)
            ));
        }
    };
    let type_ = match map.get("type") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        _ => return Err("secretsLocation has no type".into()),
    };
    let region = match map.get("region") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => Some(r.clone()),
        Some(other) => {
            return Err(format!(
                "secretsLocation.region is a {}, not a string",
                kind_of(other)
            ));
        }
    };
    // Kubernetes drops nulls from an object it stores; so does the spec.
    let extra = map
        .iter()
        .filter(|(k, v)| !matches!(k.as_str(), "type" | "region") && !v.is_null())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Some(SecretsLocation {
        type_,
        region,
        extra,
    }))
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// Lower-case letters and digits, every other run of characters one `-`.
fn dns_part(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// The first `2 * bytes` hex digits of a hash of the pair.
fn short_hash(environment: &str, connection: &str, bytes: usize) -> String {
    let digest = Sha256::digest(format!("{environment}\0{connection}").as_bytes());
    hex::encode(&digest[..bytes])
}

/// How many bytes of the pair's hash a name ends in, by how often it had to grow: none,
/// then 4, 8, 16 and 24 (the name stays a DNS-1123 label).
const HASH_BYTES: [usize; 5] = [0, 4, 8, 16, 24];

/// A DNS-1123 label per (environment, connection): `<environment>-<connection>`; a name two
/// pairs would share, or one too long, ends in a hash of the pair instead — a longer hash
/// while it still meets another name — so every name is unique and none depends on which
/// other overrides exist besides those it collides with. Distinct pairs, so the same pairs
/// always get the same names.
pub fn object_names(pairs: &[(&str, &str)]) -> Vec<String> {
    let bases: Vec<String> = pairs
        .iter()
        .map(|(environment, connection)| {
            let parts = [dns_part(environment), dns_part(connection)];
            let joined = parts
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("-");
            if joined.is_empty() {
                "override".into()
            } else {
                joined
            }
        })
        .collect();
    let named = |i: usize, level: usize| {
        let base = &bases[i];
        let bytes = HASH_BYTES[level.min(HASH_BYTES.len() - 1)];
        if bytes == 0 {
            return base.clone();
        }
        let (environment, connection) = pairs[i];
        let hash = short_hash(environment, connection, bytes);
        let head = &base[..base.len().min(MAX_NAME - hash.len() - 1)];
        format!("{}-{hash}", head.trim_end_matches('-'))
    };
    // Every pair starts at its plain name (hashed at once when too long); a name shared by
    // two or more pairs moves each of them one level on, until no name is shared.
    let mut levels: Vec<usize> = bases
        .iter()
        .map(|b| usize::from(b.len() > MAX_NAME))
        .collect();
    loop {
        let names: Vec<String> = (0..pairs.len()).map(|i| named(i, levels[i])).collect();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for name in &names {
            *counts.entry(name.as_str()).or_default() += 1;
        }
        let mut moved = false;
        for (i, name) in names.iter().enumerate() {
            if counts[name.as_str()] > 1 && levels[i] < HASH_BYTES.len() - 1 {
                levels[i] += 1;
                moved = true;
            }
        }
        if !moved {
            return names;
        }
    }
}

/// The name of the Secret stub `--with-account` prints for the account `name`.
pub fn account_secret_name(name: &str) -> String {
    format!("{name}-credentials")
}

/// The DpcAccount the objects refer to, and a Secret stub for its credentials: the Secret
/// carries placeholders, never the credentials the import used.
pub fn account(name: &str, namespace: Option<&str>, spec: &DpcAccountSpec) -> [Value; 2] {
    let secret_name = account_secret_name(name);
    let mut spec = spec.clone();
    spec.credentials_secret_ref = crate::api::CredentialsSecretRef::named(&secret_name);
    spec.requests_per_minute = None;
    spec.request_burst = None;
    let metadata = |name: &str| {
        let mut meta = json!({"name": name});
        if let Some(namespace) = namespace {
            meta["namespace"] = json!(namespace);
        }
        meta
    };
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(&secret_name),
        "type": "Opaque",
        "stringData": {
            "client_id": "<an API client id of your DPC account>",
            "client_secret": "<its client secret>",
        },
    });
    let account = json!({
        "apiVersion": "dpc-operator.io/v1alpha1",
        "kind": "DpcAccount",
        "metadata": metadata(name),
        "spec": serde_json::to_value(&spec).expect("a DpcAccount spec serializes"),
    });
    [secret, account]
}

/// The account reference `--account-ref` names: `NAME`, `DpcAccount/NAME` or
/// `ClusterDpcAccount/NAME`.
pub fn account_ref(text: &str) -> Result<AccountRef, String> {
    let (kind, name) = match text.split_once('/') {
        None => (None, text),
        Some(("DpcAccount", name)) => (None, name),
        Some(("ClusterDpcAccount", name)) => (Some(AccountKind::ClusterDpcAccount), name),
        Some((kind, _)) => {
            return Err(format!(
                "--account-ref {text:?}: the kind must be DpcAccount or ClusterDpcAccount, not {kind:?}"
            ));
        }
    };
    let valid = is_dns_subdomain(name);
    if !valid {
        return Err(format!(
            "--account-ref {text:?}: {name:?} is not a valid Kubernetes object name (lower-case letters, digits, '-' and '.')"
        ));
    }
    Ok(AccountRef {
        name: name.to_string(),
        kind,
        namespace: None,
    })
}

/// A valid Kubernetes object name (DNS-1123 subdomain); a namespace must also be a label.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests;
