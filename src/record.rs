//! The usage record of a limited request: what it spent, how that was known, how the request
//! ended and what each limit said, written for the proxy's access log.
//!
//! Envoy's Wasm ABI cannot write dynamic metadata (envoy#15148); the record goes to filter
//! state instead, with `proxy_set_property(["token_ratelimit"], <JSON>)`, which Envoy keeps
//! under the key `wasm.token_ratelimit` ([`FILTER_STATE_KEY`]). An access log prints it with
//! `%FILTER_STATE(wasm.token_ratelimit:PLAIN)%` (the JSON text; without `:PLAIN` Envoy prints
//! the bytes base64-encoded). It is written once per request, when the request is charged: at
//! the end of the response, or in the log phase after an abort, which Envoy runs before the
//! access loggers of the connection manager.
//!
//! The JSON object (keys absent when they do not apply):
//!
//! | key | value |
//! | --- | --- |
//! | `status` | how the request ended, see [`Status`] |
//! | `admission` | how it was admitted or refused, see [`Admission`] |
//! | `model` | the request body's `model` where the filter read the body, else the response's |
//! | `usage` | `{source, prompt, completion, total, cached, cache_write, reasoning}`: tokens charged, and where they came from ([`Source`]); a figure the response did not report is absent |
//! | `limits` | one `{name, tokens, enforcement, outcome, charged}` per limit that applied ([`LimitOutcome`]; `charged`: tokens of its category, or its cost) |
//! | `counters` | the counter values the limits used, keyed by their expression |
//! | `reserved` | reservation mode: tokens held per category before the upstream (`{"total": 120}`; `cost`: the holds of the cost limits, summed) |

use crate::config::{Enforcement, TokenCategory};
use crate::usage::Usage;
use serde::Serialize;
use std::collections::BTreeMap;

/// The property path the record is written to (`proxy_set_property`).
pub const PROPERTY: &str = "token_ratelimit";

/// The filter-state key Envoy keeps the record under (`%FILTER_STATE(<key>:PLAIN)%`).
pub const FILTER_STATE_KEY: &str = "wasm.token_ratelimit";

/// How a limited request ended, first match wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Refused with `429`: a limit's budget is spent. The upstream was not called.
    Limited,
    /// Refused with `500`: the rate-limit service failed and the failure mode is `deny`.
    FailureModeDenied,
    /// Refused with `403`: a limit with `onError: deny` could not be evaluated.
    RefusedOnError,
    /// The client went away before the response ended (also while the request waited for
    /// its admission).
    ClientAborted,
    /// The upstream reset the stream (before or after its response began).
    UpstreamReset,
    /// The response's status is `4xx` or `5xx` (the upstream's, or Envoy's on its behalf:
    /// a timeout, no healthy upstream).
    UpstreamError,
    /// The response ended normally, but the request was let through unchecked: the
    /// rate-limit service failed and the failure mode is `allow`.
    FailureModeAllowed,
    /// The response ended normally.
    Completed,
}

/// How a request was admitted, or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// `CheckRateLimit` allowed it (checkReport mode).
    Checked,
    /// Its `Reserve`s were granted (reservation mode).
    Reserved,
    /// A worker's lease admitted it without a call (at least one of its reservations).
    Leased,
    /// The service failed; the failure mode let it through.
    FailureModeAllowed,
    /// Refused (see the status).
    Refused,
    /// It ended before its admission was answered.
    Pending,
}

/// Where a record's token figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The usage the response reported.
    Reported,
    /// No usage: the fallback estimate (`usage.fallback: estimate`).
    Estimated,
    /// No usage: the fallback's fixed amount (`usage.fallback: fixed`).
    Fixed,
    /// No answer after the request reached the upstream: its prompt estimate plus its
    /// declared completion maximum.
    Declared,
    /// Nothing owed: an error response `usage.errorResponses` lets go free, Envoy's own reply
    /// before the upstream, an upload the client abandoned, or a refused request.
    Free,
    /// No usage and `usage.fallback: none`: nothing charged.
    None,
}

/// What one limit said of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitOutcome {
    /// The limit let the request through (for a refused request: another limit refused).
    Allowed,
    /// The limit refused the request (the one the service named; every enforced limit of
    /// the request when the service names none, as Limitador does).
    Limited,
    /// A shadow limit that would have refused the request; it went on.
    ShadowLimited,
    /// The service failed; the failure mode let the request through.
    FailureModeAllowed,
    /// The service failed; the failure mode refused the request.
    FailureModeDenied,
    /// The limit could not be evaluated for the request (`onError: deny`).
    RefusedOnError,
}

impl LimitOutcome {
    /// Every outcome, in a fixed order (the order of [`LimitOutcome::index`]).
    pub const ALL: [LimitOutcome; 6] = [
        LimitOutcome::Allowed,
        LimitOutcome::Limited,
        LimitOutcome::ShadowLimited,
        LimitOutcome::FailureModeAllowed,
        LimitOutcome::FailureModeDenied,
        LimitOutcome::RefusedOnError,
    ];

