//! The deterministic usage contract: how many tokens a request is worth.
//!
//! Everything here is a pure function of the parsed JSON request body, so tests can compute
//! the exact `usage` the simulator will report (and count in `/_simulator/stats`) without
//! talking to it. See the crate docs for the contract in prose.

use serde_json::Value;

/// Completion tokens produced when the request gives neither `max_completion_tokens`,
/// `max_tokens` nor the `x-simulator-completion-tokens` header.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;

/// Largest completion the simulator agrees to produce; a larger request is answered 400.
pub const MAX_COMPLETION_TOKENS: u64 = 1_000_000;

/// Length of every embedding vector returned by `/v1/embeddings`.
pub const EMBEDDING_DIMENSIONS: usize = 8;

/// Number of whitespace-separated words in `text` (Unicode whitespace, as
/// [`str::split_whitespace`]). This is the simulator's "tokenizer".
pub fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Applies the "minimum 1" rule to a raw prompt word count.
pub fn prompt_tokens_from_words(words: u64) -> u64 {
    words.max(1)
}

/// Words in one chat message `content`: a string, or an array of parts whose `text` strings
/// are counted (parts without a `text` string, e.g. images, count 0). Anything else counts 0.
fn content_words(content: &Value) -> u64 {
    match content {
        Value::String(s) => count_words(s),
        Value::Array(parts) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => count_words(s),
                Value::Object(o) => o.get("text").and_then(Value::as_str).map_or(0, count_words),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

/// `prompt_tokens` of a `/v1/chat/completions` request: the words of every message's
/// `content` (string, or text parts of an array), summed, minimum 1. A missing or malformed
/// `messages` counts as no words.
pub fn chat_prompt_tokens(body: &Value) -> u64 {
    let words = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |messages| {
            messages
                .iter()
                .map(|m| m.get("content").map_or(0, content_words))
                .sum()
        });
    prompt_tokens_from_words(words)
}

/// Token counts of each input of a `prompt` / `input` field, in the forms OpenAI accepts:
/// a string (one input, its word count); an array of token ids (one input, one token per id);
/// an array whose elements are strings or token-id arrays (one input each).
/// Returns `None` when the field is missing or not of those forms.
fn inputs_tokens(field: Option<&Value>) -> Option<Vec<u64>> {
    match field? {
        Value::String(s) => Some(vec![count_words(s)]),
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_number) => {
            Some(vec![items.len() as u64])
        }
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Some(count_words(s)),
                Value::Array(ids) if ids.iter().all(Value::is_number) => Some(ids.len() as u64),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// `prompt_tokens` of a `/v1/completions` request: the words of `prompt` (a string, or the
/// sum over an array of strings; token-id arrays count one token per id), minimum 1.
/// A missing or malformed `prompt` counts as no words.
pub fn completion_prompt_tokens(body: &Value) -> u64 {
    let words = inputs_tokens(body.get("prompt")).map_or(0, |v| v.iter().sum());
    prompt_tokens_from_words(words)
}

/// Per-input token counts of a `/v1/embeddings` request (one embedding is returned per
/// element). `Err` with a message when `input` is missing, empty or malformed.
pub fn embedding_inputs(body: &Value) -> Result<Vec<u64>, String> {
    match inputs_tokens(body.get("input")) {
        None => Err(
            "'input' is required and must be a string, an array of strings, \
                     or an array of token arrays"
                .to_string(),
        ),
        Some(v) if v.is_empty() => Err("'input' must not be an empty array".to_string()),
        Some(v) => Ok(v),
    }
}

/// The completion length the body asks for: `max_completion_tokens`, else `max_tokens`
/// (`null` counts as absent). `Ok(None)` when neither is given; `Err` when the value is not
/// an integer in `0..=MAX_COMPLETION_TOKENS`.
pub fn requested_completion_tokens(body: &Value) -> Result<Option<u64>, String> {
    requested_tokens(body, &["/max_completion_tokens", "/max_tokens"])
}

/// The completion length asked for by the first of `pointers` (JSON pointers into the body,
/// e.g. `"/generationConfig/maxOutputTokens"`) that is present and not `null`. `Ok(None)`
/// when none is; `Err` when the value is not an integer in `0..=MAX_COMPLETION_TOKENS`.
pub fn requested_tokens(body: &Value, pointers: &[&str]) -> Result<Option<u64>, String> {
    for pointer in pointers {
        match body.pointer(pointer) {
            None | Some(Value::Null) => continue,
            Some(v) => {
                return match v.as_u64() {
                    Some(n) if n <= MAX_COMPLETION_TOKENS => Ok(Some(n)),
                    _ => Err(format!(
                        "'{}' must be an integer between 0 and {MAX_COMPLETION_TOKENS}",
                        pointer.trim_start_matches('/').replace('/', ".")
                    )),
                }
            }
        }
    }
    Ok(None)
}

/// Where each format reads its completion length (JSON pointers, first present wins).
pub mod max_tokens_fields {
    /// `/v1/chat/completions` and `/v1/completions`.
    pub const OPENAI: &[&str] = &["/max_completion_tokens", "/max_tokens"];
    /// `/v1/responses`.
    pub const RESPONSES: &[&str] = &["/max_output_tokens"];
    /// `/v1/messages`.
    pub const ANTHROPIC: &[&str] = &["/max_tokens"];
    /// Gemini `generateContent` (camelCase, as documented, or the snake_case the API also accepts).
    pub const GEMINI: &[&str] = &[
        "/generationConfig/maxOutputTokens",
        "/generation_config/max_output_tokens",
    ];
}

/// Words of a string, or of the `text` strings of an array of parts / blocks: the same rule
/// as a chat message `content`.
fn text_or_parts_words(v: Option<&Value>) -> u64 {
    v.map_or(0, content_words)
}

/// `prompt_tokens` (`input_tokens`) of a `/v1/responses` request, minimum 1: the words of
/// `instructions` (a string) plus those of `input`. `input` is a string, or an array of
/// items: a string item counts its words; an object item counts its `content` (a string, or
/// the `text` of each part, e.g. `input_text`) and its `output` string (function call
/// outputs). Anything else counts 0.
pub fn responses_prompt_tokens(body: &Value) -> u64 {
    let instructions = body
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, count_words);
    let input = match body.get("input") {
        Some(Value::String(s)) => count_words(s),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => count_words(s),
                Value::Object(o) => {
                    text_or_parts_words(o.get("content"))
                        + o.get("output")
                            .and_then(Value::as_str)
                            .map_or(0, count_words)
                }
                _ => 0,
            })
            .sum(),
        _ => 0,
    };
    prompt_tokens_from_words(instructions + input)
}

