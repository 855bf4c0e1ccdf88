//! The root context's queues: spent tokens waiting to be reported with `Report` (checkReport
//! mode), and reservations waiting for their `Commit` (reservation mode).
//!
//! Streams hand their finished usage here (state shared in the VM); the calls are dispatched as
//! the root context's, so that their answers reach the root context, which outlives the stream
//! and retries what failed. Tokens for the same descriptor are summed
//! into one report; a call that fails is retried up to `max_retries` times, each retry later
//! than the one before (see [`Backoff`]), then dropped and counted.

use ratelimit_proto::RateLimitDescriptor;
use std::collections::HashMap;

/// Longest wait before one retry, in milliseconds.
pub const MAX_RETRY_DELAY_MS: u64 = 5_000;

/// When a failed call is sent again: retry `n` (1 for the first) waits `first_ms` × 2^(n−1),
/// at most [`MAX_RETRY_DELAY_MS`]. With the defaults (100 ms, 8 retries) a call is retried
/// over about 16 s (0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 5 + 5), which outlasts a service
/// restart or a Redis failover; a retry is sent on the first tick at or after its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Further attempts before the call is dropped.
    pub max_retries: u32,
    /// Wait before the first retry, in milliseconds (the reporting tick).
    pub first_ms: u64,
}

impl Default for Backoff {
    /// No retry.
    fn default() -> Self {
        Backoff {
            max_retries: 0,
            first_ms: 0,
        }
    }
}

impl Backoff {
    /// Milliseconds to wait before retry `attempt` (1 for the first).
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(32);
        self.first_ms
            .saturating_mul(1u64 << doublings)
            .min(MAX_RETRY_DELAY_MS)
    }

    /// Milliseconds from the first failure until the last retry is sent.
    pub fn span_ms(&self) -> u64 {
        (1..=self.max_retries).map(|a| self.delay_ms(a)).sum()
    }
}

/// One `Report` to send: `hits` tokens for `descriptor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReport {
    /// The descriptor of the limits that spent the tokens.
    pub descriptor: RateLimitDescriptor,
    /// Tokens (the request's `hits_addend`), never 0.
    pub hits: u32,
    /// 0 for the first attempt.
    pub attempt: u32,
    /// Not sent before this time (milliseconds since the Unix epoch; 0: at once).
    pub not_before_ms: u64,
}

/// What became of a report whose call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The service accepted the tokens.
    Delivered {
        /// Tokens reported.
        hits: u32,
    },
    /// The call failed; it will be retried on a later tick.
    WillRetry {
        /// Tokens in the report.
        hits: u32,
        /// The attempt that comes next (1 for the first retry).
        attempt: u32,
    },
    /// The call failed and retries are exhausted: the tokens are lost.
    Dropped {
        /// Tokens in the report.
        hits: u32,
    },
    /// The token is not one of ours (already handled).
    Unknown,
}

/// Aggregated, in-flight and retrying reports.
#[derive(Debug, Default)]
pub struct ReportQueue {
    /// Tokens per descriptor not sent yet, in arrival order of descriptors.
    pending: Vec<(RateLimitDescriptor, u64)>,
    index: HashMap<RateLimitDescriptor, usize>,
    retry: Vec<PendingReport>,
    in_flight: HashMap<u32, PendingReport>,
    backoff: Backoff,
}

impl ReportQueue {
    /// A queue that retries a failed report as `backoff` says.
    pub fn new(backoff: Backoff) -> Self {
        ReportQueue {
            backoff,
            ..Default::default()
        }
    }

    /// Adds `tokens` spent on `descriptor`. 0 tokens are ignored (Limitador counts 0 as 1).
    pub fn add(&mut self, descriptor: RateLimitDescriptor, tokens: u64) {
        if tokens == 0 {
            return;
        }
        match self.index.get(&descriptor) {
            Some(&i) => {
                if let Some(entry) = self.pending.get_mut(i) {
                    entry.1 = entry.1.saturating_add(tokens);
                }
            }
            None => {
                self.index.insert(descriptor.clone(), self.pending.len());
                self.pending.push((descriptor, tokens));
            }
        }
    }

