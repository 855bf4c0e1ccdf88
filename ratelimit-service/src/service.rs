//! The rate-limit logic behind the gRPC methods, with Limitador's semantics.
//!
//! - `CheckRateLimit` never writes: `OVER_LIMIT` once any counter that applies is at or over its
//!   maximum (`is_rate_limited(.., 1)`, as Limitador does; `hits_addend` is ignored).
//! - `Report` always adds `hits_addend` (0 counts as 1) to every counter that applies, even past
//!   its maximum, and answers `OK`.
//! - `ShouldRateLimit` checks whether `hits_addend` (0 counts as 1) more fits in every counter
//!   and, if so, adds it, in one step.
//! - An empty domain answers `UNKNOWN`; descriptors that no limit matches answer `OK`.
//!
//! The CEL context is Limitador's: one variable `descriptors`, a list with one string map per
//! request descriptor (a key repeated within a descriptor keeps its last value).
//!
//! Responses also carry `statuses`, one per request descriptor: the most restrictive counter
//! (lowest remaining, then latest reset) among those that apply to that descriptor alone (the
//! other descriptors hidden as empty maps), with `current_limit` = `{name, requests_per_unit =
//! max_value, unit}` (`UNKNOWN` when the window is not exactly one unit), `limit_remaining` and
//! `duration_until_reset`. A descriptor no counter applies to gets a bare status with its code.
//! `CheckRateLimit` shows the counters before any hit, `Report` and `ShouldRateLimit` after
//! their hits. A `Report` status's code is always `OK` (the hits were taken).

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use limitador::counter::Counter;
use limitador::errors::LimitadorError;
use limitador::limit::{Context, Limit, Namespace};
use limitador::{CheckResult, RateLimiter};
use ratelimit_proto::{
    Code, DescriptorStatus, HeaderValue, RateLimit, RateLimitDescriptor, RateLimitRequest,
    RateLimitResponse, Unit,
};
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::proto::{envoy, kuadrant};

/// State shared by the gRPC services and the HTTP API: the limiter holding limits and counters,
/// the metrics, and the testing delay.
pub struct Core {
    limiter: RateLimiter,
    metrics: Metrics,
    delay: Duration,
    rate_limit_headers: bool,
}

impl Core {
    /// A core with `limits` loaded in an in-memory limiter holding at most `cache_size`
    /// qualified counters (counters of limits with `variables`; past that, the cache evicts
    /// some), answering every gRPC call after `delay`, and adding Limitador's
    /// `X-RateLimit-*` headers (draft 03) to `ShouldRateLimit` answers when `rate_limit_headers`.
    pub fn new(
        limits: Vec<Limit>,
        cache_size: u64,
        delay: Duration,
        rate_limit_headers: bool,
    ) -> Self {
        let limiter = RateLimiter::new(cache_size);
        for limit in limits {
            limiter.add_limit(limit);
        }
        Self {
            limiter,
            metrics: Metrics::default(),
            delay,
            rate_limit_headers,
        }
    }

