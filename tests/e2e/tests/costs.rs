//! Cost budgets (issue 17) in a real Envoy: limits with `tokens: cost` spend what a `prices`
//! table (per million tokens, per model) or a `cost` CEL expression makes of the usage each
//! response reports, in the unit of the limit's rates. Read back from the usage record's
//! `limits[].charged`, the rate-limit service's counters (`GET /counters/llm`) and metrics, and
//! Envoy's stats; in reservation mode (the shipped `mode: auto`) and in checkReport mode where
//! the two differ. The last tests run the worked example `envoy/cost-budget.yaml` (as shipped,
//! then with a smaller budget): a monthly dollar budget per team across two models, beside a
//! per-user token limit.
//!
//! The expected costs are computed here from the usage the responses reported, by the price
//! formula of the configuration reference: ⌈(uncached prompt × prompt + cached × cached +
//! cache writes × cacheWrite + (completion − reasoning) × completion + reasoning × reasoning)
//! / 1,000,000⌉, the uncached prompt being the prompt less its cached and cache-write tokens.

use std::time::Duration;

use e2e::{wait_until, Options, Stack};
use serde_json::{json, Value};

/// A key added to the auth step for these tests: user `user-9` of group `team`, to which
/// neither `free` nor `gold` applies, so that its requests spend only the limits a test adds.
const TEAM: &str = "iamateamuser";
const TEAM_USER: &str = "user-9";
/// The shipped gold user (`user-2`), spending the shipped `gold` limit (tokens).
const GOLD: &str = "iamagolduser";
const CHAT: &str = "/v1/chat/completions";

/// Prices per million tokens, every one resolved (as the configuration's defaults resolve
/// them: cached and cacheWrite to prompt, reasoning to completion).
#[derive(Debug, Clone, Copy)]
struct Row {
    prompt: u64,
    cached: u64,
    cache_write: u64,
    completion: u64,
    reasoning: u64,
}

/// `sim-small: {prompt: 1500000, cached: 150000, completion: 2000000}`.
const SMALL: Row = Row {
    prompt: 1_500_000,
    cached: 150_000,
    cache_write: 1_500_000,
    completion: 2_000_000,
    reasoning: 2_000_000,
};
/// `sim-large: {prompt: 3000000, cached: 300000, cacheWrite: 3750000, completion: 15000000}`.
const LARGE: Row = Row {
    prompt: 3_000_000,
    cached: 300_000,
    cache_write: 3_750_000,
    completion: 15_000_000,
    reasoning: 15_000_000,
};
/// `default: {prompt: 10000000, completion: 30000000}`.
const DEFAULT: Row = Row {
    prompt: 10_000_000,
    cached: 10_000_000,
    cache_write: 10_000_000,
    completion: 30_000_000,
    reasoning: 30_000_000,
};

/// The `prices` table of [`SMALL`], [`LARGE`] and [`DEFAULT`], as written in a limit.
const PRICES: &str = "prices:
  models:
    sim-small: {prompt: 1500000, cached: 150000, completion: 2000000}
    sim-large: {prompt: 3000000, cached: 300000, cacheWrite: 3750000, completion: 15000000}
  default: {prompt: 10000000, completion: 30000000}
";

/// The usage figures a cost is computed from (tokens; the prompt includes the cached and
/// cache-write tokens, the completion the reasoning tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Figures {
    prompt: u64,
    completion: u64,
    cached: u64,
    cache_write: u64,
    reasoning: u64,
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

impl Figures {
    /// The figures of an OpenAI usage object (chat and completions, or the Responses API's
    /// `input_tokens` / `output_tokens`): the cached tokens are part of the prompt.
    fn openai(usage: &Value) -> Figures {
        let either = |a: &str, b: &str| {
            if usage.get(a).is_some() {
                n(&usage[a])
            } else {
                n(&usage[b])
            }
        };
        Figures {
            prompt: either("prompt_tokens", "input_tokens"),
            completion: either("completion_tokens", "output_tokens"),
            cached: n(&usage["prompt_tokens_details"]["cached_tokens"])
                + n(&usage["input_tokens_details"]["cached_tokens"]),
            cache_write: 0,
            reasoning: n(&usage["completion_tokens_details"]["reasoning_tokens"])
                + n(&usage["output_tokens_details"]["reasoning_tokens"]),
        }
    }

    /// The figures of an Anthropic usage object: the prompt is the input plus both cache
    /// figures, as Anthropic bills it.
    fn anthropic(usage: &Value) -> Figures {
        let read = n(&usage["cache_read_input_tokens"]);
        let write = n(&usage["cache_creation_input_tokens"]);
        Figures {
            prompt: n(&usage["input_tokens"]) + read + write,
            completion: n(&usage["output_tokens"]),
            cached: read,
            cache_write: write,
            reasoning: 0,
        }
    }

    /// The same figures with nothing cached or written to the cache (all at the prompt price).
    fn uncached(self) -> Figures {
        Figures {
            cached: 0,
            cache_write: 0,
            ..self
        }
    }

    fn total(self) -> u64 {
        self.prompt + self.completion
    }
}

