//! The CRDs: `crds/` is exactly what crdgen prints, the shipped examples validate against the
//! generated schema and its CEL rules, and the rules refuse what they should.

use dpc_operator_api::{ConnectionOverride, DpcAccount, crds, crds_yaml};
use kube::core::cel::{validate_cel, validate_cel_update};
use serde_json::{Value, json};

fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(
        &(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests")
            + "/../.."),
    )
    .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn checked_in_crds_match_crdgen() {
    assert!(
        repo_file("crds/crds.yaml") == crds_yaml(),
        "crds/crds.yaml is stale: run `cargo run --bin crdgen > crds/crds.yaml` and commit it"
    );
}

/// The openAPIV3Schema as plain JSON Schema: `nullable` becomes a null type and the
/// Kubernetes extensions are dropped (CEL rules are checked separately).
fn json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                if k.starts_with("x-kubernetes-") || k == "nullable" {
                    continue;
                }
                out.insert(k.clone(), json_schema(v));
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = out.get("type").cloned()
            {
                out.insert("type".into(), json!([t, "null"]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(json_schema).collect()),
        other => other.clone(),
    }
}

fn schema_of(kind: &str) -> jsonschema::Validator {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    jsonschema::validator_for(&json_schema(&schema)).unwrap()
}

fn schema_errors(kind: &str, doc: &Value) -> Vec<String> {
    schema_of(kind)
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn shipped_examples_validate_against_the_schema_and_cel_rules() {
    let mut checked = 0;
    let dir = std::path::Path::new(
        &(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests")
            + "/../.."),
    )
    .join("deploy/examples");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        for doc in docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let where_ = format!("{} {}", path.display(), doc["metadata"]["name"]);
            match kind.as_str() {
                "ConnectionOverride" => {
                    assert_eq!(
                        schema_errors("ConnectionOverride", &doc),
                        Vec::<String>::new(),
                        "{where_}"
                    );
                    let obj: ConnectionOverride = serde_json::from_value(doc).unwrap();
                    validate_cel(&obj).unwrap_or_else(|e| panic!("{where_}: {e:?}"));
                    checked += 1;
                }
                "DpcAccount" => {
                    assert_eq!(
                        schema_errors("DpcAccount", &doc),
                        Vec::<String>::new(),
                        "{where_}"
                    );
                    let obj: DpcAccount = serde_json::from_value(doc).unwrap();
                    validate_cel(&obj).unwrap_or_else(|e| panic!("{where_}: {e:?}"));
                    checked += 1;
                }
                _ => {}
            }
        }
    }
    assert!(
        checked >= 3,
        "the examples hold DpcAccounts and ConnectionOverrides: {checked}"
    );
}

fn example_override() -> Value {
    json!({
        "apiVersion": "dpc-operator.io/v1alpha1",
        "kind": "ConnectionOverride",
        "metadata": {"name": "x", "namespace": "ns"},
        "spec": {
            "accountRef": {"name": "acct"},
            "projectId": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
            "environmentName": "PROD",
            "connectionName": "Salesforce",
            "authType": "OAUTH_CLIENT_CRED",
            "deletionPolicy": "Delete",
            "connectionOverrides": {
                "secretsLocation": {"type": "AWS_SECRET_MANAGER", "region": "eu-west-1", "vault": "kept"},
                "connectionProperties": {"secretName": "prod/sf"},
                "connectionPropertiesFrom": [{"property": "secretKey", "secretKeyRef": {"name": "refs", "key": "k"}}]
            }
        }
    })
}

#[test]
fn schema_refuses_bad_ids_enums_and_empty_names() {
    assert_eq!(
        schema_errors("ConnectionOverride", &example_override()),
        Vec::<String>::new()
    );
    let cases = [
        (
            "/spec/projectId",
            json!("3C90C3CC-0D44-4B50-8888-8DD25736052A"),
        ),
        ("/spec/projectId", json!("not-a-uuid")),
        ("/spec/authType", json!("PASSWORD")),
        ("/spec/environmentName", json!("")),
        ("/spec/connectionName", json!("")),
        ("/spec/accountRef/name", json!("")),
        ("/spec/deletionPolicy", json!("Keep")),
        ("/spec/connectionOverrides/secretsLocation/type", json!("")),
    ];
    for (pointer, value) in cases {
        let mut doc = example_override();
        *doc.pointer_mut(pointer)
            .unwrap_or_else(|| panic!("{pointer}")) = value.clone();
        assert!(
            !schema_errors("ConnectionOverride", &doc).is_empty(),
            "{pointer} = {value} must be refused"
        );
    }
}

