//! Limitador limits generated from the plugin configuration, so the filter's descriptors and
//! the service's limits come from one source of truth: a descriptor key that no Limitador limit
//! names means "no limit applies" there, so a hand-written limit that drifts from the policy
//! silently disables it.
//!
//! For each limit and each of its rates, one Limitador limit (fields of Limitador's
//! `limits.yaml`): `conditions: ["descriptors[0]['limit.<name>'] == '1']`,
//! `variables: ["descriptors[0]['<counter expression>']", ...]`, `max_value` = the rate's
//! limit in tokens, `seconds` = its window.

use crate::policy::{Policy, LIMIT_ENTRY_PREFIX};
use serde::Serialize;

/// One entry of Limitador's `limits.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitadorLimit {
    /// The Limitador namespace: the plugin's `rateLimitService.domain`.
    pub namespace: String,
    /// The plugin limit's name.
    pub name: String,
    /// Tokens per window.
    pub max_value: u64,
    /// Window length in seconds.
    pub seconds: u64,
    /// CEL conditions over `descriptors`.
    pub conditions: Vec<String>,
    /// CEL expressions over `descriptors` whose values qualify the counter.
    pub variables: Vec<String>,
}

/// A CEL string literal (single-quoted) holding `text`.
fn cel_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('\'');
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// `descriptors[0]['<key>']`.
pub fn descriptor_ref(key: &str) -> String {
    format!("descriptors[0][{}]", cel_string(key))
}

/// The Limitador limits matching `policy`, in limit-name order, one per rate.
pub fn limitador_limits(policy: &Policy) -> Vec<LimitadorLimit> {
    let mut out = Vec::new();
    for limit in &policy.limits {
        let condition = format!(
            "{} == '1'",
            descriptor_ref(&format!("{LIMIT_ENTRY_PREFIX}{}", limit.name))
        );
        let variables: Vec<String> = limit
            .counters
            .iter()
            .map(|c| descriptor_ref(&c.source))
            .collect();
        for rate in &limit.rates {
            out.push(LimitadorLimit {
                namespace: policy.service.domain.clone(),
                name: limit.name.clone(),
                max_value: rate.limit,
                seconds: rate.window_seconds,
                conditions: vec![condition.clone()],
                variables: variables.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_limitador_limit_per_rate_with_escaped_keys() {
        let p = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "c", "domain": "llm"},
                "limits": {"gold": {"rates": [{"limit": 200, "window": "1m"}, {"limit": 5000, "window": "1d"}],
                  "counters": [{"expression": "request.headers['x-user']"}]}}}"#,
        )
        .unwrap();
        let limits = limitador_limits(&p);
        assert_eq!(limits.len(), 2);
        assert_eq!(
            limits[0].conditions,
            vec!["descriptors[0]['limit.gold'] == '1'"]
        );
        assert_eq!(
            limits[0].variables,
            vec![r"descriptors[0]['request.headers[\'x-user\']']"]
        );
        assert_eq!((limits[0].max_value, limits[0].seconds), (200, 60));
        assert_eq!((limits[1].max_value, limits[1].seconds), (5000, 86400));
        assert_eq!(limits[1].namespace, "llm");
    }
}
