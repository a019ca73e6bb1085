//! Rate limit: the account's request rate is never exceeded, and a 429 holds every call of
//! the account until its Retry-After.

use std::time::Duration;

use dpc_operator::config::OperatorConfig;
use dpc_testkit::dpc::{Call, Fault, FaultKind, SimConfig, SimOp};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_429_holds_every_call_of_the_account_until_retry_after() {
    let h = Harness::start().await;
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 429,
            retry_after: Some("2".into()),
            body: None,
        },
    ));
    let h = h.run();
    h.apply(&Cov::new("one", "First")).await;
    h.wait_reason("one", "RateLimited").await;
    h.apply(&Cov::new("two", "Second")).await;
    h.wait_ready("one").await;
    h.wait_ready("two").await;

    let calls = h.sim.calls();
    let limited = calls
        .iter()
        .find(|c| c.status == Some(429))
        .expect("the 429");
    let after: Vec<&Call> = calls.iter().filter(|c| c.seq > limited.seq).collect();
    assert!(!after.is_empty());
    for call in after {
        assert!(
            call.at() >= limited.at() + Duration::from_secs(2),
            "{:?} {} came {:?} after the 429",
            call.op,
            call.path,
            call.at() - limited.at()
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn the_accounts_request_rate_is_never_exceeded() {
    // Slots further than 300 ms away are not waited for in place: those objects are told to
    // come back at their slot (16 workers at 10 requests/s reserve up to ~1.6 s ahead).
    let config = OperatorConfig {
        max_admission_wait: Duration::from_millis(300),
        ..test_config()
    };
    let mut h = Harness::start_alone(config, SimConfig::default()).await;
    h.requests_per_minute = 600; // 10 per second
    h.put_account(ACCOUNT, CREDS).await;
    let api: Api<dpc_operator::api::DpcAccount> = Api::namespaced(h.client.clone(), &h.ns);
    let patch = json!({"spec": {"requestBurst": 2}});
    api.patch(ACCOUNT, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let h = h.run();
    // Some objects wait for their slot longer than they may wait in place: they say so. The
    // watch starts before the objects are created, so no passing state is missed.
    let waiting = {
        use futures::StreamExt;
        let stream = kube::runtime::watcher(h.covs(), Default::default());
        let mut stream = kube::runtime::WatchStreamExt::applied_objects(stream).boxed();
        tokio::spawn(async move {
            while let Some(Ok(o)) = stream.next().await {
                if ready_reason(&o).as_deref() == Some("Creating") {
                    return o;
                }
            }
            panic!("the watch ended");
        })
    };
    for i in 0..80 {
        h.apply(&Cov::new(&format!("o{i}"), &format!("C{i}"))).await;
    }
    let waiting = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("an object waits for its turn")
        .unwrap();
    assert!(
        ready_condition(&waiting)
            .message
            .contains("waits for the account's request rate")
    );
    for i in 0..80 {
        h.wait_ready(&format!("o{i}")).await;
    }
    let calls = h.sim.calls();
    let times: Vec<u64> = calls.iter().map(|c| c.at_ms).collect();
    // GCRA at 10/s with a burst of 2 sends at most 2 + 9 calls in any 900 ms. The simulator
    // stamps arrival, not sending: allowing 12 leaves one interval (100 ms) for a call that
    // was sent on time but arrived late, and still catches any real excess.
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|t| **t < start + 900).count();
        assert!(in_window <= 12, "{in_window} calls in 900 ms");
    }
    assert_eq!(
        write_calls(&calls).len(),
        80,
        "exactly one write per object"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_429_holds_all_twenty_waiting_objects_for_retry_after() {
    let h = Harness::start_alone(test_config(), SimConfig::default()).await;
    h.sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 429,
            retry_after: Some("3".into()),
            body: None,
        },
    ));
    let h = h.run();
    for i in 0..20 {
        h.apply(&Cov::new(&format!("o{i}"), &format!("C{i}"))).await;
    }
    for i in 0..20 {
        h.wait_ready(&format!("o{i}")).await;
    }
    let calls = h.sim.calls();
    let limited = calls.iter().find(|c| c.status == Some(429)).unwrap();
    // Calls that arrive after the 429 was answered and before its Retry-After ends can only be
    // ones already on their way when the client read the 429 — at most one per other
    // reconcile in flight, whenever a loaded machine delivers them. A client that ignored
    // Retry-After would send every one of the 19 waiting objects in that time.
    let answered = limited.done_ms.unwrap();
    let inside: Vec<&Call> = calls
        .iter()
        .filter(|c| c.at_ms > answered && c.at_ms < answered + 3000)
        .collect();
    let in_flight = usize::from(test_config().concurrency) - 1;
    assert!(
        inside.len() <= in_flight,
        "{} calls during Retry-After (at most {in_flight} were already on their way)",
        inside.len()
    );
    assert_eq!(
        write_calls(&calls)
            .iter()
            .filter(|c| c.status == Some(201))
            .count(),
        20
    );
    h.stop().await;
}

#[tokio::test]
async fn no_more_objects_call_dpc_at_once_than_the_concurrency_allows() {
    // The controller runs twice as many passes as `--concurrency`, so that status writes do
    // not hold up DPC calls; the DPC calls themselves stay within `--concurrency`.
    let config = OperatorConfig {
        concurrency: 4,
        ..test_config()
    };
    let sim_config = SimConfig {
        latency_ms: 100,
        ..SimConfig::default()
    };
    let h = Harness::start_with(config, sim_config).await.run();
    for i in 0..24 {
        h.apply(&Cov::new(&format!("o{i}"), &format!("C{i}"))).await;
    }
    for i in 0..24 {
        h.wait_ready(&format!("o{i}")).await;
    }
    let calls = h.sim.calls();
    let writes = write_calls(&calls);
    assert_eq!(writes.len(), 24, "exactly one write per object");
    // The simulator's [arrival, answer] of a call lies within the client's hold of its slot.
    let most = writes
        .iter()
        .map(|w| {
            writes
                .iter()
                .filter(|o| o.at_ms <= w.at_ms && o.done_ms.is_some_and(|d| d > w.at_ms))
                .count()
        })
        .max()
        .unwrap_or_default();
    assert!(
        most <= 4,
        "{most} writes in flight at once, with --concurrency 4"
    );
    assert!(most > 1, "the writes never overlapped: {most}");
    h.stop().await;
}
