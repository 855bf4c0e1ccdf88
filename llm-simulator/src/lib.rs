//! # llm-simulator
//!
//! An OpenAI-compatible LLM upstream simulator for end-to-end tests, load tests and the local
//! stack. It answers instantly (or after configured delays) with **deterministic** token usage,
//! and keeps a ledger of every token it served so a test can compare what was served with what
//! a rate-limit service was told.
//!
//! Use [`app`] (or [`app_with_stats`]) to get the [`axum::Router`] and [`serve`] to run it on
//! a listener; the `llm-simulator` binary is a thin CLI over them.
//!
//! ## Endpoints
//!
//! | method | path | answer |
//! | --- | --- | --- |
//! | POST | `/v1/chat/completions` | `chat.completion`, or `chat.completion.chunk` SSE when `"stream": true` |
//! | POST | `/v1/completions` | `text_completion` (also as SSE when `"stream": true`) |
//! | POST | `/v1/embeddings` | `list` of `embedding` objects, 8 floats each |
//! | GET | `/v1/models` | `list` with one model, `llm-simulator` |
//! | GET | `/healthz` | `200 ok` |
//! | GET | `/_simulator/stats` | the token ledger (see below) |
//! | POST | `/_simulator/reset` | zeroes the ledger, answers `204` |
//!
//! ## Usage contract
//!
//! Words are maximal runs of non-whitespace characters (Unicode whitespace, as Rust's
//! `str::split_whitespace`).
//!
//! * **prompt_tokens** = number of words in the prompt text, no overhead, **minimum 1**:
//!   * chat: the `content` of every message in `messages`, summed over messages; a string
//!     content counts its words, an array content counts the words of each part's `text`
//!     string (other parts, e.g. images, and `null` content count 0);
//!   * completions: `prompt` as a string, or the sum over an array of strings
//!     (token-id arrays count one token per id);
//!   * embeddings: `input` as a string, or the sum over an array of strings (same token-id
//!     rule); `input` missing, empty array or malformed → 400.
//! * **completion_tokens** (chat and completions) = the `x-simulator-completion-tokens`
//!   header if present, else `max_completion_tokens`, else `max_tokens`, else **16**
//!   (at most 1,000,000; other values → 400). The completion text is exactly that many words,
//!   `"tok1 tok2 … tokN"` (empty for 0). `finish_reason` is `"length"` when the count came from
//!   `max_completion_tokens`/`max_tokens`, `"stop"` otherwise.
//! * Embeddings: `usage` is `{"prompt_tokens": P, "total_tokens": P}` (no completion tokens);
//!   one embedding of 8 floats per input.
//! * **total_tokens** = prompt_tokens + completion_tokens.
//! * `model` is echoed from the request (default `llm-simulator`). Only one choice is returned
//!   (`n` is ignored).
//!
//! ### Request headers (test knobs)
//!
//! * `x-simulator-completion-tokens: N` forces the completion length (chat, completions).
//! * `x-simulator-status: S` with S in 400..=599 answers status S with an OpenAI error body
//!   (`{"error":{"message":..,"type":..,"param":null,"code":"simulated_error"}}`, type
//!   `invalid_request_error` for 4xx and `server_error` for 5xx), no usage; counts 0 tokens.
//! * `x-simulator-no-usage: true` (or `1`, `yes`) omits `usage` from the body and the usage
//!   chunk from streams; the tokens are still served and counted.
//! * `x-simulator-latency-ms: N` / `x-simulator-token-delay-ms: N` override the CLI delays
//!   for one request.
//! * `x-simulator-user: KEY` names the ledger key (else the `authorization` value, else
//!   `anonymous`).
//!
//! A header value that does not parse is answered 400 (`invalid_request_error`).
//!
//! ### Errors
//!
//! A body that is not JSON, or JSON that is not an object, is answered 400 with
//! `{"error":{"message":..,"type":"invalid_request_error","param":null,"code":null}}`.
//!
//! ## Streaming
//!
//! With `"stream": true` (the JSON boolean) the answer is `text/event-stream`, each event
//! `data: <compact JSON>\n\n`:
//! 1. chat only: a role chunk, `"delta":{"role":"assistant","content":null}`;
//! 2. one chunk per completion word: chat `"delta":{"content":"tok1"}`, then `" tok2"`, …
//!    (completions: `"text"` instead of `delta`), `finish_reason: null`;
//! 3. a final chunk with an empty delta (completions: `"text":""`) and the `finish_reason`;
//! 4. only when `stream_options.include_usage` is `true` (and `x-simulator-no-usage` is not
//!    set): a chunk with `"choices":[]` and `usage`;
//! 5. `data: [DONE]\n\n`.
//!
//! `--latency-ms` delays the response head; `--token-delay-ms` sleeps before each word chunk.
//!
//! ## Ledger
//!
//! `GET /_simulator/stats` →
//! `{"requests":N,"prompt_tokens":N,"completion_tokens":N,"total_tokens":N,"by_user":{"<key>":{same four fields}}}`.
//! `requests` counts every POST to the three LLM endpoints, errors included. Tokens are
//! counted as served, whether or not usage was reported: non-streamed answers when the answer
//! is built (before it is written, so a client that has read it sees it counted); streams count
//! the prompt when the stream starts and each completion token as its chunk is produced (an
//! aborted stream counts only what was produced). Errors (forced or 400) count 0 tokens.

