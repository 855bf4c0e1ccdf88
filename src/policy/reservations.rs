//! What reservation mode reserves for a request: one `Reserve` per token category (and per
//! distinct amount or hold time), over the descriptor of the limits that spend it.

use super::{Applied, CostError, CostInputs, Policy};
use crate::config::TokenCategory;
use crate::cost::CostUsage;
use crate::estimate::RequestBound;
use ratelimit_proto::RateLimitDescriptor;
use std::time::Duration;

/// What a cost limit holds for a request whose bound cannot be priced: 1, so that a spent
/// budget still refuses it (a `Reserve` is admitted while counter + holds + amount ≤ the
/// limit), while nothing more is held than is known.
pub const UNPRICED_HOLD: u64 = 1;

/// One `Reserve` a request makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedReservation {
    /// The token category the limits spend (the commit carries the actual figure of it).
    pub category: TokenCategory,
    /// With category `cost`: the limit whose cost this is (each cost limit reserves apart,
    /// and its commit carries its own cost); `None` otherwise.
    pub cost_limit: Option<usize>,
    /// The descriptor of those limits (as [`Policy::report_descriptor`] builds it).
    pub descriptor: RateLimitDescriptor,
    /// Tokens to hold.
    pub amount: u64,
    /// The longest hold.
    pub ttl: Duration,
    /// The smallest rate of those limits, in tokens: what a lease is a fraction of.
    pub capacity: u64,
    /// Those limits are shadow limits (`enforcement: shadow`): a refusal only marks the
    /// request. Shadow and enforced limits never share a reservation.
    pub shadow: bool,
}

