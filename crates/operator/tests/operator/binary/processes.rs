//! The binary as a process among others: signals, kills, replicas, absurd answers.

use super::*;

#[tokio::test]
async fn sigkill_between_the_dpc_write_and_the_status_write_converges() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    // DPC applies the POST but answers late: the operator is killed before it can write status.
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 4000 }));
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("sf", "Salesforce")).await;
    wait_call(&h, SimOp::Create, 1).await;
    assert!(
        h.sim.get_override(PROJECT, "PROD", "Salesforce").is_some(),
        "DPC holds it already"
    );
    operator.kill().await;
    let orphaned = h.covs().get("sf").await.unwrap();
    assert!(
        orphaned.status.and_then(|s| s.applied_hash).is_none(),
        "no status was written"
    );

    h.sim.clear_calls();
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.wait_ready("sf").await;
    assert_eq!(
        write_summary(&h.sim.calls()),
        [],
        "DPC already holds what the lost write sent: read, and taken over as it is"
    );
    assert_eq!(h.sim.overrides().len(), 1, "no second remote object");

    // The same for a deletion: DPC deletes, the operator dies before releasing the object.
    h.sim
        .push_fault(Fault::on(SimOp::Delete, FaultKind::Delay { ms: 4000 }));
    h.covs()
        .delete("sf", &DeleteParams::default())
        .await
        .unwrap();
    wait_call(&h, SimOp::Delete, 1).await;
    operator.kill().await;
    assert!(h.sim.overrides().is_empty());
    let held = h.covs().get("sf").await.unwrap();
    assert!(
        held.metadata.deletion_timestamp.is_some()
            && held.metadata.finalizers.is_some_and(|f| !f.is_empty())
    );

    h.sim.clear_calls();
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.wait_gone("sf").await;
    assert_eq!(
        write_summary(&h.sim.calls()),
        [(SimOp::Delete, Some(404))],
        "the deletion was not lost"
    );
    operator.kill().await;
}

#[tokio::test]
async fn sigterm_lets_in_flight_work_finish_and_exits_zero() {
    let h = Harness::start().await;
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 1500 }));
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("sf", "Salesforce")).await;
    wait_call(&h, SimOp::Create, 1).await;

    operator.terminate();
    let status = operator.wait_exit(Duration::from_secs(8)).await;
    assert!(
        status.success(),
        "exit status {status:?}; output:\n{}",
        operator.output()
    );
    let obj = h.covs().get("sf").await.unwrap();
    assert!(
        is_ready(&obj),
        "the in-flight reconcile finished and wrote status: {:?}",
        obj.status
    );
    assert!(operator.output().contains("SIGTERM received"));
}

#[tokio::test]
async fn with_two_replicas_exactly_one_writes_and_killing_it_hands_over() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut election = election_args(&h.ns);
    election.extend(["--namespaces", &h.ns]);
    let mut one = Operator::start_as("replica-one", &kubeconfig, &election);
    // The first replica leads before the second starts.
    one.wait_output("became the leader").await;
    assert_eq!(lease_holder(&h).await.as_deref(), Some("replica-one"));
    let mut two = Operator::start_as("replica-two", &kubeconfig, &election);
    two.wait_output("waiting to become the leader").await;
    h.apply(&Cov::new("first", "First")).await;
    h.wait_ready("first").await;
    assert_eq!(lease_holder(&h).await.as_deref(), Some("replica-one"));
    one.wait_output("DPC accepted the override").await;
    assert!(
        !two.output().contains("DPC accepted the override"),
        "the follower wrote"
    );
    assert!(
        !two.output().contains("\"name\":\"first\""),
        "the follower reconciled"
    );

    // The leader dies without releasing the lease: the follower takes over after it expires.
    one.kill().await;
    h.apply(&Cov::new("second", "Second")).await;
    h.wait_ready("second").await;
    assert_eq!(lease_holder(&h).await.as_deref(), Some("replica-two"));
    two.wait_output("became the leader").await;
    let writes: Vec<_> = h.sim.calls().into_iter().filter(|c| c.is_write()).collect();
    assert_eq!(
        writes.len(),
        2,
        "one write per object, no duplicate from two leaders"
    );

    // A graceful stop releases the lease at once.
    two.terminate();
    assert!(two.wait_exit(Duration::from_secs(8)).await.success());
    assert_eq!(lease_holder(&h).await, None);
}

#[tokio::test]
async fn sigterm_before_the_first_list_exits_at_once() {
    let h = Harness::start().await;
    let (mut operator, _, admin) = ungranted_operator(&h).await;
    wait_status(&format!("{admin}/readyz"), 503).await;
    operator.terminate();
    let status = operator.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}:\n{}", operator.output());
    assert!(
        operator.output().contains("stopping before the first list"),
        "{}",
        operator.output()
    );
    h.stop().await;
}

#[tokio::test]
async fn absurd_numbers_from_dpc_leave_the_process_up() {
    let h = Harness::start_with(
        test_config(),
        SimConfig {
            announced_expires_in: Some(serde_json::json!(1e300)),
            ..SimConfig::default()
        },
    )
    .await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 429,
            retry_after: Some("1e300".into()),
            body: None,
        },
    ));
    let mut operator = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    let admin = operator.admin_url().await;
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let limited = h.wait_reason("sf", "RateLimited").await;
    let message = ready_condition(&limited).message;
    assert!(message.contains("429"), "{message}");
    wait_status(&format!("{admin}/livez"), 200).await;
    // The account is held for an hour at most, not for 1e300 seconds, and the process lives.
    let text = wait_status(&format!("{admin}/metrics"), 200).await;
    assert!(
        text.contains("dpc_operator_dpc_requests_total{operation=\"create\",outcome=\"429\"} 1"),
        "{text}"
    );
    assert!(
        !operator.output().contains("panicked"),
        "{}",
        operator.output()
    );
    operator.terminate();
    assert!(operator.wait_exit(Duration::from_secs(10)).await.success());
}

/// The allocator options the binary sets for itself (`MALLOC_CONF` in main.rs: one arena,
/// freed pages back within a second) are in effect: jemalloc's statistics, printed at exit
/// when the environment asks for them, say so.
#[test]
fn the_binary_runs_with_its_own_allocator_options() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dpc-operator"))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .expect("dpc-operator --version runs");
    assert!(out.status.success(), "{:?}", out.status);
    let stats = String::from_utf8_lossy(&out.stderr);
    let options: Vec<&str> = stats.lines().filter(|l| l.contains("opt.")).collect();
    for option in [
        "opt.narenas: 1",
        "opt.dirty_decay_ms: 1000 ",
        "opt.muzzy_decay_ms: 0 ",
        "opt.background_thread: true ",
    ] {
        assert!(
            options.iter().any(|l| l.trim_start().starts_with(option)),
            "jemalloc's options lack {option:?}: {options:#?}"
        );
    }
}
