//! The life of a lease (`rateLimitService.lease`), driven through the real wasm module: a hot
//! counter's first lease, requests admitted from it without a call, a renewal with requests in
//! flight, a renewal refused (per-request reservations, then 429), a renewal that fails, leases
//! turned off by a new configuration, and the VM's shutdown. The clock is the host's, moved by
//! the tests.
//!
//! The configuration: one limit of 10,000 tokens a minute per user on every request, each
//! request reserving 100 tokens (`reservation.defaultAmount`: the body is not read before the
//! headers go on), leases of a tenth of the limit (1,000 tokens) once a worker saw 4 requests of
//! a user within the lease's 30 s.

mod common;

use common::*;
use proxy_wasm_host::{Action, GrpcCall, Plugin, Stream};
use ratelimit_proto::{Code, CommitRequest, CommitResponse, ReserveRequest, ReserveResponse};
use serde_json::json;
use std::time::Duration;

const LIMIT: &str = "per-user";

fn config() -> Config {
    Config::service()
        .set(&["rateLimitService", "mode"], json!("reservation"))
        .set(
            &["rateLimitService", "lease"],
            json!({"fraction": 0.1, "minRequests": 4, "ttl": "30s"}),
        )
        .set(&["reservation", "defaultAmount"], json!(100))
        .limit(
            LIMIT,
            json!({
                "rates": [{"limit": 10_000, "window": "1m"}],
                "counters": [{"expression": "auth.identity.userid"}]
            }),
        )
}

/// A new request of `user`: its headers, and what the filter answered to them.
fn start(plugin: &Plugin, user: &str) -> (Stream, Action) {
    let stream = plugin.http_stream();
    set_identity(&stream, &[("userid", user)]);
    let action = stream.request_headers(
        &[
            (":method", "GET"),
            (":path", "/v1/models"),
            (":authority", "llm.example"),
        ],
        true,
    );
    (stream, action)
}

/// The pending `Reserve` calls (of any context), decoded.
fn reserves(plugin: &Plugin) -> Vec<(GrpcCall, ReserveRequest)> {
    plugin
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == "Reserve")
        .map(|c| {
            let r: ReserveRequest = c.decode();
            (c, r)
        })
        .collect()
}

/// The pending `Commit`s: (reservation id, actual amount), each answered released.
fn commits(plugin: &Plugin) -> Vec<(String, u64)> {
    plugin
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == "Commit")
        .map(|c| {
            assert_eq!(c.context_id, plugin.root_context_id());
            let r: CommitRequest = c.decode();
            plugin.reply_grpc_message(
                c.token,
                &CommitResponse {
                    reservation_released: true,
                },
            );
            (r.reservation_id, r.actual_amount)
        })
        .collect()
}

fn granted(id: &str) -> ReserveResponse {
    ReserveResponse {
        code: Code::Ok as i32,
        reservation_id: id.into(),
        statuses: vec![status(
            Code::Ok,
            LIMIT,
            10_000,
            8_000,
            Duration::from_secs(45),
        )],
        hold_ttl: None,
    }
}

/// A request admitted by its own `Reserve`, granted as `id`.
fn reserved(plugin: &Plugin, user: &str, id: &str) -> Stream {
    let (stream, action) = start(plugin, user);
    assert_eq!(action, Action::Pause, "waits for its reservation");
    let own: Vec<_> = reserves(plugin)
        .into_iter()
        .filter(|(c, _)| c.context_id == stream.id())
        .collect();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0].1.amount, 100);
    plugin.reply_grpc_message(own[0].0.token, &granted(id));
    assert_eq!(stream.request_resumed(), 1);
    stream
}

/// A request admitted from the lease: no call, not paused.
fn leased(plugin: &Plugin, user: &str) -> Stream {
    let before = plugin.pending_grpc_calls().len();
    let (stream, action) = start(plugin, user);
    assert_eq!(action, Action::Continue, "admitted at once");
    assert!(
        plugin
            .pending_grpc_calls()
            .iter()
            .all(|c| c.context_id != stream.id()),
        "no call of its own"
    );
    assert!(plugin.pending_grpc_calls().len() <= before + 1);
    stream
}

/// Answers `stream` with `tokens` total tokens and ends it.
fn spend(stream: &Stream, tokens: u64) {
    respond(stream, Some("application/json"), &[&openai_json(0, tokens)]);
    stream.finish();
}

/// Four requests of alice by their own reservations: the fourth asks for a lease, granted as
/// `L1` (1,000 tokens); their own holds are committed with what they spent (10 each).
fn hot(plugin: &Plugin) {
    for i in 0..4 {
        let s = reserved(plugin, "alice", &format!("r{i}"));
        spend(&s, 10);
    }
    let lease = reserves(plugin);
    assert_eq!(lease.len(), 1, "one lease asked: {lease:?}");
    let (call, request) = &lease[0];
    assert_eq!(call.context_id, plugin.root_context_id(), "the root's call");
    assert_eq!(request.amount, 1_000, "a tenth of 10,000");
    assert_eq!(
        request.ttl.map(|t| t.seconds),
        Some(90),
        "the lease's 30 s, plus reservation.ttl's 60 s for the requests it admits last"
    );
    assert_eq!(
        entries(&request.descriptors[0]),
        user_descriptor(LIMIT, "alice")
    );
    plugin.reply_grpc_message(call.token, &granted("L1"));
    let own: Vec<(String, u64)> = commits(plugin);
    assert_eq!(own.len(), 4);
    assert!(own.iter().all(|(id, n)| id.starts_with('r') && *n == 10));
    assert_eq!(metric(plugin, "leases_granted"), 1);
}

