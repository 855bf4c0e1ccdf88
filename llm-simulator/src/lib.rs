#![doc = include_str!("../README.md")]
//!
//! ## The library
//!
//! [`app`] (or [`app_with_stats`]) builds the [`axum::Router`] for a [`Config`] and [`serve`]
//! runs it on a listener; the `llm-simulator` binary is a thin CLI over them. [`contract`]
//! holds the pure functions of the usage contract (a test can compute the usage it expects
//! from a request body), [`Stats`] / [`Snapshot`] the ledger behind `/_simulator/stats` with
//! [`Format`] naming its `by_format` keys, and [`negotiate_encoding`] the `accept-encoding`
//! choice of the compression. The `HEADER_*` constants name the test knobs.

pub mod contract;
pub mod stats;

mod anthropic;
mod compress;
mod gemini;
mod openai;
mod responses;
mod stream;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::uri::PathAndQuery;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde_json::{json, Value};
use tower::ServiceExt;

pub use compress::{negotiate as negotiate_encoding, Encoding};
pub use stats::{Counters, Format, Snapshot, Stats};

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
/// Header putting the usage on the last OpenAI chunk that has choices (no `choices: []` chunk).
pub const HEADER_USAGE_ON_LAST_CHOICE: &str = "x-simulator-usage-on-last-choice";
/// Header making a stream drop the connection after N completion words.
pub const HEADER_ABORT_AFTER: &str = "x-simulator-abort-after";
/// Header forcing the prompt tokens read from the provider's cache: Anthropic's
/// `cache_read_input_tokens`, OpenAI's `prompt_tokens_details.cached_tokens` (Responses:
/// `input_tokens_details.cached_tokens`; at most the prompt, which includes them).
pub const HEADER_CACHE_READ_TOKENS: &str = "x-simulator-cache-read-tokens";
/// Header forcing Anthropic's `cache_creation_input_tokens`.
pub const HEADER_CACHE_CREATION_TOKENS: &str = "x-simulator-cache-creation-tokens";
/// Header turning response compression on (`true`) or off (`false`) for one request.
pub const HEADER_COMPRESS: &str = "x-simulator-compress";
/// Header replacing the completion text (the token counts are unchanged).
pub const HEADER_CONTENT: &str = "x-simulator-content";
/// Header replacing the usage object (a JSON object) wherever the format reports usage.
pub const HEADER_USAGE_OVERRIDE: &str = "x-simulator-usage-override";
/// Header ending a stream with the format's in-stream error after N completion words.
pub const HEADER_ERROR_AFTER: &str = "x-simulator-error-after";

/// Runtime configuration (the CLI's options).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Delay before each LLM endpoint answers (before the response head).
    pub latency: Duration,
    /// Delay before each streamed word chunk.
    pub token_delay: Duration,
    /// Compress response bodies for clients whose `accept-encoding` allows gzip, br or
    /// deflate (`--compress`). The `x-simulator-compress` header overrides it per request.
    pub compress: bool,
}

#[derive(Clone)]
struct AppState {
    config: Config,
    stats: Stats,
    next_id: Arc<AtomicU64>,
}

impl AppState {
    fn next_seq(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
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
    let routes = routes(config, state);
    // Routing happens on the lenient path (see `lenient_path`): the outer router only
    // rewrites the URI and hands the request to the real one.
    Router::new().fallback(move |req: Request| {
        let routes = routes.clone();
        async move {
            match routes.oneshot(lenient_path(req)).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            }
        }
    })
}

/// The path as a lenient upstream routes it: percent-decoded (`%63` is `c`, `%2F` is `/`, as
/// uvicorn/Starlette decode it before routing; `%3F` and `%23` stay encoded) and with runs of `/` merged (as nginx does in
/// front of many servers). The query string is kept (and ignored by routing). Paths that
/// do not decode to UTF-8 or to a valid URI are left alone. Case and trailing slashes are
/// not touched: `/V1/...` and `/v1/chat/completions/` are unknown paths (`404`).
fn lenient_path(mut req: Request) -> Request {
    let uri = req.uri();
    let path = uri.path();
    let mut bytes = Vec::with_capacity(path.len());
    let raw = path.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                let c = (h * 16 + l) as u8;
                // An encoded `?` or `#` stays part of the path, as in uvicorn (which decodes
                // the path after splitting off the query).
                if c != b'?' && c != b'#' {
                    bytes.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        bytes.push(raw[i]);
        i += 1;
    }
    let Ok(decoded) = String::from_utf8(bytes) else {
        return req;
    };
    let mut lenient = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        if !(c == '/' && lenient.ends_with('/')) {
            lenient.push(c);
        }
    }
    if lenient == path {
        return req;
    }
    let target = match uri.query() {
        Some(q) => format!("{lenient}?{q}"),
        None => lenient,
    };
    let mut parts = uri.clone().into_parts();
    match target.parse::<PathAndQuery>() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return req,
    }
    if let Ok(new) = Uri::from_parts(parts) {
        *req.uri_mut() = new;
    }
    req
}