/// Words of a `/v1/messages` request, minimum 1: `system` (a string, or the `text` of each
/// block) plus every message's `content` (a string, or the `text` of each block; image and
/// tool blocks count 0). This is `input_tokens`; cache tokens forced by the
/// `x-simulator-cache-*-tokens` headers come on top.
pub fn anthropic_prompt_tokens(body: &Value) -> u64 {
    let system = text_or_parts_words(body.get("system"));
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, |messages| {
            messages
                .iter()
                .map(|m| text_or_parts_words(m.get("content")))
                .sum()
        });
    prompt_tokens_from_words(system + messages)
}

/// The cached part of an OpenAI prompt of `prompt` tokens when `x-simulator-cache-read-tokens`
/// asks for `requested`: OpenAI's `prompt_tokens_details.cached_tokens` (Responses:
/// `input_tokens_details.cached_tokens`), at most the prompt. Unlike Anthropic's
/// `cache_read_input_tokens`, which come on top of `input_tokens`, OpenAI's cached tokens are
/// part of `prompt_tokens`: the prompt, and so the total and the stats, are unchanged.
pub fn openai_cached_tokens(prompt: u64, requested: u64) -> u64 {
    requested.min(prompt)
}

/// Words of the `text` of each part of one Gemini `Content` object.
fn gemini_content_words(content: &Value) -> u64 {
    content
        .get("parts")
        .and_then(Value::as_array)
        .map_or(0, |parts| {
            parts
                .iter()
                .map(|p| p.get("text").and_then(Value::as_str).map_or(0, count_words))
                .sum()
        })
}

