//! The environment connection override endpoints of one account: create, update, list
//! (every page) and delete (in batches that keep URLs short, confirmed by a list for names
//! a server could read differently).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Method;
use serde::de::DeserializeOwned;
use url::Url;

use super::super::error::{DpcError, Operation};
use super::super::types::{
    OverrideRequest, RemoteEnvironment, RemoteOverride, parse_page, parse_write_answer,
};
use super::{AccountHandle, WriteAnswer, WriteEffect};

/// The page size asked of list calls: the documented maximum of DPC's list endpoints.
const LIST_PAGE_SIZE: u64 = 100;

/// The most pages one list follows: a server that keeps announcing more is answering
/// something other than a list.
pub const MAX_PAGES: usize = 1000;

/// The path of the override endpoints under a project.
const OVERRIDES: &[&str] = &["connections", "environment-overrides"];

/// Longest URL we send; longer DELETEs are split (DPC answers 400 to over-long URLs).
const MAX_URL_LEN: usize = 2000;

/// Characters left as they are in a query value (RFC 3986 unreserved); everything else,
/// including space and comma, is percent-encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

impl AccountHandle {
    /// `POST` a new override. 409 comes back as an error of class `Conflict`.
    pub async fn create(
        &self,
        project_id: &str,
        body: &OverrideRequest,
    ) -> Result<WriteAnswer, DpcError> {
        self.write(Operation::Create, Method::POST, project_id, body)
            .await
    }

    /// `PUT` an existing override. 404 comes back as an error of class `NotFound`.
    pub async fn update(
        &self,
        project_id: &str,
        body: &OverrideRequest,
    ) -> Result<WriteAnswer, DpcError> {
        self.write(Operation::Update, Method::PUT, project_id, body)
            .await
    }

    async fn write(
        &self,
        operation: Operation,
        method: Method,
        project_id: &str,
        body: &OverrideRequest,
    ) -> Result<WriteAnswer, DpcError> {
        let url = self.overrides_url(project_id, &[]);
        let sent = async {
            let answer = self.send(operation, method, url, Some(body)).await?;
            Ok(WriteAnswer {
                status: answer.status.as_u16(),
                remote: parse_write_answer(&answer.body),
            })
        };
        let connections = [body.connection_name.as_str()];
        let environment = &body.environment_name;
        self.journaled(project_id, environment, &connections, sent, |answer| {
            Some(held_after(body, answer.remote.as_ref()))
        })
        .await
    }

    /// Runs a write, telling the write observer (the drift checker's journal) when it
    /// begins and what it left when it ends: what `left` says of a success (`None`: gone),
    /// nothing after a refusal, and "unknown" after a failure that may have applied.
    async fn journaled<T>(
        &self,
        project_id: &str,
        environment: &str,
        connections: &[&str],
        write: impl std::future::Future<Output = Result<T, DpcError>>,
        left: impl FnOnce(&T) -> Option<RemoteOverride>,
    ) -> Result<T, DpcError> {
        let Some(writes) = self.client.inner.writes.clone() else {
            return write.await;
        };
        let place = self.place(project_id, environment);
        writes.begin(&place, connections);
        let result = write.await;
        match result.as_ref().map(left) {
            Ok(Some(held)) => writes.end(&place, connections, WriteEffect::Holds(&held)),
            Ok(None) => writes.end(&place, connections, WriteEffect::Gone),
            Err(error) => writes.end(&place, connections, effect_of_failure(error)),
        }
        result
    }

    /// Every override of an environment, following envelope pages when the answer has them.
    pub async fn list(
        &self,
        project_id: &str,
        environment: &str,
    ) -> Result<Vec<RemoteOverride>, DpcError> {
        let base = [("environmentName", environment.to_string())];
        self.pages(Operation::List, project_id, OVERRIDES, &base)
            .await
    }

    /// The names of a project's environments (`GET /v1/projects/{projectId}/environments`),
    /// every page. An item without a name is skipped.
    pub async fn environments(&self, project_id: &str) -> Result<Vec<String>, DpcError> {
        let items: Vec<RemoteEnvironment> = self
            .pages(Operation::Environments, project_id, &["environments"], &[])
            .await?;
        Ok(items.into_iter().filter_map(|e| e.name).collect())
    }

    /// Every item of a list endpoint under a project, following envelope pages.
    async fn pages<T: DeserializeOwned>(
        &self,
        operation: Operation,
        project_id: &str,
        tail: &[&str],
        base: &[(&str, String)],
    ) -> Result<Vec<T>, DpcError> {
        let mut items = Vec::new();
        let mut page_params: Option<(u64, u64)> = None;
        for _ in 0..MAX_PAGES {
            let mut query = base.to_vec();
            match page_params {
                Some((page, size)) => {
                    query.push(("page", page.to_string()));
                    query.push(("size", size.to_string()));
                }
                // Ask for the largest page list endpoints document, so one call usually
                // answers for a whole environment.
                None => query.push(("size", LIST_PAGE_SIZE.to_string())),
            }
            let url = self.project_url(project_id, tail, &query);
            let answer = self.send(operation, Method::GET, url, None).await?;
            let page = parse_page::<T>(&answer.body)
                .map_err(|reason| DpcError::Decode { operation, reason })?;
            let more = page.has_more();
            let next = (page.page.unwrap_or(0) + 1, page.size.unwrap_or(100));
            items.extend(page.items);
            if !more {
                return Ok(items);
            }
            page_params = Some(next);
        }
        // A list cut short would be taken for all there is (a drift check, a confirmed
        // deletion, an import): refused whole instead.
        Err(DpcError::Decode {
            operation,
            reason: format!(
                "DPC still announced more pages after {MAX_PAGES} pages ({} items); the list is not used",
                items.len()
            ),
        })
    }

