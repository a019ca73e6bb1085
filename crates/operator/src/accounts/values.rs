//! The values ConnectionOverrides read from Secrets and ConfigMaps, kept between passes so a
//! pass over an unchanged object reads nothing from the API server.
//!
//! The watch of Secrets carries their data ([`Values::observe`]): a Secret some object
//! refers to keeps, of its data, the keys read from it — or all of it while it is small
//! (at most [`SMALL`] bytes), so a new reference to another key needs no read. A Secret no
//! object refers to yet (listed before the objects that will read it; created just before
//! its ConnectionOverride) is kept, if small, for [`GRACE`]; larger ones (a Helm release)
//! are not kept at all, and are read when an object asks. A Secret nothing refers to any
//! longer leaves memory ([`Values::release`], [`Values::prune`]). ConfigMap values are
//! kept from the passes' reads and dropped on a new resourceVersion. The values are
//! [`SecretString`]s: never in logs or `Debug`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::dpc::SecretString;
use crate::index::Reference;

use super::changes::Changes;

/// The most data a Secret may have to be kept whole.
pub const SMALL: usize = 16 * 1024;
/// How long a small Secret nothing refers to is kept for the object that may read it.
pub const GRACE: Duration = Duration::from_secs(120);

/// What a key of a Secret or ConfigMap held when it was read.
#[derive(Clone, Debug)]
pub(crate) enum Lookup {
    /// The object does not exist.
    Absent,
    /// The object has no such key.
    NoKey,
    /// The key's bytes are not UTF-8.
    NotText,
    Text(SecretString),
}

/// What is known of one Secret or ConfigMap.
enum Entry {
    /// It does not exist (as last seen).
    Absent,
    Held {
        keys: Keys,
        /// `keys` is all of its data: a key not there is not in the object.
        whole: bool,
        /// Kept for an object that may come to read it (nothing referred to it when seen).
        unreferenced_since: Option<Instant>,
    },
}

/// The keys of one object and what each held, sorted by name. A slice, not a map: most
/// objects have a key or two, and one is kept per referenced Secret (a map of one key costs
/// a four-slot hash table, about 0.2 KB, at 10,000 Secrets).
#[derive(Default)]
struct Keys(Box<[(Box<str>, Lookup)]>);

impl Keys {
    fn get(&self, key: &str) -> Option<&Lookup> {
        let at = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[at].1)
    }

    fn insert(&mut self, key: &str, lookup: Lookup) {
        match self.0.binary_search_by(|(k, _)| (**k).cmp(key)) {
            Ok(at) => self.0[at].1 = lookup,
            Err(at) => {
                let mut keys = std::mem::take(&mut self.0).into_vec();
                keys.insert(at, (key.into(), lookup));
                self.0 = keys.into_boxed_slice();
            }
        }
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| &**k)
    }
}

impl FromIterator<(String, Lookup)> for Keys {
    fn from_iter<I: IntoIterator<Item = (String, Lookup)>>(iter: I) -> Self {
        let mut keys: Vec<(Box<str>, Lookup)> =
            iter.into_iter().map(|(k, v)| (k.into(), v)).collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        keys.dedup_by(|a, b| a.0 == b.0);
        Keys(keys.into_boxed_slice())
    }
}

/// The values read from Secrets and ConfigMaps, by object and key.
#[derive(Default)]
pub struct Values {
    entries: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Reference, Entry>,
    /// A read that a change of its object began after is not kept.
    changes: Changes,
    /// When a pass last read a Secret nothing referred to yet: objects are still coming to
    /// their first pass (a bulk creation whose first passes take longer than [`GRACE`]).
    last_first_read: Option<Instant>,
}

fn lookup_of(bytes: &[u8]) -> Lookup {
    std::str::from_utf8(bytes).map_or(Lookup::NotText, |s| Lookup::Text(SecretString::new(s)))
}

