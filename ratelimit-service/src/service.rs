//! The rate-limit logic behind the gRPC methods, with Limitador's semantics.
//!
//! - `CheckRateLimit` never writes: `OVER_LIMIT` once any counter that applies is at or over its
//!   maximum (`is_rate_limited(.., 1)`, as Limitador does; `hits_addend` is ignored).
//! - `Report` always adds `hits_addend` (0 counts as 1) to every counter that applies, even past
//!   its maximum, and answers `OK`.
//! - `ShouldRateLimit` checks whether `hits_addend` (0 counts as 1) more fits in every counter
//!   and, if so, adds it, in one step.
//! - `Reserve` (Kuadrant's reservation protocol) admits when, for every counter that applies,
//!   value + outstanding holds + `amount` <= max, and then holds `amount` (clamped to
//!   `--max-reservation-fraction` of the smallest max) on each of them until `Commit` or expiry:
//!   min(`ttl`, the server's `--max-reservation-ttl`, the end of that counter's window); an unset
//!   `ttl` is the server's maximum. It answers `OK` with a `reservation_id`, or `OVER_LIMIT`
//!   (nothing held, no id). `OK` comes with an empty id when nothing is held: no limit applies,
//!   or the held amount is 0 (`amount` 0, or clamped to 0).
//! - `Commit` adds `actual_amount` (0 adds nothing) to every counter that applies and releases
//!   the hold of `reservation_id` if it is still live (`reservation_released`: a live hold was
//!   released; the crate alone would also say so of an expired hold it has not purged yet);
//!   an empty, unknown or expired id behaves like `Report`. A `Commit` retried with an id already
//!   committed adds nothing and answers `reservation_released: false` (Limitador would apply it
//!   again), see [`crate::reservations`].
//! - An empty domain answers `UNKNOWN` (`Commit`: `reservation_released: false`, nothing
//!   added); descriptors that no limit matches answer `OK`. An `amount` or `actual_amount`
//!   above [`MAX_AMOUNT`] and a negative `ttl` answer gRPC `INVALID_ARGUMENT`.
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
//! their hits. A `Report` status's code is always `OK` (the hits were taken). `Reserve` answers
//! them too (`ReserveResponse.statuses`, field 3, this project's extension), with
//! `limit_remaining` = max − value − outstanding holds (this reservation's included when
//! admitted), as the crate computes it while reserving. [`Core::without_statuses`]
//! (`--no-statuses`) answers none, as Limitador does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use limitador::counter::Counter;
use limitador::limit::{Context, Limit, Namespace};
use limitador::reservation::{ReservationId, ReservationLimits, ReserveResult};
use limitador::CheckResult;
use ratelimit_proto::{
    Code, CommitRequest, CommitResponse, DescriptorStatus, HeaderValue, RateLimit,
    RateLimitDescriptor, RateLimitRequest, RateLimitResponse, ReserveRequest, ReserveResponse,
    Unit,
};
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::proto::{envoy, kuadrant};
use crate::reservations::{CommitTicket, Ledger, ReservationSettings};
use crate::storage::{Limiter, LimiterError, Storage};

/// The crate's reservation limits of a reservation policy.
fn reservation_limits(reservations: ReservationSettings) -> ReservationLimits {
    ReservationLimits {
        max_fraction: reservations.max_fraction,
        max_ttl: reservations.max_ttl,
    }
}

/// Shortest time a committed reservation id is remembered (see [`crate::reservations`]): the
/// memory window is the longer of this and `--max-reservation-ttl`.
const MIN_COMMIT_MEMORY: Duration = Duration::from_secs(60);

/// State shared by the gRPC services and the HTTP API: the limiter holding limits and counters,
/// the metrics, the service's view of the reservations, and the testing delay.
pub struct Core {
    limiter: Limiter,
    /// The storage failed on the last call (logged once per outage).
    storage_failing: AtomicBool,
    metrics: Metrics,
    delay: Duration,
    rate_limit_headers: bool,
    reservations: ReservationSettings,
    ledger: Ledger,
    /// Answers carry `statuses` (false: none, as Limitador's; see [`Core::without_statuses`]).
    statuses: bool,
}

