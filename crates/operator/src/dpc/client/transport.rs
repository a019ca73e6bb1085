//! Sending one request of an account: the fence (a replica that lost its lease sends
//! nothing), the `Retry-After` gate, the account's request rate, the token, limits on what
//! is read back, and error answers turned into [`DpcError`]s without any secret in them.

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use tokio::time::Instant;
use tracing::Instrument;
use url::Url;

use super::super::error::{DpcError, Operation, transport_kind};
use super::super::limiter::Admission;
use super::super::secret::{SecretString, redact, redact_shown};
use super::super::types::{OverrideRequest, Problem};
use super::endpoint::ensure_scheme;
use super::token::MAX_TOKEN_BODY;
use super::{AccountHandle, Answer};

/// The longest `Retry-After` honoured: a larger one holds the account for an hour.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The largest API answer read (a list page of 100 overrides is a few tens of KiB).
pub const MAX_API_BODY: usize = 8 * 1024 * 1024;

impl AccountHandle {
    pub(super) fn check_fence(&self, operation: Operation) -> Result<(), DpcError> {
        if self.client.inner.fenced.load(Ordering::SeqCst) {
            return Err(DpcError::Fenced(operation));
        }
        Ok(())
    }

    pub(super) fn check_gate(&self, operation: Operation) -> Result<(), DpcError> {
        let blocked = self.state.limits.blocked_until.lock().expect("gate lock");
        match *blocked {
            Some(until) if Instant::now() < until => Err(DpcError::Throttled {
                operation,
                remaining: until - Instant::now(),
                queued: false,
            }),
            _ => Ok(()),
        }
    }

    /// Waits for this request's rate-limit slot, or says when to come back for it.
    pub(super) async fn admit(&self, operation: Operation) -> Result<(), DpcError> {
        let now = Instant::now();
        let max_wait = self.client.settings().max_admission_wait;
        let admission = self
            .state
            .limits
            .limiter
            .lock()
            .expect("limiter lock")
            .reserve(&self.requester, now, max_wait);
        match admission {
            Admission::SendAt(at) => {
                if at > now {
                    tokio::time::sleep_until(at).await;
                    if let Some(observer) = &self.client.inner.observer {
                        observer.waited(at - now);
                    }
                }
                Ok(())
            }
            Admission::ComeBackAt(at) => Err(DpcError::Throttled {
                operation,
                remaining: at - now,
                queued: true,
            }),
        }
    }

    pub(super) fn hold_account(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut blocked = self.state.limits.blocked_until.lock().expect("gate lock");
        if blocked.is_none_or(|current| current < until) {
            *blocked = Some(until);
        }
        self.state
            .limits
            .limiter
            .lock()
            .expect("limiter lock")
            .hold_until(until);
    }

    /// When the account may call again, if it is held by a 429.
    pub fn blocked_for(&self) -> Option<Duration> {
        let blocked = self.state.limits.blocked_until.lock().expect("gate lock");
        blocked.and_then(|until| until.checked_duration_since(Instant::now()))
    }

    pub(super) async fn send(
        &self,
        operation: Operation,
        method: Method,
        url: Url,
        body: Option<&OverrideRequest>,
    ) -> Result<Answer, DpcError> {
        ensure_scheme(&url, self.client.settings().allow_insecure_http)?;
        let (token_id, token) = self.token().await?;
        let answer = self
            .send_with(operation, &method, &url, body, &token)
            .await?;
        let (answer, token) = if answer.status == StatusCode::UNAUTHORIZED {
            // The token may have been revoked or expired early: one new token, one more try.
            self.invalidate_token(token_id).await;
            let (_, token) = self.token().await?;
            let answer = self
                .send_with(operation, &method, &url, body, &token)
                .await?;
            (answer, token)
        } else {
            (answer, token)
        };
        if answer.status.is_success() {
            Ok(answer)
        } else {
            Err(self.api_error(operation, answer, Some(&token)))
        }
    }

