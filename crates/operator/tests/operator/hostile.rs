//! The DPC client against servers that misbehave on purpose (redirects, endless or oversized
//! answers, absurd `Retry-After` and `expires_in` values, error texts that echo the
//! credentials), and the admin server against bodies it must not read.
//! Nothing may panic, grow without bound, follow a redirect or leak a secret.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dpc_http::{self as http, Req};
use dpc_operator::api::DpcAccountSpec;
use dpc_operator::dpc::client::{MAX_API_BODY, MAX_RETRY_AFTER, MAX_TOKEN_BODY};
use dpc_operator::dpc::{
    AccountHandle, AccountKey, ClientSettings, Credentials, DpcClient, Endpoint, ErrorClass,
    OverrideRequest, OverrideValues, Rate, SecretString,
};
use hyper::{Response, StatusCode};

const PROJECT: &str = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
const CLIENT_SECRET: &str = "hostile-test-client-secret/with spaces&more";
const TOKEN: &str = "tok-0123456789abcdef";

/// What a server saw: method, path and body of each request.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A server answering every request with `answer`, recording what it saw.
async fn server<F>(answer: F) -> (http::Server, String, Seen)
where
    F: Fn(&Req) -> Response<http::Body> + Send + Sync + 'static,
{
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let server = http::bind_and_serve(SocketAddr::from(([127, 0, 0, 1], 0)), move |req: Req| {
        log.lock().unwrap().push((
            req.method.to_string(),
            req.uri.path().to_string(),
            String::from_utf8_lossy(&req.body).into_owned(),
        ));
        let response = answer(&req);
        async move { Ok(response) }
    })
    .await
    .unwrap();
    let url = format!("http://{}", server.addr);
    (server, url, seen)
}

fn token_answer(expires_in: &str) -> Response<http::Body> {
    let body = format!(r#"{{"access_token":"{TOKEN}","expires_in":{expires_in}}}"#);
    Response::builder()
        .header("content-type", "application/json")
        .body(http::full(body))
        .unwrap()
}

fn handle(api_url: &str, token_url: &str) -> AccountHandle {
    let settings = ClientSettings {
        allow_insecure_http: true,
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        default_retry_after: Duration::from_secs(1),
        max_admission_wait: Duration::from_secs(5),
        allowed_hosts: vec!["127.0.0.1".into()],
    };
    let spec = DpcAccountSpec {
        api_url: Some(api_url.into()),
        token_url: Some(token_url.into()),
        ..dpc_operator::api::fixtures::account_spec("unused")
    };
    let endpoint = Endpoint::for_account(&spec, &settings).unwrap();
    DpcClient::new(settings).account(
        AccountKey {
            namespace: Some("ns".into()),
            name: "acct".into(),
        },
        endpoint,
        Credentials {
            client_id: SecretString::new("client-id-1"),
            client_secret: SecretString::new(CLIENT_SECRET),
        },
        Rate {
            requests_per_minute: 60_000,
            burst: 100,
        },
    )
}

fn request(value: &str) -> OverrideRequest {
    OverrideRequest {
        environment_name: "PROD".into(),
        connection_name: "Sales".into(),
        auth_type: None,
        connection_overrides: OverrideValues {
            secrets_location: None,
            connection_properties: BTreeMap::from([("password".into(), value.into())]),
        },
    }
}

#[tokio::test]
async fn a_redirect_from_the_token_endpoint_is_not_followed() {
    let (_elsewhere, elsewhere_url, elsewhere_seen) = server(|_| token_answer("1800")).await;
    let target = format!("{elsewhere_url}/steal");
    let (_token, token_url, _) = server(move |_| {
        Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header("location", target.as_str())
            .body(http::full(""))
            .unwrap()
    })
    .await;
    let dpc = handle("http://127.0.0.1:9/dpc", &format!("{token_url}/token"));
    let err = dpc.ensure_token().await.unwrap_err();
    assert!(err.to_string().contains("307"), "{err}");
    assert_eq!(err.class(), ErrorClass::Misconfigured, "{err}");
    assert!(
        elsewhere_seen.lock().unwrap().is_empty(),
        "the credentials were re-posted to the redirect target"
    );
}

#[tokio::test]
async fn a_redirect_from_the_api_does_not_resend_the_body() {
    let (_elsewhere, elsewhere_url, elsewhere_seen) =
        server(|_| http::text(StatusCode::OK, "{}")).await;
    let (_token, token_url, _) = server(|_| token_answer("1800")).await;
    let target = format!("{elsewhere_url}/steal");
    let (_api, api_url, api_seen) = server(move |_| {
        Response::builder()
            .status(StatusCode::PERMANENT_REDIRECT)
            .header("location", target.as_str())
            .body(http::full(""))
            .unwrap()
    })
    .await;
    let dpc = handle(&format!("{api_url}/dpc"), &format!("{token_url}/token"))
        .with_secrets([SecretString::new("value-from-a-secret")]);
    let err = dpc
        .update(PROJECT, &request("value-from-a-secret"))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured, "{err}");
    assert!(err.to_string().contains("never followed"), "{err}");
    assert_eq!(api_seen.lock().unwrap().len(), 1);
    assert!(elsewhere_seen.lock().unwrap().is_empty());
}