/// The simulator's routes.
fn routes(config: Config, state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/responses", post(responses::create))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1beta/models/{target}", post(gemini::generate))
        .route("/v1/models/{target}", post(gemini::generate))
        .route("/v1/models", get(models))
        .route("/healthz", get(healthz))
        .route("/_simulator/stats", get(get_stats))
        .route("/_simulator/reset", post(reset_stats))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            config.compress,
            compress::middleware,
        ))
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
// Errors, in each format's own shape

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// A malformed request or header: 400.
    BadRequest,
    /// A status forced by `x-simulator-status`.
    Simulated(StatusCode),
    /// An unknown path or method: 404.
    NotFound,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::Simulated(s) => s,
            Refusal::NotFound => StatusCode::NOT_FOUND,
        }
    }
}

/// The error body `format` uses:
/// * OpenAI formats: `{"error":{"message","type","param":null,"code"}}`, type
///   `invalid_request_error` (4xx) or `server_error` (5xx), code `simulated_error` for forced
///   statuses, `not_found` for 404, else `null`;
/// * Anthropic: `{"type":"error","error":{"type","message"}}`;
/// * Gemini: `{"error":{"code","message","status"}}`.
fn error_response(format: Format, refusal: Refusal, message: &str) -> Response {
    let status = refusal.status();
    let body = match format {
        Format::Anthropic => {
            let kind = match status.as_u16() {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                s if s >= 500 => "api_error",
                _ => "invalid_request_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Format::Gemini => {
            let kind = match status.as_u16() {
                400 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                409 => "ABORTED",
                429 => "RESOURCE_EXHAUSTED",
                499 => "CANCELLED",
                501 => "UNIMPLEMENTED",
                503 => "UNAVAILABLE",
                504 => "DEADLINE_EXCEEDED",
                s if s >= 500 => "INTERNAL",
                _ => "FAILED_PRECONDITION",
            };
            json!({"error": {"code": status.as_u16(), "message": message, "status": kind}})
        }
        _ => {
            let kind = if status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            };
            let code = match refusal {
                Refusal::BadRequest => Value::Null,
                Refusal::Simulated(_) => json!("simulated_error"),
                Refusal::NotFound => json!("not_found"),
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
    };
    (status, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------------
// Request plumbing shared by every LLM endpoint

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()))
}

fn header_flag(headers: &HeaderMap, name: &str) -> bool {
    header_str(headers, name)
        .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
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
    usage_on_last_choice: bool,
    abort_after: Option<u64>,
    /// `x-simulator-cache-read-tokens`, `None` without the header.
    cache_read: Option<u64>,
    cache_creation: u64,
    content: Option<String>,
    usage_override: Option<Value>,
    error_after: Option<u64>,
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
    let latency =
        header_u64(headers, HEADER_LATENCY_MS)?.map_or(config.latency, Duration::from_millis);
    let token_delay = header_u64(headers, HEADER_TOKEN_DELAY_MS)?
        .map_or(config.token_delay, Duration::from_millis);
    Ok(Overrides {
        status,
        completion_tokens,
        no_usage: header_flag(headers, HEADER_NO_USAGE),
        latency,
        token_delay,
        usage_on_last_choice: header_flag(headers, HEADER_USAGE_ON_LAST_CHOICE),
        abort_after: header_u64(headers, HEADER_ABORT_AFTER)?,
        cache_read: header_u64(headers, HEADER_CACHE_READ_TOKENS)?,
        cache_creation: header_u64(headers, HEADER_CACHE_CREATION_TOKENS)?.unwrap_or(0),
        content: header_str(headers, HEADER_CONTENT).map(|v| v.into_owned()),
        usage_override: match header_str(headers, HEADER_USAGE_OVERRIDE) {
            None => None,
            Some(v) => match serde_json::from_str::<Value>(&v) {
                Ok(o @ Value::Object(_)) => Some(o),
                _ => {
                    return Err(format!(
                        "header {HEADER_USAGE_OVERRIDE} must be a JSON object, got {v:?}"
                    ))
                }
            },
        },
        error_after: header_u64(headers, HEADER_ERROR_AFTER)?,
    })
}

/// Where a stream's tokens are recorded: one user key and one format of the ledger.
#[derive(Clone)]
struct Ledger {
    stats: Stats,
    user: String,
    format: Format,
}

impl Ledger {
    fn record(&self, prompt: u64, completion: u64) {
        self.stats
            .record(&self.user, self.format, prompt, completion);
    }

    fn add_completion(&self, completion: u64) {
        self.stats
            .add_completion_to(&self.user, self.format, completion);
    }
}

/// A request that passed the common checks (headers, forced status, JSON object body).
struct Accepted {
    ledger: Ledger,
    ov: Overrides,
    req: Value,
    created: u64,
}

impl Accepted {
    /// The string `model` of the body, else [`DEFAULT_MODEL`].
    fn model(&self) -> String {
        self.req
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_MODEL)
            .to_string()
    }

    /// Refuses the request: counts it with 0 tokens and answers the format's error body.
    fn refuse(&self, refusal: Refusal, message: &str) -> Response {
        self.ledger.record(0, 0);
        error_response(self.ledger.format, refusal, message)
    }

    /// The completion length: the `x-simulator-completion-tokens` header, else the first
    /// field of `fields` present in the body, else the default. The flag says whether it
    /// came from the body (the "stopped by the length limit" reasons). `Err` is the
    /// 400 answer (already counted) for a malformed field.
    fn completion(&self, fields: &[&str]) -> Result<(u64, bool), Box<Response>> {
        let requested = contract::requested_tokens(&self.req, fields)
            .map_err(|msg| Box::new(self.refuse(Refusal::BadRequest, &msg)))?;
        let from_body = self.ov.completion_tokens.is_none() && requested.is_some();
        let n = self
            .ov
            .completion_tokens
            .or(requested)
            .unwrap_or(contract::DEFAULT_COMPLETION_TOKENS);
        Ok((n, from_body))
    }

    /// `true` when the body has `"stream": true` (the JSON boolean).
    fn wants_stream(&self) -> bool {
        self.req.get("stream") == Some(&Value::Bool(true))
    }

    /// The stream pacing knobs for a completion of `completion` words.
    fn pace(&self, completion: u64) -> stream::Pace {
        stream::Pace {
            completion,
            token_delay: self.ov.token_delay,
            abort_after: self.ov.abort_after,
            error_after: self.ov.error_after,
            content: self.ov.content.clone(),
        }
    }

    /// The completion text of `completion` words: `tok1 … tokN`, or `x-simulator-content`.
    fn text(&self, completion: u64) -> String {
        self.ov
            .content
            .clone()
            .unwrap_or_else(|| contract::completion_text(completion))
    }

    /// The usage object to send: `None` under `x-simulator-no-usage`, else the
    /// `x-simulator-usage-override` object, else `usage`.
    fn usage(&self, usage: Value) -> Option<Value> {
        if self.ov.no_usage {
            None
        } else {
            Some(self.ov.usage_override.clone().unwrap_or(usage))
        }
    }
}

