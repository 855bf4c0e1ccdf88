//! Scenarios of admission by reservation (`rateLimitService.mode: reservation`, and `auto`, the
//! default), driven through the real wasm module: one `Reserve` per token category before the
//! upstream, one `Commit` per reservation at the end, dispatched at once from the stream as the
//! root context's call; every answer the service can give to either, what a request reserves,
//! and what an abort or a late answer costs. Nothing depends on wall-clock time.

mod common;

use common::*;
use proxy_wasm_host::{
    grpc_status, Action, CallState, GrpcCall, LogLevel, Plugin, Stream, WasmResult,
};
use ratelimit_proto::{
    Code, CommitRequest, CommitResponse, DescriptorStatus, RateLimitRequest, ReserveRequest,
    ReserveResponse,
};
use serde_json::{json, Value};
use std::time::Duration;

// =============================================================================================
// Helpers

const RESERVE: &str = "kuadrant.service.ratelimit.v1.RateLimitService/Reserve";
const COMMIT: &str = "kuadrant.service.ratelimit.v1.RateLimitService/Commit";

const REQUEST_BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// What the filter logs, once per VM, when it falls back from reservation to checkReport.
const FALLBACK_WARNING: &str = "does not implement Reserve";

/// The tutorial's limit (50 tokens a minute per user on chat completions) in admission mode
/// `mode`.
fn tutorial(mode: &str) -> Config {
    Config::tutorial().set(&["rateLimitService", "mode"], json!(mode))
}

/// Per-user limits of 1000 tokens a minute on every request, spending total (`all`) and prompt
/// (`in`) tokens, in admission mode `mode`.
fn two_categories(mode: &str) -> Config {
    Config::service()
        .set(&["rateLimitService", "mode"], json!(mode))
        .limit("all", per_user_limit("total"))
        .limit("in", per_user_limit("prompt"))
}

/// [`two_categories`] and a third limit `out` spending completion tokens.
fn three_categories(mode: &str) -> Config {
    two_categories(mode).limit("out", per_user_limit("completion"))
}

/// A `Reserve` the module dispatched, decoded.
#[derive(Debug, Clone)]
struct Reserve {
    call: GrpcCall,
    request: ReserveRequest,
}

impl Reserve {
    fn entries(&self) -> Vec<(String, String)> {
        assert_eq!(self.request.descriptors.len(), 1, "{:?}", self.request);
        entries(&self.request.descriptors[0])
    }

    fn amount(&self) -> u64 {
        self.request.amount
    }
}

/// The pending `Reserve` calls of `stream`, in dispatch order: each dispatched by the stream (the
/// root context's call, as every call in Envoy), to the service, in the domain.
fn reserves_of(stream: &Stream) -> Vec<Reserve> {
    stream
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == "Reserve")
        .map(|call| {
            assert_eq!(call.full_method(), RESERVE);
            assert_eq!(call.upstream, "ratelimit");
            assert_eq!(call.context_id, stream.id());
            let request: ReserveRequest = call.decode();
            assert_eq!(request.domain, "llm");
            Reserve { call, request }
        })
        .collect()
}

/// The one pending `Reserve` of `stream`.
fn reserve_of(stream: &Stream) -> Reserve {
    let reserves = reserves_of(stream);
    assert_eq!(reserves.len(), 1, "one pending reservation: {reserves:?}");
    reserves.into_iter().next().unwrap()
}

/// OK: the service holds the amount under `id`.
fn granted(id: &str, statuses: Vec<DescriptorStatus>) -> ReserveResponse {
    ReserveResponse {
        code: Code::Ok as i32,
        reservation_id: id.into(),
        statuses,
        hold_ttl: None,
    }
}

/// OVER_LIMIT: nothing held.
fn refused(statuses: Vec<DescriptorStatus>) -> ReserveResponse {
    ReserveResponse {
        code: Code::OverLimit as i32,
        reservation_id: String::new(),
        statuses,
        hold_ttl: None,
    }
}

/// What a commit carries: descriptor entries, reservation id, actual amount.
type CommitSummary = (Vec<(String, String)>, String, u64);

/// A `Commit` the module dispatched, decoded.
#[derive(Debug, Clone)]
struct Commit {
    call: GrpcCall,
    request: CommitRequest,
}

impl Commit {
    /// `(descriptor entries, reservation id, actual amount)`.
    fn summary(&self) -> CommitSummary {
        assert_eq!(self.request.descriptors.len(), 1, "{:?}", self.request);
        (
            entries(&self.request.descriptors[0]),
            self.request.reservation_id.clone(),
            self.request.actual_amount,
        )
    }
}

/// The pending `Commit` calls, in dispatch order: each the root context's call, dispatched with
/// the root context effective (also from a stream's callback), to the service, in the domain.
fn pending_commits(plugin: &Plugin) -> Vec<Commit> {
    let root = plugin.root_context_id();
    plugin
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == "Commit")
        .map(|call| {
            assert_eq!(call.full_method(), COMMIT);
            assert_eq!(call.upstream, "ratelimit");
            assert_eq!(
                call.context_id, root,
                "dispatched as the root context's call"
            );
            assert_eq!(call.root_context_id, root);
            let request: CommitRequest = call.decode();
            assert_eq!(request.domain, "llm");
            Commit { call, request }
        })
        .collect()
}

