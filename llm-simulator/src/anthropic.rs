//! Anthropic Messages API: `POST /v1/messages`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::contract::{self, max_tokens_fields};
use crate::stream::{self, named_event, Script, ERROR_MESSAGE};
use crate::{accept, AppState, Format};

pub(crate) async fn messages(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let a = match accept(&st, Format::Anthropic, &headers, &body).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let input = contract::anthropic_prompt_tokens(&a.req);
    let (completion, from_body) = match a.completion(max_tokens_fields::ANTHROPIC) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let msg = MessageStream {
        id: format!("msg_sim_{}", st.next_seq()),
        model: a.model(),
        input,
        cache_creation: a.ov.cache_creation,
        cache_read: a.ov.cache_read.unwrap_or(0),
        completion,
        stop_reason: if from_body { "max_tokens" } else { "end_turn" },
        usage: !a.ov.no_usage,
        usage_override: a.ov.usage_override.clone(),
    };
    // The ledger's prompt tokens are everything the model read: input plus cache tokens.
    let prompt = input
        .saturating_add(msg.cache_creation)
        .saturating_add(msg.cache_read);
    if a.wants_stream() {
        a.ledger.record(prompt, 0);
        return stream::response(msg, a.pace(completion), a.ledger, "text/event-stream");
    }
    a.ledger.record(prompt, completion);
    let mut body = msg.message(
        json!([{"type": "text", "text": a.text(completion)}]),
        json!(msg.stop_reason),
    );
    if msg.usage {
        body["usage"] = msg.usage_json(completion);
    }
    Json(body).into_response()
}

/// One Messages API answer, whole or streamed.
struct MessageStream {
    id: String,
    model: String,
    input: u64,
    cache_creation: u64,
    cache_read: u64,
    completion: u64,
    stop_reason: &'static str,
    /// Report usage (false under `x-simulator-no-usage`).
    usage: bool,
    /// `x-simulator-usage-override`: every `usage` object sent.
    usage_override: Option<Value>,
}

impl MessageStream {
    fn usage_json(&self, output: u64) -> Value {
        if let Some(o) = &self.usage_override {
            return o.clone();
        }
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": output,
        })
    }

    /// The `message` object without usage.
    fn message(&self, content: Value, stop_reason: Value) -> Value {
        json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
        })
    }
}

/// Events: `message_start` (usage with the input and cache tokens, `output_tokens: 1`),
/// `content_block_start`, `ping`, one `content_block_delta` per word, `content_block_stop`,
/// `message_delta` (`usage.output_tokens`: the cumulative, final count), `message_stop`.
impl Script for MessageStream {
    fn head(&self) -> Vec<String> {
        let mut message = self.message(json!([]), Value::Null);
        if self.usage {
            message["usage"] = self.usage_json(1);
        }
        vec![
            named_event(
                "message_start",
                &json!({"type": "message_start", "message": message}),
            ),
            named_event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ),
            named_event("ping", &json!({"type": "ping"})),
        ]
    }

    fn word(&self, _i: u64, piece: &str) -> String {
        named_event(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": piece}}),
        )
    }

    fn error(&self, _words: u64) -> Vec<String> {
        vec![named_event(
            "error",
            &json!({"type": "error", "error": {"type": "api_error", "message": ERROR_MESSAGE}}),
        )]
    }

    fn tail(&self) -> Vec<String> {
        let mut delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": null},
        });
        if self.usage {
            delta["usage"] = match &self.usage_override {
                Some(o) => o.clone(),
                None => json!({"output_tokens": self.completion}),
            };
        }
        vec![
            named_event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            named_event("message_delta", &delta),
            named_event("message_stop", &json!({"type": "message_stop"})),
        ]
    }
}
