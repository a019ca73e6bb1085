//! What a failed DPC call means for an object: the one mapping from an error to the reason
//! reported and when to try again, for every caller.

use std::time::Duration;

use rand::Rng;

use crate::api::conditions::Reason;
use crate::dpc::{DpcError, ErrorClass};

/// What a failed DPC call means for the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The call was not sent: the account's request rate holds a slot for this object this
    /// far ahead (flow control, not a failure).
    Deferred(Duration),
    /// The call failed: the reason to report, and when to try again.
    Failed { reason: Reason, retry: Retry },
}

/// When a failed call is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Not before something changes: the spec, a referenced value, the account.
    OnChange,
    /// After the object's backoff.
    Backoff,
    /// After what DPC asked for (`Retry-After`), jittered.
    After(Duration),
}

impl Retry {
    /// The delay before the next attempt, or `None` to wait for a change. `backoff` gives
    /// (and counts) the object's next backoff.
    pub fn delay(self, backoff: impl FnOnce() -> Duration) -> Option<Duration> {
        match self {
            Retry::OnChange => None,
            Retry::Backoff => Some(backoff()),
            Retry::After(wait) => Some(jittered(wait)),
        }
    }
}

impl Verdict {
    /// The delay before the next attempt of an operation that must be retried even where a
    /// change would be awaited (a deletion): at the reserved slot, after what DPC asked for,
    /// else after the backoff.
    pub fn retry_delay(self, backoff: impl FnOnce() -> Duration) -> Duration {
        match self {
            Verdict::Deferred(wait) => at_slot(wait),
            Verdict::Failed {
                retry: Retry::After(wait),
                ..
            } => jittered(wait),
            Verdict::Failed { .. } => backoff(),
        }
    }
}

/// When to come back for a slot reserved `wait` from now: just after it opens.
pub fn at_slot(wait: Duration) -> Duration {
    wait + Duration::from_millis(5)
}

/// `base` plus up to a quarter of it (of at most 4 s), so objects told to wait the same time
/// do not all come back at once.
pub fn jittered(base: Duration) -> Duration {
    let extra = rand::rng().random_range(0.0..0.25);
    base + Duration::from_secs_f64(base.as_secs_f64().min(4.0) * extra)
}

/// The one mapping from a DPC error to what the object reports and when it tries again,
/// for every caller (a ConnectionOverride's pass, its deletion, an account's token check).
pub fn classify(error: &DpcError) -> Verdict {
    let wait = || error.retry_after().unwrap_or(Duration::from_secs(1));
    let failed = |reason, retry| Verdict::Failed { reason, retry };
    match error.class() {
        ErrorClass::Deferred => Verdict::Deferred(wait()),
        ErrorClass::Rejected => failed(Reason::ApiRejected, Retry::OnChange),
        ErrorClass::CredentialsRejected => failed(Reason::CredentialsRejected, Retry::OnChange),
        ErrorClass::Misconfigured => failed(Reason::AccountNotReady, Retry::OnChange),
        // A parent may be created in DPC later; nothing in the cluster would tell us.
        ErrorClass::NotFound => failed(Reason::ParentNotFound, Retry::Backoff),
        ErrorClass::RateLimited => failed(Reason::RateLimited, Retry::After(wait())),
        ErrorClass::Transient | ErrorClass::Conflict => {
            failed(Reason::ApiUnavailable, Retry::Backoff)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_class_has_one_reason_and_retry() {
        use crate::dpc::Operation;
        let api = |status: u16| DpcError::Api {
            operation: Operation::Update,
            status,
            problem: None,
            body_excerpt: None,
            retry_after: Some(Duration::from_secs(7)),
        };
        let failed = |reason, retry| Verdict::Failed { reason, retry };
        assert_eq!(
            classify(&api(400)),
            failed(Reason::ApiRejected, Retry::OnChange)
        );
        assert_eq!(
            classify(&api(403)),
            failed(Reason::CredentialsRejected, Retry::OnChange)
        );
        assert_eq!(
            classify(&api(404)),
            failed(Reason::ParentNotFound, Retry::Backoff)
        );
        assert_eq!(
            classify(&api(409)),
            failed(Reason::ApiUnavailable, Retry::Backoff)
        );
        assert_eq!(
            classify(&api(503)),
            failed(Reason::ApiUnavailable, Retry::Backoff)
        );
        assert_eq!(
            classify(&api(302)),
            failed(Reason::AccountNotReady, Retry::OnChange)
        );
        let wait = Duration::from_secs(7);
        assert_eq!(
            classify(&api(429)),
            failed(Reason::RateLimited, Retry::After(wait))
        );
        // A retry never waits less than asked, nor a change for ever.
        assert_eq!(Retry::OnChange.delay(|| unreachable!()), None);
        let after = Retry::After(wait).delay(|| unreachable!()).unwrap();
        assert!(
            after >= wait && after <= wait + Duration::from_secs(1),
            "{after:?}"
        );
        let slot = DpcError::Throttled {
            operation: Operation::Create,
            remaining: Duration::from_secs(2),
            queued: true,
        };
        assert_eq!(classify(&slot), Verdict::Deferred(Duration::from_secs(2)));
        let at_slot = classify(&slot).retry_delay(|| unreachable!());
        assert_eq!(at_slot, Duration::from_millis(2005));
        let deletion = failed(Reason::ApiRejected, Retry::OnChange);
        assert_eq!(
            deletion.retry_delay(|| Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }
}
