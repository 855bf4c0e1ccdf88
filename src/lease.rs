//! Leases: a hot counter's requests admitted by the Envoy worker itself, from a larger
//! reservation it holds at the rate-limit service, without a call per request.
//!
//! A lease is a `Reserve` of [`LeaseSettings::target`] tokens (a fraction of the smallest rate
//! of the limits it serves) for one reservation descriptor. While it has room for a request's
//! reservation amount, the request is admitted locally: its amount is counted as in flight
//! against the lease. When the request ends, its amount leaves the in-flight sum and its
//! actual tokens are added to what the lease spent. The lease is committed (`Commit` of the
//! spent tokens with its id, which releases its hold) when it is replaced or given up:
//!
//! - **renewal**, in the background once half its room is used, or half its life is over
//!   while requests are admitted from it (an unused lease is not renewed by age): a new
//!   `Reserve` of the tokens in flight plus a new lease's size. When it is granted, the old lease
//!   is committed with what finished under it and the requests in flight carry their holds
//!   into the new one. While the renewal is pending, the old lease admits at most what the new
//!   one will hold, so that every request in flight stays held;
//! - **refused** renewal (the budget is nearly spent) or a failed one: the lease keeps
//!   admitting what room is left; requests that do not fit make their own `Reserve` (which the
//!   service refuses once the budget is spent); once nothing is in flight and the room left is
//!   less than a request's amount, the lease is committed, so that its unused room returns to
//!   the budget;
//! - **idle** (no admission for half a ttl; not renewed then), **past its admissions**, or
//!   leases turned off by a new configuration: committed once nothing is in flight; at VM
//!   shutdown, at once.
//!
//! A lease's `Reserve` asks for `lease.ttl` plus the request ttl (`reservation.ttl`); the
//! lease admits for `lease.ttl` at most, and only as long as its last request stays held for
//! the request ttl (half the hold when the service holds for less than asked, as its
//! `hold_ttl` or the counter's window end says).
//!
//! What this costs and guarantees: everything a worker admits from leases is held at the
//! service, so admission never passes the limit the service enforces; overshoot only comes
//! from requests that spend more than their reservation amount, as with per-request
//! reservations. The room a lease holds but has not spent is unavailable to other workers and
//! replicas until its commit: at most one lease per counter and worker (two while a renewal
//! is granted and the old one not yet committed), each at most half the smallest rate.
//!
//! Pure: the caller dispatches the calls ([`Leases::take_calls`]) and commits
//! ([`Leases::take_commits`]) and feeds the replies back, with the time in milliseconds.

use crate::config::TokenCategory;
use crate::flow::ServiceFailure;
use crate::policy::PlannedReservation;
use ratelimit_proto::{Code, DescriptorStatus, RateLimitDescriptor, ReserveResponse};
use std::collections::HashMap;
use std::time::Duration;

/// Largest `lease.fraction`: with the in-flight holds a renewal carries, a lease then stays
/// under half the smallest rate, below the hold the service may clamp (Limitador's proposal
/// clamps a hold to half the counter's max).
pub const MAX_FRACTION: f64 = 0.25;
/// Most tokens one call may hold (the service refuses more: `u32::MAX`).
pub const MAX_AMOUNT: u64 = u32::MAX as u64;
/// Shortest `lease.ttl`.
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// Most counters a worker tracks for leases (each seen within a ttl, leased or not: a few
/// hundred bytes each, and the tick walks them); others use per-request reservations.
pub const MAX_KEYS: usize = 10_000;
/// Shortest wait before a counter whose lease was refused or failed asks again, in ms.
const MIN_RETRY_MS: u64 = 1_000;

/// `rateLimitService.lease`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseSettings {
    /// A lease holds this fraction of the smallest rate of its limits, in (0, [`MAX_FRACTION`]].
    pub fraction: f64,
    /// Most tokens a lease holds for new requests, in [1, [`MAX_AMOUNT`]].
    pub max_amount: u64,
    /// Requests of a counter within one `ttl` before it is leased, and reservation amounts a
    /// lease must hold at least (≥ 1).
    pub min_requests: u32,
    /// Hold time of a lease (at least [`MIN_TTL`]).
    pub ttl: Duration,
}

impl LeaseSettings {
    /// Tokens a new lease holds for new requests, for limits whose smallest rate is
    /// `capacity` tokens.
    pub fn target(&self, capacity: u64) -> u64 {
        // Float to integer saturates; capacity is at most u64::MAX.
        let share = (capacity as f64 * self.fraction).floor() as u64;
        share.min(self.max_amount)
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }
}

/// How a reservation of a request is admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// From the worker's lease, without a call: `status` is what the lease knows of the
    /// budget (for the `x-ratelimit-*` headers; `None` when the service told nothing).
    Leased {
        /// The lease's key, for [`Leases::finish`].
        key: String,
        /// The budget as of the lease's grant, with the room the lease has left.
        status: Option<DescriptorStatus>,
    },
    /// By its own `Reserve`.
    Call,
}

/// A `Reserve` the table wants sent: a lease acquired or renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCall {
    /// The lease's key (for [`Leases::sent`] and [`Leases::dispatch_failed`]).
    pub key: String,
    /// The reservation descriptor the lease serves.
    pub descriptor: RateLimitDescriptor,
    /// Tokens to hold: those in flight plus a new lease's size.
    pub amount: u64,
    /// The lease's hold time.
    pub ttl: Duration,
}