impl Core {
    /// A core with `limits` loaded in an in-memory limiter holding at most `cache_size`
    /// qualified counters (counters of limits with `variables`; past that, the cache evicts
    /// some), answering every gRPC call after `delay`, adding Limitador's `X-RateLimit-*`
    /// headers (draft 03) to `ShouldRateLimit` answers when `rate_limit_headers`, and reserving
    /// under the `reservations` policy.
    pub fn new(
        limits: Vec<Limit>,
        cache_size: u64,
        delay: Duration,
        rate_limit_headers: bool,
        reservations: ReservationSettings,
    ) -> Self {
        let limiter = Limiter::Blocking(
            limitador::RateLimiterBuilder::new(cache_size)
                .reservation_limits(reservation_limits(reservations))
                .build(),
        );
        Self::with_limiter(limiter, limits, delay, rate_limit_headers, reservations)
    }

    /// Like [`Core::new`], with the counters in `storage` (see [`crate::storage`]). Errors:
    /// the storage cannot be reached (one line, see [`Limiter::connect`]).
    pub async fn connect(
        storage: &Storage,
        limits: Vec<Limit>,
        cache_size: u64,
        delay: Duration,
        rate_limit_headers: bool,
        reservations: ReservationSettings,
    ) -> Result<Self, String> {
        let limiter =
            Limiter::connect(storage, cache_size, reservation_limits(reservations)).await?;
        Ok(Self::with_limiter(
            limiter,
            limits,
            delay,
            rate_limit_headers,
            reservations,
        ))
    }

    fn with_limiter(
        limiter: Limiter,
        limits: Vec<Limit>,
        delay: Duration,
        rate_limit_headers: bool,
        reservations: ReservationSettings,
    ) -> Self {
        for limit in limits {
            limiter.add_limit(limit);
        }
        Self {
            limiter,
            storage_failing: AtomicBool::new(false),
            metrics: Metrics::default(),
            delay,
            rate_limit_headers,
            reservations,
            ledger: Ledger::new(reservations.max_ttl.max(MIN_COMMIT_MEMORY)),
            statuses: true,
        }
    }

    /// The same core answering like Limitador: no `statuses` in `CheckRateLimit`, `Report`,
    /// `ShouldRateLimit` and `Reserve` answers (`--no-statuses`); codes, counters and headers
    /// unchanged.
    pub fn without_statuses(self) -> Self {
        Self {
            statuses: false,
            ..self
        }
    }

    /// `statuses`, or none when the core answers like Limitador.
    fn shown(&self, statuses: Vec<DescriptorStatus>) -> Vec<DescriptorStatus> {
        if self.statuses {
            statuses
        } else {
            Vec::new()
        }
    }

