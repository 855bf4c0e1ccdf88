//! What a request declares about its own size, read from its JSON body before the upstream
//! answers: a prompt estimate from the text it carries and the completion maximum it asks for;
//! and the text estimate of a body as it streams by ([`TextCounter`]), which the fallback
//! charges a response without usage.
//!
//! - Text into tokens, the one rule ([`WORD_CHARS_PER_TOKEN`], [`tokens_of_word`]): each
//!   word (a run of characters other than ASCII whitespace inside one text value) costs
//!   ceil(characters / 5) tokens, so every word costs at least one.
//! - Which text: the JSON string values under the keys of [`TextKeys`] (a string, or the
//!   strings of a list), at any depth up to [`MAX_DEPTH`]; never keys, ids, roles, model
//!   names, image or audio data. Request: OpenAI's `messages[].content` (a string, or parts
//!   with `text`), `prompt` and `input` (strings or lists of strings; Responses' input items
//!   with `content`), `instructions`; Anthropic's `system` and `messages[].content` blocks;
//!   Gemini's `contents[].parts[].text` and `systemInstruction.parts[].text`.
//! - Completion: the declared maximum, OpenAI chat `max_completion_tokens` or `max_tokens`,
//!   completions `max_tokens`, Responses `max_output_tokens`, Anthropic `max_tokens`, Gemini
//!   `generationConfig.maxOutputTokens`; times the number of choices asked for (`n`,
//!   Gemini's `generationConfig.candidateCount`). Embeddings generate nothing (0).

mod text;

pub use text::TextCounter;

use crate::config::TokenCategory;
use serde_json::Value;

/// Characters of a word per token: a word of `n` characters costs ceil(`n` / 5) tokens
/// ([`tokens_of_word`]), one token for a word of 1 to 5 characters, two for 6 to 10, ...
///
/// Why 5: GPT-style tokenizers average about 4 characters of English per token counting the
/// spaces between words ("one token generally corresponds to ~4 characters of text", OpenAI),
/// and an English word is about one token, a long or rare one a few. Measured against real
/// usage (the unit tests `real_*` and `simulator_*` in `text`'s tests, and README's table),
/// ceil(n / 5) per word gave 1.05 to 1.21 times the reported completion tokens of real
/// llama.cpp answers (0.73 for one 11-token answer of 6 words) and 1.0 for the simulator,
/// which counts words; ceil(n / 4) gave 1.05 to 1.21 and 1.55 to 1.9. Text without spaces
/// (Chinese, Japanese, long code lines) is underestimated: a run of 20 characters costs 4.
pub const WORD_CHARS_PER_TOKEN: u64 = 5;

/// Tokens of one word of `chars` characters: ceil(`chars` / [`WORD_CHARS_PER_TOKEN`]); 0 for
/// no characters.
pub fn tokens_of_word(chars: u64) -> u64 {
    chars.div_ceil(WORD_CHARS_PER_TOKEN)
}

/// Tokens of `text` by the rule of [`WORD_CHARS_PER_TOKEN`]: the sum over its words
/// (separated by ASCII whitespace: space, tab, `\n`, `\r`) of [`tokens_of_word`] of their
/// characters (Unicode scalar values, not bytes).
pub fn tokens_of_text(text: &str) -> u64 {
    text.split([' ', '\t', '\n', '\r'])
        .map(|w| tokens_of_word(w.chars().count() as u64))
        .fold(0u64, u64::saturating_add)
}

/// Which JSON keys carry text, in a body of one side and framing. One definition, used by
/// [`TextCounter`] on a streamed body and by [`RequestBound::of_request`] on a parsed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextKeys {
    /// A request body: [`TextKeys::REQUEST`].
    Request,
    /// A response body (JSON, or an event stream other than the Responses API's):
    /// [`TextKeys::RESPONSE`].
    Response,
    /// A Responses API event stream: [`TextKeys::RESPONSES_STREAM`]. Its `.done` events and
    /// `response.completed` repeat the whole text under `text`, `arguments` and `content`; the
    /// deltas carry it once.
    ResponsesStream,
}

