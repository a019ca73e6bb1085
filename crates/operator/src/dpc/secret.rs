//! A string that must never be printed: client secrets, tokens, values read from Secrets.

use std::fmt;

/// Holds a secret value. `Debug` prints a placeholder and there is no `Display`, so a secret
/// cannot reach a log line, a panic message or an error text by formatting.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// Replaces every occurrence of each secret in `text` with `<redacted>`: as it is, and in
/// the forms an answer may echo it in (form- and percent-encoded as a request sent it, with
/// either hex case, and JSON-escaped). Used on texts that come back from DPC before they
/// reach status, Events or logs. Empty and one-character secrets are left alone: they would
/// shred any text.
pub fn redact<'a>(text: &str, secrets: impl IntoIterator<Item = &'a SecretString>) -> String {
    let mut out = text.to_string();
    let mut secrets: Vec<String> = secrets
        .into_iter()
        .map(SecretString::expose)
        .filter(|s| s.chars().count() > 1)
        .flat_map(encodings)
        .collect();
    secrets.sort();
    secrets.dedup();
    // Longest first, so a secret that contains another is removed whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets {
        out = out.replace(&secret, "<redacted>");
    }
    out
}

/// [`redact`], then the same on the text as a reader of it sees it: JSON escapes decoded
/// (`\u003d` is `=`, as Gson's HTML-safe writers escape it, and every `\uXXXX`), so a value
/// echoed in any escaping is gone from what the operator shows.
pub fn redact_shown<'a>(text: &str, secrets: impl IntoIterator<Item = &'a SecretString>) -> String {
    let secrets: Vec<&SecretString> = secrets.into_iter().collect();
    let raw = redact(text, secrets.iter().copied());
    redact(&unescape_json(&raw), secrets)
}

/// Decodes the backslash escapes of JSON strings wherever they appear in `text` (an escape
/// that does not decode is kept as it is).
pub fn unescape_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let (decoded, used) = one_escape(rest);
        match decoded {
            Some(c) => out.push(c),
            None => out.push_str(&rest[..used]),
        }
        rest = &rest[used..];
    }
    out.push_str(rest);
    out
}

/// The character of the escape `text` starts with (`\` first), and how many bytes it took.
fn one_escape(text: &str) -> (Option<char>, usize) {
    let simple = match text.as_bytes().get(1) {
        Some(b'"') => Some('"'),
        Some(b'\\') => Some('\\'),
        Some(b'/') => Some('/'),
        Some(b'b') => Some('\u{8}'),
        Some(b'f') => Some('\u{c}'),
        Some(b'n') => Some('\n'),
        Some(b'r') => Some('\r'),
        Some(b't') => Some('\t'),
        Some(b'u') => None,
        _ => return (None, 1),
    };
    if simple.is_some() {
        return (simple, 2);
    }
    let unit = |at: usize| {
        text.get(at..at + 4)
            .and_then(|hex| u16::from_str_radix(hex, 16).ok())
    };
    let Some(high) = unit(2) else {
        return (None, 1);
    };
    if (0xD800..0xDC00).contains(&high)
        && text.get(6..8) == Some("\\u")
        && let Some(low) = unit(8).filter(|low| (0xDC00..0xE000).contains(low))
    {
        let code = 0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
        return (char::from_u32(code), 12);
    }
    (char::from_u32(u32::from(high)), 6)
}

/// A value as it is, and as it looks form-encoded, percent-encoded (upper- and lower-case
/// hex) and inside a JSON string.
fn encodings(value: &str) -> Vec<String> {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    let form: String = url::form_urlencoded::byte_serialize(value.as_bytes()).collect();
    let percent = utf8_percent_encode(value, NON_ALPHANUMERIC).to_string();
    let lower = lower_hex(&percent);
    let json = serde_json::to_string(value).unwrap_or_default();
    let json = json
        .strip_prefix('"')
        .and_then(|j| j.strip_suffix('"'))
        .unwrap_or(value)
        .to_string();
    let form_lower = lower_hex(&form);
    vec![value.to_string(), form, form_lower, percent, lower, json]
}

/// `%2F` → `%2f`: the hex digits of percent escapes in lower case.
fn lower_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            out.extend(chars.by_ref().take(2).map(|h| h.to_ascii_lowercase()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = SecretString::new("hunter2-value");
        assert_eq!(format!("{s:?}"), "SecretString(<redacted>)");
        assert!(!format!("{:?}", Some(s)).contains("hunter2"));
    }

    #[test]
    fn redact_removes_every_occurrence_longest_first() {
        let a = SecretString::new("abc");
        let b = SecretString::new("abcdef");
        let x = SecretString::new("x");
        let text = "value abcdef and abc, x stays";
        assert_eq!(
            redact(text, [&a, &b, &x]),
            "value <redacted> and <redacted>, x stays"
        );
    }

    #[test]
    fn redact_finds_the_encoded_forms_of_a_value() {
        let s = SecretString::new("p@ss word/\"quoted\"+x");
        let echoes = [
            "client_secret=p%40ss+word%2F%22quoted%22%2Bx&audience=y",
            "client_secret=p%40ss%20word%2F%22quoted%22%2Bx",
            "client_secret=p%40ss%20word%2f%22quoted%22%2bx",
            r#"{"detail":"bad secret p@ss word/\"quoted\"+x"}"#,
            "raw p@ss word/\"quoted\"+x",
        ];
        // Failures name the echo by its position, not its text (which holds the secret).
        for (i, echo) in echoes.iter().enumerate() {
            let clean = redact(echo, [&s]);
            assert!(clean.contains("<redacted>"), "echo {i} was not redacted");
            for part in ["p@ss", "p%40ss", "quoted"] {
                assert!(!clean.contains(part), "echo {i} kept a piece of the secret");
            }
        }
    }

    #[test]
    fn a_value_echoed_with_html_safe_or_unicode_escapes_is_redacted_as_shown() {
        let s = SecretString::new("Pässwörd=Zm9vYmFy<&>'");
        // Gson's HTML-safe escaping, upper-case hex, and a character outside the BMP.
        let echoes = [
            r#"{"detail":"value P\u00e4ssw\u00f6rd\u003dZm9vYmFy\u003c\u0026\u003e\u0027 is invalid"}"#,
            r#"{"detail":"value P\u00E4ssw\u00F6rd\u003DZm9vYmFy\u003C\u0026\u003E\u0027"}"#,
        ];
        for (i, echo) in echoes.iter().enumerate() {
            let shown = redact_shown(echo, [&s]);
            assert!(shown.contains("<redacted>"), "echo {i} was not redacted");
            assert!(
                !shown.contains("Zm9vYmFy"),
                "echo {i} kept a piece of the secret"
            );
        }
        let emoji = SecretString::new("key-😀-9f");
        let shown = redact_shown(r#"bad "key-\ud83d\ude00-9f""#, [&emoji]);
        assert_eq!(shown, r#"bad "<redacted>""#);
        assert_eq!(unescape_json(r#"a\q \u12 \\ \n"#), "a\\q \\u12 \\ \n");
    }
}
