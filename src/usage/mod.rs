//! Token usage in model responses, extracted incrementally from the response body as it passes.
//!
//! Which format applies is decided once per request from the request path ([`Format::from_path`])
//! and the response's `content-type` / `content-encoding` ([`BodyFormat`], [`Encoding`]); the
//! body is never guessed at per byte. Formats (DESIGN.md §4):
//!
//! | format | non-streaming (`application/json`) | streaming (`text/event-stream`) |
//! | --- | --- | --- |
//! | OpenAI chat completions, completions, embeddings ([API](https://platform.openai.com/docs/api-reference/chat/object)) | `usage.{prompt_tokens, completion_tokens, total_tokens}` | the chunk with `usage` (`choices: []`, or the last chunk with choices), sent when `stream_options.include_usage` is set |
//! | OpenAI Responses API | `usage.{input_tokens, output_tokens, total_tokens}` | `response.completed`: `response.usage` |
//! | Anthropic Messages ([API](https://docs.anthropic.com/en/api/messages)) | `usage.{input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens}` | `message_start`: `message.usage` (input); `message_delta`: `usage.output_tokens` (cumulative) |
//! | Gemini `generateContent` / `streamGenerateContent` | `usageMetadata.{promptTokenCount, candidatesTokenCount, thoughtsTokenCount, totalTokenCount}` | every chunk's `usageMetadata` (running totals); also a streamed JSON array |
//!
//! Anthropic's prompt tokens are `input_tokens + cache_creation_input_tokens +
//! cache_read_input_tokens`; Gemini's completion tokens are `candidatesTokenCount +
//! thoughtsTokenCount`. Custom JSON pointers ([`UsagePaths`]) are tried before the format's own
//! fields. Only the documented locations count: a `"usage"` inside generated content is ignored.
//! A figure counts only when it is a non-negative integer (negative numbers, floats and strings
//! are ignored, never trusted as a discount).
//!
//! Memory is bounded by `max_bytes`: the whole document for JSON, the largest event for event
//! streams; compressed bodies (`gzip`, `deflate`, `br`) are decompressed on a copy, with the
//! decompressed size bounded the same way.

use crate::config::TokenCategory;
use serde_json::Value;
use std::io::Write;

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

    /// Later figures replace earlier ones (streams report running totals). A total from an
    /// earlier event is dropped when the new event updates prompt or completion without one.
    fn merge(&mut self, new: Usage) {
        if new.total.is_some() {
            self.total = new.total;
        } else if new.prompt.is_some() || new.completion.is_some() {
            self.total = None;
        }
        if new.prompt.is_some() {
            self.prompt = new.prompt;
        }
        if new.completion.is_some() {
            self.completion = new.completion;
        }
    }
}

/// The API a request speaks, from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `…/chat/completions`, `…/completions`, `…/embeddings`.
    OpenAi,
    /// `…/responses`.
    Responses,
    /// `…/messages` (Anthropic Messages).
    Anthropic,
    /// `…:generateContent`, `…:streamGenerateContent`.
    Gemini,
    /// Anything else: every known location is tried.
    Unknown,
}

impl Format {
    /// The format for a request path (query string ignored).
    pub fn from_path(path: &str) -> Format {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions")
            || path.ends_with("/completions")
            || path.ends_with("/embeddings")
        {
            Format::OpenAi
        } else if path.ends_with("/responses") {
            Format::Responses
        } else if path.ends_with("/messages") {
            Format::Anthropic
        } else if path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent") {
            Format::Gemini
        } else {
            Format::Unknown
        }
    }

    /// Whether requests of this format accept OpenAI's `stream_options.include_usage`.
    pub fn is_openai_streaming(path: &str) -> bool {
        let path = path
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .trim_end_matches('/');
        path.ends_with("/chat/completions") || path.ends_with("/completions")
    }
}

/// Custom locations of usage figures: JSON pointers (RFC 6901), tried in order, first match
/// wins; tried before the format's own fields.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsagePaths {
    pub prompt: Vec<String>,
    pub completion: Vec<String>,
    pub total: Vec<String>,
    /// The last segment of every pointer, quoted (`"prompt_tokens"`): an event that contains
    /// none of them is not parsed.
    markers: Vec<Vec<u8>>,
}

impl UsagePaths {
    /// Custom paths from lists of JSON pointers. Errors name a pointer that does not start
    /// with `/`.
    pub fn new(
        prompt: Vec<String>,
        completion: Vec<String>,
        total: Vec<String>,
    ) -> Result<UsagePaths, String> {
        let mut markers = Vec::new();
        for p in prompt.iter().chain(&completion).chain(&total) {
            if !p.starts_with('/') {
                return Err(format!(
                    "`{p}` is not a JSON pointer (it must start with `/`)"
                ));
            }
            let last = p
                .rsplit('/')
                .next()
                .unwrap_or("")
                .replace("~1", "/")
                .replace("~0", "~");
            let m = format!("\"{last}\"").into_bytes();
            if !markers.contains(&m) {
                markers.push(m);
            }
        }
        Ok(UsagePaths {
            prompt,
            completion,
            total,
            markers,
        })
    }

    fn is_empty(&self) -> bool {
        self.prompt.is_empty() && self.completion.is_empty() && self.total.is_empty()
    }

    fn read(&self, doc: &Value) -> Usage {
        let first = |ptrs: &[String]| {
            ptrs.iter()
                .find_map(|p| doc.pointer(p).and_then(Value::as_u64))
        };
        Usage {
            prompt: first(&self.prompt),
            completion: first(&self.completion),
            total: first(&self.total),
        }
    }
}

fn sum(values: &[Option<u64>]) -> Option<u64> {
    if values.iter().all(Option::is_none) {
        return None;
    }
    Some(
        values
            .iter()
            .fold(0u64, |acc, v| acc.saturating_add(v.unwrap_or(0))),
    )
}

/// The figures of one usage object, under any of the formats' names. A figure is `Some` only
/// when it is a non-negative integer.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    /// `cache_creation_input_tokens` or `cache_read_input_tokens` is there (whatever its value).
    has_cache_fields: bool,
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    total_token_count: Option<u64>,
    /// A figure was there but not a non-negative integer (negative, float, string, ...): the
    /// whole object is distrusted, so that the valid figures beside it are no discount.
    invalid: bool,
}

