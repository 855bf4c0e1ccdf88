//! The admission modes in a real Envoy with two workers (`--concurrency 2`): what reservation
//! mode holds a budget to (a burst of concurrent requests, requests one after another on one
//! connection, bodies that come late, a reader that idles), holds released by a finished,
//! aborted or reset request or by their TTL when Envoy dies, what checkReport lets through (the
//! burst overshoots within its documented bound; a request right after one that spent the
//! budget is refused on either worker), and `auto` against a service without `Reserve`.
//!
//! The bounds are computed from what the requests reserve and what the simulator served:
//!
//! - reservation: tokens charged <= budget + the sum, over the admitted requests, of what each
//!   was served beyond what it reserved (a request served within its reservation cannot
//!   overshoot at all);
//! - checkReport: every admitted request passed while the counter was below its max, so
//!   tokens charged <= max - 1 + admitted × the most one request was served.
//!
//! A chat request of `words` words (`"word word ..."`, each of 4 characters: a token) and
//! `max_tokens: m` reserves `words` + m tokens (Envoy hands the filter the body first, as
//! shipped), at most the limit's smallest rate, and is served `words + m`.

use std::io::Read;
use std::time::{Duration, Instant};

use e2e::{chat_body, wait_until, Options, Reply, Stack};
use serde_json::Value;

/// user-1, group free: 50 tokens a minute.
const FREE: &str = "iamafreeuser";
/// user-3, group free.
const FREE_2: &str = "iamanotherfreeuser";
/// user-2, group gold: 200 tokens a minute.
const GOLD: &str = "iamagolduser";
const FREE_LIMIT: u64 = 50;
const GOLD_LIMIT: u64 = 200;

/// Bounded waits: long enough for a loaded machine, never the expected duration of anything.
const WAIT: Duration = Duration::from_secs(20);

/// What reservation mode reserves for `chat_body(words, max_tokens, _)` under a limit of
/// `limit`: the prompt estimate (a token per word: each "word" is 4 characters, and a word of up
/// to 5 is one token) + the declared maximum, at most the limit.
fn reserved_for(words: usize, max_tokens: u64, limit: u64) -> u64 {
    let prompt = e2e::prompt_estimate(CHAT, &chat_body(words, max_tokens, false));
    assert_eq!(prompt, words as u64);
    (prompt + max_tokens).min(limit)
}

const CHAT: &str = "/v1/chat/completions";

/// The fallback estimate of chat `request` (its body read, as reservation mode does) answered
/// with the event stream `response` (the bytes that passed): the prompt's text plus the
/// answer's generated text, by the filter's rule.
fn estimate(request: &Value, response: &[u8]) -> u64 {
    e2e::prompt_estimate(CHAT, request)
        + e2e::answer_estimate_of(CHAT, Some("text/event-stream"), None, response)
}

fn stat(stack: &Stack, name: &str) -> u64 {
    stack.envoy_stat(&format!("wasmcustom.token_ratelimit.{name}"))
}

/// A stack with two Envoy workers in admission mode `mode`, with further `edits`.
fn stack(mode: Option<&'static str>, edits: Vec<(String, String)>) -> Stack {
    Stack::start(Options {
        concurrency: 2,
        mode,
        edits,
        ..Options::default()
    })
}

/// The gold budget replaced by `limit`.
fn gold_limit(limit: u64) -> (String, String) {
    (
        "- {limit: 200, window: 1m}".into(),
        format!("- {{limit: {limit}, window: 1m}}"),
    )
}

/// A refusal as the filter sends it: 429, OpenAI's error shape, `retry-after` in seconds.
fn assert_refused(r: &Reply, what: &str) {
    assert_eq!(r.status, 429, "{what}: {}", r.body);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded", "{what}");
    let retry_after: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: no retry-after"))
        .parse()
        .expect("retry-after in seconds");
    assert!((1..=60).contains(&retry_after), "{what}: retry-after {retry_after}");
}

/// Waits for the charge to settle: no hold left, then no further charge for 300 ms. Returns
/// the tokens charged.
fn settled_charge(stack: &Stack) -> u64 {
    assert!(
        stack.await_no_holds(WAIT),
        "holds left: {}",
        stack.counters()
    );
    let mut last = stack.reported_tokens();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = stack.reported_tokens();
        if now == last {
            return now;
        }
        last = now;
    }
}

