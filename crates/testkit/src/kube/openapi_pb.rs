//! `/openapi/v2` in the protobuf form kubectl asks for (it validates the items of a `kind:
//! List` against it on the client): the messages of gnostic's `openapi_v2` package that a
//! Swagger document with definitions needs, declared with the tags of that package's `.proto`
//! and encoded by `prost`. No published crate carries these generated types, so the subset
//! is declared here; what is not needed (paths, parameters, security) is left out, which
//! decoders skip as absent.

use prost::Message;
use serde_json::Value;

#[derive(Clone, PartialEq, Message)]
pub struct Document {
    #[prost(string, tag = "1")]
    pub swagger: String,
    #[prost(message, optional, tag = "2")]
    pub info: Option<Info>,
    #[prost(message, optional, tag = "9")]
    pub definitions: Option<Definitions>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Info {
    #[prost(string, tag = "1")]
    pub title: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Definitions {
    #[prost(message, repeated, tag = "1")]
    pub additional_properties: Vec<NamedSchema>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NamedSchema {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Schema>,
}

/// A value of any type, as gnostic carries it: its YAML text (JSON is YAML).
#[derive(Clone, PartialEq, Message)]
pub struct Any {
    #[prost(string, tag = "2")]
    pub yaml: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct NamedAny {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<Any>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TypeItem {
    #[prost(string, repeated, tag = "1")]
    pub value: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ItemsItem {
    #[prost(message, repeated, tag = "1")]
    pub schema: Vec<Schema>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Properties {
    #[prost(message, repeated, tag = "1")]
    pub additional_properties: Vec<NamedSchema>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AdditionalPropertiesItem {
    #[prost(oneof = "additional::Oneof", tags = "1, 2")]
    pub oneof: Option<additional::Oneof>,
}

pub mod additional {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Oneof {
        #[prost(message, tag = "1")]
        Schema(Box<super::Schema>),
        #[prost(bool, tag = "2")]
        Boolean(bool),
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct Schema {
    #[prost(string, tag = "1")]
    pub r#ref: String,
    #[prost(string, tag = "2")]
    pub format: String,
    #[prost(string, tag = "3")]
    pub title: String,
    #[prost(string, tag = "4")]
    pub description: String,
    #[prost(message, optional, tag = "5")]
    pub default: Option<Any>,
    #[prost(double, tag = "7")]
    pub maximum: f64,
    #[prost(bool, tag = "8")]
    pub exclusive_maximum: bool,
    #[prost(double, tag = "9")]
    pub minimum: f64,
    #[prost(bool, tag = "10")]
    pub exclusive_minimum: bool,
    #[prost(int64, tag = "11")]
    pub max_length: i64,
    #[prost(int64, tag = "12")]
    pub min_length: i64,
    #[prost(string, tag = "13")]
    pub pattern: String,
    #[prost(int64, tag = "14")]
    pub max_items: i64,
    #[prost(int64, tag = "15")]
    pub min_items: i64,
    #[prost(string, repeated, tag = "19")]
    pub required: Vec<String>,
    #[prost(message, repeated, tag = "20")]
    pub r#enum: Vec<Any>,
    #[prost(message, optional, boxed, tag = "21")]
    pub additional_properties: Option<Box<AdditionalPropertiesItem>>,
    #[prost(message, optional, tag = "22")]
    pub r#type: Option<TypeItem>,
    #[prost(message, optional, tag = "23")]
    pub items: Option<ItemsItem>,
    #[prost(message, repeated, tag = "24")]
    pub all_of: Vec<Schema>,
    #[prost(message, optional, tag = "25")]
    pub properties: Option<Properties>,
    #[prost(message, repeated, tag = "31")]
    pub vendor_extension: Vec<NamedAny>,
}

fn any(value: &Value) -> Any {
    Any {
        yaml: serde_json::to_string(value).expect("JSON serializes"),
    }
}

fn named_schemas(map: Option<&Value>) -> Vec<NamedSchema> {
    map.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(name, s)| NamedSchema {
                    name: name.clone(),
                    value: Some(schema(s)),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One JSON schema as its message.
fn schema(json: &Value) -> Schema {
    let text = |k: &str| {
        json.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let int = |k: &str| json.get(k).and_then(Value::as_i64).unwrap_or(0);
    let float = |k: &str| json.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let flag = |k: &str| json.get(k).and_then(Value::as_bool).unwrap_or(false);
    let types = match json.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let items = match json.get("items") {
        Some(Value::Array(list)) => Some(list.iter().map(schema).collect()),
        Some(one @ Value::Object(_)) => Some(vec![schema(one)]),
        _ => None,
    };
    let additional = match json.get("additionalProperties") {
        Some(Value::Bool(b)) => Some(additional::Oneof::Boolean(*b)),
        Some(s @ Value::Object(_)) => Some(additional::Oneof::Schema(Box::new(schema(s)))),
        _ => None,
    };
    Schema {
        r#ref: text("$ref"),
        format: text("format"),
        title: text("title"),
        description: text("description"),
        default: json.get("default").map(any),
        maximum: float("maximum"),
        exclusive_maximum: flag("exclusiveMaximum"),
        minimum: float("minimum"),
        exclusive_minimum: flag("exclusiveMinimum"),
        max_length: int("maxLength"),
        min_length: int("minLength"),
        pattern: text("pattern"),
        max_items: int("maxItems"),
        min_items: int("minItems"),
        required: json
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(|n| n.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        r#enum: json
            .get("enum")
            .and_then(Value::as_array)
            .map(|e| e.iter().map(any).collect())
            .unwrap_or_default(),
        additional_properties: additional
            .map(|a| Box::new(AdditionalPropertiesItem { oneof: Some(a) })),
        r#type: (!types.is_empty()).then_some(TypeItem { value: types }),
        items: items.map(|schema| ItemsItem { schema }),
        all_of: json
            .get("allOf")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(schema).collect())
            .unwrap_or_default(),
        properties: json.get("properties").map(|p| Properties {
            additional_properties: named_schemas(Some(p)),
        }),
        vendor_extension: json
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with("x-"))
                    .map(|(k, v)| NamedAny {
                        name: k.clone(),
                        value: Some(any(v)),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A Swagger 2.0 document (JSON) as protobuf bytes.
pub fn encode(document: &Value) -> Vec<u8> {
    let info = document.get("info");
    let field = |k: &str| {
        info.and_then(|i| i.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    Document {
        swagger: document
            .get("swagger")
            .and_then(Value::as_str)
            .unwrap_or("2.0")
            .into(),
        info: Some(Info {
            title: field("title"),
            version: field("version"),
        }),
        definitions: Some(Definitions {
            additional_properties: named_schemas(document.get("definitions")),
        }),
    }
    .encode_to_vec()
}

/// The media type of the answer (kubectl asks for the older spelling with `@v1.0`, which is
/// not a valid media type to answer with).
pub const MEDIA_TYPE: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn definitions_keep_types_properties_and_extensions() {
        let doc = json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1"},
            "definitions": {"a.B": {"type": "object", "required": ["spec"],
                "properties": {"spec": {"type": "object", "additionalProperties": {"type": "string"}},
                               "list": {"type": "array", "items": {"type": "integer", "format": "int64"}}},
                "x-kubernetes-group-version-kind": [{"group": "a", "version": "v1", "kind": "B"}]}}});
        let decoded = Document::decode(encode(&doc).as_slice()).unwrap();
        let b = &decoded.definitions.unwrap().additional_properties[0];
        assert_eq!(b.name, "a.B");
        let s = b.value.as_ref().unwrap();
        assert_eq!(s.r#type.as_ref().unwrap().value, ["object"]);
        assert_eq!(s.required, ["spec"]);
        assert_eq!(
            s.vendor_extension[0].name,
            "x-kubernetes-group-version-kind"
        );
        let props = &s.properties.as_ref().unwrap().additional_properties;
        assert_eq!(props[0].name, "list");
        assert_eq!(
            props[0]
                .value
                .as_ref()
                .unwrap()
                .items
                .as_ref()
                .unwrap()
                .schema[0]
                .format,
            "int64"
        );
        assert!(matches!(
            props[1]
                .value
                .as_ref()
                .unwrap()
                .additional_properties
                .as_ref()
                .unwrap()
                .oneof,
            Some(additional::Oneof::Schema(_))
        ));
    }
}
