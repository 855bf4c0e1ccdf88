//! Faults in a real Envoy (issue 5): the rate-limit service crashing and coming back, a slow
//! service, upstream errors, upstream resets and client aborts in the middle of a stream, a
//! 50 MB response, and an invalid plugin configuration pushed to a running Envoy. Each test
//! checks that no request hangs (every client call has a timeout), what the client sees, and
//! that the tokens add up: charged (+ dropped, when charges could not be delivered) = served,
//! or the documented estimate when the upstream reported no usage. Charges are commits in
//! reservation mode (the shipped `auto` against ratelimit-service) and reports in checkReport
//! mode; the service-restart tests run in both.

use std::io::Read;
use std::time::{Duration, Instant};

use e2e::{chat_body, stream_request_to, wait_until, Options, Reply, Stack};
use serde_json::{json, Value};

const FREE: &str = "iamafreeuser";
const GOLD: &str = "iamagolduser";

/// The gold budget raised so that a test can spend freely (the limits are generated from the
/// edited configuration, so the service has it too).
fn gold_unlimited() -> (String, String) {
    (
        "- {limit: 200, window: 1m}".into(),
        "- {limit: 1000000000, window: 1m}".into(),
    )
}

/// `reporting:` inserted in the plugin configuration.
fn reporting(max_retries: u32, flush_period: &str) -> (String, String) {
    (
        "                    limits:\n".into(),
        format!(
            "                    reporting:\n                      maxRetries: {max_retries}\n                      flushPeriod: {flush_period}\n                    limits:\n"
        ),
    )
}

/// The fallback estimate of chat `request` answered with `response` (its bytes as the client
/// got them, framed as `content_type`): the prompt's text plus the answer's generated text,
/// by the filter's rule (README, "The fallback estimate").
fn estimate(request: &Value, content_type: &str, response: &[u8]) -> u64 {
    const CHAT: &str = "/v1/chat/completions";
    e2e::prompt_estimate(CHAT, request)
        + e2e::answer_estimate_of(CHAT, Some(content_type), None, response)
}

/// Waits until the service has `want` reported tokens, then checks that no more arrive.
fn assert_reported_exactly(stack: &Stack, want: u64, what: &str) {
    assert_eq!(stack.await_reported(want), want, "{what}: reported tokens");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stack.reported_tokens(),
        want,
        "{what}: reported more than once"
    );
}

fn stat(stack: &Stack, name: &str) -> u64 {
    stack.envoy_stat(&format!("wasmcustom.token_ratelimit.{name}"))
}

/// Reads a response to its end or to its first error: the bytes and the error, if any.
fn read_all(mut resp: reqwest::blocking::Response) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match resp.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The rate-limit service killed and restarted during traffic

/// The charge calls of an admission mode, as the filter's metrics name them.
fn charges(mode: Option<&str>) -> &'static str {
    if mode == Some("checkReport") {
        "reports"
    } else {
        "commits"
    }
}

#[test]
fn service_restart_with_failure_mode_deny_refuses_while_down_and_counts_lost_reports() {
    service_restart_with_failure_mode_deny(Some("checkReport"));
}

#[test]
fn service_restart_with_failure_mode_deny_refuses_while_down_and_counts_lost_commits() {
    service_restart_with_failure_mode_deny(None);
}