/// A POST through Envoy's listener on `port` from a client of its own (usable while the
/// stack is borrowed mutably): the status, or the error.
fn post_to(port: u16, key: &str, body: &Value, headers: &[(&str, &str)]) -> Result<u16, String> {
    let resp =
        e2e::try_stream_request_to(port, key, body, headers).map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    resp.bytes().map_err(|e| e.to_string())?;
    Ok(status)
}

// ---------------------------------------------------------------------------------------------
// A burst of concurrent requests

/// What a burst did.
struct Burst {
    /// The served total of each admitted request (from its answer's usage).
    admitted: Vec<u64>,
    /// The refused answers.
    refused: Vec<Reply>,
    /// The most the gold counter showed (charged + held) while the burst ran.
    peak_committed_and_held: u64,
}

const BURST: usize = 30;
const BURST_MAX_TOKENS: u64 = 100;

/// 30 concurrent gold requests of 2 words and `max_tokens: 100`, each answered after 2 s.
fn burst(stack: &Stack) -> Burst {
    let body = chat_body(2, BURST_MAX_TOKENS, false);
    let start = std::sync::Barrier::new(BURST + 1);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (replies, peak) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..BURST)
            .map(|_| {
                let (body, start) = (&body, &start);
                s.spawn(move || {
                    start.wait();
                    stack.post_with(
                        "/v1/chat/completions",
                        Some(GOLD),
                        body,
                        &[("x-simulator-latency-ms", "2000")],
                    )
                })
            })
            .collect();
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(c) = stack.counter_of("user-2") {
                    peak = peak.max(c.value + c.reserved);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        start.wait();
        let replies: Vec<Reply> = clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (replies, sampler.join().expect("sampler"))
    });
    let mut burst = Burst {
        admitted: Vec::new(),
        refused: Vec::new(),
        peak_committed_and_held: peak,
    };
    for r in replies {
        match r.status {
            200 => burst.admitted.push(r.usage_total()),
            429 => burst.refused.push(r),
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    burst
}

#[test]
fn reservation_mode_holds_a_burst_of_30_concurrent_requests_to_the_budget() {
    let stack = stack(Some("reservation"), vec![]);
    let b = burst(&stack);
    let reserved = reserved_for(2, BURST_MAX_TOKENS, GOLD_LIMIT);
    assert_eq!(reserved, 102);
    // What the admitted requests were served beyond what they reserved (0 here: 102 each).
    let beyond: u64 = b.admitted.iter().map(|&s| s.saturating_sub(reserved)).sum();
    let charged = settled_charge(&stack);
    let served = stack.served_tokens(GOLD);
    eprintln!(
        "reservation burst: {} admitted, {} refused; charged {charged} (budget {GOLD_LIMIT}, \
         served beyond the reservations {beyond}); peak charged + held {}",
        b.admitted.len(),
        b.refused.len(),
        b.peak_committed_and_held
    );
    assert!(!b.admitted.is_empty(), "nothing admitted");
    assert_eq!(b.admitted.len() + b.refused.len(), BURST);
    assert!(
        charged <= GOLD_LIMIT + beyond,
        "charged {charged} > budget {GOLD_LIMIT} + {beyond}"
    );
    assert!(
        b.peak_committed_and_held <= GOLD_LIMIT + beyond,
        "the counter showed {} charged + held",
        b.peak_committed_and_held
    );
    for r in &b.refused {
        assert_refused(r, "a refused request of the burst");
    }
    // Once the admitted requests are done, the counter is exactly what was served.
    assert_eq!(served, b.admitted.iter().sum::<u64>());
    assert_eq!(charged, served);
    assert_eq!(stack.committed_tokens(), served);
    let c = stack.counter_of("user-2").expect("the gold counter");
    assert_eq!((c.value, c.reserved), (served, 0));
    assert_eq!(
        stack.upstream_requests(),
        b.admitted.len() as u64,
        "a refused request reached the upstream"
    );
}

#[test]
fn check_report_mode_lets_a_burst_of_30_concurrent_requests_overshoot_within_its_bound() {
    let stack = stack(Some("checkReport"), vec![]);
    let b = burst(&stack);
    let most = b.admitted.iter().copied().max().unwrap_or(0);
    let charged = stack.await_reported(stack.served_tokens(GOLD));
    let bound = GOLD_LIMIT - 1 + b.admitted.len() as u64 * most;
    eprintln!(
        "checkReport burst: {} admitted, {} refused; charged {charged} (budget {GOLD_LIMIT}, \
         bound {bound})",
        b.admitted.len(),
        b.refused.len()
    );
    assert_eq!(charged, stack.served_tokens(GOLD), "reported = served");
    assert_eq!(charged, b.admitted.iter().sum::<u64>());
    assert!(charged <= bound, "charged {charged} > {bound}");
    // The point of the comparison: every request was checked before any was charged.
    assert!(
        charged > GOLD_LIMIT,
        "checkReport did not overshoot: {charged}"
    );
    for r in &b.refused {
        assert_refused(r, "a refused request of the burst");
    }
    assert_eq!(stack.committed_tokens(), 0);
}

// ---------------------------------------------------------------------------------------------
// Holds are released when a request ends

#[test]
fn a_finished_request_releases_its_hold_so_the_next_is_admitted_against_actual_spend() {
    let stack = stack(Some("reservation"), vec![]);
    // Reserves 2 + 45 = 47 of the free user's 50, is served 2 + 2 = 4 (the simulator stops at
    // 2 completion tokens), slowly.
    let big = reserved_for(2, 45, FREE_LIMIT);
    assert_eq!(big, 47);
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            stack.post_with(
                "/v1/chat/completions",
                Some(FREE),
                &chat_body(2, 45, false),
                &[
                    ("x-simulator-completion-tokens", "2"),
                    ("x-simulator-latency-ms", "3000"),
                ],
            )
        });
        assert!(
            wait_until("the first request's hold", WAIT, || stack
                .counter_of("user-1")
                .is_some_and(|c| c.reserved == big)),
            "{}",
            stack.counters()
        );
        // While it is held, a request of 7 (47 + 7 > 50) is refused though 7 alone would fit.
        let r = stack.chat(FREE, 2, 5);
        assert_refused(&r, "a request beside the hold");
        assert!(
            !first.is_finished(),
            "the first request ended before the refusal: the refusal proves nothing"
        );
        let r = first.join().expect("first request");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.usage_total(), 4);
    });
    // Its commit charged 4 and released 47.
    assert!(stack.await_no_holds(WAIT), "{}", stack.counters());
    let c = stack.counter_of("user-1").expect("counter");
    assert_eq!((c.value, c.reserved), (4, 0));
    // 4 + 42 fits in 50; with the first hold still there (4 + 47 + 42) it would not.
    let next = reserved_for(2, 40, FREE_LIMIT);
    assert_eq!(next, 42);
    let r = stack.chat(FREE, 2, 40);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(settled_charge(&stack), 4 + 42);
    assert_eq!(stack.served_tokens(FREE), 4 + 42);
    assert_eq!(stack.counter_of("user-1").map(|c| c.value), Some(46));
}

