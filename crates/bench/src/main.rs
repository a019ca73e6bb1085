//! `dpc-bench`: runs the operator's release binary as a process against the Kubernetes API
//! emulator and the DPC simulator. `bench` prints the figures; `soak` injects faults and
//! checks nothing was lost (see BENCHMARKS.md).
//!
//!   cargo build --release --bins
//!   target/release/dpc-bench bench --objects 2000
//!   target/release/dpc-bench soak --objects 60 --duration 2m
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dpc_bench::bench::{self, BenchOptions, KubeKind};
use dpc_bench::soak::{self, SoakOptions};
use dpc_operator_api::duration::parse_duration;

#[derive(Parser)]
#[command(about = "Benchmark and soak of dpc-operator against the emulator and the simulator")]
struct Cli {
    #[command(subcommand)]
    command: Which,
}

#[derive(Subcommand)]
enum Which {
    /// Convergence, quiet intervals, rotation, memory and CPU figures.
    Bench(Args),
    /// Faults, kills and changes; then checks that nothing was lost.
    Soak(SoakArgs),
}

#[derive(clap::Args)]
struct SoakArgs {
    #[arg(long, default_value_t = 60)]
    objects: usize,
    /// How long faults are injected.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// SIGKILLs of the operator.
    #[arg(long, default_value_t = 2)]
    kills: usize,
    /// Calls per object per minute above which the run fails (a retry storm).
    #[arg(long, default_value_t = 60.0)]
    max_calls_per_object_minute: f64,
    /// The Kubernetes API: the emulator, or the real control plane of `.ci/kube-tools`
    /// (its binaries' folder in $DPC_KUBE_TOOLS, else the script builds them).
    #[arg(long, value_enum, default_value = "emulator")]
    kube: KubeKind,
    /// Faults of the real control plane (kube-apiserver SIGTERM and SIGKILL restarts, etcd
    /// compaction, an etcd stop, in turn).
    #[arg(long, default_value_t = 8)]
    control_plane_faults: usize,
    #[arg(long)]
    operator: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct Args {
    /// Objects N.
    #[arg(long, default_value_t = 2000)]
    objects: usize,
    /// The Kubernetes API: the emulator, or the real control plane of `.ci/kube-tools`.
    #[arg(long, value_enum, default_value = "emulator")]
    kube: KubeKind,
    /// Environments S the objects are spread over.
    #[arg(long, default_value_t = 20)]
    environments: usize,
    /// Simulated DPC latency L.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    latency: Duration,
    /// The operator's --concurrency C.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// The account's requestsPerMinute (the simulator allows this rate plus the burst).
    #[arg(long, default_value_t = 600_000)]
    requests_per_minute: u32,
    #[arg(long, default_value_t = 50)]
    burst: u32,
    /// The objects' drift-check interval (given to the operator as its default: the CRD
    /// refuses less than 30 s in an object); the quiet phase is three of them.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    sync_interval: Duration,
    /// Secrets rotated at once.
    #[arg(long, default_value_t = 100)]
    rotations: usize,
    /// How many times the rotation is done, one round after the other (the percentiles
    /// pool every round).
    #[arg(long, default_value_t = 1)]
    rotation_rounds: usize,
    /// Secrets of 1 MiB no object reads (Helm releases, say), in the objects' namespace.
    #[arg(long, default_value_t = 0)]
    large_secrets: usize,
    /// The operator binary (default: dpc-operator next to this program).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// One more argument for the operator (repeat for several), e.g.
    /// `--operator-arg=--no-per-object-metrics`.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn default_operator(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        std::env::current_exe()
            .expect("the program's path")
            .with_file_name("dpc-operator")
    })
}

fn write_json<T: serde::Serialize>(path: Option<PathBuf>, value: &T) -> bool {
    let Some(path) = path else { return true };
    let json = serde_json::to_string_pretty(value).expect("the report serializes");
    match std::fs::write(&path, json) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("writing {}: {e}", path.display());
            false
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    dpc_testkit::install_crypto_provider();
    let work_dir = std::env::temp_dir().join(format!("dpc-bench-{}", std::process::id()));
    let args = match Cli::parse().command {
        Which::Bench(args) => args,
        Which::Soak(args) => {
            let options = SoakOptions {
                objects: args.objects,
                duration: args.duration,
                seed: args.seed,
                kills: args.kills,
                operator: default_operator(args.operator),
                work_dir,
                max_calls_per_object_minute: args.max_calls_per_object_minute,
                kube: args.kube,
                control_plane_faults: args.control_plane_faults,
            };
            return match soak::run(&options).await {
                Ok(report) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).expect("the report serializes")
                    );
                    let written = write_json(args.json, &report);
                    if report.problems.is_empty() && written {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("soak failed: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let operator = default_operator(args.operator);
    let options = BenchOptions {
        objects: args.objects,
        kube: args.kube,
        environments: args.environments,
        latency: args.latency,
        concurrency: args.concurrency,
        requests_per_minute: args.requests_per_minute,
        burst: args.burst,
        sync_interval: args.sync_interval,
        rotations: args.rotations,
        rotation_rounds: args.rotation_rounds,
        large_secrets: args.large_secrets,
        operator,
        operator_args: args.operator_args,
        work_dir,
    };
    match bench::run(&options).await {
        Ok(report) => {
            print!("{}", bench::table(&report));
            if write_json(args.json, &report) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
