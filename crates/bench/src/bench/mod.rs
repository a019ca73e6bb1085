//! The benchmark: the operator binary as a process against the Kubernetes API emulator and
//! the DPC simulator (both in this process), with figures a reader can reproduce. See
//! BENCHMARKS.md for the commands and results.

use dpc_operator_api::fixtures::{account_spec, override_spec};
use dpc_operator_api::{ConnectionOverride, ConnectionOverrideSpec, DpcAccount, DpcAccountSpec};
use dpc_testkit::dpc::{Call, DpcSim, RateLimit, SimConfig, SimOp};
use dpc_testkit::kube::store::ChangeKind;
use dpc_testkit::kube::{EmulatorConfig, KubeEmulator};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

mod world;
pub use world::*;

pub const NAMESPACE: &str = "bench";

pub const PROJECT: &str = "3c90c3cc-0d44-4b50-8888-8dd25736052a";

pub const CLIENT_ID: &str = "bench-client";

pub const CLIENT_SECRET: &str = "bench-secret-5e8a1f";

const ACCOUNT: &str = "dpc";

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub objects: usize,
    /// The emulator, or the real control plane.
    pub kube: KubeKind,
    pub environments: usize,
    /// Simulated DPC latency per request.
    pub latency: Duration,
    /// `--concurrency` of the operator.
    pub concurrency: u16,
    /// The account's `requestsPerMinute` (and the simulator's limit, with the burst).
    pub requests_per_minute: u32,
    pub burst: u32,
    /// The drift-check interval of every object (the operator's `--default-sync-interval`:
    /// objects may not ask for less than 30 s); the quiet phase lasts three of them.
    pub sync_interval: Duration,
    /// How many Secrets are rotated at once.
    pub rotations: usize,
    /// How many times they are, one round after the other: the percentiles pool every
    /// round (the p99 of one round of 20 is its maximum).
    pub rotation_rounds: usize,
    /// Secrets of 1 MiB that no object reads, created before the operator starts.
    pub large_secrets: usize,
    /// The operator binary (a release build).
    pub operator: PathBuf,
    /// More arguments for the operator, after the bench's own.
    pub operator_args: Vec<String>,
    /// Where to keep the operator's log.
    pub work_dir: PathBuf,
}

/// The figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// The Kubernetes API the operator ran against.
    pub kube: KubeKind,
    pub objects: usize,
    pub environments: usize,
    /// Arguments given to the operator beyond the bench's own.
    pub operator_args: Vec<String>,
    pub latency_ms: u64,
    pub concurrency: u16,
    pub requests_per_minute: u32,
    pub seconds_to_create_objects: f64,
    pub seconds_to_all_ready: f64,
    pub dpc_calls_to_converge: usize,
    pub ideal_seconds: f64,
    pub ratio_to_ideal: f64,
    /// From the operator's start to its first write.
    pub seconds_to_first_write: f64,
    /// From the first write to the last.
    pub seconds_of_writes: f64,
    /// CPU seconds of the operator, and of the emulator and simulator (this process), until
    /// every object was Ready: the two share the machine's cores.
    pub operator_cpu_seconds_converging: f64,
    pub doubles_cpu_seconds_converging: f64,
    /// CPU seconds of kube-apiserver and etcd until every object was Ready (0 on the
    /// emulator, which is in the doubles' figure).
    pub control_plane_cpu_seconds_converging: f64,
    pub writes_per_object: f64,
    pub sync_interval_secs: f64,
    pub quiet_intervals: u32,
    pub quiet_reads: usize,
    pub quiet_list_pages: usize,
    pub quiet_reads_allowed: usize,
    pub quiet_writes: usize,
    pub too_many_requests: usize,
    pub rotations: usize,
    pub rotation_rounds: usize,
    pub large_secrets: usize,
    pub rotation_p50_ms: u64,
    pub rotation_p99_ms: u64,
    pub peak_rss_mib: f64,
    pub cpu_seconds_per_idle_minute: f64,
    /// DPC list calls (pages included) until every object was Ready: the reads before first
    /// writes.
    pub dpc_lists_to_converge: usize,
    /// The operator's Kubernetes requests by verb and resource, from the API server's audit
    /// log (the real API server only): until every object was Ready, over the quiet phase,
    /// and for the rotation.
    pub kube_requests_to_converge: Option<BTreeMap<String, u64>>,
    pub kube_requests_quiet: Option<BTreeMap<String, u64>>,
    pub kube_requests_rotation: Option<BTreeMap<String, u64>>,
}

