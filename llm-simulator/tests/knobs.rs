//! The knobs for bypass and fault tests: `x-simulator-content`, `x-simulator-usage-override`,
//! `x-simulator-error-after`, and the lenient routing of paths.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

use llm_simulator::{app, serve, Config};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

async fn start() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(serve(
        listener,
        app(Config::default()),
        std::future::pending(),
    ));
    format!("http://{addr}")
}

async fn post_raw(
    base: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Client::new().post(format!("{base}{path}")).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    (status, resp.text().await.expect("body"))
}

async fn post(
    base: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let (status, text) = post_raw(base, path, body, headers).await;
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

async fn stats(base: &str) -> Value {
    reqwest::get(format!("{base}/_simulator/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json")
}

/// The JSON payloads of `data:` lines (`[DONE]` excluded).
fn data_events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
        .collect()
}

fn chat(max_tokens: u64) -> Value {
    json!({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "a b c"}]})
}

#[tokio::test]
async fn content_replaces_the_text_but_not_the_counts() {
    let base = start().await;
    let fake = r#"{"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":1}}"#;
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        &chat(5),
        &[("x-simulator-content", fake)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["choices"][0]["message"]["content"], fake);
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    );

    // Streamed: word 1 carries the whole text, words 2..N are empty; the usage chunk is real.
    let mut body = chat(4);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, text) = post_raw(
        &base,
        "/v1/chat/completions",
        &body,
        &[("x-simulator-content", fake)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let events = data_events(&text);
    let pieces: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(pieces, vec![fake, "", "", ""]);
    assert_eq!(events.last().unwrap()["usage"]["total_tokens"], 7);

    // Other formats take it too.
    let (_, v) = post(
        &base,
        "/v1/messages",
        &json!({"max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}),
        &[("x-simulator-content", "hello there")],
    )
    .await;
    assert_eq!(v["content"][0]["text"], "hello there");
    assert_eq!(v["usage"]["output_tokens"], 2);
    let (_, v) = post(
        &base,
        "/v1/responses",
        &json!({"input": "x", "max_output_tokens": 2}),
        &[("x-simulator-content", "hi")],
    )
    .await;
    assert_eq!(v["output"][0]["content"][0]["text"], "hi");
    let (_, v) = post(
        &base,
        "/v1beta/models/g:generateContent",
        &json!({"contents": [{"parts": [{"text": "x"}]}]}),
        &[("x-simulator-content", "hi")],
    )
    .await;
    assert_eq!(v["candidates"][0]["content"]["parts"][0]["text"], "hi");

    let s = stats(&base).await;
    assert_eq!(s["completion_tokens"], 5 + 4 + 2 + 2 + 16);
}

#[tokio::test]
async fn usage_override_replaces_every_usage_object() {
    let base = start().await;
    let o = r#"{"prompt_tokens":-1,"completion_tokens":"7","total_tokens":1.5}"#;
    let ov: Value = serde_json::from_str(o).unwrap();
    let h = [("x-simulator-usage-override", o)];

    let (_, v) = post(&base, "/v1/chat/completions", &chat(5), &h).await;
    assert_eq!(v["usage"], ov);
    let (_, v) = post(&base, "/v1/embeddings", &json!({"input": "a b"}), &h).await;
    assert_eq!(v["usage"], ov);
    let (_, v) = post(&base, "/v1/responses", &json!({"input": "a b"}), &h).await;
    assert_eq!(v["usage"], ov);
    let (_, v) = post(
        &base,
        "/v1/messages",
        &json!({"max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}),
        &h,
    )
    .await;
    assert_eq!(v["usage"], ov);
    let (_, v) = post(
        &base,
        "/v1beta/models/g:generateContent",
        &json!({"contents": [{"parts": [{"text": "x"}]}]}),
        &h,
    )
    .await;
    assert_eq!(v["usageMetadata"], ov);

    // Streams: the usage chunk, or the finish chunk with usage-on-last-choice.
    let mut body = chat(3);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (_, text) = post_raw(&base, "/v1/chat/completions", &body, &h).await;
    let usages: Vec<Value> = data_events(&text)
        .into_iter()
        .filter_map(|e| e.get("usage").cloned())
        .collect();
    assert_eq!(usages, vec![ov.clone()]);
    let (_, text) = post_raw(
        &base,
        "/v1/chat/completions",
        &body,
        &[h[0], ("x-simulator-usage-on-last-choice", "true")],
    )
    .await;
    let events = data_events(&text);
    assert_eq!(events.last().unwrap()["usage"], ov);
    assert!(events.last().unwrap()["choices"][0]["finish_reason"].is_string());

    // Anthropic streams: message_start and message_delta.
    let (_, text) = post_raw(
        &base,
        "/v1/messages",
        &json!({"stream": true, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}),
        &h,
    )
    .await;
    let events = data_events(&text);
    assert_eq!(events[0]["message"]["usage"], ov);
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .unwrap();
    assert_eq!(delta["usage"], ov);

    // x-simulator-no-usage wins; a value that is not a JSON object is a 400.
    let (_, v) = post(
        &base,
        "/v1/chat/completions",
        &chat(1),
        &[h[0], ("x-simulator-no-usage", "1")],
    )
    .await;
    assert!(v.get("usage").is_none(), "{v}");
    for bad in ["[1]", "7", "{", "\"x\""] {
        let (status, _) = post(
            &base,
            "/v1/chat/completions",
            &chat(1),
            &[("x-simulator-usage-override", bad)],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
    // The ledger counts what the contract says, whatever the usage claims.
    let s = stats(&base).await;
    assert_eq!(
        s["by_format"]["openai-chat"]["total_tokens"],
        (3 + 5) + 2 * (3 + 3) + (3 + 1)
    );
}

#[tokio::test]
async fn error_after_ends_streams_with_an_in_stream_error() {
    let base = start().await;
    let h = [("x-simulator-error-after", "2")];
    let mut body = chat(6);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, text) = post_raw(&base, "/v1/chat/completions", &body, &h).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events = data_events(&text);
    assert_eq!(events.last().unwrap()["error"]["code"], "simulated_error");
    assert!(events.iter().all(|e| e.get("usage").is_none()), "{text}");
    let words = events
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"].is_string())
        .count();
    assert_eq!(words, 2);

    let (_, text) = post_raw(
        &base,
        "/v1/messages",
        &json!({"stream": true, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
        &h,
    )
    .await;
    assert!(text.ends_with("event: error\ndata: {\"error\":{\"message\":\"simulated error in the stream (x-simulator-error-after)\",\"type\":\"api_error\"},\"type\":\"error\"}\n\n"), "{text}");
    assert!(!text.contains("message_delta"));

    // Gemini's streamed array stays a JSON array, the error its last element.
    for n in ["0", "2"] {
        let (_, text) = post_raw(
            &base,
            "/v1beta/models/g:streamGenerateContent",
            &json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 4}}),
            &[("x-simulator-error-after", n)],
        )
        .await;
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), n.parse::<usize>().unwrap() + 1);
        assert_eq!(items.last().unwrap()["error"]["status"], "INTERNAL");
    }
    let s = stats(&base).await;
    assert_eq!(s["by_format"]["openai-chat"]["completion_tokens"], 2);
    assert_eq!(s["by_format"]["anthropic"]["completion_tokens"], 2);
    assert_eq!(s["by_format"]["gemini"]["completion_tokens"], 2);
}

/// Sends a raw HTTP/1.1 request (the path exactly as given) and returns the status.
async fn raw_status(base: &str, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = chat(2).to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{text}"))
}

#[tokio::test]
async fn paths_are_routed_leniently_like_common_servers() {
    let base = start().await;
    for path in [
        "/v1/chat/completions?foo=bar",
        "//v1/chat/completions",
        "/v1//chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1/%63hat/completions",
    ] {
        assert_eq!(raw_status(&base, path).await, 200, "{path}");
    }
    assert_eq!(
        stats(&base).await["by_format"]["openai-chat"]["requests"],
        6
    );
    for path in [
        "/v1/chat/completions/",
        "/V1/CHAT/COMPLETIONS",
        "/v1/chat/completions%00",
        "/v1/chat%ZZ",
        "/v1/chat/completions%3Fx=1",
        "/v1/chat/completions%23x",
    ] {
        assert_eq!(raw_status(&base, path).await, 404, "{path}");
    }
    assert_eq!(stats(&base).await["requests"], 6);
}
