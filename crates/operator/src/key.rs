//! The one key of a namespaced object, `(namespace, name)`, used by every per-object map of
//! the operator: the context's per-object state, the reverse index, claims, drift members,
//! rate-limit tickets and metric series.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// `(namespace, name)` of an object.
pub type ObjKey = (String, String);

/// The key of the object `meta` describes.
pub fn key_of(meta: &ObjectMeta) -> ObjKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}
