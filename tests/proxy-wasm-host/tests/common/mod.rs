//! Shared by the tests: where the real artifact is, and a plugin configuration.
#![allow(dead_code)]

use proxy_wasm_host::Host;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The filter's wasm artifact: `$TOKEN_RATELIMIT_WASM`, or the workspace's release build
/// (`cargo build --release --target wasm32-wasip1 --lib` at the workspace root).
pub fn wasm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TOKEN_RATELIMIT_WASM") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("wasm32-wasip1/release/token_ratelimit.wasm")
}

/// Loads the artifact; fails when it is missing, or (at its default path) older than a source
/// file it was built from (cargo's dep-info beside it lists them).
pub fn host() -> Host {
    let path = wasm_path();
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build it first: cargo build --release --target wasm32-wasip1 --lib (at the workspace root)",
            path.display()
        )
    });
    if std::env::var_os("TOKEN_RATELIMIT_WASM").is_none() {
        if let Some(newer) = sources(&path)
            .into_iter()
            .find(|f| modified(f).is_some_and(|t| t > built))
        {
            panic!(
                "{} is older than {}: rebuild it (cargo build --release --target wasm32-wasip1 --lib)",
                path.display(),
                newer.display()
            );
        }
    }
    Host::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The workspace sources the artifact was built from, per cargo's `.d` file.
fn sources(wasm: &Path) -> Vec<PathBuf> {
    let Ok(d) = std::fs::read_to_string(wasm.with_extension("d")) else {
        return Vec::new();
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_default();
    let deps = d.split_once(": ").map(|(_, deps)| deps).unwrap_or("");
    deps.replace("\\ ", "\u{0}")
        .split_whitespace()
        .map(|f| PathBuf::from(f.replace('\u{0}', " ")))
        .filter(|f| f.starts_with(&root))
        .collect()
}

pub const CONFIG: &str = r#"{
  "rateLimitService": {"cluster": "ratelimit", "domain": "llm", "failureMode": "deny", "mode": "checkReport"},
  "limits": {
    "free": {
      "rates": [{"limit": 50, "window": "1m"}],
      "when": [{"predicate": "request.path == \"/v1/chat/completions\""}],
      "counters": [{"expression": "auth.identity.userid"}]
    }
  }
}"#;

// ---------------------------------------------------------------------------------------------
// Scenario helpers (tests/filter.rs): a configuration builder, identities, requests, the rate-limit
// service's replies and the reports the root context sends.

use prost::Message;
use proxy_wasm_host::{Action, GrpcCall, Plugin, Refused, Stream};
use ratelimit_proto::{
    Code, DescriptorStatus, RateLimit, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
};
use serde_json::{json, Value};
use std::time::Duration;

/// The chat completions path the tutorial limit applies to.
pub const CHAT: &str = "/v1/chat/completions";
/// The dynamic-metadata namespace `auth.*` reads by default.
pub const AUTH_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// A plugin configuration under construction (JSON, as Envoy hands it over).
#[derive(Clone, Debug)]
pub struct Config(pub Value);

impl Config {
    /// The rate-limit service in checkReport mode (the scenarios of this file's first part
    /// describe it) and no limit.
    pub fn service() -> Config {
        Config(json!({
            "rateLimitService": {"cluster": "ratelimit", "domain": "llm", "mode": "checkReport"},
            "limits": {}
        }))
    }

    /// The tutorial's limit `free`: 50 tokens a minute per user on chat completions.
    pub fn tutorial() -> Config {
        Config::service().limit(
            "free",
            json!({
                "rates": [{"limit": 50, "window": "1m"}],
                "when": [{"predicate": format!("request.path == \"{CHAT}\"")}],
                "counters": [{"expression": "auth.identity.userid"}]
            }),
        )
    }

    /// One limit on every request, counted per user, spending `tokens`.
    pub fn per_user(name: &str, tokens: &str) -> Config {
        Config::service().limit(name, per_user_limit(tokens))
    }

    /// Adds (or replaces) the limit `name`.
    pub fn limit(self, name: &str, limit: Value) -> Config {
        self.set(&["limits", name], limit)
    }

