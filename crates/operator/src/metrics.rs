//! The operator's Prometheus metrics. Labels are bounded: kinds, DPC operations, outcome
//! classes, condition reasons as failure categories, and, for the per-object condition
//! gauge, namespace and name. Error text never becomes a label.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dpc::{CallObserver, Operation};
use crate::key::ObjKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    kind: &'static str,
    category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    watch: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    watch: String,
    reason: &'static str,
}

/// The per-object condition gauge: written out at each scrape from the statuses last set
/// per object, rather than kept as a `Family` whose every series holds its own copy of the
/// namespace and name (about 0.5 KB an object at 10,000 objects; BENCHMARKS.md, "Memory").
#[derive(Debug, Default)]
struct ConditionSeries {
    /// The statuses last set per object, in the order of its conditions.
    state: Mutex<HashMap<ObjKey, Box<[ExportedCondition]>>>,
}

impl Collector for ConditionSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.state.lock().expect("metrics lock");
        let mut metric = encoder.encode_descriptor(
            "condition",
            "1 for the current status of each condition of each object (namespace, name, type, status)",
            None,
            MetricType::Gauge,
        )?;
        for (key, conditions) in state.iter() {
            let (namespace, name) = &**key;
            for &(type_, status) in conditions.iter() {
                let labels = [
                    ("namespace", namespace.as_str()),
                    ("name", name.as_str()),
                    ("type", type_),
                    ("status", status),
                ];
                metric.encode_family(&labels)?.encode_gauge(&1i64)?;
            }
        }
        Ok(())
    }
}

/// Condition types and statuses come from fixed sets; series labels borrow them.
fn static_type(type_: &str) -> Option<&'static str> {
    ["Ready", "Synced", "Drifted"]
        .into_iter()
        .find(|t| *t == type_)
}

fn static_status(status: &str) -> &'static str {
    match status {
        "True" => "True",
        "False" => "False",
        _ => "Unknown",
    }
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// A condition type and the status exported for it.
type ExportedCondition = (&'static str, &'static str);

/// Work done before each scrape (gauges that are ages are set then).
type ScrapeHook = Box<dyn Fn(&Metrics) + Send + Sync>;

type Seconds = Gauge<f64, AtomicU64>;

/// Every metric of the operator.
pub struct Metrics {
    registry: Registry,
    reconciliations: Family<KindLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    reconcile_duration: Histograms<KindLabels>,
    dpc_requests: Family<RequestLabels, Counter>,
    dpc_duration: Histograms<OperationLabels>,
    rate_limit_wait: Counter<f64, AtomicU64>,
    conditions: Arc<ConditionSeries>,
    per_object: bool,
    watch_age: Family<WatchLabels, Seconds>,
    watch_failing: Family<WatchLabels, Seconds>,
    watch_restarts: Family<RestartLabels, Counter>,
    on_scrape: Mutex<Vec<ScrapeHook>>,
    /// ConnectionOverride passes finished, for whoever waits for one (the tests).
    passes: tokio::sync::watch::Sender<u64>,
}

fn reconcile_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn request_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

impl Metrics {
    /// The registry with every metric; `per_object` turns the per-object condition gauge on.
    pub fn new(per_object: bool) -> Self {
        let mut registry = Registry::with_prefix("dpc_operator");
        let reconciliations = Family::<KindLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations run, by kind",
            reconciliations.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciliations that did not reach their goal, by kind and category (the condition reason, or kubernetes/internal)",
            failures.clone(),
        );
        let reconcile_duration: Histograms<KindLabels> =
            Family::new_with_constructor(reconcile_buckets);
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconciliation",
            reconcile_duration.clone(),
        );
        let dpc_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "dpc_requests",
            "Requests to DPC by operation and outcome (success, a status code or class, timeout, reset, connect_error)",
            dpc_requests.clone(),
        );
        let dpc_duration: Histograms<OperationLabels> =
            Family::new_with_constructor(request_buckets);
        registry.register(
            "dpc_request_duration_seconds",
            "Duration of one request to DPC",
            dpc_duration.clone(),
        );
        let rate_limit_wait = Counter::<f64, AtomicU64>::default();
        registry.register(
            "rate_limit_wait_seconds",
            "Time requests spent waiting for an account's request rate",
            rate_limit_wait.clone(),
        );
        let conditions = Arc::new(ConditionSeries::default());
        registry.register_collector(Box::new(conditions.clone()));
        let (watch_age, watch_failing, watch_restarts) = register_watch_families(&mut registry);
        Self {
            registry,
            reconciliations,
            failures,
            reconcile_duration,
            dpc_requests,
            dpc_duration,
            rate_limit_wait,
            conditions,
            per_object,
            watch_age,
            watch_failing,
            watch_restarts,
            on_scrape: Mutex::new(Vec::new()),
            passes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// The number of ConnectionOverride passes finished, as it changes.
    pub fn passes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.passes.subscribe()
    }

    /// Runs `hook` before each scrape.
    pub fn on_scrape(&self, hook: ScrapeHook) {
        self.on_scrape.lock().expect("metrics lock").push(hook);
    }

    /// The state of the watch `watch`: time since its last event (or bookmark, list or
    /// accepted request), and how long it has failed.
    pub fn set_watch_health(&self, watch: &str, progress_age: Duration, failing: Duration) {
        let labels = WatchLabels {
            watch: watch.to_string(),
        };
        self.watch_age
            .get_or_create(&labels)
            .set(progress_age.as_secs_f64());
        self.watch_failing
            .get_or_create(&labels)
            .set(failing.as_secs_f64());
    }

    /// The watch `watch` started again, for `reason` (gone, failed, idle).
    pub fn watch_restarted(&self, watch: &str, reason: &'static str) {
        self.watch_restarts
            .get_or_create(&RestartLabels {
                watch: watch.to_string(),
                reason,
            })
            .inc();
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        for hook in self.on_scrape.lock().expect("metrics lock").iter() {
            hook(self);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// One reconciliation of `kind` ran for `elapsed`.
    pub fn reconciled(&self, kind: &'static str, elapsed: Duration) {
        self.reconciliations
            .get_or_create(&KindLabels { kind })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabels { kind })
            .observe(elapsed.as_secs_f64());
        if kind == "connectionoverride" {
            self.passes.send_modify(|n| *n += 1);
        }
    }

    /// A reconciliation of `kind` failed, in `category`.
    pub fn failed(&self, kind: &'static str, category: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { kind, category })
            .inc();
    }

    /// The conditions an object now has.
    pub fn set_conditions(&self, namespace: &str, name: &str, conditions: &[Condition]) {
        self.set_object_conditions(&crate::key::obj_key(namespace, name), conditions);
    }

    /// The conditions the object `key` now has (the series keep the key, shared).
    pub fn set_object_conditions(&self, key: &ObjKey, conditions: &[Condition]) {
        if !self.per_object {
            return;
        }
        let now: Box<[ExportedCondition]> = conditions
            .iter()
            .filter_map(|c| static_type(&c.type_).map(|t| (t, static_status(&c.status))))
            .collect();
        let mut state = self.conditions.state.lock().expect("metrics lock");
        if state.get(key) != Some(&now) {
            state.insert(key.clone(), now);
        }
    }

    /// Drops the series of an object that is gone.
    pub fn forget_object(&self, namespace: &str, name: &str) {
        let mut state = self.conditions.state.lock().expect("metrics lock");
        state.remove(&(namespace.to_string(), name.to_string()));
    }
}

