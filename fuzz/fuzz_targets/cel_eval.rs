//! CEL evaluation over arbitrary attribute values.
//!
//! A fixed policy with representative predicates and counters (headers, path, typed `auth.*`
//! and `request.auth.*` identities, typed properties, `requestBodyJSON()`, the string
//! extensions, arithmetic with `/` and `%`, comparisons, timestamps and durations, the macros)
//! is evaluated over a request whose properties (raw bytes in Envoy's encoding: ints are 8
//! little-endian bytes), dynamic metadata (a serialized Metadata message of arbitrary Structs,
//! or arbitrary bytes), headers and body JSON come from the fuzz input. Limits alternate
//! between `onError: skip` and `deny`. Requests are what an attacker controls; nothing they
//! send may panic the filter.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use common::MapHost;
use libfuzzer_sys::fuzz_target;
use token_ratelimit::config::TokenCategory;
use token_ratelimit::flow::RequestFlow;
use token_ratelimit::policy::Policy;

/// Property paths the policy reads (as the host is asked for them).
const PROPERTIES: &[&str] = &[
    "request.path",
    "request.url_path",
    "request.method",
    "request.scheme",
    "request.time",
    "request.duration",
    "request.size",
    "request.total_size",
    "source.address",
    "source.port",
    "destination.port",
    "connection.mtls",
    "connection.id",
    "filter_state.x-plan",
];

/// Header names the policy reads.
const HEADERS: &[&str] = &[
    "x-tier", "host", "x-n", "x-d", "x-u", "x-f", "x-i", "x-key", "x-re", "x-ts", "x-dur",
    "x-groups", "x-user", "authorization",
];

