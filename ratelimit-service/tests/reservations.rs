//! `Reserve` and `Commit` (Kuadrant's reservation protocol) on the real server, started
//! in-process on free loopback ports and driven over real gRPC (HTTP/2) and HTTP/1.1.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use ratelimit_proto::{Code, RateLimitDescriptor, ReserveResponse, Unit};
use ratelimit_service::proto::kuadrant::rate_limit_service_client::RateLimitServiceClient;
use ratelimit_service::Config;
use tonic::transport::Channel;

const LIMITS: &str = r#"
- namespace: llm
  name: free
  max_value: 10
  seconds: 60
  conditions: ["descriptors[0]['limit.free'] == '1'"]
  variables: ["descriptors[0]['auth.identity.userid']"]
- namespace: llm
  name: gold-minute
  max_value: 100
  seconds: 60
  conditions: ["descriptors[0]['limit.gold'] == '1'"]
  variables: ["descriptors[0]['auth.identity.userid']"]
- namespace: llm
  name: gold-hour
  max_value: 150
  seconds: 3600
  conditions: ["descriptors[0]['limit.gold'] == '1'"]
  variables: ["descriptors[0]['auth.identity.userid']"]
- namespace: llm
  name: shared
  max_value: 50
  seconds: 60
  conditions: ["descriptors[0]['limit.shared'] == '1'"]
- namespace: llm
  name: one-second
  max_value: 10
  seconds: 1
  conditions: ["descriptors[0]['limit.short'] == '1'"]
- namespace: llm
  name: tiny
  max_value: 1
  seconds: 60
  conditions: ["descriptors[0]['limit.tiny'] == '1'"]
"#;

/// Upper bound of every polling loop below (a hold of 1 s must be gone well before).
const POLL_LIMIT: Duration = Duration::from_secs(10);
const POLL_STEP: Duration = Duration::from_millis(50);

type Client = RateLimitServiceClient<Channel>;

fn free(user: &str) -> [(&'static str, String); 2] {
    [
        ("limit.free", "1".to_string()),
        ("auth.identity.userid", user.to_string()),
    ]
}

fn entries<'a>(e: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    e.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn reserve(c: &mut Client, e: &[(&'static str, String)], amount: u64) -> ReserveResponse {
    reserve_ttl(c, e, amount, None).await
}

