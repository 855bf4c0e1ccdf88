//! End-to-end tests of the simulator over real HTTP on a loopback port.

// Test code throughout: with `cfg(test)` on the crate, clippy.toml's allow-*-in-tests covers the
// helpers as well as the `#[test]` fns (rust-clippy#11119).
#![cfg(test)]

use std::time::{Duration, Instant};

use llm_simulator::{app, serve, Config};
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

async fn post(
    base: &str,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut req = Client::new().post(format!("{base}{path}")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, value)
}

/// Posts a streaming request; returns status, content-type and the raw body.
async fn post_stream(
    base: &str,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String) {
    let mut req = Client::new().post(format!("{base}{path}")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, ctype, resp.text().await.expect("body"))
}

/// Splits an SSE body into its `data:` payloads, checking the exact framing.
fn sse_events(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "stream must end with [DONE]: {body:?}"
    );
    let events: Vec<String> = body
        .split_terminator("\n\n")
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without 'data: ' prefix: {e:?}"))
                .to_string()
        })
        .collect();
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    events
}

fn json_events(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("bad chunk {e}: {err}")))
        .collect()
}

async fn stats(base: &str) -> Value {
    reqwest::get(format!("{base}/_simulator/stats"))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats json")
}

#[tokio::test]
async fn chat_usage_follows_contract() {
    let base = start(Config::default()).await;
    let body = json!({
        "model": "my-model",
        "max_tokens": 5,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "  hello   there\tworld\n"},
            {"role": "user", "content": [
                {"type": "text", "text": "two words"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
            ]},
            {"role": "assistant", "content": null}
        ]
    });
    let (status, v) = post(&base, "/v1/chat/completions", body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "my-model");
    assert!(v["id"]
        .as_str()
        .unwrap_or_default()
        .starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap_or_default() > 1_600_000_000);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok1 tok2 tok3 tok4 tok5"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13})
    );

    // Default completion length 16, finish_reason "stop"; empty prompt counts 1.
    let (_, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": ""}]}),
        &[],
    )
    .await;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 16, "total_tokens": 17})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["model"], "llm-simulator");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(text.split(' ').count(), 16);
    assert!(text.starts_with("tok1 tok2 ") && text.ends_with(" tok16"));

    // max_completion_tokens wins over max_tokens; 0 is allowed.
    let (_, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "a b c"}], "max_tokens": 9, "max_completion_tokens": 2}),
        &[],
    )
    .await;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    );
    assert_eq!(v["choices"][0]["message"]["content"], "tok1 tok2");
    let (_, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}),
        &[],
    )
    .await;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1})
    );
    assert_eq!(v["choices"][0]["message"]["content"], "");
}

#[tokio::test]
async fn completions_usage_follows_contract() {
    let base = start(Config::default()).await;
    let (status, v) = post(
        &base,
        "/v1/completions",
        json!({"model": "m", "prompt": "one two three four", "max_tokens": 3}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "m");
    assert_eq!(v["choices"][0]["text"], "tok1 tok2 tok3");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );

    let (_, v) = post(
        &base,
        "/v1/completions",
        json!({"prompt": ["a b", "c d e"]}),
        &[],
    )
    .await;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21})
    );

    let (_, v) = post(
        &base,
        "/v1/completions",
        json!({"prompt": [11, 12, 13], "max_tokens": 1}),
        &[],
    )
    .await;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    );
}