/// `(when, counters)` per limit.
const LIMITS: &[(&[&str], &[&str])] = &[
    (&[r#"request.path == "/v1/chat/completions""#], &["auth.identity.userid"]),
    (&[r#"request.path.startsWith("/v1/") && request.url_path.endsWith("completions") && request.path.contains("chat")"#], &[]),
    (&[r#"request.path.matches("^/v1/(chat/)?completions$")"#], &[]),
    (&[r#"request.headers["x-tier"].lowerAscii() == "gold" || request.headers["x-tier"].upperAscii() == "FREE""#], &[r#"request.headers["x-user"]"#]),
    (&[r#"has(request.headers.host) && request.headers.host.trim() != """#], &[]),
    (&[r#"auth.identity.groups.split(",").exists(g, g == "free")"#], &["auth.identity.userid"]),
    (&[r#"auth.identity.groups.split(",").all(g, g.startsWith("t"))"#], &[]),
    (&[r#"auth.identity.groups.split(",").exists_one(g, g == "gold")"#], &[]),
    (&[r#"size(auth.identity.userid) > 3 && auth.identity.userid != "anonymous""#], &[]),
    (&[r#"int(request.headers["x-n"]) / int(request.headers["x-d"]) > 1"#], &[]),
    (&[r#"int(request.headers["x-n"]) % int(request.headers["x-d"]) == 0"#], &[]),
    (&[r#"uint(request.headers["x-u"]) / uint(request.headers["x-d"]) >= 1u"#], &[]),
    (&[r#"uint(request.headers["x-u"]) % uint(request.headers["x-d"]) == 0u"#], &[]),
    (&["source.port > 1024 && destination.port < 65536"], &[]),
    (&[r#"connection.mtls || string(connection.id) == "7""#], &[]),
    (&[r#"request.time > timestamp("2024-01-01T00:00:00Z")"#], &[]),
    (&["request.time.getHours() < 12 && request.time.getDayOfWeek() != 0"], &[]),
    (&[r#"request.duration > duration("1s")"#], &[]),
    (&[r#"requestBodyJSON("/model") == "gpt-4o""#], &[r#"requestBodyJSON("/model")"#]),
    (&[r#"requestBodyJSON("/model").startsWith("gpt-")"#], &[]),
    (&[r#"requestBodyJSON("/messages").exists(m, m.role == "system")"#], &[]),
    (&[r#"size(requestBodyJSON("/messages")) > 1"#], &[]),
    (&[r#"requestBodyJSON("/stream") == true"#], &[]),
    (&[r#"requestBodyJSON("/max_tokens") > 1000"#], &[]),
    (&[r#"double(request.headers["x-f"]) * 1.5 > 10.0"#], &[]),
    (&[r#"request.headers["x-key"].matches(request.headers["x-re"])"#], &[]),
    (&[r#"timestamp(request.headers["x-ts"]) < request.time"#], &[]),
    (&[r#"duration(request.headers["x-dur"]) > duration("1m")"#], &[]),
    (&[r#"request.time + duration(request.headers["x-dur"]) > request.time"#], &[]),
    (&["request.time - request.duration < request.time"], &[]),
    (&[r#"metadata.filter_metadata["custom"].plan in ["pro", "team"]"#], &[]),
    (&[r#"auth.claims.groups.exists(g, g == "gold")"#], &["auth.claims.sub"]),
    (&[r#"auth.claims.level >= 2 && auth.claims.premium == true"#], &["auth.claims.level"]),
    (&[r#"has(auth.claims.exp) && auth.claims.exp > 1700000000"#], &[]),
    (&[r#"request.auth.identity.metadata.annotations["kuadrant.io/groups"].split(",").exists(g, g == "free")"#], &[]),
    (&[r#"size(auth.identity) > 0"#], &["auth.identity"]),
    (&[], &["auth.claims.groups", "auth.claims.org", "request.auth.claims"]),
    (&[], &[r#"auth.claims.ratio * 2.0"#, r#"auth.claims.groups[int(request.headers["x-i"])]"#]),
    (&[r#"filter_state["x-plan"] == "pro""#], &[]),
    (&[r#"request.headers["x-groups"].split(",").map(g, g.trim()).filter(g, g != "").size() > 0"#], &[]),
    (&["request.size + request.total_size > 100"], &[]),
    (&[r#"request.method in ["POST", "PUT"] && request.scheme == "https""#], &[]),
    (&["max(source.port, destination.port) > 8000"], &[]),
    // Counters only: they are evaluated on every request.
    (&[], &[
        "auth.identity.userid",
        r#"request.headers["authorization"].split(" ")[1]"#,
        r#"request.headers["x-user"].upperAscii().trim().replace("-", "_")"#,
        r#"request.headers["x-groups"].split(",").map(g, g.lowerAscii()).join("|")"#,
    ]),
    (&[], &[r#"int(request.headers["x-n"]) + source.port"#]),
    (&[], &["source.port * 2 - destination.port"]),
    (&[], &[r#"uint(request.headers["x-u"]) + 1u"#]),
    (&[], &[r#"uint(request.headers["x-u"]) - uint(request.headers["x-d"])"#]),
    (&[], &[r#"int(request.headers["x-n"]) * int(request.headers["x-d"])"#]),
    (&[], &[r#"-int(request.headers["x-n"])"#]),
    (&[], &[r#"request.path[int(request.headers["x-i"])]"#]),
    (&[], &[r#"[1, 2, 3][int(request.headers["x-i"])]"#]),
    (&[], &[r#"requestBodyJSON("/max_tokens") + 1"#]),
    (&[], &[r#"requestBodyJSON("/metadata")["user"]"#]),
    (&[], &[r#"requestBodyJSON("/messages")[0].content"#]),
    (&[], &[r#"requestBodyJSON("/n") * requestBodyJSON("/max_tokens")"#]),
    (&[], &["string(request.time)"]),
    (&[], &["string(request.duration)"]),
    (&[], &["request.time.getFullYear()"]),
    (&[], &["request.time.getMilliseconds()"]),
    (&[], &["connection.id"]),
    (&[], &[r#"double(request.headers["x-f"]) / 3.0"#]),
    (&[], &[r#"int(double(request.headers["x-f"]))"#]),
    (&[], &[r#"uint(int(request.headers["x-n"]))"#]),
    (&[], &["size(request.headers)"]),
    (&[], &[r#"auth.identity.userid + ":" + auth.identity.tier"#]),
    (&[], &[r#"int(requestBodyJSON("/n")) % 7"#]),
    (&[], &[r#"source.address.split(":")[0]"#]),
    (&[], &["int(auth.identity.n) - 1"]),
    (&[], &[r#"request.headers["x-n"] == "1" ? "one" : request.headers["x-n"]"#]),
    (&[], &[r#"request.duration + duration(request.headers["x-dur"])"#]),
    (&[], &["request.duration * 2"]),
    (&[], &[r#"request.time - timestamp(request.headers["x-ts"])"#]),
    (&[], &[r#"timestamp(request.headers["x-ts"]).getMonth()"#]),
    (&[], &[r#"request.headers["x-key"].startsWith("sk-") ? request.headers["x-key"] : "anon""#]),
    (&[], &[r#"request.headers["x-key"].lowerAscii().replace(request.headers["x-re"], request.headers["x-user"])"#]),
];

fn policy() -> &'static Policy {
    thread_local! {
        static POLICY: &'static Policy = {
            let limits: serde_json::Map<String, serde_json::Value> = LIMITS
                .iter()
                .enumerate()
                .map(|(i, (when, counters))| {
                    let tokens = ["total", "prompt", "completion"][i % 3];
                    (
                        format!("l{i:02}"),
                        serde_json::json!({
                            "rates": [{"limit": 100, "window": "1m"}],
                            "when": when.iter().map(|p| serde_json::json!({"predicate": p})).collect::<Vec<_>>(),
                            "counters": counters.iter().map(|c| serde_json::json!({"expression": c})).collect::<Vec<_>>(),
                            "tokens": tokens,
                            "onError": if i % 4 == 3 { "deny" } else { "skip" },
                        }),
                    )
                })
                .collect();
            let cfg = serde_json::json!({
                "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
                "requestBody": {"allowOnHeadersStopIteration": true},
                "limits": limits,
            });
            let policy = Policy::from_json(&serde_json::to_vec(&cfg).unwrap()).expect("the fuzz policy compiles");
            Box::leak(Box::new(policy))
        };
    }
    POLICY.with(|p| *p)
}

/// A property value, encoded as Envoy encodes it.
#[derive(Arbitrary, Debug)]
enum Prop {
    Str(String),
    Bytes(Vec<u8>),
    Int(i64),
    Bool(bool),
}

impl Prop {
    fn encode(&self) -> Vec<u8> {
        match self {
            Prop::Str(s) => s.as_bytes().to_vec(),
            Prop::Bytes(b) => b.clone(),
            Prop::Int(i) => i.to_le_bytes().to_vec(),
            Prop::Bool(b) => vec![u8::from(*b)],
        }
    }
}

/// A header value: arbitrary bytes, or a number written out (so that `int()` conversions
/// see extreme values often).
#[derive(Arbitrary, Debug)]
enum HeaderValue {
    Bytes(Vec<u8>),
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
}

impl HeaderValue {
    fn encode(&self) -> Vec<u8> {
        match self {
            HeaderValue::Bytes(b) => b.clone(),
            HeaderValue::Int(i) => i.to_string().into_bytes(),
            HeaderValue::UInt(u) => u.to_string().into_bytes(),
            HeaderValue::Float(f) => f.to_string().into_bytes(),
            HeaderValue::Text(s) => s.clone().into_bytes(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// As serde_json would parse it (its parser stops at 128 levels: deeper is cut).
    fn value(&self, depth: usize) -> serde_json::Value {
        use serde_json::Value as V;
        if depth > 120 {
            return V::Null;
        }
        match self {
            Json::Null => V::Null,
            Json::Bool(b) => V::Bool(*b),
            Json::Int(i) => V::from(*i),
            Json::UInt(u) => V::from(*u),
            Json::Float(f) => serde_json::Number::from_f64(*f).map_or(V::Null, V::Number),
            Json::Str(s) => V::String(s.clone()),
            Json::Array(items) => V::Array(items.iter().map(|j| j.value(depth + 1)).collect()),
            Json::Object(entries) => V::Object(entries.iter().map(|(k, j)| (k.clone(), j.value(depth + 1))).collect()),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Body {
    model: Option<Json>,
    max_tokens: Option<Json>,
    n: Option<Json>,
    stream: Option<Json>,
    messages: Option<Json>,
    metadata: Option<Json>,
    /// Replaces the whole document.
    other: Option<Json>,
}

/// The stream's dynamic metadata (the property `metadata`).
#[derive(Arbitrary, Debug)]
enum Metadata {
    /// Namespaces (index into NAMESPACES) with an object each, serialized as Envoy does.
    Typed(Vec<(u8, Vec<(String, Json)>)>),
    /// Bytes that may not be a Metadata message at all.
    Raw(Vec<u8>),
}

/// The namespaces the policy reads (`auth` is ext_authz's).
const NAMESPACES: &[&str] = &["envoy.filters.http.ext_authz", "custom", "other"];

#[derive(Arbitrary, Debug)]
struct Request {
    /// (index into PROPERTIES, value)
    properties: Vec<(u8, Prop)>,
    metadata: Option<Metadata>,
    /// (index into HEADERS, value)
    headers: Vec<(u8, HeaderValue)>,
    other_headers: Vec<(String, Vec<u8>)>,
    body: Option<Body>,
    path: String,
}

fuzz_target!(|req: Request| {
    let mut host = MapHost::default();
    for (i, v) in &req.properties {
        let path = PROPERTIES[*i as usize % PROPERTIES.len()];
        host.properties.insert(path.to_string(), v.encode());
    }
    match &req.metadata {
        Some(Metadata::Typed(namespaces)) => {
            let entries: Vec<(&str, serde_json::Value)> = namespaces
                .iter()
                .map(|(i, fields)| {
                    let obj = fields.iter().map(|(k, j)| (k.clone(), j.value(1))).collect();
                    (NAMESPACES[*i as usize % NAMESPACES.len()], serde_json::Value::Object(obj))
                })
                .collect();
            host.set_metadata(&entries);
        }
        Some(Metadata::Raw(bytes)) => {
            host.properties.insert("metadata".into(), bytes.clone());
        }
        None => {}
    }
    for (i, v) in &req.headers {
        host.request_headers.push((HEADERS[*i as usize % HEADERS.len()].to_string(), v.encode()));
    }
    host.request_headers.extend(req.other_headers.iter().cloned());
    host.body_json = req.body.as_ref().map(|b| match &b.other {
        Some(doc) => doc.value(0),
        None => {
            let mut obj = serde_json::Map::new();
            for (k, v) in [
                ("model", &b.model),
                ("max_tokens", &b.max_tokens),
                ("n", &b.n),
                ("stream", &b.stream),
                ("messages", &b.messages),
                ("metadata", &b.metadata),
            ] {
                if let Some(v) = v {
                    obj.insert(k.to_string(), v.value(1));
                }
            }
            serde_json::Value::Object(obj)
        }
    });

    let policy = policy();
    let decision = policy.evaluate(&mut host);
    for a in &decision.applied {
        assert!(a.limit < policy.limits.len());
        assert_eq!(a.counters.len(), policy.limits[a.limit].counters.len());
    }
    for category in [TokenCategory::Total, TokenCategory::Prompt, TokenCategory::Completion] {
        let _ = policy.report_descriptor(&decision.applied, category, None);
    }
    let (flow, check) = RequestFlow::start(policy, decision, &req.path);
    assert_eq!(flow.is_limited(), check.is_some());
});
