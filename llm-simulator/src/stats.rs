//! The record of every token served (`GET /_simulator/stats`, `POST /_simulator/reset`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

/// Key used in `by_user` when a request has neither `x-simulator-user` nor `authorization`.
pub const ANONYMOUS: &str = "anonymous";

/// Request and token counters, for all traffic or for one user key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Requests received on the LLM endpoints (chat, completions, embeddings), errors included.
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

    fn add(&self, user: &str, requests: u64, prompt: u64, completion: u64) {
        let mut s = self.lock();
        s.totals.add(requests, prompt, completion);
        s.by_user
            .entry(user.to_string())
            .or_default()
            .add(requests, prompt, completion);
    }

    /// Records one request for `user` together with its prompt and completion tokens.
    pub fn record_request(&self, user: &str, prompt_tokens: u64, completion_tokens: u64) {
        self.add(user, 1, prompt_tokens, completion_tokens);
    }

    /// Adds completion tokens produced by a stream already recorded by
    /// [`Stats::record_request`].
    pub fn add_completion(&self, user: &str, completion_tokens: u64) {
        self.add(user, 0, 0, completion_tokens);
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
        let json = serde_json::to_value(&snap).unwrap_or_default();
        assert_eq!(json["requests"], 2);
        assert_eq!(json["by_user"]["a"]["completion_tokens"], 4);
        s.reset();
        assert_eq!(s.snapshot(), Snapshot::default());
    }
}
