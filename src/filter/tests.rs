//! The filter's life through the mock host: every decision the proxy-wasm adapter used to make
//! is exercised here natively, with the bytes Envoy would deliver.

use super::metrics::names;
use super::*;
use prost::Message;
use ratelimit_proto::{
    Code, DescriptorStatus, RateLimit, RateLimitRequest, RateLimitResponse, Unit, CHECK_RATE_LIMIT,
    REPORT,
};
use std::time::Duration;

const ROOT: u32 = 1;

/// A checkReport configuration with `extra` fields spliced in before `limits`.
fn config(extra: &str) -> String {
    config_in("checkReport", extra)
}

fn config_in(mode: &str, extra: &str) -> String {
    format!(
        r#"{{"rateLimitService": {{"cluster": "rl", "domain": "llm", "timeout": "250ms", "failureMode": "deny", "mode": "{mode}"}},
        "reporting": {{"maxRetries": 1}},
        {extra}
        "limits": {{
          "per-user": {{"rates": [{{"limit": 100, "window": "1m"}}],
            "when": [{{"predicate": "request.url_path.startsWith('/v1/')"}}],
            "counters": [{{"expression": "request.headers['x-user']"}}]}}
        }}}}"#
    )
}

/// A configured root and the mock host, with `extra` config fields spliced in before `limits`.
fn root_with(extra: &str) -> (RootFilter, MockHost) {
    let mut host = {
        let mut h = MockHost::with_configuration(config(extra).into_bytes());
        h.effective_context = ROOT;
        h
    };
    host.set_property("request.url_path", "/v1/chat/completions");
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    (root, host)
}

fn root() -> (RootFilter, MockHost) {
    root_with("")
}

fn chat_headers(host: &mut MockHost) {
    host.request_headers = vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), b"/v1/chat/completions".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
        ("x-user".into(), b"alice".to_vec()),
    ];
}

fn ok_reply(remaining: u32) -> Vec<u8> {
    RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses: vec![DescriptorStatus {
            code: Code::Ok as i32,
            current_limit: Some(RateLimit {
                name: "per-user".into(),
                requests_per_unit: 100,
                unit: Unit::Minute as i32,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

fn over_reply() -> Vec<u8> {
    RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        statuses: vec![DescriptorStatus {
            code: Code::OverLimit as i32,
            current_limit: Some(RateLimit {
                name: "per-user".into(),
                requests_per_unit: 100,
                unit: Unit::Minute as i32,
            }),
            limit_remaining: 0,
            duration_until_reset: Some(prost_types::Duration {
                seconds: 12,
                nanos: 0,
            }),
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// Delivers `reply` to the stream's pending check (the last call dispatched).
fn answer(stream: &mut StreamFilter, host: &mut MockHost, status: u32, reply: Vec<u8>) {
    let token = host.dispatched.last().map(|d| d.token).unwrap_or(0);
    host.grpc_reply = reply;
    let size = host.grpc_reply.len();
    stream.on_grpc_reply(host, token, status, size);
}

/// Runs a chat request with a JSON response reporting `total` tokens through `stream`.
fn serve(stream: &mut StreamFilter, host: &mut MockHost, total: u64) {
    host.response_headers = vec![("content-type".into(), b"application/json".to_vec())];
    assert_eq!(stream.on_response_headers(host), Action::Continue);
    host.response_body = format!(
        r#"{{"usage":{{"prompt_tokens":1,"completion_tokens":{},"total_tokens":{total}}}}}"#,
        total - 1
    )
    .into_bytes();
    let size = host.response_body.len();
    assert_eq!(stream.on_response_body(host, size, true), Action::Continue);
}

fn reports(host: &MockHost) -> Vec<RateLimitRequest> {
    host.calls(REPORT)
        .iter()
        .map(|d| RateLimitRequest::decode(d.message.as_slice()).unwrap())
        .collect()
}

#[test]
fn configure_without_configuration_is_refused_and_counted() {
    let mut host = MockHost::default();
    let mut root = RootFilter::new(ROOT);
    assert!(!root.on_configure(&mut host));
    assert_eq!(host.counter(names::CONFIG_ERRORS), 1);
    assert!(host.logged(Level::Error)[0].contains("no plugin configuration"));
}

#[test]
fn configure_with_invalid_configuration_is_refused_with_the_field() {
    let mut host = MockHost::with_configuration(
        br#"{"rateLimitService": {"cluster": "rl"}, "limits": {}}"#.to_vec(),
    );
    let mut root = RootFilter::new(ROOT);
    assert!(!root.on_configure(&mut host));
    assert!(root.policy().is_none());
    assert_eq!(host.counter(names::CONFIG_ERRORS), 1);
    assert!(
        host.logged(Level::Error)[0].contains("domain"),
        "{:?}",
        host.logs
    );
}

#[test]
fn configure_sets_the_tick_to_the_flush_period() {
    let mut host = MockHost::with_configuration(
        config("")
            .replace(r#""maxRetries": 1"#, r#""flushPeriod": "250ms""#)
            .into_bytes(),
    );
    assert!(RootFilter::new(ROOT).on_configure(&mut host));
    assert_eq!(host.tick_period, Some(Duration::from_millis(250)));
}

#[test]
fn unconfigured_root_lets_streams_pass_untouched() {
    let mut host = MockHost::default();
    chat_headers(&mut host);
    let root = RootFilter::new(ROOT);
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Continue);
    assert!(host.dispatched.is_empty());
    assert_eq!(host.header_map_reads, 0);
}

#[test]
fn request_no_limit_applies_to_continues_without_a_check() {
    let (root, mut host) = root();
    chat_headers(&mut host);
    host.set_property("request.url_path", "/healthz");
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Continue);
    assert!(host.dispatched.is_empty());
    serve(&mut stream, &mut host, 10);
    assert!(host
        .response_headers
        .iter()
        .all(|(k, _)| !k.starts_with("x-ratelimit")));
}

#[test]
fn allowed_request_is_checked_resumed_and_its_usage_reported_on_the_tick() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    let check = host.calls(CHECK_RATE_LIMIT)[0].clone();
    assert_eq!(
        (check.cluster.as_str(), check.timeout),
        ("rl", Duration::from_millis(250))
    );
    let request = RateLimitRequest::decode(check.message.as_slice()).unwrap();
    assert_eq!((request.domain.as_str(), request.hits_addend), ("llm", 0));
    // One header-map read served the filter and the policy.
    assert_eq!(host.header_map_reads, 1);

    answer(&mut stream, &mut host, 0, ok_reply(40));
    assert_eq!(host.resumed, vec![2]);
    serve(&mut stream, &mut host, 7);
    assert!(host
        .response_headers
        .contains(&("x-ratelimit-remaining".to_string(), b"40".to_vec())));

    // Nothing is sent before the tick; the tick sends one report of the total.
    assert!(reports(&host).is_empty());
    host.effective_context = ROOT;
    root.on_tick(&mut host);
    let sent = reports(&host);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].hits_addend, 7);
    assert_eq!(sent[0].descriptors, request.descriptors);
    assert_eq!(host.counter(names::REPORTS_SENT), 1);
}

#[test]
fn hot_counters_are_batched_until_the_tick() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    for id in 2..5 {
        let mut stream = root.new_stream(id);
        stream.on_request_headers(&mut host, true);
        answer(&mut stream, &mut host, 0, ok_reply(90));
        serve(&mut stream, &mut host, 5);
    }
    assert_eq!(host.counter(names::CHECKED), 0);
    let adds = host.counter_adds;
    root.on_tick(&mut host);
    assert_eq!(host.counter(names::CHECKED), 3);
    assert_eq!(host.counter(names::ALLOWED), 3);
    assert_eq!(host.counter(names::TOKENS_TOTAL), 15);
    // Per limit: its outcome and the tokens charged to it, batched too.
    assert_eq!(
        host.counter("token_ratelimit.limit_requests.per-user.allowed"),
        3
    );
    assert_eq!(
        host.counter("token_ratelimit.limit_tokens.per-user.total"),
        15
    );
    // One add per hot counter with a count, two for the limit, one for reports_sent.
    assert_eq!(host.counter_adds - adds, 6);
}

#[test]
fn over_limit_replies_429_counts_the_limit_and_charges_nothing() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, over_reply());
    let (ctx, reply) = &host.replies[0];
    assert_eq!((*ctx, reply.status), (2, 429));
    assert!(reply.headers.contains(&("retry-after".into(), "12".into())));
    assert!(host.resumed.is_empty());
    assert_eq!(host.counter(names::LIMITED), 1);
    assert_eq!(host.counter("token_ratelimit.requests_limited.per-user"), 1);
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert!(reports(&host).is_empty());
}

#[test]
fn dispatch_failure_follows_the_failure_mode() {
    // deny: 500 in OpenAI's shape, counted.
    let (_root, mut host) = root();
    chat_headers(&mut host);
    host.refuse_dispatch = Some("BadArgument".into());
    let mut stream = _root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    assert_eq!(host.replies[0].1.status, 500);
    assert_eq!(host.counter(names::FAILURE_DENIED), 1);
    assert_eq!(host.counter(names::SERVICE_ERRORS), 1);

    // allow: continues, counted.
    let mut host = {
        let mut h =
            MockHost::with_configuration(config("").replace("\"deny\"", "\"allow\"").into_bytes());
        h.refuse_dispatch = Some("BadArgument".into());
        h
    };
    host.set_property("request.url_path", "/v1/chat/completions");
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Continue);
    assert!(host.replies.is_empty());
    assert_eq!(host.counter(names::FAILURE_ALLOWED), 1);
    assert_eq!(host.logged(Level::Warn).len(), 1);
}

