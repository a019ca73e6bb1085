use super::*;
use crate::api::fixtures::account_spec;

fn found(environment: &str, remote: Value) -> Found {
    Found {
        environment: environment.into(),
        remote: serde_json::from_value(remote).unwrap(),
    }
}

fn options() -> Options {
    Options {
        project_id: "3c90c3cc-0d44-4b50-8888-8dd25736052a".into(),
        namespace: Some("data".into()),
        account: account_ref("dpc").unwrap(),
        manage: false,
    }
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[test]
fn names_are_dns_labels_unique_and_keep_to_themselves() {
    let long = "x".repeat(80);
    let pairs = [
        ("Prod EU", "Sales Force (EU)"),
        ("dev", "sales force"),
        ("dev", "Sales_Force"),
        ("dev", long.as_str()),
        ("---", "***"),
        ("QA", "snowflake_main.v2"),
    ];
    let names = object_names(&pairs);
    assert_eq!(names[0], "prod-eu-sales-force-eu");
    assert_eq!(names[5], "qa-snowflake-main-v2");
    assert_eq!(names[4], "override");
    assert!(names[1].starts_with("dev-sales-force-") && names[2].starts_with("dev-sales-force-"));
    assert_ne!(names[1], names[2]);
    assert!(
        names[3].starts_with("dev-xxx") && names[3].len() == 63,
        "{}",
        names[3]
    );
    for name in &names {
        assert!(is_dns_label(name), "{name}");
    }
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len());
    // A name that collides with nothing does not depend on the other pairs.
    assert_eq!(object_names(&pairs[..1]), names[..1]);
    assert_eq!(object_names(&pairs[1..3]), names[1..3]);
}

#[test]
fn names_stay_unique_when_a_plain_name_equals_another_pairs_hashed_name() {
    // "Sales Force" and "sales-force" share a plain name, so both end in a hash; a third
    // connection is named exactly as the first one's hashed name.
    let hashed = short_hash("PROD", "Sales Force", 4);
    let third = format!("Sales Force {hashed}");
    let pairs = [
        ("PROD", "Sales Force"),
        ("PROD", "sales-force"),
        ("PROD", third.as_str()),
    ];
    let names = object_names(&pairs);
    let unique: std::collections::BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), 3, "{names:?}");
    for name in &names {
        assert!(is_dns_label(name), "{name}");
    }
    // The same pairs in another order get the same names; a re-import prints them again.
    let mut reversed = pairs;
    reversed.reverse();
    let mut again = object_names(&reversed);
    again.reverse();
    assert_eq!(again, names);
    // Rendered, the three objects have three names.
    let items: Vec<Found> = pairs
        .iter()
        .map(|(env, conn)| {
            found(
                env,
                json!({"name": conn, "connectionOverrides": {"connectionProperties": {"secretName": "s"}}}),
            )
        })
        .collect();
    let rendered = overrides(&items, &options());
    let printed: std::collections::BTreeSet<&str> = rendered
        .documents
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(printed.len(), 3);
}

#[test]
fn an_override_with_a_field_no_spec_can_hold_is_skipped_naming_the_field() {
    let items = [found(
        "PROD",
        json!({"name": "A", "connectionOverrides": {
            "connectionProperties": {"secretName": "a"},
            "rotation": {"days": 30},
            "nothing": null}}),
    )];
    let rendered = overrides(&items, &options());
    assert!(rendered.documents.is_empty());
    assert_eq!(rendered.skipped.len(), 1);
    assert!(
        rendered.skipped[0].contains("connectionOverrides.rotation"),
        "{}",
        rendered.skipped[0]
    );
    assert!(!rendered.skipped[0].contains("nothing"));
}

