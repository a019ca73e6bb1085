//! How the watch keeps each ConnectionOverride between passes: as LZ4-compressed JSON, not
//! as the deserialized object.
//!
//! kube-runtime's reflector store holds one copy of every watched object for as long as it
//! exists. Deserialized, a typical ConnectionOverride takes about 4.4 KB of heap (each of
//! its `BTreeMap`s allocates a node of about 540 bytes, its metadata struct is 360 bytes with
//! every field empty); as JSON it is 1.4–1.7 KB, and compressed against a fixed dictionary
//! of the field names and phrases every ConnectionOverride shares, about 0.4 KB. heaptrack
//! at 2,000 objects on kube-apiserver: the store's share of the peak heap went from 6.9 MB to
//! 2.3 MB (what is left is the store's keys and each copy's near-empty metadata struct). A
//! pass unpacks the object it reconciles (microseconds, against a pass's milliseconds); the
//! rare readers of the whole store unpack as they go.
//!
//! What the controller itself needs without unpacking is kept beside the bytes: the name and
//! namespace (the store's key) and the hash of what makes a change worth a reconcile (the
//! predicate). An object the operator cannot read as a ConnectionOverride is kept as it
//! came (rare, and small: its metadata and the error).

use std::borrow::Cow;
use std::sync::OnceLock;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::DeserializeGuard;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::watcher;
use serde::{Deserialize, Deserializer};

use crate::api::ConnectionOverride;

/// A ConnectionOverride as the store keeps it; [`Stored::unpack`] gives the object back.
#[derive(Clone)]
pub struct Stored {
    /// The name and namespace only: all the store and the controller key objects by.
    meta: ObjectMeta,
    /// The hash the trigger predicate compares (see `controller::trigger_hash`).
    trigger: u64,
    body: Body,
}

#[derive(Clone)]
enum Body {
    /// The object's JSON, compressed against [`dictionary`] with its length prepended.
    Packed(Box<[u8]>),
    /// An object that is not a valid ConnectionOverride, as the watch delivered it.
    Invalid(Box<InvalidObject>),
}

impl Stored {
    /// Packs `guard`; `trigger` is its trigger hash, computed from the whole object.
    pub fn new(guard: DeserializeGuard<ConnectionOverride>, trigger: u64) -> Self {
        let meta = guard.meta();
        let meta = ObjectMeta {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            ..ObjectMeta::default()
        };
        let body = match guard.0 {
            Ok(obj) => match serde_json::to_vec(&obj) {
                Ok(json) => Body::Packed(
                    lz4_flex::block::compress_prepend_size_with_dict(&json, dictionary())
                        .into_boxed_slice(),
                ),
                // Unreachable for a type that was just deserialized; kept readable rather
                // than lost.
                Err(e) => Body::Invalid(Box::new(InvalidObject {
                    error: format!("the operator could not keep this object: {e}"),
                    metadata: obj.metadata,
                })),
            },
            Err(invalid) => Body::Invalid(Box::new(invalid)),
        };
        Stored {
            meta,
            trigger,
            body,
        }
    }

    /// The object as the watch delivered it (after `controller::slim`).
    pub fn unpack(&self) -> DeserializeGuard<ConnectionOverride> {
        match &self.body {
            Body::Invalid(invalid) => DeserializeGuard(Err((**invalid).clone())),
            Body::Packed(bytes) => {
                let obj = lz4_flex::block::decompress_size_prepended_with_dict(bytes, dictionary())
                    .map_err(|e| e.to_string())
                    .and_then(|json| {
                        serde_json::from_slice::<ConnectionOverride>(&json)
                            .map_err(|e| e.to_string())
                    });
                DeserializeGuard(obj.map_err(|error| InvalidObject {
                    error: format!(
                        "the operator could not read back its copy of this object: {error}"
                    ),
                    metadata: self.meta.clone(),
                }))
            }
        }
    }

    /// The trigger hash given to [`Stored::new`].
    pub fn trigger(&self) -> u64 {
        self.trigger
    }

    /// Bytes of heap this copy holds beyond its struct (for tests and the benchmark notes).
    pub fn heap_bytes(&self) -> usize {
        let strings = [&self.meta.name, &self.meta.namespace]
            .iter()
            .map(|s| s.as_ref().map_or(0, String::len))
            .sum::<usize>();
        strings
            + match &self.body {
                Body::Packed(bytes) => bytes.len(),
                Body::Invalid(_) => std::mem::size_of::<InvalidObject>(),
            }
    }
}

