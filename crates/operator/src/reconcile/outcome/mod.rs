//! Outcome: how a pass ended, the status it leads to (no patch when only time would change),
//! the Event a transition deserves, and what a failed DPC call means for the object
//! ([`classify`]). Pure; the writes themselves are in `write`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::conditions::{self, DRIFTED, READY, Reason, SYNCED};
use crate::api::{
    ConnectionOverrideSpec, ConnectionOverrideStatus, ManagedOverride, PAUSED_ANNOTATION,
    RemoteStatus,
};

use crate::drift::Finding;

use super::act::Applied;

mod classify;
pub use classify::{Verdict, at_slot, classify};

/// How a pass ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// DPC holds the desired override.
    Ready {
        /// The hash DPC now holds (`None` when observing only: nothing was applied).
        desired_hash: Option<String>,
        /// The write this pass made, if any.
        applied: Option<Applied>,
        remote: Option<RemoteStatus>,
        /// The drift this pass's write corrected.
        corrected: Option<Finding>,
        /// managementPolicy ObserveOnly.
        observed: bool,
        /// The remote override this object manages, to record in status.
        managed: Option<Box<ManagedOverride>>,
    },
    /// DPC holds something else, and the object does not write it back (driftPolicy Report,
    /// or ObserveOnly).
    Drifted { finding: Finding, observed: bool },
    /// The pass could not reach its goal.
    Failed { reason: Reason, message: String },
    /// The write waits for the account's request rate.
    Waiting { reason: Reason, message: String },
    /// The object is paused.
    Paused,
}

impl Outcome {
    /// The pass could not reach its goal, for `reason`.
    pub fn failed(reason: Reason, message: impl Into<String>) -> Self {
        Outcome::Failed {
            reason,
            message: message.into(),
        }
    }
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: String,
    pub note: String,
    pub action: String,
}

fn ready_message(spec: &ConnectionOverrideSpec, observed: bool) -> String {
    let what = format!(
        "the desired override of connection {} in environment {}",
        spec.connection_name, spec.environment_name
    );
    if observed {
        format!("observed (managementPolicy ObserveOnly): DPC holds {what}")
    } else {
        format!("DPC holds {what}")
    }
}

fn paused_message() -> String {
    format!("reconciliation is paused ({PAUSED_ANNOTATION}: \"true\"); nothing is sent to DPC")
}

/// The status after a pass. Fields a pass does not speak about (what DPC last accepted) are
/// kept.
pub fn next_status(
    old: &ConnectionOverrideStatus,
    spec: &ConnectionOverrideSpec,
    generation: Option<i64>,
    outcome: &Outcome,
    now: &Time,
) -> ConnectionOverrideStatus {
    let mut next = Next {
        status: old.clone(),
        generation,
        now,
    };
    next.status.observed_generation = generation;
    match outcome {
        Outcome::Ready {
            desired_hash,
            applied,
            remote,
            observed,
            managed,
            ..
        } => {
            let status = &mut next.status;
            if managed.is_some() {
                status.managed_override = managed.as_deref().cloned();
            }
            if let Some(hash) = desired_hash {
                status.applied_hash = Some(hash.clone());
            }
            if applied.is_some() {
                status.last_sync_time = Some(now.clone());
            }
            if remote.is_some() {
                status.remote = remote.clone();
            }
            next.ready(spec, *observed);
        }
        Outcome::Drifted { finding, observed } => next.drifted(finding, *observed),
        Outcome::Failed { reason, message } => {
            next.set(READY, false, *reason, message.clone());
            next.set(SYNCED, false, Reason::ReconcileError, message.clone());
        }
        Outcome::Waiting { reason, message } => next.set(READY, false, *reason, message.clone()),
        Outcome::Paused => next.paused(),
    }
    next.status
}

/// A status being written for one generation at one instant.
struct Next<'a> {
    status: ConnectionOverrideStatus,
    generation: Option<i64>,
    now: &'a Time,
}

