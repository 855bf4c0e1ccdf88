//! What a request costs a `tokens: cost` limit: the usage figures a cost is computed from, and
//! the `prices` table (per-million-token prices per model) that computes one without CEL.
//!
//! A cost is a whole number in the unit the limit's rates are written in (micro-dollars, say):
//! it is what the limit's counter is charged, reserved and committed, exactly as a token count
//! is for the other categories. The arithmetic is checked: a figure that overflows `u64` is an
//! error, never a wrapped or saturated charge.

use crate::config::{PriceRow, PricesConfig, TokenCategory};
use crate::estimate::RequestBound;
use crate::usage::Usage;

/// The figures a cost is computed from (tokens), with the request's model. Absent figures
/// count 0. Built from the usage charged ([`CostUsage::charged`]) or from what a request
/// declares about itself ([`CostUsage::bound`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostUsage<'a> {
    /// Prompt (input) tokens, cached and cache-write tokens included.
    pub prompt: u64,
    /// Completion (output) tokens, reasoning tokens included.
    pub completion: u64,
    /// Total tokens (prompt + completion when the response reported no total).
    pub total: u64,
    /// Prompt tokens read from the provider's cache.
    pub cached: u64,
    /// Prompt tokens written to the provider's cache.
    pub cache_write: u64,
    /// Completion tokens spent on reasoning.
    pub reasoning: u64,
    /// The request's model: its body's `model`, else the one the response names; empty when
    /// neither is known.
    pub model: &'a str,
}

impl<'a> CostUsage<'a> {
    /// The figures of the usage charged for a response.
    pub fn charged(usage: &Usage, model: &'a str) -> Self {
        CostUsage {
            prompt: usage.prompt.unwrap_or(0),
            completion: usage.completion.unwrap_or(0),
            total: usage.tokens(TokenCategory::Total).unwrap_or(0),
            cached: usage.cached.unwrap_or(0),
            cache_write: usage.cache_write.unwrap_or(0),
            reasoning: usage.reasoning.unwrap_or(0),
            model,
        }
    }

    /// The figures of a request's own bound, what reservation mode holds before the
    /// upstream: its prompt estimate and its declared completion maximum
    /// (`default_completion` when it declares none), each at most `cap` tokens; `None`
    /// (the body is not in hand): `default_completion` tokens of prompt and of completion.
    /// Nothing is cached or spent on reasoning yet.
    pub fn bound(
        bound: Option<&RequestBound>,
        default_completion: u64,
        cap: u64,
        model: &'a str,
    ) -> Self {
        use TokenCategory::{Completion, Prompt};
        let (prompt, completion) = match bound {
            Some(b) => (
                b.tokens(Prompt, default_completion),
                b.tokens(Completion, default_completion),
            ),
            None => (default_completion, default_completion),
        };
        let (prompt, completion) = (prompt.min(cap), completion.min(cap));
        CostUsage {
            prompt,
            completion,
            total: prompt.saturating_add(completion),
            model,
            ..CostUsage::default()
        }
    }
}

/// What a finished request spends: its usage's tokens per category, and the cost of each
/// `tokens: cost` limit that applied (by limit index).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spent {
    /// The usage charged (clamped to `usage.maxTokensPerResponse`).
    pub usage: Usage,
    /// `(limit index, cost)` per cost limit that applied.
    pub costs: Vec<(usize, u64)>,
}

impl Spent {
    /// Spent tokens only (no cost limit applied).
    pub fn tokens(usage: Usage) -> Self {
        Spent {
            usage,
            costs: Vec::new(),
        }
    }

    /// What was spent in `category`: the usage's tokens, or for `cost` the cost of limit
    /// `cost_limit`; 0 when it was not reported or computed.
    pub fn amount(&self, category: TokenCategory, cost_limit: Option<usize>) -> u64 {
        match (category, cost_limit) {
            (TokenCategory::Cost, Some(limit)) => self
                .costs
                .iter()
                .find(|(l, _)| *l == limit)
                .map_or(0, |(_, n)| *n),
            (TokenCategory::Cost, None) => 0,
            (c, _) => self.usage.tokens(c).unwrap_or(0),
        }
    }
}

/// Tokens a price is quoted for: a row's prices are per million tokens.
pub const PRICE_PER_TOKENS: u64 = 1_000_000;

