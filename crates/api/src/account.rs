//! The `DpcAccount` resource: where and as whom to call DPC.
// clippy reads the repeated `type_` keys of the derive's printcolumn(...) entries as
// duplicated attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where and as whom dpc-operator calls the Data Productivity Cloud API: the region (or an
/// explicit API URL) and the Secret holding an API client id and client secret.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dpc-operator.io",
    version = "v1alpha1",
    kind = "DpcAccount",
    namespaced,
    shortname = "dpcacct",
    category = "dpc",
    status = "DpcAccountStatus",
    derive = "PartialEq",
    doc = "DpcAccount says where and as whom dpc-operator calls the Matillion Data Productivity Cloud API. ConnectionOverrides in the same namespace refer to it by name.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.region) || has(self.apiUrl)").message("one of region and apiUrl is required"))]
pub struct DpcAccountSpec {
    /// The DPC region of the account: eu1 or us1. The API is then
    /// https://{region}.api.matillion.com/dpc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,

    /// The API base URL, overriding the one derived from region (for example a proxy).
    /// Must be https unless the operator runs with --allow-insecure-http.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub api_url: Option<String>,

    /// The OAuth2 token endpoint. Default: https://id.core.matillion.com/oauth/dpc/token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub token_url: Option<String>,

    /// The audience sent with the token request. Default: https://api.matillion.com.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub audience: Option<String>,

    /// The Secret, in the same namespace, holding the API client id and client secret.
    pub credentials_secret_ref: CredentialsSecretRef,

    /// The DPC account id, sent as the account-id header when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,

    /// The most requests per minute the operator sends to DPC for this account, shared by
    /// all its ConnectionOverrides. Default 60 (the lower of the documented limits); DPC's
    /// current documented limit is 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Kubernetes knows the formats int32 and int64, not schemars' uint32 (the API server
    // warns about it on every CRD apply).
    #[schemars(range(min = 1, max = 2147483647), extend("format" = "int32"))]
    pub requests_per_minute: Option<u32>,

    /// How many requests may go out at once before the per-minute rate applies. Default 5
    /// (the documented burst).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2147483647), extend("format" = "int32"))]
    pub request_burst: Option<u32>,
}

/// The default request rate of an account, per minute.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 60;
/// The default burst of an account.
pub const DEFAULT_REQUEST_BURST: u32 = 5;

impl DpcAccountSpec {
    /// The request rate with its default applied.
    pub fn requests_per_minute(&self) -> u32 {
        self.requests_per_minute
            .unwrap_or(DEFAULT_REQUESTS_PER_MINUTE)
            .max(1)
    }

    /// The burst with its default applied.
    pub fn request_burst(&self) -> u32 {
        self.request_burst.unwrap_or(DEFAULT_REQUEST_BURST).max(1)
    }
}

/// The DPC regions.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    Eu1,
    Us1,
}

impl Region {
    /// The region's name as it appears in host names.
    pub fn as_str(self) -> &'static str {
        match self {
            Region::Eu1 => "eu1",
            Region::Us1 => "us1",
        }
    }
}

/// The Secret holding the API credentials, and the keys inside it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The Secret's namespace. Required for a ClusterDpcAccount; for a DpcAccount it must be
    /// the account's own namespace when set (other namespaces are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The key holding the client id. Default: client_id.
    #[serde(default = "default_client_id_key")]
    #[schemars(length(min = 1))]
    pub client_id_key: String,
    /// The key holding the client secret. Default: client_secret.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1))]
    pub client_secret_key: String,
}

impl CredentialsSecretRef {
    /// The Secret `name` of the account's own namespace, with the default keys.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.into(),
            namespace: None,
            client_id_key: default_client_id_key(),
            client_secret_key: default_client_secret_key(),
        }
    }
}

fn default_client_id_key() -> String {
    "client_id".into()
}

fn default_client_secret_key() -> String {
    "client_secret".into()
}

/// Observed state of the account, written by dpc-operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DpcAccountStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready says whether an access token could be obtained with these credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// An account shared by several namespaces: where and as whom to call DPC, like a
/// DpcAccount, plus which namespaces may use it. Its credentials Secret names its namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dpc-operator.io",
    version = "v1alpha1",
    kind = "ClusterDpcAccount",
    shortname = "cdpcacct",
    category = "dpc",
    status = "DpcAccountStatus",
    derive = "PartialEq",
    doc = "ClusterDpcAccount is a DpcAccount shared by several namespaces: ConnectionOverrides refer to it with accountRef.kind ClusterDpcAccount, from the namespaces its allowedNamespaces list.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.credentialsSecretRef.namespace)").message("credentialsSecretRef.namespace is required for a ClusterDpcAccount"))]
pub struct ClusterDpcAccountSpec {
    /// Where and as whom to call DPC: the same fields as a DpcAccount.
    #[serde(flatten)]
    pub account: DpcAccountSpec,

    /// The namespaces whose ConnectionOverrides may use this account: listed by name, or
    /// matched by labels. When both are empty no namespace may use it.
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,

    /// The DPC projects (ids) ConnectionOverrides may name with this account. Empty: any
    /// project the account's credentials reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_projects: Vec<String>,
}

/// Which namespaces may use a ClusterDpcAccount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// Namespaces allowed by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Namespaces allowed by their labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}
