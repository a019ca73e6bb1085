//! Reconcile of one ConnectionOverride, one file per stage: `validate` → `resolve` → `build`
//! → `act`, chained in `apply`; `outcome` turns how a pass ended into the next status and
//! Event (pure), and `write` writes them. `cleanup` runs the deletion; `account` reconciles
//! DpcAccounts and ClusterDpcAccounts. The pure stages carry their unit tests.
//!
//! Every outcome a user can act on is reported in status and the pass returns `Ok`; only a
//! failure of the Kubernetes API itself returns `Err`, for the error policy's backoff.

pub mod account;
pub mod act;
pub mod apply;
pub mod build;
pub mod cleanup;
pub mod outcome;
pub mod ownership;
pub mod resolve;
pub mod validate;
pub mod write;

use std::sync::Arc;
use std::time::Duration;

use kube::Resource;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use tracing::{Instrument, info_span, warn};

use crate::api::conditions::Reason;
use crate::api::{ConnectionOverride, ConnectionOverrideSpec};
use crate::context::Context;
use crate::key::key_of;
use crate::stored::Stored;

/// A failure that the error policy retries with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Resolve(String),
    #[error("could not build a patch: {0}")]
    Patch(#[from] serde_json::Error),
    #[error("the reconcile panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) | Error::Resolve(_) => "kubernetes",
            Error::Patch(_) | Error::Panicked(_) => "internal",
        }
    }
}

type Guarded = DeserializeGuard<ConnectionOverride>;

/// The error policy: retry with the object's backoff.
pub fn error_policy(obj: Arc<Stored>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key_of(obj.meta());
    let delay = ctx.objects.next_backoff(&key);
    warn!(namespace = %key.0, object = %key.1, error = %error, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}

/// Runs `pass`, turning a panic inside it into `Err` with the panic's text: a bug met by one
/// object must not end the process (and every other object's reconciliation with it).
pub async fn catch_panic<T>(pass: impl std::future::Future<Output = T>) -> Result<T, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(pass)
        .catch_unwind()
        .await
        .map_err(|panic| {
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into())
        })
}

/// Reconciles one ConnectionOverride; a panic becomes the object's `InternalError`
/// condition and a retry with backoff.
pub async fn reconcile_guarded(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    match catch_panic(reconcile(guard.clone(), ctx.clone())).await {
        Ok(result) => result,
        Err(panic) => {
            let key = key_of(guard.meta());
            tracing::error!(namespace = %key.0, object = %key.1, panic = %panic, "a reconcile panicked; the object is retried with backoff");
            let message = format!(
                "dpc-operator failed internally while reconciling this object ({panic}); it is retried with backoff. Please report this as a bug."
            );
            let conditions = guard
                .0
                .as_ref()
                .ok()
                .and_then(|o| o.status.as_ref())
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let reasons = (Reason::InternalError, Reason::InternalError);
            let meta = guard.meta();
            write::report_conditions_only(&ctx, meta, conditions, reasons, &message, false).await?;
            Ok(Action::requeue(ctx.objects.next_backoff(&key)))
        }
    }
}

/// Reconciles one ConnectionOverride.
pub async fn reconcile(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Act only once every watch has listed what exists (conflicts need the whole picture).
    if !ctx.wait_synced().await {
        return Ok(Action::await_change());
    }
    let meta = guard.meta();
    let key = key_of(meta);
    let span = info_span!("reconcile", namespace = %key.0, object = %key.1, generation = meta.generation.unwrap_or(0));
    async {
        match &guard.0 {
            Err(invalid) => validate::unreadable(&guard, &invalid.error, &key, &ctx).await,
            Ok(obj) if obj.metadata.deletion_timestamp.is_some() => {
                cleanup::cleanup(obj, &key, &ctx).await
            }
            Ok(obj) => apply::apply(obj, &key, &ctx).await,
        }
    }
    .instrument(span)
    .await
}

fn annotation<'a>(obj: &'a ConnectionOverride, name: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()?
        .get(name)
        .map(String::as_str)
}

/// Whether two API URLs are the same base (a trailing `/` aside).
fn same_api(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The object's sync interval: its own (at least the configured minimum) or the default.
fn sync_interval(spec: &ConnectionOverrideSpec, ctx: &Context) -> Duration {
    spec.sync_interval
        .as_deref()
        .and_then(|s| crate::api::duration::parse_duration(s).ok())
        .unwrap_or(ctx.config.default_sync_interval)
        .max(ctx.config.min_sync_interval)
}

#[cfg(test)]
mod tests {
    use super::catch_panic;

    #[tokio::test]
    async fn a_panic_in_a_pass_comes_back_as_its_text() {
        let ok = catch_panic(async { 7 }).await;
        assert_eq!(ok, Ok(7));
        let fixed = catch_panic(async { panic!("fixed text") }).await;
        assert_eq!(fixed, Err::<(), _>("fixed text".to_string()));
        let value = 3;
        let formatted = catch_panic(async move {
            if value == 3 {
                panic!("formatted {value}");
            }
        })
        .await;
        assert_eq!(formatted, Err("formatted 3".to_string()));
    }
}
