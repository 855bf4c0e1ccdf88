//! One request's reservations in reservation mode: the `Reserve` calls it makes before the
//! upstream, their replies, and the `Commit` each needs at the end.
//!
//! Protocol (Kuadrant's `kuadrant.service.ratelimit.v1.RateLimitService`):
//! `Reserve {domain, descriptors, amount, ttl}` answers `{code, reservation_id}` (OK: the amount
//! is held until its commit or expiry; OVER_LIMIT: nothing held); `Commit {domain,
//! descriptors, reservation_id, actual_amount}` adds the actual amount to the counters and
//! releases the hold. An empty, unknown or expired id commits like a `Report`.
//! `ReserveResponse.statuses` (field 3) is this project's extension, sent by `ratelimit-service`
//! and absent from Limitador's answers.

use crate::config::TokenCategory;
use crate::cost::Spent;
use crate::flow::ServiceFailure;
use crate::policy::PlannedReservation;
use prost::Message;
use ratelimit_proto::{Code, DescriptorStatus, ReserveRequest, ReserveResponse};

/// gRPC status `UNIMPLEMENTED`: the service has no `Reserve` (Limitador 2.4 and earlier).
pub const GRPC_UNIMPLEMENTED: u32 = 12;

/// Where one reservation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// Its `Reserve` has not been answered.
    Pending,
    /// Admitted: the service holds the amount under this id (empty: nothing was held, e.g.
    /// no limit of the service matched).
    Granted(String),
    /// Admitted from the worker's lease of this key, without a call ([`crate::lease`]).
    Leased(String),
    /// Refused: OVER_LIMIT.
    Refused,
    /// No usable answer.
    Failed(ServiceFailure),
}

/// The encoded `ReserveRequest` of `amount` tokens over `descriptor` in `domain`, held at
/// most `ttl`.
pub fn encode_reserve(
    domain: &str,
    descriptor: ratelimit_proto::RateLimitDescriptor,
    amount: u64,
    ttl: std::time::Duration,
) -> Vec<u8> {
    ReserveRequest {
        domain: domain.to_string(),
        descriptors: vec![descriptor],
        amount,
        ttl: Some(ratelimit_proto::duration(ttl)),
    }
    .encode_to_vec()
}

/// A request's reservations.
#[derive(Debug, Default)]
pub struct Reservations {
    plans: Vec<PlannedReservation>,
    holds: Vec<Hold>,
    /// The statuses the answers carried (the filter's `x-ratelimit-*` headers).
    statuses: Vec<DescriptorStatus>,
}

/// All replies are in: what they say together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every reservation was admitted.
    Admitted,
    /// At least one limit refused.
    Refused,
    /// The service does not implement `Reserve`.
    Unimplemented,
    /// A reservation failed (the first failure).
    Failed(ServiceFailure),
}

/// What a finished request spent under a lease: handed back to the lease table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedSpend {
    /// The lease's key.
    pub key: String,
    /// The reservation's token category.
    pub category: TokenCategory,
    /// The reservation's index among the request's plans (its descriptor:
    /// [`Reservations::plans`]).
    pub index: usize,
    /// The reservation amount the lease admitted the request with.
    pub amount: u64,
    /// Tokens spent in the reservation's category (0: the request never reached the
    /// upstream).
    pub actual: u64,
}

/// One commit a finished request owes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOrder {
    /// The token category of the reservation.
    pub category: TokenCategory,
    /// The reservation's descriptor.
    pub descriptor: ratelimit_proto::RateLimitDescriptor,
    /// The reservation id (empty: the commit acts as a report).
    pub reservation_id: String,
    /// Tokens spent in the reservation's category (0 releases the hold).
    pub actual: u64,
}

impl Reservations {
    /// Reservations of `plans`, none answered yet.
    pub fn new(plans: Vec<PlannedReservation>) -> Self {
        let holds = vec![Hold::Pending; plans.len()];
        Reservations {
            plans,
            holds,
            statuses: Vec::new(),
        }
    }

