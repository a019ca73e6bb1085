//! The `ConnectionOverride` resource: one environment connection override in DPC.
// clippy reads the repeated `type_` keys of the derive's printcolumn(...) entries as
// duplicated attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The longest spec.syncInterval.
pub const MAX_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The longest spec.deletionTimeout.
pub const MAX_DELETION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8760 * 3600);

/// The pattern DPC itself applies to project ids: a lower-case hexadecimal UUID.
pub const PROJECT_ID_PATTERN: &str =
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$";

/// Desired state of one Matillion Data Productivity Cloud environment connection override:
/// in environment `environmentName` of project `projectId`, the project connection
/// `connectionName` uses the secret reference given in `connectionOverrides`.
/// Together with the account, `projectId`, `environmentName` and `connectionName` name the
/// remote override; they cannot be changed after creation (delete and create a new object instead).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dpc-operator.io",
    version = "v1alpha1",
    kind = "ConnectionOverride",
    namespaced,
    shortname = "cov",
    category = "dpc",
    status = "ConnectionOverrideStatus",
    derive = "PartialEq",
    doc = "ConnectionOverride declares a Matillion Data Productivity Cloud environment connection override. dpc-operator creates or updates the override in DPC to match the spec, and reports the outcome in status.conditions (Ready, Synced).",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Synced",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Synced\")].status"
    ),
    printcolumn(
        name = "Environment",
        type_ = "string",
        json_path = ".spec.environmentName"
    ),
    printcolumn(
        name = "Connection",
        type_ = "string",
        json_path = ".spec.connectionName"
    ),
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
pub struct ConnectionOverrideSpec {
    /// The DpcAccount (in the same namespace) that says where and as whom to call DPC.
    /// Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("accountRef is immutable"))]
    pub account_ref: AccountRef,

    /// The DPC project id: a lower-case UUID. Immutable.
    #[schemars(pattern(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("projectId is immutable"))]
    pub project_id: String,

    /// The name of the DPC environment the override applies in, for example PROD. Immutable.
    #[schemars(length(min = 1))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("environmentName is immutable"))]
    pub environment_name: String,

    /// The name of the existing project connection whose values are overridden. Immutable.
    /// May not contain a comma: DPC's delete call takes a comma-separated list of names.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("connectionName is immutable"))]
    #[x_kube(validation = Rule::new("!self.contains(',')").message("connectionName may not contain a comma: DPC deletes overrides by a comma-separated list of names, so the name would be read as several"))]
    pub connection_name: String,

    /// The authentication type of the parent connection. Sent to DPC when set; it must
    /// equal the parent connection's authType.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<AuthType>,

    /// The override itself: where the secret lives and which secret (and key) to use.
    pub connection_overrides: ConnectionOverridesSpec,

    /// What happens to the remote override when this object is deleted: Delete (the default)
    /// removes it from DPC, Orphan leaves it in place. The annotation
    /// dpc-operator.io/force-orphan: "true" releases a deletion that cannot reach DPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,

    /// How often the override is read back from DPC to detect changes made outside
    /// Kubernetes, as a duration such as 10m or 1h30m. Default 10m; at least 30s. Reads are
    /// shared: one list call per account, project and environment serves every object in it.
    /// At most 24h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('30s')").message("syncInterval must be at least 30s"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('24h')").message("syncInterval must be at most 24h"))]
    pub sync_interval: Option<String>,

    /// What to do when the override in DPC no longer matches: Correct (the default) writes the
    /// desired state back; Report only sets the Drifted condition, naming the fields that differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_policy: Option<DriftPolicy>,

    /// Manage (the default) creates, updates and deletes the override. ObserveOnly never
    /// writes to DPC: Ready then says whether DPC holds what the spec describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_policy: Option<ManagementPolicy>,

