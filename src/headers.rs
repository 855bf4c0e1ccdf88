//! The rate-limit headers of a response, in the format `rateLimitHeaders` chooses, from the
//! rate-limit service's statuses or, when they say nothing (Limitador), from the policy.
//!
//! | format | headers |
//! | --- | --- |
//! | `draft03` | `x-ratelimit-limit: 200`, `x-ratelimit-remaining: 40`, `x-ratelimit-reset: 30` (seconds) |
//! | `openai` | `x-ratelimit-limit-tokens: 200`, `x-ratelimit-remaining-tokens: 40`, `x-ratelimit-reset-tokens: 30s` |
//! | `ietf` | `ratelimit-policy: "gold";q=200;w=60`, `ratelimit: "gold";r=40;t=30` |
//! | `none` | none |
//!
//! Every `429` also carries `retry-after` (whole seconds, rounded up, at least 1) and
//! `retry-after-ms` (milliseconds, rounded up, at least 1; OpenAI's SDKs read it first),
//! whatever the format. The service's `response_headers_to_add` follow, each name once.
//!
//! What is shown is the most restrictive status ([`most_restrictive`]). When there is none (a
//! service that answers no `statuses`, as Limitador does) a `429` shows what the policy knows
//! ([`Known`]): with exactly one rate among the enforced limits that apply, that rate (its
//! limit's name, its size, 0 remaining, the reset within its window); with several, only
//! `retry-after` and `retry-after-ms`, the longest window among them (the filter cannot tell
//! which one refused; each resets within its window). A `200` without statuses carries no
//! rate-limit header: what remains is unknown.

use crate::config::RateLimitHeaders;
use crate::policy::{Applied, Policy};
use ratelimit_proto::{Code, DescriptorStatus, HeaderValue, Unit};

/// One budget of an enforced limit that applies to a request, as the policy configures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownRate {
    /// The limit's name (as the service's statuses name it).
    pub name: String,
    /// Tokens per window.
    pub limit: u64,
    /// Window length in seconds.
    pub window_seconds: u64,
}

/// What the policy tells of a request's headers: the format, and the rates of the enforced
/// limits that apply (shadow limits never refuse, so they are left out).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// Which rate-limit headers responses carry.
    pub format: RateLimitHeaders,
    /// Every rate of every enforced limit in `applied`, in their order.
    pub rates: Vec<KnownRate>,
}

impl Known {
    /// What `policy` tells of a request to which the limits `applied` apply.
    pub fn of(policy: &Policy, applied: &[Applied]) -> Known {
        let rates = applied
            .iter()
            .filter_map(|a| policy.limits.get(a.limit))
            .filter(|l| !l.is_shadow())
            .flat_map(|l| {
                l.rates.iter().map(|r| KnownRate {
                    name: l.name.clone(),
                    limit: r.limit,
                    window_seconds: r.window_seconds,
                })
            })
            .collect();
        Known {
            format: policy.rate_limit_headers,
            rates,
        }
    }

    /// The longest window among [`Known::rates`], in seconds (`None`: no rate).
    pub fn longest_window(&self) -> Option<u64> {
        self.rates.iter().map(|r| r.window_seconds).max()
    }

    /// The one rate of [`Known::rates`], when there is exactly one.
    fn single(&self) -> Option<&KnownRate> {
        match self.rates.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The window (seconds) of limit `name`'s rate of `limit` tokens.
    fn window_of(&self, name: &str, limit: u64) -> Option<u64> {
        self.rates
            .iter()
            .find(|r| r.name == name && r.limit == limit)
            .map(|r| r.window_seconds)
    }
}

/// The status that constrains most: among OVER_LIMIT statuses (when `over`) the one that
/// resets last, otherwise the one with the fewest tokens remaining among those that name a
/// limit. `None`: no such status (Limitador answers none).
pub fn most_restrictive(statuses: &[DescriptorStatus], over: bool) -> Option<&DescriptorStatus> {
    let reset = |s: &DescriptorStatus| s.duration_until_reset.as_ref().map_or(0, |d| d.seconds);
    if over {
        let limited = statuses
            .iter()
            .filter(|s| s.code == Code::OverLimit as i32)
            .max_by_key(|s| reset(s));
        if limited.is_some() {
            return limited;
        }
    }
    statuses
        .iter()
        .filter(|s| s.current_limit.is_some())
        .min_by_key(|s| s.limit_remaining)
}

/// What the headers show of one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shown<'a> {
    /// The limit's name (may be empty when a service does not name it).
    name: &'a str,
    /// Tokens per window, when known.
    limit: Option<u64>,
    /// Tokens left.
    remaining: u64,
    /// Milliseconds until the window resets (rounded up), when known.
    reset_ms: Option<u64>,
    /// The window's length in seconds, when known.
    window_seconds: Option<u64>,
}

