//! The DPC client against the simulator over real HTTP: exact requests, token handling,
//! the shapes the API facts leave open, and how failures are classified.

use std::collections::BTreeMap;
use std::time::Duration;

use dpc_operator::api::DpcAccountSpec;
use dpc_operator::dpc::error::TransportKind;
use dpc_operator::dpc::{
    AccountHandle, AccountKey, ClientSettings, Credentials, DpcClient, DpcError, Endpoint,
    ErrorClass, OverrideRequest, OverrideValues, Rate, SecretString,
};

const FAST: Rate = Rate {
    requests_per_minute: 60_000,
    burst: 100,
};
use dpc_testkit::dpc::{AuthSeen, DpcSim, Fault, FaultKind, ListShape, SimConfig, SimOp};
use serde_json::json;

const PROJECT: &str = "3c90c3cc-0d44-4b50-8888-8dd25736052a";
const CLIENT_ID: &str = "client-a";
const CLIENT_SECRET: &str = "s3cr3t-client-value";

fn settings() -> ClientSettings {
    ClientSettings {
        allow_insecure_http: true,
        request_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(500),
        default_retry_after: Duration::from_secs(1),
        max_admission_wait: Duration::from_secs(5),
        allowed_hosts: vec!["127.0.0.1".into()],
    }
}

fn endpoint(sim: &DpcSim, account_id: Option<&str>) -> Endpoint {
    let spec = DpcAccountSpec {
        api_url: Some(sim.api_url()),
        token_url: Some(sim.token_url()),
        account_id: account_id.map(String::from),
        ..dpc_operator::api::fixtures::account_spec("unused")
    };
    Endpoint::for_account(&spec, &settings()).unwrap()
}

async fn setup(config: SimConfig) -> (DpcSim, AccountHandle) {
    let sim = DpcSim::start(config).await.unwrap();
    sim.add_client(CLIENT_ID, CLIENT_SECRET);
    let client = DpcClient::new(settings());
    let handle = client.account(
        AccountKey {
            namespace: Some("ns".into()),
            name: "acct".into(),
        },
        endpoint(&sim, Some("acc-42")),
        Credentials {
            client_id: SecretString::new(CLIENT_ID),
            client_secret: SecretString::new(CLIENT_SECRET),
        },
        FAST,
    );
    (sim, handle)
}

fn request(connection: &str, secret_name: &str) -> OverrideRequest {
    OverrideRequest {
        environment_name: "PROD".into(),
        connection_name: connection.into(),
        auth_type: None,
        connection_overrides: OverrideValues {
            secrets_location: Some(json!({"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"})),
            connection_properties: BTreeMap::from([(
                "secretName".to_string(),
                secret_name.to_string(),
            )]),
        },
    }
}

#[tokio::test]
async fn token_is_fetched_once_with_the_documented_form_and_reused() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    dpc.create(PROJECT, &request("A", "prod/a")).await.unwrap();
    dpc.list(PROJECT, "PROD").await.unwrap();

    let calls = sim.calls();
    let ops: Vec<SimOp> = calls.iter().map(|c| c.op).collect();
    assert_eq!(ops, [SimOp::Token, SimOp::Create, SimOp::List]);
    let token = &calls[0];
    assert_eq!(
        token.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        token.body.as_ref().unwrap(),
        &json!({
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": "<matches>",
            "audience": "https://api.matillion.com",
        })
    );
    for call in &calls[1..] {
        assert_eq!(
            call.auth,
            AuthSeen::Valid {
                client_id: CLIENT_ID.into()
            }
        );
        assert_eq!(call.account_id.as_deref(), Some("acc-42"));
    }
    let create = &calls[1];
    assert_eq!(create.method, "POST");
    assert_eq!(
        create.path,
        format!("/dpc/v1/projects/{PROJECT}/connections/environment-overrides")
    );
    assert_eq!(create.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        create.body.as_ref().unwrap(),
        &json!({
            "environmentName": "PROD",
            "connectionName": "A",
            "connectionOverrides": {
                "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1"},
                "connectionProperties": {"secretName": "prod/a"}
            }
        })
    );
    assert_eq!(
        calls[2].query.as_deref(),
        Some("environmentName=PROD&size=100")
    );
}

