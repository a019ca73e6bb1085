//! The request-rate limit of one account, shared by all its objects: a generic cell rate
//! algorithm (GCRA) that hands out send times. A request whose slot is near waits for it; one
//! whose slot is far keeps it as a ticket and comes back then (the reconcile is requeued for
//! that instant), so thousands of waiting objects neither exceed the rate nor spin.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::key::ObjKey;

/// Who asks for a slot: `(namespace, name)` of an object, or `None` for background work.
pub type Requester = Option<ObjKey>;

/// The answer of [`RateLimiter::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send at this instant (now or soon).
    SendAt(Instant),
    /// The slot is far; come back at this instant (the slot is kept for the requester).
    ComeBackAt(Instant),
}

/// Hands out send times at `requests_per_minute` with bursts of `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    burst: u32,
    /// Theoretical arrival time of the next request.
    tat: Instant,
    tickets: HashMap<ObjKey, Instant>,
}

impl RateLimiter {
    pub fn new(requests_per_minute: u32, burst: u32) -> Self {
        let mut limiter = Self {
            interval: Duration::ZERO,
            burst: 1,
            // No history yet: nothing to wait for.
            tat: Instant::now()
                .checked_sub(Duration::from_secs(3600))
                .unwrap_or_else(Instant::now),
            tickets: HashMap::new(),
        };
        limiter.set_rate(requests_per_minute, burst);
        limiter
    }

    /// Changes the rate (an edit of the account); reservations already made stand.
    pub fn set_rate(&mut self, requests_per_minute: u32, burst: u32) {
        self.interval = Duration::from_secs(60) / requests_per_minute.max(1);
        self.burst = burst.max(1);
    }

    /// The current rate, per minute.
    pub fn requests_per_minute(&self) -> u32 {
        (Duration::from_secs(60).as_nanos() / self.interval.as_nanos().max(1)) as u32
    }

    fn next_slot(&mut self, now: Instant) -> Instant {
        let tolerance = self.interval * (self.burst - 1);
        let tat = self.tat.max(now);
        let allowed = tat.checked_sub(tolerance).unwrap_or(now).max(now);
        self.tat = tat + self.interval;
        allowed
    }

    /// A send time for one request. A requester that was told to come back gets the slot it
    /// holds; a slot further than `max_wait` away is kept as the requester's ticket.
    pub fn reserve(
        &mut self,
        requester: &Requester,
        now: Instant,
        max_wait: Duration,
    ) -> Admission {
        if self.tickets.len() > 1024 {
            // Forget tickets nobody came back for.
            self.tickets
                .retain(|_, at| *at + Duration::from_secs(60) > now);
        }
        let slot = match requester.as_ref().and_then(|r| self.tickets.remove(r)) {
            Some(ticket) => ticket,
            None => self.next_slot(now),
        };
        if slot <= now + max_wait {
            return Admission::SendAt(slot);
        }
        match requester {
            Some(r) => {
                self.tickets.insert(r.clone(), slot);
                Admission::ComeBackAt(slot)
            }
            // Background work has nowhere to come back to: it waits.
            None => Admission::SendAt(slot),
        }
    }

    /// Nothing may be sent before `until` (DPC answered 429): tickets are void and new
    /// slots start then.
    pub fn hold_until(&mut self, until: Instant) {
        self.tickets.clear();
        // No burst right after a 429: the first slot is `until`, then one per interval.
        let tolerance = self.interval * (self.burst - 1);
        self.tat = self.tat.max(until + tolerance);
    }

    /// Drops a requester's ticket (the object went away).
    pub fn forget(&mut self, requester: &ObjKey) {
        self.tickets.remove(requester);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(n: u32) -> Requester {
        Some(crate::key::obj_key("ns", format!("o{n}")))
    }

    fn send_time(a: Admission) -> Instant {
        match a {
            Admission::SendAt(t) => t,
            Admission::ComeBackAt(t) => panic!("told to come back at {t:?}"),
        }
    }

    #[test]
    fn a_burst_goes_at_once_then_one_per_interval() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(60, 3);
        let times: Vec<Duration> = (0..6)
            .map(|i| send_time(limiter.reserve(&who(i), now, Duration::from_secs(10))) - now)
            .collect();
        let secs: Vec<u64> = times.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [0, 0, 0, 1, 2, 3]);
    }

    #[test]
    fn over_any_window_the_rate_is_never_exceeded() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(120, 5);
        let mut times: Vec<Instant> = (0..500)
            .map(
                |i| match limiter.reserve(&who(i), now, Duration::from_secs(3600)) {
                    Admission::SendAt(t) | Admission::ComeBackAt(t) => t,
                },
            )
            .collect();
        times.sort();
        // Any 60 s window holds at most burst + 120 sends.
        for (i, start) in times.iter().enumerate() {
            let in_window = times[i..]
                .iter()
                .take_while(|t| **t < *start + Duration::from_secs(60))
                .count();
            assert!(in_window <= 125, "{in_window} sends in one minute");
        }
    }

    #[test]
    fn a_far_slot_becomes_a_ticket_that_is_honoured_on_return() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(60, 1);
        let max_wait = Duration::from_secs(2);
        for i in 0..3 {
            limiter.reserve(&who(i), now, max_wait);
        }
        let Admission::ComeBackAt(ticket) = limiter.reserve(&who(9), now, max_wait) else {
            panic!("the fourth request must come back later");
        };
        assert_eq!(ticket - now, Duration::from_secs(3));
        // Others queue behind the ticket...
        let Admission::ComeBackAt(next) = limiter.reserve(&who(10), now, max_wait) else {
            panic!()
        };
        assert_eq!(next - now, Duration::from_secs(4));
        // ...and the ticket holder gets its own slot back, not a later one.
        let back = now + Duration::from_secs(2);
        assert_eq!(
            limiter.reserve(&who(9), back, max_wait),
            Admission::SendAt(ticket)
        );
    }

    #[test]
    fn a_429_voids_tickets_and_delays_every_slot() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(600, 10);
        limiter.reserve(&who(1), now, Duration::ZERO);
        limiter.hold_until(now + Duration::from_secs(3));
        let first = send_time(limiter.reserve(&who(2), now, Duration::from_secs(10)));
        let second = send_time(limiter.reserve(&who(3), now, Duration::from_secs(10)));
        assert_eq!(first, now + Duration::from_secs(3));
        assert_eq!(second - first, Duration::from_millis(100));
        assert!(limiter.tickets.is_empty());
    }

    #[test]
    fn background_work_waits_instead_of_taking_a_ticket() {
        let now = Instant::now();
        let mut limiter = RateLimiter::new(60, 1);
        limiter.reserve(&None, now, Duration::ZERO);
        let Admission::SendAt(t) = limiter.reserve(&None, now, Duration::ZERO) else {
            panic!()
        };
        assert_eq!(t - now, Duration::from_secs(1));
        assert_eq!(limiter.requests_per_minute(), 60);
    }
}
