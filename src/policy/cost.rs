//! The cost a request spends on a `tokens: cost` limit: its `cost` CEL expression, evaluated
//! once the usage is known over the `usage` figures and the request attributes captured when
//! the policy was evaluated, or its `prices` table.

use super::evaluate::whole_number;
use super::{CompiledExpr, Policy};
use crate::config::OnError;
use crate::cost::{CostUsage, PriceTable};
use cel_interpreter::objects::{Key, Map};
use cel_interpreter::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// How a `tokens: cost` limit computes a request's cost (a whole number in the unit of its
/// rates).
#[derive(Debug)]
pub enum Cost {
    /// `cost`: a CEL expression of an int or uint ≥ 0 over `usage.*` and the request's
    /// attributes.
    Expression(CompiledExpr),
    /// `prices`: per-million-token prices per model.
    Prices(PriceTable),
}

/// The request attributes a limit's `cost` expression reads, bound to its root variables when
/// the policy is evaluated (the usage comes later, with the response).
#[derive(Debug, Clone)]
pub struct CostInputs {
    /// Index into [`Policy::limits`].
    pub limit: usize,
    /// `(index into the policy's bindings, value)` per root variable the expression sees.
    pub(super) values: Vec<(usize, Value)>,
}

/// The keys of the `usage` map, allocated once per policy.
#[derive(Debug)]
pub(super) struct UsageKeys {
    figures: [Arc<String>; 6],
    model: Arc<String>,
}

/// The fields of the `usage` variable a cost expression reads: six figures (ints, tokens) and
/// the model (a string).
pub(crate) const USAGE_FIELDS: [&str; 7] = [
    "prompt",
    "completion",
    "total",
    "cached",
    "cacheWrite",
    "reasoning",
    "model",
];

/// The name of the variable that holds the usage in a cost expression.
pub(crate) const USAGE_VARIABLE: &str = "usage";

impl Default for UsageKeys {
    fn default() -> Self {
        let key = |i: usize| Arc::new(USAGE_FIELDS.get(i).copied().unwrap_or("").to_string());
        UsageKeys {
            figures: [key(0), key(1), key(2), key(3), key(4), key(5)],
            model: key(6),
        }
    }
}

impl UsageKeys {
    /// The `usage` map of `u`.
    fn map(&self, u: &CostUsage<'_>) -> Result<Value, String> {
        let figures = [
            u.prompt,
            u.completion,
            u.total,
            u.cached,
            u.cache_write,
            u.reasoning,
        ];
        let mut map = HashMap::with_capacity(USAGE_FIELDS.len());
        for (key, n) in self.figures.iter().zip(figures) {
            let n = i64::try_from(n).map_err(|_| format!("usage.{key} = {n} is too large"))?;
            map.insert(Key::String(key.clone()), Value::Int(n));
        }
        map.insert(
            Key::String(self.model.clone()),
            Value::String(Arc::new(u.model.to_string())),
        );
        Ok(Value::Map(Map { map: Arc::new(map) }))
    }
}

/// A cost that could not be computed, as [`Policy::charge_cost`] and the reservation plans
/// push it; shown as ``limit `<limit>`: cost failed: <reason>``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostError {
    /// The limit's name.
    pub limit: String,
    /// Why: the interpreter's error, or what was wrong with the value.
    pub reason: String,
}

impl std::fmt::Display for CostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "limit `{}`: cost failed: {}", self.limit, self.reason)
    }
}