/// The common first steps of every LLM endpoint: the user key, the `x-simulator-*` headers
/// (400 when malformed), the latency, a forced status, and the JSON object body (400 when not).
/// Every refusal is counted as a request with 0 tokens.
async fn accept(
    st: &AppState,
    format: Format,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Accepted, Response> {
    let ledger = Ledger {
        stats: st.stats.clone(),
        user: user_key(headers),
        format,
    };
    let refuse = |refusal: Refusal, msg: &str| {
        ledger.record(0, 0);
        error_response(format, refusal, msg)
    };
    let ov = overrides(headers, &st.config).map_err(|msg| refuse(Refusal::BadRequest, &msg))?;
    if !ov.latency.is_zero() {
        tokio::time::sleep(ov.latency).await;
    }
    if let Some(status) = ov.status {
        let msg = format!(
            "simulated error (status {}) forced by {HEADER_STATUS}",
            status.as_u16()
        );
        return Err(refuse(Refusal::Simulated(status), &msg));
    }
    let req = match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return Err(refuse(
                Refusal::BadRequest,
                "request body must be a JSON object",
            ))
        }
        Err(e) => {
            return Err(refuse(
                Refusal::BadRequest,
                &format!("invalid JSON body: {e}"),
            ))
        }
    };
    Ok(Accepted {
        ledger,
        ov,
        req,
        created: now_unix(),
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
    error_response(Format::OpenAiChat, Refusal::NotFound, "unknown path")
}
