//! The compiled policy: limits with their rates, CEL `when` predicates and CEL `counters`,
//! evaluated per request into rate-limit descriptors.
//!
//! Everything is compiled once at configure time: CEL is parsed (`cel-parser`), the attribute
//! paths each expression reads are extracted from its syntax tree, and the CEL function registry
//! is built. Per request, an expression fetches only the attributes it uses (each at most once
//! per request, see [`Evaluation`]) and is evaluated in a child scope of the shared context.
//!
//! Descriptors follow Kuadrant's convention (see DESIGN.md §2): one descriptor per request with
//! an entry `limit.<name> = "1"` per limit that applies, plus one entry per counter, keyed by the
//! expression text, valued by its result as a string.

mod binding;
mod compile;
mod descriptors;
mod evaluate;
#[cfg(test)]
pub(crate) mod test_support;

use crate::attributes::Attribute;
use crate::config::{FailureMode, Fallback, TokenCategory};
use crate::usage::UsagePaths;
use binding::Binding;
use cel_interpreter::Context;
use cel_parser::Expression;
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

/// One compiled limit.
#[derive(Debug)]
pub struct Limit {
    pub name: String,
    /// `limit.<name>`: the key of its descriptor entry.
    entry_key: String,
    pub rates: Vec<Rate>,
    pub when: Vec<CompiledExpr>,
    pub counters: Vec<CompiledExpr>,
    pub tokens: TokenCategory,
}

/// Rate-limit service settings with durations parsed.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub cluster: String,
    pub domain: String,
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    pub flush_period: Duration,
    pub report_timeout: Duration,
    pub max_retries: u32,
}

/// Usage settings, validated.
#[derive(Debug, Clone)]
pub struct UsageSettings {
    pub paths: UsagePaths,
    pub fallback: Fallback,
    pub fixed_tokens: u64,
    pub max_body_bytes: usize,
    pub inject_stream_usage: bool,
    /// Largest figure believed of one response (tokens).
    pub max_tokens_per_response: u64,
    /// Most request body bytes buffered.
    pub max_request_body_bytes: usize,
    /// Envoy lets the filter read the body while the headers are held.
    pub allow_on_headers_stop_iteration: bool,
}

/// The compiled plugin configuration.
pub struct Policy {
    pub service: ServiceSettings,
    pub usage: UsageSettings,
    /// Some expression reads the request body (`requestBodyJSON()`): the policy is evaluated
    /// once the body is complete.
    pub needs_body: bool,
    /// Limits in name order.
    pub limits: Vec<Limit>,
    /// Every attribute any expression reads, deduplicated.
    pub attributes: Vec<Attribute>,
    /// The request headers the policy reads, when it reads them by name only: the others are
    /// not converted for CEL (`None`: the whole map).
    header_names: Option<Vec<String>>,
    /// How each root variable an expression sees is built from attributes, deduplicated.
    bindings: Vec<Binding>,
    /// The `domain` field of every request to the service, encoded once.
    encoded_domain: Vec<u8>,
    context: Context<'static>,
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

/// Why an expression could not be evaluated for a request (its limit then does not apply).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalError {
    pub limit: String,
    pub expression: String,
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
}

/// The outcome of evaluating the policy for one request.
#[derive(Debug, Default)]
pub struct Decision {
    /// Limits whose predicates all held and whose counters all evaluated.
    pub applied: Vec<Applied>,
    /// Expressions that failed (their limit does not apply).
    pub errors: Vec<EvalError>,
}