/// A body that never ends, counting what was sent.
fn endless(sent: Arc<AtomicU64>) -> http::Body {
    let chunk = bytes::Bytes::from(vec![b'x'; 64 * 1024]);
    http::streamed(futures::stream::repeat(chunk).take_while(move |c| {
        let total = sent.fetch_add(c.len() as u64, Ordering::Relaxed);
        futures::future::ready(total < (1 << 30))
    }))
}

use futures::StreamExt;

#[tokio::test]
async fn an_endless_token_answer_is_cut_off_at_its_limit() {
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let (_token, token_url, _) = server(move |_| {
        Response::builder()
            .header("content-type", "application/json")
            .body(endless(counter.clone()))
            .unwrap()
    })
    .await;
    let dpc = handle("http://127.0.0.1:9/dpc", &format!("{token_url}/token"));
    let err = dpc.ensure_token().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("larger than {MAX_TOKEN_BODY} bytes")),
        "{err}"
    );
    // The client stopped reading: the server could not push much more than the limit (plus
    // what socket buffers hold) before the connection closed.
    let pushed = sent.load(Ordering::Relaxed);
    assert!(pushed < 64 * 1024 * 1024, "{pushed} bytes were sent");
}

#[tokio::test]
async fn an_endless_or_oversized_api_answer_is_refused() {
    let (_token, token_url, _) = server(|_| token_answer("1800")).await;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let (_api, api_url, _) = server(move |req| {
        if req.method == hyper::Method::GET {
            Response::builder().body(endless(counter.clone())).unwrap()
        } else {
            // Declares a 1 GiB body: refused before a byte of it is read.
            Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .header("content-length", (1u64 << 30).to_string())
                .body(endless(counter.clone()))
                .unwrap()
        }
    })
    .await;
    let dpc = handle(&format!("{api_url}/dpc"), &format!("{token_url}/token"));
    let err = dpc.list(PROJECT, "PROD").await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("larger than {MAX_API_BODY} bytes")),
        "{err}"
    );
    let after_list = sent.load(Ordering::Relaxed);
    assert!(after_list < 128 * 1024 * 1024, "{after_list}");
    let err = dpc.create(PROJECT, &request("v")).await.unwrap_err();
    assert!(
        err.to_string().contains("(400 Bad Request) is larger than"),
        "{err}"
    );
}

#[tokio::test]
async fn absurd_retry_after_and_token_lifetimes_are_capped_not_fatal() {
    let (_token, token_url, token_seen) = server(|_| token_answer("1e300")).await;
    let (_api, api_url, _) = server(|_| {
        Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "1e300")
            .body(http::full(""))
            .unwrap()
    })
    .await;
    let dpc = handle(&format!("{api_url}/dpc"), &format!("{token_url}/token"));
    let err = dpc.list(PROJECT, "PROD").await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::RateLimited);
    assert_eq!(err.retry_after(), Some(MAX_RETRY_AFTER));
    let held = dpc.blocked_for().unwrap();
    assert!(held <= MAX_RETRY_AFTER && held > MAX_RETRY_AFTER - Duration::from_secs(60));
    // The 1e300-second token was taken as a day-long one: cached, not fetched again.
    dpc.ensure_token().await.unwrap();
    assert_eq!(token_seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn error_answers_come_back_without_credentials_values_or_token_in_any_encoding() {
    let secret_value = "db-p@ss word";
    let echo = move |req: &Req| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        let auth = req.header("authorization").unwrap_or_default().to_string();
        // A long preamble first, so a cut at 200 characters would keep only part of a value.
        let text = format!(
            "{}invalid_client: you sent {body} with {auth}; raw {CLIENT_SECRET}; value {secret_value}",
            "padding ".repeat(30)
        );
        http::text(StatusCode::UNAUTHORIZED, text)
    };
    let (_token, token_url, _) = server(echo).await;
    let dpc = handle("http://127.0.0.1:9/dpc", &format!("{token_url}/token"));
    let err = dpc.ensure_token().await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert_eq!(err.class(), ErrorClass::CredentialsRejected);
    for leaked in ["hostile-test", "hostile-test-client-secret%2Fwith+spaces"] {
        // The text is not printed on failure: it would carry the secret.
        assert!(
            !text.contains(leaked),
            "a form of the secret survived redaction"
        );
    }

    // An API that echoes the request body (JSON-escaped value) and the bearer token.
    let (_token, token_url, _) = server(|_| token_answer("1800")).await;
    let api_echo = |req: &Req| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        let auth = req.header("authorization").unwrap_or_default().to_string();
        http::json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"detail": format!("{auth} refused {body}")}),
        )
    };
    let (_api, api_url, _) = server(api_echo).await;
    let dpc = handle(&format!("{api_url}/dpc"), &format!("{token_url}/token"))
        .with_secrets([SecretString::new(secret_value)]);
    let err = dpc
        .create(PROJECT, &request(secret_value))
        .await
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("<redacted>"), "nothing was redacted");
    for leaked in ["db-p@ss", TOKEN] {
        // The text is not printed on failure: it would carry the secret.
        assert!(
            !text.contains(leaked),
            "a form of the secret survived redaction"
        );
    }
}