    /// With deletionPolicy Delete: how long a deletion may keep failing to reach DPC before the
    /// object is released anyway (the remote override is then left in place, and a Warning
    /// Event says so). A duration such as 15m, at most 8760h (a year); unset means wait until
    /// DPC answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), pattern(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('8760h')").message("deletionTimeout must be at most 8760h"))]
    pub deletion_timeout: Option<String>,
}

/// A reference to the account to use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccountRef {
    /// Name of a DpcAccount in the same namespace as this object, or of a ClusterDpcAccount.
    #[schemars(length(min = 1))]
    pub name: String,
    /// DpcAccount (the default) or ClusterDpcAccount. A ClusterDpcAccount may be used only
    /// from the namespaces it allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<AccountKind>,
    /// Must be this object's own namespace when set: references to DpcAccounts in other
    /// namespaces are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

// The kinds of account a ConnectionOverride can use (documented on the field).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum AccountKind {
    #[default]
    DpcAccount,
    ClusterDpcAccount,
}

// Whether drift is written back or only reported (documented on the field).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DriftPolicy {
    #[default]
    Correct,
    Report,
}

// Whether the operator writes to DPC (documented on the field).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ManagementPolicy {
    #[default]
    Manage,
    ObserveOnly,
}

/// The authentication types DPC documents for connections.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthType {
    GenericSecret,
    CloudProviderSecret,
    OauthUserTokens,
    OauthAuthorizationCode,
    OauthClientCred,
    CompositeToken,
    #[serde(rename = "OAUTH_1_0_X_ADS")]
    Oauth10XAds,
}

impl AuthType {
    /// The value DPC uses on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::GenericSecret => "GENERIC_SECRET",
            AuthType::CloudProviderSecret => "CLOUD_PROVIDER_SECRET",
            AuthType::OauthUserTokens => "OAUTH_USER_TOKENS",
            AuthType::OauthAuthorizationCode => "OAUTH_AUTHORIZATION_CODE",
            AuthType::OauthClientCred => "OAUTH_CLIENT_CRED",
            AuthType::CompositeToken => "COMPOSITE_TOKEN",
            AuthType::Oauth10XAds => "OAUTH_1_0_X_ADS",
        }
    }
}

// What to do with the remote override when the object is deleted (documented on the field).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum DeletionPolicy {
    /// Delete the override in DPC, then release the object.
    #[default]
    Delete,
    /// Leave the override in DPC and release the object.
    Orphan,
}

/// The override's values. Properties come either literally (`connectionProperties`) or from a
/// Secret or ConfigMap key in this namespace (`connectionPropertiesFrom`); a property may not be
/// named in both.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.connectionPropertiesFrom) || !has(self.connectionProperties) || self.connectionPropertiesFrom.all(p, !(p.property in self.connectionProperties))"
).message("a property may not be set both in connectionProperties and in connectionPropertiesFrom"))]
#[x_kube(validation = Rule::new(
    "(has(self.connectionProperties) && size(self.connectionProperties) > 0) || (has(self.connectionPropertiesFrom) && size(self.connectionPropertiesFrom) > 0)"
).message("at least one property is required in connectionProperties or connectionPropertiesFrom"))]
pub struct ConnectionOverridesSpec {
    /// Where the referenced secret lives, for example {type: AWS_SECRET_MANAGER, region: eu-west-1}.
    /// When omitted DPC uses the vault configured on the environment's agent. Fields other than
    /// type and region are passed to DPC unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_location: Option<SecretsLocation>,

    /// Literal properties sent as they are, for example secretName and secretKey. These are
    /// references to a secret in a vault, never the secret value itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub connection_properties: BTreeMap<String, String>,

    /// Properties whose values are read from a Secret or ConfigMap key in this namespace.
    /// A change of that Secret or ConfigMap updates the override in DPC.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["property".into()]))]
    pub connection_properties_from: Vec<PropertyFrom>,
}

