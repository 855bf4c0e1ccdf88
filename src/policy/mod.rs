//! The compiled policy: limits with their rates, CEL `when` predicates and CEL `counters`,
//! evaluated per request into rate-limit descriptors.
//!
//! Everything is compiled once at configure time ([`Policy::compile`]): CEL is parsed
//! (`cel-parser`), the attribute paths each expression reads are extracted from its syntax tree,
//! and the CEL function registry is built. Per request ([`Policy::evaluate`]), an expression
//! fetches only the attributes it uses (each at most once per request, cached for the
//! expressions that follow) and is evaluated in a child scope of the shared context.
//!
//! Descriptors follow Kuadrant's convention, the one the Limitador limits generated from the
//! same configuration ([`crate::limits`]) match on: one descriptor per request with an entry
//! `limit.<name> = "1"` per limit that applies, plus one entry per counter, keyed by the
//! expression text, valued by its result as a string. A limit's Limitador condition is
//! `descriptors[0]['limit.<name>'] == '1'` and its counter is qualified by
//! `descriptors[0]['<expression>']`, so a counter shared by several limits is sent once.
//!
//! The code is split by concern: `compile` (configuration to [`Policy`]), `evaluate` (one
//! request to a [`Decision`]), `binding` (attribute values to CEL root variables) and
//! `descriptors` (a [`Decision`]'s limits to descriptors and the `CheckRateLimit` bytes); the
//! CEL guards, checked arithmetic and functions are in the crate's `cel` module.

mod binding;
mod compile;
mod cost;
mod descriptors;
mod evaluate;
mod reservations;
#[cfg(test)]
pub(crate) mod test_support;

use crate::attributes::Attribute;
use crate::config::{
    AdmissionMode, Enforcement, ErrorResponsesConfig, FailureMode, Fallback, OnError,
    RateLimitHeaders, TokenCategory,
};
use crate::usage::UsagePaths;
use binding::Binding;
use cel_interpreter::Context;
use cel_parser::Expression;
pub use cost::{Cost, CostError, CostInputs};
pub(crate) use cost::{USAGE_FIELDS, USAGE_VARIABLE};
pub use reservations::{PlannedReservation, UNPRICED_HOLD};
use std::time::Duration;

/// Prefix of the descriptor entry that marks a limit as applying: `limit.<name>` = `"1"`.
pub const LIMIT_ENTRY_PREFIX: &str = "limit.";

/// A budget: `limit` tokens per `window_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    /// Tokens per window.
    pub limit: u64,
    /// Window length in seconds (Limitador's `seconds`: a fixed window from the first hit).
    pub window_seconds: u64,
}

/// A compiled CEL expression and the attributes it reads.
pub struct CompiledExpr {
    /// The source text, as configured (trimmed). Counter descriptor entries use it as key.
    pub source: String,
    /// The syntax tree, guarded and rewritten (checked arithmetic, `requestBodyJSON` as an
    /// attribute).
    expr: Expression,
    /// Indices into [`Policy::attributes`].
    attributes: Vec<usize>,
    /// Indices into [`Policy::bindings`]: the root variables this expression sees.
    bindings: Vec<usize>,
}

impl std::fmt::Debug for CompiledExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledExpr")
            .field("source", &self.source)
            .finish()
    }
}

/// One compiled limit: it applies to a request when all its `when` predicates are true and
/// all its counters evaluate.
#[derive(Debug)]
pub struct Limit {
    /// The configured name (letters, digits, `-`, `_`, `.`; never empty).
    pub name: String,
    /// `limit.<name>`: the key of its descriptor entry.
    entry_key: String,
    /// Its budgets, in configuration order; at least one.
    pub rates: Vec<Rate>,
    /// Predicates that must all be `true` (none: the limit always applies), in configuration
    /// order; evaluation stops at the first that is not.
    pub when: Vec<CompiledExpr>,
    /// Expressions whose values qualify the counter (none: one counter for all requests), in
    /// configuration order.
    pub counters: Vec<CompiledExpr>,
    /// The usage figure the limit spends.
    pub tokens: TokenCategory,
    /// With `tokens: cost` (and only then): how the request's cost is computed.
    pub cost: Option<Cost>,
    /// Tokens to reserve for this limit (a CEL int or uint), overriding the request's own
    /// bound in reservation mode.
    pub reservation_amount: Option<CompiledExpr>,
    /// The longest hold of this limit's reservations (default: [`ReservationSettings::ttl`]).
    pub reservation_ttl: Option<Duration>,
    /// What a request gets when one of this limit's expressions fails for it.
    pub on_error: OnError,
    /// Whether the limit refuses requests over budget, or only marks them (shadow).
    pub enforcement: Enforcement,
}

