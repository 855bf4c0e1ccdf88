//! One stream's life as the proxy delivers it: request headers and body (held only when the
//! policy reads the body or `include_usage` is added), the check, the verdict, the response
//! read for usage (never held), and the charge at the end.
//!
//! ```text
//! request headers ─▶ policy needs the body? ── yes ─▶ hold; evaluate when complete ─┐
//!                                          └─ no ─▶ evaluate now ───────────────────┴▶ check
//! check reply ─▶ allow (resume) │ 429 │ failure mode
//! response headers ─▶ usage format; body chunks ─▶ extractor
//! end of stream or log ─▶ finish once ─▶ reports queued for the root's tick
//! ```
//!
//! [`RequestFlow`] holds the pure per-request state; this type adds what depends on the
//! proxy's callbacks: the body modes, header rewrites, the check's call, metrics and logs. The
//! request body's handling is in `body`, the response's in `response`.

mod body;
mod response;

use super::metrics::{names, Hot};
use super::root::{SharedRef, GRPC_DEADLINE_EXCEEDED};
use super::{host_log, Action, Buffer, GrpcCall, HeaderMap, Host};
use crate::attributes::AttributeHost;
use crate::config::{AdmissionMode, FailureMode, OnError};
use crate::estimate::RequestBound;
use crate::flow::{
    body_unavailable_reply, Charge, Ending, RequestFlow, ServiceFailure, Verdict, CHECK_CALL,
    SHADOW_CALL,
};
use crate::policy::{Decision, Policy};
use crate::record::UsageRecord;
use crate::usage::{Format, UsageEventWithholder};
use ratelimit_proto::{CHECK_RATE_LIMIT, KUADRANT_SERVICE, RESERVE};
use std::rc::Rc;

/// What the filter does with the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    /// Count its bytes only.
    PassThrough,
    /// Hold it until complete, then evaluate the policy (`requestBodyJSON()`) and check.
    Evaluate,
    /// Hold it until complete, then add `stream_options.include_usage`.
    Inject,
}

/// What of a complete request body the proxy still lets the filter change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewrite {
    /// All of it (the proxy shows everything it keeps, after a [`Action::Pause`]).
    Whole,
    /// The bytes from this offset on (the last chunk; the rest went to the proxy's keeping).
    From(usize),
    /// None of it.
    None,
}

/// One stream (HTTP context) of the filter.
#[derive(Debug)]
pub struct StreamFilter {
    context_id: u32,
    policy: Option<Rc<Policy>>,
    shared: SharedRef,
    flow: RequestFlow,
    check_token: Option<u32>,
    /// checkReport mode: the shadow limits' check, not answered yet.
    shadow_token: Option<u32>,
    /// The verdict of an admission answered while another call is still owed an answer (a
    /// shadow check): carried out once none is.
    verdict: Option<Verdict>,
    /// Reservation mode: the `Reserve` calls not answered yet, with their reservation's index.
    reserve_tokens: Vec<(u32, usize)>,
    /// checkReport mode: the shared-data key marking this request's counters as spent, and
    /// the check request's bytes.
    spent_key: Option<(String, Vec<u8>)>,
    path: String,
    body_mode: BodyMode,
    /// Request body bytes the proxy keeps for this stream (not sent on yet).
    kept: usize,
    /// The last body callback answered [`Action::Pause`]: the proxy shows all it keeps.
    buffering: bool,
    /// The body copied while the filter needs it (at most `requestBody.maxBytes`).
    held: Vec<u8>,
    /// What of the complete body the proxy lets the filter change (during its completion).
    rewrite: Rewrite,
    /// The request's headers went on (returned Continue or resumed).
    headers_released: bool,
    /// The request body parsed as JSON (for `requestBodyJSON()`).
    body_json: Option<serde_json::Value>,
    /// The body outgrew `requestBody.maxBytes` and went on unread.
    body_unread: bool,
    /// Released (or refused) by the root context: no more host calls for this stream.
    released: bool,
    /// The request headers, read once (one host call) with the request headers; handed to
    /// the policy's evaluation (`request.headers`).
    headers: Option<Vec<(String, Vec<u8>)>>,
    method: String,
    content_type: String,
    accept_encoding: Option<String>,
    /// The filter added `stream_options.include_usage` to this request: the usage event the
    /// client did not ask for is withheld from the response.
    injected: bool,
    /// Removes that event from the response body (an uncompressed event stream).
    withholder: Option<UsageEventWithholder>,
}