/// Where the secret referenced by an override lives. `type` is an open string (DPC documents
/// AWS_SECRET_MANAGER; other vault types are passed through) and unknown fields are kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretsLocation {
    /// The vault type, for example AWS_SECRET_MANAGER.
    #[serde(rename = "type")]
    pub type_: String,
    /// The vault's region, for AWS Secrets Manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Any further location fields, passed to DPC unchanged.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl JsonSchema for SecretsLocation {
    fn schema_name() -> Cow<'static, str> {
        "SecretsLocation".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Where the referenced secret lives, for example {type: AWS_SECRET_MANAGER, region: eu-west-1}. Fields other than type and region are passed to DPC unchanged.",
            "type": "object",
            "required": ["type"],
            "properties": {
                "type": {
                    "description": "The vault type, for example AWS_SECRET_MANAGER.",
                    "type": "string",
                    "minLength": 1
                },
                "region": {
                    "description": "The vault's region, for AWS Secrets Manager.",
                    "type": "string"
                }
            },
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

/// One property whose value is read from the cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretKeyRef) != has(self.configMapKeyRef)")
    .message("exactly one of secretKeyRef and configMapKeyRef must be set"))]
pub struct PropertyFrom {
    /// The property name in connectionProperties, for example secretName.
    #[schemars(length(min = 1))]
    pub property: String,
    /// Read the value from this key of a Secret in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<KeySelector>,
    /// Read the value from this key of a ConfigMap in the same namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<KeySelector>,
}

/// A key of a Secret or ConfigMap in the object's own namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct KeySelector {
    /// Name of the Secret or ConfigMap.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key inside it.
    #[schemars(length(min = 1))]
    pub key: String,
    /// Must be this object's own namespace when set: references to Secrets and ConfigMaps
    /// in other namespaces are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Observed state, written by dpc-operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionOverrideStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready says whether DPC holds the desired override; Synced whether the last
    /// reconciliation succeeded. The reason says why; see the README for every reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Digest (sha256) of the request body DPC last accepted for this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_hash: Option<String>,

    /// When DPC last accepted a write for this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,

    /// What DPC reported about the override in its last answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteStatus>,

    /// The value of the dpc-operator.io/reconcile-requested-at annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,

    /// The remote override this object manages, recorded when it first did. Another object
    /// naming the same override never takes it over, and a deletion deletes this override
    /// (even if the spec was changed to name another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_override: Option<ManagedOverride>,
}

/// The identity of a remote override: where DPC answers, the account, and the project,
/// environment and connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedOverride {
    /// The DPC API base URL the override lives behind.
    pub api_url: String,
    /// The DPC account id sent with the calls, when the account sets one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    pub project_id: String,
    pub environment_name: String,
    pub connection_name: String,
    /// When this object claimed the override (RFC 3339 with microseconds): the earlier claim
    /// wins should two objects ever both hold one.
    pub claimed_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime,
}

impl ManagedOverride {
    /// Whether this names the same remote override as the given parts.
    pub fn names(&self, project_id: &str, environment_name: &str, connection_name: &str) -> bool {
        self.project_id == project_id
            && self.environment_name == environment_name
            && self.connection_name == connection_name
    }
}

/// Fields DPC reports about the override and its parent connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteStatus {
    /// The parent connection's platform type, for example COMPONENT_BASIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_connection_type: Option<String>,
    /// The parent connection's auth provider, for example salesforce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_provider: Option<String>,
    /// The auth type DPC holds for the override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<String>,
    /// Who created the override in DPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// When the override was created in DPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date: Option<String>,
}

impl ConnectionOverrideSpec {
    /// The deletion policy with its default applied.
    pub fn deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy.unwrap_or_default()
    }

    /// The drift policy with its default applied.
    pub fn drift_policy(&self) -> DriftPolicy {
        self.drift_policy.unwrap_or_default()
    }

    /// The management policy with its default applied.
    pub fn management_policy(&self) -> ManagementPolicy {
        self.management_policy.unwrap_or_default()
    }

    /// The account kind with its default applied.
    pub fn account_kind(&self) -> AccountKind {
        self.account_ref.kind.unwrap_or_default()
    }
}
