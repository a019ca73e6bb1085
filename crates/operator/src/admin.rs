//! The admin endpoints: `/livez` (the process serves), `/readyz` (the watches have delivered
//! their first lists, or this replica is a standby follower; false again once shutdown
//! begins, and while a watch has failed for longer than `--watch-blind-after`), and
//! `/metrics` in Prometheus text format.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Method, StatusCode};

use crate::metrics::Metrics;
use dpc_http::{self as http, Server};

/// Whether the operator is ready, and if not, why.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves the admin endpoints on `addr`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> std::io::Result<Server> {
    // GET only: nothing here reads a body, so none is read (a 1 GiB POST is answered 405
    // at once), and a client has 10 s to send its headers.
    http::bind_and_serve_with(addr, http::Limits::ADMIN, move |req| {
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        async move {
            let response = match (&req.method, req.uri.path()) {
                (&Method::GET, "/livez" | "/healthz") => http::text(StatusCode::OK, "ok\n"),
                (&Method::GET, "/readyz") => match readiness() {
                    Ok(()) => http::text(StatusCode::OK, "ok\n"),
                    Err(why) => http::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                },
                (&Method::GET, "/metrics") => hyper::Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                    .body(http::full(metrics.encode()))
                    .expect("a valid response"),
                _ => http::text(
                    StatusCode::NOT_FOUND,
                    "not found; try /livez, /readyz or /metrics\n",
                ),
            };
            Ok(response)
        }
    })
    .await
}