fn cov(doc: Value) -> ConnectionOverride {
    serde_json::from_value(doc).unwrap()
}

#[test]
fn cel_refuses_a_property_named_twice_and_a_source_count_other_than_one() {
    assert!(validate_cel(&cov(example_override())).is_ok());

    let mut both = example_override();
    both["spec"]["connectionOverrides"]["connectionProperties"]["secretKey"] = json!("literal");
    let err = format!("{:?}", validate_cel(&cov(both)).unwrap_err());
    assert!(
        err.contains("both in connectionProperties and in connectionPropertiesFrom"),
        "{err}"
    );

    let mut two_sources = example_override();
    two_sources["spec"]["connectionOverrides"]["connectionPropertiesFrom"][0]["configMapKeyRef"] =
        json!({"name": "m", "key": "k"});
    let err = format!("{:?}", validate_cel(&cov(two_sources)).unwrap_err());
    assert!(
        err.contains("exactly one of secretKeyRef and configMapKeyRef"),
        "{err}"
    );

    let mut none = example_override();
    none["spec"]["connectionOverrides"]["connectionProperties"] = json!({});
    none["spec"]["connectionOverrides"]["connectionPropertiesFrom"] = json!([]);
    let err = format!("{:?}", validate_cel(&cov(none)).unwrap_err());
    assert!(err.contains("at least one property"), "{err}");
}

#[test]
fn cel_makes_the_key_fields_immutable() {
    let old = cov(example_override());
    for (pointer, value, message) in [
        (
            "/spec/projectId",
            json!("00000000-0000-4000-8000-000000000000"),
            "projectId is immutable",
        ),
        (
            "/spec/environmentName",
            json!("DEV"),
            "environmentName is immutable",
        ),
        (
            "/spec/connectionName",
            json!("Other"),
            "connectionName is immutable",
        ),
        (
            "/spec/accountRef",
            json!({"name": "other"}),
            "accountRef is immutable",
        ),
    ] {
        let mut doc = example_override();
        *doc.pointer_mut(pointer).unwrap() = value;
        let err = format!("{:?}", validate_cel_update(&cov(doc), &old).unwrap_err());
        assert!(err.contains(message), "{pointer}: {err}");
    }
    let mut fine = example_override();
    fine["spec"]["connectionOverrides"]["connectionProperties"]["secretName"] = json!("prod/other");
    assert!(
        validate_cel_update(&cov(fine), &old).is_ok(),
        "the override values may change"
    );
}

#[test]
fn an_account_needs_a_region_or_an_api_url() {
    let account = |spec: Value| -> DpcAccount {
        serde_json::from_value(json!({"apiVersion": "dpc-operator.io/v1alpha1", "kind": "DpcAccount", "metadata": {"name": "a"}, "spec": spec})).unwrap()
    };
    let creds = json!({"name": "creds"});
    assert!(
        validate_cel(&account(
            json!({"region": "eu1", "credentialsSecretRef": creds})
        ))
        .is_ok()
    );
    assert!(
        validate_cel(&account(
            json!({"apiUrl": "https://proxy/dpc", "credentialsSecretRef": creds})
        ))
        .is_ok()
    );
    let err = format!(
        "{:?}",
        validate_cel(&account(json!({"credentialsSecretRef": creds}))).unwrap_err()
    );
    assert!(
        err.contains("one of region and apiUrl is required"),
        "{err}"
    );
    let bad_region = json!({"apiVersion": "x", "kind": "DpcAccount", "metadata": {}, "spec": {"region": "ap1", "credentialsSecretRef": creds}});
    assert!(!schema_errors("DpcAccount", &bad_region).is_empty());
}
