//! What a request that was not served costs, in a real Envoy ("nothing served, nothing
//! charged"): an upstream `4xx` without usage, an upload the client abandons, Envoy's own
//! reply (a `503` with no upstream listening) and a body Envoy stops reading (its buffer limit
//! below `requestBody.maxBytes`: refused after the body wait) cost nothing, and the next
//! request of the free user (50 tokens per minute) is served; a client that hangs up after its
//! request reached the upstream is charged its prompt estimate plus the `max_tokens` it
//! declared (reservation mode, where the filter reads the body), or the byte estimate
//! (checkReport, where it does not). Both admission modes where they differ.

use std::time::Duration;

use e2e::{wait_until, Options, Stack};
use serde_json::{json, Value};

const FREE: &str = "iamafreeuser";
const GOLD: &str = "iamagolduser";

fn stat(stack: &Stack, name: &str) -> u64 {
    stack.envoy_stat(&format!("wasmcustom.token_ratelimit.{name}"))
}

fn stack(mode: Option<&'static str>, edits: Vec<(String, String)>) -> Stack {
    Stack::start(Options {
        mode,
        edits,
        ..Options::default()
    })
}

/// A chat request of `words` prompt words: its estimate (60 words: 60 tokens, more read as bytes) is over the free user's 50
/// tokens once `words` is 60 or more.
fn chat_body(words: usize, max_tokens: u64) -> Value {
    json!({
        "model": "sim",
        "messages": [{"role": "user", "content": vec!["word"; words].join(" ")}],
        "max_tokens": max_tokens,
    })
}

/// `usage.errorResponses` inserted in the plugin configuration.
fn error_responses(client: &str, server: &str) -> (String, String) {
    (
        "                    limits:\n".into(),
        format!(
            "                    usage:\n                      errorResponses:\n                        clientErrors: {client}\n                        serverErrors: {server}\n                    limits:\n"
        ),
    )
}

