//! What each watch reports of itself (last progress, failing since, restarts), and the one
//! probe of the API server that every failing watch waits on.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::Client;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How often the probe asks the API server's `/readyz` while a watch waits to retry.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a watch started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// `410 Gone`: its resourceVersion is older than the server keeps; listed again.
    Gone,
    /// A request failed, or the stream broke: retried after the watch's backoff.
    Failed,
    /// Nothing (not even a bookmark) arrived for the idle timeout: watched again.
    Idle,
}

impl Restart {
    pub fn label(self) -> &'static str {
        match self {
            Restart::Gone => "gone",
            Restart::Failed => "failed",
            Restart::Idle => "idle",
        }
    }
}

/// The state of one watch, read by `/readyz` and `/metrics`.
pub struct WatchHealth {
    /// `<resource> <scope>`, e.g. `secrets (all namespaces)`: a metric label.
    pub name: String,
    /// The last event, bookmark, completed list or accepted watch request.
    last_progress: Mutex<Instant>,
    /// Since when every request of this watch failed; `None` while it works.
    failing_since: Mutex<Option<Instant>>,
    /// The last failure's text (no object content: kube's error text).
    last_error: Mutex<String>,
    metrics: Arc<Metrics>,
}

impl WatchHealth {
    pub(super) fn progressed(&self) {
        *self.last_progress.lock().expect("watch health lock") = Instant::now();
        let was_failing = self.failing_since.lock().expect("watch health lock").take();
        if let Some(since) = was_failing {
            info!(watch = %self.name, after_seconds = since.elapsed().as_secs_f64(), "watching again");
        }
    }

    /// Records a failure; the first of a run is logged as a warning, the rest at debug.
    pub(super) fn failed(&self, error: &str) {
        *self.last_error.lock().expect("watch health lock") = error.to_string();
        let mut since = self.failing_since.lock().expect("watch health lock");
        if since.is_none() {
            *since = Some(Instant::now());
            warn!(watch = %self.name, error, "watch failed; retrying with backoff");
        } else {
            tracing::debug!(watch = %self.name, error, "watch failed again");
        }
    }

    pub(super) fn restarted(&self, why: Restart) {
        self.metrics.watch_restarted(&self.name, why.label());
    }

    /// Seconds since the last event, bookmark, list or accepted watch request.
    pub fn progress_age(&self) -> Duration {
        self.last_progress
            .lock()
            .expect("watch health lock")
            .elapsed()
    }

    /// How long every request of this watch has failed (zero while it works).
    pub fn failing_for(&self) -> Duration {
        self.failing_since
            .lock()
            .expect("watch health lock")
            .map(|since| since.elapsed())
            .unwrap_or_default()
    }
}

/// Every watch of the operator, and the probe their retries wait on.
pub struct Watches {
    client: Client,
    metrics: Arc<Metrics>,
    all: Mutex<Vec<Arc<WatchHealth>>>,
    gate: Arc<ProbeGate>,
}