/// Answers a commit: its hold was still live (`released`) or had expired.
fn answer_commit(plugin: &Plugin, commit: &Commit, released: bool) {
    plugin.reply_grpc_message(
        commit.call.token,
        &CommitResponse {
            reservation_released: released,
        },
    );
}

/// The pending commits, each answered `reservation_released: true`.
fn commits_delivered(plugin: &Plugin) -> Vec<CommitSummary> {
    pending_commits(plugin)
        .into_iter()
        .map(|c| {
            answer_commit(plugin, &c, true);
            c.summary()
        })
        .collect()
}

/// Alice's chat request with [`REQUEST_BODY`], its one reservation granted as `id`, answered
/// with `prompt` + `completion` tokens in one JSON chunk that ends the stream (not finished).
fn served(plugin: &Plugin, id: &str, prompt: u64, completion: u64) -> Stream {
    let stream = post(plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    let reserve = reserve_of(&stream);
    plugin.reply_grpc_message(reserve.call.token, &granted(id, vec![]));
    assert_eq!(stream.request_resumed(), 1);
    respond(
        &stream,
        Some("application/json"),
        &[&openai_json(prompt, completion)],
    );
    stream
}

/// Nothing left in flight after a tick: no commit, no report, no check.
fn assert_nothing_more_sent(plugin: &Plugin) {
    plugin.tick();
    assert!(
        plugin.pending_grpc_calls().is_empty(),
        "{:?}",
        plugin.pending_grpc_calls()
    );
}

/// The warnings of the fallback to checkReport.
fn fallback_warnings(plugin: &Plugin) -> usize {
    plugin
        .logs_at_least(LogLevel::Warn)
        .iter()
        .filter(|l| l.contains(FALLBACK_WARNING))
        .count()
}

// =============================================================================================
// Granted

#[test]
fn a_granted_reservation_resumes_adds_the_rate_limit_headers_and_commits_the_actual_tokens_with_its_id_from_the_root_context(
) {
    let plugin = tutorial("reservation").start();
    let root = plugin.root_context_id();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    assert_eq!(
        stream.request_body(REQUEST_BODY, true),
        Action::Buffered,
        "held for the reservation"
    );
    let reserve = reserve_of(&stream);
    assert!(
        plugin
            .pending_grpc_calls()
            .iter()
            .all(|c| c.method == "Reserve"),
        "no check: {:?}",
        plugin.pending_grpc_calls()
    );
    assert_eq!(reserve.entries(), user_descriptor("free", "alice"));
    assert_eq!(
        reserve.amount(),
        50,
        "reservation.defaultAmount (256) capped by the limit's 50 a minute"
    );
    assert_eq!(
        reserve.request.ttl,
        Some(prost_types::Duration {
            seconds: 60,
            nanos: 0
        }),
        "reservation.ttl's default"
    );
    assert_eq!(reserve.call.timeout, Duration::from_millis(100));

    plugin.reply_grpc_message(
        reserve.call.token,
        &granted(
            "hold-1",
            vec![status(
                Code::Ok,
                "free",
                50,
                20,
                Duration::from_millis(29_500),
            )],
        ),
    );
    assert_eq!(
        plugin.grpc_call(reserve.call.token).state,
        CallState::Answered
    );
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(stream.local_reply(), None);
    assert_eq!(stream.request_body_forwarded(), REQUEST_BODY);

    response_headers(&stream, Some("application/json"), &[]);
    assert_eq!(
        stream.response_headers_added(),
        pairs(&[
            ("x-ratelimit-limit", "50"),
            ("x-ratelimit-remaining", "20"),
            ("x-ratelimit-reset", "30"),
        ]),
        "from the reservation's statuses"
    );
    assert!(
        pending_commits(&plugin).is_empty(),
        "nothing before the end"
    );
    assert_eq!(
        stream.response_body(openai_json(3, 4), true),
        Action::Continue
    );

    // At the end of the stream, at once.
    let commits = pending_commits(&plugin);
    assert_eq!(commits.len(), 1, "{commits:?}");
    assert_eq!(
        commits[0].summary(),
        (user_descriptor("free", "alice"), "hold-1".into(), 7)
    );
    assert_eq!(
        commits[0].call.timeout,
        Duration::from_secs(1),
        "reporting.timeout's default"
    );
    assert_eq!(
        stream.effective_context_switches(),
        [root, stream.id()],
        "the root made effective for the dispatch, then the stream again"
    );
    assert_eq!(metric(&plugin, "commits_sent"), 1);
    answer_commit(&plugin, &commits[0], true);
    stream.finish();

    assert_nothing_more_sent(&plugin);
    assert_eq!(metric(&plugin, "requests_checked"), 1);
    assert_eq!(metric(&plugin, "requests_allowed"), 1);
    assert_eq!(metric(&plugin, "tokens_reported.total"), 7);
    assert_eq!(metric(&plugin, "reports_sent"), 0, "a commit, not a report");
    assert_eq!(metric(&plugin, "reservations_expired"), 0);
}

#[test]
fn auto_is_the_default_mode_and_admits_by_reservation() {
    let mut no_mode = Config::tutorial();
    no_mode.0["rateLimitService"]
        .as_object_mut()
        .unwrap()
        .remove("mode");
    for config in [no_mode, tutorial("auto")] {
        let plugin = config.start();
        let stream = served(&plugin, "hold-1", 1, 2);
        assert_eq!(
            commits_delivered(&plugin),
            vec![(user_descriptor("free", "alice"), "hold-1".into(), 3)]
        );
        stream.finish();
        assert_nothing_more_sent(&plugin);
        assert_eq!(metric(&plugin, "reservations_unimplemented"), 0);
    }
}

// =============================================================================================
// Refused

#[test]
fn an_over_limit_reservation_is_a_429_with_retry_after_and_releases_the_holds_other_categories_got_with_0(
) {
    let plugin = two_categories("reservation").start();
    let root = plugin.root_context_id();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    let reserves = reserves_of(&stream);
    assert_eq!(reserves.len(), 2, "one per token category: {reserves:?}");
    assert_eq!(reserves[0].entries(), user_descriptor("all", "alice"));
    assert_eq!(reserves[1].entries(), user_descriptor("in", "alice"));
    assert_eq!((reserves[0].amount(), reserves[1].amount()), (256, 256));

    plugin.reply_grpc_message(
        reserves[0].call.token,
        &granted(
            "hold-all",
            vec![status(Code::Ok, "all", 1000, 700, Duration::from_secs(60))],
        ),
    );
    assert_eq!(stream.request_resumed(), 0, "waits for every reservation");
    assert_eq!(stream.local_reply(), None);
    assert!(pending_commits(&plugin).is_empty());

    plugin.reply_grpc_message(
        reserves[1].call.token,
        &refused(vec![status(
            Code::OverLimit,
            "in",
            1000,
            0,
            Duration::from_secs(42),
        )]),
    );
    let limited = stream.local_reply().expect("a 429");
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("retry-after"), Some("42"));
    let body: Value = serde_json::from_slice(&limited.body).expect("JSON");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        body["error"]["message"],
        "Token rate limit exceeded for limit 'in'. Retry after the window resets."
    );
    assert_eq!(stream.request_resumed(), 0, "the upstream is never called");
    assert!(stream.request_body_forwarded().is_empty());
    assert_eq!(
        stream.response_headers(&[(":status", "200")], false),
        Action::NotCalled
    );

    // The hold the other category got is released at once, as the root context's call.
    let commits = pending_commits(&plugin);
    assert_eq!(
        commits.iter().map(Commit::summary).collect::<Vec<_>>(),
        vec![(user_descriptor("all", "alice"), "hold-all".into(), 0)],
        "only the granted hold is released"
    );
    // The reply came to the root context; the module handed it to the stream, made the root
    // effective to dispatch the release, then the stream again to send the 429.
    assert_eq!(
        plugin.effective_context_switches(),
        [
            (root, stream.id()),
            (root, stream.id()),
            (root, root),
            (root, stream.id())
        ]
    );
    answer_commit(&plugin, &commits[0], true);
    stream.finish();
    assert_nothing_more_sent(&plugin);
    assert_eq!(metric(&plugin, "requests_limited"), 1);
    assert_eq!(metric(&plugin, "requests_limited.in"), 1);
    assert_eq!(metric(&plugin, "requests_allowed"), 0);
    assert_eq!(metric(&plugin, "tokens_reported.total"), 0);
    assert_eq!(metric(&plugin, "commits_sent"), 1);
}

