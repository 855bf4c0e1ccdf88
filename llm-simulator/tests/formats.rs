//! The other provider formats (OpenAI Responses, Anthropic Messages, Gemini) and the knobs
//! added with them (usage on the last choice, compression, abort-after, `by_format`), over
//! real HTTP on a loopback port.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use llm_simulator::{app, contract::completion_text, serve, Config};
use reqwest::header::HeaderMap;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

/// Serves a fresh simulator (fresh ledger) on 127.0.0.1:0 and returns its base URL.
async fn start(config: Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(listener, app(config), std::future::pending()));
    format!("http://{addr}")
}

/// A raw answer: status, headers, body bytes, and whether the body ended cleanly (false when
/// the connection was dropped mid-body).
struct Raw {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    clean_end: bool,
}

impl Raw {
    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("utf-8 body")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

async fn send(base: &str, path: &str, body: &Value, headers: &[(&str, &str)]) -> Raw {
    let mut req = Client::new().post(format!("{base}{path}")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send().await.expect("send");
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut out = Vec::new();
    let clean_end = loop {
        match resp.chunk().await {
            Ok(Some(b)) => out.extend_from_slice(&b),
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    Raw {
        status,
        headers,
        body: out,
        clean_end,
    }
}

async fn post(base: &str, path: &str, body: Value, headers: &[(&str, &str)]) -> Raw {
    let raw = send(base, path, &body, headers).await;
    assert!(raw.clean_end, "body ended early: {}", raw.text());
    raw
}

async fn stats(base: &str) -> Value {
    reqwest::get(format!("{base}/_simulator/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json")
}

/// Splits `event: NAME\ndata: JSON\n\n` events (Anthropic, OpenAI Responses), checking the
/// exact framing and that each JSON's `type` is the event name.
fn named_events(body: &str) -> Vec<(String, Value)> {
    assert!(body.ends_with("\n\n"), "unterminated stream: {body:?}");
    body.split_terminator("\n\n")
        .map(|e| {
            let (event, data) = e
                .split_once('\n')
                .unwrap_or_else(|| panic!("event without data line: {e:?}"));
            let name = event
                .strip_prefix("event: ")
                .unwrap_or_else(|| panic!("no 'event: ' line: {e:?}"));
            let data = data
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no 'data: ' line: {e:?}"));
            let v: Value =
                serde_json::from_str(data).unwrap_or_else(|err| panic!("bad data {data}: {err}"));
            assert_eq!(v["type"], name, "type matches the event name: {e}");
            (name.to_string(), v)
        })
        .collect()
}

/// `data: JSON\n\n` OpenAI chunks; `[DONE]` is returned as the string "[DONE]".
fn data_events(body: &str) -> Vec<String> {
    body.split_terminator("\n\n")
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no 'data: ' prefix: {e:?}"))
                .to_string()
        })
        .collect()
}

fn parse(e: &str) -> Value {
    serde_json::from_str(e).unwrap_or_else(|err| panic!("bad chunk {e}: {err}"))
}

/// Gemini `?alt=sse` events: `data: JSON\r\n\r\n`.
fn gemini_sse_events(body: &str) -> Vec<Value> {
    assert!(
        body.ends_with("\r\n\r\n"),
        "CRLF CRLF ends events: {body:?}"
    );
    body.split_terminator("\r\n\r\n")
        .map(|e| {
            let data = e
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("no 'data: ' prefix: {e:?}"));
            assert!(!data.contains('\n'), "one line per event: {e:?}");
            parse(data)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

// ---------------------------------------------------------------------------------------------
// OpenAI Responses API

#[tokio::test]
async fn responses_usage_follows_contract() {
    let base = start(Config::default()).await;
    let body = json!({
        "model": "gpt-sim",
        "instructions": "You are terse.",
        "max_output_tokens": 5,
        "input": [
            {"role": "user", "content": "  hello   there\tworld\n"},
            {"role": "user", "content": [
                {"type": "input_text", "text": "two words"},
                {"type": "input_image", "image_url": "http://x/y.png"}
            ]}
        ]
    });
    let r = post(&base, "/v1/responses", body, &[("x-simulator-user", "u")]).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gpt-sim");
    assert_eq!(v["max_output_tokens"], 5);
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("resp_")));
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["role"], "assistant");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(
        v["output"][0]["content"][0]["text"],
        "tok1 tok2 tok3 tok4 tok5"
    );
    assert_eq!(v["usage"]["input_tokens"], 8);
    assert_eq!(v["usage"]["output_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 13);
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(v["usage"]["output_tokens_details"]["reasoning_tokens"], 0);

    // A string input, the default length, and the header override.
    let v = post(&base, "/v1/responses", json!({"input": "a b c"}), &[])
        .await
        .json();
    assert_eq!(
        (
            &v["usage"]["input_tokens"],
            &v["usage"]["output_tokens"],
            &v["usage"]["total_tokens"]
        ),
        (&json!(3), &json!(16), &json!(19))
    );
    let v = post(
        &base,
        "/v1/responses",
        json!({"input": "a", "max_output_tokens": 50}),
        &[("x-simulator-completion-tokens", "2")],
    )
    .await
    .json();
    assert_eq!(v["usage"]["output_tokens"], 2);
    assert_eq!(v["output"][0]["content"][0]["text"], "tok1 tok2");

    // No usage: the field is absent, the tokens still counted.
    let v = post(
        &base,
        "/v1/responses",
        json!({"input": "a b", "max_output_tokens": 1}),
        &[("x-simulator-no-usage", "true")],
    )
    .await
    .json();
    assert!(v.get("usage").is_none(), "{v}");

    let s = stats(&base).await;
    assert_eq!(
        s["by_format"]["openai-responses"],
        json!({"requests": 4, "prompt_tokens": 14, "completion_tokens": 24, "total_tokens": 38})
    );
    assert_eq!(s["by_user"]["u"]["total_tokens"], 13);
}

#[tokio::test]
async fn responses_stream_events_and_completed_usage() {
    let base = start(Config::default()).await;
    let body = json!({"model": "m", "stream": true, "max_output_tokens": 3,
                      "instructions": "sys", "input": "one two"});
    let r = post(&base, "/v1/responses", body, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let text = r.text();
    assert!(!text.contains("[DONE]"), "no [DONE] in the Responses API");
    let events = named_events(&text);
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (_, v)) in events.iter().enumerate() {
        assert_eq!(v["sequence_number"], i, "sequence numbers count from 0");
    }
    let created = &events[0].1["response"];
    assert_eq!(created["status"], "in_progress");
    assert!(created["usage"].is_null());
    assert_eq!(created["output"], json!([]));
    let deltas: Vec<&str> = events[4..7]
        .iter()
        .map(|(_, v)| v["delta"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(deltas, ["tok1", " tok2", " tok3"]);
    assert_eq!(events[7].1["text"], "tok1 tok2 tok3");
    let done = &events[10].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "tok1 tok2 tok3");
    assert_eq!(done["usage"]["input_tokens"], 3);
    assert_eq!(done["usage"]["output_tokens"], 3);
    assert_eq!(done["usage"]["total_tokens"], 6);
    // Only the completed response carries usage.
    assert!(events[..10]
        .iter()
        .all(|(_, v)| v.pointer("/response/usage").is_none_or(Value::is_null)));

    // Zero words: no delta events, empty text, usage still final.
    let r = post(
        &base,
        "/v1/responses",
        json!({"stream": true, "input": "x", "max_output_tokens": 0}),
        &[],
    )
    .await;
    let events = named_events(&r.text());
    assert_eq!(events.len(), 8);
    assert!(!names(&events).contains(&"response.output_text.delta"));
    assert_eq!(events[7].1["response"]["usage"]["output_tokens"], 0);
    assert_eq!(events[7].1["response"]["usage"]["total_tokens"], 1);

    // No usage: the completed response has none.
    let r = post(
        &base,
        "/v1/responses",
        json!({"stream": true, "input": "x", "max_output_tokens": 1}),
        &[("x-simulator-no-usage", "1")],
    )
    .await;
    let events = named_events(&r.text());
    let last = &events.last().expect("events").1;
    assert_eq!(last["type"], "response.completed");
    assert!(last["response"].get("usage").is_none(), "{last}");

    let s = stats(&base).await;
    assert_eq!(
        s["by_format"]["openai-responses"],
        json!({"requests": 3, "prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages

#[tokio::test]
async fn anthropic_usage_follows_contract() {
    let base = start(Config::default()).await;
    let body = json!({
        "model": "claude-sim",
        "max_tokens": 4,
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {"role": "user", "content": "hello there world"},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "two words"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}
            ]}
        ]
    });
    let r = post(&base, "/v1/messages", body.clone(), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-sim");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("msg_")));
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "tok1 tok2 tok3 tok4"}])
    );
    assert_eq!(v["stop_reason"], "max_tokens");
    assert!(v["stop_sequence"].is_null());
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 9, "output_tokens": 4,
               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    );

    // Cache tokens from the headers: reported apart from input_tokens, counted as prompt.
    let v = post(
        &base,
        "/v1/messages",
        body,
        &[
            ("x-simulator-cache-read-tokens", "100"),
            ("x-simulator-cache-creation-tokens", "7"),
            ("x-simulator-user", "cached"),
        ],
    )
    .await
    .json();
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 9, "output_tokens": 4,
               "cache_creation_input_tokens": 7, "cache_read_input_tokens": 100})
    );

    // No max_tokens: 16 words, end_turn; a string system counts.
    let v = post(
        &base,
        "/v1/messages",
        json!({"system": "be brief", "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await
    .json();
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 3);
    assert_eq!(v["usage"]["output_tokens"], 16);
    assert_eq!(v["content"][0]["text"], completion_text(16));

    let s = stats(&base).await;
    assert_eq!(
        s["by_user"]["cached"],
        json!({"requests": 1, "prompt_tokens": 116, "completion_tokens": 4, "total_tokens": 120})
    );
    assert_eq!(
        s["by_format"]["anthropic"],
        json!({"requests": 3, "prompt_tokens": 128, "completion_tokens": 24, "total_tokens": 152})
    );
}

#[tokio::test]
async fn anthropic_stream_events_and_cumulative_output() {
    let base = start(Config::default()).await;
    let body = json!({"model": "claude-sim", "stream": true, "max_tokens": 3,
                      "system": "sys", "messages": [{"role": "user", "content": "a b"}]});
    let r = post(
        &base,
        "/v1/messages",
        body,
        &[("x-simulator-cache-read-tokens", "20")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let events = named_events(&r.text());
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let start_msg = &events[0].1["message"];
    assert_eq!(start_msg["type"], "message");
    assert_eq!(start_msg["model"], "claude-sim");
    assert_eq!(start_msg["content"], json!([]));
    assert!(start_msg["stop_reason"].is_null());
    assert_eq!(
        start_msg["usage"],
        json!({"input_tokens": 3, "output_tokens": 1,
               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 20})
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events[3..6]
        .iter()
        .map(|(_, v)| {
            assert_eq!(v["delta"]["type"], "text_delta");
            assert_eq!(v["index"], 0);
            v["delta"]["text"].as_str().unwrap_or("?").to_string()
        })
        .collect();
    assert_eq!(text, "tok1 tok2 tok3");
    let delta = &events[7].1;
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "max_tokens", "stop_sequence": null})
    );
    // Cumulative: the final count, not an increment over message_start's 1.
    assert_eq!(delta["usage"], json!({"output_tokens": 3}));

    // A longer one without max_tokens: 16 words, end_turn, output_tokens 16.
    let r = post(
        &base,
        "/v1/messages",
        json!({"stream": true, "messages": [{"role": "user", "content": "x"}]}),
        &[],
    )
    .await;
    let events = named_events(&r.text());
    assert_eq!(events.len(), 6 + 16);
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 16);

    // No usage: neither message_start nor message_delta has usage.
    let r = post(
        &base,
        "/v1/messages",
        json!({"stream": true, "max_tokens": 1, "messages": []}),
        &[("x-simulator-no-usage", "yes")],
    )
    .await;
    let text = r.text();
    assert!(!text.contains("usage"), "{text}");
    assert_eq!(named_events(&text).len(), 7);

    let s = stats(&base).await;
    assert_eq!(
        s["by_format"]["anthropic"],
        json!({"requests": 3, "prompt_tokens": 25, "completion_tokens": 20, "total_tokens": 45})
    );
}

