//! The recent changes the watches reported, so a cache can tell whether what a read just
//! found may already be stale: a change of something the read covered, reported after the
//! read began, means it is not kept (the pass that change triggers reads again).

use std::collections::VecDeque;

use crate::index::Reference;

/// How many changes are remembered; a read older than that is taken as stale.
const REMEMBERED: usize = 4096;

/// Numbered changes, the latest [`REMEMBERED`] of them.
#[derive(Default)]
pub(crate) struct Changes {
    next: u64,
    /// `None`: many references at once (a relist).
    recent: VecDeque<(u64, Option<Reference>)>,
}

impl Changes {
    /// A mark to take before a read.
    pub(crate) fn mark(&self) -> u64 {
        self.next
    }

    /// `reference` (or, `None`, everything) changed.
    pub(crate) fn record(&mut self, reference: Option<Reference>) {
        self.recent.push_back((self.next, reference));
        self.next += 1;
        if self.recent.len() > REMEMBERED {
            self.recent.pop_front();
        }
    }

    /// Whether nothing `covers` names changed since `mark`.
    pub(crate) fn unchanged_since(&self, mark: u64, covers: impl Fn(&Reference) -> bool) -> bool {
        if mark == self.next {
            return true;
        }
        // The changes since `mark` are no longer all remembered.
        if self.recent.front().is_none_or(|(first, _)| *first > mark) {
            return false;
        }
        self.recent
            .iter()
            .filter(|(n, _)| *n >= mark)
            .all(|(_, r)| r.as_ref().is_some_and(|r| !covers(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str) -> Reference {
        Reference::Secret {
            namespace: "a".into(),
            name: name.into(),
        }
    }

    #[test]
    fn only_a_change_of_what_was_read_since_the_mark_counts() {
        let mut changes = Changes::default();
        changes.record(Some(secret("old")));
        let mark = changes.mark();
        assert!(changes.unchanged_since(mark, |_| true));
        changes.record(Some(secret("other")));
        assert!(changes.unchanged_since(mark, |r| *r == secret("db")));
        assert!(!changes.unchanged_since(mark, |r| *r == secret("other")));
        changes.record(None);
        assert!(!changes.unchanged_since(mark, |r| *r == secret("db")));
    }

    #[test]
    fn a_read_older_than_what_is_remembered_is_stale() {
        let mut changes = Changes::default();
        let mark = changes.mark();
        for i in 0..=REMEMBERED {
            changes.record(Some(secret(&i.to_string())));
        }
        assert!(!changes.unchanged_since(mark, |r| *r == secret("db")));
    }
}
