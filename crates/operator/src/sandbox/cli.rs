//! The sandbox's command line: `dpc-operator sandbox` and `dpc-operator sim kube|dpc`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use dpc_testkit::dpc::{DpcSim, SimConfig};
use dpc_testkit::kube::{EmulatorConfig, KubeEmulator};
use tokio_util::sync::CancellationToken;

use super::SandboxOptions;
use crate::api::duration::parse_duration;
use crate::telemetry::{self, LogFormat};

#[derive(Args)]
pub struct SandboxArgs {
    /// Exit 0 once every example is Ready, or 1 with the reasons after --timeout.
    #[arg(long)]
    pub once: bool,
    /// How long --once waits.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Address of the Kubernetes API emulator (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub kube_addr: SocketAddr,
    /// Address of the DPC simulator (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub dpc_addr: SocketAddr,
    /// Where to write the kubeconfig (default: a file in the temp directory).
    #[arg(long)]
    pub kubeconfig_out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum SimCommand {
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

pub async fn command(args: SandboxArgs, stop: CancellationToken) -> ExitCode {
    // The sandbox prints its own account of what happens; operator logs only for problems.
    let _telemetry = telemetry::init_with(LogFormat::Text, "warn", None);
    let options = SandboxOptions {
        once: args.once,
        timeout: args.timeout,
        kube_addr: args.kube_addr,
        dpc_addr: args.dpc_addr,
        kubeconfig_out: args.kubeconfig_out,
    };
    match super::run(options, stop).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sandbox failed: {e}");
            ExitCode::from(2)
        }
    }
}

pub async fn sim_command(which: SimCommand, stop: CancellationToken) -> ExitCode {
    telemetry::init(LogFormat::Text);
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
