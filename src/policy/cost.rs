//! The cost a request spends on a `tokens: cost` limit: its `cost` CEL expression, evaluated
//! once the usage is known over the `usage` figures and the request attributes captured when
//! the policy was evaluated, or its `prices` table.

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

/// A cost: a non-negative int or uint.
fn cost_value(v: Value) -> Result<u64, String> {
    match v {
        Value::UInt(n) => Ok(n),
        Value::Int(n) => u64::try_from(n).map_err(|_| format!("a cost must not be negative, got {n}")),
        other => Err(format!(
            "a cost must be an int or uint, got {:?}",
            other.type_of()
        )),
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
                    .and_then(cost_value)
            }
        }
    }

    /// What limit `limit` is charged for `usage`: its [`Policy::cost`]; when that fails, the
    /// cost of what `fallback` gives (the usage `usage.fallback` charges a response without
    /// usage; asked only then); when it gives none or that fails too, the limit's smallest
    /// rate with `onError: deny` (its counter is spent for the window: a cost that cannot be
    /// computed fails closed), 0 with `skip`. Each failure is pushed on `errors`, naming the
    /// limit and the reason.
    pub fn charge_cost<'m>(
        &self,
        limit: usize,
        inputs: &[CostInputs],
        usage: &CostUsage<'m>,
        fallback: impl FnOnce() -> Option<CostUsage<'m>>,
        errors: &mut Vec<String>,
    ) -> u64 {
        let Some(l) = self.limits.get(limit) else {
            return 0;
        };
        let mut failed = |reason: String| {
            errors.push(format!("limit `{}`: cost failed: {reason}", l.name));
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
            OnError::Deny => l.rates.iter().map(|r| r.limit).min().unwrap_or(0),
            OnError::Skip => 0,
        }
    }
}