#[tokio::test]
async fn unauthorized_gets_one_new_token_and_one_retry() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    dpc.ensure_token().await.unwrap();
    sim.revoke_tokens();
    sim.clear_calls();

    dpc.create(PROJECT, &request("A", "prod/a")).await.unwrap();

    let calls = sim.calls();
    let summary: Vec<(SimOp, Option<u16>)> = calls.iter().map(|c| (c.op, c.status)).collect();
    assert_eq!(
        summary,
        [
            (SimOp::Create, Some(401)),
            (SimOp::Token, Some(200)),
            (SimOp::Create, Some(201))
        ]
    );
    assert_eq!(calls[0].auth, AuthSeen::Expired);
}

#[tokio::test]
async fn unauthorized_twice_is_credentials_rejected_without_a_loop() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    sim.push_fault(Fault::status(SimOp::Create, 401).times(2));

    let err = dpc
        .create(PROJECT, &request("A", "prod/a"))
        .await
        .unwrap_err();

    assert_eq!(err.class(), ErrorClass::CredentialsRejected);
    let ops: Vec<SimOp> = sim.calls().iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [SimOp::Token, SimOp::Create, SimOp::Token, SimOp::Create]
    );
}

#[tokio::test]
async fn wrong_client_secret_is_credentials_rejected_and_not_echoed() {
    let sim = DpcSim::start(SimConfig::default()).await.unwrap();
    sim.add_client(CLIENT_ID, "the-right-one");
    let dpc = DpcClient::new(settings()).account(
        AccountKey {
            namespace: None,
            name: "a".into(),
        },
        endpoint(&sim, None),
        Credentials {
            client_id: SecretString::new(CLIENT_ID),
            client_secret: SecretString::new(CLIENT_SECRET),
        },
        FAST,
    );
    let err = dpc.ensure_token().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::CredentialsRejected);
    let text = format!("{err} {err:?}");
    assert!(text.contains("invalid_client"), "{text}");
    assert!(!text.contains(CLIENT_SECRET));
    assert_eq!(
        sim.calls()[0].body.as_ref().unwrap()["client_secret"],
        "<wrong>"
    );
}

#[tokio::test]
async fn create_conflict_and_update_not_found_are_classified() {
    let (_sim, dpc) = setup(SimConfig::default()).await;
    let missing = dpc.update(PROJECT, &request("A", "x")).await.unwrap_err();
    assert_eq!(missing.class(), ErrorClass::NotFound);
    assert_eq!(missing.status(), Some(404));

    let created = dpc.create(PROJECT, &request("A", "x")).await.unwrap();
    assert_eq!(created.status, 201);
    assert_eq!(
        created.remote.unwrap().created_by.as_deref(),
        Some(CLIENT_ID)
    );

    let conflict = dpc.create(PROJECT, &request("A", "x")).await.unwrap_err();
    assert_eq!(conflict.class(), ErrorClass::Conflict);
    let updated = dpc.update(PROJECT, &request("A", "y")).await.unwrap();
    assert_eq!(updated.status, 200);
}

#[tokio::test]
async fn post_as_upsert_and_empty_success_bodies_are_accepted() {
    let config = SimConfig {
        post_upserts: true,
        create_status: 200,
        update_status: 204,
        ..SimConfig::default()
    };
    let (sim, dpc) = setup(config).await;
    dpc.create(PROJECT, &request("A", "one")).await.unwrap();
    let again = dpc.create(PROJECT, &request("A", "two")).await.unwrap();
    assert_eq!(again.status, 200);
    let stored = sim.get_override(PROJECT, "PROD", "A").unwrap();
    assert_eq!(
        stored.connection_overrides["connectionProperties"]["secretName"],
        "two"
    );
    let empty = dpc.update(PROJECT, &request("A", "three")).await.unwrap();
    assert_eq!((empty.status, empty.remote), (204, None));
}

