//! Shared by the tests: where the real artifact is, and a plugin configuration.
#![allow(dead_code)]

use proxy_wasm_host::Host;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The filter's wasm artifact: `$TOKEN_RATELIMIT_WASM`, or the workspace's release build
/// (`cargo build --release --target wasm32-wasip1 --lib` at the workspace root).
pub fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TOKEN_RATELIMIT_WASM") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("wasm32-wasip1/release/token_ratelimit.wasm")
}

/// Loads the artifact; fails when it is missing, or (at its default path) older than a source
/// file it was built from (cargo's dep-info beside it lists them).
pub fn host() -> Host {
    let path = wasm_path();
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build it first: cargo build --release --target wasm32-wasip1 --lib (at the workspace root)",
            path.display()
        )
    });
    if std::env::var_os("TOKEN_RATELIMIT_WASM").is_none() {
        if let Some(newer) = sources(&path)
            .into_iter()
            .find(|f| modified(f).is_some_and(|t| t > built))
        {
            panic!(
                "{} is older than {}: rebuild it (cargo build --release --target wasm32-wasip1 --lib)",
                path.display(),
                newer.display()
            );
        }
    }
    Host::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The workspace sources the artifact was built from, per cargo's `.d` file.
fn sources(wasm: &Path) -> Vec<PathBuf> {
    let Ok(d) = std::fs::read_to_string(wasm.with_extension("d")) else {
        return Vec::new();
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_default();
    let deps = d.split_once(": ").map(|(_, deps)| deps).unwrap_or("");
    deps.replace("\\ ", "\u{0}")
        .split_whitespace()
        .map(|f| PathBuf::from(f.replace('\u{0}', " ")))
        .filter(|f| f.starts_with(&root))
        .collect()
}

pub const CONFIG: &str = r#"{
  "rateLimitService": {"cluster": "ratelimit", "domain": "llm", "failureMode": "deny"},
  "limits": {
    "free": {
      "rates": [{"limit": 50, "window": "1m"}],
      "when": [{"predicate": "request.path == \"/v1/chat/completions\""}],
      "counters": [{"expression": "auth.identity.userid"}]
    }
  }
}"#;

pub const USERID: &[&str] = &[
    "metadata",
    "filter_metadata",
    "envoy.filters.http.ext_authz",
    "identity",
    "userid",
];