#[test]
fn output_does_not_depend_on_the_order_dpc_listed_in() {
    let items = vec![
        found(
            "dev",
            json!({"name": "B", "connectionOverrides": {"connectionProperties": {"secretName": "b"}}}),
        ),
        found(
            "Prod",
            json!({"name": "A", "authType": "GENERIC_SECRET", "connectionOverrides": {"connectionProperties": {"secretName": "a", "secretKey": "k"}}}),
        ),
        found(
            "dev",
            json!({"name": "A", "connectionOverrides": {"connectionProperties": {"secretName": "c"}}}),
        ),
    ];
    let mut reversed = items.clone();
    reversed.reverse();
    let first = overrides(&items, &options());
    let second = overrides(&reversed, &options());
    assert_eq!(first.documents, second.documents);
    let order: Vec<(&str, &str)> = first
        .documents
        .iter()
        .map(|d| {
            (
                d["spec"]["environmentName"].as_str().unwrap(),
                d["spec"]["connectionName"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(order, [("Prod", "A"), ("dev", "A"), ("dev", "B")]);
    assert_eq!(
        crate::import::yaml::stream(&first.documents),
        crate::import::yaml::stream(&second.documents)
    );
}

#[test]
fn a_printed_object_reads_back_as_the_override_dpc_holds() {
    let item = found(
        "Prod EU",
        json!({"name": "Sales Force", "authType": "OAUTH_CLIENT_CRED", "connectionOverrides": {
            "secretsLocation": {"type": "AZURE_KEY_VAULT", "vaultName": "v", "region": null},
            "connectionProperties": {"secretName": "prod/sf", "secretKey": "true"}}}),
    );
    let rendered = overrides(&[item], &options());
    assert!(rendered.skipped.is_empty() && rendered.notes.is_empty());
    let text = crate::import::yaml::stream(&rendered.documents);
    let back: Vec<ConnectionOverride> = serde_saphyr::from_multiple(&text).unwrap();
    let spec = &back[0].spec;
    assert_eq!(back[0].metadata.namespace.as_deref(), Some("data"));
    assert_eq!(spec.connection_name, "Sales Force");
    assert_eq!(spec.auth_type, Some(AuthType::OauthClientCred));
    assert_eq!(spec.management_policy, Some(ManagementPolicy::ObserveOnly));
    assert_eq!(spec.deletion_policy, Some(DeletionPolicy::Orphan));
    let location = spec.connection_overrides.secrets_location.clone().unwrap();
    assert_eq!(
        (location.type_.as_str(), location.region),
        ("AZURE_KEY_VAULT", None)
    );
    assert_eq!(
        location.extra,
        BTreeMap::from([("vaultName".to_string(), json!("v"))])
    );
    assert_eq!(
        spec.connection_overrides.connection_properties,
        BTreeMap::from([
            ("secretKey".to_string(), "true".to_string()),
            ("secretName".to_string(), "prod/sf".to_string())
        ])
    );
    let managed = Options {
        manage: true,
        ..options()
    };
    let rendered = overrides(
        &[found(
            "E",
            json!({"name": "C", "connectionOverrides": {"connectionProperties": {"secretName": "x"}}}),
        )],
        &managed,
    );
    assert_eq!(rendered.documents[0]["spec"]["managementPolicy"], "Manage");
}

#[test]
fn overrides_no_spec_can_describe_are_skipped_with_the_reason() {
    let cases = [
        (
            json!({"name": "N", "connectionOverrides": {"connectionProperties": {"port": 5432}}}),
            "connectionProperties.port is a number",
        ),
        (
            json!({"name": "N", "connectionOverrides": {"connectionProperties": {}}}),
            "no connectionProperties",
        ),
        (json!({"name": "N"}), "no connectionOverrides"),
        (
            json!({"name": "A,B", "connectionOverrides": {"connectionProperties": {"secretName": "x"}}}),
            "contains a comma",
        ),
        (
            json!({"connectionOverrides": {"connectionProperties": {"secretName": "x"}}}),
            "without a connection name",
        ),
        (
            json!({"name": "N", "connectionOverrides": {"secretsLocation": {"region": "r"}, "connectionProperties": {"secretName": "x"}}}),
            "secretsLocation has no type",
        ),
        (
            json!({"name": "N", "connectionOverrides": {"secretsLocation": "AWS", "connectionProperties": {"secretName": "x"}}}),
            "secretsLocation is a string",
        ),
    ];
    for (remote, reason) in cases {
        let rendered = overrides(&[found("E", remote.clone())], &options());
        assert!(rendered.documents.is_empty(), "{remote}");
        assert_eq!(rendered.skipped.len(), 1, "{remote}");
        assert!(
            rendered.skipped[0].contains(reason),
            "{}",
            rendered.skipped[0]
        );
        assert!(
            rendered.skipped[0].contains("in environment \"E\""),
            "{}",
            rendered.skipped[0]
        );
    }
    let unknown_auth = json!({"name": "N", "authType": "KERBEROS", "connectionOverrides": {"connectionProperties": {"secretName": "x"}}});
    let rendered = overrides(&[found("E", unknown_auth)], &options());
    assert_eq!(rendered.documents.len(), 1);
    assert!(rendered.documents[0]["spec"].get("authType").is_none());
    assert!(
        rendered.notes[0].contains("authType \"KERBEROS\""),
        "{:?}",
        rendered.notes
    );
}

#[test]
fn account_references_and_the_account_stub() {
    let cluster = account_ref("ClusterDpcAccount/shared").unwrap();
    assert_eq!(
        (cluster.name.as_str(), cluster.kind),
        ("shared", Some(AccountKind::ClusterDpcAccount))
    );
    assert_eq!(account_ref("DpcAccount/a.b-c").unwrap().kind, None);
    assert!(
        account_ref("Secret/x")
            .unwrap_err()
            .contains("the kind must be")
    );
    assert!(
        account_ref("Bad_Name")
            .unwrap_err()
            .contains("not a valid Kubernetes object name")
    );
    assert!(account_ref("").is_err());

    let mut spec = account_spec("real-creds");
    spec.api_url = Some("https://eu1.api.matillion.com/dpc".into());
    spec.requests_per_minute = Some(600);
    let [secret, account] = account("acme", Some("data"), &spec);
    assert_eq!(
        secret["metadata"],
        json!({"name": "acme-credentials", "namespace": "data"})
    );
    assert_eq!(
        secret["stringData"],
        json!({"client_id": "<an API client id of your DPC account>", "client_secret": "<its client secret>"})
    );
    assert_eq!(
        account["spec"]["credentialsSecretRef"]["name"],
        "acme-credentials"
    );
    assert_eq!(
        account["spec"]["apiUrl"],
        "https://eu1.api.matillion.com/dpc"
    );
    assert!(account["spec"].get("requestsPerMinute").is_none());
    let typed: crate::api::DpcAccount = serde_json::from_value(account).unwrap();
    assert_eq!(typed.metadata.name.as_deref(), Some("acme"));
}