impl Watches {
    /// The registry; the probe task starts with the first watch that waits to retry.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Arc<Self> {
        let watches = Arc::new(Self {
            client,
            metrics: metrics.clone(),
            all: Mutex::new(Vec::new()),
            gate: Arc::new(ProbeGate::default()),
        });
        let weak = Arc::downgrade(&watches);
        metrics.on_scrape(Box::new(move |metrics: &Metrics| {
            if let Some(watches) = weak.upgrade() {
                for watch in watches.all.lock().expect("watches lock").iter() {
                    metrics.set_watch_health(
                        &watch.name,
                        watch.progress_age(),
                        watch.failing_for(),
                    );
                }
            }
        }));
        watches
    }

    /// A new watch's health entry (a watch started again in a new term takes over the entry
    /// of the same name).
    pub fn register(&self, name: String) -> Arc<WatchHealth> {
        let health = Arc::new(WatchHealth {
            name,
            last_progress: Mutex::new(Instant::now()),
            failing_since: Mutex::new(None),
            last_error: Mutex::new(String::new()),
            metrics: self.metrics.clone(),
        });
        let mut all = self.all.lock().expect("watches lock");
        all.retain(|w| w.name != health.name);
        all.push(health.clone());
        health
    }

    /// Forgets the watches of a stopped term.
    pub fn clear(&self) {
        self.all.lock().expect("watches lock").clear();
    }

    /// Why the operator is blind, if a watch has failed for longer than `threshold`.
    pub fn blind(&self, threshold: Duration) -> Option<String> {
        let all = self.all.lock().expect("watches lock");
        let worst = all.iter().max_by_key(|w| w.failing_for())?;
        let failing = worst.failing_for();
        (failing > threshold).then(|| {
            format!(
                "the watch of {} has failed for {}s (last error: {})",
                worst.name,
                failing.as_secs(),
                worst.last_error.lock().expect("watch health lock")
            )
        })
    }

    /// How many times the probe has seen the API server answer again after it stopped
    /// answering. A watch notes it when a request begins and passes it to [`Self::pause`].
    pub(super) fn returns(&self) -> u64 {
        self.gate.returns.load(Ordering::SeqCst)
    }

    /// Whether the probe saw the API server answer again within `window`: a server just
    /// back refuses or ends watches for a few seconds while its caches fill.
    pub(super) fn returned_within(&self, window: Duration) -> bool {
        self.gate
            .last_return
            .lock()
            .expect("probe lock")
            .is_some_and(|at| at.elapsed() < window)
    }

    /// Waits `delay`, or less: until the probe sees the API server answer again after it
    /// stopped answering. `seen` is [`Self::returns`] when the failed request began: a
    /// return since then (the request was in flight when the server came back, and failed
    /// on a server still starting) ends the wait at once, so that watch does not sit out
    /// its whole backoff. Returns whether the wait was cut short.
    pub(super) async fn pause(&self, delay: Duration, seen: u64) -> bool {
        self.gate.ensure_probe(&self.client);
        self.gate.pause(delay, seen).await
    }
}

/// Counts the API server's returns: a watch that waits to retry wakes when the count moves.
#[derive(Default)]
pub(super) struct ProbeGate {
    /// Incremented each time the probe sees the server answer after not answering.
    returns: AtomicU64,
    /// The probe's last answer: false while the server does not answer.
    answering: AtomicBool,
    /// When the probe last saw the server answer again.
    last_return: Mutex<Option<Instant>>,
    waiters: AtomicUsize,
    changed: tokio::sync::Notify,
    wake_probe: tokio::sync::Notify,
    probe_started: AtomicBool,
}

