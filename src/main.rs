//! dpc-operator: parse flags, start telemetry, run the controller (or the sandbox, or a test
//! double). Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dpc_operator::admin::{self, Readiness};
use dpc_operator::controller::{self, Context, OperatorConfig};
use dpc_operator::leader::{self, LeaseConfig};
use dpc_operator::sandbox::SandboxOptions;
use dpc_operator::sim::dpc::{DpcSim, SimConfig};
use dpc_operator::sim::kube::{EmulatorConfig, KubeEmulator};
use dpc_operator::telemetry::{self, LogFormat, parse_duration};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "dpc-operator",
    version,
    about = "Keeps Matillion DPC environment connection overrides in line with ConnectionOverride resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the usual kubeconfig or the in-cluster
    /// configuration (the default command).
    Run(Box<RunArgs>),
    /// Run the whole operator without a cluster or a DPC account: a Kubernetes API emulator,
    /// a DPC simulator and the controller in one process, with the examples applied.
    Sandbox(SandboxArgs),
    /// Run one of the test doubles on its own.
    #[command(subcommand)]
    Sim(SimCommand),
}

#[derive(Args)]
struct SandboxArgs {
    /// Exit 0 once every example is Ready, or 1 with the reasons after --timeout.
    #[arg(long)]
    once: bool,
    /// How long --once waits.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Address of the Kubernetes API emulator (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    kube_addr: SocketAddr,
    /// Address of the DPC simulator (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    dpc_addr: SocketAddr,
    /// Where to write the kubeconfig (default: a file in the temp directory).
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SimCommand {
    /// The Kubernetes API emulator.
    Kube {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Write a kubeconfig for it here.
        #[arg(long)]
        kubeconfig_out: Option<PathBuf>,
        /// Install the dpc-operator CRDs at start.
        #[arg(long)]
        install_crds: bool,
    },
    /// The DPC simulator; its /_sim/ endpoints control it.
    Dpc {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Accept this client id (with --client-secret) at the token endpoint.
        #[arg(long, requires = "client_secret")]
        client_id: Option<String>,
        #[arg(long, env = "DPC_SIM_CLIENT_SECRET", hide_env_values = true)]
        client_secret: Option<String>,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Namespaces to watch, comma-separated; all namespaces when empty.
    #[arg(long, env = "DPC_OPERATOR_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Log format: json, text, or auto (text on a terminal, JSON otherwise).
    #[arg(
        long,
        env = "DPC_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    log_format: LogFormat,
    /// How many objects are reconciled at once.
    #[arg(long, env = "DPC_OPERATOR_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Allow plain-http DPC endpoints in DpcAccounts (tests and sandboxes only).
    #[arg(long, env = "DPC_OPERATOR_ALLOW_INSECURE_HTTP")]
    allow_insecure_http: bool,
    /// The DPC hosts a DpcAccount's apiUrl and tokenUrl may name, comma-separated: exact
    /// names or *.domain. Accounts naming other hosts are refused, so a tenant who may create
    /// a DpcAccount cannot send credentials or values read from Secrets anywhere else.
    #[arg(
        long,
        env = "DPC_OPERATOR_ALLOWED_HOSTS",
        value_delimiter = ',',
        default_value = "*.matillion.com"
    )]
    dpc_allowed_hosts: Vec<String>,
    /// The namespaces a ClusterDpcAccount's credentials Secret may be in, comma-separated.
    /// Default: the operator's own namespace ($POD_NAMESPACE). Whoever may create a
    /// ClusterDpcAccount may make the operator read Secrets there.
    #[arg(
        long,
        env = "DPC_OPERATOR_CLUSTER_CREDENTIALS_NAMESPACES",
        value_delimiter = ','
    )]
    cluster_credentials_namespaces: Vec<String>,
    /// Only ConnectionOverrides matching this label selector (to shard objects over several
    /// installs), e.g. shard=a.
    #[arg(long, env = "DPC_OPERATOR_SELECTOR")]
    selector: Option<String>,
    /// How often a Ready object is reconciled again locally (no DPC call; drift detection
    /// follows each object's spec.syncInterval).
    #[arg(long, env = "DPC_OPERATOR_RESYNC_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    resync_interval: Duration,
    /// The shortest spec.syncInterval honoured (the CRD refuses less than 30s; lower it only
    /// for tests).
    #[arg(long, env = "DPC_OPERATOR_MIN_SYNC_INTERVAL", default_value = "30s", value_parser = parse_duration, hide = true)]
    min_sync_interval: Duration,
    /// First retry delay after a transient DPC failure (doubles up to --backoff-max).
    #[arg(long, env = "DPC_OPERATOR_BACKOFF_BASE", default_value = "1s", value_parser = parse_duration)]
    backoff_base: Duration,
    /// Longest retry delay after transient failures.
    #[arg(long, env = "DPC_OPERATOR_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    backoff_max: Duration,
    /// Timeout of one DPC request.
    #[arg(long, env = "DPC_OPERATOR_DPC_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    dpc_timeout: Duration,
    /// A kubeconfig file; default: $KUBECONFIG, ~/.kube/config, or the in-cluster configuration.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Export reconcile and DPC-request spans to this OTLP/HTTP collector (off when unset).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Address of the admin endpoints (/livez, /readyz, /metrics).
    #[arg(long, env = "DPC_OPERATOR_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Do not export the per-object condition gauge (one series per object and condition).
    #[arg(long, env = "DPC_OPERATOR_NO_PER_OBJECT_METRICS")]
    no_per_object_metrics: bool,
    /// Elect a leader among replicas with a Lease; only the leader reconciles.
    #[arg(long, env = "DPC_OPERATOR_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else default).
    #[arg(long, env = "DPC_OPERATOR_LEADER_ELECTION_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(
        long,
        env = "DPC_OPERATOR_LEADER_ELECTION_ID",
        default_value = "dpc-operator"
    )]
    leader_election_id: String,
    /// A lease not renewed for this long is taken over by another replica.
    #[arg(long, env = "DPC_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// How often the leader renews its lease.
    #[arg(long, env = "DPC_OPERATOR_LEASE_RENEW_PERIOD", default_value = "5s", value_parser = parse_duration)]
    lease_renew_period: Duration,
    /// How often a follower tries to take the lease.
    #[arg(long, env = "DPC_OPERATOR_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    lease_retry_period: Duration,
}