/// Waits until the filter counted one more request charged nothing (`usage_free` reaches
/// `free`), then checks that the service was charged nothing and holds nothing.
fn assert_costs_nothing(stack: &Stack, free: u64, what: &str) {
    assert!(
        wait_until(what, Duration::from_secs(10), || stat(stack, "usage_free")
            >= free),
        "{what}: usage_free {} (want {free}):\n{}",
        stat(stack, "usage_free"),
        stack.envoy.output()
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(stack.reported_tokens(), 0, "{what}: charged");
    assert!(
        stack.await_no_holds(Duration::from_secs(5)),
        "{what}: a hold was left"
    );
    assert_eq!(
        stack.counter_of("user-1").map_or(0, |c| c.value),
        0,
        "{what}"
    );
}

/// The free user's next request is served (it would get 429 had the failure been charged).
fn assert_free_user_served(stack: &Stack, what: &str) {
    let r = stack.chat(FREE, 3, 5);
    assert_eq!(r.status, 200, "{what}: the next request: {}", r.body);
}

// ---------------------------------------------------------------------------------------------
// An upstream 400 without usage (llama.cpp refusing a prompt over its context)

#[test]
fn an_upstream_400_without_usage_costs_nothing_in_reservation_mode() {
    an_upstream_400_without_usage_costs_nothing(None);
}

#[test]
fn an_upstream_400_without_usage_costs_nothing_in_check_report_mode() {
    an_upstream_400_without_usage_costs_nothing(Some("checkReport"));
}

fn an_upstream_400_without_usage_costs_nothing(mode: Option<&'static str>) {
    let stack = stack(mode, Vec::new());
    let body = chat_body(80, 5);
    for _ in 0..3 {
        let r = stack.post_with(
            "/v1/chat/completions",
            Some(FREE),
            &body,
            &[("x-simulator-status", "400")],
        );
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(!r.body.contains("usage"), "{}", r.body);
        // The hold is released after the client has its answer (the filter never holds a
        // response for the service): the next request may only count on it once released.
        assert!(
            stack.await_no_holds(Duration::from_secs(5)),
            "an upstream 400 left its hold"
        );
    }
    assert_costs_nothing(&stack, 3, "three upstream 400s");
    assert_eq!(stat(&stack, "usage_estimated"), 0);
    assert_free_user_served(&stack, "after three 400s");
}

#[test]
fn an_upstream_500_without_usage_is_charged_the_estimate_by_default_and_nothing_when_free() {
    // Default serverErrors: fallback (the upstream may have generated before failing).
    let stack_default = stack(Some("checkReport"), Vec::new());
    let body = chat_body(3, 5);
    let r = stack_default.post_with(
        "/v1/chat/completions",
        Some(GOLD),
        &body,
        &[("x-simulator-status", "500")],
    );
    assert_eq!(r.status, 500);
    // checkReport does not read the body: its bytes at 5 per token; the error answer holds no
    // generated text.
    let want = e2e::unread_prompt_estimate(body.to_string().as_bytes())
        + e2e::answer_estimate("/v1/chat/completions", &r);
    assert_eq!(e2e::answer_estimate("/v1/chat/completions", &r), 0);
    assert_eq!(stack_default.await_reported(want), want);
    drop(stack_default);

    // serverErrors: free.
    let stack = stack(None, vec![error_responses("free", "free")]);
    let r = stack.post_with(
        "/v1/chat/completions",
        Some(FREE),
        &chat_body(80, 5),
        &[("x-simulator-status", "500")],
    );
    assert_eq!(r.status, 500);
    assert_costs_nothing(&stack, 1, "an upstream 500 with serverErrors: free");
    assert_free_user_served(&stack, "after a free 500");
}

// ---------------------------------------------------------------------------------------------
// Requests that never reached the upstream

#[test]
fn an_abandoned_upload_costs_nothing_in_reservation_mode() {
    an_abandoned_upload_costs_nothing(None);
}

#[test]
fn an_abandoned_upload_costs_nothing_in_check_report_mode() {
    an_abandoned_upload_costs_nothing(Some("checkReport"));
}

fn an_abandoned_upload_costs_nothing(mode: Option<&'static str>) {
    let stack = stack(mode, Vec::new());
    let body = chat_body(2000, 5);
    let bytes = body.to_string().into_bytes();
    let mut conn = stack.connect();
    conn.send_post_head("/v1/chat/completions", FREE, &body, &[])
        .expect("head");
    conn.send_body(&bytes[..bytes.len() / 2]).expect("half");
    // Let the check (checkReport) or the held body (reservation) go by, then hang up.
    std::thread::sleep(Duration::from_millis(500));
    drop(conn);
    if mode == Some("checkReport") {
        // Checked at its headers: the filter saw it start and end without its body.
        assert_costs_nothing(&stack, 1, "an abandoned upload");
    } else {
        // Held for its body, never reserved: nothing to count, nothing charged.
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(stack.reported_tokens(), 0);
        assert!(stack.await_no_holds(Duration::from_secs(5)));
    }
    assert_eq!(stack.upstream_requests(), 0, "nothing reached the upstream");
    assert_free_user_served(&stack, "after an abandoned upload");
}

/// Envoy's buffer limit made smaller than `requestBody.maxBytes` (a misconfiguration the
/// shipped configuration avoids): Envoy stops reading a body the filter reads for its bound
/// (reservation mode) once it keeps 4 KiB of it.
fn small_buffer() -> (String, String) {
    (
        "per_connection_buffer_limit_bytes: 8388608\n".into(),
        "per_connection_buffer_limit_bytes: 4096\n".into(),
    )
}

#[test]
fn a_body_stalled_by_a_buffer_below_max_bytes_is_refused_in_time_and_costs_nothing() {
    // clientErrors: fallback: an upstream 4xx would be charged; this never reached it.
    let stack = Stack::start(Options {
        edits: vec![small_buffer(), error_responses("fallback", "fallback")],
        ..Options::default()
    });
    let started = std::time::Instant::now();
    let r = stack.post("/v1/chat/completions", Some(FREE), &chat_body(5000, 5));
    // Released by the root context after its body wait (5 s): failure mode deny.
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("rate_limit_body_unavailable"), "{}", r.body);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stat(&stack, "request_body_timeouts"), 1);
    // Nothing was charged, no hold is left.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(stack.reported_tokens(), 0);
    assert!(stack.await_no_holds(Duration::from_secs(5)));
    assert_eq!(stack.upstream_requests(), 0);
    // One stalled body changes nothing for later requests.
    assert_free_user_served(&stack, "after a stalled body");
}

