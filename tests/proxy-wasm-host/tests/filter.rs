//! Scenarios of the token-ratelimit filter, driven through the real wasm module: configuration,
//! predicates and counters, the check and its failures, usage in every format, reports, aborts,
//! and robustness against hostile input. Nothing depends on wall-clock time: ticks and gRPC
//! replies happen when a test says so.
//!
//! Run against a copied artifact with
//! `TOKEN_RATELIMIT_WASM=/path/to/token_ratelimit.wasm cargo test -p proxy-wasm-host`.

mod common;

use common::*;
use prost::Message;
use proxy_wasm_host::{
    grpc_status, Action, CallState, LogLevel, Plugin, Stage, Stream, WasmResult,
};
use ratelimit_proto::{Code, HeaderValue};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

// =============================================================================================
// Helpers

/// Asserts the filter refuses `config` at configure time with one error line naming `field`.
fn assert_refused(config: Config, field: &str, reason: &str) {
    let refused = config.refuse();
    assert_eq!(refused.stage, Stage::Configure, "{refused}");
    assert!(refused.trap.is_none(), "refused without a trap: {refused}");
    let errors = refused.logs_at_least(LogLevel::Error);
    assert_eq!(errors.len(), 1, "one error line: {errors:?}");
    let prefix = format!("token-ratelimit: invalid configuration at `{field}`: ");
    assert!(
        errors[0].starts_with(&prefix),
        "{:?} should start with {prefix:?}",
        errors[0]
    );
    assert!(
        errors[0].contains(reason),
        "{:?} should say {reason:?}",
        errors[0]
    );
}

/// The tutorial's `free` limit with these rates.
fn free_with_rates(rates: Value) -> Config {
    Config::tutorial().set(&["limits", "free", "rates"], rates)
}

/// A `google.protobuf.Struct` holding the JSON object `v`, as Envoy builds from YAML.
fn to_struct(v: &Value) -> prost_types::Struct {
    let Value::Object(map) = v else {
        panic!("not an object: {v}")
    };
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().expect("a number")),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// How the rate-limit service fails a check.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// gRPC status 14.
    Unavailable,
    /// The call's deadline passes (gRPC status 4).
    Timeout,
    /// A reply that does not decode as a `RateLimitResponse`.
    Garbage,
    /// A reply whose overall code is `UNKNOWN`.
    UnknownCode,
    /// The call cannot even be dispatched.
    Dispatch,
}

impl Failure {
    /// What the filter's warning says about it.
    fn logged_as(self) -> &'static str {
        match self {
            Failure::Unavailable => "gRPC status 14",
            Failure::Timeout => "gRPC status 4",
            Failure::Garbage => "undecodable reply",
            Failure::UnknownCode => "overall_code UNKNOWN",
            Failure::Dispatch => "dispatch failed",
        }
    }
}

const REQUEST_BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// A chat request of alice whose check fails as `failure`, under `failureMode: mode`.
fn check_failing(mode: &str, failure: Failure) -> (Plugin, Stream) {
    let plugin = Config::tutorial().failure_mode(mode).start();
    if let Failure::Dispatch = failure {
        plugin.set_dispatch_failure(Some(WasmResult::InternalFailure));
    }
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    plugin.set_dispatch_failure(None);
    stream.request_body(REQUEST_BODY, true);
    let token = || check_of(&stream).token;
    match failure {
        Failure::Unavailable => {
            plugin.fail_grpc(token(), grpc_status::UNAVAILABLE, "no healthy upstream")
        }
        Failure::Timeout => plugin.timeout_grpc(token()),
        Failure::Garbage => plugin.reply_grpc(token(), b"\xff\x00garbage"),
        Failure::UnknownCode => plugin.reply_grpc_message(token(), &reply(Code::Unknown, vec![])),
        Failure::Dispatch => assert!(plugin.grpc_calls().is_empty()),
    }
    assert!(
        plugin.logged(failure.logged_as()),
        "the warning names the failure ({}): {:?}",
        failure.logged_as(),
        plugin.logs_at_least(LogLevel::Warn)
    );
    assert_eq!(metric(&plugin, "service_errors"), 1);
    assert_eq!(metric(&plugin, "requests_allowed"), 0);
    (plugin, stream)
}

/// `failureMode: deny`: a 500 in OpenAI's error shape, and the upstream never sees the request.
fn assert_denied_on(failure: Failure) {
    let (plugin, stream) = check_failing("deny", failure);
    let reply = stream.local_reply().expect("a local reply");
    assert_eq!(reply.status, 500);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_slice(&reply.body).expect("a JSON body");
    assert_eq!(body["error"]["code"], "rate_limit_service_unavailable");
    assert_eq!(stream.request_resumed(), 0, "the upstream is never called");
    assert!(stream.request_body_forwarded().is_empty());
    assert_eq!(
        stream.response_headers(&[(":status", "200")], false),
        Action::NotCalled
    );
    assert_eq!(metric(&plugin, "failure_mode_denied"), 1);
    assert_eq!(metric(&plugin, "failure_mode_allowed"), 0);
    stream.finish();
    assert!(tick(&plugin).is_empty(), "a refused request costs nothing");
}

/// `failureMode: allow`: the request goes on, and its tokens are still reported: at once, as the
/// failed check said nothing about the budget left.
fn assert_allowed_on(failure: Failure) {
    let (plugin, stream) = check_failing("allow", failure);
    assert_eq!(stream.local_reply(), None);
    let paused = !matches!(failure, Failure::Dispatch);
    assert_eq!(stream.request_resumed(), u32::from(paused));
    assert_eq!(stream.request_body_forwarded(), REQUEST_BODY);
    assert_eq!(metric(&plugin, "failure_mode_allowed"), 1);
    assert_eq!(metric(&plugin, "failure_mode_denied"), 0);
    respond(&stream, Some("application/json"), &[&openai_json(3, 4)]);
    stream.finish();
    assert_eq!(
        delivered_at_once(&plugin),
        vec![(user_descriptor("free", "alice"), 7)]
    );
}

/// Serves one request of alice per split of `body` into two chunks at every byte, and one
/// byte by byte; each must report `total` tokens.
fn assert_counted_at_every_split(content_type: &str, body: &[u8], total: u32) {
    let plugin = Config::per_user("all", "total").start_quiet();
    let expected = vec![(user_descriptor("all", "alice"), total)];
    for cut in 0..=body.len() {
        let stream = allowed(&plugin, "alice", CHAT, b"{}");
        respond(&stream, Some(content_type), &[&body[..cut], &body[cut..]]);
        stream.finish();
        assert_eq!(tick_delivered(&plugin), expected, "split at byte {cut}");
    }
    let stream = allowed(&plugin, "alice", CHAT, b"{}");
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    respond(&stream, Some(content_type), &bytes);
    stream.finish();
    assert_eq!(tick_delivered(&plugin), expected, "byte by byte");
    assert_eq!(metric(&plugin, "usage_missing"), 0);
}

/// Three per-user limits spending total, prompt and completion tokens.
fn categories() -> Config {
    Config::service()
        .limit("all", per_user_limit("total"))
        .limit("in", per_user_limit("prompt"))
        .limit("out", per_user_limit("completion"))
}

/// Serves alice's request to `path` with `body` in chunks of `chunk` bytes under
/// [`categories`]; returns the tokens reported per limit.
fn charged(path: &str, content_type: &str, body: &[u8], chunk: usize) -> BTreeMap<String, u32> {
    let plugin = categories().start();
    let stream = allowed(&plugin, "alice", path, b"{}");
    let chunks: Vec<&[u8]> = body.chunks(chunk).collect();
    respond(&stream, Some(content_type), &chunks);
    stream.finish();
    let mut by_limit = BTreeMap::new();
    for (entries, hits) in tick_delivered(&plugin) {
        assert_eq!(entries.len(), 2, "one limit and the user: {entries:?}");
        assert_eq!(entries[1], ("auth.identity.userid".into(), "alice".into()));
        let name = entries[0].0.strip_prefix("limit.").expect("a limit entry");
        by_limit.insert(name.to_string(), hits);
    }
    by_limit
}

