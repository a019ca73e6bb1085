//! The binary's whole flow as the chart's ServiceAccount, in both modes, and what it
//! serves and refuses.

use super::*;

#[tokio::test]
async fn the_full_flow_as_the_charts_namespaced_service_account() {
    full_flow(Scope::Namespaced).await;
}

#[tokio::test]
async fn the_full_flow_as_the_charts_cluster_wide_service_account() {
    full_flow(Scope::AllNamespaces).await;
}

#[tokio::test]
async fn plain_http_dpc_urls_are_refused_without_the_flag() {
    let h = Harness::start().await;
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(&h, &kubeconfig, &[]);
    h.apply(&Cov::new("sf", "Salesforce")).await;
    let obj = h.wait_reason("sf", "AccountNotReady").await;
    let message = ready_condition(&obj).message;
    assert!(
        message.contains("plain http") && message.contains("--allow-insecure-http"),
        "{message}"
    );
    assert!(h.sim.calls().is_empty());
    operator.kill().await;
}

/// On the emulator: the real API server of the test run is shared, and has the CRDs the
/// other tests need; a server without them would be a second control plane started for this
/// one check of a plain 404 on an unknown resource.
#[tokio::test]
async fn without_the_crds_the_binary_says_how_to_install_them() {
    let emu = dpc_testkit::kube::KubeEmulator::start().await.unwrap();
    let path = std::env::temp_dir().join(format!(
        "dpc-e2e-nocrd-{}-{}",
        std::process::id(),
        emu.addr().port()
    ));
    std::fs::write(&path, emu.kubeconfig()).unwrap();
    let mut operator = Operator::start(&path, &[]);
    let status = operator.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(3));
    let output = operator.output();
    assert!(output.contains("CustomResourceDefinition"), "{output}");
    assert!(
        output.contains("kubectl apply -f crds/crds.yaml"),
        "{output}"
    );
}

