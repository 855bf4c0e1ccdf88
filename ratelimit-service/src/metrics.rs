//! Counters served at `GET /metrics` in the Prometheus text format (version 0.0.4).
//!
//! Limitador's names and labels:
//! - `limitador_up` (gauge, always 1),
//! - `authorized_calls{limitador_namespace}`: `CheckRateLimit`, `ShouldRateLimit` and `Reserve`
//!   calls answered `OK`,
//! - `authorized_hits{limitador_namespace}`: hits added by `ShouldRateLimit` (when admitted), by
//!   `Report` and by `Commit`,
//! - `limited_calls{limitador_namespace, limit_name}`: calls answered `OVER_LIMIT`, labelled with
//!   the name of the limit that was hit (empty when it has none). Limitador adds `limit_name`
//!   only with `--limit-name-in-labels`; this service always does.
//!
//! This service's own:
//! - `ratelimit_check_calls_total`: `CheckRateLimit` calls received,
//! - `ratelimit_report_calls_total`: `Report` calls received,
//! - `ratelimit_should_rate_limit_calls_total`: `ShouldRateLimit` calls received,
//! - `ratelimit_reported_hits_total{limitador_namespace}`: the sum of `hits_addend` of the
//!   `Report` calls applied (0 counted as 1), i.e. tokens reported,
//! - `ratelimit_reserve_calls_total`, `ratelimit_commit_calls_total`: `Reserve` and `Commit`
//!   calls received (also those answered `UNIMPLEMENTED`),
//! - `ratelimit_reserved_hits_total{limitador_namespace}`: the sum of the amounts `Reserve`
//!   held (after the fraction clamp; refused reserves hold nothing),
//! - `ratelimit_committed_hits_total{limitador_namespace}`: the sum of `actual_amount` of the
//!   `Commit` calls applied (a retried commit the service ignored is not counted),
//! - `ratelimit_commit_duplicates_total`: `Commit` calls ignored because their reservation id
//!   was committed already,
//! - `ratelimit_storage_errors_total`: calls answered `UNAVAILABLE` (or HTTP 503) because the
//!   counters' storage failed (Redis unreachable or timed out), see [`crate::storage`],
//! - `ratelimit_reservations_outstanding` (gauge): reservations with a live hold (neither
//!   committed nor expired), and `ratelimit_reserved_hits_outstanding` (gauge): the sum of their
//!   held amounts, see [`crate::reservations`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::reservations::Outstanding;

#[derive(Default)]
struct Inner {
    authorized_calls: BTreeMap<String, u64>,
    authorized_hits: BTreeMap<String, u64>,
    limited_calls: BTreeMap<(String, String), u64>,
    check_calls: u64,
    report_calls: u64,
    should_rate_limit_calls: u64,
    reported_hits: BTreeMap<String, u64>,
    reserve_calls: u64,
    commit_calls: u64,
    reserved_hits: BTreeMap<String, u64>,
    committed_hits: BTreeMap<String, u64>,
    commit_duplicates: u64,
    storage_errors: u64,
}

