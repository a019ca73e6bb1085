//! Decide and act: which write (if any) brings DPC to the desired state, and the write
//! itself. Idempotent by construction: "already exists" on create means adopt (PUT), "not
//! found" on update means create again (POST), so a crash between a write and the status
//! write is harmless on the next pass.

use crate::dpc::{AccountHandle, DpcError, ErrorClass, Operation, RemoteOverride};

use super::Error;
use super::build::Desired;

/// What must be recorded in the cluster before a write goes out (the cleanup finalizer, and
/// before a `POST` the proof that it may create the override): see `ownership`.
pub trait BeforeWrite {
    /// Whether a write of `operation` needs anything recorded first.
    fn needs(&self, operation: Operation) -> bool;
    /// Records it; the write is sent only once this succeeded.
    async fn before(&mut self, operation: Operation) -> Result<(), Error>;
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing was ever accepted for this object: POST (PUT on 409).
    Create,
    /// The desired body differs from the one last accepted: PUT (POST on 404).
    Update,
    /// Nothing was ever accepted for this object, but DPC holds an override that differs:
    /// PUT (POST on 404), without the POST that would only answer 409.
    Adopt,
    /// DPC already holds this body.
    Nothing,
}

/// The plan for a desired hash, given the hash DPC last accepted.
pub fn plan(applied_hash: Option<&str>, desired_hash: &str) -> Plan {
    match applied_hash {
        None => Plan::Create,
        Some(applied) if applied == desired_hash => Plan::Nothing,
        Some(_) => Plan::Update,
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// POST created it.
    Created,
    /// POST answered 409 and PUT took over the existing override.
    Adopted,
    /// PUT updated it.
    Updated,
    /// PUT answered 404 (deleted behind our back) and POST created it again.
    Recreated,
    /// DPC already held exactly the desired override: the object took it over without a
    /// write (an imported or hand-written object for an override made in the DPC UI).
    Taken,
}

impl Applied {
    /// The Event reason.
    pub fn event_reason(self) -> &'static str {
        match self {
            Applied::Created => "Created",
            Applied::Adopted | Applied::Taken => "Adopted",
            Applied::Updated => "Updated",
            Applied::Recreated => "Recreated",
        }
    }

    /// A sentence for the condition message and the Event.
    pub fn describe(self, connection: &str, environment: &str) -> String {
        match self {
            Applied::Created => format!(
                "created the override of connection {connection} in environment {environment}"
            ),
            Applied::Adopted => format!(
                "adopted the existing override of connection {connection} in environment {environment} and updated it"
            ),
            Applied::Updated => format!(
                "updated the override of connection {connection} in environment {environment}"
            ),
            Applied::Recreated => format!(
                "recreated the override of connection {connection} in environment {environment}, which had been deleted in DPC"
            ),
            Applied::Taken => format!(
                "adopted the existing override of connection {connection} in environment {environment}, which already holds the desired state: nothing written"
            ),
        }
    }
}

/// A write that failed, with the operation that failed.
#[derive(Debug)]
pub struct ActError {
    pub error: DpcError,
    /// The call that failed last.
    pub during: Operation,
    /// Whether a `POST` of this attempt may have created the override all the same (sent,
    /// and not refused: a timeout, a reset, a 5xx).
    pub maybe_created: bool,
}

/// Why a write plan did not complete.
#[derive(Debug)]
pub enum Failure {
    /// DPC (or the way to it) failed.
    Dpc(ActError),
    /// What had to be recorded in the cluster before the write could not be: nothing was
    /// sent.
    Kube(Error),
}