// ---------------------------------------------------------------------------------------------
// Gemini

fn gemini_body(max: Option<u64>) -> Value {
    let mut b = json!({
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "hello there world"}]},
            {"role": "model", "parts": [{"text": "ok"}]},
            {"role": "user", "parts": [{"text": "two words"}, {"inlineData": {"mimeType": "image/png", "data": "AA"}}]}
        ]
    });
    if let Some(n) = max {
        b["generationConfig"] = json!({"maxOutputTokens": n, "temperature": 0.5});
    }
    b
}

#[tokio::test]
async fn gemini_usage_follows_contract() {
    let base = start(Config::default()).await;
    let r = post(
        &base,
        "/v1beta/models/gemini-sim:generateContent",
        gemini_body(Some(4)),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(
        v["candidates"][0]["content"],
        json!({"parts": [{"text": "tok1 tok2 tok3 tok4"}], "role": "model"})
    );
    assert_eq!(v["candidates"][0]["finishReason"], "MAX_TOKENS");
    assert_eq!(v["modelVersion"], "gemini-sim");
    assert_eq!(
        v["usageMetadata"],
        json!({"promptTokenCount": 9, "candidatesTokenCount": 4, "totalTokenCount": 13})
    );

    // Default length, STOP, and the /v1/ spelling of the path.
    let v = post(
        &base,
        "/v1/models/gemini-sim:generateContent",
        gemini_body(None),
        &[],
    )
    .await
    .json();
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    assert_eq!(
        v["usageMetadata"],
        json!({"promptTokenCount": 9, "candidatesTokenCount": 16, "totalTokenCount": 25})
    );

    // Unknown method: 404 in Google's error shape, not counted.
    let r = send(
        &base,
        "/v1beta/models/gemini-sim:countTokens",
        &gemini_body(None),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["status"], "NOT_FOUND");

    let s = stats(&base).await;
    assert_eq!(
        s["by_format"]["gemini"],
        json!({"requests": 2, "prompt_tokens": 18, "completion_tokens": 20, "total_tokens": 38})
    );
    assert_eq!(s["requests"], 2);
}

#[tokio::test]
async fn gemini_sse_stream_carries_running_usage() {
    let base = start(Config::default()).await;
    let r = post(
        &base,
        "/v1beta/models/gemini-sim:streamGenerateContent?alt=sse",
        gemini_body(Some(4)),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let chunks = gemini_sse_events(&r.text());
    assert_eq!(chunks.len(), 4);
    let mut text = String::new();
    for (i, c) in chunks.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(
            c["usageMetadata"],
            json!({"promptTokenCount": 9, "candidatesTokenCount": n, "totalTokenCount": 9 + n}),
            "chunk {i}"
        );
        assert_eq!(c["modelVersion"], "gemini-sim");
        assert_eq!(c["responseId"], chunks[0]["responseId"]);
        text.push_str(
            c["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap_or("?"),
        );
        let finish = &c["candidates"][0]["finishReason"];
        if i == 3 {
            assert_eq!(finish, "MAX_TOKENS");
        } else {
            assert!(finish.is_null(), "only the last chunk finishes: {c}");
        }
    }
    assert_eq!(text, "tok1 tok2 tok3 tok4");

    // Zero words: one chunk, empty text, the finish reason and the usage.
    let r = post(
        &base,
        "/v1beta/models/g:streamGenerateContent?key=abc&alt=sse",
        json!({"contents": [{"parts": [{"text": "x y"}]}], "generationConfig": {"maxOutputTokens": 0}}),
        &[],
    )
    .await;
    let chunks = gemini_sse_events(&r.text());
    assert_eq!(chunks.len(), 1);
    assert_eq!(
        chunks[0]["candidates"][0]["content"]["parts"][0]["text"],
        ""
    );
    assert_eq!(chunks[0]["candidates"][0]["finishReason"], "MAX_TOKENS");
    assert_eq!(
        chunks[0]["usageMetadata"],
        json!({"promptTokenCount": 2, "candidatesTokenCount": 0, "totalTokenCount": 2})
    );

    let s = stats(&base).await;
    assert_eq!(
        s["by_format"]["gemini"],
        json!({"requests": 2, "prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15})
    );
}

#[tokio::test]
async fn gemini_stream_without_alt_is_a_json_array() {
    let base = start(Config::default()).await;
    let r = post(
        &base,
        "/v1beta/models/gemini-sim:streamGenerateContent",
        gemini_body(None),
        &[("x-simulator-completion-tokens", "3")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    let text = r.text();
    assert!(text.starts_with("[{") && text.ends_with("}]"), "{text}");
    assert_eq!(text.matches("}\n,\r\n{").count(), 2, "{text}");
    let v = r.json();
    let chunks = v.as_array().expect("a JSON array");
    assert_eq!(chunks.len(), 3);
    for (i, c) in chunks.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(c["usageMetadata"]["candidatesTokenCount"], n);
        assert_eq!(c["usageMetadata"]["promptTokenCount"], 9);
        assert_eq!(c["usageMetadata"]["totalTokenCount"], 9 + n);
    }
    // The header fixed the length: STOP, not MAX_TOKENS.
    assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
    let s = stats(&base).await;
    assert_eq!(s["by_format"]["gemini"]["total_tokens"], 12);
}

// ---------------------------------------------------------------------------------------------
// OpenAI: usage on the last chunk with choices

#[tokio::test]
async fn usage_on_last_choice_chunk() {
    let base = start(Config::default()).await;
    for include_usage in [false, true] {
        let body = json!({"stream": true, "stream_options": {"include_usage": include_usage},
                          "max_tokens": 3, "messages": [{"role": "user", "content": "a b"}]});
        let r = post(
            &base,
            "/v1/chat/completions",
            body,
            &[("x-simulator-usage-on-last-choice", "true")],
        )
        .await;
        let events = data_events(&r.text());
        // role + 3 words + finish (with usage) + [DONE]
        assert_eq!(events.len(), 6, "include_usage {include_usage}");
        assert_eq!(events[5], "[DONE]");
        let finish = parse(&events[4]);
        assert_eq!(finish["choices"][0]["finish_reason"], "length");
        assert_eq!(finish["choices"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            finish["usage"],
            json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
        );
        assert!(events[..4].iter().all(|e| parse(e).get("usage").is_none()));
        assert!(!r.text().contains("\"choices\":[]"));
    }

    // Completions too.
    let r = post(
        &base,
        "/v1/completions",
        json!({"stream": true, "prompt": "p q r", "max_tokens": 2}),
        &[("x-simulator-usage-on-last-choice", "1")],
    )
    .await;
    let events = data_events(&r.text());
    assert_eq!(events.len(), 4, "2 words + finish + [DONE]");
    let finish = parse(&events[2]);
    assert_eq!(finish["choices"][0]["text"], "");
    assert_eq!(
        finish["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );

    // x-simulator-no-usage wins.
    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"stream": true, "max_tokens": 1, "messages": []}),
        &[
            ("x-simulator-usage-on-last-choice", "true"),
            ("x-simulator-no-usage", "true"),
        ],
    )
    .await;
    assert!(!r.text().contains("usage"));
}

// ---------------------------------------------------------------------------------------------
// Compression

fn gunzip(b: &[u8]) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(b)
        .read_to_string(&mut s)
        .expect("gunzip");
    s
}

fn inflate(b: &[u8]) -> String {
    let mut s = String::new();
    flate2::read::ZlibDecoder::new(b)
        .read_to_string(&mut s)
        .expect("inflate");
    s
}

fn unbrotli(b: &[u8]) -> String {
    let mut s = String::new();
    brotli::Decompressor::new(b, 4096)
        .read_to_string(&mut s)
        .expect("brotli");
    s
}

#[tokio::test]
async fn compressed_bodies_decode_to_the_same_usage() {
    let base = start(Config::default()).await;
    let chat = json!({"max_tokens": 5, "messages": [{"role": "user", "content": "a b c"}]});
    let expected = json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8});

    // Both the header and accept-encoding: gzip.
    let r = post(
        &base,
        "/v1/chat/completions",
        chat.clone(),
        &[
            ("x-simulator-compress", "true"),
            ("accept-encoding", "gzip, deflate, br"),
        ],
    )
    .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(r.header("vary").as_deref(), Some("accept-encoding"));
    assert_eq!(
        r.header("content-length"),
        Some(r.body.len().to_string()),
        "a whole JSON body keeps a content-length"
    );
    assert_ne!(r.body.first(), Some(&b'{'));
    let v: Value = serde_json::from_str(&gunzip(&r.body)).expect("json");
    assert_eq!(v["usage"], expected);
    assert_eq!(v["choices"][0]["message"]["content"], completion_text(5));

    // Without the header (and without --compress), or without accept-encoding: plain.
    for headers in [
        vec![("accept-encoding", "gzip")],
        vec![("x-simulator-compress", "true")],
        vec![
            ("x-simulator-compress", "true"),
            ("accept-encoding", "identity"),
        ],
    ] {
        let r = post(&base, "/v1/chat/completions", chat.clone(), &headers).await;
        assert!(r.header("content-encoding").is_none(), "{headers:?}");
        assert_eq!(r.json()["usage"], expected);
    }

    // An SSE stream in gzip, with its usage chunk.
    let stream = json!({"stream": true, "stream_options": {"include_usage": true},
                        "max_tokens": 4, "messages": [{"role": "user", "content": "x y"}]});
    let r = post(
        &base,
        "/v1/chat/completions",
        stream,
        &[("x-simulator-compress", "1"), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let events = data_events(&gunzip(&r.body));
    assert_eq!(events.len(), 8, "role + 4 words + finish + usage + [DONE]");
    assert_eq!(
        parse(&events[6])["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6})
    );

    // Anthropic in br, Gemini SSE in deflate, Responses JSON in br.
    let r = post(
        &base,
        "/v1/messages",
        json!({"stream": true, "max_tokens": 2, "messages": [{"role": "user", "content": "q"}]}),
        &[("x-simulator-compress", "true"), ("accept-encoding", "br")],
    )
    .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("br"));
    let events = named_events(&unbrotli(&r.body));
    assert_eq!(events[6].0, "message_delta");
    assert_eq!(events[6].1["usage"]["output_tokens"], 2);
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 1);

    let r = post(
        &base,
        "/v1beta/models/g:streamGenerateContent?alt=sse",
        gemini_body(Some(2)),
        &[
            ("x-simulator-compress", "true"),
            ("accept-encoding", "deflate"),
        ],
    )
    .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("deflate"));
    let chunks = gemini_sse_events(&inflate(&r.body));
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[1]["usageMetadata"]["totalTokenCount"], 11);

    let r = post(
        &base,
        "/v1/responses",
        json!({"input": "a b", "max_output_tokens": 3}),
        &[
            ("x-simulator-compress", "true"),
            ("accept-encoding", "br;q=1, gzip;q=0.5"),
        ],
    )
    .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("br"));
    let v: Value = serde_json::from_str(&unbrotli(&r.body)).expect("json");
    assert_eq!(v["usage"]["total_tokens"], 5);

    // The ledger is the same whether or not the answer was compressed.
    let s = stats(&base).await;
    assert_eq!(s["by_format"]["openai-chat"]["total_tokens"], 8 * 4 + 6);
}