#[test]
fn a_client_abort_mid_stream_releases_the_hold_and_charges_what_passed() {
    // A budget the fallback estimate of a part of a stream fits in, so that the counter shows
    // the charge exactly.
    let stack = stack(Some("reservation"), vec![gold_limit(100_000)]);
    let body = chat_body(3, 100, true);
    let reserved = reserved_for(3, 100, 100_000);
    let mut conn = stack.connect();
    conn.send_post(
        "/v1/chat/completions",
        GOLD,
        &body,
        &[("x-simulator-token-delay-ms", "50")],
    )
    .expect("send");
    assert!(
        wait_until("the stream's hold", WAIT, || stack
            .counter_of("user-2")
            .is_some_and(|c| c.reserved == reserved)),
        "{}",
        stack.counters()
    );
    // Read 5 word chunks (of a 100-word stream, 50 ms a word), then hang up.
    while String::from_utf8_lossy(conn.buffered())
        .matches("\"content\":\"")
        .count()
        < 5
    {
        conn.read_more().expect("the stream");
    }
    let got = conn.buffered().to_vec();
    drop(conn);
    let charged = settled_charge(&stack);
    let c = stack.counter_of("user-2").expect("counter");
    eprintln!(
        "client abort: reserved {reserved}, client got {} bytes, charged {charged}, the simulator \
         served {}",
        got.len(),
        stack.served_tokens(GOLD)
    );
    assert_eq!((c.value, c.reserved), (charged, 0));
    assert_eq!(stack.committed_tokens(), charged);
    // No usage came: the estimate over what passed the filter, at least what the client got.
    let (head, rest) = e2e::split_head(&got).expect("head");
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let lower = estimate(&body, &e2e::dechunk(rest));
    assert!(charged >= lower, "charged {charged} < {lower}");
    assert!(
        stack.served_tokens(GOLD) < 3 + 100,
        "the upstream kept streaming"
    );
    assert_eq!(stat(&stack, "usage_estimated"), 1);
}

