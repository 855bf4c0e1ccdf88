//! The filter's counters, defined lazily through the [`Host`] and, for the ones every request
//! moves, summed in the VM and added to the proxy's on each tick.

use super::Host;
use crate::config::TokenCategory;
use crate::record::LimitOutcome;
use std::collections::HashMap;

/// Counter names, as they appear in Envoy's stats (Envoy may prefix them, e.g. `wasmcustom.`).
pub mod names {
    /// Requests a limit applied to and whose check was sent.
    pub const CHECKED: &str = "token_ratelimit.requests_checked";
    /// Requests the service let through.
    pub const ALLOWED: &str = "token_ratelimit.requests_allowed";
    /// Requests refused with 429 (also per limit: `requests_limited.<limit>`).
    pub const LIMITED: &str = "token_ratelimit.requests_limited";
    /// Requests let through because the service failed and the failure mode is `allow`.
    pub const FAILURE_ALLOWED: &str = "token_ratelimit.failure_mode_allowed";
    /// Requests refused because the service failed and the failure mode is `deny`.
    pub const FAILURE_DENIED: &str = "token_ratelimit.failure_mode_denied";
    /// Checks that failed (dispatch error, gRPC error, undecodable or UNKNOWN reply).
    pub const SERVICE_ERRORS: &str = "token_ratelimit.service_errors";
    /// Checks that timed out (gRPC status 4).
    pub const SERVICE_TIMEOUTS: &str = "token_ratelimit.service_timeouts";
    /// Expressions that failed to evaluate for a request (also per limit:
    /// `expression_errors.<limit>`).
    pub const EXPRESSION_ERRORS: &str = "token_ratelimit.expression_errors";
    /// Requests refused with 403 because a limit with `onError: deny` could not be evaluated
    /// for them (also per limit: `requests_refused_on_error.<limit>`).
    pub const REFUSED_ON_ERROR: &str = "token_ratelimit.requests_refused_on_error";
    /// Responses without usage (requests that ended without usage), however charged.
    pub const USAGE_MISSING: &str = "token_ratelimit.usage_missing";
    /// Responses charged the fallback estimate.
    pub const USAGE_ESTIMATED: &str = "token_ratelimit.usage_estimated";
    /// Responses charged the fallback's fixed amount.
    pub const USAGE_FIXED: &str = "token_ratelimit.usage_fixed";
    /// Requests without usage charged nothing: an upstream error `usage.errorResponses` lets go
    /// free (`4xx` by default), Envoy's own reply before the upstream, an abandoned upload.
    pub const USAGE_FREE: &str = "token_ratelimit.usage_free";
    /// Requests without an answer after they reached the upstream, charged their prompt
    /// estimate plus their declared completion maximum.
    pub const USAGE_DECLARED: &str = "token_ratelimit.usage_declared";
    /// Responses whose usage exceeded `usage.maxTokensPerResponse` and was cut to it.
    pub const USAGE_CLAMPED: &str = "token_ratelimit.usage_clamped";
    /// Streaming requests to which `stream_options.include_usage` was added.
    pub const USAGE_INJECTED: &str = "token_ratelimit.usage_requested";
    /// Requests whose body outgrew `requestBody.maxBytes` while the filter held it: it went on
    /// unread (no `include_usage` added; policy and reservation without the body).
    pub const BODY_OVER_LIMIT: &str = "token_ratelimit.request_bodies_unread";
    /// Requests whose body did not arrive while their headers were held.
    pub const BODY_TIMEOUTS: &str = "token_ratelimit.request_body_timeouts";
    /// `Report` calls dispatched.
    pub const REPORTS_SENT: &str = "token_ratelimit.reports_sent";
    /// `Report` calls that failed and will be retried.
    pub const REPORTS_RETRIED: &str = "token_ratelimit.reports_retried";
    /// `Report` calls that failed after all retries.
    pub const REPORTS_DROPPED: &str = "token_ratelimit.reports_dropped";
    /// Tokens in dropped reports and commits.
    pub const TOKENS_DROPPED: &str = "token_ratelimit.tokens_dropped";
    /// `Commit` calls dispatched.
    pub const COMMITS_SENT: &str = "token_ratelimit.commits_sent";
    /// `Commit` calls that failed and will be retried.
    pub const COMMITS_RETRIED: &str = "token_ratelimit.commits_retried";
    /// `Commit` calls that failed after all retries (their tokens are in `tokens_dropped`).
    pub const COMMITS_DROPPED: &str = "token_ratelimit.commits_dropped";
    /// Commits whose hold had already expired (the tokens were still charged).
    pub const RESERVATIONS_EXPIRED: &str = "token_ratelimit.reservations_expired";
    /// Admission mode `auto` fell back to checkReport: the service has no `Reserve`.
    pub const RESERVATIONS_UNIMPLEMENTED: &str = "token_ratelimit.reservations_unimplemented";
    /// Requests admitted from the worker's lease, without a call (each is also in
    /// `requests_allowed`).
    pub const REQUESTS_LEASED: &str = "token_ratelimit.requests_leased";
    /// Leases granted to a counter that had none.
    pub const LEASES_GRANTED: &str = "token_ratelimit.leases_granted";
    /// Leases granted in place of the counter's previous one (which is then committed).
    pub const LEASES_RENEWED: &str = "token_ratelimit.leases_renewed";
    /// Lease `Reserve`s the service refused (budget nearly spent) or held nothing for.
    pub const LEASES_REFUSED: &str = "token_ratelimit.leases_refused";
    /// Lease `Reserve`s without a usable answer (error, timeout).
    pub const LEASES_FAILED: &str = "token_ratelimit.leases_failed";
    /// Leases given up and committed (idle, expired, out of room, leases off, VM shutdown);
    /// renewed leases are committed too, and counted in `leases_renewed`.
    pub const LEASES_COMMITTED: &str = "token_ratelimit.leases_committed";
    /// Plugin configurations refused.
    pub const CONFIG_ERRORS: &str = "token_ratelimit.config_errors";
    /// Tokens queued for report, category `total`.
    pub const TOKENS_TOTAL: &str = "token_ratelimit.tokens_reported.total";
    /// Tokens queued for report, category `prompt`.
    pub const TOKENS_PROMPT: &str = "token_ratelimit.tokens_reported.prompt";
    /// Tokens queued for report, category `completion`.
    pub const TOKENS_COMPLETION: &str = "token_ratelimit.tokens_reported.completion";
    /// Cost queued for report by `tokens: cost` limits (in their units, summed).
    pub const TOKENS_COST: &str = "token_ratelimit.tokens_reported.cost";
    /// Costs that could not be computed (an expression that failed or was not a non-negative
    /// integer, a cost above `u64::MAX`): the fallback was charged instead.
    pub const COST_ERRORS: &str = "token_ratelimit.cost_errors";
}