fn tokens(total: u32, prompt: u32, completion: u32) -> BTreeMap<String, u32> {
    [("all", total), ("in", prompt), ("out", completion)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// The fallback estimate of a request whose body carries `prompt_tokens` tokens of text
/// answered with `answer_tokens` tokens of text (a word of up to 5 characters is one token).
/// Keys, ids and event-stream framing cost nothing.
fn estimate(prompt_tokens: u32, answer_tokens: u32) -> u32 {
    prompt_tokens + answer_tokens
}

/// The text of [`REQUEST_BODY`] ("hi"), in tokens.
const REQUEST_TOKENS: u32 = 1;

/// An SSE event (`data: ...` and a blank line).
fn event(data: &str) -> String {
    format!("data: {data}\n\n")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A small deterministic PRNG (xorshift64*), so the fuzz scenarios replay exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Random bytes mixed with pieces of JSON and SSE, to get past the first parser checks.
    fn body(&mut self) -> Vec<u8> {
        const PIECES: &[&[u8]] = &[
            b"data: ",
            b"data:",
            b"{\"usage\":{\"prompt_tokens\":",
            b"\"total_tokens\":",
            b"\"completion_tokens\":",
            b"{\"usageMetadata\":{\"totalTokenCount\":",
            b"{\"type\":\"response.completed\",\"response\":{\"usage\":",
            b"12",
            b"-1",
            b"1.5",
            b"99999999999999999999999",
            b"}",
            b"{",
            b"[",
            b"]",
            b",",
            b"\"",
            b"\n",
            b"\r\n",
            b"\n\n",
            b"event: message_delta\n",
            b"\xff\xfe\xc3",
            b"\x00",
        ];
        let mut body = Vec::new();
        for _ in 0..self.below(24) {
            if self.below(3) == 0 {
                let n = self.below(40);
                body.extend(self.bytes(n));
            } else {
                body.extend_from_slice(PIECES[self.below(PIECES.len())]);
            }
        }
        body
    }

    /// `body` cut into 1 to 6 chunks at random places.
    fn chunks<'a>(&mut self, body: &'a [u8]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = (0..self.below(6))
            .map(|_| self.below(body.len() + 1))
            .collect();
        cuts.push(0);
        cuts.push(body.len());
        cuts.sort();
        cuts.windows(2).map(|w| &body[w[0]..w[1]]).collect()
    }
}

// =============================================================================================
// Configuration

#[test]
fn config_refuses_an_unknown_field() {
    assert_refused(
        free_with_rates(json!([{"limit": 50, "window": "1m", "burst": 3}])),
        "limits.free.rates[0].burst",
        "unknown field `burst`",
    );
    assert_refused(
        Config::tutorial().set(&["rateLimitService", "port"], json!(8081)),
        "rateLimitService.port",
        "unknown field `port`",
    );
}

#[test]
fn config_refuses_a_bad_duration() {
    assert_refused(
        free_with_rates(json!([{"limit": 50, "window": "1x"}])),
        "limits.free.rates[0].window",
        "`1x`: unknown unit `x` (ms, s, m, h or d)",
    );
    assert_refused(
        Config::tutorial().set(&["rateLimitService", "timeout"], json!("fast")),
        "rateLimitService.timeout",
        "`fast` is not a duration",
    );
    assert_refused(
        Config::tutorial().set(&["reporting", "flushPeriod"], json!("0s")),
        "reporting.flushPeriod",
        "greater than zero",
    );
}

#[test]
fn config_refuses_a_window_that_is_not_whole_seconds() {
    assert_refused(
        free_with_rates(json!([{"limit": 50, "window": "1500ms"}])),
        "limits.free.rates[0].window",
        "a window must be whole seconds",
    );
}

#[test]
fn config_refuses_cel_that_does_not_compile() {
    assert_refused(
        Config::tutorial().set(
            &["limits", "free", "when"],
            json!([{"predicate": "request.path =="}]),
        ),
        "limits.free.when[0].predicate",
        "CEL does not compile",
    );
    assert_refused(
        Config::tutorial().set(
            &["limits", "free", "counters"],
            json!([{"expression": "auth.identity.userid"}, {"expression": "(("}]),
        ),
        "limits.free.counters[1].expression",
        "CEL does not compile",
    );
}

#[test]
fn config_refuses_a_limit_without_rates() {
    assert_refused(
        free_with_rates(json!([])),
        "limits.free.rates",
        "a limit needs at least one rate",
    );
}

#[test]
fn config_refuses_a_rate_limit_of_zero() {
    assert_refused(
        free_with_rates(json!([{"limit": 50, "window": "1m"}, {"limit": 0, "window": "1d"}])),
        "limits.free.rates[1].limit",
        "must be greater than 0",
    );
}

#[test]
fn config_refuses_a_bad_failure_mode() {
    assert_refused(
        Config::tutorial().failure_mode("maybe"),
        "rateLimitService.failureMode",
        "unknown variant `maybe`",
    );
}

#[test]
fn config_refuses_a_bad_tokens_category() {
    assert_refused(
        Config::tutorial().set(&["limits", "free", "tokens"], json!("output")),
        "limits.free.tokens",
        "unknown variant `output`",
    );
}

#[test]
fn config_refuses_an_empty_cluster() {
    assert_refused(
        Config::tutorial().set(&["rateLimitService", "cluster"], json!(" ")),
        "rateLimitService.cluster",
        "must not be empty",
    );
}

#[test]
fn config_refuses_a_bad_limit_name() {
    let free = Config::tutorial().0["limits"]["free"].clone();
    assert_refused(
        Config::service().limit("free tier", free),
        "limits.free tier",
        "a limit name may only hold letters, digits, `-`, `_` and `.`",
    );
}

#[test]
fn config_refuses_a_usage_path_that_is_not_a_json_pointer() {
    assert_refused(
        Config::tutorial().set(&["usage", "paths", "total"], json!(["usage.total_tokens"])),
        "usage.paths",
        "`usage.total_tokens` is not a JSON pointer",
    );
}

#[test]
fn config_refuses_fallback_fixed_without_fixed_tokens() {
    assert_refused(
        Config::tutorial().fallback("fixed"),
        "usage.fixedTokens",
        "must be greater than 0 with `fallback: fixed`",
    );
}

/// A configuration whose settings show in what the filter does.
fn tuned() -> Config {
    Config::tutorial()
        .set(&["rateLimitService", "timeout"], json!("250ms"))
        .set(
            &["reporting"],
            json!({"flushPeriod": "2s", "timeout": "3s", "maxRetries": 0}),
        )
}

/// Runs alice's chat request through a plugin configured with [`tuned`] and checks every setting
/// took effect: check timeout, tick period, report timeout, no retry.
fn assert_tuned(plugin: &Plugin) {
    assert_eq!(plugin.tick_period(), Some(Duration::from_secs(2)));
    assert!(plugin.logged("configured 1 limit(s), domain `llm`, cluster `ratelimit`"));
    let stream = post(plugin, Some("alice"), CHAT, &[]);
    let check = check_of(&stream);
    assert_eq!(check.timeout, Duration::from_millis(250));
    assert_eq!(
        entries_of(&check),
        pairs(&[("limit.free", "1"), ("auth.identity.userid", "alice")])
    );
    answer(plugin, &stream, &ok_with_room());
    respond(&stream, Some("application/json"), &[&openai_json(1, 2)]);
    stream.finish();
    let reports = tick(plugin);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].call.timeout, Duration::from_secs(3));
    plugin.fail_grpc(reports[0].call.token, grpc_status::UNAVAILABLE, "down");
    assert_eq!(
        metric(plugin, "reports_dropped"),
        1,
        "maxRetries 0: dropped at once"
    );
    assert_eq!(metric(plugin, "tokens_dropped"), 3);
}

#[test]
fn config_as_json_takes_effect() {
    let plugin = tuned().start();
    assert_tuned(&plugin);
}

#[test]
fn config_as_a_serialized_protobuf_struct_takes_effect() {
    let bytes = to_struct(&tuned().0).encode_to_vec();
    assert_ne!(bytes[0], b'{', "binary, not JSON");
    let plugin = host()
        .plugin(&bytes)
        .expect("a Struct configuration is accepted");
    assert_tuned(&plugin);

    // A bad field in a Struct is named like in JSON.
    let bad = free_with_rates(json!([{"limit": 50, "window": "1x"}]));
    let refused = host()
        .plugin(to_struct(&bad.0).encode_to_vec())
        .expect_err("refused");
    assert!(
        refused.logged("invalid configuration at `limits.free.rates[0].window`"),
        "{refused}"
    );
}

// =============================================================================================
// Predicates and counters

