//! The journal of this process's own writes to DPC, per place (API URL, project,
//! environment) and connection. A list answer is always read through it: what was listed
//! before (or while) the operator wrote an override never decides anything about that
//! override — not an adoption, a skipped write, a drift report or a deletion's confirmation.
//! Writes through any account count, since two accounts may reach the same DPC.
//!
//! An entry lives while a write is in flight and for a while after it ends, as long as a
//! list answer older than the write may still be read (see [`Journal::prune`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::compare::Seen;
use crate::dpc::{Place, WriteEffect, WriteObserver};

/// What the journal says of one connection, for a list answer whose call began at a given
/// point of the journal.
#[derive(Clone, Debug, PartialEq)]
pub enum View {
    /// No write of this process since: the list answer stands.
    Listed,
    /// The operator's own write since then left this in DPC.
    Holds(Seen),
    /// The operator's own delete since then removed it.
    Gone,
    /// A write is in flight, or ended without an answer that says what it did: DPC must be
    /// read again after it.
    Unknown,
}

/// Held behind an `Arc`: every write of the last two minutes has an entry (10,000 at once
/// when objects are created in bulk), and an entry the size of a `Seen` made the table half
/// spare room.
#[derive(Clone)]
enum Last {
    Holds(Arc<Seen>),
    Gone,
    Unknown,
}

struct Entry {
    in_flight: u32,
    /// The last write that changed (or may have changed) DPC: when in the journal, what it
    /// left, and when it ended.
    last: Option<(u64, Last, Instant)>,
}

#[derive(Default)]
struct Inner {
    /// Counts every beginning and end of a write.
    seq: u64,
    places: HashMap<Place, HashMap<Box<str>, Entry>>,
}

/// The journal; the DPC client tells it of every write (it is the client's
/// [`WriteObserver`]).
#[derive(Default)]
pub struct Journal {
    inner: Mutex<Inner>,
}

impl Journal {
    /// The current point of the journal: taken just before a list call, it dates the answer.
    pub fn seq(&self) -> u64 {
        self.inner.lock().expect("journal lock").seq
    }

    /// What the journal says of `connection` for a list answer dated `listed_at`.
    pub fn view(&self, place: &Place, listed_at: u64, connection: &str) -> View {
        let inner = self.inner.lock().expect("journal lock");
        let Some(entry) = inner.places.get(place).and_then(|p| p.get(connection)) else {
            return View::Listed;
        };
        if entry.in_flight > 0 {
            return View::Unknown;
        }
        match &entry.last {
            Some((seq, last, _)) if *seq > listed_at => match last {
                Last::Holds(seen) => View::Holds(Seen::clone(seen)),
                Last::Gone => View::Gone,
                Last::Unknown => View::Unknown,
            },
            _ => View::Listed,
        }
    }

    /// Forgets writes that ended more than `older_than` ago: no list answer that old is
    /// read any more (an answer is kept for a while after its call began).
    pub fn prune(&self, older_than: Duration) {
        let mut inner = self.inner.lock().expect("journal lock");
        inner.places.retain(|_, connections| {
            connections.retain(|_, entry| {
                entry.in_flight > 0
                    || entry
                        .last
                        .as_ref()
                        .is_some_and(|(_, _, ended)| ended.elapsed() < older_than)
            });
            !connections.is_empty()
        });
    }

    /// How many connections the journal holds (for tests and memory checks).
    pub fn len(&self) -> usize {
        let inner = self.inner.lock().expect("journal lock");
        inner.places.values().map(HashMap::len).sum()
    }
}

impl WriteObserver for Journal {
    fn begin(&self, place: &Place, connections: &[&str]) {
        let mut inner = self.inner.lock().expect("journal lock");
        inner.seq += 1;
        let entries = inner.places.entry(place.clone()).or_default();
        for connection in connections {
            let entry = entries.entry((*connection).into()).or_insert(Entry {
                in_flight: 0,
                last: None,
            });
            entry.in_flight += 1;
        }
    }