/// The request body's `model` (a string), as the response's is read
/// ([`crate::usage::model_name`]: cut to [`crate::usage::MODEL_MAX_BYTES`], none when empty).
fn request_model(body: Option<&serde_json::Value>) -> Option<String> {
    crate::usage::model_name(body?.get("model")?.as_str()?)
}

/// The first value of a header in a header map. Invalid UTF-8 becomes U+FFFD (a client can
/// send any bytes).
fn header_value(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// The request's attributes as the policy reads them: the headers and `:path` already in hand,
/// the parsed body, and properties through the host.
struct RequestAttributes<'a> {
    host: &'a mut dyn Host,
    body: Option<&'a serde_json::Value>,
    /// The `:path` header, already read: `request.path` without another host call.
    path: &'a str,
    /// The request headers, already read (taken by the first use).
    headers: Option<Vec<(String, Vec<u8>)>>,
}

impl AttributeHost for RequestAttributes<'_> {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        if path == ["request", "path"] && !self.path.is_empty() {
            return Some(self.path.as_bytes().to_vec());
        }
        self.host.property(path)
    }

    fn request_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        match self.headers.take() {
            Some(headers) => headers,
            None => self.host.headers(HeaderMap::RequestHeaders),
        }
    }

    fn request_body_json(&mut self, pointer: &str) -> Option<serde_json::Value> {
        self.body?.pointer(pointer).cloned()
    }
}

impl StreamFilter {
    /// Stream `context_id` under `policy` (none: the stream passes untouched).
    pub fn new(context_id: u32, policy: Option<Rc<Policy>>, shared: SharedRef) -> Self {
        StreamFilter {
            context_id,
            policy,
            shared,
            flow: RequestFlow::default(),
            check_token: None,
            shadow_token: None,
            verdict: None,
            reserve_tokens: Vec::new(),
            spent_key: None,
            path: String::new(),
            body_mode: BodyMode::PassThrough,
            kept: 0,
            buffering: false,
            held: Vec::new(),
            rewrite: Rewrite::None,
            headers_released: false,
            body_json: None,
            body_unread: false,
            released: false,
            headers: None,
            method: String::new(),
            content_type: String::new(),
            accept_encoding: None,
            injected: false,
            withholder: None,
        }
    }

    /// What the filter does with the request body now.
    pub fn body_mode(&self) -> BodyMode {
        self.body_mode
    }

    /// The request headers arrived; `end_of_stream`: the request has no body.
    pub fn on_request_headers(&mut self, host: &mut impl Host, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        // One host call for every header the filter and the policy read.
        let headers = host.headers(HeaderMap::RequestHeaders);
        self.path = header_value(&headers, ":path").unwrap_or_default();
        self.method = header_value(&headers, ":method").unwrap_or_default();
        self.content_type = header_value(&headers, "content-type").unwrap_or_default();
        self.accept_encoding = header_value(&headers, "accept-encoding");
        self.headers = Some(headers);
        let needs_body = policy.needs_body || self.reads_bound(&policy);
        if needs_body && !end_of_stream && self.shared.borrow().body_unavailable() {
            // The proxy was seen not to deliver bodies (or all of them) while the filter read
            // them: for requestBodyJSON() the failure mode decides (allow: evaluate without the
            // body, where requestBodyJSON() finds nothing); a reservation's bound is not worth
            // a refusal: it holds reservation.defaultAmount.
            if policy.needs_body && policy.service.failure_mode == FailureMode::Deny {
                host.send_reply(&body_unavailable_reply());
                return Action::Pause;
            }
            return self.check(host, &policy, false, None);
        }
        if needs_body && !end_of_stream {
            // Evaluated when the body is complete (Envoy delivers it while the headers are
            // held, with allow_on_headers_stop_iteration). The root context releases a request
            // whose body never shows up, so that a misconfigured proxy cannot hang it.
            self.body_mode = BodyMode::Evaluate;
            self.shared.borrow_mut().await_body(self.context_id);
            return Action::Pause;
        }
        self.check(host, &policy, end_of_stream, None)
    }

