//! OpenAI `/v1/chat/completions`, `/v1/completions` and `/v1/embeddings`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::contract::{self, max_tokens_fields};
use crate::stream::{self, data_event, Script};
use crate::{accept, AppState, Format, Refusal};

/// The usage of a chat or completions answer. `cache_read` (`x-simulator-cache-read-tokens`)
/// adds `prompt_tokens_details.cached_tokens` as OpenAI reports prompt caching: part of
/// `prompt_tokens` (at most all of it), which it leaves unchanged; without the header there is
/// no details object (as llama-server and vLLM answer).
fn usage_json(prompt: u64, completion: u64, cache_read: Option<u64>) -> Value {
    let mut usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
    });
    if let Some(n) = cache_read {
        usage["prompt_tokens_details"] =
            json!({"cached_tokens": contract::openai_cached_tokens(prompt, n)});
    }
    usage
}

pub(crate) async fn chat_completions(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(st, Format::OpenAiChat, headers, body).await
}

pub(crate) async fn completions(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(st, Format::OpenAiCompletions, headers, body).await
}

pub(crate) async fn embeddings(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(st, Format::OpenAiEmbeddings, headers, body).await
}

async fn handle(st: AppState, format: Format, headers: HeaderMap, body: Bytes) -> Response {
    let a = match accept(&st, format, &headers, &body).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let model = a.model();

    if format == Format::OpenAiEmbeddings {
        let inputs = match contract::embedding_inputs(&a.req) {
            Ok(v) => v,
            Err(msg) => return a.refuse(Refusal::BadRequest, &msg),
        };
        let prompt = contract::prompt_tokens_from_words(inputs.iter().sum());
        a.ledger.record(prompt, 0);
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                json!({"object": "embedding", "index": i, "embedding": contract::embedding_vector(i, t)})
            })
            .collect();
        let mut resp = json!({"object": "list", "data": data, "model": model});
        if let Some(usage) = a.usage(json!({"prompt_tokens": prompt, "total_tokens": prompt})) {
            resp["usage"] = usage;
        }
        return Json(resp).into_response();
    }

    let chat = format == Format::OpenAiChat;
    let prompt = if chat {
        contract::chat_prompt_tokens(&a.req)
    } else {
        contract::completion_prompt_tokens(&a.req)
    };
    let (completion, from_body) = match a.completion(max_tokens_fields::OPENAI) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let finish_reason = if from_body { "length" } else { "stop" };
    let seq = st.next_seq();
    let id = if chat {
        format!("chatcmpl-sim-{seq}")
    } else {
        format!("cmpl-sim-{seq}")
    };

    if a.wants_stream() {
        let include_usage =
            a.req.pointer("/stream_options/include_usage") == Some(&Value::Bool(true));
        a.ledger.record(prompt, 0);
        let usage = a.usage(usage_json(prompt, completion, a.ov.cache_read));
        let script = OpenAiStream {
            chat,
            id,
            created: a.created,
            model,
            finish_reason,
            usage_chunk: include_usage && !a.ov.usage_on_last_choice && usage.is_some(),
            usage_on_finish: a.ov.usage_on_last_choice && usage.is_some(),
            usage: usage.unwrap_or(Value::Null),
        };
        return stream::response(script, a.pace(completion), a.ledger, "text/event-stream");
    }

    a.ledger.record(prompt, completion);
    let text = a.text(completion);
    let mut resp = if chat {
        json!({
            "id": id,
            "object": "chat.completion",
            "created": a.created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        })
    } else {
        json!({
            "id": id,
            "object": "text_completion",
            "created": a.created,
            "model": model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        })
    };
    if let Some(usage) = a.usage(usage_json(prompt, completion, a.ov.cache_read)) {
        resp["usage"] = usage;
    }
    Json(resp).into_response()
}

/// An OpenAI chat or completions stream.
struct OpenAiStream {
    chat: bool,
    id: String,
    created: u64,
    model: String,
    finish_reason: &'static str,
    /// Send `{"choices": [], "usage": ..}` before `[DONE]`.
    usage_chunk: bool,
    /// Put `usage` on the finish chunk (the last one with choices).
    usage_on_finish: bool,
    /// The usage object (the contract's, or `x-simulator-usage-override`).
    usage: Value,
}

impl OpenAiStream {
    fn chunk(&self, choices: Value) -> Value {
        let object = if self.chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn choice(&self, piece: Option<Value>, finish_reason: Value) -> Value {
        if self.chat {
            json!([{
                "index": 0,
                "delta": piece.unwrap_or_else(|| json!({})),
                "logprobs": null,
                "finish_reason": finish_reason,
            }])
        } else {
            json!([{
                "index": 0,
                "text": piece.unwrap_or_else(|| json!("")),
                "logprobs": null,
                "finish_reason": finish_reason,
            }])
        }
    }
}

impl Script for OpenAiStream {
    fn head(&self) -> Vec<String> {
        if self.chat {
            let role = json!({"role": "assistant", "content": null});
            vec![data_event(
                &self.chunk(self.choice(Some(role), Value::Null)),
            )]
        } else {
            Vec::new()
        }
    }

    fn word(&self, _i: u64, piece: &str) -> String {
        let piece = if self.chat {
            json!({"content": piece})
        } else {
            json!(piece)
        };
        data_event(&self.chunk(self.choice(Some(piece), Value::Null)))
    }

    fn tail(&self) -> Vec<String> {
        let mut finish = self.chunk(self.choice(None, json!(self.finish_reason)));
        if self.usage_on_finish {
            finish["usage"] = self.usage.clone();
        }
        let mut events = vec![data_event(&finish)];
        if self.usage_chunk {
            let mut c = self.chunk(json!([]));
            c["usage"] = self.usage.clone();
            events.push(data_event(&c));
        }
        events.push("data: [DONE]\n\n".to_string());
        events
    }
}
