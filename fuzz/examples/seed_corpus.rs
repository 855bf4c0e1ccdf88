//! Writes the seed corpus of the fuzz targets (`fuzz/corpus/<target>/`), from the shipped
//! configuration and the real captures in `../shared/samples` (when that folder is there).
//!
//! ```sh
//! target/debug/token-ratelimit json envoy/envoy.yaml > fuzz/corpus/config/envoy.json
//! cd fuzz && cargo run --example seed_corpus
//! ```
//!
//! The `cel_eval` seeds are not written here: its input is decoded with `arbitrary`, so its
//! seeds are a few inputs a fuzzing run found, kept after `cargo fuzz cmin`. Nor are the
//! `cost` seeds: `text-*.cel` are written by hand (a mode byte 0, a cost expression, a newline,
//! bytes for the request and usages), `gen-*` and `prices-*` were found by a fuzzing run.

use prost::Message;
use ratelimit_proto::{Code, DescriptorStatus, HeaderValue, RateLimit, RateLimitResponse, Unit};
use std::fs;
use std::path::Path;

fn to_struct(v: &serde_json::Value) -> prost_types::Struct {
    let serde_json::Value::Object(map) = v else { panic!("an object") };
    prost_types::Struct { fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() }
}

fn to_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(to_value).collect() }),
        serde_json::Value::Object(_) => Kind::StructValue(to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
    println!("corpus/{target}/{name}: {} bytes", bytes.len());
}

fn with_header(flags: u8, body: &[u8]) -> Vec<u8> {
    // Low nibble: no cut points; high nibble: the target's flags.
    let mut out = vec![flags << 4];
    out.extend_from_slice(body);
    out
}