#[test]
fn check_timeout_is_counted_as_a_timeout_and_an_error() {
    let (root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 4, Vec::new());
    assert_eq!(host.counter(names::SERVICE_TIMEOUTS), 1);
    assert_eq!(host.counter(names::SERVICE_ERRORS), 1);
    assert_eq!(host.replies[0].1.status, 500);
}

#[test]
fn a_reply_for_another_token_is_ignored() {
    let (root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    host.grpc_reply = ok_reply(1);
    let size = host.grpc_reply.len();
    stream.on_grpc_reply(&mut host, 999, 0, size);
    assert!(host.resumed.is_empty() && host.replies.is_empty());
}

#[test]
fn accept_encoding_is_narrowed_to_what_the_filter_can_read() {
    let (filter, mut host) = root();
    chat_headers(&mut host);
    host.request_headers
        .push(("accept-encoding".into(), b"zstd, gzip".to_vec()));
    filter.new_stream(2).on_request_headers(&mut host, true);
    let value = host.header(HeaderMap::RequestHeaders, "accept-encoding");
    assert_eq!(value.as_deref(), Some(&b"gzip"[..]));

    let (filter, mut host) = root();
    chat_headers(&mut host);
    host.request_headers
        .push(("accept-encoding".into(), b"zstd".to_vec()));
    filter.new_stream(2).on_request_headers(&mut host, true);
    assert_eq!(
        host.header(HeaderMap::RequestHeaders, "accept-encoding"),
        None
    );
}

#[test]
fn streaming_openai_request_gets_include_usage_added_at_its_end() {
    let (root, mut host) = root();
    chat_headers(&mut host);
    host.request_headers
        .push(("content-length".into(), b"40".to_vec()));
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
    // content-length goes: the body changes length.
    assert_eq!(
        host.header(HeaderMap::RequestHeaders, "content-length"),
        None
    );
    assert_eq!(stream.body_mode(), stream::BodyMode::Inject);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    let first = br#"{"model":"m","stream":true,"#.to_vec();
    host.request_body = first.clone();
    // Copied while incomplete; Envoy keeps it (flow control) and shows only later chunks.
    let size = host.request_body.len();
    assert_eq!(
        stream.on_request_body(&mut host, size, false),
        Action::PauseWithWatermark
    );
    host.request_body = br#""messages":[]}"#.to_vec();
    let size = host.request_body.len();
    assert_eq!(
        stream.on_request_body(&mut host, size, true),
        Action::Continue
    );
    // The member went into the last chunk, before the closing brace.
    let sent = [first, host.request_body.clone()].concat();
    let body: serde_json::Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(host.counter(names::USAGE_INJECTED), 1);
}

#[test]
fn streaming_request_over_max_bytes_is_released_without_injection() {
    let (root, mut host) = root_with(r#""requestBody": {"maxBytes": 16},"#);
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    host.request_body = br#"{"model":"m","stream":true,"messages":"#.to_vec();
    let size = host.request_body.len();
    assert_eq!(
        stream.on_request_body(&mut host, size, false),
        Action::Continue
    );
    assert_eq!(stream.body_mode(), stream::BodyMode::PassThrough);
    assert_eq!(host.counter(names::USAGE_INJECTED), 0);
}

const BODY_LIMIT: &str = r#""requestBody": {"allowOnHeadersStopIteration": true},"#;

fn body_root(mode: &str) -> (RootFilter, MockHost) {
    let cfg = format!(
        r#"{{"rateLimitService": {{"cluster": "rl", "domain": "llm", "failureMode": "{mode}", "mode": "checkReport"}},
        {BODY_LIMIT}
        "limits": {{"per-model": {{"rates": [{{"limit": 10, "window": "1m"}}],
          "when": [{{"predicate": "requestBodyJSON('/model') == 'big'"}}]}}}}}}"#
    );
    let mut host = {
        let mut h = MockHost::with_configuration(cfg.into_bytes());
        h.effective_context = ROOT;
        h
    };
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    (root, host)
}

#[test]
fn body_predicate_holds_headers_and_is_evaluated_on_the_complete_body() {
    let (root, mut host) = body_root("deny");
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
    assert_eq!(stream.body_mode(), stream::BodyMode::Evaluate);
    assert!(host.dispatched.is_empty());
    host.request_body = br#"{"model":"big"}"#.to_vec();
    let size = host.request_body.len();
    assert_eq!(
        stream.on_request_body(&mut host, size, true),
        Action::PauseWithWatermark
    );
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), 1);

    // Another model: the limit does not apply, the request goes on at once.
    let mut stream = root.new_stream(3);
    stream.on_request_headers(&mut host, false);
    host.request_body = br#"{"model":"small"}"#.to_vec();
    let size = host.request_body.len();
    assert_eq!(
        stream.on_request_body(&mut host, size, true),
        Action::Continue
    );
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), 1);
}

/// Ticks until the body wait expires (5 s at a 100 ms flush period).
fn wait_out_body(root: &mut RootFilter, host: &mut MockHost) {
    let ticks = (root::BODY_WAIT.as_millis() / 100) as usize;
    for _ in 0..ticks {
        host.effective_context = ROOT;
        root.on_tick(host);
    }
}

