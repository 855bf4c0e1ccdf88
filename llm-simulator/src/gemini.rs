//! Gemini API: `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`
//! (also under `/v1/models/`).

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::contract::{self, max_tokens_fields};
use crate::stream::{self, Script, ERROR_MESSAGE};
use crate::{accept, error_response, AppState, Format, Refusal};

/// `true` when the raw query string has `alt=sse`.
fn alt_is_sse(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.split_once('=')
                .is_some_and(|(k, v)| k == "alt" && v == "sse")
        })
    })
}

pub(crate) async fn generate(
    State(st): State<AppState>,
    Path(target): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (model, streaming) = match target.rsplit_once(':') {
        Some((model, "generateContent")) if !model.is_empty() => (model.to_string(), false),
        Some((model, "streamGenerateContent")) if !model.is_empty() => (model.to_string(), true),
        _ => {
            return error_response(
                Format::Gemini,
                Refusal::NotFound,
                &format!("unknown model method {target:?}: use {{model}}:generateContent or {{model}}:streamGenerateContent"),
            )
        }
    };
    let a = match accept(&st, Format::Gemini, &headers, &body).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let prompt = contract::gemini_prompt_tokens(&a.req);
    let (completion, from_body) = match a.completion(max_tokens_fields::GEMINI) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let g = GeminiStream {
        response_id: format!("sim-{}", st.next_seq()),
        model,
        prompt,
        completion,
        finish_reason: if from_body { "MAX_TOKENS" } else { "STOP" },
        usage: !a.ov.no_usage,
        usage_override: a.ov.usage_override.clone(),
        sse: alt_is_sse(query.as_deref()),
    };
    if streaming {
        a.ledger.record(prompt, 0);
        let content_type = if g.sse {
            "text/event-stream"
        } else {
            "application/json"
        };
        return stream::response(g, a.pace(completion), a.ledger, content_type);
    }
    a.ledger.record(prompt, completion);
    Json(g.chunk(&a.text(completion), completion, true)).into_response()
}

/// One `generateContent` answer, whole or streamed.
struct GeminiStream {
    response_id: String,
    model: String,
    prompt: u64,
    completion: u64,
    finish_reason: &'static str,
    /// Report usage (false under `x-simulator-no-usage`).
    usage: bool,
    /// `x-simulator-usage-override`: every `usageMetadata` sent.
    usage_override: Option<Value>,
    /// `?alt=sse`: SSE events; else one JSON array streamed element by element.
    sse: bool,
}

impl GeminiStream {
    /// A `GenerateContentResponse` with `text`, usage counting `produced` candidate tokens,
    /// and the finish reason when `last`.
    fn chunk(&self, text: &str, produced: u64, last: bool) -> Value {
        let mut candidate = json!({
            "content": {"parts": [{"text": text}], "role": "model"},
            "index": 0,
        });
        if last {
            candidate["finishReason"] = json!(self.finish_reason);
        }
        let mut c = json!({"candidates": [candidate]});
        if self.usage {
            c["usageMetadata"] = match &self.usage_override {
                Some(o) => o.clone(),
                None => json!({
                    "promptTokenCount": self.prompt,
                    "candidatesTokenCount": produced,
                    "totalTokenCount": self.prompt.saturating_add(produced),
                }),
            };
        }
        c["modelVersion"] = json!(self.model);
        c["responseId"] = json!(self.response_id);
        c
    }

    /// The wire bytes of chunk `c`, the `index`-th (0-based) of the stream.
    fn frame(&self, c: &Value, index: u64) -> String {
        if self.sse {
            // Google ends each event with CRLF CRLF.
            format!("data: {c}\r\n\r\n")
        } else {
            let pretty = serde_json::to_string_pretty(c).unwrap_or_else(|_| c.to_string());
            if index == 0 {
                pretty
            } else {
                format!("\n,\r\n{pretty}")
            }
        }
    }
}

/// `?alt=sse`: one `data: <json>\r\n\r\n` event per word, each with `usageMetadata` carrying
/// the running `candidatesTokenCount`; the last word's chunk has `finishReason`. Without
/// `alt=sse`: `[`, then the same chunks pretty-printed and separated by `\n,\r\n`, then `]`.
/// A completion of 0 words sends one chunk with an empty text and the finish reason.
impl Script for GeminiStream {
    fn head(&self) -> Vec<String> {
        if self.sse {
            Vec::new()
        } else {
            vec!["[".to_string()]
        }
    }

    fn word(&self, i: u64, piece: &str) -> String {
        let c = self.chunk(piece, i, i == self.completion);
        self.frame(&c, i - 1)
    }

    /// An error object in the stream, as Google sends on a failure mid-stream:
    /// `{"error":{"code":500,"message":..,"status":"INTERNAL"}}` as an SSE event, or as the
    /// array's last element (then `]`).
    fn error(&self, words: u64) -> Vec<String> {
        let e = json!({"error": {"code": 500, "message": ERROR_MESSAGE, "status": "INTERNAL"}});
        if self.sse {
            vec![self.frame(&e, words)]
        } else {
            vec![self.frame(&e, words), "]".to_string()]
        }
    }

    fn tail(&self) -> Vec<String> {
        let mut events = Vec::new();
        if self.completion == 0 {
            events.push(self.frame(&self.chunk("", 0, true), 0));
        }
        if !self.sse {
            events.push("]".to_string());
        }
        events
    }
}