// =============================================================================================
// UNIMPLEMENTED

#[test]
fn under_auto_reserve_unimplemented_falls_back_to_a_check_of_the_same_request_then_checks_every_later_one(
) {
    let plugin = tutorial("auto").start();
    // Two requests reserving before the service's first answer.
    let alice = post(&plugin, Some("alice"), CHAT, &[]);
    alice.request_body(REQUEST_BODY, true);
    let bob = post(&plugin, Some("bob"), CHAT, &[]);
    bob.request_body(REQUEST_BODY, true);
    let (alice_reserve, bob_reserve) = (reserve_of(&alice), reserve_of(&bob));

    plugin.fail_grpc(
        alice_reserve.call.token,
        grpc_status::UNIMPLEMENTED,
        "unknown method Reserve",
    );
    assert_eq!(alice.request_resumed(), 0, "checked first");
    assert_eq!(alice.local_reply(), None);
    let check = check_of(&alice);
    assert_eq!(check.context_id, alice.id(), "dispatched for the stream");
    assert_eq!(check.decode::<RateLimitRequest>().hits_addend, 0);
    assert_eq!(entries_of(&check), user_descriptor("free", "alice"));
    assert_eq!(metric(&plugin, "reservations_unimplemented"), 1);
    assert_eq!(metric(&plugin, "service_errors"), 0, "not a failure");
    assert_eq!(fallback_warnings(&plugin), 1);

    answer(&plugin, &alice, &ok_with_room());
    assert_eq!(alice.request_resumed(), 1);
    assert_eq!(alice.request_body_forwarded(), REQUEST_BODY);
    respond(&alice, Some("application/json"), &[&openai_json(3, 4)]);
    alice.finish();
    assert!(
        pending_commits(&plugin).is_empty(),
        "no reservation, no commit"
    );

    // Bob's reservation in flight meets the same answer: checked too, no second warning.
    plugin.fail_grpc(bob_reserve.call.token, grpc_status::UNIMPLEMENTED, "");
    answer(&plugin, &bob, &ok_with_room());
    assert_eq!(bob.request_resumed(), 1);
    respond(&bob, Some("application/json"), &[&openai_json(1, 1)]);
    bob.finish();

    // Charged by report, on the tick.
    assert_eq!(
        tick_delivered(&plugin),
        vec![
            (user_descriptor("free", "alice"), 7),
            (user_descriptor("free", "bob"), 2)
        ]
    );

    // Later requests are checked directly.
    for user in ["carol", "dave"] {
        let stream = post(&plugin, Some(user), CHAT, &[]);
        assert!(reserves_of(&stream).is_empty(), "no Reserve any more");
        answer(&plugin, &stream, &ok_with_room());
        assert_eq!(stream.request_resumed(), 1);
    }
    assert_eq!(fallback_warnings(&plugin), 1, "logged once per VM");
    assert_eq!(metric(&plugin, "reservations_unimplemented"), 1);
    assert_eq!(metric(&plugin, "commits_sent"), 0);
    plugin.tick();
    assert_eq!(
        metric(&plugin, "requests_checked"),
        4,
        "a request that fell back is counted once"
    );

    // Another VM starts by reserving again.
    let other = tutorial("auto").start();
    let stream = post(&other, Some("alice"), CHAT, &[]);
    reserve_of(&stream);
}