#[test]
fn a_path_predicate_selects_the_requests_that_are_checked() {
    let plugin = Config::tutorial().start();
    let models = post(&plugin, Some("alice"), "/v1/models", &[]);
    assert_eq!(
        models.request_body(b"{}", true),
        Action::Continue,
        "not paused"
    );
    assert!(plugin.grpc_calls().is_empty(), "no check for other paths");
    assert_eq!(metric(&plugin, "requests_checked"), 0);

    let chat = post(&plugin, Some("alice"), CHAT, &[]);
    assert_eq!(
        chat.request_body(b"{}", true),
        Action::Buffered,
        "paused for the check"
    );
    let check = check_of(&chat);
    assert_eq!(check.context_id, chat.id());
    assert_eq!(
        check
            .decode::<ratelimit_proto::RateLimitRequest>()
            .hits_addend,
        0
    );
    // Per-request counters reach Envoy's stats on the root context's tick.
    assert_eq!(
        metric(&plugin, "requests_checked"),
        0,
        "not before the tick"
    );
    plugin.tick();
    assert_eq!(metric(&plugin, "requests_checked"), 1);
}

#[test]
fn method_and_header_predicates_must_all_hold() {
    let plugin = Config::service()
        .limit(
            "tier",
            json!({
                "rates": [{"limit": 10, "window": "1m"}],
                "when": [
                    {"predicate": "request.method == \"POST\""},
                    {"predicate": "request.headers[\"x-tier\"] == \"free\""}
                ]
            }),
        )
        .start();
    let checked = |method: &str, extra: &[(&str, &str)]| {
        let stream = request(&plugin, None, method, "/v1/completions", extra);
        !stream.pending_grpc_calls().is_empty()
    };
    assert!(!checked("GET", &[("x-tier", "free")]), "GET");
    assert!(!checked("POST", &[("x-tier", "gold")]), "another tier");
    assert_eq!(metric(&plugin, "expression_errors"), 0);
    assert!(checked("POST", &[("X-Tier", "free")]), "both hold");
    assert_eq!(
        entries_of(&plugin.pending_grpc_calls()[0]),
        pairs(&[("limit.tier", "1")])
    );
    // A missing header does not make the limit apply.
    assert!(!checked("POST", &[]), "no header");
    plugin.tick();
    assert_eq!(metric(&plugin, "requests_checked"), 1);
}

#[test]
fn counters_read_headers_properties_and_metadata() {
    let plugin = Config::service()
        .limit(
            "keys",
            json!({
                "rates": [{"limit": 10, "window": "1m"}],
                "counters": [
                    {"expression": "request.headers[\"x-api-key\"]"},
                    {"expression": "source.address"},
                    {"expression": "source.port"},
                    {"expression": "auth.identity.userid"},
                    {"expression": "metadata.filter_metadata[\"envoy.filters.http.ext_authz\"].identity.groups"}
                ]
            }),
        )
        .start();
    let stream = plugin.http_stream();
    stream.set_property_str(&["source", "address"], "10.0.0.7:54321");
    stream.set_property_i64(&["source", "port"], 54321);
    set_identity(&stream, &[("userid", "alice"), ("groups", "free,beta")]);
    stream.request_headers(
        &[(":method", "POST"), (":path", CHAT), ("x-api-key", "k-123")],
        true,
    );
    assert_eq!(
        entries_of(&check_of(&stream)),
        pairs(&[
            ("limit.keys", "1"),
            ("request.headers[\"x-api-key\"]", "k-123"),
            ("source.address", "10.0.0.7:54321"),
            ("source.port", "54321"),
            ("auth.identity.userid", "alice"),
            (
                "metadata.filter_metadata[\"envoy.filters.http.ext_authz\"].identity.groups",
                "free,beta"
            ),
        ])
    );
}

/// The host keeps no record of property reads, so laziness is checked by its effect: a limit
/// whose first predicate is false evaluates nothing else (the missing identity its later
/// predicate and counter read raises no expression error), while the same reads after a true
/// predicate do fail.
#[test]
fn a_false_predicate_stops_the_evaluation_of_its_limit() {
    let plugin = Config::service()
        .limit(
            "a-skipped",
            json!({
                "rates": [{"limit": 10, "window": "1m"}],
                "when": [
                    {"predicate": "request.path == \"/v1/embeddings\""},
                    {"predicate": "auth.identity.tier == \"gold\""}
                ],
                "counters": [{"expression": "auth.identity.userid"}]
            }),
        )
        .limit(
            "b-evaluated",
            json!({
                "rates": [{"limit": 10, "window": "1m"}],
                "when": [
                    {"predicate": format!("request.path == \"{CHAT}\"")},
                    {"predicate": "auth.identity.tier == \"gold\""}
                ]
            }),
        )
        .start();
    let stream = post(&plugin, None, CHAT, &[]);
    assert!(stream.pending_grpc_calls().is_empty(), "no limit applies");
    assert_eq!(
        metric(&plugin, "expression_errors"),
        1,
        "only b's predicate failed"
    );
    let warnings = plugin.logs_at_least(LogLevel::Warn).join("\n");
    assert!(warnings.contains("limit `b-evaluated`"), "{warnings}");
    assert!(!warnings.contains("a-skipped"), "{warnings}");
}

#[test]
fn several_limits_share_one_descriptor_and_the_most_restrictive_wins() {
    let per_user = |limit: u64, window: &str| {
        json!({
            "rates": [{"limit": limit, "window": window}],
            "when": [{"predicate": format!("request.path == \"{CHAT}\"")}],
            "counters": [{"expression": "auth.identity.userid"}]
        })
    };
    let plugin = Config::service()
        .limit("daily", per_user(1000, "1d"))
        .limit("free", per_user(50, "1m"))
        .limit(
            "global",
            json!({"rates": [{"limit": 10000, "window": "1h"}]}),
        )
        .limit(
            "models",
            json!({
                "rates": [{"limit": 5, "window": "1m"}],
                "when": [{"predicate": "request.path == \"/v1/models\""}]
            }),
        )
        .start();
    let minute = Duration::from_secs(42);
    let day = Duration::from_secs(3600);

    // One limit over: 429 naming it.
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    assert_eq!(
        entries_of(&check_of(&stream)),
        pairs(&[
            ("limit.daily", "1"),
            ("limit.free", "1"),
            ("limit.global", "1"),
            ("auth.identity.userid", "alice"),
        ])
    );
    answer(
        &plugin,
        &stream,
        &reply(
            Code::OverLimit,
            vec![
                status(Code::Ok, "daily", 1000, 900, day),
                status(Code::OverLimit, "free", 50, 0, minute),
                status(Code::Ok, "global", 10000, 9000, day),
            ],
        ),
    );
    let limited = stream.local_reply().expect("429");
    assert_eq!(limited.status, 429);
    assert!(
        limited.body_str().contains("'free'"),
        "{}",
        limited.body_str()
    );
    assert_eq!(limited.header("retry-after"), Some("42"));
    assert_eq!(limited.header("x-ratelimit-limit"), Some("50"));
    assert_eq!(metric(&plugin, "requests_limited.free"), 1);

    // Two over: the one that resets last.
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    answer(
        &plugin,
        &stream,
        &reply(
            Code::OverLimit,
            vec![
                status(Code::OverLimit, "daily", 1000, 0, day),
                status(Code::OverLimit, "free", 50, 0, minute),
            ],
        ),
    );
    let limited = stream.local_reply().expect("429");
    assert!(
        limited.body_str().contains("'daily'"),
        "{}",
        limited.body_str()
    );
    assert_eq!(limited.header("retry-after"), Some("3600"));
    assert_eq!(metric(&plugin, "requests_limited.daily"), 1);
    assert_eq!(metric(&plugin, "requests_limited"), 2);
    assert_eq!(metric(&plugin, "requests_allowed"), 0);
}

// =============================================================================================
// The check

