//! The usage event of a streamed OpenAI answer, driven through the real wasm module: when the
//! filter added `stream_options.include_usage` to the request, it reads the usage from the
//! event the upstream then sends (`"choices": []`) and withholds that event from the client,
//! at whatever byte the body is cut; a client that asked for usage itself gets the body as it
//! was sent.

mod common;

use common::*;
use proxy_wasm_host::{Action, Plugin, Stream};
use serde_json::Value;

/// A streaming request without `stream_options`: the filter adds it.
const STREAMING: &[u8] =
    br#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
/// A streaming request that asks for usage itself.
const ASKS_FOR_USAGE: &[u8] =
    br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;

/// `body` without its usage event (the one with `"choices":[]`).
fn without_usage_event(body: &[u8], eol: &str) -> Vec<u8> {
    let sep = format!("{eol}{eol}");
    String::from_utf8_lossy(body)
        .split_inclusive(sep.as_str())
        .filter(|e| !e.contains(r#""choices":[]"#))
        .collect::<String>()
        .into_bytes()
}

/// An allowed streaming request of alice with `request`; returns the stream once the upstream
/// answered its headers (`text/event-stream`, with a `content-length` to see it go).
fn streamed(plugin: &Plugin, request: &[u8]) -> Stream {
    let stream = allowed(plugin, "alice", CHAT, request);
    response_headers(
        &stream,
        Some("text/event-stream"),
        &[("content-length", "9999")],
    );
    stream
}

/// The body in the chunks `cuts` make, the last ending the stream; what the client got.
fn deliver(stream: &Stream, body: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut at = 0;
    for &cut in cuts {
        let action = stream.response_body(&body[at..cut], false);
        assert_eq!(action, Action::Continue, "response chunks are never held");
        at = cut;
    }
    assert_eq!(stream.response_body(&body[at..], true), Action::Continue);
    stream.response_body_forwarded()
}

#[test]
fn the_injected_usage_event_is_withheld_at_every_cut_and_charged_exactly() {
    let plugin = Config::tutorial().start_quiet();
    for eol in ["\n", "\r\n"] {
        let body = openai_sse(7, 5, eol);
        let want = without_usage_event(&body, eol);
        assert!(
            want.len() < body.len() && want.ends_with(format!("data: [DONE]{eol}{eol}").as_bytes())
        );
        for cut in 0..=body.len() {
            let stream = streamed(&plugin, STREAMING);
            let sent: Value = serde_json::from_slice(&stream.request_body_forwarded()).unwrap();
            assert_eq!(sent["stream_options"]["include_usage"], true, "injected");
            assert_eq!(
                stream.response_header("content-length"),
                None,
                "the body may shrink"
            );
            let got = deliver(&stream, &body, &[cut]);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "cut at {cut} ({eol:?})"
            );
            stream.finish();
            assert_eq!(
                tick_delivered(&plugin),
                [(user_descriptor("free", "alice"), 12)],
                "cut at {cut}: charged the usage read from the withheld event"
            );
        }
    }
    // Byte by byte: every chunk one byte.
    let body = openai_sse(3, 4, "\n");
    let stream = streamed(&plugin, STREAMING);
    let cuts: Vec<usize> = (1..body.len()).collect();
    assert_eq!(
        deliver(&stream, &body, &cuts),
        without_usage_event(&body, "\n")
    );
    stream.finish();
    assert_eq!(
        tick_delivered(&plugin),
        [(user_descriptor("free", "alice"), 7)]
    );
    assert_eq!(metric(&plugin, "usage_missing"), 0);
}

#[test]
fn a_client_that_asked_for_usage_gets_the_body_untouched() {
    let plugin = Config::tutorial().start_quiet();
    let body = openai_sse(7, 5, "\n");
    for cut in 0..=body.len() {
        let stream = streamed(&plugin, ASKS_FOR_USAGE);
        assert_eq!(
            stream.request_body_forwarded(),
            ASKS_FOR_USAGE,
            "not rewritten"
        );
        assert_eq!(
            stream.response_header("content-length").as_deref(),
            Some("9999")
        );
        assert_eq!(deliver(&stream, &body, &[cut]), body, "cut at {cut}");
        stream.finish();
        assert_eq!(
            tick_delivered(&plugin),
            [(user_descriptor("free", "alice"), 12)]
        );
    }
}

#[test]
fn usage_on_a_chunk_with_choices_and_other_bodies_go_on_untouched() {
    let plugin = Config::tutorial().start_quiet();
    // Usage on the last chunk that has choices (as some servers send it): not withheld.
    let body = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],",
        "\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1,\"total_tokens\":3}}\n\n",
        "data: [DONE]\n\n"
    );
    for cut in 0..=body.len() {
        let stream = streamed(&plugin, STREAMING);
        assert_eq!(
            deliver(&stream, body.as_bytes(), &[cut]),
            body.as_bytes(),
            "cut {cut}"
        );
        stream.finish();
        assert_eq!(
            tick_delivered(&plugin),
            [(user_descriptor("free", "alice"), 3)]
        );
    }
    // An upstream error (JSON) to an injected request: untouched.
    let stream = allowed(&plugin, "alice", CHAT, STREAMING);
    let error = br#"{"error":{"message":"bad","type":"invalid_request_error"}}"#;
    respond(&stream, Some("application/json"), &[error]);
    stream.finish();
}