#[test]
fn under_strict_reservation_reserve_unimplemented_follows_the_failure_mode_and_never_falls_back() {
    let (plugin, stream) = reserve_failing("deny", Failure::Unimplemented);
    assert_denied(&plugin, &stream);
    // Still reserving.
    let next = post(&plugin, Some("bob"), CHAT, &[]);
    reserve_of(&next);

    let (plugin, stream) = reserve_failing("allow", Failure::Unimplemented);
    assert_allowed_and_committed_without_id(&plugin, &stream);
    let next = post(&plugin, Some("bob"), CHAT, &[]);
    reserve_of(&next);
    assert_eq!(fallback_warnings(&plugin), 0);
}

// =============================================================================================
// Failures

/// How the service fails a reservation.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// gRPC status 12 (outside `auto`).
    Unimplemented,
    /// gRPC status 14.
    Unavailable,
    /// The call's deadline passes (gRPC status 4).
    Timeout,
    /// A reply that does not decode as a `ReserveResponse`.
    Garbage,
    /// A reply whose code is `UNKNOWN`.
    UnknownCode,
    /// The call cannot even be dispatched.
    Dispatch,
}

impl Failure {
    /// What the filter's warning says about it.
    fn logged_as(self) -> &'static str {
        match self {
            Failure::Unimplemented => "gRPC status 12",
            Failure::Unavailable => "gRPC status 14",
            Failure::Timeout => "gRPC status 4",
            Failure::Garbage => "undecodable reply",
            Failure::UnknownCode => "overall_code UNKNOWN",
            Failure::Dispatch => "dispatch failed",
        }
    }
}

/// Alice's chat request in admission mode `reservation` whose reservation fails as `failure`,
/// under `failureMode: mode`.
fn reserve_failing(mode: &str, failure: Failure) -> (Plugin, Stream) {
    let plugin = tutorial("reservation").failure_mode(mode).start();
    if let Failure::Dispatch = failure {
        plugin.set_dispatch_failure(Some(WasmResult::InternalFailure));
    }
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    plugin.set_dispatch_failure(None);
    stream.request_body(REQUEST_BODY, true);
    let token = || reserve_of(&stream).call.token;
    match failure {
        Failure::Unimplemented => plugin.fail_grpc(
            token(),
            grpc_status::UNIMPLEMENTED,
            "unknown method Reserve",
        ),
        Failure::Unavailable => {
            plugin.fail_grpc(token(), grpc_status::UNAVAILABLE, "no healthy upstream")
        }
        Failure::Timeout => plugin.timeout_grpc(token()),
        Failure::Garbage => plugin.reply_grpc(token(), b"\xff\x00garbage"),
        Failure::UnknownCode => plugin.reply_grpc_message(
            token(),
            &ReserveResponse {
                code: Code::Unknown as i32,
                ..Default::default()
            },
        ),
        Failure::Dispatch => assert!(plugin.grpc_calls().is_empty()),
    }
    assert!(
        plugin.logged(failure.logged_as()),
        "the warning names the failure ({}): {:?}",
        failure.logged_as(),
        plugin.logs_at_least(LogLevel::Warn)
    );
    assert_eq!(metric(&plugin, "service_errors"), 1);
    assert_eq!(
        metric(&plugin, "service_timeouts"),
        u64::from(matches!(failure, Failure::Timeout))
    );
    assert!(
        plugin
            .grpc_calls()
            .iter()
            .all(|c| c.method != "CheckRateLimit"),
        "no fallback to a check outside auto"
    );
    assert_eq!(metric(&plugin, "reservations_unimplemented"), 0);
    (plugin, stream)
}

