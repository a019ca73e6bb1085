//! A small HTTP/1.1 server on hyper, shared by the admin endpoints and the test doubles.
//! A handler may answer `Err(Hangup)` to close the connection without a response, which a
//! client sees as a reset connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A response body: a whole buffer or a stream of chunks.
pub type Body = BoxBody<Bytes, Infallible>;

/// Answer of a handler that closes the connection without answering.
#[derive(Debug)]
pub struct Hangup;

impl std::fmt::Display for Hangup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for Hangup {}

/// A request with its body read.
pub struct Req {
    pub method: hyper::Method,
    pub uri: hyper::Uri,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Req {
    /// The raw query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The decoded query parameters (`+` and `%xx` decoded), in order.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The first decoded value of a query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// A whole-buffer body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A streamed body.
pub fn streamed<S>(stream: S) -> Body
where
    S: Stream<Item = Bytes> + Send + Sync + 'static,
{
    use futures::StreamExt;
    BodyExt::boxed(StreamBody::new(
        stream.map(|b| Ok::<_, Infallible>(Frame::data(b))),
    ))
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_typed(status, value, "application/json")
}

/// A JSON response with a given media type.
pub fn json_typed(
    status: StatusCode,
    value: &serde_json::Value,
    content_type: &str,
) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(full(serde_json::to_vec(value).expect("JSON serializes")))
        .expect("a valid response")
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(full(body.into()))
        .expect("a valid response")
}

/// A running server: its address, and a handle that stops it when dropped or on `stop`.
pub struct Server {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Stops accepting connections and closes open ones.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// What a server accepts before a handler sees a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest request body read; a longer one is answered 413 (a declared
    /// `Content-Length` over it before anything is read).
    pub max_body: usize,
    /// Only GET and HEAD: other methods are answered 405 without reading their body.
    pub read_only: bool,
    /// How long a client may take to send a request's headers.
    pub header_timeout: std::time::Duration,
}

impl Limits {
    /// The admin endpoints: GET only, no body, headers within 10 s.
    pub const ADMIN: Limits = Limits {
        max_body: 0,
        read_only: true,
        header_timeout: std::time::Duration::from_secs(10),
    };
    /// The test doubles: bodies up to 32 MiB (CRDs, bulk applies).
    pub const DOUBLES: Limits = Limits {
        max_body: 32 * 1024 * 1024,
        read_only: false,
        header_timeout: std::time::Duration::from_secs(30),
    };
}

/// Reads a request's body unless the limits refuse it: the refusal is the response.
async fn read_body(
    parts: &hyper::http::request::Parts,
    body: Incoming,
    limits: Limits,
) -> Result<Result<Bytes, Response<Body>>, Hangup> {
    if limits.read_only && !matches!(parts.method, hyper::Method::GET | hyper::Method::HEAD) {
        let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
        refused.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        refused.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return Ok(Err(refused));
    }
    let too_large = || {
        let mut refused = text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request bodies are limited to {} bytes\n", limits.max_body),
        );
        refused.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        refused
    };
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limits.max_body as u64) {
        return Ok(Err(too_large()));
    }
    match http_body_util::Limited::new(body, limits.max_body)
        .collect()
        .await
    {
        Ok(collected) => Ok(Ok(collected.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(Err(too_large())),
        Err(_) => Err(Hangup),
    }
}

/// Serves `handler` on `listener` with the doubles' limits.
pub fn serve<H, F>(listener: TcpListener, handler: H) -> Server
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Hangup>> + Send + 'static,
{
    serve_with(listener, Limits::DOUBLES, handler)
}

/// Serves `handler` on `listener` until the returned server is stopped or dropped.
pub fn serve_with<H, F>(listener: TcpListener, limits: Limits, handler: H) -> Server
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Hangup>> + Send + 'static,
{
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let (stop, mut stopped) = watch::channel(false);
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopped.changed() => break,
            };
            let Ok((stream, _)) = accepted else { continue };
            let _ = stream.set_nodelay(true);
            let handler = handler.clone();
            let mut conn_stopped = stopped.clone();
            connections.spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let body = match read_body(&parts, body, limits).await? {
                            Ok(body) => body,
                            Err(refused) => return Ok(refused),
                        };
                        handler(Req {
                            method: parts.method,
                            uri: parts.uri,
                            headers: parts.headers,
                            body,
                        })
                        .await
                    }
                });
                let conn = http1::Builder::new()
                    .keep_alive(true)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = conn_stopped.changed() => {}
                }
            });
            // Reap finished connections so the set does not grow without bound.
            while connections.try_join_next().is_some() {}
        }
        connections.shutdown().await;
    });
    Server {
        addr,
        stop,
        task: Some(task),
    }
}

/// Binds `addr` (port 0 picks a free port) and serves `handler` there with the doubles'
/// limits.
pub async fn bind_and_serve<H, F>(addr: SocketAddr, handler: H) -> std::io::Result<Server>
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Hangup>> + Send + 'static,
{
    bind_and_serve_with(addr, Limits::DOUBLES, handler).await
}

/// Binds `addr` and serves `handler` there within `limits`.
pub async fn bind_and_serve_with<H, F>(
    addr: SocketAddr,
    limits: Limits,
    handler: H,
) -> std::io::Result<Server>
where
    H: Fn(Req) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, Hangup>> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await?;
    Ok(serve_with(listener, limits, handler))
}
