//! Checks of the JSON log lines the binary writes.

/// The keys that appear more than once in one JSON object anywhere in `line` (serde_json
/// keeps the last of duplicates silently; log processors disagree on which wins).
pub fn duplicate_keys(line: &str) -> Vec<String> {
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    struct Keys(Vec<String>);
    struct Walk<'a>(&'a mut Vec<String>);
    impl<'de> serde::de::DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !seen.insert(key.clone()) {
                    self.0.push(key);
                }
                map.next_value_seed(Walk(self.0))?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk(self.0))?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut keys = Keys(Vec::new());
    let mut de = serde_json::Deserializer::from_str(line);
    let _ = serde::de::DeserializeSeed::deserialize(Walk(&mut keys.0), &mut de);
    keys.0
}

/// Every line of a JSON log parses, and no object in it repeats a key.
pub fn assert_clean_json_log(output: &str) {
    let mut lines = 0;
    for line in output.lines().filter(|l| l.starts_with('{')) {
        lines += 1;
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let repeated = duplicate_keys(line);
        assert!(repeated.is_empty(), "keys {repeated:?} repeat in: {line}");
    }
    assert!(lines > 0, "no JSON log lines in:\n{output}");
}

#[test]
fn duplicate_keys_are_found_at_any_depth() {
    assert!(duplicate_keys(r#"{"a":1,"b":{"c":2}}"#).is_empty());
    assert_eq!(duplicate_keys(r#"{"a":1,"a":2}"#), ["a"]);
    assert_eq!(
        duplicate_keys(r#"{"span":{"name":"x","name":"reconcile"},"l":[{"m":1,"m":2}]}"#),
        ["name", "m"]
    );
}
