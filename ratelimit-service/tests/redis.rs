//! The Redis storages on a real `redis-server` (Debian's, started by the e2e harness on a free
//! loopback port): instances on one Redis share counters and holds, a restarted instance keeps
//! them, a Redis outage answers `UNAVAILABLE` at once and applies nothing, and calls resume
//! when Redis is back; the cached storage flushes its counts to Redis.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use e2e::redis::Redis;
use ratelimit_proto::Code;
use ratelimit_service::RunningService;

const LIMITS: &str = r#"
- namespace: llm
  name: free
  max_value: 50
  seconds: 60
  conditions: ["descriptors[0]['limit.free'] == '1'"]
  variables: ["descriptors[0]['auth.identity.userid']"]
"#;

fn user(name: &str) -> [(&str, &str); 2] {
    [("limit.free", "1"), ("auth.identity.userid", name)]
}

async fn on(storage: &[&str]) -> RunningService {
    start(LIMITS, storage).await
}

/// What `Check` says remains of `name`'s budget, asked of `service`.
async fn remaining(service: &RunningService, name: &str) -> u32 {
    let mut client = kuadrant_client(service.rls_addr).await;
    let r = client
        .check_rate_limit(request("llm", &user(name), 0))
        .await
        .unwrap()
        .into_inner();
    r.statuses[0].limit_remaining
}

async fn report(service: &RunningService, name: &str, hits: u32) -> Result<(), tonic::Status> {
    let mut client = kuadrant_client(service.rls_addr).await;
    client
        .report(request("llm", &user(name), hits))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_on_one_redis_share_counters_and_reservations() {
    let redis = Redis::start_new();
    let url = redis.url();
    let a = on(&["redis", &url]).await;
    let b = on(&["redis", &url]).await;

    report(&a, "alice", 30).await.unwrap();
    assert_eq!(remaining(&b, "alice").await, 20, "B sees A's report");
    assert_eq!(remaining(&a, "bob").await, 50, "another user's counter");

    // A hold taken through B counts against a Reserve through A.
    let mut ca = kuadrant_client(a.rls_addr).await;
    let mut cb = kuadrant_client(b.rls_addr).await;
    let held = cb
        .reserve(reserve_request("llm", &user("alice"), 15, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_code(held.code), Code::Ok);
    let refused = ca
        .reserve(reserve_request("llm", &user("alice"), 10, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_code(refused.code), Code::OverLimit, "30 + 15 + 10 > 50");
    // B commits 5 of its 15: the hold is released, 35 spent, 10 fit again through A.
    let committed = cb
        .commit(commit_request(
            "llm",
            &user("alice"),
            &held.reservation_id,
            5,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(committed.reservation_released);
    let admitted = ca
        .reserve(reserve_request("llm", &user("alice"), 10, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_code(admitted.code), Code::Ok);
    assert_eq!(
        remaining(&a, "alice").await,
        15,
        "50 - 35 spent (holds aside)"
    );

    // The HTTP API of either instance shows the counter Redis has.
    for service in [&a, &b] {
        let counters = http_json(service.http_addr, "/counters/llm").await;
        assert_eq!(counters.as_array().map(Vec::len), Some(1), "{counters}");
        assert_eq!(counters[0]["remaining"], 15, "{counters}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_instance_keeps_every_counter() {
    let redis = Redis::start_new();
    let url = redis.url();
    let first = on(&["redis", &url]).await;
    report(&first, "alice", 42).await.unwrap();
    report(&first, "bob", 7).await.unwrap();
    first.shutdown().await.unwrap();

    let second = on(&["redis", &url]).await;
    assert_eq!(remaining(&second, "alice").await, 8);
    assert_eq!(remaining(&second, "bob").await, 43);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_outage_answers_unavailable_at_once_applies_nothing_and_calls_resume() {
    let mut redis = Redis::start_new();
    let url = redis.url();
    let service = on(&["redis", &url]).await;
    report(&service, "alice", 10).await.unwrap();

    tokio::task::block_in_place(|| redis.stop());
    let mut client = kuadrant_client(service.rls_addr).await;
    for _ in 0..3 {
        let t = Instant::now();
        let err = client
            .report(request("llm", &user("alice"), 5))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "answered after {:?}",
            t.elapsed()
        );
        let err = client
            .reserve(reserve_request("llm", &user("alice"), 5, None))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }
    let (status, body) = http_get(service.http_addr, "/counters/llm").await;
    assert_eq!(status, 503, "{body}");
    let metrics = http_get(service.http_addr, "/metrics").await.1;
    assert!(
        metric(&metrics, "ratelimit_storage_errors_total").is_some_and(|n| n >= 7),
        "{metrics}"
    );

    tokio::task::block_in_place(|| redis.start());
    // The connection is re-established by the next calls.
    let deadline = Instant::now() + Duration::from_secs(10);
    while report(&service, "alice", 1).await.is_err() {
        assert!(Instant::now() < deadline, "Redis is back, calls still fail");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        remaining(&service, "alice").await,
        39,
        "10 before, 1 after, nothing during the outage"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cached_storage_flushes_its_counts_to_redis() {
    let redis = Redis::start_new();
    let url = redis.url();
    let cached = on(&["redis_cached", "--flush-period", "100", &url]).await;
    let plain = on(&["redis", &url]).await;
    report(&cached, "alice", 30).await.unwrap();
    // Counted at once where it was reported; in Redis after the next flush.
    assert_eq!(remaining(&cached, "alice").await, 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    while remaining(&plain, "alice").await != 20 {
        assert!(Instant::now() < deadline, "never flushed to Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Reservations work on it too (held in the instance that took them).
    let mut client = kuadrant_client(cached.rls_addr).await;
    let held = client
        .reserve(reserve_request("llm", &user("alice"), 20, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_code(held.code), Code::Ok);
    let refused = client
        .reserve(reserve_request("llm", &user("alice"), 1, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_code(refused.code), Code::OverLimit);
}
