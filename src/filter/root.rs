//! The per-VM life: configuration, the report queue drained on every tick, metric batching,
//! and the release of requests whose body never arrives.
//!
//! One [`RootFilter`] per plugin and VM owns the compiled [`Policy`] and the state its streams
//! share ([`Shared`], behind `Rc<RefCell<_>>`: a VM is single-threaded). Checks are dispatched
//! by the streams; reports by the root's tick, so that a report's call outlives the stream that
//! spent the tokens: its answer reaches the root, which lives as long as the VM and retries.

use super::metrics::{names, Metrics};
use super::stream::StreamFilter;
use super::{host_log, Buffer, GrpcCall, Host, Level};
use crate::config::FailureMode;
use crate::flow::body_unavailable_reply;
use crate::policy::Policy;
use crate::reports::{CommitOutcome, CommitQueue, ReportOutcome, ReportQueue};
use prost::Message;
use ratelimit_proto::{
    Code, CommitRequest, CommitResponse, RateLimitRequest, RateLimitResponse, COMMIT,
    KUADRANT_SERVICE, REPORT,
};
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Duration;

/// gRPC status of a call that timed out.
pub(crate) const GRPC_DEADLINE_EXCEEDED: u32 = 4;
/// gRPC status the filter records for a call that could not be dispatched.
const GRPC_UNAVAILABLE: u32 = 14;

/// How long a request whose body the filter reads may wait for its next body chunk before the
/// root context releases it: Envoy delivers no body while the headers are held (without
/// `allow_on_headers_stop_iteration`), or stops reading the client because its buffer limit is
/// below `requestBody.maxBytes`.
pub const BODY_WAIT: Duration = Duration::from_secs(5);

/// Releases in a row of requests whose body never began (no body delivered whole in between)
/// after which the proxy is taken to withhold bodies while headers are held (Envoy without
/// `allow_on_headers_stop_iteration`). One slow client cannot make the filter stop reading
/// bodies; a body that stalls midway never counts.
pub const BODILESS_STALLS: u32 = 3;

/// A stream waiting for its body: ticks since its last chunk, and whether one came at all.
#[derive(Debug, Clone, Copy)]
struct BodyWait {
    id: u32,
    ticks: u32,
    began: bool,
}

/// State shared by the root context and its streams.
#[derive(Debug, Default)]
pub struct Shared {
    /// The root context's id: calls that must outlive a stream are dispatched as its.
    pub root_id: u32,
    /// Tokens waiting to be reported.
    pub queue: ReportQueue,
    /// Reservations waiting for their commit.
    pub commits: CommitQueue,
    /// The worker's leases (reservation mode with `rateLimitService.lease`).
    pub leases: crate::lease::Leases,
    /// The service answered `Reserve` with UNIMPLEMENTED: admission mode `auto` checks
    /// instead for the life of the VM.
    pub reservations_unimplemented: bool,
    /// `Reserve` calls of streams that ended before the answer, with the descriptor: a hold
    /// granted that late is released by the root.
    pub orphaned_reserves: std::collections::HashMap<u32, ratelimit_proto::RateLimitDescriptor>,
    /// The filter's counters.
    pub metrics: Metrics,
    /// Expressions whose failure was already logged at warn level.
    warned: HashSet<String>,
    /// Streams waiting for (the rest of) a body the filter reads.
    awaiting_body: Vec<BodyWait>,
    /// Streams released in a row, since the last body the proxy delivered whole, whose body
    /// never began: [`BODILESS_STALLS`] of them mean the proxy withholds bodies.
    bodiless_stalls: u32,
    /// Streams the root context released (or refused) after waiting too long for their body;
    /// they stay out of the way for the rest of their life.
    released: HashSet<u32>,
    /// The proxy was seen not to deliver bodies while headers are held.
    body_unavailable: bool,
}

impl Shared {
    /// Whether `key` is logged for the first time (later failures log at debug level).
    pub(crate) fn first_warning(&mut self, key: String) -> bool {
        self.warned.insert(key)
    }

    /// Starts waiting for stream `id`'s body.
    pub(crate) fn await_body(&mut self, id: u32) {
        self.awaiting_body.push(BodyWait {
            id,
            ticks: 0,
            began: false,
        });
    }

