//! The soak: objects under injected faults — 5xx, timeouts, resets, 429 bursts, token
//! endpoint failures, dropped watches and `410 Gone`, the operator killed with SIGKILL and
//! restarted — while they are created, changed, rotated and deleted. Then the faults stop and
//! the outcome is checked: every remote override equals its object's desired state, every
//! deleted object's override is gone and no other exists, no secret value reached the logs,
//! and no object was retried in a storm.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};

use crate::bench::{
    self, CLIENT_ID, CLIENT_SECRET, Kube, KubeKind, NAMESPACE, OperatorProcess, PROJECT, World,
};
use dpc_operator_api::ConnectionOverride;
use dpc_testkit::control_plane::Stop;
use dpc_testkit::dpc::{Fault, FaultKind, RandomFaults, SimConfig, SimOp};

/// How to soak.
#[derive(Clone, Debug)]
pub struct SoakOptions {
    pub objects: usize,
    /// How long faults are injected.
    pub duration: Duration,
    pub seed: u64,
    /// How many times the operator is killed with SIGKILL and restarted.
    pub kills: usize,
    pub operator: PathBuf,
    pub work_dir: PathBuf,
    /// An object retried more often than this per minute is a retry storm.
    pub max_calls_per_object_minute: f64,
    /// The emulator (dropped watches, compaction) or the real control plane (kube-apiserver
    /// SIGTERM and SIGKILL restarts, etcd compaction, an etcd stop).
    pub kube: KubeKind,
    /// Faults of the real control plane, spread over the run (cycling through the kinds).
    pub control_plane_faults: usize,
}

/// How long after a fault the next change reached DPC.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Recovery {
    pub count: usize,
    pub p50_ms: u64,
    pub max_ms: u64,
    #[serde(skip)]
    samples: Vec<u64>,
}

/// What happened and what was found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakReport {
    pub objects_at_start: usize,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub rotated: usize,
    pub kube: Option<KubeKind>,
    pub watch_drops: usize,
    pub compactions: usize,
    pub kills: usize,
    /// Faults of the control plane by kind.
    pub control_plane_faults: BTreeMap<String, usize>,
    /// Per fault kind: from the end of the fault (the restarted process serving again) to
    /// the next change (a Secret rotation) reaching DPC.
    pub recovery: BTreeMap<String, Recovery>,
    pub faults_by_kind: BTreeMap<String, usize>,
    pub dpc_calls: usize,
    pub max_calls_per_object_minute: f64,
    pub seconds_to_converge_after_faults: f64,
    /// Problems found; empty when the soak passed.
    pub problems: Vec<String>,
}

const SYNC: Duration = Duration::from_secs(3);

fn secret_name(i: usize) -> String {
    format!("soak-{i}")
}

/// The desired state of object `i` given its generation of values.
struct Desired {
    secret_name: String,
    /// The value read from its Secret, for the even objects.
    secret_value: Option<String>,
}

