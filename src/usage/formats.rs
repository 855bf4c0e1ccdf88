//! The providers' usage objects: which fields of which JSON location hold the figures, per
//! [`Format`], and the custom locations of [`UsagePaths`]. Sources: OpenAI's
//! [chat completion](https://platform.openai.com/docs/api-reference/chat/object) and
//! [Responses](https://platform.openai.com/docs/api-reference/responses/object) objects,
//! Anthropic's [Messages](https://docs.anthropic.com/en/api/messages) and
//! [streaming](https://docs.anthropic.com/en/api/messages-streaming) references, Gemini's
//! [`UsageMetadata`](https://ai.google.dev/api/generate-content#UsageMetadata).
//!
//! [`read_document`] reads a parsed `serde_json::Value`; `read_bytes` reads raw bytes through
//! the typed reader of [`super::json`] (a `Value` only when custom paths need one), with the same
//! results, and the model the document names ([`Report`]).

use super::{json, Format, Usage};
use serde_json::Value;

/// Custom locations of usage figures: JSON pointers
/// ([RFC 6901](https://www.rfc-editor.org/rfc/rfc6901)) into a response document (or one
/// streamed event), tried in order per category, first match wins. A pointer matches only where
/// it finds a non-negative integer; when any of prompt, completion and total matches, the
/// format's own fields are not read for that document. The cached, cache-write and reasoning
/// pointers ([`UsagePaths::with_reported`]) replace the format's own figure where they match,
/// whichever gave the rest. `Default` is no custom path. Build it with [`UsagePaths::new`],
/// which also derives the markers an event stream is filtered by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsagePaths {
    /// Pointers to the prompt (input) token count, e.g. `/usage/prompt_tokens`.
    pub prompt: Vec<String>,
    /// Pointers to the completion (output) token count.
    pub completion: Vec<String>,
    /// Pointers to the total token count.
    pub total: Vec<String>,
    /// Pointers to the cached prompt tokens (see [`Usage::cached`]), e.g.
    /// `/usage/prompt_tokens_details/cached_tokens`.
    pub cached: Vec<String>,
    /// Pointers to the prompt tokens written to the cache (see [`Usage::cache_write`]).
    pub cache_write: Vec<String>,
    /// Pointers to the reasoning tokens (see [`Usage::reasoning`]).
    pub reasoning: Vec<String>,
    /// The last segment of every pointer, quoted (`"prompt_tokens"`): an event that contains
    /// none of them is not parsed.
    pub(super) markers: Vec<Vec<u8>>,
}

impl UsagePaths {
    /// Custom paths from lists of JSON pointers, one list per charged category (see
    /// [`UsagePaths::with_reported`] for the others).
    ///
    /// # Errors
    ///
    /// A message naming the first pointer that does not start with `/` (the empty pointer, the
    /// whole document, is refused too).
    pub fn new(
        prompt: Vec<String>,
        completion: Vec<String>,
        total: Vec<String>,
    ) -> Result<UsagePaths, String> {
        let mut paths = UsagePaths::default();
        paths.add_markers(prompt.iter().chain(&completion).chain(&total))?;
        paths.prompt = prompt;
        paths.completion = completion;
        paths.total = total;
        Ok(paths)
    }

    /// These paths with pointers to the figures reported but not charged: cached prompt
    /// tokens, prompt tokens written to the cache, reasoning tokens (replacing any given
    /// before).
    ///
    /// # Errors
    ///
    /// As [`UsagePaths::new`].
    pub fn with_reported(
        mut self,
        cached: Vec<String>,
        cache_write: Vec<String>,
        reasoning: Vec<String>,
    ) -> Result<UsagePaths, String> {
        self.add_markers(cached.iter().chain(&cache_write).chain(&reasoning))?;
        self.cached = cached;
        self.cache_write = cache_write;
        self.reasoning = reasoning;
        Ok(self)
    }

