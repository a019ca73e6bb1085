//! The per-object state kept between passes, in one map.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;

use crate::api::conditions::Reason;
use crate::key::ObjKey;

/// The request a terminal failure was for. DPC is not asked again until the request (its
/// hash), the account (its fingerprint) or the mode changes; an object the operator cannot
/// read is not reported again until its generation or the error changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    Request {
        hash: String,
        account: String,
        observe_only: bool,
    },
    Unreadable {
        generation: i64,
        error: String,
    },
}

/// A terminal failure: the request it was for and how it was reported.
#[derive(Clone, Debug)]
struct Refusal {
    gate: Gate,
    reason: Reason,
    message: String,
}

/// What the operator keeps about one object between passes.
#[derive(Default)]
struct ObjectState {
    /// Failures in a row: the exponent of the backoff.
    failures: u32,
    refusal: Option<Box<Refusal>>,
    /// `(hash of the uid, hash)` this process last wrote to `status.appliedHash`.
    applied: Option<(u64, Box<str>)>,
    /// `(hash of the uid, set)`: the create-pending annotation as this process last wrote
    /// it (set, or removed), until the watch shows that write.
    pending: Option<(u64, bool)>,
}

impl ObjectState {
    fn is_empty(&self) -> bool {
        self.failures == 0
            && self.refusal.is_none()
            && self.applied.is_none()
            && self.pending.is_none()
    }
}

/// The per-object state of every object, in one map: forgetting an object is one call.
///
/// Every Ready object has an entry (its applied hash), so the map is keyed by a 64-bit
/// digest of the object's key and a refusal is boxed: an entry is about 40 bytes plus the
/// hash text, as small as the applied-hash map it replaced. Two objects sharing a digest
/// (about 3 in 10^12 at 10,000 objects) would share a backoff; a refusal still only
/// matches its own request.
pub struct ObjectStates {
    backoff_base: Duration,
    backoff_max: Duration,
    inner: Mutex<HashMap<u64, ObjectState>>,
}

impl ObjectStates {
    pub fn new(backoff_base: Duration, backoff_max: Duration) -> Self {
        Self {
            backoff_base,
            backoff_max,
            inner: Mutex::new(HashMap::new()),
        }
    }

    fn update<T>(&self, key: &ObjKey, change: impl FnOnce(&mut ObjectState) -> T) -> T {
        let mut inner = self.inner.lock().expect("object states lock");
        let digest = hash_of(key);
        let state = inner.entry(digest).or_default();
        let out = change(state);
        if state.is_empty() {
            inner.remove(&digest);
        }
        out
    }

    fn read<T>(&self, key: &ObjKey, look: impl FnOnce(&ObjectState) -> Option<T>) -> Option<T> {
        let inner = self.inner.lock().expect("object states lock");
        inner.get(&hash_of(key)).and_then(look)
    }

    /// The delay before the next attempt after a failure: base × 2^failures, capped, ±20 %
    /// jitter. Counts the failure.
    pub fn next_backoff(&self, key: &ObjKey) -> Duration {
        let failures = self.update(key, |state| {
            state.failures = state.failures.saturating_add(1);
            state.failures - 1
        });
        let exp = self.backoff_base.saturating_mul(1u32 << failures.min(20));
        exp.min(self.backoff_max)
            .mul_f64(rand::rng().random_range(0.8..1.2))
    }

    /// A success: the next failure starts the backoff again from its base.
    pub fn reset_backoff(&self, key: &ObjKey) {
        self.update(key, |state| state.failures = 0);
    }

    /// Records a terminal failure of the request `gate` describes.
    pub fn refuse(&self, key: &ObjKey, gate: Gate, reason: Reason, message: String) {
        self.update(key, |state| {
            state.refusal = Some(Box::new(Refusal {
                gate,
                reason,
                message,
            }))
        });
    }

    /// The terminal failure recorded for this same request, if any.
    pub fn refused(&self, key: &ObjKey, gate: &Gate) -> Option<(Reason, String)> {
        self.read(key, |state| {
            let refusal = state.refusal.as_ref().filter(|r| r.gate == *gate)?;
            Some((refusal.reason, refusal.message.clone()))
        })
    }

    /// A request went through: no refusal stands.
    pub fn clear_refusal(&self, key: &ObjKey) {
        self.update(key, |state| state.refusal = None);
    }

    /// Records the hash this process wrote as the object's `status.appliedHash`.
    ///
    /// The watch cache delivers our own status write back some milliseconds later (on a
    /// real API server). A reconcile that runs in that window — a sweep, a Secret change —
    /// would read the object as it was before the write, take the override for unwritten and
    /// send it to DPC again; it takes the hash from here instead when the uid is the same.
    /// Only one process writes status (leader election); a new term starts empty.
    pub fn record_applied(&self, key: &ObjKey, uid: &str, hash: &str) {
        self.update(key, |state| {
            state.applied = Some((hash_of(&uid), hash.into()))
        });
    }

