//! The token cache of an account: one token at a time, fetched with the client-credentials
//! grant, refreshed before it expires, dropped when DPC answers 401.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use super::super::error::{DpcError, Operation};
use super::super::secret::SecretString;
use super::endpoint::ensure_scheme;
use super::{AccountHandle, CachedToken};

/// Token lifetime assumed when the token answer has no `expires_in` (the documented 30 min).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(1800);

/// The longest token lifetime believed: a larger `expires_in` (even `1e300`) means a day.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The largest token answer read; a longer one is refused unread.
pub const MAX_TOKEN_BODY: usize = 64 * 1024;

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

impl AccountHandle {
    /// Makes sure a valid token is cached (fetching one if needed).
    pub async fn ensure_token(&self) -> Result<(), DpcError> {
        self.token().await.map(|_| ())
    }

    pub(super) async fn token(&self) -> Result<(u64, SecretString), DpcError> {
        let mut cached = self.state.token.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.refresh_at
        {
            return Ok((token.id, token.value.clone()));
        }
        let fresh = self.fetch_token().await?;
        let result = (fresh.id, fresh.value.clone());
        *cached = Some(fresh);
        Ok(result)
    }

    pub(super) async fn invalidate_token(&self, id: u64) {
        let mut cached = self.state.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.id == id) {
            *cached = None;
        }
    }

    pub(super) async fn fetch_token(&self) -> Result<CachedToken, DpcError> {
        let endpoint = &self.state.endpoint;
        ensure_scheme(
            &endpoint.token_url,
            self.client.settings().allow_insecure_http,
        )?;
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.state.credentials.client_id.expose()),
            (
                "client_secret",
                self.state.credentials.client_secret.expose(),
            ),
            ("audience", endpoint.audience.as_str()),
        ];
        let request = self
            .client
            .inner
            .http
            .post(endpoint.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        let answer = self.execute(Operation::Token, request).await?;
        if !answer.status.is_success() {
            return Err(self.api_error(Operation::Token, answer, None));
        }
        let parsed: TokenAnswer =
            serde_json::from_slice(&answer.body).map_err(|_| DpcError::Decode {
                operation: Operation::Token,
                reason: "the token answer has no access_token".into(),
            })?;
        let lifetime = parsed
            .expires_in
            .as_ref()
            .and_then(|v| {
                v.as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .filter(|secs| secs.is_finite() && *secs > 0.0)
            .map(|secs| Duration::from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64())))
            .unwrap_or(DEFAULT_TOKEN_LIFETIME);
        // Refresh shortly before expiry: 5 minutes early for the documented 30-minute tokens,
        // a fifth of the lifetime for short ones.
        let margin = (lifetime / 5).min(Duration::from_secs(300));
        Ok(CachedToken {
            id: self.client.inner.token_ids.fetch_add(1, Ordering::Relaxed),
            value: SecretString::new(parsed.access_token),
            refresh_at: Instant::now() + lifetime - margin,
        })
    }
}
