//! The filter is a transparent proxy for what it does not limit, in a real Envoy: a large
//! vision request (a base64 image in the body) and a large streamed request are served and
//! charged their usage; a body at and over `requestBody.maxBytes` passes unread, never refused;
//! a body waiting for a slow rate-limit answer is flow-controlled, not refused; an HTTP/2
//! request whose body ends with trailers reaches the upstream whole; aborted uploads cost
//! nothing and leave Envoy's memory where it was; and a prompt-heavy `text/plain` stream without
//! usage is charged its text.

use std::io::Read;
use std::time::Duration;

use e2e::{Options, Stack};
use serde_json::{json, Value};

const GOLD: &str = "iamagolduser";
const CHAT: &str = "/v1/chat/completions";

fn stat(stack: &Stack, name: &str) -> u64 {
    stack.envoy_stat(&format!("wasmcustom.token_ratelimit.{name}"))
}

/// Envoy's buffer limit and the plugin's `requestBody.maxBytes`, both set to `bytes`.
fn limits(bytes: usize) -> Vec<(String, String)> {
    vec![
        (
            "per_connection_buffer_limit_bytes: 8388608\n".into(),
            format!("per_connection_buffer_limit_bytes: {bytes}\n"),
        ),
        ("maxBytes: 8388608\n".into(), format!("maxBytes: {bytes}\n")),
    ]
}

/// A chat request of `words` text words and an image of about `image_bytes` bytes (a base64
/// data URL in an `image_url` part, as the OpenAI SDK sends a local image).
fn vision_body(words: usize, image_bytes: usize, stream: bool) -> Value {
    json!({
        "model": "sim",
        "stream": stream,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": vec!["describe"; words].join(" ")},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(image_bytes))}}
        ]}]
    })
}

/// A chat request body of exactly `size` bytes (the prompt padded with spaces): 3 words.
fn body_of_size(size: usize) -> Vec<u8> {
    let base = json!({"model": "sim", "max_tokens": 5,
                      "messages": [{"role": "user", "content": "one two three"}]})
    .to_string();
    let pad = size
        .checked_sub(base.len())
        .expect("size over the base body");
    base.replacen("three", &format!("three{}", " ".repeat(pad)), 1)
        .into_bytes()
}

/// Posts raw `body` bytes as GOLD (HTTP/1.1, content-length), as JSON.
fn post_bytes(stack: &Stack, body: Vec<u8>) -> (u16, Vec<u8>) {
    post_typed(stack, body, "application/json")
}

