//! dpc-operator: parse flags, start telemetry, run the controller (or the sandbox, or a test
//! double). Everything else lives in the library.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use dpc_operator::admin::{self, Readiness};
use dpc_operator::config::RunArgs;
use dpc_operator::context::Context;
use dpc_operator::controller;
use dpc_operator::import::{self, ImportArgs};
use dpc_operator::leader;
#[cfg(feature = "sandbox")]
use dpc_operator::sandbox::cli::{self as sandbox, SandboxArgs, SimCommand};
use dpc_operator::telemetry;
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
    /// Print a ConnectionOverride for every environment connection override a DPC project
    /// already holds, as YAML to commit (adopting them costs no write to DPC).
    Import(Box<ImportArgs>),
    /// Run the whole operator without a cluster or a DPC account: a Kubernetes API emulator,
    /// a DPC simulator and the controller in one process, with the examples applied.
    #[cfg(feature = "sandbox")]
    Sandbox(SandboxArgs),
    /// Run one of the test doubles on its own.
    #[cfg(feature = "sandbox")]
    #[command(subcommand)]
    Sim(SimCommand),
}

/// jemalloc, not glibc's malloc: with 10,000 objects each reading its own Secret, glibc kept
/// about 60 MiB of freed memory in fragmented arenas (heaptrack: 70 MB peak heap, 133 MiB
/// peak RSS); jemalloc peaks at about 90 MiB and uses less CPU (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`; a `_RJEM_MALLOC_CONF` in the environment is read
/// after them and can change any of them. One arena rather than four per core (each kept its
/// own partly used pages), and freed pages handed back after one second rather than ten, by
/// jemalloc's own background thread. At 10,000 objects on kube-apiserver this took 3–3.5 MiB
/// of anonymous memory off peak RSS (BENCHMARKS.md, "Allocator and binary size").
#[allow(unsafe_code)]
// SAFETY: jemalloc declares `malloc_conf` (named `_rjem_malloc_conf` by tikv-jemalloc-sys) as
// a weak `const char *` for the program to define. This defines it as a pointer to a
// NUL-terminated string that lives as long as the program and is never written.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 70] =
    b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0,background_thread:true\0";

#[tokio::main]
async fn main() -> ExitCode {
    // Before anything builds a TLS client (the Kubernetes client, the DPC client, the OTLP
    // exporter).
    dpc_operator::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(*args).await,
        Some(Command::Import(args)) => import::command(*args).await,
        #[cfg(feature = "sandbox")]
        Some(Command::Sandbox(args)) => sandbox::command(args, shutdown_on_signals()).await,
        #[cfg(feature = "sandbox")]
        Some(Command::Sim(which)) => sandbox::sim_command(which, shutdown_on_signals()).await,
    }
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
    let client = match dpc_operator::kube_client(args.kubeconfig.as_ref()).await {
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
        let blind_after = args.watch_blind_after;
        Arc::new(move || {
            if shutdown.is_cancelled() {
                Err("shutting down".into())
            } else if let Some(blind) = ctx.watches.blind(blind_after) {
                Err(blind)
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
        let lease = args.lease_config();
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