/// What `f` costs at `row`'s prices, by the formula of the configuration reference.
fn cost(row: Row, f: Figures) -> u64 {
    let uncached = f.prompt - f.cached - f.cache_write;
    let weighted = u128::from(uncached) * u128::from(row.prompt)
        + u128::from(f.cached) * u128::from(row.cached)
        + u128::from(f.cache_write) * u128::from(row.cache_write)
        + u128::from(f.completion - f.reasoning) * u128::from(row.completion)
        + u128::from(f.reasoning) * u128::from(row.reasoning);
    u64::try_from(weighted.div_ceil(1_000_000)).expect("a cost that fits")
}

/// `text` with every line indented by `by` spaces.
fn indent(text: &str, by: usize) -> String {
    text.lines().map(|l| format!("{:by$}{l}\n", "")).collect()
}

/// The edit adding the team key ([`TEAM`]) to the auth step's identities.
fn team_identity() -> (String, String) {
    let other = "[\"iamanotherfreeuser\"] = identity(\"user-3\", \"free\"),\n";
    (
        other.into(),
        format!("{other}                    [\"{TEAM}\"] = identity(\"{TEAM_USER}\", \"team\"),\n"),
    )
}

/// The edit appending `limits` (YAML, limit names at column 0) to the plugin's `limits`.
fn add_limits(limits: &str) -> (String, String) {
    let router = "          - name: envoy.filters.http.router\n";
    (router.into(), format!("{}{router}", indent(limits, 22)))
}

/// The edit lifting the shipped gold limit's 200 tokens a minute out of a test's way.
fn gold_unlimited() -> (String, String) {
    (
        "- {limit: 200, window: 1m}".into(),
        "- {limit: 1000000000, window: 1m}".into(),
    )
}

/// A limit named `name` over the team user's requests, one counter per user, spending `cost`
/// (the YAML of `tokens: cost` and its `prices` or `cost`), at `rates` (YAML flow list).
fn team_limit(name: &str, rates: &str, spend: &str) -> String {
    format!(
        "{name}:
  rates: {rates}
  when:
  - predicate: 'auth.identity.groups == \"team\"'
  counters:
  - expression: auth.identity.userid
{}",
        indent(spend, 2)
    )
}

/// A stack whose team user spends `limits` (and the gold user the shipped, lifted, `gold`).
fn stack(mode: Option<&'static str>, limits: &str, more: Vec<(String, String)>) -> Stack {
    let mut edits = vec![team_identity(), add_limits(limits), gold_unlimited()];
    edits.extend(more);
    Stack::start(Options {
        mode,
        edits,
        ..Options::default()
    })
}

/// A chat request of `words` prompt words for at most `max_tokens`, of `model`.
fn chat(model: &str, words: usize, max_tokens: u64, stream: bool) -> Value {
    let mut body = e2e::chat_body(words, max_tokens, stream);
    body["model"] = json!(model);
    body
}

/// The live counters of limit `limit` (all its rates) for `userid`: `(seconds, max, value,
/// reserved)` per counter, shortest window first.
fn counters_of(stack: &Stack, limit: &str, userid: &str) -> Vec<(u64, u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64, u64)> = stack
        .counters()
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["limit"]["name"] == limit)
        .filter(|c| {
            c["set_variables"]
                .as_object()
                .is_some_and(|vars| vars.values().any(|v| v.as_str() == Some(userid)))
        })
        .map(|c| {
            let max = n(&c["limit"]["max_value"]);
            (
                n(&c["limit"]["seconds"]),
                max,
                max.saturating_sub(n(&c["remaining"])),
                n(&c["reserved"]),
            )
        })
        .collect();
    out.sort();
    out
}

/// What limit `limit`'s (first) counter of `userid` was charged, 0 without a counter.
fn charged_counter(stack: &Stack, limit: &str, userid: &str) -> u64 {
    counters_of(stack, limit, userid).first().map_or(0, |c| c.2)
}

/// Waits (10 s at most: reports go on the filter's next tick) until limit `limit`'s counter of
/// `userid` was charged `want`, and asserts it.
fn assert_counter(stack: &Stack, limit: &str, userid: &str, want: u64) {
    wait_until("the counter", Duration::from_secs(10), || {
        charged_counter(stack, limit, userid) == want
    });
    assert_eq!(
        charged_counter(stack, limit, userid),
        want,
        "limit {limit} of {userid}: {:#}",
        stack.counters()
    );
}

/// The `limits[]` entry named `name` of a usage record.
fn limit_entry<'r>(record: &'r Value, name: &str) -> &'r Value {
    record["limits"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or_else(|| panic!("no limit {name} in {record}"))
}

/// What the record says limit `name` was charged.
fn charged(record: &Value, name: &str) -> u64 {
    limit_entry(record, name)["charged"]
        .as_u64()
        .unwrap_or_else(|| panic!("no charged of {name}: {record}"))
}

/// An Envoy stat of the filter (`wasmcustom.token_ratelimit.<name>`), 0 when absent.
fn filter_stat(stack: &Stack, name: &str) -> u64 {
    stack.envoy_stat(&format!("wasmcustom.token_ratelimit.{name}"))
}

/// Waits (10 s at most: the filter adds its counts on its tick) until the filter stat `name`
/// is `want`, and asserts it.
fn assert_filter_stat(stack: &Stack, name: &str, want: u64) {
    wait_until(name, Duration::from_secs(10), || {
        filter_stat(stack, name) == want
    });
    assert_eq!(filter_stat(stack, name), want, "{name}");
}