    /// Whether nothing waits to be sent or retried.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.retry.is_empty()
    }

    /// Number of calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Tokens not sent yet (aggregated and waiting for a retry), all descriptors together.
    pub fn unsent_tokens(&self) -> u64 {
        let pending = self.pending.iter().map(|(_, t)| *t);
        let retry = self.retry.iter().map(|r| u64::from(r.hits));
        pending.chain(retry).fold(0, u64::saturating_add)
    }

    /// Takes everything to send at `now_ms` (milliseconds since the Unix epoch): aggregated
    /// tokens (split into `u32` reports when a sum exceeds `u32::MAX`) and the reports whose
    /// retry is due.
    pub fn take_batch(&mut self, now_ms: u64) -> Vec<PendingReport> {
        let (mut out, later) = std::mem::take(&mut self.retry)
            .into_iter()
            .partition(|r| r.not_before_ms <= now_ms);
        self.retry = later;
        self.index.clear();
        for (descriptor, mut tokens) in self.pending.drain(..) {
            while tokens > 0 {
                let hits = tokens.min(u64::from(u32::MAX)) as u32;
                tokens -= u64::from(hits);
                out.push(PendingReport {
                    descriptor: descriptor.clone(),
                    hits,
                    attempt: 0,
                    not_before_ms: 0,
                });
            }
        }
        out
    }

    /// Takes over everything `other` still owes (after a reconfiguration).
    pub fn absorb(&mut self, mut other: ReportQueue) {
        for (descriptor, tokens) in other.pending.drain(..) {
            self.add(descriptor, tokens);
        }
        self.retry.append(&mut other.retry);
        self.in_flight.extend(other.in_flight);
    }

    /// Records that `report` was dispatched as call `token`.
    pub fn sent(&mut self, token: u32, report: PendingReport) {
        self.in_flight.insert(token, report);
    }

    /// Records that `report` could not even be dispatched (at `now_ms`).
    pub fn dispatch_failed(&mut self, report: PendingReport, now_ms: u64) -> ReportOutcome {
        self.fail(report, now_ms)
    }

    /// Records the end of call `token` at `now_ms`: `ok` when the service answered `OK`.
    pub fn reply(&mut self, token: u32, ok: bool, now_ms: u64) -> ReportOutcome {
        let Some(report) = self.in_flight.remove(&token) else {
            return ReportOutcome::Unknown;
        };
        if ok {
            ReportOutcome::Delivered { hits: report.hits }
        } else {
            self.fail(report, now_ms)
        }
    }

    fn fail(&mut self, mut report: PendingReport, now_ms: u64) -> ReportOutcome {
        if report.attempt >= self.backoff.max_retries {
            return ReportOutcome::Dropped { hits: report.hits };
        }
        report.attempt += 1;
        report.not_before_ms = now_ms.saturating_add(self.backoff.delay_ms(report.attempt));
        let outcome = ReportOutcome::WillRetry {
            hits: report.hits,
            attempt: report.attempt,
        };
        self.retry.push(report);
        outcome
    }
}

/// One `Commit` to send: the actual tokens of one reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCommit {
    /// The descriptor the reservation was made for (the same counters are committed).
    pub descriptor: RateLimitDescriptor,
    /// The id the service gave the reservation (empty: none; the commit then acts as a report).
    pub reservation_id: String,
    /// Tokens actually spent (0 releases the hold and adds nothing).
    pub actual: u64,
    /// 0 for the first attempt.
    pub attempt: u32,
    /// Not sent before this time (milliseconds since the Unix epoch; 0: at once).
    pub not_before_ms: u64,
}

/// What became of a commit whose call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The service applied it; `released`: the hold was still live and is released.
    Delivered {
        /// Tokens committed.
        actual: u64,
        /// Whether the service still held the reservation.
        released: bool,
        /// Whether the commit named a reservation (an empty id holds nothing to release).
        held: bool,
    },
    /// The call failed; it will be sent again.
    WillRetry {
        /// Tokens in the commit.
        actual: u64,
        /// The attempt that comes next (1 for the first retry).
        attempt: u32,
    },
    /// The call failed and retries are exhausted: the tokens are not charged (and the hold
    /// expires by itself).
    Dropped {
        /// Tokens in the commit.
        actual: u64,
    },
    /// The token is not one of ours.
    Unknown,
}

/// Commits waiting to be sent, in flight, or waiting for a retry.
#[derive(Debug, Default)]
pub struct CommitQueue {
    pending: Vec<PendingCommit>,
    in_flight: HashMap<u32, PendingCommit>,
    backoff: Backoff,
}