impl Figures {
    /// Where the figure named `key` goes (`None`: not a figure).
    fn slot(&mut self, key: typed::Key) -> Option<&mut Option<u64>> {
        use typed::Key;
        Some(match key {
            Key::PromptTokens => &mut self.prompt_tokens,
            Key::CompletionTokens => &mut self.completion_tokens,
            Key::TotalTokens => &mut self.total_tokens,
            Key::InputTokens => &mut self.input_tokens,
            Key::OutputTokens => &mut self.output_tokens,
            Key::CacheCreationInputTokens => {
                self.has_cache_fields = true;
                &mut self.cache_creation_input_tokens
            }
            Key::CacheReadInputTokens => {
                self.has_cache_fields = true;
                &mut self.cache_read_input_tokens
            }
            Key::PromptTokenCount => &mut self.prompt_token_count,
            Key::CandidatesTokenCount => &mut self.candidates_token_count,
            Key::ThoughtsTokenCount => &mut self.thoughts_token_count,
            Key::TotalTokenCount => &mut self.total_token_count,
            _ => return None,
        })
    }

    /// The figures of a usage object (`None`: not an object).
    fn of(v: &Value) -> Option<Figures> {
        let mut f = Figures::default();
        for (k, v) in v.as_object()? {
            if let Some(slot) = f.slot(typed::key(k)) {
                *slot = v.as_u64();
                if slot.is_none() && !v.is_null() {
                    f.invalid = true;
                }
            }
        }
        Some(f)
    }
}

fn openai(usage: Option<&Figures>) -> Usage {
    let Some(u) = usage.filter(|f| !f.invalid) else {
        return Usage::default();
    };
    Usage {
        prompt: u.prompt_tokens.or(u.input_tokens),
        completion: u.completion_tokens.or(u.output_tokens),
        total: u.total_tokens,
    }
}

fn anthropic(usage: Option<&Figures>) -> Usage {
    let Some(u) = usage.filter(|f| !f.invalid) else {
        return Usage::default();
    };
    let input = u.input_tokens;
    Usage {
        // Cache fields only count next to input_tokens (a message_delta may carry output only).
        prompt: input.and_then(|_| {
            sum(&[
                input,
                u.cache_creation_input_tokens,
                u.cache_read_input_tokens,
            ])
        }),
        completion: u.output_tokens,
        total: None,
    }
}

fn gemini(meta: Option<&Figures>) -> Usage {
    let Some(m) = meta.filter(|f| !f.invalid) else {
        return Usage::default();
    };
    Usage {
        prompt: m.prompt_token_count,
        completion: sum(&[m.candidates_token_count, m.thoughts_token_count]),
        total: m.total_token_count,
    }
}

/// The documented usage locations of one JSON document (`None`: absent, or not an object).
#[derive(Debug, Default)]
struct Locations {
    /// `/usage`
    usage: Option<Figures>,
    /// `/usageMetadata`
    usage_metadata: Option<Figures>,
    /// `/response/usage`
    response_usage: Option<Figures>,
    /// `/message/usage`
    message_usage: Option<Figures>,
}

impl Locations {
    fn usage(&self, format: Format) -> Usage {
        let candidates: &[fn(&Locations) -> Usage] = match format {
            Format::OpenAi => &[|d| openai(d.usage.as_ref())],
            Format::Responses => &[
                |d| openai(d.usage.as_ref()),
                |d| openai(d.response_usage.as_ref()),
            ],
            Format::Anthropic => &[
                |d| anthropic(d.usage.as_ref()),
                |d| anthropic(d.message_usage.as_ref()),
            ],
            Format::Gemini => &[|d| gemini(d.usage_metadata.as_ref())],
            Format::Unknown => &[
                |d| {
                    // Anthropic's shape has input/output without a total and with cache fields.
                    if d.usage.as_ref().is_some_and(|u| u.has_cache_fields) {
                        anthropic(d.usage.as_ref())
                    } else {
                        openai(d.usage.as_ref())
                    }
                },
                |d| openai(d.response_usage.as_ref()),
                |d| anthropic(d.message_usage.as_ref()),
                |d| gemini(d.usage_metadata.as_ref()),
            ],
        };
        candidates
            .iter()
            .map(|f| f(self))
            .find(|u| !u.is_empty())
            .unwrap_or_default()
    }
}

/// Typed reading of the usage locations: everything else in a document is skipped by the
/// parser without being built (no `serde_json::Value` of a whole response, no copy of its
/// content). Semantics are those of reading a `Value`: the last of duplicate keys wins, a
/// location that is not an object holds nothing, a figure counts only as a non-negative integer,
/// a document that is not UTF-8 is refused (the callers check). One leniency: a lone surrogate
/// escape (`"\ud800"`) in a skipped string does not make the document unreadable.
mod typed {
    use super::{Figures, Format, Locations, Usage};
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    /// A map key, as one of the names this module reads.
    #[derive(Clone, Copy)]
    pub(super) enum Key {
        PromptTokens,
        CompletionTokens,
        TotalTokens,
        InputTokens,
        OutputTokens,
        CacheCreationInputTokens,
        CacheReadInputTokens,
        PromptTokenCount,
        CandidatesTokenCount,
        ThoughtsTokenCount,
        TotalTokenCount,
        Usage,
        UsageMetadata,
        Response,
        Message,
        Stream,
        StreamOptions,
        IncludeUsage,
        Other,
    }

    /// The name this module reads that `v` is, if any.
    pub(super) fn key(v: &str) -> Key {
        match v {
            "prompt_tokens" => Key::PromptTokens,
            "completion_tokens" => Key::CompletionTokens,
            "total_tokens" => Key::TotalTokens,
            "input_tokens" => Key::InputTokens,
            "output_tokens" => Key::OutputTokens,
            "cache_creation_input_tokens" => Key::CacheCreationInputTokens,
            "cache_read_input_tokens" => Key::CacheReadInputTokens,
            "promptTokenCount" => Key::PromptTokenCount,
            "candidatesTokenCount" => Key::CandidatesTokenCount,
            "thoughtsTokenCount" => Key::ThoughtsTokenCount,
            "totalTokenCount" => Key::TotalTokenCount,
            "usage" => Key::Usage,
            "usageMetadata" => Key::UsageMetadata,
            "response" => Key::Response,
            "message" => Key::Message,
            "stream" => Key::Stream,
            "stream_options" => Key::StreamOptions,
            "include_usage" => Key::IncludeUsage,
            _ => Key::Other,
        }
    }

    struct KeyVisitor;

    impl<'de> Visitor<'de> for KeyVisitor {
        type Value = Key;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E>(self, v: &str) -> Result<Key, E> {
            Ok(key(v))
        }
        fn visit_bytes<E>(self, _: &[u8]) -> Result<Key, E> {
            Ok(Key::Other)
        }
    }