    /// The Prometheus text of [`Core::metrics`], with the outstanding reservations.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(self.ledger.outstanding())
    }

    /// The amount live reservations hold on each counter (counters with none are absent), as
    /// the service tracks them (see [`crate::reservations`]).
    pub fn held_by_counter(&self) -> HashMap<Counter, u64> {
        self.ledger.held_by_counter()
    }

    /// The limiter, for the HTTP API (`/limits`, `/counters`).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// A limiter call's outcome as a gRPC answer: a storage failure is `UNAVAILABLE` (counted
    /// in `ratelimit_storage_errors_total`, logged once per outage, and its end logged too), an
    /// evaluation failure `INVALID_ARGUMENT`.
    pub fn answer<T>(&self, result: Result<T, LimiterError>) -> Result<T, Status> {
        match result {
            Ok(value) => {
                if self.storage_failing.swap(false, Ordering::Relaxed) {
                    log::warn!("the counters' storage answers again");
                }
                Ok(value)
            }
            Err(e @ LimiterError::Storage(_)) => {
                self.metrics.storage_error();
                if !self.storage_failing.swap(true, Ordering::Relaxed) {
                    log::error!("{e} (calls answer UNAVAILABLE until it is back; logged once)");
                }
                Err(Status::unavailable(e.to_string()))
            }
            Err(e @ LimiterError::Evaluation(_)) => Err(Status::invalid_argument(e.to_string())),
        }
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
    pub async fn check(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        self.metrics.check_call();
        if req.domain.is_empty() {
            return Ok(unknown());
        }
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        let result = self.answer(self.limiter.is_rate_limited(&ns, &ctx, 1).await)?;
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
            self.per_descriptor(&ns, &req.descriptors, 1, |r| limited_code(r.limited))
                .await?
        };
        Ok(response(code, self.shown(statuses), Vec::new()))
    }

    /// `Report`: adds the hits (0 counts as 1) to every counter that applies, even past its
    /// maximum. Answers `OK`.
    pub async fn report(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, Status> {
        self.metrics.report_call();
        if req.domain.is_empty() {
            return Ok(unknown());
        }
        let hits = hits(req);
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        self.answer(self.limiter.update_counters(&ns, &ctx, hits).await)?;
        self.metrics.reported(&req.domain, hits);
        let statuses = if req.descriptors.len() == 1 {
            let after = self.answer(self.limiter.is_rate_limited(&ns, &ctx, 1).await)?;
            vec![status(&after.counters, Code::Ok)]
        } else {
            self.per_descriptor(&ns, &req.descriptors, 1, |_| Code::Ok)
                .await?
        };
        Ok(response(Code::Ok, self.shown(statuses), Vec::new()))
    }

    /// `ShouldRateLimit`: if the hits (0 counts as 1) fit in every counter that applies, adds
    /// them and answers `OK`; otherwise adds nothing and answers `OVER_LIMIT`.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<RateLimitResponse, Status> {
        self.metrics.should_rate_limit_call();
        if req.domain.is_empty() {
            return Ok(unknown());
        }
        let hits = hits(req);
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        // With several descriptors, each one's own verdict is taken before the update.
        let before = if req.descriptors.len() > 1 {
            Some(
                self.per_descriptor_results(&ns, &req.descriptors, hits)
                    .await?,
            )
        } else {
            None
        };
        let mut result = self.answer(
            self.limiter
                .check_rate_limited_and_update(&ns, &ctx, hits)
                .await,
        )?;
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
        Ok(response(code, self.shown(statuses), headers))
    }

    /// `Reserve`: if `amount` fits in every counter that applies once their outstanding holds
    /// are counted, holds it (see the module docs) and answers `OK` with the reservation's id;
    /// otherwise holds nothing and answers `OVER_LIMIT`.
    pub async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveResponse, Status> {
        self.metrics.reserve_call();
        self.reservations_implemented()?;
        if req.domain.is_empty() {
            return Ok(ReserveResponse {
                code: Code::Unknown as i32,
                reservation_id: String::new(),
                statuses: Vec::new(),
                hold_ttl: None,
            });
        }
        check_amount("amount", req.amount)?;
        let ttl = hold_ttl(req.ttl.as_ref(), self.reservations.max_ttl)?;
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        let result = self.answer(self.limiter.reserve(&ns, &ctx, req.amount, ttl).await)?;
        let code = if result.limited {
            self.metrics
                .limited(&req.domain, result.limit_name.as_deref());
            Code::OverLimit
        } else {
            self.metrics.authorized(&req.domain, 0);
            Code::Ok
        };
        let mut held_for = None;
        let reservation_id = match &result.reservation_id {
            Some(id) => {
                // The crate holds on each counter until min(ttl, its window's end).
                let holds: Vec<(Counter, Duration)> = result
                    .counters
                    .iter()
                    .map(|c| (c.clone(), ttl.min(reset(c))))
                    .collect();
                held_for = Some(holds.iter().map(|(_, d)| *d).min().unwrap_or(ttl));
                self.ledger.record_hold(id.as_str(), result.amount, holds);
                self.metrics.reserved(&req.domain, result.amount);
                id.to_string()
            }
            None => String::new(),
        };
        let statuses = if req.descriptors.len() == 1 {
            vec![status(&result.counters, code)]
        } else {
            self.reserve_statuses(&ns, &req.descriptors, &result, req.amount)
                .await?
        };
        Ok(ReserveResponse {
            code: code as i32,
            reservation_id,
            statuses: self.shown(statuses),
            hold_ttl: held_for.map(ratelimit_proto::duration),
        })
    }

    /// `Commit`: adds `actual_amount` to every counter that applies and releases the hold of
    /// `reservation_id` if it is still live; a retried commit (an id already committed) adds
    /// nothing.
    pub async fn commit(&self, req: &CommitRequest) -> Result<CommitResponse, Status> {
        self.metrics.commit_call();
        self.reservations_implemented()?;
        let not_released = CommitResponse {
            reservation_released: false,
        };
        if req.domain.is_empty() {
            return Ok(not_released);
        }
        check_amount("actual_amount", req.actual_amount)?;
        let id = (!req.reservation_id.is_empty()).then_some(req.reservation_id.as_str());
        if let Some(id) = id {
            match self.ledger.begin_commit(id) {
                CommitTicket::Apply => {}
                CommitTicket::Duplicate => {
                    log::debug!("Commit of {id:?} again: already applied, ignored");
                    self.metrics.commit_duplicate();
                    return Ok(not_released);
                }
                CommitTicket::InProgress => {
                    return Err(Status::unavailable(format!(
                        "a Commit of reservation {id:?} is still being applied: retry later"
                    )));
                }
            }
        }
        // Until settled below, a cancelled call (its deadline passed, the client reset it)
        // forgets the commit, so that its retry applies.
        let mut in_flight = CommitInFlight {
            ledger: &self.ledger,
            id,
        };
        let ns = Namespace::from(req.domain.as_str());
        let ctx = context(&req.descriptors, None);
        let reservation_id = id.map(|id| ReservationId::from(id.to_string()));
        let result = self.answer(
            self.limiter
                .commit_reservation(&ns, &ctx, reservation_id.as_ref(), req.actual_amount)
                .await,
        );
        in_flight.id = None;
        match result {
            Ok(result) => {
                // The crate also says released for an expired hold it has not purged yet.
                let released = match id {
                    Some(id) => self.ledger.finish_commit(id, result.reservation_released),
                    None => false,
                };
                self.metrics.committed(&req.domain, req.actual_amount);
                Ok(CommitResponse {
                    reservation_released: released,
                })
            }
            Err(e) => {
                if let Some(id) = id {
                    self.ledger.abort_commit(id);
                }
                Err(e)
            }
        }
    }

    fn reservations_implemented(&self) -> Result<(), Status> {
        if self.reservations.unimplemented {
            Err(Status::unimplemented(
                "Reserve and Commit are not served (--reservations-unimplemented)",
            ))
        } else {
            Ok(())
        }
    }

    /// Per-descriptor statuses of a `Reserve` with several descriptors: each descriptor's own
    /// counters, as [`Core::per_descriptor`] selects them for `CheckRateLimit`, with the
    /// remaining and reset the reservation computed for them (outstanding holds counted). A
    /// descriptor is `OVER_LIMIT` when the reservation was refused and one of its counters had
    /// less than `amount` left.
    async fn reserve_statuses(
        &self,
        ns: &Namespace,
        descriptors: &[RateLimitDescriptor],
        reserved: &ReserveResult,
        amount: u64,
    ) -> Result<Vec<DescriptorStatus>, Status> {
        Ok(self
            .per_descriptor_results(ns, descriptors, amount)
            .await?
            .into_iter()
            .map(|mut r| {
                let mut limited = false;
                for counter in r.counters.iter_mut() {
                    if let Some(after) = reserved.counters.iter().find(|c| *c == counter) {
                        if let Some(remaining) = after.remaining() {
                            counter.set_remaining(remaining);
                        }
                        if let Some(expires_in) = after.expires_in() {
                            counter.set_expires_in(expires_in);
                        }
                    }
                    // Refused: did this counter lack room? (With `amount` 0, "no room" is a
                    // counter at or past its max.)
                    let remaining = counter.remaining().unwrap_or(counter.max_value());
                    limited |= reserved.limited && (remaining < amount || remaining == 0);
                }
                status(&r.counters, limited_code(limited))
            })
            .collect())
    }

    /// Read-only check of each descriptor alone (the others hidden as empty maps).
    async fn per_descriptor_results(
        &self,
        ns: &Namespace,
        descriptors: &[RateLimitDescriptor],
        delta: u64,
    ) -> Result<Vec<CheckResult>, Status> {
        let mut results = Vec::with_capacity(descriptors.len());
        for i in 0..descriptors.len() {
            let ctx = context(descriptors, Some(i));
            results.push(self.answer(self.limiter.is_rate_limited(ns, &ctx, delta).await)?);
        }
        Ok(results)
    }

    async fn per_descriptor(
        &self,
        ns: &Namespace,
        descriptors: &[RateLimitDescriptor],
        delta: u64,
        code: impl Fn(&CheckResult) -> Code,
    ) -> Result<Vec<DescriptorStatus>, Status> {
        Ok(self
            .per_descriptor_results(ns, descriptors, delta)
            .await?
            .iter()
            .map(|r| status(&r.counters, code(r)))
            .collect())
    }
}