/// A commit the table owes: a lease's spent tokens under its id (which releases its hold), or
/// a request's tokens without an id when its lease is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCommit {
    /// The reservation descriptor.
    pub descriptor: RateLimitDescriptor,
    /// The lease's reservation id (empty: commits like a report).
    pub reservation_id: String,
    /// Tokens spent (0 only releases the hold).
    pub actual: u64,
}

/// What a reply to a lease's `Reserve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// A first lease for the counter.
    Granted,
    /// A lease replaced the one before (committed now).
    Renewed,
    /// The service refused (`OVER_LIMIT`), or held nothing.
    Refused,
    /// No usable answer.
    Failed(ServiceFailure),
}

#[derive(Debug, Clone)]
struct Lease {
    id: String,
    /// Tokens held at the service.
    size: u64,
    /// The last admission from it (ms): `lease.ttl` after it was asked, and early enough that a
    /// request it admits stays held for the reservation ttl (at least half the hold's life),
    /// as a request's own reservation would be, even if no renewal is granted.
    admit_until_ms: u64,
    /// When to renew (half its life).
    renew_ms: u64,
    /// Whether a request was admitted from it: a lease nothing was admitted from is not
    /// renewed by age (the counter has cooled down), only committed once its admissions end.
    used: bool,
    /// The most restrictive status of the grant, and when it was asked.
    status: Option<DescriptorStatus>,
    asked_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The call's token once dispatched.
    token: Option<u32>,
    amount: u64,
    asked_ms: u64,
}

#[derive(Debug)]
struct Entry {
    descriptor: RateLimitDescriptor,
    /// The smallest rate of the limits the descriptor names.
    capacity: u64,
    /// How long a request's own reservation would be held (`reservation.ttl`): a lease is
    /// held that much longer than it admits.
    request_ttl: Duration,
    lease: Option<Lease>,
    /// Reservation amounts of the requests admitted from a lease and not finished.
    in_flight: u64,
    /// Actual tokens of the requests finished under the current lease.
    spent: u64,
    /// The `Reserve` of a new lease, wanted or on its way.
    pending: Option<Pending>,
    /// Requests seen since `seen_since_ms`.
    seen: u32,
    seen_since_ms: u64,
    last_seen_ms: u64,
    /// The last admission from the lease.
    last_admit_ms: u64,
    /// The last request's reservation amount.
    last_amount: u64,
    /// No new lease asked before (after a refusal or failure).
    not_before_ms: u64,
}

impl Entry {
    fn new(plan: &PlannedReservation, now_ms: u64) -> Self {
        Entry {
            descriptor: plan.descriptor.clone(),
            capacity: plan.capacity,
            request_ttl: plan.ttl,
            lease: None,
            in_flight: 0,
            spent: 0,
            pending: None,
            seen: 0,
            seen_since_ms: now_ms,
            last_seen_ms: now_ms,
            last_admit_ms: 0,
            last_amount: 0,
            not_before_ms: 0,
        }
    }

    fn room(&self) -> u64 {
        self.lease.as_ref().map_or(0, |l| {
            l.size
                .saturating_sub(self.in_flight.saturating_add(self.spent))
        })
    }
}

/// One worker's leases, keyed by reservation descriptor and token category.
#[derive(Debug, Default)]
pub struct Leases {
    settings: Option<LeaseSettings>,
    entries: HashMap<String, Entry>,
    /// Keys whose `Reserve` waits to be dispatched.
    wanted: Vec<String>,
    /// The lease calls on their way: token → key.
    tokens: HashMap<u32, String>,
    commits: Vec<LeaseCommit>,
    last_sweep_ms: u64,
}

/// The key of a reservation: its category and descriptor entries.
fn key_of(category: TokenCategory, descriptor: &RateLimitDescriptor) -> String {
    let mut key = String::from(category.as_str());
    for e in &descriptor.entries {
        key.push('\u{0}');
        key.push_str(&e.key);
        key.push('\u{0}');
        key.push_str(&e.value);
    }
    key
}

impl Leases {
    /// A table under `settings` (`None`: leases off; existing ones are committed once idle).
    pub fn new(settings: Option<LeaseSettings>) -> Self {
        Leases {
            settings,
            ..Leases::default()
        }
    }

    /// Takes a new configuration's settings, keeping the leases (a counter the new policy no
    /// longer names goes idle and is committed).
    pub fn reconfigure(&mut self, settings: Option<LeaseSettings>) {
        self.settings = settings;
    }

    /// Whether leases are on.
    pub fn enabled(&self) -> bool {
        self.settings.is_some()
    }