impl RunArgs {
    fn operator_config(&self) -> OperatorConfig {
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
}

/// jemalloc, not glibc's malloc: with 10,000 objects each reading its own Secret, glibc kept
/// about 60 MiB of freed memory in fragmented arenas (heaptrack: 70 MB peak heap, 133 MiB
/// peak RSS); jemalloc peaks at about 90 MiB and uses less CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything builds a TLS client (the Kubernetes client, the DPC client, the OTLP
    // exporter).
    dpc_operator::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(*args).await,
        Some(Command::Sandbox(args)) => sandbox(args).await,
        Some(Command::Sim(which)) => sim(which).await,
    }
}

async fn sandbox(args: SandboxArgs) -> ExitCode {
    // The sandbox prints its own account of what happens; operator logs only for problems.
    let _telemetry = telemetry::init_with(LogFormat::Text, "warn", None);
    let options = SandboxOptions {
        once: args.once,
        timeout: args.timeout,
        kube_addr: args.kube_addr,
        dpc_addr: args.dpc_addr,
        kubeconfig_out: args.kubeconfig_out,
    };
    match dpc_operator::sandbox::run(options, shutdown_on_signals()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sandbox failed: {e}");
            ExitCode::from(2)
        }
    }
}

async fn sim(which: SimCommand) -> ExitCode {
    telemetry::init(LogFormat::Text);
    let stop = shutdown_on_signals();
    match which {
        SimCommand::Kube {
            listen,
            kubeconfig_out,
            install_crds,
        } => {
            let emu = match KubeEmulator::start_with(listen, EmulatorConfig::default()).await {
                Ok(emu) => emu,
                Err(e) => {
                    eprintln!("cannot listen on {listen}: {e}");
                    return ExitCode::from(2);
                }
            };
            if install_crds && let Err(e) = emu.install_crds().await {
                eprintln!("installing the CRDs: {e}");
                return ExitCode::from(2);
            }
            if let Some(path) = kubeconfig_out
                && let Err(e) = std::fs::write(&path, emu.kubeconfig())
            {
                eprintln!("writing {}: {e}", path.display());
                return ExitCode::from(2);
            }
            println!("{}", emu.url());
            stop.cancelled().await;
            emu.stop().await;
        }
        SimCommand::Dpc {
            listen,
            client_id,
            client_secret,
        } => {
            let sim = match DpcSim::start_on(listen, SimConfig::default()).await {
                Ok(sim) => sim,
                Err(e) => {
                    eprintln!("cannot listen on {listen}: {e}");
                    return ExitCode::from(2);
                }
            };
            if let (Some(id), Some(secret)) = (client_id, client_secret) {
                sim.add_client(&id, &secret);
            }
            println!("{}", sim.base_url());
            stop.cancelled().await;
            sim.stop().await;
        }
    }
    ExitCode::SUCCESS
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, String> {
    dpc_operator::install_crypto_provider();
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("using {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| {
            format!("no Kubernetes configuration found (kubeconfig or in-cluster): {e}")
        })?,
    };
    kube::Client::try_from(config).map_err(|e| format!("building the Kubernetes client: {e}"))
}