    /// Checks `pointers` and adds the quoted last segment of each to the markers.
    fn add_markers<'a>(
        &mut self,
        pointers: impl Iterator<Item = &'a String>,
    ) -> Result<(), String> {
        for p in pointers {
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
            if !self.markers.contains(&m) {
                self.markers.push(m);
            }
        }
        Ok(())
    }

    /// Whether no custom path is set.
    pub(super) fn is_empty(&self) -> bool {
        [
            &self.prompt,
            &self.completion,
            &self.total,
            &self.cached,
            &self.cache_write,
            &self.reasoning,
        ]
        .iter()
        .all(|l| l.is_empty())
    }

    /// The figures the custom paths find in `doc` (each `None` when no pointer of its category
    /// finds a non-negative integer).
    pub(super) fn read(&self, doc: &Value) -> Usage {
        let first = |ptrs: &[String]| {
            ptrs.iter()
                .find_map(|p| doc.pointer(p).and_then(Value::as_u64))
        };
        Usage {
            prompt: first(&self.prompt),
            completion: first(&self.completion),
            total: first(&self.total),
            cached: first(&self.cached),
            cache_write: first(&self.cache_write),
            reasoning: first(&self.reasoning),
        }
    }
}

/// Most bytes of a model name kept: a longer one is cut to this (at a character boundary).
pub const MODEL_MAX_BYTES: usize = 256;

/// `name` as a model name: cut to [`MODEL_MAX_BYTES`] at a character boundary; `None` when
/// empty.
pub(crate) fn model_name(name: &str) -> Option<String> {
    let end = (0..=MODEL_MAX_BYTES.min(name.len()))
        .rev()
        .find(|&i| name.is_char_boundary(i))
        .unwrap_or(0);
    name.get(..end).filter(|n| !n.is_empty()).map(str::to_owned)
}

/// Where a document names its model.
#[derive(Clone, Copy)]
enum ModelAt {
    /// `/model`
    Model,
    /// `/response/model`
    ResponseModel,
    /// `/message/model`
    MessageModel,
    /// `/modelVersion`
    ModelVersion,
}

impl ModelAt {
    /// The locations of the model in `format`, in the order they are tried (those of the usage,
    /// see the [module documentation](crate::usage)).
    fn candidates(format: Format) -> &'static [ModelAt] {
        use ModelAt::*;
        match format {
            Format::OpenAi => &[Model],
            Format::Responses => &[Model, ResponseModel],
            Format::Anthropic => &[Model, MessageModel],
            Format::Gemini => &[ModelVersion],
            Format::Unknown => &[Model, ResponseModel, MessageModel, ModelVersion],
        }
    }

    /// The JSON pointer of this location.
    fn pointer(self) -> &'static str {
        match self {
            ModelAt::Model => "/model",
            ModelAt::ResponseModel => "/response/model",
            ModelAt::MessageModel => "/message/model",
            ModelAt::ModelVersion => "/modelVersion",
        }
    }
}

/// The model `doc` names in `format` (see [`model_name`]).
fn model_of(format: Format, doc: &Value) -> Option<String> {
    ModelAt::candidates(format).iter().find_map(|at| {
        doc.pointer(at.pointer())
            .and_then(Value::as_str)
            .and_then(model_name)
    })
}

/// What one document reports: its usage and, when asked for, the model it names.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    /// The usage (all `None` when none).
    pub(crate) usage: Usage,
    /// The model (see [`model_name`]); `None` when not asked for or not named.
    pub(crate) model: Option<String>,
}

impl Report {
    /// Adds the report of a later document (a streamed array's element): its figures replace
    /// these ([`Usage::merge`]), its model counts when none was found yet.
    pub(super) fn merge(&mut self, later: Report) {
        self.usage.merge(later.usage);
        if self.model.is_none() {
            self.model = later.model;
        }
    }
}

/// The sum of the figures present (saturating), or `None` when none is.
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
pub(crate) struct Figures {
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
    /// Gemini's `cachedContentTokenCount` (reported only: invalid is ignored alone).
    cached_content_token_count: Option<u64>,
    /// `prompt_tokens_details.cached_tokens` (the breakdowns are reported only, invalid
    /// figures in them are ignored alone).
    prompt_details_cached: Option<u64>,
    /// `input_tokens_details.cached_tokens`
    input_details_cached: Option<u64>,
    /// `completion_tokens_details.reasoning_tokens`
    completion_details_reasoning: Option<u64>,
    /// `output_tokens_details.reasoning_tokens`
    output_details_reasoning: Option<u64>,
    /// A figure was there but not a non-negative integer (negative, float, string, ...): the
    /// whole object is distrusted, so that the valid figures beside it are no discount.
    pub(super) invalid: bool,
}

