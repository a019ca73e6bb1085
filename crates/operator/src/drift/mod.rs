//! Drift detection: the overrides in DPC are read back, one list call per (account, project,
//! environment) per sync interval, shared by every object in that environment, and compared
//! with what each object last applied. Objects that drifted (or stopped drifting) are handed
//! back to the controller, which corrects or reports per the object's `driftPolicy`.
//!
//! Memory matters here (tens of thousands of objects): an object is remembered by the field
//! names it sets and hashes of their values, and a list answer is kept only in that form and
//! only as long as other objects may share it. Every answer is read through the journal of
//! the operator's own writes (`journal`), so none is taken for DPC's state after a write it
//! predates.

mod compare;
mod journal;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::dpc::{AccountHandle, AccountKey, DpcError, Operation, OverrideRequest, RemoteOverride};
use crate::key::ObjKey;

pub use compare::{Expected, Finding, Seen, compare};
pub use journal::{Journal, View};

/// One environment of one project, seen through one account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub account: AccountKey,
    pub project: String,
    pub environment: String,
}

/// What the drift checker needs to know about one object.
#[derive(Clone, Debug)]
pub struct Member {
    pub connection: String,
    pub expected: Expected,
    pub interval: Duration,
}

impl Member {
    pub fn new(connection: &str, desired: &OverrideRequest, interval: Duration) -> Self {
        Self {
            connection: connection.into(),
            expected: Expected::of(desired),
            interval,
        }
    }
}

/// A list answer: the overrides of one environment by connection name, and the point of the
/// journal its call began at.
#[derive(Clone)]
struct Listing {
    /// Sorted by connection name, each name once: a slice of exactly the answer's size
    /// (every environment's answer is kept while first writes may read it, and a hash
    /// table's spare room was a third of that).
    overrides: Arc<[(Box<str>, Seen)]>,
    seq: u64,
}

impl Listing {
    fn of(answer: &[RemoteOverride], seq: u64) -> Self {
        // Were a name listed twice, the later entry stands.
        let mut overrides: Vec<(Box<str>, Seen)> = answer
            .iter()
            .rev()
            .filter_map(|remote| Some((remote.name.as_deref()?.into(), Seen::of(remote))))
            .collect();
        overrides.sort_by(|a, b| a.0.cmp(&b.0));
        overrides.dedup_by(|a, b| a.0 == b.0);
        Self {
            overrides: overrides.into(),
            seq,
        }
    }

    fn get(&self, connection: &str) -> Option<&Seen> {
        let at = self
            .overrides
            .binary_search_by(|(name, _)| (**name).cmp(connection))
            .ok()?;
        Some(&self.overrides[at].1)
    }
}

/// A cached list answer and when its call began.
type Cached = Option<(Instant, Listing)>;

struct Group {
    members: HashMap<ObjKey, Member>,
    handle: AccountHandle,
    next_due: Instant,
    /// The last list answer and when it was fetched; the lock makes concurrent readers share
    /// one call.
    cache: Arc<tokio::sync::Mutex<Cached>>,
}

impl Group {
    fn interval(&self) -> Duration {
        self.members
            .values()
            .map(|m| m.interval)
            .min()
            .unwrap_or(Duration::from_secs(600))
    }
}

/// How old a list answer may be for the read before an object's first write: a stale one
/// costs at most a 409 or 404 fallback ("DPC holds it already" is confirmed by an answer
/// younger than the share window), and the operator's own writes since the answer are in the
/// journal. Objects created in bulk cost one list per environment (with its pages) per two
/// minutes, not one per object: at 10,000 objects in 10 environments a 30 s window made 152
/// list calls (the later lists of a filling environment take many pages), 2.5 minutes of
/// the default 60 requests per minute.
pub const FIRST_WRITE_READ_AGE: Duration = Duration::from_secs(120);

/// How fresh a read must be: given after the call (a user asked to read DPC now), younger
/// than the share window, or younger than [`FIRST_WRITE_READ_AGE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Now,
    Shared,
    FirstWrite,
}