// ---------------------------------------------------------------------------------------------
// A prices table: each model at its own prices

fn dollars() -> String {
    team_limit(
        "dollars",
        "[{limit: 1000000000, window: 1h}]",
        &format!("tokens: cost\n{PRICES}"),
    )
}

fn each_model_its_own_price(mode: Option<&'static str>) {
    let stack = stack(mode, &dollars(), vec![]);

    // The service enforces the Limitador limit generated for the cost limit: its rate, in the
    // limit's unit, over its counter.
    let limits: Value = serde_json::from_str(&stack.get(&format!(
        "http://127.0.0.1:{}/limits/llm",
        stack.ports.rls_http
    )))
    .expect("limits");
    let generated: Vec<&Value> = limits
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["name"] == "dollars")
        .collect();
    assert_eq!(
        generated,
        [&json!({
            "id": null, "namespace": "llm", "name": "dollars",
            "max_value": 1_000_000_000u64, "seconds": 3600,
            "conditions": ["descriptors[0]['limit.dollars'] == '1'"],
            "variables": ["descriptors[0]['auth.identity.userid']"],
        })],
        "{limits:#}"
    );

    // The same prompt and completion on each model; a dated snapshot of sim-large is priced
    // as sim-large, a model the table does not name at the default row.
    let mut spent = 0;
    let mut costs = Vec::new();
    for (i, (model, row)) in [
        ("sim-small", SMALL),
        ("sim-large", LARGE),
        ("sim-large-2025-06-01", LARGE),
        ("another-model", DEFAULT),
    ]
    .into_iter()
    .enumerate()
    {
        let r = stack.post(CHAT, Some(TEAM), &chat(model, 7, 9, false));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["model"], model);
        let usage = Figures::openai(&r.json()["usage"]);
        assert_eq!((usage.prompt, usage.completion), (7, 9), "{}", r.body);
        let want = cost(row, usage);
        let (_, record) = stack.await_record(i + 1);
        assert_eq!(record["model"], model, "{record}");
        assert_eq!(
            record["limits"],
            json!([{"name": "dollars", "tokens": "cost", "enforcement": "enforce",
                    "outcome": "allowed", "charged": want}]),
            "{model}"
        );
        spent += want;
        assert_counter(&stack, "dollars", TEAM_USER, spent);
        costs.push(want);
    }
    // 7 × 1.5 + 9 × 2 = 28.5 → 29; 7 × 3 + 9 × 15 = 156; 7 × 10 + 9 × 30 = 340.
    assert_eq!(costs, [29, 156, 156, 340]);
    // The filter's per-limit metric counts the same cost.
    assert_filter_stat(&stack, "limit_tokens.dollars.cost", spent);
}

#[test]
fn a_prices_table_charges_each_model_its_own_price_for_the_usage_it_reported_in_reservation_mode() {
    each_model_its_own_price(None);
}

#[test]
fn a_prices_table_charges_each_model_its_own_price_for_the_usage_it_reported_in_check_report_mode()
{
    each_model_its_own_price(Some("checkReport"));
}

// ---------------------------------------------------------------------------------------------
// Cached input at its own price

