//! Typed reading of the usage locations (and of the model a document names): everything else in a document is skipped by the
//! parser without being built (no `serde_json::Value` of a whole response, no copy of its
//! content). Semantics are those of reading a `Value`: the last of duplicate keys wins, a
//! location that is not an object holds nothing, a figure counts only as a non-negative integer,
//! a document that is not UTF-8 is refused (the callers check). One leniency: a lone surrogate
//! escape (`"\ud800"`) in a skipped string does not make the document unreadable.
//!
//! The same reader answers what a request body asks for ([`Read::StreamRequest`]: `stream`,
//! `stream_options.include_usage`), for [`crate::request_body`].

use super::formats::{model_name, Figures, Locations, Report};
use super::Format;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// A map key, as one of the names this module reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key {
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
    CachedContentTokenCount,
    PromptTokensDetails,
    CompletionTokensDetails,
    InputTokensDetails,
    OutputTokensDetails,
    CachedTokens,
    ReasoningTokens,
    Model,
    ModelVersion,
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
        "cachedContentTokenCount" => Key::CachedContentTokenCount,
        "prompt_tokens_details" => Key::PromptTokensDetails,
        "completion_tokens_details" => Key::CompletionTokensDetails,
        "input_tokens_details" => Key::InputTokensDetails,
        "output_tokens_details" => Key::OutputTokensDetails,
        "cached_tokens" => Key::CachedTokens,
        "reasoning_tokens" => Key::ReasoningTokens,
        "model" => Key::Model,
        "modelVersion" => Key::ModelVersion,
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

/// Reads a map key as a [`Key`], without keeping the string.
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
pub(crate) struct Streaming {
    /// An object with `"stream": true` without `stream_options.include_usage: true`.
    pub wants_usage: bool,
    /// It has a `stream_options` key.
    pub has_options: bool,
}

/// What to read from a JSON value. One visitor type for every shape, so that the parser is
/// instantiated once (module size).
#[derive(Clone, Copy)]
pub(crate) enum Read {
    /// A document: the usage it reports in `format`, and with `model` the model it names.
    /// With `arrays`, a top-level array is a streamed JSON array (each element a document,
    /// later figures win, the first model named counts); otherwise an array holds no usage.
    Document {
        format: Format,
        arrays: bool,
        model: bool,
    },
    /// A usage object's figures (`None`: not an object).
    Object,
    /// An object whose `usage` is read (`/response`, `/message`), and with `model` its `model`.
    Wrapper { model: bool },
    /// A breakdown object (`prompt_tokens_details`, ...): its figure under `figure`, `None`
    /// unless a non-negative integer.
    Detail { figure: Key },
    /// A figure: `Some` for a non-negative integer.
    Figure,
    /// A model name: a string, cut to [`super::MODEL_MAX_BYTES`].
    Name,
    /// Whether the value is `true`.
    True,
    /// `stream_options`: whether `include_usage` is `true`.
    StreamOptions,
    /// A request body (`None`: not an object).
    StreamRequest,
}

/// What was read, per [`Read`].
pub(crate) enum Out {
    /// For [`Read::Document`].
    Report(Report),
    /// For [`Read::Object`].
    Figures(Option<Figures>),
    /// For [`Read::Wrapper`]: its usage's figures and its model.
    Wrapped(Option<Figures>, Option<String>),
    /// For [`Read::Figure`]: a non-negative integer, or `None` for null; for
    /// [`Read::Detail`], its figure.
    Figure(Option<u64>),
    /// For [`Read::Name`].
    Name(Option<String>),
    /// A figure that is not a non-negative integer (null is `Figure(None)`).
    BadFigure,
    /// For [`Read::True`] and [`Read::StreamOptions`].
    Bool(bool),
    /// For [`Read::StreamRequest`].
    Streaming(Option<Streaming>),
}