#[test]
fn requests_whose_body_never_arrives_are_refused_under_deny_and_after_three_in_a_row_later_ones_at_once(
) {
    let (mut root, mut host) = body_root("deny");
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
    // One tick short: still waiting.
    let ticks = (root::BODY_WAIT.as_millis() / 100) as usize;
    for _ in 0..ticks - 1 {
        root.on_tick(&mut host);
    }
    assert!(host.replies.is_empty());
    root.on_tick(&mut host);
    assert_eq!(host.replies.len(), 1);
    let (ctx, reply) = &host.replies[0];
    assert_eq!((*ctx, reply.status), (2, 500));
    assert_eq!(host.effective_context, ROOT);
    assert_eq!(host.counter(names::BODY_TIMEOUTS), 1);
    // One stalled request may be one slow client: a warning, and later requests still wait.
    assert_eq!(host.logged(Level::Warn).len(), 1);
    assert!(host.logged(Level::Error).is_empty());
    // The released stream stays out of the way.
    assert_eq!(stream.on_response_headers(&mut host), Action::Continue);
    stream.on_log(&mut host);

    for id in 3..=root::BODILESS_STALLS + 1 {
        host.effective_context = id;
        let mut next = root.new_stream(id);
        assert_eq!(next.on_request_headers(&mut host, false), Action::Pause);
        assert_eq!(host.replies.len(), id as usize - 2, "request {id} waits");
        wait_out_body(&mut root, &mut host);
        assert_eq!(host.replies.len(), id as usize - 1);
        next.on_log(&mut host);
    }
    // Three in a row without a body: the proxy withholds bodies (logged at error, once).
    assert_eq!(host.logged(Level::Error).len(), 1);
    // Later requests with a body are refused at once.
    let id = root::BODILESS_STALLS + 2;
    host.effective_context = id;
    let mut next = root.new_stream(id);
    assert_eq!(next.on_request_headers(&mut host, false), Action::Pause);
    let last = host.replies.last().unwrap();
    assert_eq!(last.0, id);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&last.1.body).unwrap()["error"]["code"],
        "rate_limit_body_unavailable"
    );
}

#[test]
fn a_body_delivered_whole_or_a_body_stalled_midway_never_makes_the_filter_stop_reading_bodies() {
    let (mut root, mut host) = body_root("deny");
    chat_headers(&mut host);
    for round in 0..2 * root::BODILESS_STALLS {
        let id = 2 + 3 * round;
        // A request whose body never begins...
        host.effective_context = id;
        let mut silent = root.new_stream(id);
        assert_eq!(silent.on_request_headers(&mut host, false), Action::Pause);
        // ... one whose body stops after its first chunk ...
        host.effective_context = id + 1;
        let mut slow = root.new_stream(id + 1);
        assert_eq!(slow.on_request_headers(&mut host, false), Action::Pause);
        host.request_body = br#"{"model":"#.to_vec();
        assert_eq!(
            slow.on_request_body(&mut host, 9, false),
            Action::PauseWithWatermark
        );
        wait_out_body(&mut root, &mut host);
        silent.on_log(&mut host);
        slow.on_log(&mut host);
        // ... and every other round one whose body arrives whole.
        if round % 2 == 1 {
            host.effective_context = id + 2;
            let mut whole = root.new_stream(id + 2);
            assert_eq!(whole.on_request_headers(&mut host, false), Action::Pause);
            host.request_body = br#"{"model":"big"}"#.to_vec();
            whole.on_request_body(&mut host, 15, true);
            whole.on_log(&mut host);
        }
    }
    assert!(
        host.logged(Level::Error).is_empty(),
        "{:?}",
        host.logged(Level::Error)
    );
    // Bodies are still read: the next request waits for its body.
    let id = 100;
    host.effective_context = id;
    let mut next = root.new_stream(id);
    assert_eq!(next.on_request_headers(&mut host, false), Action::Pause);
    assert!(host.replies.iter().all(|(ctx, _)| *ctx != id));
}

#[test]
fn request_whose_body_never_arrives_is_resumed_under_allow() {
    let (mut root, mut host) = body_root("allow");
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    wait_out_body(&mut root, &mut host);
    assert_eq!(host.resumed, vec![2]);
    assert!(host.replies.is_empty());
    // The resume delivers the body inside the root's call: the stream goes on unchecked.
    host.request_body = br#"{"model":"big"}"#.to_vec();
    let size = host.request_body.len();
    assert_eq!(
        stream.on_request_body(&mut host, size, true),
        Action::Continue
    );
    assert!(host.dispatched.is_empty());
    // One stall is not yet a proxy that withholds bodies: the next request waits for its body.
    let mut next = root.new_stream(3);
    assert_eq!(next.on_request_headers(&mut host, false), Action::Pause);
}

#[test]
fn a_stream_that_ends_while_waiting_for_its_body_stops_waiting() {
    let (mut root, mut host) = body_root("deny");
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    stream.on_log(&mut host);
    wait_out_body(&mut root, &mut host);
    assert!(host.replies.is_empty());
    assert_eq!(host.counter(names::BODY_TIMEOUTS), 0);
}

#[test]
fn failing_expression_is_warned_once_and_counted_every_time() {
    let cfg = r#"{"rateLimitService": {"cluster": "rl", "domain": "llm"},
        "limits": {"l": {"rates": [{"limit": 10, "window": "1m"}],
          "counters": [{"expression": "auth.identity.userid"}]}}}"#;
    let mut host = MockHost::with_configuration(cfg.as_bytes().to_vec());
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    for id in 2..4 {
        root.new_stream(id).on_request_headers(&mut host, true);
    }
    assert_eq!(host.counter(names::EXPRESSION_ERRORS), 2);
    assert_eq!(host.counter(&format!("{}.l", names::EXPRESSION_ERRORS)), 2);
    assert_eq!(host.logged(Level::Warn).len(), 1);
    assert_eq!(host.logged(Level::Debug).len(), 1);
}

#[test]
fn unevaluable_limit_refuses_with_403_before_any_call_unless_it_skips() {
    let cfg = |on_error: &str| {
        format!(
            r#"{{"rateLimitService": {{"cluster": "rl", "domain": "llm"}},
            "limits": {{"l": {{"rates": [{{"limit": 10, "window": "1m"}}], {on_error}
              "counters": [{{"expression": "auth.identity.userid"}}]}}}}}}"#
        )
    };
    // Default (deny): no identity, so the counter cannot be evaluated.
    let mut host = MockHost::with_configuration(cfg("").into_bytes());
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    assert!(host.dispatched.is_empty());
    let (_, reply) = &host.replies[0];
    assert_eq!(reply.status, 403);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_policy_error");
    assert!(body["error"]["message"].as_str().unwrap().contains("`l`"));
    assert_eq!(host.counter(names::REFUSED_ON_ERROR), 1);
    assert_eq!(host.counter(&format!("{}.l", names::REFUSED_ON_ERROR)), 1);
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert!(
        reports(&host).is_empty(),
        "a refused request is charged nothing"
    );

    // skip: the limit does not apply and the request goes on unchecked.
    let mut host = MockHost::with_configuration(cfg(r#""onError": "skip","#).into_bytes());
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Continue);
    assert!(host.replies.is_empty() && host.dispatched.is_empty());
    assert_eq!(host.counter(names::REFUSED_ON_ERROR), 0);
    assert_eq!(host.counter(names::EXPRESSION_ERRORS), 1);
}

#[test]
fn client_abort_after_the_check_charges_what_arrived() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    host.request_body = vec![b'a'; 400];
    stream.on_request_body(&mut host, 400, true);
    // The whole request went upstream, no response at all, and the filter did not read a
    // declared maximum: the fallback estimate charges the request bytes, which the stream
    // layer counts without their content, at 5 per token (400 / 5).
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert_eq!(reports(&host)[0].hits_addend, 80);
    assert_eq!(host.counter(names::USAGE_ESTIMATED), 1);
}

#[test]
fn stream_abandoned_during_its_check_costs_nothing() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert!(reports(&host).is_empty());
}