    /// `DELETE` the overrides of `connection_names` in an environment. 404 counts as done.
    /// Names are split over several calls when one URL would be too long.
    ///
    /// DPC takes the names as one comma-separated list: a name with a comma is never sent (a
    /// server that decodes before splitting would delete other overrides), and when a name
    /// holds anything beyond letters, digits, spaces and `-_.~` the environment is listed
    /// afterwards to confirm it is gone.
    pub async fn delete(
        &self,
        project_id: &str,
        environment: &str,
        connection_names: &[String],
    ) -> Result<(), DpcError> {
        if let Some(name) = connection_names.iter().find(|n| n.contains(',')) {
            return Err(DpcError::Misconfigured(format!(
                "connection name {name:?} contains a comma; DPC's delete call reads commas as separators, so it is never sent"
            )));
        }
        for (chunk, names) in self.delete_batches(project_id, environment, connection_names) {
            let url = self.overrides_url_raw(project_id, &chunk);
            let sent = async {
                match self
                    .send(Operation::Delete, Method::DELETE, url, None)
                    .await
                {
                    Ok(_) | Err(DpcError::Api { status: 404, .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            self.journaled(project_id, environment, &names, sent, |()| None)
                .await?;
        }
        let unusual: Vec<&String> = connection_names
            .iter()
            .filter(|name| !is_plain_name(name))
            .collect();
        if !unusual.is_empty() {
            let listed = self.list(project_id, environment).await?;
            if let Some(name) = unusual.into_iter().find(|name| {
                listed
                    .iter()
                    .any(|o| o.name.as_deref() == Some(name.as_str()))
            }) {
                return Err(DpcError::StillPresent(name.clone()));
            }
        }
        Ok(())
    }

    /// The query of each DELETE, with the names it carries.
    fn delete_batches<'n>(
        &self,
        project_id: &str,
        environment: &str,
        names: &'n [String],
    ) -> Vec<(String, Vec<&'n str>)> {
        let prefix = format!("environmentName={}&connectionNames=", encode(environment));
        let base_len = self.overrides_url(project_id, &[]).as_str().len() + 1 + prefix.len();
        let mut batches = Vec::new();
        let mut current = String::new();
        let mut carried = Vec::new();
        for name in names {
            let encoded = encode(name);
            if !current.is_empty() && base_len + current.len() + 1 + encoded.len() > MAX_URL_LEN {
                batches.push((format!("{prefix}{current}"), std::mem::take(&mut carried)));
                current.clear();
            }
            if !current.is_empty() {
                current.push(',');
            }
            current.push_str(&encoded);
            carried.push(name.as_str());
        }
        if !current.is_empty() {
            batches.push((format!("{prefix}{current}"), carried));
        }
        batches
    }

    fn overrides_url(&self, project_id: &str, query: &[(&str, String)]) -> Url {
        self.project_url(project_id, OVERRIDES, query)
    }

    fn overrides_url_raw(&self, project_id: &str, query: &str) -> Url {
        self.project_url_raw(project_id, OVERRIDES, query)
    }

    fn project_url(&self, project_id: &str, tail: &[&str], query: &[(&str, String)]) -> Url {
        let raw: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect();
        self.project_url_raw(project_id, tail, &raw.join("&"))
    }

    /// `{apiUrl}/v1/projects/{projectId}/{tail…}?{query}`, the project id one encoded segment.
    fn project_url_raw(&self, project_id: &str, tail: &[&str], query: &str) -> Url {
        let mut url = self.state.endpoint.api_url.clone();
        url.path_segments_mut()
            .expect("an http(s) URL has path segments")
            .pop_if_empty()
            .extend(["v1", "projects", project_id])
            .extend(tail);
        url.set_query((!query.is_empty()).then_some(query));
        url
    }
}

/// What DPC holds after it accepted `body`: the values sent, with what its answer said of
/// the override (who created it, the parent's types) when it echoed one.
fn held_after(body: &OverrideRequest, echo: Option<&RemoteOverride>) -> RemoteOverride {
    let values = serde_json::to_value(&body.connection_overrides).ok();
    let echo = echo.cloned().unwrap_or_default();
    RemoteOverride {
        name: Some(body.connection_name.clone()),
        environment_name: Some(body.environment_name.clone()),
        auth_type: body.auth_type.clone().or(echo.auth_type),
        connection_overrides: values,
        ..echo
    }
}

/// What a failed write may have left: nothing, when DPC answered and refused it (or it was
/// never sent); otherwise no one knows.
fn effect_of_failure(error: &DpcError) -> WriteEffect<'static> {
    if error.may_have_applied() {
        WriteEffect::Unknown
    } else {
        WriteEffect::Unchanged
    }
}

/// A name no server could read differently in a comma-separated query list.
fn is_plain_name(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.' | '~'))
}

fn encode(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode("Sales, EU"), "Sales%2C%20EU");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode("x/y&z=1+2"), "x%2Fy%26z%3D1%2B2");
    }
}
