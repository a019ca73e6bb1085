//! The DPC client's error, and its classification into what the reconciler does next.

use std::time::Duration;

use super::types::Problem;

/// Which call failed; used in messages and as a bounded metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    Token,
    Create,
    Update,
    List,
    Delete,
    /// Listing the environments of a project (`dpc-operator import`).
    Environments,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Token => "token",
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::List => "list",
            Operation::Delete => "delete",
            Operation::Environments => "list environments",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a transport failure happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Connect,
    Timeout,
    Reset,
    Other,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Connect => "connection failed",
            TransportKind::Timeout => "timed out",
            TransportKind::Reset => "connection reset",
            TransportKind::Other => "transport error",
        })
    }
}

/// What the reconciler does with a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// 400, 422 and other 4xx: the request is wrong; wait for a change.
    Rejected,
    /// 401 that survived a fresh token, 403, or the token endpoint refusing the credentials.
    CredentialsRejected,
    /// 404 on create or list: the project, environment or parent connection is missing.
    NotFound,
    /// 409 on create: the override exists.
    Conflict,
    /// 429, or a call held back because the account is waiting out a `Retry-After`.
    RateLimited,
    /// Not a failure but flow control: the call was not sent, and the account's own request
    /// rate holds a slot for it (`retry_after` says when).
    Deferred,
    /// 5xx, 408, timeouts, resets, unreadable answers: retry with backoff.
    Transient,
    /// The account's configuration is unusable (for example a plain-http URL).
    Misconfigured,
}

/// A failed DPC call. Texts never carry secrets: request bodies are not included, and the
/// client secret and tokens are never formatted.
#[derive(Debug, thiserror::Error)]
pub enum DpcError {
    /// DPC answered with a non-success status.
    #[error("DPC answered {status} to {operation}{}", summary_suffix(.problem, .body_excerpt))]
    Api {
        operation: Operation,
        status: u16,
        problem: Option<Box<Problem>>,
        body_excerpt: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The call did not get an answer.
    #[error("{operation} call to DPC failed: {kind}")]
    Transport {
        operation: Operation,
        kind: TransportKind,
        #[source]
        source: reqwest::Error,
    },
    /// The answer could not be read.
    #[error("could not read DPC's answer to {operation}: {reason}")]
    Decode {
        operation: Operation,
        reason: String,
    },
    /// The call was not made: the account is waiting out a 429's `Retry-After` (`queued`
    /// false), or the account's own request rate has no slot before `remaining` (`queued`
    /// true; the slot is kept for this object).
    #[error("{}", throttled_text(*.operation, *.remaining, *.queued))]
    Throttled {
        operation: Operation,
        remaining: Duration,
        queued: bool,
    },
    /// The account's endpoint configuration is refused.
    #[error("{0}")]
    Misconfigured(String),
    /// The call was not made: this replica is no longer the leader.
    #[error("{0} call not made: this replica lost the leader lease")]
    Fenced(Operation),
    /// DPC accepted a DELETE but still lists the override.
    #[error(
        "DPC accepted the DELETE but still lists the override of connection {0:?}; it is deleted again later"
    )]
    StillPresent(String),
}

fn throttled_text(operation: Operation, remaining: Duration, queued: bool) -> String {
    let secs = remaining.as_secs_f64().ceil();
    if queued {
        format!("{operation} waits for the account's request rate: its turn comes in {secs} s")
    } else {
        format!("{operation} held back: DPC asked this account to wait {secs} s more")
    }
}

fn summary_suffix(problem: &Option<Box<Problem>>, excerpt: &Option<String>) -> String {
    match (problem, excerpt) {
        (Some(p), _) if !p.summary().is_empty() => format!(": {}", p.summary()),
        (_, Some(e)) if !e.is_empty() => format!(": {e}"),
        _ => String::new(),
    }
}

impl DpcError {
    /// The status code, for API answers.
    pub fn status(&self) -> Option<u16> {
        match self {
            DpcError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The operation that failed.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            DpcError::Api { operation, .. }
            | DpcError::Transport { operation, .. }
            | DpcError::Decode { operation, .. }
            | DpcError::Throttled { operation, .. } => Some(*operation),
            DpcError::StillPresent(_) => Some(Operation::Delete),
            DpcError::Fenced(operation) => Some(*operation),
            DpcError::Misconfigured(_) => None,
        }
    }

    /// How long DPC asked us to wait, for 429 answers and held-back calls.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DpcError::Api { retry_after, .. } => *retry_after,
            DpcError::Throttled { remaining, .. } => Some(*remaining),
            _ => None,
        }
    }

    /// The classification that steers the reconciler.
    pub fn class(&self) -> ErrorClass {
        match self {
            DpcError::Api {
                operation, status, ..
            } => classify_status(*operation, *status),
            DpcError::Transport { .. }
            | DpcError::Decode { .. }
            | DpcError::StillPresent(_)
            | DpcError::Fenced(_) => ErrorClass::Transient,
            DpcError::Throttled { queued: true, .. } => ErrorClass::Deferred,
            DpcError::Throttled { .. } => ErrorClass::RateLimited,
            DpcError::Misconfigured(_) => ErrorClass::Misconfigured,
        }
    }

    /// Whether the write this error ended may still have changed DPC: it was sent and no
    /// answer refused it (a 5xx, a timeout or reset after sending, an answer that could not
    /// be read). A refusal (4xx), a call never sent (no slot, no token, no connection, no
    /// lease) or a failed token request changed nothing.
    pub fn may_have_applied(&self) -> bool {
        match self {
            DpcError::Api {
                operation, status, ..
            } => *operation != Operation::Token && *status >= 500,
            DpcError::Transport {
                operation, kind, ..
            } => *operation != Operation::Token && *kind != TransportKind::Connect,
            DpcError::Decode { operation, .. } => *operation != Operation::Token,
            DpcError::StillPresent(_) => true,
            DpcError::Throttled { .. } | DpcError::Misconfigured(_) | DpcError::Fenced(_) => false,
        }
    }

    /// Whether retrying on a timer can help.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.class(),
            ErrorClass::Transient | ErrorClass::RateLimited | ErrorClass::Deferred
        )
    }

    /// A bounded label for metrics: never error text.
    pub fn category(&self) -> &'static str {
        match self.class() {
            ErrorClass::Rejected => "rejected",
            ErrorClass::CredentialsRejected => "credentials",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Conflict => "conflict",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::Deferred => "queued",
            ErrorClass::Transient => "unavailable",
            ErrorClass::Misconfigured => "misconfigured",
        }
    }
}