    /// Sets the field at `path` (object keys), creating the objects on the way.
    pub fn set(mut self, path: &[&str], value: Value) -> Config {
        let (last, parents) = path.split_last().expect("a path");
        let mut at = &mut self.0;
        for key in parents {
            at = at
                .as_object_mut()
                .expect("an object on the path")
                .entry(key.to_string())
                .or_insert_with(|| json!({}));
        }
        at.as_object_mut()
            .expect("an object at the end of the path")
            .insert(last.to_string(), value);
        self
    }

    pub fn failure_mode(self, mode: &str) -> Config {
        self.set(&["rateLimitService", "failureMode"], json!(mode))
    }

    pub fn fallback(self, fallback: &str) -> Config {
        self.set(&["usage", "fallback"], json!(fallback))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.0).expect("JSON")
    }

    /// A plugin configured with this; panics when the filter refuses it.
    pub fn start(&self) -> Plugin {
        host()
            .plugin(self.to_json())
            .unwrap_or_else(|r| panic!("configuration refused: {r}\n{}", self.to_json()))
    }

    /// Like [`Config::start`], without echoing the module's logs (for loops of many requests).
    pub fn start_quiet(&self) -> Plugin {
        host()
            .plugin_builder()
            .quiet()
            .start(self.to_json())
            .unwrap_or_else(|r| panic!("configuration refused: {r}\n{}", self.to_json()))
    }

    /// What the filter says when it refuses this; panics when it accepts it.
    pub fn refuse(&self) -> Refused {
        match host().plugin(self.to_json()) {
            Ok(_) => panic!("configuration accepted: {}", self.to_json()),
            Err(r) => r,
        }
    }
}

/// A limit without predicates (it applies to every request) counted per user.
pub fn per_user_limit(tokens: &str) -> Value {
    json!({
        "rates": [{"limit": 1000, "window": "1m"}],
        "counters": [{"expression": "auth.identity.userid"}],
        "tokens": tokens
    })
}

/// The stream's dynamic metadata as Envoy answers the property `metadata`: a serialized
/// `envoy.config.core.v3.Metadata` whose `filter_metadata` (field 1) maps each namespace to a
/// `google.protobuf.Struct`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metadata {
    #[prost(map = "string, message", tag = "1")]
    pub filter_metadata: std::collections::HashMap<String, prost_types::Struct>,
}

/// The `metadata` bytes of an identity `{field: value, ...}` (strings) that ext_authz left
/// under `identity` in its namespace.
pub fn identity_metadata(fields: &[(&str, &str)]) -> Vec<u8> {
    use prost_types::value::Kind;
    let identity = prost_types::Struct {
        fields: fields
            .iter()
            .map(|(k, v)| {
                let v = prost_types::Value {
                    kind: Some(Kind::StringValue(v.to_string())),
                };
                (k.to_string(), v)
            })
            .collect(),
    };
    let namespace = prost_types::Struct {
        fields: [(
            "identity".to_string(),
            prost_types::Value {
                kind: Some(Kind::StructValue(identity)),
            },
        )]
        .into(),
    };
    Metadata {
        filter_metadata: [(AUTH_NAMESPACE.to_string(), namespace)].into(),
    }
    .encode_to_vec()
}

/// Sets `auth.identity` for the stream to these string fields, as ext_authz would.
pub fn set_identity(stream: &Stream, fields: &[(&str, &str)]) {
    stream.set_property(&["metadata"], identity_metadata(fields));
}

/// A new stream of `user` (no identity for `None`) that sends `POST path` headers with
/// `extra` headers; the request body follows (`end_of_stream` false).
pub fn post(plugin: &Plugin, user: Option<&str>, path: &str, extra: &[(&str, &str)]) -> Stream {
    request(plugin, user, "POST", path, extra)
}

