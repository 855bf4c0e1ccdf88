//! The official `openai` Python SDK against the stack (installed from PyPI into `.venv` on
//! first use, see [`e2e::python_with_openai`]): a streamed chat completion read with the naive
//! loop `chunk.choices[0].delta.content` runs through, although the filter added
//! `stream_options.include_usage` to the request (it withholds the usage chunk the client did not
//! ask for, and charges the tokens it reports); a client that asks for usage gets its usage
//! chunk; a chat completion that is not streamed works too. Each time, the tokens charged equal
//! the tokens the simulator served.
//!
//! On a 429 through the filter the SDK raises `openai.RateLimitError` (retries off); with
//! retries on, it waits the `retry-after-ms` the 429 advertises, not less, and then succeeds:
//! against ratelimit-service's statuses (the time left until the window resets) and behind a
//! Limitador-shaped service (`--no-statuses --reservations-unimplemented`: the window's
//! length). gold's window is cut to [`SHORT_WINDOW_SECS`] so that the test waits seconds, well
//! within the delays the SDK honours (60 s in openai-python 1.x, 120 s in 3.x).

use e2e::{run_python, Options, Stack};
use serde_json::Value;

const GOLD: &str = "iamagolduser";

fn base_url(stack: &Stack) -> String {
    format!("http://127.0.0.1:{}/v1", stack.ports.listener)
}

/// Runs `scenario` of `openai_sdk.py`; returns what the SDK saw, after checking that the
/// tokens charged for it equal the tokens served.
fn sdk(stack: &Stack, scenario: &str) -> serde_json::Value {
    let served_before = stack.served_tokens(GOLD);
    let charged_before = stack.reported_tokens();
    let seen = run_python("openai_sdk.py", &[&base_url(stack), GOLD, scenario]);
    let served = stack.served_tokens(GOLD) - served_before;
    assert!(served > 0, "{scenario}: the simulator served tokens");
    let charged = stack.await_reported(charged_before + served) - charged_before;
    assert_eq!(
        charged, served,
        "{scenario}: charged what was served ({seen})"
    );
    seen
}

#[test]
fn the_naive_stream_loop_runs_and_the_injected_usage_is_charged() {
    let stack = Stack::start(Options::default());
    let seen = sdk(&stack, "naive");
    assert!(seen["chunks"].as_u64().unwrap_or(0) > 0, "{seen}");
    assert!(!seen["text"].as_str().unwrap_or("").is_empty(), "{seen}");
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.usage_requested"),
        1
    );
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.usage_missing"),
        0
    );
}

#[test]
fn a_client_that_asks_for_usage_gets_its_usage_chunk() {
    let stack = Stack::start(Options::default());
    let seen = sdk(&stack, "include_usage");
    assert_eq!(seen["usage_chunks"], 1, "{seen}");
    let usage = &seen["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap_or(0)
                + usage["completion_tokens"].as_u64().unwrap_or(0)
        ),
        "{seen}"
    );
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.usage_requested"),
        0
    );
}

#[test]
fn a_chat_completion_not_streamed_works() {
    let stack = Stack::start(Options::default());
    let seen = sdk(&stack, "plain");
    assert!(
        seen["usage"]["total_tokens"].as_u64().unwrap_or(0) > 0,
        "{seen}"
    );
}

/// gold's window in the SDK's retry tests, in seconds.
const SHORT_WINDOW_SECS: u64 = 6;

/// gold's budget cut to 30 tokens per [`SHORT_WINDOW_SECS`]: one SDK chat completion (about
/// 17 tokens) fits, two do not.
fn short_gold_window() -> (String, String) {
    (
        "- {limit: 200, window: 1m}".into(),
        format!("- {{limit: 30, window: {SHORT_WINDOW_SECS}s}}"),
    )
}

/// Checks what the SDK's `openai.RateLimitError` carried (the `refusal` of
/// `openai_sdk.py`): a 429 of code `rate_limit_exceeded` whose `retry-after` is its
/// `retry-after-ms` in seconds rounded up. Returns the milliseconds.
fn assert_rate_limit_error(refusal: &Value) -> u64 {
    assert_eq!(refusal["status"], 429, "{refusal}");
    assert_eq!(refusal["code"], "rate_limit_exceeded", "{refusal}");
    let field = |k: &str| -> u64 {
        refusal[k]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k}: {refusal}"))
    };
    let (secs, ms) = (field("retry_after"), field("retry_after_ms"));
    assert_eq!(secs, ms.div_ceil(1000).max(1), "{refusal}");
    assert!((1..=SHORT_WINDOW_SECS * 1000).contains(&ms), "{refusal}");
    ms
}

/// Checks the `retried` scenario: a 429, then, no sooner than its `retry-after-ms` after its
/// response (and within a few seconds of it), the attempt that succeeded. Returns the
/// milliseconds the 429 advertised.
fn assert_retried_after_the_advertised_delay(seen: &Value) -> u64 {
    assert_rate_limit_error(&seen["refused"]);
    let retried = &seen["retried"];
    let attempts = retried["attempts"].as_array().expect("attempts");
    let statuses: Vec<_> = attempts.iter().map(|a| a["status"].clone()).collect();
    assert_eq!(statuses, vec![Value::from(429), Value::from(200)], "{seen}");
    let advertised: f64 = attempts[0]["retry_after_ms"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after-ms: {seen}"));
    let gap = retried["gaps_ms"][0].as_f64().expect("a gap");
    eprintln!("advertised {advertised} ms, the SDK waited {gap:.1} ms");
    assert!(gap >= advertised - 1.0, "retried sooner: {seen}");
    assert!(gap < advertised + 3000.0, "waited its own backoff: {seen}");
    assert!(!retried["text"].as_str().unwrap_or("").is_empty(), "{seen}");
    advertised as u64
}

#[test]
fn on_a_429_the_sdk_raises_rate_limit_error_and_retries_after_the_time_to_reset() {
    let stack = Stack::start(Options {
        edits: vec![short_gold_window()],
        ..Options::default()
    });
    let seen = run_python("openai_sdk.py", &[&base_url(&stack), GOLD, "rate_limited"]);
    assert_rate_limit_error(&seen);
    assert_eq!(seen["headers"]["x-ratelimit-limit"], "30", "{seen}");
    // Reserve refused a hold of about 17 tokens: what is left is less than that.
    let left: u64 = seen["headers"]["x-ratelimit-remaining"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{seen}"));
    assert!(left < 17, "{seen}");
    let seen = run_python("openai_sdk.py", &[&base_url(&stack), GOLD, "retried"]);
    assert_retried_after_the_advertised_delay(&seen);
}

#[test]
fn behind_limitador_the_sdk_retries_after_the_window_length() {
    let stack = Stack::start(Options {
        edits: vec![short_gold_window()],
        service_args: vec![
            "--no-statuses".into(),
            "--reservations-unimplemented".into(),
        ],
        ..Options::default()
    });
    let seen = run_python("openai_sdk.py", &[&base_url(&stack), GOLD, "rate_limited"]);
    assert_eq!(assert_rate_limit_error(&seen), SHORT_WINDOW_SECS * 1000);
    assert_eq!(seen["headers"]["x-ratelimit-limit"], "30", "{seen}");
    assert_eq!(seen["headers"]["x-ratelimit-reset"], "6", "{seen}");
    let seen = run_python("openai_sdk.py", &[&base_url(&stack), GOLD, "retried"]);
    assert_eq!(
        assert_retried_after_the_advertised_delay(&seen),
        SHORT_WINDOW_SECS * 1000
    );
}