#[test]
fn check_ok_resumes_and_adds_the_rate_limit_headers_to_the_response() {
    let plugin = Config::tutorial().start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    let check = check_of(&stream);
    assert_eq!(check.timeout, Duration::from_millis(100), "default timeout");
    assert_eq!(
        check.full_method(),
        "kuadrant.service.ratelimit.v1.RateLimitService/CheckRateLimit"
    );
    let mut ok = reply(
        Code::Ok,
        vec![
            status(Code::Ok, "daily", 1000, 900, Duration::from_secs(3600)),
            status(Code::Ok, "free", 50, 28, Duration::from_millis(29_500)),
        ],
    );
    ok.response_headers_to_add = vec![HeaderValue {
        key: "X-Served-By".into(),
        value: "limitador".into(),
        raw_value: vec![],
    }];
    plugin.reply_grpc_message(check.token, &ok);
    assert_eq!(plugin.grpc_call(check.token).state, CallState::Answered);
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(stream.local_reply(), None);
    assert_eq!(stream.request_body_forwarded(), REQUEST_BODY);
    plugin.tick();
    assert_eq!(metric(&plugin, "requests_allowed"), 1);

    response_headers(&stream, Some("application/json"), &[]);
    assert_eq!(
        stream.response_headers_added(),
        pairs(&[
            ("x-ratelimit-limit", "50"),
            ("x-ratelimit-remaining", "28"),
            ("x-ratelimit-reset", "30"),
            ("x-served-by", "limitador"),
        ]),
        "the fewest remaining wins; the reset rounds up"
    );
    assert_eq!(stream.response_header("retry-after"), None);
    assert_eq!(
        stream.response_header("x-ratelimit-remaining").as_deref(),
        Some("28")
    );
}

#[test]
fn over_limit_is_a_429_in_openai_shape_with_retry_after() {
    let plugin = Config::tutorial().start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    answer(
        &plugin,
        &stream,
        &reply(
            Code::OverLimit,
            vec![status(
                Code::OverLimit,
                "free",
                50,
                0,
                Duration::from_millis(42_500),
            )],
        ),
    );
    let limited = stream.local_reply().expect("a local reply");
    assert_eq!(limited.status, 429);
    let body: Value = serde_json::from_slice(&limited.body).expect("JSON");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "tokens");
    assert_eq!(
        body["error"]["message"],
        "Token rate limit exceeded for limit 'free'. Retry after the window resets."
    );
    for (name, value) in [
        ("content-type", "application/json"),
        ("retry-after", "43"),
        ("x-ratelimit-limit", "50"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "43"),
    ] {
        assert_eq!(limited.header(name), Some(value), "{name}");
        let sent: Vec<_> = stream
            .current_response_headers()
            .into_iter()
            .filter(|(k, _)| k == name)
            .collect();
        assert_eq!(sent, pairs(&[(name, value)]), "the client gets {name} once");
    }
    assert_eq!(stream.request_resumed(), 0, "the upstream is never called");
    assert!(stream.request_body_forwarded().is_empty());
    assert_eq!(
        stream.response_headers(&[(":status", "200")], false),
        Action::NotCalled
    );
    assert_eq!(metric(&plugin, "requests_limited"), 1);
    assert_eq!(metric(&plugin, "requests_limited.free"), 1);
    stream.finish();
    assert!(tick(&plugin).is_empty(), "a refused request costs nothing");
}

/// The headers the filter sends on `stream` whose names start with one of `prefixes`.
fn sent_headers(stream: &Stream, prefixes: &[&str]) -> Vec<(String, String)> {
    stream
        .current_response_headers()
        .into_iter()
        .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
        .collect()
}

