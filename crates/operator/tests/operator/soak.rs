//! A small run of the soak (`dpc-bench soak` runs the big one): the operator binary under
//! injected faults, kills, dropped watches and 410s, with objects changing throughout; then
//! nothing may be lost, left behind, leaked or stormed.

use std::time::Duration;

use dpc_bench::bench::KubeKind;
use dpc_bench::soak::{self, SoakOptions};

#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_lost_under_faults_and_kills() {
    dpc_operator::install_crypto_provider();
    let options = SoakOptions {
        objects: 16,
        duration: Duration::from_secs(20),
        seed: 11,
        kills: 2,
        operator: env!("CARGO_BIN_EXE_dpc-operator").into(),
        work_dir: std::env::temp_dir().join(format!("dpc-soak-{}", std::process::id())),
        max_calls_per_object_minute: 60.0,
        kube: KubeKind::Emulator,
        control_plane_faults: 0,
    };
    let report = soak::run(&options).await.expect("the soak runs");
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.kills, 2);
    // About a fifth of the calls fail by chance, and the calls' count depends on timing: at
    // least five faults of two kinds were seen (about 14 are expected in 20 s).
    let faults: usize = report.faults_by_kind.values().sum();
    assert!(
        faults >= 5 && report.faults_by_kind.len() >= 2,
        "faults were injected: {:?}",
        report.faults_by_kind
    );
    assert!(
        report.updated + report.rotated + report.deleted + report.created > 10,
        "objects changed during the soak"
    );
}

/// The soak on a real control plane of its own (etcd, kube-apiserver and
/// kube-controller-manager of `.ci/kube-tools`): each fault a cluster has, once — kube-apiserver
/// stopped with SIGTERM and with SIGKILL and started again on the same etcd, etcd compacted
/// to its current revision, etcd stopped and started — beside the DPC faults and an
/// operator SIGKILL; after each, the next change reaches DPC.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_lost_when_the_control_plane_restarts() {
    dpc_operator::install_crypto_provider();
    let options = SoakOptions {
        objects: 12,
        duration: Duration::from_secs(30),
        seed: 23,
        kills: 1,
        operator: env!("CARGO_BIN_EXE_dpc-operator").into(),
        work_dir: std::env::temp_dir().join(format!("dpc-soak-real-{}", std::process::id())),
        max_calls_per_object_minute: 60.0,
        kube: KubeKind::Real,
        control_plane_faults: 4,
    };
    let report = soak::run(&options).await.expect("the soak runs");
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
    let _ = std::fs::remove_dir_all(&options.work_dir);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    let kinds: Vec<&String> = report.control_plane_faults.keys().collect();
    assert_eq!(
        kinds,
        [
            "etcd compaction",
            "etcd stop",
            "kube-apiserver SIGKILL",
            "kube-apiserver SIGTERM"
        ],
        "each control-plane fault was injected"
    );
    for kind in kinds {
        assert_eq!(
            report.recovery[kind].count, 1,
            "the next change after {kind} reached DPC"
        );
    }
    assert_eq!(report.recovery["operator SIGKILL"].count, 1);
}
