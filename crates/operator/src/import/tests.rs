use super::*;
use crate::dpc::Operation;

#[test]
fn project_ids_are_lower_case_uuids() {
    assert!(is_project_id("3c90c3cc-0d44-4b50-8888-8dd25736052a"));
    for bad in [
        "3C90C3CC-0D44-4B50-8888-8DD25736052A",
        "3c90c3cc0d444b5088888dd25736052a",
        "3c90c3cc-0d44-4b50-8888-8dd25736052",
        "3c90c3cc-0d44-4b50-8888-8dd25736052g",
        "../x",
        "",
    ] {
        assert!(!is_project_id(bad), "{bad}");
    }
}

fn api_error(operation: Operation, status: u16) -> DpcError {
    DpcError::Api {
        operation,
        status,
        problem: None,
        body_excerpt: None,
        retry_after: None,
    }
}

#[test]
fn every_failure_has_its_exit_code() {
    let origin = "DPC_CLIENT_ID/DPC_CLIENT_SECRET";
    let cases = [
        (
            api_error(Operation::Token, 401),
            4,
            "DPC refused the credentials from DPC_CLIENT_ID",
        ),
        (
            api_error(Operation::Environments, 403),
            4,
            "DPC refused the credentials",
        ),
        (
            api_error(Operation::Environments, 404),
            5,
            "project p not found",
        ),
        (
            api_error(Operation::List, 503),
            1,
            "DPC answered 503 to list",
        ),
        (
            DpcError::Decode {
                operation: Operation::List,
                reason: "list answer is not JSON".into(),
            },
            1,
            "could not read DPC's answer to list: list answer is not JSON",
        ),
        (
            DpcError::Misconfigured("plain http".into()),
            2,
            "plain http",
        ),
    ];
    for (error, code, text) in cases {
        let failure = explain(error, "p", origin, "listing");
        assert_eq!(failure.exit_code(), code, "{failure:?}");
        assert!(failure.message().contains(text), "{}", failure.message());
        assert!(failure.message().starts_with("listing failed") || code == 4 || code == 5);
    }
}

#[tokio::test]
async fn transient_failures_are_tried_again_and_unreadable_answers_are_not() {
    let tries = std::sync::atomic::AtomicU32::new(0);
    let result = patiently(|| {
        let n = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n < 1 {
                Err(api_error(Operation::List, 503))
            } else {
                Ok(n)
            }
        }
    })
    .await;
    assert_eq!(result.unwrap(), 1);

    let tries = std::sync::atomic::AtomicU32::new(0);
    let result: Result<(), DpcError> = patiently(|| {
        tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async {
            Err(DpcError::Decode {
                operation: Operation::List,
                reason: "x".into(),
            })
        }
    })
    .await;
    assert!(result.is_err());
    assert_eq!(tries.into_inner(), 1);

    let tries = std::sync::atomic::AtomicU32::new(0);
    let result: Result<(), DpcError> = patiently(|| {
        tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Err(api_error(Operation::Token, 401)) }
    })
    .await;
    assert!(result.is_err());
    assert_eq!(tries.into_inner(), 1, "a refusal is final");
}

#[tokio::test]
async fn arguments_are_checked_before_anything_is_called() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ImportArgs,
    }
    let parse = |extra: &[&str]| {
        let mut argv = vec![
            "import",
            "--project",
            "3c90c3cc-0d44-4b50-8888-8dd25736052a",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    };
    // An unreachable API: any call would fail with something other than these messages.
    let unreachable = [
        "--api-url",
        "https://127.0.0.1:1/dpc",
        "--dpc-allowed-hosts",
        "127.0.0.1",
    ];
    let cases: [(&[&str], &str); 4] = [
        (
            &["--namespace", "Data_Platform"],
            "--namespace \"Data_Platform\" is not a valid namespace",
        ),
        (
            &["--account-ref", "Other/x"],
            "the kind must be DpcAccount or ClusterDpcAccount",
        ),
        (
            &[
                "--with-account",
                "--account-ref",
                "ClusterDpcAccount/shared",
            ],
            "--with-account prints a DpcAccount",
        ),
        (&["--from-account", "no-slash"], "expected NAMESPACE/NAME"),
    ];
    for (extra, expected) in cases {
        let mut all = extra.to_vec();
        if !extra.contains(&"--from-account") {
            all.extend_from_slice(&unreachable);
        }
        let failure = import(&parse(&all)).await.unwrap_err();
        assert_eq!(failure.exit_code(), 2, "{failure:?}");
        assert!(
            failure.message().contains(expected),
            "{}",
            failure.message()
        );
    }
}