#[tokio::test]
async fn admin_endpoints_report_liveness_readiness_and_metrics() {
    let h = Harness::start().await;
    let (mut operator, id, admin) = ungranted_operator(&h).await;
    wait_status(&format!("{admin}/livez"), 200).await;
    let why = wait_status(&format!("{admin}/readyz"), 503).await;
    assert!(
        why.contains("have not delivered their first lists"),
        "{why}"
    );

    identity::grant(&h.client, &id).await;
    wait_status_within(&format!("{admin}/readyz"), 200, AFTER_A_GRANT).await;
    h.apply(&Cov::new("missing", "M").property_from_secret("secretKey", "absent", "k"))
        .await;
    h.wait_reason("missing", "SecretNotFound").await;
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;

    let text = wait_status(&format!("{admin}/metrics"), 200).await;
    let samples = samples(&text);
    let value = |series: &str| samples.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
    assert!(
        value(r#"dpc_operator_reconciliations_total{kind="connectionoverride"}"#).unwrap() >= 2.0
    );
    assert!(value(r#"dpc_operator_reconcile_failures_total{kind="connectionoverride",category="SecretNotFound"}"#).unwrap() >= 1.0);
    assert_eq!(
        value(r#"dpc_operator_dpc_requests_total{operation="create",outcome="success"}"#),
        Some(1.0)
    );
    assert!(
        value(r#"dpc_operator_dpc_request_duration_seconds_count{operation="create"}"#).is_some()
    );
    assert!(
        samples
            .iter()
            .any(|(s, _)| s.starts_with("dpc_operator_reconcile_duration_seconds_bucket{"))
    );
    assert!(value("dpc_operator_rate_limit_wait_seconds_total").is_some());
    assert_eq!(
        value(&format!(
            r#"dpc_operator_condition{{namespace="{}",name="sf",type="Ready",status="True"}}"#,
            h.ns
        )),
        Some(1.0)
    );
    assert_eq!(
        value(&format!(
            r#"dpc_operator_condition{{namespace="{}",name="missing",type="Ready",status="False"}}"#,
            h.ns
        )),
        Some(1.0)
    );
    assert!(!text.contains("not found ("), "no error text in labels");

    // Readiness turns false as soon as shutdown begins, while in-flight work finishes.
    h.sim
        .push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 1500 }));
    h.apply(&Cov::new("slow", "Slow")).await;
    wait_call(&h, SimOp::Create, 2).await;
    operator.terminate();
    wait_status(&format!("{admin}/readyz"), 503).await;
    assert!(operator.wait_exit(Duration::from_secs(8)).await.success());
}

#[tokio::test]
async fn spans_are_exported_over_otlp_only_when_configured() {
    let received: Arc<Mutex<Vec<(String, String, bytes::Bytes)>>> = Arc::default();
    let sink = received.clone();
    let collector = dpc_http::bind_and_serve("127.0.0.1:0".parse().unwrap(), move |req| {
        let sink = sink.clone();
        async move {
            let content_type = req.header("content-type").unwrap_or("").to_string();
            sink.lock()
                .unwrap()
                .push((req.uri.path().to_string(), content_type, req.body.clone()));
            Ok(dpc_http::text(hyper::StatusCode::OK, ""))
        }
    })
    .await
    .unwrap();
    let h = Harness::start().await;
    let endpoint = format!("http://{}", collector.addr);
    let (kubeconfig, _) = namespaced_operator(&h).await;
    let mut operator = Operator::scoped(
        &h,
        &kubeconfig,
        &["--allow-insecure-http", "--otlp-endpoint", &endpoint],
    );
    h.apply(&Cov::new("sf", "Salesforce")).await;
    h.wait_ready("sf").await;
    operator.terminate();
    assert!(operator.wait_exit(Duration::from_secs(10)).await.success());

    let exports = received.lock().unwrap().clone();
    assert!(
        !exports.is_empty(),
        "shutdown flushed the spans:\n{}",
        operator
            .output()
            .lines()
            .filter(|l| !l.contains("DEBUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut all = Vec::new();
    for (path, content_type, body) in &exports {
        assert_eq!(path, "/v1/traces");
        assert_eq!(content_type, "application/x-protobuf");
        all.extend_from_slice(body);
    }
    let contains = |needle: &str| all.windows(needle.len()).any(|w| w == needle.as_bytes());
    for name in ["reconcile", "dpc_request", "dpc-operator", "create", "sf"] {
        assert!(contains(name), "the exported spans lack {name:?}");
    }
    let mut secrets = vec![CLIENT_SECRET.to_string()];
    secrets.extend(h.sim.issued_tokens());
    for secret in &secrets {
        assert!(!contains(secret), "a secret value was exported in a span");
    }

    // Without an endpoint nothing is exported (and nothing tries to).
    let before = received.lock().unwrap().len();
    let mut quiet = Operator::scoped(&h, &kubeconfig, &["--allow-insecure-http"]);
    h.apply(&Cov::new("other", "Other")).await;
    h.wait_ready("other").await;
    quiet.terminate();
    assert!(quiet.wait_exit(Duration::from_secs(10)).await.success());
    assert_eq!(received.lock().unwrap().len(), before);
}

#[tokio::test]
async fn the_test_doubles_run_as_processes() {
    // The DPC simulator, driven through its control endpoints.
    let (mut dpc, url) = start_double(&[
        "sim",
        "dpc",
        "--listen",
        "127.0.0.1:0",
        "--client-id",
        "id-1",
        "--client-secret",
        "secret-1",
    ])
    .await;
    let http = reqwest::Client::new();
    let fault = serde_json::json!({"op": "list", "kind": {"type": "status", "status": 503}});
    let answer = http
        .post(format!("{url}/_sim/faults"))
        .json(&fault)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success());
    let token: serde_json::Value = http
        .post(format!("{url}/oauth/dpc/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "id-1"),
            ("client_secret", "secret-1"),
            ("audience", "x"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = token["access_token"].as_str().unwrap();
    let list = |expect: u16| {
        let request = http
            .get(format!("{url}/dpc/v1/projects/{PROJECT}/connections/environment-overrides?environmentName=PROD"))
            .bearer_auth(bearer);
        async move { assert_eq!(request.send().await.unwrap().status().as_u16(), expect) }
    };
    list(503).await;
    list(200).await;
    let calls = sim_calls(&http, &url).await;
    let seen: Vec<(SimOp, Option<u16>)> = calls.iter().map(|c| (c.op, c.status)).collect();
    assert_eq!(
        seen,
        [
            (SimOp::Token, Some(200)),
            (SimOp::List, Some(503)),
            (SimOp::List, Some(200))
        ]
    );
    dpc.kill().await.unwrap();

    // The Kubernetes API emulator, with the CRDs installed and a kubeconfig for kubectl.
    let dir = std::env::temp_dir().join(format!("dpc-e2e-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let (mut emu, _) = start_double(&[
        "sim",
        "kube",
        "--listen",
        "127.0.0.1:0",
        "--install-crds",
        "--kubeconfig-out",
        kubeconfig.to_str().unwrap(),
    ])
    .await;
    let output = Command::new("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args(["get", "crd", "-o", "name"])
        .output()
        .await
        .unwrap();
    let crds = String::from_utf8_lossy(&output.stdout);
    assert!(
        crds.contains(
            "customresourcedefinition.apiextensions.k8s.io/connectionoverrides.dpc-operator.io"
        ),
        "{crds}"
    );
    emu.kill().await.unwrap();
}
