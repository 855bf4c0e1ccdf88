//! Usage records in Envoy's access log (issue 16): the JSON access log of `envoy/envoy.yaml`
//! carries, per limited request, the filter's record (`token_ratelimit`): the tokens charged
//! and how they were known, how the request ended, the model, the limits and what each said,
//! and what reservation mode held. Read from a real Envoy for a normal request, a stream, a
//! client abort, an upstream reset and a 429.

use std::io::Read;

use e2e::{Options, Stack};
use serde_json::{json, Value};

const GOLD: &str = "iamagolduser";
const FREE: &str = "iamafreeuser";

/// A chat request of model `sim-large` (the simulator answers with the model asked for).
fn chat_body(words: usize, max_tokens: u64, stream: bool) -> Value {
    let mut body = e2e::chat_body(words, max_tokens, stream);
    body["model"] = json!("sim-large");
    body
}

fn gold_unlimited() -> (String, String) {
    (
        "- {limit: 200, window: 1m}".into(),
        "- {limit: 1000000000, window: 1m}".into(),
    )
}

#[test]
fn a_completed_request_and_a_stream_are_recorded_with_the_usage_the_upstream_reported() {
    let stack = Stack::start(Options::default());
    let body = chat_body(3, 20, false);
    let r = stack.post("/v1/chat/completions", Some(GOLD), &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let usage = &r.json()["usage"];
    let (entry, record) = stack.await_record(1);
    assert_eq!(entry["response_code"], 200, "{entry}");
    assert_eq!(entry["user"], "user-2", "{entry}");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["admission"], "reserved", "{record}");
    assert_eq!(record["model"], "sim-large", "{record}");
    assert_eq!(record["usage"]["source"], "reported", "{record}");
    for (ours, theirs) in [
        ("prompt", "prompt_tokens"),
        ("completion", "completion_tokens"),
        ("total", "total_tokens"),
    ] {
        assert_eq!(record["usage"][ours], usage[theirs], "{ours}: {record}");
    }
    // gold spends total tokens: charged the total the upstream reported.
    assert_eq!(
        record["limits"],
        json!([{"name": "gold", "tokens": "total", "enforcement": "enforce", "outcome": "allowed",
                "charged": usage["total_tokens"]}])
    );
    assert_eq!(
        record["counters"],
        json!({"auth.identity.userid": "user-2"})
    );
    // Reservation mode held the prompt estimate plus the declared maximum.
    assert!(
        record["reserved"]["total"].as_u64().unwrap_or(0) >= 20,
        "{record}"
    );

    let resp = stack.stream_request(GOLD, &chat_body(3, 20, true), &[]);
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().expect("stream");
    let usage_line = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk: {text}"));
    let (entry, record) = stack.await_record(2);
    eprintln!("access log of a stream: {entry}");
    assert_eq!(record["status"], "completed", "{record}");
    assert_eq!(record["usage"]["source"], "reported", "{record}");
    assert_eq!(
        record["usage"]["total"], usage_line["usage"]["total_tokens"],
        "{record}"
    );
    assert_eq!(
        record["usage"]["total"].as_u64(),
        Some(stack.served_tokens(GOLD) - r.usage_total())
    );
}

#[test]
fn a_client_abort_and_an_upstream_reset_are_recorded_as_such_and_charged_the_estimate() {
    let stack = Stack::start(Options {
        edits: vec![gold_unlimited()],
        ..Options::default()
    });
    // A slow stream the client hangs up on after a few words.
    let resp = stack.stream_request(
        GOLD,
        &chat_body(3, 100, true),
        &[("x-simulator-token-delay-ms", "50")],
    );
    assert_eq!(resp.status().as_u16(), 200);
    e2e::read_words_then_hang_up(resp, 5);
    let (entry, record) = stack.await_record(1);
    eprintln!("access log of a client abort: {entry}");
    assert_eq!(record["status"], "client_aborted", "{entry}");
    assert_eq!(record["usage"]["source"], "estimated", "{record}");
    let charged = record["usage"]["total"].as_u64().unwrap_or(0);
    assert!(charged > 3, "{record}");
    assert_eq!(
        stack.await_reported(charged),
        charged,
        "the record shows the charge"
    );

    // The upstream drops the connection after 10 words.
    let resp = stack.stream_request(
        GOLD,
        &chat_body(3, 50, true),
        &[("x-simulator-abort-after", "10")],
    );
    assert_eq!(resp.status().as_u16(), 200);
    let mut rest = Vec::new();
    let mut resp = resp;
    assert!(
        resp.read_to_end(&mut rest).is_err(),
        "the client sees the reset"
    );
    let (entry, record) = stack.await_record(2);
    eprintln!("access log of an upstream reset: {entry}");
    assert_eq!(record["status"], "upstream_reset", "{entry}");
    assert_eq!(record["usage"]["source"], "estimated", "{record}");
}

