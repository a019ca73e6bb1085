//! Report: the status a pass leads to, whether it differs from the status already written
//! (no patch when only time would change), and the Event a transition deserves. Pure; the
//! writes themselves are in `reconcile::mod`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::conditions::{self, READY, Reason, SYNCED};
use crate::api::{ConnectionOverrideSpec, ConnectionOverrideStatus, RemoteStatus};
use crate::dpc::RemoteOverride;

use super::act::Applied;

/// How a pass ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// DPC holds the desired override; `applied` says which write this pass made, if any.
    Ready {
        desired_hash: String,
        applied: Option<Applied>,
        remote: Option<RemoteStatus>,
    },
    /// The pass could not reach its goal.
    Failed { reason: Reason, message: String },
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: String,
    pub note: String,
    pub action: String,
}

/// The remote fields DPC reported, as status shows them.
pub fn remote_status(remote: &RemoteOverride) -> RemoteStatus {
    RemoteStatus {
        platform_connection_type: remote.platform_connection_type.clone(),
        auth_provider: remote.auth_provider.clone(),
        auth_type: remote.auth_type.clone(),
        created_by: remote.created_by.clone(),
        created_date: remote.created_date.clone(),
    }
}

fn ready_message(spec: &ConnectionOverrideSpec) -> String {
    format!(
        "DPC holds the desired override of connection {} in environment {}",
        spec.connection_name, spec.environment_name
    )
}

/// The status after a pass. Fields a failure does not speak about (what DPC last accepted)
/// are kept.
pub fn next_status(
    old: &ConnectionOverrideStatus,
    spec: &ConnectionOverrideSpec,
    generation: Option<i64>,
    outcome: &Outcome,
    now: &Time,
) -> ConnectionOverrideStatus {
    let mut status = old.clone();
    status.observed_generation = generation;
    match outcome {
        Outcome::Ready {
            desired_hash,
            applied,
            remote,
        } => {
            status.applied_hash = Some(desired_hash.clone());
            if applied.is_some() {
                status.last_sync_time = Some(now.clone());
            }
            if remote.is_some() {
                status.remote = remote.clone();
            }
            conditions::set_condition(
                &mut status.conditions,
                READY,
                true,
                Reason::Available,
                ready_message(spec),
                generation,
                now,
            );
            conditions::set_condition(
                &mut status.conditions,
                SYNCED,
                true,
                Reason::ReconcileSuccess,
                "",
                generation,
                now,
            );
        }
        Outcome::Failed { reason, message } => {
            conditions::set_condition(
                &mut status.conditions,
                READY,
                false,
                *reason,
                message.clone(),
                generation,
                now,
            );
            conditions::set_condition(
                &mut status.conditions,
                SYNCED,
                false,
                Reason::ReconcileError,
                message.clone(),
                generation,
                now,
            );
        }
    }
    status
}

/// The Event for a pass, or none when nothing a user should see happened.
pub fn event_for(
    old: &ConnectionOverrideStatus,
    spec: &ConnectionOverrideSpec,
    outcome: &Outcome,
) -> Option<EventSpec> {
    let old_ready = conditions::find(&old.conditions, READY);
    match outcome {
        Outcome::Ready {
            applied: Some(applied),
            ..
        } => Some(EventSpec {
            warning: false,
            reason: applied.event_reason().into(),
            note: applied.describe(&spec.connection_name, &spec.environment_name),
            action: match applied {
                Applied::Created | Applied::Recreated => "Create".into(),
                Applied::Adopted | Applied::Updated => "Update".into(),
            },
        }),
        Outcome::Ready { applied: None, .. } => match old_ready {
            Some(c) if c.status == "True" => None,
            _ => Some(EventSpec {
                warning: false,
                reason: Reason::Available.as_str().into(),
                note: ready_message(spec),
                action: "Reconcile".into(),
            }),
        },
        Outcome::Failed { reason, message } => {
            let unchanged = old_ready.is_some_and(|c| {
                c.status == "False" && c.reason == reason.as_str() && c.message == *message
            });
            (!unchanged).then(|| EventSpec {
                warning: true,
                reason: reason.as_str().into(),
                note: message.clone(),
                action: "Reconcile".into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AccountRef, ConnectionOverridesSpec};
    use k8s_openapi::jiff::Timestamp;

    fn spec() -> ConnectionOverrideSpec {
        ConnectionOverrideSpec {
            account_ref: AccountRef { name: "a".into() },
            project_id: "3c90c3cc-0d44-4b50-8888-8dd25736052a".into(),
            environment_name: "PROD".into(),
            connection_name: "C".into(),
            auth_type: None,
            connection_overrides: ConnectionOverridesSpec::default(),
            deletion_policy: None,
        }
    }

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn ready(applied: Option<Applied>) -> Outcome {
        Outcome::Ready {
            desired_hash: "sha256:1".into(),
            applied,
            remote: None,
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
    }
}