/// A finding of a periodic check, with the list answer it came from.
struct Noted {
    finding: Finding,
    place: crate::dpc::Place,
    listed_at: u64,
    connection: String,
}

/// Called with the objects whose finding needs the controller's attention.
pub type Trigger = Arc<dyn Fn(&ObjKey) + Send + Sync>;

/// The shared drift checker.
pub struct DriftChecker {
    groups: Mutex<HashMap<Arc<GroupKey>, Group>>,
    member_groups: Mutex<HashMap<ObjKey, Arc<GroupKey>>>,
    /// Findings of periodic checks for the controller, with where and when they were read.
    findings: Mutex<HashMap<ObjKey, Noted>>,
    last: Mutex<HashMap<ObjKey, bool>>,
    /// The operator's own writes, through which every list answer is read.
    journal: Arc<Journal>,
    changed: tokio::sync::Notify,
    /// A list answer younger than this serves immediate reads too.
    share_window: Duration,
    /// Periodic checks in flight at once: environments tend to come due together.
    checks: Arc<tokio::sync::Semaphore>,
}

fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.9..1.1))
}

impl DriftChecker {
    pub fn new(share_window: Duration, journal: Arc<Journal>) -> Self {
        Self {
            journal,
            groups: Mutex::new(HashMap::new()),
            member_groups: Mutex::new(HashMap::new()),
            findings: Mutex::new(HashMap::new()),
            last: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
            share_window,
            checks: Arc::new(tokio::sync::Semaphore::new(2)),
        }
    }

