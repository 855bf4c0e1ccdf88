//! The rate-limit descriptors of the limits that apply to a request, and the wire encoding of
//! the `CheckRateLimit` request that carries them.

use super::{Applied, Policy};
use crate::config::TokenCategory;
use ratelimit_proto::{Entry, RateLimitDescriptor};

impl Policy {
    /// The descriptor for `CheckRateLimit`: every applied limit and its counters.
    ///
    /// Its entries are `limit.<name>` = `"1"` per applied limit, in `applied` order, then each
    /// counter entry (`<expression text>` = its value) once, the first value of a key winning.
    /// An out-of-range [`Applied::limit`] is skipped.
    pub fn check_descriptor(&self, applied: &[Applied]) -> RateLimitDescriptor {
        self.descriptor(applied.iter())
    }

    /// The descriptor for a `Report` of `category` tokens: only the applied limits that spend
    /// that category (for `cost`, limit `cost_limit` alone: each computes its own cost), or
    /// `None` when none does.
    pub fn report_descriptor(
        &self,
        applied: &[Applied],
        category: TokenCategory,
        cost_limit: Option<usize>,
    ) -> Option<RateLimitDescriptor> {
        let mut matching = applied
            .iter()
            .filter(|a| {
                self.limits.get(a.limit).map(|l| l.tokens) == Some(category)
                    && (category != TokenCategory::Cost || cost_limit == Some(a.limit))
            })
            .peekable();
        matching.peek()?;
        Some(self.descriptor(matching))
    }

