//! Starts a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) for a
//! test run and keeps it until SIGTERM or SIGINT, or until the process `--exit-with` names
//! is gone (so a killed test script leaves nothing running).
//!
//! `dpc-control-plane --dir DIR` prints DIR as its only line on stdout once the API server is
//! ready; `DIR/control-plane.json` describes it. Tests attach with
//! `DPC_TEST_CONTROL_PLANE=DIR` (see `.ci/test`); without it each test process starts its own.

use std::path::PathBuf;

use clap::Parser;
use dpc_testkit::control_plane::ControlPlane;

#[derive(Parser)]
#[command(about = "Run kube-apiserver, etcd and kube-controller-manager for the tests")]
struct Args {
    /// The folder for the control plane's files (kept after it stops).
    #[arg(long)]
    dir: PathBuf,
    /// Stop when this process is gone.
    #[arg(long)]
    exit_with: Option<u32>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let plane = match ControlPlane::start(Some(args.dir.clone())).await {
        Ok(plane) => plane,
        Err(e) => {
            eprintln!("dpc-control-plane: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", plane.dir().display());
    let parent_gone = async move {
        match args.exit_with {
            Some(pid) => {
                let proc = PathBuf::from(format!("/proc/{pid}"));
                while proc.exists() {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
            None => std::future::pending().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = parent_gone => {}
    }
    drop(plane);
    eprintln!("dpc-control-plane: stopped");
}
