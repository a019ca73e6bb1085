//! Durations as Kubernetes and Go write them, for flags and spec fields.
//!
//! kube-core has `kube::core::Duration` with Go's parser, but its `FromStr` panics on a
//! value past `u64` seconds (`9999999999999999h` multiplies out of range) and accepts negative
//! durations; a spec field must turn both into an error, not a crash. This parser refuses
//! them (the test below shows the difference, and fails once kube's parser stops panicking).

/// The longest duration read: a hundred years. Longer texts (`9999999999999999h`) are
/// refused rather than overflowing.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86400);

/// Parses durations as Kubernetes and Go write them: `500ms`, `30s`, `10m`, `1h30m`
/// (a bare number is seconds). Anything longer than [`MAX_DURATION`] is refused.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let bad = || format!("{text:?} is not a duration like 30s, 10m, 1h30m or 500ms");
    if text.is_empty() {
        return Err(bad());
    }
    let checked = |seconds: f64| {
        std::time::Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|d| *d <= MAX_DURATION)
            .ok_or_else(|| {
                format!(
                    "{text:?} is longer than {} hours",
                    MAX_DURATION.as_secs() / 3600
                )
            })
    };
    if let Ok(seconds) = text.parse::<f64>() {
        if !(seconds >= 0.0 && seconds.is_finite()) {
            return Err(bad());
        }
        return checked(seconds);
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += value * factor;
        rest = &rest[unit_len..];
    }
    checked(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m0.5s"), Ok(Duration::from_millis(60_500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        for huge in ["9999999999999999h", "1e300", "876001h", "1e400s"] {
            let err = parse_duration(huge).unwrap_err();
            assert!(
                err.contains("longer than") || err.contains("not a duration"),
                "{err}"
            );
        }
        assert_eq!(parse_duration("876000h"), Ok(MAX_DURATION));
    }

    #[test]
    fn kube_core_s_parser_panics_where_this_one_refuses() {
        let kube = std::panic::catch_unwind(|| "9999999999999999h".parse::<kube::core::Duration>());
        assert!(kube.is_err(), "kube's parser no longer panics: use it");
        assert!(parse_duration("9999999999999999h").is_err());
        let negative: kube::core::Duration = "-5m".parse().unwrap();
        assert!(negative.is_negative());
        assert!(parse_duration("-5m").is_err());
    }
}