    /// Stream `id`'s body made progress (a chunk the filter reads arrived): it waits anew,
    /// from now, for the rest.
    pub(crate) fn body_progress(&mut self, id: u32) {
        match self.awaiting_body.iter_mut().find(|w| w.id == id) {
            Some(wait) => {
                wait.ticks = 0;
                wait.began = true;
            }
            None => self.awaiting_body.push(BodyWait {
                id,
                ticks: 0,
                began: true,
            }),
        }
    }

    /// Stream `id`'s body arrived, or the stream ended: it no longer waits. Returns whether the
    /// root context had released it.
    pub(crate) fn body_arrived(&mut self, id: u32) -> bool {
        self.awaiting_body.retain(|w| w.id != id);
        self.bodiless_stalls = 0;
        self.released.contains(&id)
    }

    /// Forgets stream `id` at its end; returns whether the root context had released it.
    pub(crate) fn stream_ended(&mut self, id: u32) -> bool {
        self.awaiting_body.retain(|w| w.id != id);
        !self.released.is_empty() && self.released.remove(&id)
    }

    /// Whether the root context released stream `id`.
    pub(crate) fn is_released(&self, id: u32) -> bool {
        !self.released.is_empty() && self.released.contains(&id)
    }

    /// Whether the proxy was seen not to deliver bodies while headers are held.
    pub(crate) fn body_unavailable(&self) -> bool {
        self.body_unavailable
    }

    /// Counts one more tick for every waiting stream; returns the streams that waited
    /// `limit` ticks, which no longer wait and are marked released, each with whether its body
    /// had begun.
    fn expire_waits(&mut self, limit: u32) -> Vec<(u32, bool)> {
        let mut stuck = Vec::new();
        self.awaiting_body.retain_mut(|w| {
            w.ticks += 1;
            if w.ticks >= limit {
                stuck.push((w.id, w.began));
                false
            } else {
                true
            }
        });
        for &(id, began) in &stuck {
            self.released.insert(id);
            if !began {
                self.bodiless_stalls = self.bodiless_stalls.saturating_add(1);
                if self.bodiless_stalls >= BODILESS_STALLS {
                    self.body_unavailable = true;
                }
            }
        }
        stuck
    }
}

/// `Rc<RefCell<Shared>>`: no borrow may be held across a host call that can re-enter the VM
/// (a local reply or a resume runs the stream's callbacks).
pub type SharedRef = Rc<RefCell<Shared>>;

/// The root context of one plugin in one VM.
#[derive(Debug)]
pub struct RootFilter {
    context_id: u32,
    policy: Option<Rc<Policy>>,
    shared: SharedRef,
    /// The proxy is shutting the VM down (`proxy_on_done` answered false): `proxy_done` is
    /// called once the calls on their way are answered.
    finishing: bool,
}

impl RootFilter {
    /// The root context `context_id` (the proxy's id for it), not configured yet.
    pub fn new(context_id: u32) -> Self {
        let shared = SharedRef::default();
        shared.borrow_mut().root_id = context_id;
        RootFilter {
            context_id,
            policy: None,
            shared,
            finishing: false,
        }
    }

    /// The compiled policy of the last configuration accepted.
    pub fn policy(&self) -> Option<&Rc<Policy>> {
        self.policy.as_ref()
    }