#[test]
fn failed_reports_are_retried_then_dropped_and_counted() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    serve(&mut stream, &mut host, 9);
    root.on_tick(&mut host);
    let first = host.calls(REPORT)[0].token;
    root.on_grpc_reply(&mut host, first, 14, 0);
    assert_eq!(host.counter(names::REPORTS_RETRIED), 1);
    // The retry waits one flushPeriod (100 ms) after the failure.
    root.on_tick(&mut host);
    assert_eq!(host.calls(REPORT).len(), 1, "retried before its time");
    host.now += std::time::Duration::from_millis(100);
    root.on_tick(&mut host);
    let second = host.calls(REPORT)[1].token;
    assert_eq!(reports(&host)[1].hits_addend, 9);
    root.on_grpc_reply(&mut host, second, 14, 0);
    assert_eq!(host.counter(names::REPORTS_DROPPED), 1);
    assert_eq!(host.counter(names::TOKENS_DROPPED), 9);
    assert_eq!(host.logged(Level::Warn).len(), 1);
    root.on_tick(&mut host);
    assert_eq!(host.calls(REPORT).len(), 2);
}

#[test]
fn report_answered_ok_is_not_sent_again() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    serve(&mut stream, &mut host, 9);
    root.on_tick(&mut host);
    let token = host.calls(REPORT)[0].token;
    host.grpc_reply = ok_reply(41);
    let size = host.grpc_reply.len();
    root.on_grpc_reply(&mut host, token, 0, size);
    root.on_tick(&mut host);
    assert_eq!(host.calls(REPORT).len(), 1);
    assert_eq!(host.counter(names::REPORTS_RETRIED), 0);
}

#[test]
fn tokens_owed_across_a_reconfigure_are_reported_under_the_new_settings() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    serve(&mut stream, &mut host, 11);
    host.plugin_configuration = config("").replace("\"rl\"", "\"rl2\"").into_bytes();
    assert!(root.on_configure(&mut host));
    root.on_tick(&mut host);
    let report = host.calls(REPORT)[0].clone();
    assert_eq!(report.cluster, "rl2");
    assert_eq!(reports(&host)[0].hits_addend, 11);
}

// Reservation mode.

use ratelimit_proto::{
    CommitRequest, CommitResponse, ReserveRequest, ReserveResponse, COMMIT, RESERVE,
};

fn reserve_reply(code: Code, id: &str, remaining: u32) -> Vec<u8> {
    let statuses = RateLimitResponse::decode(ok_reply(remaining).as_slice())
        .unwrap()
        .statuses;
    ReserveResponse {
        code: code as i32,
        reservation_id: id.into(),
        statuses,
        hold_ttl: None,
    }
    .encode_to_vec()
}

fn reserves(host: &MockHost) -> Vec<ReserveRequest> {
    host.calls(RESERVE)
        .iter()
        .map(|d| ReserveRequest::decode(d.message.as_slice()).unwrap())
        .collect()
}

fn commits(host: &MockHost) -> Vec<CommitRequest> {
    host.calls(COMMIT)
        .iter()
        .map(|d| CommitRequest::decode(d.message.as_slice()).unwrap())
        .collect()
}

/// Answers the pending call with `token`.
fn answer_token(
    stream: &mut StreamFilter,
    host: &mut MockHost,
    token: u32,
    status: u32,
    reply: Vec<u8>,
) {
    host.grpc_reply = reply;
    let size = host.grpc_reply.len();
    stream.on_grpc_reply(host, token, status, size);
}

fn reserving_root(mode: &str, extra: &str) -> (RootFilter, MockHost) {
    let mut host = MockHost::with_configuration(config_in(mode, extra).into_bytes());
    host.effective_context = ROOT;
    host.set_property("request.url_path", "/v1/chat/completions");
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    (root, host)
}

#[test]
fn reservation_without_a_body_reserves_the_default_amount_capped_by_the_limit_and_commits_at_once()
{
    let (root, mut host) = reserving_root("reservation", "");
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    let reserve = &reserves(&host)[0];
    // reservation.defaultAmount (256) capped by the limit's 100 tokens per minute.
    assert_eq!((reserve.domain.as_str(), reserve.amount), ("llm", 100));
    assert_eq!(reserve.ttl.map(|t| t.seconds), Some(60));
    assert!(host.calls(CHECK_RATE_LIMIT).is_empty());

    let token = host.calls(RESERVE)[0].token;
    answer_token(
        &mut stream,
        &mut host,
        token,
        0,
        reserve_reply(Code::Ok, "r-1", 0),
    );
    assert_eq!(host.resumed, vec![2]);
    serve(&mut stream, &mut host, 7);
    assert!(host
        .response_headers
        .contains(&("x-ratelimit-remaining".to_string(), b"0".to_vec())));
    // Committed without waiting for the tick, as the root context's call.
    let commit = host.calls(COMMIT)[0].clone();
    assert_eq!(commit.context_id, ROOT);
    assert_eq!(
        host.effective_context, 2,
        "the stream's context is restored"
    );
    let c = &commits(&host)[0];
    assert_eq!((c.reservation_id.as_str(), c.actual_amount), ("r-1", 7));
    assert_eq!(c.descriptors, reserve.descriptors);
    assert!(reports(&host).is_empty());
    assert_eq!(host.counter(names::COMMITS_SENT), 1);
}

#[test]
fn reservation_reserves_the_declared_bound_when_the_body_is_handed_over() {
    let (root, mut host) = reserving_root(
        "auto",
        r#""requestBody": {"allowOnHeadersStopIteration": true},"#,
    );
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
    assert!(host.dispatched.is_empty(), "held for its body");
    host.request_body =
        br#"{"model":"m","max_tokens":40,"messages":[{"role":"user","content":"abcdefghijkl"}]}"#
            .to_vec();
    let size = host.request_body.len();
    assert_eq!(
        stream.on_request_body(&mut host, size, true),
        Action::PauseWithWatermark
    );
    // 12 characters of text: 3 tokens, plus the declared 40.
    assert_eq!(reserves(&host)[0].amount, 43);
}

#[test]
fn a_refused_reservation_replies_429_and_releases_the_holds_already_granted() {
    let extra = r#""limits": {
          "per-user": {"rates": [{"limit": 100, "window": "1m"}], "counters": [{"expression": "request.headers['x-user']"}]},
          "prompts": {"rates": [{"limit": 1000, "window": "1h"}], "tokens": "prompt"}
        }}"#;
    let cfg = config_in("reservation", "");
    let cfg = format!("{}{extra}", &cfg[..cfg.find("\"limits\"").unwrap()]);
    let mut host = MockHost::with_configuration(cfg.into_bytes());
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    let tokens: Vec<u32> = host.calls(RESERVE).iter().map(|d| d.token).collect();
    assert_eq!(tokens.len(), 2, "one reservation per token category");
    answer_token(
        &mut stream,
        &mut host,
        tokens[1],
        0,
        reserve_reply(Code::Ok, "held", 900),
    );
    assert!(host.replies.is_empty(), "waits for every answer");
    answer_token(
        &mut stream,
        &mut host,
        tokens[0],
        0,
        reserve_reply(Code::OverLimit, "", 0),
    );
    assert_eq!(host.replies[0].1.status, 429);
    let released = commits(&host);
    assert_eq!(released.len(), 1);
    assert_eq!(
        (
            released[0].reservation_id.as_str(),
            released[0].actual_amount
        ),
        ("held", 0)
    );
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert_eq!(commits(&host).len(), 1, "released once");
}

