//! The host works on the real module: it loads, accepts and refuses configurations, and a
//! request through a limit makes the check call the filter is meant to make.

mod common;

use common::{host, set_identity, CONFIG};
use prost::Message;
use proxy_wasm_host::{Action, CallState, LogLevel};
use ratelimit_proto::{
    Code, DescriptorStatus, RateLimit, RateLimitRequest, RateLimitResponse, Unit,
};

#[test]
fn the_module_loads_and_every_import_is_implemented() {
    let host = host();
    assert!(host
        .exports()
        .iter()
        .any(|e| e == "proxy_abi_version_0_2_1"));
    assert_eq!(host.missing_imports(), vec![], "imports this host lacks");
    assert!(host
        .imports()
        .iter()
        .any(|(m, n)| m == "env" && n == "proxy_grpc_call"));
}

#[test]
fn a_valid_configuration_is_accepted() {
    let plugin = host().plugin(CONFIG).expect("configuration accepted");
    assert_eq!(plugin.root_context_id(), 1);
    assert!(
        plugin.logged("configured 1 limit(s)"),
        "{:?}",
        plugin.logs()
    );
    assert!(
        plugin.tick_period().is_some(),
        "the root context ticks to send reports"
    );
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
}

#[test]
fn an_invalid_configuration_is_refused_with_the_filters_log_line() {
    let refused = host()
        .plugin(r#"{"rateLimitService": {"cluster": "ratelimit", "domain": "llm"}, "limits": {"free": {"rates": []}}}"#)
        .expect_err("configuration refused");
    assert_eq!(refused.stage, proxy_wasm_host::Stage::Configure);
    assert!(refused.trap.is_none(), "{refused}");
    let errors = refused.logs_at_least(LogLevel::Error);
    assert_eq!(
        errors.len(),
        1,
        "one log line naming the field and the reason: {errors:?}"
    );
    assert!(errors[0].starts_with("token-ratelimit: "), "{errors:?}");
    assert!(errors[0].contains("free"), "names the limit: {errors:?}");
}

#[test]
fn a_request_through_a_limit_checks_with_zero_hits() {
    let plugin = host().plugin(CONFIG).expect("configuration accepted");
    let stream = plugin.http_stream();
    assert_eq!(stream.id(), 2);
    set_identity(&stream, &[("userid", "alice")]);
    let action = stream.request_headers(
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "llm"),
            ("content-type", "application/json"),
        ],
        false,
    );
    assert_eq!(action, Action::Pause, "the request waits for the check");
    // Envoy holds the body of a request whose headers paused: the filter does not see it yet.
    assert_eq!(
        stream.request_body(r#"{"model":"m"}"#, true),
        Action::Buffered
    );

    let calls = plugin.pending_grpc_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.upstream, "ratelimit");
    assert_eq!(
        call.full_method(),
        "kuadrant.service.ratelimit.v1.RateLimitService/CheckRateLimit"
    );
    assert_eq!(call.context_id, stream.id());
    let request: RateLimitRequest = call.decode();
    assert_eq!(request.domain, "llm");
    assert_eq!(request.hits_addend, 0);
    assert_eq!(request.descriptors.len(), 1);
    let entries: Vec<(String, String)> = request.descriptors[0]
        .entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    assert!(
        entries.contains(&("limit.free".into(), "1".into())),
        "{entries:?}"
    );
    assert!(
        entries.contains(&("auth.identity.userid".into(), "alice".into())),
        "{entries:?}"
    );

    // The service says OK: the request resumes and nothing is replied locally.
    let ok = RateLimitResponse {
        overall_code: Code::Ok as i32,
        ..Default::default()
    };
    plugin.reply_grpc(call.token, ok.encode_to_vec());
    assert_eq!(plugin.grpc_call(call.token).state, CallState::Answered);
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(stream.local_reply(), None);
    // On resume the held body reaches the filter, which lets it through.
    assert_eq!(
        stream.request_body_forwarded(),
        br#"{"model":"m"}"#.to_vec()
    );
    assert!(
        stream
            .callbacks()
            .iter()
            .any(|c| c.starts_with("proxy_on_request_body(13, eos=true)")),
        "{:?}",
        stream.callbacks()
    );
    // The filter adds its per-request counters to Envoy's on its tick.
    plugin.tick();
    assert_eq!(plugin.metric("token_ratelimit.requests_allowed"), Some(1));
}

