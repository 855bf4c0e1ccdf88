//! The streaming engine shared by every format: a [`Script`] says what each event is, the
//! engine paces the words, counts them in the ledger as they are produced and carries out
//! the `x-simulator-abort-after`, `x-simulator-error-after` and `x-simulator-content` knobs.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::Ledger;

/// How long an aborting stream waits after its last word before dropping the connection, so
/// that the words already produced reach the client (the server flushes while it waits).
pub(crate) const ABORT_GRACE: Duration = Duration::from_millis(50);

/// The events of one streamed answer, as bytes ready for the wire.
pub(crate) trait Script: Send + Sync + 'static {
    /// Events sent before the first word.
    fn head(&self) -> Vec<String>;
    /// The event carrying completion word `i` (1-based), whose text is `piece` (see
    /// [`Pace::piece`]).
    fn word(&self, i: u64, piece: &str) -> String;
    /// Events sent after the last word.
    fn tail(&self) -> Vec<String>;
    /// Events that end the stream instead of the tail under `x-simulator-error-after`: the
    /// format's in-stream error (OpenAI: a `data: {"error": ..}` chunk, then `[DONE]`).
    /// `words`: the number of words sent before it.
    fn error(&self, _words: u64) -> Vec<String> {
        vec![
            data_event(&serde_json::json!({"error": {
                "message": ERROR_MESSAGE, "type": "server_error", "param": null, "code": "simulated_error"}})),
            "data: [DONE]\n\n".to_string(),
        ]
    }
}

/// The message of in-stream errors (`x-simulator-error-after`).
pub(crate) const ERROR_MESSAGE: &str = "simulated error in the stream (x-simulator-error-after)";

/// A word as streamed: `tok1`, then ` tok2`, ` tok3`, …
pub(crate) fn word_piece(i: u64) -> String {
    let word = crate::contract::completion_word(i);
    if i == 1 {
        word
    } else {
        format!(" {word}")
    }
}

/// Pacing of a stream.
pub(crate) struct Pace {
    /// Number of words.
    pub(crate) completion: u64,
    /// Sleep before each word event.
    pub(crate) token_delay: Duration,
    /// Drop the connection after this many words (only when fewer than `completion`).
    pub(crate) abort_after: Option<u64>,
    /// End the stream with the format's in-stream error after this many words (only when
    /// fewer than `completion`; `abort_after` wins at the same word).
    pub(crate) error_after: Option<u64>,
    /// The completion text (`x-simulator-content`): word 1 carries it all, later words are
    /// empty.
    pub(crate) content: Option<String>,
}

impl Pace {
    /// The text of word `i`: `tok1`, ` tok2`, … or, with `content`, the content for word 1
    /// and nothing for the others.
    pub(crate) fn piece(&self, i: u64) -> String {
        match &self.content {
            Some(text) if i == 1 => text.clone(),
            Some(_) => String::new(),
            None => word_piece(i),
        }
    }
}

/// `data: <json>\n\n`: OpenAI chat/completions chunks.
pub(crate) fn data_event(data: &Value) -> String {
    format!("data: {data}\n\n")
}

/// `event: <name>\ndata: <json>\n\n`: Anthropic and OpenAI Responses events, whose name is
/// also the JSON's `type`.
pub(crate) fn named_event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Head(usize),
    Word(u64),
    Tail(usize),
    Abort,
    Error(usize),
    End,
}

struct Run<S> {
    script: S,
    pace: Pace,
    ledger: Ledger,
    head: Vec<String>,
    tail: Vec<String>,
    error: Vec<String>,
}

impl<S: Script> Run<S> {
    /// The phase after word `i` (0: before the first word).
    fn after_word(&self, i: u64) -> Phase {
        if i >= self.pace.completion {
            Phase::Tail(0)
        } else if self.pace.abort_after == Some(i) {
            Phase::Abort
        } else if self.pace.error_after == Some(i) {
            Phase::Error(0)
        } else {
            Phase::Word(i + 1)
        }
    }

    /// The bytes for `phase` and the next phase; `None` at the end.
    async fn step(&self, phase: Phase) -> Option<(Result<Bytes, std::io::Error>, Phase)> {
        let mut phase = phase;
        loop {
            match phase {
                Phase::Head(k) if k < self.head.len() => {
                    return Some((Ok(Bytes::from(self.head[k].clone())), Phase::Head(k + 1)))
                }
                Phase::Head(_) => phase = self.after_word(0),
                Phase::Word(i) => {
                    if !self.pace.token_delay.is_zero() {
                        tokio::time::sleep(self.pace.token_delay).await;
                    }
                    let event = self.script.word(i, &self.pace.piece(i));
                    self.ledger.add_completion(1);
                    return Some((Ok(Bytes::from(event)), self.after_word(i)));
                }
                Phase::Tail(k) if k < self.tail.len() => {
                    return Some((Ok(Bytes::from(self.tail[k].clone())), Phase::Tail(k + 1)))
                }
                Phase::Tail(_) | Phase::End => return None,
                Phase::Error(k) if k < self.error.len() => {
                    return Some((Ok(Bytes::from(self.error[k].clone())), Phase::Error(k + 1)))
                }
                Phase::Error(_) => return None,
                Phase::Abort => {
                    tokio::time::sleep(ABORT_GRACE).await;
                    let err = std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "stream aborted by x-simulator-abort-after",
                    );
                    return Some((Err(err), Phase::End));
                }
            }
        }
    }
}

/// A `200` streamed response of `content_type` playing `script`.
pub(crate) fn response<S: Script>(
    script: S,
    pace: Pace,
    ledger: Ledger,
    content_type: &'static str,
) -> Response {
    let run = Arc::new(Run {
        head: script.head(),
        tail: script.tail(),
        error: script.error(pace.error_after.unwrap_or(0)),
        script,
        pace,
        ledger,
    });
    let stream = futures_util::stream::unfold(Phase::Head(0), move |phase| {
        let run = Arc::clone(&run);
        async move { run.step(phase).await }
    });
    let mut resp = (StatusCode::OK, Body::from_stream(stream)).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    resp
}
