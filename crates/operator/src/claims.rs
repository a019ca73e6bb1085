//! Which ConnectionOverride manages which remote override. Two objects that reach the same
//! override would fight over it: one manages it, the others report `Conflict` and never write.
//!
//! A remote override is known by where DPC answers (the API URL) plus project, environment
//! and connection: a project id is a UUID, unique in DPC, so any two accounts reaching the
//! same DPC — a DpcAccount and a ClusterDpcAccount, or two accounts of the same credentials
//! that differ in `accountId` — reach the same override. An object's key is known for sure
//! once its account is resolved (a reconcile [`Claims::locate`]s it) or once its status
//! records the override it manages; until then the index files it under the account it
//! names. An object that only observes (`managementPolicy: ObserveOnly`) never writes: it
//! claims nothing and is not filed.
//!
//! Who manages: an object holding a claim (recorded in its status as `managedOverride`, or
//! made by this process just before its first write) always beats one without; two claims are
//! ordered by their time (microseconds); objects without a claim by creation time, namespace
//! and name. The index is fed from the watch, so it knows every object before any reconcile
//! acts.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;

use crate::api::{AccountKind, ConnectionOverride, ManagementPolicy};
use crate::key::{ObjKey, key_of};

/// The identity of a remote override.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteKey {
    /// `DPC at <url>` once resolved; the account reference before.
    pub account: String,
    pub project: String,
    pub environment: String,
    pub connection: String,
}

impl RemoteKey {
    /// The key a resolved object has: the account's API URL.
    pub fn resolved(api_url: &str, project: &str, environment: &str, connection: &str) -> Self {
        Self {
            account: format!("DPC at {}", api_url.trim_end_matches('/')),
            project: project.into(),
            environment: environment.into(),
            connection: connection.into(),
        }
    }

    /// The key an object has before its account is resolved: the account it names.
    fn provisional(obj: &ConnectionOverride) -> Self {
        let spec = &obj.spec;
        let account = match spec.account_kind() {
            AccountKind::DpcAccount => format!(
                "DpcAccount {}/{}",
                obj.metadata.namespace.as_deref().unwrap_or_default(),
                spec.account_ref.name
            ),
            AccountKind::ClusterDpcAccount => {
                format!("ClusterDpcAccount {}", spec.account_ref.name)
            }
        };
        Self {
            account,
            project: spec.project_id.clone(),
            environment: spec.environment_name.clone(),
            connection: spec.connection_name.clone(),
        }
    }

    /// The key an object's status records, if it records one.
    fn recorded(obj: &ConnectionOverride) -> Option<(Self, i64)> {
        let managed = obj.status.as_ref()?.managed_override.as_ref()?;
        let key = Self::resolved(
            &managed.api_url,
            &managed.project_id,
            &managed.environment_name,
            &managed.connection_name,
        );
        Some((key, managed.claimed_at.0.as_microsecond()))
    }

    fn id(&self) -> RemoteId {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

impl std::fmt::Display for RemoteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection {} in environment {} of project {} ({})",
            self.connection, self.environment, self.project, self.account
        )
    }
}

/// A remote key as a 64-bit digest: the index holds one per object, so it stays small at
/// tens of thousands of objects.
type RemoteId = u64;

/// Sort order of the claimants of one remote override: the first manages it.
/// `(no claim, claim time in µs, creation time in s, namespace and name)`.
type Precedence = (bool, i64, i64, ObjKey);

#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    remote: RemoteId,
    /// Claim time in microseconds, if the object holds a claim.
    claimed: Option<i64>,
    created: i64,
    /// Whether `remote` is the resolved identity (not the provisional one).
    located: bool,
}

impl Entry {
    fn precedence(&self, key: &ObjKey) -> Precedence {
        (
            self.claimed.is_none(),
            self.claimed.unwrap_or(0),
            self.created,
            key.clone(),
        )
    }
}

#[derive(Default)]
struct Inner {
    /// Precedences of each remote override, first the one that manages it (almost always
    /// just one).
    by_remote: HashMap<RemoteId, Vec<Precedence>>,
    by_object: HashMap<ObjKey, Entry>,
}

impl Inner {
    fn owner(&self, remote: RemoteId) -> Option<ObjKey> {
        self.by_remote
            .get(&remote)
            .and_then(|s| s.first())
            .map(|c| c.3.clone())
    }

    /// Files `key` as `entry`; returns the objects whose manager changed.
    fn put(&mut self, key: &ObjKey, entry: Entry) -> Vec<ObjKey> {
        if self.by_object.get(key) == Some(&entry) {
            return Vec::new();
        }
        let mut triggers = self.take(key);
        let before = self.owner(entry.remote);
        let claimants = self.by_remote.entry(entry.remote).or_default();
        let claimant = entry.precedence(key);
        let at = claimants.binary_search(&claimant).unwrap_or_else(|at| at);
        claimants.insert(at, claimant);
        self.by_object.insert(key.clone(), entry);
        if before != self.owner(entry.remote) {
            triggers.extend(self.by_remote[&entry.remote].iter().map(|c| c.3.clone()));
        }
        triggers.retain(|k| k != key);
        triggers
    }