    /// Reads and compiles the plugin configuration. `false` refuses it: the proxy then keeps
    /// the previous configuration (or none). Tokens the previous configuration still owes
    /// are kept and reported under the new one's service settings.
    pub fn on_configure(&mut self, host: &mut impl Host) -> bool {
        host.refresh_log_level();
        let bytes = host
            .buffer(Buffer::PluginConfiguration, 0, usize::MAX)
            .filter(|b| !b.is_empty());
        let Some(bytes) = bytes else {
            host_log!(host, Error, "token-ratelimit: no plugin configuration");
            self.shared
                .borrow_mut()
                .metrics
                .inc(host, names::CONFIG_ERRORS);
            return false;
        };
        match Policy::from_plugin_config(&bytes) {
            Ok(policy) => {
                host_log!(
                    host,
                    Info,
                    "token-ratelimit: configured {} limit(s), domain `{}`, cluster `{}`",
                    policy.limits.len(),
                    policy.service.domain,
                    policy.service.cluster
                );
                host.set_tick_period(policy.service.flush_period);
                let mut shared = self.shared.borrow_mut();
                let old = std::mem::take(&mut shared.queue);
                shared.queue = ReportQueue::new(policy.service.retry_backoff());
                shared.queue.absorb(old);
                let old = std::mem::take(&mut shared.commits);
                shared.commits = CommitQueue::new(policy.service.retry_backoff());
                shared.commits.absorb(old);
                shared.leases.reconfigure(policy.service.lease.clone());
                self.policy = Some(Rc::new(policy));
                true
            }
            Err(e) => {
                host_log!(host, Error, "token-ratelimit: {e}");
                self.shared
                    .borrow_mut()
                    .metrics
                    .inc(host, names::CONFIG_ERRORS);
                false
            }
        }
    }

    /// A new stream `context_id` under the current configuration (none: it passes untouched).
    pub fn new_stream(&self, context_id: u32) -> StreamFilter {
        StreamFilter::new(context_id, self.policy.clone(), self.shared.clone())
    }

    /// The tick: flushes the batched counters, releases requests stuck waiting for their
    /// body, and sends the reports gathered since the last tick.
    pub fn on_tick(&mut self, host: &mut impl Host) {
        host.refresh_log_level();
        self.shared.borrow_mut().metrics.flush(host);
        let Some(policy) = self.policy.clone() else {
            return;
        };
        self.release_stuck_requests(host, &policy);
        let now = now_ms(host);
        {
            let mut shared = self.shared.borrow_mut();
            let committed = shared.leases.tick(now);
            shared
                .metrics
                .add(host, names::LEASES_COMMITTED, committed as u64);
        }
        dispatch_queued(host, &policy, &self.shared, true);
    }

    /// The proxy shuts the VM down: every lease is committed and every queued commit and
    /// report sent now. Returns whether the root context is done (nothing on its way);
    /// otherwise it calls [`Host::done`] once the last of those calls is answered (each has
    /// its timeout), without retrying what fails.
    pub fn on_done(&mut self, host: &mut impl Host) -> bool {
        let Some(policy) = self.policy.clone() else {
            return true;
        };
        {
            let mut shared = self.shared.borrow_mut();
            let committed = shared.leases.commit_all();
            shared
                .metrics
                .add(host, names::LEASES_COMMITTED, committed as u64);
            shared.metrics.flush(host);
        }
        dispatch_queued(host, &policy, &self.shared, true);
        self.finishing = !self.calls_answered();
        !self.finishing
    }

    /// Whether none of the root context's calls is on its way.
    fn calls_answered(&self) -> bool {
        let shared = self.shared.borrow();
        shared.commits.in_flight() == 0 && shared.queue.in_flight() == 0
    }

    /// During shutdown: the proxy is told the root context is done once its calls are
    /// answered.
    fn maybe_done(&mut self, host: &mut impl Host) {
        if self.finishing && self.calls_answered() {
            self.finishing = false;
            host.done();
        }
    }

    /// The reply to one of the root's calls (a report): `status` is the gRPC status, `size`
    /// the reply's length in the [`Buffer::GrpcReply`] buffer.
    pub fn on_grpc_reply(&mut self, host: &mut impl Host, token: u32, status: u32, size: usize) {
        self.grpc_reply(host, token, status, size);
        self.maybe_done(host);
    }

