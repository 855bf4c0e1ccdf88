//! Typed reading of the usage locations: everything else in a document is skipped by the
//! parser without being built (no `serde_json::Value` of a whole response, no copy of its
//! content). Semantics are those of reading a `Value`: the last of duplicate keys wins, a
//! location that is not an object holds nothing, a figure counts only as a non-negative integer,
//! a document that is not UTF-8 is refused (the callers check). One leniency: a lone surrogate
//! escape (`"\ud800"`) in a skipped string does not make the document unreadable.
//!
//! The same reader answers what a request body asks for ([`Read::StreamRequest`]: `stream`,
//! `stream_options.include_usage`), for [`crate::request_body`].

use super::formats::{Figures, Locations};
use super::{Format, Usage};
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
pub(crate) enum Out {
    /// For [`Read::Document`].
    Usage(Usage),
    /// For [`Read::Object`] and [`Read::Wrapper`].
    Figures(Option<Figures>),
    /// For [`Read::Figure`]: a non-negative integer, or `None` for null.
    Figure(Option<u64>),
    /// A figure that is not a non-negative integer (null is `Figure(None)`).
    BadFigure,
    /// For [`Read::True`] and [`Read::StreamOptions`].
    Bool(bool),
    /// For [`Read::StreamRequest`].
    Streaming(Option<Streaming>),
}

/// The accessors give the value of the expected kind, or nothing (`Usage::default()`, `None`,
/// `false`) for another kind.
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

/// Reads `text` (one JSON document, nothing after it but whitespace) as `read` says; `None`
/// when it is not.
pub(crate) fn read(text: &str, read: Read) -> Option<Out> {
    let mut de = serde_json::Deserializer::from_str(text);
    let out = read.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(out)
}

/// The usage of the document `text` (see [`Read::Document`]); `None` when `text` is not one
/// JSON document.
pub(super) fn document(text: &str, format: Format, arrays: bool) -> Option<Usage> {
    read(text, Read::Document { format, arrays }).map(Out::usage)
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
                ..Usage::default()
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
                ..Usage::default()
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
                ..Usage::default()
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
}
