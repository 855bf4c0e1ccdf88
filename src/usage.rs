//! Token usage in model responses, extracted incrementally from the response body as it passes.
//!
//! Formats (DESIGN.md §4):
//! - OpenAI chat completions, completions and embeddings (`application/json`):
//!   top-level `usage.{prompt_tokens, completion_tokens, total_tokens}`
//!   (<https://platform.openai.com/docs/api-reference/chat/object>); the Responses API's
//!   `usage.{input_tokens, output_tokens, total_tokens}` is read the same way.
//! - OpenAI streaming (`text/event-stream`): `data:` events of JSON chunks; usage arrives in a
//!   chunk (with `"choices": []`, or on the last chunk with choices) when the request set
//!   `stream_options.include_usage`. The last usage seen wins.
//!
//! Only the top-level `usage` object counts: a `"usage"` inside generated content is ignored.
//! A figure counts only when it is a non-negative integer; negative numbers, floats and strings
//! are ignored (never trusted as a discount).

use crate::config::TokenCategory;
use serde::Deserialize;

/// Tokens a response reports, per category. A `None` figure was absent or invalid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt: Option<u64>,
    /// Completion (output) tokens.
    pub completion: Option<u64>,
    /// Total tokens.
    pub total: Option<u64>,
}

impl Usage {
    /// Tokens spent in `category`: the total falls back to prompt + completion.
    pub fn tokens(&self, category: TokenCategory) -> Option<u64> {
        match category {
            TokenCategory::Prompt => self.prompt,
            TokenCategory::Completion => self.completion,
            TokenCategory::Total => self.total.or(match (self.prompt, self.completion) {
                (None, None) => None,
                (p, c) => Some(p.unwrap_or(0).saturating_add(c.unwrap_or(0))),
            }),
        }
    }

    fn is_empty(&self) -> bool {
        self.prompt.is_none() && self.completion.is_none() && self.total.is_none()
    }
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    usage: Option<serde_json::Value>,
}

fn count(v: Option<&serde_json::Value>) -> Option<u64> {
    v.and_then(serde_json::Value::as_u64)
}

/// Reads the top-level `usage` of one JSON document (a whole response or one streamed chunk).
/// `None` when the document is not JSON, has no usage object, or none of its figures is valid.
pub fn from_json(doc: &[u8]) -> Option<Usage> {
    let env: Envelope = serde_json::from_slice(doc).ok()?;
    let usage = env.usage?;
    let obj = usage.as_object()?;
    let u = Usage {
        prompt: count(obj.get("prompt_tokens")).or(count(obj.get("input_tokens"))),
        completion: count(obj.get("completion_tokens")).or(count(obj.get("output_tokens"))),
        total: count(obj.get("total_tokens")),
    };
    (!u.is_empty()).then_some(u)
}

/// How a response body is read for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document.
    Json,
    /// Server-sent events whose `data:` payloads are JSON chunks.
    EventStream,
    /// Anything else: no usage can be read.
    Other,
}

impl BodyFormat {
    /// The format for a `content-type` header value.
    pub fn from_content_type(content_type: Option<&str>) -> BodyFormat {
        let Some(ct) = content_type else {
            return BodyFormat::Other;
        };
        let ct = ct.to_ascii_lowercase();
        if ct.starts_with("text/event-stream") {
            BodyFormat::EventStream
        } else if ct.contains("json") {
            BodyFormat::Json
        } else {
            BodyFormat::Other
        }
    }
}

/// Incremental usage extraction: fed the body chunks as they pass, never holding the client's
/// response. Memory is bounded by `max_bytes` (the whole document for JSON, the largest event
/// for event streams).
#[derive(Debug)]
pub struct UsageExtractor {
    format: BodyFormat,
    max_bytes: usize,
    /// JSON: the document so far; event stream: the incomplete line.
    buffer: Vec<u8>,
    /// Event stream: the `data` of the current event.
    event_data: Vec<u8>,
    /// Something exceeded `max_bytes` and was dropped.
    overflowed: bool,
    found: Option<Usage>,
}

impl UsageExtractor {
    /// A new extractor for a body of `format`, keeping at most `max_bytes` bytes.
    pub fn new(format: BodyFormat, max_bytes: usize) -> Self {
        UsageExtractor {
            format,
            max_bytes,
            buffer: Vec::new(),
            event_data: Vec::new(),
            overflowed: false,
            found: None,
        }
    }