impl ProbeGate {
    fn ensure_probe(self: &Arc<Self>, client: &Client) {
        if self.probe_started.swap(true, Ordering::SeqCst) {
            return;
        }
        self.answering.store(true, Ordering::SeqCst);
        // The gate lives as long as the operator's context: the task holds it.
        let gate = self.clone();
        let client = client.clone();
        tokio::spawn(async move {
            loop {
                if gate.waiters.load(Ordering::SeqCst) == 0 {
                    gate.wake_probe.notified().await;
                    continue;
                }
                let answered = probe(&client).await;
                let was = gate.answering.swap(answered, Ordering::SeqCst);
                if answered && !was {
                    *gate.last_return.lock().expect("probe lock") = Some(Instant::now());
                    gate.returns.fetch_add(1, Ordering::SeqCst);
                    let waiting = gate.waiters.load(Ordering::SeqCst);
                    info!(
                        waiting,
                        "the API server answers /readyz again; the watches retry now"
                    );
                    gate.changed.notify_waiters();
                } else if !answered && was {
                    warn!("the API server does not answer /readyz; watches retry when it does");
                }
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
        });
    }

    async fn pause(&self, delay: Duration, seen: u64) -> bool {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        self.wake_probe.notify_one();
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let woken = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.returns.load(Ordering::SeqCst) != seen {
                break true;
            }
            tokio::select! {
                () = &mut sleep => break false,
                () = changed => {}
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        woken
    }
}

/// Whether the API server answers `/readyz` with 200 (every client may read it: the
/// `system:public-info-viewer` role).
async fn probe(client: &Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    match tokio::time::timeout(PROBE_TIMEOUT, client.request_text(request)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "probe of /readyz failed");
            false
        }
        Err(_) => {
            tracing::debug!("probe of /readyz timed out");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU16;

    /// An API server that answers `/readyz` with the status in `status` (0: it hangs up).
    async fn fake_server(status: Arc<AtomicU16>) -> (dpc_http::Server, Client) {
        let server = dpc_http::bind_and_serve(
            "127.0.0.1:0".parse().unwrap(),
            move |_req: dpc_http::Req| {
                let status = status.load(Ordering::SeqCst);
                async move {
                    match hyper::StatusCode::from_u16(status) {
                        Ok(code) => Ok(dpc_http::text(code, "readyz\n")),
                        Err(_) => Err(dpc_http::Hangup),
                    }
                }
            },
        )
        .await
        .unwrap();
        let config = kube::Config::new(format!("http://{}", server.addr).parse().unwrap());
        (server, Client::try_from(config).unwrap())
    }

    fn watches(client: Client) -> Arc<Watches> {
        Watches::new(client, Arc::new(Metrics::new(false)))
    }

    #[tokio::test]
    async fn a_waiting_watch_wakes_when_the_server_answers_again_not_at_the_end_of_its_backoff() {
        let status = Arc::new(AtomicU16::new(503));
        let (_server, client) = fake_server(status.clone()).await;
        let watches = watches(client);
        let started = Instant::now();
        let flip = {
            let status = status.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                status.store(200, Ordering::SeqCst);
            })
        };
        let woken = watches
            .pause(Duration::from_secs(30), watches.returns())
            .await;
        flip.await.unwrap();
        assert!(woken, "the pause ended because the server answered");
        let took = started.elapsed();
        // Woken after the server's return, long before the 30 s backoff ended.
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(10),
            "woken {took:?} after the start (the server answered after 1 s)"
        );
    }

    #[tokio::test]
    async fn a_watch_failing_while_the_server_answers_waits_its_whole_backoff() {
        // The server answers all along (the watch fails for another reason: RBAC, say): the
        // probe sees no return, so the retry waits its backoff rather than spin.
        let (_server, client) = fake_server(Arc::new(AtomicU16::new(200))).await;
        let watches = watches(client);
        let started = Instant::now();
        let woken = watches
            .pause(Duration::from_millis(1500), watches.returns())
            .await;
        assert!(!woken);
        assert!(started.elapsed() >= Duration::from_millis(1500));
    }

    #[tokio::test]
    async fn a_watch_whose_request_was_in_flight_when_the_server_returned_retries_at_once() {
        let status = Arc::new(AtomicU16::new(503));
        let (_server, client) = fake_server(status.clone()).await;
        let watches = watches(client);
        // A request begins while the server is down...
        let seen = watches.returns();
        assert!(!watches.returned_within(Duration::from_secs(3600)));
        // ...and meanwhile another watch, waiting to retry, sees the server come back (once
        // the probe has seen it down).
        let flip = {
            let (status, gate) = (status.clone(), watches.gate.clone());
            tokio::spawn(async move {
                while gate.answering.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                status.store(200, Ordering::SeqCst);
            })
        };
        assert!(
            watches
                .pause(Duration::from_secs(30), watches.returns())
                .await
        );
        flip.await.unwrap();
        assert!(watches.returned_within(Duration::from_secs(10)));
        // The request fails after that return (a server still starting): no wait.
        let started = Instant::now();
        assert!(watches.pause(Duration::from_secs(30), seen).await);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "retried {:?} after its failure",
            started.elapsed()
        );
        // A request that began after the return and fails waits its backoff: no spin.
        let started = Instant::now();
        let woken = watches
            .pause(Duration::from_millis(600), watches.returns())
            .await;
        assert!(!woken);
        assert!(started.elapsed() >= Duration::from_millis(600));
    }

    #[test]
    fn blind_names_the_watch_that_failed_longest() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
        let watches = watches(client);
        let quiet = watches.register("configmaps (all namespaces)".into());
        let broken = watches.register("secrets (all namespaces)".into());
        broken.failed("connection refused");
        assert_eq!(watches.blind(Duration::from_secs(3600)), None);
        let why = watches.blind(Duration::ZERO).expect("a watch has failed");
        assert!(why.contains("secrets (all namespaces)"), "{why}");
        assert!(why.contains("connection refused"), "{why}");
        broken.progressed();
        quiet.progressed();
        assert_eq!(watches.blind(Duration::ZERO), None);
    }
}
