//! The real server, started in-process on free loopback ports, driven over real gRPC (HTTP/2)
//! and HTTP/1.1.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use ratelimit_proto::{Code, RateLimitDescriptor, RateLimitRequest, Unit};

/// The shape the project generates: one limit per rate, selected by `limit.<name>`, counted per
/// user.
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
  name: odd-window
  max_value: 5
  seconds: 90
  conditions: ["descriptors[0]['limit.odd'] == '1'"]
  variables: []
- namespace: llm
  name: closed
  max_value: 0
  seconds: 60
  conditions: ["descriptors[0]['limit.closed'] == '1'"]
"#;

fn free(user: &str, hits: u32) -> RateLimitRequest {
    request(
        "llm",
        &[("limit.free", "1"), ("auth.identity.userid", user)],
        hits,
    )
}

fn gold(user: &str, hits: u32) -> RateLimitRequest {
    request(
        "llm",
        &[("limit.gold", "1"), ("auth.identity.userid", user)],
        hits,
    )
}

#[tokio::test]
async fn check_ok_then_over_limit_once_reports_reach_the_max() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    let r = c
        .check_rate_limit(free("alice", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);

    let r = c.report(free("alice", 6)).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::Ok);
    // hits_addend is ignored by the check: 6 + 1000 would not fit, one more hit does.
    let r = c
        .check_rate_limit(free("alice", 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);

    c.report(free("alice", 3)).await.unwrap();
    let r = c
        .check_rate_limit(free("alice", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok, "9 of 10: one more fits");

    c.report(free("alice", 1)).await.unwrap();
    let r = c
        .check_rate_limit(free("alice", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit, "10 of 10: at the max");
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].limit_remaining, 0);

    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn check_never_changes_counters() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    for _ in 0..20 {
        let r = c
            .check_rate_limit(free("bob", 5))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(code(&r), Code::Ok);
        assert_eq!(r.statuses[0].limit_remaining, 10);
    }
    let counters = http_json(svc.http_addr, "/counters/llm").await;
    assert_eq!(counters, serde_json::json!([]), "checks created no counter");

    c.report(free("bob", 3)).await.unwrap();
    for _ in 0..5 {
        let r = c
            .check_rate_limit(free("bob", 1))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.statuses[0].limit_remaining, 7);
    }
    let counters = http_json(svc.http_addr, "/counters/llm").await;
    assert_eq!(counters[0]["remaining"], 7);

    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn report_past_the_max_is_accepted_and_counted() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    let r = c.report(free("carol", 8)).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 2, "status after the hits");
    let r = c.report(free("carol", 25)).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::Ok, "a report past the max is still OK");
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    assert_eq!(r.statuses[0].limit_remaining, 0);

    let r = c
        .check_rate_limit(free("carol", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);

    let (_, metrics) = http_get(svc.http_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ratelimit_reported_hits_total{limitador_namespace=\"llm\"}"
        ),
        Some(33),
        "{metrics}"
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn report_with_zero_hits_counts_one() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    let r = c.report(free("dave", 0)).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 9);
    let counters = http_json(svc.http_addr, "/counters/llm").await;
    assert_eq!(counters[0]["remaining"], 9);
    let (_, metrics) = http_get(svc.http_addr, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "ratelimit_reported_hits_total{limitador_namespace=\"llm\"}"
        ),
        Some(1)
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn should_rate_limit_adds_and_limits() {
    let svc = start(LIMITS, &[]).await;
    let mut e = envoy_client(svc.rls_addr).await;

    let r = e
        .should_rate_limit(free("erin", 6))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 4);

    // 6 + 6 > 10: refused, and nothing is added.
    let r = e
        .should_rate_limit(free("erin", 6))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[0].limit_remaining, 4);

    let r = e
        .should_rate_limit(free("erin", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 0);

    // hits_addend 0 counts as 1, so it does not fit either: not a zero-hit check.
    let r = e
        .should_rate_limit(free("erin", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);

    let counters = http_json(svc.http_addr, "/counters/llm").await;
    assert_eq!(counters[0]["remaining"], 0);

    let (_, metrics) = http_get(svc.http_addr, "/metrics").await;
    assert_eq!(
        metric(&metrics, "ratelimit_should_rate_limit_calls_total"),
        Some(4)
    );
    assert_eq!(
        metric(&metrics, "authorized_calls{limitador_namespace=\"llm\"}"),
        Some(2)
    );
    assert_eq!(
        metric(&metrics, "authorized_hits{limitador_namespace=\"llm\"}"),
        Some(10)
    );
    assert_eq!(
        metric(
            &metrics,
            "limited_calls{limitador_namespace=\"llm\",limit_name=\"free\"}"
        ),
        Some(2)
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn zero_hit_should_rate_limit_counts_one() {
    let svc = start(LIMITS, &[]).await;
    let mut e = envoy_client(svc.rls_addr).await;
    let r = e
        .should_rate_limit(free("fay", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 9);
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn descriptor_key_no_limit_names_is_ok() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    // The right key hits a limit of 0...
    let r = c
        .check_rate_limit(request("llm", &[("limit.closed", "1")], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);
    // ...a typo matches nothing: OK, with a bare status.
    let r = c
        .check_rate_limit(request("llm", &[("limit.closd", "1")], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses.len(), 1);
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    assert_eq!(r.statuses[0].current_limit, None);
    // A domain with no limits at all: OK too.
    let r = c
        .check_rate_limit(request("other", &[("limit.closed", "1")], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    // A limit with variables does not apply when the variable's key is missing.
    let r = c
        .report(request("llm", &[("limit.free", "1")], 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].current_limit, None);
    assert_eq!(
        http_json(svc.http_addr, "/counters/llm").await,
        serde_json::json!([])
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn empty_domain_is_unknown() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let mut e = envoy_client(svc.rls_addr).await;
    let mut req = free("gus", 3);
    req.domain.clear();

    let r = c.check_rate_limit(req.clone()).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::Unknown);
    let r = c.report(req.clone()).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::Unknown);
    let r = e.should_rate_limit(req).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::Unknown);
    assert!(r.statuses.is_empty());

    let (_, metrics) = http_get(svc.http_addr, "/metrics").await;
    assert_eq!(metric(&metrics, "ratelimit_check_calls_total"), Some(1));
    assert_eq!(metric(&metrics, "ratelimit_report_calls_total"), Some(1));
    assert!(
        !metrics.contains("ratelimit_reported_hits_total{"),
        "{metrics}"
    );
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn statuses_carry_limit_remaining_and_reset() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    // Before any hit: the full limit, and a full window until reset.
    let r = c
        .check_rate_limit(free("hal", 1))
        .await
        .unwrap()
        .into_inner();
    let s = &r.statuses[0];
    let limit = s.current_limit.as_ref().unwrap();
    assert_eq!(limit.name, "free");
    assert_eq!(limit.requests_per_unit, 10);
    assert_eq!(limit.unit, Unit::Minute as i32);
    assert_eq!(s.limit_remaining, 10);
    assert_eq!(s.duration_until_reset.as_ref().unwrap().seconds, 60);

    // Two limits apply to gold: the per-minute one (100) and the per-hour one (150).
    let r = c.report(gold("hal", 80)).await.unwrap().into_inner();
    let s = &r.statuses[0];
    assert_eq!(s.current_limit.as_ref().unwrap().name, "gold-minute");
    assert_eq!(s.limit_remaining, 20);
    let reset = s.duration_until_reset.as_ref().unwrap();
    assert!(
        reset.seconds <= 60 && (reset.seconds > 50 || reset.nanos > 0),
        "{reset:?}"
    );

    // Past 100 in the minute the hour limit has 50 left; the minute one is at 0: minute wins.
    let r = c.report(gold("hal", 30)).await.unwrap().into_inner();
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().name,
        "gold-minute"
    );
    assert_eq!(r.statuses[0].limit_remaining, 0);
    let r = c
        .check_rate_limit(gold("hal", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);

    // A window that is not one unit: UNKNOWN unit, the limit still shown.
    let r = c
        .report(request("llm", &[("limit.odd", "1")], 2))
        .await
        .unwrap()
        .into_inner();
    let s = &r.statuses[0];
    let limit = s.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit),
        ("odd-window", 5)
    );
    assert_eq!(limit.unit, Unit::Unknown as i32);
    assert_eq!(s.limit_remaining, 3);
    let reset = s.duration_until_reset.as_ref().unwrap();
    assert!(reset.seconds <= 90 && reset.seconds >= 85, "{reset:?}");
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn counters_are_isolated_per_variable_value() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    c.report(free("ivy", 10)).await.unwrap();
    c.report(free("jon", 4)).await.unwrap();
    let r = c
        .check_rate_limit(free("ivy", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::OverLimit);
    let r = c
        .check_rate_limit(free("jon", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert_eq!(r.statuses[0].limit_remaining, 6);
    let r = c
        .check_rate_limit(free("kim", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 10);

    let counters = http_json(svc.http_addr, "/counters/llm").await;
    let counters = counters.as_array().unwrap();
    assert_eq!(counters.len(), 2, "{counters:?}");
    let remaining_of = |user: &str| {
        counters
            .iter()
            .find(|c| c["set_variables"]["descriptors[0]['auth.identity.userid']"] == user)
            .map(|c| c["remaining"].as_u64().unwrap())
    };
    assert_eq!(remaining_of("ivy"), Some(0));
    assert_eq!(remaining_of("jon"), Some(6));
    assert_eq!(remaining_of("kim"), None);
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn http_api_shows_limits_counters_and_metrics() {
    let svc = start(LIMITS, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    let (status, _) = http_get(svc.http_addr, "/status").await;
    assert_eq!(status, 200);

    let limits = http_json(svc.http_addr, "/limits/llm").await;
    let limits = limits.as_array().unwrap();
    assert_eq!(limits.len(), 5);
    let free_limit = limits.iter().find(|l| l["name"] == "free").unwrap();
    assert_eq!(free_limit["max_value"], 10);
    assert_eq!(free_limit["seconds"], 60);
    assert_eq!(free_limit["namespace"], "llm");
    assert_eq!(
        free_limit["conditions"],
        serde_json::json!(["descriptors[0]['limit.free'] == '1'"])
    );
    assert_eq!(
        http_json(svc.http_addr, "/limits/nope").await,
        serde_json::json!([])
    );

    c.report(free("lea", 7)).await.unwrap();
    c.report(free("lea", 2)).await.unwrap();
    c.check_rate_limit(free("lea", 1)).await.unwrap();
    c.report(free("lea", 1)).await.unwrap();
    c.check_rate_limit(free("lea", 1)).await.unwrap();

    let counters = http_json(svc.http_addr, "/counters/llm").await;
    assert_eq!(counters.as_array().unwrap().len(), 1);
    let counter = &counters[0];
    assert_eq!(counter["limit"]["name"], "free");
    assert_eq!(counter["limit"]["max_value"], 10);
    assert_eq!(
        counter["set_variables"],
        serde_json::json!({"descriptors[0]['auth.identity.userid']": "lea"})
    );
    assert_eq!(counter["remaining"], 0);
    let expires = counter["expires_in_seconds"].as_u64().unwrap();
    assert!((55..=60).contains(&expires), "{expires}");

    let (status, metrics) = http_get(svc.http_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&metrics, "limitador_up"), Some(1));
    assert_eq!(metric(&metrics, "ratelimit_check_calls_total"), Some(2));
    assert_eq!(metric(&metrics, "ratelimit_report_calls_total"), Some(3));
    assert_eq!(
        metric(
            &metrics,
            "ratelimit_reported_hits_total{limitador_namespace=\"llm\"}"
        ),
        Some(10)
    );
    assert_eq!(
        metric(&metrics, "authorized_calls{limitador_namespace=\"llm\"}"),
        Some(1)
    );
    assert_eq!(
        metric(
            &metrics,
            "limited_calls{limitador_namespace=\"llm\",limit_name=\"free\"}"
        ),
        Some(1)
    );

    let (status, _) = http_get(svc.http_addr, "/nope").await;
    assert_eq!(status, 404);
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn several_descriptors_each_get_a_status() {
    const TWO: &str = r#"
- {namespace: ns, name: model, max_value: 10, seconds: 60,
   conditions: ["descriptors[0].model == 'big'"]}
- {namespace: ns, name: user, max_value: 4, seconds: 3600,
   conditions: ["descriptors[1].kind == 'user'"], variables: ["descriptors[1].id"]}
"#;
    let svc = start(TWO, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let req = RateLimitRequest {
        domain: "ns".into(),
        descriptors: vec![
            request("ns", &[("model", "big")], 0).descriptors.remove(0),
            request("ns", &[("kind", "user"), ("id", "7")], 0)
                .descriptors
                .remove(0),
            RateLimitDescriptor { entries: vec![] },
        ],
        hits_addend: 4,
    };
    let r = c.report(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.statuses.len(), 3);
    assert_eq!(r.statuses[0].limit_remaining, 6);
    assert_eq!(r.statuses[1].limit_remaining, 0);
    assert_eq!(r.statuses[2].current_limit, None);
    let r = c.check_rate_limit(req).await.unwrap().into_inner();
    assert_eq!(code(&r), Code::OverLimit);
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    assert_eq!(r.statuses[1].code, Code::OverLimit as i32);
    assert_eq!(r.statuses[2].code, Code::Ok as i32);
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_condition_that_cannot_be_evaluated_is_an_error_not_a_crash() {
    const NEEDS_TWO: &str = r#"
- {namespace: ns, max_value: 4, seconds: 60, conditions: ["descriptors[1].kind == 'user'"]}
"#;
    let svc = start(NEEDS_TWO, &[]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;
    let err = c
        .check_rate_limit(request("ns", &[("kind", "user")], 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // Same connection, still serving.
    let r = c
        .check_rate_limit(request("other", &[("kind", "user")], 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn grpc_delay_slows_every_answer_and_a_cancelled_call_is_not_applied() {
    let svc = start(LIMITS, &["--grpc-delay-ms", "300"]).await;
    let mut c = kuadrant_client(svc.rls_addr).await;

    let t = Instant::now();
    let r = c
        .check_rate_limit(free("max", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(&r), Code::Ok);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    let mut req = tonic::Request::new(free("max", 5));
    req.set_timeout(Duration::from_millis(50));
    let err = c.report(req).await.unwrap_err();
    // tonic's client reports its own timeout as Cancelled; a server-side one is DeadlineExceeded.
    assert!(
        matches!(
            err.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "{err:?}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        http_json(svc.http_addr, "/counters/llm").await,
        serde_json::json!([])
    );

    // The HTTP API is not delayed.
    let t = Instant::now();
    http_get(svc.http_addr, "/status").await;
    assert!(t.elapsed() < Duration::from_millis(250));
    svc.shutdown().await.unwrap();
}

#[tokio::test]
async fn rate_limit_headers_on_should_rate_limit_when_asked() {
    let svc = start(LIMITS, &["--rate-limit-headers", "DRAFT_VERSION_03"]).await;
    let mut e = envoy_client(svc.rls_addr).await;
    let r = e
        .should_rate_limit(free("ned", 3))
        .await
        .unwrap()
        .into_inner();
    let header = |k: &str| {
        r.response_headers_to_add
            .iter()
            .find(|h| h.key == k)
            .map(|h| h.value.clone())
    };
    assert_eq!(
        header("X-RateLimit-Limit").as_deref(),
        Some("10, 10;w=60;name=\"free\"")
    );
    assert_eq!(header("X-RateLimit-Remaining").as_deref(), Some("7"));
    assert!(header("X-RateLimit-Reset").is_some());
    svc.shutdown().await.unwrap();

    let svc = start(LIMITS, &[]).await;
    let mut e = envoy_client(svc.rls_addr).await;
    let r = e
        .should_rate_limit(free("ned", 3))
        .await
        .unwrap()
        .into_inner();
    assert!(r.response_headers_to_add.is_empty());
    svc.shutdown().await.unwrap();
}