    /// The reply to this stream's check: `status` is the gRPC status, `size` the reply's length
    /// in the [`Buffer::GrpcReply`] buffer.
    pub fn on_grpc_reply(&mut self, host: &mut impl Host, token: u32, status: u32, size: usize) {
        let reservation = self.reserve_tokens.iter().position(|(t, _)| *t == token);
        let shadow = self.shadow_token == Some(token);
        if self.check_token != Some(token) && reservation.is_none() && !shadow {
            // A reservation answered after this stream's log phase: its hold is released.
            if super::root::queue_orphan_release(host, &self.shared, token, status, size) {
                if let Some(policy) = self.policy.clone() {
                    self.send_now(host, &policy, false);
                }
            }
            return;
        }
        let Some(policy) = self.policy.clone() else {
            host.resume_request();
            return;
        };
        let body;
        let reply = if status != 0 {
            Err(ServiceFailure::Grpc(status))
        } else {
            body = host.buffer(Buffer::GrpcReply, 0, size).unwrap_or_default();
            Ok(body.as_slice())
        };
        let verdict = match reservation {
            Some(pos) => {
                let (_, index) = self.reserve_tokens.swap_remove(pos);
                self.flow.on_reserve_reply(&policy, index, reply)
            }
            None if shadow => {
                self.shadow_token = None;
                self.on_shadow_reply(host, &policy, reply);
                None
            }
            None if self.flow.is_finished() => {
                self.check_token = None;
                None
            }
            None => {
                self.check_token = None;
                Some(self.flow.on_check_reply(&policy, reply))
            }
        };
        if verdict.is_some() {
            self.verdict = verdict;
        }
        if let Some(verdict) = self.next_verdict() {
            self.apply(host, &policy, verdict, true);
        }
    }

    /// The verdict to carry out now: a refusal at once, any other once no call is owed an
    /// answer (a shadow check with shadow limits only lets the request go on).
    fn next_verdict(&mut self) -> Option<Verdict> {
        if self.verdict.as_ref().is_some_and(|v| !v.allows()) {
            return self.verdict.take();
        }
        if self.admission_pending() {
            return None;
        }
        self.verdict
            .take()
            .or_else(|| self.flow.verdict_without_check())
    }

    /// Takes the shadow check's answer (a failure is counted and logged, never acted on).
    fn on_shadow_reply(
        &mut self,
        host: &mut impl Host,
        policy: &Policy,
        reply: Result<&[u8], ServiceFailure>,
    ) {
        if let Some(failure) = self.flow.on_shadow_reply(policy, reply) {
            host_log!(
                host,
                Debug,
                "rate-limit service failed for the shadow limits ({failure}); they mark nothing"
            );
            record_service_failure(host, &mut self.shared.borrow_mut().metrics, &failure);
        }
    }

    /// Whether this request is admitted by reservation (else by check).
    fn reserving(&self, policy: &Policy) -> bool {
        policy.service.mode != AdmissionMode::CheckReport
            && !self.shared.borrow().reservations_unimplemented
    }

    /// Whether the request body is held for the reservation's amount (the request's own bound):
    /// in reservation mode, where the proxy hands the body over before the headers go on.
    fn reads_bound(&self, policy: &Policy) -> bool {
        policy.usage.allow_on_headers_stop_iteration
            && self.reserving(policy)
            && self.method.eq_ignore_ascii_case("POST")
    }

    /// Whether the request waits for its admission (a check or reservations unanswered).
    fn admission_pending(&self) -> bool {
        self.check_token.is_some() || self.shadow_token.is_some() || !self.reserve_tokens.is_empty()
    }

