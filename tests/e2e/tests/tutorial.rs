//! The TokenRateLimitPolicy tutorial of `envoy/envoy.yaml` in a real Envoy: free users have 50
//! tokens per minute, gold users 200, counted per user on `/v1/chat/completions`.
//!
//! The budget tests run in both admission modes, whose arithmetic differs: checkReport admits
//! while the counter is below its limit (22-token requests: 0, 22, 44 pass, 66 is refused);
//! reservation (the shipped `auto` against ratelimit-service) admits when the counter plus
//! what the request reserves fits. Envoy hands the filter the body first, so a request of two
//! words (`"word word"`: 2 tokens, a word of up to 5 characters is one) and `max_tokens: 20`
//! reserves 22 and is served 22: 0 + 22 and 22 + 22 fit in 50, 44 + 22 does not.
//!
//! The budget tests run the module as an Istio gateway gets it: imaged and pushed to a local
//! OCI registry by `token-ratelimit-oci` (`make oci`, `make push`), then pulled back the way
//! Istio's agent pulls a WasmPlugin's `oci://` URL, pinned by the digest push printed
//! (`e2e::registry::pulled_module`; the image itself: tests/oci.rs).

use e2e::{Options, Stack};

const FREE: &str = "iamafreeuser";
const FREE_2: &str = "iamanotherfreeuser";
const GOLD: &str = "iamagolduser";

/// Sends chat requests of 2 + 20 = 22 tokens until one is refused; returns the statuses.
fn spend_until_limited(stack: &Stack, key: &str, max_requests: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..max_requests {
        let r = stack.chat(key, 2, 20);
        statuses.push(r.status);
        if r.status != 200 {
            break;
        }
        // Wait until the service has every charge (commits, and reports of a budget nearly
        // spent, go out at once; other reports on the filter's next tick), so that the next
        // admission sees the spend.
        let served =
            stack.served_tokens(FREE) + stack.served_tokens(FREE_2) + stack.served_tokens(GOLD);
        assert_eq!(
            stack.await_reported(served),
            served,
            "reported tokens lag behind served"
        );
    }
    statuses
}

/// What `chat(_, 2, 20)` reserves in reservation mode: 2 prompt tokens ("word word", a token
/// per word of up to 5 characters) + 20.
const RESERVED_2_20: u64 = 2 + 20;

/// The two admission modes the budget tests run in.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    CheckReport,
    /// The shipped `auto`, which reserves against ratelimit-service.
    Reservation,
}

fn stack_in(mode: Mode) -> Stack {
    Stack::start(Options {
        mode: match mode {
            Mode::CheckReport => Some("checkReport"),
            Mode::Reservation => None,
        },
        wasm: Some(e2e::registry::pulled_module()),
        ..Options::default()
    })
}

/// How many 22-token requests (`chat(_, 2, 20)`) a budget of `limit` admits one after another.
fn admitted(mode: Mode, limit: u64) -> usize {
    let mut spent = 0;
    let mut n = 0;
    loop {
        let fits = match mode {
            Mode::CheckReport => spent < limit,
            Mode::Reservation => spent + RESERVED_2_20 <= limit,
        };
        if !fits {
            return n;
        }
        spent += 22;
        n += 1;
    }
}

#[test]
fn free_user_is_limited_after_50_tokens_and_the_upstream_is_not_called_in_check_report_mode() {
    free_user_is_limited_after_50_tokens(Mode::CheckReport);
}

#[test]
fn free_user_is_limited_after_50_tokens_and_the_upstream_is_not_called_in_reservation_mode() {
    free_user_is_limited_after_50_tokens(Mode::Reservation);
}

