//! Short strings that repeat across tens of thousands of kept records — the field names of
//! overrides and what DPC says of an override's type, provider and author — kept once and
//! shared, instead of a heap copy in every record (a drift listing holds one record per
//! override of an environment, the journal one per recent write, each member one).
//!
//! The table is bounded: only strings up to [`MAX_LEN`] bytes are shared, and once it holds
//! [`MAX_ENTRIES`] strings a new one is handed out unshared. A DPC that answers with a new
//! name in every override costs the plain copies it would have cost anyway, never a table
//! that grows without end. Never used for values (property values are digested, and some
//! come from Secrets).

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

/// A string kept once (see the module).
pub type Shared = Arc<str>;

/// Longer strings are not shared.
pub const MAX_LEN: usize = 64;
/// The most strings the table holds.
pub const MAX_ENTRIES: usize = 4096;

static TABLE: LazyLock<Table> = LazyLock::new(|| Table::new(MAX_ENTRIES));

/// `text`, shared with every other record that holds the same.
pub fn shared(text: &str) -> Shared {
    TABLE.shared(text)
}

/// A bounded table of shared strings.
struct Table {
    kept: Mutex<HashSet<Shared>>,
    max_entries: usize,
}

impl Table {
    fn new(max_entries: usize) -> Self {
        Self {
            kept: Mutex::default(),
            max_entries,
        }
    }

    fn shared(&self, text: &str) -> Shared {
        if text.len() > MAX_LEN {
            return text.into();
        }
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = kept.get(text) {
            return found.clone();
        }
        let new: Shared = text.into();
        if kept.len() < self.max_entries {
            kept.insert(new.clone());
        }
        new
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_short_strings_share_one_allocation() {
        let table = Table::new(8);
        let a = table.shared("secretName");
        let b = table.shared(&String::from("secretName"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "secretName");
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn long_strings_are_not_kept() {
        let table = Table::new(8);
        let long = "x".repeat(MAX_LEN + 1);
        let (a, b) = (table.shared(&long), table.shared(&long));
        assert_eq!(a, b);
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn the_table_stops_growing_at_its_bound_and_still_answers() {
        let table = Table::new(4);
        for i in 0..10 {
            let name = format!("name-{i}");
            assert_eq!(&*table.shared(&name), name);
        }
        assert_eq!(table.len(), 4);
        let (a, b) = (table.shared("name-9"), table.shared("name-9"));
        assert!(!Arc::ptr_eq(&a, &b), "past the bound a string is not kept");
        assert!(Arc::ptr_eq(
            &table.shared("name-0"),
            &table.shared("name-0")
        ));
    }
}