#[test]
fn rate_limit_headers_openai_and_ietf_show_the_status_on_a_200_and_a_429() {
    const OURS: &[&str] = &["x-ratelimit", "ratelimit", "retry-after"];
    for (format, ok_headers, over_headers) in [
        (
            "openai",
            vec![
                ("x-ratelimit-limit-tokens", "50"),
                ("x-ratelimit-remaining-tokens", "28"),
                ("x-ratelimit-reset-tokens", "29.5s"),
            ],
            vec![
                ("x-ratelimit-limit-tokens", "50"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", "42.5s"),
                ("retry-after", "43"),
                ("retry-after-ms", "42500"),
            ],
        ),
        (
            "ietf",
            vec![
                ("ratelimit-policy", r#""free";q=50;w=60"#),
                ("ratelimit", r#""free";r=28;t=30"#),
            ],
            vec![
                ("ratelimit-policy", r#""free";q=50;w=60"#),
                ("ratelimit", r#""free";r=0;t=43"#),
                ("retry-after", "43"),
                ("retry-after-ms", "42500"),
            ],
        ),
    ] {
        let plugin = Config::tutorial()
            .set(&["rateLimitHeaders"], json!(format))
            .start();
        let stream = post(&plugin, Some("alice"), CHAT, &[]);
        stream.request_body(REQUEST_BODY, true);
        let free = status(Code::Ok, "free", 50, 28, Duration::from_millis(29_500));
        answer(&plugin, &stream, &reply(Code::Ok, vec![free]));
        response_headers(&stream, Some("application/json"), &[]);
        assert_eq!(
            stream.response_headers_added(),
            pairs(&ok_headers),
            "{format}"
        );

        let stream = post(&plugin, Some("alice"), CHAT, &[]);
        stream.request_body(REQUEST_BODY, true);
        let spent = status(
            Code::OverLimit,
            "free",
            50,
            0,
            Duration::from_millis(42_500),
        );
        answer(&plugin, &stream, &reply(Code::OverLimit, vec![spent]));
        assert_eq!(stream.local_reply().map(|r| r.status), Some(429));
        assert_eq!(
            sent_headers(&stream, OURS),
            pairs(&over_headers),
            "{format}"
        );
    }
}

#[test]
fn behind_limitador_a_429_without_statuses_says_to_retry_after_the_window() {
    // Limitador answers OVER_LIMIT with no statuses: the one enforced rate, 50 per minute.
    for (format, expected) in [
        (
            "draft03",
            vec![
                ("x-ratelimit-limit", "50"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "60"),
                ("retry-after", "60"),
                ("retry-after-ms", "60000"),
            ],
        ),
        (
            "none",
            vec![("retry-after", "60"), ("retry-after-ms", "60000")],
        ),
    ] {
        let plugin = Config::tutorial()
            .set(&["rateLimitHeaders"], json!(format))
            .start();
        let stream = post(&plugin, Some("alice"), CHAT, &[]);
        stream.request_body(REQUEST_BODY, true);
        answer(&plugin, &stream, &reply(Code::OverLimit, vec![]));
        let limited = stream.local_reply().expect("a local reply");
        assert_eq!(limited.status, 429);
        let sent = sent_headers(&stream, &["x-ratelimit", "ratelimit", "retry-after"]);
        assert_eq!(sent, pairs(&expected), "{format}");
    }
}

#[test]
fn deny_mode_refuses_when_the_service_is_unavailable() {
    assert_denied_on(Failure::Unavailable);
}

#[test]
fn deny_mode_refuses_when_the_check_times_out() {
    assert_denied_on(Failure::Timeout);
}

#[test]
fn deny_mode_refuses_on_garbage_reply_bytes() {
    assert_denied_on(Failure::Garbage);
}

#[test]
fn deny_mode_refuses_on_overall_code_unknown() {
    assert_denied_on(Failure::UnknownCode);
}

#[test]
fn deny_mode_refuses_when_the_check_cannot_be_dispatched() {
    assert_denied_on(Failure::Dispatch);
}

#[test]
fn allow_mode_lets_through_when_the_service_is_unavailable() {
    assert_allowed_on(Failure::Unavailable);
}

#[test]
fn allow_mode_lets_through_when_the_check_times_out() {
    assert_allowed_on(Failure::Timeout);
}

#[test]
fn allow_mode_lets_through_on_garbage_reply_bytes() {
    assert_allowed_on(Failure::Garbage);
}

#[test]
fn allow_mode_lets_through_on_overall_code_unknown() {
    assert_allowed_on(Failure::UnknownCode);
}

#[test]
fn allow_mode_lets_through_when_the_check_cannot_be_dispatched() {
    assert_allowed_on(Failure::Dispatch);
}

// =============================================================================================
// Usage

#[test]
fn json_usage_split_at_every_byte_is_reported() {
    assert_counted_at_every_split("application/json", &openai_json(17, 25), 42);
}

#[test]
fn sse_usage_split_at_every_byte_is_reported() {
    assert_counted_at_every_split("text/event-stream", &openai_sse(17, 25, "\n"), 42);
    assert_counted_at_every_split(
        "text/event-stream; charset=utf-8",
        &openai_sse(9, 4, "\r\n"),
        13,
    );
}

#[test]
fn each_token_category_is_reported_in_its_own_descriptor() {
    let plugin = categories().start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    assert_eq!(
        entries_of(&check_of(&stream)),
        pairs(&[
            ("limit.all", "1"),
            ("limit.in", "1"),
            ("limit.out", "1"),
            ("auth.identity.userid", "alice"),
        ]),
        "the check holds every limit"
    );
    drop(stream);
    assert_eq!(
        charged(CHAT, "application/json", &openai_json(7, 5), 64),
        tokens(12, 7, 5)
    );
}

#[test]
fn category_metrics_count_the_tokens_queued() {
    let plugin = categories().start();
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(7, 5),
    );
    serve(&plugin, "bob", CHAT, "application/json", &openai_json(1, 2));
    assert_eq!(tick_delivered(&plugin).len(), 6, "3 limits x 2 users");
    assert_eq!(metric(&plugin, "tokens_reported.total"), 15);
    assert_eq!(metric(&plugin, "tokens_reported.prompt"), 8);
    assert_eq!(metric(&plugin, "tokens_reported.completion"), 7);
}

#[test]
fn anthropic_messages_stream_counts_input_cache_and_cumulative_output() {
    let stream = [
        "event: message_start\n",
        &event(r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"usage":{"input_tokens":25,"cache_creation_input_tokens":3,"cache_read_input_tokens":5,"output_tokens":1}}}"#),
        "event: content_block_delta\n",
        &event(r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"usage output_tokens 999"}}"#),
        "event: message_delta\n",
        &event(r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":10}}"#),
        "event: message_delta\n",
        &event(r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#),
        "event: message_stop\n",
        &event(r#"{"type":"message_stop"}"#),
    ]
    .concat();
    assert_eq!(
        charged("/v1/messages", "text/event-stream", stream.as_bytes(), 37),
        tokens(48, 33, 15)
    );
}

#[test]
fn gemini_generate_content_counts_usage_metadata() {
    let body = br#"{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":3,"thoughtsTokenCount":2,"totalTokenCount":13}}"#;
    assert_eq!(
        charged(
            "/v1beta/models/gemini-2.0-flash:generateContent",
            "application/json; charset=UTF-8",
            body,
            11
        ),
        tokens(13, 8, 5)
    );
}

#[test]
fn responses_api_stream_counts_response_completed() {
    let stream = [
        "event: response.created\n",
        &event(r#"{"type":"response.created","response":{"id":"resp_1","status":"in_progress","usage":null}}"#),
        "event: response.output_text.delta\n",
        &event(r#"{"type":"response.output_text.delta","delta":"Hi"}"#),
        "event: response.completed\n",
        &event(r#"{"type":"response.completed","response":{"id":"resp_1","status":"completed","usage":{"input_tokens":11,"output_tokens":6,"total_tokens":17}}}"#),
    ]
    .concat();
    assert_eq!(
        charged("/v1/responses", "text/event-stream", stream.as_bytes(), 23),
        tokens(17, 11, 6)
    );
}

#[test]
fn a_gzip_response_is_counted_and_accept_encoding_keeps_readable_codings() {
    let plugin = Config::tutorial().start();
    let stream = post(
        &plugin,
        Some("alice"),
        CHAT,
        &[("accept-encoding", "gzip, zstd")],
    );
    assert_eq!(
        stream.request_header("accept-encoding").as_deref(),
        Some("gzip")
    );
    stream.request_body(REQUEST_BODY, true);
    answer(&plugin, &stream, &ok());
    let body = gzip(&openai_json(20, 22));
    response_headers(
        &stream,
        Some("application/json"),
        &[("content-encoding", "gzip")],
    );
    for (i, chunk) in body.chunks(5).enumerate() {
        stream.response_body(chunk, (i + 1) * 5 >= body.len());
    }
    assert_eq!(
        stream.response_body_forwarded(),
        body,
        "forwarded still compressed"
    );
    stream.finish();
    assert_eq!(
        delivered_at_once(&plugin),
        vec![(user_descriptor("free", "alice"), 42)],
        "no statuses in the check: reported at once"
    );

    // Nothing readable left: the header goes (identity).
    let zstd = post(&plugin, Some("alice"), CHAT, &[("accept-encoding", "zstd")]);
    assert_eq!(zstd.request_header("accept-encoding"), None);
    // A request no limit applies to is left alone.
    let other = post(
        &plugin,
        Some("alice"),
        "/v1/models",
        &[("accept-encoding", "gzip, zstd")],
    );
    assert_eq!(
        other.request_header("accept-encoding").as_deref(),
        Some("gzip, zstd")
    );
}

#[test]
fn usage_inside_generated_content_is_ignored() {
    let plugin = Config::tutorial().fallback("none").start();
    let fake = json!({
        "choices": [{
            "message": {"role": "assistant", "content": "{\"usage\":{\"total_tokens\":1}}"},
            "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}
        }],
        "data": {"usage": {"total_tokens": 1}}
    });
    let mut real = fake.clone();
    real["usage"] = json!({"prompt_tokens": 30, "completion_tokens": 10, "total_tokens": 40});
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        real.to_string().as_bytes(),
    );
    assert_eq!(
        tick_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), 40)],
        "only the top-level usage counts"
    );

    let sse = [
        event(r#"{"choices":[{"delta":{"content":"\"usage\":{\"total_tokens\":1}"}}]}"#),
        event(r#"{"choices":[{"delta":{},"usage":{"total_tokens":1}}]}"#),
        event(r#"{"choices":[],"usage":{"prompt_tokens":30,"completion_tokens":10,"total_tokens":40}}"#),
        event("[DONE]"),
    ]
    .concat();
    serve(&plugin, "alice", CHAT, "text/event-stream", sse.as_bytes());
    assert_eq!(
        tick_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), 40)]
    );

    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        fake.to_string().as_bytes(),
    );
    assert!(tick(&plugin).is_empty(), "fake usage alone is no usage");
    assert_eq!(metric(&plugin, "usage_missing"), 1);
}

#[test]
fn negative_float_and_string_usage_figures_are_ignored_and_the_estimate_applies() {
    let plugin = Config::tutorial().start();
    let bodies = [
        r#"{"usage":{"prompt_tokens":-5,"completion_tokens":-7,"total_tokens":-12}}"#,
        r#"{"usage":{"prompt_tokens":5.5,"completion_tokens":2.0,"total_tokens":7.5}}"#,
        r#"{"usage":{"prompt_tokens":"5","completion_tokens":"7","total_tokens":"12"}}"#,
    ];
    for (i, body) in bodies.iter().enumerate() {
        let stream = allowed(&plugin, "alice", CHAT, REQUEST_BODY);
        respond(&stream, Some("application/json"), &[body.as_bytes()]);
        stream.finish();
        assert_eq!(
            tick_delivered(&plugin),
            vec![(
                user_descriptor("free", "alice"),
                // The bodies hold no generated text.
                estimate(REQUEST_TOKENS, 0)
            )],
            "{body}"
        );
        assert_eq!(metric(&plugin, "usage_missing"), i as u64 + 1);
        assert_eq!(metric(&plugin, "usage_estimated"), i as u64 + 1);
    }
}

#[test]
fn zero_token_usage_is_never_reported() {
    let plugin = Config::tutorial().start();
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(0, 0),
    );
    serve(
        &plugin,
        "bob",
        CHAT,
        "application/json",
        br#"{"usage":{"prompt_tokens":0,"completion_tokens":0}}"#,
    );
    assert!(tick(&plugin).is_empty(), "Limitador would count a 0 as 1");
    assert_eq!(metric(&plugin, "reports_sent"), 0);
    assert_eq!(metric(&plugin, "usage_missing"), 0, "usage was reported: 0");
}

// =============================================================================================
// Reports

#[test]
fn reports_of_one_user_are_summed_and_sent_from_the_root_context_on_tick() {
    let plugin = Config::tutorial().start();
    for (prompt, completion) in [(2, 3), (4, 3), (5, 6)] {
        serve(
            &plugin,
            "alice",
            CHAT,
            "application/json",
            &openai_json(prompt, completion),
        );
        assert!(
            pending_reports(&plugin).is_empty(),
            "nothing is sent before the tick"
        );
    }
    let reports = tick(&plugin);
    assert_eq!(metric(&plugin, "tokens_reported.total"), 23);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0].hits(), 23);
    assert_eq!(reports[0].entries(), user_descriptor("free", "alice"));
    assert_eq!(
        reports[0].call.timeout,
        Duration::from_secs(1),
        "default report timeout"
    );
    plugin.reply_grpc_message(reports[0].call.token, &ok());
    assert_eq!(metric(&plugin, "reports_sent"), 1);
    assert!(tick(&plugin).is_empty(), "sent once");
}