impl TextKeys {
    /// Request keys: `messages[].content`, `prompt`, `input`, `instructions`, `system`, and the
    /// `text` of content parts (OpenAI, Anthropic, Gemini `parts`).
    pub const REQUEST: &'static [&'static str] = &[
        "content",
        "text",
        "prompt",
        "input",
        "instructions",
        "system",
    ];
    /// Response keys: OpenAI chat `message.content` / `delta.content`, `reasoning_content`,
    /// `reasoning`, `refusal`, tool calls' `arguments`; completions' `text`; Responses'
    /// output `text`; Anthropic's `content[].text`, `delta.text`, `partial_json`, `thinking`;
    /// Gemini's `parts[].text`; a `delta` that is a string (Responses' delta events).
    pub const RESPONSE: &'static [&'static str] = &[
        "content",
        "text",
        "delta",
        "reasoning_content",
        "reasoning",
        "refusal",
        "arguments",
        "partial_json",
        "thinking",
    ];
    /// Responses API stream keys: the `delta` of `response.output_text.delta` (and of the
    /// other delta events: reasoning, function-call arguments).
    pub const RESPONSES_STREAM: &'static [&'static str] = &["delta"];

    /// The keys.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            TextKeys::Request => TextKeys::REQUEST,
            TextKeys::Response => TextKeys::RESPONSE,
            TextKeys::ResponsesStream => TextKeys::RESPONSES_STREAM,
        }
    }

    /// Whether `key` (its bytes, unescaped) carries text.
    pub fn is_text(self, key: &[u8]) -> bool {
        self.keys().iter().any(|k| k.as_bytes() == key)
    }
}

/// Containers nested deeper than this (the top-level object is depth 1) hold no text that
/// counts: a body cannot make the count expensive, and the two counts agree.
pub const MAX_DEPTH: u32 = 32;

/// What a request body says about its size, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestBound {
    /// Estimated prompt tokens (from the text the request carries).
    pub prompt: u64,
    /// The most completion tokens the request may generate, when it declares it (or when the
    /// API generates none, as embeddings).
    pub completion: Option<u64>,
}

impl RequestBound {
    /// The bound's tokens in `category`: the prompt estimate, the completion maximum (or
    /// `undeclared_completion` when the request declares none), or their sum for `total` (and
    /// for `cost`, whose bound is priced from these figures: [`crate::cost::CostUsage::bound`]).
    pub fn tokens(self, category: TokenCategory, undeclared_completion: u64) -> u64 {
        let completion = self.completion.unwrap_or(undeclared_completion);
        match category {
            TokenCategory::Prompt => self.prompt,
            TokenCategory::Completion => completion,
            TokenCategory::Total | TokenCategory::Cost => self.prompt.saturating_add(completion),
        }
    }

    /// Reads `body` (the request's JSON) sent to `path`. The prompt estimate is
    /// [`text_tokens`] of the body with [`TextKeys::Request`]: what a [`TextCounter`] fed the
    /// body's bytes counts.
    pub fn of_request(path: &str, body: &Value) -> RequestBound {
        let embeddings = path
            .split(['?', '#'])
            .next()
            .unwrap_or("")
            .trim_end_matches('/')
            .ends_with("/embeddings");
        let completion = if embeddings {
            Some(0)
        } else {
            declared_completion(body)
        };
        RequestBound {
            prompt: text_tokens(body, TextKeys::Request),
            completion,
        }
    }
}

/// Tokens of the text in a parsed JSON `body` under `keys`: the strings a [`TextCounter`]
/// counts in its bytes, by the rule of [`tokens_of_text`].
pub fn text_tokens(body: &Value, keys: TextKeys) -> u64 {
    walk(body, keys, 1)
}

/// Tokens under `v`, a value at container depth `depth` (when it is an object or an array).
fn walk(v: &Value, keys: TextKeys, depth: u32) -> u64 {
    if depth > MAX_DEPTH {
        return 0;
    }
    let mut tokens = 0u64;
    match v {
        Value::Object(map) => {
            for (key, value) in map {
                let text = keys.is_text(key.as_bytes());
                let n = match value {
                    Value::String(s) if text => tokens_of_text(s),
                    Value::Array(items) if text && depth < MAX_DEPTH => items
                        .iter()
                        .map(|i| match i {
                            Value::String(s) => tokens_of_text(s),
                            other => walk(other, keys, depth + 2),
                        })
                        .fold(0u64, u64::saturating_add),
                    other => walk(other, keys, depth + 1),
                };
                tokens = tokens.saturating_add(n);
            }
        }
        Value::Array(items) => {
            for i in items {
                tokens = tokens.saturating_add(walk(i, keys, depth + 1));
            }
        }
        _ => {}
    }
    tokens
}