impl Policy {
    /// What `usage` costs limit `limit` (`inputs`: the request's captured attributes, see
    /// [`super::Decision::costs`]).
    ///
    /// # Errors
    ///
    /// The limit has no cost (not `tokens: cost`), its expression failed (a missing attribute
    /// or key, an overflow, a zero divisor), its value is not an int or uint ≥ 0, or a price
    /// table's cost is above `u64::MAX`: the reason, as text.
    pub fn cost(
        &self,
        limit: usize,
        inputs: &[CostInputs],
        usage: &CostUsage<'_>,
    ) -> Result<u64, String> {
        match self.limits.get(limit).and_then(|l| l.cost.as_ref()) {
            None => Err("the limit spends no cost".into()),
            Some(Cost::Prices(table)) => table.cost(usage),
            Some(Cost::Expression(expr)) => {
                let mut scope = self.context.new_inner_scope();
                let values = inputs.iter().find(|c| c.limit == limit);
                for (b, value) in values.into_iter().flat_map(|c| &c.values) {
                    if let Some(binding) = self.bindings.get(*b) {
                        scope.add_variable_from_value(binding.name.as_str(), value.clone());
                    }
                }
                scope.add_variable_from_value(USAGE_VARIABLE, self.usage_keys.map(usage)?);
                scope
                    .resolve(&expr.expr)
                    .map_err(|e| e.to_string())
                    .and_then(|v| whole_number(v, "a cost"))
            }
        }
    }

