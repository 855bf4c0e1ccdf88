//! The TokenRateLimitPolicy tutorial of `envoy/envoy.yaml` in a real Envoy: free users have 50
//! tokens per minute, gold users 200, counted per user on `/v1/chat/completions`.

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
        // Reports go out on the filter's next tick: wait until the service has them all, so
        // the next check sees the spend.
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

#[test]
fn free_user_is_limited_after_50_tokens_and_the_upstream_is_not_called() {
    let stack = Stack::start(Options::default());
    // 22 tokens per request: checks see 0, 22, 44 (< 50: allowed), then 66 (refused).
    let statuses = spend_until_limited(&stack, FREE, 10);
    assert_eq!(statuses, vec![200, 200, 200, 429]);

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
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
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
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.tokens_reported.total"),
        66
    );
}

#[test]
fn gold_user_is_unaffected_and_counters_are_per_user() {
    let stack = Stack::start(Options::default());
    assert_eq!(
        spend_until_limited(&stack, FREE, 10),
        vec![200, 200, 200, 429]
    );

    // Another free user has a counter of its own.
    let r = stack.chat(FREE_2, 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit"), Some("50"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("50"));

    // The gold user's checks see 22, 44, ..., 198 (< 200: allowed), then 220 (refused).
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit"), Some("200"));
    let gold = spend_until_limited(&stack, GOLD, 20);
    assert_eq!(gold, [vec![200; 9], vec![429]].concat());
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

    // Unlimited paths are neither checked nor reported.
    let r = stack.post(
        "/v1/completions",
        Some(GOLD),
        &serde_json::json!({"model": "sim", "prompt": "a b", "max_tokens": 5}),
    );
    assert_eq!(r.status, 200);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(stack.reported_tokens(), expected);
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
fn several_workers_share_one_budget_and_report_every_token() {
    let stack = Stack::start(Options {
        concurrency: 4,
        ..Options::default()
    });
    // Concurrent clients land on different workers (different wasm VMs, each with its own
    // report queue); the service must still see every token once.
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
}
