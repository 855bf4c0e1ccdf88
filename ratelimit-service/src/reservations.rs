//! The service's own bookkeeping of reservations, beside the limitador crate's.
//!
//! The crate holds the reservations that count (admission of `Reserve`, release on `Commit`),
//! but shows none of them: no call reads a counter's outstanding holds. This module keeps, for
//! each reservation the crate admitted with an id, what it held on which counter until when, so
//! that the HTTP API and the metrics can show the outstanding holds, and it remembers the ids
//! already committed, so that a retried `Commit` is applied once.
//!
//! - Holds: recorded when `Reserve` answers an id; a hold on a counter lasts until
//!   min(ttl, that counter's window end), as the crate's does (measured just after the crate's
//!   call, so it outlives the crate's by microseconds); a reservation is forgotten once all its
//!   holds expired, or once a `Commit` released it (the whole reservation: the crate releases
//!   it only on the counters the commit's descriptors select, normally the same ones). At most
//!   [`MAX_TRACKED_RESERVATIONS`] are tracked; past that the soonest to expire is forgotten
//!   first (the crate's hold stays; only this view loses it, and a `Commit` of it answers
//!   `reservation_released: false`). `Commit` answers `reservation_released: true` only for a
//!   hold tracked here as live: the crate alone also answers `true` for a hold that expired but
//!   that it has not purged yet (it purges a counter's expired holds on that counter's next
//!   admitted `Reserve`).
//! - Committed ids: each non-empty id a `Commit` applied is remembered for the commit memory
//!   window (see [`Ledger::new`]) after that commit, at most [`MAX_REMEMBERED_COMMITS`] of them
//!   (the oldest forgotten first). A `Commit` with a remembered id adds nothing. A `Commit`
//!   of an id whose first `Commit` is still being applied (a retry that overtook a slow first
//!   attempt, e.g. while Redis does not answer) answers `UNAVAILABLE`, so that it is retried
//!   once the first attempt settled; a first attempt that fails, or whose call is cancelled
//!   before it settled, is forgotten, so that its retry applies.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use limitador::counter::Counter;

/// Most reservations whose holds are tracked at once.
pub const MAX_TRACKED_RESERVATIONS: usize = 100_000;
/// Most committed reservation ids remembered at once.
pub const MAX_REMEMBERED_COMMITS: usize = 100_000;

/// Reservation policy of the service, from the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReservationSettings {
    /// Longest a hold lasts (`--max-reservation-ttl`): a `Reserve`'s ttl is shortened to it,
    /// and a `Reserve` without a ttl gets it.
    pub max_ttl: Duration,
    /// Largest share of a counter's `max_value` one reservation holds
    /// (`--max-reservation-fraction`, in (0, 1]).
    pub max_fraction: f64,
    /// Answer `Reserve` and `Commit` with gRPC `UNIMPLEMENTED`, as Limitador 2.4 does
    /// (`--reservations-unimplemented`).
    pub unimplemented: bool,
}

impl Default for ReservationSettings {
    /// The limitador crate's defaults: 60 s, 1.0; implemented.
    fn default() -> Self {
        Self {
            max_ttl: Duration::from_secs(60),
            max_fraction: 1.0,
            unimplemented: false,
        }
    }
}

/// The outstanding reservations, as [`Ledger::outstanding`] counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outstanding {
    /// Reservations with at least one live hold.
    pub reservations: u64,
    /// The sum of their held amounts (each reservation counted once, whatever the number of
    /// counters it holds on).
    pub amount: u64,
}

/// What [`Ledger::begin_commit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitTicket {
    /// The id was neither committed nor being committed: it is now in flight. Apply the
    /// commit, then call [`Ledger::finish_commit`] (or [`Ledger::abort_commit`] if it failed or
    /// was cancelled).
    Apply,
    /// A commit of the id is being applied (a retry that overtook a slow first attempt): answer
    /// an error, so that the client retries once the first attempt has settled.
    InProgress,
    /// The id was committed already: add nothing.
    Duplicate,
}

struct Reservation {
    amount: u64,
    /// Each counter held on, and when its hold expires.
    holds: Vec<(Counter, Instant)>,
    /// The latest of the holds' expiries.
    expires_at: Instant,
}