#[test]
fn a_refused_request_is_recorded_as_limited_by_the_limit_that_refused_it() {
    let stack = Stack::start(Options::default());
    // free: 50 tokens a minute. Spend them, then the next request is refused.
    let mut n = 0;
    loop {
        let r = stack.chat(FREE, 5, 20);
        n += 1;
        if r.status == 429 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(n < 10, "never refused");
    }
    let (entry, record) = stack.await_record(n);
    eprintln!("access log of a 429: {entry}");
    assert_eq!(entry["response_code"], 429, "{entry}");
    assert_eq!(record["status"], "limited", "{record}");
    assert_eq!(record["admission"], "refused", "{record}");
    assert_eq!(record["usage"]["source"], "free", "{record}");
    assert_eq!(record["limits"][0]["name"], "free", "{record}");
    assert_eq!(record["limits"][0]["outcome"], "limited", "{record}");
    assert_eq!(
        record["limits"][0]["charged"], 0,
        "refused, charged nothing: {record}"
    );
    assert!(record.get("reserved").is_none(), "nothing held: {record}");

    // A request no limit applies to (an unknown API key, refused by the auth step) has none.
    let r = stack.chat("not-a-key", 1, 1);
    assert_eq!(r.status, 401);
    let log = stack.await_access_log(n + 1);
    let entry = &log[n];
    assert_eq!(entry["response_code"], 401, "{entry}");
    assert!(entry["token_ratelimit"].is_null(), "{entry}");
}

#[test]
fn cached_cache_write_and_reasoning_tokens_the_provider_reports_are_in_the_record() {
    let stack = Stack::start(Options::default());
    // Anthropic Messages: cache reads and writes, reported by the upstream.
    let body = json!({
        "model": "claude-sim",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hello there"}],
    });
    let r = stack.post_with(
        "/v1/messages",
        Some(GOLD),
        &body,
        &[
            ("x-simulator-cache-read-tokens", "7"),
            ("x-simulator-cache-creation-tokens", "3"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, record) = stack.await_record(1);
    let usage = &record["usage"];
    assert_eq!(record["model"], "claude-sim", "{record}");
    assert_eq!(
        (&usage["cached"], &usage["cache_write"]),
        (&json!(7), &json!(3)),
        "{record}"
    );
    // The prompt is input plus both cache figures, as Anthropic bills it.
    let input = r.json()["usage"]["input_tokens"].as_u64().unwrap_or(0);
    assert_eq!(usage["prompt"].as_u64(), Some(input + 7 + 3), "{record}");
    // gold (tokens: total) is charged that prompt and the output.
    let output = r.json()["usage"]["output_tokens"].as_u64().unwrap_or(0);
    assert_eq!(
        record["limits"][0]["charged"].as_u64(),
        Some(input + 7 + 3 + output),
        "{record}"
    );

    // An OpenAI stream whose usage chunk has the details objects.
    let details = json!({
        "prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21,
        "prompt_tokens_details": {"cached_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 4}
    })
    .to_string();
    let resp = stack.stream_request(
        GOLD,
        &chat_body(3, 9, true),
        &[("x-simulator-usage-override", &details)],
    );
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().expect("stream");
    let (_, record) = stack.await_record(2);
    assert_eq!(
        record["usage"],
        json!({"source": "reported", "prompt": 12, "completion": 9, "total": 21, "cached": 8, "reasoning": 4}),
        "{record}"
    );
}
