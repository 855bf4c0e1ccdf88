//! The rate-limit headers through a real Envoy (`rateLimitHeaders`): `openai` and `ietf` on a
//! 200 and on a 429 from ratelimit-service's statuses, and behind a service shaped like
//! Limitador 2.4 (`--no-statuses --reservations-unimplemented`: checkReport, answers without
//! statuses) a 429 that says to retry after the window, the only bound the filter knows.

use e2e::{Options, Reply, Stack};

const FREE: &str = "iamafreeuser";

/// `rateLimitHeaders: <format>` added to the shipped plugin configuration.
fn headers_format(format: &str) -> (String, String) {
    let at = "                    requestBody:\n";
    (
        at.to_string(),
        format!("                    rateLimitHeaders: {format}\n{at}"),
    )
}

/// The free user's chat completions of 22 tokens (its budget: 50 a minute), each one's tokens
/// charged before the next, until one is refused; returns the first reply and the refusal.
fn first_and_refusal(stack: &Stack) -> (Reply, Reply) {
    let first = stack.chat(FREE, 2, 20);
    assert_eq!(first.status, 200, "{}", first.body);
    stack.await_reported(stack.served_tokens(FREE));
    for _ in 0..5 {
        let r = stack.chat(FREE, 2, 20);
        if r.status == 429 {
            assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
            return (first, r);
        }
        assert_eq!(r.status, 200, "{}", r.body);
        stack.await_reported(stack.served_tokens(FREE));
    }
    panic!("never refused")
}

/// [`first_and_refusal`] on a stack in checkReport mode (its checks show the counters before
/// the request) with `rateLimitHeaders: <format>`.
fn checked_with(format: &str) -> (Reply, Reply) {
    let stack = Stack::start(Options {
        mode: Some("checkReport"),
        edits: vec![headers_format(format)],
        ..Options::default()
    });
    first_and_refusal(&stack)
}

/// Milliseconds of a duration in OpenAI's format (`1m0s`, `29.5s`, `20ms`).
fn go_duration_ms(text: &str) -> u64 {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().unwrap();
    }
    let mut total = 0.0;
    let mut number = String::new();
    for c in text.chars() {
        match c {
            'h' | 'm' | 's' => {
                let n: f64 = number.parse().unwrap();
                total += n * match c {
                    'h' => 3_600_000.0,
                    'm' => 60_000.0,
                    _ => 1000.0,
                };
                number.clear();
            }
            c => number.push(c),
        }
    }
    assert!(number.is_empty(), "{text}");
    total.round() as u64
}

/// The 429's `retry-after` (seconds) and `retry-after-ms`, checked to agree (the seconds
/// rounded up, at least 1).
fn retry_after(r: &Reply) -> (u64, u64) {
    let secs: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    let ms: u64 = r
        .header("retry-after-ms")
        .expect("retry-after-ms")
        .parse()
        .unwrap();
    assert_eq!(
        secs,
        ms.div_ceil(1000).max(1),
        "retry-after {secs}, {ms} ms"
    );
    (secs, ms)
}

#[test]
fn openai_headers_show_the_tokens_left_and_the_reset_as_a_duration() {
    let (first, refused) = checked_with("openai");
    // The first check, before any charge: all 50 left, the window a minute at most.
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("50"));
    assert_eq!(first.header("x-ratelimit-remaining-tokens"), Some("50"));
    let reset = go_duration_ms(first.header("x-ratelimit-reset-tokens").unwrap());
    assert!((1..=60_000).contains(&reset), "{reset}");
    assert_eq!(
        first.header("x-ratelimit-limit"),
        None,
        "no draft-03 header"
    );
    assert_eq!(first.header("retry-after"), None);

    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("50"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("0"));
    let (secs, ms) = retry_after(&refused);
    assert!(secs <= 60, "{secs}");
    let reset = go_duration_ms(refused.header("x-ratelimit-reset-tokens").unwrap());
    assert_eq!(reset, ms, "the reset is the wait");
}

#[test]
fn ietf_headers_are_the_policy_and_the_service_limit_structured_fields() {
    let (first, refused) = checked_with("ietf");
    assert_eq!(
        first.header("ratelimit-policy"),
        Some(r#""free";q=50;w=60"#)
    );
    let limit = first.header("ratelimit").unwrap();
    let t: u64 = limit
        .strip_prefix(r#""free";r=50;t="#)
        .unwrap_or_else(|| panic!("{limit}"))
        .parse()
        .unwrap();
    assert!((1..=60).contains(&t), "{limit}");
    assert_eq!(
        first.header("x-ratelimit-remaining"),
        None,
        "no draft-03 header"
    );

    assert_eq!(
        refused.header("ratelimit-policy"),
        Some(r#""free";q=50;w=60"#)
    );
    let (secs, _) = retry_after(&refused);
    assert_eq!(
        refused.header("ratelimit"),
        Some(format!(r#""free";r=0;t={secs}"#).as_str())
    );
}

#[test]
fn behind_limitador_a_429_says_to_retry_after_the_window_and_a_200_says_nothing() {
    let stack = Stack::start(Options {
        service_args: vec![
            "--no-statuses".into(),
            "--reservations-unimplemented".into(),
        ],
        edits: vec![headers_format("openai")],
        ..Options::default()
    });
    let (first, refused) = first_and_refusal(&stack);
    assert!(
        first
            .headers
            .keys()
            .all(|k| !k.as_str().contains("ratelimit")),
        "what remains is unknown: {:?}",
        first.headers
    );
    // The free limit's one rate: 50 per minute, spent; the window resets within a minute.
    assert_eq!(retry_after(&refused), (60, 60_000));
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("50"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("0"));
    assert_eq!(refused.header("x-ratelimit-reset-tokens"), Some("1m0s"));
}
