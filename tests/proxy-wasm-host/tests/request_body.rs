//! What the filter does with a request body, driven through the real wasm module with Envoy's
//! `allow_on_headers_stop_iteration` (Envoy hands the body over while the headers wait): the
//! body is held (buffered by Envoy) only while the filter needs it whole and never beyond
//! `requestBody.maxBytes`; past that it goes on unread and unmodified, under Envoy's flow
//! control instead of its buffer limit (no `413`); trailers end a held body; and the upstream
//! always receives the whole body.

mod common;

use common::*;
use prost::Message;
use proxy_wasm_host::{Action, Plugin, Stream};
use ratelimit_proto::{Code, ReserveRequest, ReserveResponse};
use serde_json::json;

const RESERVE: &str = "Reserve";
/// Envoy's StopIterationAndWatermark: held under flow control, unread by the filter.
const WATERMARK: Action = Action::Other(2);
/// The filter's hold limit in these scenarios, and Envoy's buffer limit (a little above it).
const MAX_BYTES: usize = 4096;
const BUFFER_LIMIT: usize = 6000;

/// A plugin of `config` in an Envoy that delivers bodies while headers wait, with a buffer
/// limit of [`BUFFER_LIMIT`] bytes.
fn start(config: Config) -> Plugin {
    let config = config
        .set(&["requestBody", "allowOnHeadersStopIteration"], json!(true))
        .set(&["requestBody", "maxBytes"], json!(MAX_BYTES));
    host()
        .plugin_builder()
        .allow_on_headers_stop_iteration(true)
        .buffer_limit(BUFFER_LIMIT)
        .start(config.to_json())
        .unwrap_or_else(|r| panic!("configuration refused: {r}"))
}

/// The tutorial's per-user limit, admitted by reservation (total tokens, reservation default
/// 256).
fn reserving() -> Plugin {
    start(Config::per_user("all", "total").set(&["rateLimitService", "mode"], json!("reservation")))
}

/// checkReport, with `include_usage` added to OpenAI streaming requests (the default).
fn checking() -> Plugin {
    start(Config::per_user("all", "total"))
}

/// The pending `Reserve` calls of the stream, decoded.
fn reserves(stream: &Stream) -> Vec<(u32, ReserveRequest)> {
    stream
        .pending_grpc_calls()
        .into_iter()
        .filter(|c| c.method == RESERVE)
        .map(|c| (c.token, c.decode()))
        .collect()
}

fn grant(plugin: &Plugin, token: u32) {
    let reply = ReserveResponse {
        code: Code::Ok as i32,
        reservation_id: "r1".into(),
        statuses: vec![],
        hold_ttl: None,
    };
    plugin.reply_grpc(token, reply.encode_to_vec());
}

/// A chat request body of about `size` bytes: one message of `x`s, `max_tokens` 100,
/// streaming or not.
fn chat_body(size: usize, stream: bool) -> Vec<u8> {
    let text = "x".repeat(size.saturating_sub(90));
    json!({"model": "m", "stream": stream, "max_tokens": 100,
           "messages": [{"role": "user", "content": text}]})
    .to_string()
    .into_bytes()
}

#[test]
fn a_body_over_max_bytes_goes_on_unread_and_whole_and_the_reservation_holds_the_default_amount() {
    let plugin = reserving();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let body = chat_body(3 * MAX_BYTES, false);
    let chunks: Vec<&[u8]> = body.chunks(MAX_BYTES / 2).collect();
    assert_eq!(
        stream.request_body(chunks[0], false),
        WATERMARK,
        "copied: within maxBytes; Envoy keeps it under flow control"
    );
    assert_eq!(stream.request_body(chunks[1], false), WATERMARK);
    assert!(reserves(&stream).is_empty(), "the body is still wanted");
    // The third chunk passes maxBytes: reserved without the body, the rest kept by Envoy under
    // flow control, never buffered past its limit.
    assert_eq!(stream.request_body(chunks[2], false), WATERMARK);
    let pending = reserves(&stream);
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].1.amount, 256,
        "reservation.defaultAmount: the body was not read"
    );
    for (i, chunk) in chunks.iter().enumerate().skip(3) {
        assert_eq!(stream.request_body(chunk, i + 1 == chunks.len()), WATERMARK);
    }
    assert_eq!(stream.local_reply(), None, "no 413");
    assert_eq!(
        stream.request_resumed(),
        0,
        "the upstream waits for the reservation"
    );
    assert!(stream.request_body_forwarded().is_empty());
    grant(&plugin, pending[0].0);
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(
        stream.request_body_forwarded(),
        body,
        "the whole body, unmodified"
    );
    assert_eq!(
        plugin.metric("token_ratelimit.request_bodies_unread"),
        Some(1)
    );
}

#[test]
fn a_body_within_max_bytes_is_read_for_the_reservation_and_goes_on_whole() {
    let plugin = reserving();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let body = chat_body(MAX_BYTES - 10, false);
    let (first, second) = body.split_at(1000);
    assert_eq!(stream.request_body(first, false), WATERMARK);
    assert_eq!(
        stream.request_body(second, true),
        WATERMARK,
        "waits for the reservation"
    );
    let pending = reserves(&stream);
    assert_eq!(pending.len(), 1);
    // The prompt estimate (its text) plus max_tokens, not the default.
    assert!(
        pending[0].1.amount > 100 && pending[0].1.amount != 256,
        "{:?}",
        pending[0].1
    );
    grant(&plugin, pending[0].0);
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(stream.request_body_forwarded(), body);
    assert_eq!(plugin.metric("token_ratelimit.request_bodies_unread"), None);
}