fn free_user_is_limited_after_50_tokens(mode: Mode) {
    let stack = stack_in(mode);
    // checkReport: checks see 0, 22, 44 (< 50: allowed), then 66 (refused).
    // reservation: 0 + 22 and 22 + 22 fit in 50, 44 + 22 does not.
    let statuses = spend_until_limited(&stack, FREE, 10);
    let expected = match mode {
        Mode::CheckReport => vec![200, 200, 200, 429],
        Mode::Reservation => vec![200, 200, 429],
    };
    assert_eq!(statuses, expected);
    assert_eq!(admitted(mode, 50), expected.len() - 1);
    let spent = 22 * (expected.len() as u64 - 1);

    let upstream_before = stack.upstream_requests();
    let r = stack.chat(FREE, 2, 20);
    assert_eq!(r.status, 429);
    assert_eq!(
        stack.upstream_requests(),
        upstream_before,
        "a limited request reached the upstream"
    );
    let body = r.json();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "tokens");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("'free'"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-ratelimit-limit"), Some("50"));
    // What the refusing answer says is left: nothing (the counter is past its limit), or, for
    // a refused reservation, what the counter has left (50 - 44), too little for 22.
    let remaining = match mode {
        Mode::CheckReport => "0".to_string(),
        Mode::Reservation => (50 - spent).to_string(),
    };
    assert_eq!(r.header("x-ratelimit-remaining"), Some(remaining.as_str()));
    let retry_after: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after), "retry-after {retry_after}");

    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.requests_limited.free"),
        2
    );
    // Counters that move on every request reach Envoy's stats on the filter's next tick (they
    // lag a charge sent at once by up to one flushPeriod).
    let tokens_stat = || stack.envoy_stat("wasmcustom.token_ratelimit.tokens_reported.total");
    e2e::wait_until("the tokens_reported stat", std::time::Duration::from_secs(10), || {
        tokens_stat() >= spent
    });
    assert_eq!(tokens_stat(), spent);
    assert_eq!(stack.reported_tokens(), spent);
    // Each mode charges through its own call.
    match mode {
        Mode::CheckReport => assert_eq!(stack.committed_tokens(), 0),
        Mode::Reservation => assert_eq!(stack.report_hits(), 0),
    }
    assert!(stack.await_no_holds(std::time::Duration::from_secs(10)));
}

#[test]
fn gold_user_is_unaffected_and_counters_are_per_user_in_check_report_mode() {
    gold_user_is_unaffected_and_counters_are_per_user(Mode::CheckReport);
}

#[test]
fn gold_user_is_unaffected_and_counters_are_per_user_in_reservation_mode() {
    gold_user_is_unaffected_and_counters_are_per_user(Mode::Reservation);
}

fn gold_user_is_unaffected_and_counters_are_per_user(mode: Mode) {
    let stack = stack_in(mode);
    let free = spend_until_limited(&stack, FREE, 10);
    assert_eq!(free, [vec![200; admitted(mode, 50)], vec![429]].concat());

    // Another free user has a counter of its own. The headers say what is left: before this
    // request (a check), or after this request's hold (a reservation).
    let r = stack.chat(FREE_2, 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit"), Some("50"));
    let remaining = match mode {
        Mode::CheckReport => 50,
        Mode::Reservation => 50 - RESERVED_2_20,
    };
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some(remaining.to_string().as_str())
    );

    // checkReport: the gold user's checks see 22, 44, ..., 198 (< 200: allowed), then 220
    // (refused): 10 requests. reservation: 22 k + 22 <= 200 up to k = 8: 9 requests.
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("200"));
    let gold = spend_until_limited(&stack, GOLD, 20);
    assert_eq!(
        gold,
        [vec![200; admitted(mode, 200) - 1], vec![429]].concat()
    );
    assert_eq!(admitted(Mode::CheckReport, 200), 10);
    assert_eq!(admitted(Mode::Reservation, 200), 9);
}

#[test]
fn tokens_reported_equal_tokens_served_streaming_included() {
    let stack = Stack::start(Options::default());
    let mut expected = 0;
    for (words, max_tokens) in [(1, 1), (5, 17), (12, 3), (3, 40)] {
        let r = stack.chat(GOLD, words, max_tokens);
        assert_eq!(r.status, 200);
        expected += words as u64 + max_tokens;
    }
    // A streamed response with usage in its last chunk.
    let r = stack.post(
        "/v1/chat/completions",
        Some(GOLD),
        &serde_json::json!({
            "model": "sim", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "count these four"}], "max_tokens": 9
        }),
    );
    assert_eq!(r.status, 200);
    assert!(r.body.contains("data: [DONE]"));
    expected += 3 + 9;
    assert_eq!(stack.served_tokens(GOLD), expected);
    assert_eq!(stack.await_reported(expected), expected);

    // Paths that are not model endpoints (listing the models) are neither admitted (no
    // Reserve, no check) nor charged.
    let admissions = || {
        stack.service_metric("ratelimit_reserve_calls_total")
            + stack.service_metric("ratelimit_check_calls_total")
    };
    assert_eq!(admissions(), 5);
    let r = stack
        .raw_request(
            "GET",
            "/v1/models",
            &[("authorization", &format!("APIKEY {GOLD}"))],
            b"",
        )
        .expect("GET /v1/models");
    assert_eq!(r.status, 200, "{}", r.body);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(stack.reported_tokens(), expected);
    assert_eq!(admissions(), 5);
}