    impl<'de> DeserializeSeed<'de> for KeyVisitor {
        type Value = Key;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
            d.deserialize_identifier(self)
        }
    }

    /// What a request body asks for (see [`Read::StreamRequest`]).
    #[derive(Debug, Default)]
    pub(super) struct Streaming {
        /// An object with `"stream": true` without `stream_options.include_usage: true`.
        pub wants_usage: bool,
        /// It has a `stream_options` key.
        pub has_options: bool,
    }

    /// What to read from a JSON value. One visitor type for every shape, so that the parser is
    /// instantiated once (module size).
    #[derive(Clone, Copy)]
    pub(super) enum Read {
        /// A document: the usage it reports in `format`. With `arrays`, a top-level array is a
        /// streamed JSON array (each element a document, later figures win); otherwise an
        /// array holds no usage.
        Document { format: Format, arrays: bool },
        /// A usage object's figures (`None`: not an object).
        Object,
        /// An object whose `usage` is read (`/response`, `/message`).
        Wrapper,
        /// A figure: `Some` for a non-negative integer.
        Figure,
        /// Whether the value is `true`.
        True,
        /// `stream_options`: whether `include_usage` is `true`.
        StreamOptions,
        /// A request body (`None`: not an object).
        StreamRequest,
    }

    /// What was read, per [`Read`].
    pub(super) enum Out {
        Usage(Usage),
        Figures(Option<Figures>),
        Figure(Option<u64>),
        /// A figure that is not a non-negative integer (null is `Figure(None)`).
        BadFigure,
        Bool(bool),
        Streaming(Option<Streaming>),
    }

    impl Out {
        fn usage(self) -> Usage {
            match self {
                Out::Usage(u) => u,
                _ => Usage::default(),
            }
        }
        fn figures(self) -> Option<Figures> {
            match self {
                Out::Figures(f) => f,
                _ => None,
            }
        }
        fn figure(self) -> Option<u64> {
            match self {
                Out::Figure(f) => f,
                _ => None,
            }
        }
        fn bool(self) -> bool {
            matches!(self, Out::Bool(true))
        }
        pub(super) fn streaming(self) -> Option<Streaming> {
            match self {
                Out::Streaming(s) => s,
                _ => None,
            }
        }
    }

    impl Read {
        /// The result for a value that holds nothing of what is read (a scalar, or a container
        /// of the wrong kind, drained).
        fn nothing(self) -> Out {
            match self {
                Read::Document { .. } => Out::Usage(Usage::default()),
                Read::Object | Read::Wrapper => Out::Figures(None),
                Read::Figure => Out::BadFigure,
                Read::True | Read::StreamOptions => Out::Bool(false),
                Read::StreamRequest => Out::Streaming(None),
            }
        }

        /// The result for `null`.
        fn null(self) -> Out {
            match self {
                Read::Figure => Out::Figure(None),
                other => other.nothing(),
            }
        }
    }

    impl<'de> Visitor<'de> for Read {
        type Value = Out;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Out, E> {
            Ok(match self {
                Read::True => Out::Bool(v),
                other => other.nothing(),
            })
        }
        fn visit_u64<E>(self, v: u64) -> Result<Out, E> {
            Ok(match self {
                Read::Figure => Out::Figure(Some(v)),
                other => other.nothing(),
            })
        }
        fn visit_i64<E>(self, v: i64) -> Result<Out, E> {
            Ok(match self {
                Read::Figure => u64::try_from(v).map_or(Out::BadFigure, |v| Out::Figure(Some(v))),
                other => other.nothing(),
            })
        }
        fn visit_f64<E>(self, _: f64) -> Result<Out, E> {
            Ok(self.nothing())
        }
        fn visit_str<E>(self, _: &str) -> Result<Out, E> {
            Ok(self.nothing())
        }
        fn visit_bytes<E>(self, _: &[u8]) -> Result<Out, E> {
            Ok(self.nothing())
        }
        fn visit_unit<E>(self) -> Result<Out, E> {
            Ok(self.null())
        }
        fn visit_none<E>(self) -> Result<Out, E> {
            Ok(self.null())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Out, A::Error> {
            if let Read::Document {
                format,
                arrays: true,
            } = self
            {
                let mut found = Usage::default();
                let element = Read::Document {
                    format,
                    arrays: false,
                };
                while let Some(u) = seq.next_element_seed(element)? {
                    found.merge(u.usage());
                }
                return Ok(Out::Usage(found));
            }
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(self.nothing())
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Out, A::Error> {
            let mut loc = Locations::default();
            let mut figures = Figures::default();
            let mut wrapped = None;
            let mut flag = false;
            let mut streaming = Streaming::default();
            let mut stream = false;
            while let Some(key) = map.next_key_seed(KeyVisitor)? {
                let read = match (self, key) {
                    (Read::Document { .. }, Key::Usage) => {
                        loc.usage = map.next_value_seed(Read::Object)?.figures();
                        continue;
                    }
                    (Read::Document { .. }, Key::UsageMetadata) => {
                        loc.usage_metadata = map.next_value_seed(Read::Object)?.figures();
                        continue;
                    }
                    (Read::Document { .. }, Key::Response) => {
                        loc.response_usage = map.next_value_seed(Read::Wrapper)?.figures();
                        continue;
                    }
                    (Read::Document { .. }, Key::Message) => {
                        loc.message_usage = map.next_value_seed(Read::Wrapper)?.figures();
                        continue;
                    }
                    (Read::Object, key) => match figures.slot(key) {
                        Some(slot) => {
                            let out = map.next_value_seed(Read::Figure)?;
                            let bad = matches!(out, Out::BadFigure);
                            *slot = out.figure();
                            figures.invalid |= bad;
                            continue;
                        }
                        None => None,
                    },
                    (Read::Wrapper, Key::Usage) => Some(Read::Object),
                    (Read::StreamOptions, Key::IncludeUsage) => Some(Read::True),
                    (Read::StreamRequest, Key::Stream) => {
                        stream = map.next_value_seed(Read::True)?.bool();
                        continue;
                    }
                    (Read::StreamRequest, Key::StreamOptions) => {
                        streaming.has_options = true;
                        flag = map.next_value_seed(Read::StreamOptions)?.bool();
                        continue;
                    }
                    _ => None,
                };
                match read {
                    Some(Read::Object) => wrapped = map.next_value_seed(Read::Object)?.figures(),
                    Some(r) => flag = map.next_value_seed(r)?.bool(),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(match self {
                Read::Document { format, .. } => Out::Usage(loc.usage(format)),
                Read::Object => Out::Figures(Some(figures)),
                Read::Wrapper => Out::Figures(wrapped),
                Read::Figure => Out::BadFigure,
                Read::True => Out::Bool(false),
                Read::StreamOptions => Out::Bool(flag),
                Read::StreamRequest => {
                    streaming.wants_usage = stream && !flag;
                    Out::Streaming(Some(streaming))
                }
            })
        }
    }

    impl<'de> DeserializeSeed<'de> for Read {
        type Value = Out;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Out, D::Error> {
            d.deserialize_any(self)
        }
    }

    /// Reads `text` (one JSON document, nothing after it) as `read` says.
    pub(super) fn read(text: &str, read: Read) -> Option<Out> {
        let mut de = serde_json::Deserializer::from_str(text);
        let out = read.deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(out)
    }

    /// The usage of the document `text` (see [`Read::Document`]).
    pub(super) fn document(text: &str, format: Format, arrays: bool) -> Option<Usage> {
        read(text, Read::Document { format, arrays }).map(Out::usage)
    }
}

/// Reads the usage of one JSON document (a whole response, one streamed event, or one element
/// of a streamed JSON array) in `format`.
pub fn read_document(format: Format, paths: &UsagePaths, doc: &Value) -> Usage {
    if !paths.is_empty() {
        let u = paths.read(doc);
        if !u.is_empty() {
            return u;
        }
    }
    let Some(map) = doc.as_object() else {
        return Usage::default();
    };
    let wrapped = |v: &Value| v.as_object()?.get("usage").and_then(Figures::of);
    Locations {
        usage: map.get("usage").and_then(Figures::of),
        usage_metadata: map.get("usageMetadata").and_then(Figures::of),
        response_usage: map.get("response").and_then(wrapped),
        message_usage: map.get("message").and_then(wrapped),
    }
    .usage(format)
}

/// Reads the usage of the JSON document in `bytes`; `None` when they are not one JSON document.
/// `arrays`: a top-level array is a streamed JSON array (each element a document, later
/// figures win). Without custom paths the document is never built as a `Value`.
fn read_bytes(format: Format, paths: &UsagePaths, bytes: &[u8], arrays: bool) -> Option<Usage> {
    if paths.is_empty() {
        // Skipped strings are not checked for UTF-8 by the parser: check the whole document,
        // so that it is refused as a `Value` would be.
        let text = std::str::from_utf8(bytes).ok()?;
        return typed::document(text, format, arrays);
    }
    let doc: Value = serde_json::from_slice(bytes).ok()?;
    Some(match &doc {
        Value::Array(items) if arrays => {
            let mut found = Usage::default();
            for item in items {
                found.merge(read_document(format, paths, item));
            }
            found
        }
        doc => read_document(format, paths, doc),
    })
}

/// Reads the top-level OpenAI-style `usage` of a JSON document; `None` when there is none.
pub fn from_json(doc: &[u8]) -> Option<Usage> {
    let u = read_bytes(Format::OpenAi, &UsagePaths::default(), doc, false)?;
    (!u.is_empty()).then_some(u)
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// One JSON document (or a JSON array streamed element by element).
    Json,
    /// Server-sent events whose `data:` payloads are JSON.
    EventStream,
    /// Anything else: no usage can be read.
    Other,
}

impl BodyFormat {
    /// The framing for a `content-type` header value.
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

/// A response `content-encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    /// An encoding this filter cannot read: no usage.
    Unsupported,
}

impl Encoding {
    /// The encoding for a `content-encoding` header value (absent: identity).
    pub fn from_header(value: Option<&str>) -> Encoding {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Encoding::Identity,
            Some("gzip") | Some("x-gzip") => Encoding::Gzip,
            Some("deflate") => Encoding::Deflate,
            Some("br") => Encoding::Brotli,
            Some(_) => Encoding::Unsupported,
        }
    }
}

/// The `accept-encoding` to send upstream for a limited request: the client's codings that
/// this filter can decompress (`gzip`, `x-gzip`, `deflate`, `br`, `identity`, with their
/// q-values), or `None` when none is left (the header is then removed: identity).
pub fn readable_accept_encoding(value: &str) -> Option<String> {
    let kept: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|item| {
            let coding = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            matches!(
                coding.as_str(),
                "gzip" | "x-gzip" | "deflate" | "br" | "identity"
            )
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

/// Adds `stream_options.include_usage: true` to an OpenAI request body that asks for
/// `"stream": true` without it. Returns the new body, or `None` when nothing is to change
/// (not JSON, not streaming, usage already requested).
pub fn inject_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    // Most bodies need no rewrite: find out without building the document (its messages).
    let text = std::str::from_utf8(body).ok()?;
    let streaming = typed::read(text, typed::Read::StreamRequest)?.streaming()?;
    if !streaming.wants_usage {
        return None;
    }
    if !streaming.has_options {
        // The usual case: the member goes first, the client's bytes stay as they are.
        let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body.get(open) != Some(&b'{') {
            return None;
        }
        let member = br#""stream_options":{"include_usage":true},"#;
        let mut out = Vec::with_capacity(body.len() + member.len());
        out.extend_from_slice(body.get(..=open)?);
        out.extend_from_slice(member);
        out.extend_from_slice(body.get(open + 1..)?);
        return Some(out);
    }
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let obj = doc.as_object_mut()?;
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let options = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !options.is_object() {
        *options = Value::Object(serde_json::Map::new());
    }
    let options = options.as_object_mut()?;
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    serde_json::to_vec(&doc).ok()
}

/// A sink that keeps what a decoder writes, for the extractor to take.
#[derive(Default)]
struct Sink(Vec<u8>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Decoder {
    Identity,
    Gzip(Box<flate2::write::MultiGzDecoder<Sink>>),
    Deflate(Box<flate2::write::ZlibDecoder<Sink>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Sink>>),
    /// Undecodable: everything is dropped.
    Failed,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Identity => "Identity",
            Decoder::Gzip(_) => "Gzip",
            Decoder::Deflate(_) => "Deflate",
            Decoder::Brotli(_) => "Brotli",
            Decoder::Failed => "Failed",
        })
    }
}

impl Decoder {
    fn new(encoding: Encoding) -> Decoder {
        match encoding {
            Encoding::Identity => Decoder::Identity,
            Encoding::Gzip => Decoder::Gzip(Box::new(flate2::write::MultiGzDecoder::new(
                Sink::default(),
            ))),
            Encoding::Deflate => {
                Decoder::Deflate(Box::new(flate2::write::ZlibDecoder::new(Sink::default())))
            }
            Encoding::Brotli => Decoder::Brotli(Box::new(
                brotli_decompressor::DecompressorWriter::new(Sink::default(), 4096),
            )),
            Encoding::Unsupported => Decoder::Failed,
        }
    }

    /// Decodes `chunk`; returns the decoded bytes (empty when nothing came out or it failed).
    fn decode(&mut self, chunk: &[u8]) -> Vec<u8> {
        let result = match self {
            Decoder::Identity => return chunk.to_vec(),
            Decoder::Failed => return Vec::new(),
            Decoder::Gzip(d) => d
                .write_all(chunk)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(&mut d.get_mut().0)),
            Decoder::Deflate(d) => d
                .write_all(chunk)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(&mut d.get_mut().0)),
            Decoder::Brotli(d) => d
                .write_all(chunk)
                .and_then(|_| d.flush())
                .map(|_| std::mem::take(&mut d.get_mut().0)),
        };
        match result {
            Ok(out) => out,
            Err(_) => {
                *self = Decoder::Failed;
                Vec::new()
            }
        }
    }
}