async fn reserve_ttl(
    c: &mut Client,
    e: &[(&'static str, String)],
    amount: u64,
    ttl: Option<Duration>,
) -> ReserveResponse {
    c.reserve(reserve_request("llm", &entries(e), amount, ttl))
        .await
        .unwrap()
        .into_inner()
}

/// Commits and answers `reservation_released`.
async fn commit(c: &mut Client, e: &[(&'static str, String)], id: &str, actual: u64) -> bool {
    c.commit(commit_request("llm", &entries(e), id, actual))
        .await
        .unwrap()
        .into_inner()
        .reservation_released
}

/// `(remaining, reserved)` of the only counter of `/counters/llm` whose limit is `limit`.
async fn counter_of(http: SocketAddr, limit: &str) -> (u64, u64) {
    let counters = http_json(http, "/counters/llm").await;
    let found: Vec<&serde_json::Value> = counters
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["limit"]["name"] == limit)
        .collect();
    assert_eq!(found.len(), 1, "{counters}");
    (
        found[0]["remaining"].as_u64().unwrap(),
        found[0]["reserved"].as_u64().unwrap(),
    )
}

async fn metrics(http: SocketAddr) -> String {
    http_get(http, "/metrics").await.1
}

/// Reserves `amount` every [`POLL_STEP`] until admitted; fails past [`POLL_LIMIT`]. Returns the
/// admitted answer and how many were refused before it.
async fn reserve_until_admitted(
    c: &mut Client,
    e: &[(&'static str, String)],
    amount: u64,
) -> (ReserveResponse, u32) {
    let deadline = Instant::now() + POLL_LIMIT;
    let mut refused = 0;
    loop {
        let r = reserve(c, e, amount).await;
        if as_code(r.code) == Code::Ok {
            return (r, refused);
        }
        assert_eq!(as_code(r.code), Code::OverLimit);
        refused += 1;
        assert!(
            Instant::now() < deadline,
            "still refused after {POLL_LIMIT:?}"
        );
        tokio::time::sleep(POLL_STEP).await;
    }
}

#[tokio::test]
async fn commit_releases_the_hold_and_the_next_reserve_is_admitted_against_the_actual_spend() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let alice = free("alice");

    let r = reserve(&mut c, &alice, 8).await;
    assert_eq!(as_code(r.code), Code::Ok);
    assert!(!r.reservation_id.is_empty());
    assert_eq!(r.statuses[0].limit_remaining, 2, "10 - 8 held");
    assert_eq!(counter_of(svc.http_addr, "free").await, (10, 8));

    // Held: 0 + 8 + 3 > 10.
    let refused = reserve(&mut c, &alice, 3).await;
    assert_eq!(as_code(refused.code), Code::OverLimit);

    assert!(
        commit(&mut c, &alice, &r.reservation_id, 2).await,
        "released"
    );
    assert_eq!(counter_of(svc.http_addr, "free").await, (8, 0));

    // The full budget left is 10 - 2 spent: 9 does not fit, 8 does.
    let r = reserve(&mut c, &alice, 9).await;
    assert_eq!(as_code(r.code), Code::OverLimit);
    let r = reserve(&mut c, &alice, 8).await;
    assert_eq!(as_code(r.code), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert!(commit(&mut c, &alice, &r.reservation_id, 8).await);
    assert_eq!(counter_of(svc.http_addr, "free").await, (0, 0));
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn reserve_is_refused_without_id_when_value_plus_holds_plus_amount_exceeds_the_max() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let bob = free("bob");

    c.report(request("llm", &entries(&bob), 3)).await.unwrap();
    let held = reserve(&mut c, &bob, 5).await;
    assert_eq!(as_code(held.code), Code::Ok, "3 + 5 <= 10");

    // 3 + 5 + 3 = 11 > 10.
    let r = reserve(&mut c, &bob, 3).await;
    assert_eq!(as_code(r.code), Code::OverLimit);
    assert_eq!(r.reservation_id, "");
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(as_code(r.statuses[0].code), Code::OverLimit);
    assert_eq!(r.statuses[0].limit_remaining, 2, "10 - 3 - 5: nothing held");
    assert_eq!(counter_of(svc.http_addr, "free").await, (7, 5));

    // 3 + 5 + 2 = 10: exactly at the max is admitted.
    let r = reserve(&mut c, &bob, 2).await;
    assert_eq!(as_code(r.code), Code::Ok);
    assert_eq!(counter_of(svc.http_addr, "free").await, (7, 7));

    // Past the max through Report, nothing more fits, not even 0.
    c.report(request("llm", &entries(&bob), 8)).await.unwrap();
    let r = reserve(&mut c, &bob, 0).await;
    assert_eq!(as_code(r.code), Code::OverLimit);

    let m = metrics(svc.http_addr).await;
    assert_eq!(
        metric(
            &m,
            "limited_calls{limitador_namespace=\"llm\",limit_name=\"free\"}"
        ),
        Some(2),
        "{m}"
    );
    assert_eq!(
        metric(&m, "authorized_calls{limitador_namespace=\"llm\"}"),
        Some(2)
    );
    assert_eq!(
        metric(
            &m,
            "ratelimit_reserved_hits_total{limitador_namespace=\"llm\"}"
        ),
        Some(7)
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserves_never_admit_more_than_the_max() {
    const CONNECTIONS: usize = 4;
    const PER_CONNECTION: usize = 10;
    let svc = start(LIMITS, &[]).await;
    let shared = [("limit.shared", "1".to_string())];

    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = kuadrant_client(svc.rls_addr).await;
        for _ in 0..PER_CONNECTION {
            let mut client = client.clone();
            let shared = shared.clone();
            tasks.push(tokio::spawn(async move {
                reserve(&mut client, &shared, 5).await
            }));
        }
    }
    let mut admitted = 0;
    for task in tasks {
        let r = task.await.unwrap();
        match as_code(r.code) {
            Code::Ok => {
                assert!(!r.reservation_id.is_empty());
                admitted += 1;
            }
            Code::OverLimit => assert!(r.reservation_id.is_empty()),
            other => panic!("{other:?}"),
        }
    }
    // 40 reserves of 5 against a max of 50: exactly 10 fit, never more.
    assert_eq!(admitted, 10);
    assert_eq!(counter_of(svc.http_addr, "shared").await, (50, 50));
    let m = metrics(svc.http_addr).await;
    assert_eq!(metric(&m, "ratelimit_reserve_calls_total"), Some(40));
    assert_eq!(metric(&m, "ratelimit_reservations_outstanding"), Some(10));
    assert_eq!(metric(&m, "ratelimit_reserved_hits_outstanding"), Some(50));
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn hold_expires_after_its_ttl_and_a_late_commit_behaves_like_report() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let carol = free("carol");

    let first = reserve_ttl(&mut c, &carol, 8, Some(Duration::from_secs(1))).await;
    assert_eq!(as_code(first.code), Code::Ok);
    let (second, refused) = reserve_until_admitted(&mut c, &carol, 8).await;
    assert!(refused > 0, "the first hold was live at first");
    assert_eq!(
        counter_of(svc.http_addr, "free").await,
        (10, 8),
        "only the second"
    );

    // The expired reservation's commit still adds its actual amount.
    assert!(!commit(&mut c, &carol, &first.reservation_id, 1).await);
    assert_eq!(counter_of(svc.http_addr, "free").await, (9, 8));
    assert!(commit(&mut c, &carol, &second.reservation_id, 1).await);
    assert_eq!(counter_of(svc.http_addr, "free").await, (8, 0));
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn hold_ends_with_its_counters_window_even_with_a_longer_ttl() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let short = [("limit.short", "1".to_string())];

    let first = reserve_ttl(&mut c, &short, 8, Some(Duration::from_secs(60))).await;
    assert_eq!(as_code(first.code), Code::Ok);
    let reset = first.statuses[0].duration_until_reset.as_ref().unwrap();
    assert!(reset.seconds <= 1, "{reset:?}");
    let (_, refused) = reserve_until_admitted(&mut c, &short, 8).await;
    assert!(refused > 0, "the first hold was live at first");
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn max_reservation_ttl_flag_shortens_a_longer_or_missing_ttl() {
    let svc = start(LIMITS, &["--max-reservation-ttl", "1"]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let dave = free("dave");

    // Asked for a minute: held for one second.
    let r = reserve_ttl(&mut c, &dave, 8, Some(Duration::from_secs(60))).await;
    assert_eq!(as_code(r.code), Code::Ok);
    let (_, refused) = reserve_until_admitted(&mut c, &dave, 8).await;
    assert!(refused > 0, "the first hold was live at first");

    // No ttl (the one just admitted by the loop had none): the server's maximum.
    let (_, refused) = reserve_until_admitted(&mut c, &dave, 8).await;
    assert!(refused > 0, "the second hold was live at first");
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn max_reservation_fraction_flag_clamps_the_held_amount_not_the_admission() {
    let svc = start(LIMITS, &["--max-reservation-fraction", "0.5"]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let erin = free("erin");

    // Beyond the max: refused on the amount asked for, not the clamped one.
    let r = reserve(&mut c, &erin, 11).await;
    assert_eq!(as_code(r.code), Code::OverLimit);

    // 8 fits and is admitted, but only 10 * 0.5 = 5 is held.
    let r = reserve(&mut c, &erin, 8).await;
    assert_eq!(as_code(r.code), Code::Ok);
    assert!(!r.reservation_id.is_empty());
    assert_eq!(r.statuses[0].limit_remaining, 5);
    assert_eq!(counter_of(svc.http_addr, "free").await, (10, 5));
    let r = reserve(&mut c, &erin, 5).await;
    assert_eq!(as_code(r.code), Code::Ok, "5 held + 5 <= 10");
    let r = reserve(&mut c, &erin, 1).await;
    assert_eq!(as_code(r.code), Code::OverLimit, "10 held + 1 > 10");

    // A max of 1 clamps the hold to 0: admitted, nothing held, no id.
    let tiny = [("limit.tiny", "1".to_string())];
    for _ in 0..3 {
        let r = reserve(&mut c, &tiny, 1).await;
        assert_eq!(as_code(r.code), Code::Ok);
        assert_eq!(r.reservation_id, "");
    }
    assert_eq!(counter_of(svc.http_addr, "tiny").await, (1, 0));
    svc.shutdown().await.unwrap();
}

#[test]
fn reservation_flags_are_validated() {
    let parse = |extra: &[&str]| {
        let mut args = vec!["ratelimit-service", "limits.yaml"];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
    };
    let config = parse(&[]).unwrap();
    assert_eq!(config.max_reservation_ttl, 60);
    assert_eq!(config.max_reservation_fraction, 1.0);
    assert!(!config.reservations_unimplemented);
    let config = parse(&["--max-reservation-fraction", "0.25"]).unwrap();
    assert_eq!(config.reservation_settings().max_fraction, 0.25);
    for bad in ["0", "-0.5", "1.5", "NaN", "half"] {
        let arg = format!("--max-reservation-fraction={bad}");
        let err = parse(&[&arg]).unwrap_err();
        assert!(
            err.to_string().contains("--max-reservation-fraction"),
            "{bad}: {err}"
        );
    }
    for bad in ["0", "-1", "31536001"] {
        let arg = format!("--max-reservation-ttl={bad}");
        assert!(parse(&[&arg]).is_err(), "{bad}");
    }
}

#[tokio::test]
async fn commit_with_an_empty_or_unknown_id_behaves_like_report() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let fay = free("fay");

    assert!(!commit(&mut c, &fay, "", 4).await);
    assert_eq!(counter_of(svc.http_addr, "free").await, (6, 0));
    assert!(!commit(&mut c, &fay, "no-such-reservation", 3).await);
    assert_eq!(counter_of(svc.http_addr, "free").await, (3, 0));
    // Like Report, past the max too; an actual amount of 0 adds nothing.
    assert!(!commit(&mut c, &fay, "", 5).await);
    assert!(!commit(&mut c, &fay, "", 0).await);
    let r = c
        .check_rate_limit(request("llm", &entries(&fay), 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);

    let m = metrics(svc.http_addr).await;
    assert_eq!(metric(&m, "ratelimit_commit_calls_total"), Some(4));
    assert_eq!(
        metric(
            &m,
            "ratelimit_committed_hits_total{limitador_namespace=\"llm\"}"
        ),
        Some(12)
    );
    assert_eq!(
        metric(&m, "authorized_hits{limitador_namespace=\"llm\"}"),
        Some(12)
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn retried_commit_is_applied_once() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let gus = free("gus");

    let r = reserve(&mut c, &gus, 5).await;
    assert!(commit(&mut c, &gus, &r.reservation_id, 4).await);
    assert!(!commit(&mut c, &gus, &r.reservation_id, 4).await, "retry");
    assert!(!commit(&mut c, &gus, &r.reservation_id, 4).await, "retry");
    assert_eq!(
        counter_of(svc.http_addr, "free").await,
        (6, 0),
        "4 added once"
    );

    // An unknown id, too, is applied once; an empty one cannot be told apart: each applies.
    assert!(!commit(&mut c, &gus, "client-made-id", 1).await);
    assert!(!commit(&mut c, &gus, "client-made-id", 1).await);
    assert_eq!(counter_of(svc.http_addr, "free").await, (5, 0));
    assert!(!commit(&mut c, &gus, "", 1).await);
    assert!(!commit(&mut c, &gus, "", 1).await);
    assert_eq!(counter_of(svc.http_addr, "free").await, (3, 0));

    let m = metrics(svc.http_addr).await;
    assert_eq!(metric(&m, "ratelimit_commit_duplicates_total"), Some(3));
    assert_eq!(
        metric(
            &m,
            "ratelimit_committed_hits_total{limitador_namespace=\"llm\"}"
        ),
        Some(7)
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn reservations_unimplemented_answers_unimplemented_for_reserve_and_commit() {
    let svc = start(LIMITS, &["--reservations-unimplemented"]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let hal = free("hal");

    let err = c
        .reserve(reserve_request("llm", &entries(&hal), 5, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let err = c
        .commit(commit_request("llm", &entries(&hal), "id", 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    // The check/report API still works, on the same connection, and nothing was added.
    let r = c
        .check_rate_limit(request("llm", &entries(&hal), 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 10);

    let m = metrics(svc.http_addr).await;
    assert_eq!(metric(&m, "ratelimit_reserve_calls_total"), Some(1));
    assert_eq!(metric(&m, "ratelimit_commit_calls_total"), Some(1));
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_statuses_answers_like_limitador_codes_and_counters_unchanged() {
    assert!(
        Config::try_parse_from(["ratelimit-service", "l.yaml", "--no-statuses"])
            .unwrap()
            .no_statuses
    );
    let svc = start(LIMITS, &["--no-statuses"]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let mut e = envoy_client(svc.rls_addr).await;
    let (hal, gus) = (free("hal"), free("gus"));
    let hal_request = |hits| request("llm", &entries(&hal), hits);
    let shape = |r: tonic::Response<ratelimit_proto::RateLimitResponse>| {
        let r = r.into_inner();
        (code(&r), r.statuses.len())
    };
    let r = c.check_rate_limit(hal_request(1)).await.unwrap();
    assert_eq!(shape(r), (Code::Ok, 0));
    let r = c.report(hal_request(10)).await.unwrap();
    assert_eq!(shape(r), (Code::Ok, 0));
    // hal's 10 of 10 are spent: every method refuses, saying no more than its code.
    let r = c.check_rate_limit(hal_request(1)).await.unwrap();
    assert_eq!(shape(r), (Code::OverLimit, 0));
    let r = e.should_rate_limit(hal_request(1)).await.unwrap();
    assert_eq!(shape(r), (Code::OverLimit, 0));
    let r = reserve(&mut c, &hal, 1).await;
    assert_eq!((as_code(r.code), r.statuses.len()), (Code::OverLimit, 0));
    // A reservation that fits is held and named, without statuses.
    let r = reserve(&mut c, &gus, 4).await;
    assert_eq!((as_code(r.code), r.statuses.len()), (Code::Ok, 0));
    assert!(!r.reservation_id.is_empty());
    // 4 of gus's 10 are held: 7 more do not fit.
    let r = reserve(&mut c, &gus, 7).await;
    assert_eq!((as_code(r.code), r.statuses.len()), (Code::OverLimit, 0));
    svc.shutdown().await.unwrap();

    // Without the flag, the same calls carry their statuses.
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let r = c
        .check_rate_limit(request("llm", &entries(&hal), 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(reserve(&mut c, &gus, 4).await.statuses.len(), 1);
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn reserve_response_statuses_show_the_most_restrictive_counter_after_the_hold() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let gold = [
        ("limit.gold", "1".to_string()),
        ("auth.identity.userid", "ivy".to_string()),
    ];

    c.report(request("llm", &entries(&gold), 80)).await.unwrap();
    let r = reserve(&mut c, &gold, 15).await;
    assert_eq!(as_code(r.code), Code::Ok);
    assert_eq!(r.statuses.len(), 1);
    let s = &r.statuses[0];
    assert_eq!(as_code(s.code), Code::Ok);
    let limit = s.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit),
        ("gold-minute", 100, Unit::Minute as i32)
    );
    assert_eq!(s.limit_remaining, 5, "100 - 80 - 15 held");
    let reset = s.duration_until_reset.as_ref().unwrap();
    assert!(reset.seconds <= 60 && reset.seconds >= 50, "{reset:?}");

    let r = reserve(&mut c, &gold, 10).await;
    assert_eq!(as_code(r.code), Code::OverLimit);
    assert_eq!(as_code(r.statuses[0].code), Code::OverLimit);
    assert_eq!(r.statuses[0].limit_remaining, 5);
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "gold-minute"
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn reserve_with_several_descriptors_answers_one_status_each() {
    const TWO: &str = r#"
- {namespace: ns, name: model, max_value: 10, seconds: 60,
   conditions: ["descriptors[0].model == 'big'"]}
- {namespace: ns, name: user, max_value: 4, seconds: 3600,
   conditions: ["descriptors[1].kind == 'user'"], variables: ["descriptors[1].id"]}
"#;
    let svc = start(TWO, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let mut req = reserve_request("ns", &[("model", "big")], 3, None);
    req.descriptors
        .extend(request("ns", &[("kind", "user"), ("id", "7")], 0).descriptors);
    req.descriptors
        .push(RateLimitDescriptor { entries: vec![] });

    let r = c.reserve(req.clone()).await.unwrap().into_inner();
    assert_eq!(as_code(r.code), Code::Ok);
    assert_eq!(r.statuses.len(), 3);
    assert_eq!(r.statuses[0].limit_remaining, 7);
    assert_eq!(r.statuses[0].current_limit.as_ref().unwrap().name, "model");
    assert_eq!(r.statuses[1].limit_remaining, 1);
    assert_eq!(r.statuses[1].current_limit.as_ref().unwrap().name, "user");
    assert_eq!(r.statuses[2].current_limit, None);

    // The user limit has 1 left: refused, and only its descriptor is OVER_LIMIT.
    let r = c.reserve(req).await.unwrap().into_inner();
    assert_eq!(as_code(r.code), Code::OverLimit);
    let codes: Vec<Code> = r.statuses.iter().map(|s| as_code(s.code)).collect();
    assert_eq!(codes, [Code::Ok, Code::OverLimit, Code::Ok]);
    assert_eq!(r.statuses[0].limit_remaining, 7);
    assert_eq!(r.statuses[1].limit_remaining, 1);
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn reserve_with_no_matching_limit_is_ok_with_an_empty_id_and_empty_domain_is_unknown() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    let r = c
        .reserve(reserve_request("llm", &[("limit.fre", "1")], 5, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_code(r.code), Code::Ok);
    assert_eq!(r.reservation_id, "");
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(r.statuses[0].current_limit, None);
    let r = c
        .reserve(reserve_request("nope", &[("limit.free", "1")], 5, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((as_code(r.code), r.reservation_id.as_str()), (Code::Ok, ""));

    let r = c
        .reserve(reserve_request("", &entries(&free("jon")), 5, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_code(r.code), Code::Unknown);
    assert_eq!(r.reservation_id, "");
    assert!(r.statuses.is_empty());
    let r = c
        .commit(commit_request("", &entries(&free("jon")), "", 5))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.reservation_released);
    assert_eq!(
        http_json(svc.http_addr, "/counters/llm").await,
        serde_json::json!([]),
        "nothing added or held"
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_reserve_and_commit_input_is_an_error_not_a_crash() {
    const NEEDS_TWO: &str = r#"
- {namespace: ns, max_value: 4, seconds: 60, conditions: ["descriptors[1].kind == 'user'"]}
"#;
    let svc = start(NEEDS_TWO, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let one = [("kind", "user")];

    let err = c
        .reserve(reserve_request("ns", &one, 1, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = c
        .commit(commit_request("ns", &one, "id-1", 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let mut negative = reserve_request("ns", &one, 1, None);
    negative.ttl = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    let err = c.reserve(negative).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = c
        .reserve(reserve_request("ns", &one, u64::from(u32::MAX) + 1, None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = c
        .commit(commit_request("ns", &one, "", u64::MAX))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A commit that failed is not remembered: with the right descriptors, id-1 applies.
    let mut two = commit_request("ns", &[], "id-1", 4);
    two.descriptors = request("ns", &[], 0).descriptors;
    two.descriptors
        .extend(request("ns", &one, 0).descriptors.into_iter());
    c.commit(two).await.unwrap();
    let counters = http_json(svc.http_addr, "/counters/ns").await;
    assert_eq!(counters[0]["remaining"], 0, "{counters}");
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn no_hold_is_left_once_every_reservation_is_committed() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let users: Vec<_> = ["kim", "lea", "max"].into_iter().map(free).collect();

    let mut ids = Vec::new();
    for user in &users {
        let r = reserve(&mut c, user, 4).await;
        ids.push(r.reservation_id);
    }
    let m = metrics(svc.http_addr).await;
    assert_eq!(metric(&m, "ratelimit_reservations_outstanding"), Some(3));
    assert_eq!(metric(&m, "ratelimit_reserved_hits_outstanding"), Some(12));

    for (user, id) in users.iter().zip(&ids) {
        assert!(commit(&mut c, user, id, 3).await);
    }
    let m = metrics(svc.http_addr).await;
    assert_eq!(metric(&m, "ratelimit_reservations_outstanding"), Some(0));
    assert_eq!(metric(&m, "ratelimit_reserved_hits_outstanding"), Some(0));
    assert_eq!(metric(&m, "ratelimit_reserve_calls_total"), Some(3));
    assert_eq!(metric(&m, "ratelimit_commit_calls_total"), Some(3));
    let counters = http_json(svc.http_addr, "/counters/llm").await;
    for counter in counters.as_array().unwrap() {
        assert_eq!(counter["reserved"], 0, "{counter}");
        assert_eq!(counter["remaining"], 7, "{counter}");
    }
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn commit_after_expiry_is_not_reported_released_even_before_the_crate_purges_the_hold() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let ned = free("ned");

    let r = reserve_ttl(&mut c, &ned, 5, Some(Duration::from_millis(100))).await;
    assert_eq!(as_code(r.code), Code::Ok);
    // No other Reserve on the counter: the crate still has the expired hold. Wait for this
    // service's view to drop it.
    let deadline = Instant::now() + POLL_LIMIT;
    while metric(
        &metrics(svc.http_addr).await,
        "ratelimit_reservations_outstanding",
    ) != Some(0)
    {
        assert!(
            Instant::now() < deadline,
            "hold not expired after {POLL_LIMIT:?}"
        );
        tokio::time::sleep(POLL_STEP).await;
    }
    assert!(!commit(&mut c, &ned, &r.reservation_id, 2).await);
    assert_eq!(
        counter_of(svc.http_addr, "free").await,
        (8, 0),
        "added like Report"
    );
    svc.shutdown().await.unwrap();
}