#[test]
fn over_limit_is_a_local_429_sent_through_the_filters_response_callbacks() {
    let plugin = host().plugin(CONFIG).unwrap();
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", "bob")]);
    assert_eq!(
        stream.request_headers(
            &[(":method", "POST"), (":path", "/v1/chat/completions")],
            true
        ),
        Action::Pause
    );
    let token = plugin.pending_grpc_calls()[0].token;
    let over = RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        ..Default::default()
    };
    plugin.reply_grpc_message(token, &over);

    let reply = stream.local_reply().expect("a local reply");
    assert_eq!(reply.status, 429);
    assert!(
        reply.body_str().contains("rate_limit_exceeded"),
        "{}",
        reply.body_str()
    );
    assert_eq!(stream.request_resumed(), 0);
    // As in Envoy, the reply went out through the filter's own response callbacks.
    assert!(
        stream
            .callbacks()
            .iter()
            .any(|c| c.starts_with("proxy_on_response_headers")),
        "{:?}",
        stream.callbacks()
    );
    assert_eq!(stream.response_header(":status").as_deref(), Some("429"));
    assert_eq!(stream.response_body_forwarded(), reply.body);
    assert_eq!(
        stream.response_headers(&[(":status", "200")], false),
        Action::NotCalled
    );
    stream.finish();
    assert_eq!(plugin.metric("token_ratelimit.requests_limited"), Some(1));
}

#[test]
fn a_timeout_in_failure_mode_deny_refuses_the_request() {
    let plugin = host().plugin(CONFIG).unwrap();
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", "carol")]);
    stream.request_headers(
        &[(":method", "POST"), (":path", "/v1/chat/completions")],
        true,
    );
    plugin.timeout_grpc(plugin.pending_grpc_calls()[0].token);
    assert!(
        stream.local_reply().is_some_and(|r| r.status >= 500),
        "{:?}",
        stream.local_reply()
    );
    assert_eq!(
        plugin.metric("token_ratelimit.failure_mode_denied"),
        Some(1)
    );
}

#[test]
fn usage_in_the_response_is_reported_from_the_root_context_on_tick() {
    let plugin = host().plugin(CONFIG).unwrap();
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", "dave")]);
    stream.request_headers(
        &[(":method", "POST"), (":path", "/v1/chat/completions")],
        true,
    );
    let ok = RateLimitResponse {
        overall_code: Code::Ok as i32,
        ..Default::default()
    };
    // Plenty of tokens left: the report waits for the tick (with little left, or no statuses at
    // all, the filter would send it at once from the stream's end).
    let with_room = RateLimitResponse {
        statuses: vec![DescriptorStatus {
            code: Code::Ok as i32,
            current_limit: Some(RateLimit {
                name: "free".into(),
                requests_per_unit: 1_000_000,
                unit: Unit::Minute as i32,
            }),
            limit_remaining: 1_000_000,
            duration_until_reset: None,
        }],
        ..ok.clone()
    };
    plugin.reply_grpc_message(plugin.pending_grpc_calls()[0].token, &with_room);

    assert_eq!(
        stream.response_headers(
            &[(":status", "200"), ("content-type", "application/json")],
            false
        ),
        Action::Continue
    );
    let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#;
    assert_eq!(stream.response_body(&body[..40], false), Action::Continue);
    assert_eq!(stream.response_body(&body[40..], true), Action::Continue);
    assert_eq!(
        stream.response_body_forwarded(),
        body.to_vec(),
        "chunks pass through unchanged"
    );
    stream.finish();
    assert!(
        plugin.pending_grpc_calls().is_empty(),
        "nothing is reported from the stream"
    );

    plugin.tick();
    let reports = plugin.pending_grpc_calls();
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].method, "Report");
    assert_eq!(reports[0].context_id, plugin.root_context_id());
    assert_eq!(reports[0].decode::<RateLimitRequest>().hits_addend, 12);
    plugin.reply_grpc_message(reports[0].token, &ok);
    assert_eq!(plugin.metric("token_ratelimit.reports_sent"), Some(1));
}