#[test]
fn a_streaming_request_over_max_bytes_goes_on_without_include_usage_and_unmodified() {
    let plugin = checking();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let check = check_of(&stream);
    let body = chat_body(2 * MAX_BYTES, true);
    let (first, rest) = body.split_at(MAX_BYTES - 100);
    assert_eq!(
        stream.request_body(first, false),
        WATERMARK,
        "copied for include_usage"
    );
    assert_eq!(
        stream.request_body(rest, true),
        WATERMARK,
        "over maxBytes: unread"
    );
    plugin.reply_grpc(check.token, ok_with_room().encode_to_vec());
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(stream.local_reply(), None);
    assert_eq!(stream.request_body_forwarded(), body, "not rewritten");
}

#[test]
fn a_body_that_ends_with_trailers_is_complete_read_for_the_reservation_and_goes_on_whole() {
    // HTTP/2 (or chunked HTTP/1.1): HEADERS, DATA without END_STREAM, then trailers.
    let plugin = reserving();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let body = chat_body(1000, false);
    assert_eq!(stream.request_body(&body, false), Action::Pause);
    assert!(reserves(&stream).is_empty(), "the body may go on");
    assert_eq!(
        stream.request_trailers(&[("x-checksum", "1")]),
        Action::Pause,
        "the trailers end the body; they wait for the reservation"
    );
    let pending = reserves(&stream);
    assert_eq!(pending.len(), 1);
    assert_ne!(pending[0].1.amount, 256, "the body was read: its own bound");
    grant(&plugin, pending[0].0);
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(stream.request_body_forwarded(), body);
}

#[test]
fn a_streaming_request_that_ends_with_trailers_gets_include_usage_and_goes_on_whole() {
    let plugin = checking();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let check = check_of(&stream);
    let body = chat_body(500, true);
    let (first, second) = body.split_at(200);
    assert_eq!(stream.request_body(first, false), WATERMARK);
    assert_eq!(stream.request_body(second, false), Action::Pause);
    assert_eq!(
        stream.request_trailers(&[("x-checksum", "1")]),
        Action::Pause
    );
    plugin.reply_grpc(check.token, ok_with_room().encode_to_vec());
    assert_eq!(stream.request_resumed(), 1);
    let sent: serde_json::Value =
        serde_json::from_slice(&stream.request_body_forwarded()).expect("JSON upstream");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        sent["messages"][0]["content"].as_str().map(str::len),
        Some(500 - 90)
    );
}

#[test]
fn a_body_and_trailers_arriving_while_the_check_is_pending_wait_for_it_unread() {
    // checkReport without include_usage: the filter needs nothing of the body.
    let plugin =
        start(Config::per_user("all", "total").set(&["usage", "injectStreamUsage"], json!(false)));
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let check = check_of(&stream);
    let body = chat_body(3 * BUFFER_LIMIT, true);
    for chunk in body.chunks(1000) {
        assert_eq!(
            stream.request_body(chunk, false),
            WATERMARK,
            "flow control, not a buffer"
        );
    }
    assert_eq!(
        stream.request_trailers(&[("x-checksum", "1")]),
        Action::Pause
    );
    assert!(
        stream.request_body_forwarded().is_empty(),
        "nothing before the check's answer"
    );
    assert_eq!(
        stream.local_reply(),
        None,
        "no 413 past Envoy's buffer limit"
    );
    plugin.reply_grpc(check.token, ok_with_room().encode_to_vec());
    assert_eq!(stream.request_resumed(), 1);
    assert_eq!(stream.request_body_forwarded(), body);
}

#[test]
fn a_streaming_request_whose_end_comes_in_an_empty_chunk_gets_include_usage() {
    // Chunked HTTP/1.1 and some HTTP/2 clients end the body with an empty chunk.
    let plugin = checking();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let check = check_of(&stream);
    plugin.reply_grpc(check.token, ok_with_room().encode_to_vec());
    assert_eq!(stream.request_resumed(), 1, "admitted before its body");
    let body = chat_body(300, true);
    let (first, second) = body.split_at(100);
    assert_eq!(stream.request_body(first, false), WATERMARK);
    assert_eq!(
        stream.request_body(second, false),
        Action::Pause,
        "the chunk that completes the document stays in view, to be rewritten"
    );
    assert_eq!(stream.request_body(b"", true), Action::Continue);
    let sent: serde_json::Value =
        serde_json::from_slice(&stream.request_body_forwarded()).expect("JSON upstream");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["model"], "m");
}

#[test]
fn a_streaming_request_in_one_chunk_gets_include_usage_in_place() {
    let plugin = checking();
    let stream = post(&plugin, Some("alice"), CHAT, &[]);
    let check = check_of(&stream);
    let body = chat_body(300, true);
    assert_eq!(
        stream.request_body(&body, true),
        WATERMARK,
        "waits for the check"
    );
    plugin.reply_grpc(check.token, ok_with_room().encode_to_vec());
    let sent = stream.request_body_forwarded();
    assert!(
        sent.starts_with(&body[..body.len() - 1]),
        "the client's bytes, then the member"
    );
    let sent: serde_json::Value = serde_json::from_slice(&sent).expect("JSON upstream");
    assert_eq!(sent["stream_options"]["include_usage"], true);
}