    fn grpc_reply(&mut self, host: &mut impl Host, token: u32, status: u32, size: usize) {
        if self.shared.borrow().leases.owns(token) {
            let bytes;
            let reply = if status == 0 {
                bytes = host.buffer(Buffer::GrpcReply, 0, size).unwrap_or_default();
                Ok(bytes.as_slice())
            } else {
                Err(crate::flow::ServiceFailure::Grpc(status))
            };
            let now = now_ms(host);
            let commits = {
                let mut shared = self.shared.borrow_mut();
                let event = shared.leases.on_reply(token, reply, now);
                record_lease_event(host, &mut shared, event);
                shared.leases.has_commits()
            };
            if commits {
                if let Some(policy) = self.policy.clone() {
                    dispatch_queued(host, &policy, &self.shared, false);
                }
            }
            return;
        }
        if queue_orphan_release(host, &self.shared, token, status, size) {
            if let Some(policy) = self.policy.clone() {
                dispatch_queued(host, &policy, &self.shared, false);
            }
            return;
        }
        let now = now_ms(host);
        if self.shared.borrow().commits.owns(token) {
            // An empty message is a valid (all-default) answer.
            let answer = if status == 0 {
                let bytes = host.buffer(Buffer::GrpcReply, 0, size).unwrap_or_default();
                CommitResponse::decode(bytes.as_slice())
                    .map(|r| r.reservation_released)
                    .map_err(|_| ())
            } else {
                Err(())
            };
            let mut shared = self.shared.borrow_mut();
            let outcome = shared.commits.reply(token, answer, now);
            record_commit_outcome(host, &mut shared, outcome, status);
            return;
        }
        let ok = status == 0
            && host
                .buffer(Buffer::GrpcReply, 0, size)
                .and_then(|b| RateLimitResponse::decode(b.as_slice()).ok())
                .is_some_and(|r| r.overall_code == Code::Ok as i32);
        let mut shared = self.shared.borrow_mut();
        let outcome = shared.queue.reply(token, ok, now);
        record_report_outcome(host, &mut shared, outcome, status);
    }

    /// Requests that wait for a body the proxy does not deliver while their headers are held
    /// (Envoy without `allow_on_headers_stop_iteration`) are released rather than left
    /// hanging: refused with a 500 under failure mode `deny`, let through unchecked under
    /// `allow`. Later requests are evaluated without their body.
    fn release_stuck_requests(&mut self, host: &mut impl Host, policy: &Policy) {
        let period = policy.service.flush_period.as_millis().max(1);
        let limit = u32::try_from((BODY_WAIT.as_millis() / period).max(1)).unwrap_or(u32::MAX);
        let stuck = {
            let mut shared = self.shared.borrow_mut();
            if shared.awaiting_body.is_empty() {
                return;
            }
            let stuck = shared.expire_waits(limit);
            for _ in &stuck {
                shared.metrics.inc(host, names::BODY_TIMEOUTS);
            }
            stuck
        };
        if stuck.is_empty() {
            return;
        }
        let deny = policy.service.failure_mode == FailureMode::Deny;
        let outcome = if deny {
            "refused"
        } else {
            "released unchecked"
        };
        for &(id, began) in &stuck {
            let (first, unavailable) = {
                let mut shared = self.shared.borrow_mut();
                let key = if began {
                    "body stalled"
                } else {
                    "body never began"
                };
                (shared.first_warning(key.into()), shared.body_unavailable)
            };
            let (level, message) = if began {
                (
                    if first { Level::Warn } else { Level::Debug },
                    format!(
                        "request {id}: its body stopped arriving for {} s while the filter read it (a slow client, or Envoy's \
                         per_connection_buffer_limit_bytes below requestBody.maxBytes): request {outcome} (failure mode)",
                        BODY_WAIT.as_secs()
                    ),
                )
            } else if unavailable {
                (
                    Level::Error,
                    format!(
                        "request {id}: no body while its headers were held, {BODILESS_STALLS} requests in a row: Envoy needs \
                         allow_on_headers_stop_iteration: true in its Wasm plugin configuration; request {outcome} (failure mode), \
                         and later requests are evaluated without their body"
                    ),
                )
            } else {
                (
                    if first { Level::Warn } else { Level::Debug },
                    format!(
                        "request {id}: no body for {} s while its headers were held: request {outcome} (failure mode)",
                        BODY_WAIT.as_secs()
                    ),
                )
            };
            if host.log_enabled(level) {
                host.log(level, &message);
            }
        }
        let stuck: Vec<u32> = stuck.into_iter().map(|(id, _)| id).collect();
        // Replying or resuming calls back into this VM (the stream's callbacks, which then do
        // nothing): no borrow is held here.
        let reply = body_unavailable_reply();
        for id in stuck {
            if host.set_effective_context(id) {
                if deny {
                    host.send_reply(&reply);
                } else {
                    host.resume_request();
                }
            }
        }
        host.set_effective_context(self.context_id);
    }
}

