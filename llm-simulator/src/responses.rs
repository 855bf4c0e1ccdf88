//! OpenAI Responses API: `POST /v1/responses`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::contract::{self, max_tokens_fields};
use crate::stream::{self, named_event, Script, ERROR_MESSAGE};
use crate::{accept, AppState, Format};

pub(crate) async fn create(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let a = match accept(&st, Format::OpenAiResponses, &headers, &body).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let prompt = contract::responses_prompt_tokens(&a.req);
    let (completion, _) = match a.completion(max_tokens_fields::RESPONSES) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let seq = st.next_seq();
    let resp = ResponsesStream {
        id: format!("resp_sim_{seq}"),
        item_id: format!("msg_sim_{seq}"),
        created: a.created,
        model: a.model(),
        instructions: a.req.get("instructions").cloned().unwrap_or(Value::Null),
        max_output_tokens: a
            .req
            .get("max_output_tokens")
            .cloned()
            .unwrap_or(Value::Null),
        prompt,
        cached: contract::openai_cached_tokens(prompt, a.ov.cache_read.unwrap_or(0)),
        completion,
        usage: (!a.ov.no_usage).then(|| a.ov.usage_override.clone()),
        text: a.text(completion),
    };
    if a.wants_stream() {
        a.ledger.record(prompt, 0);
        return stream::response(resp, a.pace(completion), a.ledger, "text/event-stream");
    }
    a.ledger.record(prompt, completion);
    Json(resp.response(true)).into_response()
}

/// One Responses API answer, whole or streamed.
struct ResponsesStream {
    id: String,
    item_id: String,
    created: u64,
    model: String,
    instructions: Value,
    max_output_tokens: Value,
    prompt: u64,
    /// `input_tokens_details.cached_tokens`: part of `prompt` (`x-simulator-cache-read-tokens`).
    cached: u64,
    completion: u64,
    /// Report usage: `None` under `x-simulator-no-usage`, `Some(Some(o))` with
    /// `x-simulator-usage-override`.
    usage: Option<Option<Value>>,
    /// The completion text.
    text: String,
}

impl ResponsesStream {
    fn usage_json(&self) -> Value {
        if let Some(Some(o)) = &self.usage {
            return o.clone();
        }
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt.saturating_add(self.completion),
        })
    }

    fn text_part(text: &str) -> Value {
        json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    }

    /// The output message item; `done` gives the finished item, else the empty one that
    /// `response.output_item.added` announces.
    fn item(&self, done: bool) -> Value {
        if done {
            json!({
                "id": self.item_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [Self::text_part(&self.text)],
            })
        } else {
            json!({
                "id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant",
                "content": [],
            })
        }
    }

    /// The `response` object: `done` gives the completed one (with output and usage), else
    /// the in-progress one of `response.created` (no output, `usage: null`).
    fn response(&self, done: bool) -> Value {
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": if done { "completed" } else { "in_progress" },
            "error": null,
            "incomplete_details": null,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": if done { json!([self.item(true)]) } else { json!([]) },
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "store": true,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "user": null,
            "metadata": {},
        });
        if !done {
            r["usage"] = Value::Null;
        } else if self.usage.is_some() {
            r["usage"] = self.usage_json();
        }
        r
    }

    fn event(&self, seq: u64, kind: &str, mut data: Value) -> String {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        named_event(kind, &data)
    }
}

/// Events: 0 `response.created`, 1 `response.in_progress`, 2 `response.output_item.added`,
/// 3 `response.content_part.added`, 4.. one `response.output_text.delta` per word, then
/// `response.output_text.done`, `response.content_part.done`, `response.output_item.done`,
/// `response.completed`.
impl Script for ResponsesStream {
    fn head(&self) -> Vec<String> {
        vec![
            self.event(
                0,
                "response.created",
                json!({"response": self.response(false)}),
            ),
            self.event(
                1,
                "response.in_progress",
                json!({"response": self.response(false)}),
            ),
            self.event(
                2,
                "response.output_item.added",
                json!({"output_index": 0, "item": self.item(false)}),
            ),
            self.event(
                3,
                "response.content_part.added",
                json!({"item_id": self.item_id, "output_index": 0, "content_index": 0,
                       "part": Self::text_part("")}),
            ),
        ]
    }

    fn word(&self, i: u64, piece: &str) -> String {
        self.event(
            3 + i,
            "response.output_text.delta",
            json!({"item_id": self.item_id, "output_index": 0, "content_index": 0,
                   "delta": piece, "logprobs": []}),
        )
    }

    /// An `error` event (as the Responses API sends on a failure mid-stream).
    fn error(&self, _words: u64) -> Vec<String> {
        vec![named_event(
            "error",
            &json!({"type": "error", "code": "server_error", "message": ERROR_MESSAGE, "param": null}),
        )]
    }

    fn tail(&self) -> Vec<String> {
        let text = self.text.clone();
        let seq = 4 + self.completion;
        vec![
            self.event(
                seq,
                "response.output_text.done",
                json!({"item_id": self.item_id, "output_index": 0, "content_index": 0,
                       "text": text, "logprobs": []}),
            ),
            self.event(
                seq + 1,
                "response.content_part.done",
                json!({"item_id": self.item_id, "output_index": 0, "content_index": 0,
                       "part": Self::text_part(&text)}),
            ),
            self.event(
                seq + 2,
                "response.output_item.done",
                json!({"output_index": 0, "item": self.item(true)}),
            ),
            self.event(
                seq + 3,
                "response.completed",
                json!({"response": self.response(true)}),
            ),
        ]
    }
}
