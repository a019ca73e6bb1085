//! Admission against small schemas: pruning, defaults, schema and rule failures, ratcheting.

use super::*;
use serde_json::json;

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["id"],
                "properties": {
                    "id": {"type": "string", "format": "uuid",
                           "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "id is immutable"}]},
                    "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    "count": {"type": "integer", "minimum": 1, "nullable": true}
                }
            }
        }
    })
}

fn admitted(old: Option<&Value>, mut new: Value, v: FieldValidation) -> Result<Value, Refusal> {
    admit(&Compiled::new(&schema()), old, &mut new, v).map(|_| new)
}

const ID: &str = "0b8e9f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";

#[test]
fn prunes_unknown_fields_keeps_preserved_ones_and_defaults() {
    let out = admitted(
        None,
        json!({"metadata": {"name": "x", "odd": 1}, "spec": {"id": ID, "extra": 1, "free": {"any": 1}, "count": null}}),
        FieldValidation::Warn,
    )
    .unwrap();
    assert_eq!(
        out,
        json!({"metadata": {"name": "x", "odd": 1}, "spec": {"id": ID, "mode": "A", "free": {"any": 1}, "count": null}})
    );
    let Err(Refusal::UnknownFields(fields)) = admitted(
        None,
        json!({"spec": {"id": ID, "extra": 1}}),
        FieldValidation::Strict,
    ) else {
        panic!("strict refuses unknown fields")
    };
    assert_eq!(fields, ["spec.extra"]);
}

#[test]
fn schema_and_rule_failures_name_their_fields() {
    let Err(Refusal::Invalid(errors)) = admitted(
        None,
        json!({"spec": {"id": "nope", "mode": "C", "count": 0}}),
        FieldValidation::Strict,
    ) else {
        panic!("refused")
    };
    let messages: Vec<String> = errors.iter().map(FieldError::message).collect();
    assert!(
        messages.contains(
            &"spec.id: Invalid value: \"nope\": spec.id in body must be of type uuid: \"nope\""
                .to_string()
        ),
        "{messages:?}"
    );
    assert!(
        messages.contains(
            &"spec.mode: Unsupported value: \"C\": supported values: \"A\", \"B\"".to_string()
        ),
        "{messages:?}"
    );
    assert!(messages.contains(&"spec.count: Invalid value: 0: spec.count in body should be greater than or equal to 1".to_string()), "{messages:?}");

    let Err(Refusal::Invalid(errors)) =
        admitted(None, json!({"spec": {}}), FieldValidation::Strict)
    else {
        panic!("refused")
    };
    assert_eq!(errors[0].message(), "spec.id: Required value");
    assert_eq!(errors[0].reason, "FieldValueRequired");
}

#[test]
fn transition_rules_see_the_old_object_and_unchanged_fields_ratchet() {
    let old = json!({"spec": {"id": ID, "mode": "A"}});
    let other = "1b8e9f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
    let Err(Refusal::Invalid(errors)) = admitted(
        Some(&old),
        json!({"spec": {"id": other, "mode": "A"}}),
        FieldValidation::Strict,
    ) else {
        panic!("refused")
    };
    assert_eq!(
        errors[0].message(),
        format!("spec.id: Invalid value: \"{other}\": id is immutable")
    );
    // A stored object that already breaks a rule may still be updated elsewhere.
    let stored = json!({"spec": {"id": ID, "count": 0}});
    assert!(
        admitted(
            Some(&stored),
            json!({"spec": {"id": ID, "count": 0, "mode": "B"}}),
            FieldValidation::Strict
        )
        .is_ok()
    );
}

#[test]
fn a_rule_may_select_a_field_named_namespace() {
    let schema = json!({"type": "object", "properties": {"ref": {"type": "object",
        "x-kubernetes-validations": [{"rule": "has(self.namespace) && self.namespace != '.namespace'", "message": "needs one"}],
        "properties": {"namespace": {"type": "string"}}}}});
    let compiled = Compiled::new(&schema);
    let ok = |mut v: Value| admit(&compiled, None, &mut v, FieldValidation::Strict).is_ok();
    assert!(ok(json!({"ref": {"namespace": "a"}})));
    assert!(!ok(json!({"ref": {}})));
    assert!(!ok(json!({"ref": {"namespace": ".namespace"}})));
}

#[test]
fn a_type_error_holds_the_rules_back() {
    let Err(Refusal::Invalid(errors)) = admitted(
        None,
        json!({"spec": {"id": ID, "count": "many"}}),
        FieldValidation::Strict,
    ) else {
        panic!("refused")
    };
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(
        errors[0].message(),
        "spec.count: Invalid value: \"string\": spec.count in body must be of type integer: \"string\""
    );
    assert!(
        errors[1]
            .detail
            .contains("some validation rules were not checked")
    );
}