    /// The name in records and metrics: `allowed`, `limited`, `shadow_limited`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            LimitOutcome::Allowed => "allowed",
            LimitOutcome::Limited => "limited",
            LimitOutcome::ShadowLimited => "shadow_limited",
            LimitOutcome::FailureModeAllowed => "failure_mode_allowed",
            LimitOutcome::FailureModeDenied => "failure_mode_denied",
            LimitOutcome::RefusedOnError => "refused_on_error",
        }
    }

    /// The position in [`LimitOutcome::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One limit that applied to the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitRecord {
    /// The limit's name.
    pub name: String,
    /// The token category it spends.
    #[serde(serialize_with = "category_name")]
    pub tokens: TokenCategory,
    /// `enforce` or `shadow`.
    #[serde(serialize_with = "enforcement_name")]
    pub enforcement: Enforcement,
    /// What it said of the request.
    pub outcome: LimitOutcome,
    /// What the request charged it: tokens of its category, or (`tokens: cost`) its cost in
    /// the unit of its rates.
    pub charged: u64,
}

/// The tokens a record shows: what was charged, and its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageFigures {
    /// Where the figures come from.
    pub source: Source,
    /// Prompt (input) tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<u64>,
    /// Completion (output) tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion: Option<u64>,
    /// Total tokens (prompt + completion when the response reported no total).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Prompt tokens read from the provider's cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<u64>,
    /// Prompt tokens written to the provider's cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<u64>,
    /// Completion tokens spent on reasoning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<u64>,
}

impl UsageFigures {
    /// The figures of `usage` (none when `None`) from `source`.
    pub fn new(source: Source, usage: Option<&Usage>) -> UsageFigures {
        let u = usage.copied().unwrap_or_default();
        UsageFigures {
            source,
            prompt: u.prompt,
            completion: u.completion,
            total: u.tokens(TokenCategory::Total),
            cached: u.cached,
            cache_write: u.cache_write,
            reasoning: u.reasoning,
        }
    }
}

/// The usage record of one request (see the [module documentation](self) for its JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRecord {
    /// How the request ended.
    pub status: Status,
    /// How it was admitted, or refused.
    pub admission: Admission,
    /// The model, from the request body, else the response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The tokens charged.
    pub usage: UsageFigures,
    /// The limits that applied, in name order.
    pub limits: Vec<LimitRecord>,
    /// The counter values, keyed by expression.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub counters: BTreeMap<String, String>,
    /// Tokens held before the upstream, per category (reservation mode).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reserved: BTreeMap<&'static str, u64>,
}

impl UsageRecord {
    /// The record of a request refused because `limit` could not be evaluated for it
    /// (`onError: deny`): nothing charged.
    pub fn refused_on_error(limit: &str, tokens: TokenCategory, enforcement: Enforcement) -> Self {
        UsageRecord {
            status: Status::RefusedOnError,
            admission: Admission::Refused,
            model: None,
            usage: UsageFigures::new(Source::Free, None),
            limits: vec![LimitRecord {
                name: limit.to_string(),
                tokens,
                enforcement,
                outcome: LimitOutcome::RefusedOnError,
                charged: 0,
            }],
            counters: BTreeMap::new(),
            reserved: BTreeMap::new(),
        }
    }

    /// The record as one line of JSON (no newline).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing these types cannot fail (string keys, no floats); an empty object
        // stands in should it ever.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

fn category_name<S: serde::Serializer>(c: &TokenCategory, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(c.as_str())
}

fn enforcement_name<S: serde::Serializer>(e: &Enforcement, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match e {
        Enforcement::Enforce => "enforce",
        Enforcement::Shadow => "shadow",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_record_is_one_json_object_without_absent_figures() {
        let usage = Usage {
            prompt: Some(12),
            completion: Some(30),
            cached: Some(4),
            ..Usage::default()
        };
        let record = UsageRecord {
            status: Status::ClientAborted,
            admission: Admission::Reserved,
            model: Some("gpt-4o-mini".into()),
            usage: UsageFigures::new(Source::Estimated, Some(&usage)),
            limits: vec![LimitRecord {
                name: "gold".into(),
                tokens: TokenCategory::Total,
                enforcement: Enforcement::Shadow,
                outcome: LimitOutcome::ShadowLimited,
                charged: 42,
            }],
            counters: [("auth.identity.userid".to_string(), "user-2".to_string())].into(),
            reserved: [("total", 120)].into(),
        };
        let json: serde_json::Value = serde_json::from_slice(&record.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "status": "client_aborted",
                "admission": "reserved",
                "model": "gpt-4o-mini",
                "usage": {"source": "estimated", "prompt": 12, "completion": 30, "total": 42, "cached": 4},
                "limits": [{"name": "gold", "tokens": "total", "enforcement": "shadow", "outcome": "shadow_limited", "charged": 42}],
                "counters": {"auth.identity.userid": "user-2"},
                "reserved": {"total": 120}
            })
        );
    }

    #[test]
    fn outcome_indices_follow_all() {
        for (i, o) in LimitOutcome::ALL.iter().enumerate() {
            assert_eq!(o.index(), i, "{}", o.as_str());
        }
    }
}
