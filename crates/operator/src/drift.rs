//! Drift detection: the overrides in DPC are read back, one list call per (account, project,
//! environment) per sync interval, shared by every object in that environment, and compared
//! with what each object last applied. Objects that drifted (or stopped drifting) are handed
//! back to the controller, which corrects or reports per the object's `driftPolicy`.
//!
//! Memory matters here (tens of thousands of objects): an object is remembered by the field
//! names it sets and hashes of their values, and a list answer is kept only in that form and
//! only as long as other objects may share it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::api::RemoteStatus;
use crate::dpc::{AccountHandle, AccountKey, DpcError, OverrideRequest, RemoteOverride};
use crate::key::ObjKey;

/// One environment of one project, seen through one account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub account: AccountKey,
    pub project: String,
    pub environment: String,
}

/// What a comparison found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    InSync,
    /// The override exists with these fields different from the desired state.
    Differs(Vec<String>),
    /// There is no override for the connection in DPC.
    Missing,
}

impl Finding {
    pub fn is_drift(&self) -> bool {
        !matches!(self, Finding::InSync)
    }

    /// A sentence for a condition or Event; names fields, never values.
    pub fn describe(&self) -> String {
        match self {
            Finding::InSync => "DPC holds the desired override".into(),
            Finding::Differs(fields) => format!(
                "the override in DPC differs from the spec in {}",
                fields.join(", ")
            ),
            Finding::Missing => "the override does not exist in DPC".into(),
        }
    }
}

fn digest<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn json_digest(value: &Value) -> u64 {
    digest(&crate::dpc::types::canonical_json(value))
}

/// What an object wants DPC to hold, as field names and hashes of their values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    auth_type: Option<u64>,
    /// Every property, by name (sorted).
    properties: Box<[(Box<str>, u64)]>,
    /// The `secretsLocation` fields the spec sets.
    location: Box<[(Box<str>, u64)]>,
}

impl Expected {
    pub fn of(request: &OverrideRequest) -> Self {
        let properties = request
            .connection_overrides
            .connection_properties
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().into(),
                    digest(&Value::String(v.clone()).to_string()),
                )
            })
            .collect();
        let location = match &request.connection_overrides.secrets_location {
            Some(Value::Object(map)) => {
                let mut fields: Vec<(Box<str>, u64)> = map
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), json_digest(v)))
                    .collect();
                fields.sort();
                fields.into_boxed_slice()
            }
            _ => Vec::new().into_boxed_slice(),
        };
        Self {
            auth_type: request.auth_type.as_deref().map(digest),
            properties,
            location,
        }
    }
}

/// An override as the last list answer showed it: the same form as [`Expected`], plus what
/// status reports about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    auth_type: Option<u64>,
    properties: Box<[(Box<str>, u64)]>,
    location: BTreeMap<Box<str>, u64>,
    /// What DPC reported, for status.
    pub status: RemoteStatus,
}