/// The same event with its object packed; `trigger` computes the hash kept beside it.
pub fn pack_event(
    event: watcher::Event<DeserializeGuard<ConnectionOverride>>,
    trigger: impl Fn(&DeserializeGuard<ConnectionOverride>) -> u64,
) -> watcher::Event<Stored> {
    let pack = |guard: DeserializeGuard<ConnectionOverride>| {
        let hash = trigger(&guard);
        Stored::new(guard, hash)
    };
    match event {
        watcher::Event::Apply(obj) => watcher::Event::Apply(pack(obj)),
        watcher::Event::Delete(obj) => watcher::Event::Delete(pack(obj)),
        watcher::Event::InitApply(obj) => watcher::Event::InitApply(pack(obj)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Never prints the object: only which one it is and how much it holds.
impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("namespace", &self.meta.namespace)
            .field("name", &self.meta.name)
            .field("valid", &matches!(self.body, Body::Packed(_)))
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

/// `Controller` asks that its objects can be deserialized; a `Stored` read from JSON is the
/// ConnectionOverride it holds, packed, with a trigger hash of 0 (the operator's own watch
/// packs with the real hash, see `controller::override_stream`).
impl<'de> Deserialize<'de> for Stored {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        DeserializeGuard::<ConnectionOverride>::deserialize(deserializer)
            .map(|guard| Stored::new(guard, 0))
    }
}

impl Resource for Stored {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        ConnectionOverride::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        ConnectionOverride::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        ConnectionOverride::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        ConnectionOverride::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// What every stored ConnectionOverride has in common, as LZ4's external dictionary: the
/// field names, the operator's annotation, finalizer and condition phrases, in the shape the
/// API server returns them. An object is compressed as the differences from it. Fixed for
/// the process (the packed bytes never leave it), so it can change freely between versions.
fn dictionary() -> &'static [u8] {
    static DICTIONARY: OnceLock<Vec<u8>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        let template = serde_json::json!({
            "apiVersion": "dpc-operator.io/v1alpha1",
            "kind": "ConnectionOverride",
            "metadata": {
                "annotations": {"dpc-operator.io/create-pending": "https://eu1.api.matillion.com/dpc"},
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "finalizers": ["dpc-operator.io/cleanup"],
                "generation": 1,
                "labels": {"app.kubernetes.io/name": "", "app.kubernetes.io/instance": ""},
                "name": "",
                "namespace": "",
                "resourceVersion": "1",
                "uid": "00000000-0000-0000-0000-000000000000"
            },
            "spec": {
                "accountRef": {"kind": "ClusterDpcAccount", "name": "", "namespace": ""},
                "authType": "",
                "connectionName": "",
                "connectionOverrides": {
                    "connectionProperties": {"secretName": "", "secretKey": ""},
                    "connectionPropertiesFrom": [
                        {"property": "secretKey", "secretKeyRef": {"key": "", "name": ""}},
                        {"property": "", "configMapKeyRef": {"key": "", "name": ""}}
                    ],
                    "secretsLocation": {"region": "eu-west-1", "type": "AWS_SECRET_MANAGER"}
                },
                "deletionPolicy": "Delete",
                "driftPolicy": "Correct",
                "environmentName": "",
                "managementPolicy": "Manage",
                "projectId": "00000000-0000-0000-0000-000000000000",
                "syncInterval": ""
            },
            "status": {
                "appliedHash": "sha256:",
                "conditions": [
                    {"lastTransitionTime": "2026-01-01T00:00:00Z",
                     "message": "DPC holds the desired override of connection  in environment ",
                     "observedGeneration": 1, "reason": "Available", "status": "True", "type": "Ready"},
                    {"lastTransitionTime": "2026-01-01T00:00:00Z", "message": "",
                     "observedGeneration": 1, "reason": "ReconcileSuccess", "status": "True", "type": "Synced"},
                    {"lastTransitionTime": "2026-01-01T00:00:00Z", "message": "",
                     "observedGeneration": 1, "reason": "", "status": "False", "type": "Drifted"}
                ],
                "lastHandledReconcileAt": "",
                "lastSyncTime": "2026-01-01T00:00:00Z",
                "managedOverride": {
                    "accountId": "",
                    "apiUrl": "https://eu1.api.matillion.com/dpc",
                    "claimedAt": "2026-01-01T00:00:00.000000Z",
                    "connectionName": "",
                    "environmentName": "",
                    "projectId": "00000000-0000-0000-0000-000000000000"
                },
                "observedGeneration": 1,
                "remote": {
                    "authProvider": "NONE",
                    "authType": "GENERIC_SECRET",
                    "createdBy": "",
                    "createdDate": "2026-01-01T00:00:00.000000000Z",
                    "platformConnectionType": "COMPONENT_BASIC"
                }
            }
        });
        serde_json::to_vec(&template).expect("a JSON value serializes")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::{READY, Reason, SYNCED, set_condition};
    use crate::api::fixtures::{PROJECT, override_spec};
    use crate::api::{ConnectionOverrideStatus, ManagedOverride};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use k8s_openapi::jiff::Timestamp;

    fn converged() -> ConnectionOverride {
        let spec = override_spec("acct", "PROD", "Salesforce")
            .in_aws("eu-west-1")
            .with_literal("secretName", "prod/salesforce")
            .with_secret_value("secretKey", "salesforce-refs", "key");
        let mut obj = ConnectionOverride::new("salesforce-prod", spec);
        obj.metadata.namespace = Some("data-platform".into());
        obj.metadata.uid = Some("fa4c7ed9-5365-45eb-afc3-51c41179400a".into());
        obj.metadata.resource_version = Some("18".into());
        obj.metadata.generation = Some(1);
        obj.metadata.finalizers = Some(vec!["dpc-operator.io/cleanup".into()]);
        let now = Timestamp::from_second(1_796_000_000).unwrap();
        let mut conditions = Vec::new();
        let message = "DPC holds the desired override of connection Salesforce in environment PROD";
        let at = Time(now);
        for (type_, reason, message) in [
            (READY, Reason::Available, message),
            (SYNCED, Reason::ReconcileSuccess, ""),
        ] {
            set_condition(&mut conditions, type_, true, reason, message, Some(1), &at);
        }
        obj.status = Some(ConnectionOverrideStatus {
            conditions,
            observed_generation: Some(1),
            applied_hash: Some(format!("sha256:{}", "ab".repeat(32))),
            last_sync_time: Some(Time(now)),
            managed_override: Some(ManagedOverride {
                api_url: "https://eu1.api.matillion.com/dpc".into(),
                account_id: None,
                project_id: PROJECT.into(),
                environment_name: "PROD".into(),
                connection_name: "Salesforce".into(),
                claimed_at: MicroTime(now),
            }),
            ..ConnectionOverrideStatus::default()
        });
        obj
    }

    #[test]
    fn an_object_unpacks_to_what_was_packed() {
        let obj = converged();
        let stored = Stored::new(DeserializeGuard(Ok(obj.clone())), 42);
        assert_eq!(stored.trigger(), 42);
        assert_eq!(stored.meta().name.as_deref(), Some("salesforce-prod"));
        assert_eq!(stored.meta().namespace.as_deref(), Some("data-platform"));
        // Only the key stays unpacked.
        assert_eq!(stored.meta().uid, None);
        let back = stored.unpack().0.expect("a valid object");
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&obj).unwrap()
        );
        assert_eq!(back.spec, obj.spec);
        assert_eq!(back.status, obj.status);
    }

    #[test]
    fn a_typical_object_is_kept_in_under_a_third_of_its_json() {
        let obj = converged();
        let json = serde_json::to_vec(&obj).unwrap().len();
        let stored = Stored::new(DeserializeGuard(Ok(obj)), 0);
        assert!(
            stored.heap_bytes() * 3 < json,
            "{} bytes kept for {json} bytes of JSON",
            stored.heap_bytes()
        );
    }

    #[test]
    fn an_invalid_object_keeps_its_error_and_metadata() {
        let invalid = InvalidObject {
            error: "spec.projectId: invalid type".into(),
            metadata: ObjectMeta {
                name: Some("broken".into()),
                namespace: Some("team-a".into()),
                uid: Some("u-1".into()),
                ..ObjectMeta::default()
            },
        };
        let stored = Stored::new(DeserializeGuard(Err(invalid)), 7);
        assert_eq!(stored.meta().name.as_deref(), Some("broken"));
        let err = stored.unpack().0.expect_err("still invalid");
        assert_eq!(err.error, "spec.projectId: invalid type");
        assert_eq!(err.metadata.uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn debug_names_the_object_and_nothing_of_its_content() {
        let stored = Stored::new(DeserializeGuard(Ok(converged())), 0);
        let text = format!("{stored:?}");
        assert!(text.contains("salesforce-prod"), "{text}");
        assert!(!text.contains("prod/salesforce"), "{text}");
        assert!(!text.contains("salesforce-refs"), "{text}");
    }

    #[test]
    fn deserializing_a_stored_object_packs_it() {
        let json = serde_json::to_value(converged()).unwrap();
        let stored: Stored = serde_json::from_value(json).unwrap();
        let back = stored.unpack().0.expect("a valid object");
        assert_eq!(back.spec, converged().spec);
    }
}