#[tokio::test]
async fn problem_details_parse_under_either_media_type() {
    for media_type in ["application/problem+json", "application/json"] {
        let config = SimConfig {
            problem_media_type: media_type.into(),
            ..SimConfig::default()
        };
        let (_sim, dpc) = setup(config).await;
        let mut bad = request("A", "x");
        bad.connection_overrides.connection_properties.clear();
        let err = dpc.create(PROJECT, &bad).await.unwrap_err();
        assert_eq!(err.class(), ErrorClass::Rejected, "{media_type}");
        assert_eq!(
            err.to_string(),
            "DPC answered 400 to create: Bad Request: Invalid environment connection override \
             (violations: connectionOverrides.connectionProperties.secretName is required)"
        );
    }
}

#[tokio::test]
async fn list_reads_arrays_single_objects_and_every_envelope_page() {
    for shape in [ListShape::Array, ListShape::Single, ListShape::Envelope] {
        let config = SimConfig {
            list_shape: shape,
            max_page_size: 2,
            ..SimConfig::default()
        };
        let (sim, dpc) = setup(config).await;
        dpc.create(PROJECT, &request("Only", "x")).await.unwrap();
        let one = dpc.list(PROJECT, "PROD").await.unwrap();
        assert_eq!(one.len(), 1, "{shape:?}");
        assert_eq!(one[0].name.as_deref(), Some("Only"));

        for i in 0..4 {
            dpc.create(PROJECT, &request(&format!("C{i}"), "x"))
                .await
                .unwrap();
        }
        sim.clear_calls();
        let all = dpc.list(PROJECT, "PROD").await.unwrap();
        let mut names: Vec<String> = all.into_iter().filter_map(|o| o.name).collect();
        names.sort();
        assert_eq!(names, ["C0", "C1", "C2", "C3", "Only"], "{shape:?}");
        let list_calls = sim.calls_of(SimOp::List).len();
        let expected = if shape == ListShape::Envelope { 3 } else { 1 };
        assert_eq!(list_calls, expected, "{shape:?}");
    }
}

#[tokio::test]
async fn delete_encodes_names_and_treats_404_as_done() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    dpc.create(PROJECT, &request("Sales EU", "x"))
        .await
        .unwrap();
    sim.clear_calls();

    dpc.delete(PROJECT, "PROD", &["Sales EU".to_string()])
        .await
        .unwrap();
    let deletes = sim.calls_of(SimOp::Delete);
    assert_eq!(deletes.len(), 1);
    assert_eq!(
        deletes[0].query.as_deref(),
        Some("environmentName=PROD&connectionNames=Sales%20EU")
    );
    assert_eq!(deletes[0].status, Some(204));
    assert!(sim.overrides().is_empty());
    // A plain name needs no confirming list.
    assert_eq!(sim.calls().len(), 1);

    dpc.delete(PROJECT, "PROD", &["Sales EU".to_string()])
        .await
        .unwrap();
    assert_eq!(sim.calls_of(SimOp::Delete)[1].status, Some(404));
}

#[tokio::test]
async fn a_name_with_a_comma_is_never_sent_to_delete() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    dpc.create(PROJECT, &request("Sales", "keep"))
        .await
        .unwrap();
    dpc.create(PROJECT, &request("Sales, EU", "x"))
        .await
        .unwrap();
    sim.clear_calls();
    // The simulator decodes before it splits, as common frameworks do: `Sales%2C%20EU`
    // would have deleted `Sales`.
    let err = dpc
        .delete(PROJECT, "PROD", &["Sales, EU".to_string()])
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured);
    assert!(err.to_string().contains("contains a comma"), "{err}");
    assert!(sim.calls().is_empty(), "{:?}", sim.calls());
    assert_eq!(sim.overrides().len(), 2);
}