#[test]
fn a_hot_counter_gets_a_lease_and_its_requests_are_then_admitted_without_a_call() {
    let plugin = config().start();
    hot(&plugin);
    // Four requests of 100 fit before half the lease (500) is used.
    for _ in 0..4 {
        let s = leased(&plugin, "alice");
        response_headers(&s, Some("application/json"), &[]);
        let headers = s.response_headers_added();
        assert!(
            headers.contains(&("x-ratelimit-limit".into(), "10000".into())),
            "{headers:?}"
        );
        assert!(headers.iter().any(|(k, _)| k == "x-ratelimit-remaining"));
        s.response_body(openai_json(0, 25), true);
        s.finish();
    }
    assert!(plugin.pending_grpc_calls().is_empty(), "no call at all");
    plugin.tick();
    assert_eq!(metric(&plugin, "requests_leased"), 4);
    assert_eq!(metric(&plugin, "requests_allowed"), 8);
    assert_eq!(metric(&plugin, "tokens_reported.total"), 4 * 10 + 4 * 25);
    // Another user is not hot: its own reservation.
    let bob = reserved(&plugin, "bob", "b1");
    spend(&bob, 5);
    assert_eq!(commits(&plugin), vec![("b1".to_string(), 5)]);
    // Idle for half its life: the lease is committed with what it spent.
    plugin.advance_time(Duration::from_secs(16));
    plugin.tick();
    assert_eq!(commits(&plugin), vec![("L1".to_string(), 100)]);
    assert_eq!(metric(&plugin, "leases_committed"), 1);
}

#[test]
fn a_renewal_carries_the_requests_in_flight_and_each_token_is_committed_once() {
    let plugin = config().start();
    hot(&plugin);
    let early: Vec<Stream> = (0..3).map(|_| leased(&plugin, "alice")).collect();
    spend(&early[0], 30);
    // The sixth admission uses half the room (500 in flight, 30 spent): a renewal of the 500 in
    // flight + 1,000.
    let mut in_flight: Vec<Stream> = early.into_iter().skip(1).collect();
    in_flight.extend((0..3).map(|_| leased(&plugin, "alice")));
    let renewal = reserves(&plugin);
    assert_eq!(renewal.len(), 1, "{renewal:?}");
    assert_eq!(renewal[0].1.amount, 500 + 1_000);
    assert_eq!(renewal[0].0.context_id, plugin.root_context_id());
    // Admission goes on while it is pending.
    let during = leased(&plugin, "alice");
    spend(&in_flight.remove(0), 40);
    plugin.reply_grpc_message(renewal[0].0.token, &granted("L2"));
    assert_eq!(
        commits(&plugin),
        vec![("L1".to_string(), 30 + 40)],
        "the old lease: what finished under it"
    );
    assert_eq!(metric(&plugin, "leases_renewed"), 1);
    // The others finish under L2, which is committed with them once idle.
    for s in in_flight {
        spend(&s, 50);
    }
    spend(&during, 60);
    assert!(commits(&plugin).is_empty());
    plugin.advance_time(Duration::from_secs(16));
    plugin.tick();
    assert_eq!(commits(&plugin), vec![("L2".to_string(), 4 * 50 + 60)]);
    assert!(plugin.pending_grpc_calls().is_empty());
}

#[test]
fn a_refused_renewal_falls_back_to_per_request_reservations_and_then_to_429() {
    let plugin = config().start();
    hot(&plugin);
    let mut admitted: Vec<Stream> = (0..5).map(|_| leased(&plugin, "alice")).collect();
    let renewal = reserves(&plugin);
    assert_eq!(renewal.len(), 1);
    plugin.reply_grpc_message(
        renewal[0].0.token,
        &ReserveResponse {
            code: Code::OverLimit as i32,
            ..Default::default()
        },
    );
    assert_eq!(metric(&plugin, "leases_refused"), 1);
    // The lease's last 500 tokens still admit five.
    admitted.extend((0..5).map(|_| leased(&plugin, "alice")));
    // Then a request makes its own Reserve, which the service refuses: 429.
    let (stream, action) = start(&plugin, "alice");
    assert_eq!(action, Action::Pause);
    let own = reserves(&plugin);
    assert_eq!(own.len(), 1, "only the request's own: {own:?}");
    assert_eq!(own[0].0.context_id, stream.id());
    plugin.reply_grpc_message(
        own[0].0.token,
        &ReserveResponse {
            code: Code::OverLimit as i32,
            statuses: vec![status(
                Code::OverLimit,
                LIMIT,
                10_000,
                0,
                Duration::from_secs(40),
            )],
            ..Default::default()
        },
    );
    assert_eq!(stream.local_reply().map(|r| r.status), Some(429));
    stream.finish();
    // Once the admitted requests are done, the lease is committed and its room returned.
    for s in admitted {
        spend(&s, 100);
    }
    plugin.tick();
    assert_eq!(commits(&plugin), vec![("L1".to_string(), 1_000)]);
}