/// Runs the soak.
pub async fn run(options: &SoakOptions) -> Result<SoakReport, String> {
    let random = RandomFaults {
        seed: options.seed,
        p_5xx: 0.10,
        p_reset: 0.05,
        p_timeout: 0.03,
        timeout_ms: 2500,
        p_429: 0.03,
        p_token_5xx: 0.25,
    };
    let sim_config = SimConfig {
        token_lifetime_secs: 20,
        random_faults: Some(random),
        ..SimConfig::default()
    };
    let mut world = World::start(&options.work_dir, sim_config, 600_000, 100, options.kube)
        .await
        .map_err(|e| format!("starting the test doubles: {e}"))?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut report = SoakReport {
        kube: Some(options.kube),
        objects_at_start: options.objects,
        ..SoakReport::default()
    };
    let mut secret_values: BTreeSet<String> = BTreeSet::new();
    let mut desired: BTreeMap<usize, Desired> = BTreeMap::new();
    let mut deleted: BTreeSet<usize> = BTreeSet::new();

    let new_value = |rng: &mut StdRng, i: usize| format!("sv-{i}-{:08x}", rng.random::<u32>());
    for i in 0..options.objects {
        let value = i.is_multiple_of(2).then(|| new_value(&mut rng, i));
        if let Some(v) = &value {
            world.put_secret(&secret_name(i), &[("key", v)]).await;
            secret_values.insert(v.clone());
        }
        desired.insert(
            i,
            Desired {
                secret_name: format!("prod/conn-{i}"),
                secret_value: value,
            },
        );
    }
    let objects = options.objects;
    bench::create_objects(&world.client, 0..objects, soak_spec).await;

    let log = |n: usize| options.work_dir.join(format!("operator-{n}.log"));
    let sync = format!("{}s", SYNC.as_secs());
    let flags: Vec<String> = [
        "--concurrency",
        "8",
        "--dpc-timeout",
        "1s",
        "--backoff-base",
        "200ms",
        "--backoff-max",
        "5s",
        "--min-sync-interval",
        "1s",
        "--default-sync-interval",
        &sync,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut runs = 0;
    let mut operator = OperatorProcess::start(
        &options.operator,
        &world.kubeconfig,
        &log(runs),
        "debug",
        &flags,
    )
    .map_err(|e| format!("starting {}: {e}", options.operator.display()))?;
    let covs: Api<ConnectionOverride> = Api::namespaced(world.client.clone(), NAMESPACE);
    let secrets: Api<Secret> = Api::namespaced(world.client.clone(), NAMESPACE);

    // Faults and changes.
    let started = Instant::now();
    let kill_at: Vec<Duration> = (1..=options.kills)
        .map(|k| options.duration * k as u32 / (options.kills as u32 + 1))
        .collect();
    let fault_at: Vec<Duration> = match options.kube {
        KubeKind::Real => (1..=options.control_plane_faults)
            .map(|k| {
                options.duration * (2 * k as u32 - 1) / (2 * options.control_plane_faults as u32)
            })
            .collect(),
        KubeKind::Emulator => Vec::new(),
    };
    let mut faults_done = 0;
    let mut next_object = objects;
    let mut changes = Changes {
        secrets: &secrets,
        desired: &mut desired,
        deleted: &mut deleted,
        secret_values: &mut secret_values,
    };
    // A fault can outlast the run (a graceful kube-apiserver drains for about a minute):
    // every fault and kill scheduled still happens.
    while started.elapsed() < options.duration
        || faults_done < fault_at.len()
        || report.kills < kill_at.len()
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if faults_done < fault_at.len() && started.elapsed() >= fault_at[faults_done] {
            let kind = CONTROL_PLANE_FAULTS[faults_done % CONTROL_PLANE_FAULTS.len()];
            faults_done += 1;
            control_plane_fault(&mut world, kind).await?;
            *report.control_plane_faults.entry(kind.into()).or_default() += 1;
            let took = changes.next_change_reaches_dpc(&world, &mut rng).await?;
            report.recovery.entry(kind.into()).or_default().add(took);
            continue;
        }
        if report.kills < kill_at.len() && started.elapsed() >= kill_at[report.kills] {
            operator.kill().await;
            report.kills += 1;
            runs += 1;
            operator = OperatorProcess::start(
                &options.operator,
                &world.kubeconfig,
                &log(runs),
                "debug",
                &flags,
            )
            .map_err(|e| format!("restarting the operator: {e}"))?;
            let took = changes.next_change_reaches_dpc(&world, &mut rng).await?;
            report
                .recovery
                .entry("operator SIGKILL".into())
                .or_default()
                .add(took);
            continue;
        }
        let desired = &mut *changes.desired;
        let deleted = &mut *changes.deleted;
        let secret_values = &mut *changes.secret_values;
        let live: Vec<usize> = desired
            .keys()
            .copied()
            .filter(|i| !deleted.contains(i))
            .collect();
        let pick = |rng: &mut StdRng| live[rng.random_range(0..live.len())];
        match rng.random_range(0..100) {
            0..30 if !live.is_empty() => {
                let i = pick(&mut rng);
                let name = format!("prod/conn-{i}-{:04x}", rng.random::<u16>());
                let patch = json!({"spec": {"connectionOverrides": {"connectionProperties": {"secretName": name}}}});
                covs.patch(
                    &format!("cov-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(|e| format!("updating cov-{i}: {e}"))?;
                desired.get_mut(&i).expect("a live object").secret_name = name;
                report.updated += 1;
            }
            30..50 if !live.is_empty() => {
                let i = pick(&mut rng);
                if desired[&i].secret_value.is_some() {
                    let value = new_value(&mut rng, i);
                    changes.rotate(i, value).await?;
                    report.rotated += 1;
                }
            }
            50..60 if live.len() > 1 => {
                let i = pick(&mut rng);
                covs.delete(&format!("cov-{i}"), &DeleteParams::default())
                    .await
                    .map_err(|e| format!("deleting cov-{i}: {e}"))?;
                deleted.insert(i);
                report.deleted += 1;
            }
            60..70 => {
                let i = next_object;
                next_object += 1;
                let value = i.is_multiple_of(2).then(|| new_value(&mut rng, i));
                if let Some(v) = &value {
                    world.put_secret(&secret_name(i), &[("key", v)]).await;
                    secret_values.insert(v.clone());
                }
                bench::create_objects(&world.client, i..i + 1, soak_spec).await;
                desired.insert(
                    i,
                    Desired {
                        secret_name: format!("prod/conn-{i}"),
                        secret_value: value,
                    },
                );
                report.created += 1;
            }
            70..76 => {
                if let Kube::Emulator(emu) = &world.kube {
                    emu.drop_watches();
                    report.watch_drops += 1;
                }
            }
            76..80 => {
                // Watches resuming from before now get 410 Gone and must list again.
                if let Kube::Emulator(emu) = &world.kube {
                    emu.compact();
                    emu.drop_watches();
                    report.compactions += 1;
                }
            }
            80..84 => {
                let burst = Fault {
                    op: None,
                    kind: FaultKind::Status {
                        status: 429,
                        retry_after: Some("1".into()),
                        body: None,
                    },
                    times: 5,
                };
                world.sim.push_fault(burst);
            }
            _ => {}
        }
    }
    let chaos_calls = world.sim.calls();
    let chaos_minutes = started.elapsed().as_secs_f64() / 60.0;

    // The faults stop; everything must converge.
    world.sim.configure(|c| c.random_faults = None);
    world.sim.clear_faults();
    let calm = Instant::now();
    let live: Vec<usize> = desired
        .keys()
        .copied()
        .filter(|i| !deleted.contains(i))
        .collect();
    let deadline = Duration::from_secs(120);
    loop {
        let (total, ready) = world.ready_count().await?;
        if ready == live.len() && total == live.len() {
            break;
        }
        if calm.elapsed() > deadline {
            report.problems.push(format!(
                "after the faults stopped, {ready} of {} objects were Ready and {total} existed within {deadline:?}",
                live.len()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.seconds_to_converge_after_faults = calm.elapsed().as_secs_f64();
    // Drift checks run every few seconds: let one more pass correct anything left over.
    tokio::time::sleep(SYNC * 2).await;

    // Every remote override equals its object's desired state; nothing else exists.
    let stored: BTreeMap<String, Value> = world
        .sim
        .overrides()
        .into_iter()
        .filter(|o| o.project_id == PROJECT)
        .map(|o| (o.connection_name.clone(), o.connection_overrides))
        .collect();
    for i in &live {
        let want = &desired[i];
        let mut properties = json!({"secretName": want.secret_name});
        if let Some(v) = &want.secret_value {
            properties["secretKey"] = json!(v);
        }
        let expected = json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}, "connectionProperties": properties});
        match stored.get(&format!("conn-{i}")) {
            None => report
                .problems
                .push(format!("cov-{i} has no override in DPC")),
            Some(found) if *found != expected => {
                report.problems.push(format!(
                    "cov-{i}: DPC holds a different override than desired"
                ));
            }
            Some(_) => {}
        }
    }
    let expected_names: BTreeSet<String> = live.iter().map(|i| format!("conn-{i}")).collect();
    for name in stored.keys() {
        if !expected_names.contains(name) {
            report.problems.push(format!(
                "{name} still exists in DPC, but its object is gone"
            ));
        }
    }

    // No retry storm: calls attributed to each object during the faults.
    let mut per_object: BTreeMap<String, usize> = BTreeMap::new();
    for call in &chaos_calls {
        let name = match call.op {
            SimOp::Create | SimOp::Update => call
                .body
                .as_ref()
                .and_then(|b| b["connectionName"].as_str())
                .map(String::from),
            SimOp::Delete => call.param("connectionNames"),
            _ => None,
        };
        if let Some(name) = name {
            *per_object.entry(name).or_default() += 1;
        }
    }
    report.max_calls_per_object_minute =
        per_object.values().copied().max().unwrap_or(0) as f64 / chaos_minutes.max(1.0 / 60.0);
    if report.max_calls_per_object_minute > options.max_calls_per_object_minute {
        report.problems.push(format!(
            "an object was called {:.1} times per minute (the bound is {})",
            report.max_calls_per_object_minute, options.max_calls_per_object_minute
        ));
    }
    for call in &chaos_calls {
        if let Some(fault) = &call.fault {
            let kind = match call.op {
                SimOp::Token => format!("token endpoint: {fault}"),
                _ => fault.clone(),
            };
            *report.faults_by_kind.entry(kind).or_default() += 1;
        }
    }
    report.dpc_calls = world.sim.calls().len();

    // No secret value in any log of any run.
    operator.terminate(Duration::from_secs(20)).await;
    let mut secrets_to_find: Vec<String> = vec![CLIENT_SECRET.into(), CLIENT_ID.into()];
    secrets_to_find.extend(world.sim.issued_tokens());
    secrets_to_find.extend(secret_values);
    for n in 0..=runs {
        let text = std::fs::read_to_string(log(n)).unwrap_or_default();
        if text.is_empty() && n == runs {
            report
                .problems
                .push("the operator's log is empty: nothing was checked".into());
        }
        if secrets_to_find.iter().any(|s| text.contains(s.as_str())) {
            report
                .problems
                .push(format!("a secret value appears in the log of run {n}"));
        }
    }
    Ok(report)
}

/// The faults of the real control plane, in the order the soak injects them.
const CONTROL_PLANE_FAULTS: [&str; 4] = [
    "kube-apiserver SIGKILL",
    "etcd compaction",
    "etcd stop",
    "kube-apiserver SIGTERM",
];

/// How long a stopped process of the control plane stays down.
const DOWN: Duration = Duration::from_secs(2);

async fn control_plane_fault(world: &mut World, kind: &str) -> Result<(), String> {
    let Kube::Real(plane) = &mut world.kube else {
        return Ok(());
    };
    match kind {
        "kube-apiserver SIGTERM" => plane.outage("kube-apiserver", Stop::Term, DOWN).await,
        "kube-apiserver SIGKILL" => plane.outage("kube-apiserver", Stop::Kill, DOWN).await,
        "etcd stop" => plane.outage("etcd", Stop::Term, DOWN).await,
        _ => plane.compact_etcd().await.map(|_| ()),
    }
}

/// The soak's record of what it changed, for the checks at the end.
struct Changes<'a> {
    secrets: &'a Api<Secret>,
    desired: &'a mut BTreeMap<usize, Desired>,
    deleted: &'a mut BTreeSet<usize>,
    secret_values: &'a mut BTreeSet<String>,
}

impl Changes<'_> {
    /// Rotates the Secret of object `i` to `value`, and records it.
    async fn rotate(&mut self, i: usize, value: String) -> Result<(), String> {
        let patch = json!({"stringData": {"key": value}});
        self.secrets
            .patch(
                &secret_name(i),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| format!("rotating {}: {e}", secret_name(i)))?;
        self.secret_values.insert(value.clone());
        self.desired
            .get_mut(&i)
            .expect("a live object")
            .secret_value = Some(value);
        Ok(())
    }

    /// Rotates the Secret of a live object and returns how long until DPC saw its value.
    async fn next_change_reaches_dpc(
        &mut self,
        world: &World,
        rng: &mut StdRng,
    ) -> Result<Duration, String> {
        let with_secret: Vec<usize> = self
            .desired
            .iter()
            .filter(|(i, d)| d.secret_value.is_some() && !self.deleted.contains(i))
            .map(|(i, _)| *i)
            .collect();
        let i = with_secret[rng.random_range(0..with_secret.len())];
        let value = format!("sv-{i}-{:08x}", rng.random::<u32>());
        let started = Instant::now();
        self.rotate(i, value.clone()).await?;
        let written = world
            .sim
            .wait_for_calls(Duration::from_secs(60), |calls| {
                calls.iter().rev().any(|c| {
                    c.is_write()
                        && c.body.as_ref().is_some_and(|b| {
                            b["connectionOverrides"]["connectionProperties"]["secretKey"]
                                == value.as_str()
                        })
                })
            })
            .await;
        written.map_err(|_| format!("a rotation of {} never reached DPC", secret_name(i)))?;
        Ok(started.elapsed())
    }
}

impl Recovery {
    fn add(&mut self, took: Duration) {
        self.samples.push(took.as_millis() as u64);
        self.samples.sort_unstable();
        self.count = self.samples.len();
        self.p50_ms = self.samples[(self.count - 1) / 2];
        self.max_ms = *self.samples.last().expect("a sample");
    }
}

fn soak_spec(i: usize) -> dpc_operator_api::ConnectionOverrideSpec {
    let mut spec = bench::spec_of(i, 3, 0);
    if i.is_multiple_of(2) {
        spec = spec.with_secret_value("secretKey", &secret_name(i), "key");
    }
    spec
}