/// The answer to a `Reserve` whose stream had ended (`token` among
/// [`Shared::orphaned_reserves`]): a hold it granted is queued for release (a commit of 0)
/// instead of blocking the budget until it expires. Returns whether `token` was such a call.
pub(crate) fn queue_orphan_release(
    host: &mut impl Host,
    shared: &SharedRef,
    token: u32,
    status: u32,
    size: usize,
) -> bool {
    let Some(descriptor) = shared.borrow_mut().orphaned_reserves.remove(&token) else {
        return false;
    };
    if status == 0 {
        let bytes = host.buffer(Buffer::GrpcReply, 0, size).unwrap_or_default();
        let granted = ratelimit_proto::ReserveResponse::decode(bytes.as_slice())
            .ok()
            .filter(|r| r.code == Code::Ok as i32 && !r.reservation_id.is_empty());
        if let Some(r) = granted {
            shared
                .borrow_mut()
                .commits
                .add(descriptor, r.reservation_id, 0);
        }
    }
    true
}

/// Dispatches what the queues hold as the root context's calls: every commit, and the
/// aggregated reports when `reports` (the tick; a stream sends them early when the budget is
/// nearly spent). The caller makes the root context effective.
pub(crate) fn dispatch_queued(
    host: &mut impl Host,
    policy: &Policy,
    shared: &SharedRef,
    reports: bool,
) {
    let now = now_ms(host);
    dispatch_lease_calls(host, policy, shared, now);
    let commits = shared.borrow_mut().commits.take_batch(now);
    for commit in commits {
        let request = CommitRequest {
            domain: policy.service.domain.clone(),
            descriptors: vec![commit.descriptor.clone()],
            reservation_id: commit.reservation_id.clone(),
            actual_amount: commit.actual,
        };
        let result = charge_call(host, policy, COMMIT, &request.encode_to_vec());
        let mut shared = shared.borrow_mut();
        match result {
            Ok(token) => {
                shared.metrics.inc(host, names::COMMITS_SENT);
                shared.commits.sent(token, commit);
            }
            Err(reason) => {
                host_log!(host, Debug, "commit dispatch failed: {reason}");
                let outcome = shared.commits.dispatch_failed(commit, now);
                record_commit_outcome(host, &mut shared, outcome, GRPC_UNAVAILABLE);
            }
        }
    }
    if !reports {
        return;
    }
    let batch = shared.borrow_mut().queue.take_batch(now);
    for report in batch {
        let request = RateLimitRequest {
            domain: policy.service.domain.clone(),
            descriptors: vec![report.descriptor.clone()],
            hits_addend: report.hits,
        };
        let result = charge_call(host, policy, REPORT, &request.encode_to_vec());
        let mut shared = shared.borrow_mut();
        match result {
            Ok(token) => {
                shared.metrics.inc(host, names::REPORTS_SENT);
                shared.queue.sent(token, report);
            }
            Err(reason) => {
                host_log!(host, Debug, "report dispatch failed: {reason}");
                let outcome = shared.queue.dispatch_failed(report, now);
                record_report_outcome(host, &mut shared, outcome, GRPC_UNAVAILABLE);
            }
        }
    }
}