pub mod contract;
pub mod stats;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

pub use stats::{Counters, Snapshot, Stats};

/// Model name used when the request has no string `model`; also the one model listed.
pub const DEFAULT_MODEL: &str = "llm-simulator";

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Header forcing the completion length.
pub const HEADER_COMPLETION_TOKENS: &str = "x-simulator-completion-tokens";
/// Header forcing an error status (400..=599).
pub const HEADER_STATUS: &str = "x-simulator-status";
/// Header omitting the usage object.
pub const HEADER_NO_USAGE: &str = "x-simulator-no-usage";
/// Header overriding `--latency-ms` for one request.
pub const HEADER_LATENCY_MS: &str = "x-simulator-latency-ms";
/// Header overriding `--token-delay-ms` for one request.
pub const HEADER_TOKEN_DELAY_MS: &str = "x-simulator-token-delay-ms";
/// Header naming the ledger key.
pub const HEADER_USER: &str = "x-simulator-user";

/// Runtime configuration (the CLI's delays).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Delay before each LLM endpoint answers (before the response head).
    pub latency: Duration,
    /// Delay before each streamed word chunk.
    pub token_delay: Duration,
}

#[derive(Clone)]
struct AppState {
    config: Config,
    stats: Stats,
    next_id: Arc<AtomicU64>,
}

/// The simulator's router with a fresh ledger.
pub fn app(config: Config) -> Router {
    app_with_stats(config, Stats::new())
}

/// The simulator's router recording into `stats` (keep a clone to read it in-process).
pub fn app_with_stats(config: Config, stats: Stats) -> Router {
    let state = AppState {
        config,
        stats,
        next_id: Arc::new(AtomicU64::new(1)),
    };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/_simulator/stats", get(get_stats))
        .route("/_simulator/reset", post(reset_stats))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains open connections.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// An OpenAI-style error response.
fn error_response(status: StatusCode, message: &str, kind: &str, code: Value) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn bad_request(message: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        Value::Null,
    )
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
}

fn user_key(headers: &HeaderMap) -> String {
    header_str(headers, HEADER_USER)
        .or_else(|| header_str(headers, header::AUTHORIZATION.as_str()))
        .map_or_else(|| stats::ANONYMOUS.to_string(), |v| v.into_owned())
}

fn header_u64(headers: &HeaderMap, name: &str) -> Result<Option<u64>, String> {
    match header_str(headers, name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("header {name} must be a non-negative integer, got {v:?}")),
    }
}

/// Per-request knobs from the `x-simulator-*` headers.
struct Overrides {
    status: Option<StatusCode>,
    completion_tokens: Option<u64>,
    no_usage: bool,
    latency: Duration,
    token_delay: Duration,
}