impl Next<'_> {
    fn set(&mut self, type_: &str, ok: bool, reason: Reason, message: String) {
        conditions::set_condition(
            &mut self.status.conditions,
            type_,
            ok,
            reason,
            message,
            self.generation,
            self.now,
        );
    }

    fn ready(&mut self, spec: &ConnectionOverrideSpec, observed: bool) {
        self.set(
            READY,
            true,
            Reason::Available,
            ready_message(spec, observed),
        );
        self.set(SYNCED, true, Reason::ReconcileSuccess, String::new());
        if conditions::find(&self.status.conditions, DRIFTED).is_some() {
            self.set(
                DRIFTED,
                false,
                Reason::InSync,
                "DPC matches the spec".into(),
            );
        }
    }

    fn drifted(&mut self, finding: &Finding, observed: bool) {
        let message = if observed {
            format!(
                "{} (managementPolicy ObserveOnly: not written)",
                finding.describe()
            )
        } else {
            format!("{} (driftPolicy Report: not corrected)", finding.describe())
        };
        self.set(READY, false, Reason::Drifted, message.clone());
        self.set(SYNCED, true, Reason::ReconcileSuccess, String::new());
        self.set(DRIFTED, true, Reason::Drifted, message);
    }

    fn paused(&mut self) {
        self.set(SYNCED, false, Reason::ReconcilePaused, paused_message());
        // Ready stays as it was only while it still describes this spec: a change made while
        // paused is not in DPC, and `kubectl wait --for=condition=Ready` must not say it is.
        let ready_generation =
            conditions::find(&self.status.conditions, READY).map(|c| c.observed_generation);
        match ready_generation {
            None => self.set(READY, false, Reason::Paused, paused_message()),
            Some(seen) if seen != self.generation => {
                let message = format!(
                    "the spec changed (generation {}) while reconciliation is paused: the change waits until the {PAUSED_ANNOTATION} annotation is removed",
                    self.generation.unwrap_or(0)
                );
                self.set(READY, false, Reason::Paused, message);
            }
            Some(_) => {}
        }
    }
}