/// `failureMode: deny`: a 500 in OpenAI's error shape, the upstream never sees the request, and
/// nothing is committed.
fn assert_denied(plugin: &Plugin, stream: &Stream) {
    let reply = stream.local_reply().expect("a local reply");
    assert_eq!(reply.status, 500);
    let body: Value = serde_json::from_slice(&reply.body).expect("a JSON body");
    assert_eq!(body["error"]["code"], "rate_limit_service_unavailable");
    assert_eq!(stream.request_resumed(), 0, "the upstream is never called");
    assert!(stream.request_body_forwarded().is_empty());
    assert_eq!(
        stream.response_headers(&[(":status", "200")], false),
        Action::NotCalled
    );
    assert_eq!(metric(plugin, "failure_mode_denied"), 1);
    assert_eq!(metric(plugin, "failure_mode_allowed"), 0);
    stream.finish();
    assert_nothing_more_sent(plugin);
    assert_eq!(
        metric(plugin, "commits_sent"),
        0,
        "nothing held, nothing spent"
    );
}

/// `failureMode: allow`: the request goes on, and its tokens are still charged: committed at
/// the end without a reservation id (which counts like a report).
fn assert_allowed_and_committed_without_id(plugin: &Plugin, stream: &Stream) {
    assert_eq!(stream.local_reply(), None);
    assert_eq!(stream.request_body_forwarded(), REQUEST_BODY);
    assert_eq!(metric(plugin, "failure_mode_allowed"), 1);
    assert_eq!(metric(plugin, "failure_mode_denied"), 0);
    respond(stream, Some("application/json"), &[&openai_json(3, 4)]);
    let commits = pending_commits(plugin);
    assert_eq!(
        commits.iter().map(Commit::summary).collect::<Vec<_>>(),
        vec![(user_descriptor("free", "alice"), String::new(), 7)]
    );
    // The service holds nothing under no id: an answer of "not released" is no expiry.
    answer_commit(plugin, &commits[0], false);
    stream.finish();
    assert_nothing_more_sent(plugin);
    assert_eq!(metric(plugin, "reservations_expired"), 0);
    assert_eq!(metric(plugin, "tokens_reported.total"), 7);
    assert_eq!(metric(plugin, "reports_sent"), 0);
}

fn assert_denied_on(failure: Failure) {
    let (plugin, stream) = reserve_failing("deny", failure);
    assert_denied(&plugin, &stream);
}

fn assert_allowed_on(failure: Failure) {
    let (plugin, stream) = reserve_failing("allow", failure);
    let paused = !matches!(failure, Failure::Dispatch);
    assert_eq!(stream.request_resumed(), u32::from(paused));
    assert_allowed_and_committed_without_id(&plugin, &stream);
}

#[test]
fn allow_mode_after_one_failed_category_commits_the_granted_hold_with_its_id_and_the_other_without()
{
    let plugin = two_categories("reservation").failure_mode("allow").start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    let reserves = reserves_of(&stream);
    assert_eq!(reserves.len(), 2);
    plugin.reply_grpc_message(reserves[0].call.token, &granted("hold-all", vec![]));
    plugin.fail_grpc(reserves[1].call.token, grpc_status::UNAVAILABLE, "down");
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(metric(&plugin, "failure_mode_allowed"), 1);
    respond(&stream, Some("application/json"), &[&openai_json(3, 4)]);
    assert_eq!(
        commits_delivered(&plugin),
        vec![
            (user_descriptor("all", "alice"), "hold-all".into(), 7),
            (user_descriptor("in", "alice"), String::new(), 3),
        ]
    );
    stream.finish();
    assert_nothing_more_sent(&plugin);
}

#[test]
fn deny_mode_refuses_when_a_reserve_fails_with_a_grpc_error() {
    assert_denied_on(Failure::Unavailable);
}

#[test]
fn deny_mode_refuses_when_a_reserve_times_out() {
    assert_denied_on(Failure::Timeout);
}

#[test]
fn deny_mode_refuses_on_garbage_reserve_reply_bytes() {
    assert_denied_on(Failure::Garbage);
}

#[test]
fn deny_mode_refuses_on_a_reserve_answered_unknown() {
    assert_denied_on(Failure::UnknownCode);
}

#[test]
fn deny_mode_refuses_when_a_reserve_cannot_be_dispatched() {
    assert_denied_on(Failure::Dispatch);
}

#[test]
fn allow_mode_lets_through_when_a_reserve_fails_with_a_grpc_error_and_commits_without_an_id() {
    assert_allowed_on(Failure::Unavailable);
}

#[test]
fn allow_mode_lets_through_when_a_reserve_times_out_and_commits_without_an_id() {
    assert_allowed_on(Failure::Timeout);
}

#[test]
fn allow_mode_lets_through_on_garbage_reserve_reply_bytes_and_commits_without_an_id() {
    assert_allowed_on(Failure::Garbage);
}

#[test]
fn allow_mode_lets_through_on_a_reserve_answered_unknown_and_commits_without_an_id() {
    assert_allowed_on(Failure::UnknownCode);
}

#[test]
fn allow_mode_lets_through_when_a_reserve_cannot_be_dispatched_and_commits_without_an_id() {
    assert_allowed_on(Failure::Dispatch);
}

// =============================================================================================
// Answers after the stream ended