fn overrides(headers: &HeaderMap, config: &Config) -> Result<Overrides, String> {
    let status = match header_u64(headers, HEADER_STATUS)? {
        None => None,
        Some(s) => match u16::try_from(s)
            .ok()
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(code) if (400..=599).contains(&code.as_u16()) => Some(code),
            _ => {
                return Err(format!(
                    "header {HEADER_STATUS} must be in 400..=599, got {s}"
                ))
            }
        },
    };
    let completion_tokens = header_u64(headers, HEADER_COMPLETION_TOKENS)?;
    if let Some(n) = completion_tokens {
        if n > contract::MAX_COMPLETION_TOKENS {
            return Err(format!(
                "header {HEADER_COMPLETION_TOKENS} must be at most {}",
                contract::MAX_COMPLETION_TOKENS
            ));
        }
    }
    let no_usage = header_str(headers, HEADER_NO_USAGE)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
    let latency =
        header_u64(headers, HEADER_LATENCY_MS)?.map_or(config.latency, Duration::from_millis);
    let token_delay = header_u64(headers, HEADER_TOKEN_DELAY_MS)?
        .map_or(config.token_delay, Duration::from_millis);
    Ok(Overrides {
        status,
        completion_tokens,
        no_usage,
        latency,
        token_delay,
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn chat_completions(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    handle(st, Endpoint::Chat, headers, body).await
}

async fn completions(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    handle(st, Endpoint::Completions, headers, body).await
}

async fn embeddings(State(st): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    handle(st, Endpoint::Embeddings, headers, body).await
}

async fn handle(st: AppState, endpoint: Endpoint, headers: HeaderMap, body: Bytes) -> Response {
    let user = user_key(&headers);
    let ov = match overrides(&headers, &st.config) {
        Ok(ov) => ov,
        Err(msg) => {
            st.stats.record_request(&user, 0, 0);
            return bad_request(&msg);
        }
    };
    if !ov.latency.is_zero() {
        tokio::time::sleep(ov.latency).await;
    }
    if let Some(status) = ov.status {
        st.stats.record_request(&user, 0, 0);
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let msg = format!(
            "simulated error (status {}) forced by {HEADER_STATUS}",
            status.as_u16()
        );
        return error_response(status, &msg, kind, json!("simulated_error"));
    }
    let req: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            st.stats.record_request(&user, 0, 0);
            return bad_request("request body must be a JSON object");
        }
        Err(e) => {
            st.stats.record_request(&user, 0, 0);
            return bad_request(&format!("invalid JSON body: {e}"));
        }
    };
    let req = Value::Object(req);
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_MODEL)
        .to_string();
    let created = now_unix();

    if endpoint == Endpoint::Embeddings {
        let inputs = match contract::embedding_inputs(&req) {
            Ok(v) => v,
            Err(msg) => {
                st.stats.record_request(&user, 0, 0);
                return bad_request(&msg);
            }
        };
        let prompt = contract::prompt_tokens_from_words(inputs.iter().sum());
        st.stats.record_request(&user, prompt, 0);
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                json!({"object": "embedding", "index": i, "embedding": contract::embedding_vector(i, t)})
            })
            .collect();
        let mut resp = json!({"object": "list", "data": data, "model": model});
        if !ov.no_usage {
            resp["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt});
        }
        return Json(resp).into_response();
    }

    let prompt = match endpoint {
        Endpoint::Chat => contract::chat_prompt_tokens(&req),
        _ => contract::completion_prompt_tokens(&req),
    };
    let requested = match contract::requested_completion_tokens(&req) {
        Ok(r) => r,
        Err(msg) => {
            st.stats.record_request(&user, 0, 0);
            return bad_request(&msg);
        }
    };
    let completion = ov
        .completion_tokens
        .or(requested)
        .unwrap_or(contract::DEFAULT_COMPLETION_TOKENS);
    let finish_reason = if ov.completion_tokens.is_none() && requested.is_some() {
        "length"
    } else {
        "stop"
    };
    let seq = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-sim-{seq}"),
        _ => format!("cmpl-sim-{seq}"),
    };

    if req.get("stream") == Some(&Value::Bool(true)) {
        let include_usage = req.pointer("/stream_options/include_usage")
            == Some(&Value::Bool(true))
            && !ov.no_usage;
        st.stats.record_request(&user, prompt, 0);
        let plan = StreamPlan {
            endpoint,
            id,
            created,
            model,
            prompt,
            completion,
            finish_reason,
            include_usage,
            token_delay: ov.token_delay,
            user,
            stats: st.stats.clone(),
        };
        return sse_response(plan);
    }

    st.stats.record_request(&user, prompt, completion);
    let text = contract::completion_text(completion);
    let mut resp = match endpoint {
        Endpoint::Chat => json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        }),
        _ => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        }),
    };
    if !ov.no_usage {
        resp["usage"] = usage_json(prompt, completion);
    }
    Json(resp).into_response()
}