impl Values {
    /// The lookup of `key` in `reference` as last seen, if it is known.
    /// A first read of a Secret nothing referred to when seen makes it an ordinary entry
    /// (kept while referenced) and says that objects are still coming to their first pass.
    pub(crate) fn get(&self, reference: &Reference, key: &str) -> Option<Lookup> {
        let mut inner = self.entries.lock().expect("values lock");
        let inner = &mut *inner;
        match inner.entries.get_mut(reference)? {
            Entry::Absent => Some(Lookup::Absent),
            Entry::Held {
                keys,
                whole,
                unreferenced_since,
            } => {
                let found = match keys.get(key) {
                    Some(lookup) => Some(lookup.clone()),
                    None => whole.then_some(Lookup::NoKey),
                };
                if found.is_some() && unreferenced_since.take().is_some() {
                    inner.last_first_read = Some(Instant::now());
                }
                found
            }
        }
    }

    /// A mark to pass to [`Values::put`]: taken before the read.
    pub(crate) fn mark(&self) -> u64 {
        self.entries.lock().expect("values lock").changes.mark()
    }

    /// Keeps what a pass read, unless something changed since `mark`.
    pub(crate) fn put(&self, mark: u64, reference: &Reference, key: &str, lookup: Lookup) {
        let mut inner = self.entries.lock().expect("values lock");
        if !inner.changes.unchanged_since(mark, |r| r == reference) {
            return;
        }
        let entries = &mut inner.entries;
        if let Lookup::Absent = lookup {
            entries.insert(reference.clone(), Entry::Absent);
            return;
        }
        let entry = entries.entry(reference.clone()).or_insert(Entry::Absent);
        if let Entry::Absent = entry {
            *entry = Entry::Held {
                keys: Keys::default(),
                whole: false,
                unreferenced_since: None,
            };
        }
        if let Entry::Held { keys, .. } = entry {
            keys.insert(key, lookup);
        }
    }

    /// What the watch of Secrets saw of `reference`: its data, or `None` once deleted.
    /// `referenced`: some object refers to it.
    pub fn observe(
        &self,
        reference: &Reference,
        data: Option<&BTreeMap<String, Vec<u8>>>,
        referenced: bool,
    ) {
        let mut inner = self.entries.lock().expect("values lock");
        inner.changes.record(Some(reference.clone()));
        let entries = &mut inner.entries;
        let Some(data) = data else {
            match referenced {
                true => entries.insert(reference.clone(), Entry::Absent),
                false => entries.remove(reference),
            };
            return;
        };
        let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
        let read: Vec<String> = match entries.get(reference) {
            Some(Entry::Held {
                keys, whole: false, ..
            }) => keys.names().map(String::from).collect(),
            _ => Vec::new(),
        };
        let entry = if size <= SMALL {
            Entry::Held {
                keys: data
                    .iter()
                    .map(|(k, v)| (k.clone(), lookup_of(v)))
                    .collect(),
                whole: true,
                unreferenced_since: (!referenced).then(Instant::now),
            }
        } else if referenced && !read.is_empty() {
            let keys = read.into_iter().map(|k| {
                let lookup = data.get(&k).map_or(Lookup::NoKey, |v| lookup_of(v));
                (k, lookup)
            });
            Entry::Held {
                keys: keys.collect(),
                whole: false,
                unreferenced_since: None,
            }
        } else {
            entries.remove(reference);
            return;
        };
        entries.insert(reference.clone(), entry);
    }

    /// `reference` changed: what was read of it is gone.
    pub fn invalidate(&self, reference: &Reference) {
        let mut inner = self.entries.lock().expect("values lock");
        inner.changes.record(Some(reference.clone()));
        inner.entries.remove(reference);
    }

    /// A watch of `namespace` (`None`: every namespace) lists again: what it may have missed
    /// meanwhile (a deletion) is not in the list's events, so every entry it covers goes.
    pub fn invalidate_scope(&self, namespace: Option<&str>, kind_of: fn(&Reference) -> bool) {
        let mut inner = self.entries.lock().expect("values lock");
        inner.changes.record(None);
        inner.entries.retain(|reference, _| {
            let covered = match reference {
                Reference::Secret { namespace: ns, .. }
                | Reference::ConfigMap { namespace: ns, .. } => {
                    namespace.is_none_or(|scope| scope == ns)
                }
                _ => false,
            };
            !(covered && kind_of(reference))
        });
    }

