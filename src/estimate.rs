//! What a request declares about its own size, read from its JSON body before the upstream
//! answers: a prompt estimate from the text it carries and the completion maximum it asks for.
//!
//! - Prompt: the characters of the text fields (not the JSON around them, not images or
//!   other binary parts), at [`CHARS_PER_TOKEN`] characters per token, rounded up. The text
//!   fields are OpenAI's `messages[].content` (a string, or parts with `text`), `prompt` and
//!   `input` (strings or lists of strings; Responses' input items with `content`),
//!   `instructions`; Anthropic's `system` and `messages[].content` blocks; Gemini's
//!   `contents[].parts[].text` and `systemInstruction.parts[].text`.
//! - Completion: the declared maximum, OpenAI chat `max_completion_tokens` or `max_tokens`,
//!   completions `max_tokens`, Responses `max_output_tokens`, Anthropic `max_tokens`, Gemini
//!   `generationConfig.maxOutputTokens`; times the number of choices asked for (`n`,
//!   Gemini's `generationConfig.candidateCount`). Embeddings generate nothing (0).

use crate::config::TokenCategory;
use serde_json::Value;

/// Characters of English text per token: the common rule of thumb for GPT-style tokenizers
/// (OpenAI's documentation: "one token generally corresponds to ~4 characters of text").
pub const CHARS_PER_TOKEN: u64 = 4;

/// Tokens of `chars` characters of text at [`CHARS_PER_TOKEN`], rounded up.
pub fn tokens_of_chars(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

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
    /// `undeclared_completion` when the request declares none), or their sum for `total`.
    pub fn tokens(self, category: TokenCategory, undeclared_completion: u64) -> u64 {
        let completion = self.completion.unwrap_or(undeclared_completion);
        match category {
            TokenCategory::Prompt => self.prompt,
            TokenCategory::Completion => completion,
            TokenCategory::Total => self.prompt.saturating_add(completion),
        }
    }

    /// Reads `body` (the request's JSON) sent to `path`.
    pub fn of_request(path: &str, body: &Value) -> RequestBound {
        let mut chars = 0u64;
        for key in ["messages", "prompt", "input", "instructions", "system"] {
            if let Some(v) = body.get(key) {
                chars = chars.saturating_add(text_chars(v, 0));
            }
        }
        for key in ["contents", "systemInstruction"] {
            if let Some(v) = body.get(key) {
                chars = chars.saturating_add(gemini_chars(v));
            }
        }
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
            prompt: tokens_of_chars(chars),
            completion,
        }
    }
}

/// Nesting deeper than this is not followed (a request cannot make the walk expensive).
const MAX_DEPTH: usize = 8;

/// Characters of the text in an OpenAI/Anthropic/Responses content value: a string, a list of
/// strings or parts, a part with `text`, or a message/item with `content`.
fn text_chars(v: &Value, depth: usize) -> u64 {
    if depth > MAX_DEPTH {
        return 0;
    }
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items
            .iter()
            .map(|i| text_chars(i, depth + 1))
            .fold(0u64, u64::saturating_add),
        Value::Object(map) => {
            let text = map.get("text").map_or(0, |t| text_chars(t, depth + 1));
            let content = map.get("content").map_or(0, |c| text_chars(c, depth + 1));
            text.saturating_add(content)
        }
        _ => 0,
    }
}

/// Characters of Gemini's `parts[].text` in a `Content` or a list of them.
fn gemini_chars(v: &Value) -> u64 {
    let contents: Vec<&Value> = match v {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    contents
        .iter()
        .filter_map(|c| c.get("parts").and_then(Value::as_array))
        .flatten()
        .filter_map(|p| p.get("text").and_then(Value::as_str))
        .map(|t| t.chars().count() as u64)
        .fold(0u64, u64::saturating_add)
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
        // "Be brief." (9) + "Say hello" (9) = 18 characters -> 5 tokens; the image is not text.
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
        assert_eq!(b.prompt, 3);
    }
}
