//! Kubernetes' protobuf encoding for the built-in kinds clients send that way (kubectl's typed
//! clients: `create secret`, `create configmap`, `create namespace`, `create token`,
//! `describe`), on top of the generated types of `k8s-pb` and `prost`'s codec.
//!
//! A body is the magic `k8s\0` followed by a `runtime.Unknown` whose `typeMeta` names the kind
//! and whose `raw` is the object's own message. The emulator stores JSON, so each supported
//! message is mapped to and from its JSON form field by field (the [`message!`] table below);
//! a kind not in the table is answered as JSON, as kube-apiserver does for custom resources.

use base64::Engine as _;
use k8s_openapi::jiff::Timestamp;
use k8s_pb::api::authentication::v1 as authn;
use k8s_pb::api::coordination::v1 as coordination;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use prost::Message;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// The media type of Kubernetes protobuf.
pub const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

/// A value with a JSON form.
trait Json: Sized {
    fn to_json(&self) -> Value;
    fn from_json(value: &Value) -> Self;
    /// Go writes every non-pointer field, zero or not; its JSON leaves zero values out.
    fn is_zero(&self) -> bool {
        false
    }
}

/// A message field: absent, empty lists and empty maps are left out of the JSON.
trait Field: Sized {
    fn put(&self) -> Option<Value>;
    fn get(value: Option<&Value>) -> Self;
}

impl<T: Json> Field for Option<T> {
    fn put(&self) -> Option<Value> {
        self.as_ref().filter(|v| !v.is_zero()).map(T::to_json)
    }
    fn get(value: Option<&Value>) -> Self {
        value.filter(|v| !v.is_null()).map(T::from_json)
    }
}

impl<T: Json> Field for Vec<T> {
    fn put(&self) -> Option<Value> {
        (!self.is_empty()).then(|| Value::Array(self.iter().map(T::to_json).collect()))
    }
    fn get(value: Option<&Value>) -> Self {
        value
            .and_then(Value::as_array)
            .map(|items| items.iter().map(T::from_json).collect())
            .unwrap_or_default()
    }
}