    /// Forgets the objects no ConnectionOverride refers to any longer.
    pub fn release(&self, references: &[Reference]) {
        if references.is_empty() {
            return;
        }
        let mut inner = self.entries.lock().expect("values lock");
        for reference in references {
            inner.entries.remove(reference);
        }
    }

    /// Forgets what was kept for an object that never came ([`GRACE`]), and what nothing
    /// refers to (`referenced` says), older than that too. While passes still come to read
    /// Secrets nothing referred to (within [`GRACE`] of the last such read), the objects that
    /// have not had their first pass yet may read the rest: none of those is forgotten, or
    /// every object reached after [`GRACE`] of a bulk creation would read its Secret again.
    pub fn prune(&self, referenced: impl Fn(&Reference) -> bool) {
        self.prune_at(Instant::now(), referenced);
    }

    fn prune_at(&self, now: Instant, referenced: impl Fn(&Reference) -> bool) {
        let mut inner = self.entries.lock().expect("values lock");
        let coming = inner
            .last_first_read
            .is_some_and(|at| now.saturating_duration_since(at) < GRACE);
        inner.entries.retain(|reference, entry| match entry {
            Entry::Held {
                unreferenced_since: Some(since),
                ..
            } if now.saturating_duration_since(*since) >= GRACE && !coming => referenced(reference),
            Entry::Held {
                unreferenced_since: Some(_),
                ..
            } => true,
            _ => referenced(reference),
        });
    }

    /// Forgets everything (a new term: the watches start over).
    pub fn clear(&self) {
        let mut inner = self.entries.lock().expect("values lock");
        inner.changes.record(None);
        inner.entries.clear();
    }