#[test]
fn different_users_get_separate_reports() {
    let plugin = Config::tutorial().start();
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(4, 6),
    );
    serve(&plugin, "bob", CHAT, "application/json", &openai_json(3, 4));
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(2, 3),
    );
    assert_eq!(
        tick_delivered(&plugin),
        vec![
            (user_descriptor("free", "alice"), 15),
            (user_descriptor("free", "bob"), 7),
        ]
    );
    assert_eq!(metric(&plugin, "reports_sent"), 2);
}

#[test]
fn a_failing_report_is_retried_up_to_max_retries_then_dropped() {
    let plugin = Config::tutorial()
        .set(&["reporting", "maxRetries"], json!(2))
        .start();
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(5, 7),
    );
    let fail: [&dyn Fn(u32); 3] = [
        &|token| plugin.fail_grpc(token, grpc_status::UNAVAILABLE, "down"),
        &|token| plugin.timeout_grpc(token),
        &|token| plugin.fail_grpc(token, grpc_status::INTERNAL, "oops"),
    ];
    for (attempt, fail) in fail.iter().enumerate() {
        if attempt > 0 {
            // Retry n waits flushPeriod × 2^(n-1) after the failure: not on the next tick.
            assert!(tick(&plugin).is_empty(), "attempt {attempt} before its time");
            plugin.advance_time(Duration::from_millis(100 << (attempt - 1)));
        }
        let reports = tick(&plugin);
        assert_eq!(reports.len(), 1, "attempt {attempt}: {reports:?}");
        assert_eq!(reports[0].hits(), 12);
        assert_eq!(reports[0].entries(), user_descriptor("free", "alice"));
        fail(reports[0].call.token);
    }
    assert_eq!(metric(&plugin, "reports_sent"), 3);
    assert_eq!(metric(&plugin, "reports_retried"), 2);
    assert_eq!(metric(&plugin, "reports_dropped"), 1);
    assert_eq!(metric(&plugin, "tokens_dropped"), 12);
    assert!(tick(&plugin).is_empty(), "dropped for good");
}

#[test]
fn a_retried_report_that_succeeds_is_not_sent_again() {
    let plugin = Config::tutorial().start();
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(4, 5),
    );
    let first = tick(&plugin);
    plugin.timeout_grpc(first[0].call.token);
    assert_eq!(metric(&plugin, "reports_retried"), 1);
    plugin.advance_time(Duration::from_millis(100));
    assert_eq!(
        tick_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), 9)]
    );
    assert!(tick(&plugin).is_empty());
    assert!(tick(&plugin).is_empty());
    assert_eq!(metric(&plugin, "reports_sent"), 2);
    assert_eq!(metric(&plugin, "reports_dropped"), 0);
}

#[test]
fn a_reconfiguration_keeps_the_tokens_still_owed() {
    let plugin = Config::tutorial().start();
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(4, 4),
    );
    let in_flight = tick(&plugin);
    serve(&plugin, "bob", CHAT, "application/json", &openai_json(2, 3));

    plugin
        .configure(
            Config::tutorial()
                .set(&["reporting", "flushPeriod"], json!("1s"))
                .to_json(),
        )
        .expect("reconfigured");
    assert_eq!(plugin.tick_period(), Some(Duration::from_secs(1)));
    // The report in flight before is still known: its failure is retried.
    plugin.fail_grpc(in_flight[0].call.token, grpc_status::UNAVAILABLE, "down");
    assert_eq!(metric(&plugin, "reports_retried"), 1);
    // Retried one (new) flushPeriod after the failure.
    plugin.advance_time(Duration::from_secs(1));
    let mut delivered = tick_delivered(&plugin);
    delivered.sort();
    assert_eq!(
        delivered,
        vec![
            (user_descriptor("free", "alice"), 8),
            (user_descriptor("free", "bob"), 5),
        ]
    );
}

// Reports sent at once: when the tokens not yet reported reach what the check said remains (the
// most restrictive status), or when the check said nothing (no statuses, as Limitador answers),
// the stream dispatches the reports at its end, as the root context's calls.

/// Alice's chat request checked with `check`, answered with `prompt` + `completion` tokens in one
/// JSON chunk that ends the stream (not finished yet).
fn served_with(
    plugin: &Plugin,
    check: &ratelimit_proto::RateLimitResponse,
    prompt: u64,
    completion: u64,
) -> Stream {
    let stream = post(plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    answer(plugin, &stream, check);
    assert_eq!(stream.request_resumed(), 1);
    respond(
        &stream,
        Some("application/json"),
        &[&openai_json(prompt, completion)],
    );
    stream
}

#[test]
fn a_check_with_little_room_left_sends_the_report_at_once_from_the_root_context() {
    let plugin = Config::tutorial().start();
    let little = reply(
        Code::Ok,
        vec![status(Code::Ok, "free", 50, 5, Duration::from_secs(30))],
    );
    let stream = served_with(&plugin, &little, 3, 4);
    // At the end of the stream (its last body chunk), before the log phase and the tick.
    let reports = pending_reports(&plugin);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = &reports[0];
    assert_eq!(
        report.call.full_method(),
        "kuadrant.service.ratelimit.v1.RateLimitService/Report"
    );
    assert_eq!(
        report.call.context_id,
        plugin.root_context_id(),
        "dispatched as the root's call"
    );
    assert_eq!(report.call.root_context_id, plugin.root_context_id());
    assert_eq!(
        stream.effective_context_switches(),
        [plugin.root_context_id(), stream.id()],
        "the root made effective for the dispatch, then the stream again"
    );
    assert_eq!(
        (report.entries(), report.hits()),
        (user_descriptor("free", "alice"), 7)
    );
    assert_eq!(metric(&plugin, "reports_sent"), 1);
    plugin.reply_grpc_message(report.call.token, &ok());
    stream.finish();
    assert!(tick(&plugin).is_empty(), "sent once");
    assert_eq!(metric(&plugin, "tokens_reported.total"), 7);
}

#[test]
fn a_check_without_statuses_sends_the_report_at_once_as_limitador_answers() {
    let plugin = Config::tutorial().start();
    let stream = served_with(&plugin, &ok(), 2, 9);
    assert_eq!(
        stream.effective_context_switches(),
        [plugin.root_context_id(), stream.id()]
    );
    stream.finish();
    assert_eq!(
        delivered_at_once(&plugin),
        vec![(user_descriptor("free", "alice"), 11)]
    );
}

#[test]
fn reports_wait_for_the_tick_until_the_unreported_tokens_reach_the_remaining_budget() {
    let plugin = Config::tutorial().start();
    let ten_left = reply(
        Code::Ok,
        vec![
            status(Code::Ok, "daily", 1000, 900, Duration::from_secs(3600)),
            status(Code::Ok, "free", 50, 10, Duration::from_secs(30)),
        ],
    );
    // 4, then 4 + 5 = 9 tokens unreported: fewer than the 10 the check said remain.
    for (prompt, completion) in [(1, 3), (2, 3)] {
        let stream = served_with(&plugin, &ten_left, prompt, completion);
        stream.finish();
        assert!(pending_reports(&plugin).is_empty(), "waits for the tick");
        assert!(stream.effective_context_switches().is_empty());
    }
    // 9 + 3 = 12 ≥ 10: everything unreported goes at once, summed.
    let stream = served_with(&plugin, &ten_left, 1, 2);
    stream.finish();
    assert_eq!(
        delivered_at_once(&plugin),
        vec![(user_descriptor("free", "alice"), 12)]
    );
    assert_eq!(metric(&plugin, "reports_sent"), 1);
}

#[test]
fn a_report_sent_at_once_that_fails_is_retried_on_the_tick() {
    let plugin = Config::tutorial().start();
    served_with(&plugin, &ok(), 5, 5).finish();
    let at_once = pending_reports(&plugin);
    assert_eq!(at_once.len(), 1);
    plugin.fail_grpc(at_once[0].call.token, grpc_status::UNAVAILABLE, "down");
    assert_eq!(metric(&plugin, "reports_retried"), 1);
    plugin.advance_time(Duration::from_millis(100));
    assert_eq!(
        tick_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), 10)]
    );
    assert!(tick(&plugin).is_empty());
    assert_eq!(metric(&plugin, "reports_sent"), 2);
    assert_eq!(metric(&plugin, "reports_dropped"), 0);
}

// =============================================================================================
// Aborted streams