    pub(super) async fn send_with(
        &self,
        operation: Operation,
        method: &Method,
        url: &Url,
        body: Option<&OverrideRequest>,
        token: &SecretString,
    ) -> Result<Answer, DpcError> {
        let mut request = self
            .client
            .inner
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(token.expose())
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/problem+json",
            );
        if let Some(account_id) = &self.state.endpoint.account_id {
            request = request.header("account-id", account_id);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.canonical_json());
        }
        self.execute(operation, request).await
    }

    /// Every HTTP request goes through here: the `Retry-After` gate, the rate limit, the
    /// call, its observation, and a new gate on 429.
    pub(super) async fn execute(
        &self,
        operation: Operation,
        request: reqwest::RequestBuilder,
    ) -> Result<Answer, DpcError> {
        self.check_fence(operation)?;
        self.check_gate(operation)?;
        // A request made ready by `admitted` has its slot; a token request never takes it.
        let ready = operation != Operation::Token && self.admitted.swap(false, Ordering::SeqCst);
        if !ready {
            self.admit(operation).await?;
        }
        self.check_gate(operation)?;
        // The admission may have waited: look again right before sending.
        self.check_fence(operation)?;
        let span = tracing::info_span!("dpc_request", operation = operation.as_str(), account = %self.state.key, outcome = tracing::field::Empty);
        let started = std::time::Instant::now();
        let limit = match operation {
            Operation::Token => MAX_TOKEN_BODY,
            _ => MAX_API_BODY,
        };
        let result = async {
            let response = request.send().await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = read_limited(response, limit).await?;
            Ok::<_, reqwest::Error>((status, retry_after, body))
        }
        .instrument(span.clone())
        .await;
        let outcome = match &result {
            Ok((status, _, _)) if status.is_success() => "success",
            Ok((status, _, _)) => status_outcome(status.as_u16()),
            Err(e) => match transport_kind(e) {
                super::super::error::TransportKind::Timeout => "timeout",
                super::super::error::TransportKind::Reset => "reset",
                super::super::error::TransportKind::Connect => "connect_error",
                super::super::error::TransportKind::Other => "transport_error",
            },
        };
        span.record("outcome", outcome);
        if let Some(observer) = &self.client.inner.observer {
            observer.observe(operation, outcome, started.elapsed());
        }
        let (status, retry_after, body) = result.map_err(|source| DpcError::Transport {
            operation,
            kind: transport_kind(&source),
            source: source.without_url(),
        })?;
        let Some(body) = body else {
            return Err(DpcError::Decode {
                operation,
                reason: format!(
                    "the answer ({status}) is larger than {limit} bytes; it was not read"
                ),
            });
        };
        let answer = Answer {
            status,
            retry_after,
            body,
        };
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            let wait = answer
                .retry_after
                .unwrap_or(self.client.settings().default_retry_after);
            self.hold_account(wait);
        }
        Ok(answer)
    }

    /// The error of a non-success answer. Whatever DPC wrote back is cleaned of the
    /// credentials, the token and the values read from Secrets first (in every encoding
    /// they could be echoed in), before anything is parsed or cut short.
    pub(super) fn api_error(
        &self,
        operation: Operation,
        answer: Answer,
        token: Option<&SecretString>,
    ) -> DpcError {
        let credentials = &self.state.credentials;
        let secrets: Vec<&SecretString> = [&credentials.client_id, &credentials.client_secret]
            .into_iter()
            .chain(token)
            .chain(self.secrets.iter())
            .collect();
        let clean = redact(
            &String::from_utf8_lossy(&answer.body),
            secrets.iter().copied(),
        );
        // What is shown is decoded text: each of its strings is cleaned again once decoded.
        let shown = |text: &str| redact_shown(text, secrets.iter().copied());
        let problem = Problem::parse(clean.as_bytes()).map(|mut problem| {
            problem.map_texts(shown);
            Box::new(problem)
        });
        let body_excerpt = match problem {
            Some(_) => None,
            None if answer.status.is_redirection() => Some(
                "a redirect, which is never followed (it would carry the credentials and values along); set apiUrl or tokenUrl to the address that answers".into(),
            ),
            None => excerpt(shown(&clean).as_bytes()),
        };
        let retry_after = match answer.status {
            StatusCode::TOO_MANY_REQUESTS => Some(
                answer
                    .retry_after
                    .unwrap_or(self.client.settings().default_retry_after),
            ),
            _ => answer.retry_after,
        };
        DpcError::Api {
            operation,
            status: answer.status.as_u16(),
            problem,
            body_excerpt,
            retry_after,
        }
    }
}

/// A bounded outcome label for an HTTP status.
pub(super) fn status_outcome(status: u16) -> &'static str {
    match status {
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        422 => "422",
        429 => "429",
        402 | 405..=408 | 410..=421 | 423..=428 | 430..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// The start of a non-problem error body, for the condition message (HTML error pages are
/// reduced to a note, not pasted).
pub(super) fn excerpt(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if text.starts_with('<') {
        return Some("(an HTML page)".into());
    }
    let mut short: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        short.push('…');
    }
    Some(short.replace(['\n', '\r'], " "))
}

/// Reads an answer's body, at most `limit` bytes: `None` when it is longer (a declared
/// `Content-Length` over the limit is refused before reading anything).
pub(super) async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<bytes::Bytes>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Ok(None);
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// `Retry-After` as delay-seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs >= 0.0 && secs.is_finite())
            .then(|| Duration::from_secs_f64(secs.min(MAX_RETRY_AFTER.as_secs_f64())));
    }
    let when = k8s_openapi::jiff::fmt::rfc2822::parse(value)
        .ok()?
        .timestamp();
    let now = k8s_openapi::jiff::Timestamp::now();
    let wait = when.duration_since(now);
    Some(
        Duration::try_from(wait)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_retry_after_is_capped_at_an_hour() {
        assert_eq!(parse_retry_after("1e300"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("99999999999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("inf"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(
            parse_retry_after("Tue, 31 Dec 2999 23:59:59 GMT"),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 1.5 "),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        let later =
            k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(60);
        let text = k8s_openapi::jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&later)
            .unwrap();
        let wait = parse_retry_after(&text).unwrap();
        assert!(
            wait > Duration::from_secs(50) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn error_excerpts_are_short_and_skip_html() {
        assert_eq!(
            excerpt(b"<html><body>502</body></html>").unwrap(),
            "(an HTML page)"
        );
        assert_eq!(excerpt(b"  ").as_deref(), None);
        let long = "x".repeat(500);
        assert_eq!(excerpt(long.as_bytes()).unwrap().chars().count(), 201);
    }
}