    /// Whether the request's headers are held until its admission is answered.
    fn waiting_for_admission(&self) -> bool {
        self.admission_pending() && !self.headers_released
    }

    /// The stream is over (the proxy writes its access log). After an abort (client gone,
    /// upstream reset) the stream never reached its end: what arrived is charged here.
    pub fn on_log(&mut self, host: &mut impl Host) {
        if self.shared.borrow_mut().stream_ended(self.context_id) {
            return;
        }
        if !self.reserve_tokens.is_empty() {
            // Their answers reach the root once this stream is gone.
            let mut shared = self.shared.borrow_mut();
            for (token, index) in self.reserve_tokens.drain(..) {
                if let Some(plan) = self.flow.reservations().plans().get(index) {
                    shared
                        .orphaned_reserves
                        .insert(token, plan.descriptor.clone());
                }
            }
        }
        if self.verdict.take().is_some() {
            // Admitted, but held for the shadow check: it never went upstream.
            self.flow.abandon_admission();
        }
        if self.flow.is_limited() && !self.flow.is_finished() {
            self.flow.set_ending(ending(host));
        }
        self.finish(host);
    }

    /// Evaluates the policy and dispatches the check. `complete`: the request has no more
    /// body to come; `body`: the complete body in hand (Evaluate mode), rewritten in place.
    fn check(
        &mut self,
        host: &mut impl Host,
        policy: &Rc<Policy>,
        complete: bool,
        body: Option<&mut Vec<u8>>,
    ) -> Action {
        let decision = policy.evaluate(&mut RequestAttributes {
            host: &mut *host,
            body: self.body_json.as_ref(),
            path: &self.path,
            headers: self.headers.take(),
        });
        self.record_errors(host, &decision);
        if let Some(refusal) = decision.refusal() {
            // `onError: deny`: no budget can be named for the request; nothing is asked or
            // charged.
            let limit = refusal.limit.clone();
            if let Some(l) = policy.limits.iter().find(|l| l.name == limit) {
                let record = UsageRecord::refused_on_error(&l.name, l.tokens, l.enforcement);
                self.record_usage(host, &record);
            }
            let verdict = Verdict::Unevaluable {
                reply: crate::flow::unevaluable_reply(&limit),
                limit,
            };
            return self.apply(host, policy, verdict, false);
        }
        // The body bytes already counted (a body held for the evaluation) stay counted.
        let body_bytes = self.flow.request_bytes();
        let bound = self
            .body_json
            .as_ref()
            .map(|b| RequestBound::of_request(&self.path, b));
        // Reservation mode: the `Reserve`s are encoded at the admission, for what no lease
        // admits.
        let model = request_model(self.body_json.as_ref());
        let calls: Vec<(usize, Vec<u8>)> = if self.reserving(policy) {
            self.flow = RequestFlow::reserving(policy, decision, &self.path, bound, model);
            self.record_cost_errors(host);
            Vec::new()
        } else {
            let (flow, check) = RequestFlow::start(policy, decision, &self.path);
            self.flow = flow;
            self.flow.set_request_bound(bound);
            self.flow.set_request_model(model);
            self.flow.check_calls(policy, check)
        };
        self.flow.on_request_body_len(body_bytes);
        if complete {
            self.flow.on_request_complete();
        }
        if calls.is_empty() && self.flow.reservations().is_empty() {
            return self.release_body();
        }
        // Ask the upstream only for encodings whose usage can be read (a copy is decompressed;
        // the client still gets the encoding it accepts).
        if let Some(accept) = self.accept_encoding.take() {
            match crate::usage::readable_accept_encoding(&accept) {
                Some(kept) if kept == accept => {}
                Some(kept) => {
                    host.set_header(HeaderMap::RequestHeaders, "accept-encoding", Some(&kept))
                }
                None => host.set_header(HeaderMap::RequestHeaders, "accept-encoding", None),
            }
        }
        if policy.usage.inject_stream_usage
            && Format::is_openai_streaming(&self.path)
            && self.is_json_post()
        {
            match body {
                Some(body) => self.inject(host, body),
                None if !complete && !self.body_unread => {
                    // The body may change length: let the proxy frame it (chunked) instead of a
                    // content-length that could turn stale. (The headers cannot wait for the
                    // body: Envoy delivers no body while a plugin holds the headers.)
                    host.set_header(HeaderMap::RequestHeaders, "content-length", None);
                    self.body_mode = BodyMode::Inject;
                }
                None => {}
            }
        }
        self.shared.borrow_mut().metrics.hot(Hot::Checked, 1);
        let method = if self.flow.reservations().is_empty() {
            CHECK_RATE_LIMIT
        } else {
            RESERVE
        };
        if method == RESERVE {
            if policy.service.lease.is_some() {
                return self.admit_from_leases(host, policy);
            }
            let calls = self
                .flow
                .reservations()
                .pending_requests(&policy.service.domain);
            return self.admit(host, policy, RESERVE, calls);
        }
        if let Some((_, check)) = calls.iter().find(|(i, _)| *i == CHECK_CALL) {
            let key = super::spent::key(check);
            if let Some(status) = super::spent::status(host, &key, check) {
                // A request of the same counters, on any worker, spent what remained: the
                // service will refuse once its report lands; refuse now.
                let verdict = self.flow.refuse_spent(status);
                return self.apply(host, policy, verdict, false);
            }
            self.spent_key = Some((key, check.clone()));
        }
        self.admit(host, policy, method, calls)
    }