    /// What limit `limit` is charged for `usage`: its [`Policy::cost`]; when that fails, the
    /// cost of what `fallback` gives (the flow's: reported usage without its cached,
    /// cache-write and reasoning tokens; asked only then); when it gives none or that fails
    /// too, the limit's smallest
    /// rate with `onError: deny` (its counter is spent for the window: a cost that cannot be
    /// computed fails closed), 0 with `skip`. Each failure is pushed on `errors`, naming the
    /// limit and the reason.
    pub fn charge_cost<'m>(
        &self,
        limit: usize,
        inputs: &[CostInputs],
        usage: &CostUsage<'m>,
        fallback: impl FnOnce() -> Option<CostUsage<'m>>,
        errors: &mut Vec<CostError>,
    ) -> u64 {
        let Some(l) = self.limits.get(limit) else {
            return 0;
        };
        let mut failed = |reason: String| {
            errors.push(CostError {
                limit: l.name.clone(),
                reason,
            })
        };
        match self.cost(limit, inputs, usage) {
            Ok(n) => return n,
            Err(reason) => failed(reason),
        }
        if let Some(u) = fallback() {
            match self.cost(limit, inputs, &u) {
                Ok(n) => return n,
                Err(reason) => failed(reason),
            }
        }
        match l.on_error {
            OnError::Deny => l.smallest_rate(),
            OnError::Skip => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::TokenCategory;
    use crate::cost::CostUsage;
    use crate::filter::MockHost;
    use crate::policy::test_support::refused;
    use crate::policy::Policy;

    /// A policy of one limit `l` spending `cost` (a CEL expression), `onError: on_error`.
    fn with_cost(cost: &str, on_error: &str) -> String {
        format!(
            r#"{{"rateLimitService": {{"cluster": "c", "domain": "d"}},
              "requestBody": {{"allowOnHeadersStopIteration": true}},
              "limits": {{"l": {{"rates": [{{"limit": 9000, "window": "1h"}}, {{"limit": 500, "window": "1m"}}],
                "tokens": "cost", "cost": {}, "onError": "{on_error}"}}}}}}"#,
            serde_json::to_string(cost).unwrap()
        )
    }

    fn usage(prompt: u64, cached: u64, completion: u64, model: &str) -> CostUsage<'_> {
        CostUsage {
            prompt,
            completion,
            total: prompt + completion,
            cached,
            model,
            ..CostUsage::default()
        }
    }

    fn host() -> MockHost {
        let mut h = MockHost::with_request_headers(&[("x-tier", "premium")]);
        h.body_json = Some(serde_json::json!({"model": "big", "max_tokens": 10}));
        h
    }

    #[test]
    fn a_cost_expression_computes_over_the_usage_and_the_request_attributes_read_before() {
        let p = Policy::from_json(
            with_cost(
                r#"(usage.prompt - usage.cached) * 3 + usage.cached + usage.completion * 12
                   + (requestBodyJSON('/model') == "big" ? 1000 : 0)
                   + (request.headers['x-tier'] == "premium" ? 5 : 0)"#,
                "deny",
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(p.limits[0].tokens, TokenCategory::Cost);
        let mut h = host();
        let d = p.evaluate(&mut h);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.costs.len(), 1);
        // The attributes were read once, with the policy; the cost needs no host.
        let fetched = h.fetched.clone();
        let cost = p.cost(0, &d.costs, &usage(100, 40, 10, ""));
        assert_eq!(cost, Ok(60 * 3 + 40 + 120 + 1000 + 5));
        assert_eq!(h.fetched, fetched);
        // Another usage, the same captured request.
        assert_eq!(p.cost(0, &d.costs, &usage(0, 0, 0, "")), Ok(1005));
    }

    #[test]
    fn the_model_and_every_figure_are_usage_fields() {
        let p = Policy::from_json(
            with_cost(
                r#"{"a": 1, "b": 2}[usage.model] * (usage.total + usage.cacheWrite + usage.reasoning)"#,
                "deny",
            )
            .as_bytes(),
        )
        .unwrap();
        let d = p.evaluate(&mut host());
        let u = CostUsage {
            prompt: 5,
            completion: 5,
            total: 10,
            cache_write: 3,
            reasoning: 2,
            model: "b",
            ..CostUsage::default()
        };
        assert_eq!(p.cost(0, &d.costs, &u), Ok(30));
        // A model the map lacks: no value to multiply, an error (never a free request).
        let other = CostUsage { model: "c", ..u };
        assert!(p.cost(0, &d.costs, &other).is_err());
    }

    #[test]
    fn a_negative_overflowing_or_fractional_cost_is_an_error() {
        for (expr, says) in [
            ("usage.cached - usage.prompt", "must not be negative"),
            ("usage.prompt * 9223372036854775807", "overflow"),
            ("usage.prompt / usage.cached", "zero"),
            ("double(usage.prompt) * 1.5", "int or uint"),
        ] {
            let p = Policy::from_json(with_cost(expr, "deny").as_bytes()).unwrap();
            let d = p.evaluate(&mut host());
            let e = p.cost(0, &d.costs, &usage(10, 0, 0, "")).unwrap_err();
            assert!(e.to_lowercase().contains(says), "{expr}: {e}");
        }
    }

    #[test]
    fn a_failing_cost_charges_the_fallback_then_the_smallest_rate_or_nothing() {
        let deny =
            Policy::from_json(with_cost("usage.prompt - usage.cached", "deny").as_bytes()).unwrap();
        let d = deny.evaluate(&mut host());
        let bad = usage(10, 20, 0, "");
        let good = usage(30, 0, 0, "");
        let mut errors = Vec::new();
        // The fallback usage evaluates: its cost is charged.
        assert_eq!(
            deny.charge_cost(0, &d.costs, &bad, || Some(good.clone()), &mut errors),
            30
        );
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().starts_with("limit `l`: cost failed:"),
            "{errors:?}"
        );
        // No fallback, or a failing one: the limit's smallest rate (fails closed).
        errors.clear();
        assert_eq!(
            deny.charge_cost(0, &d.costs, &bad, || None, &mut errors),
            500
        );
        assert_eq!(
            deny.charge_cost(0, &d.costs, &bad, || Some(bad.clone()), &mut errors),
            500
        );
        assert_eq!(errors.len(), 3);
        // A cost that evaluates asks for no fallback.
        let asked = std::cell::Cell::new(false);
        let fallback = || {
            asked.set(true);
            None
        };
        assert_eq!(
            deny.charge_cost(0, &d.costs, &good, fallback, &mut errors),
            30
        );
        assert!(!asked.get());
        let skip =
            Policy::from_json(with_cost("usage.prompt - usage.cached", "skip").as_bytes()).unwrap();
        let d = skip.evaluate(&mut host());
        assert_eq!(skip.charge_cost(0, &d.costs, &bad, || None, &mut errors), 0);
    }

    #[test]
    fn a_prices_table_needs_no_capture_and_prices_the_model() {
        let p = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "c", "domain": "d"},
                 "limits": {"dollars": {"rates": [{"limit": 100000000, "window": "30d"}], "tokens": "cost",
                   "prices": {"models": {"gpt-4o": {"prompt": 2500000, "cached": 250000, "completion": 10000000}},
                              "default": {"prompt": 1000000, "completion": 1000000}}}}}"#,
        )
        .unwrap();
        let d = p.evaluate(&mut MockHost::default());
        assert!(d.costs.is_empty());
        assert_eq!(
            p.cost(0, &d.costs, &usage(1000, 800, 100, "gpt-4o-2024-08-06")),
            Ok(200 * 5 / 2 + 800 / 4 + 1000)
        );
        assert_eq!(p.cost(0, &d.costs, &usage(1000, 800, 100, "")), Ok(1100));
    }

    #[test]
    fn cost_configurations_that_cannot_be_enforced_are_refused_at_configure_time() {
        let limit = |body: &str| {
            format!(
                r#"{{"rateLimitService": {{"cluster": "c", "domain": "d"}},
                  "limits": {{"l": {{"rates": [{{"limit": 1, "window": "1s"}}], {body}}}}}}}"#
            )
        };
        for (body, field, says) in [
            (
                r#""tokens": "cost""#,
                "limits.l.tokens",
                "needs a `cost` expression or a `prices` table",
            ),
            (
                r#""cost": "usage.prompt""#,
                "limits.l.cost",
                "needs `tokens: cost`",
            ),
            (
                r#""tokens": "prompt", "prices": {"default": {"prompt": 1, "completion": 1}}"#,
                "limits.l.prices",
                "needs `tokens: cost`",
            ),
            (
                r#""tokens": "cost", "cost": "1", "prices": {"default": {"prompt": 1, "completion": 1}}"#,
                "limits.l.prices",
                "not both",
            ),
            (
                r#""tokens": "cost", "cost": "usage.promt * 2""#,
                "limits.l.cost",
                "`usage.promt` is not a usage figure",
            ),
            (
                r#""tokens": "cost", "cost": "size(usage)""#,
                "limits.l.cost",
                "one figure of `usage`",
            ),
            (
                r#""tokens": "cost", "cost": "usage.model""#,
                "limits.l.cost",
                "a cost must be an int or uint",
            ),
            (
                r#""tokens": "cost", "cost": "1.5""#,
                "limits.l.cost",
                "a cost must be an int or uint",
            ),
            (
                r#""tokens": "cost", "cost": "usage.prompt > 3""#,
                "limits.l.cost",
                "a cost must be an int or uint",
            ),
            (
                r#""tokens": "cost", "cost": "costs.prompt""#,
                "limits.l.cost",
                "`costs` is not defined",
            ),
            (
                r#""tokens": "cost", "prices": {"models": {"": {"prompt": 1, "completion": 1}}, "default": {"prompt": 1, "completion": 1}}"#,
                "limits.l.prices.models",
                "must not be empty",
            ),
            (
                r#""tokens": "cost", "prices": {"models": {}}"#,
                "limits.l.prices",
                "missing field `default`",
            ),
            (
                r#""tokens": "cost", "prices": {"default": {"prompt": -1, "completion": 1}}"#,
                "limits.l.prices.default.prompt",
                "invalid value",
            ),
            (
                r#""tokens": "cost", "prices": {"default": {"prompt": 1.5, "completion": 1}}"#,
                "limits.l.prices.default.prompt",
                "invalid type",
            ),
            (
                r#""tokens": "cost", "cost": "requestBodyJSON('/model') == 'a' ? 1 : 2""#,
                "requestBody.allowOnHeadersStopIteration",
                "set it to true",
            ),
        ] {
            let e = refused(&limit(body));
            assert_eq!(e.field, field, "{body}: {e}");
            assert!(e.reason.contains(says), "{body}: {e}");
        }
        // `usage` is the cost expression's alone.
        let e = refused(&limit(r#""when": [{"predicate": "usage.prompt > 1"}]"#));
        assert!(
            e.reason
                .contains("only a `tokens: cost` limit's `cost` expression"),
            "{e}"
        );
    }
}
