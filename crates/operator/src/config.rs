//! The flags and environment variables of `dpc-operator run`, and the operator configuration
//! they make.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::api::duration::parse_duration;
use crate::dpc::ClientSettings;
use crate::leader::LeaseConfig;
use crate::telemetry::LogFormat;

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Namespaces to watch, comma-separated; all namespaces when empty.
    #[arg(long, env = "DPC_OPERATOR_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Log format: json, text, or auto (text on a terminal, JSON otherwise).
    #[arg(
        long,
        env = "DPC_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    pub log_format: LogFormat,
    /// How many objects call DPC at once; twice as many are reconciled at once, so that
    /// passes writing their status do not hold up the next DPC calls.
    #[arg(long, env = "DPC_OPERATOR_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
    /// Allow plain-http DPC endpoints in DpcAccounts (tests and sandboxes only).
    #[arg(long, env = "DPC_OPERATOR_ALLOW_INSECURE_HTTP")]
    pub allow_insecure_http: bool,
    /// The DPC hosts a DpcAccount's apiUrl and tokenUrl may name, comma-separated: exact
    /// names or *.domain. Accounts naming other hosts are refused, so a tenant who may create
    /// a DpcAccount cannot send credentials or values read from Secrets anywhere else.
    #[arg(
        long,
        env = "DPC_OPERATOR_ALLOWED_HOSTS",
        value_delimiter = ',',
        default_value = "*.matillion.com"
    )]
    pub dpc_allowed_hosts: Vec<String>,
    /// The namespaces a ClusterDpcAccount's credentials Secret may be in, comma-separated.
    /// Default: the operator's own namespace ($POD_NAMESPACE). Whoever may create a
    /// ClusterDpcAccount may make the operator read Secrets there.
    #[arg(
        long,
        env = "DPC_OPERATOR_CLUSTER_CREDENTIALS_NAMESPACES",
        value_delimiter = ','
    )]
    pub cluster_credentials_namespaces: Vec<String>,
    /// Only ConnectionOverrides matching this label selector (to shard objects over several
    /// installs), e.g. shard=a.
    #[arg(long, env = "DPC_OPERATOR_SELECTOR")]
    pub selector: Option<String>,
    /// How often a Ready object is reconciled again locally (no DPC call; drift detection
    /// follows each object's spec.syncInterval).
    #[arg(long, env = "DPC_OPERATOR_RESYNC_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub resync_interval: Duration,
    /// The shortest spec.syncInterval honoured (the CRD refuses less than 30s; lower it only
    /// for tests).
    #[arg(long, env = "DPC_OPERATOR_MIN_SYNC_INTERVAL", default_value = "30s", value_parser = parse_duration, hide = true)]
    pub min_sync_interval: Duration,
    /// The drift-check interval of objects without spec.syncInterval (the benchmark and the
    /// soak shorten it; objects cannot ask for less than 30s).
    #[arg(long, env = "DPC_OPERATOR_DEFAULT_SYNC_INTERVAL", default_value = "10m", value_parser = parse_duration, hide = true)]
    pub default_sync_interval: Duration,
    /// How long a list answer of DPC serves other objects of its environment (tests widen
    /// it to make sharing certain).
    #[arg(long, env = "DPC_OPERATOR_DRIFT_SHARE_WINDOW", default_value = "2s", value_parser = parse_duration, hide = true)]
    pub drift_share_window: Duration,
    /// First retry delay after a transient DPC failure (doubles up to --backoff-max).
    #[arg(long, env = "DPC_OPERATOR_BACKOFF_BASE", default_value = "1s", value_parser = parse_duration)]
    pub backoff_base: Duration,
    /// Longest retry delay after transient failures.
    #[arg(long, env = "DPC_OPERATOR_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub backoff_max: Duration,
    /// Timeout of one DPC request.
    #[arg(long, env = "DPC_OPERATOR_DPC_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub dpc_timeout: Duration,
    /// A kubeconfig file; default: $KUBECONFIG, ~/.kube/config, or the in-cluster configuration.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Export reconcile and DPC-request spans to this OTLP/HTTP collector (off when unset).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Address of the admin endpoints (/livez, /readyz, /metrics).
    #[arg(long, env = "DPC_OPERATOR_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,
    /// `/readyz` answers 503 once a watch has failed for longer than this (the operator is
    /// blind to that watch's changes); `dpc_operator_watch_failing_seconds` shows it too.
    #[arg(long, env = "DPC_OPERATOR_WATCH_BLIND_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub watch_blind_after: Duration,
    /// Do not export the per-object condition gauge (one series per object and condition).
    #[arg(long, env = "DPC_OPERATOR_NO_PER_OBJECT_METRICS")]
    pub no_per_object_metrics: bool,
    /// Elect a leader among replicas with a Lease; only the leader reconciles.
    #[arg(long, env = "DPC_OPERATOR_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else default).
    #[arg(long, env = "DPC_OPERATOR_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "DPC_OPERATOR_LEADER_ELECTION_ID",
        default_value = "dpc-operator"
    )]
    pub leader_election_id: String,
    /// A lease not renewed for this long is taken over by another replica.
    #[arg(long, env = "DPC_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// How often the leader renews its lease.
    #[arg(long, env = "DPC_OPERATOR_LEASE_RENEW_PERIOD", default_value = "5s", value_parser = parse_duration)]
    pub lease_renew_period: Duration,
    /// How often a follower tries to take the lease.
    #[arg(long, env = "DPC_OPERATOR_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry_period: Duration,
}

