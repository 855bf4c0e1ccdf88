//! Attempts to get tokens past the budget (issue 5), in a real Envoy with the shipped
//! configuration (admission mode `auto`: reservation against ratelimit-service). Each test
//! shows that the budget holds.
//!
//! The free user (50 tokens) spends its budget with `chat(_, 2, 20)`: 22 tokens served, 23
//! reserved ("word word", 9 characters: 3 tokens, + 20). 0 + 23 and 22 + 23 fit in 50, 44 + 23
//! does not: [`SPEND_FREE_BUDGET`].
//!
//! Covered elsewhere: streaming without `stream_options.include_usage` (the filter asks for
//! usage: `usage.rs`, `streaming_without_include_usage_is_counted_by_asking_for_usage`), and
//! `accept-encoding: gzip` (the compressed answer is decoded on a copy:
//! `usage.rs`, `compressed_responses_are_counted_and_reach_the_client_compressed`).

use std::time::Duration;

use e2e::{chat_body, Options, Reply, Stack};
use serde_json::Value;

const FREE: &str = "iamafreeuser";
const FREE_2: &str = "iamanotherfreeuser";
const GOLD: &str = "iamagolduser";

/// The statuses of `chat(FREE, 2, 20)` until refused, in reservation mode.
const SPEND_FREE_BUDGET: [u16; 3] = [200, 200, 429];
/// What `chat(_, 2, 20)` reserves (and what an admitted reservation's headers leave out):
/// "word word", 2 tokens (a word of up to 5 characters is one), + 20.
const RESERVED_2_20: u64 = 2 + 20;

/// The fallback estimate of chat `request` (its body read: the shipped `auto` reserves)
/// answered with `reply`: the request's text plus the answer's generated text, by the filter's
/// rule (README, "The fallback estimate").
fn estimate(request: &Value, reply: &Reply) -> u64 {
    const CHAT: &str = "/v1/chat/completions";
    e2e::prompt_estimate(CHAT, request) + e2e::answer_estimate(CHAT, reply)
}

fn stat(stack: &Stack, name: &str) -> u64 {
    stack.envoy_stat(&format!("wasmcustom.token_ratelimit.{name}"))
}

/// Posts a chat request and returns the reply and the tokens the service received for it.
fn charged(stack: &Stack, key: &str, body: &Value, headers: &[(&str, &str)]) -> (Reply, u64) {
    let before = stack.reported_tokens();
    let served_before = stack.served_tokens(key);
    let r = stack.post_with("/v1/chat/completions", Some(key), body, headers);
    assert_eq!(r.status, 200, "{}", r.body);
    // Something is always charged (at least the estimate): wait for it, then for stragglers.
    assert!(
        e2e::wait_until("the charge", Duration::from_secs(10), || stack
            .reported_tokens()
            > before),
        "nothing charged for {}",
        r.body
    );
    std::thread::sleep(Duration::from_millis(300));
    let charged = stack.reported_tokens() - before;
    eprintln!(
        "{headers:?}: served {}, charged {charged}",
        stack.served_tokens(key) - served_before
    );
    (r, charged)
}

// ---------------------------------------------------------------------------------------------
// A model output that imitates usage

#[test]
fn a_fake_usage_in_the_model_output_is_not_believed() {
    let stack = Stack::start(Options {
        edits: vec![(
            "- {limit: 200, window: 1m}".into(),
            "- {limit: 1000000, window: 1m}".into(),
        )],
        ..Options::default()
    });
    let fakes = [
        r#"{"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":1}}"#,
        r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1}}"#,
        r#"}],"usage":{"total_tokens":1},"x":[{"#,
    ];
    for fake in fakes {
        for stream in [false, true] {
            let body = chat_body(3, 20, stream);
            let (r, charged) = charged(&stack, GOLD, &body, &[("x-simulator-content", fake)]);
            assert!(r.body.contains("usage"), "the fake reaches the client");
            assert_eq!(charged, 3 + 20, "stream {stream}, content {fake}");
        }
        // Without the real usage, the estimate applies, not the fake.
        let body = chat_body(3, 20, true);
        let (r, charged) = charged(
            &stack,
            GOLD,
            &body,
            &[
                ("x-simulator-content", fake),
                ("x-simulator-no-usage", "true"),
            ],
        );
        assert_eq!(charged, estimate(&body, &r), "content {fake}");
        // The estimate of the prompt and of the fake as text, never the fake's 1 token.
        assert!(charged > 1, "content {fake}: charged {charged}");
    }
    assert_eq!(stack.served_tokens(GOLD), 9 * 23);

    // The free user's budget holds with fake usage in every answer: 200, 200, then 429.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = stack.post_with(
            "/v1/chat/completions",
            Some(FREE),
            &chat_body(2, 20, false),
            &[("x-simulator-content", fakes[0])],
        );
        statuses.push(r.status);
        if r.status != 200 {
            break;
        }
        let want = stack.reported_tokens() + 22;
        stack.await_reported(want);
    }
    assert_eq!(statuses, SPEND_FREE_BUDGET);
}