impl<'a> Shown<'a> {
    /// A status the service answered; its window from its unit, else from the policy's rate
    /// of that name and size.
    fn of_status(s: &'a DescriptorStatus, known: &Known) -> Shown<'a> {
        let limit = s.current_limit.as_ref();
        let name = limit.map_or("", |l| l.name.as_str());
        let size = limit.map(|l| u64::from(l.requests_per_unit));
        let window_seconds = limit
            .and_then(|l| Unit::try_from(l.unit).ok())
            .and_then(Unit::seconds)
            .or_else(|| size.and_then(|size| known.window_of(name, size)));
        Shown {
            name,
            limit: size,
            remaining: u64::from(s.limit_remaining),
            reset_ms: s.duration_until_reset.as_ref().map(ceil_ms),
            window_seconds,
        }
    }

    /// A refusal that the service did not explain: the policy's rate, spent, resetting within
    /// its window.
    fn of_rate(r: &'a KnownRate) -> Shown<'a> {
        Shown {
            name: &r.name,
            limit: Some(r.limit),
            remaining: 0,
            reset_ms: Some(r.window_seconds.saturating_mul(1000)),
            window_seconds: Some(r.window_seconds),
        }
    }
}

/// Milliseconds of a `google.protobuf.Duration` from an untrusted peer, rounded up (a client
/// that waits this long finds the window reset); negative parts count as 0, the sum saturates.
fn ceil_ms(d: &prost_types::Duration) -> u64 {
    let nanos = u64::try_from(d.nanos.max(0)).unwrap_or(0);
    u64::try_from(d.seconds.max(0))
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(nanos.div_ceil(1_000_000))
}

/// Whole seconds of `ms`, rounded up.
fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// The headers to add to a response: the rate-limit headers of `known.format` from the most
/// restrictive of `statuses` (on a `429`, when `limited`, from the policy when the statuses
/// say nothing), `retry-after` (seconds) and `retry-after-ms` when `limited`, then the service's
/// headers `to_add` whose names are not taken yet. Names are lowercase; values as in the
/// module's table.
pub fn render(
    known: &Known,
    statuses: &[DescriptorStatus],
    to_add: &[HeaderValue],
    limited: bool,
) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    let shown = match most_restrictive(statuses, limited) {
        Some(s) => Some(Shown::of_status(s, known)),
        None if limited => known.single().map(Shown::of_rate),
        None => None,
    };
    if let Some(shown) = &shown {
        rate_limit_headers(known.format, shown, &mut headers);
    }
    if limited {
        let ms = shown
            .and_then(|s| s.reset_ms)
            .or_else(|| known.longest_window().map(|w| w.saturating_mul(1000)))
            .unwrap_or(1000);
        headers.push(("retry-after".into(), ceil_secs(ms).max(1).to_string()));
        headers.push(("retry-after-ms".into(), ms.max(1).to_string()));
    }
    for h in to_add {
        let value = if h.value.is_empty() && !h.raw_value.is_empty() {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        } else {
            h.value.clone()
        };
        let key = h.key.to_ascii_lowercase();
        if !key.is_empty() && !headers.iter().any(|(k, _)| *k == key) {
            headers.push((key, value));
        }
    }
    headers
}

/// Pushes the rate-limit headers of `format` showing `shown`.
fn rate_limit_headers(
    format: RateLimitHeaders,
    shown: &Shown<'_>,
    headers: &mut Vec<(String, String)>,
) {
    let mut push = |name: &str, value: String| headers.push((name.to_string(), value));
    match format {
        RateLimitHeaders::Draft03 => {
            if let Some(limit) = shown.limit {
                push("x-ratelimit-limit", limit.to_string());
            }
            push("x-ratelimit-remaining", shown.remaining.to_string());
            if let Some(ms) = shown.reset_ms {
                push("x-ratelimit-reset", ceil_secs(ms).to_string());
            }
        }
        RateLimitHeaders::Openai => {
            if let Some(limit) = shown.limit {
                push("x-ratelimit-limit-tokens", limit.to_string());
            }
            push("x-ratelimit-remaining-tokens", shown.remaining.to_string());
            if let Some(ms) = shown.reset_ms {
                push("x-ratelimit-reset-tokens", openai_duration(ms));
            }
        }
        RateLimitHeaders::Ietf => {
            let name = sf_string(if shown.name.is_empty() {
                DEFAULT_POLICY_NAME
            } else {
                shown.name
            });
            if let Some(limit) = shown.limit {
                let window = shown
                    .window_seconds
                    .filter(|w| *w > 0)
                    .map_or(String::new(), |w| format!(";w={w}"));
                push("ratelimit-policy", format!("{name};q={limit}{window}"));
            }
            let reset = shown
                .reset_ms
                .map_or(String::new(), |ms| format!(";t={}", ceil_secs(ms)));
            push("ratelimit", format!("{name};r={}{reset}", shown.remaining));
        }
        RateLimitHeaders::None => {}
    }
}

/// The policy name of the `ietf` headers when the service's status names no limit.
pub const DEFAULT_POLICY_NAME: &str = "default";

/// `text` as a structured-field String (RFC 8941 §3.3.3): quoted, `"` and `\` escaped,
/// characters outside printable ASCII left out.
fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `ms` milliseconds in the duration format of OpenAI's `x-ratelimit-reset-*` headers, Go's
/// `time.Duration` text at millisecond precision: `0s`, `20ms` below a second, else
/// `[<h>h][<m>m]<s>[.<fraction>]s` with minutes written once there are hours (`1.5s`, `6m0s`,
/// `1h0m0.25s`). Source: OpenAI's API guide "Rate limits", section "Rate limits in headers"
/// (`x-ratelimit-reset-requests: 1s`, `x-ratelimit-reset-tokens: 6m0s`; live answers also
/// show `12ms`, `9ms`).
pub fn openai_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let hours = ms / 3_600_000;
    let minutes = ms / 60_000 % 60;
    let seconds = ms / 1000 % 60;
    let fraction = ms % 1000;
    let mut out = String::new();
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if hours > 0 || minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    out.push_str(&seconds.to_string());
    if fraction > 0 {
        let digits = format!("{fraction:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratelimit_proto::RateLimit;

    /// A status of limit `name` (`limit` tokens per `unit`), `remaining` left, resetting in
    /// `reset_ms` milliseconds.
    fn status(
        code: Code,
        name: &str,
        limit: u32,
        unit: Unit,
        remaining: u32,
        reset_ms: u64,
    ) -> DescriptorStatus {
        DescriptorStatus {
            code: code as i32,
            current_limit: Some(RateLimit {
                name: name.into(),
                requests_per_unit: limit,
                unit: unit as i32,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(ratelimit_proto::duration(
                std::time::Duration::from_millis(reset_ms),
            )),
        }
    }

    fn rate(name: &str, limit: u64, window_seconds: u64) -> KnownRate {
        KnownRate {
            name: name.into(),
            limit,
            window_seconds,
        }
    }

    fn known(format: RateLimitHeaders, rates: Vec<KnownRate>) -> Known {
        Known { format, rates }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// gold: 40 of 200 per minute left, resetting in 29.2 s; an OK answer.
    fn ok_gold() -> Vec<DescriptorStatus> {
        vec![status(Code::Ok, "gold", 200, Unit::Minute, 40, 29_200)]
    }

    /// gold spent, resetting in 29.2 s; an OVER_LIMIT answer.
    fn over_gold() -> Vec<DescriptorStatus> {
        vec![status(
            Code::OverLimit,
            "gold",
            200,
            Unit::Minute,
            0,
            29_200,
        )]
    }

    fn gold() -> Vec<KnownRate> {
        vec![rate("gold", 200, 60)]
    }

    #[test]
    fn each_format_shows_the_status_on_a_200_and_a_429() {
        for (format, ok, over) in [
            (
                // Seconds rounded up.
                RateLimitHeaders::Draft03,
                [
                    ("x-ratelimit-limit", "200"),
                    ("x-ratelimit-remaining", "40"),
                    ("x-ratelimit-reset", "30"),
                ],
                [
                    ("x-ratelimit-limit", "200"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "30"),
                ],
            ),
            (
                // A Go duration.
                RateLimitHeaders::Openai,
                [
                    ("x-ratelimit-limit-tokens", "200"),
                    ("x-ratelimit-remaining-tokens", "40"),
                    ("x-ratelimit-reset-tokens", "29.2s"),
                ],
                [
                    ("x-ratelimit-limit-tokens", "200"),
                    ("x-ratelimit-remaining-tokens", "0"),
                    ("x-ratelimit-reset-tokens", "29.2s"),
                ],
            ),
        ] {
            let k = known(format, gold());
            assert_eq!(render(&k, &ok_gold(), &[], false), pairs(&ok), "{format:?}");
            let mut over = over.to_vec();
            over.extend([("retry-after", "30"), ("retry-after-ms", "29200")]);
            assert_eq!(
                render(&k, &over_gold(), &[], true),
                pairs(&over),
                "{format:?}"
            );
        }
        // Structured fields: the policy, then the service limit.
        let k = known(RateLimitHeaders::Ietf, gold());
        assert_eq!(
            render(&k, &ok_gold(), &[], false),
            pairs(&[
                ("ratelimit-policy", r#""gold";q=200;w=60"#),
                ("ratelimit", r#""gold";r=40;t=30"#),
            ])
        );
        assert_eq!(
            render(&k, &over_gold(), &[], true),
            pairs(&[
                ("ratelimit-policy", r#""gold";q=200;w=60"#),
                ("ratelimit", r#""gold";r=0;t=30"#),
                ("retry-after", "30"),
                ("retry-after-ms", "29200"),
            ])
        );
    }

    #[test]
    fn ietf_takes_a_window_that_is_no_unit_from_the_policy_and_quotes_odd_names() {
        // A 5 s window is no Unit: the service says UNKNOWN, the policy knows it.
        let k = known(RateLimitHeaders::Ietf, vec![rate("gold", 200, 5)]);
        let s = vec![status(Code::Ok, "gold", 200, Unit::Unknown, 7, 1_000)];
        assert_eq!(
            render(&k, &s, &[], false),
            pairs(&[
                ("ratelimit-policy", r#""gold";q=200;w=5"#),
                ("ratelimit", r#""gold";r=7;t=1"#),
            ])
        );
        // Not in the policy (another size): no window.
        let s = vec![status(Code::Ok, "gold", 300, Unit::Unknown, 7, 1_000)];
        assert_eq!(
            render(&k, &s, &[], false)[0],
            ("ratelimit-policy".into(), r#""gold";q=300"#.into())
        );
        let s = vec![status(
            Code::Ok,
            "a\"b\\c\u{e9}",
            300,
            Unit::Second,
            7,
            1_000,
        )];
        assert_eq!(
            render(&k, &s, &[], false)[1],
            ("ratelimit".into(), r#""a\"b\\c";r=7;t=1"#.into())
        );
        let s = vec![status(Code::Ok, "", 300, Unit::Second, 7, 1_000)];
        assert_eq!(
            render(&k, &s, &[], false)[1],
            ("ratelimit".into(), r#""default";r=7;t=1"#.into())
        );
    }

    #[test]
    fn none_shows_no_rate_limit_header_but_a_429_still_says_when_to_retry() {
        let k = known(RateLimitHeaders::None, gold());
        assert!(render(&k, &ok_gold(), &[], false).is_empty());
        assert_eq!(
            render(&k, &over_gold(), &[], true),
            pairs(&[("retry-after", "30"), ("retry-after-ms", "29200")])
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        let k = known(RateLimitHeaders::None, gold());
        for (reset_ms, secs, ms) in [
            (0, "1", "1"),
            (1, "1", "1"),
            (999, "1", "999"),
            (1_000, "1", "1000"),
            (1_001, "2", "1001"),
            (59_000, "59", "59000"),
        ] {
            let s = vec![status(
                Code::OverLimit,
                "gold",
                200,
                Unit::Minute,
                0,
                reset_ms,
            )];
            assert_eq!(
                render(&k, &s, &[], true),
                pairs(&[("retry-after", secs), ("retry-after-ms", ms)]),
                "{reset_ms} ms"
            );
        }
        // A reset of 1.0000001 s: the nanoseconds round the milliseconds up too.
        let mut s = over_gold();
        s[0].duration_until_reset = Some(prost_types::Duration {
            seconds: 1,
            nanos: 100,
        });
        assert_eq!(
            render(&k, &s, &[], true),
            pairs(&[("retry-after", "2"), ("retry-after-ms", "1001")])
        );
    }

    #[test]
    fn behind_limitador_a_429_shows_the_one_enforced_rate_spent_within_its_window() {
        // Limitador answers OVER_LIMIT without statuses.
        for (format, expected) in [
            (
                RateLimitHeaders::Draft03,
                vec![
                    ("x-ratelimit-limit", "200"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", "60"),
                ],
            ),
            (
                RateLimitHeaders::Openai,
                vec![
                    ("x-ratelimit-limit-tokens", "200"),
                    ("x-ratelimit-remaining-tokens", "0"),
                    ("x-ratelimit-reset-tokens", "1m0s"),
                ],
            ),
            (
                RateLimitHeaders::Ietf,
                vec![
                    ("ratelimit-policy", r#""gold";q=200;w=60"#),
                    ("ratelimit", r#""gold";r=0;t=60"#),
                ],
            ),
            (RateLimitHeaders::None, vec![]),
        ] {
            let mut expected = expected;
            expected.extend([("retry-after", "60"), ("retry-after-ms", "60000")]);
            assert_eq!(
                render(&known(format, gold()), &[], &[], true),
                pairs(&expected),
                "{format:?}"
            );
        }
        // Its OK answer says nothing of what remains: no header.
        assert!(render(&known(RateLimitHeaders::Ietf, gold()), &[], &[], false).is_empty());
    }

    #[test]
    fn behind_limitador_several_rates_give_only_the_longest_window_to_wait() {
        let k = known(
            RateLimitHeaders::Openai,
            vec![
                rate("gold", 200, 60),
                rate("gold", 5000, 3600),
                rate("all", 10, 1),
            ],
        );
        assert_eq!(
            render(&k, &[], &[], true),
            pairs(&[("retry-after", "3600"), ("retry-after-ms", "3600000")])
        );
        // Nothing known at all (no enforced limit applies): the least, 1 s.
        assert_eq!(
            render(&known(RateLimitHeaders::Openai, vec![]), &[], &[], true),
            pairs(&[("retry-after", "1"), ("retry-after-ms", "1000")])
        );
        // A status without its reset: the policy's window.
        let mut s = over_gold();
        s[0].duration_until_reset = None;
        assert_eq!(
            render(&k, &s, &[], true),
            pairs(&[
                ("x-ratelimit-limit-tokens", "200"),
                ("x-ratelimit-remaining-tokens", "0"),
                ("retry-after", "3600"),
                ("retry-after-ms", "3600000"),
            ])
        );
    }

    #[test]
    fn the_services_headers_follow_each_name_once() {
        let to_add = [
            HeaderValue {
                key: "X-RateLimit-Remaining".into(),
                value: "1".into(),
                raw_value: Vec::new(),
            },
            HeaderValue {
                key: "X-Served-By".into(),
                value: String::new(),
                raw_value: b"rls".to_vec(),
            },
        ];
        let k = known(RateLimitHeaders::Draft03, gold());
        assert_eq!(
            render(&k, &ok_gold(), &to_add, false),
            pairs(&[
                ("x-ratelimit-limit", "200"),
                ("x-ratelimit-remaining", "40"),
                ("x-ratelimit-reset", "30"),
                ("x-served-by", "rls"),
            ])
        );
        let k = known(RateLimitHeaders::None, gold());
        assert_eq!(
            render(&k, &ok_gold(), &to_add, false),
            pairs(&[("x-ratelimit-remaining", "1"), ("x-served-by", "rls")])
        );
    }

    #[test]
    fn openai_durations_read_as_gos() {
        for (ms, text) in [
            (0, "0s"),
            (1, "1ms"),
            (20, "20ms"),
            (999, "999ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (1_250, "1.25s"),
            (1_005, "1.005s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (61_500, "1m1.5s"),
            (360_000, "6m0s"),
            (3_600_000, "1h0m0s"),
            (3_600_250, "1h0m0.25s"),
            (5_430_000, "1h30m30s"),
            (86_400_000, "24h0m0s"),
        ] {
            assert_eq!(openai_duration(ms), text, "{ms} ms");
        }
    }

    #[test]
    fn shadow_limits_are_not_known_and_rates_come_in_order() {
        let p = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "rl", "domain": "llm"}, "rateLimitHeaders": "ietf",
                 "limits": {
                   "a": {"rates": [{"limit": 100, "window": "1m"}, {"limit": 1000, "window": "1h"}]},
                   "b": {"rates": [{"limit": 5, "window": "1s"}], "enforcement": "shadow"}}}"#,
        )
        .unwrap();
        let applied: Vec<Applied> = (0..2)
            .map(|limit| Applied {
                limit,
                counters: Vec::new(),
                amount: None,
            })
            .collect();
        let k = Known::of(&p, &applied);
        assert_eq!(k.format, RateLimitHeaders::Ietf);
        assert_eq!(k.rates, vec![rate("a", 100, 60), rate("a", 1000, 3600)]);
        assert_eq!(k.longest_window(), Some(3600));
        assert_eq!(Known::of(&p, &applied[1..]).rates, vec![]);
    }
}