impl Limit {
    /// Whether the limit is a shadow limit (`enforcement: shadow`): checked and spent, never
    /// refusing.
    pub fn is_shadow(&self) -> bool {
        self.enforcement == Enforcement::Shadow
    }

    /// The limit of its smallest rate (tokens, or cost units with `tokens: cost`): the most one
    /// request can be held or charged against it. `u64::MAX` for a limit without rates, which
    /// [`Policy::compile`] refuses.
    pub fn smallest_rate(&self) -> u64 {
        self.rates.iter().map(|r| r.limit).min().unwrap_or(u64::MAX)
    }
}

/// What reservation mode reserves by default.
#[derive(Debug, Clone)]
pub struct ReservationSettings {
    /// Tokens per category when the request's body is not in hand; completion tokens assumed
    /// when a request declares no maximum.
    pub default_amount: u64,
    /// Most tokens one request reserves per category.
    pub max_amount: u64,
    /// The longest hold.
    pub ttl: Duration,
}

/// Rate-limit service settings with durations parsed.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// Envoy cluster of the Limitador-compatible gRPC service (never empty).
    pub cluster: String,
    /// Domain of every request to the service: the Limitador namespace (never empty).
    pub domain: String,
    /// Timeout of each `CheckRateLimit` call.
    pub timeout: Duration,
    /// What to do with a request when the service is unreachable, slow, or answers garbage.
    pub failure_mode: FailureMode,
    /// Period of the root context's tick that sends the aggregated reports.
    pub flush_period: Duration,
    /// Timeout of each `Report` call.
    pub report_timeout: Duration,
    /// Further attempts of a failed `Report` or `Commit` before its tokens are dropped (and
    /// counted).
    pub max_retries: u32,
    /// How requests are admitted: reservation, checkReport, or reservation falling back to
    /// checkReport.
    pub mode: AdmissionMode,
    /// Leases of hot counters (reservation mode); `None`: off.
    pub lease: Option<crate::lease::LeaseSettings>,
}

