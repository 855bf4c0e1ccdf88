//! Microbenchmarks of the pure core (`cargo bench`): the per-request work of the filter, run
//! natively. Each byte-oriented benchmark has a plain `memchr` pass over the same bytes beside
//! it, as the practical limit of anything that reads every byte.
//!
//! - `policy/*`: CEL evaluation of a policy for one request (attributes served from memory);
//! - `descriptor/*`: the check descriptor and the encoded `CheckRateLimit` request;
//! - `json/*`: usage extraction from a non-streamed response of 1 KB and 1 MB;
//! - `sse/*`: usage extraction from a streamed response (1 MB of OpenAI chunks) in MB/s;
//! - `request/*`: the `stream_options.include_usage` decision on a 1 KB chat request body;
//! - `cost/*`: one response's cost for a `tokens: cost` limit, by a price table of two models
//!   and by the equivalent CEL expression.

// A benchmark is test code: its inputs are constants, and one that fails to parse is a bug in
// the benchmark, to be reported at once.
#![allow(clippy::expect_used)]
// `criterion_group!` defines an undocumented `pub fn benches`; a bench binary has no API.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use token_ratelimit::filter::MockHost;
use token_ratelimit::flow::RequestFlow;
use token_ratelimit::policy::Policy;
use token_ratelimit::usage::{BodyFormat, Encoding, Format, UsageExtractor, UsagePaths};

/// Kuadrant's tutorial policy (as in `envoy/envoy.yaml`): a path predicate, a group predicate
/// with `split().exists()`, a per-user counter from the auth identity.
const TUTORIAL: &str = r#"{
  "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
  "limits": {
    "free": {"rates": [{"limit": 50, "window": "1m"}],
      "when": [{"predicate": "request.path == \"/v1/chat/completions\""},
               {"predicate": "auth.identity.groups.split(\",\").exists(g, g == \"free\")"}],
      "counters": [{"expression": "auth.identity.userid"}]},
    "gold": {"rates": [{"limit": 200, "window": "1m"}],
      "when": [{"predicate": "request.path == \"/v1/chat/completions\""},
               {"predicate": "auth.identity.groups.split(\",\").exists(g, g == \"gold\")"}],
      "counters": [{"expression": "auth.identity.userid"}]}
  }
}"#;

/// The policy of `make bench`: a path predicate and a per-user counter from a header.
const HEADER: &str = r#"{
  "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
  "limits": {
    "per-user": {"rates": [{"limit": 1000000000, "window": "1h"}],
      "when": [{"predicate": "request.path == \"/v1/chat/completions\""}],
      "counters": [{"expression": "request.headers[\"x-user\"]"}]}
  }
}"#;

