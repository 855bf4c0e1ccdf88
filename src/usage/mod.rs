//! Token usage in model responses, extracted incrementally from the response body as it passes.
//!
//! Which format applies is decided once per request from the request path ([`Format::from_path`])
//! and the response's `content-type` / `content-encoding` ([`BodyFormat`], [`Encoding`]); the
//! body is never guessed at per byte. Where each API reports usage, per its reference:
//!
//! | format | non-streaming (`application/json`) | streaming (`text/event-stream`) | model |
//! | --- | --- | --- | --- |
//! | OpenAI chat completions, completions, embeddings ([API](https://platform.openai.com/docs/api-reference/chat/object)) | `usage.{prompt_tokens, completion_tokens, total_tokens}`, `usage.prompt_tokens_details.cached_tokens` (cached), `usage.completion_tokens_details.reasoning_tokens` (reasoning) | the chunk with `usage` (`choices: []`, or the last chunk with choices), sent when `stream_options.include_usage` is set | `model` (body, every chunk) |
//! | OpenAI Responses API ([API](https://platform.openai.com/docs/api-reference/responses/object)) | `usage.{input_tokens, output_tokens, total_tokens}`, `usage.input_tokens_details.cached_tokens` (cached), `usage.output_tokens_details.reasoning_tokens` (reasoning) | `response.completed`: `response.usage` (same fields) | `model` (body); `response.model` (`response.created`, `response.completed`, ...) |
//! | Anthropic Messages ([API](https://docs.anthropic.com/en/api/messages), [streaming](https://docs.anthropic.com/en/api/messages-streaming)) | `usage.{input_tokens, output_tokens, cache_creation_input_tokens (cache write), cache_read_input_tokens (cached)}` | `message_start`: `message.usage` (input); `message_delta`: `usage` (`output_tokens` cumulative) | `model` (body); `message_start`: `message.model` |
//! | Gemini `generateContent` / `streamGenerateContent` ([API](https://ai.google.dev/api/generate-content#UsageMetadata)) | `usageMetadata.{promptTokenCount, candidatesTokenCount, thoughtsTokenCount (reasoning), totalTokenCount, cachedContentTokenCount (cached)}` | every chunk's `usageMetadata` (running totals); also a streamed JSON array | `modelVersion` ([`GenerateContentResponse`](https://ai.google.dev/api/generate-content#generatecontentresponse), body and chunks) |
//! | anything else | every location above | every location above | every location above |
//!
//! Anthropic's prompt tokens are `input_tokens + cache_creation_input_tokens +
//! cache_read_input_tokens`; Gemini's completion tokens are `candidatesTokenCount +
//! thoughtsTokenCount`. Custom JSON pointers ([`UsagePaths`]) are tried before the format's own
//! fields. Only the documented locations count: a `"usage"` inside generated content is ignored.
//! A figure counts only when it is a non-negative integer (negative numbers, floats and strings
//! are ignored, never trusted as a discount). All figures are counts of tokens, as the provider
//! reports them; nothing here counts tokens itself.
//!
//! The cached, cache-write and reasoning figures ([`Usage::cached`], [`Usage::cache_write`],
//! [`Usage::reasoning`]) are parts of the prompt or completion, reported beside them and not
//! charged by themselves. One of them that is not a non-negative integer is ignored alone (the
//! object is not distrusted for it, as nothing is charged by it), except Anthropic's cache
//! fields, which are summed into the prompt and distrust the object as any other figure does.
//! The model ([`UsageExtractor::model`]) is read in the same pass as the usage, from the
//! locations of the table's last column, cut to [`MODEL_MAX_BYTES`].
//!
//! An OpenAI stream carries usage only when the request set `stream_options.include_usage`
//! (see [`inject_include_usage`]), in a chunk before `data: [DONE]`; some OpenAI-compatible
//! servers ignore the option and stream no usage at all, which yields `None`.
//!
//! Memory is bounded by `max_bytes`: the whole document for JSON, the largest event for event
//! streams; compressed bodies (`gzip`, `deflate`, `br`) are decompressed on a copy, with the
//! decompressed size bounded the same way.
//!
//! The parts, one concern each: `formats` (the providers' usage objects, [`UsagePaths`],
//! [`read_document`], [`from_json`]), `json` (the typed reader behind them, which skips
//! everything but the usage locations), `sse` (event-stream framing), `decode`
//! ([`Encoding`], decompression, [`readable_accept_encoding`]) and `extractor`
//! ([`BodyFormat`], [`UsageExtractor`], which feeds the body through the others), `withhold`
//! ([`UsageEventWithholder`], which removes the usage event the filter asked for). The
//! request-body rewrite lives in [`crate::request_body`].