#[test]
fn envoys_own_503_without_an_upstream_costs_nothing_in_both_modes() {
    for mode in [None, Some("checkReport")] {
        // serverErrors: fallback (the default): an upstream 5xx would be charged.
        let mut stack = stack(mode, Vec::new());
        stack.simulator.kill();
        let r = stack.post("/v1/chat/completions", Some(FREE), &chat_body(80, 5));
        assert_eq!(r.status, 503, "{mode:?}: {}", r.body);
        assert_costs_nothing(&stack, 1, "Envoy's 503 with no upstream listening");
        // No upstream to serve the next request: the check must still admit it (a 503 again,
        // not a 429).
        let r = stack.post("/v1/chat/completions", Some(FREE), &chat_body(80, 5));
        assert_eq!(r.status, 503, "{mode:?}: {}", r.body);
    }
}

// ---------------------------------------------------------------------------------------------
// A client that hangs up after its request reached the upstream

#[test]
fn a_hang_up_after_the_upstream_got_the_request_is_charged_prompt_estimate_plus_max_tokens() {
    let stack = stack(None, Vec::new());
    // "word word word word": 4 words of up to 5 characters, 4 tokens; plus the declared 40.
    let body = chat_body(4, 40);
    hang_up(&stack, &body);
    assert_eq!(stack.await_reported(44), 44, "prompt estimate + max_tokens");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(stack.committed_tokens(), 44, "committed once, as the hold");
    assert_eq!(stat(&stack, "usage_declared"), 1);
    assert!(stack.await_no_holds(Duration::from_secs(5)));
}

#[test]
fn a_hang_up_in_check_report_mode_without_the_body_read_is_charged_the_byte_estimate() {
    let stack = stack(Some("checkReport"), Vec::new());
    let body = chat_body(4, 40);
    hang_up(&stack, &body);
    // The stream layer passes the number of the body's bytes, not their content: 5 per token.
    let want = e2e::unread_prompt_estimate(body.to_string().as_bytes());
    assert_eq!(stack.await_reported(want), want);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(stack.report_hits(), want);
    assert_eq!(stat(&stack, "usage_estimated"), 1);
}

#[test]
fn envoys_timeout_after_the_upstream_got_the_request_is_charged_like_a_hang_up() {
    // Envoy's own 504 after the upstream connection (`upstream.local_address` is set): the
    // request reached the model, which may have been generating until the timeout.
    let stack = stack(None, vec![("timeout: 300s".into(), "timeout: 1s".into())]);
    let r = stack.post_with(
        "/v1/chat/completions",
        Some(GOLD),
        &chat_body(4, 40),
        &[("x-simulator-latency-ms", "3000")],
    );
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(stack.await_reported(44), 44, "prompt estimate + max_tokens");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(stack.committed_tokens(), 44);
    assert_eq!(stat(&stack, "usage_declared"), 1);
}

/// Sends `body` as the gold user to an upstream that answers after 5 s, and hangs up 1 s
/// later, when the upstream has it (the simulator counts a request when it answers: it
/// counts none here).
fn hang_up(stack: &Stack, body: &Value) {
    let mut conn = stack.connect();
    conn.send_post(
        "/v1/chat/completions",
        GOLD,
        body,
        &[("x-simulator-latency-ms", "5000")],
    )
    .expect("post");
    std::thread::sleep(Duration::from_millis(1000));
    drop(conn);
    std::thread::sleep(Duration::from_millis(5500));
    assert_eq!(stack.upstream_requests(), 0, "the upstream saw the hang-up");
}