/// The counters every checked request moves: summed in the VM and added to the proxy's on the
/// root context's tick (one host call per counter and tick instead of one per request; the
/// proxy's stats lag by at most one `reporting.flushPeriod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hot {
    /// [`names::CHECKED`].
    Checked,
    /// [`names::ALLOWED`].
    Allowed,
    /// [`names::TOKENS_TOTAL`].
    TokensTotal,
    /// [`names::TOKENS_PROMPT`].
    TokensPrompt,
    /// [`names::TOKENS_COMPLETION`].
    TokensCompletion,
    /// [`names::REQUESTS_LEASED`].
    Leased,
    /// [`names::TOKENS_COST`].
    TokensCost,
}

impl Hot {
    /// The `tokens_reported.<category>` counter.
    pub fn tokens_reported(category: TokenCategory) -> Hot {
        match category {
            TokenCategory::Total => Hot::TokensTotal,
            TokenCategory::Prompt => Hot::TokensPrompt,
            TokenCategory::Completion => Hot::TokensCompletion,
            TokenCategory::Cost => Hot::TokensCost,
        }
    }
}

/// The names of [`Hot`]'s counters, in its order.
const HOT_NAMES: [&str; 7] = [
    names::CHECKED,
    names::ALLOWED,
    names::TOKENS_TOTAL,
    names::TOKENS_PROMPT,
    names::TOKENS_COMPLETION,
    names::REQUESTS_LEASED,
    names::TOKENS_COST,
];