impl Figures {
    /// Where the figure named `key` goes (`None`: not a figure).
    pub(super) fn slot(&mut self, key: json::Key) -> Option<&mut Option<u64>> {
        use json::Key;
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

    /// Where the reported-only figure named `key` goes (`None`: not one); one that is not a
    /// non-negative integer is `None` there, without distrusting the object.
    pub(super) fn reported_slot(&mut self, key: json::Key) -> Option<&mut Option<u64>> {
        match key {
            json::Key::CachedContentTokenCount => Some(&mut self.cached_content_token_count),
            _ => None,
        }
    }

    /// Where the figure of the breakdown object named `key` goes, and which key of that object
    /// holds it (`None`: not a breakdown). Reported only, as [`Figures::reported_slot`].
    pub(super) fn detail_slot(&mut self, key: json::Key) -> Option<(&mut Option<u64>, json::Key)> {
        use json::Key;
        Some(match key {
            Key::PromptTokensDetails => (&mut self.prompt_details_cached, Key::CachedTokens),
            Key::InputTokensDetails => (&mut self.input_details_cached, Key::CachedTokens),
            Key::CompletionTokensDetails => {
                (&mut self.completion_details_reasoning, Key::ReasoningTokens)
            }
            Key::OutputTokensDetails => (&mut self.output_details_reasoning, Key::ReasoningTokens),
            _ => return None,
        })
    }

    /// The figures of a usage object (`None`: not an object).
    fn of(v: &Value) -> Option<Figures> {
        let mut f = Figures::default();
        for (k, v) in v.as_object()? {
            let key = json::key(k);
            if let Some(slot) = f.slot(key) {
                *slot = v.as_u64();
                if slot.is_none() && !v.is_null() {
                    f.invalid = true;
                }
            } else if let Some(slot) = f.reported_slot(key) {
                *slot = v.as_u64();
            } else if let Some((slot, figure)) = f.detail_slot(key) {
                // A map's keys are unique (the last of duplicates was kept).
                *slot = v
                    .as_object()
                    .and_then(|d| d.iter().find(|(k, _)| json::key(k) == figure))
                    .and_then(|(_, v)| v.as_u64());
            }
        }
        Some(f)
    }
}

/// An OpenAI usage object: chat completions, completions and embeddings
/// (`prompt_tokens`, `completion_tokens`, `total_tokens`, `prompt_tokens_details.cached_tokens`,
/// `completion_tokens_details.reasoning_tokens`), or the Responses API (`input_tokens`,
/// `output_tokens`, `total_tokens`, `input_tokens_details.cached_tokens`,
/// `output_tokens_details.reasoning_tokens`). Nothing when absent or distrusted.
fn openai(usage: Option<&Figures>) -> Usage {
    let Some(u) = usage.filter(|f| !f.invalid) else {
        return Usage::default();
    };
    Usage {
        prompt: u.prompt_tokens.or(u.input_tokens),
        completion: u.completion_tokens.or(u.output_tokens),
        total: u.total_tokens,
        cached: u.prompt_details_cached.or(u.input_details_cached),
        cache_write: None,
        reasoning: u
            .completion_details_reasoning
            .or(u.output_details_reasoning),
    }
}

/// An Anthropic Messages usage object: the prompt is `input_tokens` plus
/// `cache_creation_input_tokens` and `cache_read_input_tokens`, the completion `output_tokens`
/// (cumulative in a stream's `message_delta`), no total; cached = `cache_read_input_tokens`,
/// cache write = `cache_creation_input_tokens` (wherever present, with or without
/// `input_tokens`). Nothing when absent or distrusted.
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
        cached: u.cache_read_input_tokens,
        cache_write: u.cache_creation_input_tokens,
        reasoning: None,
    }
}

/// A Gemini `usageMetadata` object: prompt = `promptTokenCount`, completion =
/// `candidatesTokenCount` + `thoughtsTokenCount`, total = `totalTokenCount`, cached =
/// `cachedContentTokenCount`, reasoning = `thoughtsTokenCount`. Nothing when absent or
/// distrusted.
fn gemini(meta: Option<&Figures>) -> Usage {
    let Some(m) = meta.filter(|f| !f.invalid) else {
        return Usage::default();
    };
    Usage {
        prompt: m.prompt_token_count,
        completion: sum(&[m.candidates_token_count, m.thoughts_token_count]),
        total: m.total_token_count,
        cached: m.cached_content_token_count,
        cache_write: None,
        reasoning: m.thoughts_token_count,
    }
}