impl Policy {
    /// The reservations of a request to which `applied` limits apply. `bound`: what the request
    /// declares about itself (its body in hand), else `None`; `costs` and `model`: what the
    /// cost expressions read of the request, and its model (empty: unknown).
    ///
    /// Per limit, the amount is its own `reservation.amount` when it has one, else the
    /// request's bound in the limit's category (prompt estimate, declared completion maximum or
    /// `reservation.defaultAmount` when none is declared, or their sum for `total`), else
    /// `reservation.defaultAmount`; always capped by `reservation.maxAmount` and by the
    /// limit's smallest rate (a larger hold could never be admitted). A `tokens: cost` limit
    /// holds the cost of that bound ([`CostUsage::bound`]: each figure capped by
    /// `reservation.maxAmount`), capped by its smallest rate; when that cost cannot be
    /// computed (the model is not known before the response, say), it holds
    /// [`UNPRICED_HOLD`], its reason pushed on `errors` (the commit still charges the actual
    /// cost, or [`Policy::charge_cost`]'s fallback). Limits of
    /// one category with the same amount and hold time share one reservation, shadow limits
    /// apart from enforced ones, each cost limit apart from the others.
    pub fn plan_reservations(
        &self,
        applied: &[Applied],
        bound: Option<RequestBound>,
        costs: &[CostInputs],
        model: &str,
        errors: &mut Vec<CostError>,
    ) -> Vec<PlannedReservation> {
        let r = &self.reservation;
        struct Group<'a> {
            category: TokenCategory,
            cost_limit: Option<usize>,
            amount: u64,
            ttl: Duration,
            shadow: bool,
            capacity: u64,
            members: Vec<&'a Applied>,
        }
        let mut groups: Vec<Group<'_>> = Vec::new();
        for a in applied {
            let Some(limit) = self.limits.get(a.limit) else {
                continue;
            };
            let category = limit.tokens;
            let smallest_rate = limit.smallest_rate();
            let cost_limit = (category == TokenCategory::Cost).then_some(a.limit);
            let amount = match (a.amount, cost_limit) {
                (Some(own), None) => own.min(r.max_amount),
                (Some(own), Some(_)) => own,
                (None, Some(index)) => {
                    let u = CostUsage::bound(bound.as_ref(), r.default_amount, r.max_amount, model);
                    self.cost(index, costs, &u).unwrap_or_else(|reason| {
                        errors.push(CostError {
                            limit: limit.name.clone(),
                            reason,
                        });
                        UNPRICED_HOLD
                    })
                }
                (None, None) => bound
                    .map_or(r.default_amount, |b| b.tokens(category, r.default_amount))
                    .min(r.max_amount),
            }
            .min(smallest_rate);
            let ttl = limit.reservation_ttl.unwrap_or(r.ttl);
            let shadow = limit.is_shadow();
            match groups.iter_mut().find(|g| {
                g.category == category
                    && g.cost_limit == cost_limit
                    && g.amount == amount
                    && g.ttl == ttl
                    && g.shadow == shadow
            }) {
                Some(group) => {
                    group.capacity = group.capacity.min(smallest_rate);
                    group.members.push(a);
                }
                None => groups.push(Group {
                    category,
                    cost_limit,
                    amount,
                    ttl,
                    shadow,
                    capacity: smallest_rate,
                    members: vec![a],
                }),
            }
        }
        groups
            .into_iter()
            .map(|g| PlannedReservation {
                category: g.category,
                cost_limit: g.cost_limit,
                descriptor: self.descriptor(g.members.into_iter()),
                amount: g.amount,
                ttl: g.ttl,
                capacity: g.capacity,
                shadow: g.shadow,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::MockHost;

    const CONFIG: &str = r#"{"rateLimitService": {"cluster": "rl", "domain": "llm"},
        "reservation": {"defaultAmount": 30, "maxAmount": 500, "ttl": "20s"},
        "limits": {
          "a-total": {"rates": [{"limit": 1000, "window": "1m"}], "counters": [{"expression": "request.headers['x-user']"}]},
          "b-total-small": {"rates": [{"limit": 1000, "window": "1m"}, {"limit": 40, "window": "1s"}]},
          "c-prompt": {"rates": [{"limit": 1000, "window": "1h"}], "tokens": "prompt"},
          "d-completion": {"rates": [{"limit": 1000, "window": "1h"}], "tokens": "completion"},
          "e-own": {"rates": [{"limit": 1000, "window": "1h"}], "reservation": {"amount": "7 * 3", "ttl": "5s"}}
        }}"#;

    fn plan(bound: Option<RequestBound>) -> Vec<(TokenCategory, u64, u64, Vec<String>)> {
        let p = Policy::from_json(CONFIG.as_bytes()).unwrap();
        let mut host = MockHost::with_request_headers(&[("x-user", "alice")]);
        let d = p.evaluate(&mut host);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        p.plan_reservations(&d.applied, bound, &d.costs, "", &mut Vec::new())
            .into_iter()
            .map(|r| {
                let keys = crate::policy::test_support::limit_keys(&r.descriptor);
                (r.category, r.amount, r.ttl.as_secs(), keys)
            })
            .collect()
    }

    #[test]
    fn the_request_bound_is_reserved_per_category_and_capped_by_the_smallest_rate() {
        let got = plan(Some(RequestBound {
            prompt: 12,
            completion: Some(100),
        }));
        assert_eq!(
            got,
            vec![
                (
                    TokenCategory::Total,
                    112,
                    20,
                    vec!["limit.a-total".to_string()]
                ),
                (
                    TokenCategory::Total,
                    40,
                    20,
                    vec!["limit.b-total-small".to_string()]
                ),
                (
                    TokenCategory::Prompt,
                    12,
                    20,
                    vec!["limit.c-prompt".to_string()]
                ),
                (
                    TokenCategory::Completion,
                    100,
                    20,
                    vec!["limit.d-completion".to_string()]
                ),
                (TokenCategory::Total, 21, 5, vec!["limit.e-own".to_string()]),
            ]
        );
    }

    #[test]
    fn without_a_body_the_default_amount_is_reserved_and_max_amount_caps() {
        let got = plan(None);
        let amounts: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert_eq!(amounts, vec![30, 30, 30, 21]);
        // Same category, amount and hold: one reservation for both limits.
        assert_eq!(
            got[0].3,
            vec![
                "limit.a-total".to_string(),
                "limit.b-total-small".to_string()
            ]
        );
        let got = plan(Some(RequestBound {
            prompt: 10_000,
            completion: None,
        }));
        let amounts: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert_eq!(amounts, vec![500, 40, 500, 30, 21]);
        assert_eq!(
            got[3],
            (
                TokenCategory::Completion,
                30,
                20,
                vec!["limit.d-completion".to_string()]
            )
        );
    }

    #[test]
    fn a_cost_limit_holds_its_bounds_cost_and_one_unit_when_the_bound_cannot_be_priced() {
        let p = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "rl", "domain": "llm"},
                "reservation": {"defaultAmount": 30, "maxAmount": 500},
                "limits": {"by-model": {"rates": [{"limit": 100000, "window": "1d"}], "tokens": "cost",
                  "cost": "{'big': 10, 'small': 1}[usage.model] * (usage.prompt + usage.completion)"}}}"#,
        )
        .unwrap();
        let d = p.evaluate(&mut MockHost::default());
        let bound = Some(RequestBound {
            prompt: 12,
            completion: Some(100),
        });
        let mut errors = Vec::new();
        let plans = p.plan_reservations(&d.applied, bound, &d.costs, "big", &mut errors);
        assert_eq!(
            (plans[0].category, plans[0].cost_limit, plans[0].amount),
            (TokenCategory::Cost, Some(0), 1120)
        );
        assert!(errors.is_empty());
        // No model before the response: the cost is unknown; one unit is held, and said.
        let plans = p.plan_reservations(&d.applied, bound, &d.costs, "", &mut errors);
        assert_eq!(plans[0].amount, UNPRICED_HOLD);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with("limit `by-model`: cost failed"),
            "{errors:?}"
        );
    }
}