#[test]
fn cache_reads_and_writes_are_charged_at_their_own_prices_on_anthropic_and_openai() {
    let stack = stack(None, &dollars(), vec![]);
    let mut spent = 0;
    let mut requests = 0;
    let mut check = |r: e2e::Reply, figures: fn(&Value) -> Figures, row: Row, what: &str| {
        assert_eq!(r.status, 200, "{what}: {}", r.body);
        requests += 1;
        let usage = figures(&r.json()["usage"]);
        let want = cost(row, usage);
        let (_, record) = stack.await_record(requests);
        assert_eq!(charged(&record, "dollars"), want, "{what}: {record}");
        assert_eq!(
            record["usage"]["cached"].as_u64(),
            Some(usage.cached),
            "{what}: {record}"
        );
        // The discount is real: the same tokens uncached cost more.
        assert!(
            want < cost(row, usage.uncached()),
            "{what}: {want} is not below the uncached price"
        );
        spent += want;
        assert_counter(&stack, "dollars", TEAM_USER, spent);
        (usage, want)
    };

    // Anthropic Messages: 81 tokens read from the cache (at 0.3 a token), 23 written to it
    // (at 3.75), 10 more of input (at 3), 5 of output (at 15).
    let content = ["word"; 10].join(" ");
    let body = json!({
        "model": "sim-large", "max_tokens": 5,
        "messages": [{"role": "user", "content": content}],
    });
    let r = stack.post_with(
        "/v1/messages",
        Some(TEAM),
        &body,
        &[
            ("x-simulator-cache-read-tokens", "81"),
            ("x-simulator-cache-creation-tokens", "23"),
        ],
    );
    let (usage, want) = check(r, Figures::anthropic, LARGE, "anthropic");
    assert_eq!(
        usage,
        Figures {
            prompt: 114,
            completion: 5,
            cached: 81,
            cache_write: 23,
            reasoning: 0
        }
    );
    // 10 × 3 + 81 × 0.3 + 23 × 3.75 + 5 × 15 = 30 + 24.3 + 86.25 + 75 = 215.55 → 216.
    assert_eq!(want, 216);

    // OpenAI chat: 64 of the 100 prompt tokens cached (at a tenth of the prompt price).
    let r = stack.post_with(
        CHAT,
        Some(TEAM),
        &chat("sim-small", 100, 4, false),
        &[("x-simulator-cache-read-tokens", "64")],
    );
    let (usage, want) = check(r, Figures::openai, SMALL, "openai chat");
    assert_eq!((usage.prompt, usage.cached), (100, 64));
    // 36 × 1.5 + 64 × 0.15 + 4 × 2 = 54 + 9.6 + 8 = 71.6 → 72.
    assert_eq!(want, 72);

    // The Responses API's input_tokens_details.cached_tokens.
    let r = stack.post_with(
        "/v1/responses",
        Some(TEAM),
        &json!({"model": "sim-large", "input": vec!["word"; 40].join(" "), "max_output_tokens": 3}),
        &[("x-simulator-cache-read-tokens", "30")],
    );
    let (usage, want) = check(r, Figures::openai, LARGE, "responses");
    assert_eq!((usage.prompt, usage.cached), (40, 30));
    // 10 × 3 + 30 × 0.3 + 3 × 15 = 84.
    assert_eq!(want, 84);

    // A model at the default row, whose cached price defaults to its prompt price: no discount.
    let r = stack.post_with(
        CHAT,
        Some(TEAM),
        &chat("another-model", 20, 2, false),
        &[("x-simulator-cache-read-tokens", "15")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let usage = Figures::openai(&r.json()["usage"]);
    assert_eq!(usage.cached, 15);
    let (_, record) = stack.await_record(4);
    assert_eq!(
        charged(&record, "dollars"),
        cost(DEFAULT, usage.uncached()),
        "{record}"
    );
    assert_eq!(charged(&record, "dollars"), 20 * 10 + 2 * 30);
}

// ---------------------------------------------------------------------------------------------
// Streamed or not

#[test]
fn a_streamed_response_costs_what_the_same_usage_costs_unstreamed() {
    let stack = stack(None, &dollars(), vec![]);
    let cached = [("x-simulator-cache-read-tokens", "6")];

    // OpenAI chat, with cached tokens: the non-streamed answer, then the same request streamed.
    let r = stack.post_with(CHAT, Some(TEAM), &chat("sim-large", 12, 8, false), &cached);
    assert_eq!(r.status, 200, "{}", r.body);
    let whole = r.json()["usage"].clone();
    let (_, whole_record) = stack.await_record(1);

    let resp = stack.stream_request(TEAM, &chat("sim-large", 12, 8, true), &cached);
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().expect("stream");
    let streamed = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["usage"].is_object().then(|| v["usage"].clone()))
        .unwrap_or_else(|| panic!("no usage chunk: {text}"));
    assert_eq!(streamed, whole, "the stream reports the same usage");
    let (_, stream_record) = stack.await_record(2);
    assert_eq!(stream_record["usage"], whole_record["usage"]);
    let want = cost(LARGE, Figures::openai(&whole));
    assert_eq!(charged(&whole_record, "dollars"), want, "{whole_record}");
    assert_eq!(charged(&stream_record, "dollars"), want, "{stream_record}");

    // Anthropic, with cache reads and writes: message_start and message_delta carry the usage.
    let body = |stream: bool| {
        json!({"model": "sim-small", "max_tokens": 6, "stream": stream,
               "messages": [{"role": "user", "content": "one two three four five"}]})
    };
    let caches = [
        ("x-simulator-cache-read-tokens", "40"),
        ("x-simulator-cache-creation-tokens", "9"),
    ];
    let r = stack.post_with("/v1/messages", Some(TEAM), &body(false), &caches);
    assert_eq!(r.status, 200, "{}", r.body);
    let want = cost(SMALL, Figures::anthropic(&r.json()["usage"]));
    let (_, whole_record) = stack.await_record(3);
    let r = stack.post_with("/v1/messages", Some(TEAM), &body(true), &caches);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("event: message_delta"), "{}", r.body);
    let (_, stream_record) = stack.await_record(4);
    assert_eq!(stream_record["usage"], whole_record["usage"]);
    assert_eq!(charged(&whole_record, "dollars"), want, "{whole_record}");
    assert_eq!(charged(&stream_record, "dollars"), want, "{stream_record}");

    let spent = 2 * cost(LARGE, Figures::openai(&whole)) + 2 * want;
    assert_counter(&stack, "dollars", TEAM_USER, spent);
}

// ---------------------------------------------------------------------------------------------
// A cost limit beside a token limit