#[test]
fn a_failed_renewal_admits_until_the_lease_expires_then_the_failure_mode_decides() {
    let plugin = config().start();
    hot(&plugin);
    // Half its life: the tick renews it; the service is down.
    plugin.advance_time(Duration::from_secs(14));
    let s = leased(&plugin, "alice");
    spend(&s, 10);
    plugin.advance_time(Duration::from_secs(2));
    plugin.tick();
    let renewal = reserves(&plugin);
    assert_eq!(renewal.len(), 1);
    plugin.fail_grpc(renewal[0].0.token, 14, "unavailable");
    assert_eq!(metric(&plugin, "leases_failed"), 1);
    // Still held: admitted.
    let s = leased(&plugin, "alice");
    spend(&s, 10);
    // Past its admissions (its hold ends with the window, 45 s after the call that asked for
    // it; it admits until 22.5 s so that its last request stays held as long): the request's
    // own Reserve fails too, and failure mode deny refuses it.
    plugin.advance_time(Duration::from_secs(15));
    let (stream, action) = start(&plugin, "alice");
    assert_eq!(action, Action::Pause);
    let own: Vec<_> = reserves(&plugin)
        .into_iter()
        .filter(|(c, _)| c.context_id == stream.id())
        .collect();
    assert_eq!(own.len(), 1);
    plugin.fail_grpc(own[0].0.token, 14, "unavailable");
    assert_eq!(stream.local_reply().map(|r| r.status), Some(500));
    stream.finish();
    // The expired lease is still committed with its 20 tokens.
    plugin.tick();
    let owed: Vec<(String, u64)> = commits(&plugin);
    assert!(owed.contains(&("L1".to_string(), 20)), "{owed:?}");
}

#[test]
fn leases_turned_off_by_a_new_configuration_are_committed_once_their_requests_end() {
    let plugin = config().start();
    hot(&plugin);
    let s = leased(&plugin, "alice");
    let mut off = config();
    off.0["rateLimitService"]["lease"]["enabled"] = json!(false);
    plugin.configure(off.to_json()).expect("accepted");
    // A new request makes its own reservation.
    let r = reserved(&plugin, "alice", "r9");
    spend(&r, 1);
    assert_eq!(commits(&plugin), vec![("r9".to_string(), 1)]);
    plugin.tick();
    assert!(commits(&plugin).is_empty(), "a request still in flight");
    spend(&s, 77);
    plugin.tick();
    assert_eq!(commits(&plugin), vec![("L1".to_string(), 77)]);
}

#[test]
fn at_vm_shutdown_the_lease_is_committed_before_the_root_context_is_done() {
    let plugin = config().start();
    hot(&plugin);
    for _ in 0..2 {
        let s = leased(&plugin, "alice");
        spend(&s, 33);
    }
    assert!(
        !plugin.shutdown(),
        "not done while the commit is on its way"
    );
    let pending: Vec<CommitRequest> = plugin
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == "Commit")
        .map(|c| c.decode())
        .collect();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].reservation_id.as_str(), pending[0].actual_amount),
        ("L1", 66)
    );
    assert!(plugin.done_calls().is_empty());
    commits(&plugin);
    assert_eq!(plugin.done_calls(), vec![plugin.root_context_id()]);
}

#[test]
fn a_lease_configuration_the_filter_cannot_honour_is_refused() {
    for (lease, says) in [
        (json!({"fraction": 0.5}), "fraction"),
        (json!({"fraction": 0}), "fraction"),
        (json!({"minRequests": 0}), "minRequests"),
        (json!({"maxAmount": 0}), "maxAmount"),
        (json!({"ttl": "1s"}), "ttl"),
        (json!({"renew": "5s"}), "unknown field"),
        (json!({"fraction": "a tenth"}), "not a number"),
        (json!({"fraction": "NaN"}), "fraction"),
    ] {
        let refused = config()
            .set(&["rateLimitService", "lease"], lease.clone())
            .refuse();
        assert!(refused.to_string().contains(says), "{lease}: {refused}");
    }
    // Envoy hands a YAML `0.05` of a Struct configuration over as a string.
    config()
        .set(&["rateLimitService", "lease", "fraction"], json!("0.05"))
        .start();
    let refused = config()
        .set(&["rateLimitService", "mode"], json!("checkReport"))
        .refuse();
    assert!(
        refused.to_string().contains("reservation"),
        "leases need reservation mode: {refused}"
    );
}