impl CommitQueue {
    /// A queue that retries a failed commit as `backoff` says.
    pub fn new(backoff: Backoff) -> Self {
        CommitQueue {
            backoff,
            ..Default::default()
        }
    }

    /// Queues the commit of `actual` tokens for reservation `reservation_id` on `descriptor`.
    pub fn add(&mut self, descriptor: RateLimitDescriptor, reservation_id: String, actual: u64) {
        self.pending.push(PendingCommit {
            descriptor,
            reservation_id,
            actual,
            attempt: 0,
            not_before_ms: 0,
        });
    }

    /// Whether nothing waits to be sent.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// Number of calls in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Takes everything to send at `now_ms` (milliseconds since the Unix epoch): new commits
    /// and the retries that are due.
    pub fn take_batch(&mut self, now_ms: u64) -> Vec<PendingCommit> {
        let (due, later) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|c| c.not_before_ms <= now_ms);
        self.pending = later;
        due
    }

    /// Records that `commit` was dispatched as call `token`.
    pub fn sent(&mut self, token: u32, commit: PendingCommit) {
        self.in_flight.insert(token, commit);
    }

    /// Takes over everything `other` still owes (after a reconfiguration).
    pub fn absorb(&mut self, mut other: CommitQueue) {
        self.pending.append(&mut other.pending);
        self.in_flight.extend(other.in_flight);
    }

    /// Records that `commit` could not even be dispatched (at `now_ms`).
    pub fn dispatch_failed(&mut self, commit: PendingCommit, now_ms: u64) -> CommitOutcome {
        self.fail(commit, now_ms)
    }

    /// Records the end of call `token` at `now_ms`: `Ok(released)` when the service answered.
    pub fn reply(&mut self, token: u32, result: Result<bool, ()>, now_ms: u64) -> CommitOutcome {
        let Some(commit) = self.in_flight.remove(&token) else {
            return CommitOutcome::Unknown;
        };
        match result {
            Ok(released) => CommitOutcome::Delivered {
                actual: commit.actual,
                released,
                held: !commit.reservation_id.is_empty(),
            },
            Err(()) => self.fail(commit, now_ms),
        }
    }

    /// Whether call `token` is one of this queue's.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.contains_key(&token)
    }

    fn fail(&mut self, mut commit: PendingCommit, now_ms: u64) -> CommitOutcome {
        if commit.attempt >= self.backoff.max_retries {
            return CommitOutcome::Dropped {
                actual: commit.actual,
            };
        }
        commit.attempt += 1;
        commit.not_before_ms = now_ms.saturating_add(self.backoff.delay_ms(commit.attempt));
        let outcome = CommitOutcome::WillRetry {
            actual: commit.actual,
            attempt: commit.attempt,
        };
        self.pending.push(commit);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratelimit_proto::Entry;

    /// Retries `max_retries` times, the first 100 ms after a failure.
    fn backoff(max_retries: u32) -> Backoff {
        Backoff {
            max_retries,
            first_ms: 100,
        }
    }

    fn desc(user: &str) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: vec![Entry {
                key: "auth.identity.userid".into(),
                value: user.into(),
            }],
        }
    }

    #[test]
    fn same_descriptor_is_aggregated_and_zero_ignored() {
        let mut q = ReportQueue::new(backoff(1));
        q.add(desc("a"), 10);
        q.add(desc("b"), 5);
        q.add(desc("a"), 7);
        q.add(desc("c"), 0);
        let batch = q.take_batch(0);
        assert_eq!(batch.len(), 2);
        assert_eq!(
            (batch[0].descriptor.clone(), batch[0].hits),
            (desc("a"), 17)
        );
        assert_eq!(batch[1].hits, 5);
        assert!(q.is_idle());
        assert!(q.take_batch(0).is_empty());
    }

    #[test]
    fn huge_sums_are_split_into_u32_reports() {
        let mut q = ReportQueue::new(backoff(0));
        q.add(desc("a"), u64::from(u32::MAX) + 5);
        let hits: Vec<u32> = q.take_batch(0).iter().map(|r| r.hits).collect();
        assert_eq!(hits, vec![u32::MAX, 5]);
    }

    #[test]
    fn failed_reports_are_retried_later_each_time_then_dropped() {
        let mut q = ReportQueue::new(backoff(2));
        q.add(desc("a"), 9);
        let r = q.take_batch(1_000).remove(0);
        q.sent(1, r);
        assert_eq!(
            q.reply(1, false, 1_000),
            ReportOutcome::WillRetry {
                hits: 9,
                attempt: 1
            }
        );
        assert_eq!(q.reply(1, false, 1_000), ReportOutcome::Unknown);
        assert!(
            q.take_batch(1_099).is_empty(),
            "the first retry waits 100 ms"
        );
        assert!(!q.is_idle());
        assert_eq!(q.unsent_tokens(), 9);
        let r = q.take_batch(1_100).remove(0);
        assert_eq!(
            q.dispatch_failed(r, 1_100),
            ReportOutcome::WillRetry {
                hits: 9,
                attempt: 2
            }
        );
        assert!(q.take_batch(1_299).is_empty(), "the second waits 200 ms");
        let r = q.take_batch(1_300).remove(0);
        q.sent(2, r);
        assert_eq!(q.reply(2, false, 1_300), ReportOutcome::Dropped { hits: 9 });
        assert!(q.is_idle());
    }

    #[test]
    fn a_retry_waiting_does_not_hold_back_new_reports() {
        let mut q = ReportQueue::new(backoff(3));
        q.add(desc("a"), 9);
        let r = q.take_batch(0).remove(0);
        q.sent(1, r);
        q.reply(1, false, 0);
        q.add(desc("a"), 4);
        let batch = q.take_batch(50);
        assert_eq!(batch.len(), 1);
        assert_eq!((batch[0].hits, batch[0].attempt), (4, 0));
        let batch = q.take_batch(100);
        assert_eq!((batch[0].hits, batch[0].attempt), (9, 1));
    }

    #[test]
    fn backoff_doubles_up_to_five_seconds_and_spans_sixteen_by_default() {
        let b = Backoff {
            max_retries: 8,
            first_ms: 100,
        };
        let delays: Vec<u64> = (1..=8).map(|a| b.delay_ms(a)).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.span_ms(), 16_300);
        assert_eq!(b.delay_ms(u32::MAX), MAX_RETRY_DELAY_MS, "no overflow");
        assert_eq!(Backoff::default().span_ms(), 0);
    }

    #[test]
    fn delivered_reports_leave_the_queue() {
        let mut q = ReportQueue::new(backoff(3));
        q.add(desc("a"), 4);
        let r = q.take_batch(0).remove(0);
        q.sent(7, r);
        assert_eq!(q.in_flight(), 1);
        assert_eq!(q.reply(7, true, 0), ReportOutcome::Delivered { hits: 4 });
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn commits_are_sent_once_each_retried_then_dropped() {
        let mut q = CommitQueue::new(backoff(1));
        q.add(desc("a"), "r1".into(), 30);
        q.add(desc("a"), "r2".into(), 0);
        let batch = q.take_batch(0);
        assert_eq!(
            batch.len(),
            2,
            "commits are never merged: each releases its own hold"
        );
        assert!(q.is_idle());
        q.sent(1, batch[0].clone());
        q.sent(2, batch[1].clone());
        assert_eq!(
            q.reply(2, Ok(true), 0),
            CommitOutcome::Delivered {
                actual: 0,
                released: true,
                held: true
            }
        );
        assert_eq!(
            q.reply(1, Err(()), 0),
            CommitOutcome::WillRetry {
                actual: 30,
                attempt: 1
            }
        );
        assert!(q.take_batch(99).is_empty(), "the retry waits 100 ms");
        let retry = q.take_batch(100).remove(0);
        assert_eq!((retry.reservation_id.as_str(), retry.attempt), ("r1", 1));
        assert_eq!(
            q.dispatch_failed(retry, 100),
            CommitOutcome::Dropped { actual: 30 }
        );
        assert!(q.is_idle());
        assert_eq!(q.reply(1, Ok(true), 100), CommitOutcome::Unknown);
    }

    #[test]
    fn unsent_tokens_count_pending_and_retries() {
        let mut q = ReportQueue::new(backoff(2));
        q.add(desc("a"), 10);
        q.add(desc("b"), 5);
        assert_eq!(q.unsent_tokens(), 15);
        let r = q.take_batch(0).remove(0);
        assert_eq!(q.unsent_tokens(), 0);
        q.sent(1, r);
        q.reply(1, false, 0);
        assert_eq!(q.unsent_tokens(), 10);
    }
}