#[test]
fn auto_falls_back_to_check_report_when_reserve_is_unimplemented_logged_once() {
    let (mut root, mut host) = reserving_root("auto", "");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    let token = host.calls(RESERVE)[0].token;
    answer_token(&mut stream, &mut host, token, 12, Vec::new());
    // Checked instead, and allowed.
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), 1);
    assert!(host.replies.is_empty());
    answer(&mut stream, &mut host, 0, ok_reply(50));
    assert_eq!(host.resumed.len(), 1);
    serve(&mut stream, &mut host, 5);
    // Later requests check directly; the warning and the metric come once.
    let mut next = root.new_stream(3);
    next.on_request_headers(&mut host, true);
    assert_eq!(host.calls(RESERVE).len(), 1);
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), 2);
    assert_eq!(host.counter(names::RESERVATIONS_UNIMPLEMENTED), 1);
    let warned: Vec<_> = host
        .logged(Level::Warn)
        .into_iter()
        .filter(|m| m.contains("Reserve"))
        .collect();
    assert_eq!(warned.len(), 1);
    root.on_tick(&mut host);
    assert_eq!(reports(&host)[0].hits_addend, 5);
}

#[test]
fn strict_reservation_mode_with_unimplemented_follows_the_failure_mode() {
    let (root, mut host) = reserving_root("reservation", "");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    let token = host.calls(RESERVE)[0].token;
    answer_token(&mut stream, &mut host, token, 12, Vec::new());
    assert_eq!(host.replies[0].1.status, 500);
    assert_eq!(host.counter(names::FAILURE_DENIED), 1);
    assert!(host.calls(CHECK_RATE_LIMIT).is_empty());
}

#[test]
fn reserve_dispatch_failure_follows_the_failure_mode_without_hanging() {
    let (root, mut host) = reserving_root("reservation", "");
    host.refuse_dispatch = Some("unknown cluster".into());
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    assert_eq!(host.replies[0].1.status, 500);
}

#[test]
fn garbage_and_timeouts_from_reserve_follow_the_failure_mode() {
    for (status, reply) in [
        (0, b"\xff\xfe\x00junk".to_vec()),
        (4, Vec::new()),
        (14, Vec::new()),
    ] {
        let (root, mut host) = reserving_root("reservation", "");
        let mut stream = root.new_stream(2);
        stream.on_request_headers(&mut host, true);
        let token = host.calls(RESERVE)[0].token;
        answer_token(&mut stream, &mut host, token, status, reply);
        assert_eq!(host.replies[0].1.status, 500, "status {status}");
        assert_eq!(host.counter(names::SERVICE_ERRORS), 1);
    }
}

#[test]
fn abandoned_during_its_reservation_costs_nothing_and_a_hold_granted_late_is_released_by_the_root()
{
    let (mut root, mut host) = reserving_root("reservation", "");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    stream.on_log(&mut host);
    // The stream is gone: the adapter hands its answer to the root context.
    let token = host.calls(RESERVE)[0].token;
    host.grpc_reply = reserve_reply(Code::Ok, "late", 50);
    let size = host.grpc_reply.len();
    root.on_grpc_reply(&mut host, token, 0, size);
    root.on_tick(&mut host);
    assert!(host.resumed.is_empty() && host.replies.is_empty());
    // The hold granted after the stream ended is released at once, with nothing spent.
    let released = commits(&host);
    assert_eq!(released.len(), 1);
    assert_eq!(
        (
            released[0].reservation_id.as_str(),
            released[0].actual_amount
        ),
        ("late", 0)
    );
}

#[test]
fn client_abort_after_admission_commits_the_estimate_and_a_expired_hold_is_counted() {
    let (mut root, mut host) = reserving_root("reservation", "");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    let token = host.calls(RESERVE)[0].token;
    answer_token(
        &mut stream,
        &mut host,
        token,
        0,
        reserve_reply(Code::Ok, "r", 50),
    );
    host.request_body = vec![b'a'; 40];
    stream.on_request_body(&mut host, 40, true);
    stream.on_log(&mut host);
    let c = &commits(&host)[0];
    // 40 bytes counted without their content: 40 / 5.
    assert_eq!((c.reservation_id.as_str(), c.actual_amount), ("r", 8));
    // The service says the hold had expired: the tokens were still added, and it is counted.
    let commit_token = host.calls(COMMIT)[0].token;
    host.grpc_reply = CommitResponse {
        reservation_released: false,
    }
    .encode_to_vec();
    let size = host.grpc_reply.len();
    root.on_grpc_reply(&mut host, commit_token, 0, size);
    assert_eq!(host.counter(names::RESERVATIONS_EXPIRED), 1);
}

#[test]
fn failed_commits_are_retried_on_the_tick_then_dropped_and_counted() {
    let (mut root, mut host) = reserving_root("reservation", "");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    let token = host.calls(RESERVE)[0].token;
    answer_token(
        &mut stream,
        &mut host,
        token,
        0,
        reserve_reply(Code::Ok, "r", 50),
    );
    serve(&mut stream, &mut host, 9);
    let first = host.calls(COMMIT)[0].token;
    root.on_grpc_reply(&mut host, first, 14, 0);
    assert_eq!(host.counter(names::COMMITS_RETRIED), 1);
    root.on_tick(&mut host);
    assert_eq!(host.calls(COMMIT).len(), 1, "retried before its time");
    host.now += std::time::Duration::from_millis(100);
    root.on_tick(&mut host);
    let second = host.calls(COMMIT)[1].token;
    assert_eq!(commits(&host)[1].reservation_id, "r");
    root.on_grpc_reply(&mut host, second, 14, 0);
    assert_eq!(host.counter(names::COMMITS_DROPPED), 1);
    assert_eq!(host.counter(names::TOKENS_DROPPED), 9);
    root.on_tick(&mut host);
    assert_eq!(host.calls(COMMIT).len(), 2);
}

#[test]
fn check_report_sends_the_report_at_once_when_the_spend_reaches_what_remains() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(5));
    serve(&mut stream, &mut host, 7);
    // 7 tokens against 5 remaining: reported now, as the root's call.
    let sent = host.calls(REPORT);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].context_id, ROOT);
    assert_eq!(host.effective_context, 2);
    assert_eq!(reports(&host)[0].hits_addend, 7);
    root.on_tick(&mut host);
    assert_eq!(host.calls(REPORT).len(), 1);
}

#[test]
fn a_body_held_for_the_reservation_still_counts_in_the_fallback_estimate() {
    let (root, mut host) = reserving_root(
        "reservation",
        r#""requestBody": {"allowOnHeadersStopIteration": true},"#,
    );
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    host.request_body =
        br#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"Tell me a story"}]}"#
            .to_vec();
    let request_len = host.request_body.len() as u64;
    stream.on_request_body(&mut host, request_len as usize, true);
    let token = host.calls(RESERVE)[0].token;
    answer_token(
        &mut stream,
        &mut host,
        token,
        0,
        reserve_reply(Code::Ok, "r", 50),
    );
    // A response without usage: charged the estimate of both bodies' text, the request's
    // read from the held body (its bound): 4 words each.
    host.response_headers = vec![("content-type".into(), b"application/json".to_vec())];
    stream.on_response_headers(&mut host);
    host.response_body =
        br#"{"id":"c1","choices":[{"message":{"role":"assistant","content":"Once upon a time"}}]}"#
            .to_vec();
    let response_len = host.response_body.len() as u64;
    stream.on_response_body(&mut host, response_len as usize, true);
    let c = &commits(&host)[0];
    assert_eq!(c.actual_amount, 4 + 4);
}

