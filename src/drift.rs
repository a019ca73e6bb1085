//! Drift detection: the overrides in DPC are read back, one list call per (account, project,
//! environment) per sync interval, shared by every object in that environment, and compared
//! with what each object last applied. Objects that drifted (or stopped drifting) are handed
//! back to the controller, which corrects or reports per the object's `driftPolicy`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::controller::ObjKey;
use crate::dpc::{AccountHandle, AccountKey, DpcError, OverrideRequest, RemoteOverride};

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

/// Compares what DPC holds with the desired request. Properties must match exactly (an extra
/// property in DPC is drift: a PUT would remove it); `secretsLocation` and `authType` are
/// compared only where the spec sets them (DPC may fill in defaults).
pub fn compare(desired: &OverrideRequest, remote: Option<&RemoteOverride>) -> Finding {
    let Some(remote) = remote else {
        return Finding::Missing;
    };
    let mut fields = Vec::new();
    if let Some(auth) = &desired.auth_type
        && remote.auth_type.as_deref() != Some(auth.as_str())
    {
        fields.push("authType".to_string());
    }
    let empty = serde_json::Map::new();
    let remote_overrides = remote
        .connection_overrides
        .as_ref()
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let remote_props: BTreeMap<String, Value> = remote_overrides
        .get("connectionProperties")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let desired_props = &desired.connection_overrides.connection_properties;
    let mut keys: Vec<&String> = desired_props.keys().chain(remote_props.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let want = desired_props.get(key).map(|v| Value::String(v.clone()));
        if want.as_ref() != remote_props.get(key) {
            fields.push(format!("connectionOverrides.connectionProperties.{key}"));
        }
    }
    if let Some(Value::Object(location)) = &desired.connection_overrides.secrets_location {
        let remote_location = remote_overrides
            .get("secretsLocation")
            .and_then(Value::as_object);
        for (key, want) in location {
            if remote_location.and_then(|l| l.get(key)) != Some(want) {
                fields.push(format!("connectionOverrides.secretsLocation.{key}"));
            }
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
    /// The request the object wants DPC to hold.
    pub desired: OverrideRequest,
    pub interval: Duration,
}

type Listing = Arc<Vec<RemoteOverride>>;

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

/// Called with the objects whose finding needs the controller's attention.
pub type Trigger = Arc<dyn Fn(&ObjKey) + Send + Sync>;

/// The shared drift checker.
pub struct DriftChecker {
    groups: Mutex<HashMap<GroupKey, Group>>,
    member_groups: Mutex<HashMap<ObjKey, GroupKey>>,
    findings: Mutex<HashMap<ObjKey, Finding>>,
    last: Mutex<HashMap<ObjKey, Finding>>,
    changed: tokio::sync::Notify,
    /// A list answer younger than this serves immediate reads too.
    share_window: Duration,
    lists: std::sync::atomic::AtomicU64,
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
            lists: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many list calls the checker has made.
    pub fn list_calls(&self) -> u64 {
        self.lists.load(std::sync::atomic::Ordering::Relaxed)
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
        let mut member_groups = self.member_groups.lock().expect("drift lock");
        if let Some(old) = member_groups.get(key).filter(|g| **g != group_key).cloned() {
            self.remove_from_group(&old, key);
        }
        member_groups.insert(key.clone(), group_key.clone());
        drop(member_groups);
        let mut groups = self.groups.lock().expect("drift lock");
        let due = Instant::now() + jittered(member.interval);
        let group = groups.entry(group_key).or_insert_with(|| Group {
            members: HashMap::new(),
            handle: handle.clone(),
            next_due: due,
            cache: Arc::new(tokio::sync::Mutex::new(None)),
        });
        group.handle = handle;
        if member.interval < group.interval() || group.members.is_empty() {
            group.next_due = group.next_due.min(due);
        }
        group.members.insert(key.clone(), member);
        drop(groups);
        self.changed.notify_one();
    }

    fn remove_from_group(&self, group_key: &GroupKey, key: &ObjKey) {
        let mut groups = self.groups.lock().expect("drift lock");
        if let Some(group) = groups.get_mut(group_key) {
            group.members.remove(key);
            if group.members.is_empty() {
                groups.remove(group_key);
            }
        }
    }

    /// Forgets an object (deleted, paused, or in conflict).
    pub fn unregister(&self, key: &ObjKey) {
        if let Some(group_key) = self.member_groups.lock().expect("drift lock").remove(key) {
            self.remove_from_group(&group_key, key);
        }
        self.findings.lock().expect("drift lock").remove(key);
        self.last.lock().expect("drift lock").remove(key);
    }

    /// The finding of the last check for this object, if it needs attention; consumed.
    pub fn take_finding(&self, key: &ObjKey) -> Option<Finding> {
        self.findings.lock().expect("drift lock").remove(key)
    }

    /// Reads the override of `connection` now, sharing a list answer younger than the share
    /// window with other readers of the same environment.
    pub async fn read_now(
        &self,
        group_key: &GroupKey,
        handle: &AccountHandle,
        connection: &str,
    ) -> Result<Option<RemoteOverride>, DpcError> {
        let cache = {
            let mut groups = self.groups.lock().expect("drift lock");
            match groups.get(group_key) {
                Some(group) => group.cache.clone(),
                None => {
                    // Not registered yet: a group with no members holds the cache until the
                    // object registers after this pass.
                    let group = Group {
                        members: HashMap::new(),
                        handle: handle.clone(),
                        next_due: Instant::now() + Duration::from_secs(3600),
                        cache: Arc::new(tokio::sync::Mutex::new(None)),
                    };
                    let cache = group.cache.clone();
                    groups.insert(group_key.clone(), group);
                    cache
                }
            }
        };
        let listing = self
            .fetch(&cache, handle, group_key, self.share_window)
            .await?;
        Ok(listing
            .iter()
            .find(|o| o.name.as_deref() == Some(connection))
            .cloned())
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
        self.lists
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let listing = Arc::new(
            handle
                .list(&group_key.project, &group_key.environment)
                .await?,
        );
        *cached = Some((Instant::now(), listing.clone()));
        Ok(listing)
    }

    /// Checks every group when it is due, until `shutdown`.
    pub async fn run(self: Arc<Self>, trigger: Trigger, shutdown: CancellationToken) {
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            let mut next = now + Duration::from_secs(3600);
            {
                let mut groups = self.groups.lock().expect("drift lock");
                for (key, group) in groups.iter_mut() {
                    if group.members.is_empty() {
                        continue;
                    }
                    if group.next_due <= now {
                        group.next_due = now + jittered(group.interval());
                        due.push((
                            key.clone(),
                            group.handle.clone(),
                            group.cache.clone(),
                            group.members.clone(),
                        ));
                    }
                    next = next.min(group.next_due);
                }
            }
            for (key, handle, cache, members) in due {
                let checker = self.clone();
                let trigger = trigger.clone();
                tokio::spawn(
                    async move { checker.check(key, handle, cache, members, trigger).await },
                );
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = self.changed.notified() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn check(
        &self,
        key: GroupKey,
        handle: AccountHandle,
        cache: Arc<tokio::sync::Mutex<Option<(Instant, Listing)>>>,
        members: HashMap<ObjKey, Member>,
        trigger: Trigger,
    ) {
        // A periodic check always reads afresh (an immediate read may share the answer).
        let listing = match self.fetch(&cache, &handle, &key, Duration::ZERO).await {
            Ok(listing) => listing,
            Err(e) => {
                warn!(account = %key.account, project = %key.project, environment = %key.environment, error = %e, "drift check failed");
                return;
            }
        };
        debug!(account = %key.account, project = %key.project, environment = %key.environment, objects = members.len(), "drift check");
        for (object, member) in members {
            let remote = listing
                .iter()
                .find(|o| o.name.as_deref() == Some(member.connection.as_str()));
            let finding = compare(&member.desired, remote);
            let previous = self
                .last
                .lock()
                .expect("drift lock")
                .insert(object.clone(), finding.clone());
            let changed = previous.as_ref() != Some(&finding);
            if finding.is_drift() || (changed && previous.is_some_and(|p| p.is_drift())) {
                self.findings
                    .lock()
                    .expect("drift lock")
                    .insert(object.clone(), finding);
                trigger(&object);
            }
        }
    }

    /// Records a finding made by an immediate read, so the periodic check knows the object's
    /// last state.
    pub fn note(&self, key: &ObjKey, finding: &Finding) {
        self.last
            .lock()
            .expect("drift lock")
            .insert(key.clone(), finding.clone());
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

    fn remote(overrides: Value, auth: Option<&str>) -> RemoteOverride {
        RemoteOverride {
            name: Some("C".into()),
            auth_type: auth.map(String::from),
            connection_overrides: Some(overrides),
            ..RemoteOverride::default()
        }
    }

    #[test]
    fn equal_state_is_in_sync_and_server_defaults_are_ignored() {
        let same = remote(
            json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1", "addedByServer": 1}, "connectionProperties": {"secretName": "s"}}),
            Some("GENERIC_SECRET"),
        );
        assert_eq!(compare(&desired(), Some(&same)), Finding::InSync);
        let mut no_auth = desired();
        no_auth.auth_type = None;
        no_auth.connection_overrides.secrets_location = None;
        let other_auth = remote(
            json!({"connectionProperties": {"secretName": "s"}, "secretsLocation": {"type": "X"}}),
            Some("OAUTH_CLIENT_CRED"),
        );
        assert_eq!(
            compare(&no_auth, Some(&other_auth)),
            Finding::InSync,
            "unset fields are not compared"
        );
    }

    #[test]
    fn differences_are_named_by_field_without_values() {
        let changed = remote(
            json!({"secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "us-east-1"}, "connectionProperties": {"secretName": "other", "extra": "x"}}),
            Some("OAUTH_CLIENT_CRED"),
        );
        let finding = compare(&desired(), Some(&changed));
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
        assert_eq!(compare(&desired(), None), Finding::Missing);
    }
}