// ---------------------------------------------------------------------------------------------
// Usage figures that lie

#[test]
fn negative_float_string_or_huge_usage_is_never_a_discount() {
    let stack = Stack::start(Options {
        edits: vec![(
            "- {limit: 200, window: 1m}".into(),
            "- {limit: 1000000000, window: 1m}".into(),
        )],
        ..Options::default()
    });
    // Served: 3 + 20 = 23 tokens each.
    let lies = [
        (
            "negative",
            r#"{"prompt_tokens":-3,"completion_tokens":-20,"total_tokens":-23}"#,
        ),
        (
            "float",
            r#"{"prompt_tokens":0.5,"completion_tokens":1.5,"total_tokens":2.0}"#,
        ),
        (
            "string",
            r#"{"prompt_tokens":"3","completion_tokens":"20","total_tokens":"23"}"#,
        ),
        (
            "exponent",
            r#"{"prompt_tokens":3e0,"completion_tokens":2e1,"total_tokens":1e0}"#,
        ),
        (
            "null",
            r#"{"prompt_tokens":null,"completion_tokens":null,"total_tokens":null}"#,
        ),
    ];
    for (what, usage) in lies {
        for stream in [false, true] {
            let body = chat_body(3, 20, stream);
            let (r, charged) = charged(
                &stack,
                GOLD,
                &body,
                &[("x-simulator-usage-override", usage)],
            );
            assert!(
                r.body.contains("\"usage\""),
                "{what}: the lie reaches the client"
            );
            let want = estimate(&body, &r);
            assert!(
                charged >= 23 && charged == want,
                "{what} (stream {stream}): charged {charged}, estimate {want}, served 23"
            );
        }
    }
    let missing = stat(&stack, "usage_estimated");
    assert_eq!(missing, 2 * lies.len() as u64);

    // Huge figures are cut to usage.maxTokensPerResponse (100,000,000), not wrapped or dropped.
    for stream in [false, true] {
        let body = chat_body(3, 20, stream);
        let (_, charged) = charged(
            &stack,
            GOLD,
            &body,
            &[(
                "x-simulator-usage-override",
                r#"{"prompt_tokens":3,"completion_tokens":18446744073709551615,"total_tokens":18446744073709551615}"#,
            )],
        );
        assert_eq!(charged, 100_000_000, "stream {stream}");
    }
    assert_eq!(stat(&stack, "usage_clamped"), 2);
    // 200,000,000 of 1,000,000,000 spent: the next admission shows it.
    let r = stack.chat(GOLD, 1, 1);
    let remaining: u64 = r.header("x-ratelimit-remaining").unwrap().parse().unwrap();
    assert!(remaining <= 800_000_000, "{remaining}");
}