mod decode;
mod extractor;
mod formats;
pub(crate) mod json;
mod sse;
mod withhold;

pub use crate::request_body::inject_include_usage;
pub use decode::{readable_accept_encoding, Encoding};
pub use extractor::{BodyFormat, UsageExtractor};
pub(crate) use formats::model_name;
pub use formats::{from_json, read_document, UsagePaths, MODEL_MAX_BYTES};
pub use withhold::{is_usage_event, UsageEventWithholder};

use crate::config::TokenCategory;

/// Token counts a response reports, per category. A `None` figure was absent or invalid (not a
/// non-negative integer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt: Option<u64>,
    /// Completion (output) tokens.
    pub completion: Option<u64>,
    /// Total tokens.
    pub total: Option<u64>,
    /// Prompt tokens read from the provider's prompt cache (part of `prompt`): OpenAI
    /// `prompt_tokens_details.cached_tokens`, Responses `input_tokens_details.cached_tokens`,
    /// Anthropic `cache_read_input_tokens`, Gemini `cachedContentTokenCount`.
    pub cached: Option<u64>,
    /// Prompt tokens written to the provider's prompt cache (part of `prompt`): Anthropic
    /// `cache_creation_input_tokens`.
    pub cache_write: Option<u64>,
    /// Completion tokens spent on reasoning (part of `completion`): OpenAI
    /// `completion_tokens_details.reasoning_tokens`, Responses
    /// `output_tokens_details.reasoning_tokens`, Gemini `thoughtsTokenCount`.
    pub reasoning: Option<u64>,
}

impl Usage {
    /// Tokens spent in `category`. The total falls back to prompt + completion (an absent one
    /// counting 0, saturating at `u64::MAX`); `None` when the response reported none of them,
    /// and for `cost` (not a usage figure: [`crate::cost`] computes it from these).
    pub fn tokens(&self, category: TokenCategory) -> Option<u64> {
        match category {
            TokenCategory::Cost => None,
            TokenCategory::Prompt => self.prompt,
            TokenCategory::Completion => self.completion,
            TokenCategory::Total => self.total.or(match (self.prompt, self.completion) {
                (None, None) => None,
                (p, c) => Some(p.unwrap_or(0).saturating_add(c.unwrap_or(0))),
            }),
        }
    }

    /// Whether no charged figure (prompt, completion, total) was reported: the cached,
    /// cache-write and reasoning figures alone do not make a usage.
    fn is_empty(&self) -> bool {
        self.prompt.is_none() && self.completion.is_none() && self.total.is_none()
    }

    /// Later figures replace earlier ones, each on its own (streams report running totals;
    /// an absent figure keeps the earlier one). A total from an earlier event is dropped when the new event updates prompt or completion without one.
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
        for (old, new) in [
            (&mut self.cached, new.cached),
            (&mut self.cache_write, new.cache_write),
            (&mut self.reasoning, new.reasoning),
        ] {
            if new.is_some() {
                *old = new;
            }
        }
    }
}

/// The API a request speaks, from its path: it decides where a response's usage is read (see
/// the table in the [module documentation](crate::usage)).
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
    /// The format for a request path; the query string, a fragment and trailing `/` are
    /// ignored. Never fails: a path no API matches is [`Format::Unknown`].
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

    /// Whether a request to `path` (query string, fragment and trailing `/` ignored) is an
    /// OpenAI chat completion or completion: the requests that accept
    /// `stream_options.include_usage`
    /// ([API](https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options)).
    /// Embeddings and every other API do not.
    pub fn is_openai_streaming(path: &str) -> bool {
        let path = path
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .trim_end_matches('/');
        path.ends_with("/chat/completions") || path.ends_with("/completions")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