#[test]
fn an_upstream_reset_mid_stream_releases_the_hold_and_charges_what_passed() {
    let stack = stack(Some("reservation"), vec![gold_limit(100_000)]);
    let body = chat_body(3, 50, true);
    let mut conn = stack.connect();
    conn.send_post(
        "/v1/chat/completions",
        GOLD,
        &body,
        &[("x-simulator-abort-after", "10")],
    )
    .expect("send");
    // The client sees the body cut (Envoy resets or closes the connection).
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match conn.stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("tok10") && !text.contains("tok11"), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let charged = settled_charge(&stack);
    let c = stack.counter_of("user-2").expect("counter");
    assert_eq!((c.value, c.reserved), (charged, 0));
    assert_eq!(stack.committed_tokens(), charged);
    // No usage came: the estimate over what passed the filter, at least what the client got.
    let (_, rest) = e2e::split_head(&got).expect("head");
    let lower = estimate(&body, &e2e::dechunk(rest));
    assert!(charged >= lower, "charged {charged} < {lower}");
    eprintln!(
        "upstream reset after 10 of 50 words: reserved {}, charged {charged}, served {}",
        reserved_for(3, 50, 100_000),
        stack.served_tokens(GOLD)
    );
    assert_eq!(stack.served_tokens(GOLD), 3 + 10);
}

// ---------------------------------------------------------------------------------------------
// Envoy killed mid-request: the hold expires

/// `reservation.ttl` of the plugin configuration set to `ttl`.
fn reservation_ttl(ttl: &str) -> (String, String) {
    (
        "                    limits:\n".into(),
        format!("                    reservation:\n                      ttl: {ttl}\n                    limits:\n"),
    )
}

fn killed_envoy_leaves_a_hold_that_expires(mut stack: Stack) {
    let port = stack.ports.listener;
    let reserved = reserved_for(3, 100, GOLD_LIMIT);
    let client = std::thread::spawn(move || {
        post_to(
            port,
            GOLD,
            &chat_body(3, 100, false),
            &[("x-simulator-latency-ms", "30000")],
        )
    });
    assert!(
        wait_until("the hold", WAIT, || stack
            .counter_of("user-2")
            .is_some_and(|c| c.reserved == reserved)),
        "{}",
        stack.counters()
    );
    let killed = Instant::now();
    stack.envoy.kill();
    let held_after_kill = stack.reserved_total();
    let answer = client.join().expect("client");
    assert!(
        !matches!(answer, Ok(200)),
        "the request was served: {answer:?}"
    );
    // Nothing but its TTL releases the hold: nobody is left to commit.
    assert!(stack.await_no_holds(WAIT), "{}", stack.counters());
    eprintln!(
        "Envoy killed holding {held_after_kill}; hold gone {:?} after the kill; client saw {answer:?}",
        killed.elapsed()
    );
    let c = stack.counter_of("user-2").expect("the counter (its window started)");
    assert_eq!((c.value, c.reserved), (0, 0), "unserved tokens were charged");
    assert_eq!(stack.service_metric("ratelimit_commit_calls_total"), 0);
    assert_eq!(stack.reported_tokens(), 0);
    assert_eq!(stack.served_tokens(GOLD), 0);
}

