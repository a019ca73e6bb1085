//! The watches more than one controller needs, each run once: Secrets (the values
//! ConnectionOverrides read and the credentials accounts read) and the accounts (which their
//! own controllers watch, and a change of which triggers the ConnectionOverrides using them).
//! Each change drops what the caches read from it and asks for a reconcile of its users.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::accounts::is_secret;
use crate::context::Context;
use crate::dpc::AccountKey;
use crate::index::Reference;
use crate::reconcile::account::AccountObject;
use crate::watch::{self, Selectors};

use super::{scoped, watch_name};

/// The namespaces whose Secrets are watched (`None`: all): every scope of
/// ConnectionOverrides (their values and their DpcAccounts' credentials) and the namespaces
/// ClusterDpcAccount credentials may be in, each once.
pub(super) fn secret_scopes(
    scopes: &[Option<String>],
    credentials: &[String],
) -> Vec<Option<String>> {
    if scopes.iter().any(Option::is_none) {
        return vec![None];
    }
    let mut all: Vec<Option<String>> = scopes.to_vec();
    for ns in credentials {
        if !all.iter().any(|s| s.as_deref() == Some(ns)) {
            all.push(Some(ns.clone()));
        }
    }
    all
}

/// How often what was kept of Secrets nothing refers to is looked at.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest the first passes wait for the first list of Secrets (a watch that cannot
/// list — RBAC — must not hold every pass: they read what they need instead).
const FIRST_LIST_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Watches the Secrets of `scope` (their data streamed, one at a time) until `shutdown`.
/// Each change is kept in [`crate::accounts::Values`] first, then drops the accounts read
/// from it and triggers the ConnectionOverrides and accounts that read it; a relist starts
/// the scope's values over (a deletion meanwhile is not in the list). The first list counts
/// towards the controllers' sync: the first passes find every value in memory.
pub(super) async fn run_secrets(
    ctx: Arc<Context>,
    scope: Option<String>,
    shutdown: CancellationToken,
) {
    let ns = scope.as_deref();
    let api = scoped::<Secret>(&ctx.client, ns);
    let name = watch_name::<Secret>(ns, "");
    let (all, initial) = (Selectors::default(), watch::Initial::Stream);
    let events = watch::watch_with(&ctx.watches, name, api, all, initial);
    let mut events = std::pin::pin!(events.take_until(shutdown.cancelled()));
    let mut changes = ChangeFilter::default();
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    let first_list = tokio::time::sleep(FIRST_LIST_WAIT);
    let mut first_list = std::pin::pin!(first_list);
    let mut synced = false;
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => event,
                Some(Err(_)) => continue,
                None => break,
            },
            _ = prune.tick() => {
                ctx.values.prune(|r| ctx.index.has_users(r) || ctx.account_index.has_users(r));
                continue;
            }
            () = &mut first_list, if !synced => {
                warn!(scope = ?ns, "the Secrets were not listed within 60 s; passes read the Secrets they need");
                synced = true;
                ctx.scope_synced();
                continue;
            }
        };
        match event {
            Event::Init => ctx.values.invalidate_scope(ns, is_secret),
            Event::InitDone if !synced => {
                synced = true;
                ctx.scope_synced();
            }
            Event::InitDone => {}
            // Kept even when unchanged: a relist starts the values over.
            Event::Apply(secret) | Event::InitApply(secret) => {
                let changed = changes.changed(&secret, false);
                secret_seen(&ctx, &secret, false, changed);
            }
            Event::Delete(secret) => {
                changes.changed(&secret, true);
                secret_seen(&ctx, &secret, true, true);
            }
        }
    }
}

/// Passes on a Secret only for a new resourceVersion: a relist after a 410 (an API server
/// restart) triggers the users of what changed, not of every Secret. One entry per Secret of
/// the watched namespaces, referenced or not: `namespace/name` in one string (neither can
/// hold a `/`) and the version as a number where it is one (etcd's are).
#[derive(Default)]
struct ChangeFilter {
    versions: HashMap<Box<str>, Version>,
}

#[derive(PartialEq, Eq)]
enum Version {
    Number(u64),
    Text(Box<str>),
}

impl Version {
    fn of(text: &str) -> Self {
        match text.parse() {
            // "01" and "1" are different versions: only the canonical form is a number.
            Ok(n) if text == format!("{n}") => Version::Number(n),
            _ => Version::Text(text.into()),
        }
    }
}

impl ChangeFilter {
    fn changed(&mut self, secret: &Secret, deleted: bool) -> bool {
        let key = format!(
            "{}/{}",
            secret.namespace().unwrap_or_default(),
            secret.name_any()
        );
        if deleted {
            return self.versions.remove(key.as_str()).is_some();
        }
        let version = Version::of(&secret.resource_version().unwrap_or_default());
        match self.versions.get_mut(key.as_str()) {
            Some(kept) if *kept == version => false,
            Some(kept) => {
                *kept = version;
                true
            }
            None => {
                self.versions.insert(key.into(), version);
                true
            }
        }
    }
}