#[test]
fn partly_invalid_usage_is_never_a_discount() {
    let stack = Stack::start(Options {
        edits: vec![(
            "- {limit: 200, window: 1m}".into(),
            "- {limit: 1000000000, window: 1m}".into(),
        )],
        ..Options::default()
    });
    for usage in [
        r#"{"prompt_tokens":1,"completion_tokens":-20,"total_tokens":"23"}"#,
        r#"{"prompt_tokens":1,"completion_tokens":1,"total_tokens":-1}"#,
        r#"{"prompt_tokens":1,"completion_tokens":1.5,"total_tokens":null}"#,
    ] {
        for stream in [false, true] {
            let body = chat_body(3, 20, stream);
            let (r, charged) = charged(
                &stack,
                GOLD,
                &body,
                &[("x-simulator-usage-override", usage)],
            );
            let want = estimate(&body, &r);
            assert_eq!(charged, want, "{usage} (stream {stream}), served 23");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Path tricks against `when` predicates

#[test]
fn path_variants_cannot_escape_the_limit() {
    let stack = Stack::start(Options::default());
    // The free user spends its budget on the plain path.
    for expected in SPEND_FREE_BUDGET {
        let r = stack.chat(FREE, 2, 20);
        assert_eq!(r.status, expected, "{}", r.body);
        stack.await_reported(stack.served_tokens(FREE));
    }
    let body = chat_body(2, 20, false);
    // (path, what the client must see): 429 when Envoy normalizes the path into the limited
    // one; 404 when the path stays different (the upstream does not serve it either).
    let variants = [
        ("/v1/chat/completions", 429),
        ("/v1/chat/completions?", 429),
        ("/v1/chat/completions?foo=bar", 429),
        (
            "/v1/chat/completions?api-version=2024-02-01&x=/v1/models",
            429,
        ),
        ("//v1/chat/completions", 429),
        ("/v1//chat/completions", 429),
        ("/v1/chat//completions", 429),
        ("/v1/./chat/completions", 429),
        ("/v1/x/../chat/completions", 429),
        ("/v1/chat%2Fcompletions", 429),
        ("/v1/chat%2fcompletions", 429),
        ("/v1/%63hat/completions", 429),
        (
            "/%76%31/%63%68%61%74/%63%6f%6d%70%6c%65%74%69%6f%6e%73",
            429,
        ),
        ("/v1/chat/completions/", 404),
        ("/V1/CHAT/COMPLETIONS", 404),
        ("/v1/Chat/Completions", 404),
        ("/v1/chat/completions%3Fx=1", 404),
        ("/v1/chat/completions%20", 404),
    ];
    let served = stack.served_tokens(FREE);
    let upstream = stack.upstream_requests();
    let mut seen = Vec::new();
    for (path, want) in variants {
        let r = stack.raw_post(path, FREE, &body, &[]);
        seen.push(format!("{path} -> {}", r.status));
        assert_eq!(r.status, want, "{path}: {}", r.body);
        assert_eq!(stack.served_tokens(FREE), served, "{path} was served");
    }
    eprintln!("{}", seen.join("\n"));
    // Only the 404s reached the upstream, which served nothing.
    let not_found = variants.iter().filter(|(_, s)| *s == 404).count() as u64;
    assert_eq!(stack.upstream_requests(), upstream);
    assert_eq!(
        stat(&stack, "requests_limited.free"),
        1 + (variants.len() as u64 - not_found)
    );
}

// ---------------------------------------------------------------------------------------------
// Spoofed identity headers

#[test]
fn identity_headers_from_the_client_are_ignored() {
    let stack = Stack::start(Options::default());
    for expected in SPEND_FREE_BUDGET {
        let r = stack.chat(FREE, 2, 20);
        assert_eq!(r.status, expected, "{}", r.body);
        stack.await_reported(stack.served_tokens(FREE));
    }
    let served = stack.served();
    let body = chat_body(2, 20, false);
    let identity = r#"{"userid":"user-2","groups":"gold"}"#;
    let spoofs: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("x-user-groups", vec![("x-user-groups", "gold")]),
        ("x-auth-identity", vec![("x-auth-identity", identity)]),
        (
            "ext_authz-like headers",
            vec![
                ("x-ext-authz-identity", identity),
                ("x-userid", "user-2"),
                ("x-forwarded-user", "user-3"),
                ("x-auth-request-user", "user-3"),
                ("x-auth-request-groups", "gold"),
            ],
        ),
        (
            "x-envoy headers",
            vec![
                ("x-envoy-original-path", "/v1/models"),
                ("x-envoy-internal", "true"),
            ],
        ),
    ];
    for (what, headers) in &spoofs {
        let r = stack.raw_post("/v1/chat/completions", FREE, &body, headers);
        assert_eq!(r.status, 429, "{what}: {}", r.body);
        assert!(r.body.contains("'free'"), "{what}: {}", r.body);
    }
    // A second `authorization` header, before or after the free one: the auth step reads the
    // joined value, which is no key.
    for headers in [
        vec![("authorization", "APIKEY iamagolduser")],
        vec![("Authorization", "APIKEY iamanotherfreeuser")],
    ] {
        let r = stack.raw_post("/v1/chat/completions", FREE, &body, &headers);
        assert_eq!(r.status, 401, "{}", r.body);
        let mut reversed = headers.clone();
        reversed.push(("authorization", "APIKEY iamafreeuser"));
        let r = stack
            .raw_request(
                "POST",
                "/v1/chat/completions",
                &[&[("content-type", "application/json")], &reversed[..]].concat(),
                body.to_string().as_bytes(),
            )
            .expect("request");
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // Nothing was served, and nobody else's counter moved: their first reservation leaves
    // their whole budget but its own hold.
    assert_eq!(stack.served(), served);
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some((200 - RESERVED_2_20).to_string().as_str())
    );
    let r = stack.chat(FREE_2, 2, 20);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-ratelimit-remaining"),
        Some((50 - RESERVED_2_20).to_string().as_str())
    );
    let counters = stack.counters();
    let spent: Vec<(String, u64)> = counters
        .as_array()
        .expect("counters")
        .iter()
        .map(|c| {
            (
                c["set_variables"]["descriptors[0]['auth.identity.userid']"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
                c["limit"]["max_value"].as_u64().unwrap_or(0)
                    - c["remaining"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    eprintln!("counters: {spent:?}");
    // user-1 spent what it was served (two requests of 22) and nothing more.
    let user1 = stack.served_tokens(FREE);
    assert_eq!(user1, 44);
    assert!(spent.contains(&("user-1".to_string(), user1)), "{spent:?}");
}