    /// How many objects have values kept.
    pub fn len(&self) -> usize {
        self.entries.lock().expect("values lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Secret reference (`invalidate_scope` of the Secret watch).
pub fn is_secret(reference: &Reference) -> bool {
    matches!(reference, Reference::Secret { .. })
}

/// A ConfigMap reference (`invalidate_scope` of the ConfigMap watch).
pub fn is_config_map(reference: &Reference) -> bool {
    matches!(reference, Reference::ConfigMap { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(ns: &str, name: &str) -> Reference {
        Reference::Secret {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn text(lookup: Option<Lookup>) -> Option<String> {
        match lookup {
            Some(Lookup::Text(v)) => Some(v.expose().to_string()),
            _ => None,
        }
    }

    #[test]
    fn a_value_read_is_kept_until_its_object_changes() {
        let values = Values::default();
        let s = secret("a", "db");
        values.put(
            values.mark(),
            &s,
            "password",
            Lookup::Text(SecretString::new("p1")),
        );
        assert_eq!(text(values.get(&s, "password")).as_deref(), Some("p1"));
        assert!(
            values.get(&s, "user").is_none(),
            "a key never read is not known"
        );
        values.invalidate(&s);
        assert!(values.get(&s, "password").is_none());
    }

    #[test]
    fn a_read_that_began_before_a_change_is_not_kept() {
        let values = Values::default();
        let s = secret("a", "db");
        let mark = values.mark();
        values.invalidate(&s);
        values.put(mark, &s, "password", Lookup::Text(SecretString::new("old")));
        assert!(values.get(&s, "password").is_none());
    }

    #[test]
    fn a_relist_of_a_namespace_drops_its_entries_only() {
        let values = Values::default();
        let (a, b) = (secret("a", "db"), secret("b", "db"));
        for s in [&a, &b] {
            values.put(values.mark(), s, "k", Lookup::NoKey);
        }
        values.invalidate_scope(Some("a"), is_secret);
        assert!(values.get(&a, "k").is_none());
        assert!(values.get(&b, "k").is_some());
        values.invalidate_scope(None, is_config_map);
        assert!(
            values.get(&b, "k").is_some(),
            "a ConfigMap relist keeps Secrets"
        );
        values.invalidate_scope(None, is_secret);
        assert!(values.is_empty());
    }

    #[test]
    fn a_released_object_leaves_memory_and_debug_shows_no_value() {
        let values = Values::default();
        let s = secret("a", "db");
        values.put(
            values.mark(),
            &s,
            "k",
            Lookup::Text(SecretString::new("hunter2")),
        );
        let shown = format!("{:?}", values.get(&s, "k"));
        assert!(!shown.contains("hunter2"), "{shown}");
        values.release(std::slice::from_ref(&s));
        assert!(values.is_empty());
    }

    fn data(pairs: &[(&str, usize)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, n)| (k.to_string(), vec![b'v'; *n]))
            .collect()
    }

    #[test]
    fn a_small_secret_is_kept_whole_and_a_missing_key_is_known() {
        let values = Values::default();
        let s = secret("a", "db");
        values.observe(&s, Some(&data(&[("user", 3), ("password", 5)])), true);
        assert_eq!(text(values.get(&s, "password")).as_deref(), Some("vvvvv"));
        assert!(matches!(values.get(&s, "other"), Some(Lookup::NoKey)));
        values.observe(&s, None, true);
        assert!(matches!(values.get(&s, "password"), Some(Lookup::Absent)));
    }

    #[test]
    fn a_large_secret_keeps_only_the_keys_read_and_only_while_referenced() {
        let values = Values::default();
        let s = secret("a", "release");
        let large = data(&[("release", SMALL + 1), ("password", 4)]);
        values.observe(&s, Some(&large), false);
        assert!(
            values.is_empty(),
            "a large Secret nothing reads is not kept"
        );
        values.observe(&s, Some(&large), true);
        assert!(
            values.get(&s, "password").is_none(),
            "no key of it was read yet"
        );
        values.put(
            values.mark(),
            &s,
            "password",
            Lookup::Text(SecretString::new("old")),
        );
        values.observe(&s, Some(&large), true);
        assert_eq!(text(values.get(&s, "password")).as_deref(), Some("vvvv"));
        assert!(
            values.get(&s, "release").is_none(),
            "a key not read is not kept"
        );
    }

    #[test]
    fn pruning_keeps_what_is_referenced_and_what_is_within_its_grace() {
        let values = Values::default();
        let (kept, waiting, gone) = (secret("a", "kept"), secret("a", "new"), secret("a", "gone"));
        values.observe(&kept, Some(&data(&[("k", 1)])), true);
        values.observe(&waiting, Some(&data(&[("k", 1)])), false);
        values.put(values.mark(), &gone, "k", Lookup::NoKey);
        values.prune(|r| *r == kept);
        assert!(values.get(&kept, "k").is_some());
        assert!(
            values.get(&waiting, "k").is_some(),
            "seen before any object read it"
        );
        assert!(values.get(&gone, "k").is_none(), "nothing refers to it");
    }

    #[test]
    fn unread_secrets_outlive_their_grace_while_first_passes_still_read_such_secrets() {
        let values = Values::default();
        let (read, unread) = (secret("a", "read"), secret("a", "unread"));
        values.observe(&read, Some(&data(&[("k", 1)])), false);
        values.observe(&unread, Some(&data(&[("k", 1)])), false);
        let later = Instant::now() + GRACE + Duration::from_secs(1);
        // A first pass reads one of them: objects are still coming.
        assert!(values.get(&read, "k").is_some());
        values.entries.lock().unwrap().last_first_read = Some(later - GRACE / 2);
        values.prune_at(later, |r| *r == read);
        assert!(
            values.get(&unread, "k").is_some(),
            "kept past its grace while first passes go on"
        );
        // No first read for a grace: what nothing refers to goes.
        values.entries.lock().unwrap().last_first_read = Some(later - GRACE);
        values.prune_at(later, |r| *r == read);
        assert!(
            values.get(&unread, "k").is_none(),
            "forgotten after its grace"
        );
        assert!(values.get(&read, "k").is_some(), "referenced, kept");
    }
}