fn tokens_and_cost_side_by_side(mode: Option<&'static str>) {
    // team-tokens spends total tokens, dollars the cost, over the same user and requests.
    let limits = format!(
        "{}{}",
        team_limit(
            "team-tokens",
            "[{limit: 1000000, window: 1h}]",
            "tokens: total\n"
        ),
        dollars()
    );
    let stack = stack(mode, &limits, vec![]);
    let mut tokens = 0;
    let mut dollars = 0;
    for (i, (model, row, words, max)) in [("sim-small", SMALL, 30, 10), ("sim-large", LARGE, 5, 40)]
        .into_iter()
        .enumerate()
    {
        let r = stack.post(CHAT, Some(TEAM), &chat(model, words, max, false));
        assert_eq!(r.status, 200, "{}", r.body);
        let usage = Figures::openai(&r.json()["usage"]);
        let (_, record) = stack.await_record(i + 1);
        assert_eq!(
            limit_entry(&record, "team-tokens"),
            &json!({"name": "team-tokens", "tokens": "total", "enforcement": "enforce",
                    "outcome": "allowed", "charged": usage.total()}),
            "{record}"
        );
        assert_eq!(charged(&record, "dollars"), cost(row, usage), "{record}");
        tokens += usage.total();
        dollars += cost(row, usage);
    }
    // 40 + 45 tokens; 30 × 1.5 + 10 × 2 = 65 and 5 × 3 + 40 × 15 = 615.
    assert_eq!((tokens, dollars), (85, 680));
    assert_counter(&stack, "team-tokens", TEAM_USER, tokens);
    assert_counter(&stack, "dollars", TEAM_USER, dollars);
    assert_filter_stat(&stack, "limit_tokens.team-tokens.total", tokens);
    assert_filter_stat(&stack, "limit_tokens.dollars.cost", dollars);
    // The service was charged both, each in its unit.
    assert_eq!(stack.await_reported(tokens + dollars), tokens + dollars);
}

#[test]
fn a_cost_limit_and_a_token_limit_on_one_request_each_spend_their_own_unit_in_reservation_mode() {
    tokens_and_cost_side_by_side(None);
}

#[test]
fn a_cost_limit_and_a_token_limit_on_one_request_each_spend_their_own_unit_in_check_report_mode() {
    tokens_and_cost_side_by_side(Some("checkReport"));
}

// ---------------------------------------------------------------------------------------------
// A cost expression