/// One row of a [`PriceTable`], every price resolved (per million tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prices {
    /// Uncached prompt tokens.
    pub prompt: u64,
    /// Prompt tokens read from the cache.
    pub cached: u64,
    /// Prompt tokens written to the cache.
    pub cache_write: u64,
    /// Completion tokens that are not reasoning.
    pub completion: u64,
    /// Reasoning tokens.
    pub reasoning: u64,
}

impl Prices {
    fn of(row: &PriceRow) -> Self {
        Prices {
            prompt: row.prompt,
            cached: row.cached.unwrap_or(row.prompt),
            cache_write: row.cache_write.unwrap_or(row.prompt),
            completion: row.completion,
            reasoning: row.reasoning.unwrap_or(row.completion),
        }
    }

    /// What `u` costs at these prices: the price-weighted tokens divided by
    /// [`PRICE_PER_TOKENS`], rounded up (a request of any tokens at a non-zero price costs
    /// at least 1). Cached and cache-write tokens are taken out of the prompt, reasoning
    /// tokens out of the completion (each at most what it is part of).
    ///
    /// # Errors
    ///
    /// A cost above `u64::MAX`.
    pub fn cost(&self, u: &CostUsage<'_>) -> Result<u64, String> {
        let cached = u.cached.min(u.prompt);
        let cache_write = u.cache_write.min(u.prompt - cached);
        let uncached = u.prompt - cached - cache_write;
        let reasoning = u.reasoning.min(u.completion);
        let answer = u.completion - reasoning;
        let too_large = || format!("the cost is larger than {}", u64::MAX);
        // A product of two u64 fits a u128; their sum may not.
        let weighted = [
            (uncached, self.prompt),
            (cached, self.cached),
            (cache_write, self.cache_write),
            (answer, self.completion),
            (reasoning, self.reasoning),
        ]
        .iter()
        .try_fold(0u128, |sum, &(tokens, price)| {
            sum.checked_add(u128::from(tokens) * u128::from(price))
        })
        .ok_or_else(too_large)?;
        let cost = weighted.div_ceil(u128::from(PRICE_PER_TOKENS));
        u64::try_from(cost).map_err(|_| too_large())
    }
}

/// A compiled `prices` table: rows by model, and the default row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    /// `(model, prices)`, in name order.
    models: Vec<(String, Prices)>,
    /// The row of any other model.
    default: Prices,
}

impl PriceTable {
    /// Compiles a `prices` table.
    ///
    /// # Errors
    ///
    /// A model name that is empty (the field at fault is `models`).
    pub fn compile(cfg: &PricesConfig) -> Result<Self, String> {
        if cfg.models.keys().any(|k| k.trim().is_empty()) {
            return Err("a model name must not be empty".into());
        }
        Ok(PriceTable {
            models: cfg
                .models
                .iter()
                .map(|(k, row)| (k.clone(), Prices::of(row)))
                .collect(),
            default: Prices::of(&cfg.default),
        })
    }

    /// The row that prices `model`: the row of that name, else of the longest name that
    /// `model` starts with followed by `-` (a dated snapshot of it), else the default row.
    pub fn row(&self, model: &str) -> &Prices {
        if let Some((_, p)) = self.models.iter().find(|(k, _)| k == model) {
            return p;
        }
        self.models
            .iter()
            .filter(|(k, _)| {
                model
                    .strip_prefix(k.as_str())
                    .is_some_and(|rest| rest.starts_with('-'))
            })
            .max_by_key(|(k, _)| k.len())
            .map_or(&self.default, |(_, p)| p)
    }

    /// What `u` costs at the prices of its model ([`PriceTable::row`], [`Prices::cost`]).
    ///
    /// # Errors
    ///
    /// A cost above `u64::MAX`.
    pub fn cost(&self, u: &CostUsage<'_>) -> Result<u64, String> {
        self.row(u.model).cost(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PriceTable {
        let cfg: PricesConfig = serde_json::from_str(
            r#"{"models": {
                  "gpt-4o": {"prompt": 2500000, "cached": 1250000, "completion": 10000000},
                  "gpt-4o-mini": {"prompt": 150000, "cached": 75000, "completion": 600000},
                  "claude": {"prompt": 3000000, "cached": 300000, "cacheWrite": 3750000,
                             "completion": 15000000, "reasoning": 20000000}},
                "default": {"prompt": 10000000, "completion": 30000000}}"#,
        )
        .unwrap();
        PriceTable::compile(&cfg).unwrap()
    }