    fn end(&self, place: &Place, connections: &[&str], effect: WriteEffect<'_>) {
        let last = match effect {
            WriteEffect::Holds(remote) => Some(Last::Holds(Arc::new(Seen::of(remote)))),
            WriteEffect::Gone => Some(Last::Gone),
            WriteEffect::Unknown => Some(Last::Unknown),
            // Refused: DPC holds what it held before the write.
            WriteEffect::Unchanged => None,
        };
        let mut inner = self.inner.lock().expect("journal lock");
        inner.seq += 1;
        let seq = inner.seq;
        let Some(entries) = inner.places.get_mut(place) else {
            return;
        };
        for connection in connections {
            let Some(entry) = entries.get_mut(*connection) else {
                continue;
            };
            entry.in_flight = entry.in_flight.saturating_sub(1);
            if let Some(last) = &last {
                entry.last = Some((seq, last.clone(), Instant::now()));
            }
            if entry.in_flight == 0 && entry.last.is_none() {
                entries.remove(*connection);
            }
        }
        if entries.is_empty() {
            inner.places.remove(place);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpc::RemoteOverride;
    use serde_json::json;

    fn place() -> Place {
        Place::new("https://eu1.api.matillion.com/dpc/", "p", "PROD")
    }

    fn held(secret: &str) -> RemoteOverride {
        RemoteOverride {
            name: Some("C".into()),
            connection_overrides: Some(json!({"connectionProperties": {"secretName": secret}})),
            ..RemoteOverride::default()
        }
    }

    #[test]
    fn an_answer_listed_before_a_write_gives_way_to_what_the_write_left() {
        let journal = Journal::default();
        let listed_before = journal.seq();
        journal.begin(&place(), &["C"]);
        assert_eq!(journal.view(&place(), listed_before, "C"), View::Unknown);
        let during = journal.seq();
        journal.end(&place(), &["C"], WriteEffect::Holds(&held("new")));
        let expected = View::Holds(Seen::of(&held("new")));
        assert_eq!(journal.view(&place(), listed_before, "C"), expected);
        assert_eq!(
            journal.view(&place(), during, "C"),
            expected,
            "an answer fetched while the write was in flight does not know it either"
        );
        // Another connection, and an answer listed after the write, stand as listed.
        assert_eq!(journal.view(&place(), listed_before, "D"), View::Listed);
        assert_eq!(journal.view(&place(), journal.seq(), "C"), View::Listed);
        // The same place through another spelling of the API URL.
        let same = Place::new("https://eu1.api.matillion.com/dpc", "p", "PROD");
        assert_eq!(journal.view(&same, listed_before, "C"), expected);
    }

    #[test]
    fn a_delete_a_refusal_and_a_write_without_an_answer() {
        let journal = Journal::default();
        let before = journal.seq();
        journal.begin(&place(), &["A", "B"]);
        journal.end(&place(), &["A", "B"], WriteEffect::Gone);
        assert_eq!(journal.view(&place(), before, "A"), View::Gone);
        assert_eq!(journal.view(&place(), before, "B"), View::Gone);

        let before = journal.seq();
        journal.begin(&place(), &["R"]);
        journal.end(&place(), &["R"], WriteEffect::Unchanged);
        assert_eq!(
            journal.view(&place(), before, "R"),
            View::Listed,
            "a refused write changed nothing"
        );

        journal.begin(&place(), &["T"]);
        journal.end(&place(), &["T"], WriteEffect::Unknown);
        assert_eq!(journal.view(&place(), before, "T"), View::Unknown);
    }

    #[test]
    fn ended_writes_are_forgotten_once_no_answer_that_old_is_read() {
        let journal = Journal::default();
        journal.begin(&place(), &["C"]);
        journal.end(&place(), &["C"], WriteEffect::Gone);
        journal.begin(&place(), &["D"]);
        journal.prune(Duration::from_secs(30));
        assert_eq!(journal.len(), 2, "recent, and in flight");
        journal.prune(Duration::ZERO);
        assert_eq!(journal.len(), 1, "the write in flight stays");
        journal.end(&place(), &["D"], WriteEffect::Unchanged);
        assert_eq!(journal.len(), 0);
    }
}