/// The admin server on a free port, always ready.
async fn admin() -> http::Server {
    let metrics = Arc::new(dpc_operator::metrics::Metrics::new(true));
    dpc_operator::admin::serve(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        metrics,
        Arc::new(|| Ok(())),
    )
    .await
    .unwrap()
}

/// Sends `head` (and then keeps sending `x` bytes when `stream_body`) and returns the first
/// line the server answers.
async fn raw_request(addr: SocketAddr, head: &str, stream_body: bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        while stream_body && write.write_all(&chunk).await.is_ok() {}
        write
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(15), read.read(&mut buf))
            .await
            .expect("the server answers")
            .unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    writer.abort();
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_admin_endpoints_refuse_bodies_without_reading_them() {
    let server = admin().await;
    let gib = 1u64 << 30;
    let post = format!("POST /livez HTTP/1.1\r\nhost: x\r\ncontent-length: {gib}\r\n\r\n");
    assert_eq!(
        raw_request(server.addr, &post, true).await,
        "HTTP/1.1 405 Method Not Allowed"
    );
    let get = format!("GET /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: {gib}\r\n\r\n");
    assert_eq!(
        raw_request(server.addr, &get, true).await,
        "HTTP/1.1 413 Payload Too Large"
    );
    let chunked = "GET /livez HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n10000\r\n";
    assert_eq!(
        raw_request(server.addr, chunked, true).await,
        "HTTP/1.1 413 Payload Too Large"
    );
    // And still serves.
    let get = "GET /livez HTTP/1.1\r\nhost: x\r\n\r\n";
    assert_eq!(
        raw_request(server.addr, get, false).await,
        "HTTP/1.1 200 OK"
    );
}

#[tokio::test]
async fn the_admin_server_closes_a_connection_whose_headers_never_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = admin().await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /livez HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The header read timeout is 10 s: the server gives up on the request then.
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the connection was still open after 20 s");
    assert!(
        !String::from_utf8_lossy(&buf).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

#[tokio::test]
async fn a_delete_dpc_accepts_but_does_not_carry_out_is_not_taken_as_done() {
    let (_token, token_url, _) = server(|_| token_answer("1800")).await;
    let name = "Sales+EU";
    let (_api, api_url, seen) = server(move |req| match req.method {
        hyper::Method::DELETE => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(http::full(""))
            .unwrap(),
        _ => http::json(
            StatusCode::OK,
            &serde_json::json!([{"name": name, "environmentName": "PROD"}]),
        ),
    })
    .await;
    let dpc = handle(&format!("{api_url}/dpc"), &format!("{token_url}/token"));
    let err = dpc
        .delete(PROJECT, "PROD", &[name.to_string()])
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(err.to_string().contains("still lists"), "{err}");
    let methods: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(m, _, _)| m.clone())
        .collect();
    assert_eq!(methods, ["DELETE", "GET"]);
}

#[tokio::test]
async fn a_list_that_never_ends_is_refused_not_cut_short() {
    let (_token, token_url, _) = server(|_| token_answer("1800")).await;
    // Every page says more follow.
    let (_api, api_url, seen) = server(|_| {
        let body = r#"{"page": 0, "size": 1, "total": 1000000,
            "results": [{"name": "C", "connectionOverrides": {"connectionProperties": {"secretName": "x"}}}]}"#;
        Response::builder()
            .header("content-type", "application/json")
            .body(http::full(body))
            .unwrap()
    })
    .await;
    let dpc = handle(&format!("{api_url}/dpc"), &format!("{token_url}/token"));
    let error = dpc.list(PROJECT, "PROD").await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("still announced more pages after 1000 pages (1000 items)"),
        "{text}"
    );
    assert!(
        matches!(error, dpc_operator::dpc::DpcError::Decode { .. }),
        "{error:?}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1000,
        "the cap, not one call more"
    );
}