/// Like [`post`], with any method.
pub fn request(
    plugin: &Plugin,
    user: Option<&str>,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Stream {
    let stream = plugin.http_stream();
    if let Some(user) = user {
        set_identity(&stream, &[("userid", user)]);
    }
    let mut headers = vec![
        (":method", method),
        (":path", path),
        (":authority", "llm.example"),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    stream.request_headers(&headers, false);
    stream
}

/// The one pending `CheckRateLimit` the stream made.
pub fn check_of(stream: &Stream) -> GrpcCall {
    let calls: Vec<GrpcCall> = stream
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == "CheckRateLimit")
        .collect();
    assert_eq!(calls.len(), 1, "one pending check: {calls:?}");
    calls.into_iter().next().unwrap()
}

/// The descriptor entries of the check (or report) request `call` carries.
pub fn entries_of(call: &GrpcCall) -> Vec<(String, String)> {
    let request: RateLimitRequest = call.decode();
    assert_eq!(request.descriptors.len(), 1, "one descriptor: {request:?}");
    entries(&request.descriptors[0])
}

pub fn entries(d: &RateLimitDescriptor) -> Vec<(String, String)> {
    d.entries
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect()
}

/// Owned pairs, to compare with [`entries`] and headers.
pub fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A service reply with this overall code and statuses.
pub fn reply(code: Code, statuses: Vec<DescriptorStatus>) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: code as i32,
        statuses,
        ..Default::default()
    }
}

/// OK without statuses, as Limitador answers: the filter knows nothing of the budget left, so it
/// sends the request's report at once, at the end of the stream.
pub fn ok() -> RateLimitResponse {
    reply(Code::Ok, vec![])
}

/// Tokens a [`ok_with_room`] check says remain: more than any scenario spends.
pub const ROOM: u32 = u32::MAX;

/// OK with a status that leaves plenty of tokens ([`ROOM`]): the request's report waits for the
/// root context's tick (the scenarios of aggregation, retries and report contents use it).
pub fn ok_with_room() -> RateLimitResponse {
    reply(
        Code::Ok,
        vec![status(
            Code::Ok,
            "room",
            ROOM,
            ROOM,
            Duration::from_secs(60),
        )],
    )
}

/// The status of one limit: `remaining` of `per_unit` tokens a minute, resetting in `reset`.
pub fn status(
    code: Code,
    name: &str,
    per_unit: u32,
    remaining: u32,
    reset: Duration,
) -> DescriptorStatus {
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: name.into(),
            requests_per_unit: per_unit,
            unit: ratelimit_proto::Unit::Minute as i32,
        }),
        limit_remaining: remaining,
        duration_until_reset: Some(prost_types::Duration {
            seconds: reset.as_secs() as i64,
            nanos: reset.subsec_nanos() as i32,
        }),
    }
}

/// Answers the stream's pending check.
pub fn answer(plugin: &Plugin, stream: &Stream, response: &RateLimitResponse) {
    plugin.reply_grpc(check_of(stream).token, response.encode_to_vec());
}

/// A request of `user` to `path` with `body`, allowed by the service with plenty of room (its
/// body reaches the filter after the check; its report waits for the tick).
pub fn allowed(plugin: &Plugin, user: &str, path: &str, body: &[u8]) -> Stream {
    let stream = post(plugin, Some(user), path, &[]);
    stream.request_body(body, true);
    answer(plugin, &stream, &ok_with_room());
    assert_eq!(stream.request_resumed(), 1, "allowed requests resume");
    stream
}

/// Response headers `200` with this content-type (none for `None`) and extra headers.
pub fn response_headers(stream: &Stream, content_type: Option<&str>, extra: &[(&str, &str)]) {
    let mut headers = vec![(":status", "200")];
    if let Some(ct) = content_type {
        headers.push(("content-type", ct));
    }
    headers.extend_from_slice(extra);
    assert_eq!(stream.response_headers(&headers, false), Action::Continue);
}

/// The upstream's response in `chunks`, the last one ending the stream; every chunk passes
/// through unchanged.
pub fn respond(stream: &Stream, content_type: Option<&str>, chunks: &[&[u8]]) {
    response_headers(stream, content_type, &[]);
    let before = stream.response_body_forwarded().len();
    for (i, chunk) in chunks.iter().enumerate() {
        let action = stream.response_body(chunk, i + 1 == chunks.len());
        assert_eq!(action, Action::Continue, "response chunks are never held");
    }
    assert_eq!(
        stream.response_body_forwarded()[before..],
        chunks.concat(),
        "the client gets the body unchanged"
    );
}

/// A whole served request: allowed, answered with `body` in one chunk, finished.
pub fn serve(plugin: &Plugin, user: &str, path: &str, content_type: &str, body: &[u8]) {
    let stream = allowed(plugin, user, path, b"{}");
    respond(&stream, Some(content_type), &[body]);
    stream.finish();
}

