//! The account cache: resolved accounts shared by every object of an account.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use tokio::time::Instant;

use crate::api::{AccountKind, AccountRef};
use crate::dpc::{AccountKey, ClientSettings};
use crate::index::Reference;

use super::changes::Changes;
use super::{ResolveError, ResolvedAccount, Values, resolve_account_ref};

/// Resolved accounts, so thousands of objects of one account do not each read the account and
/// its credentials Secret. An entry goes when the watches see a change of anything it was read
/// from, and after `ttl` at the latest (a Secret outside the watched namespaces).
pub struct AccountCache {
    ttl: Duration,
    entries: Mutex<HashMap<Key, CachedAccount>>,
    /// The last account each reference resolved to, kept until the account itself is gone:
    /// a deletion that finds the credentials Secret already deleted (a namespace deletion, a
    /// `kubectl delete -f` of the quickstart) still deletes the remote override with them.
    last_good: Mutex<HashMap<Key, ResolvedAccount>>,
    /// The namespaces ClusterDpcAccount credentials may be read from.
    cluster_credentials: Vec<String>,
    /// One turn per account being read: concurrent first passes of one account wait for the
    /// first pass's read instead of each reading the account and its Secret.
    reading: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// What [`AccountCache::invalidate`] was told of, for reads under way.
    changes: Mutex<Changes>,
    /// What Secrets hold, kept by their watch: credentials are read from here first.
    values: Arc<Values>,
}

type Key = (String, AccountKind, String);

struct CachedAccount {
    at: Instant,
    account: ResolvedAccount,
    refs: Vec<Reference>,
}

impl AccountCache {
    pub fn new(ttl: Duration, cluster_credentials: Vec<String>, values: Arc<Values>) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            last_good: Mutex::new(HashMap::new()),
            cluster_credentials,
            reading: Mutex::new(HashMap::new()),
            changes: Mutex::default(),
            values,
        }
    }

    /// The namespaces ClusterDpcAccount credentials may be read from.
    pub fn cluster_credentials_namespaces(&self) -> &[String] {
        &self.cluster_credentials
    }

    /// Resolves for a deletion: as [`AccountCache::resolve`], but when the account or its
    /// credentials can no longer be read, the account as it last resolved (if this process
    /// resolved it since it started).
    pub async fn resolve_for_deletion(
        &self,
        client: &Client,
        namespace: &str,
        account_ref: &AccountRef,
        settings: &ClientSettings,
    ) -> (Result<ResolvedAccount, ResolveError>, Vec<Reference>) {
        let (result, refs) = self.resolve(client, namespace, account_ref, settings).await;
        match result {
            // Only what is gone falls back; an account that now refuses (a namespace, a
            // host, a credentials namespace) refuses the deletion too.
            Err(e) if e.is_gone() => {
                let key = Self::key(namespace, account_ref);
                match self.last_good.lock().expect("account cache lock").get(&key) {
                    Some(account) => (Ok(account.clone()), refs),
                    None => (Err(e), refs),
                }
            }
            other => (other, refs),
        }
    }

    /// Forgets every resolved account (a new term: the watches start over); the last good
    /// resolutions stay, for deletions.
    pub fn clear(&self) {
        self.changes
            .lock()
            .expect("account cache lock")
            .record(None);
        self.entries.lock().expect("account cache lock").clear();
    }

    /// Forgets the last good resolution of an account that is gone.
    pub fn forget_account(&self, key: &AccountKey) {
        self.last_good
            .lock()
            .expect("account cache lock")
            .retain(|(ns, kind, name), _| {
                let same = match (kind, &key.namespace) {
                    (AccountKind::DpcAccount, Some(account_ns)) => account_ns == ns,
                    (AccountKind::ClusterDpcAccount, None) => true,
                    _ => false,
                };
                !(same && *name == key.name)
            });
    }

    fn key(namespace: &str, account_ref: &AccountRef) -> Key {
        (
            namespace.into(),
            account_ref.kind.unwrap_or_default(),
            account_ref.name.clone(),
        )
    }

    /// Forgets every entry read from `reference` (or about that account).
    pub fn invalidate(&self, reference: &Reference) {
        let changes = Some(reference.clone());
        self.changes
            .lock()
            .expect("account cache lock")
            .record(changes);
        self.entries
            .lock()
            .expect("account cache lock")
            .retain(|key, entry| !about_account(reference, key) && !entry.refs.contains(reference));
    }

    /// Resolves through the cache.
    pub async fn resolve(
        &self,
        client: &Client,
        namespace: &str,
        account_ref: &AccountRef,
        settings: &ClientSettings,
    ) -> (Result<ResolvedAccount, ResolveError>, Vec<Reference>) {
        let key = Self::key(namespace, account_ref);
        if let Some(hit) = self.cached(&key) {
            return hit;
        }
        let turn = self
            .reading
            .lock()
            .expect("account cache lock")
            .entry(key.clone())
            .or_default()
            .clone();
        let held = turn.lock().await;
        // The pass whose turn came first has read it meanwhile.
        if let Some(hit) = self.cached(&key) {
            return hit;
        }
        let resolved = self
            .read(client, namespace, account_ref, settings, key.clone())
            .await;
        drop(held);
        let mut reading = self.reading.lock().expect("account cache lock");
        // Nobody else waits on this turn (the map and this pass hold it): it goes.
        if reading.get(&key).is_some_and(|t| Arc::strong_count(t) <= 2) {
            reading.remove(&key);
        }
        resolved
    }

    fn cached(&self, key: &Key) -> Option<(Result<ResolvedAccount, ResolveError>, Vec<Reference>)> {
        let entries = self.entries.lock().expect("account cache lock");
        let entry = entries.get(key)?;
        (entry.at.elapsed() < self.ttl).then(|| (Ok(entry.account.clone()), entry.refs.clone()))
    }

    /// Reads the account (and its Secret) and caches what resolved.
    async fn read(
        &self,
        client: &Client,
        namespace: &str,
        account_ref: &AccountRef,
        settings: &ClientSettings,
        key: Key,
    ) -> (Result<ResolvedAccount, ResolveError>, Vec<Reference>) {
        let mark = self.changes.lock().expect("account cache lock").mark();
        let (result, refs) = resolve_account_ref(
            client,
            Some(&self.values),
            namespace,
            account_ref,
            settings,
            &self.cluster_credentials,
        )
        .await;
        if let Ok(account) = &result {
            self.last_good
                .lock()
                .expect("account cache lock")
                .insert(key.clone(), account.clone());
            let entry = CachedAccount {
                at: Instant::now(),
                account: account.clone(),
                refs: refs.clone(),
            };
            // A change of what was read, seen while reading, may be newer than what was
            // read: not cached, so the pass that change triggers reads again.
            let changes = self.changes.lock().expect("account cache lock");
            let about = |r: &Reference| refs.contains(r) || about_account(r, &key);
            if changes.unchanged_since(mark, about) {
                self.entries
                    .lock()
                    .expect("account cache lock")
                    .insert(key, entry);
            }
        }
        (result, refs)
    }
}

/// Whether `reference` is the account `key` names.
fn about_account(reference: &Reference, (ns, kind, name): &Key) -> bool {
    match (reference, kind) {
        (Reference::Account { namespace, name: n }, AccountKind::DpcAccount) => {
            namespace == ns && n == name
        }
        (Reference::ClusterAccount { name: n }, AccountKind::ClusterDpcAccount) => n == name,
        _ => false,
    }
}