    /// Admits what the worker's leases have room for, without a call; the other reservations
    /// make their `Reserve`. The leases' own calls (a hot counter's lease asked or renewed) go
    /// out as the root context's.
    fn admit_from_leases(&mut self, host: &mut impl Host, policy: &Rc<Policy>) -> Action {
        let now = super::root::now_ms(host);
        let admissions: Vec<crate::lease::Admission> = {
            let mut shared = self.shared.borrow_mut();
            self.flow
                .reservations()
                .plans()
                .iter()
                .map(|plan| shared.leases.admit(plan, now))
                .collect()
        };
        let mut verdict = None;
        for (index, admission) in admissions.into_iter().enumerate() {
            if let crate::lease::Admission::Leased { key, status } = admission {
                verdict = self.flow.on_leased(policy, index, key, status);
            }
        }
        let lease_calls = self.shared.borrow().leases.has_calls();
        if lease_calls {
            self.send_now(host, policy, false);
        }
        if let Some(verdict) = verdict {
            self.shared.borrow_mut().metrics.hot(Hot::Leased, 1);
            return self.apply(host, policy, verdict, false);
        }
        let calls = self
            .flow
            .reservations()
            .pending_requests(&policy.service.domain);
        self.admit(host, policy, RESERVE, calls)
    }

    /// Dispatches the admission calls (one check, or one `Reserve` per reservation, with its
    /// index): pauses until they are answered, or carries out the verdict at once when none
    /// could be sent.
    fn admit(
        &mut self,
        host: &mut impl Host,
        policy: &Rc<Policy>,
        method: &str,
        calls: Vec<(usize, Vec<u8>)>,
    ) -> Action {
        for (index, bytes) in &calls {
            let index = *index;
            let call = GrpcCall {
                cluster: &policy.service.cluster,
                service: KUADRANT_SERVICE,
                method,
                message: bytes,
                timeout: policy.service.timeout,
            };
            let failure = match host.dispatch_grpc(&call) {
                Ok(token) if method == RESERVE => {
                    self.reserve_tokens.push((token, index));
                    continue;
                }
                Ok(token) if index == SHADOW_CALL => {
                    self.shadow_token = Some(token);
                    continue;
                }
                Ok(token) => {
                    self.check_token = Some(token);
                    continue;
                }
                Err(reason) => ServiceFailure::Dispatch(reason),
            };
            let verdict = if method == RESERVE {
                self.flow.on_reserve_reply(policy, index, Err(failure))
            } else if index == SHADOW_CALL {
                self.on_shadow_reply(host, policy, Err(failure));
                None
            } else {
                Some(self.flow.on_check_reply(policy, Err(failure)))
            };
            if verdict.is_some() {
                self.verdict = verdict;
            }
        }
        match self.next_verdict() {
            Some(v) => self.apply(host, policy, v, false),
            None => Action::Pause,
        }
    }