/// An OpenAI chat completion with this usage.
pub fn openai_json(prompt: u64, completion: u64) -> Vec<u8> {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    })
    .to_string()
    .into_bytes()
}

/// An OpenAI chat completion stream with `include_usage`, lines ending in `eol`.
pub fn openai_sse(prompt: u64, completion: u64, eol: &str) -> Vec<u8> {
    let events = [
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#.to_string(),
        r#"{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#.to_string(),
        format!(
            r#"{{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
            prompt + completion
        ),
        "[DONE]".to_string(),
    ];
    events
        .iter()
        .map(|e| format!("data: {e}{eol}{eol}"))
        .collect::<String>()
        .into_bytes()
}

/// A `Report` the root context sent, decoded.
#[derive(Debug, Clone)]
pub struct Report {
    pub call: GrpcCall,
    pub request: RateLimitRequest,
}

impl Report {
    pub fn hits(&self) -> u32 {
        self.request.hits_addend
    }

    pub fn entries(&self) -> Vec<(String, String)> {
        assert_eq!(self.request.descriptors.len(), 1, "{:?}", self.request);
        entries(&self.request.descriptors[0])
    }
}

/// The pending `Report` calls.
pub fn pending_reports(plugin: &Plugin) -> Vec<Report> {
    plugin
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == "Report")
        .map(|call| Report {
            request: call.decode(),
            call,
        })
        .collect()
}

/// One tick: the reports it sent (from the root context, to the service, in the domain).
pub fn tick(plugin: &Plugin) -> Vec<Report> {
    assert!(
        pending_reports(plugin).is_empty(),
        "answer the reports in flight first"
    );
    plugin.tick();
    let reports = pending_reports(plugin);
    for r in &reports {
        assert_eq!(
            r.call.context_id,
            plugin.root_context_id(),
            "sent by the root context"
        );
        assert_eq!(
            r.call.full_method(),
            "kuadrant.service.ratelimit.v1.RateLimitService/Report"
        );
        assert_eq!(r.call.upstream, "ratelimit");
        assert_eq!(r.request.domain, "llm");
        assert!(r.hits() > 0, "no report of 0 tokens: {r:?}");
    }
    reports
}

/// The reports the filter dispatched at once (from a stream's end, not on the tick), which
/// the service accepts: `(descriptor entries, hits)` per report. Each was the root context's call
/// (the stream made the root effective to dispatch it), and a tick then sends nothing more.
pub fn delivered_at_once(plugin: &Plugin) -> Vec<(Vec<(String, String)>, u32)> {
    let reports = pending_reports(plugin);
    assert!(!reports.is_empty(), "a report was sent at once");
    let delivered = reports
        .into_iter()
        .map(|r| {
            assert_eq!(
                r.call.context_id,
                plugin.root_context_id(),
                "dispatched as the root context's call: {r:?}"
            );
            assert_eq!(r.call.root_context_id, plugin.root_context_id());
            assert_eq!(r.request.domain, "llm");
            plugin.reply_grpc_message(r.call.token, &ok());
            (r.entries(), r.hits())
        })
        .collect();
    assert!(tick(plugin).is_empty(), "sent once");
    delivered
}

/// One tick whose reports the service accepts: `(descriptor entries, hits)` per report.
pub fn tick_delivered(plugin: &Plugin) -> Vec<(Vec<(String, String)>, u32)> {
    tick(plugin)
        .into_iter()
        .map(|r| {
            plugin.reply_grpc_message(r.call.token, &ok());
            (r.entries(), r.hits())
        })
        .collect()
}

/// The descriptor of a report for the per-user limit `name`.
pub fn user_descriptor(name: &str, user: &str) -> Vec<(String, String)> {
    pairs(&[
        (&format!("limit.{name}"), "1"),
        ("auth.identity.userid", user),
    ])
}

/// A counter of the filter (`token_ratelimit.<name>`), 0 when never incremented.
pub fn metric(plugin: &Plugin, name: &str) -> u64 {
    plugin
        .metric(&format!("token_ratelimit.{name}"))
        .unwrap_or(0)
}
