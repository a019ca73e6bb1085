//! A YAML writer for JSON values that gives the same bytes for the same value: keys sorted at
//! every level, block style, and a string left plain only when no YAML 1.1 or 1.2 reader can
//! take it for anything but that string (everything else is double-quoted).

use serde_json::Value;

/// `documents` as a YAML stream, each starting with `---`.
pub fn stream(documents: &[Value]) -> String {
    let mut out = String::new();
    for document in documents {
        out.push_str("---\n");
        match document {
            Value::Object(map) if !map.is_empty() => mapping(map, 0, &mut out),
            other => {
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
    out
}

fn mapping(map: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        out.push_str(&" ".repeat(indent));
        out.push_str(&string(key));
        out.push(':');
        nested(&map[key], indent, out);
    }
}

/// What follows `key:` or `-`: a scalar on the same line, or a block on the next ones.
fn nested(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            mapping(map, indent + 2, out);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            for item in items {
                out.push_str(&" ".repeat(indent + 2));
                out.push('-');
                nested(item, indent + 2, out);
            }
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => string(s),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
    }
}

/// Words YAML 1.1 readers take for booleans or null.
const WORDS: &[&str] = &["y", "n", "yes", "no", "true", "false", "on", "off", "null"];

/// A string, plain when it is safe to be, else double-quoted.
fn string(s: &str) -> String {
    let mut chars = s.chars();
    let plain = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '/')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && !WORDS.contains(&s.to_ascii_lowercase().as_str());
    if plain { s.to_string() } else { quoted(s) }
}

/// A double-quoted scalar: every character outside printable Unicode escaped.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c < ' '
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || matches!(c, '\u{feff}' | '\u{fffe}' | '\u{ffff}') =>
            {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_sorted_and_blocks_indented() {
        let doc = json!({"b": {"z": 1, "a": [true, {"k": "v"}], "e": {}}, "a": "x"});
        assert_eq!(
            stream(&[doc]),
            "---\na: x\nb:\n  a:\n    - true\n    -\n      k: v\n  e: {}\n  z: 1\n"
        );
    }

    #[test]
    fn every_string_reads_back_as_itself() {
        let awkward = [
            "yes",
            "No",
            "on",
            "null",
            "~",
            "",
            " lead",
            "trail ",
            "1.0",
            "0x1f",
            "1e3",
            "12:30",
            "2026-11-27",
            "a: b",
            "#c",
            "- d",
            "[e]",
            "{f}",
            "*g",
            "&h",
            "!i",
            "%j",
            "@k",
            "`l",
            "m\nn",
            "tab\there",
            "quote\"s",
            "back\\slash",
            "del\u{7f}",
            "bom\u{feff}",
            "é ü 日本",
            "Sales Force (EU)",
            "prod/salesforce",
            "3c90c3cc-0d44-4b50-8888-8dd25736052a",
            ".inf",
        ];
        let mut map = serde_json::Map::new();
        for (i, s) in awkward.iter().enumerate() {
            map.insert(s.to_string(), json!(s));
            map.insert(format!("k{i}"), json!(s));
        }
        let doc = Value::Object(map);
        let text = stream(std::slice::from_ref(&doc));
        let back: Vec<Value> = serde_saphyr::from_multiple(&text).expect(&text);
        assert_eq!(back, vec![doc], "{text}");
    }

    #[test]
    fn plain_only_where_safe() {
        assert_eq!(string("secretName"), "secretName");
        assert_eq!(string("prod/sf-1.2_x"), "prod/sf-1.2_x");
        assert_eq!(string("Yes"), "\"Yes\"");
        assert_eq!(string("1abc"), "\"1abc\"");
        assert_eq!(string("a b"), "\"a b\"");
    }
}