    /// Admits `plan` from its counter's lease when it has room, at `now_ms`; else the request
    /// makes its own `Reserve` ([`Admission::Call`]), and a hot counter's lease is asked for.
    pub fn admit(&mut self, plan: &PlannedReservation, now_ms: u64) -> Admission {
        let Some(settings) = self.settings.as_ref() else {
            return Admission::Call;
        };
        let key = key_of(plan.category, &plan.descriptor);
        let ttl_ms = settings.ttl_ms();
        let target = settings.target(plan.capacity);
        let min_requests = u64::from(settings.min_requests);
        if !self.entries.contains_key(&key) {
            if self.entries.len() >= MAX_KEYS {
                return Admission::Call;
            }
            self.entries.insert(key.clone(), Entry::new(plan, now_ms));
        }
        let Some(entry) = self.entries.get_mut(&key) else {
            return Admission::Call;
        };
        if now_ms.saturating_sub(entry.seen_since_ms) >= ttl_ms {
            entry.seen = 0;
            entry.seen_since_ms = now_ms;
        }
        entry.seen = entry.seen.saturating_add(1);
        entry.last_seen_ms = now_ms;
        entry.last_amount = plan.amount;
        let amount = plan.amount;
        let live = entry
            .lease
            .as_ref()
            .is_some_and(|l| now_ms < l.admit_until_ms);
        let fits_pending = entry.pending.is_none_or(|p| {
            // While a renewal is pending the lease admits only what the new one holds.
            p.token.is_none() && p.amount == 0 || entry.in_flight.saturating_add(amount) <= p.amount
        });
        let admitted = live && amount <= entry.room() && fits_pending;
        let mut want = false;
        if admitted {
            entry.in_flight = entry.in_flight.saturating_add(amount);
            entry.last_admit_ms = now_ms;
            let room = entry.room();
            if let Some(lease) = &mut entry.lease {
                lease.used = true;
                let used = lease.size.saturating_sub(room);
                want = used.saturating_mul(2) >= lease.size || now_ms >= lease.renew_ms;
            }
        } else {
            // A hot counter whose lease would serve enough requests.
            want = u64::from(entry.seen) >= min_requests
                && target > 0
                && target >= amount.saturating_mul(min_requests);
        }
        if want && entry.pending.is_none() && now_ms >= entry.not_before_ms {
            entry.pending = Some(Pending {
                token: None,
                amount: 0,
                asked_ms: now_ms,
            });
            self.wanted.push(key.clone());
        }
        if !admitted {
            return Admission::Call;
        }
        let status = entry.lease.as_ref().and_then(|l| {
            let s = l.status.as_ref()?;
            let elapsed = now_ms.saturating_sub(l.asked_ms);
            let reset = s.duration_until_reset.as_ref().map(|d| {
                let ms = ratelimit_proto::duration_ms(d).saturating_sub(elapsed);
                ratelimit_proto::duration(Duration::from_millis(ms))
            });
            let remaining = u64::from(s.limit_remaining).saturating_add(entry.room());
            Some(DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: s.current_limit.clone(),
                limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                duration_until_reset: reset,
            })
        });
        Admission::Leased { key, status }
    }

    /// Whether a lease's `Reserve` waits to be dispatched.
    pub fn has_calls(&self) -> bool {
        !self.wanted.is_empty()
    }

    /// Whether commits wait to be queued.
    pub fn has_commits(&self) -> bool {
        !self.commits.is_empty()
    }

    /// The `Reserve`s to dispatch now, each for the tokens in flight plus a new lease's size
    /// (at most half the smallest rate and [`MAX_AMOUNT`]).
    pub fn take_calls(&mut self, now_ms: u64) -> Vec<LeaseCall> {
        let Some(settings) = self.settings.clone() else {
            for key in self.wanted.drain(..) {
                if let Some(e) = self.entries.get_mut(&key) {
                    e.pending = None;
                }
            }
            return Vec::new();
        };
        let mut calls = Vec::new();
        for key in std::mem::take(&mut self.wanted) {
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            let cap = (e.capacity / 2).clamp(1, MAX_AMOUNT);
            let amount = e
                .in_flight
                .saturating_add(settings.target(e.capacity))
                .min(cap);
            e.pending = Some(Pending {
                token: None,
                amount,
                asked_ms: now_ms,
            });
            calls.push(LeaseCall {
                key,
                descriptor: e.descriptor.clone(),
                amount,
                ttl: settings.ttl.saturating_add(e.request_ttl),
            });
        }
        calls
    }

    /// A lease's `Reserve` went out as call `token`.
    pub fn sent(&mut self, key: &str, token: u32) {
        if let Some(p) = self.entries.get_mut(key).and_then(|e| e.pending.as_mut()) {
            p.token = Some(token);
            self.tokens.insert(token, key.to_string());
        }
    }

    /// Whether `token` is a lease's `Reserve`.
    pub fn owns(&self, token: u32) -> bool {
        !self.tokens.is_empty() && self.tokens.contains_key(&token)
    }

    /// A lease's `Reserve` could not be dispatched: as a failed call.
    pub fn dispatch_failed(&mut self, key: &str, now_ms: u64) {
        let retry_ms = self.retry_ms();
        if let Some(e) = self.entries.get_mut(key) {
            e.pending = None;
            e.not_before_ms = now_ms.saturating_add(retry_ms);
        }
    }

    fn retry_ms(&self) -> u64 {
        self.settings
            .as_ref()
            .map_or(MIN_RETRY_MS, |s| (s.ttl_ms() / 10).max(MIN_RETRY_MS))
    }

    /// The answer to the lease call `token` at `now_ms` (a reply, or why there is none).
    /// Returns what it did, `None` for a token the table does not know.
    pub fn on_reply(
        &mut self,
        token: u32,
        reply: Result<&[u8], ServiceFailure>,
        now_ms: u64,
    ) -> Option<LeaseEvent> {
        let retry_ms = self.retry_ms();
        let ttl_ms = self.settings.as_ref().map(LeaseSettings::ttl_ms);
        let key = self.tokens.remove(&token)?;
        let entry = self.entries.get_mut(&key)?;
        if entry.pending.is_none_or(|p| p.token != Some(token)) {
            return None;
        }
        let pending = entry.pending.take()?;
        let decoded = reply.and_then(|bytes| {
            prost::Message::decode(bytes)
                .map_err(|e: prost::DecodeError| ServiceFailure::Undecodable(e.to_string()))
        });
        let response: ReserveResponse = match decoded {
            Ok(r) => r,
            Err(failure) => {
                entry.not_before_ms = now_ms.saturating_add(retry_ms);
                return Some(LeaseEvent::Failed(failure));
            }
        };
        match Code::try_from(response.code) {
            Ok(Code::Ok) if !response.reservation_id.is_empty() => {}
            Ok(Code::Ok | Code::OverLimit) => {
                entry.not_before_ms = now_ms.saturating_add(retry_ms);
                return Some(LeaseEvent::Refused);
            }
            _ => {
                entry.not_before_ms = now_ms.saturating_add(retry_ms);
                return Some(LeaseEvent::Failed(ServiceFailure::UnknownCode));
            }
        }
        let Some(ttl_ms) = ttl_ms else {
            // Leases were turned off while the call was out: released at once.
            self.commits.push(LeaseCommit {
                descriptor: entry.descriptor.clone(),
                reservation_id: response.reservation_id,
                actual: 0,
            });
            return Some(LeaseEvent::Refused);
        };
        // The hold lives at most the ttl, as long as the service says it holds (its longest
        // hold, the counters' windows: `hold_ttl`, this project's extension), and never past
        // the counter's window. The service counts from when it answered, after the call
        // left: this end is never later than its own.
        let held_ms = response.hold_ttl.as_ref().map(ratelimit_proto::duration_ms);
        let reset_ms = response
            .statuses
            .iter()
            .filter_map(|s| s.duration_until_reset.as_ref())
            .map(ratelimit_proto::duration_ms)
            .min();
        // Asked for `lease.ttl` + the request ttl (see `take_calls`).
        let request_ttl_ms = u64::try_from(entry.request_ttl.as_millis()).unwrap_or(u64::MAX);
        let asked_ttl_ms = ttl_ms.saturating_add(request_ttl_ms);
        let life_ms = [Some(asked_ttl_ms), held_ms, reset_ms]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(asked_ttl_ms);
        // Admits for `lease.ttl` at most, leaving its requests the request ttl of hold (at
        // least half its life when the hold is shorter than asked).
        let window_ms = ttl_ms.min(life_ms - request_ttl_ms.min(life_ms / 2));
        let status = response
            .statuses
            .iter()
            .filter(|s| s.current_limit.is_some())
            .min_by_key(|s| s.limit_remaining)
            .cloned();
        let new = Lease {
            id: response.reservation_id,
            size: pending.amount,
            admit_until_ms: pending.asked_ms.saturating_add(window_ms),
            renew_ms: pending.asked_ms.saturating_add(window_ms / 2),
            used: false,
            status,
            asked_ms: pending.asked_ms,
        };
        let event = match entry.lease.replace(new) {
            Some(old) => {
                self.commits.push(LeaseCommit {
                    descriptor: entry.descriptor.clone(),
                    reservation_id: old.id,
                    actual: std::mem::take(&mut entry.spent),
                });
                LeaseEvent::Renewed
            }
            None => {
                // Not idle before it had its chance.
                entry.last_admit_ms = now_ms;
                LeaseEvent::Granted
            }
        };
        Some(event)
    }

    /// A request admitted from lease `key` with `amount` ended, having spent `actual` tokens
    /// of the lease's category. When its lease is gone (committed at VM shutdown), the tokens
    /// are committed without an id, over `descriptor`.
    pub fn finish(
        &mut self,
        key: &str,
        descriptor: &RateLimitDescriptor,
        amount: u64,
        actual: u64,
    ) {
        match self.entries.get_mut(key) {
            Some(e) if e.lease.is_some() => {
                e.in_flight = e.in_flight.saturating_sub(amount);
                e.spent = e.spent.saturating_add(actual);
            }
            other => {
                if let Some(e) = other {
                    e.in_flight = e.in_flight.saturating_sub(amount);
                }
                if actual > 0 {
                    self.commits.push(LeaseCommit {
                        descriptor: descriptor.clone(),
                        reservation_id: String::new(),
                        actual,
                    });
                }
            }
        }
    }

    /// The periodic pass at `now_ms`: leases that are expired, idle, out of room after a
    /// refused renewal, or no longer wanted (leases off) are committed once nothing is in
    /// flight; leases at half their life are renewed; counters seen neither within one ttl
    /// nor holding anything are forgotten (once a second). Returns how many leases it
    /// committed.
    pub fn tick(&mut self, now_ms: u64) -> usize {
        let settings = self.settings.clone();
        let ttl_ms = settings.as_ref().map_or(0, LeaseSettings::ttl_ms);
        let mut committed = 0;
        for (key, e) in &mut self.entries {
            let Some(lease) = &e.lease else {
                continue;
            };
            // Past its admissions: nothing more to gain from it.
            let expired = now_ms >= lease.admit_until_ms;
            let idle = now_ms.saturating_sub(e.last_admit_ms) >= ttl_ms / 2;
            // Out of room and not to be renewed soon (refused or failed): its unused room
            // returns to the budget.
            let exhausted =
                e.pending.is_none() && now_ms < e.not_before_ms && e.room() < e.last_amount.max(1);
            if e.in_flight == 0 && (settings.is_none() || expired || idle || exhausted) {
                if let Some(old) = e.lease.take() {
                    self.commits.push(LeaseCommit {
                        descriptor: e.descriptor.clone(),
                        reservation_id: old.id,
                        actual: std::mem::take(&mut e.spent),
                    });
                    committed += 1;
                }
                continue;
            }
            // By age only while the counter is still hot: an admission from this lease, the
            // last within a quarter of a ttl (an idle lease is left to be committed, not
            // renewed).
            let recent = lease.used && now_ms.saturating_sub(e.last_admit_ms) < ttl_ms / 4;
            let due = (now_ms >= lease.renew_ms && recent) || e.room() < e.last_amount.max(1);
            if settings.is_some()
                && !expired
                && !idle
                && due
                && e.pending.is_none()
                && now_ms >= e.not_before_ms
            {
                e.pending = Some(Pending {
                    token: None,
                    amount: 0,
                    asked_ms: now_ms,
                });
                self.wanted.push(key.clone());
            }
        }
        if now_ms.saturating_sub(self.last_sweep_ms) >= 1_000 {
            self.last_sweep_ms = now_ms;
            self.entries.retain(|_, e| {
                e.lease.is_some()
                    || e.pending.is_some()
                    || e.in_flight > 0
                    || now_ms.saturating_sub(e.last_seen_ms) < ttl_ms.max(1)
            });
        }
        committed
    }

    /// VM shutdown: every lease is committed now with what it spent (requests still in
    /// flight commit their own tokens when they end). Returns how many.
    pub fn commit_all(&mut self) -> usize {
        let mut committed = 0;
        for e in self.entries.values_mut() {
            if let Some(old) = e.lease.take() {
                self.commits.push(LeaseCommit {
                    descriptor: e.descriptor.clone(),
                    reservation_id: old.id,
                    actual: std::mem::take(&mut e.spent),
                });
                committed += 1;
            }
        }
        self.wanted.clear();
        self.tokens.clear();
        for e in self.entries.values_mut() {
            e.pending = None;
        }
        committed
    }

    /// The commits owed, to queue.
    pub fn take_commits(&mut self) -> Vec<LeaseCommit> {
        std::mem::take(&mut self.commits)
    }

    /// Leases held now.
    pub fn held(&self) -> usize {
        self.entries.values().filter(|e| e.lease.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use ratelimit_proto::{Entry as DescriptorEntry, RateLimit};

    fn settings() -> LeaseSettings {
        LeaseSettings {
            fraction: 0.1,
            max_amount: 1_000_000,
            min_requests: 4,
            ttl: Duration::from_secs(30),
        }
    }

    /// A reservation of `amount` tokens against limits whose smallest rate is 10,000 (a lease
    /// holds 1,000) for user `user`.
    fn plan(user: &str, amount: u64) -> PlannedReservation {
        PlannedReservation {
            category: TokenCategory::Total,
            cost_limit: None,
            descriptor: RateLimitDescriptor {
                entries: vec![DescriptorEntry {
                    key: "limit.per-user".into(),
                    value: user.into(),
                }],
            },
            amount,
            ttl: Duration::from_secs(60),
            capacity: 10_000,
            shadow: false,
        }
    }

    fn granted(id: &str, remaining: u32, reset_s: i64) -> Vec<u8> {
        ReserveResponse {
            code: Code::Ok as i32,
            reservation_id: id.into(),
            statuses: vec![DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: Some(RateLimit {
                    name: "per-user".into(),
                    requests_per_unit: 10_000,
                    unit: 0,
                }),
                limit_remaining: remaining,
                duration_until_reset: Some(prost_types::Duration {
                    seconds: reset_s,
                    nanos: 0,
                }),
            }],
            hold_ttl: None,
        }
        .encode_to_vec()
    }

    fn refused() -> Vec<u8> {
        ReserveResponse {
            code: Code::OverLimit as i32,
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Sends the wanted calls as tokens from `first`; returns their amounts.
    fn send(leases: &mut Leases, now: u64, first: u32) -> Vec<u64> {
        leases
            .take_calls(now)
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                leases.sent(&c.key, first + i as u32);
                c.amount
            })
            .collect()
    }

    /// A table whose counter of `plan` was made hot by 4 requests at `now` and leased by the
    /// answer `reply` at `answered`.
    fn leased(plan: &PlannedReservation, now: u64, reply: Vec<u8>, answered: u64) -> Leases {
        let mut leases = Leases::new(Some(settings()));
        for _ in 0..4 {
            leases.admit(plan, now);
        }
        send(&mut leases, now, 1);
        leases.on_reply(1, Ok(&reply), answered);
        leases
    }

    fn leased_key(a: Admission) -> String {
        match a {
            Admission::Leased { key, .. } => key,
            Admission::Call => panic!("not leased"),
        }
    }

    #[test]
    fn a_counter_is_leased_once_hot_and_then_admitted_without_calls() {
        let mut leases = Leases::new(Some(settings()));
        for _ in 0..3 {
            assert_eq!(leases.admit(&plan("a", 100), 0), Admission::Call);
            assert!(!leases.has_calls(), "not hot yet");
        }
        assert_eq!(leases.admit(&plan("a", 100), 0), Admission::Call);
        assert_eq!(send(&mut leases, 0, 7), vec![1_000], "a tenth of 10,000");
        assert!(leases.owns(7));
        assert_eq!(
            leases.on_reply(7, Ok(&granted("L1", 5_000, 60)), 10),
            Some(LeaseEvent::Granted)
        );
        // 1,000 tokens of room: four requests of 100, the renewal wanted at half.
        let keys: Vec<String> = (0..4)
            .map(|_| leased_key(leases.admit(&plan("a", 100), 20)))
            .collect();
        assert!(!leases.has_calls());
        let key = leased_key(leases.admit(&plan("a", 100), 20));
        assert!(leases.has_calls(), "half the room used: renewal wanted");
        // Another user is not hot.
        assert_eq!(leases.admit(&plan("b", 100), 20), Admission::Call);
        for k in keys.iter().chain([&key]) {
            leases.finish(k, &plan("a", 100).descriptor, 100, 60);
        }
        assert!(leases.take_commits().is_empty(), "nothing committed yet");
    }

    #[test]
    fn past_max_keys_counters_are_not_tracked_until_the_sweep_forgets_idle_ones() {
        let mut leases = Leases::new(Some(settings()));
        for i in 0..MAX_KEYS {
            leases.admit(&plan(&i.to_string(), 100), 0);
        }
        for _ in 0..10 {
            assert_eq!(leases.admit(&plan("late", 100), 0), Admission::Call);
        }
        assert!(!leases.has_calls(), "not tracked: never hot");
        // A ttl later, the idle counters are forgotten and new ones tracked again.
        leases.tick(30_000);
        for _ in 0..4 {
            leases.admit(&plan("late", 100), 30_001);
        }
        assert!(leases.has_calls());
    }

    #[test]
    fn a_lease_too_small_for_min_requests_amounts_is_never_asked() {
        let mut leases = Leases::new(Some(settings()));
        // A lease of 1,000 would hold 3 requests of 300: fewer than minRequests.
        for _ in 0..10 {
            assert_eq!(leases.admit(&plan("a", 300), 0), Admission::Call);
        }
        assert!(!leases.has_calls());
    }

    #[test]
    fn renewal_carries_the_requests_in_flight_and_commits_each_token_once() {
        let mut leases = leased(&plan("a", 100), 0, granted("L1", 5_000, 60), 0);
        let d = plan("a", 100).descriptor;
        // Five in flight (500): the renewal asks for them plus a new lease.
        let inflight: Vec<String> = (0..5)
            .map(|_| leased_key(leases.admit(&plan("a", 100), 5)))
            .collect();
        assert_eq!(send(&mut leases, 5, 2), vec![1_500]);
        // Two finish before the renewal is granted: they are the old lease's.
        leases.finish(&inflight[0], &d, 100, 40);
        leases.finish(&inflight[1], &d, 100, 50);
        // While it is pending, admission stays within what the renewal holds (1,500): 3 in
        // flight + 10 more.
        let mut more = Vec::new();
        while let Admission::Leased { key, .. } = leases.admit(&plan("a", 100), 6) {
            more.push(key);
            assert!(more.len() <= 10, "admitted past the old lease's room");
        }
        // The old lease (1,000) had 1,000 - 300 - 90 = 610 of room: 6 more.
        assert_eq!(more.len(), 6);
        assert_eq!(
            leases.on_reply(2, Ok(&granted("L2", 3_000, 60)), 7),
            Some(LeaseEvent::Renewed)
        );
        assert_eq!(
            leases.take_commits(),
            vec![LeaseCommit {
                descriptor: d.clone(),
                reservation_id: "L1".into(),
                actual: 90
            }],
            "the old lease is committed with what finished under it"
        );
        // The rest finish under the new lease; idle, it is committed with them.
        for k in inflight[2..].iter().chain(&more) {
            leases.finish(k, &d, 100, 10);
        }
        assert_eq!(leases.tick(7), 0, "not idle yet");
        assert_eq!(leases.tick(7 + 15_000), 1);
        assert_eq!(
            leases.take_commits(),
            vec![LeaseCommit {
                descriptor: d,
                reservation_id: "L2".into(),
                actual: 90
            }]
        );
        assert_eq!(leases.held(), 0);
    }

    #[test]
    fn while_a_renewal_is_pending_the_old_lease_admits_only_what_the_new_one_will_hold() {
        let mut leases = leased(&plan("a", 100), 0, granted("L1", 5_000, 60), 0);
        let d = plan("a", 100).descriptor;
        let first: Vec<String> = (0..5)
            .map(|_| leased_key(leases.admit(&plan("a", 100), 1)))
            .collect();
        assert_eq!(send(&mut leases, 1, 2), vec![1_500]);
        leases.on_reply(2, Ok(&granted("L2", 5_000, 60)), 2);
        for k in &first {
            leases.finish(k, &d, 100, 0);
        }
        // L2 holds 1,500, all of it room; at half its life the tick renews it with 1,000 (none
        // in flight). Until that is granted, L2 admits 1,000, not its 1,500.
        leases.admit(&plan("a", 100), 14_000);
        leases.tick(15_001);
        assert_eq!(send(&mut leases, 15_001, 3), vec![1_100]);
        let mut n = 1;
        while let Admission::Leased { .. } = leases.admit(&plan("a", 100), 15_002) {
            n += 1;
        }
        assert_eq!(n, 11, "in flight at most what the renewal holds (1,100)");
    }

    #[test]
    fn a_refused_renewal_spends_the_room_left_then_returns_it_once_drained() {
        let mut leases = leased(&plan("a", 100), 0, granted("L1", 500, 60), 0);
        let d = plan("a", 100).descriptor;
        let mut admitted: Vec<String> = (0..5)
            .map(|_| leased_key(leases.admit(&plan("a", 100), 1)))
            .collect();
        send(&mut leases, 1, 2);
        assert_eq!(
            leases.on_reply(2, Ok(&refused()), 2),
            Some(LeaseEvent::Refused)
        );
        // The room left (500) still admits, then requests make their own Reserve.
        while let Admission::Leased { key, .. } = leases.admit(&plan("a", 100), 3) {
            admitted.push(key);
        }
        assert_eq!(admitted.len(), 10);
        assert_eq!(leases.admit(&plan("a", 100), 3), Admission::Call);
        assert!(
            !leases.has_calls(),
            "no new lease asked before the retry time"
        );
        assert_eq!(leases.tick(4), 0, "requests in flight: kept");
        for k in &admitted {
            leases.finish(k, &d, 100, 100);
        }
        assert_eq!(leases.tick(5), 1, "drained and out of room: committed");
        assert_eq!(
            leases.take_commits(),
            vec![LeaseCommit {
                descriptor: d,
                reservation_id: "L1".into(),
                actual: 1_000
            }]
        );
    }

    #[test]
    fn a_failed_renewal_keeps_the_lease_until_it_expires_at_the_window_end() {
        // The window ends in 4 s: the hold lives 4 s from when it was asked, not 30 + 60;
        // the lease admits for half of that, so that its last request is still held 2 s.
        let mut leases = leased(&plan("a", 10), 1_000, granted("L1", 500, 4), 1_100);
        assert!(matches!(
            leases.admit(&plan("a", 10), 1_500),
            Admission::Leased { .. }
        ));
        // Half its admissions: the tick asks for a renewal, which fails.
        leases.tick(2_000);
        assert_eq!(send(&mut leases, 2_000, 2).len(), 1);
        assert_eq!(
            leases.on_reply(2, Err(ServiceFailure::Grpc(14)), 2_010),
            Some(LeaseEvent::Failed(ServiceFailure::Grpc(14)))
        );
        assert!(matches!(
            leases.admit(&plan("a", 10), 2_999),
            Admission::Leased { .. }
        ));
        assert_eq!(
            leases.admit(&plan("a", 10), 3_000),
            Admission::Call,
            "past its admissions: none without a hold for the request's time"
        );
    }

    #[test]
    fn an_idle_lease_is_not_renewed_and_is_committed_half_a_ttl_after_its_last_admission() {
        let mut leases = leased(&plan("a", 10), 0, granted("L1", 500, 3_600), 0);
        let key = leased_key(leases.admit(&plan("a", 10), 1_000));
        leases.finish(&key, &plan("a", 10).descriptor, 10, 7);
        // Half its admissions (15 s): due by age, but idle for 14 s: no renewal.
        assert_eq!(leases.tick(15_000), 0);
        assert!(!leases.has_calls(), "an idle lease is not renewed");
        assert_eq!(leases.tick(16_000), 1, "idle for half a ttl: committed");
        assert_eq!(leases.take_commits()[0].actual, 7);
    }

    #[test]
    fn a_lease_nothing_was_admitted_from_is_not_renewed_by_age_but_committed_when_it_ends() {
        // The window ends in 2 s: the lease admits for 1 s and is due by age at 0.5 s.
        let d = plan("a", 10).descriptor;
        let mut unused = leased(&plan("a", 10), 0, granted("L1", 500, 2), 0);
        assert_eq!(unused.tick(600), 0);
        assert!(!unused.has_calls(), "nothing admitted from it: not renewed");
        assert_eq!(unused.tick(1_000), 1, "past its admissions: committed");
        assert_eq!(
            unused.take_commits(),
            vec![LeaseCommit {
                descriptor: d.clone(),
                reservation_id: "L1".into(),
                actual: 0
            }]
        );
        // The same lease with one request admitted from it is renewed at 0.5 s.
        let mut used = leased(&plan("a", 10), 0, granted("L1", 500, 2), 0);
        let key = leased_key(used.admit(&plan("a", 10), 100));
        used.finish(&key, &d, 10, 10);
        used.tick(600);
        assert_eq!(send(&mut used, 600, 2), vec![1_000], "renewed by age");
    }

    #[test]
    fn a_lease_admits_for_its_ttl_and_holds_its_requests_a_reservation_ttl_longer() {
        let mut leases = Leases::new(Some(settings()));
        for _ in 0..4 {
            leases.admit(&plan("a", 10), 0);
        }
        let calls = leases.take_calls(0);
        assert_eq!(calls[0].ttl, Duration::from_secs(90), "30 s + 60 s");
        leases.sent(&calls[0].key, 1);
        leases.on_reply(1, Ok(&granted("L1", 500, 3_600)), 5);
        assert!(matches!(
            leases.admit(&plan("a", 10), 29_999),
            Admission::Leased { .. }
        ));
        assert_eq!(leases.admit(&plan("a", 10), 30_000), Admission::Call);
        // A service that holds for less than asked says so (`hold_ttl`): 20 s here, so the
        // lease admits for 10 s and its last request stays held 10 s.
        let mut leases = Leases::new(Some(settings()));
        for _ in 0..4 {
            leases.admit(&plan("a", 10), 0);
        }
        send(&mut leases, 0, 1);
        let mut reply = ReserveResponse::decode(granted("L1", 500, 3_600).as_slice()).unwrap();
        reply.hold_ttl = Some(prost_types::Duration {
            seconds: 20,
            nanos: 0,
        });
        leases.on_reply(1, Ok(&reply.encode_to_vec()), 5);
        assert!(matches!(
            leases.admit(&plan("a", 10), 9_999),
            Admission::Leased { .. }
        ));
        assert_eq!(leases.admit(&plan("a", 10), 10_000), Admission::Call);
    }

    #[test]
    fn the_status_of_a_leased_admission_counts_the_room_left_and_the_time_to_reset() {
        let mut leases = leased(&plan("a", 100), 0, granted("L1", 5_000, 60), 0);
        let Admission::Leased {
            status: Some(status),
            ..
        } = leases.admit(&plan("a", 100), 2_500)
        else {
            panic!("not leased with a status");
        };
        assert_eq!(status.limit_remaining, 5_000 + 900);
        let reset = status.duration_until_reset.unwrap();
        assert_eq!((reset.seconds, reset.nanos), (57, 500_000_000));
    }

    #[test]
    fn at_shutdown_leases_are_committed_and_later_ends_commit_without_an_id() {
        let mut leases = leased(&plan("a", 100), 0, granted("L1", 5_000, 60), 0);
        let d = plan("a", 100).descriptor;
        let a = leased_key(leases.admit(&plan("a", 100), 1));
        let b = leased_key(leases.admit(&plan("a", 100), 1));
        leases.finish(&a, &d, 100, 30);
        assert_eq!(leases.commit_all(), 1);
        leases.finish(&b, &d, 100, 20);
        assert_eq!(
            leases.take_commits(),
            vec![
                LeaseCommit {
                    descriptor: d.clone(),
                    reservation_id: "L1".into(),
                    actual: 30
                },
                LeaseCommit {
                    descriptor: d,
                    reservation_id: String::new(),
                    actual: 20
                },
            ]
        );
    }

    #[test]
    fn leases_turned_off_are_committed_once_drained_and_ask_nothing() {
        let mut leases = leased(&plan("a", 100), 0, granted("L1", 5_000, 60), 0);
        let d = plan("a", 100).descriptor;
        let a = leased_key(leases.admit(&plan("a", 100), 1));
        leases.reconfigure(None);
        assert_eq!(leases.admit(&plan("a", 100), 2), Admission::Call);
        assert_eq!(leases.tick(3), 0);
        leases.finish(&a, &d, 100, 70);
        assert_eq!(leases.tick(4), 1);
        assert_eq!(leases.take_commits()[0].actual, 70);
        assert!(leases.take_calls(5).is_empty());
    }

    /// A service's view of one counter: its value and the holds of live reservations.
    struct Service {
        max: u64,
        value: u64,
        holds: HashMap<String, u64>,
        next: u32,
    }

    impl Service {
        fn reserve(&mut self, amount: u64) -> Vec<u8> {
            let held: u64 = self.holds.values().sum();
            if self.value + held + amount > self.max {
                return refused();
            }
            self.next += 1;
            let id = format!("r{}", self.next);
            self.holds.insert(id.clone(), amount);
            let remaining = self.max - self.value - held - amount;
            granted(&id, u32::try_from(remaining).unwrap_or(u32::MAX), 3_600)
        }

        fn commit(&mut self, c: &LeaseCommit) {
            self.holds.remove(&c.reservation_id);
            self.value += c.actual;
        }
    }

    #[test]
    fn under_any_interleaving_admission_stays_held_and_every_token_is_committed_once() {
        // (seed, lease ttl in ms, one step in ten answers a call / one in `slow`)
        for (seed, ttl_ms, slow) in [
            (0x2545_f491_u64, 30_000, 1),
            (0x9e37_79b9, 2_000, 1),
            (0x1234_5678, 2_000, 8),
            (0xdead_beef, 5_000, 20),
        ] {
            simulate(seed, ttl_ms, slow);
        }
    }

    fn simulate(mut seed: u64, ttl_ms: u64, slow: u64) {
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut leases = Leases::new(Some(LeaseSettings {
            ttl: Duration::from_millis(ttl_ms),
            ..settings()
        }));
        let mut service = Service {
            max: 10_000,
            value: 0,
            holds: HashMap::new(),
            next: 0,
        };
        let d = plan("a", 1).descriptor;
        let mut in_flight: Vec<(String, u64)> = Vec::new();
        let mut calls: Vec<(u32, u64)> = Vec::new();
        let (mut spent, mut token, mut now) = (0u64, 100u32, 0u64);
        for _ in 0..20_000 {
            now += rand(20);
            match rand(10) {
                0..=4 => {
                    let amount = 1 + rand(120);
                    if let Admission::Leased { key, .. } = leases.admit(&plan("a", amount), now) {
                        in_flight.push((key, amount));
                    }
                }
                5..=7 if !in_flight.is_empty() => {
                    let (key, amount) = in_flight
                        .swap_remove(usize::try_from(rand(in_flight.len() as u64)).unwrap());
                    // Never more than reserved: then no overshoot is allowed at all.
                    let actual = rand(amount + 1);
                    spent += actual;
                    leases.finish(&key, &d, amount, actual);
                }
                8 => {
                    leases.tick(now);
                }
                _ if !calls.is_empty() && rand(slow) == 0 => {
                    let (t, amount) = calls.remove(0);
                    let reply = service.reserve(amount);
                    leases.on_reply(t, Ok(&reply), now);
                }
                _ => {}
            }
            for c in leases.take_calls(now) {
                token += 1;
                leases.sent(&c.key, token);
                calls.push((token, c.amount));
            }
            for c in leases.take_commits() {
                service.commit(&c);
            }
            let held: u64 = service.holds.values().sum();
            let local: u64 = in_flight.iter().map(|(_, a)| a).sum::<u64>();
            assert!(
                service.value + held <= service.max,
                "the service never holds past its max"
            );
            assert!(
                local <= held,
                "admitted amounts in flight ({local}) are held at the service ({held})"
            );
        }
        for (key, amount) in in_flight.drain(..) {
            spent += amount;
            leases.finish(&key, &d, amount, amount);
        }
        leases.commit_all();
        for c in leases.take_commits() {
            service.commit(&c);
        }
        assert_eq!(service.value, spent, "every token committed exactly once");
        assert!(service.next > 2, "leases were granted and renewed");
    }
}