fn with_cuts(flags: u8, cuts: &[u16], body: &[u8]) -> Vec<u8> {
    let mut out = vec![(flags << 4) | cuts.len() as u8];
    for c in cuts {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(body);
    out
}

fn status(code: Code, remaining: u32, reset: i64, name: &str) -> DescriptorStatus {
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit { name: name.into(), requests_per_unit: 50, unit: Unit::Minute as i32 }),
        limit_remaining: remaining,
        duration_until_reset: Some(prost_types::Duration { seconds: reset, nanos: 0 }),
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let samples = root.join("../../shared/samples");
    let sample = |p: &str| fs::read(samples.join(p)).ok();

    // config: the shipped configuration as JSON and as the Struct Envoy hands over, the
    // README's full configuration, and CEL expressions (one per line).
    let envoy = fs::read(root.join("corpus/config/envoy.json")).expect("corpus/config/envoy.json (see the doc comment)");
    let envoy: serde_json::Value = serde_json::from_slice(&envoy).unwrap();
    write("config", "envoy.struct.pb", &to_struct(&envoy).encode_to_vec());
    let full = serde_json::json!({
        "rateLimitService": {"cluster": "ratelimit", "domain": "llm", "timeout": "100ms", "failureMode": "allow"},
        "auth": {"metadataNamespace": "envoy.filters.http.ext_authz"},
        "reporting": {"flushPeriod": "100ms", "timeout": "1s", "maxRetries": 3},
        "usage": {"paths": {"prompt": ["/meta/input_tokens"], "completion": ["/meta/output_tokens"], "total": []},
                  "fallback": "fixed", "fixedTokens": 10, "maxBodyBytes": 4194304, "injectStreamUsage": true,
                  "record": true},
        "rateLimitHeaders": "openai",
        "requestBody": {"maxBytes": 1048576, "allowOnHeadersStopIteration": true},
        "limits": {
            "big-model": {"rates": [{"limit": 10000, "window": "1h30m"}, {"limit": 100000, "window": "1d"}],
                          "when": [{"predicate": "requestBodyJSON('/model') == 'big' && source.port > 1024"}],
                          "counters": [{"expression": "request.headers['x-user'].lowerAscii()"}], "tokens": "completion"},
            "big-model-next": {"rates": [{"limit": 5000, "window": "1h"}], "enforcement": "shadow"}
        }
    });
    write("config", "full.json", serde_json::to_string_pretty(&full).unwrap().as_bytes());
    write(
        "config",
        "expressions.cel",
        concat!(
            "request.path == \"/v1/chat/completions\" && request.headers['x-tier'].lowerAscii() in ['gold', 'free']\n",
            "auth.identity.groups.split(\",\").exists(g, g == \"free\") ? auth.identity.userid : 'anon'\n",
            "requestBodyJSON('/messages').map(m, m.content).filter(c, size(c) > 2).size() % 3 + source.port / 2\n",
            "request.time + duration('1h') > timestamp('2024-01-01T00:00:00Z') || metadata.filter_metadata['ns'].x.replace('a', 'b').join('-')\n",
        )
        .as_bytes(),
    );

    // usage_json: real non-streaming responses, then each format's shape.
    for (name, path, cuts) in [
        ("llama-server-chat.json", "llama-server/chat.json", &[7u16, 40][..]),
        ("llama-cpp-python-chat.json", "llama-cpp-python/chat.json", &[][..]),
    ] {
        if let Some(body) = sample(path) {
            write("usage_json", name, &with_cuts(0, cuts, &body));
        }
    }
    write("usage_json", "responses.json", &with_header(1 << 2, br#"{"object":"response","usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10}}"#));
    write("usage_json", "anthropic.json", &with_header(2 << 2, br#"{"type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":2,"cache_read_input_tokens":3,"output_tokens":7}}"#));
    write("usage_json", "gemini-array.json", &with_cuts(3 << 2, &[30], br#"[{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":1,"totalTokenCount":9}},{"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":6,"thoughtsTokenCount":2,"totalTokenCount":16}}]"#));
    write("usage_json", "custom-paths.json", &with_header(1, br#"{"meta":{"input_tokens":3,"output_tokens":5,"total":8},"a/b":[{"c~d":1}]}"#));

    // sse: real streams, then each format's events, CRLF, and custom pointers.
    for (name, path) in [
        ("llama-server-include-usage.sse", "llama-server/chat-stream-include-usage.sse"),
        ("llama-cpp-python.sse", "llama-cpp-python/chat-stream.sse"),
    ] {
        if let Some(body) = sample(path) {
            write("sse", name, &with_cuts(0, &[5, 300, 301], &body));
        }
    }
    write("sse", "anthropic.sse", &with_header(0, concat!(
        "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\r\n\r\n",
        "event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n",
        ": comment\r\nevent: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n").as_bytes()));
    write("sse", "responses.sse", &with_header(0, concat!(
        "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n",
        "event: response.completed\ndata: {\"type\":\"response.completed\",\n",
        "data: \"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":6,\"total_tokens\":10}}}\n\n").as_bytes()));
    write("sse", "gemini.sse", &with_cuts(0, &[20], b"data: {\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1,\"totalTokenCount\":9}}\n\ndata:{\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":4,\"thoughtsTokenCount\":1,\"totalTokenCount\":13}}\n\n"));
    write("sse", "custom-paths.sse", &with_header(2, b"/meta/in /meta/out /meta/total /x~1y\ndata: {\"meta\":{\"in\":7,\"out\":9}}\n\ndata: {\"other\":1}\n\ndata: [DONE]\n\n"));

    // check_reply: replies of the rate-limit service, and a request body to rewrite.
    let ok = RateLimitResponse {
        overall_code: Code::Ok as i32,
        statuses: vec![status(Code::Ok, 28, 42, "free"), status(Code::Ok, 4000, 3600, "prompts")],
        response_headers_to_add: vec![HeaderValue { key: "X-Served-By".into(), value: "limitador".into(), raw_value: vec![] }],
        ..Default::default()
    };
    write("check_reply", "ok.pb", &ok.encode_to_vec());
    let over = RateLimitResponse {
        overall_code: Code::OverLimit as i32,
        statuses: vec![status(Code::OverLimit, 0, 58, "free"), status(Code::Ok, 10, 3000, "prompts")],
        response_headers_to_add: vec![HeaderValue { key: "x-raw".into(), value: String::new(), raw_value: b"raw".to_vec() }],
        ..Default::default()
    };
    write("check_reply", "over-limit.pb", &over.encode_to_vec());
    let unknown = RateLimitResponse { statuses: vec![status(Code::Unknown, 0, 0, "")], ..Default::default() };
    write("check_reply", "unknown.pb", &unknown.encode_to_vec());
    write("check_reply", "stream-request.json", br#"{"model":"sim","stream":true,"stream_options":{"include_usage":false},"messages":[{"role":"user","content":"hello there"}],"max_tokens":20}"#);
}