impl<T: Json> Field for BTreeMap<String, T> {
    fn put(&self) -> Option<Value> {
        (!self.is_empty())
            .then(|| Value::Object(self.iter().map(|(k, v)| (k.clone(), v.to_json())).collect()))
    }
    fn get(value: Option<&Value>) -> Self {
        value
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), T::from_json(v)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Json for String {
    fn to_json(&self) -> Value {
        Value::String(self.clone())
    }
    fn from_json(value: &Value) -> Self {
        match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    fn is_zero(&self) -> bool {
        self.is_empty()
    }
}

impl Json for i64 {
    fn to_json(&self) -> Value {
        Value::from(*self)
    }
    fn from_json(value: &Value) -> Self {
        value.as_i64().unwrap_or_default()
    }
    fn is_zero(&self) -> bool {
        *self == 0
    }
}

impl Json for i32 {
    fn to_json(&self) -> Value {
        Value::from(*self)
    }
    fn from_json(value: &Value) -> Self {
        value
            .as_i64()
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or_default()
    }
}

impl Json for bool {
    fn to_json(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_json(value: &Value) -> Self {
        value.as_bool().unwrap_or_default()
    }
}

/// `bytes`: base64 in JSON.
impl Json for Vec<u8> {
    fn to_json(&self) -> Value {
        Value::String(base64::engine::general_purpose::STANDARD.encode(self))
    }
    fn from_json(value: &Value) -> Self {
        value
            .as_str()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            .unwrap_or_default()
    }
}

fn timestamp(seconds: Option<i64>, nanos: Option<i32>) -> Option<Timestamp> {
    Timestamp::new(seconds.unwrap_or_default(), nanos.unwrap_or_default()).ok()
}

fn parse_time(value: &Value) -> (Option<i64>, Option<i32>) {
    match value.as_str().and_then(|s| s.parse::<Timestamp>().ok()) {
        Some(t) => (Some(t.as_second()), Some(t.subsec_nanosecond())),
        None => (None, None),
    }
}

/// `Time`: RFC 3339 to the second.
impl Json for meta::Time {
    fn to_json(&self) -> Value {
        let t = timestamp(self.seconds, None).unwrap_or(Timestamp::UNIX_EPOCH);
        Value::String(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
    }
    fn from_json(value: &Value) -> Self {
        let (seconds, _) = parse_time(value);
        Self {
            seconds,
            nanos: None,
        }
    }
    /// Go's zero time travels as an empty message.
    fn is_zero(&self) -> bool {
        self.seconds.unwrap_or_default() == 0 && self.nanos.unwrap_or_default() == 0
    }
}

/// `MicroTime`: RFC 3339 to the microsecond.
impl Json for meta::MicroTime {
    fn to_json(&self) -> Value {
        let t = timestamp(self.seconds, self.nanos).unwrap_or(Timestamp::UNIX_EPOCH);
        Value::String(t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
    }
    fn from_json(value: &Value) -> Self {
        let (seconds, nanos) = parse_time(value);
        Self {
            seconds,
            nanos: nanos.map(|n| n / 1000 * 1000),
        }
    }
    fn is_zero(&self) -> bool {
        self.seconds.unwrap_or_default() == 0 && self.nanos.unwrap_or_default() == 0
    }
}

/// `FieldsV1`: its raw bytes are the JSON of the field set.
impl Json for meta::FieldsV1 {
    fn to_json(&self) -> Value {
        self.raw
            .as_deref()
            .and_then(|raw| serde_json::from_slice(raw).ok())
            .unwrap_or(Value::Object(Map::new()))
    }
    fn from_json(value: &Value) -> Self {
        Self {
            raw: Some(serde_json::to_vec(value).expect("JSON serializes")),
        }
    }
}

/// Maps messages to their JSON forms, field by field: `rust_field: "jsonName"`.
macro_rules! message {
    ($($ty:ty { $($field:ident : $name:literal),* $(,)? })*) => {$(
        impl Json for $ty {
            fn to_json(&self) -> Value {
                let mut out = Map::new();
                $(
                    if let Some(v) = Field::put(&self.$field) {
                        out.insert($name.into(), v);
                    }
                )*
                Value::Object(out)
            }
            fn from_json(value: &Value) -> Self {
                Self { $($field: Field::get(value.get($name)),)* }
            }
        }
    )*};
}

message! {
    meta::ObjectMeta {
        name: "name", generate_name: "generateName", namespace: "namespace",
        self_link: "selfLink", uid: "uid", resource_version: "resourceVersion",
        generation: "generation", creation_timestamp: "creationTimestamp",
        deletion_timestamp: "deletionTimestamp",
        deletion_grace_period_seconds: "deletionGracePeriodSeconds", labels: "labels",
        annotations: "annotations", owner_references: "ownerReferences",
        finalizers: "finalizers", managed_fields: "managedFields",
    }
    meta::ManagedFieldsEntry {
        manager: "manager", operation: "operation", api_version: "apiVersion", time: "time",
        fields_type: "fieldsType", fields_v1: "fieldsV1", subresource: "subresource",
    }
    meta::OwnerReference {
        api_version: "apiVersion", kind: "kind", name: "name", uid: "uid",
        controller: "controller", block_owner_deletion: "blockOwnerDeletion",
    }
    meta::ListMeta {
        self_link: "selfLink", resource_version: "resourceVersion", r#continue: "continue",
        remaining_item_count: "remainingItemCount",
    }
    meta::Status {
        metadata: "metadata", status: "status", message: "message", reason: "reason",
        details: "details", code: "code",
    }
    meta::StatusDetails {
        name: "name", group: "group", kind: "kind", uid: "uid", causes: "causes",
        retry_after_seconds: "retryAfterSeconds",
    }
    meta::StatusCause { reason: "reason", message: "message", field: "field" }
    core::Secret {
        metadata: "metadata", immutable: "immutable", data: "data",
        string_data: "stringData", r#type: "type",
    }
    core::SecretList { metadata: "metadata", items: "items" }
    core::ConfigMap {
        metadata: "metadata", immutable: "immutable", data: "data", binary_data: "binaryData",
    }
    core::ConfigMapList { metadata: "metadata", items: "items" }
    core::Namespace { metadata: "metadata", spec: "spec", status: "status" }
    core::NamespaceList { metadata: "metadata", items: "items" }
    core::NamespaceSpec { finalizers: "finalizers" }
    core::NamespaceStatus { phase: "phase", conditions: "conditions" }
    core::NamespaceCondition {
        r#type: "type", status: "status", last_transition_time: "lastTransitionTime",
        reason: "reason", message: "message",
    }
    core::ServiceAccount {
        metadata: "metadata", secrets: "secrets", image_pull_secrets: "imagePullSecrets",
        automount_service_account_token: "automountServiceAccountToken",
    }
    core::ServiceAccountList { metadata: "metadata", items: "items" }
    core::ObjectReference {
        kind: "kind", namespace: "namespace", name: "name", uid: "uid",
        api_version: "apiVersion", resource_version: "resourceVersion",
        field_path: "fieldPath",
    }
    core::LocalObjectReference { name: "name" }
    core::Event {
        metadata: "metadata", involved_object: "involvedObject", reason: "reason",
        message: "message", source: "source", first_timestamp: "firstTimestamp",
        last_timestamp: "lastTimestamp", count: "count", r#type: "type",
        event_time: "eventTime", series: "series", action: "action", related: "related",
        reporting_component: "reportingComponent", reporting_instance: "reportingInstance",
    }
    core::EventList { metadata: "metadata", items: "items" }
    core::EventSource { component: "component", host: "host" }
    core::EventSeries { count: "count", last_observed_time: "lastObservedTime" }
    coordination::Lease { metadata: "metadata", spec: "spec" }
    coordination::LeaseList { metadata: "metadata", items: "items" }
    coordination::LeaseSpec {
        holder_identity: "holderIdentity", lease_duration_seconds: "leaseDurationSeconds",
        acquire_time: "acquireTime", renew_time: "renewTime",
        lease_transitions: "leaseTransitions", strategy: "strategy",
        preferred_holder: "preferredHolder",
    }
    authn::TokenRequest { metadata: "metadata", spec: "spec", status: "status" }
    authn::TokenRequestSpec {
        audiences: "audiences", expiration_seconds: "expirationSeconds",
        bound_object_ref: "boundObjectRef",
    }
    authn::TokenRequestStatus { token: "token", expiration_timestamp: "expirationTimestamp" }
    authn::BoundObjectReference {
        kind: "kind", api_version: "apiVersion", name: "name", u_id: "uid",
    }
}

/// The kinds with a protobuf form: `(apiVersion, kind)` to the message's codec.
macro_rules! kinds {
    ($(($api:literal, $kind:literal) => $ty:ty,)*) => {
        fn decode_raw(api_version: &str, kind: &str, raw: &[u8]) -> Option<Result<Value, String>> {
            match (api_version, kind) {
                $(($api, $kind) => Some(
                    <$ty>::decode(raw).map(|m| m.to_json()).map_err(|e| e.to_string()),
                ),)*
                _ => None,
            }
        }

        fn encode_raw(api_version: &str, kind: &str, value: &Value) -> Option<Vec<u8>> {
            match (api_version, kind) {
                $(($api, $kind) => Some(<$ty>::from_json(value).encode_to_vec()),)*
                _ => None,
            }
        }
    };
}

kinds! {
    ("v1", "Secret") => core::Secret,
    ("v1", "SecretList") => core::SecretList,
    ("v1", "ConfigMap") => core::ConfigMap,
    ("v1", "ConfigMapList") => core::ConfigMapList,
    ("v1", "Namespace") => core::Namespace,
    ("v1", "NamespaceList") => core::NamespaceList,
    ("v1", "ServiceAccount") => core::ServiceAccount,
    ("v1", "ServiceAccountList") => core::ServiceAccountList,
    ("v1", "Event") => core::Event,
    ("v1", "EventList") => core::EventList,
    ("v1", "Status") => meta::Status,
    ("coordination.k8s.io/v1", "Lease") => coordination::Lease,
    ("coordination.k8s.io/v1", "LeaseList") => coordination::LeaseList,
    ("authentication.k8s.io/v1", "TokenRequest") => authn::TokenRequest,
}

/// Decodes a protobuf request body into the object's JSON form (with `apiVersion` and
/// `kind`), or says why it cannot.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let envelope = body
        .strip_prefix(MAGIC)
        .ok_or("the body does not start with the protobuf magic number")?;
    let unknown = Unknown::decode(envelope).map_err(|e| e.to_string())?;
    let type_meta = unknown.type_meta.unwrap_or_default();
    let api_version = type_meta.api_version.unwrap_or_default();
    let kind = type_meta.kind.unwrap_or_default();
    let raw = unknown.raw.unwrap_or_default();
    let mut value = decode_raw(&api_version, &kind, &raw)
        .ok_or_else(|| format!("no protobuf form for {api_version} {kind}"))??;
    let object = value.as_object_mut().expect("messages map to objects");
    object.insert("apiVersion".into(), Value::String(api_version));
    object.insert("kind".into(), Value::String(kind));
    Ok(value)
}

/// Encodes an answer (by its `apiVersion` and `kind`), or `None` when the kind has no
/// protobuf form and must be answered as JSON.
pub fn encode(value: &Value) -> Option<Vec<u8>> {
    let api_version = value.get("apiVersion")?.as_str()?;
    let kind = value.get("kind")?.as_str()?;
    let raw = encode_raw(api_version, kind, value)?;
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
        }),
        raw: Some(raw),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut out = MAGIC.to_vec();
    unknown.encode(&mut out).expect("a Vec grows");
    Some(out)
}

/// Whether a request's `Accept` header prefers protobuf.
pub fn preferred(accept: Option<&str>) -> bool {
    accept
        .and_then(|a| a.split(',').next())
        .is_some_and(|first| first.trim().starts_with(MEDIA_TYPE) && !first.contains("as="))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_secret_round_trips_through_protobuf() {
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": "demo", "namespace": "ns", "labels": {"a": "b"},
                "creationTimestamp": "2026-11-27T15:08:02Z",
                "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                                   "time": "2026-11-27T15:08:02Z", "fieldsType": "FieldsV1",
                                   "fieldsV1": {"f:data": {"f:key": {}}}}]
            },
            "data": {"key": "dg=="},
            "type": "Opaque"
        });
        let bytes = encode(&secret).unwrap();
        assert!(bytes.starts_with(MAGIC));
        assert_eq!(decode(&bytes).unwrap(), secret);
    }

    #[test]
    fn zero_values_go_writes_are_left_out_of_the_json() {
        let from_go = core::Secret {
            metadata: Some(meta::ObjectMeta {
                name: Some("demo".into()),
                generate_name: Some(String::new()),
                generation: Some(0),
                creation_timestamp: Some(meta::Time::default()),
                ..Default::default()
            }),
            r#type: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(from_go.to_json(), json!({"metadata": {"name": "demo"}}));
    }

    #[test]
    fn micro_times_keep_microseconds_and_kinds_without_a_form_are_json() {
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l"},
            "spec": {"holderIdentity": "me", "renewTime": "2026-11-27T15:08:02.123456Z", "leaseDurationSeconds": 15}
        });
        assert_eq!(decode(&encode(&lease).unwrap()).unwrap(), lease);
        assert!(
            encode(
                &json!({"apiVersion": "dpc.matillion.com/v1alpha1", "kind": "ConnectionOverride"})
            )
            .is_none()
        );
        assert!(decode(b"{}").unwrap_err().contains("magic"));
    }

    #[test]
    fn protobuf_is_preferred_only_when_asked_first() {
        assert!(preferred(Some(
            "application/vnd.kubernetes.protobuf, application/json"
        )));
        assert!(!preferred(Some(
            "application/json, application/vnd.kubernetes.protobuf"
        )));
        assert!(!preferred(Some(
            "application/vnd.kubernetes.protobuf;as=Table;v=v1;g=meta.k8s.io"
        )));
        assert!(!preferred(None));
    }
}