    /// Carries out a verdict. `paused`: the request waits for the check reply (resume it to let
    /// it through); otherwise the returned action lets it through or stops it.
    fn apply(
        &mut self,
        host: &mut impl Host,
        policy: &Rc<Policy>,
        verdict: Verdict,
        paused: bool,
    ) -> Action {
        if verdict == Verdict::FallBackToCheck {
            return self.fall_back_to_check(host, policy, paused);
        }
        let reply = {
            let mut shared = self.shared.borrow_mut();
            let metrics = &mut shared.metrics;
            match verdict {
                Verdict::Allow => {
                    metrics.hot(Hot::Allowed, 1);
                    None
                }
                Verdict::AllowOnFailure(failure) => {
                    host_log!(
                        host,
                        Warn,
                        "rate-limit service failed ({failure}); failure mode allow: request continues"
                    );
                    record_service_failure(host, metrics, &failure);
                    metrics.inc(host, names::FAILURE_ALLOWED);
                    None
                }
                Verdict::Limited { reply, limit } => {
                    metrics.inc(host, names::LIMITED);
                    if let Some(name) = &limit {
                        metrics.inc(host, &format!("{}.{name}", names::LIMITED));
                    }
                    Some(reply)
                }
                Verdict::DenyOnFailure { reply, failure } => {
                    host_log!(
                        host,
                        Warn,
                        "rate-limit service failed ({failure}); failure mode deny: request refused"
                    );
                    record_service_failure(host, metrics, &failure);
                    metrics.inc(host, names::FAILURE_DENIED);
                    Some(reply)
                }
                Verdict::Unevaluable { reply, limit } => {
                    metrics.inc(host, names::REFUSED_ON_ERROR);
                    metrics.inc(host, &format!("{}.{limit}", names::REFUSED_ON_ERROR));
                    Some(reply)
                }
                Verdict::FallBackToCheck => None,
            }
        };
        // A reply or a resume re-enters the VM: the shared state is no longer borrowed.
        match reply {
            None if paused => {
                if self.body_mode != BodyMode::PassThrough
                    && self.kept > 0
                    && !self.headers_released
                {
                    // The body is being read for a rewrite: it all goes on at its end
                    // (`release_body`).
                } else {
                    self.headers_released = true;
                    // What Envoy kept goes on with the resume; later chunks come one by one.
                    self.kept = 0;
                    self.buffering = false;
                    host.resume_request();
                }
                Action::Continue
            }
            None => {
                self.headers_released = true;
                Action::Continue
            }
            Some(reply) => {
                // Holds granted before another limit refused are released now.
                self.finish(host);
                host.send_reply(&reply);
                Action::Pause
            }
        }
    }

    /// The service has no `Reserve` (admission mode `auto`): checkReport from now on for the
    /// whole VM (logged once, counted), and this request is checked instead.
    fn fall_back_to_check(
        &mut self,
        host: &mut impl Host,
        policy: &Rc<Policy>,
        paused: bool,
    ) -> Action {
        let first = {
            let mut shared = self.shared.borrow_mut();
            let first = !shared.reservations_unimplemented;
            shared.reservations_unimplemented = true;
            if first {
                shared.metrics.inc(host, names::RESERVATIONS_UNIMPLEMENTED);
            }
            first
        };
        if first {
            host_log!(
                host,
                Warn,
                "the rate-limit service does not implement Reserve (gRPC UNIMPLEMENTED, e.g. Limitador 2.4): \
                 admission mode auto falls back to checkReport for the life of this VM"
            );
        }
        self.reserve_tokens.clear();
        let calls = self.flow.fall_back_to_check(policy);
        let action = self.admit(host, policy, CHECK_RATE_LIMIT, calls);
        if paused && action == Action::Continue {
            // The request was paused for its reservation: it goes on now.
            self.headers_released = true;
            host.resume_request();
        }
        action
    }

