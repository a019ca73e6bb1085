//! The custom resources of dpc-operator (`dpc-operator.io/v1alpha1`) and their helpers.

pub mod account;
pub mod conditions;
pub mod connection_override;

pub use account::{
    AllowedNamespaces, ClusterDpcAccount, ClusterDpcAccountSpec, CredentialsSecretRef, DpcAccount,
    DpcAccountSpec, DpcAccountStatus, Region,
};
pub use connection_override::{
    AccountKind, AccountRef, AuthType, ConnectionOverride, ConnectionOverrideSpec,
    ConnectionOverrideStatus, ConnectionOverridesSpec, DeletionPolicy, DriftPolicy, KeySelector,
    ManagementPolicy, PropertyFrom, RemoteStatus, SecretsLocation,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every resource here.
pub const GROUP: &str = "dpc-operator.io";
/// The field manager under which the operator writes status (server-side apply).
pub const FIELD_MANAGER: &str = "dpc-operator";
/// The finalizer that guards the remote override.
pub const FINALIZER: &str = "dpc-operator.io/cleanup";
/// Annotation: `"true"` releases a deletion without calling DPC.
pub const FORCE_ORPHAN_ANNOTATION: &str = "dpc-operator.io/force-orphan";
/// Annotation: `"true"` stops every DPC call for the object.
pub const PAUSED_ANNOTATION: &str = "dpc-operator.io/paused";
/// Annotation: a new value asks for a reconcile (with a read of DPC) now.
pub const RECONCILE_REQUESTED_ANNOTATION: &str = "dpc-operator.io/reconcile-requested-at";

/// Every CustomResourceDefinition the operator needs, in install order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        DpcAccount::crd(),
        ClusterDpcAccount::crd(),
        ConnectionOverride::crd(),
    ]
}

/// The CRDs as a multi-document YAML stream, as `crdgen` prints them and `crds/` holds them.
pub fn crds_yaml() -> String {
    crds()
        .iter()
        .map(|crd| {
            let yaml = serde_saphyr::to_string(crd).expect("a CRD serializes to YAML");
            format!("---\n{yaml}")
        })
        .collect()
}
