//! Helpers shared by the policy's and the CEL layer's tests: the mock host, the tutorial
//! configuration, and shortcuts for compiling a configuration.

use super::Policy;
use crate::config::ConfigError;

/// The shared mock host plays the attribute host of the policy's tests.
pub(crate) use crate::filter::MockHost as MapHost;

pub(crate) const TUTORIAL: &str = r#"{
  "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
  "limits": {
    "free": {
      "rates": [{"limit": 50, "window": "1m"}],
      "when": [
        {"predicate": "request.path == \"/v1/chat/completions\""},
        {"predicate": "auth.identity.groups.split(\",\").exists(g, g == \"free\")"}
      ],
      "counters": [{"expression": "auth.identity.userid"}]
    },
    "gold": {
      "rates": [{"limit": 200, "window": "1m"}, {"limit": 5000, "window": "1d"}],
      "when": [
        {"predicate": "request.path == \"/v1/chat/completions\""},
        {"predicate": "auth.identity.groups.split(\",\").exists(g, g == \"gold\")"}
      ],
      "counters": [{"expression": "auth.identity.userid"}],
      "tokens": "completion"
    }
  }
}"#;

pub(crate) fn host(path: &str, user: &str, groups: &str) -> MapHost {
    let mut h = MapHost::default();
    h.properties.insert("request.path".into(), path.into());
    h.set_metadata(&[(
        "envoy.filters.http.ext_authz",
        serde_json::json!({"identity": {"userid": user, "groups": groups}}),
    )]);
    h
}

pub(crate) fn refused(cfg: &str) -> ConfigError {
    Policy::from_json(cfg.as_bytes()).unwrap_err()
}

/// The `limit.<name>` keys of a descriptor, in order.
pub(crate) fn limit_keys(d: &ratelimit_proto::RateLimitDescriptor) -> Vec<String> {
    d.entries
        .iter()
        .filter(|e| e.key.starts_with(super::LIMIT_ENTRY_PREFIX))
        .map(|e| e.key.clone())
        .collect()
}