/// Queues the commits the leases owe and dispatches the `Reserve`s they want (acquisitions
/// and renewals), as the root context's calls.
fn dispatch_lease_calls(host: &mut impl Host, policy: &Policy, shared: &SharedRef, now: u64) {
    let calls = {
        let mut shared = shared.borrow_mut();
        for c in shared.leases.take_commits() {
            shared.commits.add(c.descriptor, c.reservation_id, c.actual);
        }
        if !shared.leases.has_calls() {
            return;
        }
        shared.leases.take_calls(now)
    };
    for call in calls {
        let request = crate::reservation::encode_reserve(
            &policy.service.domain,
            call.descriptor,
            call.amount,
            call.ttl,
        );
        let result = host.dispatch_grpc(&GrpcCall {
            cluster: &policy.service.cluster,
            service: KUADRANT_SERVICE,
            method: ratelimit_proto::RESERVE,
            message: &request,
            timeout: policy.service.report_timeout,
        });
        let mut shared = shared.borrow_mut();
        match result {
            Ok(token) => shared.leases.sent(&call.key, token),
            Err(reason) => {
                host_log!(host, Debug, "lease reserve dispatch failed: {reason}");
                shared.leases.dispatch_failed(&call.key, now);
                let failure = crate::flow::ServiceFailure::Dispatch(reason);
                record_lease_event(
                    host,
                    &mut shared,
                    Some(crate::lease::LeaseEvent::Failed(failure)),
                );
            }
        }
    }
}

/// Logs and counts what a lease's `Reserve` came to.
fn record_lease_event(
    host: &mut impl Host,
    shared: &mut Shared,
    event: Option<crate::lease::LeaseEvent>,
) {
    use crate::lease::LeaseEvent;
    let name = match &event {
        None => return,
        Some(LeaseEvent::Granted) => names::LEASES_GRANTED,
        Some(LeaseEvent::Renewed) => names::LEASES_RENEWED,
        Some(LeaseEvent::Refused) => names::LEASES_REFUSED,
        Some(LeaseEvent::Failed(failure)) => {
            host_log!(
                host,
                Debug,
                "lease reserve failed ({failure}); its counter uses per-request reservations until it is asked again"
            );
            names::LEASES_FAILED
        }
    };
    shared.metrics.inc(host, name);
}

/// The host's clock in milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms(host: &mut impl Host) -> u64 {
    host.now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Dispatches a `Commit` or `Report` (`method`) of `message` to the rate-limit service, with the
/// reporting timeout.
fn charge_call(
    host: &mut impl Host,
    policy: &Policy,
    method: &str,
    message: &[u8],
) -> Result<u32, String> {
    host.dispatch_grpc(&GrpcCall {
        cluster: &policy.service.cluster,
        service: KUADRANT_SERVICE,
        method,
        message,
        timeout: policy.service.report_timeout,
    })
}

/// Logs and counts what became of a commit's call.
fn record_commit_outcome(
    host: &mut impl Host,
    shared: &mut Shared,
    outcome: CommitOutcome,
    status: u32,
) {
    match outcome {
        CommitOutcome::Delivered { released, held, .. } => {
            if held && !released {
                shared.metrics.inc(host, names::RESERVATIONS_EXPIRED);
            }
        }
        CommitOutcome::Unknown => {}
        CommitOutcome::WillRetry { actual, attempt } => {
            host_log!(
                host,
                Debug,
                "commit of {actual} tokens failed (gRPC status {status}); retry {attempt}"
            );
            shared.metrics.inc(host, names::COMMITS_RETRIED);
        }
        CommitOutcome::Dropped { actual } => {
            host_log!(
                host,
                Warn,
                "commit of {actual} tokens failed (gRPC status {status}) after all retries; dropped"
            );
            shared.metrics.inc(host, names::COMMITS_DROPPED);
            shared.metrics.add(host, names::TOKENS_DROPPED, actual);
        }
    }
}

/// Logs and counts what became of a report's call.
fn record_report_outcome(
    host: &mut impl Host,
    shared: &mut Shared,
    outcome: ReportOutcome,
    status: u32,
) {
    match outcome {
        ReportOutcome::Delivered { .. } | ReportOutcome::Unknown => {}
        ReportOutcome::WillRetry { hits, attempt } => {
            host_log!(
                host,
                Debug,
                "report of {hits} tokens failed (gRPC status {status}); retry {attempt}"
            );
            shared.metrics.inc(host, names::REPORTS_RETRIED);
        }
        ReportOutcome::Dropped { hits } => {
            host_log!(
                host,
                Warn,
                "report of {hits} tokens failed (gRPC status {status}) after all retries; dropped"
            );
            shared.metrics.inc(host, names::REPORTS_DROPPED);
            shared
                .metrics
                .add(host, names::TOKENS_DROPPED, u64::from(hits));
        }
    }
}