/// [`post_bytes`] with this `content-type`.
fn post_typed(stack: &Stack, body: Vec<u8>, content_type: &str) -> (u16, Vec<u8>) {
    let resp = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
        .post(format!("http://127.0.0.1:{}{CHAT}", stack.ports.listener))
        .header("authorization", format!("APIKEY {GOLD}"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .expect("request through envoy");
    let status = resp.status().as_u16();
    let mut out = Vec::new();
    let mut resp = resp;
    resp.read_to_end(&mut out).expect("the answer");
    (status, out)
}

/// Posts `body` as GOLD (JSON) and checks it was served (200) and reached the model whole: the
/// simulator counted `prompt_tokens` prompt words.
fn assert_served_whole(stack: &Stack, body: Vec<u8>, prompt_tokens: u64, what: &str) {
    let (status, answer) = post_bytes(stack, body);
    assert_eq!(status, 200, "{what}: {}", String::from_utf8_lossy(&answer));
    let answer: Value = serde_json::from_slice(&answer).expect("JSON");
    assert_eq!(
        answer["usage"]["prompt_tokens"], prompt_tokens,
        "{what}: the prompt reached the model"
    );
}

/// Waits until the service was charged what the simulator served GOLD, and checks it is
/// exactly that (and nothing is held).
fn assert_charged_what_was_served(stack: &Stack, what: &str) {
    let served = stack.served_tokens(GOLD);
    assert!(served > 0, "{what}: nothing served");
    assert_eq!(stack.await_reported(served), served, "{what}: charged");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stack.reported_tokens(),
        served,
        "{what}: charged more than once"
    );
    assert!(
        stack.await_no_holds(Duration::from_secs(5)),
        "{what}: a hold was left"
    );
}

#[test]
fn a_1_2_mb_vision_request_is_served_and_charged_its_usage_in_both_modes() {
    for mode in [None, Some("checkReport")] {
        let stack = Stack::start(Options {
            mode,
            ..Options::default()
        });
        let body = vision_body(3, 1_200_000, false).to_string().into_bytes();
        assert!(body.len() > 1_200_000);
        assert_served_whole(&stack, body, 3, &format!("{mode:?}: vision request"));
        assert_charged_what_was_served(&stack, &format!("{mode:?}: vision request"));
    }
}

#[test]
fn a_2_mb_streamed_request_is_served_with_its_usage_withheld_and_charged_exactly() {
    for mode in [None, Some("checkReport")] {
        let stack = Stack::start(Options {
            mode,
            ..Options::default()
        });
        let body = vision_body(3, 2_000_000, true).to_string().into_bytes();
        let (status, answer) = post_bytes(&stack, body);
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(status, 200, "{mode:?}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{mode:?}: {text}");
        assert!(
            !text.contains("\"usage\""),
            "{mode:?}: the injected usage chunk is withheld: {text}"
        );
        assert_eq!(
            stat(&stack, "usage_requested"),
            1,
            "{mode:?}: include_usage was added"
        );
        assert_charged_what_was_served(&stack, &format!("{mode:?}: streamed request"));
    }
}

#[test]
fn bodies_at_and_over_max_bytes_pass_unread_and_are_never_refused() {
    // Envoy's buffer and the filter's hold limit both 64 KiB: at the limit the body is held
    // and read; one byte over, it goes on unread (the reservation holds its default).
    const LIMIT: usize = 64 * 1024;
    // A body left unread reserves reservation.defaultAmount: gold gets room for several.
    let mut edits = limits(LIMIT);
    edits.push((
        "- {limit: 200, window: 1m}".into(),
        "- {limit: 100000, window: 1m}".into(),
    ));
    let stack = Stack::start(Options {
        edits,
        ..Options::default()
    });
    for (size, unread) in [(LIMIT, 0), (LIMIT + 1, 1), (3 * LIMIT, 2)] {
        assert_served_whole(&stack, body_of_size(size), 3, &format!("{size} bytes"));
        assert_eq!(
            stat(&stack, "request_bodies_unread"),
            unread,
            "{size} bytes"
        );
    }
    assert_charged_what_was_served(&stack, "bodies around maxBytes");
}

#[test]
fn a_prompt_heavy_text_plain_stream_without_usage_is_charged_its_text_in_both_modes() {
    // Sent as text/plain, the request gets no include_usage and its stream carries no usage:
    // it is charged the fallback estimate. 4,000 one-letter words: 8 KB, that bytes / 4 would
    // have charged at half of what was served. The simulator counts words as tokens, so the
    // estimate's rule (a word of up to 5 characters is one token) meets it exactly.
    for mode in [None, Some("checkReport")] {
        let stack = Stack::start(Options {
            mode,
            edits: vec![(
                "- {limit: 200, window: 1m}".into(),
                "- {limit: 1000000, window: 1m}".into(),
            )],
            ..Options::default()
        });
        let prompt = vec!["a"; 4000].join(" ");
        let body = json!({"model": "sim", "stream": true, "max_tokens": 50,
                          "messages": [{"role": "user", "content": prompt}]});
        let (status, answer) = post_typed(&stack, body.to_string().into_bytes(), "text/plain");
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(status, 200, "{mode:?}: {text}");
        assert!(
            !text.contains("\"usage\""),
            "{mode:?}: no usage in the stream"
        );
        assert_eq!(
            stat(&stack, "usage_requested"),
            0,
            "{mode:?}: not JSON: nothing injected"
        );
        let served = stack.served_tokens(GOLD);
        assert_eq!(served, 4000 + 50, "{mode:?}");
        let charged = stack.await_reported(served);
        std::thread::sleep(Duration::from_millis(300));
        let charged = charged.max(stack.reported_tokens());
        let ratio = charged as f64 / served as f64;
        eprintln!("{mode:?}: served {served}, charged {charged} ({ratio:.2})");
        assert!(
            (0.9..=1.1).contains(&ratio),
            "{mode:?}: served {served}, charged {charged}"
        );
        assert!(stack.await_no_holds(Duration::from_secs(5)), "{mode:?}");
    }
}

#[test]
fn a_body_waiting_for_a_slow_check_is_flow_controlled_and_served_not_refused_with_413() {
    // checkReport does not read the body; Envoy receives it while the check takes 300 ms, and
    // it is 6 times Envoy's buffer limit.
    let stack = Stack::start(Options {
        mode: Some("checkReport"),
        edits: limits(4096),
        service_args: vec!["--grpc-delay-ms".into(), "300".into()],
        ..Options::default()
    });
    assert_served_whole(&stack, body_of_size(6 * 4096), 3, "a slow check");
    assert_charged_what_was_served(&stack, "a slow check");
}

/// An HTTP/2 (prior knowledge, h2c) request: HEADERS, the body in DATA frames of `chunk`
/// bytes without END_STREAM, then trailers. Returns the status and the body of the answer.
fn h2_post_with_trailers(port: u16, body: Vec<u8>, chunk: usize) -> (u16, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.expect("ready");
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1:{port}{CHAT}"))
            .header("authorization", format!("APIKEY {GOLD}"))
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        let (response, mut send) = client.send_request(request, false).expect("send");
        for part in body.chunks(chunk) {
            send.reserve_capacity(part.len());
            send.send_data(bytes::Bytes::copy_from_slice(part), false)
                .expect("data");
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("1"));
        send.send_trailers(trailers).expect("trailers");
        let response = tokio::time::timeout(Duration::from_secs(30), response)
            .await
            .expect("an answer in time")
            .expect("response");
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut out = Vec::new();
        while let Some(data) = body.data().await {
            let data = data.expect("data");
            let _ = body.flow_control().release_capacity(data.len());
            out.extend_from_slice(&data);
        }
        (status, out)
    })
}

