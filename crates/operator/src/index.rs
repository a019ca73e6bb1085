//! The reverse index: which ConnectionOverrides (and accounts) refer to which Secrets,
//! ConfigMaps, accounts and namespaces, so that a change of one of those re-reconciles exactly
//! the objects that use it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

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
    /// What each object refers to, sharing the reverse map's copy of each reference (most
    /// objects name the same account and credentials Secret).
    forward: HashMap<ObjKey, Box<[Arc<Reference>]>>,
    reverse: HashMap<Arc<Reference>, Users>,
}

/// The objects that refer to one thing. Most Secrets have one reader: a set of one costs a
/// hash table of four slots (about 0.2 KB) per Secret, so one user is kept inline.
enum Users {
    One(ObjKey),
    Many(HashSet<ObjKey>),
}

impl Users {
    fn insert(&mut self, object: &ObjKey) {
        match self {
            Users::One(one) if one == object => {}
            Users::One(one) => {
                let first = std::mem::take(one);
                *self = Users::Many(HashSet::from([first, object.clone()]));
            }
            Users::Many(set) => {
                set.insert(object.clone());
            }
        }
    }

    /// Removes `object`; true when no user is left.
    fn remove(&mut self, object: &ObjKey) -> bool {
        match self {
            Users::One(one) => one == object,
            Users::Many(set) => {
                set.remove(object);
                set.is_empty()
            }
        }
    }

    fn to_vec(&self) -> Vec<ObjKey> {
        match self {
            Users::One(one) => vec![one.clone()],
            Users::Many(set) => set.iter().cloned().collect(),
        }
    }
}

impl RefIndex {
    /// Records what `object` refers to now; returns what nothing refers to any longer.
    pub fn set(&self, object: &ObjKey, refs: Vec<Reference>) -> Vec<Reference> {
        let mut inner = self.inner.lock().expect("index lock");
        let same = |old: &[Arc<Reference>]| old.iter().map(|r| &**r).eq(refs.iter());
        if inner.forward.get(object).is_some_and(|old| same(old)) {
            return Vec::new();
        }
        let mut released = Vec::new();
        if let Some(old) = inner.forward.remove(object) {
            for r in old {
                if let Some(users) = inner.reverse.get_mut(&r)
                    && users.remove(object)
                {
                    inner.reverse.remove(&r);
                    if !refs.contains(&*r) {
                        released.push((*r).clone());
                    }
                }
            }
        }
        let mut shared = Vec::with_capacity(refs.len());
        for r in refs {
            let known = inner.reverse.get_key_value(&r).map(|(key, _)| key.clone());
            match known {
                Some(key) => {
                    if let Some(users) = inner.reverse.get_mut(&key) {
                        users.insert(object);
                    }
                    shared.push(key);
                }
                None => {
                    let key = Arc::new(r);
                    inner
                        .reverse
                        .insert(key.clone(), Users::One(object.clone()));
                    shared.push(key);
                }
            }
        }
        inner
            .forward
            .insert(object.clone(), shared.into_boxed_slice());
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
        // An entry is removed with its last user.
        inner.reverse.contains_key(reference)
    }

    /// The objects that refer to `reference`.
    pub fn users(&self, reference: &Reference) -> Vec<ObjKey> {
        let inner = self.inner.lock().expect("index lock");
        inner
            .reverse
            .get(reference)
            .map(Users::to_vec)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str) -> Reference {
        Reference::Secret {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    fn key(name: &str) -> ObjKey {
        crate::key::obj_key("ns", name)
    }

    #[test]
    fn a_reference_is_released_with_its_last_user() {
        let index = RefIndex::default();
        assert!(
            index
                .set(&key("a"), vec![secret("s"), secret("only-a")])
                .is_empty()
        );
        assert!(index.set(&key("b"), vec![secret("s")]).is_empty());
        let mut users = index.users(&secret("s"));
        users.sort();
        assert_eq!(users, vec![key("a"), key("b")]);
        // a stops reading only-a; s is still b's.
        assert_eq!(
            index.set(&key("a"), vec![secret("s")]),
            vec![secret("only-a")]
        );
        assert!(!index.has_users(&secret("only-a")));
        assert!(index.remove(&key("b")).is_empty());
        assert_eq!(index.users(&secret("s")), vec![key("a")]);
        assert_eq!(index.remove(&key("a")), vec![secret("s")]);
        assert!(!index.has_users(&secret("s")));
        assert!(index.users(&secret("s")).is_empty());
    }

    #[test]
    fn setting_the_same_references_again_changes_nothing() {
        let index = RefIndex::default();
        index.set(&key("a"), vec![secret("s")]);
        assert!(index.set(&key("a"), vec![secret("s")]).is_empty());
        index.set(&key("b"), vec![secret("s")]);
        index.set(&key("b"), vec![secret("s")]);
        assert_eq!(index.users(&secret("s")).len(), 2);
    }

    #[test]
    fn the_index_keeps_the_key_it_was_given_not_a_copy() {
        let index = RefIndex::default();
        let a = key("a");
        index.set(&a, vec![secret("s"), secret("t")]);
        // A later pass's key for the same object finds the entry and leaves the first.
        index.set(&key("a"), vec![secret("s"), secret("t")]);
        for reference in [secret("s"), secret("t")] {
            let users = index.users(&reference);
            assert!(std::sync::Arc::ptr_eq(&users[0], &a), "{reference:?}");
        }
        assert_eq!(
            std::sync::Arc::strong_count(&a),
            1 + 1 + 2,
            "ours, the forward entry and one per reference: no copy of the strings"
        );
    }
}