    /// Whether any bytes were dropped for exceeding the bound.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    /// Feeds the next body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self.format {
            BodyFormat::Other => {}
            BodyFormat::Json => {
                if self.overflowed {
                    return;
                }
                if self.buffer.len() + chunk.len() > self.max_bytes {
                    self.overflowed = true;
                    self.buffer = Vec::new();
                } else {
                    self.buffer.extend_from_slice(chunk);
                }
            }
            BodyFormat::EventStream => self.feed_sse(chunk),
        }
    }

    fn feed_sse(&mut self, mut chunk: &[u8]) {
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            let (head, rest) = chunk.split_at(pos);
            chunk = &rest[1..];
            if self.buffer.is_empty() {
                self.sse_line(head);
            } else {
                let mut line = std::mem::take(&mut self.buffer);
                if line.len() + head.len() <= self.max_bytes {
                    line.extend_from_slice(head);
                    self.sse_line(&line);
                } else {
                    self.overflowed = true;
                }
                line.clear();
                self.buffer = line;
            }
        }
        if self.buffer.len() + chunk.len() > self.max_bytes {
            self.overflowed = true;
            self.buffer.clear();
        } else {
            self.buffer.extend_from_slice(chunk);
        }
    }

    /// One complete line (without its `\n`; a trailing `\r` is removed here).
    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.dispatch_event();
            return;
        }
        if let Some(data) = line.strip_prefix(b"data:") {
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if !self.event_data.is_empty() {
                self.event_data.push(b'\n');
            }
            if self.event_data.len() + data.len() > self.max_bytes {
                self.overflowed = true;
                self.event_data.clear();
            } else {
                self.event_data.extend_from_slice(data);
            }
        }
        // Other fields (event:, id:, retry:, comments) carry no usage.
    }

    fn dispatch_event(&mut self) {
        if self.event_data.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.event_data);
        // Only chunks that mention usage are parsed as JSON.
        if memchr_usage(&data) {
            if let Some(u) = from_json(&data) {
                self.found = Some(u);
            }
        }
        let mut data = data;
        data.clear();
        self.event_data = data;
    }

    /// Ends the body (end of stream, or an abort): returns the usage found, if any.
    pub fn finish(&mut self) -> Option<Usage> {
        match self.format {
            BodyFormat::Other => None,
            BodyFormat::Json => {
                let doc = std::mem::take(&mut self.buffer);
                if self.overflowed {
                    return None;
                }
                from_json(&doc)
            }
            BodyFormat::EventStream => {
                // A last line without its newline, then the event it ends.
                if !self.buffer.is_empty() {
                    let line = std::mem::take(&mut self.buffer);
                    self.sse_line(&line);
                }
                self.dispatch_event();
                self.found
            }
        }
    }
}

fn memchr_usage(data: &[u8]) -> bool {
    data.windows(7).any(|w| w == b"\"usage\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/samples");

    fn sample(path: &str) -> Option<Vec<u8>> {
        std::fs::read(format!("{SAMPLES}/{path}")).ok()
    }

    #[test]
    fn openai_usage_and_responses_api_usage() {
        let u = from_json(
            br#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
        )
        .unwrap();
        assert_eq!(u.tokens(TokenCategory::Total), Some(7));
        assert_eq!(u.tokens(TokenCategory::Prompt), Some(3));
        let u = from_json(br#"{"usage":{"input_tokens":10,"output_tokens":5}}"#).unwrap();
        assert_eq!(u.tokens(TokenCategory::Total), Some(15));
        assert_eq!(u.tokens(TokenCategory::Completion), Some(5));
    }

    #[test]
    fn invalid_figures_and_fake_usage_are_ignored() {
        assert_eq!(
            from_json(
                br#"{"usage":{"prompt_tokens":-5,"completion_tokens":1.5,"total_tokens":"9"}}"#
            ),
            None
        );
        let fake = br#"{"choices":[{"message":{"content":"{\"usage\":{\"total_tokens\":0}}"}}],"usage":{"total_tokens":42}}"#;
        assert_eq!(from_json(fake).unwrap().total, Some(42));
        assert_eq!(from_json(b"not json"), None);
        assert_eq!(from_json(br#"{"usage":null}"#), None);
    }

    #[test]
    fn json_split_at_every_byte_boundary() {
        let body = br#"{"object":"chat.completion","usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        for cut in 0..=body.len() {
            let mut x = UsageExtractor::new(BodyFormat::Json, 1 << 20);
            x.feed(&body[..cut]);
            x.feed(&body[cut..]);
            assert_eq!(x.finish().and_then(|u| u.total), Some(42), "cut at {cut}");
        }
    }

    #[test]
    fn json_over_the_bound_yields_nothing() {
        let mut x = UsageExtractor::new(BodyFormat::Json, 10);
        x.feed(br#"{"usage":{"total_tokens":42}}"#);
        assert_eq!(x.finish(), None);
        assert!(x.overflowed());
    }

    #[test]
    fn sse_with_usage_chunk_split_at_every_byte_boundary_lf_and_crlf() {
        let lf = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\ndata: [DONE]\n\n";
        let crlf = lf.replace('\n', "\r\n");
        for body in [lf.as_bytes(), crlf.as_bytes()] {
            for cut in 0..=body.len() {
                let mut x = UsageExtractor::new(BodyFormat::EventStream, 4096);
                x.feed(&body[..cut]);
                x.feed(&body[cut..]);
                assert_eq!(x.finish().and_then(|u| u.total), Some(7), "cut at {cut}");
            }
        }
    }

    #[test]
    fn real_llama_server_captures() {
        // Real bytes from ../shared/samples (skipped when the folder is not beside the repo).
        if let Some(body) = sample("llama-server/chat.json") {
            assert!(from_json(&body).and_then(|u| u.total).is_some());
        }
        if let Some(body) = sample("llama-server/chat-stream-include-usage.sse") {
            let mut x = UsageExtractor::new(BodyFormat::EventStream, 1 << 16);
            for chunk in body.chunks(7) {
                x.feed(chunk);
            }
            let u = x.finish().expect("usage in the include_usage stream");
            assert_eq!(
                u.total,
                Some(u.prompt.unwrap_or(0) + u.completion.unwrap_or(0))
            );
        }
        if let Some(body) = sample("llama-cpp-python/chat-stream.sse") {
            let mut x = UsageExtractor::new(BodyFormat::EventStream, 1 << 16);
            x.feed(&body);
            assert_eq!(
                x.finish(),
                None,
                "this server sends no usage when streaming"
            );
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            BodyFormat::from_content_type(Some("application/json; charset=utf-8")),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("text/event-stream")),
            BodyFormat::EventStream
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("text/plain")),
            BodyFormat::Other
        );
        assert_eq!(BodyFormat::from_content_type(None), BodyFormat::Other);
    }
}
