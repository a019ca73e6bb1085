//! The account cache: resolved accounts shared by every object of an account.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::Client;
use tokio::time::Instant;

use crate::api::{AccountKind, AccountRef};
use crate::dpc::{AccountKey, ClientSettings};
use crate::index::Reference;

use super::{ResolveError, ResolvedAccount, resolve_account_ref};

/// Resolved accounts, so thousands of objects of one account do not each read the account and
/// its credentials Secret. An entry goes when the watches see a change of anything it was read
/// from, and after `ttl` at the latest (a Secret outside the watched namespaces).
pub struct AccountCache {
    ttl: Duration,
    entries: Mutex<HashMap<(String, AccountKind, String), CachedAccount>>,
    /// The last account each reference resolved to, kept until the account itself is gone:
    /// a deletion that finds the credentials Secret already deleted (a namespace deletion, a
    /// `kubectl delete -f` of the quickstart) still deletes the remote override with them.
    last_good: Mutex<HashMap<(String, AccountKind, String), ResolvedAccount>>,
    /// The namespaces ClusterDpcAccount credentials may be read from.
    cluster_credentials: Vec<String>,
}

struct CachedAccount {
    at: Instant,
    account: ResolvedAccount,
    refs: Vec<Reference>,
}

impl AccountCache {
    pub fn new(ttl: Duration, cluster_credentials: Vec<String>) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
            last_good: Mutex::new(HashMap::new()),
            cluster_credentials,
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

    fn key(namespace: &str, account_ref: &AccountRef) -> (String, AccountKind, String) {
        (
            namespace.into(),
            account_ref.kind.unwrap_or_default(),
            account_ref.name.clone(),
        )
    }

    /// Forgets every entry read from `reference` (or about that account).
    pub fn invalidate(&self, reference: &Reference) {
        self.entries
            .lock()
            .expect("account cache lock")
            .retain(|(ns, kind, name), entry| {
                let about = match (reference, kind) {
                    (Reference::Account { namespace, name: n }, AccountKind::DpcAccount) => {
                        namespace == ns && n == name
                    }
                    (Reference::ClusterAccount { name: n }, AccountKind::ClusterDpcAccount) => {
                        n == name
                    }
                    _ => false,
                };
                !about && !entry.refs.contains(reference)
            });
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
        if let Some(entry) = self.entries.lock().expect("account cache lock").get(&key)
            && entry.at.elapsed() < self.ttl
        {
            return (Ok(entry.account.clone()), entry.refs.clone());
        }
        let (result, refs) = resolve_account_ref(
            client,
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
            self.entries
                .lock()
                .expect("account cache lock")
                .insert(key, entry);
        }
        (result, refs)
    }
}