#[tokio::test]
async fn an_unusual_name_is_confirmed_gone_by_a_list_after_delete() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    let name = "Sales & EU (100%)";
    dpc.create(PROJECT, &request(name, "x")).await.unwrap();
    dpc.create(PROJECT, &request("Other", "y")).await.unwrap();
    sim.clear_calls();
    dpc.delete(PROJECT, "PROD", &[name.to_string()])
        .await
        .unwrap();
    let ops: Vec<SimOp> = sim.calls().iter().map(|c| c.op).collect();
    assert_eq!(ops, [SimOp::Delete, SimOp::List]);
    assert_eq!(
        sim.calls()[0].query.as_deref(),
        Some("environmentName=PROD&connectionNames=Sales%20%26%20EU%20%28100%25%29")
    );
    let left: Vec<String> = sim
        .overrides()
        .into_iter()
        .map(|o| o.connection_name)
        .collect();
    assert_eq!(left, ["Other"]);
}

#[tokio::test]
async fn too_many_names_are_split_over_several_deletes() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    let names: Vec<String> = (0..300)
        .map(|i| format!("connection-with-a-long-name-{i:04}"))
        .collect();
    for name in &names[..3] {
        dpc.create(PROJECT, &request(name, "x")).await.unwrap();
    }
    dpc.delete(PROJECT, "PROD", &names).await.unwrap();
    let deletes = sim.calls_of(SimOp::Delete);
    assert!(deletes.len() > 1, "one URL would hold all 300 names");
    let mut seen = 0;
    for call in &deletes {
        let url_len =
            sim.base_url().len() + call.path.len() + 1 + call.query.as_ref().unwrap().len();
        assert!(url_len <= 2000, "{url_len}");
        seen += call.param("connectionNames").unwrap().split(',').count();
    }
    assert_eq!(seen, 300);
    assert!(sim.overrides().is_empty());
}

#[tokio::test]
async fn rate_limited_answer_holds_every_call_of_the_account() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    sim.push_fault(Fault::on(
        SimOp::Create,
        FaultKind::Status {
            status: 429,
            retry_after: Some("2".into()),
            body: None,
        },
    ));
    let err = dpc.create(PROJECT, &request("A", "x")).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));

    let calls_before = sim.calls().len();
    let held = dpc.list(PROJECT, "PROD").await.unwrap_err();
    assert!(matches!(held, DpcError::Throttled { .. }), "{held:?}");
    assert_eq!(
        sim.calls().len(),
        calls_before,
        "a held call must not reach DPC"
    );
    let remaining = dpc.blocked_for().unwrap();
    assert!(remaining > Duration::from_millis(1500) && remaining <= Duration::from_secs(2));
}

#[tokio::test]
async fn transport_failures_are_transient_with_their_kind() {
    let (sim, dpc) = setup(SimConfig::default()).await;
    dpc.ensure_token().await.unwrap();

    sim.push_fault(Fault::on(SimOp::Create, FaultKind::Reset));
    let reset = dpc.create(PROJECT, &request("A", "x")).await.unwrap_err();
    assert!(
        matches!(
            reset,
            DpcError::Transport {
                kind: TransportKind::Reset,
                ..
            }
        ),
        "{reset:?}"
    );
    assert!(reset.is_transient());

    sim.push_fault(Fault::on(SimOp::Create, FaultKind::Delay { ms: 2000 }));
    let timeout = dpc.create(PROJECT, &request("B", "x")).await.unwrap_err();
    assert!(
        matches!(
            timeout,
            DpcError::Transport {
                kind: TransportKind::Timeout,
                ..
            }
        ),
        "{timeout:?}"
    );

    sim.push_fault(Fault::status(SimOp::Create, 503));
    let unavailable = dpc.create(PROJECT, &request("C", "x")).await.unwrap_err();
    assert_eq!(unavailable.class(), ErrorClass::Transient);

    sim.push_fault(Fault::on(SimOp::List, FaultKind::Malformed));
    let unreadable = dpc.list(PROJECT, "PROD").await.unwrap_err();
    assert!(
        matches!(unreadable, DpcError::Decode { .. }),
        "{unreadable:?}"
    );

    sim.push_fault(Fault::on(SimOp::Create, FaultKind::Malformed));
    let written = dpc.create(PROJECT, &request("D", "x")).await.unwrap();
    assert_eq!(
        written.remote, None,
        "a success with an unreadable body is still a success"
    );
    assert!(sim.get_override(PROJECT, "PROD", "D").is_some());
}