/// `mode`: `None` for the shipped `auto` (reservation).
fn service_restart_with_failure_mode_deny(mode: Option<&'static str>) {
    // Three retries (flushPeriod 100 ms: 0.1, 0.2 and 0.4 s apart): a report or commit that
    // fails for ~700 ms is dropped, and counted.
    let mut stack = Stack::start(Options {
        edits: vec![gold_unlimited(), reporting(3, "100ms")],
        mode,
        ..Options::default()
    });
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_reported_exactly(&stack, 22, "before the crash");
    let reported_by_first = stack.reported_tokens();

    // A slow stream checked while the service is up ends while it is down: 3 prompt words and
    // 20 completion words, 150 ms apart (3 s).
    let port = stack.ports.listener;
    let slow = std::thread::spawn(move || {
        let resp = stream_request_to(
            port,
            GOLD,
            &chat_body(3, 20, true),
            &[("x-simulator-token-delay-ms", "150")],
        );
        assert_eq!(resp.status().as_u16(), 200);
        read_all(resp)
    });
    assert!(wait_until(
        "the slow stream",
        Duration::from_secs(20),
        || { stack.served_tokens(GOLD) > 22 }
    ));
    stack.stop_service();
    let crash = Instant::now();

    // While it is down: failure mode deny, the OpenAI-shaped 500, no upstream call.
    let upstream = stack.upstream_requests();
    for _ in 0..3 {
        let t = Instant::now();
        let r = stack.chat(GOLD, 2, 20);
        assert_eq!(r.status, 500, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    assert_eq!(stack.upstream_requests(), upstream);
    assert_eq!(stat(&stack, "failure_mode_denied"), 3);

    let (bytes, err) = slow.join().expect("slow stream");
    assert!(err.is_none(), "{err:?}");
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("\"total_tokens\":23") && text.ends_with("data: [DONE]\n\n"));

    // Its report (commit) fails, is retried 3 times and dropped: counted, not lost silently.
    let calls = charges(mode);
    assert!(
        wait_until("the dropped report", Duration::from_secs(15), || stat(
            &stack,
            "tokens_dropped"
        ) >= 23),
        "tokens_dropped {}",
        stat(&stack, "tokens_dropped")
    );
    assert_eq!(stat(&stack, "tokens_dropped"), 23);
    assert_eq!(stat(&stack, &format!("{calls}_dropped")), 1);
    assert!(stat(&stack, &format!("{calls}_retried")) >= 3);
    eprintln!("outage before restart: {:?}", crash.elapsed());

    // Back on the same ports (with fresh counters): requests pass again.
    stack.restart_service();
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_reported_exactly(&stack, 22, "after the restart");
    let served = stack.served_tokens(GOLD);
    assert_eq!(served, 22 + 23 + 22);
    assert_eq!(
        reported_by_first + stack.reported_tokens() + stat(&stack, "tokens_dropped"),
        served,
        "reported + dropped = served"
    );
}

#[test]
fn service_restart_with_failure_mode_allow_delivers_the_retried_reports() {
    service_restart_with_failure_mode_allow(Some("checkReport"));
}

#[test]
fn service_restart_with_failure_mode_allow_delivers_the_retried_commits() {
    service_restart_with_failure_mode_allow(None);
}

/// `mode`: `None` for the shipped `auto` (reservation).
fn service_restart_with_failure_mode_allow(mode: Option<&'static str>) {
    // Retries span the outage: 200 retries, 0.1 s after the failure and twice as late each
    // time up to 5 s apart (the first 8 span 16 s).
    let mut stack = Stack::start(Options {
        failure_mode: "allow",
        edits: vec![reporting(200, "100ms")],
        mode,
        ..Options::default()
    });
    // What `chat(_, 2, 20)` holds in reservation mode ("word word": 2 tokens, + 20): the
    // headers of an admitted reservation say what is left after its hold; a check's, before.
    let held = if mode == Some("checkReport") { 0 } else { 2 + 20 };
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some((200 - held).to_string().as_str())
    );
    assert_reported_exactly(&stack, 22, "before the crash");
    let reported_by_first = stack.reported_tokens();

    stack.stop_service();
    let crash = Instant::now();
    // While it is down: failure mode allow, the requests are served (and their tokens owed;
    // in reservation mode committed without a reservation id, which charges like a report).
    for words in [1, 2, 3] {
        let r = stack.chat(GOLD, words, 10);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            None,
            "no service, no status"
        );
    }
    let owed = (1 + 10) + (2 + 10) + (3 + 10);
    assert_eq!(stack.served_tokens(GOLD), 22 + owed);
    assert_eq!(stat(&stack, "failure_mode_allowed"), 3);
    let calls = charges(mode);
    assert!(wait_until(
        "report retries",
        Duration::from_secs(10),
        || stat(&stack, &format!("{calls}_retried")) >= 5
    ));
    std::thread::sleep(Duration::from_millis(500));
    let outage = crash.elapsed();

    stack.restart_service();
    let recovery = Instant::now();
    // The retried reports reach the new instance: every token served while it was down.
    assert_reported_exactly(&stack, owed, "after the restart");
    let delivered_in = recovery.elapsed();
    assert_eq!(stat(&stack, &format!("{calls}_dropped")), 0);
    assert_eq!(stat(&stack, "tokens_dropped"), 0);
    assert_eq!(
        reported_by_first + stack.reported_tokens(),
        stack.served_tokens(GOLD),
        "reported = served"
    );
    // And the budget sees them: the next admission reports what is left after them.
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some((200 - owed - held).to_string().as_str())
    );
    eprintln!(
        "outage {outage:?}, {} {calls} retried, delivered {delivered_in:?} after the restart",
        stat(&stack, &format!("{calls}_retried"))
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The service slower than the admission timeout (Reserve's, or CheckRateLimit's)

fn slow_service(failure_mode: &'static str) -> Stack {
    Stack::start(Options {
        failure_mode,
        check_timeout: "300ms",
        service_args: vec!["--grpc-delay-ms".into(), "2000".into()],
        // Three retries (0.1 + 0.2 + 0.4 s apart, each timing out after 1 s): charges are
        // dropped within about 5 s rather than the default 8 retries' 25 s.
        edits: vec![reporting(3, "100ms")],
        ..Options::default()
    })
}

#[test]
fn a_service_slower_than_the_timeout_with_deny_refuses_in_bounded_time() {
    let stack = slow_service("deny");
    for i in 1..=3 {
        let t = Instant::now();
        let r = stack.chat(FREE, 2, 20);
        let took = t.elapsed();
        assert_eq!(r.status, 500, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
        // The admission timeout (300 ms) decides, not the service (2 s).
        assert!(
            took < Duration::from_millis(1500),
            "request {i} took {took:?}"
        );
        eprintln!("deny: request {i} answered in {took:?}");
        assert_eq!(stat(&stack, "service_errors"), i);
    }
    assert_eq!(stat(&stack, "failure_mode_denied"), 3);
    assert_eq!(stack.upstream_requests(), 0);
}

#[test]
fn a_service_slower_than_the_timeout_with_allow_serves_in_bounded_time() {
    let stack = slow_service("allow");
    for i in 1..=3 {
        let t = Instant::now();
        let r = stack.chat(FREE, 2, 20);
        let took = t.elapsed();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            took < Duration::from_millis(1500),
            "request {i} took {took:?}"
        );
        eprintln!("allow: request {i} answered in {took:?}");
        assert_eq!(stat(&stack, "service_errors"), i);
    }
    assert_eq!(stat(&stack, "failure_mode_allowed"), 3);
    assert_eq!(stack.served_tokens(FREE), 66);
    // Charges (commits without a reservation id: no Reserve was answered) time out too
    // (reporting.timeout 1 s < 2 s): retried, then dropped and counted. The accounting still
    // adds up: charged + dropped = served.
    assert!(
        wait_until("dropped reports", Duration::from_secs(20), || {
            stack.reported_tokens() + stat(&stack, "tokens_dropped") >= 66
        }),
        "reported {} dropped {}",
        stack.reported_tokens(),
        stat(&stack, "tokens_dropped")
    );
    assert_eq!(stack.reported_tokens() + stat(&stack, "tokens_dropped"), 66);
    eprintln!(
        "allow: charged {}, dropped {} in {} commit(s), {} retries",
        stack.reported_tokens(),
        stat(&stack, "tokens_dropped"),
        stat(&stack, "commits_dropped"),
        stat(&stack, "commits_retried")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Upstream errors without usage

#[test]
fn upstream_errors_complete_and_are_charged_the_estimate() {
    let stack = Stack::start(Options {
        edits: vec![gold_unlimited()],
        ..Options::default()
    });
    let body = chat_body(3, 7, false);
    let mut charged = 0;
    for status in ["400", "429", "500"] {
        let t = Instant::now();
        let r = stack.post_with(
            "/v1/chat/completions",
            Some(GOLD),
            &body,
            &[("x-simulator-status", status)],
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{status}: {:?}",
            t.elapsed()
        );
        assert_eq!(r.status.to_string(), status, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "simulated_error");
        // A 4xx without usage costs nothing (usage.errorResponses.clientErrors: free); a 5xx
        // is charged the estimate (serverErrors: fallback).
        let want = if status.starts_with('4') {
            0
        } else {
            estimate(&body, "application/json", &r.raw)
        };
        charged += want;
        assert_reported_exactly(&stack, charged, status);
        eprintln!("upstream {status}: charged {want}");
    }

    // An error in the middle of a stream (200, then `data: {"error": ..}` and `[DONE]`, as
    // vLLM sends): no usage, so the estimate over the bytes that passed.
    let body = chat_body(3, 30, true);
    let r = stack.post_with(
        "/v1/chat/completions",
        Some(GOLD),
        &body,
        &[("x-simulator-error-after", "5")],
    );
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"simulated_error\"") && r.body.ends_with("data: [DONE]\n\n"));
    assert!(!r.body.contains("\"usage\""));
    let want = estimate(&body, "text/event-stream", &r.raw);
    charged += want;
    assert_reported_exactly(&stack, charged, "streamed error");
    eprintln!("streamed error after 5 words: charged {want} (estimate)");
    assert_eq!(stat(&stack, "usage_missing"), 4);
    assert_eq!(stat(&stack, "usage_estimated"), 2);
    assert_eq!(stat(&stack, "usage_free"), 2);
    // The simulator served no tokens for the errors, 3 + 5 for the stream: errors are never
    // free, so the estimate can exceed what was served.
    assert_eq!(stack.served_tokens(GOLD), 3 + 5);
}

// ---------------------------------------------------------------------------------------------
// 4. Upstream reset in the middle of a stream

#[test]
fn an_upstream_reset_mid_stream_charges_the_part_that_passed() {
    let stack = Stack::start(Options {
        edits: vec![gold_unlimited()],
        ..Options::default()
    });
    let body = chat_body(3, 50, true);

    // The whole stream without usage: its estimate bounds what a part of it may cost.
    let before = stack.reported_tokens();
    let full = stack.post_with(
        "/v1/chat/completions",
        Some(GOLD),
        &body,
        &[("x-simulator-no-usage", "true")],
    );
    assert_eq!(full.status, 200);
    let full_estimate = estimate(&body, "text/event-stream", &full.raw);
    assert_reported_exactly(&stack, before + full_estimate, "full stream");

    // The upstream drops the connection after 10 words.
    let before = stack.reported_tokens();
    let t = Instant::now();
    let resp = stack.stream_request(GOLD, &body, &[("x-simulator-abort-after", "10")]);
    assert_eq!(resp.status().as_u16(), 200);
    let (bytes, err) = read_all(resp);
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&bytes);
    assert!(err.is_some(), "the client must see the reset: {text}");
    assert!(!text.contains("[DONE]") && !text.contains("\"usage\""));
    assert!(text.contains("tok10") && !text.contains("tok11"), "{text}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    assert!(wait_until(
        "the charge of the reset stream",
        Duration::from_secs(10),
        || stack.reported_tokens() > before
    ));
    std::thread::sleep(Duration::from_millis(300));
    let charged = stack.reported_tokens() - before;
    // The filter saw at least what the client got, and less than the whole stream.
    let lower = estimate(&body, "text/event-stream", &bytes);
    assert!(
        (lower..=full_estimate).contains(&charged),
        "charged {charged}, client-side estimate {lower}, whole-stream estimate {full_estimate}"
    );
    eprintln!(
        "upstream reset after 10 of 50 words: client got {} bytes and {err:?}; charged {charged} \
         (estimate over the client's bytes {lower}, whole stream {full_estimate})",
        bytes.len()
    );

    // Envoy is fine: the next request is served and counted exactly.
    let before = stack.reported_tokens();
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_reported_exactly(&stack, before + 22, "after the reset");
    assert_eq!(
        stack
            .get(&format!("http://127.0.0.1:{}/ready", stack.ports.admin))
            .trim(),
        "LIVE"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Client abort in the middle of a slow stream

#[test]
fn a_client_abort_mid_stream_charges_the_part_that_passed() {
    let stack = Stack::start(Options {
        edits: vec![gold_unlimited()],
        ..Options::default()
    });
    let body = chat_body(3, 100, true);
    let t = Instant::now();
    let resp = stack.stream_request(GOLD, &body, &[("x-simulator-token-delay-ms", "50")]);
    assert_eq!(resp.status().as_u16(), 200);
    // Read 5 word chunks (~250 ms of a 5 s stream), then hang up.
    let got = e2e::read_words_then_hang_up(resp, 5);
    let aborted_after = t.elapsed();

    assert!(wait_until(
        "the charge of the aborted stream",
        Duration::from_secs(10),
        || stack.reported_tokens() > 0
    ));
    std::thread::sleep(Duration::from_millis(500));
    let charged = stack.reported_tokens();
    let lower = estimate(&body, "text/event-stream", &got);
    assert!(charged >= lower, "charged {charged} < {lower}");
    // Envoy reset the upstream too: the simulator stopped producing long before 100 words.
    let served = stack.served_tokens(GOLD);
    assert!(served < 3 + 100, "the upstream kept streaming: {served}");
    assert_eq!(stat(&stack, "usage_estimated"), 1);
    eprintln!(
        "client abort after {aborted_after:?} ({} bytes): charged {charged} (estimate over the client's \
         bytes {lower}); the simulator produced {served} tokens of 103",
        got.len()
    );

    // The next request works and is counted exactly.
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_reported_exactly(&stack, charged + 22, "after the abort");
}

// ---------------------------------------------------------------------------------------------
// 6. A 50 MB streamed response

#[test]
fn a_50_mb_stream_keeps_envoy_memory_bounded_and_is_counted() {
    let stack = Stack::start(Options {
        edits: vec![gold_unlimited()],
        ..Options::default()
    });
    // Warm up (VM, connections), then measure.
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_reported_exactly(&stack, 22, "warm-up");
    let pid = stack.envoy_pid();
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim().to_string())
            .ok(),
        Some("envoy".to_string()),
        "RSS must be Envoy's"
    );
    let rss_before = stack.envoy_rss_kib();
    assert!(rss_before > 16 * 1024, "{rss_before} KiB");

    // ~190 bytes per word chunk: 280,000 words are ~53 MB of SSE.
    let words: u64 = 280_000;
    let t = Instant::now();
    let mut resp = stack.stream_request(
        GOLD,
        &chat_body(3, 1, true),
        &[("x-simulator-completion-tokens", &words.to_string())],
    );
    assert_eq!(resp.status().as_u16(), 200);
    let mut total = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut rss_max = rss_before;
    let mut next_sample = 0usize;
    loop {
        let n = resp.read(&mut buf).expect("read the stream");
        if n == 0 {
            break;
        }
        total += n;
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > 8192 {
            tail.drain(..tail.len() - 4096);
        }
        if total >= next_sample {
            rss_max = rss_max.max(stack.envoy_rss_kib());
            next_sample += 2 << 20;
        }
    }
    let took = t.elapsed();
    let rss_after = stack.envoy_rss_kib();
    rss_max = rss_max.max(rss_after);
    let tail = String::from_utf8_lossy(&tail);
    assert!(total > 50_000_000, "only {total} bytes");
    assert!(
        tail.contains(&format!("\"total_tokens\":{}", words + 3))
            && tail.ends_with("data: [DONE]\n\n"),
        "{tail}"
    );
    let growth_mib = (rss_max.saturating_sub(rss_before)) as f64 / 1024.0;
    eprintln!(
        "{total} bytes in {took:?}; Envoy RSS {} MiB before, {} MiB at most, {} MiB after (growth {growth_mib:.1} MiB)",
        rss_before / 1024,
        rss_max / 1024,
        rss_after / 1024
    );
    assert!(growth_mib < 64.0, "Envoy grew by {growth_mib:.1} MiB");

    let served = stack.served_tokens(GOLD);
    assert_eq!(served, 22 + 3 + words);
    assert_reported_exactly(&stack, served, "50 MB stream");
}

