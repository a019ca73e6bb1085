//! Helpers over the simulator's call log and the operator's state, shared by the tests.

use std::time::Duration;

use dpc_operator::api::conditions;
use dpc_operator::config::OperatorConfig;
use dpc_testkit::dpc::{Call, SimOp};

use super::{Harness, test_config};

pub fn summary(calls: &[Call]) -> Vec<(SimOp, Option<u16>)> {
    calls.iter().map(|c| (c.op, c.status)).collect()
}

pub fn write_summary(calls: &[Call]) -> Vec<(SimOp, Option<u16>)> {
    summary(
        &calls
            .iter()
            .filter(|c| c.is_write())
            .cloned()
            .collect::<Vec<_>>(),
    )
}

/// The Ready objects' reconcile count, read from the operator's metrics.
pub fn reconciliations(h: &Harness) -> u64 {
    let text = h.ctx.metrics.encode();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(r#"dpc_operator_reconciliations_total{kind="connectionoverride"} "#)
        })
        .map_or(0, |n| n.parse().unwrap())
}

/// Drift checks every second. The CRD refuses a `syncInterval` under 30s, so the objects set
/// none and take the operator's default (the real API server enforces what the emulator let
/// through).
pub fn fast_drift() -> OperatorConfig {
    OperatorConfig {
        min_sync_interval: Duration::from_millis(200),
        default_sync_interval: Duration::from_secs(1),
        ..test_config()
    }
}

pub fn write_calls(calls: &[Call]) -> Vec<&Call> {
    calls.iter().filter(|c| c.is_write()).collect()
}

pub fn drifted(
    obj: &dpc_operator::api::ConnectionOverride,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions::find(&obj.status.as_ref()?.conditions, conditions::DRIFTED).cloned()
}

/// The secretKey values of the writes DPC saw.
pub fn written_values(calls: &[Call]) -> Vec<String> {
    write_calls(calls)
        .iter()
        .map(|c| {
            c.body.as_ref().unwrap()["connectionOverrides"]["connectionProperties"]["secretKey"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}