#[test]
fn an_http2_body_that_ends_with_trailers_reaches_the_upstream_whole_in_both_modes() {
    for mode in [None, Some("checkReport")] {
        let stack = Stack::start(Options {
            mode,
            ..Options::default()
        });
        let words = vec!["word"; 40].join(" ");
        let plain = json!({"model": "sim", "max_tokens": 5,
                           "messages": [{"role": "user", "content": words}]});
        let (status, answer) =
            h2_post_with_trailers(stack.ports.listener, plain.to_string().into_bytes(), 100);
        assert_eq!(
            status,
            200,
            "{mode:?}: {}",
            String::from_utf8_lossy(&answer)
        );
        let answer: Value = serde_json::from_slice(&answer).expect("JSON");
        assert_eq!(
            answer["usage"]["prompt_tokens"], 40,
            "{mode:?}: the whole prompt arrived"
        );
        // Streaming: the body held for include_usage ends with the trailers.
        let streaming = json!({"model": "sim", "max_tokens": 5, "stream": true,
                               "messages": [{"role": "user", "content": words}]});
        let (status, answer) = h2_post_with_trailers(
            stack.ports.listener,
            streaming.to_string().into_bytes(),
            100,
        );
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(status, 200, "{mode:?}: {text}");
        assert!(
            text.ends_with("data: [DONE]\n\n") && !text.contains("\"usage\""),
            "{mode:?}: {text}"
        );
        assert_eq!(stat(&stack, "usage_requested"), 1, "{mode:?}");
        assert_charged_what_was_served(&stack, &format!("{mode:?}: HTTP/2 with trailers"));
        assert_eq!(stack.served_tokens(GOLD), 2 * (40 + 5), "{mode:?}");
    }
}

/// Bytes Envoy's allocator holds for the process (`allocated` of the admin `/memory`).
fn envoy_allocated(stack: &Stack) -> u64 {
    let memory: Value =
        serde_json::from_str(&stack.get(&format!("http://127.0.0.1:{}/memory", stack.ports.admin)))
            .expect("/memory");
    memory["allocated"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .or_else(|| memory["allocated"].as_u64())
        .expect("allocated")
}

/// Sends `count` uploads that declare 2 MB and stop after 1 MB, each on its own connection.
fn abort_uploads(stack: &Stack, count: usize) {
    let megabyte = vec![b' '; 1 << 20];
    for _ in 0..count {
        let mut conn = stack.connect();
        conn.send_head(
            "POST",
            CHAT,
            &[
                ("authorization", &format!("APIKEY {GOLD}")),
                ("content-type", "application/json"),
            ],
            2 << 20,
        )
        .expect("head");
        conn.send_body(b"{\"model\": \"sim\", \"messages\": [] ")
            .expect("body");
        conn.send_body(&megabyte).expect("1 MB");
        std::thread::sleep(Duration::from_millis(20));
        drop(conn);
    }
}

#[test]
fn aborted_uploads_cost_nothing_and_envoys_memory_returns_to_its_level() {
    for mode in [None, Some("checkReport")] {
        let stack = Stack::start(Options {
            mode,
            ..Options::default()
        });
        // Warm up: the first streams grow the wasm VM and Envoy's pools once.
        abort_uploads(&stack, 10);
        std::thread::sleep(Duration::from_millis(500));
        let before = envoy_allocated(&stack);
        abort_uploads(&stack, 100);
        std::thread::sleep(Duration::from_millis(1000));
        let after = envoy_allocated(&stack);
        let growth_mib = after.saturating_sub(before) as f64 / f64::from(1 << 20);
        eprintln!("{mode:?}: Envoy allocated {before} bytes before, {after} after ({growth_mib:.1} MiB more)");
        // 100 MB were uploaded and dropped: what stays is noise, not the bodies.
        assert!(
            growth_mib < 16.0,
            "{mode:?}: {growth_mib:.1} MiB more after 100 aborted uploads"
        );
        assert_eq!(
            stack.upstream_requests(),
            0,
            "{mode:?}: nothing reached the upstream"
        );
        assert_eq!(stack.reported_tokens(), 0, "{mode:?}: charged");
        assert!(
            stack.await_no_holds(Duration::from_secs(5)),
            "{mode:?}: a hold was left"
        );
        let r = stack.chat(GOLD, 3, 5);
        assert_eq!(r.status, 200, "{mode:?}: the next request: {}", r.body);
    }
}