#[tokio::test]
async fn embeddings_usage_follows_contract() {
    let base = start(Config::default()).await;
    let (status, v) = post(
        &base,
        "/v1/embeddings",
        json!({"model": "emb", "input": ["a b c", "d", "e f"]}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "emb");
    assert_eq!(v["usage"], json!({"prompt_tokens": 6, "total_tokens": 6}));
    let data = v["data"].as_array().expect("data array");
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        let emb = d["embedding"].as_array().expect("embedding array");
        assert_eq!(emb.len(), 8);
        assert!(emb
            .iter()
            .all(|x| x.as_f64().is_some_and(|f| (-1.0..1.0).contains(&f))));
    }

    let (_, v) = post(
        &base,
        "/v1/embeddings",
        json!({"input": "single input here", "max_tokens": 50}),
        &[("x-simulator-completion-tokens", "9")],
    )
    .await;
    assert_eq!(v["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1));

    let (status, v) = post(&base, "/v1/embeddings", json!({"model": "emb"}), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let s = stats(&base).await;
    assert_eq!(s["prompt_tokens"], 9);
    assert_eq!(s["completion_tokens"], 0);
    assert_eq!(s["total_tokens"], 9);
    assert_eq!(s["requests"], 3);
}

#[tokio::test]
async fn chat_stream_without_include_usage() {
    let base = start(Config::default()).await;
    let body = json!({"model": "x", "stream": true, "max_tokens": 4, "messages": [{"role": "user", "content": "hi there"}]});
    let (status, ctype, raw) = post_stream(&base, "/v1/chat/completions", body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let events = sse_events(&raw);
    // role + 4 words + finish + [DONE]
    assert_eq!(events.len(), 7, "{raw}");
    assert_eq!(events[6], "[DONE]");
    let chunks = json_events(&events);
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "x");
        assert_eq!(c["id"], id);
        assert!(
            c.get("usage").is_none(),
            "no usage without include_usage: {c}"
        );
        assert_eq!(c["choices"].as_array().map(Vec::len), Some(1));
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    let deltas: Vec<&str> = chunks[1..5]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(deltas, ["tok1", " tok2", " tok3", " tok4"]);
    assert!(chunks[1..5]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");

    let s = stats(&base).await;
    assert_eq!(s["prompt_tokens"], 2);
    assert_eq!(s["completion_tokens"], 4);
    assert_eq!(s["total_tokens"], 6);
}

#[tokio::test]
async fn chat_stream_with_include_usage() {
    let base = start(Config::default()).await;
    let body = json!({
        "model": "x", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "one two three"}]
    });
    let (status, _, raw) = post_stream(&base, "/v1/chat/completions", body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_events(&raw);
    // role + 16 words + finish + usage + [DONE]
    assert_eq!(events.len(), 20, "{raw}");
    let chunks = json_events(&events);
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["object"], "chat.completion.chunk");
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19})
    );
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c.get("usage").is_none()));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, llm_simulator::contract::completion_text(16));
    // Byte shape: compact JSON events, `data: ` + JSON + blank line, like llama-server.
    assert!(raw.starts_with("data: {\""));
    assert!(raw.contains("\"choices\":[]"));
}