    /// The descriptor of `applied`: the limit entries, then each counter entry once.
    pub(super) fn descriptor<'a>(
        &self,
        applied: impl Iterator<Item = &'a Applied>,
    ) -> RateLimitDescriptor {
        let mut entries: Vec<Entry> = Vec::new();
        let mut counter_entries: Vec<Entry> = Vec::new();
        for a in applied {
            let Some(limit) = self.limits.get(a.limit) else {
                continue;
            };
            entries.push(Entry {
                key: limit.entry_key.clone(),
                value: "1".into(),
            });
            for (key, value) in &a.counters {
                if !counter_entries.iter().any(|e| &e.key == key) {
                    counter_entries.push(Entry {
                        key: key.clone(),
                        value: value.clone(),
                    });
                }
            }
        }
        entries.extend(counter_entries);
        RateLimitDescriptor { entries }
    }

    /// The encoded `CheckRateLimit` request (hits_addend 0) for the applied limits: the bytes
    /// of a `RateLimitRequest` with the domain and [`Policy::check_descriptor`], written
    /// directly (the domain encoded once, no entry built).
    pub fn encode_check_request(&self, applied: &[Applied]) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        // (key, value) pairs of the descriptor, as `descriptor` orders them: the limit entries,
        // then each counter entry once.
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(applied.len() * 2);
        let mut counter_pairs: Vec<(&str, &str)> = Vec::new();
        for a in applied {
            if let Some(limit) = self.limits.get(a.limit) {
                pairs.push((limit.entry_key.as_str(), "1"));
                for (key, value) in &a.counters {
                    if !counter_pairs.iter().any(|(k, _)| k == key) {
                        counter_pairs.push((key.as_str(), value.as_str()));
                    }
                }
            }
        }
        pairs.append(&mut counter_pairs);
        let field_len = |s: &str| {
            if s.is_empty() {
                0
            } else {
                1 + encoded_len_varint(s.len() as u64) + s.len()
            }
        };
        let entry_len = |(k, v): &(&str, &str)| field_len(k) + field_len(v);
        let descriptor_len: usize = pairs
            .iter()
            .map(|p| {
                let n = entry_len(p);
                1 + encoded_len_varint(n as u64) + n
            })
            .sum();
        let mut out = Vec::with_capacity(
            self.encoded_domain.len()
                + 1
                + encoded_len_varint(descriptor_len as u64)
                + descriptor_len,
        );
        out.extend_from_slice(&self.encoded_domain);
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(descriptor_len as u64, &mut out);
        for p in &pairs {
            encode_key(1, WireType::LengthDelimited, &mut out);
            encode_varint(entry_len(p) as u64, &mut out);
            for (tag, s) in [(1, p.0), (2, p.1)] {
                if !s.is_empty() {
                    encode_key(tag, WireType::LengthDelimited, &mut out);
                    encode_varint(s.len() as u64, &mut out);
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
        out
    }

    /// What the applied limits spend, as `(category, cost limit)`: each token category once,
    /// with `None`, and each `tokens: cost` limit with its index, in [`TokenCategory`] order
    /// (then limit order). An out-of-range [`Applied::limit`] is skipped.
    pub fn spends_in(&self, applied: &[Applied]) -> Vec<(TokenCategory, Option<usize>)> {
        let mut spends: Vec<(TokenCategory, Option<usize>)> = applied
            .iter()
            .filter_map(|a| {
                let l = self.limits.get(a.limit)?;
                Some((
                    l.tokens,
                    (l.tokens == TokenCategory::Cost).then_some(a.limit),
                ))
            })
            .collect();
        spends.sort();
        spends.dedup();
        spends
    }
}

#[cfg(test)]
mod tests {
    use crate::config::TokenCategory;
    use crate::policy::test_support::{host, TUTORIAL};
    use crate::policy::{Applied, Policy};

    #[test]
    fn report_descriptor_holds_only_the_limits_of_that_category() {
        let p = Policy::from_json(
            TUTORIAL
                .replace(r#"exists(g, g == \"gold\")"#, r#"exists(g, g == \"free\")"#)
                .as_bytes(),
        )
        .unwrap();
        let d = p.evaluate(&mut host("/v1/chat/completions", "u", "free"));
        assert_eq!(d.applied.len(), 2);
        assert_eq!(
            p.spends_in(&d.applied),
            vec![
                (TokenCategory::Total, None),
                (TokenCategory::Completion, None)
            ]
        );
        let total = p
            .report_descriptor(&d.applied, TokenCategory::Total, None)
            .unwrap();
        assert_eq!(total.entries[0].key, "limit.free");
        assert_eq!(total.entries.len(), 2);
        let completion = p
            .report_descriptor(&d.applied, TokenCategory::Completion, None)
            .unwrap();
        assert_eq!(completion.entries[0].key, "limit.gold");
        assert!(p
            .report_descriptor(&d.applied, TokenCategory::Prompt, None)
            .is_none());
        // The check descriptor has both limits and one shared counter entry.
        let check = p.check_descriptor(&d.applied);
        let keys: Vec<&str> = check.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["limit.free", "limit.gold", "auth.identity.userid"]
        );
    }

    #[test]
    fn the_encoded_check_request_is_the_prost_encoding() {
        use prost::Message;
        let p = Policy::from_json(
            TUTORIAL
                .replace(r#"exists(g, g == \"gold\")"#, r#"exists(g, g == \"free\")"#)
                .as_bytes(),
        )
        .unwrap();
        for (user, groups) in [
            ("user-1", "free"),
            ("", "free"),
            ("u", "gold"),
            ("ü", "free"),
        ] {
            let d = p.evaluate(&mut host("/v1/chat/completions", user, groups));
            let want = ratelimit_proto::RateLimitRequest {
                domain: p.service.domain.clone(),
                descriptors: vec![p.check_descriptor(&d.applied)],
                hits_addend: 0,
            }
            .encode_to_vec();
            assert_eq!(p.encode_check_request(&d.applied), want, "{user} {groups}");
        }
        let long = "x".repeat(300);
        let applied = vec![Applied {
            limit: 0,
            counters: vec![("k".into(), long.clone()), ("k".into(), "dup".into())],
            amount: None,
        }];
        let want = ratelimit_proto::RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![p.check_descriptor(&applied)],
            hits_addend: 0,
        }
        .encode_to_vec();
        assert_eq!(p.encode_check_request(&applied), want);
    }
}