#[test]
fn check_report_refuses_on_any_worker_once_a_request_spent_what_remained() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut first = root.new_stream(2);
    first.on_request_headers(&mut host, true);
    answer(&mut first, &mut host, 0, ok_reply(5));
    serve(&mut first, &mut host, 7);
    // Another worker's VM (its own root), sharing the proxy's data: refused without a check,
    // with the limit's name and the time left in the window.
    let mut other = RootFilter::new(9);
    host.plugin_configuration = config("").into_bytes();
    assert!(other.on_configure(&mut host));
    let checks = host.calls(CHECK_RATE_LIMIT).len();
    let mut second = other.new_stream(10);
    assert_eq!(second.on_request_headers(&mut host, true), Action::Pause);
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), checks);
    let reply = &host.replies.last().unwrap().1;
    assert_eq!(reply.status, 429);
    assert!(reply.headers.contains(&("retry-after".into(), "30".into())));
    assert!(String::from_utf8_lossy(&reply.body).contains("'per-user'"));
    // Once the window has reset, the service is asked again.
    host.now += Duration::from_secs(31);
    let mut third = other.new_stream(11);
    third.on_request_headers(&mut host, true);
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), checks + 1);
    root.on_tick(&mut host);
}

#[test]
fn check_report_does_not_mark_counters_spent_when_the_request_left_some() {
    let (_root, mut host) = root();
    chat_headers(&mut host);
    let mut first = _root.new_stream(2);
    first.on_request_headers(&mut host, true);
    answer(&mut first, &mut host, 0, ok_reply(8));
    serve(&mut first, &mut host, 7);
    assert!(host.shared.is_empty());
    let mut second = _root.new_stream(3);
    second.on_request_headers(&mut host, true);
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), 2);
}

#[test]
fn a_body_handed_over_while_the_check_is_pending_is_held_until_the_answer() {
    // checkReport with include_usage off: the body is not the filter's business, but Envoy
    // (allow_on_headers_stop_iteration) delivers it while the headers wait for the check.
    let (root, mut host) = root_with(r#""usage": {"injectStreamUsage": false},"#);
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, false), Action::Pause);
    // Held under Envoy's flow control, unread: each callback sees only its own chunk.
    host.request_body = vec![b'x'; 40];
    assert_eq!(
        stream.on_request_body(&mut host, 40, false),
        Action::PauseWithWatermark
    );
    assert_eq!(
        stream.on_request_body(&mut host, 40, true),
        Action::PauseWithWatermark
    );
    answer(&mut stream, &mut host, 0, ok_reply(50));
    assert_eq!(host.resumed, vec![2]);
    // After the resume, chunks are not held; the estimate counts each byte once (80 bytes,
    // counted without their content, at 5 per token).
    assert_eq!(stream.on_request_body(&mut host, 0, true), Action::Continue);
    stream.on_log(&mut host);
    let mut root = root;
    root.on_tick(&mut host);
    assert_eq!(reports(&host)[0].hits_addend, 16);
}

// What a request that was not served costs.