/// The documented usage locations of one JSON document (`None`: absent, or not an object).
#[derive(Debug, Default)]
pub(super) struct Locations {
    /// `/usage`
    pub(super) usage: Option<Figures>,
    /// `/usageMetadata`
    pub(super) usage_metadata: Option<Figures>,
    /// `/response/usage`
    pub(super) response_usage: Option<Figures>,
    /// `/message/usage`
    pub(super) message_usage: Option<Figures>,
    /// `/model` (read only when asked for, as the three below)
    pub(super) model: Option<String>,
    /// `/response/model`
    pub(super) response_model: Option<String>,
    /// `/message/model`
    pub(super) message_model: Option<String>,
    /// `/modelVersion`
    pub(super) model_version: Option<String>,
}

impl Locations {
    /// The usage these locations report in `format`: the first of the format's candidate
    /// locations that yields a figure (every location for [`Format::Unknown`]).
    pub(super) fn usage(&self, format: Format) -> Usage {
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

    /// What these locations report in `format`: the usage and the first model of the
    /// format's candidate locations.
    pub(super) fn report(mut self, format: Format) -> Report {
        let usage = self.usage(format);
        let model = ModelAt::candidates(format).iter().find_map(|at| {
            match at {
                ModelAt::Model => &mut self.model,
                ModelAt::ResponseModel => &mut self.response_model,
                ModelAt::MessageModel => &mut self.message_model,
                ModelAt::ModelVersion => &mut self.model_version,
            }
            .take()
        });
        Report { usage, model }
    }
}

/// Reads the usage of one JSON document (a whole response, one streamed event, or one element
/// of a streamed JSON array) in `format`: first the custom `paths`, then the format's
/// documented locations (see the [module documentation](crate::usage)). Never fails: a document
/// without usage, or not an object, gives a [`Usage`] whose figures are all `None`.
pub fn read_document(format: Format, paths: &UsagePaths, doc: &Value) -> Usage {
    if paths.is_empty() {
        return own_fields(format, doc);
    }
    let custom = paths.read(doc);
    if !custom.is_empty() {
        return custom;
    }
    let mut u = own_fields(format, doc);
    u.cached = custom.cached.or(u.cached);
    u.cache_write = custom.cache_write.or(u.cache_write);
    u.reasoning = custom.reasoning.or(u.reasoning);
    u
}

/// The usage of `doc` at `format`'s documented locations.
fn own_fields(format: Format, doc: &Value) -> Usage {
    let Some(map) = doc.as_object() else {
        return Usage::default();
    };
    let wrapped = |v: &Value| v.as_object()?.get("usage").and_then(Figures::of);
    Locations {
        usage: map.get("usage").and_then(Figures::of),
        usage_metadata: map.get("usageMetadata").and_then(Figures::of),
        response_usage: map.get("response").and_then(wrapped),
        message_usage: map.get("message").and_then(wrapped),
        ..Locations::default()
    }
    .usage(format)
}

/// Reads the usage of the JSON document in `bytes`, and the model it names when `model` asks
/// for it; `None` when they are not one JSON document. `arrays`: a top-level array is a
/// streamed JSON array (each element a document, later figures win, the first model named
/// counts). Without custom paths the document is never built as a `Value`.
pub(super) fn read_bytes(
    format: Format,
    paths: &UsagePaths,
    bytes: &[u8],
    arrays: bool,
    model: bool,
) -> Option<Report> {
    if paths.is_empty() {
        // Skipped strings are not checked for UTF-8 by the parser: check the whole document,
        // so that it is refused as a `Value` would be.
        let text = std::str::from_utf8(bytes).ok()?;
        return json::document(text, format, arrays, model);
    }
    let doc: Value = serde_json::from_slice(bytes).ok()?;
    let one = |doc: &Value| Report {
        usage: read_document(format, paths, doc),
        model: model.then(|| model_of(format, doc)).flatten(),
    };
    Some(match &doc {
        Value::Array(items) if arrays => {
            let mut found = Report::default();
            for item in items {
                found.merge(one(item));
            }
            found
        }
        doc => one(doc),
    })
}

/// Reads the top-level OpenAI-style `usage` of the JSON document in `doc` (bytes, UTF-8; see
/// [`Format::OpenAi`]). `None` when `doc` is not one JSON document or reports no figure.
pub fn from_json(doc: &[u8]) -> Option<Usage> {
    let u = read_bytes(Format::OpenAi, &UsagePaths::default(), doc, false, false)?.usage;
    (!u.is_empty()).then_some(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenCategory;

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
}