impl ServiceSettings {
    /// How failed `Report`s and `Commit`s are retried: `max_retries` times, the first one
    /// `flush_period` after the failure, each later one twice as late (at most
    /// [`crate::reports::MAX_RETRY_DELAY_MS`]).
    pub fn retry_backoff(&self) -> crate::reports::Backoff {
        crate::reports::Backoff {
            max_retries: self.max_retries,
            first_ms: u64::try_from(self.flush_period.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Usage settings, validated.
#[derive(Debug, Clone)]
pub struct UsageSettings {
    /// Custom JSON pointers to the usage figures, tried before each format's own fields.
    pub paths: UsagePaths,
    /// What a response without usage is charged.
    pub fallback: Fallback,
    /// Tokens charged per category with [`Fallback::Fixed`] (greater than 0 then).
    pub fixed_tokens: u64,
    /// What error responses of the upstream without usage cost, per status class.
    pub error_responses: ErrorResponsesConfig,
    /// Most response bytes kept to find usage: a whole JSON document, or one event of a
    /// stream (greater than 0).
    pub max_body_bytes: usize,
    /// Add `stream_options.include_usage: true` to OpenAI streaming requests that lack it.
    pub inject_stream_usage: bool,
    /// Largest figure believed of one response (tokens, greater than 0); larger ones are cut
    /// to it.
    pub max_tokens_per_response: u64,
    /// Most request body bytes buffered.
    pub max_request_body_bytes: usize,
    /// Envoy lets the filter read the body while the headers are held.
    pub allow_on_headers_stop_iteration: bool,
    /// Write each limited request's usage record for the access log.
    pub record: bool,
}

/// The compiled plugin configuration: built once per configuration by [`Policy::compile`]
/// (or [`Policy::from_json`], [`Policy::from_plugin_config`]), then evaluated per request by
/// [`Policy::evaluate`].
pub struct Policy {
    /// The rate-limit service and reporting settings.
    pub service: ServiceSettings,
    /// How usage is read from responses and what a response without usage costs.
    pub usage: UsageSettings,
    /// What reservation mode reserves.
    pub reservation: ReservationSettings,
    /// Some expression reads the request body (`requestBodyJSON()`): the policy is evaluated
    /// once the body is complete.
    pub needs_body: bool,
    /// Which rate-limit headers responses carry.
    pub rate_limit_headers: RateLimitHeaders,
    /// Some limit is a shadow limit (`enforcement: shadow`).
    pub has_shadow: bool,
    /// Limits in name order.
    pub limits: Vec<Limit>,
    /// Every attribute any expression reads, deduplicated.
    pub attributes: Vec<Attribute>,
    /// Per attribute, the index of the first attribute of the same source (itself when none
    /// comes before): attributes of one source (`auth`, `request.auth`) are read once.
    first_of_source: Vec<usize>,
    /// The request headers the policy reads, when it reads them by name only: the others are
    /// not converted for CEL (`None`: the whole map).
    header_names: Option<Vec<String>>,
    /// How each root variable an expression sees is built from attributes, deduplicated.
    bindings: Vec<Binding>,
    /// The `domain` field of every request to the service, encoded once.
    encoded_domain: Vec<u8>,
    /// The shared CEL context (functions only); each evaluation binds its variables in a
    /// child scope.
    context: Context<'static>,
    /// The keys of the `usage` map a cost expression sees, allocated once.
    usage_keys: cost::UsageKeys,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("service", &self.service)
            .field("limits", &self.limits)
            .field("attributes", &self.attributes)
            .finish()
    }
}

/// Why an expression could not be evaluated for a request: with `onError: deny` the request
/// is refused, with `skip` the limit does not apply.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalError {
    /// Name of the limit the expression belongs to.
    pub limit: String,
    /// The limit's `onError`.
    pub on_error: OnError,
    /// The expression's source text (trimmed, as in [`CompiledExpr::source`]).
    pub expression: String,
    /// Why it failed: the interpreter's error (a missing attribute, an overflow, ...), or the
    /// wrong type of its result.
    pub reason: String,
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "limit `{}`: `{}` failed: {}",
            self.limit, self.expression, self.reason
        )
    }
}

/// A limit that applies to a request, with its counter entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Index into [`Policy::limits`].
    pub limit: usize,
    /// `(expression text, value)` per counter, in configuration order.
    pub counters: Vec<(String, String)>,
    /// The limit's own reservation amount (tokens), when it configures one.
    pub amount: Option<u64>,
}

/// The outcome of evaluating the policy for one request.
#[derive(Debug, Default)]
pub struct Decision {
    /// Limits whose predicates all held and whose counters all evaluated.
    pub applied: Vec<Applied>,
    /// Expressions that failed. Evaluation stops at the first one of a limit with
    /// `onError: deny` (see [`Decision::refusal`]).
    pub errors: Vec<EvalError>,
    /// The request attributes each applied limit's `cost` expression reads, captured for its
    /// evaluation after the response ([`Policy::cost`]).
    pub costs: Vec<CostInputs>,
}

impl Decision {
    /// The failure that refuses the request: an expression of a limit with `onError: deny`
    /// that could not be evaluated. `None`: the request goes on to admission.
    pub fn refusal(&self) -> Option<&EvalError> {
        self.errors.iter().find(|e| e.on_error == OnError::Deny)
    }
}
