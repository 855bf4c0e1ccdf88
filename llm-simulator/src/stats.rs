//! The record of every token served (`GET /_simulator/stats`, `POST /_simulator/reset`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// Key used in `by_user` when a request has neither `x-simulator-user` nor `authorization`.
pub const ANONYMOUS: &str = "anonymous";

/// The API format of an LLM endpoint: the keys of `by_format` in the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// `POST /v1/chat/completions`.
    OpenAiChat,
    /// `POST /v1/completions`.
    OpenAiCompletions,
    /// `POST /v1/embeddings`.
    OpenAiEmbeddings,
    /// `POST /v1/responses`.
    OpenAiResponses,
    /// `POST /v1/messages`.
    Anthropic,
    /// `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`.
    Gemini,
}

impl Format {
    /// Every format, in a fixed order.
    pub const ALL: [Format; 6] = [
        Format::OpenAiChat,
        Format::OpenAiCompletions,
        Format::OpenAiEmbeddings,
        Format::OpenAiResponses,
        Format::Anthropic,
        Format::Gemini,
    ];

    /// The key used in `by_format`: `openai-chat`, `openai-completions`, `openai-embeddings`,
    /// `openai-responses`, `anthropic` or `gemini`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::OpenAiChat => "openai-chat",
            Format::OpenAiCompletions => "openai-completions",
            Format::OpenAiEmbeddings => "openai-embeddings",
            Format::OpenAiResponses => "openai-responses",
            Format::Anthropic => "anthropic",
            Format::Gemini => "gemini",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Request and token counters, for all traffic, one user key or one format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Requests received on the LLM endpoints (every [`Format`]), errors included.
    pub requests: u64,
    /// Prompt tokens served.
    pub prompt_tokens: u64,
    /// Completion tokens served (for streams: produced so far).
    pub completion_tokens: u64,
    /// `prompt_tokens + completion_tokens`.
    pub total_tokens: u64,
}

impl Counters {
    fn add(&mut self, requests: u64, prompt: u64, completion: u64) {
        self.requests = self.requests.saturating_add(requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(prompt);
        self.completion_tokens = self.completion_tokens.saturating_add(completion);
        self.total_tokens = self
            .total_tokens
            .saturating_add(prompt.saturating_add(completion));
    }
}

/// The JSON body of `GET /_simulator/stats`: totals plus the same counters per user key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Totals over all users.
    #[serde(flatten)]
    pub totals: Counters,
    /// Counters per user key (`x-simulator-user`, else `authorization`, else `anonymous`).
    pub by_user: BTreeMap<String, Counters>,
    /// Counters per API format ([`Format::as_str`]); a format appears once it got a request.
    pub by_format: BTreeMap<String, Counters>,
}

/// Shared, cloneable token ledger. All clones update the same counters.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    inner: Arc<Mutex<Snapshot>>,
}

impl Stats {
    /// A new, zeroed ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Snapshot> {
        // A poisoned lock only means another thread panicked mid-update of plain counters;
        // the data is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, user: &str, format: Option<Format>, requests: u64, prompt: u64, completion: u64) {
        let mut s = self.lock();
        s.totals.add(requests, prompt, completion);
        s.by_user
            .entry(user.to_string())
            .or_default()
            .add(requests, prompt, completion);
        if let Some(format) = format {
            s.by_format
                .entry(format.as_str().to_string())
                .or_default()
                .add(requests, prompt, completion);
        }
    }

    /// Records one request for `user` together with its prompt and completion tokens, without
    /// a format (it does not show in `by_format`). The simulator itself uses [`Stats::record`].
    pub fn record_request(&self, user: &str, prompt_tokens: u64, completion_tokens: u64) {
        self.add(user, None, 1, prompt_tokens, completion_tokens);
    }

    /// Adds completion tokens produced by a stream already recorded by
    /// [`Stats::record_request`].
    pub fn add_completion(&self, user: &str, completion_tokens: u64) {
        self.add(user, None, 0, 0, completion_tokens);
    }

    /// Records one request of `format` for `user` together with its prompt and completion
    /// tokens.
    pub fn record(&self, user: &str, format: Format, prompt_tokens: u64, completion_tokens: u64) {
        self.add(user, Some(format), 1, prompt_tokens, completion_tokens);
    }

    /// Adds completion tokens produced by a stream already recorded by [`Stats::record`].
    pub fn add_completion_to(&self, user: &str, format: Format, completion_tokens: u64) {
        self.add(user, Some(format), 0, 0, completion_tokens);
    }

    /// A copy of the current counters.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    /// Zeroes every counter and forgets every user.
    pub fn reset(&self) {
        *self.lock() = Snapshot::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_resets() {
        let s = Stats::new();
        s.record_request("a", 3, 4);
        s.record_request("b", 1, 0);
        s.add_completion("b", 2);
        let snap = s.snapshot();
        assert_eq!(
            snap.totals,
            Counters {
                requests: 2,
                prompt_tokens: 4,
                completion_tokens: 6,
                total_tokens: 10
            }
        );
        assert_eq!(snap.by_user["b"].total_tokens, 3);
        assert!(snap.by_format.is_empty());
        s.record("a", Format::Anthropic, 2, 1);
        s.add_completion_to("a", Format::Anthropic, 3);
        let snap = s.snapshot();
        assert_eq!(
            snap.by_format["anthropic"],
            Counters {
                requests: 1,
                prompt_tokens: 2,
                completion_tokens: 4,
                total_tokens: 6
            }
        );
        assert_eq!(snap.totals.requests, 3);
        let json = serde_json::to_value(&snap).unwrap_or_default();
        assert_eq!(json["requests"], 3);
        assert_eq!(json["by_format"]["anthropic"]["requests"], 1);
        assert_eq!(json["by_user"]["a"]["completion_tokens"], 8);
        s.reset();
        assert_eq!(s.snapshot(), Snapshot::default());
    }
}
