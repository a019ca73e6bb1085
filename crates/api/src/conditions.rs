//! Condition types, reasons and the helper that keeps `lastTransitionTime` honest.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition type: DPC holds the desired state.
pub const READY: &str = "Ready";
/// Condition type: the last reconciliation succeeded.
pub const SYNCED: &str = "Synced";
/// Condition type: the override in DPC was found to differ from the spec.
pub const DRIFTED: &str = "Drifted";

/// Why an object is or is not Ready. One value per failure class, so users can alert on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// DPC holds the desired override.
    Available,
    /// The override is being created.
    Creating,
    /// The override is being updated.
    Updating,
    /// The object is being deleted and the remote override removed.
    Deleting,
    /// The spec cannot be turned into a request.
    InvalidSpec,
    /// A referenced Secret or ConfigMap does not exist.
    SecretNotFound,
    /// A referenced Secret or ConfigMap lacks the named key.
    SecretKeyMissing,
    /// The DpcAccount is missing or not usable.
    AccountNotReady,
    /// DPC refused the account's credentials (token endpoint, 401 after a new token, or 403).
    CredentialsRejected,
    /// DPC says the project, environment or parent connection does not exist.
    ParentNotFound,
    /// DPC rejected the request (400/422 or another 4xx); the problem details are in the message.
    ApiRejected,
    /// DPC answered 429; calls for the account wait for Retry-After.
    RateLimited,
    /// DPC could not be reached or answered 5xx; retried with backoff.
    ApiUnavailable,
    /// Reconciliation is paused.
    Paused,
    /// Another ConnectionOverride manages the same remote override.
    Conflict,
    /// The ClusterDpcAccount does not allow this namespace.
    AccountNotAllowed,
    /// DPC holds something other than the spec (driftPolicy Report, or ObserveOnly).
    Drifted,
    /// The Drifted reason once DPC matches the spec again.
    InSync,
    /// The Synced reason after a pass that reached its goal.
    ReconcileSuccess,
    /// The Synced reason after a pass that failed.
    ReconcileError,
    /// The Synced reason while paused.
    ReconcilePaused,
    /// The DpcAccount reason when a token was obtained.
    TokenObtained,
    /// The operator failed inside (a panic) while reconciling this object; retried with
    /// backoff. Worth a bug report.
    InternalError,
}

impl Reason {
    /// The reason as written in a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Available => "Available",
            Reason::Creating => "Creating",
            Reason::Updating => "Updating",
            Reason::Deleting => "Deleting",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::AccountNotReady => "AccountNotReady",
            Reason::CredentialsRejected => "CredentialsRejected",
            Reason::ParentNotFound => "ParentNotFound",
            Reason::ApiRejected => "ApiRejected",
            Reason::RateLimited => "RateLimited",
            Reason::ApiUnavailable => "ApiUnavailable",
            Reason::Paused => "Paused",
            Reason::Conflict => "Conflict",
            Reason::AccountNotAllowed => "AccountNotAllowed",
            Reason::Drifted => "Drifted",
            Reason::InSync => "InSync",
            Reason::ReconcileSuccess => "ReconcileSuccess",
            Reason::ReconcileError => "ReconcileError",
            Reason::ReconcilePaused => "ReconcilePaused",
            Reason::TokenObtained => "TokenObtained",
            Reason::InternalError => "InternalError",
        }
    }

    /// Whether this reason waits for a change of the spec or of a referenced object rather
    /// than being retried on a timer.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Reason::InvalidSpec
                | Reason::SecretNotFound
                | Reason::SecretKeyMissing
                | Reason::AccountNotReady
                | Reason::CredentialsRejected
                | Reason::ParentNotFound
                | Reason::ApiRejected
                | Reason::Conflict
                | Reason::AccountNotAllowed
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest condition message kept, in bytes: a large error body cannot push the status
/// towards the object size limit.
pub const MAX_MESSAGE: usize = 1024;

/// `message` cut to [`MAX_MESSAGE`] bytes (on a character boundary, marked with `…`).
pub fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

/// Sets the condition `type_` in `conditions`. `lastTransitionTime` moves to `now` only when
/// the condition is new or its status flips; reason, message and observedGeneration always
/// take the new values.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: Reason,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" };
    let message = bounded(message.into());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = now.clone();
                existing.status = status.into();
            }
            existing.reason = reason.as_str().into();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.as_str().into(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition `type_` is present with status True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn long_messages_are_cut_to_a_kibibyte_on_a_character_boundary() {
        let mut conditions = Vec::new();
        let huge = "é".repeat(600_000);
        set_condition(
            &mut conditions,
            READY,
            false,
            Reason::ApiRejected,
            huge,
            None,
            &at(1),
        );
        let kept = &conditions[0].message;
        assert!(kept.len() <= MAX_MESSAGE, "{}", kept.len());
        assert!(kept.len() > MAX_MESSAGE - 8);
        assert!(kept.ends_with('…'));
        assert_eq!(bounded("short".into()), "short");
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            READY,
            false,
            Reason::Creating,
            "creating",
            Some(1),
            &at(10),
        );
        set_condition(
            &mut conditions,
            READY,
            false,
            Reason::ApiUnavailable,
            "down",
            Some(1),
            &at(20),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(10));
        assert_eq!(conditions[0].reason, "ApiUnavailable");
        assert_eq!(conditions[0].message, "down");

        set_condition(
            &mut conditions,
            READY,
            true,
            Reason::Available,
            "ok",
            Some(2),
            &at(30),
        );
        assert_eq!(conditions[0].last_transition_time, at(30));
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[0].observed_generation, Some(2));
    }

    #[test]
    fn conditions_are_keyed_by_type() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            READY,
            true,
            Reason::Available,
            "",
            Some(1),
            &at(1),
        );
        set_condition(
            &mut conditions,
            SYNCED,
            true,
            Reason::ReconcileSuccess,
            "",
            Some(1),
            &at(1),
        );
        set_condition(
            &mut conditions,
            SYNCED,
            false,
            Reason::ReconcileError,
            "x",
            Some(1),
            &at(2),
        );
        assert_eq!(conditions.len(), 2);
        assert!(is_true(&conditions, READY));
        assert!(!is_true(&conditions, SYNCED));
        assert!(!is_true(&conditions, "Missing"));
    }

    #[test]
    fn terminal_reasons_wait_for_a_change() {
        assert!(Reason::ApiRejected.is_terminal());
        assert!(Reason::SecretNotFound.is_terminal());
        assert!(!Reason::ApiUnavailable.is_terminal());
        assert!(!Reason::RateLimited.is_terminal());
    }
}