    /// Whether the request makes no reservation.
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// The encoded `ReserveRequest` of each plan, in order, for `domain`.
    pub fn requests(&self, domain: &str) -> Vec<Vec<u8>> {
        self.pending_requests(domain)
            .into_iter()
            .map(|(_, bytes)| bytes)
            .collect()
    }

    /// The encoded `ReserveRequest` of each plan not answered yet (not admitted from a
    /// lease), with its index, for `domain`.
    pub fn pending_requests(&self, domain: &str) -> Vec<(usize, Vec<u8>)> {
        self.plans
            .iter()
            .zip(&self.holds)
            .enumerate()
            .filter(|(_, (_, hold))| **hold == Hold::Pending)
            .map(|(index, (p, _))| {
                let bytes = encode_reserve(domain, p.descriptor.clone(), p.amount, p.ttl);
                (index, bytes)
            })
            .collect()
    }

    /// Reservation `index` was admitted from the lease `key`; `status`: what the lease knows
    /// of the budget (for the response headers).
    pub fn lease(&mut self, index: usize, key: String, status: Option<DescriptorStatus>) {
        if let Some(hold) = self.holds.get_mut(index) {
            *hold = Hold::Leased(key);
            self.statuses.extend(status);
        }
    }

    /// What each reservation admitted from a lease spent: its category's tokens (or its cost)
    /// of `spent` (`None`: the request did not reach the upstream, and spent nothing).
    pub fn leased(&self, spent: Option<&Spent>) -> Vec<LeasedSpend> {
        self.plans
            .iter()
            .zip(&self.holds)
            .enumerate()
            .filter_map(|(index, (plan, hold))| match hold {
                Hold::Leased(key) => Some(LeasedSpend {
                    key: key.clone(),
                    category: plan.category,
                    index,
                    amount: plan.amount,
                    actual: spent.map_or(0, |s| s.amount(plan.category, plan.cost_limit)),
                }),
                _ => None,
            })
            .collect()
    }

    /// The plans, in order.
    pub fn plans(&self) -> &[PlannedReservation] {
        &self.plans
    }

    /// The statuses the answers carried.
    pub fn statuses(&self) -> &[DescriptorStatus] {
        &self.statuses
    }

    /// Takes the answer to reservation `index` (a late or repeated answer is ignored). Returns
    /// the outcome once every reservation is answered.
    pub fn on_reply(
        &mut self,
        index: usize,
        reply: Result<&[u8], ServiceFailure>,
    ) -> Option<Outcome> {
        let hold = self.holds.get_mut(index)?;
        if *hold != Hold::Pending {
            return None;
        }
        *hold = match reply.and_then(|bytes| {
            ReserveResponse::decode(bytes).map_err(|e| ServiceFailure::Undecodable(e.to_string()))
        }) {
            Ok(r) => {
                self.statuses.extend(r.statuses);
                match Code::try_from(r.code) {
                    Ok(Code::Ok) => Hold::Granted(r.reservation_id),
                    Ok(Code::OverLimit) => Hold::Refused,
                    _ => Hold::Failed(ServiceFailure::UnknownCode),
                }
            }
            Err(failure) => Hold::Failed(failure),
        };
        self.outcome()
    }

    /// What the answers say, once none is pending. A shadow reservation never refuses, and
    /// its failure never invokes the failure mode (only `UNIMPLEMENTED`, which says the
    /// service has no `Reserve` at all, counts).
    pub fn outcome(&self) -> Option<Outcome> {
        if self.holds.contains(&Hold::Pending) {
            return None;
        }
        let enforced = || {
            self.plans
                .iter()
                .zip(&self.holds)
                .filter(|(p, _)| !p.shadow)
                .map(|(_, h)| h)
        };
        let unimplemented = Hold::Failed(ServiceFailure::Grpc(GRPC_UNIMPLEMENTED));
        let failed = enforced().find_map(|h| match h {
            Hold::Failed(f) => Some(f),
            _ => None,
        });
        Some(if self.holds.contains(&unimplemented) {
            Outcome::Unimplemented
        } else if enforced().any(|h| *h == Hold::Refused) {
            Outcome::Refused
        } else if let Some(f) = failed {
            Outcome::Failed(f.clone())
        } else {
            Outcome::Admitted
        })
    }