/// The handle to send a write of `operation` with: when `marks` must record something
/// first, once the write's slot and token are at hand and the record is written.
async fn ready(
    dpc: &AccountHandle,
    operation: Operation,
    marks: &mut impl BeforeWrite,
    maybe_created: bool,
) -> Result<AccountHandle, Failure> {
    if !marks.needs(operation) {
        return Ok(dpc.clone());
    }
    let sender = dpc.admitted(operation).await.map_err(|error| {
        Failure::Dpc(ActError {
            error,
            during: operation,
            maybe_created,
        })
    })?;
    marks.before(operation).await.map_err(Failure::Kube)?;
    Ok(sender)
}

/// Performs a write plan. Create and update fall back to each other at most twice, so an
/// override that is created and deleted behind our back in a loop cannot spin us. Before
/// each write, `marks` records what the cluster must know first — once the write's
/// rate-limit slot and token are at hand, so nothing is recorded for a write that waits.
pub async fn act(
    dpc: &AccountHandle,
    project_id: &str,
    desired: &Desired,
    plan: Plan,
    marks: &mut impl BeforeWrite,
) -> Result<Option<(Applied, Option<RemoteOverride>)>, Failure> {
    let mut next = match plan {
        Plan::Nothing => return Ok(None),
        Plan::Create => Operation::Create,
        Plan::Update | Plan::Adopt => Operation::Update,
    };
    let mut fell_back = false;
    let mut maybe_created = false;
    let failed = |error, during, maybe_created| {
        Failure::Dpc(ActError {
            error,
            during,
            maybe_created,
        })
    };
    for _ in 0..3 {
        let sender = ready(dpc, next, marks, maybe_created).await?;
        let result = match next {
            Operation::Create => sender.create(project_id, &desired.request).await,
            _ => sender.update(project_id, &desired.request).await,
        };
        if let (Operation::Create, Err(e)) = (next, &result) {
            maybe_created |= e.may_have_applied();
        }
        match (next, result) {
            (Operation::Create, Ok(answer)) => {
                let applied = if plan == Plan::Update {
                    Applied::Recreated
                } else {
                    Applied::Created
                };
                return Ok(Some((applied, answer.remote)));
            }
            (_, Ok(answer)) => {
                let applied = if matches!(plan, Plan::Create | Plan::Adopt) {
                    Applied::Adopted
                } else {
                    Applied::Updated
                };
                return Ok(Some((applied, answer.remote)));
            }
            (Operation::Create, Err(e)) if e.class() == ErrorClass::Conflict => {
                next = Operation::Update;
                fell_back = true;
            }
            (Operation::Update, Err(e)) if e.class() == ErrorClass::NotFound => {
                if fell_back && plan == Plan::Create {
                    // POST said it exists, PUT says it does not: it is changing under us.
                    // Retry as a transient failure rather than report a missing parent.
                    let error = DpcError::Decode {
                        operation: Operation::Update,
                        reason: "DPC answered 409 to create and then 404 to update; retrying"
                            .into(),
                    };
                    return Err(failed(error, Operation::Update, maybe_created));
                }
                next = Operation::Create;
                fell_back = true;
            }
            (during, Err(error)) => return Err(failed(error, during, maybe_created)),
        }
    }
    let error = DpcError::Decode {
        operation: next,
        reason: "the override kept appearing and disappearing between create and update; retrying"
            .into(),
    };
    Err(failed(error, next, maybe_created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_the_applied_hash() {
        assert_eq!(plan(None, "sha256:a"), Plan::Create);
        assert_eq!(plan(Some("sha256:a"), "sha256:a"), Plan::Nothing);
        assert_eq!(plan(Some("sha256:a"), "sha256:b"), Plan::Update);
    }

    #[test]
    fn every_write_has_an_event_reason_and_a_sentence() {
        for applied in [
            Applied::Created,
            Applied::Adopted,
            Applied::Updated,
            Applied::Recreated,
        ] {
            assert!(!applied.event_reason().is_empty());
            let sentence = applied.describe("Salesforce", "PROD");
            assert!(
                sentence.contains("Salesforce") && sentence.contains("PROD"),
                "{sentence}"
            );
        }
    }
}