/// The value of a `data:` line (one leading space removed; a trailing `\r` too), or `None` for
/// another field.
fn data_field(line: &[u8]) -> Option<&[u8]> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    Some(data.strip_prefix(b" ").unwrap_or(data))
}

/// The rest after a blank line (`\n` or `\r\n`) at the start of `bytes`.
fn blank_line(bytes: &[u8]) -> Option<&[u8]> {
    bytes
        .strip_prefix(b"\n")
        .or_else(|| bytes.strip_prefix(b"\r\n"))
}

/// Prebuilt searchers for [`Format::markers`] (built once per VM, not per event).
fn markers(format: Format) -> &'static [memchr::memmem::Finder<'static>] {
    use memchr::memmem::Finder;
    use std::sync::OnceLock;
    static USAGE: OnceLock<[Finder<'static>; 1]> = OnceLock::new();
    static METADATA: OnceLock<[Finder<'static>; 1]> = OnceLock::new();
    static BOTH: OnceLock<[Finder<'static>; 2]> = OnceLock::new();
    match format {
        Format::OpenAi | Format::Responses | Format::Anthropic => {
            USAGE.get_or_init(|| [Finder::new(b"\"usage\"")])
        }
        Format::Gemini => METADATA.get_or_init(|| [Finder::new(b"\"usageMetadata\"")]),
        Format::Unknown => {
            BOTH.get_or_init(|| [Finder::new(b"\"usage\""), Finder::new(b"\"usageMetadata\"")])
        }
    }
}

/// Incremental usage extraction: fed the body chunks as they pass, never holding the client's
/// response.
#[derive(Debug)]
pub struct UsageExtractor {
    format: Format,
    framing: BodyFormat,
    paths: UsagePaths,
    max_bytes: usize,
    decoder: Decoder,
    /// JSON: the document so far; event stream: the incomplete line.
    buffer: Vec<u8>,
    /// Event stream: the `data` of the current event.
    event_data: Vec<u8>,
    /// Something exceeded `max_bytes` and was dropped.
    overflowed: bool,
    /// Decoded body bytes seen, for estimates.
    body_bytes: u64,
    found: Usage,
}

impl UsageExtractor {
    /// A new extractor for a response in `format`, framed as `framing`, encoded as `encoding`;
    /// keeps at most `max_bytes` bytes.
    pub fn new(
        format: Format,
        framing: BodyFormat,
        encoding: Encoding,
        paths: UsagePaths,
        max_bytes: usize,
    ) -> Self {
        UsageExtractor {
            format,
            framing,
            paths,
            max_bytes,
            decoder: Decoder::new(encoding),
            buffer: Vec::new(),
            event_data: Vec::new(),
            overflowed: false,
            body_bytes: 0,
            found: Usage::default(),
        }
    }

    /// Whether any bytes were dropped for exceeding the bound (or failing to decode).
    pub fn overflowed(&self) -> bool {
        self.overflowed || matches!(self.decoder, Decoder::Failed)
    }

    /// Decoded response body bytes seen so far.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// Feeds the next body chunk (as it travels to the client, possibly compressed).
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.framing == BodyFormat::Other {
            self.body_bytes += chunk.len() as u64;
            return;
        }
        let decoded;
        let data: &[u8] = if matches!(self.decoder, Decoder::Identity) {
            chunk
        } else {
            decoded = self.decoder.decode(chunk);
            &decoded
        };
        self.body_bytes += data.len() as u64;
        match self.framing {
            BodyFormat::Other => {}
            BodyFormat::Json => {
                if self.overflowed {
                    return;
                }
                if self.buffer.len() + data.len() > self.max_bytes {
                    self.overflowed = true;
                    self.buffer = Vec::new();
                } else {
                    self.buffer.extend_from_slice(data);
                }
            }
            BodyFormat::EventStream => self.feed_sse(data),
        }
    }

    /// Like [`UsageExtractor::feed`], taking the chunk: a JSON document that arrives in one
    /// chunk is kept as it is, without a copy.
    pub fn feed_vec(&mut self, chunk: Vec<u8>) {
        if self.framing == BodyFormat::Json
            && matches!(self.decoder, Decoder::Identity)
            && self.buffer.is_empty()
            && !self.overflowed
            && chunk.len() <= self.max_bytes
        {
            self.body_bytes += chunk.len() as u64;
            self.buffer = chunk;
            return;
        }
        self.feed(&chunk);
    }

    fn feed_sse(&mut self, mut chunk: &[u8]) {
        while let Some(pos) = memchr::memchr(b'\n', chunk) {
            let (head, rest) = chunk.split_at(pos);
            chunk = rest.get(1..).unwrap_or_default();
            if self.buffer.is_empty() {
                // The common case, `data: {...}` and the blank line that ends the event both in
                // this chunk: the payload is read where it lies, without a copy.
                if self.event_data.is_empty() {
                    if let (Some(data), Some(after)) = (data_field(head), blank_line(chunk)) {
                        self.event(data);
                        chunk = after;
                        continue;
                    }
                }
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
        if let Some(data) = data_field(line) {
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

    fn worth_parsing(&self, data: &[u8]) -> bool {
        markers(self.format).iter().any(|m| m.find(data).is_some())
            || self
                .paths
                .markers
                .iter()
                .any(|m| memchr::memmem::find(data, m).is_some())
    }

    fn dispatch_event(&mut self) {
        let data = std::mem::take(&mut self.event_data);
        self.event(&data);
        let mut data = data;
        data.clear();
        self.event_data = data;
    }

    /// One event's complete `data`.
    fn event(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if data.len() > self.max_bytes {
            self.overflowed = true;
            return;
        }
        if self.worth_parsing(data) {
            if let Some(u) = read_bytes(self.format, &self.paths, data, false) {
                self.found.merge(u);
            }
        }
    }

    /// Ends the body (end of stream, or an abort): returns the usage found, if any.
    pub fn finish(&mut self) -> Option<Usage> {
        match self.framing {
            BodyFormat::Other => {}
            BodyFormat::Json => {
                let doc = std::mem::take(&mut self.buffer);
                if !self.overflowed {
                    // A streamed JSON array (Gemini without alt=sse) carries running totals.
                    if let Some(u) = read_bytes(self.format, &self.paths, &doc, true) {
                        self.found.merge(u);
                    }
                }
            }
            BodyFormat::EventStream => {
                // A last line without its newline, then the event it ends.
                if !self.buffer.is_empty() {
                    let line = std::mem::take(&mut self.buffer);
                    self.sse_line(&line);
                }
                self.dispatch_event();
            }
        }
        (!self.found.is_empty()).then_some(self.found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/samples");

    fn sample(path: &str) -> Option<Vec<u8>> {
        std::fs::read(format!("{SAMPLES}/{path}")).ok()
    }

    fn extract(format: Format, framing: BodyFormat, body: &[u8], cut: usize) -> Option<Usage> {
        let mut x = UsageExtractor::new(
            format,
            framing,
            Encoding::Identity,
            UsagePaths::default(),
            1 << 20,
        );
        x.feed(&body[..cut]);
        x.feed(&body[cut..]);
        x.finish()
    }

    fn u(p: u64, c: u64, t: Option<u64>) -> Option<Usage> {
        Some(Usage {
            prompt: Some(p),
            completion: Some(c),
            total: t,
        })
    }

    #[test]
    fn formats_from_paths() {
        assert_eq!(
            Format::from_path("/v1/chat/completions?x=1"),
            Format::OpenAi
        );
        assert_eq!(Format::from_path("/v1/embeddings"), Format::OpenAi);
        assert_eq!(Format::from_path("/v1/responses"), Format::Responses);
        assert_eq!(Format::from_path("/v1/messages"), Format::Anthropic);
        assert_eq!(
            Format::from_path("/v1beta/models/gemini-pro:streamGenerateContent?alt=sse"),
            Format::Gemini
        );
        assert_eq!(Format::from_path("/other"), Format::Unknown);
        assert!(Format::is_openai_streaming("/v1/completions"));
        assert!(!Format::is_openai_streaming("/v1/embeddings"));
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

    /// The reading of the documented locations before it was typed (a `serde_json::Value` per
    /// document), kept as the oracle of the typed reading.
    mod value_oracle {
        use super::super::{Format, Usage, UsagePaths};
        use serde_json::Value;

        fn count(v: Option<&Value>) -> Option<u64> {
            v.and_then(Value::as_u64)
        }

        /// Every figure present is a non-negative integer or null.
        fn trusted(u: &Value) -> bool {
            [
                "prompt_tokens",
                "completion_tokens",
                "total_tokens",
                "input_tokens",
                "output_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
                "promptTokenCount",
                "candidatesTokenCount",
                "thoughtsTokenCount",
                "totalTokenCount",
            ]
            .iter()
            .all(|k| u.get(*k).is_none_or(|v| v.is_null() || v.as_u64().is_some()))
        }

        fn old_sum(values: &[Option<u64>]) -> Option<u64> {
            if values.iter().all(Option::is_none) {
                return None;
            }
            Some(
                values
                    .iter()
                    .fold(0u64, |acc, v| acc.saturating_add(v.unwrap_or(0))),
            )
        }

        fn openai(usage: Option<&Value>) -> Usage {
            let Some(u) = usage.filter(|u| u.is_object() && trusted(u)) else {
                return Usage::default();
            };
            Usage {
                prompt: count(u.get("prompt_tokens")).or(count(u.get("input_tokens"))),
                completion: count(u.get("completion_tokens")).or(count(u.get("output_tokens"))),
                total: count(u.get("total_tokens")),
            }
        }

        fn anthropic(usage: Option<&Value>) -> Usage {
            let Some(u) = usage.filter(|u| u.is_object() && trusted(u)) else {
                return Usage::default();
            };
            let input = count(u.get("input_tokens"));
            Usage {
                // Cache fields only count next to input_tokens (a message_delta may carry output only).
                prompt: input.and_then(|_| {
                    old_sum(&[
                        input,
                        count(u.get("cache_creation_input_tokens")),
                        count(u.get("cache_read_input_tokens")),
                    ])
                }),
                completion: count(u.get("output_tokens")),
                total: None,
            }
        }

        fn gemini(meta: Option<&Value>) -> Usage {
            let Some(m) = meta.filter(|m| m.is_object() && trusted(m)) else {
                return Usage::default();
            };
            let candidates = count(m.get("candidatesTokenCount"));
            let thoughts = count(m.get("thoughtsTokenCount"));
            Usage {
                prompt: count(m.get("promptTokenCount")),
                completion: old_sum(&[candidates, thoughts]),
                total: count(m.get("totalTokenCount")),
            }
        }

        /// Reads the usage of one JSON document (a whole response, one streamed event, or one element
        /// of a streamed JSON array) in `format`.
        pub fn read_document(format: Format, paths: &UsagePaths, doc: &Value) -> Usage {
            if !paths.is_empty() {
                let u = paths.read(doc);
                if !u.is_empty() {
                    return u;
                }
            }
            let candidates: &[fn(&Value) -> Usage] = match format {
                Format::OpenAi => &[|d| openai(d.get("usage"))],
                Format::Responses => &[
                    |d| openai(d.get("usage")),
                    |d| openai(d.pointer("/response/usage")),
                ],
                Format::Anthropic => &[
                    |d| anthropic(d.get("usage")),
                    |d| anthropic(d.pointer("/message/usage")),
                ],
                Format::Gemini => &[|d| gemini(d.get("usageMetadata"))],
                Format::Unknown => &[
                    |d| {
                        let u = d.get("usage");
                        // Anthropic's shape has input/output without a total and with cache fields.
                        if u.is_some_and(|u| {
                            u.get("cache_read_input_tokens").is_some()
                                || u.get("cache_creation_input_tokens").is_some()
                        }) {
                            anthropic(u)
                        } else {
                            openai(u)
                        }
                    },
                    |d| openai(d.pointer("/response/usage")),
                    |d| anthropic(d.pointer("/message/usage")),
                    |d| gemini(d.get("usageMetadata")),
                ],
            };
            candidates
                .iter()
                .map(|f| f(doc))
                .find(|u| !u.is_empty())
                .unwrap_or_default()
        }
    }

    #[test]
    fn typed_reading_matches_reading_a_value() {
        let docs = [
            r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            r#"{"usage":{"input_tokens":10,"output_tokens":5}}"#,
            r#"{"usage":{"input_tokens":10,"cache_read_input_tokens":2,"cache_creation_input_tokens":null,"output_tokens":5}}"#,
            r#"{"usage":{"input_tokens":1,"cache_read_input_tokens":"x"}}"#,
            r#"{"usage":{"prompt_tokens":-5,"completion_tokens":1.5,"total_tokens":"9"}}"#,
            r#"{"usage":{"prompt_tokens":1e2,"completion_tokens":18446744073709551615,"total_tokens":18446744073709551616}}"#,
            r#"{"usage":{"total_tokens":-0,"prompt_tokens":0}}"#,
            r#"{"usage":null}"#,
            r#"{"usage":[1,2]}"#,
            r#"{"usage":5,"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":3,"thoughtsTokenCount":2,"totalTokenCount":13}}"#,
            r#"{"usage":{"total_tokens":1},"usage":{"prompt_tokens":2}}"#,
            r#"{"usage":{"total_tokens":1,"total_tokens":[3]}}"#,
            r#"{"response":{"usage":{"input_tokens":4,"output_tokens":6,"total_tokens":10}}}"#,
            r#"{"response":{"usage":{"input_tokens":4}},"response":7}"#,
            r#"{"response":[{"usage":{"input_tokens":4}}]}"#,
            r#"{"message":{"usage":{"input_tokens":25,"cache_read_input_tokens":5,"output_tokens":1}}}"#,
            r#"{"type":"message_delta","usage":{"output_tokens":15}}"#,
            r#"{"choices":[{"message":{"content":"{\"usage\":{\"total_tokens\":0}}"}}],"usage":{"total_tokens":42}}"#,
            r#"{"u\u0073age":{"total_tokens":9}}"#,
            r#"{"nested":{"usage":{"total_tokens":9}},"usageMetadata":{"candidatesTokenCount":1}}"#,
            r#"[{"usage":{"total_tokens":1}}]"#,
            r#""usage""#,
            r#"7"#,
            r#"{}"#,
        ];
        let formats = [
            Format::OpenAi,
            Format::Responses,
            Format::Anthropic,
            Format::Gemini,
            Format::Unknown,
        ];
        let none = UsagePaths::default();
        for doc in docs {
            let value: Value = serde_json::from_str(doc).unwrap();
            for f in formats {
                let want = value_oracle::read_document(f, &none, &value);
                assert_eq!(read_document(f, &none, &value), want, "{f:?} {doc}");
                assert_eq!(
                    read_bytes(f, &none, doc.as_bytes(), false),
                    Some(want),
                    "{f:?} {doc}"
                );
            }
        }
        // Not JSON, trailing bytes, invalid UTF-8: nothing, as a Value would give.
        for bad in [
            &b"{\"usage\":{\"total_tokens\":1}} x"[..],
            b"{",
            b"{\"a\":\"\xff\",\"usage\":{\"total_tokens\":1}}",
        ] {
            assert!(serde_json::from_slice::<Value>(bad).is_err());
            assert_eq!(read_bytes(Format::OpenAi, &none, bad, false), None);
        }
    }

    #[test]
    fn json_split_at_every_byte_boundary() {
        let body = br#"{"object":"chat.completion","usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        for cut in 0..=body.len() {
            assert_eq!(
                extract(Format::OpenAi, BodyFormat::Json, body, cut),
                u(12, 30, Some(42)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn json_over_the_bound_yields_nothing() {
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::Json,
            Encoding::Identity,
            UsagePaths::default(),
            10,
        );
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
                assert_eq!(
                    extract(Format::OpenAi, BodyFormat::EventStream, body, cut),
                    u(5, 2, Some(7)),
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn responses_api_stream_reads_response_completed() {
        let body = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\nevent: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":4,\"output_tokens\":6,\"total_tokens\":10}}}\n\n";
        for cut in [0, 17, 100, body.len()] {
            assert_eq!(
                extract(Format::Responses, BodyFormat::EventStream, body, cut),
                u(4, 6, Some(10))
            );
        }
    }

    #[test]
    fn anthropic_non_streaming_and_streaming_with_cache_fields() {
        let body = br#"{"type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":2,"cache_read_input_tokens":3,"output_tokens":7}}"#;
        let got = extract(Format::Anthropic, BodyFormat::Json, body, 5).unwrap();
        assert_eq!(
            (
                got.tokens(TokenCategory::Prompt),
                got.tokens(TokenCategory::Completion)
            ),
            (Some(15), Some(7))
        );
        assert_eq!(got.tokens(TokenCategory::Total), Some(22));
        let stream = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"usage\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
        for cut in 0..=stream.len() {
            let got = extract(
                Format::Anthropic,
                BodyFormat::EventStream,
                stream.as_bytes(),
                cut,
            )
            .unwrap();
            assert_eq!(got.tokens(TokenCategory::Prompt), Some(30), "cut {cut}");
            assert_eq!(got.tokens(TokenCategory::Completion), Some(15));
            assert_eq!(got.tokens(TokenCategory::Total), Some(45));
        }
    }

    #[test]
    fn gemini_json_sse_and_streamed_array() {
        let one = br#"{"candidates":[],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":3,"thoughtsTokenCount":2,"totalTokenCount":13}}"#;
        assert_eq!(
            extract(Format::Gemini, BodyFormat::Json, one, 9),
            u(8, 5, Some(13))
        );
        let sse = "data: {\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1,\"totalTokenCount\":9}}\r\n\r\ndata: {\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":4,\"totalTokenCount\":12}}\r\n\r\n";
        assert_eq!(
            extract(Format::Gemini, BodyFormat::EventStream, sse.as_bytes(), 30),
            u(8, 4, Some(12))
        );
        let array = "[{\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1,\"totalTokenCount\":9}}\n,\r\n{\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":6,\"totalTokenCount\":14}}]";
        assert_eq!(
            extract(Format::Gemini, BodyFormat::Json, array.as_bytes(), 40),
            u(8, 6, Some(14))
        );
    }

    #[test]
    fn unknown_paths_try_every_known_location() {
        assert_eq!(extract(Format::Unknown, BodyFormat::Json, br#"{"usageMetadata":{"promptTokenCount":1,"candidatesTokenCount":2,"totalTokenCount":3}}"#, 3), u(1, 2, Some(3)));
        let a = extract(
            Format::Unknown,
            BodyFormat::Json,
            br#"{"usage":{"input_tokens":1,"cache_read_input_tokens":4,"output_tokens":2}}"#,
            3,
        )
        .unwrap();
        assert_eq!(a.tokens(TokenCategory::Prompt), Some(5));
    }

    #[test]
    fn custom_pointers_come_first_and_filter_events() {
        let paths = UsagePaths::new(
            vec!["/meta/in".into()],
            vec!["/meta/out".into(), "/usage/completion_tokens".into()],
            vec![],
        )
        .unwrap();
        let body = b"data: {\"meta\":{\"in\":7,\"out\":9}}\n\ndata: {\"other\":1}\n\n";
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::EventStream,
            Encoding::Identity,
            paths.clone(),
            1 << 16,
        );
        x.feed(body);
        let got = x.finish().unwrap();
        assert_eq!(
            (got.prompt, got.completion, got.tokens(TokenCategory::Total)),
            (Some(7), Some(9), Some(16))
        );
        assert!(UsagePaths::new(vec!["usage".into()], vec![], vec![]).is_err());
    }

    #[test]
    fn compressed_bodies_are_read_from_a_decompressed_copy() {
        use flate2::write::{GzEncoder, ZlibEncoder};
        let body = br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body).unwrap();
        let gz = gz.finish().unwrap();
        let mut zl = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(body).unwrap();
        let zl = zl.finish().unwrap();
        for (enc, bytes) in [(Encoding::Gzip, gz), (Encoding::Deflate, zl)] {
            for cut in 0..=bytes.len() {
                let mut x = UsageExtractor::new(
                    Format::OpenAi,
                    BodyFormat::Json,
                    enc,
                    UsagePaths::default(),
                    1 << 16,
                );
                x.feed(&bytes[..cut]);
                x.feed(&bytes[cut..]);
                assert_eq!(x.finish(), u(3, 4, Some(7)), "{enc:?} cut {cut}");
                assert_eq!(x.body_bytes(), body.len() as u64);
            }
        }
        // Garbage that claims to be gzip yields nothing, and never panics.
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::Json,
            Encoding::Gzip,
            UsagePaths::default(),
            1 << 16,
        );
        x.feed(b"\x1f\x8b\x08\x00garbage garbage");
        assert_eq!(x.finish(), None);
        assert!(x.overflowed());
    }

    #[test]
    fn a_decompression_bomb_stays_bounded() {
        use flate2::write::GzEncoder;
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![b' '; 8 << 20]).unwrap();
        let gz = gz.finish().unwrap();
        let mut x = UsageExtractor::new(
            Format::OpenAi,
            BodyFormat::Json,
            Encoding::Gzip,
            UsagePaths::default(),
            1 << 20,
        );
        for chunk in gz.chunks(1024) {
            x.feed(chunk);
        }
        assert_eq!(x.finish(), None);
        assert!(x.overflowed());
        assert!(x.buffer.capacity() <= 2 << 20);
    }

    #[test]
    fn real_llama_server_captures() {
        // Real bytes from ../shared/samples (skipped when the folder is not beside the repo).
        if let Some(body) = sample("llama-server/chat.json") {
            assert!(from_json(&body).and_then(|u| u.total).is_some());
        }
        if let Some(body) = sample("llama-server/chat-stream-include-usage.sse") {
            let mut x = UsageExtractor::new(
                Format::OpenAi,
                BodyFormat::EventStream,
                Encoding::Identity,
                UsagePaths::default(),
                1 << 16,
            );
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
            let mut x = UsageExtractor::new(
                Format::OpenAi,
                BodyFormat::EventStream,
                Encoding::Identity,
                UsagePaths::default(),
                1 << 16,
            );
            x.feed(&body);
            assert_eq!(
                x.finish(),
                None,
                "this server sends no usage when streaming"
            );
        }
    }

    #[test]
    fn include_usage_is_injected_only_into_streaming_requests_without_it() {
        // Without stream_options, the member is added first and the client's bytes are kept.
        assert_eq!(
            inject_include_usage(b" \n{ \"messages\": [{\"content\": \"stream\"}], \"stream\" : true }")
                .as_deref(),
            Some(&b" \n{\"stream_options\":{\"include_usage\":true}, \"messages\": [{\"content\": \"stream\"}], \"stream\" : true }"[..])
        );
        // Duplicate keys: the last one counts, as when the body is read as a `Value`.
        assert!(inject_include_usage(br#"{"stream":true,"stream":false}"#).is_none());
        assert!(inject_include_usage(br#"{"stream":false,"stream":true}"#).is_some());
        let out = inject_include_usage(br#"{"model":"m","stream":true,"messages":[]}"#).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
        let out = inject_include_usage(
            br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert_eq!(
            inject_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            None
        );
        assert_eq!(inject_include_usage(br#"{"stream":false}"#), None);
        assert_eq!(inject_include_usage(br#"{"model":"m"}"#), None);
        assert_eq!(inject_include_usage(b"[1,2]"), None);
        assert_eq!(inject_include_usage(b"\xff not json"), None);
    }

    #[test]
    fn accept_encoding_keeps_only_readable_codings() {
        assert_eq!(
            readable_accept_encoding("gzip, deflate, br, zstd"),
            Some("gzip, deflate, br".into())
        );
        assert_eq!(
            readable_accept_encoding("zstd;q=1.0, gzip;q=0.5"),
            Some("gzip;q=0.5".into())
        );
        assert_eq!(readable_accept_encoding("zstd, *"), None);
    }

    #[test]
    fn content_types_and_encodings() {
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
        assert_eq!(Encoding::from_header(Some("GZIP")), Encoding::Gzip);
        assert_eq!(Encoding::from_header(None), Encoding::Identity);
        assert_eq!(Encoding::from_header(Some("zstd")), Encoding::Unsupported);
    }
}