/// The declared completion maximum, times the choices asked for.
fn declared_completion(body: &Value) -> Option<u64> {
    let config = body.get("generationConfig");
    let max = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .or_else(|| {
            config
                .and_then(|c| c.get("maxOutputTokens"))
                .and_then(Value::as_u64)
        })?;
    let choices = body
        .get("n")
        .and_then(Value::as_u64)
        .or_else(|| {
            config
                .and_then(|c| c.get("candidateCount"))
                .and_then(Value::as_u64)
        })
        .unwrap_or(1)
        .max(1);
    Some(max.saturating_mul(choices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bound(path: &str, body: Value) -> RequestBound {
        RequestBound::of_request(path, &body)
    }

    #[test]
    fn openai_chat_counts_message_text_not_json_and_reads_max_tokens() {
        let b = bound(
            "/v1/chat/completions",
            json!({"model": "m", "max_tokens": 100, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "Say hello"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAAAAAAAAAAAAAAAAAAAAAA"}}
                ]}
            ]}),
        );
        // "Be" 1 + "brief." 2 + "Say" 1 + "hello" 1 = 5 tokens; roles, types and the image are
        // not text.
        assert_eq!(
            b,
            RequestBound {
                prompt: 5,
                completion: Some(100)
            }
        );
    }

    #[test]
    fn max_completion_tokens_wins_and_n_multiplies() {
        let b = bound(
            "/v1/chat/completions",
            json!({"max_completion_tokens": 30, "max_tokens": 999, "n": 3, "messages": []}),
        );
        assert_eq!(b.completion, Some(90));
    }

    #[test]
    fn completions_responses_anthropic_and_gemini_declare_their_maximum() {
        assert_eq!(
            bound(
                "/v1/completions",
                json!({"prompt": ["abcd", "efgh"], "max_tokens": 7})
            ),
            RequestBound {
                prompt: 2,
                completion: Some(7)
            }
        );
        assert_eq!(
            bound(
                "/v1/responses",
                json!({"instructions": "abcd", "input": [{"role": "user", "content": [{"type": "input_text", "text": "efghijkl"}]}], "max_output_tokens": 50})
            ),
            RequestBound {
                prompt: 3,
                completion: Some(50)
            }
        );
        assert_eq!(
            bound(
                "/v1/messages",
                json!({"system": [{"type": "text", "text": "abcd"}], "messages": [{"role": "user", "content": "efgh"}], "max_tokens": 64})
            ),
            RequestBound {
                prompt: 2,
                completion: Some(64)
            }
        );
        assert_eq!(
            bound(
                "/v1beta/models/g:generateContent",
                json!({"systemInstruction": {"parts": [{"text": "abcd"}]}, "contents": [{"parts": [{"text": "efgh"}, {"inlineData": {"data": "QUFB"}}]}],
                       "generationConfig": {"maxOutputTokens": 40, "candidateCount": 2}})
            ),
            RequestBound {
                prompt: 2,
                completion: Some(80)
            }
        );
    }

    #[test]
    fn embeddings_generate_nothing_and_undeclared_maximum_is_none() {
        assert_eq!(
            bound("/v1/embeddings", json!({"input": "abcdefgh"})),
            RequestBound {
                prompt: 2,
                completion: Some(0)
            }
        );
        assert_eq!(
            bound(
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": "hi"}]})
            )
            .completion,
            None
        );
    }

    #[test]
    fn characters_not_bytes_are_counted() {
        // 8 characters, 24 bytes of UTF-8.
        let b = bound("/v1/completions", json!({"prompt": "日本語の文章です"}));
        assert_eq!(b.prompt, 2);
    }

    #[test]
    fn deep_nesting_is_not_followed() {
        let mut v = json!("abcd");
        for _ in 0..100 {
            v = json!([v]);
        }
        assert_eq!(bound("/v1/completions", json!({"prompt": v})).prompt, 0);
    }

    #[test]
    fn huge_or_odd_figures_saturate_instead_of_overflowing() {
        let b = bound(
            "/v1/chat/completions",
            json!({"max_tokens": u64::MAX, "n": 4, "messages": "not a list"}),
        );
        assert_eq!(b.completion, Some(u64::MAX));
        // `messages` is not a text key: a string there is not a message's content.
        assert_eq!(b.prompt, 0);
    }
}