impl RunArgs {
    pub fn operator_config(&self) -> OperatorConfig {
        OperatorConfig {
            namespaces: self
                .namespaces
                .iter()
                .filter(|n| !n.is_empty())
                .cloned()
                .collect(),
            concurrency: self.concurrency.max(1),
            allow_insecure_http: self.allow_insecure_http,
            allowed_hosts: self
                .dpc_allowed_hosts
                .iter()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect(),
            resync_interval: self.resync_interval,
            min_sync_interval: self.min_sync_interval,
            default_sync_interval: self.default_sync_interval,
            drift_share_window: self.drift_share_window,
            label_selector: self.selector.clone().filter(|s| !s.is_empty()),
            per_object_metrics: !self.no_per_object_metrics,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            dpc_request_timeout: self.dpc_timeout,
            instance: std::env::var("POD_NAME")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok()),
            operator_namespace: std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty()),
            cluster_credentials_namespaces: self
                .cluster_credentials_namespaces
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect(),
            ..OperatorConfig::default()
        }
    }

    /// The Lease this replica competes for, and its name in it: the Pod's name, else the host
    /// name with the process id.
    pub fn lease_config(&self) -> LeaseConfig {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "dpc-operator".into());
            format!("{host}-{}", std::process::id())
        });
        LeaseConfig {
            namespace: self
                .leader_election_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into()),
            name: self.leader_election_id.clone(),
            identity,
            lease_duration: self.lease_duration,
            renew_period: self.lease_renew_period,
            retry_period: self.lease_retry_period,
        }
    }
}

/// The operator's settings.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// How many objects call DPC at once (the controller runs
    /// [`crate::context::PASSES_PER_DPC_SLOT`] times as many passes).
    pub concurrency: u16,
    /// Allow plain-http DPC endpoints (tests and the sandbox only).
    pub allow_insecure_http: bool,
    /// The DPC hosts accounts may name (see [`ClientSettings::allowed_hosts`]).
    pub allowed_hosts: Vec<String>,
    /// Export the per-object condition gauge (one series per object and condition).
    pub per_object_metrics: bool,
    /// How often a Ready object is reconciled again locally (no DPC call: drift detection
    /// reads DPC on its own schedule).
    pub resync_interval: Duration,
    /// The sync interval of objects that set none.
    pub default_sync_interval: Duration,
    /// The shortest sync interval honoured (the CRD also refuses less than 30s).
    pub min_sync_interval: Duration,
    /// A list answer younger than this serves immediate reads of other objects too.
    pub drift_share_window: Duration,
    /// Only ConnectionOverrides with these labels (a label selector), for sharding.
    pub label_selector: Option<String>,
    /// A request whose rate-limit slot is further than this is requeued for its slot.
    pub max_admission_wait: Duration,
    /// First delay after a transient failure; it doubles up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Timeout of one DPC request.
    pub dpc_request_timeout: Duration,
    /// The name that reports Events.
    pub reporter: String,
    /// This instance (pod name), in Events.
    pub instance: Option<String>,
    /// The operator's own namespace ($POD_NAMESPACE): where ClusterDpcAccount credentials
    /// live unless `cluster_credentials_namespaces` says otherwise.
    pub operator_namespace: Option<String>,
    /// The namespaces a ClusterDpcAccount's credentials Secret may be in. Empty: the
    /// operator's own namespace only.
    pub cluster_credentials_namespaces: Vec<String>,
}

impl OperatorConfig {
    /// The namespaces ClusterDpcAccount credentials may be read from.
    pub fn cluster_credentials_namespaces(&self) -> Vec<String> {
        if self.cluster_credentials_namespaces.is_empty() {
            self.operator_namespace.iter().cloned().collect()
        } else {
            self.cluster_credentials_namespaces.clone()
        }
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            concurrency: 8,
            allow_insecure_http: false,
            allowed_hosts: ClientSettings::default().allowed_hosts,
            per_object_metrics: true,
            resync_interval: Duration::from_secs(3600),
            default_sync_interval: Duration::from_secs(600),
            min_sync_interval: Duration::from_secs(30),
            drift_share_window: Duration::from_secs(2),
            label_selector: None,
            max_admission_wait: Duration::from_secs(5),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            dpc_request_timeout: Duration::from_secs(30),
            reporter: "dpc-operator".into(),
            instance: None,
            operator_namespace: None,
            cluster_credentials_namespaces: Vec::new(),
        }
    }
}