    /// The names of the limits whose shadow reservation the service refused: the requests
    /// they would have refused (the limit entries of the reservation's descriptor).
    pub fn shadow_refused(&self) -> Vec<String> {
        let prefix = crate::policy::LIMIT_ENTRY_PREFIX;
        self.plans
            .iter()
            .zip(&self.holds)
            .filter(|(p, h)| p.shadow && **h == Hold::Refused)
            .flat_map(|(p, _)| {
                p.descriptor
                    .entries
                    .iter()
                    .filter_map(|e| e.key.strip_prefix(prefix).map(str::to_string))
            })
            .collect()
    }

    /// Whether a lease admitted any of the reservations.
    pub fn any_leased(&self) -> bool {
        self.holds.iter().any(|h| matches!(h, Hold::Leased(_)))
    }

    /// Tokens held per category before the upstream: the amounts of the reservations granted
    /// or admitted from a lease (summed over reservations of one category).
    pub fn reserved(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let mut out = std::collections::BTreeMap::new();
        for (p, h) in self.plans.iter().zip(&self.holds) {
            if matches!(h, Hold::Granted(_) | Hold::Leased(_)) {
                let n: &mut u64 = out.entry(p.category.as_str()).or_default();
                *n = n.saturating_add(p.amount);
            }
        }
        out
    }