#[derive(Default)]
struct Inner {
    live: HashMap<Arc<str>, Reservation>,
    /// Expiry of every tracked reservation (and of some already released: skipped when their
    /// time comes), soonest first.
    expiry: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    /// Committed ids and when each is forgotten.
    committed: HashMap<Arc<str>, Instant>,
    /// The same, oldest first (one memory window for all, so also soonest forgotten first).
    committed_order: VecDeque<(Instant, Arc<str>)>,
    /// Ids whose commit is being applied.
    in_flight: HashSet<Arc<str>>,
}

impl Inner {
    fn purge(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.expiry.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((at, id))) = self.expiry.pop() {
                self.forget_if_expiring_at(&id, at);
            }
        }
        // Released reservations leave their expiry behind; rebuild when those dominate.
        if self.expiry.len() > 2 * self.live.len() + 1024 {
            self.expiry = self
                .live
                .iter()
                .map(|(id, r)| Reverse((r.expires_at, id.clone())))
                .collect();
        }
        while let Some((at, _)) = self.committed_order.front() {
            if *at > now && self.committed_order.len() <= MAX_REMEMBERED_COMMITS {
                break;
            }
            if let Some((at, id)) = self.committed_order.pop_front() {
                if self.committed.get(&id) == Some(&at) {
                    self.committed.remove(&id);
                }
            }
        }
    }

    fn forget_if_expiring_at(&mut self, id: &Arc<str>, at: Instant) {
        if self.live.get(id).is_some_and(|r| r.expires_at == at) {
            self.live.remove(id);
        }
    }
}

/// Tracked holds and remembered commits, shared by the gRPC handlers and the HTTP API.
pub struct Ledger {
    inner: Mutex<Inner>,
    commit_memory: Duration,
}

