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

/// Replaces every occurrence of each secret in `text` with `<redacted>`. Used on texts that
/// come back from DPC (problem details may echo what was sent) before they reach status,
/// Events or logs. Empty and one-character secrets are left alone: they would shred any text.
pub fn redact<'a>(text: &str, secrets: impl IntoIterator<Item = &'a SecretString>) -> String {
    let mut out = text.to_string();
    let mut secrets: Vec<&str> = secrets
        .into_iter()
        .map(SecretString::expose)
        .filter(|s| s.chars().count() > 1)
        .collect();
    // Longest first, so a secret that contains another is removed whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets {
        out = out.replace(secret, "<redacted>");
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
}
