//! The reverse index: which ConnectionOverrides (and accounts) refer to which Secrets,
//! ConfigMaps, accounts and namespaces, so that a change of one of those re-reconciles exactly
//! the objects that use it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::api::{AccountKind, ConnectionOverride, ConnectionOverrideSpec};
use crate::dpc::AccountKey;
use crate::key::ObjKey;

/// Something an object refers to, for the reverse index that re-triggers it on a change.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reference {
    Secret {
        namespace: String,
        name: String,
    },
    ConfigMap {
        namespace: String,
        name: String,
    },
    Account {
        namespace: String,
        name: String,
    },
    ClusterAccount {
        name: String,
    },
    /// A namespace whose labels decide whether a ClusterDpcAccount may be used.
    Namespace {
        name: String,
    },
}

/// Which objects refer to which Secrets, ConfigMaps and accounts, so a change of one of those
/// re-reconciles exactly the objects that use it.
#[derive(Default)]
pub struct RefIndex {
    inner: Mutex<IndexInner>,
}

#[derive(Default)]
struct IndexInner {
    forward: HashMap<ObjKey, Vec<Reference>>,
    reverse: HashMap<Reference, HashSet<ObjKey>>,
}

impl RefIndex {
    /// Records what `object` refers to now; returns what nothing refers to any longer.
    pub fn set(&self, object: &ObjKey, refs: Vec<Reference>) -> Vec<Reference> {
        let mut inner = self.inner.lock().expect("index lock");
        if inner.forward.get(object) == Some(&refs) {
            return Vec::new();
        }
        let mut released = Vec::new();
        if let Some(old) = inner.forward.remove(object) {
            for r in old {
                if let Some(users) = inner.reverse.get_mut(&r) {
                    users.remove(object);
                    if users.is_empty() && !refs.contains(&r) {
                        inner.reverse.remove(&r);
                        released.push(r);
                    }
                }
            }
        }
        for r in &refs {
            inner
                .reverse
                .entry(r.clone())
                .or_default()
                .insert(object.clone());
        }
        inner.forward.insert(object.clone(), refs);
        released
    }

    /// Forgets `object`; returns what nothing refers to any longer.
    pub fn remove(&self, object: &ObjKey) -> Vec<Reference> {
        let released = self.set(object, Vec::new());
        self.inner
            .lock()
            .expect("index lock")
            .forward
            .remove(object);
        released
    }

    /// Whether any object refers to `reference`.
    pub fn has_users(&self, reference: &Reference) -> bool {
        let inner = self.inner.lock().expect("index lock");
        inner
            .reverse
            .get(reference)
            .is_some_and(|users| !users.is_empty())
    }

    /// The objects that refer to `reference`.
    pub fn users(&self, reference: &Reference) -> Vec<ObjKey> {
        let inner = self.inner.lock().expect("index lock");
        inner
            .reverse
            .get(reference)
            .map(|users| users.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The objects a spec refers to, known without reading anything (the account's credentials
/// Secret is added once the account is read).
pub fn spec_references(namespace: &str, spec: &ConnectionOverrideSpec) -> Vec<Reference> {
    let mut refs = vec![match spec.account_kind() {
        AccountKind::DpcAccount => Reference::Account {
            namespace: namespace.into(),
            name: spec.account_ref.name.clone(),
        },
        AccountKind::ClusterDpcAccount => Reference::ClusterAccount {
            name: spec.account_ref.name.clone(),
        },
    }];
    for from in &spec.connection_overrides.connection_properties_from {
        if let Some(s) = &from.secret_key_ref {
            refs.push(Reference::Secret {
                namespace: namespace.into(),
                name: s.name.clone(),
            });
        }
        if let Some(c) = &from.config_map_key_ref {
            refs.push(Reference::ConfigMap {
                namespace: namespace.into(),
                name: c.name.clone(),
            });
        }
    }
    refs
}

/// The account a ConnectionOverride names.
pub fn account_of(cov: &ConnectionOverride) -> AccountKey {
    let name = cov.spec.account_ref.name.clone();
    match cov.spec.account_kind() {
        AccountKind::DpcAccount => AccountKey {
            namespace: cov.metadata.namespace.clone(),
            name,
        },
        AccountKind::ClusterDpcAccount => AccountKey {
            namespace: None,
            name,
        },
    }
}