#[tokio::test]
async fn changed_credentials_drop_the_cached_token() {
    let sim = DpcSim::start(SimConfig::default()).await.unwrap();
    sim.add_client("one", "secret-one");
    sim.add_client("two", "secret-two");
    let client = DpcClient::new(settings());
    let key = AccountKey {
        namespace: None,
        name: "acct".into(),
    };
    let creds = |id: &str, secret: &str| Credentials {
        client_id: SecretString::new(id),
        client_secret: SecretString::new(secret),
    };
    client
        .account(
            key.clone(),
            endpoint(&sim, None),
            creds("one", "secret-one"),
            FAST,
        )
        .ensure_token()
        .await
        .unwrap();
    client
        .account(
            key.clone(),
            endpoint(&sim, None),
            creds("one", "secret-one"),
            FAST,
        )
        .ensure_token()
        .await
        .unwrap();
    assert_eq!(sim.calls_of(SimOp::Token).len(), 1);
    let rotated = client.account(key, endpoint(&sim, None), creds("two", "secret-two"), FAST);
    rotated.list(PROJECT, "PROD").await.unwrap();
    assert_eq!(sim.calls_of(SimOp::Token).len(), 2);
    assert_eq!(
        sim.calls_of(SimOp::List)[0].auth,
        AuthSeen::Valid {
            client_id: "two".into()
        }
    );
}

#[tokio::test]
async fn plain_http_is_refused_without_the_flag() {
    let sim = DpcSim::start(SimConfig::default()).await.unwrap();
    let client = DpcClient::new(ClientSettings::default());
    let dpc = client.account(
        AccountKey {
            namespace: None,
            name: "a".into(),
        },
        endpoint(&sim, None),
        Credentials {
            client_id: SecretString::new("x"),
            client_secret: SecretString::new("y"),
        },
        FAST,
    );
    let err = dpc.list(PROJECT, "PROD").await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Misconfigured);
    assert!(err.to_string().contains("--allow-insecure-http"));
    assert!(sim.calls().is_empty());
}

#[tokio::test]
async fn the_simulators_rate_limit_answers_429_with_retry_after() {
    let config = SimConfig {
        rate_limit: Some(dpc_testkit::dpc::RateLimit {
            limit: 3,
            window_ms: 60_000,
            retry_after_secs: Some(7),
        }),
        ..SimConfig::default()
    };
    let (sim, dpc) = setup(config).await;
    dpc.list(PROJECT, "PROD").await.unwrap();
    dpc.list(PROJECT, "PROD").await.unwrap();
    let err = dpc.list(PROJECT, "PROD").await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    let statuses: Vec<Option<u16>> = sim.calls().iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [Some(200), Some(200), Some(200), Some(429)],
        "token, list, list, list"
    );
}

#[tokio::test]
async fn a_token_is_fetched_again_shortly_before_it_expires() {
    let config = SimConfig {
        token_lifetime_secs: 1,
        ..SimConfig::default()
    };
    let (sim, dpc) = setup(config).await;
    dpc.list(PROJECT, "PROD").await.unwrap();
    // A one-second token is refreshed after four fifths of its life; this waits past that.
    tokio::time::sleep(Duration::from_millis(850)).await;
    dpc.list(PROJECT, "PROD").await.unwrap();
    let ops: Vec<(SimOp, Option<u16>)> = sim.calls().iter().map(|c| (c.op, c.status)).collect();
    assert_eq!(
        ops,
        [
            (SimOp::Token, Some(200)),
            (SimOp::List, Some(200)),
            (SimOp::Token, Some(200)),
            (SimOp::List, Some(200))
        ],
        "the second list used a new token without a 401 first"
    );
}