#[test]
fn an_abort_after_the_usage_chunk_charges_the_reported_usage() {
    let plugin = Config::tutorial().start();
    let sse = openai_sse(6, 9, "\n");
    let text = String::from_utf8(sse.clone()).unwrap();
    let done = text.find("data: [DONE]").unwrap();
    // Cut after the usage event, and inside it (before its blank line).
    for cut in [done, done - 1] {
        let stream = allowed(&plugin, "alice", CHAT, b"{}");
        response_headers(&stream, Some("text/event-stream"), &[]);
        stream.response_body(&sse[..cut], false);
        stream.finish(); // on_log without end of stream
        assert_eq!(
            tick_delivered(&plugin),
            vec![(user_descriptor("free", "alice"), 15)],
            "cut at {cut}"
        );
    }
    assert_eq!(metric(&plugin, "usage_missing"), 0);
}

/// Alice's request with a body in two chunks, checked OK without statuses, aborted after the first
/// SSE event of the response (no usage); returns the stream and the estimate of the bytes seen.
fn abort_without_usage(plugin: &Plugin) -> (Stream, u32) {
    let stream = post(plugin, Some("alice"), CHAT, &[]);
    let (first, second) = REQUEST_BODY.split_at(20);
    assert_eq!(stream.request_body(first, false), Action::Buffered);
    answer(plugin, &stream, &ok());
    stream.request_body(second, true);
    response_headers(&stream, Some("text/event-stream"), &[]);
    let partial = event(r#"{"choices":[{"index":0,"delta":{"content":"Hello"}}]}"#);
    stream.response_body(&partial, false);
    stream.finish();
    // The answer's text so far: "Hello", one token.
    (stream, estimate(REQUEST_TOKENS, 1))
}

#[test]
fn an_abort_without_usage_charges_the_estimate_reported_at_once_from_on_log() {
    let plugin = Config::tutorial().start();
    let (stream, expected) = abort_without_usage(&plugin);
    assert_eq!(
        stream.effective_context_switches(),
        [plugin.root_context_id(), stream.id()],
        "on_log made the root effective to dispatch the report, then the stream again"
    );
    assert_eq!(
        delivered_at_once(&plugin),
        vec![(user_descriptor("free", "alice"), expected)]
    );
    assert_eq!(metric(&plugin, "usage_missing"), 1);
    assert_eq!(metric(&plugin, "usage_estimated"), 1);
}

#[test]
fn an_abort_without_usage_under_fallback_none_reports_nothing() {
    let plugin = Config::tutorial().fallback("none").start();
    abort_without_usage(&plugin);
    assert!(tick(&plugin).is_empty());
    assert_eq!(metric(&plugin, "usage_missing"), 1);
    assert_eq!(metric(&plugin, "usage_estimated"), 0);
}

#[test]
fn an_abort_without_usage_under_fallback_fixed_charges_fixed_tokens() {
    let plugin = Config::tutorial()
        .fallback("fixed")
        .set(&["usage", "fixedTokens"], json!(100))
        .start();
    abort_without_usage(&plugin);
    assert_eq!(
        delivered_at_once(&plugin),
        vec![(user_descriptor("free", "alice"), 100)]
    );
    assert_eq!(metric(&plugin, "usage_fixed"), 1);
}

// =============================================================================================
// Robustness

#[test]
fn random_response_bodies_never_trap() {
    let plugin = Config::tutorial().start_quiet();
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let kinds: [(Option<&str>, Option<&str>); 5] = [
        (Some("application/json"), None),
        (Some("text/event-stream"), None),
        (None, None),
        (Some("application/json"), Some("gzip")),
        (Some("text/event-stream"), Some("br")),
    ];
    for i in 0..500 {
        let user = format!("user-{}", i % 7);
        let len = rng.below(64);
        let request_body = rng.bytes(len);
        let stream = allowed(&plugin, &user, CHAT, &request_body);
        let (content_type, encoding) = kinds[i % kinds.len()];
        let extra: Vec<(&str, &str)> = encoding
            .map(|e| ("content-encoding", e))
            .into_iter()
            .collect();
        response_headers(&stream, content_type, &extra);
        let body = rng.body();
        let chunks = rng.chunks(&body);
        let aborted = rng.below(4) == 0;
        for (n, chunk) in chunks.iter().enumerate() {
            stream.response_body(chunk, !aborted && n + 1 == chunks.len());
        }
        assert_eq!(stream.response_body_forwarded(), body);
        stream.finish();
        if i % 10 == 9 {
            for r in tick(&plugin) {
                match rng.below(4) {
                    0 => plugin.fail_grpc(r.call.token, grpc_status::UNAVAILABLE, "down"),
                    1 => plugin.timeout_grpc(r.call.token),
                    2 => plugin.reply_grpc(r.call.token, rng.bytes(8)),
                    _ => plugin.reply_grpc_message(r.call.token, &ok()),
                }
            }
        }
    }
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
    // Still working.
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(1, 1),
    );
    let reports = tick_delivered(&plugin);
    assert!(
        reports.contains(&(user_descriptor("free", "alice"), 2)),
        "{reports:?}"
    );
}

/// The host's header API takes `&str`, so invalid UTF-8 reaches the filter through properties
/// (the identity) and bodies here; non-ASCII header values are covered with valid UTF-8.
/// Envoy lets bytes that are not UTF-8 through in header values; the SDK's string getters
/// panic on them, so the filter reads headers as bytes.
#[test]
fn header_values_that_are_not_utf8_never_trap() {
    let plugin = Config::tutorial().start();
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", "alice"), ("groups", "free")]);
    stream.request_headers_bytes(
        &[
            (":method", b"POST"),
            (":path", b"/v1/chat/completions\xff"),
            ("content-type", b"application/json\xfe"),
            ("accept-encoding", b"gzip, \xff\xfe"),
        ],
        false,
    );
    let _ = plugin.pending_grpc_calls();
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", "alice"), ("groups", "free")]);
    stream.request_headers(&[(":method", "POST"), (":path", CHAT)], true);
    answer(&plugin, &stream, &ok());
    stream.response_headers_bytes(
        &[
            (":status", b"200"),
            ("content-type", b"application/json\xff"),
            ("content-encoding", b"\xc3"),
        ],
        false,
    );
    stream.response_body(openai_json(2, 3), true);
    stream.finish();
    assert!(plugin.trap().is_none());
}

#[test]
fn dynamic_metadata_that_does_not_decode_refuses_without_trapping() {
    // Not an envoy.config.core.v3.Metadata message: no identity can be read, and the limit
    // (onError deny by default) refuses the request before any call.
    let plugin = Config::tutorial().start();
    let stream = plugin.http_stream();
    stream.set_property(&["metadata"], b"\xffal\xc3");
    stream.request_headers(&[(":method", "POST"), (":path", CHAT)], true);
    assert!(plugin.pending_grpc_calls().is_empty());
    let reply = stream.local_reply().expect("a local reply");
    assert_eq!(reply.status, 403);
    assert_eq!(
        plugin.metric("token_ratelimit.requests_refused_on_error.free"),
        Some(1)
    );
    stream.finish();
    assert!(plugin.trap().is_none());
}

#[test]
fn invalid_utf8_never_traps() {
    let plugin = Config::tutorial().start();
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", "al\u{fffd}")]);
    stream.request_headers(
        &[
            (":method", "POST"),
            (":path", CHAT),
            ("accept-encoding", "gzip;q=\u{e9}, \u{fffd}"),
            ("x-note", "caf\u{e9} \u{0} \u{1f600}"),
        ],
        false,
    );
    assert_eq!(
        entries_of(&check_of(&stream)),
        pairs(&[("limit.free", "1"), ("auth.identity.userid", "al\u{fffd}")])
    );
    stream.request_body(b"{\"content\":\"\xff\xfe\"}", true);
    answer(&plugin, &stream, &ok());
    response_headers(&stream, Some("text/event-stream; charset=\u{e9}"), &[]);
    let sse = [
        b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n".as_slice(),
        &openai_sse(3, 4, "\n"),
    ]
    .concat();
    stream.response_body(&sse, true);
    stream.finish();
    assert_eq!(
        delivered_at_once(&plugin),
        vec![(user_descriptor("free", "al\u{fffd}"), 7)]
    );

    // A JSON document with invalid UTF-8 does not parse: the estimate applies.
    let json = b"{\"choices\":[{\"text\":\"\xff\"}],\"usage\":{\"total_tokens\":5}}";
    serve(&plugin, "bob", CHAT, "application/json", json);
    assert_eq!(
        tick_delivered(&plugin),
        // The `{}` request (no text); the answer's one character of text.
        vec![(user_descriptor("free", "bob"), estimate(0, 1))]
    );
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
}