impl Seen {
    pub fn of(remote: &RemoteOverride) -> Self {
        let overrides = remote
            .connection_overrides
            .as_ref()
            .and_then(Value::as_object);
        let mut properties: Vec<(Box<str>, u64)> = overrides
            .and_then(|o| o.get("connectionProperties"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str().into(), digest(&v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        properties.sort();
        let location = overrides
            .and_then(|o| o.get("secretsLocation"))
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.as_str().into(), json_digest(v)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            auth_type: remote.auth_type.as_deref().map(digest),
            properties: properties.into(),
            location,
            status: remote.status(),
        }
    }
}

/// Compares what DPC holds with what an object wants. Properties must match exactly (an
/// extra property in DPC is drift: a PUT would remove it); `secretsLocation` and `authType`
/// are compared only where the spec sets them (DPC may fill in defaults).
pub fn compare(expected: &Expected, seen: Option<&Seen>) -> Finding {
    let Some(seen) = seen else {
        return Finding::Missing;
    };
    let mut fields = Vec::new();
    if let Some(auth) = expected.auth_type
        && seen.auth_type != Some(auth)
    {
        fields.push("authType".to_string());
    }
    let mut names: Vec<&str> = expected
        .properties
        .iter()
        .chain(seen.properties.iter())
        .map(|(k, _)| &**k)
        .collect();
    names.sort_unstable();
    names.dedup();
    let value = |list: &[(Box<str>, u64)], name: &str| {
        list.iter().find(|(k, _)| &**k == name).map(|(_, v)| *v)
    };
    for name in names {
        if value(&expected.properties, name) != value(&seen.properties, name) {
            fields.push(format!("connectionOverrides.connectionProperties.{name}"));
        }
    }
    for (key, want) in expected.location.iter() {
        if seen.location.get(key) != Some(want) {
            fields.push(format!("connectionOverrides.secretsLocation.{key}"));
        }
    }
    if fields.is_empty() {
        Finding::InSync
    } else {
        Finding::Differs(fields)
    }
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

/// A list answer: the overrides of one environment by connection name.
type Listing = Arc<HashMap<String, Seen>>;

struct Group {
    members: HashMap<ObjKey, Member>,
    handle: AccountHandle,
    next_due: Instant,
    /// The last list answer and when it was fetched; the lock makes concurrent readers share
    /// one call.
    cache: Arc<tokio::sync::Mutex<Option<(Instant, Listing)>>>,
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
/// younger than the share window), and objects created in bulk under a tight request rate
/// cost one list per environment per window, not one per object.
pub const FIRST_WRITE_READ_AGE: Duration = Duration::from_secs(30);

/// How fresh a read must be: given after the call (a user asked to read DPC now), younger
/// than the share window, or younger than [`FIRST_WRITE_READ_AGE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    Now,
    Shared,
    FirstWrite,
}

/// Called with the objects whose finding needs the controller's attention.
pub type Trigger = Arc<dyn Fn(&ObjKey) + Send + Sync>;

/// The shared drift checker.
pub struct DriftChecker {
    groups: Mutex<HashMap<Arc<GroupKey>, Group>>,
    member_groups: Mutex<HashMap<ObjKey, Arc<GroupKey>>>,
    findings: Mutex<HashMap<ObjKey, Finding>>,
    last: Mutex<HashMap<ObjKey, bool>>,
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
    pub fn new(share_window: Duration) -> Self {
        Self {
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

    /// The finding of the last check for this object, if it needs attention; consumed.
    pub fn take_finding(&self, key: &ObjKey) -> Option<Finding> {
        self.findings.lock().expect("drift lock").remove(key)
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
        let listing = self.fetch(&cache, handle, group_key, max_age).await?;
        Ok(listing.get(connection).cloned())
    }

    async fn fetch(
        &self,
        cache: &tokio::sync::Mutex<Option<(Instant, Listing)>>,
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
        let answer = handle
            .list(&group_key.project, &group_key.environment)
            .await?;
        let listing: Listing = Arc::new(
            answer
                .iter()
                .filter_map(|remote| Some((remote.name.clone()?, Seen::of(remote))))
                .collect(),
        );
        *cached = Some((Instant::now(), listing.clone()));
        Ok(listing)
    }

    /// Checks every group when it is due, until `shutdown`.
    pub async fn run(self: Arc<Self>, trigger: Trigger, shutdown: CancellationToken) {
        let keep_for = FIRST_WRITE_READ_AGE.max(self.share_window);
        loop {
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
        cache: &tokio::sync::Mutex<Option<(Instant, Listing)>>,
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
        let mut attention = Vec::new();
        {
            let groups = self.groups.lock().expect("drift lock");
            let Some(group) = groups.get(key) else { return };
            debug!(account = %key.account, project = %key.project, environment = %key.environment, objects = group.members.len(), "drift check");
            let mut last = self.last.lock().expect("drift lock");
            let mut findings = self.findings.lock().expect("drift lock");
            for (object, member) in &group.members {
                let finding = compare(&member.expected, listing.get(&member.connection));
                let was_drift = last.insert(object.clone(), finding.is_drift());
                if finding.is_drift() || was_drift == Some(true) {
                    findings.insert(object.clone(), finding);
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
    use crate::dpc::OverrideValues;
    use serde_json::json;

    fn desired() -> OverrideRequest {
        OverrideRequest {
            environment_name: "PROD".into(),
            connection_name: "C".into(),
            auth_type: Some("GENERIC_SECRET".into()),
            connection_overrides: OverrideValues {
                secrets_location: Some(
                    json!({"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}),
                ),
                connection_properties: [("secretName".to_string(), "s".to_string())].into(),
            },
        }
    }

    fn seen(overrides: Value, auth: Option<&str>) -> Seen {
        Seen::of(&RemoteOverride {
            name: Some("C".into()),
            auth_type: auth.map(String::from),
            connection_overrides: Some(overrides),
            ..RemoteOverride::default()
        })
    }

    #[test]
    fn equal_state_is_in_sync_and_server_defaults_are_ignored() {
        let same = seen(
            json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1", "addedByServer": 1}, "connectionProperties": {"secretName": "s"}}),
            Some("GENERIC_SECRET"),
        );
        assert_eq!(
            compare(&Expected::of(&desired()), Some(&same)),
            Finding::InSync
        );
        let mut no_auth = desired();
        no_auth.auth_type = None;
        no_auth.connection_overrides.secrets_location = None;
        let other_auth = seen(
            json!({"connectionProperties": {"secretName": "s"}, "secretsLocation": {"type": "X"}}),
            Some("OAUTH_CLIENT_CRED"),
        );
        assert_eq!(
            compare(&Expected::of(&no_auth), Some(&other_auth)),
            Finding::InSync,
            "unset fields are not compared"
        );
    }

    #[test]
    fn differences_are_named_by_field_without_values() {
        let changed = seen(
            json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "us-east-1"}, "connectionProperties": {"secretName": "other", "extra": "x"}}),
            Some("OAUTH_CLIENT_CRED"),
        );
        let finding = compare(&Expected::of(&desired()), Some(&changed));
        assert_eq!(
            finding,
            Finding::Differs(vec![
                "authType".into(),
                "connectionOverrides.connectionProperties.extra".into(),
                "connectionOverrides.connectionProperties.secretName".into(),
                "connectionOverrides.secretsLocation.region".into(),
            ])
        );
        let text = finding.describe();
        assert!(
            !text.contains("other") && !text.contains("us-east-1"),
            "{text}"
        );
        assert_eq!(compare(&Expected::of(&desired()), None), Finding::Missing);
    }

    #[test]
    fn a_value_that_is_not_a_string_in_dpc_differs() {
        let number = seen(
            json!({"connectionProperties": {"secretName": 5}, "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"}}),
            Some("GENERIC_SECRET"),
        );
        assert_eq!(
            compare(&Expected::of(&desired()), Some(&number)),
            Finding::Differs(vec![
                "connectionOverrides.connectionProperties.secretName".into()
            ])
        );
    }
}