#[test]
fn unknown_api_key_is_refused_by_the_auth_step() {
    let stack = Stack::start(Options::default());
    let r = stack.chat("not-a-key", 1, 1);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(stack.upstream_requests(), 0);
}

#[test]
fn service_down_with_failure_mode_deny_gives_an_error_reply() {
    let stack = Stack::start(Options {
        service: false,
        ..Options::default()
    });
    let r = stack.chat(FREE, 2, 20);
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
    assert_eq!(stack.upstream_requests(), 0);
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.failure_mode_denied"),
        1
    );
}

#[test]
fn service_down_with_failure_mode_allow_lets_requests_through() {
    let stack = Stack::start(Options {
        service: false,
        failure_mode: "allow",
        ..Options::default()
    });
    for _ in 0..3 {
        let r = stack.chat(FREE, 2, 20);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(stack.upstream_requests(), 3);
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.failure_mode_allowed"),
        3
    );
}

#[test]
fn a_bad_plugin_configuration_is_refused_with_a_clear_log_line() {
    let (mut envoy, _dir) = Stack::envoy_only(Options {
        edits: vec![(
            "- {limit: 50, window: 1m}".into(),
            "- {limit: 50, window: 1x}".into(),
        )],
        ..Options::default()
    });
    let log = envoy.output();
    assert!(
        envoy.exited().is_some_and(|code| code != 0),
        "envoy accepted a bad configuration:\n{log}"
    );
    assert!(
        log.contains(
            "invalid configuration at `limits.free.rates[0].window`: `1x`: unknown unit `x`"
        ),
        "no clear log line:\n{log}"
    );
}

#[test]
fn an_unknown_rate_limit_cluster_is_a_service_failure() {
    let stack = Stack::start(Options {
        edits: vec![(
            "cluster: ratelimit\n".into(),
            "cluster: no-such-cluster\n".into(),
        )],
        ..Options::default()
    });
    let r = stack.chat(FREE, 2, 20);
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "rate_limit_service_unavailable");
    assert_eq!(stack.upstream_requests(), 0);
}

#[test]
fn several_workers_share_one_budget_and_report_every_token_in_check_report_mode() {
    several_workers_share_one_budget_and_charge_every_token(Mode::CheckReport);
}

#[test]
fn several_workers_share_one_budget_and_commit_every_token_in_reservation_mode() {
    several_workers_share_one_budget_and_charge_every_token(Mode::Reservation);
}

fn several_workers_share_one_budget_and_charge_every_token(mode: Mode) {
    let stack = Stack::start(Options {
        concurrency: 4,
        mode: match mode {
            Mode::CheckReport => Some("checkReport"),
            Mode::Reservation => None,
        },
        wasm: Some(e2e::registry::pulled_module()),
        ..Options::default()
    });
    // Concurrent clients land on different workers (different wasm VMs, each with its own
    // report and commit queue); the service must still see every token once. 110 tokens at
    // most, in requests that reserve 4 to 8: the gold budget (200) admits them all.
    let served: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let stack = &stack;
                s.spawn(move || {
                    let mut ok = 0;
                    for _ in 0..5 {
                        let r = stack.chat(GOLD, 1 + i, 3);
                        if r.status == 200 {
                            ok += 1 + i as u64 + 3;
                        }
                    }
                    ok
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .sum()
    });
    assert_eq!(stack.served_tokens(GOLD), served);
    assert_eq!(stack.await_reported(served), served);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        stack.reported_tokens(),
        served,
        "a token was reported twice"
    );
    assert_eq!(served, 110, "every request was admitted");
    assert!(stack.await_no_holds(std::time::Duration::from_secs(10)));
}