#[test]
fn huge_headers_never_trap() {
    let big = "k".repeat(1 << 20);
    let plugin = Config::tutorial()
        .set(
            &["limits", "free", "counters"],
            json!([{"expression": "request.headers[\"x-api-key\"]"}]),
        )
        .start();
    let stream = post(
        &plugin,
        None,
        CHAT,
        &[
            ("x-api-key", &big),
            ("user-agent", &big),
            ("accept-encoding", &big),
        ],
    );
    let check = entries_of(&check_of(&stream));
    assert_eq!(check[1].0, "request.headers[\"x-api-key\"]");
    assert_eq!(check[1].1.len(), 1 << 20);
    assert_eq!(
        stream.request_header("accept-encoding"),
        None,
        "nothing readable"
    );
    answer(&plugin, &stream, &ok());
    response_headers(&stream, Some("application/json"), &[("x-big", &big)]);
    stream.response_body(openai_json(2, 3), true);
    stream.finish();
    let reports = delivered_at_once(&plugin);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].1, 5);
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
}

#[test]
fn a_response_without_content_type_is_charged_the_estimate() {
    let plugin = Config::tutorial().start();
    let body = openai_json(10, 10);
    let stream = allowed(&plugin, "alice", CHAT, REQUEST_BODY);
    respond(&stream, None, &[&body[..9], &body[9..]]);
    stream.finish();
    assert_eq!(
        tick_delivered(&plugin),
        vec![(
            user_descriptor("free", "alice"),
            // "Hello!": 6 characters, 2 tokens.
            estimate(REQUEST_TOKENS, 2)
        )],
        "no usage is read from a body of no declared type; its text is counted"
    );
    assert_eq!(metric(&plugin, "usage_missing"), 1);
}

/// The host answers only pending calls; what it can deliver for a token the module does not know
/// as such are stream callbacks (metadata) for the unary check call: the module ignores them.
#[test]
fn grpc_callbacks_for_an_unknown_token_are_ignored() {
    let plugin = Config::tutorial().start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let token = check_of(&stream).token;
    plugin.grpc_stream_initial_metadata(token, &[("x-unknown", "1")]);
    plugin.grpc_stream_trailing_metadata(token, &[("grpc-status", "0")]);
    assert_eq!(plugin.grpc_call(token).state, CallState::Pending);
    assert_eq!(stream.request_resumed(), 0);
    assert_eq!(stream.local_reply(), None);
    answer(&plugin, &stream, &ok());
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
}

#[test]
fn ticks_with_nothing_to_do_send_nothing() {
    let plugin = Config::tutorial().start();
    for _ in 0..3 {
        assert!(tick(&plugin).is_empty());
    }
    // A request no limit applies to, and one refused.
    let other = request(&plugin, Some("alice"), "GET", "/v1/models", &[]);
    respond(&other, Some("application/json"), &[&openai_json(5, 5)]);
    other.finish();
    let refused = post(&plugin, Some("alice"), CHAT, &[]);
    answer(&plugin, &refused, &reply(Code::OverLimit, vec![]));
    refused.finish();
    assert!(tick(&plugin).is_empty());
    assert!(tick(&plugin).is_empty());
    assert_eq!(plugin.grpc_calls().len(), 1, "only the check");
    assert_eq!(metric(&plugin, "reports_sent"), 0);
}

/// The client goes away while the check is in flight: Envoy deletes the stream, but not the
/// check's call, which belongs to the root context; its reply comes later, to the root context,
/// as `answer` says. Returns the plugin after the reply.
fn check_answered_after_the_stream_was_deleted(
    config: Config,
    answer: impl FnOnce(&Plugin, u32),
) -> Plugin {
    let plugin = config.start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    let check = check_of(&stream);
    assert_eq!(check.context_id, stream.id());
    assert_eq!(check.root_context_id, plugin.root_context_id());
    stream.finish();
    assert_eq!(
        plugin.grpc_call(check.token).state,
        CallState::Pending,
        "the stream's end cancels nothing"
    );
    answer(&plugin, check.token);
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
    assert!(
        plugin.effective_context_switches().is_empty(),
        "the module routes the reply nowhere: its stream is gone"
    );
    assert_eq!(stream.request_resumed(), 0);
    assert_eq!(stream.local_reply(), None);
    assert!(
        plugin.pending_grpc_calls().is_empty(),
        "{:?}",
        plugin.pending_grpc_calls()
    );
    plugin.tick();
    assert_eq!(metric(&plugin, "requests_allowed"), 0);
    assert_eq!(metric(&plugin, "requests_limited"), 0);
    assert_eq!(metric(&plugin, "service_errors"), 0);
    assert_eq!(metric(&plugin, "failure_mode_denied"), 0);
    plugin
}

#[test]
fn a_check_reply_after_the_stream_was_deleted_changes_nothing_and_costs_nothing() {
    let plugin = check_answered_after_the_stream_was_deleted(Config::tutorial(), |p, token| {
        p.reply_grpc_message(token, &ok())
    });
    assert!(tick(&plugin).is_empty(), "the upstream never saw it");
    // The next request works.
    serve(
        &plugin,
        "alice",
        CHAT,
        "application/json",
        &openai_json(1, 2),
    );
    assert_eq!(
        tick_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), 3)]
    );
}

#[test]
fn an_over_limit_or_failed_check_reply_after_the_stream_was_deleted_changes_nothing() {
    let over = reply(
        Code::OverLimit,
        vec![status(
            Code::OverLimit,
            "free",
            50,
            0,
            Duration::from_secs(9),
        )],
    );
    let plugin = check_answered_after_the_stream_was_deleted(Config::tutorial(), |p, token| {
        p.reply_grpc_message(token, &over)
    });
    assert!(tick(&plugin).is_empty());
    let plugin = check_answered_after_the_stream_was_deleted(Config::tutorial(), |p, token| {
        p.fail_grpc(token, grpc_status::UNAVAILABLE, "down")
    });
    assert!(tick(&plugin).is_empty());
    let plugin = check_answered_after_the_stream_was_deleted(
        Config::tutorial().failure_mode("allow"),
        |p, token| p.timeout_grpc(token),
    );
    assert!(tick(&plugin).is_empty());
    assert_eq!(metric(&plugin, "failure_mode_allowed"), 0);
}

#[test]
fn a_stream_deleted_before_its_check_reply_is_not_charged_the_fixed_fallback() {
    let plugin = check_answered_after_the_stream_was_deleted(
        Config::tutorial()
            .fallback("fixed")
            .set(&["usage", "fixedTokens"], json!(100)),
        |p, token| p.reply_grpc_message(token, &ok()),
    );
    assert!(tick(&plugin).is_empty(), "the upstream never saw it");
    assert_eq!(metric(&plugin, "usage_fixed"), 0);
}

/// An upstream (or anything that can shape its body) reporting an absurd figure must not take
/// the VM down: the tick splits the sum into `u32` reports, 2^32 of them for `u64::MAX`.
#[test]
fn a_huge_usage_figure_does_not_flood_the_service() {
    let plugin = Config::tutorial().start();
    let body = format!(r#"{{"usage":{{"total_tokens":{}}}}}"#, u64::MAX);
    serve(&plugin, "alice", CHAT, "application/json", body.as_bytes());
    let reports = plugin.try_tick().map(|_| pending_reports(&plugin));
    let reports = reports.unwrap_or_else(|trap| panic!("{trap}"));
    assert!(!reports.is_empty(), "the spend is reported");
    assert!(reports.len() <= 16, "{} reports in one tick", reports.len());
    assert_eq!(metric(&plugin, "usage_clamped"), 1);
    // The VM lives on.
    serve(&plugin, "bob", CHAT, "application/json", &openai_json(1, 1));
}

#[test]
fn the_usage_record_of_a_request_is_set_as_the_stream_property_token_ratelimit() {
    let plugin = Config::tutorial().start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    answer(&plugin, &stream, &ok());
    response_headers(&stream, Some("application/json"), &[]);
    stream.response_body(openai_json(20, 22), true);
    let bytes = stream
        .module_property(&["token_ratelimit"])
        .expect("proxy_set_property(token_ratelimit)");
    let record: Value = serde_json::from_slice(&bytes).expect("a JSON record");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["usage"]["source"], "reported", "{record}");
    assert_eq!(record["usage"]["total"], 42, "{record}");
    assert_eq!(record["limits"][0]["name"], "free", "{record}");
    stream.finish();
}