    /// Removes `key`; returns the object that became the manager, if one did.
    fn take(&mut self, key: &ObjKey) -> Vec<ObjKey> {
        let Some(entry) = self.by_object.remove(key) else {
            return Vec::new();
        };
        let before = self.owner(entry.remote);
        if let Some(set) = self.by_remote.get_mut(&entry.remote) {
            set.retain(|c| c.3 != *key);
            if set.is_empty() {
                self.by_remote.remove(&entry.remote);
            }
        }
        match (before, self.owner(entry.remote)) {
            (b, Some(a)) if b.as_ref() != Some(&a) => vec![a],
            _ => Vec::new(),
        }
    }
}

/// The claims of all watched ConnectionOverrides.
#[derive(Default)]
pub struct Claims {
    inner: Mutex<Inner>,
}

impl Claims {
    /// Records what the watch says of an object. Returns the objects to reconcile again
    /// because the manager of their remote override changed.
    pub fn observe(&self, obj: &ConnectionOverride) -> Vec<ObjKey> {
        let key = key_of(&obj.metadata);
        if obj.spec.management_policy() == ManagementPolicy::ObserveOnly {
            return self.remove(&key);
        }
        let created = obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0);
        let mut inner = self.inner.lock().expect("claims lock");
        let entry = match (RemoteKey::recorded(obj), inner.by_object.get(&key)) {
            (Some((remote, claimed)), _) => Entry {
                remote: remote.id(),
                claimed: Some(claimed),
                created,
                located: true,
            },
            // Located by a reconcile of this process: the watch has nothing newer.
            (None, Some(known)) if known.located => Entry { created, ..*known },
            (None, _) => Entry {
                remote: RemoteKey::provisional(obj).id(),
                claimed: None,
                created,
                located: false,
            },
        };
        inner.put(&key, entry)
    }

    /// Files an object under the identity its reconcile resolved. Returns the object that
    /// manages that override when it is another one, and the objects whose manager changed.
    pub fn locate(&self, me: &ObjKey, remote: &RemoteKey) -> (Option<ObjKey>, Vec<ObjKey>) {
        let mut inner = self.inner.lock().expect("claims lock");
        let known = inner.by_object.get(me).copied();
        let entry = Entry {
            remote: remote.id(),
            // A claim belongs to the override it was made for.
            claimed: known
                .filter(|k| k.remote == remote.id())
                .and_then(|k| k.claimed),
            created: known.map_or(0, |k| k.created),
            located: true,
        };
        let triggers = inner.put(me, entry);
        let owner = inner.owner(entry.remote).filter(|owner| owner != me);
        (owner, triggers)
    }

    /// Claims the override an object is filed under, before it writes: in one step, so
    /// of two objects reconciled at once exactly one claims. Returns the claim's time (an
    /// existing claim is kept), or the object that manages the override instead.
    pub fn claim(&self, me: &ObjKey) -> Result<Timestamp, ObjKey> {
        let mut inner = self.inner.lock().expect("claims lock");
        let Some(mut entry) = inner.by_object.get(me).copied() else {
            return Ok(Timestamp::now());
        };
        if let Some(owner) = inner.owner(entry.remote).filter(|owner| owner != me) {
            return Err(owner);
        }
        if entry.claimed.is_none() {
            entry.claimed = Some(Timestamp::now().as_microsecond());
            inner.put(me, entry);
        }
        Ok(entry
            .claimed
            .and_then(|us| Timestamp::from_microsecond(us).ok())
            .unwrap_or_else(Timestamp::now))
    }

    /// Forgets an object (it is gone). Returns the objects whose manager changed.
    pub fn remove(&self, key: &ObjKey) -> Vec<ObjKey> {
        self.inner.lock().expect("claims lock").take(key)
    }

    /// Every object that holds a claim.
    pub fn keys(&self) -> Vec<ObjKey> {
        self.inner
            .lock()
            .expect("claims lock")
            .by_object
            .keys()
            .cloned()
            .collect()
    }

    /// The object that manages the override `me` is filed under, when it is not `me`.
    pub fn other_owner(&self, me: &ObjKey) -> Option<ObjKey> {
        let inner = self.inner.lock().expect("claims lock");
        let entry = inner.by_object.get(me)?;
        inner.owner(entry.remote).filter(|owner| owner != me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnectionOverrideStatus, ManagedOverride};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn obj(ns: &str, name: &str, created: i64, connection: &str) -> ConnectionOverride {
        let spec = dpc_operator_api::fixtures::override_spec("acct", "PROD", connection);
        let mut o = ConnectionOverride::new(name, spec);
        o.metadata.namespace = Some(ns.into());
        o.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        o
    }

    fn managing(mut o: ConnectionOverride, api: &str, claimed_us: i64) -> ConnectionOverride {
        o.status = Some(ConnectionOverrideStatus {
            managed_override: Some(ManagedOverride {
                api_url: api.into(),
                account_id: None,
                project_id: o.spec.project_id.clone(),
                environment_name: o.spec.environment_name.clone(),
                connection_name: o.spec.connection_name.clone(),
                claimed_at: MicroTime(Timestamp::from_microsecond(claimed_us).unwrap()),
            }),
            ..Default::default()
        });
        o
    }

    fn key(ns: &str, name: &str) -> ObjKey {
        crate::key::obj_key(ns, name)
    }

    fn remote(api: &str, connection: &str) -> RemoteKey {
        RemoteKey::resolved(api, crate::api::fixtures::PROJECT, "PROD", connection)
    }

    #[test]
    fn before_any_claim_the_oldest_manages_and_the_next_takes_over_when_it_goes() {
        let claims = Claims::default();
        claims.observe(&obj("ns", "b", 200, "C"));
        let triggered = claims.observe(&obj("ns", "a", 100, "C"));
        assert!(triggered.contains(&key("ns", "b")), "{triggered:?}");
        assert_eq!(claims.other_owner(&key("ns", "b")), Some(key("ns", "a")));
        assert_eq!(claims.other_owner(&key("ns", "a")), None);
        assert_eq!(claims.remove(&key("ns", "a")), vec![key("ns", "b")]);
        assert_eq!(claims.other_owner(&key("ns", "b")), None);
    }

    #[test]
    fn the_object_that_manages_keeps_the_override_against_an_older_or_smaller_named_one() {
        let claims = Claims::default();
        let api = "https://eu1.api.matillion.com/dpc";
        // "b" manages (its status says so); "a" is as old and sorts first by name.
        claims.observe(&managing(obj("ns", "b", 100, "C"), api, 100_000_001));
        claims.observe(&obj("ns", "a", 100, "C"));
        let (owner, _) = claims.locate(&key("ns", "a"), &remote(api, "C"));
        assert_eq!(owner, Some(key("ns", "b")));
        // A claim made before a first write wins over later comers too.
        claims.observe(&obj("ns", "c", 50, "D"));
        claims.locate(&key("ns", "c"), &remote(api, "D"));
        claims.claim(&key("ns", "c")).unwrap();
        claims.observe(&obj("ns", "d", 10, "D"));
        let (owner, _) = claims.locate(&key("ns", "d"), &remote(api, "D"));
        assert_eq!(owner, Some(key("ns", "c")));
        // Once claimed, nobody else may claim it.
        assert_eq!(claims.claim(&key("ns", "d")), Err(key("ns", "c")));
        // The watch delivering the newer object again changes nothing.
        assert!(claims.observe(&obj("ns", "d", 10, "D")).is_empty());
        assert_eq!(claims.other_owner(&key("ns", "d")), Some(key("ns", "c")));
    }

    #[test]
    fn two_accounts_reaching_the_same_dpc_account_are_one_claim() {
        let claims = Claims::default();
        let api = "https://eu1.api.matillion.com/dpc";
        let mut by_cluster_account = obj("team-b", "y", 100, "C");
        by_cluster_account.spec.account_ref.kind = Some(AccountKind::ClusterDpcAccount);
        claims.observe(&obj("team-a", "x", 200, "C"));
        claims.observe(&by_cluster_account);
        // Filed under different accounts, no conflict is seen yet.
        assert_eq!(claims.other_owner(&key("team-a", "x")), None);
        let (owner, _) = claims.locate(&key("team-a", "x"), &remote(api, "C"));
        assert_eq!(owner, None);
        claims.claim(&key("team-a", "x")).unwrap();
        let (owner, _) = claims.locate(&key("team-b", "y"), &remote(&format!("{api}/"), "C"));
        assert_eq!(owner, Some(key("team-a", "x")));
        // Another DPC is another override.
        claims.observe(&obj("team-c", "z", 1, "C"));
        let (owner, _) = claims.locate(
            &key("team-c", "z"),
            &remote("https://us1.api.matillion.com/dpc", "C"),
        );
        assert_eq!(owner, None);
    }

    #[test]
    fn an_observer_claims_nothing_and_blocks_no_one() {
        let claims = Claims::default();
        let api = "https://eu1.api.matillion.com/dpc";
        let mut watcher = obj("ns", "watcher", 10, "C");
        watcher.spec.management_policy = Some(ManagementPolicy::ObserveOnly);
        claims.observe(&watcher);
        claims.observe(&obj("ns", "manager", 20, "C"));
        let (owner, _) = claims.locate(&key("ns", "manager"), &remote(api, "C"));
        assert_eq!(owner, None, "the older observer does not manage it");
        assert!(claims.claim(&key("ns", "manager")).is_ok());
        // An object that turns to observing gives its claim up.
        let mut manager = obj("ns", "manager", 20, "C");
        manager.spec.management_policy = Some(ManagementPolicy::ObserveOnly);
        claims.observe(&manager);
        assert!(claims.keys().is_empty());
    }
}
