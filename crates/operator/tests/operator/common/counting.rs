//! Counts the requests a kube client sends, by verb and resource (`get secrets`, `patch
//! connectionoverrides/status`, `watch dpcaccounts`), so tests can assert how many API calls
//! the controller made — on a shared API server, counting at the client is what tells one
//! test's calls from another's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    changed: Arc<Notify>,
}

impl RequestCounter {
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().unwrap().clone()
    }

    pub fn get(&self, key: &str) -> u64 {
        self.counts.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    /// Waits until `done` holds for the counts (checked after every request); fails after
    /// `timeout` with the counts seen.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> Result<BTreeMap<String, u64>, BTreeMap<String, u64>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let counts = self.counts();
            if done(&counts) {
                return Ok(counts);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(self.counts());
            }
        }
    }

    fn record<B>(&self, request: &http::Request<B>) {
        if let Some(key) = request_key(request.method(), request.uri()) {
            *self.counts.lock().unwrap().entry(key).or_default() += 1;
            self.changed.notify_waiters();
        }
    }
}

/// `verb resource[/subresource]` of an API request, as RBAC and the audit log name them.
pub fn request_key(method: &http::Method, uri: &http::Uri) -> Option<String> {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    let (resource, name, sub) = match rest {
        ["namespaces", _ns, resource, tail @ ..] => (*resource, tail.first(), tail.get(1)),
        [resource, tail @ ..] => (*resource, tail.first(), tail.get(1)),
        [] => return None,
    };
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if name.is_some() => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if name.is_some() => "delete",
        http::Method::DELETE => "deletecollection",
        _ => return None,
    };
    Some(match sub {
        Some(sub) => format!("{verb} {resource}/{sub}"),
        None => format!("{verb} {resource}"),
    })
}

pub struct CountLayer(pub RequestCounter);

impl<S> tower::Layer<S> for CountLayer {
    type Service = CountService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountService {
            inner,
            counter: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CountService<S> {
    inner: S,
    counter: RequestCounter,
}

impl<S, B> tower::Service<http::Request<B>> for CountService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.counter.record(&request);
        self.inner.call(request)
    }
}

/// A kube client for `kubeconfig_yaml` whose requests `counter` counts.
pub async fn counted_client(kubeconfig_yaml: &str, counter: &RequestCounter) -> kube::Client {
    let config = dpc_testkit::control_plane::config_from(kubeconfig_yaml).await;
    kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&CountLayer(counter.clone()))
        .build()
}