    /// The hash this process last wrote for this object (same uid), if any.
    pub fn applied(&self, key: &ObjKey, uid: &str) -> Option<String> {
        self.read(key, |state| {
            let (u, hash) = state.applied.as_ref()?;
            (*u == hash_of(&uid)).then(|| hash.to_string())
        })
    }

    /// Records that this process set (or removed) the object's create-pending annotation.
    pub fn record_pending(&self, key: &ObjKey, uid: &str, set: bool) {
        self.update(key, |state| state.pending = Some((hash_of(&uid), set)));
    }

    /// Whether this process last set (`true`) or removed (`false`) the create-pending
    /// annotation of this object (same uid), if it wrote it at all.
    pub fn pending(&self, key: &ObjKey, uid: &str) -> Option<bool> {
        self.read(key, |state| {
            let (u, set) = state.pending?;
            (u == hash_of(&uid)).then_some(set)
        })
    }

    /// Forgets every recorded applied hash and annotation (a new leadership term).
    pub fn forget_applied_hashes(&self) {
        let mut inner = self.inner.lock().expect("object states lock");
        inner.retain(|_, state| {
            state.applied = None;
            state.pending = None;
            !state.is_empty()
        });
    }

    /// Forgets an object.
    pub fn forget(&self, key: &ObjKey) {
        self.inner
            .lock()
            .expect("object states lock")
            .remove(&hash_of(key));
    }
}

fn hash_of<T: Hash>(value: &T) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjKey {
        crate::key::obj_key("ns", name)
    }

    fn request(hash: &str) -> Gate {
        Gate::Request {
            hash: hash.into(),
            account: "fp".into(),
            observe_only: false,
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_a_success_starts_it_again() {
        let states = ObjectStates::new(Duration::from_secs(1), Duration::from_secs(8));
        let delays: Vec<Duration> = (0..6).map(|_| states.next_backoff(&key("a"))).collect();
        // ±20 % jitter around 1, 2, 4, 8, 8, 8 seconds.
        for (delay, base) in delays.iter().zip([1.0, 2.0, 4.0, 8.0, 8.0, 8.0]) {
            let seconds = delay.as_secs_f64();
            assert!(seconds >= base * 0.8 && seconds <= base * 1.2, "{delays:?}");
        }
        // Another object has its own count.
        assert!(states.next_backoff(&key("b")) <= Duration::from_millis(1200));
        states.reset_backoff(&key("a"));
        assert!(states.next_backoff(&key("a")) <= Duration::from_millis(1200));
    }

    #[test]
    fn a_refusal_stands_for_the_same_request_only() {
        let states = ObjectStates::new(Duration::from_secs(1), Duration::from_secs(8));
        states.refuse(&key("a"), request("h1"), Reason::ApiRejected, "no".into());
        assert_eq!(
            states.refused(&key("a"), &request("h1")),
            Some((Reason::ApiRejected, "no".to_string()))
        );
        assert_eq!(states.refused(&key("a"), &request("h2")), None);
        let observing = Gate::Request {
            hash: "h1".into(),
            account: "fp".into(),
            observe_only: true,
        };
        assert_eq!(states.refused(&key("a"), &observing), None);
        assert_eq!(states.refused(&key("b"), &request("h1")), None);
        states.clear_refusal(&key("a"));
        assert_eq!(states.refused(&key("a"), &request("h1")), None);
    }

    #[test]
    fn an_applied_hash_is_kept_per_uid_and_forgetting_an_object_drops_everything() {
        let states = ObjectStates::new(Duration::from_secs(1), Duration::from_secs(8));
        states.record_applied(&key("a"), "uid-1", "sha256:1");
        assert_eq!(
            states.applied(&key("a"), "uid-1").as_deref(),
            Some("sha256:1")
        );
        // A new object of the same name is another object.
        assert_eq!(states.applied(&key("a"), "uid-2"), None);
        states.next_backoff(&key("a"));
        states.refuse(&key("a"), request("h"), Reason::ApiRejected, "no".into());
        states.forget(&key("a"));
        assert_eq!(states.applied(&key("a"), "uid-1"), None);
        assert_eq!(states.refused(&key("a"), &request("h")), None);
        assert!(states.next_backoff(&key("a")) <= Duration::from_millis(1200));
        // A new leadership term forgets the hashes but keeps the rest.
        states.record_applied(&key("b"), "uid-b", "sha256:b");
        states.record_pending(&key("b"), "uid-b", true);
        assert_eq!(states.pending(&key("b"), "uid-b"), Some(true));
        assert_eq!(states.pending(&key("b"), "uid-c"), None);
        states.refuse(&key("b"), request("h"), Reason::ApiRejected, "no".into());
        states.forget_applied_hashes();
        assert_eq!(states.applied(&key("b"), "uid-b"), None);
        assert_eq!(states.pending(&key("b"), "uid-b"), None);
        assert!(states.refused(&key("b"), &request("h")).is_some());
        assert!(states.inner.lock().unwrap().len() <= 2);
    }
}