fn expressions_charge_what_they_compute(mode: Option<&'static str>) {
    // by-body-model reads the request body's model, by-usage-model the usage's; both read the
    // figures. Each cost limit spends its own cost.
    let limits = format!(
        "{}{}",
        team_limit(
            "by-body-model",
            "[{limit: 1000000, window: 1h}]",
            "tokens: cost\ncost: \"requestBodyJSON('/model') == 'sim-large' ? usage.prompt * 3 + usage.completion * 12 : usage.total\"\n"
        ),
        team_limit(
            "by-usage-model",
            "[{limit: 1000000, window: 1h}]",
            "tokens: cost\ncost: \"(usage.model.startsWith('sim-large') ? 100 : 1) * usage.completion + usage.cached\"\n"
        )
    );
    let stack = stack(mode, &limits, vec![]);
    let by_body = |model: &str, f: Figures| {
        if model == "sim-large" {
            f.prompt * 3 + f.completion * 12
        } else {
            f.total()
        }
    };
    let by_usage = |model: &str, f: Figures| {
        let weight = if model.starts_with("sim-large") {
            100
        } else {
            1
        };
        weight * f.completion + f.cached
    };
    let mut body_total = 0;
    let mut usage_total = 0;
    for (i, (model, words, max, cached)) in [
        ("sim-large", 8, 5, "3"),
        ("sim-small", 8, 5, "3"),
        ("sim-large-mini", 4, 2, "0"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = stack.post_with(
            CHAT,
            Some(TEAM),
            &chat(model, words, max, false),
            &[("x-simulator-cache-read-tokens", cached)],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let usage = Figures::openai(&r.json()["usage"]);
        let (_, record) = stack.await_record(i + 1);
        assert_eq!(
            charged(&record, "by-body-model"),
            by_body(model, usage),
            "{model}: {record}"
        );
        assert_eq!(
            charged(&record, "by-usage-model"),
            by_usage(model, usage),
            "{model}: {record}"
        );
        body_total += by_body(model, usage);
        usage_total += by_usage(model, usage);
    }
    // sim-large: 8 × 3 + 5 × 12 = 84, 100 × 5 + 3 = 503; sim-small: 13, 5 + 3 = 8;
    // sim-large-mini: 6 (not sim-large by the body), 200 (sim-large by its prefix).
    assert_eq!((body_total, usage_total), (84 + 13 + 6, 503 + 8 + 200));
    assert_counter(&stack, "by-body-model", TEAM_USER, body_total);
    assert_counter(&stack, "by-usage-model", TEAM_USER, usage_total);
    assert_eq!(filter_stat(&stack, "cost_errors"), 0);
}

#[test]
fn a_cost_expression_charges_what_it_computes_from_the_usage_and_the_request_in_reservation_mode() {
    expressions_charge_what_they_compute(None);
}

#[test]
fn a_cost_expression_charges_what_it_computes_from_the_usage_and_the_request_in_check_report_mode()
{
    expressions_charge_what_they_compute(Some("checkReport"));
}

// ---------------------------------------------------------------------------------------------
// A cost that cannot be computed

/// `retried`: over the gold user's requests, a cost that fails over reported usage with cached
/// tokens and not over the same usage without them, its retry.
fn retried_limit() -> String {
    "retried:
  rates: [{limit: 100000, window: 1h}]
  when:
  - predicate: auth.identity.groups == 'gold'
  counters:
  - expression: auth.identity.userid
  tokens: cost
  cost: 'usage.cached > 0 ? -1 : usage.total'
"
    .to_string()
}

fn failing_costs(mode: Option<&'static str>) {
    // broken: always negative, onError deny (the default): charged its smallest rate.
    // lenient: the same, onError skip: charged nothing.
    let limits = format!(
        "{}{}{}",
        team_limit(
            "broken",
            "[{limit: 500, window: 1m}, {limit: 100000, window: 1h}]",
            "tokens: cost\ncost: usage.completion - usage.prompt - 1000\n"
        ),
        team_limit(
            "lenient",
            "[{limit: 500, window: 1m}]",
            "tokens: cost\ncost: usage.completion - usage.prompt - 1000\nonError: skip\n"
        ),
        retried_limit(),
    );
    let stack = stack(mode, &limits, vec![]);
    let r = stack.post(CHAT, Some(TEAM), &chat("sim-small", 6, 4, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, record) = stack.await_record(1);
    assert_eq!(charged(&record, "broken"), 500, "{record}");
    assert_eq!(charged(&record, "lenient"), 0, "{record}");
    // broken's counters, both windows, were charged its smallest rate: the minute is spent.
    let broken = |stack: &Stack| {
        counters_of(stack, "broken", TEAM_USER)
            .iter()
            .map(|c| (c.0, c.2))
            .collect::<Vec<_>>()
    };
    wait_until("broken's counters", Duration::from_secs(10), || {
        broken(&stack) == [(60, 500), (3600, 500)]
    });
    assert_eq!(
        broken(&stack),
        [(60, 500), (3600, 500)],
        "{:#}",
        stack.counters()
    );
    assert_eq!(charged_counter(&stack, "lenient", TEAM_USER), 0);

    // The gold user's stream reports cached tokens: retried's cost fails over them, and is
    // computed again over the same usage without its cached tokens: the reported total.
    let body = chat("sim-large", 6, 4, true);
    let resp = stack.stream_request(GOLD, &body, &[("x-simulator-cache-read-tokens", "2")]);
    assert_eq!(resp.status().as_u16(), 200);
    let _ = resp.text().expect("stream");
    let (_, record) = stack.await_record(2);
    assert_eq!(record["usage"]["cached"], 2, "{record}");
    let total = record["usage"]["total"].as_u64().expect("a total");
    assert_eq!(charged(&record, "retried"), total, "{record}");
    assert_counter(&stack, "retried", "user-2", total);

    // Each failed computation was counted: broken's, lenient's and retried's over the reported
    // usage (broken's and lenient's usage has no cached tokens to leave out: no retry); in
    // reservation mode also broken's and lenient's over the request's bound (retried's bound
    // has nothing cached).
    let errors = if mode == Some("checkReport") { 3 } else { 5 };
    assert_filter_stat(&stack, "cost_errors", errors);

    // The team user's next request is refused: a cost that cannot be computed never goes free.
    // (The service names broken; in checkReport mode the filter may refuse it first, from
    // the counters the last request marked spent, naming the most restrictive limit its check
    // saw: broken and lenient both had 500 left then.)
    let r = stack.post(CHAT, Some(TEAM), &chat("sim-small", 1, 1, false));
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(
        r.body.contains("'broken'") || (mode.is_some() && r.body.contains("'lenient'")),
        "{}",
        r.body
    );
}

#[test]
fn a_cost_expression_that_fails_is_counted_and_charges_the_smallest_rate_in_reservation_mode() {
    failing_costs(None);
}

#[test]
fn a_cost_expression_that_fails_is_counted_and_charges_the_smallest_rate_in_check_report_mode() {
    failing_costs(Some("checkReport"));
}

/// The same retry for a non-streamed answer: its reported usage without the cached tokens.
#[test]
fn a_cost_that_fails_over_a_non_streamed_answers_usage_is_retried_over_it_without_cached_tokens()
{
    let stack = stack(None, &retried_limit(), vec![]);
    let body = chat("sim-large", 6, 4, false);
    let r = stack.post_with(
        CHAT,
        Some(GOLD),
        &body,
        &[("x-simulator-cache-read-tokens", "2")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, record) = stack.await_record(1);
    assert_eq!(record["usage"]["cached"], 2, "{record}");
    let total = r.json()["usage"]["total_tokens"].as_u64().expect("a total");
    assert_eq!(charged(&record, "retried"), total, "{record}");
    assert_filter_stat(&stack, "cost_errors", 1);
}

// ---------------------------------------------------------------------------------------------
// Reservation mode: the bound's cost held, the actual cost committed

#[test]
fn reservation_mode_holds_the_cost_of_the_requests_bound_and_commits_the_actual_cost() {
    // capped: the same prices, but its rate (100) is below the bound's cost.
    let limits = format!(
        "{}{}",
        dollars(),
        team_limit(
            "capped",
            "[{limit: 100, window: 1h}]",
            &format!("tokens: cost\n{PRICES}")
        )
    );
    // Each figure of the bound is capped by reservation.maxAmount.
    let max_amount = (
        "                    limits:\n".to_string(),
        "                    reservation:\n                      maxAmount: 30\n                    limits:\n".to_string(),
    );
    let stack = stack(None, &limits, vec![max_amount]);

    // 20 words of prompt asking for up to 50 tokens; the answer is 2 tokens, 10 of the prompt
    // read from the cache.
    let body = chat("sim-large", 20, 50, false);
    let r = stack.post_with(
        CHAT,
        Some(TEAM),
        &body,
        &[
            ("x-simulator-completion-tokens", "2"),
            ("x-simulator-cache-read-tokens", "10"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let usage = Figures::openai(&r.json()["usage"]);
    assert_eq!((usage.prompt, usage.completion, usage.cached), (20, 2, 10));
    let actual = cost(LARGE, usage);
    // 10 × 3 + 10 × 0.3 + 2 × 15.
    assert_eq!(actual, 63);
    // The bound: the prompt estimate and the declared maximum, each at most 30, nothing cached.
    let bound = Figures {
        prompt: e2e::prompt_estimate(CHAT, &body).min(30),
        completion: 30,
        ..Figures::default()
    };
    let hold = cost(LARGE, bound);
    assert!(hold > 100 && actual < 100, "hold {hold}, actual {actual}");

    let (_, record) = stack.await_record(1);
    assert_eq!(record["admission"], "reserved", "{record}");
    assert_eq!(record["reserved"], json!({"cost": hold + 100}), "{record}");
    assert_eq!(charged(&record, "dollars"), actual, "{record}");
    assert_eq!(charged(&record, "capped"), actual, "{record}");
    // The service held the bound's cost (capped's at its rate) and was committed the actual.
    assert_eq!(
        stack.service_metric("ratelimit_reserved_hits_total{"),
        hold + 100
    );
    assert_eq!(stack.committed_tokens(), 2 * actual);
    assert!(
        stack.await_no_holds(Duration::from_secs(5)),
        "a hold was left"
    );
    assert_eq!(
        counters_of(&stack, "dollars", TEAM_USER),
        [(3600, 1_000_000_000, actual, 0)]
    );
    assert_eq!(
        counters_of(&stack, "capped", TEAM_USER),
        [(3600, 100, actual, 0)]
    );
}

// ---------------------------------------------------------------------------------------------
// The gold user beside a cost limit over every user

#[test]
fn a_cost_limit_without_predicates_charges_a_user_who_also_spends_a_token_limit() {
    // spend: over every request, one counter per user.
    let limits = format!(
        "spend:
  rates: [{{limit: 1000000, window: 1h}}]
  counters:
  - expression: auth.identity.userid
  tokens: cost
{}",
        indent(PRICES, 2)
    );
    let stack = stack(None, &limits, vec![]);
    let r = stack.post(CHAT, Some(GOLD), &chat("sim-large", 4, 6, false));
    assert_eq!(r.status, 200, "{}", r.body);
    let usage = Figures::openai(&r.json()["usage"]);
    let (_, record) = stack.await_record(1);
    assert_eq!(
        record["limits"],
        json!([
            {"name": "gold", "tokens": "total", "enforcement": "enforce", "outcome": "allowed",
             "charged": usage.total()},
            {"name": "spend", "tokens": "cost", "enforcement": "enforce", "outcome": "allowed",
             "charged": cost(LARGE, usage)},
        ]),
        "{record}"
    );
    assert_counter(&stack, "gold", "user-2", usage.total());
    assert_counter(&stack, "spend", "user-2", cost(LARGE, usage));
}

// ---------------------------------------------------------------------------------------------
// The worked example: envoy/cost-budget.yaml

const EXAMPLE: &str = "envoy/cost-budget.yaml";
const ALICE: &str = "alice-key-red";
const BOB: &str = "bob-key-red";
const CAROL: &str = "carol-key-blue";

/// The example's `gpt-4.1` row: 2 USD per million input tokens, 0.20 cached, 8 output.
const GPT41: Row = Row {
    prompt: 2_000_000,
    cached: 200_000,
    cache_write: 2_000_000,
    completion: 8_000_000,
    reasoning: 8_000_000,
};
/// The example's `claude-sonnet-4` row (and its default): 3 USD input, 0.30 cached, 3.75
/// cache writes, 15 output.
const SONNET: Row = Row {
    prompt: 3_000_000,
    cached: 300_000,
    cache_write: 3_750_000,
    completion: 15_000_000,
    reasoning: 15_000_000,
};

#[test]
fn the_cost_budget_example_charges_each_team_the_dollars_its_members_spend_on_both_models() {
    let stack = Stack::start(Options {
        config: Some(EXAMPLE),
        ..Options::default()
    });

    // The service enforces what the example says: 50 USD (in micro-dollars) per team per 30
    // days, 20,000 tokens per user per minute.
    let limits: Value = serde_json::from_str(&stack.get(&format!(
        "http://127.0.0.1:{}/limits/llm",
        stack.ports.rls_http
    )))
    .expect("limits");
    let mut shape: Vec<(String, u64, u64, Value)> = limits
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            (
                l["name"].as_str().unwrap_or_default().to_string(),
                n(&l["max_value"]),
                n(&l["seconds"]),
                l["variables"].clone(),
            )
        })
        .collect();
    shape.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        shape,
        [
            (
                "team-budget".to_string(),
                50_000_000,
                30 * 86_400,
                json!(["descriptors[0]['auth.identity.team']"])
            ),
            (
                "user-tokens".to_string(),
                20_000,
                60,
                json!(["descriptors[0]['auth.identity.userid']"])
            ),
        ]
    );

    let mut requests = 0;
    let mut spend = |key: &str, path: &str, body: Value, headers: &[(&str, &str)], row: Row| {
        let r = stack.post_with(path, Some(key), &body, headers);
        assert_eq!(r.status, 200, "{}", r.body);
        let usage = &r.json()["usage"];
        let figures = if path == "/v1/messages" {
            Figures::anthropic(usage)
        } else {
            Figures::openai(usage)
        };
        requests += 1;
        let (entry, record) = stack.await_record(requests);
        let want = cost(row, figures);
        assert_eq!(charged(&record, "team-budget"), want, "{record}");
        assert_eq!(charged(&record, "user-tokens"), figures.total(), "{record}");
        eprintln!("{key} {path}: usage {usage}, cost {want}; access log: {entry}");
        (entry, figures, want)
    };
    let prompt = |words: usize| vec!["word"; words].join(" ");

    // alice (red): gpt-4.1, then claude-sonnet-4 with 300 of 320 input tokens read from the
    // cache, a tenth of the input price.
    let (entry, _, a1) = spend(
        ALICE,
        CHAT,
        json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": prompt(50)}], "max_tokens": 20}),
        &[],
        GPT41,
    );
    assert_eq!(
        (&entry["user"], &entry["team"]),
        (&json!("alice"), &json!("red"))
    );
    // 50 × 2 + 20 × 8.
    assert_eq!(a1, 260);
    let (_, f, a2) = spend(
        ALICE,
        "/v1/messages",
        json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": prompt(20)}], "max_tokens": 10}),
        &[("x-simulator-cache-read-tokens", "300")],
        SONNET,
    );
    assert_eq!((f.prompt, f.cached), (320, 300));
    // 20 × 3 + 300 × 0.3 + 10 × 15, where the uncached prompt would cost 320 × 3 + 150.
    assert_eq!((a2, cost(SONNET, f.uncached())), (300, 1110));
    // bob (red): gpt-4.1 with 400 of 500 prompt tokens cached, a dated snapshot of the model.
    let (_, f, b1) = spend(
        BOB,
        CHAT,
        json!({"model": "gpt-4.1-2025-04-14", "messages": [{"role": "user", "content": prompt(500)}], "max_tokens": 5}),
        &[("x-simulator-cache-read-tokens", "400")],
        GPT41,
    );
    assert_eq!((f.prompt, f.cached), (500, 400));
    // 100 × 2 + 400 × 0.2 + 5 × 8.
    assert_eq!(b1, 320);
    // carol (blue): a model the table does not name, at the default row (sonnet's prices).
    let (_, _, c1) = spend(
        CAROL,
        CHAT,
        json!({"model": "some-other-model", "messages": [{"role": "user", "content": prompt(10)}], "max_tokens": 10}),
        &[],
        SONNET,
    );
    assert_eq!(c1, 180);

    // Each team's counter holds what its members spent; each user's what they used.
    assert_counter(&stack, "team-budget", "red", a1 + a2 + b1);
    assert_counter(&stack, "team-budget", "blue", c1);
    assert_counter(&stack, "user-tokens", "alice", 70 + 330);
    assert_counter(&stack, "user-tokens", "bob", 505);
    assert_counter(&stack, "user-tokens", "carol", 20);
    // And the filter's metrics, with the limit and category as Prometheus labels.
    let prometheus = |labels: &str| {
        let text = stack.get(&format!(
            "http://127.0.0.1:{}/stats/prometheus",
            stack.ports.admin
        ));
        let sample = format!("token_ratelimit_limit_tokens{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&sample))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cost_labels = "limit=\"team-budget\",category=\"cost\"";
    wait_until("the filter's metrics", Duration::from_secs(10), || {
        prometheus(cost_labels) == a1 + a2 + b1 + c1
    });
    assert_eq!(prometheus(cost_labels), a1 + a2 + b1 + c1);
    assert_eq!(
        prometheus("limit=\"user-tokens\",category=\"total\""),
        70 + 330 + 505 + 20
    );
}

#[test]
fn in_the_cost_budget_example_a_team_that_spent_its_budget_is_refused_and_the_other_is_served() {
    // The example with a budget of 2,000 micro-dollars (0.002 USD) instead of 50 USD.
    let stack = Stack::start(Options {
        config: Some(EXAMPLE),
        edits: vec![(
            "- {limit: 50000000, window: 30d}".into(),
            "- {limit: 2000, window: 30d}".into(),
        )],
        ..Options::default()
    });
    let body = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "hello there"}],
                      "max_tokens": 100});
    // Each request spends 2 × 2 + 100 × 8 = 804 and holds first the cost of its bound (its
    // prompt estimate and max_tokens): alice, bob, then alice again do not fit in 2,000.
    let hold = cost(
        GPT41,
        Figures {
            prompt: e2e::prompt_estimate(CHAT, &body),
            completion: 100,
            ..Figures::default()
        },
    );
    assert!(804 + hold <= 2000 && 2 * 804 + hold > 2000, "hold {hold}");
    let mut statuses = Vec::new();
    for key in [ALICE, BOB, ALICE] {
        statuses.push(stack.post(CHAT, Some(key), &body).status);
    }
    assert_eq!(statuses, [200, 200, 429]);
    let (_, record) = stack.await_record(3);
    assert_eq!(
        limit_entry(&record, "team-budget")["outcome"],
        "limited",
        "{record}"
    );
    assert_counter(&stack, "team-budget", "red", 2 * 804);
    // Team blue's budget is its own.
    assert_eq!(stack.post(CHAT, Some(CAROL), &body).status, 200);
    assert_counter(&stack, "team-budget", "blue", 804);
}