impl Ledger {
    /// A ledger remembering each committed id for `commit_memory` after its commit.
    pub fn new(commit_memory: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            commit_memory,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner, Instant) -> R) -> R {
        // A poisoned lock only means a panic elsewhere while bookkeeping: keep going.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        guard.purge(now);
        f(&mut guard, now)
    }

    /// Records that reservation `id` holds `amount` on each of `holds` (a counter and how long
    /// its hold lasts from now).
    pub fn record_hold(&self, id: &str, amount: u64, holds: Vec<(Counter, Duration)>) {
        self.with(|inner, now| {
            let holds: Vec<(Counter, Instant)> = holds
                .into_iter()
                .map(|(counter, ttl)| (counter, now + ttl))
                .collect();
            let Some(expires_at) = holds.iter().map(|(_, at)| *at).max() else {
                return;
            };
            if expires_at <= now {
                return;
            }
            let id: Arc<str> = Arc::from(id);
            inner.expiry.push(Reverse((expires_at, id.clone())));
            inner.live.insert(
                id,
                Reservation {
                    amount,
                    holds,
                    expires_at,
                },
            );
            while inner.live.len() > MAX_TRACKED_RESERVATIONS {
                match inner.expiry.pop() {
                    Some(Reverse((at, id))) => inner.forget_if_expiring_at(&id, at),
                    None => break,
                }
            }
        });
    }

    /// Marks the commit of `id` in flight, unless `id` is committed already or being
    /// committed.
    pub fn begin_commit(&self, id: &str) -> CommitTicket {
        self.with(|inner, _| {
            if inner.committed.contains_key(id) {
                CommitTicket::Duplicate
            } else if inner.in_flight.contains(id) {
                CommitTicket::InProgress
            } else {
                inner.in_flight.insert(Arc::from(id));
                CommitTicket::Apply
            }
        })
    }

    /// The commit of `id` failed or was cancelled: forget it, so that a retry applies.
    pub fn abort_commit(&self, id: &str) {
        self.with(|inner, _| {
            inner.in_flight.remove(id);
        });
    }

    /// The commit of `id` was applied: `id` is remembered as committed for the commit memory
    /// window. `released`: the crate released its hold. Answers whether that hold was still
    /// live, i.e. tracked and not expired (the crate also answers `true` for an expired hold it
    /// has not purged yet).
    pub fn finish_commit(&self, id: &str, released: bool) -> bool {
        let memory = self.commit_memory;
        self.with(|inner, now| {
            inner.in_flight.remove(id);
            let id: Arc<str> = Arc::from(id);
            let forget_at = now + memory;
            inner.committed.insert(id.clone(), forget_at);
            inner.committed_order.push_back((forget_at, id.clone()));
            if inner.committed_order.len() > MAX_REMEMBERED_COMMITS {
                if let Some((at, old)) = inner.committed_order.pop_front() {
                    if inner.committed.get(&old) == Some(&at) {
                        inner.committed.remove(&old);
                    }
                }
            }
            released && inner.live.remove(&id).is_some()
        })
    }

    /// The reservations with a live hold, and their amounts.
    pub fn outstanding(&self) -> Outstanding {
        self.with(|inner, _| Outstanding {
            reservations: inner.live.len() as u64,
            amount: inner
                .live
                .values()
                .fold(0u64, |sum, r| sum.saturating_add(r.amount)),
        })
    }

    /// The amount held on each counter by live holds (counters with none are absent).
    pub fn held_by_counter(&self) -> HashMap<Counter, u64> {
        self.with(|inner, now| {
            let mut held: HashMap<Counter, u64> = HashMap::new();
            for r in inner.live.values() {
                for (counter, at) in &r.holds {
                    if *at > now {
                        let sum = held.entry(counter.clone()).or_default();
                        *sum = sum.saturating_add(r.amount);
                    }
                }
            }
            held
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limitador::limit::{Context, Expression, Limit};

    /// A counter of a limit told apart by its window (a limit's name is not part of its
    /// identity).
    fn counter(name: &str) -> Counter {
        let seconds = 60 + name.len() as u64 * 100 + u64::from(name.as_bytes()[0]);
        let limit = Limit::new("ns", 10, seconds, vec![], Vec::<Expression>::new());
        Counter::new(limit, &Context::default()).unwrap().unwrap()
    }

    #[test]
    fn holds_are_counted_per_counter_until_released_or_expired() {
        let ledger = Ledger::new(Duration::from_secs(60));
        let long = Duration::from_secs(60);
        ledger.record_hold("a", 4, vec![(counter("x"), long), (counter("y"), long)]);
        ledger.record_hold("b", 3, vec![(counter("x"), long)]);
        ledger.record_hold("gone", 9, vec![(counter("x"), Duration::ZERO)]);
        assert_eq!(
            ledger.outstanding(),
            Outstanding {
                reservations: 2,
                amount: 7
            }
        );
        let held = ledger.held_by_counter();
        assert_eq!(held.get(&counter("x")), Some(&7));
        assert_eq!(held.get(&counter("y")), Some(&4));

        assert!(ledger.finish_commit("a", true));
        assert!(!ledger.finish_commit("b", false));
        assert!(!ledger.finish_commit("gone", true), "expired");
        let held = ledger.held_by_counter();
        assert_eq!(held.get(&counter("x")), Some(&3));
        assert_eq!(held.get(&counter("y")), None);

        ledger.record_hold("c", 1, vec![(counter("y"), Duration::from_millis(20))]);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(ledger.outstanding().reservations, 1, "c expired");
    }

    #[test]
    fn a_committed_id_is_a_duplicate_until_forgotten_and_one_in_flight_is_in_progress() {
        let ledger = Ledger::new(Duration::from_millis(30));
        assert_eq!(ledger.begin_commit("a"), CommitTicket::Apply);
        assert_eq!(
            ledger.begin_commit("a"),
            CommitTicket::InProgress,
            "a retry overtaking the first attempt"
        );
        ledger.abort_commit("a");
        assert_eq!(
            ledger.begin_commit("a"),
            CommitTicket::Apply,
            "the first attempt failed: the retry applies"
        );
        ledger.finish_commit("a", false);
        assert_eq!(ledger.begin_commit("a"), CommitTicket::Duplicate);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ledger.begin_commit("a"), CommitTicket::Apply, "forgotten");
    }

    #[test]
    fn memory_is_bounded() {
        let ledger = Ledger::new(Duration::from_secs(60));
        for i in 0..MAX_REMEMBERED_COMMITS + 10 {
            ledger.begin_commit(&i.to_string());
            ledger.finish_commit(&i.to_string(), false);
        }
        for i in 0..MAX_TRACKED_RESERVATIONS + 10 {
            let ttl = Duration::from_secs(60 + i as u64);
            ledger.record_hold(&i.to_string(), 1, vec![(counter("x"), ttl)]);
        }
        let inner = ledger.inner.lock().unwrap();
        assert_eq!(inner.committed.len(), MAX_REMEMBERED_COMMITS);
        assert_eq!(inner.committed_order.len(), MAX_REMEMBERED_COMMITS);
        assert!(inner.in_flight.is_empty());
        assert!(
            !inner.committed.contains_key("0"),
            "the oldest is forgotten"
        );
        assert_eq!(inner.live.len(), MAX_TRACKED_RESERVATIONS);
        assert!(
            !inner.live.contains_key("0"),
            "the soonest to expire is forgotten"
        );
    }
}