/// The Event for a pass, or none when nothing a user should see happened.
pub fn event_for(
    old: &ConnectionOverrideStatus,
    spec: &ConnectionOverrideSpec,
    outcome: &Outcome,
) -> Option<EventSpec> {
    let old_ready = conditions::find(&old.conditions, READY);
    let event = |warning: bool, reason: &str, note: String, action: &str| EventSpec {
        warning,
        reason: reason.into(),
        note,
        action: action.into(),
    };
    match outcome {
        Outcome::Ready {
            applied: Some(applied),
            corrected,
            ..
        } => {
            let action = match applied {
                Applied::Created | Applied::Recreated => "Create",
                Applied::Adopted | Applied::Updated => "Update",
                Applied::Taken => "Adopt",
            };
            let note = applied.describe(&spec.connection_name, &spec.environment_name);
            Some(match corrected {
                Some(finding) => event(
                    false,
                    "DriftCorrected",
                    format!("{}; {note}", finding.describe()),
                    action,
                ),
                None => event(false, applied.event_reason(), note, action),
            })
        }
        Outcome::Ready {
            applied: None,
            observed,
            ..
        } => match old_ready {
            Some(c) if c.status == "True" => None,
            _ => Some(event(
                false,
                if *observed {
                    "Observed"
                } else {
                    Reason::Available.as_str()
                },
                ready_message(spec, *observed),
                "Reconcile",
            )),
        },
        Outcome::Drifted { finding, .. } => {
            let unchanged = old_ready.is_some_and(|c| {
                c.reason == Reason::Drifted.as_str() && c.message.starts_with(&finding.describe())
            });
            (!unchanged).then(|| {
                event(
                    true,
                    Reason::Drifted.as_str(),
                    finding.describe(),
                    "Observe",
                )
            })
        }
        Outcome::Failed { reason, message } => {
            let unchanged = old_ready.is_some_and(|c| {
                c.status == "False" && c.reason == reason.as_str() && c.message == *message
            });
            (!unchanged).then(|| event(true, reason.as_str(), message.clone(), "Reconcile"))
        }
        Outcome::Waiting { .. } => None,
        Outcome::Paused => {
            let was_paused = conditions::find(&old.conditions, SYNCED)
                .is_some_and(|c| c.reason == Reason::ReconcilePaused.as_str());
            (!was_paused).then(|| event(false, "Paused", paused_message(), "Reconcile"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use k8s_openapi::jiff::Timestamp;

    fn spec() -> ConnectionOverrideSpec {
        dpc_operator_api::fixtures::override_spec("a", "PROD", "C")
    }

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn ready(applied: Option<Applied>) -> Outcome {
        Outcome::Ready {
            desired_hash: Some("sha256:1".into()),
            applied,
            remote: None,
            corrected: None,
            observed: false,
            managed: None,
        }
    }

    #[test]
    fn a_pass_without_a_write_changes_nothing_but_time_and_is_skipped() {
        let first = next_status(
            &Default::default(),
            &spec(),
            Some(1),
            &ready(Some(Applied::Created)),
            &at(10),
        );
        let again = next_status(&first, &spec(), Some(1), &ready(None), &at(99));
        assert_eq!(
            first, again,
            "an unchanged pass must produce the same status"
        );
        assert_eq!(first.last_sync_time, Some(at(10)));
        assert_eq!(first.applied_hash.as_deref(), Some("sha256:1"));
        assert!(conditions::is_true(&first.conditions, READY));
        assert!(conditions::is_true(&first.conditions, SYNCED));
        assert!(
            conditions::find(&first.conditions, DRIFTED).is_none(),
            "no Drifted condition until drift is seen"
        );
    }

    #[test]
    fn a_failure_keeps_what_dpc_last_accepted() {
        let ok = next_status(
            &Default::default(),
            &spec(),
            Some(1),
            &ready(Some(Applied::Created)),
            &at(10),
        );
        let failed = Outcome::Failed {
            reason: Reason::ApiRejected,
            message: "DPC answered 400".into(),
        };
        let after = next_status(&ok, &spec(), Some(2), &failed, &at(20));
        assert_eq!(after.applied_hash, ok.applied_hash);
        assert_eq!(after.last_sync_time, ok.last_sync_time);
        assert_eq!(after.observed_generation, Some(2));
        let ready = conditions::find(&after.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ApiRejected")
        );
        assert_eq!(ready.last_transition_time, at(20));
        assert_eq!(ready.observed_generation, Some(2));
        let synced = conditions::find(&after.conditions, SYNCED).unwrap();
        assert_eq!(
            (synced.reason.as_str(), synced.message.as_str()),
            ("ReconcileError", "DPC answered 400")
        );
    }

    #[test]
    fn drift_sets_the_drifted_condition_and_clears_it_when_in_sync() {
        let ok = next_status(
            &Default::default(),
            &spec(),
            Some(1),
            &ready(Some(Applied::Created)),
            &at(1),
        );
        let drift = Outcome::Drifted {
            finding: Finding::Differs(vec![
                "connectionOverrides.connectionProperties.secretName".into(),
            ]),
            observed: false,
        };
        let drifted = next_status(&ok, &spec(), Some(1), &drift, &at(2));
        let d = conditions::find(&drifted.conditions, DRIFTED).unwrap();
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("True", "Drifted"));
        assert!(
            d.message
                .contains("connectionOverrides.connectionProperties.secretName")
        );
        assert_eq!(
            conditions::find(&drifted.conditions, READY).unwrap().reason,
            "Drifted"
        );
        assert_eq!(event_for(&ok, &spec(), &drift).unwrap().reason, "Drifted");
        assert_eq!(
            event_for(&drifted, &spec(), &drift),
            None,
            "no second Event for the same drift"
        );

        let back = next_status(&drifted, &spec(), Some(1), &ready(None), &at(3));
        let d = conditions::find(&back.conditions, DRIFTED).unwrap();
        assert_eq!((d.status.as_str(), d.reason.as_str()), ("False", "InSync"));
        assert!(conditions::is_true(&back.conditions, READY));
    }

    #[test]
    fn pause_marks_synced_and_keeps_ready() {
        let ok = next_status(
            &Default::default(),
            &spec(),
            Some(1),
            &ready(Some(Applied::Created)),
            &at(1),
        );
        let paused = next_status(&ok, &spec(), Some(1), &Outcome::Paused, &at(2));
        assert!(conditions::is_true(&paused.conditions, READY));
        assert_eq!(
            conditions::find(&paused.conditions, SYNCED).unwrap().reason,
            "ReconcilePaused"
        );
        assert_eq!(
            event_for(&ok, &spec(), &Outcome::Paused).unwrap().reason,
            "Paused"
        );
        assert_eq!(event_for(&paused, &spec(), &Outcome::Paused), None);
        let fresh = next_status(
            &Default::default(),
            &spec(),
            Some(1),
            &Outcome::Paused,
            &at(2),
        );
        assert_eq!(
            conditions::find(&fresh.conditions, READY).unwrap().reason,
            "Paused"
        );
    }

    #[test]
    fn events_only_on_transitions() {
        let empty = ConnectionOverrideStatus::default();
        let created = event_for(&empty, &spec(), &ready(Some(Applied::Created))).unwrap();
        assert_eq!(
            (created.reason.as_str(), created.warning),
            ("Created", false)
        );

        let ok = next_status(
            &empty,
            &spec(),
            Some(1),
            &ready(Some(Applied::Created)),
            &at(1),
        );
        assert_eq!(event_for(&ok, &spec(), &ready(None)), None);

        let failed = Outcome::Failed {
            reason: Reason::ApiUnavailable,
            message: "503".into(),
        };
        let warning = event_for(&ok, &spec(), &failed).unwrap();
        assert_eq!(
            (warning.reason.as_str(), warning.warning),
            ("ApiUnavailable", true)
        );
        let still_failing = next_status(&ok, &spec(), Some(1), &failed, &at(2));
        assert_eq!(event_for(&still_failing, &spec(), &failed), None);

        let recovered = event_for(&still_failing, &spec(), &ready(None)).unwrap();
        assert_eq!(recovered.reason, "Available");

        let corrected = Outcome::Ready {
            desired_hash: Some("sha256:1".into()),
            applied: Some(Applied::Updated),
            remote: None,
            corrected: Some(Finding::Missing),
            observed: false,
            managed: None,
        };
        assert_eq!(
            event_for(&ok, &spec(), &corrected).unwrap().reason,
            "DriftCorrected"
        );
    }
}