/// The shared mock host, serving a request's attributes from memory as Envoy would hand them.
fn host() -> MockHost {
    let mut h = MockHost::with_request_headers(&[
        (":authority", "127.0.0.1:8080"),
        (":path", "/v1/chat/completions"),
        (":method", "POST"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("content-length", "85"),
        ("x-user", "bench-user"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "1a2b3c4d-0000-4000-8000-0123456789ab"),
    ]);
    h.set_property("request.path", "/v1/chat/completions");
    h.set_metadata(&[(
        "envoy.filters.http.ext_authz",
        serde_json::json!({"identity": {"userid": "user-1", "groups": "free"}}),
    )]);
    h
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    for (name, json) in [("tutorial", TUTORIAL), ("header-counter", HEADER)] {
        let p = Policy::from_json(json.as_bytes()).expect("policy");
        let mut h = host();
        assert_eq!(p.evaluate(&mut h).applied.len(), 1, "{name}");
        g.bench_function(BenchmarkId::new("evaluate", name), |b| {
            b.iter(|| {
                // The mock logs every read; the log is not the filter's work.
                h.fetched.clear();
                black_box(p.evaluate(black_box(&mut h)))
            })
        });
    }
    g.finish();
}

fn descriptor(c: &mut Criterion) {
    let mut g = c.benchmark_group("descriptor");
    let p = Policy::from_json(TUTORIAL.as_bytes()).expect("policy");
    let d = p.evaluate(&mut host());
    g.bench_function("check_descriptor", |b| {
        b.iter(|| black_box(p.check_descriptor(black_box(&d.applied))))
    });
    g.bench_function("check_request_encoded", |b| {
        b.iter(|| {
            let d = token_ratelimit::policy::Decision {
                applied: d.applied.clone(),
                errors: Vec::new(),
                costs: Vec::new(),
            };
            black_box(RequestFlow::start(&p, d, "/v1/chat/completions"))
        })
    });
    g.finish();
}

/// An OpenAI chat completion of about `size` bytes (the content padded), usage at the end.
fn completion(size: usize) -> Vec<u8> {
    let head = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"sim","choices":[{"index":0,"message":{"role":"assistant","content":""#;
    let tail = r#""},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":300,"total_tokens":312}}"#;
    let mut out = head.as_bytes().to_vec();
    let words = ["tok ", "word ", "\\n", "\\\"quoted\\\" ", "caf\u{e9} "];
    let mut i = 0;
    while out.len() + tail.len() < size {
        out.extend_from_slice(words[i % words.len()].as_bytes());
        i += 1;
    }
    out.extend_from_slice(tail.as_bytes());
    out
}

/// About `size` bytes of an OpenAI chat stream: word chunks, the finish chunk, the usage chunk.
fn stream(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 512);
    let mut i = 0;
    while out.len() < size {
        out.extend_from_slice(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"sim\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"finish_reason\":null}}]}}\n\n"
        ).as_bytes());
        i += 1;
    }
    out.extend_from_slice(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"sim\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n");
    out.extend_from_slice(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"sim\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":300,\"total_tokens\":312}}\n\ndata: [DONE]\n\n");
    out
}

fn extract(framing: BodyFormat, body: &[u8], chunk: usize) -> Option<u64> {
    let mut x = UsageExtractor::new(
        Format::OpenAi,
        framing,
        Encoding::Identity,
        UsagePaths::default(),
        4 << 20,
    );
    for c in body.chunks(chunk) {
        x.feed(c);
    }
    x.finish().and_then(|u| u.total)
}

fn json(c: &mut Criterion) {
    let mut g = c.benchmark_group("json");
    for (name, size) in [("1KB", 1 << 10), ("1MB", 1 << 20)] {
        let body = completion(size);
        assert_eq!(extract(BodyFormat::Json, &body, 16 << 10), Some(312));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(BenchmarkId::new("usage", name), |b| {
            b.iter(|| black_box(extract(BodyFormat::Json, black_box(&body), 16 << 10)))
        });
        g.bench_function(BenchmarkId::new("memchr", name), |b| {
            b.iter(|| black_box(memchr::memchr(0xff, black_box(&body))))
        });
    }
    g.finish();
}

fn sse(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse");
    let body = stream(1 << 20);
    g.throughput(Throughput::Bytes(body.len() as u64));
    for chunk in [256usize, 16 << 10] {
        assert_eq!(extract(BodyFormat::EventStream, &body, chunk), Some(312));
        g.bench_function(
            BenchmarkId::new("usage", format!("1MB/{chunk}B-chunks")),
            |b| b.iter(|| black_box(extract(BodyFormat::EventStream, black_box(&body), chunk))),
        );
    }
    g.bench_function(BenchmarkId::new("memchr-lines", "1MB"), |b| {
        b.iter(|| black_box(memchr::memchr_iter(b'\n', black_box(&body)).count()))
    });
    g.finish();
}

/// A chat request of about 1 KB, streaming or not.
fn chat_request(stream: bool) -> Vec<u8> {
    let content = "word ".repeat(180);
    format!(
        r#"{{"model":"sim","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"{content}"}}],"max_tokens":20,"stream":{stream}}}"#
    )
    .into_bytes()
}

fn request(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    for stream in [false, true] {
        let body = chat_request(stream);
        assert_eq!(
            token_ratelimit::usage::inject_include_usage(&body).is_some(),
            stream
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        let name = if stream { "streaming" } else { "non-streaming" };
        g.bench_function(BenchmarkId::new("inject_include_usage", name), |b| {
            b.iter(|| {
                black_box(token_ratelimit::usage::inject_include_usage(black_box(
                    &body,
                )))
            })
        });
    }
    g.finish();
}

/// A cost limit priced by a table, and one by a CEL expression computing the same cost for
/// the model asked for (`requestBodyJSON('/model')`).
const COST: &str = r#"{
  "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
  "requestBody": {"allowOnHeadersStopIteration": true},
  "limits": {
    "prices": {"rates": [{"limit": 100000000, "window": "30d"}], "tokens": "cost",
      "prices": {"models": {"gpt-4o": {"prompt": 2500000, "cached": 250000, "completion": 10000000},
                            "claude-sonnet": {"prompt": 3000000, "cached": 300000, "completion": 15000000}},
                 "default": {"prompt": 1000000, "completion": 1000000}}},
    "expression": {"rates": [{"limit": 100000000, "window": "30d"}], "tokens": "cost",
      "cost": "requestBodyJSON('/model') == 'gpt-4o' ? ((usage.prompt - usage.cached) * 2500000 + usage.cached * 250000 + usage.completion * 10000000 + 999999) / 1000000 : ((usage.prompt - usage.cached) * 3000000 + usage.cached * 300000 + usage.completion * 15000000 + 999999) / 1000000"}
  }
}"#;

fn cost(c: &mut Criterion) {
    use token_ratelimit::cost::CostUsage;
    let p = Policy::from_json(COST.as_bytes()).expect("the cost policy compiles");
    let mut h = host();
    h.body_json = Some(serde_json::json!({"model": "gpt-4o"}));
    let d = p.evaluate(&mut h);
    assert_eq!(d.applied.len(), 2, "{:?}", d.errors);
    let usage = CostUsage {
        prompt: 1200,
        completion: 300,
        total: 1500,
        cached: 1000,
        model: "gpt-4o-2024-08-06",
        ..CostUsage::default()
    };
    let index = |name: &str| p.limits.iter().position(|l| l.name == name).expect("a limit");
    let (by_table, by_expression) = (index("prices"), index("expression"));
    let prices = p.cost(by_table, &d.costs, &usage).expect("priced");
    assert_eq!(
        p.cost(by_expression, &d.costs, &usage),
        Ok(prices),
        "the same cost both ways"
    );
    let mut g = c.benchmark_group("cost");
    for (name, limit) in [("prices", by_table), ("expression", by_expression)] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(p.cost(limit, black_box(&d.costs), black_box(&usage))))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = policy, descriptor, json, sse, request, cost
}
criterion_main!(benches);