/// The classification of one HTTP status code for one operation.
pub fn classify_status(operation: Operation, status: u16) -> ErrorClass {
    match (operation, status) {
        (Operation::Token, 400 | 401 | 403) => ErrorClass::CredentialsRejected,
        (_, 401 | 403) => ErrorClass::CredentialsRejected,
        (_, 404) => ErrorClass::NotFound,
        (_, 408) => ErrorClass::Transient,
        (_, 409) => ErrorClass::Conflict,
        (_, 429) => ErrorClass::RateLimited,
        (_, 400..=499) => ErrorClass::Rejected,
        (_, 500..=599) => ErrorClass::Transient,
        // A redirect is never followed (it would carry credentials and values along): the
        // account names an address that is not where DPC answers.
        (_, 300..=399) => ErrorClass::Misconfigured,
        // 1xx are unexpected here: something between us and DPC is misbehaving.
        _ => ErrorClass::Transient,
    }
}

/// Reads a transport error's kind from reqwest and the io error under it.
pub fn transport_kind(error: &reqwest::Error) -> TransportKind {
    if error.is_timeout() {
        return TransportKind::Timeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            match io.kind() {
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => {
                    return TransportKind::Reset;
                }
                TimedOut => return TransportKind::Timeout,
                ConnectionRefused => return TransportKind::Connect,
                _ => {}
            }
        }
        let text = e.to_string();
        if text.contains("connection closed before message completed")
            || text.contains("connection reset")
        {
            return TransportKind::Reset;
        }
        source = e.source();
    }
    if error.is_connect() {
        TransportKind::Connect
    } else {
        TransportKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_code_has_a_class() {
        use ErrorClass::*;
        use Operation::*;
        let table: &[(Operation, u16, ErrorClass)] = &[
            (Create, 400, Rejected),
            (Update, 422, Rejected),
            (Create, 401, CredentialsRejected),
            (Update, 403, CredentialsRejected),
            (Create, 404, NotFound),
            (List, 404, NotFound),
            (Create, 405, Rejected),
            (Update, 408, Transient),
            (Create, 409, Conflict),
            (Create, 410, Rejected),
            (Create, 413, Rejected),
            (Create, 429, RateLimited),
            (Delete, 429, RateLimited),
            (Create, 500, Transient),
            (Update, 502, Transient),
            (List, 503, Transient),
            (Delete, 504, Transient),
            (Token, 400, CredentialsRejected),
            (Token, 401, CredentialsRejected),
            (Token, 403, CredentialsRejected),
            (Token, 429, RateLimited),
            (Token, 500, Transient),
            (Create, 302, Misconfigured),
            (Token, 307, Misconfigured),
        ];
        for (op, status, class) in table {
            assert_eq!(classify_status(*op, *status), *class, "{op} {status}");
        }
    }

    #[test]
    fn api_error_message_carries_problem_details() {
        let e = DpcError::Api {
            operation: Operation::Create,
            status: 400,
            problem: Some(Box::new(Problem {
                title: Some("Bad Request".into()),
                detail: Some("nope".into()),
                violations: vec!["a must be set".into()],
                ..Problem::default()
            })),
            body_excerpt: None,
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            "DPC answered 400 to create: Bad Request: nope (violations: a must be set)"
        );
        assert_eq!(e.category(), "rejected");
        assert!(!e.is_transient());
    }

    #[test]
    fn throttled_calls_are_rate_limited_and_transient() {
        let e = DpcError::Throttled {
            operation: Operation::Update,
            remaining: Duration::from_millis(1500),
            queued: false,
        };
        assert_eq!(e.class(), ErrorClass::RateLimited);
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(
            e.to_string(),
            "update held back: DPC asked this account to wait 2 s more"
        );
    }

    #[test]
    fn only_a_write_sent_without_a_refusal_may_have_changed_dpc() {
        let api = |operation, status| DpcError::Api {
            operation,
            status,
            problem: None,
            body_excerpt: None,
            retry_after: None,
        };
        for status in [400, 404, 408, 409, 422, 429, 302] {
            assert!(
                !api(Operation::Create, status).may_have_applied(),
                "{status}"
            );
        }
        assert!(api(Operation::Create, 500).may_have_applied());
        assert!(api(Operation::Delete, 503).may_have_applied());
        assert!(!api(Operation::Token, 503).may_have_applied());
        let decode = DpcError::Decode {
            operation: Operation::Update,
            reason: "too large".into(),
        };
        assert!(decode.may_have_applied());
        let throttled = DpcError::Throttled {
            operation: Operation::Create,
            remaining: std::time::Duration::from_secs(1),
            queued: true,
        };
        assert!(!throttled.may_have_applied());
        assert!(!DpcError::Fenced(Operation::Create).may_have_applied());
    }
}