    /// Whether the root context released this stream.
    fn is_released(&mut self) -> bool {
        if !self.released {
            self.released = self.shared.borrow().is_released(self.context_id);
        }
        self.released
    }

    /// Counts the expressions that failed, logging each at warn level once.
    fn record_errors(&self, host: &mut impl Host, decision: &Decision) {
        if decision.errors.is_empty() {
            return;
        }
        let mut shared = self.shared.borrow_mut();
        for e in &decision.errors {
            shared.metrics.inc(host, names::EXPRESSION_ERRORS);
            shared
                .metrics
                .inc(host, &format!("{}.{}", names::EXPRESSION_ERRORS, e.limit));
            let consequence = match e.on_error {
                OnError::Deny => "onError deny: the request is refused",
                OnError::Skip => "onError skip: the limit does not apply",
            };
            let key = format!("{}\u{0}{}", e.limit, e.expression);
            if shared.first_warning(key) {
                host_log!(
                    host,
                    Warn,
                    "{e} ({consequence}; logged once, then at debug level)"
                );
            } else {
                host_log!(host, Debug, "{e} ({consequence})");
            }
        }
    }

    /// Charges the request once: its usage (or the fallback) is queued for report.
    fn finish(&mut self, host: &mut impl Host) {
        let Some(policy) = self.policy.clone() else {
            return;
        };
        let mut done = self.flow.finish(&policy);
        self.record_cost_errors(host);
        if let Some(record) = done.record.take() {
            self.record_usage(host, &record);
        }
        let commits = std::mem::take(&mut done.commits);
        let leased = std::mem::take(&mut done.leased);
        // The fewest tokens this request spent in any category it reports.
        let spent = done.reports.iter().map(|r| r.tokens).min();
        let mut send_reports = false;
        {
            let mut shared = self.shared.borrow_mut();
            for c in &commits {
                shared
                    .metrics
                    .hot(Hot::tokens_reported(c.category), c.actual);
                shared
                    .commits
                    .add(c.descriptor.clone(), c.reservation_id.clone(), c.actual);
            }
            for l in &leased {
                shared
                    .metrics
                    .hot(Hot::tokens_reported(l.category), l.actual);
                if let Some(plan) = self.flow.reservations().plans().get(l.index) {
                    shared
                        .leases
                        .finish(&l.key, &plan.descriptor, l.amount, l.actual);
                }
            }
            self.record_charge(host, &policy, &mut shared, done);
            if !shared.queue.is_idle() {
                // Reports go with the tick, unless the budget is nearly spent: then at once, so
                // that the next check (on any worker) sees the spend.
                send_reports = self
                    .flow
                    .remaining()
                    .is_none_or(|r| shared.queue.unsent_tokens() >= r);
            }
        }
        if let (true, Some(spent)) = (send_reports, spent) {
            self.mark_spent(host, spent);
        }
        let lease_commits = !leased.is_empty() && self.shared.borrow().leases.has_commits();
        if !commits.is_empty() || send_reports || lease_commits {
            self.send_now(host, &policy, send_reports);
        }
    }

    /// Ends the request's account: its usage record goes where the proxy's access log reads it
    /// (filter state `wasm.token_ratelimit`; not with `usage.record: false`), and each of its
    /// limits counts its outcome and what it was charged.
    fn record_usage(&self, host: &mut impl Host, record: &UsageRecord) {
        if self.policy.as_ref().is_some_and(|p| p.usage.record) {
            host.set_property(crate::record::PROPERTY, &record.to_json());
        }
        let mut shared = self.shared.borrow_mut();
        for l in &record.limits {
            shared.metrics.limit(&l.name, l.tokens, l.outcome, l.charged);
        }
    }