#[test]
fn an_envoy_killed_mid_request_leaves_a_hold_that_expires_after_the_filters_ttl_and_charges_nothing(
) {
    killed_envoy_leaves_a_hold_that_expires(stack(
        Some("reservation"),
        vec![reservation_ttl("2s")],
    ));
}

#[test]
fn an_envoy_killed_mid_request_leaves_a_hold_that_expires_after_the_services_max_ttl_and_charges_nothing(
) {
    killed_envoy_leaves_a_hold_that_expires(Stack::start(Options {
        concurrency: 2,
        mode: Some("reservation"),
        service_args: vec!["--max-reservation-ttl".into(), "2".into()],
        ..Options::default()
    }));
}

/// A request that outlives its hold (a 2 s answer, a 1 s hold) is still charged in full: its
/// commit adds what was served although the hold had expired, and the filter counts it.
#[test]
fn a_request_that_outlives_its_hold_is_charged_in_full_and_counted() {
    let stack = stack(Some("reservation"), vec![reservation_ttl("1s")]);
    let r = stack.post_with(
        "/v1/chat/completions",
        Some(GOLD),
        &chat_body(3, 40, false),
        &[("x-simulator-latency-ms", "2000")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let served = r.usage_total();
    assert_eq!(stack.served_tokens(GOLD), served);
    assert_eq!(settled_charge(&stack), served);
    assert!(
        wait_until("the expired hold counted", WAIT, || stat(
            &stack,
            "reservations_expired"
        ) == 1),
        "reservations_expired: {}",
        stat(&stack, "reservations_expired")
    );
    let c = stack.counter_of("user-2").expect("the counter");
    assert_eq!((c.value, c.reserved), (served, 0));
}

// ---------------------------------------------------------------------------------------------
// checkReport: a request right after one that spent the budget

/// Free users user-10, user-11, ... (keys `iamfree10`, ...) added to the auth step.
fn more_free_users(n: usize) -> (String, String) {
    let line = "                    [\"iamanotherfreeuser\"] = identity(\"user-3\", \"free\"),\n";
    let mut to = line.to_string();
    for i in 0..n {
        to.push_str(&format!(
            "                    [\"iamfree{}\"] = identity(\"user-{}\", \"free\"),\n",
            10 + i,
            10 + i
        ));
    }
    (line.into(), to)
}

/// The first request spends a free user's budget (2 + 50 = 52 of 50): its answer arrives
/// whole; the second, sent the moment it ended (on `second`, else on the same connection),
/// must be refused.
fn spend_then_ask(first: &mut e2e::Conn, second: Option<&mut e2e::Conn>, key: &str) {
    let r = first
        .post("/v1/chat/completions", key, &chat_body(2, 50, false), &[])
        .expect("first request");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.usage_total(), 52, "the first answer arrives whole");
    assert!(r.json()["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|c| c.ends_with("tok50")));
    let r = second
        .unwrap_or(first)
        .post("/v1/chat/completions", key, &chat_body(2, 1, false), &[])
        .expect("second request");
    assert_refused(&r, key);
}

#[test]
fn check_report_mode_refuses_a_request_sent_right_after_one_that_spent_the_budget_on_either_worker(
) {
    let stack = stack(Some("checkReport"), vec![more_free_users(2)]);
    // A refusal sent before the request body was read ends an HTTP/1.1 connection (Envoy
    // closes it rather than read the body), so each case takes fresh connections.
    let [mut w0, mut w1] = stack.one_connection_per_worker();
    // Spent on worker 0, asked on worker 1, and the other way round.
    spend_then_ask(&mut w0, Some(&mut w1), FREE);
    let [mut w0, mut w1] = stack.one_connection_per_worker();
    spend_then_ask(&mut w1, Some(&mut w0), FREE_2);
    // On a new connection, wherever it lands.
    let [mut w0, _] = stack.one_connection_per_worker();
    let mut b = stack.connect();
    spend_then_ask(&mut w0, Some(&mut b), "iamfree10");
    // On one keep-alive connection.
    let mut c = stack.connect();
    spend_then_ask(&mut c, None, "iamfree11");
    let served = stack.served_tokens(FREE)
        + stack.served_tokens(FREE_2)
        + stack.served_tokens("iamfree10")
        + stack.served_tokens("iamfree11");
    assert_eq!(served, 4 * 52, "a refused request reached the upstream");
    assert_eq!(stack.await_reported(served), served);
    assert_eq!(stat(&stack, "requests_limited.free"), 4);
}

// ---------------------------------------------------------------------------------------------
// Reservation mode: sequential requests, late bodies, an idle reader

#[test]
fn reservation_mode_holds_30_back_to_back_requests_on_one_keep_alive_connection_to_the_budget() {
    let stack = stack(Some("reservation"), vec![]);
    let reserved = reserved_for(2, 20, FREE_LIMIT);
    let mut conn = stack.connect();
    let mut statuses = Vec::new();
    let mut beyond = 0;
    for i in 0..30 {
        let r = conn
            .post("/v1/chat/completions", FREE, &chat_body(2, 20, false), &[])
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        statuses.push(r.status);
        match r.status {
            200 => beyond += r.usage_total().saturating_sub(reserved),
            _ => assert_refused(&r, &format!("request {i}")),
        }
    }
    let served = stack.served_tokens(FREE);
    let charged = settled_charge(&stack);
    eprintln!("30 back-to-back: {statuses:?}; served {served}, charged {charged}");
    assert!(served <= FREE_LIMIT + beyond, "served {served}");
    assert_eq!(charged, served);
    assert_eq!(stack.counter_of("user-1").map(|c| c.value), Some(served));
    // One after another, each admission sees every earlier commit: 0 + 22 and 22 + 22 fit,
    // 44 + 22 does not.
    assert_eq!(statuses, [vec![200; 2], vec![429; 28]].concat());
}

#[test]
fn reservation_mode_holds_requests_whose_bodies_come_late_to_the_budget() {
    let stack = stack(Some("reservation"), vec![]);
    let body = chat_body(2, 20, false);
    let reserved = reserved_for(2, 20, FREE_LIMIT);
    // Ten connections send their heads, then their bodies 0.3 s apart.
    let mut conns: Vec<e2e::Conn> = (0..10)
        .map(|_| {
            let mut c = stack.connect();
            c.send_post_head("/v1/chat/completions", FREE, &body, &[])
                .expect("head");
            c
        })
        .collect();
    for c in conns.iter_mut() {
        std::thread::sleep(Duration::from_millis(300));
        c.send_body(body.to_string().as_bytes()).expect("body");
    }
    let replies: Vec<Reply> = conns
        .iter_mut()
        .map(|c| c.read_response().expect("answer"))
        .collect();
    let mut beyond = 0;
    for r in &replies {
        match r.status {
            200 => beyond += r.usage_total().saturating_sub(reserved),
            _ => assert_refused(r, "a late body"),
        }
    }
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    let served = stack.served_tokens(FREE);
    let charged = settled_charge(&stack);
    eprintln!("late bodies: {statuses:?}; served {served}, charged {charged}");
    assert!(statuses.contains(&200), "nothing admitted");
    assert!(
        charged <= FREE_LIMIT + beyond,
        "charged {charged} > {FREE_LIMIT} + {beyond}"
    );
    assert_eq!(charged, served);
    assert_eq!(stack.counter_of("user-1").map(|c| c.value), Some(served));
}

#[test]
fn reservation_mode_holds_an_idle_readers_tokens_up_front_and_commits_what_was_served() {
    let stack = stack(Some("reservation"), vec![]);
    // A stream that declares 1000 completion tokens (the hold: the whole gold budget, 200) and
    // is served 150 of them, 30 ms apart.
    let body = chat_body(3, 1000, true);
    let held = reserved_for(3, 1000, GOLD_LIMIT);
    assert_eq!(held, GOLD_LIMIT);
    let mut reader = stack.connect();
    reader
        .send_post(
            "/v1/chat/completions",
            GOLD,
            &body,
            &[
                ("x-simulator-completion-tokens", "150"),
                ("x-simulator-token-delay-ms", "30"),
            ],
        )
        .expect("send");
    // It reads 2 KB, then reads nothing more.
    let got = reader.read_at_least(2048).expect("2 KB").len();
    assert!(
        wait_until("the idle reader's hold", WAIT, || stack
            .counter_of("user-2")
            .is_some_and(|c| c.reserved == held)),
        "{}",
        stack.counters()
    );
    // While it is held, the same user's requests are refused: even 2 + 1 tokens do not fit.
    let r = stack.chat(GOLD, 1, 1);
    assert_refused(&r, "beside the idle reader");
    assert_eq!(
        stack.counter_of("user-2").map(|c| c.reserved),
        Some(held),
        "the hold ended before the refusal: the refusal proves nothing"
    );
    // The upstream finishes (Envoy buffers the rest for the idle client): the commit charges
    // what was served and releases the hold, while the client still reads nothing.
    let streamed = 3 + 150;
    assert!(
        wait_until("the commit", Duration::from_secs(60), || stack
            .counter_of("user-2")
            .is_some_and(|c| c.reserved == 0 && c.value == streamed)),
        "{}",
        stack.counters()
    );
    assert_eq!(stack.served_tokens(GOLD), streamed);
    // The budget left after the actual spend admits the same user again.
    let r = stack.chat(GOLD, 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    // The client finally reads the rest and closes: nothing more is charged.
    let whole = reader.read_response().expect("the rest of the stream");
    assert_eq!(whole.status, 200);
    assert!(whole.body.ends_with("data: [DONE]\n\n"), "{}", whole.body);
    assert!(
        whole.body.contains(&format!("\"total_tokens\":{streamed}")),
        "{}",
        whole.body
    );
    drop(reader);
    let charged = settled_charge(&stack);
    eprintln!("idle reader: read {got} bytes, held {held}; charged {charged}");
    assert_eq!(charged, streamed + 22);
    assert_eq!(charged, stack.served_tokens(GOLD));
}

// ---------------------------------------------------------------------------------------------
// auto against a service without Reserve (Limitador 2.4)

#[test]
fn auto_falls_back_to_check_report_against_a_service_without_reserve_and_keeps_limiting() {
    let stack = Stack::start(Options {
        concurrency: 2,
        service_args: vec!["--reservations-unimplemented".into()],
        ..Options::default()
    });
    // Requests one at a time, each on a new connection (wherever it lands): the free user's
    // checks see 0, 22, 44 (< 50), then 66.
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let r = stack.raw_post("/v1/chat/completions", FREE, &chat_body(2, 20, false), &[]);
        statuses.push(r.status);
        if r.status != 200 {
            assert_refused(&r, "the spent free user");
            break;
        }
        let served = stack.served_tokens(FREE);
        assert_eq!(stack.await_reported(served), served);
    }
    assert_eq!(statuses, vec![200, 200, 200, 429]);
    // Requests on both workers.
    let [mut w0, mut w1] = stack.one_connection_per_worker();
    for conn in [&mut w0, &mut w1] {
        let r = conn
            .post("/v1/chat/completions", GOLD, &chat_body(2, 20, false), &[])
            .expect("gold");
        assert_eq!(r.status, 200, "{}", r.body);
        let r = conn
            .post("/v1/chat/completions", FREE, &chat_body(2, 20, false), &[])
            .expect("free");
        assert_refused(&r, "the spent free user on each worker");
    }
    let served = stack.served_tokens(FREE) + stack.served_tokens(GOLD);
    assert_eq!(served, 3 * 22 + 2 * 22);
    assert_eq!(stack.await_reported(served), served);
    assert_eq!(stack.report_hits(), served, "charged by Report");
    assert_eq!(stack.committed_tokens(), 0);
    // Each worker's VM tried Reserve once, logged the fallback once and counted it once.
    let warned = stack.envoy_log_count("does not implement Reserve");
    let fell_back = stat(&stack, "reservations_unimplemented");
    let reserves = stack.service_metric("ratelimit_reserve_calls_total");
    eprintln!("auto fallback: {warned} warn lines, counter {fell_back}, {reserves} Reserve calls");
    assert_eq!(warned, 2, "{}", stack.envoy.output());
    assert_eq!(fell_back, 2);
    assert_eq!(reserves, 2, "a VM kept trying Reserve");
    assert!(stack
        .envoy
        .output()
        .lines()
        .filter(|l| l.contains("does not implement Reserve"))
        .all(|l| l.contains("warn")));
}
