//! Shadow limits in a real Envoy (issue 16): a shadow limit (`enforcement: shadow`) beside the
//! enforced `gold` limit of the shipped configuration, over the same user. The shadow limit is
//! checked and spent like `gold`, but a request it would refuse goes on, with the
//! `x-ratelimit-shadow-limited` header naming it, a mark in its usage record, and
//! `limit_requests{limit, outcome="shadow_limited"}` in `/stats/prometheus`; `gold` still
//! refuses at its own budget. In reservation mode (`auto` against ratelimit-service) and in
//! checkReport mode.

use e2e::{usage_record, Options, Stack};

const GOLD: &str = "iamagolduser";

/// `gold-next`: 60 tokens a minute per gold user, in shadow, beside gold's 200.
fn shadow_limit() -> (String, String) {
    (
        "          - name: envoy.filters.http.router\n".into(),
        "                      gold-next:
                        rates:
                        - {limit: 60, window: 1m}
                        when:
                        - predicate: auth.identity.groups.split(\",\").exists(g, g == \"gold\")
                        counters:
                        - expression: auth.identity.userid
                        enforcement: shadow
          - name: envoy.filters.http.router\n"
            .into(),
    )
}

/// The value of a Prometheus sample `name{labels}` in Envoy's `/stats/prometheus`, 0 when
/// absent; `labels` as Envoy prints them (`limit="gold",outcome="allowed"`).
fn prometheus(stack: &Stack, name: &str, labels: &str) -> u64 {
    let text = stack.get(&format!(
        "http://127.0.0.1:{}/stats/prometheus",
        stack.ports.admin
    ));
    let sample = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&sample))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn shadow_beside_enforced(mode: Option<&'static str>) {
    let stack = Stack::start(Options {
        edits: vec![shadow_limit()],
        mode,
        ..Options::default()
    });
    // 25 tokens a request (5 words of prompt, 20 of answer): gold-next's 60 are spent after the
    // third, gold's 200 after the eighth.
    let mut shadowed = 0;
    let mut served = 0;
    let mut requests = 0;
    let refused = loop {
        let r = stack.chat(GOLD, 5, 20);
        requests += 1;
        assert!(requests < 20, "gold never refused");
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        served += r.usage_total();
        if let Some(limit) = r.header("x-ratelimit-shadow-limited") {
            assert_eq!(limit, "gold-next");
            shadowed += 1;
        }
    };
    assert!(refused.body.contains("'gold'"), "{}", refused.body);
    // The refused request may say that the shadow limit would have refused it too.
    let refused_marked = usize::from(refused.header("x-ratelimit-shadow-limited").is_some());
    // The shadow limit let through requests past its budget; gold enforced its own.
    assert!(served > 60, "served {served}");
    assert!(
        shadowed >= 3,
        "shadow-limited {shadowed} of {requests}; the service's counters: {:#}",
        stack.counters()
    );
    assert!(served <= 200, "served {served}");

    // The records say the same, request by request.
    let log = stack.await_access_log(requests);
    let marked = log
        .iter()
        .filter_map(usage_record)
        .filter(|r| {
            r["limits"]
                .as_array()
                .is_some_and(|ls| ls.iter().any(|l| l["outcome"] == "shadow_limited"))
        })
        .count();
    assert_eq!(
        marked,
        shadowed + refused_marked,
        "one marked record per marked response"
    );
    // Each served request charged both limits its usage's total, the shadow limit included.
    let charged = |name: &str| -> u64 {
        log.iter()
            .filter_map(usage_record)
            .filter(|r| r["status"] == "completed")
            .map(|r| {
                let limit = r["limits"]
                    .as_array()
                    .and_then(|ls| ls.iter().find(|l| l["name"] == name).cloned())
                    .unwrap_or_else(|| panic!("no {name} in {r}"));
                assert_eq!(limit["charged"], r["usage"]["total"], "{r}");
                limit["charged"].as_u64().unwrap_or(0)
            })
            .sum()
    };
    assert_eq!(charged("gold"), served);
    assert_eq!(charged("gold-next"), served);
    let last = log.last().and_then(usage_record).expect("a record");
    assert_eq!(last["status"], "limited", "{last}");
    let gold = &last["limits"][0];
    assert_eq!(
        (&gold["name"], &gold["outcome"]),
        (&"gold".into(), &"limited".into()),
        "{last}"
    );

    // Prometheus: the per-limit outcomes and tokens as labels (stats_config in envoy.yaml),
    // once the filter's tick has added them.
    let want_shadow = (shadowed + refused_marked) as u64;
    assert!(e2e::wait_until(
        "per-limit metrics",
        std::time::Duration::from_secs(5),
        || {
            prometheus(
                &stack,
                "token_ratelimit_limit_requests",
                "limit=\"gold-next\",outcome=\"shadow_limited\"",
            ) == want_shadow
        }
    ));
    assert_eq!(
        prometheus(
            &stack,
            "token_ratelimit_limit_requests",
            "limit=\"gold\",outcome=\"limited\""
        ),
        1
    );
    assert_eq!(
        prometheus(
            &stack,
            "token_ratelimit_limit_requests",
            "limit=\"gold\",outcome=\"allowed\""
        ),
        requests as u64 - 1
    );
    assert_eq!(
        prometheus(
            &stack,
            "token_ratelimit_limit_tokens",
            "limit=\"gold-next\",category=\"total\""
        ),
        served,
        "the shadow limit was charged every token served"
    );
    eprintln!(
        "{requests} requests: {shadowed} shadow-limited by gold-next (60), refused by gold (200) after {served} tokens"
    );
}

#[test]
fn a_shadow_limit_marks_what_it_would_refuse_while_gold_enforces_in_reservation_mode() {
    shadow_beside_enforced(None);
}

#[test]
fn a_shadow_limit_marks_what_it_would_refuse_while_gold_enforces_in_check_report_mode() {
    shadow_beside_enforced(Some("checkReport"));
}