    /// The commits a finished request owes. `spent`: what it spent when it reached the
    /// upstream (`None`: it did not, and costs nothing). A granted hold is committed with its
    /// category's actual tokens, or its actual cost (0 releases it); a reservation that was
    /// not granted (the failure mode let the request through) still charges what was spent,
    /// committed without an id, which counts like a report.
    pub fn commits(&self, spent: Option<&Spent>) -> Vec<CommitOrder> {
        self.plans
            .iter()
            .zip(&self.holds)
            .filter_map(|(plan, hold)| {
                let actual = spent.map_or(0, |s| s.amount(plan.category, plan.cost_limit));
                let reservation_id = match hold {
                    Hold::Granted(id) => id.clone(),
                    // Charged through the lease.
                    Hold::Leased(_) => return None,
                    _ => String::new(),
                };
                (actual > 0 || !reservation_id.is_empty()).then(|| CommitOrder {
                    category: plan.category,
                    descriptor: plan.descriptor.clone(),
                    reservation_id,
                    actual,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Usage;
    use ratelimit_proto::{Entry, RateLimitDescriptor};
    use std::time::Duration;

    fn plan(category: TokenCategory, amount: u64) -> PlannedReservation {
        PlannedReservation {
            category,
            cost_limit: None,
            descriptor: RateLimitDescriptor {
                entries: vec![Entry {
                    key: format!("limit.{}", category.as_str()),
                    value: "1".into(),
                }],
            },
            amount,
            ttl: Duration::from_millis(1500),
            capacity: 1000,
            shadow: false,
        }
    }

    fn reply(code: Code, id: &str) -> Vec<u8> {
        ReserveResponse {
            code: code as i32,
            reservation_id: id.into(),
            statuses: Vec::new(),
            hold_ttl: None,
        }
        .encode_to_vec()
    }

    #[test]
    fn requests_carry_amount_and_ttl_per_plan() {
        let r = Reservations::new(vec![
            plan(TokenCategory::Total, 120),
            plan(TokenCategory::Prompt, 20),
        ]);
        let reqs: Vec<ReserveRequest> = r
            .requests("llm")
            .iter()
            .map(|b| ReserveRequest::decode(b.as_slice()).unwrap())
            .collect();
        assert_eq!(reqs[0].domain, "llm");
        assert_eq!((reqs[0].amount, reqs[1].amount), (120, 20));
        let ttl = reqs[0].ttl.unwrap();
        assert_eq!((ttl.seconds, ttl.nanos), (1, 500_000_000));
    }

    #[test]
    fn outcome_waits_for_every_reply_and_refusal_wins_over_admission() {
        let mut r = Reservations::new(vec![
            plan(TokenCategory::Total, 1),
            plan(TokenCategory::Prompt, 1),
        ]);
        assert_eq!(r.on_reply(0, Ok(&reply(Code::Ok, "a"))), None);
        assert_eq!(
            r.on_reply(0, Ok(&reply(Code::OverLimit, ""))),
            None,
            "a repeated answer is ignored"
        );
        assert_eq!(
            r.on_reply(1, Ok(&reply(Code::OverLimit, ""))),
            Some(Outcome::Refused)
        );
        assert_eq!(r.on_reply(7, Ok(&reply(Code::Ok, "x"))), None);
        // Refused: the granted hold is released with 0, the refused one owes nothing.
        assert_eq!(
            r.commits(None),
            vec![CommitOrder {
                category: TokenCategory::Total,
                descriptor: plan(TokenCategory::Total, 1).descriptor,
                reservation_id: "a".into(),
                actual: 0
            }]
        );
    }

    #[test]
    fn unimplemented_and_failures_are_told_apart() {
        let mut r = Reservations::new(vec![plan(TokenCategory::Total, 1)]);
        assert_eq!(
            r.on_reply(0, Err(ServiceFailure::Grpc(12))),
            Some(Outcome::Unimplemented)
        );
        let mut r = Reservations::new(vec![plan(TokenCategory::Total, 1)]);
        assert_eq!(
            r.on_reply(0, Ok(b"\xff\xff garbage"))
                .map(|o| matches!(o, Outcome::Failed(ServiceFailure::Undecodable(_)))),
            Some(true)
        );
        let mut r = Reservations::new(vec![plan(TokenCategory::Total, 1)]);
        assert_eq!(
            r.on_reply(0, Ok(&reply(Code::Unknown, ""))),
            Some(Outcome::Failed(ServiceFailure::UnknownCode))
        );
    }

    #[test]
    fn commits_carry_each_categorys_actual_tokens_and_charge_ungranted_spend_without_an_id() {
        let mut r = Reservations::new(vec![
            plan(TokenCategory::Total, 100),
            plan(TokenCategory::Prompt, 10),
        ]);
        r.on_reply(0, Ok(&reply(Code::Ok, "t")));
        r.on_reply(1, Err(ServiceFailure::Grpc(14)));
        let usage = Usage {
            prompt: Some(7),
            completion: Some(30),
            total: Some(37),
            ..Usage::default()
        };
        let commits = r.commits(Some(&Spent::tokens(usage)));
        assert_eq!(commits.len(), 2);
        assert_eq!(
            (commits[0].reservation_id.as_str(), commits[0].actual),
            ("t", 37)
        );
        assert_eq!(
            (commits[1].reservation_id.as_str(), commits[1].actual),
            ("", 7)
        );
        // Nothing spent and nothing held: nothing owed.
        assert_eq!(r.commits(Some(&Spent::default())).len(), 1);
    }

    #[test]
    fn a_cost_reservation_commits_its_own_limits_cost() {
        let cost = |limit: usize| PlannedReservation {
            category: TokenCategory::Cost,
            cost_limit: Some(limit),
            ..plan(TokenCategory::Cost, 50)
        };
        let mut r = Reservations::new(vec![cost(2), cost(5), plan(TokenCategory::Total, 9)]);
        for i in 0..3 {
            r.on_reply(i, Ok(&reply(Code::Ok, &format!("r{i}"))));
        }
        let spent = Spent {
            usage: Usage {
                total: Some(40),
                ..Usage::default()
            },
            costs: vec![(5, 700), (2, 1234)],
        };
        let actual: Vec<u64> = r.commits(Some(&spent)).iter().map(|c| c.actual).collect();
        assert_eq!(actual, vec![1234, 700, 40]);
    }
}