/// The service's counters, shared by the gRPC handlers and the HTTP API.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A poisoned lock only means a panic elsewhere while counting: keep counting.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// A `CheckRateLimit` call was received.
    pub fn check_call(&self) {
        self.with(|m| m.check_calls += 1);
    }

    /// A `Report` call was received.
    pub fn report_call(&self) {
        self.with(|m| m.report_calls += 1);
    }

    /// A `ShouldRateLimit` call was received.
    pub fn should_rate_limit_call(&self) {
        self.with(|m| m.should_rate_limit_calls += 1);
    }

    /// A `Reserve` call was received.
    pub fn reserve_call(&self) {
        self.with(|m| m.reserve_calls += 1);
    }

    /// A `Commit` call was received.
    pub fn commit_call(&self) {
        self.with(|m| m.commit_calls += 1);
    }

    /// A `Reserve` in `namespace` held `amount` (it was also counted as authorized).
    pub fn reserved(&self, namespace: &str, amount: u64) {
        self.with(|m| {
            *m.reserved_hits.entry(namespace.to_string()).or_default() += amount;
        });
    }

    /// A `Commit` in `namespace` added `amount`.
    pub fn committed(&self, namespace: &str, amount: u64) {
        self.with(|m| {
            *m.committed_hits.entry(namespace.to_string()).or_default() += amount;
            *m.authorized_hits.entry(namespace.to_string()).or_default() += amount;
        });
    }

    /// A `Commit` was ignored: its reservation id was committed already.
    pub fn commit_duplicate(&self) {
        self.with(|m| m.commit_duplicates += 1);
    }

    /// A call failed because the counters' storage did.
    pub fn storage_error(&self) {
        self.with(|m| m.storage_errors += 1);
    }

    /// A call in `namespace` was answered `OK`; `hits` were added (0 for a check).
    pub fn authorized(&self, namespace: &str, hits: u64) {
        self.with(|m| {
            *m.authorized_calls.entry(namespace.to_string()).or_default() += 1;
            if hits > 0 {
                *m.authorized_hits.entry(namespace.to_string()).or_default() += hits;
            }
        });
    }

    /// A call in `namespace` was answered `OVER_LIMIT` because of the limit named `limit_name`.
    pub fn limited(&self, namespace: &str, limit_name: Option<&str>) {
        self.with(|m| {
            *m.limited_calls
                .entry((namespace.to_string(), limit_name.unwrap_or("").to_string()))
                .or_default() += 1;
        });
    }

    /// A `Report` in `namespace` added `hits` (already 1 for a `hits_addend` of 0).
    pub fn reported(&self, namespace: &str, hits: u64) {
        self.with(|m| {
            *m.reported_hits.entry(namespace.to_string()).or_default() += hits;
            *m.authorized_hits.entry(namespace.to_string()).or_default() += hits;
        });
    }

    /// The Prometheus text exposition of every counter, and of the `outstanding` reservations
    /// as gauges.
    pub fn render(&self, outstanding: Outstanding) -> String {
        self.with(|m| {
            let mut out = String::new();
            header(&mut out, "limitador_up", "gauge", "Limitador is running");
            out.push_str("limitador_up 1\n");

            header(&mut out, "authorized_calls", "counter", "Authorized calls");
            for (ns, n) in &m.authorized_calls {
                let _ = writeln!(
                    out,
                    "authorized_calls{{limitador_namespace=\"{}\"}} {n}",
                    esc(ns)
                );
            }
            header(&mut out, "authorized_hits", "counter", "Authorized hits");
            for (ns, n) in &m.authorized_hits {
                let _ = writeln!(
                    out,
                    "authorized_hits{{limitador_namespace=\"{}\"}} {n}",
                    esc(ns)
                );
            }
            header(&mut out, "limited_calls", "counter", "Limited calls");
            for ((ns, name), n) in &m.limited_calls {
                let _ = writeln!(
                    out,
                    "limited_calls{{limitador_namespace=\"{}\",limit_name=\"{}\"}} {n}",
                    esc(ns),
                    esc(name)
                );
            }

            header(
                &mut out,
                "ratelimit_check_calls_total",
                "counter",
                "CheckRateLimit calls received",
            );
            let _ = writeln!(out, "ratelimit_check_calls_total {}", m.check_calls);
            header(
                &mut out,
                "ratelimit_report_calls_total",
                "counter",
                "Report calls received",
            );
            let _ = writeln!(out, "ratelimit_report_calls_total {}", m.report_calls);
            header(
                &mut out,
                "ratelimit_should_rate_limit_calls_total",
                "counter",
                "ShouldRateLimit calls received",
            );
            let _ = writeln!(
                out,
                "ratelimit_should_rate_limit_calls_total {}",
                m.should_rate_limit_calls
            );
            header(
                &mut out,
                "ratelimit_reported_hits_total",
                "counter",
                "Sum of hits_addend applied by Report (0 counted as 1)",
            );
            for (ns, n) in &m.reported_hits {
                let _ = writeln!(
                    out,
                    "ratelimit_reported_hits_total{{limitador_namespace=\"{}\"}} {n}",
                    esc(ns)
                );
            }

            header(
                &mut out,
                "ratelimit_reserve_calls_total",
                "counter",
                "Reserve calls received",
            );
            let _ = writeln!(out, "ratelimit_reserve_calls_total {}", m.reserve_calls);
            header(
                &mut out,
                "ratelimit_commit_calls_total",
                "counter",
                "Commit calls received",
            );
            let _ = writeln!(out, "ratelimit_commit_calls_total {}", m.commit_calls);
            header(
                &mut out,
                "ratelimit_reserved_hits_total",
                "counter",
                "Sum of the amounts held by Reserve",
            );
            for (ns, n) in &m.reserved_hits {
                let _ = writeln!(
                    out,
                    "ratelimit_reserved_hits_total{{limitador_namespace=\"{}\"}} {n}",
                    esc(ns)
                );
            }
            header(
                &mut out,
                "ratelimit_committed_hits_total",
                "counter",
                "Sum of actual_amount applied by Commit",
            );
            for (ns, n) in &m.committed_hits {
                let _ = writeln!(
                    out,
                    "ratelimit_committed_hits_total{{limitador_namespace=\"{}\"}} {n}",
                    esc(ns)
                );
            }
            header(
                &mut out,
                "ratelimit_commit_duplicates_total",
                "counter",
                "Commit calls ignored: reservation id already committed",
            );
            let _ = writeln!(
                out,
                "ratelimit_commit_duplicates_total {}",
                m.commit_duplicates
            );
            header(
                &mut out,
                "ratelimit_storage_errors_total",
                "counter",
                "Calls that failed because the counters' storage did",
            );
            let _ = writeln!(out, "ratelimit_storage_errors_total {}", m.storage_errors);
            header(
                &mut out,
                "ratelimit_reservations_outstanding",
                "gauge",
                "Reservations with a live hold",
            );
            let _ = writeln!(
                out,
                "ratelimit_reservations_outstanding {}",
                outstanding.reservations
            );
            header(
                &mut out,
                "ratelimit_reserved_hits_outstanding",
                "gauge",
                "Sum of the amounts held by live reservations",
            );
            let _ = writeln!(
                out,
                "ratelimit_reserved_hits_outstanding {}",
                outstanding.amount
            );
            out
        })
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escapes a label value for the text format: backslash, double quote and newline.
fn esc(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_escaped_labels() {
        let m = Metrics::default();
        m.check_call();
        m.check_call();
        m.report_call();
        m.authorized("llm", 0);
        m.limited("llm", Some("free \"tier\""));
        m.limited("llm", None);
        m.reported("llm", 7);
        m.reported("llm", 1);
        let text = m.render(Outstanding::default());
        assert!(text.contains("ratelimit_check_calls_total 2\n"), "{text}");
        assert!(text.contains("ratelimit_report_calls_total 1\n"), "{text}");
        assert!(
            text.contains("authorized_calls{limitador_namespace=\"llm\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("authorized_hits{limitador_namespace=\"llm\"} 8\n"),
            "{text}"
        );
        assert!(text.contains(
            "limited_calls{limitador_namespace=\"llm\",limit_name=\"free \\\"tier\\\"\"} 1\n"
        ));
        assert!(text.contains("limited_calls{limitador_namespace=\"llm\",limit_name=\"\"} 1\n"));
        assert!(text.contains("ratelimit_reported_hits_total{limitador_namespace=\"llm\"} 8\n"));
        assert!(text.contains("# TYPE ratelimit_reported_hits_total counter\n"));
        assert!(text.contains("ratelimit_reserve_calls_total 0\n"), "{text}");
        assert!(
            text.contains("ratelimit_reservations_outstanding 0\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_reservation_counters_and_gauges() {
        let m = Metrics::default();
        m.reported("llm", 8);
        m.reserve_call();
        m.commit_call();
        m.commit_call();
        m.reserved("llm", 5);
        m.committed("llm", 3);
        m.commit_duplicate();
        m.storage_error();
        let text = m.render(Outstanding {
            reservations: 2,
            amount: 9,
        });
        assert!(text.contains("ratelimit_reserve_calls_total 1\n"), "{text}");
        assert!(text.contains("ratelimit_commit_calls_total 2\n"), "{text}");
        assert!(text.contains("ratelimit_reserved_hits_total{limitador_namespace=\"llm\"} 5\n"));
        assert!(text.contains("ratelimit_committed_hits_total{limitador_namespace=\"llm\"} 3\n"));
        assert!(
            text.contains("authorized_hits{limitador_namespace=\"llm\"} 11\n"),
            "commits add to authorized_hits: {text}"
        );
        assert!(text.contains("ratelimit_commit_duplicates_total 1\n"));
        assert!(text.contains("ratelimit_storage_errors_total 1\n"));
        assert!(text.contains("# TYPE ratelimit_reservations_outstanding gauge\n"));
        assert!(text.contains("ratelimit_reservations_outstanding 2\n"));
        assert!(text.contains("ratelimit_reserved_hits_outstanding 9\n"));
    }
}