/// `promptTokenCount` of a Gemini `generateContent` request, minimum 1: the words of every
/// `contents[].parts[].text` plus those of `systemInstruction.parts[].text` (also spelled
/// `system_instruction`). Parts without `text` (inline data, function calls) count 0.
pub fn gemini_prompt_tokens(body: &Value) -> u64 {
    let system = body
        .get("systemInstruction")
        .or_else(|| body.get("system_instruction"))
        .map_or(0, gemini_content_words);
    let contents = body
        .get("contents")
        .and_then(Value::as_array)
        .map_or(0, |contents| {
            contents.iter().map(gemini_content_words).sum()
        });
    prompt_tokens_from_words(system + contents)
}

/// The `i`-th completion word (1-based): `tok1`, `tok2`, …
pub fn completion_word(i: u64) -> String {
    format!("tok{i}")
}

/// The full completion text of `n` tokens: `"tok1 tok2 … tokN"` (empty for 0).
pub fn completion_text(n: u64) -> String {
    (1..=n).map(completion_word).collect::<Vec<_>>().join(" ")
}

/// A deterministic embedding of [`EMBEDDING_DIMENSIONS`] floats in `[-1, 1)` derived from
/// the input's position and token count.
pub fn embedding_vector(index: usize, tokens: u64) -> Vec<f64> {
    // splitmix64 seeded from (index, tokens): stable across runs and platforms.
    let mut state = (index as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(tokens)
        .wrapping_add(1);
    (0..EMBEDDING_DIMENSIONS)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // 24 bits of precision keeps the numbers short in JSON.
            let unit = (z >> 40) as f64 / (1u64 << 24) as f64;
            unit * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn words() {
        assert_eq!(count_words(""), 0);
        assert_eq!(count_words("  a  b\tc\nd "), 4);
    }

    #[test]
    fn chat_counts_strings_and_text_parts() {
        let body = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "hello there world"},
                {"type": "image_url", "image_url": {"url": "x"}}
            ]},
            {"role": "assistant", "content": null}
        ]});
        assert_eq!(chat_prompt_tokens(&body), 5);
        assert_eq!(chat_prompt_tokens(&json!({})), 1);
        assert_eq!(chat_prompt_tokens(&json!({"messages": "x"})), 1);
    }

    #[test]
    fn completion_prompt_forms() {
        assert_eq!(completion_prompt_tokens(&json!({"prompt": "a b c"})), 3);
        assert_eq!(
            completion_prompt_tokens(&json!({"prompt": ["a b", "c"]})),
            3
        );
        assert_eq!(
            completion_prompt_tokens(&json!({"prompt": [1, 2, 3, 4]})),
            4
        );
        assert_eq!(
            completion_prompt_tokens(&json!({"prompt": [[1, 2], [3]]})),
            3
        );
        assert_eq!(completion_prompt_tokens(&json!({"prompt": ""})), 1);
        assert_eq!(completion_prompt_tokens(&json!({})), 1);
    }

    #[test]
    fn embedding_input_forms() {
        assert_eq!(embedding_inputs(&json!({"input": "a b"})), Ok(vec![2]));
        assert_eq!(
            embedding_inputs(&json!({"input": ["a", "b c"]})),
            Ok(vec![1, 2])
        );
        assert!(embedding_inputs(&json!({})).is_err());
        assert!(embedding_inputs(&json!({"input": []})).is_err());
        assert!(embedding_inputs(&json!({"input": [{}]})).is_err());
    }

    #[test]
    fn max_tokens_precedence_and_validation() {
        assert_eq!(requested_completion_tokens(&json!({})), Ok(None));
        assert_eq!(
            requested_completion_tokens(&json!({"max_tokens": 5})),
            Ok(Some(5))
        );
        assert_eq!(
            requested_completion_tokens(&json!({"max_tokens": 5, "max_completion_tokens": 7})),
            Ok(Some(7))
        );
        assert_eq!(
            requested_completion_tokens(&json!({"max_completion_tokens": null, "max_tokens": 2})),
            Ok(Some(2))
        );
        assert!(requested_completion_tokens(&json!({"max_tokens": -1})).is_err());
        assert!(requested_completion_tokens(&json!({"max_tokens": "3"})).is_err());
        assert!(requested_completion_tokens(&json!({"max_tokens": 1.5})).is_err());
        assert!(requested_completion_tokens(&json!({"max_tokens": 2_000_000})).is_err());
    }

    #[test]
    fn other_formats_max_tokens_fields() {
        assert_eq!(
            requested_tokens(
                &json!({"max_output_tokens": 4}),
                max_tokens_fields::RESPONSES
            ),
            Ok(Some(4))
        );
        assert_eq!(
            requested_tokens(
                &json!({"generationConfig": {"maxOutputTokens": 9}}),
                max_tokens_fields::GEMINI
            ),
            Ok(Some(9))
        );
        assert_eq!(
            requested_tokens(
                &json!({"generation_config": {"max_output_tokens": 2}}),
                max_tokens_fields::GEMINI
            ),
            Ok(Some(2))
        );
        assert_eq!(
            requested_tokens(&json!({}), max_tokens_fields::ANTHROPIC),
            Ok(None)
        );
        let err = requested_tokens(
            &json!({"generationConfig": {"maxOutputTokens": "x"}}),
            max_tokens_fields::GEMINI,
        );
        assert!(err.is_err_and(|e| e.contains("generationConfig.maxOutputTokens")));
    }

    #[test]
    fn other_formats_prompt_tokens() {
        let responses = json!({
            "instructions": "be brief",
            "input": [
                "plain string item",
                {"role": "user", "content": "a b"},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "c d e"},
                    {"type": "input_image", "image_url": "http://x"}
                ]},
                {"type": "function_call_output", "call_id": "c1", "output": "f g"},
                7
            ]
        });
        assert_eq!(responses_prompt_tokens(&responses), 2 + 3 + 2 + 3 + 2);
        assert_eq!(responses_prompt_tokens(&json!({"input": "x y z"})), 3);
        assert_eq!(responses_prompt_tokens(&json!({})), 1);

        let anthropic = json!({
            "system": [{"type": "text", "text": "sys one"}],
            "messages": [
                {"role": "user", "content": "u1 u2 u3"},
                {"role": "assistant", "content": [{"type": "text", "text": "a1"},
                    {"type": "tool_use", "id": "t", "name": "n", "input": {}}]}
            ]
        });
        assert_eq!(anthropic_prompt_tokens(&anthropic), 6);
        assert_eq!(
            anthropic_prompt_tokens(&json!({"system": "s t", "messages": []})),
            2
        );

        let gemini = json!({
            "systemInstruction": {"parts": [{"text": "sys tem"}]},
            "contents": [
                {"role": "user", "parts": [{"text": "p q r"}, {"inlineData": {}}]},
                {"role": "model", "parts": [{"text": "m"}]}
            ]
        });
        assert_eq!(gemini_prompt_tokens(&gemini), 6);
        assert_eq!(
            gemini_prompt_tokens(&json!({"system_instruction": {"parts": [{"text": "a"}]}})),
            1
        );
        assert_eq!(gemini_prompt_tokens(&json!({"contents": "x"})), 1);
    }

    #[test]
    fn openai_cached_tokens_are_part_of_the_prompt_and_at_most_all_of_it() {
        assert_eq!(openai_cached_tokens(10, 4), 4);
        assert_eq!(openai_cached_tokens(10, 10), 10);
        assert_eq!(openai_cached_tokens(10, 1_000), 10);
        assert_eq!(openai_cached_tokens(1, 0), 0);
    }

    #[test]
    fn text_and_embeddings() {
        assert_eq!(completion_text(0), "");
        assert_eq!(completion_text(3), "tok1 tok2 tok3");
        let v = embedding_vector(0, 3);
        assert_eq!(v.len(), EMBEDDING_DIMENSIONS);
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        assert_eq!(v, embedding_vector(0, 3));
    }
}