/// A Secret seen (or gone): its data is kept for the objects that read it; when it
/// `changed`, they and the accounts reading it are triggered.
fn secret_seen(ctx: &Context, secret: &Secret, deleted: bool, changed: bool) {
    let reference = Reference::Secret {
        namespace: secret.namespace().unwrap_or_default(),
        name: secret.name_any(),
    };
    let referenced = ctx.index.has_users(&reference) || ctx.account_index.has_users(&reference);
    let data = (!deleted).then(|| secret_data(secret));
    ctx.values.observe(&reference, data.as_ref(), referenced);
    if !changed {
        return;
    }
    ctx.accounts.invalidate(&reference);
    for key in ctx.index.users(&reference) {
        ctx.trigger(&key);
    }
    for key in ctx.account_index.users(&reference) {
        let (ns, name) = &*key;
        let namespace = (!ns.is_empty()).then(|| ns.clone());
        ctx.trigger_account(&AccountKey {
            namespace,
            name: name.clone(),
        });
    }
}

/// A Secret's keys and values (`data`, and `stringData` as a server may return it).
fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone().into_bytes());
    }
    for (k, v) in secret.data.iter().flatten() {
        data.insert(k.clone(), v.0.clone());
    }
    data
}

/// `reference` changed: the caches forget what they read from it, and the
/// ConnectionOverrides that read it are reconciled.
pub(super) fn changed(ctx: &Context, reference: &Reference) {
    ctx.accounts.invalidate(reference);
    ctx.values.invalidate(reference);
    for key in ctx.index.users(reference) {
        ctx.trigger(&key);
    }
}

/// The reference a ConnectionOverride holds to an account.
fn account_reference<K: AccountObject>(account: &K) -> Reference {
    let key = account.account_key();
    match key.namespace {
        Some(namespace) => Reference::Account {
            namespace,
            name: key.name,
        },
        None => Reference::ClusterAccount { name: key.name },
    }
}

/// What the account controller's watch tells the ConnectionOverrides: a new generation of
/// an account (its spec, the start of its deletion) or its deletion triggers its users. Its
/// first list counts towards the controllers' sync.
pub(super) fn account_changes<K: AccountObject>(
    ctx: Arc<Context>,
) -> impl FnMut(Event<K>) -> Event<K> + Send + 'static {
    let seen: Mutex<HashMap<Reference, Option<i64>>> = Mutex::new(HashMap::new());
    let mut listed = false;
    move |event| {
        let mut seen = seen.lock().expect("account generations lock");
        match &event {
            // The first passes wait for the accounts too: what they read of an account is
            // then never older than what its watch reports first.
            Event::InitDone if !listed => {
                listed = true;
                ctx.scope_synced();
            }
            Event::Apply(account) | Event::InitApply(account) => {
                let reference = account_reference(account);
                let generation = account.meta().generation;
                if seen.insert(reference.clone(), generation) != Some(generation) {
                    changed(&ctx, &reference);
                }
            }
            Event::Delete(account) => {
                let reference = account_reference(account);
                seen.remove(&reference);
                changed(&ctx, &reference);
            }
            Event::Init | Event::InitDone => {}
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(namespace: &str, name: &str, version: &str) -> Secret {
        let mut secret = Secret::default();
        secret.metadata.namespace = Some(namespace.into());
        secret.metadata.name = Some(name.into());
        secret.metadata.resource_version = Some(version.into());
        secret
    }

    #[test]
    fn only_a_new_version_or_a_deletion_is_a_change() {
        let mut filter = ChangeFilter::default();
        assert!(filter.changed(&secret("a", "s", "10"), false), "first seen");
        assert!(
            !filter.changed(&secret("a", "s", "10"), false),
            "relisted unchanged"
        );
        assert!(
            filter.changed(&secret("b", "s", "10"), false),
            "another namespace"
        );
        assert!(filter.changed(&secret("a", "s", "11"), false));
        assert!(
            filter.changed(&secret("a", "s", "011"), false),
            "not the same text"
        );
        assert!(filter.changed(&secret("a", "s", "v-x"), false));
        assert!(!filter.changed(&secret("a", "s", "v-x"), false));
        assert!(filter.changed(&secret("a", "s", "v-x"), true), "deleted");
        assert!(
            !filter.changed(&secret("a", "s", "v-x"), true),
            "already gone"
        );
        assert!(
            filter.changed(&secret("a", "s", "v-x"), false),
            "back again"
        );
    }
}