    /// Counts and logs the costs the flow could not compute (`cost_errors`; the first of
    /// each limit at warn level, later ones at debug).
    fn record_cost_errors(&mut self, host: &mut impl Host) {
        let errors = self.flow.take_cost_errors();
        if errors.is_empty() {
            return;
        }
        let mut shared = self.shared.borrow_mut();
        for e in errors {
            shared.metrics.inc(host, names::COST_ERRORS);
            if shared.first_warning(format!("cost\u{0}{}", e.limit)) {
                host_log!(
                    host,
                    Warn,
                    "{e} (counted in cost_errors; logged once per limit, then at debug level)"
                );
            } else {
                host_log!(host, Debug, "{e}");
            }
        }
    }

    /// Marks this request's counters spent for every worker (see [`super::spent::mark`]).
    fn mark_spent(&self, host: &mut impl Host, spent: u64) {
        if let (Some((key, check)), Some(status)) = (&self.spent_key, self.flow.restrictive()) {
            super::spent::mark(host, key, check, status, spent);
        }
    }

    /// Dispatches the queued commits (and reports, with `reports`) now, as the root context's
    /// calls so that they outlive this stream.
    fn send_now(&self, host: &mut impl Host, policy: &Policy, reports: bool) {
        let root = self.shared.borrow().root_id;
        if !host.set_effective_context(root) {
            // Left for the root's tick.
            return;
        }
        super::root::dispatch_queued(host, policy, &self.shared, reports);
        host.set_effective_context(self.context_id);
    }

    /// Counts how a finished request was charged and queues its reports.
    fn record_charge(
        &self,
        host: &mut impl Host,
        policy: &Policy,
        shared: &mut super::root::Shared,
        done: crate::flow::Finished,
    ) {
        let metrics = &mut shared.metrics;
        if done.clamped {
            host_log!(
                host,
                Warn,
                "a response reported more than usage.maxTokensPerResponse ({}) tokens; charged that many",
                policy.usage.max_tokens_per_response
            );
            metrics.inc(host, names::USAGE_CLAMPED);
        }
        match done.charge {
            Charge::Nothing => return,
            Charge::Reported => {}
            charge => {
                // No usage: counted as missing, and by what it was charged instead.
                host_log!(
                    host,
                    Debug,
                    "response carried no usage; charged: {:?} {:?}",
                    charge,
                    done.usage
                );
                metrics.inc(host, names::USAGE_MISSING);
                let instead = match charge {
                    Charge::Free => Some(names::USAGE_FREE),
                    Charge::Declared => Some(names::USAGE_DECLARED),
                    Charge::Estimated => Some(names::USAGE_ESTIMATED),
                    Charge::Fixed => Some(names::USAGE_FIXED),
                    _ => None,
                };
                if let Some(name) = instead {
                    metrics.inc(host, name);
                }
            }
        }
        for r in done.reports {
            shared
                .metrics
                .hot(Hot::tokens_reported(r.category), r.tokens);
            shared.queue.add(r.descriptor, r.tokens);
        }
    }
}

/// How a stream that the filter saw no end of ended, from Envoy's `response.code_details`:
/// `upstream_reset_…` when the upstream reset it, `via_upstream` (or nothing told) when the
/// response ended without a body callback (a response of headers only), anything else
/// (`downstream_remote_disconnect`, a stream reset by the client) the client's abort.
fn ending(host: &mut impl Host) -> Ending {
    match host.property(&["response", "code_details"]) {
        Some(d) if d.starts_with(b"upstream_reset") => Ending::UpstreamReset,
        None => Ending::Complete,
        Some(d) if d == b"via_upstream" => Ending::Complete,
        Some(_) => Ending::ClientAborted,
    }
}

/// Counts a failed check (and a timeout on its own).
fn record_service_failure(
    host: &mut impl Host,
    metrics: &mut super::metrics::Metrics,
    failure: &ServiceFailure,
) {
    metrics.inc(host, names::SERVICE_ERRORS);
    if *failure == ServiceFailure::Grpc(GRPC_DEADLINE_EXCEEDED) {
        metrics.inc(host, names::SERVICE_TIMEOUTS);
    }
}