    /// The limiter, for the HTTP API (`/limits`, `/counters`).
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The metrics, for the HTTP API (`/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    async fn delay(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }

    /// `CheckRateLimit`: is one more hit allowed? Never writes.
    pub fn check(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        self.metrics.check_call();
        if req.domain.is_empty() {
            return Ok(unknown());
        }
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        let result = guarded(|| self.limiter.is_rate_limited(&ns, &ctx, 1))?;
        let code = if result.limited {
            self.metrics
                .limited(&req.domain, result.limit_name.as_deref());
            Code::OverLimit
        } else {
            self.metrics.authorized(&req.domain, 0);
            Code::Ok
        };
        let statuses = if req.descriptors.len() == 1 {
            vec![status(&result.counters, code)]
        } else {
            self.per_descriptor(&ns, &req.descriptors, 1, |r| limited_code(r.limited))?
        };
        Ok(response(code, statuses, Vec::new()))
    }

    /// `Report`: adds the hits (0 counts as 1) to every counter that applies, even past its
    /// maximum. Answers `OK`.
    pub fn report(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        self.metrics.report_call();
        if req.domain.is_empty() {
            return Ok(unknown());
        }
        let hits = hits(req);
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        guarded(|| self.limiter.update_counters(&ns, &ctx, hits))?;
        self.metrics.reported(&req.domain, hits);
        let statuses = if req.descriptors.len() == 1 {
            let after = guarded(|| self.limiter.is_rate_limited(&ns, &ctx, 1))?;
            vec![status(&after.counters, Code::Ok)]
        } else {
            self.per_descriptor(&ns, &req.descriptors, 1, |_| Code::Ok)?
        };
        Ok(response(Code::Ok, statuses, Vec::new()))
    }

    /// `ShouldRateLimit`: if the hits (0 counts as 1) fit in every counter that applies, adds
    /// them and answers `OK`; otherwise adds nothing and answers `OVER_LIMIT`.
    pub fn should_rate_limit(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        self.metrics.should_rate_limit_call();
        if req.domain.is_empty() {
            return Ok(unknown());
        }
        let hits = hits(req);
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        // With several descriptors, each one's own verdict is taken before the update.
        let before = if req.descriptors.len() > 1 {
            Some(self.per_descriptor_results(&ns, &req.descriptors, hits)?)
        } else {
            None
        };
        let mut result = guarded(|| self.limiter.check_rate_limited_and_update(&ns, &ctx, hits))?;
        let code = if result.limited {
            self.metrics
                .limited(&req.domain, result.limit_name.as_deref());
            Code::OverLimit
        } else {
            self.metrics.authorized(&req.domain, hits);
            Code::Ok
        };
        let statuses = match before {
            None => vec![status(&result.counters, code)],
            Some(results) => results
                .into_iter()
                .map(|mut r| {
                    let own = limited_code(r.limited && result.limited);
                    if !result.limited {
                        for counter in r.counters.iter_mut() {
                            if let Some(remaining) = counter.remaining() {
                                counter.set_remaining(remaining.saturating_sub(hits));
                            }
                        }
                    }
                    status(&r.counters, own)
                })
                .collect(),
        };
        let headers = if self.rate_limit_headers {
            let mut headers: Vec<HeaderValue> = result
                .response_header()
                .into_iter()
                .map(|(key, value)| HeaderValue {
                    key,
                    value,
                    raw_value: Vec::new(),
                })
                .collect();
            headers.sort_by(|a, b| a.key.cmp(&b.key));
            headers
        } else {
            Vec::new()
        };
        Ok(response(code, statuses, headers))
    }

    /// Read-only check of each descriptor alone (the others hidden as empty maps).
    fn per_descriptor_results(
        &self,
        ns: &Namespace,
        descriptors: &[RateLimitDescriptor],
        delta: u64,
    ) -> Result<Vec<CheckResult>, Status> {
        (0..descriptors.len())
            .map(|i| {
                let ctx = context(descriptors, Some(i));
                guarded(|| self.limiter.is_rate_limited(ns, &ctx, delta))
            })
            .collect()
    }

    fn per_descriptor(
        &self,
        ns: &Namespace,
        descriptors: &[RateLimitDescriptor],
        delta: u64,
        code: impl Fn(&CheckResult) -> Code,
    ) -> Result<Vec<DescriptorStatus>, Status> {
        Ok(self
            .per_descriptor_results(ns, descriptors, delta)?
            .iter()
            .map(|r| status(&r.counters, code(r)))
            .collect())
    }
}

/// Hits to add: `hits_addend`, 0 counting as 1 (Envoy's and Limitador's rule).
fn hits(req: &RateLimitRequest) -> u64 {
    u64::from(req.hits_addend.max(1))
}

fn limited_code(limited: bool) -> Code {
    if limited {
        Code::OverLimit
    } else {
        Code::Ok
    }
}

/// Limitador's CEL context: `descriptors` = one string map per descriptor. With `only = Some(i)`
/// every other descriptor is an empty map (indices are kept, so `descriptors[i]` still names it).
fn context(descriptors: &[RateLimitDescriptor], only: Option<usize>) -> Context<'static> {
    let values = descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if only.is_some_and(|o| o != i) {
                return HashMap::new();
            }
            d.entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect::<HashMap<String, String>>()
        })
        .collect();
    let mut ctx = Context::default();
    ctx.list_binding("descriptors".to_string(), values);
    ctx
}

/// Runs a limiter call, turning its errors and panics into a gRPC error instead of a dropped
/// connection. The limitador crate panics when a condition fails to evaluate on a request (for
/// example `descriptors[1]['x'] == '1'` on a request with one descriptor, or a condition that is
/// not boolean); its locks are not held at that point, so the limiter stays usable.
fn guarded<T>(f: impl FnOnce() -> Result<T, LimitadorError>) -> Result<T, Status> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Status::invalid_argument(format!(
            "the request could not be evaluated against the limits: {e}"
        ))),
        Err(_) => Err(Status::invalid_argument(
            "a limit's condition could not be evaluated on this request \
             (does it index a descriptor the request does not have, or is it not boolean?)",
        )),
    }
}

fn unknown() -> RateLimitResponse {
    response(Code::Unknown, Vec::new(), Vec::new())
}

fn response(
    code: Code,
    statuses: Vec<DescriptorStatus>,
    response_headers_to_add: Vec<HeaderValue>,
) -> RateLimitResponse {
    RateLimitResponse {
        overall_code: code as i32,
        statuses,
        response_headers_to_add,
        request_headers_to_add: Vec::new(),
        raw_body: Vec::new(),
    }
}

/// The status of the most restrictive counter: lowest remaining, then latest reset.
fn status(counters: &[Counter], code: Code) -> DescriptorStatus {
    let most_restrictive = counters.iter().min_by(|a, b| {
        let ra = a.remaining().unwrap_or(a.max_value());
        let rb = b.remaining().unwrap_or(b.max_value());
        ra.cmp(&rb).then_with(|| reset(b).cmp(&reset(a)))
    });
    let Some(counter) = most_restrictive else {
        return DescriptorStatus {
            code: code as i32,
            current_limit: None,
            limit_remaining: 0,
            duration_until_reset: None,
        };
    };
    let limit = counter.limit();
    let remaining = counter.remaining().unwrap_or(limit.max_value());
    let until_reset = reset(counter);
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: limit.name().unwrap_or_default().to_string(),
            requests_per_unit: clamp_u32(limit.max_value()),
            unit: Unit::from_seconds(limit.seconds()).unwrap_or(Unit::Unknown) as i32,
        }),
        limit_remaining: clamp_u32(remaining),
        duration_until_reset: Some(prost_types::Duration {
            seconds: i64::try_from(until_reset.as_secs()).unwrap_or(i64::MAX),
            nanos: until_reset.subsec_nanos() as i32,
        }),
    }
}

/// Time until the counter's window resets; a counter with no window yet resets a full window
/// after its first hit.
fn reset(counter: &Counter) -> Duration {
    counter.expires_in().unwrap_or_else(|| counter.window())
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// `kuadrant.service.ratelimit.v1.RateLimitService` over a shared [`Core`].
pub struct KuadrantRls(pub Arc<Core>);

#[tonic::async_trait]
impl kuadrant::rate_limit_service_server::RateLimitService for KuadrantRls {
    async fn check_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.0.delay().await;
        let req = request.into_inner();
        log::debug!("CheckRateLimit {req:?}");
        self.0.check(&req).map(Response::new)
    }

    async fn report(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.0.delay().await;
        let req = request.into_inner();
        log::debug!("Report {req:?}");
        self.0.report(&req).map(Response::new)
    }
}

/// `envoy.service.ratelimit.v3.RateLimitService` over a shared [`Core`].
pub struct EnvoyRls(pub Arc<Core>);

#[tonic::async_trait]
impl envoy::rate_limit_service_server::RateLimitService for EnvoyRls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.0.delay().await;
        let req = request.into_inner();
        log::debug!("ShouldRateLimit {req:?}");
        self.0.should_rate_limit(&req).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::parse_limits;
    use ratelimit_proto::Entry;

    fn core(yaml: &str) -> Core {
        Core::new(parse_limits(yaml).unwrap(), 1000, Duration::ZERO, true)
    }

    fn req(domain: &str, descriptors: &[&[(&str, &str)]], hits: u32) -> RateLimitRequest {
        RateLimitRequest {
            domain: domain.into(),
            descriptors: descriptors
                .iter()
                .map(|d| RateLimitDescriptor {
                    entries: d
                        .iter()
                        .map(|(k, v)| Entry {
                            key: k.to_string(),
                            value: v.to_string(),
                        })
                        .collect(),
                })
                .collect(),
            hits_addend: hits,
        }
    }

    const TWO_DESCRIPTORS: &str = r#"
- {namespace: ns, name: a, max_value: 10, seconds: 60,
   conditions: ["descriptors[0].x == '1'"], variables: ["descriptors[0].u"]}
- {namespace: ns, name: b, max_value: 3, seconds: 3600,
   conditions: ["descriptors[1].y == '2'"], variables: ["descriptors[1].u"]}
"#;

    #[test]
    fn statuses_are_per_descriptor() {
        let c = core(TWO_DESCRIPTORS);
        let r = req(
            "ns",
            &[&[("x", "1"), ("u", "al")], &[("y", "2"), ("u", "al")]],
            3,
        );
        let rep = c.report(&r).unwrap();
        assert_eq!(rep.overall_code, Code::Ok as i32);
        assert_eq!(rep.statuses.len(), 2);
        assert_eq!(rep.statuses[0].limit_remaining, 7);
        assert_eq!(rep.statuses[0].current_limit.as_ref().unwrap().name, "a");
        assert_eq!(rep.statuses[1].limit_remaining, 0);
        assert_eq!(
            rep.statuses[1].current_limit.as_ref().unwrap().unit,
            Unit::Hour as i32
        );
        let chk = c.check(&r).unwrap();
        assert_eq!(chk.overall_code, Code::OverLimit as i32);
        assert_eq!(chk.statuses[0].code, Code::Ok as i32);
        assert_eq!(chk.statuses[1].code, Code::OverLimit as i32);
    }

    #[test]
    fn should_rate_limit_with_several_descriptors() {
        let c = core(TWO_DESCRIPTORS);
        let r = req(
            "ns",
            &[&[("x", "1"), ("u", "al")], &[("y", "2"), ("u", "al")]],
            2,
        );
        let first = c.should_rate_limit(&r).unwrap();
        assert_eq!(first.overall_code, Code::Ok as i32);
        assert_eq!(first.statuses[0].limit_remaining, 8);
        assert_eq!(first.statuses[1].limit_remaining, 1);
        // Draft-03 headers name the most restrictive counter.
        assert!(first
            .response_headers_to_add
            .iter()
            .any(|h| h.key == "X-RateLimit-Remaining" && h.value == "1"));
        let second = c.should_rate_limit(&r).unwrap();
        assert_eq!(second.overall_code, Code::OverLimit as i32);
        assert_eq!(second.statuses[0].code, Code::Ok as i32);
        assert_eq!(
            second.statuses[0].limit_remaining, 8,
            "nothing added when limited"
        );
        assert_eq!(second.statuses[1].code, Code::OverLimit as i32);
    }

    #[test]
    fn condition_on_missing_descriptor_is_an_error_not_a_panic() {
        let c = core(TWO_DESCRIPTORS);
        let r = req("ns", &[&[("x", "1"), ("u", "al")]], 1);
        let err = c.check(&r).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // The limiter still works afterwards.
        let ok = c
            .check(&req("ns", &[&[("x", "1"), ("u", "al")], &[]], 1))
            .unwrap();
        assert_eq!(ok.overall_code, Code::Ok as i32);
    }
}