/// Alice's request whose reservation is in flight.
fn reserving(plugin: &Plugin) -> (Stream, Reserve) {
    let stream = post(plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    let reserve = reserve_of(&stream);
    (stream, reserve)
}

/// The client left while its reservation was in flight: Envoy logs the stream (`proxy_on_log`
/// without an end of stream) and is done with it, and the reservation is granted before the
/// stream's context is deleted (its call is the root context's: it is not cancelled).
#[test]
fn a_reservation_granted_after_the_stream_ended_but_before_its_deletion_is_released_with_a_commit_of_0(
) {
    let plugin = tutorial("reservation").start();
    let (stream, reserve) = reserving(&plugin);
    stream.on_log();
    assert!(stream.on_done());
    assert!(pending_commits(&plugin).is_empty(), "nothing held yet");
    plugin.reply_grpc_message(reserve.call.token, &granted("late-1", vec![]));
    assert_eq!(stream.request_resumed(), 0, "nothing resumed");
    assert_eq!(stream.local_reply(), None);
    let commits = pending_commits(&plugin);
    assert_eq!(
        commits.iter().map(Commit::summary).collect::<Vec<_>>(),
        vec![(user_descriptor("free", "alice"), "late-1".into(), 0)],
        "the hold released at once, not left to its ttl"
    );
    stream.delete();
    answer_commit(&plugin, &commits[0], true);
    assert_nothing_more_sent(&plugin);
    assert_eq!(metric(&plugin, "requests_allowed"), 0);
    assert_eq!(metric(&plugin, "tokens_reported.total"), 0);
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
}

/// The usual case in Envoy: the stream's context is deleted right after its log phase, and the
/// reservation is granted later (the call is the root context's: not cancelled, answered to the
/// root context).
#[test]
fn a_reservation_granted_after_the_stream_was_deleted_is_released_with_a_commit_of_0() {
    let plugin = tutorial("reservation").start();
    let (stream, reserve) = reserving(&plugin);
    stream.finish();
    assert_eq!(
        plugin.grpc_call(reserve.call.token).state,
        CallState::Pending,
        "the stream's end cancels nothing"
    );
    plugin.reply_grpc_message(reserve.call.token, &granted("late-2", vec![]));
    assert_eq!(plugin.trap().map(|t| t.to_string()), None);
    assert_eq!(stream.request_resumed(), 0);
    // At once, or at the latest on the next tick.
    plugin.tick();
    assert_eq!(
        pending_commits(&plugin)
            .iter()
            .map(Commit::summary)
            .collect::<Vec<_>>(),
        vec![(user_descriptor("free", "alice"), "late-2".into(), 0)],
        "the hold released, not left to its ttl"
    );
}

#[test]
fn a_refused_or_failed_reservation_answered_after_the_stream_was_deleted_changes_nothing() {
    type Answer<'a> = &'a dyn Fn(&Plugin, u32);
    let answers: [(&str, Answer); 4] = [
        ("over limit", &|p, t| {
            p.reply_grpc_message(t, &refused(vec![]))
        }),
        ("unavailable", &|p, t| {
            p.fail_grpc(t, grpc_status::UNAVAILABLE, "down")
        }),
        ("timeout", &|p, t| p.timeout_grpc(t)),
        ("garbage", &|p, t| p.reply_grpc(t, b"\xff\x00garbage")),
    ];
    for (name, answer) in answers {
        let plugin = tutorial("reservation").start();
        let (stream, reserve) = reserving(&plugin);
        stream.finish();
        answer(&plugin, reserve.call.token);
        assert_eq!(plugin.trap().map(|t| t.to_string()), None, "{name}");
        assert_eq!(stream.local_reply(), None, "{name}");
        assert_nothing_more_sent(&plugin);
        for counter in [
            "requests_limited",
            "service_errors",
            "failure_mode_denied",
            "commits_sent",
        ] {
            assert_eq!(metric(&plugin, counter), 0, "{name}: {counter}");
        }
    }
}

// =============================================================================================
// Commits

#[test]
fn a_failing_commit_is_retried_on_the_tick_up_to_max_retries_then_dropped_and_counted() {
    let plugin = tutorial("reservation")
        .set(&["reporting", "maxRetries"], json!(2))
        .start();
    served(&plugin, "hold-1", 5, 7).finish();
    let fail: [&dyn Fn(u32); 3] = [
        &|token| plugin.fail_grpc(token, grpc_status::UNAVAILABLE, "down"),
        &|token| plugin.timeout_grpc(token),
        &|token| plugin.reply_grpc(token, b"\xff\x00garbage"),
    ];
    for (attempt, fail) in fail.iter().enumerate() {
        if attempt > 0 {
            assert!(pending_commits(&plugin).is_empty(), "retried on the tick");
            // Retry n waits flushPeriod × 2^(n-1) after the failure: not on the next tick.
            plugin.tick();
            assert!(
                pending_commits(&plugin).is_empty(),
                "attempt {attempt} before its time"
            );
            plugin.advance_time(Duration::from_millis(100 << (attempt - 1)));
            plugin.tick();
        }
        let commits = pending_commits(&plugin);
        assert_eq!(commits.len(), 1, "attempt {attempt}: {commits:?}");
        assert_eq!(
            commits[0].summary(),
            (user_descriptor("free", "alice"), "hold-1".into(), 12),
            "attempt {attempt}"
        );
        fail(commits[0].call.token);
    }
    assert_eq!(metric(&plugin, "commits_sent"), 3);
    assert_eq!(metric(&plugin, "commits_retried"), 2);
    assert_eq!(metric(&plugin, "commits_dropped"), 1);
    assert_eq!(metric(&plugin, "tokens_dropped"), 12);
    assert_nothing_more_sent(&plugin);
    assert_eq!(metric(&plugin, "reports_dropped"), 0);
}

#[test]
fn a_retried_commit_that_succeeds_is_not_sent_again() {
    let plugin = tutorial("reservation").start();
    served(&plugin, "hold-1", 4, 5).finish();
    let first = pending_commits(&plugin);
    plugin.fail_grpc(first[0].call.token, grpc_status::UNAVAILABLE, "down");
    plugin.advance_time(Duration::from_millis(100));
    plugin.tick();
    assert_eq!(
        commits_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), "hold-1".into(), 9)]
    );
    assert_nothing_more_sent(&plugin);
    assert_nothing_more_sent(&plugin);
    assert_eq!(metric(&plugin, "commits_sent"), 2);
    assert_eq!(metric(&plugin, "commits_retried"), 1);
    assert_eq!(metric(&plugin, "commits_dropped"), 0);
}