/// Cancels the token on SIGTERM or Ctrl-C.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received; finishing in-flight work"),
            _ = tokio::signal::ctrl_c() => info!("interrupt received; finishing in-flight work"),
        }
        trigger.cancel();
    });
    token
}

async fn run(args: RunArgs) -> ExitCode {
    let telemetry = telemetry::init_with(
        args.log_format,
        "info",
        args.otlp_endpoint.as_deref().filter(|e| !e.is_empty()),
    );
    let code = run_operator(args).await;
    telemetry.shutdown().await;
    code
}

async fn run_operator(args: RunArgs) -> ExitCode {
    let client = match kube_client(args.kubeconfig.as_ref()).await {
        Ok(client) => client,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    let config = args.operator_config();
    info!(
        namespaces = ?config.namespaces,
        concurrency = config.concurrency,
        allow_insecure_http = config.allow_insecure_http,
        version = env!("CARGO_PKG_VERSION"),
        "dpc-operator starting"
    );
    let shutdown = shutdown_on_signals();
    let ctx = Context::new(client.clone(), config);
    let readiness: Readiness = {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let standby_allowed = args.leader_election;
        Arc::new(move || {
            if shutdown.is_cancelled() {
                Err("shutting down".into())
            } else if ctx.is_synced() || (standby_allowed && !ctx.is_running()) {
                Ok(())
            } else {
                Err("the watches have not delivered their first lists yet".into())
            }
        })
    };
    let _admin = match admin::serve(args.admin_addr, ctx.metrics.clone(), readiness).await {
        Ok(server) => {
            info!(addr = %server.addr, "admin endpoints: /livez /readyz /metrics");
            server
        }
        Err(e) => {
            error!(
                "cannot serve the admin endpoints on {}: {e}",
                args.admin_addr
            );
            return ExitCode::from(2);
        }
    };
    if let Err(e) = controller::check_crds(&client).await {
        error!("{e}");
        return ExitCode::from(3);
    }
    if args.leader_election {
        let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "dpc-operator".into());
            format!("{host}-{}", std::process::id())
        });
        let lease = LeaseConfig {
            namespace: args
                .leader_election_namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| "default".into()),
            name: args.leader_election_id.clone(),
            identity,
            lease_duration: args.lease_duration,
            renew_period: args.lease_renew_period,
            retry_period: args.lease_retry_period,
        };
        let dpc = ctx.dpc.clone();
        let work = |stop| controller::run(ctx, stop);
        // The moment the lease is lost, no further DPC call leaves this replica (reconciles in
        // flight would otherwise keep writing while another replica leads).
        let fence = move || dpc.fence();
        if let Err(e) = leader::run_with_leadership(client, lease, shutdown, work, fence).await {
            error!("{e}; exiting so this replica restarts as a follower");
            return ExitCode::FAILURE;
        }
    } else {
        controller::run(ctx, shutdown).await;
    }
    info!("dpc-operator stopped");
    ExitCode::SUCCESS
}