    fn usage(prompt: u64, completion: u64, model: &str) -> CostUsage<'_> {
        CostUsage {
            prompt,
            completion,
            total: prompt.saturating_add(completion),
            model,
            ..CostUsage::default()
        }
    }

    #[test]
    fn a_row_is_picked_by_exact_name_then_by_the_longest_dated_prefix_then_default() {
        let t = table();
        assert_eq!(t.row("gpt-4o").prompt, 2_500_000);
        assert_eq!(t.row("gpt-4o-2024-08-06").prompt, 2_500_000);
        assert_eq!(t.row("gpt-4o-mini").prompt, 150_000);
        assert_eq!(t.row("gpt-4o-mini-2024-07-18").prompt, 150_000);
        // A prefix that does not end at a `-` is another model.
        assert_eq!(t.row("gpt-4omni").prompt, 10_000_000);
        assert_eq!(t.row("").prompt, 10_000_000);
        assert_eq!(t.row("o1").prompt, 10_000_000);
    }

    #[test]
    fn prices_are_per_million_tokens_and_rounded_up_once_per_request() {
        let t = table();
        // 1000 × 2.5 + 200 × 10 = 4500 (micro-units per token × tokens).
        assert_eq!(t.cost(&usage(1000, 200, "gpt-4o")), Ok(4_500));
        // 3 prompt tokens at 0.15 and 1 completion token at 0.6: 1.05 → 2.
        assert_eq!(t.cost(&usage(3, 1, "gpt-4o-mini")), Ok(2));
        assert_eq!(t.cost(&usage(0, 0, "gpt-4o")), Ok(0));
    }

    #[test]
    fn cached_cache_write_and_reasoning_tokens_are_priced_apart_from_the_rest() {
        let t = table();
        let u = CostUsage {
            prompt: 1000,
            cached: 800,
            cache_write: 100,
            completion: 50,
            reasoning: 20,
            total: 1050,
            model: "claude",
        };
        // 100 × 3 + 800 × 0.3 + 100 × 3.75 + 30 × 15 + 20 × 20 = 300 + 240 + 375 + 450 + 400.
        assert_eq!(t.cost(&u), Ok(1_765));
        // Unset cached and reasoning prices are the prompt and completion prices.
        let default_row = CostUsage {
            model: "other",
            ..u.clone()
        };
        assert_eq!(t.cost(&default_row), Ok(1000 * 10 + 50 * 30));
        // More cached tokens than prompt tokens (an inconsistent upstream): the prompt is
        // all cached, never a negative remainder.
        let odd = CostUsage {
            prompt: 10,
            cached: 50,
            cache_write: 50,
            completion: 0,
            reasoning: 9,
            total: 10,
            model: "gpt-4o",
        };
        assert_eq!(t.cost(&odd), Ok(13));
    }

    #[test]
    fn a_cost_beyond_u64_is_an_error_not_a_wrapped_charge() {
        let cfg = PricesConfig {
            models: Default::default(),
            default: PriceRow {
                prompt: u64::MAX,
                completion: u64::MAX,
                cached: None,
                cache_write: None,
                reasoning: None,
            },
        };
        let t = PriceTable::compile(&cfg).unwrap();
        assert!(t.cost(&usage(u64::MAX, u64::MAX, "m")).is_err());
        assert_eq!(t.cost(&usage(1_000_000, 0, "m")), Ok(u64::MAX));
    }

    #[test]
    fn a_bound_is_the_prompt_estimate_and_the_declared_maximum_each_capped() {
        let b = RequestBound {
            prompt: 40,
            completion: Some(500),
        };
        let u = CostUsage::bound(Some(&b), 256, 300, "gpt-4o");
        assert_eq!((u.prompt, u.completion, u.total), (40, 300, 340));
        assert_eq!(u.model, "gpt-4o");
        let undeclared = RequestBound {
            prompt: 40,
            completion: None,
        };
        let u = CostUsage::bound(Some(&undeclared), 256, 300, "");
        assert_eq!((u.prompt, u.completion), (40, 256));
        let u = CostUsage::bound(None, 256, 300, "");
        assert_eq!((u.prompt, u.completion, u.cached), (256, 256, 0));
    }

    #[test]
    fn charged_usage_counts_absent_figures_as_zero_and_totals_prompt_and_completion() {
        let u = Usage {
            prompt: Some(7),
            completion: Some(3),
            cached: Some(5),
            ..Usage::default()
        };
        let c = CostUsage::charged(&u, "m");
        assert_eq!((c.prompt, c.completion, c.total, c.cached), (7, 3, 10, 5));
        assert_eq!((c.cache_write, c.reasoning), (0, 0));
    }
}
