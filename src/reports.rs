//! The root context's queues: spent tokens waiting to be reported with `Report` (checkReport
//! mode), and reservations waiting for their `Commit` (reservation mode).
//!
//! Streams hand their finished usage here (state shared in the VM); the calls are dispatched as
//! the root context's, so that their answers reach the root context, which outlives the stream
//! and retries what failed. Tokens for the same descriptor are summed
//! into one report; a call that fails is retried up to `max_retries` times, then dropped and
//! counted.

use ratelimit_proto::RateLimitDescriptor;
use std::collections::HashMap;

/// One `Report` to send: `hits` tokens for `descriptor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReport {
    /// The descriptor of the limits that spent the tokens.
    pub descriptor: RateLimitDescriptor,
    /// Tokens (the request's `hits_addend`), never 0.
    pub hits: u32,
    /// 0 for the first attempt.
    pub attempt: u32,
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
    max_retries: u32,
}

impl ReportQueue {
    /// A queue that retries a failed report at most `max_retries` times.
    pub fn new(max_retries: u32) -> Self {
        ReportQueue {
            max_retries,
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

    /// Takes everything to send now: aggregated tokens (split into `u32` reports when a sum
    /// exceeds `u32::MAX`) and the reports due for a retry.
    pub fn take_batch(&mut self) -> Vec<PendingReport> {
        let mut out = std::mem::take(&mut self.retry);
        self.index.clear();
        for (descriptor, mut tokens) in self.pending.drain(..) {
            while tokens > 0 {
                let hits = tokens.min(u64::from(u32::MAX)) as u32;
                tokens -= u64::from(hits);
                out.push(PendingReport {
                    descriptor: descriptor.clone(),
                    hits,
                    attempt: 0,
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

    /// Records that `report` could not even be dispatched.
    pub fn dispatch_failed(&mut self, report: PendingReport) -> ReportOutcome {
        self.fail(report)
    }

    /// Records the end of call `token`: `ok` when the service answered `OK`.
    pub fn reply(&mut self, token: u32, ok: bool) -> ReportOutcome {
        let Some(report) = self.in_flight.remove(&token) else {
            return ReportOutcome::Unknown;
        };
        if ok {
            ReportOutcome::Delivered { hits: report.hits }
        } else {
            self.fail(report)
        }
    }

    fn fail(&mut self, mut report: PendingReport) -> ReportOutcome {
        if report.attempt >= self.max_retries {
            return ReportOutcome::Dropped { hits: report.hits };
        }
        report.attempt += 1;
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
    max_retries: u32,
}

impl CommitQueue {
    /// A queue that retries a failed commit at most `max_retries` times.
    pub fn new(max_retries: u32) -> Self {
        CommitQueue {
            max_retries,
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

    /// Takes everything to send now (new commits and retries).
    pub fn take_batch(&mut self) -> Vec<PendingCommit> {
        std::mem::take(&mut self.pending)
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

    /// Records that `commit` could not even be dispatched.
    pub fn dispatch_failed(&mut self, commit: PendingCommit) -> CommitOutcome {
        self.fail(commit)
    }

    /// Records the end of call `token`: `Ok(released)` when the service answered.
    pub fn reply(&mut self, token: u32, result: Result<bool, ()>) -> CommitOutcome {
        let Some(commit) = self.in_flight.remove(&token) else {
            return CommitOutcome::Unknown;
        };
        match result {
            Ok(released) => CommitOutcome::Delivered {
                actual: commit.actual,
                released,
                held: !commit.reservation_id.is_empty(),
            },
            Err(()) => self.fail(commit),
        }
    }

    /// Whether call `token` is one of this queue's.
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.contains_key(&token)
    }

    fn fail(&mut self, mut commit: PendingCommit) -> CommitOutcome {
        if commit.attempt >= self.max_retries {
            return CommitOutcome::Dropped {
                actual: commit.actual,
            };
        }
        commit.attempt += 1;
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
        let mut q = ReportQueue::new(1);
        q.add(desc("a"), 10);
        q.add(desc("b"), 5);
        q.add(desc("a"), 7);
        q.add(desc("c"), 0);
        let batch = q.take_batch();
        assert_eq!(batch.len(), 2);
        assert_eq!(
            (batch[0].descriptor.clone(), batch[0].hits),
            (desc("a"), 17)
        );
        assert_eq!(batch[1].hits, 5);
        assert!(q.is_idle());
        assert!(q.take_batch().is_empty());
    }

    #[test]
    fn huge_sums_are_split_into_u32_reports() {
        let mut q = ReportQueue::new(0);
        q.add(desc("a"), u64::from(u32::MAX) + 5);
        let hits: Vec<u32> = q.take_batch().iter().map(|r| r.hits).collect();
        assert_eq!(hits, vec![u32::MAX, 5]);
    }

    #[test]
    fn failed_reports_are_retried_then_dropped() {
        let mut q = ReportQueue::new(2);
        q.add(desc("a"), 9);
        let r = q.take_batch().remove(0);
        q.sent(1, r);
        assert_eq!(
            q.reply(1, false),
            ReportOutcome::WillRetry {
                hits: 9,
                attempt: 1
            }
        );
        assert_eq!(q.reply(1, false), ReportOutcome::Unknown);
        let r = q.take_batch().remove(0);
        assert_eq!(
            q.dispatch_failed(r),
            ReportOutcome::WillRetry {
                hits: 9,
                attempt: 2
            }
        );
        let r = q.take_batch().remove(0);
        q.sent(2, r);
        assert_eq!(q.reply(2, false), ReportOutcome::Dropped { hits: 9 });
        assert!(q.is_idle());
    }

    #[test]
    fn delivered_reports_leave_the_queue() {
        let mut q = ReportQueue::new(3);
        q.add(desc("a"), 4);
        let r = q.take_batch().remove(0);
        q.sent(7, r);
        assert_eq!(q.in_flight(), 1);
        assert_eq!(q.reply(7, true), ReportOutcome::Delivered { hits: 4 });
        assert_eq!(q.in_flight(), 0);
    }

    #[test]
    fn commits_are_sent_once_each_retried_then_dropped() {
        let mut q = CommitQueue::new(1);
        q.add(desc("a"), "r1".into(), 30);
        q.add(desc("a"), "r2".into(), 0);
        let batch = q.take_batch();
        assert_eq!(
            batch.len(),
            2,
            "commits are never merged: each releases its own hold"
        );
        assert!(q.is_idle());
        q.sent(1, batch[0].clone());
        q.sent(2, batch[1].clone());
        assert_eq!(
            q.reply(2, Ok(true)),
            CommitOutcome::Delivered {
                actual: 0,
                released: true,
                held: true
            }
        );
        assert_eq!(
            q.reply(1, Err(())),
            CommitOutcome::WillRetry {
                actual: 30,
                attempt: 1
            }
        );
        let retry = q.take_batch().remove(0);
        assert_eq!((retry.reservation_id.as_str(), retry.attempt), ("r1", 1));
        assert_eq!(
            q.dispatch_failed(retry),
            CommitOutcome::Dropped { actual: 30 }
        );
        assert!(q.is_idle());
        assert_eq!(q.reply(1, Ok(true)), CommitOutcome::Unknown);
    }

    #[test]
    fn unsent_tokens_count_pending_and_retries() {
        let mut q = ReportQueue::new(2);
        q.add(desc("a"), 10);
        q.add(desc("b"), 5);
        assert_eq!(q.unsent_tokens(), 15);
        let r = q.take_batch().remove(0);
        assert_eq!(q.unsent_tokens(), 0);
        q.sent(1, r);
        q.reply(1, false);
        assert_eq!(q.unsent_tokens(), 10);
    }
}