#[tokio::test]
async fn compress_config_and_header_off() {
    let base = start(Config {
        compress: true,
        ..Config::default()
    })
    .await;
    let chat = json!({"max_tokens": 1, "messages": [{"role": "user", "content": "a"}]});
    let r = post(
        &base,
        "/v1/chat/completions",
        chat.clone(),
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    let v: Value = serde_json::from_str(&gunzip(&r.body)).expect("json");
    assert_eq!(v["usage"]["total_tokens"], 2);
    let r = post(
        &base,
        "/v1/chat/completions",
        chat,
        &[
            ("accept-encoding", "gzip"),
            ("x-simulator-compress", "false"),
        ],
    )
    .await;
    assert!(r.header("content-encoding").is_none());
    assert_eq!(r.json()["usage"]["total_tokens"], 2);
    // A client that asks for nothing gets plain bodies.
    let v: Value = reqwest::get(format!("{base}/_simulator/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("plain json");
    assert_eq!(v["requests"], 2);
}

#[tokio::test]
async fn compressed_stream_is_flushed_per_event() {
    let base = start(Config {
        token_delay: Duration::from_millis(150),
        ..Config::default()
    })
    .await;
    let body =
        json!({"stream": true, "max_tokens": 4, "messages": [{"role": "user", "content": "a"}]});
    let mut resp = Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .header("x-simulator-compress", "true")
        .header("accept-encoding", "gzip")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(
        resp.headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let t = Instant::now();
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    let mut first_word_at = None;
    while let Some(b) = resp.chunk().await.expect("chunk") {
        decoder.write_all(&b).expect("gunzip");
        decoder.flush().expect("flush");
        let so_far = String::from_utf8_lossy(decoder.get_ref()).to_string();
        if first_word_at.is_none() && so_far.contains("\"tok1\"") {
            assert!(!so_far.contains("[DONE]"));
            first_word_at = Some(t.elapsed());
        }
    }
    let total = t.elapsed();
    let first = first_word_at.expect("tok1 decoded");
    // tok1 is decodable ~150 ms in, the stream ends ~600 ms in.
    assert!(
        first + Duration::from_millis(250) < total,
        "first word at {first:?}, end at {total:?}"
    );
    let text = String::from_utf8(decoder.finish().expect("finish")).expect("utf-8");
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn binary_compress_flag() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-simulator"))
        .args(["--listen", "127.0.0.1:0", "--compress"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn llm-simulator");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("startup line in time")
        .expect("read stdout")
        .expect("a line");
    let addr = line
        .strip_prefix("llm-simulator listening on ")
        .expect("listening line")
        .to_string();
    let base = format!("http://{addr}");
    let r = post(
        &base,
        "/v1/messages",
        json!({"max_tokens": 2, "messages": [{"role": "user", "content": "q r"}]}),
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    let v: Value = serde_json::from_str(&gunzip(&r.body)).expect("json");
    assert_eq!(v["usage"]["input_tokens"], 2);
    assert_eq!(v["usage"]["output_tokens"], 2);
    let r = post(
        &base,
        "/v1/messages",
        json!({"max_tokens": 2, "messages": []}),
        &[],
    )
    .await;
    assert!(r.header("content-encoding").is_none());
    assert_eq!(r.json()["usage"]["output_tokens"], 2);
    let _ = child.kill().await;
}

// ---------------------------------------------------------------------------------------------
// Abort after N words

#[tokio::test]
async fn abort_after_drops_streams_early() {
    let base = start(Config::default()).await;
    let abort = [("x-simulator-abort-after", "2"), ("x-simulator-user", "ab")];
    let words = |s: &str| s.matches("tok").count();

    // OpenAI chat with include_usage: role + 2 words, then the connection drops.
    let r = send(
        &base,
        "/v1/chat/completions",
        &json!({"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 6,
                "messages": [{"role": "user", "content": "a b c"}]}),
        &abort,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.clean_end, "the body must end abruptly");
    let text = r.text();
    assert_eq!(words(&text), 2, "{text}");
    assert!(
        !text.contains("[DONE]")
            && !text.contains("usage")
            && !text.contains("finish_reason\":\"length")
    );
    assert_eq!(data_events(&text).len(), 3);

    // Completions.
    let r = send(
        &base,
        "/v1/completions",
        &json!({"stream": true, "prompt": "p", "max_tokens": 6}),
        &abort,
    )
    .await;
    assert!(!r.clean_end);
    assert_eq!(words(&r.text()), 2);

    // Responses: no response.completed.
    let r = send(
        &base,
        "/v1/responses",
        &json!({"stream": true, "input": "a b", "max_output_tokens": 6}),
        &abort,
    )
    .await;
    assert!(!r.clean_end);
    let events = named_events(&r.text());
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
        ]
    );

    // Anthropic: no message_delta, no message_stop.
    let r = send(
        &base,
        "/v1/messages",
        &json!({"stream": true, "max_tokens": 6, "messages": [{"role": "user", "content": "a"}]}),
        &abort,
    )
    .await;
    assert!(!r.clean_end);
    let events = named_events(&r.text());
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
        ]
    );

    // Gemini SSE: two chunks, running usage, no finishReason.
    let r = send(
        &base,
        "/v1beta/models/g:streamGenerateContent?alt=sse",
        &json!({"contents": [{"parts": [{"text": "a"}]}], "generationConfig": {"maxOutputTokens": 6}}),
        &abort,
    )
    .await;
    assert!(!r.clean_end);
    let chunks = gemini_sse_events(&r.text());
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[1]["usageMetadata"]["candidatesTokenCount"], 2);
    assert!(!r.text().contains("finishReason"));

    // Gemini JSON array: the array is never closed.
    let r = send(
        &base,
        "/v1beta/models/g:streamGenerateContent",
        &json!({"contents": [{"parts": [{"text": "a"}]}], "generationConfig": {"maxOutputTokens": 6}}),
        &abort,
    )
    .await;
    assert!(!r.clean_end);
    assert!(r.text().starts_with('[') && !r.text().ends_with(']'));
    assert_eq!(words(&r.text()), 2);

    // The ledger has only what was produced: 2 words each.
    let s = stats(&base).await;
    assert_eq!(
        s["by_user"]["ab"],
        json!({"requests": 6, "prompt_tokens": 3 + 1 + 2 + 1 + 1 + 1,
               "completion_tokens": 12, "total_tokens": 9 + 12})
    );
    for f in [
        "openai-chat",
        "openai-completions",
        "openai-responses",
        "anthropic",
        "gemini",
    ] {
        let per_stream = if f == "gemini" { 4 } else { 2 };
        assert_eq!(s["by_format"][f]["completion_tokens"], per_stream, "{f}");
    }
    // Nothing more is produced afterwards.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(stats(&base).await["completion_tokens"], 12);

    // abort-after 0: no word at all; abort-after >= the length: a normal stream.
    let r = send(
        &base,
        "/v1/chat/completions",
        &json!({"stream": true, "max_tokens": 3, "messages": []}),
        &[("x-simulator-abort-after", "0")],
    )
    .await;
    assert!(!r.clean_end);
    assert_eq!(words(&r.text()), 0);
    assert_eq!(data_events(&r.text()).len(), 1, "the role chunk only");
    let r = post(
        &base,
        "/v1/chat/completions",
        json!({"stream": true, "max_tokens": 3, "messages": []}),
        &[("x-simulator-abort-after", "3")],
    )
    .await;
    assert!(r.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(words(&r.text()), 3);
    // Non-streamed answers ignore it.
    let r = post(
        &base,
        "/v1/messages",
        json!({"max_tokens": 3, "messages": []}),
        &[("x-simulator-abort-after", "1")],
    )
    .await;
    assert_eq!(r.json()["usage"]["output_tokens"], 3);
    // A malformed value is a 400.
    let r = send(
        &base,
        "/v1/messages",
        &json!({"messages": []}),
        &[("x-simulator-abort-after", "-1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn abort_after_with_compression_keeps_the_produced_words_decodable() {
    let base = start(Config::default()).await;
    let r = send(
        &base,
        "/v1/messages",
        &json!({"stream": true, "max_tokens": 5, "messages": [{"role": "user", "content": "a"}]}),
        &[
            ("x-simulator-abort-after", "3"),
            ("x-simulator-compress", "true"),
            ("accept-encoding", "gzip"),
        ],
    )
    .await;
    assert!(!r.clean_end);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    // The gzip stream is unfinished: decode what was flushed.
    let mut d = flate2::write::GzDecoder::new(Vec::new());
    d.write_all(&r.body).expect("gunzip");
    d.flush().expect("flush");
    let text = String::from_utf8_lossy(d.get_ref()).to_string();
    assert_eq!(text.matches("content_block_delta\n").count(), 3, "{text}");
    assert!(!text.contains("message_delta"));
}

// ---------------------------------------------------------------------------------------------
// Ledger per format, errors per format

#[tokio::test]
async fn by_format_counts_every_format() {
    let base = start(Config::default()).await;
    let user = [("x-simulator-user", "f")];
    post(
        &base,
        "/v1/chat/completions",
        json!({"max_tokens": 1, "messages": [{"role": "user", "content": "a"}]}),
        &user,
    )
    .await;
    post(
        &base,
        "/v1/completions",
        json!({"max_tokens": 2, "prompt": "a b"}),
        &user,
    )
    .await;
    post(&base, "/v1/embeddings", json!({"input": ["a b c"]}), &user).await;
    post(
        &base,
        "/v1/responses",
        json!({"max_output_tokens": 4, "input": "a b c d"}),
        &user,
    )
    .await;
    post(
        &base,
        "/v1/messages",
        json!({"max_tokens": 5, "messages": [{"role": "user", "content": "a b c d e"}]}),
        &user,
    )
    .await;
    post(
        &base,
        "/v1beta/models/g:generateContent",
        json!({"contents": [{"parts": [{"text": "a b c d e f"}]}], "generationConfig": {"maxOutputTokens": 6}}),
        &user,
    )
    .await;
    let s = stats(&base).await;
    let c = |n: u64, p: u64, c: u64| json!({"requests": n, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
    assert_eq!(
        s["by_format"],
        json!({
            "openai-chat": c(1, 1, 1),
            "openai-completions": c(1, 2, 2),
            "openai-embeddings": c(1, 3, 0),
            "openai-responses": c(1, 4, 4),
            "anthropic": c(1, 5, 5),
            "gemini": c(1, 6, 6),
        })
    );
    assert_eq!(s["by_user"]["f"], c(6, 21, 18));
    assert_eq!(s["total_tokens"], 39);
}

#[tokio::test]
async fn errors_use_each_formats_shape() {
    let base = start(Config::default()).await;
    let forced = [("x-simulator-status", "429")];

    let r = send(&base, "/v1/messages", &json!({"messages": []}), &forced).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(v.get("usage").is_none());

    let r = send(
        &base,
        "/v1/messages",
        &json!({"messages": []}),
        &[("x-simulator-status", "529")],
    )
    .await;
    assert_eq!(r.status.as_u16(), 529);
    assert_eq!(r.json()["error"]["type"], "overloaded_error");

    let r = send(
        &base,
        "/v1beta/models/g:generateContent",
        &json!({"contents": []}),
        &forced,
    )
    .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        r.json()["error"],
        json!({"code": 429, "message": "simulated error (status 429) forced by x-simulator-status",
               "status": "RESOURCE_EXHAUSTED"})
    );

    let r = send(&base, "/v1/responses", &json!({"input": "a"}), &forced).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json()["error"]["code"], "simulated_error");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");

    // Malformed bodies and fields: 400 in each shape.
    for (path, bad) in [
        ("/v1/messages", json!({"max_tokens": "many"})),
        ("/v1/responses", json!({"max_output_tokens": -3})),
        (
            "/v1beta/models/g:streamGenerateContent?alt=sse",
            json!({"generationConfig": {"maxOutputTokens": 2.5}}),
        ),
        ("/v1/messages", json!([1])),
    ] {
        let r = send(&base, path, &bad, &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path} {bad}");
        let v = r.json();
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(!msg.is_empty(), "{v}");
    }
    let r = send(
        &base,
        "/v1beta/models/g:generateContent",
        &json!({"generationConfig": {"maxOutputTokens": "x"}}),
        &[],
    )
    .await;
    assert_eq!(r.json()["error"]["status"], "INVALID_ARGUMENT");
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("generationConfig.maxOutputTokens")));

    let s = stats(&base).await;
    assert_eq!(s["requests"], 9);
    assert_eq!(s["total_tokens"], 0);
    assert_eq!(s["by_format"]["anthropic"]["requests"], 4);
    assert_eq!(s["by_format"]["gemini"]["requests"], 3);
    assert_eq!(s["by_format"]["openai-responses"]["requests"], 2);
}

#[tokio::test]
async fn delays_apply_to_new_formats() {
    let base = start(Config {
        token_delay: Duration::from_millis(40),
        ..Config::default()
    })
    .await;
    let t = Instant::now();
    let r = post(
        &base,
        "/v1/messages",
        json!({"stream": true, "max_tokens": 5, "messages": []}),
        &[("x-simulator-latency-ms", "100")],
    )
    .await;
    assert_eq!(named_events(&r.text()).len(), 11);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn openai_cached_tokens_are_reported_as_part_of_the_prompt_streamed_or_not() {
    let base = start(Config::default()).await;
    let cached = [
        ("x-simulator-cache-read-tokens", "3"),
        ("x-simulator-user", "c"),
    ];
    // 5 words of prompt, 2 of completion.
    let chat = json!({"model": "gpt-sim", "max_tokens": 2,
                      "messages": [{"role": "user", "content": "a b c d e"}]});
    let want = json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 3}});
    let v = post(&base, "/v1/chat/completions", chat.clone(), &cached)
        .await
        .json();
    assert_eq!(v["usage"], want);
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let r = post(&base, "/v1/chat/completions", stream, &cached).await;
    let events = data_events(&r.text());
    let usage_chunk = parse(&events[events.len() - 2]);
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], want);
    // The usage on the finish chunk has it too.
    let mut last_choice = chat.clone();
    last_choice["stream"] = json!(true);
    let r = post(
        &base,
        "/v1/chat/completions",
        last_choice,
        &[cached[0], ("x-simulator-usage-on-last-choice", "true")],
    )
    .await;
    let events = data_events(&r.text());
    assert_eq!(parse(&events[events.len() - 2])["usage"], want);

    // Completions, streamed or not; more cached tokens asked for than the prompt has: all of it.
    let completions = json!({"model": "gpt-sim", "prompt": "a b c d e", "max_tokens": 2});
    let all = [("x-simulator-cache-read-tokens", "50")];
    let v = post(&base, "/v1/completions", completions.clone(), &all)
        .await
        .json();
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(
        v["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 5})
    );
    let mut stream = completions;
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let r = post(&base, "/v1/completions", stream, &all).await;
    let events = data_events(&r.text());
    assert_eq!(
        parse(&events[events.len() - 2])["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 5})
    );

    // Without the header: no details object, as before.
    let v = post(&base, "/v1/chat/completions", chat, &[]).await.json();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
    );

    // Responses: input_tokens_details.cached_tokens, streamed or not.
    let responses = json!({"model": "gpt-sim", "input": "a b c d e", "max_output_tokens": 2});
    let v = post(&base, "/v1/responses", responses.clone(), &cached)
        .await
        .json();
    assert_eq!(v["usage"]["input_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 7);
    assert_eq!(
        v["usage"]["input_tokens_details"],
        json!({"cached_tokens": 3})
    );
    let mut stream = responses;
    stream["stream"] = json!(true);
    let r = post(&base, "/v1/responses", stream, &cached).await;
    let events = named_events(&r.text());
    let (name, completed) = events.last().expect("events");
    assert_eq!(name, "response.completed");
    assert_eq!(
        completed["response"]["usage"]["input_tokens_details"],
        json!({"cached_tokens": 3})
    );

    // The ledger counts the prompt as reported: the cached tokens are in it, not on top.
    let s = stats(&base).await;
    assert_eq!(
        s["by_user"]["c"],
        json!({"requests": 4, "prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28})
    );
}
