//! Decoding of the rate-limit service's replies, and the request body rewrite.
//!
//! The input is taken as the `CheckRateLimit` reply (a `RateLimitResponse`, decoded with
//! prost), for a policy in failure mode `deny` and one in `allow`; the request then goes on
//! through the response (headers, body, finish). A second reply is built from the same bytes
//! with `arbitrary` and encoded, so that well-formed replies with extreme values (statuses,
//! durations, header names and values) are reached as well. The input is also the request
//! body given to `inject_include_usage`.
#![no_main]

mod common;

use arbitrary::{Arbitrary, Unstructured};
use common::MapHost;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use ratelimit_proto::{DescriptorStatus, HeaderValue, RateLimit, RateLimitResponse};
use token_ratelimit::flow::{RequestFlow, Verdict};
use token_ratelimit::policy::Policy;
use token_ratelimit::usage;

fn policy(mode: &str) -> Policy {
    let cfg = format!(
        r#"{{"rateLimitService": {{"cluster": "ratelimit", "domain": "llm", "failureMode": "{mode}"}},
            "limits": {{
              "free": {{"rates": [{{"limit": 50, "window": "1m"}}],
                "when": [{{"predicate": "request.path == \"/v1/chat/completions\""}}],
                "counters": [{{"expression": "auth.identity.userid"}}]}},
              "prompts": {{"rates": [{{"limit": 1000, "window": "1h"}}], "tokens": "prompt"}}
            }}}}"#
    );
    Policy::from_json(cfg.as_bytes()).expect("the fuzz policy compiles")
}

fn policies() -> &'static [Policy; 2] {
    thread_local! {
        static P: &'static [Policy; 2] = Box::leak(Box::new([policy("deny"), policy("allow")]));
    }
    P.with(|p| *p)
}

fn host() -> MapHost {
    let mut h = MapHost::default();
    h.properties.insert("request.path".into(), b"/v1/chat/completions".to_vec());
    h.set_metadata(&[(
        "envoy.filters.http.ext_authz",
        serde_json::json!({"identity": {"userid": "user-1"}}),
    )]);
    h
}

#[derive(Arbitrary, Debug)]
struct Status {
    code: i32,
    limit: Option<(String, u32, i32)>,
    remaining: u32,
    reset: Option<(i64, i32)>,
}

#[derive(Arbitrary, Debug)]
struct Reply {
    code: i32,
    statuses: Vec<Status>,
    headers: Vec<(String, String, Vec<u8>)>,
}

impl Reply {
    fn encode(self) -> Vec<u8> {
        RateLimitResponse {
            overall_code: self.code,
            statuses: self
                .statuses
                .into_iter()
                .map(|s| DescriptorStatus {
                    code: s.code,
                    current_limit: s.limit.map(|(name, requests_per_unit, unit)| RateLimit { name, requests_per_unit, unit }),
                    limit_remaining: s.remaining,
                    duration_until_reset: s.reset.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
                })
                .collect(),
            response_headers_to_add: self
                .headers
                .into_iter()
                .map(|(key, value, raw_value)| HeaderValue { key, value, raw_value })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec()
    }
}

fn check(policy: &Policy, reply: &[u8], body: &[u8]) {
    let decision = policy.evaluate(&mut host());
    let (mut flow, request) = RequestFlow::start(policy, decision, "/v1/chat/completions");
    assert!(request.is_some(), "a limit applies to the fuzz request");
    match flow.on_check_reply(policy, Ok(reply)) {
        Verdict::Allow | Verdict::AllowOnFailure(_) => {
            for (k, _) in flow.response_headers() {
                assert!(!k.is_empty());
            }
        }
        Verdict::Limited { reply, .. } => {
            assert_eq!(reply.status, 429);
            assert!(serde_json::from_slice::<serde_json::Value>(&reply.body).is_ok());
        }
        Verdict::DenyOnFailure { reply, .. } => assert_eq!(reply.status, 500),
        Verdict::FallBackToCheck => panic!("a check reply never falls back"),
        Verdict::Unevaluable { .. } => panic!("a check reply never makes a limit unevaluable"),
    }
    flow.on_request_body_len(body.len() as u64);
    flow.on_response_headers(policy, Some("application/json"), None);
    if flow.wants_body() {
        flow.on_response_body(body);
    }
    let done = flow.finish(policy);
    for r in &done.reports {
        assert!(r.tokens > 0);
    }
}

/// The same bytes as the answer to a `Reserve` (reservation mode): any verdict but no panic,
/// and what the request owes at the end carries no more than what it spent.
fn reserve(policy: &Policy, reply: &[u8], body: &[u8]) {
    let decision = policy.evaluate(&mut host());
    let (mut flow, requests) =
        RequestFlow::start_reservation(policy, decision, "/v1/chat/completions", None, None);
    for index in 0..requests.len() {
        if let Some(Verdict::Limited { reply, .. }) = flow.on_reserve_reply(policy, index, Ok(reply)) {
            assert_eq!(reply.status, 429);
        }
    }
    flow.on_request_body_len(body.len() as u64);
    flow.on_response_headers(policy, Some("application/json"), None);
    if flow.wants_body() {
        flow.on_response_body(body);
    }
    let done = flow.finish(policy);
    let cap = policy.usage.max_tokens_per_response;
    for c in &done.commits {
        assert!(c.actual <= cap);
    }
}

fuzz_target!(|data: &[u8]| {
    let structured = Reply::arbitrary(&mut Unstructured::new(data)).ok().map(Reply::encode);
    for policy in policies() {
        check(policy, data, data);
        reserve(policy, data, data);
        if let Some(reply) = &structured {
            check(policy, reply, data);
        }
    }

    if let Some(out) = usage::inject_include_usage(data) {
        // A body serde_json reads stays readable. (Others can be rewritten too: JSON whose
        // numbers serde_json cannot hold, `1e400`, is still JSON to the upstream.)
        if serde_json::from_slice::<serde_json::Value>(data).is_ok() {
            let v: serde_json::Value = serde_json::from_slice(&out).expect("the rewritten body is JSON");
            assert_eq!(v["stream_options"]["include_usage"], serde_json::Value::Bool(true));
        }
        assert_eq!(usage::inject_include_usage(&out), None, "a rewritten body needs no second rewrite");
    }
});