/// The accessors give the value of the expected kind, or nothing (`Report::default()`,
/// `None`, `false`) for another kind.
impl Out {
    fn report(self) -> Report {
        match self {
            Out::Report(r) => r,
            _ => Report::default(),
        }
    }
    fn figures(self) -> Option<Figures> {
        match self {
            Out::Figures(f) => f,
            _ => None,
        }
    }
    fn wrapped(self) -> (Option<Figures>, Option<String>) {
        match self {
            Out::Wrapped(f, m) => (f, m),
            _ => (None, None),
        }
    }
    fn name(self) -> Option<String> {
        match self {
            Out::Name(n) => n,
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
    /// What a request body asks for; `None` when it is not an object.
    pub(crate) fn streaming(self) -> Option<Streaming> {
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
            Read::Document { .. } => Out::Report(Report::default()),
            Read::Object => Out::Figures(None),
            Read::Wrapper { .. } => Out::Wrapped(None, None),
            Read::Detail { .. } => Out::Figure(None),
            Read::Figure => Out::BadFigure,
            Read::Name => Out::Name(None),
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
    fn visit_str<E>(self, v: &str) -> Result<Out, E> {
        Ok(match self {
            Read::Name => Out::Name(model_name(v)),
            other => other.nothing(),
        })
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
            model,
        } = self
        {
            let mut found = Report::default();
            loop {
                let element = Read::Document {
                    format,
                    arrays: false,
                    model: model && found.model.is_none(),
                };
                let Some(r) = seq.next_element_seed(element)? else {
                    break;
                };
                found.merge(r.report());
            }
            return Ok(Out::Report(found));
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.nothing())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Out, A::Error> {
        let mut loc = Locations::default();
        let mut figures = Figures::default();
        let mut wrapped = None;
        let mut name = None;
        let mut detail = None;
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
                (Read::Document { model, .. }, Key::Response) => {
                    (loc.response_usage, loc.response_model) =
                        map.next_value_seed(Read::Wrapper { model })?.wrapped();
                    continue;
                }
                (Read::Document { model, .. }, Key::Message) => {
                    (loc.message_usage, loc.message_model) =
                        map.next_value_seed(Read::Wrapper { model })?.wrapped();
                    continue;
                }
                (Read::Document { model: true, .. }, Key::Model) => {
                    loc.model = map.next_value_seed(Read::Name)?.name();
                    continue;
                }
                (Read::Document { model: true, .. }, Key::ModelVersion) => {
                    loc.model_version = map.next_value_seed(Read::Name)?.name();
                    continue;
                }
                (Read::Object, key) => {
                    if let Some(slot) = figures.slot(key) {
                        let out = map.next_value_seed(Read::Figure)?;
                        let bad = matches!(out, Out::BadFigure);
                        *slot = out.figure();
                        figures.invalid |= bad;
                        continue;
                    }
                    // Reported-only figures: one that is not a non-negative integer is ignored
                    // alone.
                    if let Some(slot) = figures.reported_slot(key) {
                        *slot = map.next_value_seed(Read::Figure)?.figure();
                        continue;
                    }
                    if let Some((slot, figure)) = figures.detail_slot(key) {
                        *slot = map.next_value_seed(Read::Detail { figure })?.figure();
                        continue;
                    }
                    None
                }
                (Read::Wrapper { .. }, Key::Usage) => {
                    wrapped = map.next_value_seed(Read::Object)?.figures();
                    continue;
                }
                (Read::Wrapper { model: true }, Key::Model) => {
                    name = map.next_value_seed(Read::Name)?.name();
                    continue;
                }
                (Read::Detail { figure }, key) if key == figure => {
                    detail = map.next_value_seed(Read::Figure)?.figure();
                    continue;
                }
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
                Some(r) => flag = map.next_value_seed(r)?.bool(),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match self {
            Read::Document { format, .. } => Out::Report(loc.report(format)),
            Read::Object => Out::Figures(Some(figures)),
            Read::Wrapper { .. } => Out::Wrapped(wrapped, name),
            Read::Detail { .. } => Out::Figure(detail),
            Read::Figure => Out::BadFigure,
            Read::Name => Out::Name(None),
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

/// Reads `text` (one JSON document, nothing after it but whitespace) as `read` says; `None`
/// when it is not.
pub(crate) fn read(text: &str, read: Read) -> Option<Out> {
    let mut de = serde_json::Deserializer::from_str(text);
    let out = read.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(out)
}

/// The usage of the document `text`, and with `model` the model it names (see
/// [`Read::Document`]); `None` when `text` is not one JSON document.
pub(super) fn document(text: &str, format: Format, arrays: bool, model: bool) -> Option<Report> {
    read(
        text,
        Read::Document {
            format,
            arrays,
            model,
        },
    )
    .map(Out::report)
}

#[cfg(test)]
mod tests {
    use crate::usage::formats::{read_bytes, read_document};
    use crate::usage::{Format, UsagePaths};
    use serde_json::Value;

    /// The reading of the documented locations before it was typed (a `serde_json::Value` per
    /// document), kept as the oracle of the typed reading.
    mod value_oracle {
        use crate::usage::{Format, Usage, UsagePaths};
        use serde_json::Value;

        fn count(v: Option<&Value>) -> Option<u64> {
            v.and_then(Value::as_u64)
        }

        /// A reported-only figure of a breakdown object.
        fn detail(u: &Value, pointer: &str) -> Option<u64> {
            count(u.pointer(pointer))
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
            .all(|k| {
                u.get(*k)
                    .is_none_or(|v| v.is_null() || v.as_u64().is_some())
            })
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
                cached: detail(u, "/prompt_tokens_details/cached_tokens")
                    .or(detail(u, "/input_tokens_details/cached_tokens")),
                cache_write: None,
                reasoning: detail(u, "/completion_tokens_details/reasoning_tokens")
                    .or(detail(u, "/output_tokens_details/reasoning_tokens")),
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
                cached: count(u.get("cache_read_input_tokens")),
                cache_write: count(u.get("cache_creation_input_tokens")),
                reasoning: None,
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
                cached: count(m.get("cachedContentTokenCount")),
                cache_write: None,
                reasoning: thoughts,
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
            // The reported-only figures, invalid ones ignored alone, and models.
            r#"{"model":"gpt-4o","usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":2}}}"#,
            r#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":-4},"completion_tokens_details":{"reasoning_tokens":"2"}}}"#,
            r#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":1.5},"completion_tokens_details":[1]}}"#,
            r#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4},"prompt_tokens_details":null}}"#,
            r#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4,"cached_tokens":5}}}"#,
            r#"{"usage":{"prompt_tokens":9,"completion_tokens_details":{"cached_tokens":4},"prompt_tokens_details":{"reasoning_tokens":4}}}"#,
            r#"{"usage":{"prompt_tokens":9,"cached_tokens":"x","reasoning_tokens":-1}}"#,
            r#"{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":1},"input_tokens_details":{"cached_tokens":2}}}"#,
            r#"{"model":"o3","usage":{"input_tokens":9,"output_tokens":3,"total_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens_details":{"reasoning_tokens":2}}}"#,
            r#"{"type":"response.completed","response":{"model":"o3","usage":{"input_tokens":9,"output_tokens":3,"total_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens_details":{"reasoning_tokens":2}}}}"#,
            r#"{"type":"message_start","message":{"model":"claude","usage":{"input_tokens":5,"cache_creation_input_tokens":7,"cache_read_input_tokens":11,"output_tokens":1}}}"#,
            r#"{"model":"claude","usage":{"input_tokens":5,"cache_creation_input_tokens":-7,"output_tokens":1}}"#,
            r#"{"modelVersion":"gemini-2.5-flash","usageMetadata":{"promptTokenCount":8,"cachedContentTokenCount":6,"candidatesTokenCount":3,"thoughtsTokenCount":2,"totalTokenCount":13}}"#,
            r#"{"usageMetadata":{"promptTokenCount":8,"cachedContentTokenCount":-6,"candidatesTokenCount":3}}"#,
            r#"{"usageMetadata":{"promptTokenCount":8,"cachedContentTokenCount":"6"}}"#,
            r#"{"model":7,"modelVersion":["x"],"response":{"model":null},"message":{"model":{"a":1}}}"#,
            r#"{"model":"","response":{"model":"r"},"message":{"model":"m"},"modelVersion":"v"}"#,
            r#"{"model":"a","model":"b"}"#,
        ];
        let formats = [
            Format::OpenAi,
            Format::Responses,
            Format::Anthropic,
            Format::Gemini,
            Format::Unknown,
        ];
        let none = UsagePaths::default();
        // Custom paths that never match: the document is read as a `Value`.
        let never = UsagePaths::new(vec!["/never".into()], vec![], vec![]).unwrap();
        for doc in docs {
            let value: Value = serde_json::from_str(doc).unwrap();
            for f in formats {
                let want = value_oracle::read_document(f, &none, &value);
                assert_eq!(read_document(f, &none, &value), want, "{f:?} {doc}");
                let typed = read_bytes(f, &none, doc.as_bytes(), false, true).unwrap();
                assert_eq!(typed.usage, want, "{f:?} {doc}");
                let as_value = read_bytes(f, &never, doc.as_bytes(), false, true);
                assert_eq!(as_value.as_ref(), Some(&typed), "{f:?} {doc}");
                let without_model = read_bytes(f, &none, doc.as_bytes(), false, false).unwrap();
                assert_eq!((without_model.usage, without_model.model), (want, None));
            }
        }
        // Not JSON, trailing bytes, invalid UTF-8: nothing, as a Value would give.
        for bad in [
            &b"{\"usage\":{\"total_tokens\":1}} x"[..],
            b"{",
            b"{\"a\":\"\xff\",\"usage\":{\"total_tokens\":1}}",
        ] {
            assert!(serde_json::from_slice::<Value>(bad).is_err());
            assert_eq!(read_bytes(Format::OpenAi, &none, bad, false, true), None);
        }
    }

    #[test]
    fn models_per_format_and_bounded() {
        let none = UsagePaths::default();
        let model = |f: Format, doc: &str| {
            read_bytes(f, &none, doc.as_bytes(), true, true).and_then(|r| r.model)
        };
        let all =
            r#"{"model":"m","response":{"model":"r"},"message":{"model":"a"},"modelVersion":"g"}"#;
        assert_eq!(model(Format::OpenAi, all).as_deref(), Some("m"));
        assert_eq!(model(Format::Gemini, all).as_deref(), Some("g"));
        let wrapped = r#"{"response":{"model":"r"},"message":{"model":"a"},"modelVersion":"g"}"#;
        assert_eq!(model(Format::OpenAi, wrapped), None);
        assert_eq!(model(Format::Responses, wrapped).as_deref(), Some("r"));
        assert_eq!(model(Format::Anthropic, wrapped).as_deref(), Some("a"));
        assert_eq!(model(Format::Unknown, wrapped).as_deref(), Some("r"));
        assert_eq!(
            model(Format::Unknown, r#"{"modelVersion":"g"}"#).as_deref(),
            Some("g")
        );
        // A streamed JSON array: the first element that names one.
        assert_eq!(
            model(
                Format::Gemini,
                r#"[{"a":1},{"modelVersion":"v1"},{"modelVersion":"v2"}]"#
            )
            .as_deref(),
            Some("v1")
        );
        // Cut to MODEL_MAX_BYTES at a character boundary, whether typed or as a Value.
        let never = UsagePaths::new(vec!["/never".into()], vec![], vec![]).unwrap();
        let long = format!(r#"{{"model":"{}"}}"#, "é".repeat(200));
        for paths in [&none, &never] {
            let got = read_bytes(Format::OpenAi, paths, long.as_bytes(), false, true)
                .and_then(|r| r.model)
                .unwrap();
            assert_eq!(got, "é".repeat(128));
            assert_eq!(got.len(), crate::usage::MODEL_MAX_BYTES);
        }
        let odd = format!(r#"{{"model":"a{}"}}"#, "é".repeat(200));
        let got = model(Format::OpenAi, &odd).unwrap();
        assert_eq!(got.len(), crate::usage::MODEL_MAX_BYTES - 1);
        // Escaped strings are read as text.
        assert_eq!(
            model(Format::OpenAi, r#"{"model":"a\/b\u00e9"}"#).as_deref(),
            Some("a/bé")
        );
    }
}
