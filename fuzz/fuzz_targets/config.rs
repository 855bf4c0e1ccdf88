//! The configuration parser and the CEL compiler.
//!
//! Every input is used twice:
//! 1. as the plugin configuration bytes Envoy hands the filter (JSON, or a serialized
//!    `google.protobuf.Struct`): `parse_plugin_config` then `Policy::compile`, and
//!    `Policy::from_json`; a policy that compiles is evaluated over a fixed request;
//! 2. as CEL: each of its first lines becomes a `when` predicate and a counter of an otherwise
//!    valid configuration, which is compiled and, when it compiles, evaluated over the same
//!    request (CEL parser and interpreter robustness on operator-written expressions).
//!
//! Both run on a thread with the wasm module's stack size (see `WASM_STACK`).
#![no_main]

mod common;

use common::MapHost;
use libfuzzer_sys::fuzz_target;
use token_ratelimit::config::{self, TokenCategory};
use token_ratelimit::flow::RequestFlow;
use token_ratelimit::policy::Policy;

/// A request with every kind of attribute set.
fn request() -> MapHost {
    let mut h = MapHost::default();
    for (k, v) in [
        ("request.path", b"/v1/chat/completions".to_vec()),
        ("request.url_path", b"/v1/chat/completions".to_vec()),
        ("request.method", b"POST".to_vec()),
        ("request.host", b"llm.example".to_vec()),
        ("request.time", 1_700_000_000_123_456_789i64.to_le_bytes().to_vec()),
        ("request.duration", 1_500_000_000i64.to_le_bytes().to_vec()),
        ("request.size", 321i64.to_le_bytes().to_vec()),
        ("source.address", b"10.0.0.1:40000".to_vec()),
        ("source.port", 40000i64.to_le_bytes().to_vec()),
        ("destination.port", 8080i64.to_le_bytes().to_vec()),
        ("connection.mtls", vec![1]),
        ("connection.id", 7u64.to_le_bytes().to_vec()),
        ("filter_state.plan", b"pro".to_vec()),
    ] {
        h.properties.insert(k.to_string(), v);
    }
    h.set_metadata(&[(
        "envoy.filters.http.ext_authz",
        serde_json::json!({"identity": {"userid": "user-1", "groups": "free,beta", "n": 3,
            "admin": true, "tags": ["a", "b"], "org": {"id": 7}}}),
    )]);
    h.request_headers = vec![
        ("authorization".into(), b"APIKEY iamafreeuser".to_vec()),
        ("x-user".into(), b"alice".to_vec()),
        ("x-n".into(), b"42".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    h.body_json = Some(serde_json::json!({
        "model": "gpt-4o", "max_tokens": 20, "stream": true,
        "messages": [{"role": "user", "content": "hello there"}]
    }));
    h
}

fn exercise(policy: &Policy) {
    let decision = policy.evaluate(&mut request());
    for a in &decision.applied {
        assert!(a.limit < policy.limits.len());
        assert_eq!(a.counters.len(), policy.limits[a.limit].counters.len());
    }
    for category in [TokenCategory::Total, TokenCategory::Prompt, TokenCategory::Completion] {
        let _ = policy.report_descriptor(&decision.applied, category, None);
    }
    for a in &decision.applied {
        if policy.limits[a.limit].tokens == TokenCategory::Cost {
            assert!(policy.report_descriptor(&decision.applied, TokenCategory::Cost, Some(a.limit)).is_some());
        }
    }
    let _ = RequestFlow::start(policy, decision, "/v1/chat/completions");
}

fn whole_document(data: &[u8]) {
    if let Ok(cfg) = config::parse_plugin_config(data) {
        if let Ok(policy) = Policy::compile(&cfg) {
            exercise(&policy);
        }
    }
    let _ = Policy::from_json(data);
}

/// How `cel_parser::parse` fares on `source`: `None` when it panics (the panic is caught
/// here; in the wasm VM it would abort the plugin), else whether it parsed.
fn raw_parse(source: &str) -> Option<bool> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| cel_parser::parse(source).is_ok()).ok();
    std::panic::set_hook(hook);
    result
}

fn expressions(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines().take(4) {
        let raw = raw_parse(line.trim());
        let cfg = serde_json::json!({
            "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
            "requestBody": {"allowOnHeadersStopIteration": true},
            "limits": {
                "when": {"rates": [{"limit": 50, "window": "1m"}], "when": [{"predicate": line}]},
                "counter": {"rates": [{"limit": 50, "window": "1m"}], "counters": [{"expression": line}], "tokens": "prompt"}
            }
        });
        let bytes = serde_json::to_vec(&cfg).expect("a JSON value serializes");
        let literal_refused = |e: &token_ratelimit::config::ConfigError| {
            e.reason.starts_with("CEL does not compile: the number ")
                || e.reason.starts_with("CEL does not compile: invalid escape sequence in the literal ")
        };
        match Policy::from_json(&bytes) {
            Ok(policy) => {
                assert_eq!(raw, Some(true), "compiled, yet the parser fails on {line:?}");
                exercise(&policy);
            }
            Err(e) => {
                assert!(e.field.starts_with("limits.") || e.field.starts_with("requestBody"), "{e:?}");
                // The filter refuses exactly the literals on which the parser would panic.
                match raw {
                    None => assert!(literal_refused(&e), "the parser panics on {line:?}, refused as {e:?}"),
                    Some(true) => assert!(!literal_refused(&e), "the parser takes {line:?}, refused as {e:?}"),
                    Some(false) => {}
                }
            }
        }
    }
}

/// The wasm module runs on a 1 MiB stack (Rust's default for wasm32); the fuzz target does
/// its work on a thread with that stack, so that a recursion the module could not afford
/// (deeply nested CEL) overflows here as well.
const WASM_STACK: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    std::thread::Builder::new()
        .stack_size(WASM_STACK)
        .spawn(move || {
            whole_document(&data);
            expressions(&data);
        })
        .expect("a thread")
        .join()
        .expect("no panic");
});