#[tokio::test]
async fn completions_stream_with_include_usage() {
    let base = start(Config::default()).await;
    let body = json!({"stream": true, "stream_options": {"include_usage": true}, "prompt": "a b", "max_tokens": 3});
    let (status, _, raw) = post_stream(&base, "/v1/completions", body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let events = sse_events(&raw);
    // 3 words + finish + usage + [DONE]
    assert_eq!(events.len(), 6, "{raw}");
    let chunks = json_events(&events);
    let texts: Vec<&str> = chunks[..3]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(texts, ["tok1", " tok2", " tok3"]);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(
        chunks[4]["usage"],
        json!({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5})
    );
}

#[tokio::test]
async fn header_overrides() {
    let base = start(Config::default()).await;
    let chat = json!({"max_tokens": 10, "messages": [{"role": "user", "content": "a b c d"}]});

    // Forced completion tokens beat max_tokens.
    let (_, v) = post(
        &base,
        "/v1/chat/completions",
        chat.clone(),
        &[
            ("x-simulator-completion-tokens", "3"),
            ("x-simulator-user", "forced"),
        ],
    )
    .await;
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );
    assert_eq!(v["choices"][0]["message"]["content"], "tok1 tok2 tok3");

    // Forced status: OpenAI error body, no usage, 0 tokens counted.
    for code in ["500", "503", "429", "401"] {
        let (status, v) = post(
            &base,
            "/v1/chat/completions",
            chat.clone(),
            &[("x-simulator-status", code), ("x-simulator-user", "err")],
        )
        .await;
        assert_eq!(status.as_str(), code);
        assert!(v.get("usage").is_none());
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        let kind = if code.starts_with('5') {
            "server_error"
        } else {
            "invalid_request_error"
        };
        assert_eq!(v["error"]["type"], kind);
    }

    // No usage: body without usage, tokens still counted.
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        chat.clone(),
        &[
            ("x-simulator-no-usage", "true"),
            ("x-simulator-user", "nousage"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(v.get("usage").is_none(), "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], contract_text(10));

    // No usage on a stream that asked for it: no usage chunk.
    let stream = json!({"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]});
    let (_, _, raw) = post_stream(
        &base,
        "/v1/chat/completions",
        stream,
        &[
            ("x-simulator-no-usage", "1"),
            ("x-simulator-user", "nousage"),
        ],
    )
    .await;
    let events = sse_events(&raw);
    assert_eq!(events.len(), 5, "role + 2 words + finish + [DONE]: {raw}");
    assert!(!raw.contains("usage"));

    // Invalid header values are rejected.
    for (h, val) in [
        ("x-simulator-status", "200"),
        ("x-simulator-status", "abc"),
        ("x-simulator-completion-tokens", "-1"),
    ] {
        let (status, v) = post(&base, "/v1/chat/completions", chat.clone(), &[(h, val)]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{h}: {val}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    let s = stats(&base).await;
    assert_eq!(
        s["by_user"]["forced"],
        json!({"requests": 1, "prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );
    assert_eq!(
        s["by_user"]["err"],
        json!({"requests": 4, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    );
    assert_eq!(
        s["by_user"]["nousage"],
        json!({"requests": 2, "prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17})
    );
    assert_eq!(
        s["by_user"]["anonymous"],
        json!({"requests": 3, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    );
    assert_eq!(s["requests"], 10);
    assert_eq!(s["total_tokens"], 24);
}

fn contract_text(n: u64) -> String {
    llm_simulator::contract::completion_text(n)
}

#[tokio::test]
async fn stats_by_user_and_reset() {
    let base = start(Config::default()).await;
    let chat = |words: &str, max: u64| json!({"max_tokens": max, "messages": [{"role": "user", "content": words}]});
    post(
        &base,
        "/v1/chat/completions",
        chat("a b", 3),
        &[
            ("x-simulator-user", "alice"),
            ("authorization", "Bearer ignored"),
        ],
    )
    .await;
    post(
        &base,
        "/v1/chat/completions",
        chat("a b c", 1),
        &[("authorization", "Bearer sk-bob")],
    )
    .await;
    post(
        &base,
        "/v1/completions",
        json!({"prompt": "p q r s", "max_tokens": 2}),
        &[("authorization", "Bearer sk-bob")],
    )
    .await;
    post(&base, "/v1/chat/completions", chat("z", 0), &[]).await;
    let stream =
        json!({"stream": true, "max_tokens": 5, "messages": [{"role": "user", "content": "s t"}]});
    post_stream(
        &base,
        "/v1/chat/completions",
        stream,
        &[("x-simulator-user", "alice")],
    )
    .await;

    let s = stats(&base).await;
    assert_eq!(
        s,
        json!({
            "requests": 5, "prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23,
            "by_user": {
                "alice": {"requests": 2, "prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12},
                "Bearer sk-bob": {"requests": 2, "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
                "anonymous": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
            },
            "by_format": {
                "openai-chat": {"requests": 4, "prompt_tokens": 8, "completion_tokens": 9, "total_tokens": 17},
                "openai-completions": {"requests": 1, "prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
            }
        })
    );

    let resp = Client::new()
        .post(format!("{base}/_simulator/reset"))
        .send()
        .await
        .expect("reset");
    assert!(resp.status().is_success());
    assert_eq!(
        stats(&base).await,
        json!({"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "by_user": {}, "by_format": {}})
    );
    post(&base, "/v1/chat/completions", chat("a", 1), &[]).await;
    assert_eq!(stats(&base).await["total_tokens"], 2);
}

#[tokio::test]
async fn bad_requests_are_400() {
    let base = start(Config::default()).await;
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        for raw in ["{not json", "", "[1,2]", "\"str\""] {
            let resp = Client::new()
                .post(format!("{base}{path}"))
                .header("content-type", "application/json")
                .body(raw)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path} {raw:?}");
            let v: Value = resp.json().await.expect("error json");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }
    for bad in [json!(-1), json!("5"), json!(2.5), json!(5_000_000)] {
        let (status, v) = post(
            &base,
            "/v1/chat/completions",
            json!({"max_tokens": bad, "messages": []}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    let s = stats(&base).await;
    assert_eq!(s["requests"], 16);
    assert_eq!(s["total_tokens"], 0);
}

#[tokio::test]
async fn models_healthz_and_unknown_paths() {
    let base = start(Config::default()).await;
    let resp = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.expect("text"), "ok");
    let v: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "llm-simulator");
    assert_eq!(v["data"][0]["object"], "model");
    let resp = reqwest::get(format!("{base}/v2/nothing"))
        .await
        .expect("404");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let v: Value = resp.json().await.expect("json");
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn delays_apply() {
    let base = start(Config {
        latency: Duration::from_millis(150),
        token_delay: Duration::from_millis(40),
        ..Config::default()
    })
    .await;
    let t = Instant::now();
    let (status, _) = post(&base, "/v1/chat/completions", json!({"messages": []}), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let body = json!({"stream": true, "max_tokens": 5, "messages": []});
    let (_, _, raw) = post_stream(
        &base,
        "/v1/chat/completions",
        body,
        &[("x-simulator-latency-ms", "0")],
    )
    .await;
    assert_eq!(sse_events(&raw).len(), 8);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );

    // Per-request overrides of both delays.
    let t = Instant::now();
    let body = json!({"stream": true, "max_tokens": 20, "messages": []});
    post_stream(
        &base,
        "/v1/chat/completions",
        body,
        &[
            ("x-simulator-latency-ms", "0"),
            ("x-simulator-token-delay-ms", "0"),
        ],
    )
    .await;
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn aborted_stream_counts_only_produced_tokens() {
    let base = start(Config {
        latency: Duration::ZERO,
        token_delay: Duration::from_millis(20),
        ..Config::default()
    })
    .await;
    let body = json!({"stream": true, "max_tokens": 500, "messages": [{"role": "user", "content": "a b c"}]});
    let mut resp = Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("send");
    let mut seen = String::new();
    while seen.matches("tok").count() < 3 {
        match resp.chunk().await.expect("chunk") {
            Some(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            None => break,
        }
    }
    drop(resp);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = stats(&base).await;
    let produced = first["completion_tokens"].as_u64().unwrap_or_default();
    assert!((3..500).contains(&produced), "produced {produced}");
    assert_eq!(first["prompt_tokens"], 3);
    // The stream stopped: nothing more is produced.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stats(&base).await["completion_tokens"], produced);
}

#[tokio::test]
async fn binary_serves_and_shuts_down_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-simulator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--latency-ms",
            "1",
            "--token-delay-ms",
            "0",
        ])
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
        .expect("listening line");
    let base = format!("http://{addr}");
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"max_tokens": 2, "messages": [{"role": "user", "content": "q"}]}),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["usage"]["total_tokens"], 3);

    let pid = child.id().expect("pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(kill.success());
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
}