// ---------------------------------------------------------------------------------------------
// 7. An invalid plugin configuration pushed to a running Envoy (file-based LDS)

/// The shipped free tier's path predicate (every model endpoint) and its group predicate.
const FREE_PATHS: &str = concat!(
    "                        - predicate: >-\n",
    "                            request.url_path in [\"/v1/chat/completions\", \"/v1/completions\",\n",
    "                            \"/v1/embeddings\", \"/v1/responses\", \"/v1/messages\"] ||\n",
    "                            request.url_path.matches(\"^/v1(beta)?/models/[^/:]+:(generateContent|streamGenerateContent)$\")\n",
    "                        - predicate: auth.identity.groups.split(\",\").exists(g, g == \"free\")\n",
);

/// The free tier scoped to `paths` (a CEL list literal) instead of every model endpoint.
fn free_on(paths: &str) -> (String, String) {
    (
        FREE_PATHS.into(),
        format!(
            concat!(
                "                        - predicate: request.url_path in {}\n",
                "                        - predicate: auth.identity.groups.split(\",\").exists(g, g == \"free\")\n",
            ),
            paths
        ),
    )
}

fn raw_chat(stack: &Stack, path: &str, key: &str, words: usize, max_tokens: u64) -> Reply {
    // A new connection per request: connections opened before a listener update keep the
    // old filter chain while they drain.
    stack.raw_post(path, key, &chat_body(words, max_tokens, false), &[])
}