type WatchFamilies = (
    Family<WatchLabels, Seconds>,
    Family<WatchLabels, Seconds>,
    Family<RestartLabels, Counter>,
);

fn register_watch_families(registry: &mut Registry) -> WatchFamilies {
    let age = Family::<WatchLabels, Seconds>::default();
    registry.register(
        "watch_last_event_age_seconds",
        "Seconds since each watch last received an event or bookmark, completed a list or had a watch request accepted (a bookmark arrives about once a minute)",
        age.clone(),
    );
    let failing = Family::<WatchLabels, Seconds>::default();
    registry.register(
        "watch_failing_seconds",
        "Seconds for which every request of each watch has failed: 0 while it watches; above 0 the operator does not see that watch's changes",
        failing.clone(),
    );
    let restarts = Family::<RestartLabels, Counter>::default();
    registry.register(
        "watch_restarts",
        "Watches started again, by watch and reason (gone: 410, listed again; failed: a request or stream failed, retried after backoff; idle: nothing arrived for 150 s)",
        restarts.clone(),
    );
    (age, failing, restarts)
}

impl CallObserver for Metrics {
    fn observe(&self, operation: Operation, outcome: &'static str, elapsed: Duration) {
        let operation = operation.as_str();
        self.dpc_requests
            .get_or_create(&RequestLabels { operation, outcome })
            .inc();
        self.dpc_duration
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    fn waited(&self, elapsed: Duration) {
        self.rate_limit_wait.inc_by(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn condition(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: "R".into(),
            message: "a message that never becomes a label".into(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::now()),
        }
    }

    #[test]
    fn the_condition_gauge_keeps_one_series_per_condition() {
        let m = Metrics::new(true);
        m.set_conditions(
            "ns",
            "a",
            &[condition("Ready", "False"), condition("Synced", "False")],
        );
        m.set_conditions(
            "ns",
            "a",
            &[condition("Ready", "True"), condition("Synced", "True")],
        );
        let text = m.encode();
        assert!(
            text.contains(
                r#"dpc_operator_condition{namespace="ns",name="a",type="Ready",status="True"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"type="Ready",status="False""#), "{text}");
        assert!(!text.contains("never becomes a label"));
        m.forget_object("ns", "a");
        assert!(!m.encode().contains(r#"name="a""#));
    }

    #[test]
    fn requests_reconciles_and_waits_are_counted() {
        let m = Metrics::new(false);
        m.observe(Operation::Create, "success", Duration::from_millis(20));
        m.observe(Operation::Create, "429", Duration::from_millis(5));
        m.waited(Duration::from_millis(1500));
        m.reconciled("connectionoverride", Duration::from_millis(3));
        m.failed("connectionoverride", "ApiRejected");
        m.set_conditions("ns", "a", &[condition("Ready", "True")]);
        let text = m.encode();
        for line in [
            r#"dpc_operator_dpc_requests_total{operation="create",outcome="success"} 1"#,
            r#"dpc_operator_dpc_requests_total{operation="create",outcome="429"} 1"#,
            "dpc_operator_rate_limit_wait_seconds_total 1.5",
            r#"dpc_operator_reconciliations_total{kind="connectionoverride"} 1"#,
            r#"dpc_operator_reconcile_failures_total{kind="connectionoverride",category="ApiRejected"} 1"#,
            r#"dpc_operator_dpc_request_duration_seconds_count{operation="create"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            !text.contains("dpc_operator_condition{"),
            "per-object series are off"
        );
    }
}