/// Envoy attributes every gRPC call to the root context (proxy-wasm-cpp-host dispatches it on
/// `contextOrEffectiveContext()->root_context()`): its reply comes with the root context's id,
/// whichever context dispatched it, and a stream's end cancels nothing; the root context's end
/// cancels its calls.
#[test]
fn a_streams_grpc_call_belongs_to_the_root_context_and_outlives_the_stream() {
    let plugin = host().plugin(CONFIG).unwrap();
    let root = plugin.root_context_id();
    let ok = RateLimitResponse {
        overall_code: Code::Ok as i32,
        ..Default::default()
    };
    let checked = |user: &str| {
        let stream = plugin.http_stream();
        set_identity(&stream, &[("userid", user)]);
        stream.request_headers(
            &[(":method", "POST"), (":path", "/v1/chat/completions")],
            true,
        );
        let calls = stream.pending_grpc_calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        assert_eq!(calls[0].context_id, stream.id(), "dispatched by the stream");
        assert_eq!(calls[0].root_context_id, root, "the root context's call");
        (stream, calls[0].token)
    };

    // Answered while the stream lives: delivered to the root context, which the module hands
    // to the stream (it makes the stream effective to resume it).
    let (stream, token) = checked("alice");
    plugin.reply_grpc_message(token, &ok);
    assert_eq!(plugin.effective_context_switches(), [(root, stream.id())]);
    assert_eq!(stream.request_resumed(), 1);

    // Deleted with its call in flight: the call stays pending and can still be answered.
    let (gone, token) = checked("bob");
    gone.finish();
    assert_eq!(plugin.grpc_call(token).state, CallState::Pending);
    plugin.reply_grpc_message(token, &ok);
    assert_eq!(plugin.grpc_call(token).state, CallState::Answered);
    assert_eq!(
        plugin.effective_context_switches().len(),
        1,
        "the module had no stream to hand it to"
    );
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);

    // The root context's end cancels what it still has in flight.
    let (_stream, token) = checked("carol");
    assert!(plugin.shutdown());
    assert_eq!(plugin.grpc_call(token).state, CallState::CancelledByHost);
}

#[test]
fn a_refused_host_call_is_an_answer_not_a_trap() {
    // An unknown cluster: Envoy answers BadArgument to the dispatch. (The Rust SDK panicked on
    // that status, which killed the VM; the filter's own ABI layer hands it to the filter.)
    let plugin = host()
        .plugin_builder()
        .clusters(&["elsewhere"])
        .start(CONFIG)
        .unwrap();
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", "eve")]);
    let action = stream
        .try_request_headers(
            &[(":method", "POST"), (":path", "/v1/chat/completions")],
            true,
        )
        .unwrap_or_else(|trap| panic!("{trap}"));
    assert_eq!(action, Action::Pause, "refused by the failure mode (deny)");
    assert!(
        stream.local_reply().is_some_and(|r| r.status >= 500),
        "{:?}",
        stream.local_reply()
    );
    assert!(
        plugin.logged("dispatch failed: BadArgument"),
        "{:?}",
        plugin.logs()
    );
    assert_eq!(
        plugin.metric("token_ratelimit.failure_mode_denied"),
        Some(1)
    );
    stream.finish();
    // The VM lives on.
    plugin.tick();
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
}