/// One round of the rotation: `rotated` Secrets patched at once; from each patch to the PUT
/// carrying its new value, and how many 429s the PUTs met.
async fn rotate(world: &World, rotated: usize, round: usize) -> Result<(Vec<u64>, usize), String> {
    world.sim.clear_calls();
    let value = format!("rotated-{round}");
    let changes: Vec<(String, u64)> = futures::future::join_all((0..rotated).map(|i| {
        let value = value.as_str();
        async move {
            let at = world.sim.now_ms();
            let api: Api<Secret> = Api::namespaced(world.client.clone(), NAMESPACE);
            let patch = json!({"stringData": {"key": value}});
            api.patch(
                &secret_of(i),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .expect("rotating a Secret");
            (format!("conn-{i}"), at)
        }
    }))
    .await;
    let is_update = |c: &Call| c.op == SimOp::Update && c.status == Some(200);
    let calls = world
        .sim
        .wait_for_calls(Duration::from_secs(60), |c| {
            c.iter().filter(|c| is_update(c)).count() >= rotated
        })
        .await
        .map_err(|c| {
            format!(
                "only {} of {rotated} rotations reached DPC in round {round}",
                c.iter().filter(|c| c.op == SimOp::Update).count()
            )
        })?;
    let throttled = calls.iter().filter(|c| c.status == Some(429)).count();
    let latencies = changes
        .iter()
        .filter_map(|(connection, at)| {
            calls
                .iter()
                .find(|c| {
                    is_update(c)
                        && c.body
                            .as_ref()
                            .is_some_and(|b| b["connectionName"] == *connection.as_str())
                })
                .map(|c| c.at_ms.saturating_sub(*at))
        })
        .collect();
    Ok((latencies, throttled))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Runs the benchmark.
pub async fn run(options: &BenchOptions) -> Result<BenchReport, String> {
    let per_second = options.requests_per_minute.div_ceil(60);
    let sim_config = SimConfig {
        latency_ms: options.latency.as_millis() as u64,
        token_lifetime_secs: 3600,
        // The server allows what the account is configured for: the rate plus its burst.
        rate_limit: Some(RateLimit {
            limit: per_second + options.burst,
            window_ms: 1000,
            retry_after_secs: Some(1),
        }),
        ..SimConfig::default()
    };
    let world = World::start(
        &options.work_dir,
        sim_config,
        options.requests_per_minute,
        options.burst,
        options.kube,
    )
    .await
    .map_err(|e| format!("starting the test doubles: {e}"))?;
    let rotated = options.rotations.min(options.objects);
    // Every object reads one key of its own Secret, as the design's memory target counts "objects and their
    // Secrets"; the first `rotated` of them are rotated later.
    futures::stream::iter((0..options.objects).map(|i| {
        let world = &world;
        async move { world.put_secret(&secret_of(i), &[("key", "first")]).await }
    }))
    .buffer_unordered(64)
    .for_each(|_| async {})
    .await;
    // Unrelated 1 MiB Secrets, as Helm keeps its releases: what a cache of whole Secrets
    // would hold for nothing.
    let large = "x".repeat(1024 * 1024);
    for i in 0..options.large_secrets {
        world
            .put_secret(
                &format!("sh.helm.release.v1.app-{i}.v1"),
                &[("release", &large)],
            )
            .await;
    }
    let created = Instant::now();
    let envs = options.environments;
    create_objects(&world.client, 0..options.objects, |i| {
        spec_of(i, envs, options.objects)
    })
    .await;
    let seconds_to_create_objects = created.elapsed().as_secs_f64();
    eprintln!(
        "bench: created {} objects in {seconds_to_create_objects:.1}s",
        options.objects
    );

    let log = options.work_dir.join("operator.log");
    let _ = std::fs::remove_file(&log);
    let mut extra = vec![
        "--concurrency".to_string(),
        options.concurrency.to_string(),
        "--min-sync-interval".into(),
        "1s".into(),
        "--default-sync-interval".into(),
        format!("{}ms", options.sync_interval.as_millis()),
    ];
    extra.extend(options.operator_args.iter().cloned());
    let started_ms = world.sim.now_ms();
    let (_, bench_cpu_before) = process_stats(std::process::id()).ok_or("reading /proc")?;
    let plane_cpu_before = world.control_plane_cpu();
    let mut operator =
        OperatorProcess::start(&options.operator, &world.kubeconfig, &log, "warn", &extra)
            .map_err(|e| format!("starting {}: {e}", options.operator.display()))?;
    let pid = operator.pid();

    let converge_timeout = Duration::from_secs(60 + (options.objects as u64) * 50 / 1000);
    let took = world.wait_ready(options.objects, converge_timeout).await?;
    let (_, operator_cpu_converging) = process_stats(pid).ok_or("reading /proc")?;
    let (_, bench_cpu_after) = process_stats(std::process::id()).ok_or("reading /proc")?;
    let plane_cpu_after = world.control_plane_cpu();
    let converge_requests = world.operator_requests(0);
    let calls = world.sim.calls();
    let dpc_calls = calls.len();
    let dpc_lists = calls.iter().filter(|c| c.op == SimOp::List).count();
    let write_times: Vec<u64> = calls
        .iter()
        .filter(|c| c.is_write())
        .map(|c| c.at_ms)
        .collect();
    let first_write_ms = write_times
        .iter()
        .min()
        .copied()
        .unwrap_or(0)
        .saturating_sub(started_ms);
    let write_span_ms = write_times
        .iter()
        .max()
        .copied()
        .unwrap_or(0)
        .saturating_sub(write_times.iter().min().copied().unwrap_or(0));
    let writes = calls.iter().filter(|c| c.is_write()).count();
    let mut too_many = calls.iter().filter(|c| c.status == Some(429)).count();
    let ideal = dpc_calls as f64 * options.latency.as_secs_f64() / f64::from(options.concurrency);
    eprintln!(
        "bench: {} objects Ready in {:.2}s ({dpc_calls} DPC calls)",
        options.objects,
        took.as_secs_f64()
    );

    // Quiet: three sync intervals with nothing changed; the operator's CPU over that time.
    world.sim.clear_calls();
    let (_, cpu_before) = process_stats(pid).ok_or("reading /proc")?;
    let quiet_started = Instant::now();
    let quiet_intervals = 3u32;
    tokio::time::sleep(options.sync_interval * quiet_intervals).await;
    let quiet_elapsed = quiet_started.elapsed();
    let (_, cpu_after) = process_stats(pid).ok_or("reading /proc")?;
    let quiet = world.sim.calls();
    // A list is one read however many pages it takes; pages are reported too.
    let quiet_pages = quiet.iter().filter(|c| c.op == SimOp::List).count();
    let quiet_reads = quiet
        .iter()
        .filter(|c| c.op == SimOp::List && c.param("page").is_none_or(|p| p == "0"))
        .count();
    let quiet_writes = quiet.iter().filter(|c| c.is_write()).count();
    too_many += quiet.iter().filter(|c| c.status == Some(429)).count();
    // One list per environment per interval; the ±10 % jitter can fit one more in.
    let quiet_reads_allowed =
        options.environments.min(options.objects) * (quiet_intervals as usize + 1);

    let quiet_requests = converge_requests
        .as_ref()
        .and_then(|(_, from)| world.operator_requests(*from));

    // Rotation: every rotated Secret changes at once, in each of the rounds.
    let rounds = options.rotation_rounds.max(1);
    let mut latencies = Vec::with_capacity(rotated * rounds);
    for round in 0..rounds {
        if round > 0 {
            // The previous round's status writes and Events settle first.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (round_latencies, throttled) = rotate(&world, rotated, round).await?;
        latencies.extend(round_latencies);
        too_many += throttled;
    }
    latencies.sort_unstable();

    // The status writes and Events the rotation causes follow its DPC writes closely.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rotation_requests = quiet_requests
        .as_ref()
        .and_then(|(_, from)| world.operator_requests(*from));
    let (peak_rss_mib, _) = process_stats(pid).ok_or("reading /proc")?;
    operator.terminate(Duration::from_secs(20)).await;
    let cpu_per_minute = (cpu_after - cpu_before) / (quiet_elapsed.as_secs_f64() / 60.0);
    Ok(BenchReport {
        objects: options.objects,
        environments: options.environments,
        latency_ms: options.latency.as_millis() as u64,
        concurrency: options.concurrency,
        operator_args: options.operator_args.clone(),
        requests_per_minute: options.requests_per_minute,
        seconds_to_create_objects,
        seconds_to_all_ready: took.as_secs_f64(),
        dpc_calls_to_converge: dpc_calls,
        ideal_seconds: ideal,
        ratio_to_ideal: took.as_secs_f64() / ideal.max(f64::EPSILON),
        seconds_to_first_write: first_write_ms as f64 / 1000.0,
        seconds_of_writes: write_span_ms as f64 / 1000.0,
        operator_cpu_seconds_converging: operator_cpu_converging,
        doubles_cpu_seconds_converging: bench_cpu_after - bench_cpu_before,
        control_plane_cpu_seconds_converging: plane_cpu_after - plane_cpu_before,
        kube: options.kube,
        writes_per_object: writes as f64 / options.objects.max(1) as f64,
        sync_interval_secs: options.sync_interval.as_secs_f64(),
        quiet_intervals,
        quiet_reads,
        quiet_list_pages: quiet_pages,
        quiet_reads_allowed,
        quiet_writes,
        too_many_requests: too_many,
        rotations: rotated,
        rotation_rounds: rounds,
        large_secrets: options.large_secrets,
        rotation_p50_ms: percentile(&latencies, 0.50),
        rotation_p99_ms: percentile(&latencies, 0.99),
        peak_rss_mib,
        cpu_seconds_per_idle_minute: cpu_per_minute,
        dpc_lists_to_converge: dpc_lists,
        kube_requests_to_converge: converge_requests.map(|(c, _)| c),
        kube_requests_quiet: quiet_requests.map(|(c, _)| c),
        kube_requests_rotation: rotation_requests.map(|(c, _)| c),
    })
}

/// `3.01: 1.000 patch connectionoverrides, …`: requests per object, by verb and resource.
fn per_object(counts: Option<&BTreeMap<String, u64>>, objects: usize) -> String {
    let Some(counts) = counts else {
        return "not measured (the emulator has no audit log)".into();
    };
    let n = objects.max(1) as f64;
    let total: u64 = counts.values().sum();
    let mut parts: Vec<(&String, &u64)> = counts.iter().collect();
    parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let each: Vec<String> = parts
        .iter()
        .map(|(k, v)| format!("{:.3} {k}", **v as f64 / n))
        .collect();
    format!("{:.2}: {}", total as f64 / n, each.join(", "))
}

/// `2: 1 create events, 1 patch …`: requests, by verb and resource.
fn totals(counts: Option<&BTreeMap<String, u64>>) -> String {
    let Some(counts) = counts else {
        return "not measured (the emulator has no audit log)".into();
    };
    let total: u64 = counts.values().sum();
    let each: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!("{total}: {}", each.join(", "))
}

/// The report as a table.
pub fn table(r: &BenchReport) -> String {
    let rows = [
        (
            "objects N / environments S",
            format!("{} / {}", r.objects, r.environments),
        ),
        (
            "DPC latency L / concurrency C",
            format!("{} ms / {}", r.latency_ms, r.concurrency),
        ),
        (
            "account rate (requests/min)",
            r.requests_per_minute.to_string(),
        ),
        (
            "more operator arguments",
            if r.operator_args.is_empty() {
                "none".to_string()
            } else {
                r.operator_args.join(" ")
            },
        ),
        (
            "time until every object is Ready",
            format!("{:.2} s", r.seconds_to_all_ready),
        ),
        (
            "ideal (DPC calls × L ÷ C)",
            format!(
                "{:.2} s ({} calls)",
                r.ideal_seconds, r.dpc_calls_to_converge
            ),
        ),
        ("ratio to ideal", format!("{:.2}", r.ratio_to_ideal)),
        (
            "start to first write / first to last write",
            format!(
                "{:.2} s / {:.2} s",
                r.seconds_to_first_write, r.seconds_of_writes
            ),
        ),
        ("Kubernetes API", format!("{:?}", r.kube).to_lowercase()),
        (
            "CPU while converging: operator / bench process (emulator and simulator) / kube-apiserver+etcd",
            format!(
                "{:.1} s / {:.1} s / {:.1} s",
                r.operator_cpu_seconds_converging,
                r.doubles_cpu_seconds_converging,
                r.control_plane_cpu_seconds_converging
            ),
        ),
        (
            "DPC writes per object",
            format!("{:.3}", r.writes_per_object),
        ),
        (
            "quiet: list reads / writes over 3 sync intervals",
            format!(
                "{} (at most {}; {} pages) / {}",
                r.quiet_reads, r.quiet_reads_allowed, r.quiet_list_pages, r.quiet_writes
            ),
        ),
        ("429s received", r.too_many_requests.to_string()),
        (
            "DPC list calls until Ready (pages included)",
            r.dpc_lists_to_converge.to_string(),
        ),
        (
            "Kubernetes requests per object to converge (audit log)",
            per_object(r.kube_requests_to_converge.as_ref(), r.objects),
        ),
        (
            "Kubernetes requests over the quiet phase (audit log)",
            totals(r.kube_requests_quiet.as_ref()),
        ),
        (
            "Kubernetes requests of the rotation (audit log)",
            totals(r.kube_requests_rotation.as_ref()),
        ),
        (
            "rotation of Secrets at once: p50 / p99",
            format!(
                "{} ms / {} ms ({} Secrets, {} rounds)",
                r.rotation_p50_ms, r.rotation_p99_ms, r.rotations, r.rotation_rounds
            ),
        ),
        (
            "operator peak resident memory",
            format!(
                "{:.1} MiB ({} unrelated 1 MiB Secrets beside)",
                r.peak_rss_mib, r.large_secrets
            ),
        ),
        (
            "operator CPU while idle",
            format!(
                "{:.2} s per minute (syncInterval {} s)",
                r.cpu_seconds_per_idle_minute, r.sync_interval_secs
            ),
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("| {k:<width$} | {v} |\n"));
    }
    out
}