    fn shared_key(&self, groups: &HashMap<Arc<GroupKey>, Group>, key: GroupKey) -> Arc<GroupKey> {
        groups
            .get_key_value(&key)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::new(key))
    }

    /// Registers (or updates) an object: it is checked at least every `member.interval`.
    /// `handle` calls for the account without an object (the checker's own requests).
    pub fn register(
        &self,
        key: &ObjKey,
        group_key: GroupKey,
        handle: AccountHandle,
        member: Member,
    ) {
        let mut groups = self.groups.lock().expect("drift lock");
        let group_key = self.shared_key(&groups, group_key);
        let mut member_groups = self.member_groups.lock().expect("drift lock");
        if let Some(old) = member_groups.get(key).filter(|g| **g != group_key).cloned() {
            remove_member(&mut groups, &old, key);
        }
        member_groups.insert(key.clone(), group_key.clone());
        drop(member_groups);
        let due = Instant::now() + jittered(member.interval);
        let group = groups.entry(group_key).or_insert_with(|| Group {
            members: HashMap::new(),
            handle: handle.clone(),
            next_due: due,
            cache: Arc::new(tokio::sync::Mutex::new(None)),
        });
        group.handle = handle;
        let new_member = !group.members.contains_key(key);
        if group.members.is_empty() || member.interval < group.interval() {
            group.next_due = group.next_due.min(due);
        }
        group.members.insert(key.clone(), member);
        drop(groups);
        if new_member {
            self.changed.notify_one();
        }
    }

    /// Forgets an object (deleted, paused, or in conflict).
    pub fn unregister(&self, key: &ObjKey) {
        let group_key = self.member_groups.lock().expect("drift lock").remove(key);
        if let Some(group_key) = group_key {
            remove_member(
                &mut self.groups.lock().expect("drift lock"),
                &group_key,
                key,
            );
        }
        self.findings.lock().expect("drift lock").remove(key);
        self.last.lock().expect("drift lock").remove(key);
    }

    /// The finding of the last check for this object, if it needs attention; consumed. A
    /// finding read before the operator's own last write of the override is dropped.
    pub fn take_finding(&self, key: &ObjKey) -> Option<Finding> {
        let noted = self.findings.lock().expect("drift lock").remove(key)?;
        let view = self
            .journal
            .view(&noted.place, noted.listed_at, &noted.connection);
        (view == View::Listed).then_some(noted.finding)
    }

    /// Records a finding made by an immediate read, so the periodic check knows the object's
    /// last state.
    pub fn note(&self, key: &ObjKey, finding: &Finding) {
        self.last
            .lock()
            .expect("drift lock")
            .insert(key.clone(), finding.is_drift());
    }

    /// Reads the override of `connection`, sharing a list answer as young as `freshness`
    /// asks with other readers of the same environment.
    pub async fn read_now(
        &self,
        group_key: &GroupKey,
        handle: &AccountHandle,
        connection: &str,
        freshness: Freshness,
    ) -> Result<Option<Seen>, DpcError> {
        let cache = {
            let mut groups = self.groups.lock().expect("drift lock");
            let shared = self.shared_key(&groups, group_key.clone());
            // Not registered yet: a group without members holds the cache until the object
            // registers after this pass.
            let group = groups.entry(shared).or_insert_with(|| Group {
                members: HashMap::new(),
                handle: handle.clone(),
                next_due: Instant::now() + Duration::from_secs(3600),
                cache: Arc::new(tokio::sync::Mutex::new(None)),
            });
            group.cache.clone()
        };
        let max_age = match freshness {
            Freshness::Now => Duration::ZERO,
            Freshness::Shared => self.share_window,
            Freshness::FirstWrite => FIRST_WRITE_READ_AGE.max(self.share_window),
        };
        let place = handle.place(&group_key.project, &group_key.environment);
        let listing = self.fetch(&cache, handle, group_key, max_age).await?;
        match self.through_journal(&place, &listing, connection) {
            Some(seen) => Ok(seen),
            // The operator's own write of it is in flight or left no answer: read again.
            None => {
                let listing = self
                    .fetch(&cache, handle, group_key, Duration::ZERO)
                    .await?;
                self.through_journal(&place, &listing, connection)
                    .ok_or_else(|| DpcError::Decode {
                        operation: Operation::List,
                        reason: format!(
                            "a write of the override of connection {connection} is in flight, so the list cannot say what DPC holds; it is read again later"
                        ),
                    })
            }
        }
    }

    /// What DPC holds of `connection` after the operator's own writes: the list answer,
    /// unless a write since says otherwise; `None` when no one knows yet.
    fn through_journal(
        &self,
        place: &crate::dpc::Place,
        listing: &Listing,
        connection: &str,
    ) -> Option<Option<Seen>> {
        match self.journal.view(place, listing.seq, connection) {
            View::Listed => Some(listing.get(connection).cloned()),
            View::Holds(seen) => Some(Some(seen)),
            View::Gone => Some(None),
            View::Unknown => None,
        }
    }

    async fn fetch(
        &self,
        cache: &tokio::sync::Mutex<Cached>,
        handle: &AccountHandle,
        group_key: &GroupKey,
        max_age: Duration,
    ) -> Result<Listing, DpcError> {
        let mut cached = cache.lock().await;
        if let Some((at, listing)) = cached.as_ref()
            && at.elapsed() < max_age
        {
            return Ok(listing.clone());
        }
        // The answer is dated by when its call began: a write after that is not in it.
        let (began, seq) = (Instant::now(), self.journal.seq());
        let answer = handle
            .list(&group_key.project, &group_key.environment)
            .await?;
        let listing = Listing::of(&answer, seq);
        *cached = Some((began, listing.clone()));
        Ok(listing)
    }

    /// Checks every group when it is due, until `shutdown`.
    pub async fn run(self: Arc<Self>, trigger: Trigger, shutdown: CancellationToken) {
        let keep_for = FIRST_WRITE_READ_AGE.max(self.share_window);
        loop {
            // A write older than any answer still read says nothing any answer does not.
            self.journal.prune(keep_for + Duration::from_secs(1));
            let now = Instant::now();
            let mut due = Vec::new();
            let mut next = now + Duration::from_secs(3600);
            {
                let mut groups = self.groups.lock().expect("drift lock");
                for (key, group) in groups.iter_mut() {
                    // A list answer is kept only while some read may use it.
                    if let Ok(mut cached) = group.cache.try_lock()
                        && cached
                            .as_ref()
                            .is_some_and(|(at, _)| at.elapsed() >= keep_for)
                    {
                        *cached = None;
                    }
                    if group.members.is_empty() {
                        continue;
                    }
                    if group.next_due <= now {
                        group.next_due = now + jittered(group.interval());
                        due.push((key.clone(), group.handle.clone(), group.cache.clone()));
                    }
                    next = next.min(group.next_due);
                }
            }
            for (key, handle, cache) in due {
                let checker = self.clone();
                let trigger = trigger.clone();
                tokio::spawn(async move {
                    let Ok(_slot) = checker.checks.clone().acquire_owned().await else {
                        return;
                    };
                    checker.check(&key, &handle, &cache, &trigger).await
                });
            }
            // Wake at least once per share window to drop listings no longer shared.
            let next = next.min(Instant::now() + self.share_window.max(Duration::from_millis(100)));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.changed.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn check(
        &self,
        key: &Arc<GroupKey>,
        handle: &AccountHandle,
        cache: &tokio::sync::Mutex<Cached>,
        trigger: &Trigger,
    ) {
        // A periodic check always reads afresh (an immediate read may share the answer).
        let listing = match self.fetch(cache, handle, key, Duration::ZERO).await {
            Ok(listing) => listing,
            Err(e) => {
                warn!(account = %key.account, project = %key.project, environment = %key.environment, error = %e, "drift check failed");
                return;
            }
        };
        let place = handle.place(&key.project, &key.environment);
        let mut attention = Vec::new();
        {
            let groups = self.groups.lock().expect("drift lock");
            let Some(group) = groups.get(key) else { return };
            debug!(account = %key.account, project = %key.project, environment = %key.environment, objects = group.members.len(), "drift check");
            let mut last = self.last.lock().expect("drift lock");
            let mut findings = self.findings.lock().expect("drift lock");
            for (object, member) in &group.members {
                // Written by the operator while the answer was on its way: the next check says.
                let Some(seen) = self.through_journal(&place, &listing, &member.connection) else {
                    continue;
                };
                let finding = compare(&member.expected, seen.as_ref());
                let was_drift = last.insert(object.clone(), finding.is_drift());
                if finding.is_drift() || was_drift == Some(true) {
                    let noted = Noted {
                        finding,
                        place: place.clone(),
                        listed_at: listing.seq,
                        connection: member.connection.clone(),
                    };
                    findings.insert(object.clone(), noted);
                    attention.push(object.clone());
                }
            }
        }
        for object in attention {
            trigger(&object);
        }
    }
}

fn remove_member(groups: &mut HashMap<Arc<GroupKey>, Group>, group_key: &GroupKey, key: &ObjKey) {
    if let Some(group) = groups.get_mut(group_key) {
        group.members.remove(key);
        if group.members.is_empty() {
            groups.remove(group_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(name: Option<&str>, auth: &str) -> RemoteOverride {
        RemoteOverride {
            name: name.map(String::from),
            auth_type: Some(auth.into()),
            ..RemoteOverride::default()
        }
    }

    #[test]
    fn a_listing_finds_each_connection_and_a_name_listed_twice_keeps_the_later() {
        let answer = [
            remote(Some("b"), "FIRST"),
            remote(Some("a"), "A"),
            remote(None, "NAMELESS"),
            remote(Some("c"), "C"),
            remote(Some("b"), "SECOND"),
        ];
        let listing = Listing::of(&answer, 7);
        assert_eq!(listing.seq, 7);
        assert_eq!(
            listing.overrides.len(),
            3,
            "each name once, the nameless left out"
        );
        for (name, auth) in [("a", "A"), ("b", "SECOND"), ("c", "C")] {
            let seen = listing.get(name).expect(name);
            assert_eq!(seen.status().auth_type.as_deref(), Some(auth), "{name}");
        }
        assert!(listing.get("d").is_none());
        assert!(listing.get("").is_none());
    }
}
