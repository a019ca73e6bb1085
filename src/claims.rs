//! Which ConnectionOverride manages which remote override. Two objects that name the same
//! (account, project, environment, connection) would fight over it: the older one (by
//! creation time, then namespace and name) manages it, the others report `Conflict` and never
//! write. The index is fed from the watch, so it knows every object before any reconcile acts.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::api::{AccountKind, ConnectionOverride};
use crate::controller::ObjKey;

/// The natural key of a remote override, with the account that reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteKey {
    pub account: String,
    pub project: String,
    pub environment: String,
    pub connection: String,
}

impl RemoteKey {
    /// The key an object names.
    pub fn of(obj: &ConnectionOverride) -> Self {
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

/// `(creation time in seconds, namespace, name)`: oldest first.
type Claimant = (i64, ObjKey);

/// A remote key as a 64-bit digest: the index holds one per object, so it stays small at
/// tens of thousands of objects (the key itself is rebuilt from an object when needed).
type RemoteId = u64;

impl RemoteKey {
    fn id(&self) -> RemoteId {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

#[derive(Default)]
struct Inner {
    /// Claimants of each remote override, oldest first (almost always just one).
    by_remote: HashMap<RemoteId, Vec<Claimant>>,
    by_object: HashMap<ObjKey, (RemoteId, i64)>,
}

/// The claims of all watched ConnectionOverrides.
#[derive(Default)]
pub struct Claims {
    inner: Mutex<Inner>,
}

fn owner_of(set: Option<&Vec<Claimant>>) -> Option<ObjKey> {
    set.and_then(|s| s.first()).map(|(_, key)| key.clone())
}

impl Claims {
    /// Records an object's claim. Returns the objects to reconcile again because the owner of
    /// their remote override changed.
    pub fn observe(&self, obj: &ConnectionOverride) -> Vec<ObjKey> {
        let key: ObjKey = (
            obj.metadata.namespace.clone().unwrap_or_default(),
            obj.metadata.name.clone().unwrap_or_default(),
        );
        let remote = RemoteKey::of(obj).id();
        let created = obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0);
        let mut inner = self.inner.lock().expect("claims lock");
        if inner.by_object.get(&key) == Some(&(remote, created)) {
            return Vec::new();
        }
        let mut triggers = self.remove_locked(&mut inner, &key);
        let before = owner_of(inner.by_remote.get(&remote));
        let claimants = inner.by_remote.entry(remote).or_default();
        let claimant = (created, key.clone());
        let at = claimants.binary_search(&claimant).unwrap_or_else(|at| at);
        claimants.insert(at, claimant);
        inner.by_object.insert(key, (remote, created));
        let after = owner_of(inner.by_remote.get(&remote));
        if before != after {
            triggers.extend(inner.by_remote[&remote].iter().map(|(_, key)| key.clone()));
        }
        triggers
    }

    /// Forgets an object (it is gone). Returns the objects whose owner changed.
    pub fn remove(&self, key: &ObjKey) -> Vec<ObjKey> {
        let mut inner = self.inner.lock().expect("claims lock");
        self.remove_locked(&mut inner, key)
    }

    fn remove_locked(&self, inner: &mut Inner, key: &ObjKey) -> Vec<ObjKey> {
        let Some((remote, created)) = inner.by_object.remove(key) else {
            return Vec::new();
        };
        let before = owner_of(inner.by_remote.get(&remote));
        if let Some(set) = inner.by_remote.get_mut(&remote) {
            set.retain(|c| *c != (created, key.clone()));
            if set.is_empty() {
                inner.by_remote.remove(&remote);
            }
        }
        let after = owner_of(inner.by_remote.get(&remote));
        match (before, after) {
            (b, Some(a)) if b.as_ref() != Some(&a) => vec![a],
            _ => Vec::new(),
        }
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

    /// The object that manages `remote`, when it is not `me`.
    pub fn other_owner(&self, remote: &RemoteKey, me: &ObjKey) -> Option<ObjKey> {
        let inner = self.inner.lock().expect("claims lock");
        owner_of(inner.by_remote.get(&remote.id())).filter(|owner| owner != me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AccountRef, ConnectionOverrideSpec, ConnectionOverridesSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn obj(ns: &str, name: &str, created: i64, connection: &str) -> ConnectionOverride {
        let mut o = ConnectionOverride::new(
            name,
            ConnectionOverrideSpec {
                account_ref: AccountRef {
                    name: "acct".into(),
                    kind: None,
                    namespace: None,
                },
                project_id: "p".into(),
                environment_name: "PROD".into(),
                connection_name: connection.into(),
                auth_type: None,
                connection_overrides: ConnectionOverridesSpec::default(),
                deletion_policy: None,
                sync_interval: None,
                drift_policy: None,
                management_policy: None,
                deletion_timeout: None,
            },
        );
        o.metadata.namespace = Some(ns.into());
        o.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        o
    }

    fn key(ns: &str, name: &str) -> ObjKey {
        (ns.into(), name.into())
    }

    #[test]
    fn the_oldest_claimant_owns_and_the_next_takes_over_when_it_goes() {
        let claims = Claims::default();
        let newer = obj("ns", "b", 200, "C");
        let older = obj("ns", "a", 100, "C");
        claims.observe(&newer);
        let triggered = claims.observe(&older);
        assert!(
            triggered.contains(&key("ns", "b")),
            "the newer one learns it lost: {triggered:?}"
        );
        let remote = RemoteKey::of(&older);
        assert_eq!(
            claims.other_owner(&remote, &key("ns", "b")),
            Some(key("ns", "a"))
        );
        assert_eq!(claims.other_owner(&remote, &key("ns", "a")), None);
        assert_eq!(claims.remove(&key("ns", "a")), vec![key("ns", "b")]);
        assert_eq!(claims.other_owner(&remote, &key("ns", "b")), None);
    }

    #[test]
    fn different_connections_or_accounts_do_not_conflict() {
        let claims = Claims::default();
        claims.observe(&obj("ns", "a", 1, "C"));
        claims.observe(&obj("ns", "b", 2, "D"));
        claims.observe(&obj("other", "c", 3, "C"));
        assert_eq!(
            claims.other_owner(&RemoteKey::of(&obj("ns", "b", 2, "D")), &key("ns", "b")),
            None
        );
        assert_eq!(
            claims.other_owner(
                &RemoteKey::of(&obj("other", "c", 3, "C")),
                &key("other", "c")
            ),
            None
        );
        assert!(
            claims.observe(&obj("ns", "a", 1, "C")).is_empty(),
            "observing again changes nothing"
        );
    }
}
