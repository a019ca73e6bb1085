//! dpc-operator: parse flags, start telemetry, run the controller (or the sandbox, or a test
//! double). Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dpc_operator::controller::{self, Context, OperatorConfig};
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
    Run(RunArgs),
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
    /// How often a Ready object is looked at again.
    #[arg(long, env = "DPC_OPERATOR_RESYNC_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    resync_interval: Duration,
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
            resync_interval: self.resync_interval,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
            dpc_request_timeout: self.dpc_timeout,
            instance: std::env::var("POD_NAME")
                .ok()
                .or_else(|| std::env::var("HOSTNAME").ok()),
            ..OperatorConfig::default()
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(args).await,
    }
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
    telemetry::init(args.log_format);
    let client = match kube_client(args.kubeconfig.as_ref()).await {
        Ok(client) => client,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = controller::check_crds(&client).await {
        error!("{e}");
        return ExitCode::from(3);
    }
    let config = args.operator_config();
    info!(
        namespaces = ?config.namespaces,
        concurrency = config.concurrency,
        allow_insecure_http = config.allow_insecure_http,
        version = env!("CARGO_PKG_VERSION"),
        "dpc-operator starting"
    );
    let ctx = Context::new(client, config);
    controller::run(ctx, shutdown_on_signals()).await;
    info!("dpc-operator stopped");
    ExitCode::SUCCESS
}