/// A response of `status` with a small JSON error body and no usage.
fn error_response(stream: &mut StreamFilter, host: &mut MockHost, status: &str) {
    host.response_headers = vec![
        (":status".into(), status.as_bytes().to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    assert_eq!(stream.on_response_headers(host), Action::Continue);
    host.response_body = br#"{"error":{"message":"the prompt exceeds the context"}}"#.to_vec();
    let size = host.response_body.len();
    stream.on_response_body(host, size, true);
}

#[test]
fn an_upstream_4xx_without_usage_reports_nothing_and_a_4xx_with_usage_its_usage() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    host.set_property("response.code_details", "via_upstream");
    error_response(&mut stream, &mut host, "400");
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert!(reports(&host).is_empty(), "nothing queued");
    assert_eq!(host.counter(names::USAGE_FREE), 1);
    assert_eq!(host.counter(names::USAGE_ESTIMATED), 0);

    let mut stream = root.new_stream(3);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    host.response_headers = vec![
        (":status".into(), b"400".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    stream.on_response_headers(&mut host);
    host.response_body = br#"{"error":{},"usage":{"prompt_tokens":4,"total_tokens":4}}"#.to_vec();
    let size = host.response_body.len();
    stream.on_response_body(&mut host, size, true);
    root.on_tick(&mut host);
    assert_eq!(reports(&host)[0].hits_addend, 4);
}

#[test]
fn an_upstream_4xx_without_usage_releases_the_hold_with_a_commit_of_0() {
    let (root, mut host) = reserving_root("reservation", "");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    let token = host.calls(RESERVE)[0].token;
    answer_token(
        &mut stream,
        &mut host,
        token,
        0,
        reserve_reply(Code::Ok, "r", 50),
    );
    host.set_property("response.code_details", "via_upstream");
    error_response(&mut stream, &mut host, "429");
    let c = &commits(&host)[0];
    assert_eq!((c.reservation_id.as_str(), c.actual_amount), ("r", 0));
    stream.on_log(&mut host);
    assert_eq!(host.calls(COMMIT).len(), 1, "released once");
}

#[test]
fn envoys_own_reply_without_an_upstream_connection_costs_nothing_in_both_modes() {
    // A 503 of Envoy when no upstream answers the connection: charged nothing even with
    // 5xx errors charged (the default).
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    host.set_property(
        "response.code_details",
        "upstream_reset_before_response_started{remote_connection_failure}",
    );
    error_response(&mut stream, &mut host, "503");
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert!(reports(&host).is_empty());
    assert_eq!(host.counter(names::USAGE_FREE), 1);

    let (root, mut host) = reserving_root("reservation", "");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    let token = host.calls(RESERVE)[0].token;
    answer_token(
        &mut stream,
        &mut host,
        token,
        0,
        reserve_reply(Code::Ok, "r", 50),
    );
    host.set_property("response.code_details", "request_payload_too_large");
    error_response(&mut stream, &mut host, "413");
    let c = &commits(&host)[0];
    assert_eq!((c.reservation_id.as_str(), c.actual_amount), ("r", 0));

    // The same 503 from the upstream itself is charged (serverErrors: fallback).
    let (mut root, mut host) = root_with("");
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    host.request_body = vec![b'a'; 40];
    stream.on_request_body(&mut host, 40, true);
    host.set_property("response.code_details", "via_upstream");
    error_response(&mut stream, &mut host, "503");
    root.on_tick(&mut host);
    assert_eq!(host.counter(names::USAGE_ESTIMATED), 1);
    // The request's 40 bytes at 5 per token; the error body generates no text.
    assert_eq!(reports(&host)[0].hits_addend, 8);
}

#[test]
fn an_upload_abandoned_mid_body_costs_nothing() {
    let (mut root, mut host) = root();
    chat_headers(&mut host);
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    answer(&mut stream, &mut host, 0, ok_reply(50));
    host.request_body = vec![b'a'; 400];
    stream.on_request_body(&mut host, 400, false);
    stream.on_log(&mut host);
    root.on_tick(&mut host);
    assert!(reports(&host).is_empty());
    assert_eq!(host.counter(names::USAGE_FREE), 1);
}

#[test]
fn a_hang_up_after_a_declared_max_tokens_commits_the_prompt_estimate_plus_the_maximum() {
    let (root, mut host) = reserving_root(
        "reservation",
        r#""requestBody": {"allowOnHeadersStopIteration": true},"#,
    );
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    host.request_body =
        br#"{"model":"m","max_tokens":40,"messages":[{"role":"user","content":"abcdefghijkl"}]}"#
            .to_vec();
    let size = host.request_body.len();
    stream.on_request_body(&mut host, size, true);
    let token = host.calls(RESERVE)[0].token;
    answer_token(
        &mut stream,
        &mut host,
        token,
        0,
        reserve_reply(Code::Ok, "r", 50),
    );
    // The client hangs up before any answer.
    stream.on_log(&mut host);
    let c = &commits(&host)[0];
    // 12 characters: 3 tokens, plus the declared 40 (the hold's amount).
    assert_eq!((c.reservation_id.as_str(), c.actual_amount), ("r", 43));
    assert_eq!(reserves(&host)[0].amount, 43);
    assert_eq!(host.counter(names::USAGE_DECLARED), 1);
}

// --- shadow limits and usage records ------------------------------------------------------------

/// A root whose `per-user` limit is enforced (100 a minute) and `trial` a shadow limit (10 a
/// minute) over the same counter, in `mode`.
fn shadow_root(mode: &str) -> (RootFilter, MockHost) {
    let cfg = config_in(mode, "");
    let cfg = format!(
        "{}{}",
        &cfg[..cfg.find("\"limits\"").unwrap()],
        r#""limits": {
          "per-user": {"rates": [{"limit": 100, "window": "1m"}], "counters": [{"expression": "request.headers['x-user']"}]},
          "trial": {"rates": [{"limit": 10, "window": "1m"}], "counters": [{"expression": "request.headers['x-user']"}],
            "enforcement": "shadow"}
        }}"#
    );
    let mut host = MockHost::with_configuration(cfg.into_bytes());
    host.effective_context = ROOT;
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    host.effective_context = 2;
    (root, host)
}

/// The limit entries (`limit.<name>`) of a call's first descriptor.
fn limit_entries(descriptors: &[ratelimit_proto::RateLimitDescriptor]) -> Vec<String> {
    descriptors[0]
        .entries
        .iter()
        .filter(|e| e.key.starts_with("limit."))
        .map(|e| e.key.clone())
        .collect()
}

fn over_named(name: &str) -> Vec<u8> {
    let mut r = RateLimitResponse::decode(over_reply().as_slice()).unwrap();
    r.statuses[0].current_limit.as_mut().unwrap().name = name.into();
    r.encode_to_vec()
}

/// The calls dispatched to `method`, with their tokens, decoded as `M`.
fn decoded<M: Message + Default>(host: &MockHost, method: &str) -> Vec<(u32, M)> {
    host.calls(method)
        .iter()
        .map(|d| (d.token, M::decode(d.message.as_slice()).unwrap()))
        .collect()
}

/// The usage record the stream wrote (filter state `wasm.token_ratelimit`).
fn record(host: &MockHost) -> serde_json::Value {
    let bytes = host
        .set_properties
        .get(crate::record::PROPERTY)
        .expect("a usage record");
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn a_shadow_limit_over_budget_lets_the_request_through_marked_while_the_enforced_limit_refuses() {
    let (mut root, mut host) = shadow_root("checkReport");
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    // Two checks: the enforced limit's, then the shadow limit's, each with its own limit entry.
    let checks: Vec<(u32, RateLimitRequest)> = decoded(&host, CHECK_RATE_LIMIT);
    assert_eq!(checks.len(), 2);
    assert_eq!(limit_entries(&checks[0].1.descriptors), ["limit.per-user"]);
    assert_eq!(limit_entries(&checks[1].1.descriptors), ["limit.trial"]);
    // The shadow limit is spent: its check says OVER_LIMIT; the enforced one allows.
    answer_token(&mut stream, &mut host, checks[1].0, 0, over_named("trial"));
    assert!(host.resumed.is_empty(), "waits for the enforced check");
    answer_token(&mut stream, &mut host, checks[0].0, 0, ok_reply(90));
    assert_eq!(host.resumed, vec![2], "the shadow limit never refuses");
    assert!(host.replies.is_empty());
    serve(&mut stream, &mut host, 7);
    let shadow_header = host
        .response_headers
        .iter()
        .find(|(k, _)| k == "x-ratelimit-shadow-limited")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    assert_eq!(shadow_header.as_deref(), Some("trial"));
    let r = record(&host);
    assert_eq!(r["status"], "completed");
    assert_eq!(
        r["limits"],
        serde_json::json!([
            {"name": "per-user", "tokens": "total", "enforcement": "enforce", "outcome": "allowed", "charged": 7},
            {"name": "trial", "tokens": "total", "enforcement": "shadow", "outcome": "shadow_limited", "charged": 7}
        ])
    );
    // Spent like any other: the report carries both limits.
    host.effective_context = ROOT;
    root.on_tick(&mut host);
    let sent = reports(&host);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        limit_entries(&sent[0].descriptors),
        ["limit.per-user", "limit.trial"]
    );
    assert_eq!(sent[0].hits_addend, 7);
    assert_eq!(
        host.counter("token_ratelimit.limit_requests.trial.shadow_limited"),
        1
    );
    assert_eq!(
        host.counter("token_ratelimit.limit_requests.per-user.allowed"),
        1
    );

    // The enforced limit over budget refuses, whatever the shadow limit says.
    host.effective_context = 3;
    let mut stream = root.new_stream(3);
    stream.on_request_headers(&mut host, true);
    let tokens: Vec<u32> = host
        .calls(CHECK_RATE_LIMIT)
        .iter()
        .map(|d| d.token)
        .collect();
    answer_token(&mut stream, &mut host, tokens[2], 0, over_reply());
    assert_eq!(
        host.replies.last().map(|(c, r)| (*c, r.status)),
        Some((3, 429))
    );
    let r = record(&host);
    assert_eq!(r["status"], "limited");
    assert_eq!(r["limits"][0]["outcome"], "limited");
    assert_eq!(r["limits"][1]["outcome"], "allowed");
    // Its shadow check answers late, and changes nothing.
    answer_token(&mut stream, &mut host, tokens[3], 0, ok_reply(5));
    assert_eq!(host.replies.len(), 1);
}

#[test]
fn shadow_limits_alone_never_refuse_not_even_when_the_service_fails() {
    let cfg = config_in("checkReport", "").replace(
        r#""counters": [{"expression": "request.headers['x-user']"}]}"#,
        r#""counters": [{"expression": "request.headers['x-user']"}], "enforcement": "shadow"}"#,
    );
    let mut host = MockHost::with_configuration(cfg.into_bytes());
    host.effective_context = ROOT;
    host.set_property("request.url_path", "/v1/chat/completions");
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    assert_eq!(host.calls(CHECK_RATE_LIMIT).len(), 1);
    answer(&mut stream, &mut host, 0, over_reply());
    assert_eq!(host.resumed, vec![2]);
    serve(&mut stream, &mut host, 5);
    assert_eq!(record(&host)["limits"][0]["outcome"], "shadow_limited");
    // The service unreachable (failure mode deny): the request still goes on.
    host.effective_context = 3;
    let mut stream = root.new_stream(3);
    answer_after_headers(&mut stream, &mut host, 14);
    assert_eq!(host.resumed, vec![2, 3]);
    assert!(host.replies.is_empty());
    assert_eq!(host.counter(names::SERVICE_ERRORS), 1);
}

fn answer_after_headers(stream: &mut StreamFilter, host: &mut MockHost, status: u32) {
    stream.on_request_headers(host, true);
    answer(stream, host, status, Vec::new());
}

#[test]
fn a_refused_shadow_reservation_lets_the_request_through_and_commits_its_spend_without_an_id() {
    let (mut root, mut host) = shadow_root("reservation");
    let mut stream = root.new_stream(2);
    assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
    let calls: Vec<(u32, ReserveRequest)> = decoded(&host, RESERVE);
    assert_eq!(
        calls.len(),
        2,
        "shadow and enforced limits never share a reservation"
    );
    let shadow = calls
        .iter()
        .find(|(_, r)| limit_entries(&r.descriptors) == ["limit.trial"])
        .map(|(t, _)| *t)
        .unwrap();
    let enforced = calls
        .iter()
        .map(|(t, _)| *t)
        .find(|t| *t != shadow)
        .unwrap();
    answer_token(
        &mut stream,
        &mut host,
        shadow,
        0,
        reserve_reply(Code::OverLimit, "", 0),
    );
    answer_token(
        &mut stream,
        &mut host,
        enforced,
        0,
        reserve_reply(Code::Ok, "held", 90),
    );
    assert_eq!(host.resumed, vec![2]);
    serve(&mut stream, &mut host, 9);
    let r = record(&host);
    assert_eq!(r["admission"], "reserved");
    assert_eq!(r["limits"][1]["outcome"], "shadow_limited");
    assert_eq!(r["reserved"]["total"], 100, "only the granted hold: {r}");
    host.effective_context = ROOT;
    root.on_tick(&mut host);
    let mut sent: Vec<(String, u64)> = commits(&host)
        .iter()
        .map(|c| (c.reservation_id.clone(), c.actual_amount))
        .collect();
    sent.sort();
    assert_eq!(sent, [(String::new(), 9), ("held".to_string(), 9)]);
}

#[test]
fn a_shadow_check_answered_after_the_enforced_one_still_marks_the_request() {
    let (root, mut host) = shadow_root("checkReport");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    let tokens: Vec<u32> = host
        .calls(CHECK_RATE_LIMIT)
        .iter()
        .map(|d| d.token)
        .collect();
    answer_token(&mut stream, &mut host, tokens[0], 0, ok_reply(90));
    assert!(host.resumed.is_empty(), "waits for the shadow check");
    answer_token(&mut stream, &mut host, tokens[1], 0, over_named("trial"));
    assert_eq!(host.resumed, vec![2]);
    serve(&mut stream, &mut host, 7);
    assert_eq!(record(&host)["limits"][1]["outcome"], "shadow_limited");
}

#[test]
fn the_record_of_a_checked_request_names_the_model_of_the_response_and_its_cached_tokens() {
    let (root, mut host) = root();
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(90));
    host.response_headers = vec![("content-type".into(), b"application/json".to_vec())];
    stream.on_response_headers(&mut host);
    host.response_body = br#"{"model":"gpt-4o-mini-2024-07-18","usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":8}}}"#.to_vec();
    let size = host.response_body.len();
    stream.on_response_body(&mut host, size, true);
    let r = record(&host);
    assert_eq!(r["model"], "gpt-4o-mini-2024-07-18", "{r}");
    assert_eq!(r["admission"], "checked");
    assert_eq!(
        r["usage"],
        serde_json::json!({"source": "reported", "prompt": 12, "completion": 3, "total": 15, "cached": 8})
    );
    assert!(r.get("reserved").is_none(), "{r}");
}