#[test]
fn a_commit_that_cannot_be_dispatched_is_retried_on_the_tick() {
    let plugin = tutorial("reservation").start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(REQUEST_BODY, true);
    plugin.reply_grpc_message(reserve_of(&stream).call.token, &granted("hold-1", vec![]));
    response_headers(&stream, Some("application/json"), &[]);
    plugin.set_dispatch_failure(Some(WasmResult::InternalFailure));
    stream.response_body(openai_json(2, 2), true);
    plugin.set_dispatch_failure(None);
    assert!(pending_commits(&plugin).is_empty());
    assert_eq!(metric(&plugin, "commits_retried"), 1);
    stream.finish();
    plugin.advance_time(Duration::from_millis(100));
    plugin.tick();
    assert_eq!(
        commits_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), "hold-1".into(), 4)]
    );
    assert_eq!(metric(&plugin, "commits_sent"), 1);
    assert_nothing_more_sent(&plugin);
}

#[test]
fn a_reconfiguration_keeps_the_commits_still_owed() {
    let plugin = tutorial("reservation").start();
    served(&plugin, "hold-1", 4, 4).finish();
    let in_flight = pending_commits(&plugin);
    assert_eq!(in_flight.len(), 1);
    plugin
        .configure(
            tutorial("reservation")
                .set(&["reporting", "flushPeriod"], json!("1s"))
                .to_json(),
        )
        .expect("reconfigured");
    // The commit in flight before is still known: its failure is retried.
    plugin.fail_grpc(in_flight[0].call.token, grpc_status::UNAVAILABLE, "down");
    assert_eq!(metric(&plugin, "commits_retried"), 1);
    // Retried one (new) flushPeriod after the failure.
    plugin.advance_time(Duration::from_secs(1));
    plugin.tick();
    assert_eq!(
        commits_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), "hold-1".into(), 8)]
    );
    assert_nothing_more_sent(&plugin);
}

#[test]
fn a_commit_answered_not_released_counts_an_expired_reservation() {
    let plugin = tutorial("reservation").start();
    served(&plugin, "hold-1", 5, 7).finish();
    let commits = pending_commits(&plugin);
    assert_eq!(commits.len(), 1);
    answer_commit(&plugin, &commits[0], false);
    assert_eq!(metric(&plugin, "reservations_expired"), 1);
    assert_nothing_more_sent(&plugin);
    assert_eq!(
        metric(&plugin, "commits_retried"),
        0,
        "the tokens were charged"
    );
    assert_eq!(metric(&plugin, "commits_dropped"), 0);
}

// =============================================================================================
// What a request reserves

#[test]
fn without_the_request_body_a_reservation_holds_the_default_amount_capped_by_the_smallest_rate_and_max_amount(
) {
    let limits = Config::service()
        .set(&["rateLimitService", "mode"], json!("reservation"))
        .limit("big", per_user_limit("total"))
        .limit(
            "small",
            json!({
                "rates": [{"limit": 1000, "window": "1m"}, {"limit": 40, "window": "1s"}],
                "counters": [{"expression": "auth.identity.userid"}]
            }),
        );
    let reserved = |config: &Config| -> Vec<(Vec<(String, String)>, u64)> {
        let plugin = config.start();
        let stream = post(&plugin, Some("alice"), CHAT, &[]);
        reserves_of(&stream)
            .iter()
            .map(|r| (r.entries(), r.amount()))
            .collect()
    };
    assert_eq!(
        reserved(&limits),
        vec![
            (user_descriptor("big", "alice"), 256),
            (user_descriptor("small", "alice"), 40),
        ],
        "reservation.defaultAmount, and no more than the smallest rate"
    );
    assert_eq!(
        reserved(&limits.set(
            &["reservation"],
            json!({"defaultAmount": 100, "maxAmount": 80})
        )),
        vec![
            (user_descriptor("big", "alice"), 80),
            (user_descriptor("small", "alice"), 40),
        ],
        "no more than reservation.maxAmount"
    );
}