#[test]
fn an_invalid_configuration_pushed_over_lds_is_rejected_and_the_old_one_keeps_limiting() {
    // The free tier starts on chat completions only.
    let chat_only = free_on(r#"["/v1/chat/completions"]"#);
    let mut stack = Stack::start(Options {
        dynamic_listener: true,
        edits: vec![chat_only.clone()],
        ..Options::default()
    });
    let lds_ok = |n: u64| stack.envoy_stat("listener_manager.lds.update_success") >= n;
    assert!(lds_ok(1));

    // The free user spends its 50 tokens (22 a request, each reserving 22 in reservation mode,
    // the shipped auto): 0 + 22 and 22 + 22 fit in 50, 44 + 22 does not: 200, 200, then 429.
    // (checkReport would admit a third: its checks see 0, 22, 44 < 50.)
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = raw_chat(&stack, "/v1/chat/completions", FREE, 2, 20);
        statuses.push(r.status);
        let served = stack.served_tokens(FREE);
        stack.await_reported(served);
    }
    assert_eq!(statuses, vec![200, 200, 429]);
    // /v1/completions is not limited by this configuration.
    let completions = json!({"model": "sim", "prompt": "a b", "max_tokens": 2});
    assert_eq!(
        stack
            .raw_post("/v1/completions", FREE, &completions, &[])
            .status,
        200
    );

    // Push a configuration whose plugin configuration is invalid.
    let bad = Stack::render_config(
        &stack.ports,
        &Options {
            edits: vec![
                (
                    "- {limit: 50, window: 1m}".into(),
                    "- {limit: 50, window: 1x}".into(),
                ),
                chat_only,
            ],
            ..Options::default()
        },
    );
    stack.push_listener(&bad);
    assert!(
        wait_until("the rejected update", Duration::from_secs(20), || stack
            .envoy_stat("listener_manager.lds.update_rejected")
            >= 1),
        "{}",
        stack.envoy.output()
    );
    let log = stack.envoy.output();
    assert!(
        log.contains(
            "invalid configuration at `limits.free.rates[0].window`: `1x`: unknown unit `x`"
        ),
        "no log line naming the field:\n{log}"
    );
    assert_eq!(stack.envoy_stat("listener_manager.lds.update_success"), 1);
    // The old configuration keeps limiting.
    let r = raw_chat(&stack, "/v1/chat/completions", FREE, 2, 20);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("'free'"));
    assert_eq!(
        raw_chat(&stack, "/v1/chat/completions", GOLD, 2, 20).status,
        200
    );
    assert_eq!(
        stack
            .raw_post("/v1/completions", FREE, &completions, &[])
            .status,
        200
    );

    // A valid change: the free limit is 60 tokens, on /v1/completions too.
    let good = Stack::render_config(
        &stack.ports,
        &Options {
            edits: vec![
                (
                    "- {limit: 50, window: 1m}".into(),
                    "- {limit: 60, window: 1m}".into(),
                ),
                free_on(r#"["/v1/chat/completions", "/v1/completions"]"#),
            ],
            ..Options::default()
        },
    );
    stack.push_listener(&good);
    assert!(
        wait_until("the accepted update", Duration::from_secs(20), || lds_ok(2)
            && stack.envoy_stat("listener_manager.total_listeners_warming")
                == 0),
        "{}",
        stack.envoy.output()
    );
    // The filter applies it at once: /v1/completions now counts against the free budget,
    // which the service still knows as 50 with 44 spent. (A request reserving 3, as
    // `completions` does, would fit in the 6 left: this one reserves 2 + 10.)
    let completions_10 = json!({"model": "sim", "prompt": "a b", "max_tokens": 10});
    let r = stack.raw_post("/v1/completions", FREE, &completions_10, &[]);
    assert_eq!(r.status, 429, "{}", r.body);

    // The service gets the limits generated from the new configuration (ratelimit-service
    // keeps counters in memory: they restart from zero). 10 tokens a request, each reserving
    // 10 ("word word": 2, + 8): 10 k + 10 <= 60 up to k = 5, six requests, then 429.
    // (checkReport: checks see 0, 10, ..., 50 (< 60), then 60: six too.)
    stack.regenerate_limits(&stack.dir.path().join("lds.yaml"));
    stack.stop_service();
    stack.restart_service();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = raw_chat(&stack, "/v1/chat/completions", FREE, 2, 8);
        if statuses.is_empty() {
            assert_eq!(r.header("x-ratelimit-limit"), Some("60"));
        }
        statuses.push(r.status);
        if r.status != 200 {
            break;
        }
        // The restarted service counts from zero: 10 per request served so far. (Not "what
        // it has now + 10", read after the request: its commit may be in already.)
        let served = 10 * statuses.len() as u64;
        assert_eq!(stack.await_reported(served), served);
    }
    assert_eq!(statuses, [vec![200; 6], vec![429]].concat());
    eprintln!(
        "LDS: update_success {}, update_rejected {}",
        stack.envoy_stat("listener_manager.lds.update_success"),
        stack.envoy_stat("listener_manager.lds.update_rejected")
    );
}