// ---------------------------------------------------------------------------------------------
// Streaming

struct StreamPlan {
    endpoint: Endpoint,
    id: String,
    created: u64,
    model: String,
    prompt: u64,
    completion: u64,
    finish_reason: &'static str,
    include_usage: bool,
    token_delay: Duration,
    user: String,
    stats: Stats,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Role,
    Word(u64),
    Finish,
    Usage,
    Done,
    End,
}

impl StreamPlan {
    fn chunk(&self, choices: Value) -> Value {
        let object = match self.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            _ => "text_completion",
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
        match self.endpoint {
            Endpoint::Chat => json!([{
                "index": 0,
                "delta": piece.unwrap_or_else(|| json!({})),
                "logprobs": null,
                "finish_reason": finish_reason,
            }]),
            _ => json!([{
                "index": 0,
                "text": piece.unwrap_or_else(|| json!("")),
                "logprobs": null,
                "finish_reason": finish_reason,
            }]),
        }
    }

    fn after_word(&self, i: u64) -> Phase {
        if i < self.completion {
            Phase::Word(i + 1)
        } else {
            Phase::Finish
        }
    }

    /// Produces the event for `phase` and the next phase; `None` at the end.
    async fn step(&self, phase: Phase) -> Option<(String, Phase)> {
        let (event, next) = match phase {
            Phase::Role => {
                let c = self.chunk(self.choice(
                    Some(json!({"role": "assistant", "content": null})),
                    Value::Null,
                ));
                (c.to_string(), self.after_word(0))
            }
            Phase::Word(i) => {
                if !self.token_delay.is_zero() {
                    tokio::time::sleep(self.token_delay).await;
                }
                let word = contract::completion_word(i);
                let piece = if i == 1 { word } else { format!(" {word}") };
                let piece = match self.endpoint {
                    Endpoint::Chat => json!({"content": piece}),
                    _ => json!(piece),
                };
                let c = self.chunk(self.choice(Some(piece), Value::Null));
                self.stats.add_completion(&self.user, 1);
                (c.to_string(), self.after_word(i))
            }
            Phase::Finish => {
                let c = self.chunk(self.choice(None, json!(self.finish_reason)));
                let next = if self.include_usage {
                    Phase::Usage
                } else {
                    Phase::Done
                };
                (c.to_string(), next)
            }
            Phase::Usage => {
                let mut c = self.chunk(json!([]));
                c["usage"] = usage_json(self.prompt, self.completion);
                (c.to_string(), Phase::Done)
            }
            Phase::Done => ("[DONE]".to_string(), Phase::End),
            Phase::End => return None,
        };
        Some((format!("data: {event}\n\n"), next))
    }
}

fn sse_response(plan: StreamPlan) -> Response {
    let first = match plan.endpoint {
        Endpoint::Chat => Phase::Role,
        _ => plan.after_word(0),
    };
    let plan = Arc::new(plan);
    let stream = futures_util::stream::unfold(first, move |phase| {
        let plan = Arc::clone(&plan);
        async move {
            plan.step(phase)
                .await
                .map(|(event, next)| (Ok::<Bytes, Infallible>(Bytes::from(event)), next))
        }
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Other endpoints

async fn models() -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "llm-simulator"}],
    }))
    .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn get_stats(State(st): State<AppState>) -> Response {
    Json(st.stats.snapshot()).into_response()
}

async fn reset_stats(State(st): State<AppState>) -> StatusCode {
    st.stats.reset();
    StatusCode::NO_CONTENT
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "unknown path",
        "invalid_request_error",
        json!("not_found"),
    )
}
