//! Where an account calls DPC: the settings every account shares (the host allow-list
//! among them) and an account's API and token URLs.

use std::time::Duration;

use url::Url;

use super::super::error::DpcError;
use crate::api::DpcAccountSpec;

/// The documented token endpoint (Matillion's own Terraform provider uses it).
pub const DEFAULT_TOKEN_URL: &str = "https://id.core.matillion.com/oauth/dpc/token";

/// The documented token audience.
pub const DEFAULT_AUDIENCE: &str = "https://api.matillion.com";

/// The DPC hosts an account may name by default: Matillion's own.
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &["*.matillion.com"];

/// Settings shared by every account.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// Allow `http://` API and token URLs (tests and the sandbox only).
    pub allow_insecure_http: bool,
    /// Timeout of one HTTP request, connection included.
    pub request_timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
    /// How long to hold an account after a 429 that carries no usable `Retry-After`.
    pub default_retry_after: Duration,
    /// A request whose rate-limit slot is further away than this is not waited for: its
    /// object is told when to come back.
    pub max_admission_wait: Duration,
    /// The hosts an account's `apiUrl` and `tokenUrl` may name: exact names, or `*.domain`
    /// for any host under a domain. An account is a way to send its credentials and the
    /// values its objects read from Secrets to a host, so only these hosts are called.
    pub allowed_hosts: Vec<String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            allow_insecure_http: false,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            default_retry_after: Duration::from_secs(5),
            max_admission_wait: Duration::from_secs(5),
            allowed_hosts: DEFAULT_ALLOWED_HOSTS
                .iter()
                .map(|h| h.to_string())
                .collect(),
        }
    }
}

impl ClientSettings {
    /// Whether `host` is one the operator may call.
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allowed_hosts.iter().any(|pattern| {
            let pattern = pattern.trim().to_ascii_lowercase();
            match pattern.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
                None => pattern == "*" || pattern == host,
            }
        })
    }
}

/// Where to call DPC for one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub api_url: Url,
    pub token_url: Url,
    pub audience: String,
    pub account_id: Option<String>,
}

impl Endpoint {
    /// The API base URL an account spec names (its `apiUrl`, else its region's), unchecked.
    pub fn api_base(spec: &DpcAccountSpec) -> Option<String> {
        match (&spec.api_url, spec.region) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(region)) => {
                Some(format!("https://{}.api.matillion.com/dpc", region.as_str()))
            }
            (None, None) => None,
        }
    }

    /// The endpoint of a DpcAccount spec: the region's URL unless `apiUrl` is set. Plain
    /// http is refused unless the settings allow it, and so is a host not on their list.
    pub fn for_account(spec: &DpcAccountSpec, settings: &ClientSettings) -> Result<Self, String> {
        let Some(api) = Self::api_base(spec) else {
            return Err("the DpcAccount sets neither region nor apiUrl".into());
        };
        let token = spec
            .token_url
            .clone()
            .unwrap_or_else(|| DEFAULT_TOKEN_URL.into());
        let api_url = parse_endpoint_url("apiUrl", &api, settings)?;
        let token_url = parse_endpoint_url("tokenUrl", &token, settings)?;
        Ok(Self {
            api_url,
            token_url,
            audience: spec
                .audience
                .clone()
                .unwrap_or_else(|| DEFAULT_AUDIENCE.into()),
            account_id: spec.account_id.clone().filter(|s| !s.is_empty()),
        })
    }
}

fn parse_endpoint_url(field: &str, value: &str, settings: &ClientSettings) -> Result<Url, String> {
    let url = Url::parse(value).map_err(|e| format!("{field} {value:?} is not a URL: {e}"))?;
    let host = url.host_str().unwrap_or_default();
    if !settings.host_allowed(host) {
        return Err(format!(
            "{field} names host {host:?}, which is not one of the DPC hosts this operator may call ({}); an operator administrator adds hosts with --dpc-allowed-hosts (chart value dpc.allowedHosts)",
            settings.allowed_hosts.join(", ")
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if settings.allow_insecure_http => Ok(url),
        "http" => Err(format!(
            "{field} {value} uses plain http, which is refused; use https, or start the operator with --allow-insecure-http (tests and sandboxes only)"
        )),
        other => Err(format!(
            "{field} {value} has scheme {other}; only https is supported"
        )),
    }
}

pub(super) fn ensure_scheme(url: &Url, allow_insecure_http: bool) -> Result<(), DpcError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure_http => Ok(()),
        _ => Err(DpcError::Misconfigured(format!(
            "refusing to call {} over plain http; start the operator with --allow-insecure-http to allow it",
            url.host_str().unwrap_or("?")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Region;

    fn spec() -> DpcAccountSpec {
        DpcAccountSpec {
            region: Some(Region::Eu1),
            ..dpc_operator_api::fixtures::account_spec("creds")
        }
    }

    #[test]
    fn region_gives_the_documented_urls() {
        let endpoint = Endpoint::for_account(&spec(), &ClientSettings::default()).unwrap();
        assert_eq!(
            endpoint.api_url.as_str(),
            "https://eu1.api.matillion.com/dpc"
        );
        assert_eq!(endpoint.token_url.as_str(), DEFAULT_TOKEN_URL);
        assert_eq!(endpoint.audience, DEFAULT_AUDIENCE);
    }

    #[test]
    fn api_url_overrides_region_and_http_needs_the_flag() {
        let mut s = spec();
        s.api_url = Some("http://127.0.0.1:9/dpc".into());
        let local = |insecure| ClientSettings {
            allow_insecure_http: insecure,
            allowed_hosts: vec!["127.0.0.1".into(), "x".into(), "*.matillion.com".into()],
            ..ClientSettings::default()
        };
        let refused = Endpoint::for_account(&s, &local(false)).unwrap_err();
        assert!(refused.contains("plain http"), "{refused}");
        assert!(refused.contains("--allow-insecure-http"), "{refused}");
        let allowed = Endpoint::for_account(&s, &local(true)).unwrap();
        assert_eq!(allowed.api_url.as_str(), "http://127.0.0.1:9/dpc");
        s.api_url = Some("ftp://x".into());
        assert!(
            Endpoint::for_account(&s, &local(true))
                .unwrap_err()
                .contains("scheme ftp")
        );
    }

    #[test]
    fn only_allowed_hosts_may_be_named() {
        let settings = ClientSettings::default();
        for host in [
            "id.core.matillion.com",
            "eu1.api.matillion.com",
            "US1.API.Matillion.com.",
        ] {
            assert!(settings.host_allowed(host), "{host}");
        }
        for host in [
            "matillion.com.evil.io",
            "evilmatillion.com",
            "127.0.0.1",
            "",
            "matillion.com",
        ] {
            assert!(!settings.host_allowed(host), "{host}");
        }
        let mut s = spec();
        s.token_url = Some("https://collector.evil.example/token".into());
        let refused = Endpoint::for_account(&s, &settings).unwrap_err();
        assert!(
            refused.contains("tokenUrl names host \"collector.evil.example\""),
            "{refused}"
        );
        assert!(refused.contains("--dpc-allowed-hosts"), "{refused}");
    }
}
