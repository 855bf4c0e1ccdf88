//! Helpers shared by the policy's and the CEL layer's tests: a map-backed host, the tutorial
//! configuration, and shortcuts for compiling a configuration.

use super::Policy;
use crate::attributes::AttributeHost;
use crate::config::ConfigError;
use std::collections::HashMap;

/// A host backed by maps.
#[derive(Default)]
pub(crate) struct MapHost {
    pub properties: HashMap<String, Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub fetched: Vec<String>,
}

impl AttributeHost for MapHost {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        let key = path.join(".");
        self.fetched.push(key.clone());
        self.properties.get(&key).cloned()
    }
    fn request_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        self.fetched.push("<headers>".into());
        self.headers.clone()
    }
}

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
    let ns = "metadata.filter_metadata.envoy.filters.http.ext_authz.identity";
    h.properties.insert(format!("{ns}.userid"), user.into());
    h.properties.insert(format!("{ns}.groups"), groups.into());
    h
}

pub(crate) fn refused(cfg: &str) -> ConfigError {
    Policy::from_json(cfg.as_bytes()).unwrap_err()
}