/// Per limit: `token_ratelimit.limit_requests.<limit>.<outcome>`, requests by what the limit
/// said of them ([`LimitOutcome`]).
pub const LIMIT_REQUESTS: &str = "token_ratelimit.limit_requests";
/// Per limit: `token_ratelimit.limit_tokens.<limit>.<category>`, tokens charged to it (the
/// category it spends).
pub const LIMIT_TOKENS: &str = "token_ratelimit.limit_tokens";

/// One limit's counts not yet added to the proxy's.
#[derive(Debug)]
struct LimitCounts {
    name: String,
    category: TokenCategory,
    outcomes: [u64; LimitOutcome::ALL.len()],
    tokens: u64,
}

/// Counters defined lazily by name; a metric the host refuses is skipped silently.
#[derive(Debug, Default)]
pub struct Metrics {
    ids: HashMap<String, Option<u32>>,
    /// Increments of the [`Hot`] counters not yet added to the proxy's.
    hot: [u64; 7],
    /// Per limit, the counts of [`LIMIT_REQUESTS`] and [`LIMIT_TOKENS`] not yet added.
    limits: Vec<LimitCounts>,
}

impl Metrics {
    /// Counts `n` on a [`Hot`] counter (sent on the next [`Metrics::flush`]).
    pub fn hot(&mut self, counter: Hot, n: u64) {
        if let Some(pending) = self.hot.get_mut(counter as usize) {
            *pending = pending.saturating_add(n);
        }
    }

    /// Counts a request limit `name` (spending `category`) said `outcome` of, and the
    /// `tokens` charged to it (sent on the next [`Metrics::flush`]).
    pub fn limit(
        &mut self,
        name: &str,
        category: TokenCategory,
        outcome: LimitOutcome,
        tokens: u64,
    ) {
        let counts = match self.limits.iter().position(|l| l.name == name) {
            Some(i) => self.limits.get_mut(i),
            None => {
                self.limits.push(LimitCounts {
                    name: name.to_string(),
                    category,
                    outcomes: [0; LimitOutcome::ALL.len()],
                    tokens: 0,
                });
                self.limits.last_mut()
            }
        };
        if let Some(c) = counts {
            c.category = category;
            if let Some(n) = c.outcomes.get_mut(outcome.index()) {
                *n = n.saturating_add(1);
            }
            c.tokens = c.tokens.saturating_add(tokens);
        }
    }

    /// Adds the [`Hot`] and per-limit counts gathered since the last flush to the proxy's
    /// counters.
    pub fn flush(&mut self, host: &mut impl Host) {
        for (i, name) in HOT_NAMES.iter().enumerate() {
            let n = self.hot.get_mut(i).map(std::mem::take).unwrap_or(0);
            self.add(host, name, n);
        }
        let mut limits = std::mem::take(&mut self.limits);
        for l in &mut limits {
            for (outcome, n) in LimitOutcome::ALL.iter().zip(l.outcomes.iter_mut()) {
                let n = std::mem::take(n);
                if n > 0 {
                    let name = format!("{LIMIT_REQUESTS}.{}.{}", l.name, outcome.as_str());
                    self.add(host, &name, n);
                }
            }
            let tokens = std::mem::take(&mut l.tokens);
            if tokens > 0 {
                let name = format!("{LIMIT_TOKENS}.{}.{}", l.name, l.category.as_str());
                self.add(host, &name, tokens);
            }
        }
        // Kept (zeroed): the next requests of these limits find their entries.
        self.limits = limits;
    }

    /// Adds `n` to counter `name` now (defining it on first use); 0 costs nothing.
    pub fn add(&mut self, host: &mut impl Host, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        let id = match self.ids.get(name) {
            Some(id) => *id,
            None => {
                let id = host.define_counter(name);
                self.ids.insert(name.to_string(), id);
                id
            }
        };
        if let Some(id) = id {
            host.add_to_counter(id, n);
        }
    }

    /// Adds 1 to counter `name` now.
    pub fn inc(&mut self, host: &mut impl Host, name: &str) {
        self.add(host, name, 1);
    }
}