#[test]
fn a_stream_ended_in_its_log_phase_is_recorded_by_what_envoy_says_of_its_end() {
    for (details, with_body, status) in [
        // A response of headers only: no body callback, the log phase ends it.
        (Some("via_upstream"), false, "completed"),
        (None, false, "completed"),
        (Some("downstream_remote_disconnect"), true, "client_aborted"),
        (
            Some("upstream_reset_after_response_started{remote_reset}"),
            true,
            "upstream_reset",
        ),
    ] {
        let (root, mut host) = root();
        chat_headers(&mut host);
        host.effective_context = 2;
        let mut stream = root.new_stream(2);
        stream.on_request_headers(&mut host, true);
        answer(&mut stream, &mut host, 0, ok_reply(90));
        host.response_headers = vec![("content-type".into(), b"text/event-stream".to_vec())];
        stream.on_response_headers(&mut host);
        if with_body {
            host.response_body =
                b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".to_vec();
            let size = host.response_body.len();
            stream.on_response_body(&mut host, size, false);
        }
        if let Some(d) = details {
            host.set_property("response.code_details", d);
        }
        stream.on_log(&mut host);
        assert_eq!(record(&host)["status"], status, "{details:?}");
    }
}

#[test]
fn with_usage_record_false_no_record_is_written_and_the_per_limit_counters_still_count() {
    let (mut root, mut host) = root_with(r#""usage": {"record": false},"#);
    chat_headers(&mut host);
    host.effective_context = 2;
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, true);
    answer(&mut stream, &mut host, 0, ok_reply(90));
    serve(&mut stream, &mut host, 5);
    assert!(host.set_properties.is_empty(), "{:?}", host.set_properties);
    host.effective_context = ROOT;
    root.on_tick(&mut host);
    assert_eq!(
        host.counter("token_ratelimit.limit_requests.per-user.allowed"),
        1
    );
}

#[test]
fn a_request_that_ends_while_its_shadow_check_is_pending_costs_nothing() {
    let (mut root, mut host) = shadow_root("checkReport");
    let mut stream = root.new_stream(2);
    stream.on_request_headers(&mut host, false);
    let tokens: Vec<u32> = host
        .calls(CHECK_RATE_LIMIT)
        .iter()
        .map(|d| d.token)
        .collect();
    answer_token(&mut stream, &mut host, tokens[0], 0, ok_reply(90));
    assert!(host.resumed.is_empty());
    // The client hangs up before the shadow check answers: the request never went upstream.
    host.request_body = vec![b'a'; 400];
    stream.on_request_body(&mut host, 400, true);
    stream.on_log(&mut host);
    host.effective_context = ROOT;
    root.on_tick(&mut host);
    assert!(
        reports(&host).is_empty(),
        "charged a request that never went upstream"
    );
    let r = record(&host);
    assert_eq!(
        (&r["status"], &r["admission"]),
        (&"client_aborted".into(), &"pending".into())
    );
}

#[test]
fn a_cost_limit_reports_its_cost_counts_it_and_a_failing_cost_is_warned_once_and_counted() {
    // `cost` is 3 per completion token minus 10: negative for short answers.
    let cfg = r#"{"rateLimitService": {"cluster": "rl", "domain": "llm", "mode": "checkReport"},
        "limits": {"spend": {"rates": [{"limit": 100000, "window": "30d"}], "tokens": "cost",
          "counters": [{"expression": "request.headers['x-user']"}],
          "cost": "usage.completion * 3 - 10"}}}"#;
    let mut host = MockHost::with_configuration(cfg.as_bytes().to_vec());
    host.effective_context = ROOT;
    let mut root = RootFilter::new(ROOT);
    assert!(root.on_configure(&mut host));
    chat_headers(&mut host);
    // 20 completion tokens: 50; then 2: -4, an error.
    for (id, total) in [(2, 21), (3, 3)] {
        let mut stream = root.new_stream(id);
        assert_eq!(stream.on_request_headers(&mut host, true), Action::Pause);
        answer(&mut stream, &mut host, 0, ok_reply(90));
        serve(&mut stream, &mut host, total);
        let record = record(&host);
        let charged = &record["limits"][0]["charged"];
        assert_eq!(record["limits"][0]["tokens"], "cost", "{record}");
        if id == 2 {
            assert_eq!(charged, 50, "{record}");
        } else {
            // No cached or reasoning tokens to price apart: nothing to retry, the limit's
            // smallest rate is charged (onError deny).
            assert_eq!(charged, 100000, "{record}");
        }
    }
    assert_eq!(host.counter(names::COST_ERRORS), 1);
    let warned: Vec<&str> = host.logged(Level::Warn);
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(
        warned[0].contains("limit `spend`: cost failed"),
        "{warned:?}"
    );
    host.effective_context = ROOT;
    root.on_tick(&mut host);
    let hits: Vec<u32> = reports(&host).iter().map(|r| r.hits_addend).collect();
    assert_eq!(hits, vec![50 + 100000]);
    assert_eq!(host.counter(names::TOKENS_COST), 100050);
    assert_eq!(
        host.counter("token_ratelimit.limit_tokens.spend.cost"),
        100050
    );
}