/// A commit begun in the [`Ledger`] and not settled yet: dropped with `id` still set (the call
/// was cancelled while the storage applied it), it aborts the commit.
struct CommitInFlight<'a> {
    ledger: &'a Ledger,
    id: Option<&'a str>,
}

impl Drop for CommitInFlight<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            log::debug!("Commit of {id:?} cancelled before it settled: forgotten");
            self.ledger.abort_commit(id);
        }
    }
}

/// Most one `Reserve` or `Commit` may ask for: `hits_addend`'s bound (uint32). Counters add
/// without overflow checks (in the limitador crate, a sum past `u64::MAX` wraps to a small
/// value in a release build, and panics holding the counters' lock in a debug one); with at
/// most this much per call, no window can see enough calls to get there.
pub const MAX_AMOUNT: u64 = u32::MAX as u64;

/// Refuses an amount above [`MAX_AMOUNT`] (`INVALID_ARGUMENT`).
fn check_amount(field: &str, amount: u64) -> Result<(), Status> {
    if amount > MAX_AMOUNT {
        Err(Status::invalid_argument(format!(
            "{field} {amount} is above {MAX_AMOUNT}, the most one call may add"
        )))
    } else {
        Ok(())
    }
}

/// How long a `Reserve` may hold: its `ttl`, shortened to `max`; an unset `ttl` is `max`.
/// A negative or malformed `ttl` is refused (`INVALID_ARGUMENT`).
fn hold_ttl(ttl: Option<&prost_types::Duration>, max: Duration) -> Result<Duration, Status> {
    let Some(ttl) = ttl else {
        return Ok(max);
    };
    let (Ok(seconds), Ok(nanos)) = (u64::try_from(ttl.seconds), u32::try_from(ttl.nanos)) else {
        return Err(Status::invalid_argument(format!(
            "ttl must not be negative: {}s {}ns",
            ttl.seconds, ttl.nanos
        )));
    };
    if nanos >= 1_000_000_000 {
        return Err(Status::invalid_argument(format!(
            "ttl nanos must be below 1e9: {nanos}"
        )));
    }
    Ok(Duration::new(seconds, nanos).min(max))
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
        duration_until_reset: Some(ratelimit_proto::duration(until_reset)),
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
        self.0.check(&req).await.map(Response::new)
    }

    async fn report(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.0.delay().await;
        let req = request.into_inner();
        log::debug!("Report {req:?}");
        self.0.report(&req).await.map(Response::new)
    }

    async fn reserve(
        &self,
        request: Request<ReserveRequest>,
    ) -> Result<Response<ReserveResponse>, Status> {
        self.0.delay().await;
        let req = request.into_inner();
        log::debug!("Reserve {req:?}");
        self.0.reserve(&req).await.map(Response::new)
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        self.0.delay().await;
        let req = request.into_inner();
        log::debug!("Commit {req:?}");
        // Applied in a task of its own, which outlives this call: a commit whose caller gave up
        // (its deadline passed while Redis did not answer) still settles in the ledger, so that
        // its retry is a duplicate once it is applied, not applied a second time.
        let core = self.0.clone();
        match tokio::spawn(async move { core.commit(&req).await }).await {
            Ok(answer) => answer.map(Response::new),
            Err(e) => Err(Status::internal(format!("the commit failed: {e}"))),
        }
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
        self.0.should_rate_limit(&req).await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::parse_limits;
    use ratelimit_proto::Entry;

    fn core(yaml: &str) -> Core {
        Core::new(
            parse_limits(yaml).unwrap(),
            1000,
            Duration::ZERO,
            true,
            ReservationSettings::default(),
        )
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

    #[tokio::test]
    async fn statuses_are_per_descriptor() {
        let c = core(TWO_DESCRIPTORS);
        let r = req(
            "ns",
            &[&[("x", "1"), ("u", "al")], &[("y", "2"), ("u", "al")]],
            3,
        );
        let rep = c.report(&r).await.unwrap();
        assert_eq!(rep.overall_code, Code::Ok as i32);
        assert_eq!(rep.statuses.len(), 2);
        assert_eq!(rep.statuses[0].limit_remaining, 7);
        assert_eq!(rep.statuses[0].current_limit.as_ref().unwrap().name, "a");
        assert_eq!(rep.statuses[1].limit_remaining, 0);
        assert_eq!(
            rep.statuses[1].current_limit.as_ref().unwrap().unit,
            Unit::Hour as i32
        );
        let chk = c.check(&r).await.unwrap();
        assert_eq!(chk.overall_code, Code::OverLimit as i32);
        assert_eq!(chk.statuses[0].code, Code::Ok as i32);
        assert_eq!(chk.statuses[1].code, Code::OverLimit as i32);
    }

    #[tokio::test]
    async fn should_rate_limit_with_several_descriptors() {
        let c = core(TWO_DESCRIPTORS);
        let r = req(
            "ns",
            &[&[("x", "1"), ("u", "al")], &[("y", "2"), ("u", "al")]],
            2,
        );
        let first = c.should_rate_limit(&r).await.unwrap();
        assert_eq!(first.overall_code, Code::Ok as i32);
        assert_eq!(first.statuses[0].limit_remaining, 8);
        assert_eq!(first.statuses[1].limit_remaining, 1);
        // Draft-03 headers name the most restrictive counter.
        assert!(first
            .response_headers_to_add
            .iter()
            .any(|h| h.key == "X-RateLimit-Remaining" && h.value == "1"));
        let second = c.should_rate_limit(&r).await.unwrap();
        assert_eq!(second.overall_code, Code::OverLimit as i32);
        assert_eq!(second.statuses[0].code, Code::Ok as i32);
        assert_eq!(
            second.statuses[0].limit_remaining, 8,
            "nothing added when limited"
        );
        assert_eq!(second.statuses[1].code, Code::OverLimit as i32);
    }

    #[test]
    fn hold_ttl_is_shortened_to_the_maximum_and_refuses_malformed_durations() {
        let max = Duration::from_secs(60);
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(hold_ttl(None, max).unwrap(), max);
        assert_eq!(
            hold_ttl(Some(&d(1, 500_000_000)), max).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(hold_ttl(Some(&d(0, 0)), max).unwrap(), Duration::ZERO);
        assert_eq!(hold_ttl(Some(&d(i64::MAX, 999_999_999)), max).unwrap(), max);
        for bad in [d(-1, 0), d(0, -1), d(1, 1_000_000_000)] {
            let err = hold_ttl(Some(&bad), max).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn condition_on_missing_descriptor_is_an_error_not_a_panic() {
        let c = core(TWO_DESCRIPTORS);
        let r = req("ns", &[&[("x", "1"), ("u", "al")]], 1);
        let err = c.check(&r).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // The limiter still works afterwards.
        let ok = c
            .check(&req("ns", &[&[("x", "1"), ("u", "al")], &[]], 1))
            .await
            .unwrap();
        assert_eq!(ok.overall_code, Code::Ok as i32);
    }
}