#[test]
fn with_the_body_delivered_while_headers_are_held_a_reservation_holds_the_prompt_estimate_plus_max_tokens(
) {
    let config = three_categories("reservation")
        .set(&["requestBody", "allowOnHeadersStopIteration"], json!(true));
    let plugin = host()
        .plugin_builder()
        .allow_on_headers_stop_iteration(true)
        .start(config.to_json())
        .unwrap_or_else(|r| panic!("configuration refused: {r}"));
    // 10 words of 4 characters: 10 tokens (a word of up to 5 characters is one token).
    let text = ["abcd"; 10].join(" ");
    let amounts = |body: &Value| -> Vec<u64> {
        let stream = post(&plugin, Some("alice"), CHAT, &[]);
        assert!(
            stream.pending_grpc_calls().is_empty(),
            "the headers wait for the body"
        );
        let bytes = body.to_string();
        assert_eq!(
            stream.request_body(&bytes, true),
            Action::Other(2),
            "kept by Envoy (flow control) until the reservations are answered"
        );
        let reserves = reserves_of(&stream);
        assert_eq!(
            reserves.iter().map(Reserve::entries).collect::<Vec<_>>(),
            vec![
                user_descriptor("all", "alice"),
                user_descriptor("in", "alice"),
                user_descriptor("out", "alice"),
            ]
        );
        for (i, r) in reserves.iter().enumerate() {
            assert_eq!(stream.request_resumed(), 0);
            plugin.reply_grpc_message(r.call.token, &granted(&format!("h{i}"), vec![]));
        }
        assert_eq!(stream.request_resumed(), 1, "resumed after the last answer");
        assert_eq!(stream.request_body_forwarded(), bytes.as_bytes());
        stream.finish();
        reserves.iter().map(Reserve::amount).collect()
    };
    assert_eq!(
        amounts(
            &json!({"model": "m", "max_tokens": 200, "messages": [{"role": "user", "content": text}]})
        ),
        vec![210, 10, 200],
        "total: prompt estimate + max_tokens; prompt; completion"
    );
    assert_eq!(
        amounts(&json!({"model": "m", "messages": [{"role": "user", "content": text}]})),
        vec![10 + 256, 10, 256],
        "no max_tokens: reservation.defaultAmount for the completion"
    );
}

// =============================================================================================
// Aborts and split usage

#[test]
fn a_client_abort_after_admission_commits_the_estimate_with_the_reservation_id() {
    let plugin = tutorial("reservation").start();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let (first, second) = REQUEST_BODY.split_at(20);
    assert_eq!(stream.request_body(first, false), Action::Buffered);
    let reserve = reserve_of(&stream);
    plugin.reply_grpc_message(reserve.call.token, &granted("hold-1", vec![]));
    stream.request_body(second, true);
    response_headers(&stream, Some("text/event-stream"), &[]);
    let partial = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n";
    stream.response_body(partial, false);
    assert!(pending_commits(&plugin).is_empty(), "not before the end");
    stream.finish(); // on_log without an end of stream
                     // The request's text ("hi": 1 token, keys and structure free), and "Hello" (1).
    let estimate = 1 + 1;
    assert_eq!(
        commits_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), "hold-1".into(), estimate)]
    );
    assert_eq!(
        stream.effective_context_switches(),
        [plugin.root_context_id(), stream.id()],
        "dispatched from on_log as the root context's call"
    );
    assert_eq!(metric(&plugin, "usage_missing"), 1);
    assert_eq!(metric(&plugin, "usage_estimated"), 1);
    assert_nothing_more_sent(&plugin);
}

#[test]
fn usage_split_at_every_byte_is_committed_exactly() {
    // Three categories, SSE.
    let plugin = three_categories("reservation").start_quiet();
    let sse = openai_sse(17, 25, "\n");
    for cut in 0..=sse.len() {
        let stream = post(&plugin, Some("alice"), CHAT, &[]);
        stream.request_body(b"{}", true);
        for (i, r) in reserves_of(&stream).iter().enumerate() {
            plugin.reply_grpc_message(r.call.token, &granted(&format!("h{cut}-{i}"), vec![]));
        }
        respond(
            &stream,
            Some("text/event-stream"),
            &[&sse[..cut], &sse[cut..]],
        );
        stream.finish();
        assert_eq!(
            commits_delivered(&plugin),
            vec![
                (user_descriptor("all", "alice"), format!("h{cut}-0"), 42),
                (user_descriptor("in", "alice"), format!("h{cut}-1"), 17),
                (user_descriptor("out", "alice"), format!("h{cut}-2"), 25),
            ],
            "split at byte {cut}"
        );
    }
    assert_eq!(metric(&plugin, "commits_sent"), 3 * (sse.len() as u64 + 1));

    // One category, JSON, byte by byte.
    let plugin = tutorial("reservation").start_quiet();
    let json = openai_json(17, 25);
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    stream.request_body(b"{}", true);
    plugin.reply_grpc_message(reserve_of(&stream).call.token, &granted("h", vec![]));
    let bytes: Vec<&[u8]> = json.chunks(1).collect();
    respond(&stream, Some("application/json"), &bytes);
    stream.finish();
    assert_eq!(
        commits_delivered(&plugin),
        vec![(user_descriptor("free", "alice"), "h".into(), 42)]
    );
    assert_eq!(metric(&plugin, "usage_missing"), 0);
    assert_eq!(metric(&plugin, "reports_sent"), 0);
}
