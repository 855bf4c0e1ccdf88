//! The per-request state machine, free of host calls: the wasm layer feeds it what Envoy
//! delivers and carries out what it answers.
//!
//! ```text
//! request headers ──▶ evaluate policy ──▶ no limit applies ──────────────▶ pass through
//!                                     └─▶ CheckRateLimit (hits 0) ─▶ OK ─▶ continue, headers noted
//!                                                                 ├─▶ OVER_LIMIT ─▶ 429 reply
//!                                                                 └─▶ error ─▶ failure mode
//! response headers ─▶ choose usage format; body chunks ─▶ extractor (never held)
//! end of stream or on_log ─▶ finish once ─▶ reports per token category ─▶ root queue
//! ```

use crate::config::{AdmissionMode, ErrorCharge, FailureMode, Fallback, TokenCategory};
use crate::cost::{CostUsage, Spent};
use crate::estimate::{RequestBound, TextCounter, TextKeys, WORD_CHARS_PER_TOKEN};
pub use crate::filter::LocalReply;
use crate::headers::most_restrictive;
use crate::policy::{Applied, CostError, CostInputs, Decision, Policy};
use crate::record::{
    Admission, LimitOutcome, LimitRecord, Source, Status, UsageFigures, UsageRecord,
};
use crate::reservation::{CommitOrder, Outcome, Reservations};
use crate::usage::{BodyFormat, Encoding, Format, Usage, UsageExtractor};
use prost::Message;
use ratelimit_proto::{Code, DescriptorStatus, RateLimitDescriptor, RateLimitResponse};

/// The index of the enforced limits' `CheckRateLimit` among a request's calls.
pub const CHECK_CALL: usize = 0;
/// The index of the shadow limits' `CheckRateLimit` among a request's calls.
pub const SHADOW_CALL: usize = 1;

/// Why the rate-limit service gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceFailure {
    /// The call could not be dispatched (unknown cluster, ...).
    Dispatch(String),
    /// The call ended with a non-OK gRPC status (14 unavailable, 4 deadline exceeded, ...).
    Grpc(u32),
    /// The reply did not decode as a `RateLimitResponse`.
    Undecodable(String),
    /// The reply's overall code was `UNKNOWN` (e.g. an empty domain).
    UnknownCode,
}

impl std::fmt::Display for ServiceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceFailure::Dispatch(e) => write!(f, "dispatch failed: {e}"),
            ServiceFailure::Grpc(code) => write!(f, "gRPC status {code}"),
            ServiceFailure::Undecodable(e) => write!(f, "undecodable reply: {e}"),
            ServiceFailure::UnknownCode => write!(f, "overall_code UNKNOWN"),
        }
    }
}

/// The verdict on a request after its check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Let it through because the service failed and the failure mode is `allow`.
    AllowOnFailure(ServiceFailure),
    /// Over budget: reply 429 with the named limit.
    Limited {
        /// The 429 to send.
        reply: LocalReply,
        /// The limit that refused (the most restrictive one the service named).
        limit: Option<String>,
    },
    /// The service failed and the failure mode is `deny`.
    DenyOnFailure {
        /// The 500 to send.
        reply: LocalReply,
        /// What failed.
        failure: ServiceFailure,
    },
    /// Admission mode `auto` and the service has no `Reserve`: check the request instead
    /// (and every later one).
    FallBackToCheck,
    /// A limit with `onError: deny` could not be evaluated for the request: refused before
    /// any call to the service, nothing charged.
    Unevaluable {
        /// The 403 to send.
        reply: LocalReply,
        /// The limit whose expression failed.
        limit: String,
    },
}

impl Verdict {
    /// Whether the request goes on (allowed, or let through by the failure mode).
    pub fn allows(&self) -> bool {
        matches!(self, Verdict::Allow | Verdict::AllowOnFailure(_))
    }
}

/// One request's state.
#[derive(Debug)]
pub struct RequestFlow {
    applied: Vec<Applied>,
    /// The API the request speaks (from its path).
    format: Format,
    /// Request body bytes seen (their content, or only their number).
    request_bytes: u64,
    /// The text of the request body chunks whose content was seen, for the estimate.
    request_text: TextCounter,
    /// Headers to add to the client's response (`x-ratelimit-*`, the service's own).
    response_headers: Vec<(String, String)>,
    /// What the policy tells of the response's rate-limit headers (format, enforced rates).
    headers: crate::headers::Known,
    extractor: Option<UsageExtractor>,
    /// Reservation mode: the request's reservations.
    reservations: Reservations,
    /// The most restrictive status the check answered (checkReport mode; `None`: not told).
    restrictive: Option<DescriptorStatus>,
    denied: bool,
    /// The request was let through (the check allowed it, or the failure mode did).
    allowed: bool,
    finished: bool,
    /// The client sent the whole request (its body's end, or a request without body).
    request_complete: bool,
    /// The response's status and who sent it, once its headers went by.
    response: Option<(u16, Responder)>,
    /// What the request body declares (`None`: the filter did not read it).
    bound: Option<RequestBound>,
    /// How the stream ended, when not at the end of its response.
    ending: Ending,
    /// Why the request was refused (limited, failure mode deny).
    refusal: Option<Status>,
    /// The failure mode let the request through.
    failure_allowed: bool,
    /// The limit a 429 named (`None`: the service named none).
    limited_by: Option<String>,
    /// The shadow limits that would have refused the request.
    shadow_limited: Vec<String>,
    /// A shadow check (checkReport mode) is owed an answer.
    shadow_pending: bool,
    /// The fewest tokens the shadow check said remain (`None`: not told).
    shadow_remaining: Option<u64>,
    /// checkReport mode: the enforced limits' check was asked.
    enforced_check: bool,
    /// The request body's `model`, when the filter read the body.
    request_model: Option<String>,
    /// What the cost expressions of the applied limits read of the request.
    costs: Vec<CostInputs>,
    /// Costs that could not be computed (reasons, naming the limit), for the stream to count
    /// and log ([`RequestFlow::take_cost_errors`]).
    cost_errors: Vec<CostError>,
}

/// How a stream ended, as the proxy tells at its log phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ending {
    /// At the end of its response (or by a local reply); with no response at all, the
    /// client went away before it.
    #[default]
    Complete,
    /// The client went away first.
    ClientAborted,
    /// The upstream reset the stream.
    UpstreamReset,
}

/// Who sent a request's response, as seen at its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Responder {
    /// The upstream (Envoy's `response.code_details` is `via_upstream`, or was not told).
    Upstream,
    /// Envoy itself, without an upstream connection: the request never reached the upstream
    /// (a 413 for a body over its buffer, a 503 with no healthy or reachable upstream, a
    /// direct response).
    ProxyBeforeUpstream,
    /// Envoy itself, after the request went upstream: a timeout, or an upstream reset before
    /// any response.
    ProxyAfterUpstream,
}

impl Default for RequestFlow {
    fn default() -> Self {
        RequestFlow {
            applied: Vec::new(),
            format: Format::Unknown,
            request_bytes: 0,
            request_text: TextCounter::new(TextKeys::Request),
            response_headers: Vec::new(),
            headers: crate::headers::Known::default(),
            extractor: None,
            reservations: Reservations::default(),
            restrictive: None,
            denied: false,
            allowed: false,
            finished: false,
            request_complete: false,
            response: None,
            bound: None,
            ending: Ending::Complete,
            refusal: None,
            failure_allowed: false,
            limited_by: None,
            shadow_limited: Vec::new(),
            shadow_pending: false,
            shadow_remaining: None,
            enforced_check: false,
            request_model: None,
            costs: Vec::new(),
            cost_errors: Vec::new(),
        }
    }
}

/// How a finished request was charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Charge {
    /// Nothing to charge (no limit applied, or the request was refused).
    #[default]
    Nothing,
    /// The usage the response reported.
    Reported,
    /// No usage: the fallback estimate.
    Estimated,
    /// No usage: the fallback's fixed amount.
    Fixed,
    /// No usage, and the fallback is `none`.
    Missing,
    /// No usage, and nothing owed: an upstream error the configuration lets go free (`4xx` by
    /// default), or a request that never reached the upstream (Envoy's own reply, an upload
    /// the client abandoned).
    Free,
    /// No answer after the request reached the upstream (the client hung up, a timeout, a
    /// reset): the prompt estimate plus the completion maximum the request declared, what
    /// reservation mode holds for it.
    Declared,
}

impl RequestFlow {
    /// Starts a request to `path` from the policy's decision. Returns the encoded
    /// `CheckRateLimit` request (hits_addend 0), or `None` when no limit applies and nothing
    /// is to be done.
    pub fn start(
        policy: &Policy,
        decision: Decision,
        path: &str,
    ) -> (RequestFlow, Option<Vec<u8>>) {
        let mut flow = RequestFlow {
            headers: crate::headers::Known::of(policy, &decision.applied),
            applied: decision.applied,
            costs: decision.costs,
            format: Format::from_path(path),
            ..Default::default()
        };
        let request = flow.check_request(policy);
        (flow, request)
    }

    /// The encoded `CheckRateLimit` of the enforced limits that apply (`None`: none does);
    /// notes the shadow check owed when shadow limits apply too.
    fn check_request(&mut self, policy: &Policy) -> Option<Vec<u8>> {
        if self.applied.is_empty() {
            return None;
        }
        if !policy.has_shadow {
            self.enforced_check = true;
            return Some(policy.encode_check_request(&self.applied));
        }
        let enforced = self.applied_of(policy, false);
        self.shadow_pending = self.applied.len() > enforced.len();
        self.enforced_check = !enforced.is_empty();
        self.enforced_check
            .then(|| policy.encode_check_request(&enforced))
    }

    /// The applied limits that are shadow limits (`shadow`), or enforced ones.
    fn applied_of(&self, policy: &Policy, shadow: bool) -> Vec<Applied> {
        self.applied
            .iter()
            .filter(|a| policy.limits.get(a.limit).map(|l| l.is_shadow()) == Some(shadow))
            .cloned()
            .collect()
    }

    /// checkReport mode: the encoded `CheckRateLimit` request of the shadow limits that apply,
    /// asked beside the enforced limits' check and never refusing (see
    /// [`RequestFlow::on_shadow_reply`]); `None` when no shadow limit applies.
    pub fn shadow_check(&self, policy: &Policy) -> Option<Vec<u8>> {
        if !self.shadow_pending {
            return None;
        }
        Some(policy.encode_check_request(&self.applied_of(policy, true)))
    }

    /// Takes the answer to the shadow check: an OVER_LIMIT marks the shadow limits that would
    /// have refused (the ones its statuses name, else every shadow limit that applied); a
    /// failure marks nothing and refuses nothing. Returns the failure, for the caller to count.
    pub fn on_shadow_reply(
        &mut self,
        policy: &Policy,
        reply: Result<&[u8], ServiceFailure>,
    ) -> Option<ServiceFailure> {
        if !std::mem::take(&mut self.shadow_pending) {
            return None;
        }
        let response = match decode_check_reply(reply) {
            Ok(r) => r,
            Err(f) => return Some(f),
        };
        let remaining = most_restrictive(&response.statuses, false).map(|s| s.limit_remaining);
        match Code::try_from(response.overall_code) {
            Ok(Code::Ok) => {
                self.shadow_remaining = remaining.map(u64::from);
                None
            }
            Ok(Code::OverLimit) => {
                self.shadow_remaining = Some(0);
                let shadow: Vec<&str> = self
                    .applied
                    .iter()
                    .filter_map(|a| policy.limits.get(a.limit))
                    .filter(|l| l.is_shadow())
                    .map(|l| l.name.as_str())
                    .collect();
                let named: Vec<String> = response
                    .statuses
                    .iter()
                    .filter(|s| s.code == Code::OverLimit as i32)
                    .filter_map(|s| s.current_limit.as_ref())
                    .map(|l| l.name.clone())
                    .filter(|n| shadow.contains(&n.as_str()))
                    .collect();
                self.shadow_limited = if named.is_empty() {
                    shadow.into_iter().map(str::to_string).collect()
                } else {
                    named
                };
                None
            }
            _ => Some(ServiceFailure::UnknownCode),
        }
    }

    /// The shadow limits that would have refused the request, in the order found.
    pub fn shadow_limited(&self) -> &[String] {
        &self.shadow_limited
    }

    /// The request ended while its verdict waited for another answer (a shadow check): it
    /// never went upstream, whatever the verdict said, and costs nothing.
    pub fn abandon_admission(&mut self) {
        self.allowed = false;
        self.failure_allowed = false;
    }

    /// The request body's `model` (read with the body).
    pub fn set_request_model(&mut self, model: Option<String>) {
        self.request_model = model;
    }

    /// How the stream ended, when it ends without the end of its response (an abort). A
    /// request already finished keeps its record.
    pub fn set_ending(&mut self, ending: Ending) {
        self.ending = ending;
    }

    /// Starts a request in reservation mode. `bound`: what the request body declares (`None`
    /// without the body in hand); `model`: the body's `model` (it prices the bound of a cost
    /// limit). Returns the encoded `ReserveRequest`s, one per planned reservation (none: no
    /// limit applies).
    pub fn start_reservation(
        policy: &Policy,
        decision: Decision,
        path: &str,
        bound: Option<RequestBound>,
        model: Option<String>,
    ) -> (RequestFlow, Vec<Vec<u8>>) {
        let flow = RequestFlow::reserving(policy, decision, path, bound, model);
        let requests = flow.reservations.requests(&policy.service.domain);
        (flow, requests)
    }

    /// [`RequestFlow::start_reservation`] without encoding the requests: the caller encodes
    /// what no lease admits ([`Reservations::pending_requests`]).
    pub fn reserving(
        policy: &Policy,
        decision: Decision,
        path: &str,
        bound: Option<RequestBound>,
        model: Option<String>,
    ) -> RequestFlow {
        let mut flow = RequestFlow {
            headers: crate::headers::Known::of(policy, &decision.applied),
            applied: decision.applied,
            costs: decision.costs,
            format: Format::from_path(path),
            request_model: model,
            ..Default::default()
        };
        let plans = policy.plan_reservations(
            &flow.applied,
            bound,
            &flow.costs,
            flow.request_model.as_deref().unwrap_or(""),
            &mut flow.cost_errors,
        );
        flow.reservations = Reservations::new(plans);
        flow.bound = bound;
        flow
    }

    /// The costs that could not be computed since the last call (reasons naming the limit): a
    /// bound's (held as [`crate::policy::UNPRICED_HOLD`]) or a response's (charged as
    /// [`Policy::charge_cost`] says).
    pub fn take_cost_errors(&mut self) -> Vec<CostError> {
        std::mem::take(&mut self.cost_errors)
    }

    /// Switches a request in reservation mode to a check (the service has no `Reserve`):
    /// returns the calls of [`RequestFlow::check_calls`].
    pub fn fall_back_to_check(&mut self, policy: &Policy) -> Vec<(usize, Vec<u8>)> {
        self.reservations = Reservations::default();
        let check = self.check_request(policy);
        self.check_calls(policy, check)
    }

    /// The calls of checkReport mode: the enforced limits' check (`check`, index
    /// [`CHECK_CALL`]) and the shadow limits' (index [`SHADOW_CALL`]), those that apply.
    pub fn check_calls(&self, policy: &Policy, check: Option<Vec<u8>>) -> Vec<(usize, Vec<u8>)> {
        let shadow = self.shadow_check(policy).map(|c| (SHADOW_CALL, c));
        check
            .map(|c| (CHECK_CALL, c))
            .into_iter()
            .chain(shadow)
            .collect()
    }

    /// Whether the request was let through or refused.
    fn is_decided(&self) -> bool {
        self.allowed || self.denied
    }

    /// checkReport mode with shadow limits only: the verdict once the shadow check is
    /// answered (the request goes on, whatever it said); `None` in any other case.
    pub fn verdict_without_check(&mut self) -> Option<Verdict> {
        if self.enforced_check
            || self.shadow_pending
            || !self.reservations.is_empty()
            || self.is_decided()
            || self.finished
            || self.applied.is_empty()
        {
            return None;
        }
        self.allowed = true;
        Some(Verdict::Allow)
    }

    /// The request's reservations (reservation mode).
    pub fn reservations(&self) -> &Reservations {
        &self.reservations
    }

    /// The fewest tokens the checks said remain for the request's counters, its shadow limits'
    /// included (checkReport mode; `None` when the service did not say, as Limitador does
    /// not).
    pub fn remaining(&self) -> Option<u64> {
        let enforced = self
            .restrictive
            .as_ref()
            .map(|s| u64::from(s.limit_remaining));
        match (enforced, self.shadow_remaining) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The most restrictive status the check answered (checkReport mode).
    pub fn restrictive(&self) -> Option<&DescriptorStatus> {
        self.restrictive.as_ref()
    }

    /// Refuses the request without asking the service: a request of the same counters spent
    /// what remained of `status`'s window (the service will answer OVER_LIMIT once its report
    /// lands). `status` names the limit, its size and the time left until the reset.
    pub fn refuse_spent(&mut self, status: DescriptorStatus) -> Verdict {
        let response = RateLimitResponse {
            statuses: vec![DescriptorStatus {
                code: Code::OverLimit as i32,
                limit_remaining: 0,
                ..status
            }],
            ..Default::default()
        };
        self.limited(&response)
    }

    /// Whether the request has ended (charged, or refused).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Takes the answer to reservation `index`; returns the verdict once every reservation is
    /// answered.
    pub fn on_reserve_reply(
        &mut self,
        policy: &Policy,
        index: usize,
        reply: Result<&[u8], ServiceFailure>,
    ) -> Option<Verdict> {
        let outcome = self.reservations.on_reply(index, reply)?;
        Some(self.reservation_verdict(policy, outcome))
    }

    /// Reservation `index` was admitted from the worker's lease `key` (no call); `status`:
    /// what the lease knows of the budget. Returns the verdict when no reservation is left
    /// waiting for an answer.
    pub fn on_leased(
        &mut self,
        policy: &Policy,
        index: usize,
        key: String,
        status: Option<DescriptorStatus>,
    ) -> Option<Verdict> {
        self.reservations.lease(index, key, status);
        let outcome = self.reservations.outcome()?;
        Some(self.reservation_verdict(policy, outcome))
    }

    /// The verdict of the reservations' outcome.
    fn reservation_verdict(&mut self, policy: &Policy, outcome: Outcome) -> Verdict {
        self.shadow_limited = self.reservations.shadow_refused();
        match outcome {
            Outcome::Admitted => {
                self.response_headers = crate::headers::render(
                    &self.headers,
                    &self.enforced_statuses(policy),
                    &[],
                    false,
                );
                self.allowed = true;
                Verdict::Allow
            }
            Outcome::Refused => {
                let response = RateLimitResponse {
                    statuses: self.enforced_statuses(policy),
                    ..Default::default()
                };
                self.limited(&response)
            }
            Outcome::Unimplemented if policy.service.mode == AdmissionMode::Auto => {
                Verdict::FallBackToCheck
            }
            Outcome::Unimplemented => self.failure(
                policy.service.failure_mode,
                ServiceFailure::Grpc(crate::reservation::GRPC_UNIMPLEMENTED),
            ),
            Outcome::Failed(f) => self.failure(policy.service.failure_mode, f),
        }
    }

    /// The statuses the reservations' answers carried, but those of shadow limits: the
    /// budgets that admit or refuse the request.
    fn enforced_statuses(&self, policy: &Policy) -> Vec<DescriptorStatus> {
        let shadow = |s: &DescriptorStatus| {
            s.current_limit.as_ref().is_some_and(|l| {
                policy
                    .limits
                    .iter()
                    .any(|x| x.name == l.name && x.is_shadow())
            })
        };
        self.reservations
            .statuses()
            .iter()
            .filter(|s| !shadow(s))
            .cloned()
            .collect()
    }

    /// Whether any limit applies to this request.
    pub fn is_limited(&self) -> bool {
        !self.applied.is_empty()
    }

    /// The limits that apply.
    pub fn applied(&self) -> &[Applied] {
        &self.applied
    }

    /// Takes the check's result: the reply bytes, or why there are none.
    pub fn on_check_reply(
        &mut self,
        policy: &Policy,
        reply: Result<&[u8], ServiceFailure>,
    ) -> Verdict {
        let response = match decode_check_reply(reply) {
            Ok(r) => r,
            Err(failure) => return self.failure(policy.service.failure_mode, failure),
        };
        match Code::try_from(response.overall_code) {
            Ok(Code::Ok) => {
                self.response_headers = rate_limit_headers(&self.headers, &response, false);
                self.restrictive = most_restrictive(&response.statuses, false).cloned();
                self.allowed = true;
                Verdict::Allow
            }
            Ok(Code::OverLimit) => self.limited(&response),
            _ => self.failure(policy.service.failure_mode, ServiceFailure::UnknownCode),
        }
    }

    /// A 429 for an over-limit answer, naming the limit that constrains most.
    fn limited(&mut self, response: &RateLimitResponse) -> Verdict {
        self.denied = true;
        self.refusal = Some(Status::Limited);
        let over = most_restrictive(&response.statuses, true);
        let limit = over
            .and_then(|s| s.current_limit.as_ref())
            .map(|l| l.name.clone())
            .filter(|n| !n.is_empty());
        self.limited_by.clone_from(&limit);
        let message = match &limit {
            Some(name) => format!(
                "Token rate limit exceeded for limit '{name}'. Retry after the window resets."
            ),
            None => "Token rate limit exceeded. Retry after the window resets.".to_string(),
        };
        let mut headers = rate_limit_headers(&self.headers, response, true);
        headers.push(("content-type".into(), "application/json".into()));
        Verdict::Limited {
            reply: LocalReply {
                status: 429,
                headers,
                body: error_body(&message, "tokens", "rate_limit_exceeded"),
            },
            limit,
        }
    }

    fn failure(&mut self, mode: FailureMode, failure: ServiceFailure) -> Verdict {
        match mode {
            FailureMode::Allow => {
                self.allowed = true;
                self.failure_allowed = true;
                Verdict::AllowOnFailure(failure)
            }
            FailureMode::Deny => {
                self.denied = true;
                self.refusal = Some(Status::FailureModeDenied);
                Verdict::DenyOnFailure {
                    reply: LocalReply {
                        status: 500,
                        headers: vec![("content-type".into(), "application/json".into())],
                        body: error_body(
                            "The token rate-limit service is unavailable.",
                            "server_error",
                            "rate_limit_service_unavailable",
                        ),
                    },
                    failure,
                }
            }
        }
    }

    /// Headers to add to the client's response.
    pub fn response_headers(&self) -> &[(String, String)] {
        &self.response_headers
    }

    /// Counts `len` request body bytes whose content the caller does not pass: the fallback
    /// estimate charges them at [`WORD_CHARS_PER_TOKEN`] bytes per token, as one long word.
    /// [`RequestFlow::on_request_body_chunk`] counts the text instead.
    pub fn on_request_body_len(&mut self, len: u64) {
        self.request_bytes = self.request_bytes.saturating_add(len);
    }

    /// Feeds one request body chunk (as it goes upstream; chunks may split the body anywhere):
    /// counts its bytes, as [`RequestFlow::on_request_body_len`] does, and its text, the
    /// prompt of the fallback estimate when the filter did not read the whole body
    /// ([`RequestFlow::set_request_bound`]): the words under [`TextKeys::Request`] of a JSON
    /// body, every word of another one.
    pub fn on_request_body_chunk(&mut self, chunk: &[u8]) {
        self.request_bytes = self.request_bytes.saturating_add(chunk.len() as u64);
        self.request_text.feed(chunk);
    }

    /// The prompt part of the fallback estimate, in tokens: the request bound's prompt
    /// estimate when the filter read the body, else the text of the chunks it was fed plus
    /// the bytes it was only told the number of, at [`WORD_CHARS_PER_TOKEN`] bytes per token.
    fn prompt_estimate(&self) -> u64 {
        if let Some(bound) = self.bound {
            return bound.prompt;
        }
        let unseen = self.request_bytes.saturating_sub(self.request_text.bytes());
        self.request_text
            .tokens()
            .saturating_add(unseen.div_ceil(WORD_CHARS_PER_TOKEN))
    }

    /// The client sent the whole request: the end of its body, or headers without a body. A
    /// request that ends before (an abandoned upload) and had no answer of the upstream costs
    /// nothing.
    pub fn on_request_complete(&mut self) {
        self.request_complete = true;
    }

    /// What the request body declares, when the filter read it (checkReport mode; reservation
    /// mode takes it at its start): a request that reached the upstream and ended without an
    /// answer is charged its prompt estimate plus its declared completion maximum.
    pub fn set_request_bound(&mut self, bound: Option<RequestBound>) {
        if bound.is_some() {
            self.bound = bound;
        }
    }

    /// The response's status (`None`: unreadable) and who sent it: decides what a response
    /// without usage costs.
    pub fn on_response_status(&mut self, status: Option<u16>, responder: Responder) {
        if !self.reads_response() {
            return;
        }
        self.response = Some((status.unwrap_or(200), responder));
    }

    /// Request body bytes counted so far.
    pub fn request_bytes(&self) -> u64 {
        self.request_bytes
    }

    /// Whether the response is to be read (its headers, then its body): the request was
    /// checked and let through.
    pub fn reads_response(&self) -> bool {
        self.is_limited() && !self.denied && !self.finished
    }

    /// The upstream's response headers arrived: choose how to read usage from the body.
    pub fn on_response_headers(
        &mut self,
        policy: &Policy,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
    ) {
        if !self.reads_response() {
            return;
        }
        self.extractor = Some(UsageExtractor::new(
            self.format,
            BodyFormat::from_content_type(content_type),
            Encoding::from_header(content_encoding),
            policy.usage.paths.clone(),
            policy.usage.max_body_bytes,
        ));
    }

    /// Whether response body chunks are wanted (their bytes, to read usage).
    pub fn wants_body(&self) -> bool {
        !self.finished && !self.denied && self.extractor.is_some()
    }

    /// Feeds one response body chunk (already on its way to the client).
    pub fn on_response_body(&mut self, chunk: &[u8]) {
        if let Some(x) = self.extractor.as_mut() {
            x.feed(chunk);
        }
    }

    /// Like [`RequestFlow::on_response_body`], handing over the chunk (kept without a copy
    /// when it is a whole JSON document).
    pub fn on_response_body_vec(&mut self, chunk: Vec<u8>) {
        if let Some(x) = self.extractor.as_mut() {
            x.feed_vec(chunk);
        }
    }

    /// The fallback charge for a response without usage.
    fn fallback(&self, policy: &Policy) -> (Charge, Option<Usage>) {
        match policy.usage.fallback {
            Fallback::None => (Charge::Missing, None),
            Fallback::Fixed => {
                let n = Some(policy.usage.fixed_tokens);
                (
                    Charge::Fixed,
                    Some(Usage {
                        prompt: n,
                        completion: n,
                        total: n,
                        ..Usage::default()
                    }),
                )
            }
            Fallback::Estimate => {
                let prompt = self.prompt_estimate();
                let completion = self
                    .extractor
                    .as_ref()
                    .map_or(0, UsageExtractor::text_tokens);
                let usage = Usage {
                    prompt: Some(prompt),
                    completion: Some(completion),
                    total: Some(prompt.saturating_add(completion)),
                    ..Usage::default()
                };
                (Charge::Estimated, Some(usage))
            }
        }
    }

    /// What a response without usage costs, from how the request ended:
    ///
    /// | how it ended | charge |
    /// | --- | --- |
    /// | no answer, upload not complete | nothing |
    /// | Envoy answered before the upstream | nothing |
    /// | no answer (hang-up), or Envoy answered after the upstream (timeout, reset) | [`Charge::Declared`], else the fallback |
    /// | the upstream answered `4xx` / `5xx` | `usage.errorResponses` |
    /// | the upstream answered anything else | the fallback |
    fn without_usage(&self, policy: &Policy) -> (Charge, Option<Usage>) {
        let errors = &policy.usage.error_responses;
        let charge = |c: ErrorCharge| match c {
            ErrorCharge::Free => (Charge::Free, None),
            ErrorCharge::Fallback => self.fallback(policy),
        };
        match self.response {
            None | Some((_, Responder::ProxyAfterUpstream)) if !self.request_complete => {
                (Charge::Free, None)
            }
            Some((_, Responder::ProxyBeforeUpstream)) => (Charge::Free, None),
            None | Some((_, Responder::ProxyAfterUpstream)) => self.hang_up(policy),
            Some((400..=499, Responder::Upstream)) => charge(errors.client_errors),
            Some((500..=599, Responder::Upstream)) => charge(errors.server_errors),
            Some((_, Responder::Upstream)) => self.fallback(policy),
        }
    }

    /// The charge of a request that reached the upstream and got no answer: the prompt
    /// estimate plus the declared completion maximum (each capped by `reservation.maxAmount`,
    /// as its hold is), or the fallback when the filter did not read a declared maximum.
    fn hang_up(&self, policy: &Policy) -> (Charge, Option<Usage>) {
        let Some(
            bound @ RequestBound {
                completion: Some(max),
                ..
            },
        ) = self.bound
        else {
            return self.fallback(policy);
        };
        let cap = policy.reservation.max_amount;
        let of = |category| Some(bound.tokens(category, max).min(cap));
        let usage = Usage {
            prompt: of(TokenCategory::Prompt),
            completion: of(TokenCategory::Completion),
            total: of(TokenCategory::Total),
            ..Usage::default()
        };
        (Charge::Declared, Some(usage))
    }

    /// Ends the request (end of stream, or `on_log` after an abort): returns the reports to
    /// queue, `(descriptor, tokens)` per token category with tokens > 0, and the usage found.
    /// Only the first call returns anything.
    pub fn finish(&mut self, policy: &Policy) -> Finished {
        if self.finished || !self.is_limited() {
            self.finished = true;
            return Finished::default();
        }
        self.finished = true;
        // A request that never went upstream (refused, or abandoned while its admission was
        // pending) costs nothing; its granted holds are released.
        if self.denied || !self.allowed {
            return Finished {
                commits: self.reservations.commits(None),
                leased: self.reservations.leased(None),
                record: Some(self.record(policy, Charge::Nothing, None)),
                ..Finished::default()
            };
        }
        let reported = self.extractor.as_mut().and_then(UsageExtractor::finish);
        let (charge, usage) = match reported {
            Some(u) => (Charge::Reported, Some(u)),
            None => self.without_usage(policy),
        };
        let cap = policy.usage.max_tokens_per_response;
        let mut clamped = false;
        let usage = usage.map(|u| {
            let mut clamp = |v: Option<u64>| {
                v.map(|n| {
                    clamped |= n > cap;
                    n.min(cap)
                })
            };
            Usage {
                prompt: clamp(u.prompt),
                completion: clamp(u.completion),
                total: clamp(u.total),
                cached: clamp(u.cached),
                cache_write: clamp(u.cache_write),
                reasoning: clamp(u.reasoning),
            }
        });
        let spent = usage.map(|u| self.spent(policy, charge, u));
        let mut reports = Vec::new();
        let mut commits = Vec::new();
        let mut leased = Vec::new();
        if !self.reservations.is_empty() {
            commits = self.reservations.commits(spent.as_ref());
            leased = self.reservations.leased(spent.as_ref());
        } else if let Some(s) = &spent {
            for (category, cost_limit) in policy.spends_in(&self.applied) {
                let tokens = s.amount(category, cost_limit);
                if tokens == 0 {
                    continue;
                }
                if let Some(d) = policy.report_descriptor(&self.applied, category, cost_limit) {
                    reports.push(CategoryReport {
                        category,
                        descriptor: d,
                        tokens,
                    });
                }
            }
        }
        let record = Some(self.record(policy, charge, spent.as_ref()));
        Finished {
            charge,
            usage,
            reports,
            commits,
            leased,
            clamped,
            record,
        }
    }

    /// What the request spends: `usage` (charged as `charge` says), and the cost of each
    /// `tokens: cost` limit that applies. A cost that cannot be computed over reported usage
    /// with cached, cache-write or reasoning tokens is computed again without them
    /// ([`Policy::charge_cost`]'s fallback).
    fn spent(&mut self, policy: &Policy, charge: Charge, usage: Usage) -> Spent {
        let is_cost = |a: &Applied| policy.limits.get(a.limit).is_some_and(|l| l.cost.is_some());
        if !self.applied.iter().any(is_cost) {
            return Spent::tokens(usage);
        }
        let model = self.model().unwrap_or_default();
        let charged = CostUsage::charged(&usage, &model);
        let mut errors = std::mem::take(&mut self.cost_errors);
        let mut costs = Vec::new();
        // Reported usage whose cost fails is priced again without its breakdowns: the prompt,
        // completion and total a token limit charges, none of it cached or reasoning.
        let plain = CostUsage {
            cached: 0,
            cache_write: 0,
            reasoning: 0,
            ..charged.clone()
        };
        let has_breakdowns = plain != charged;
        for a in self.applied.iter().filter(|a| is_cost(a)) {
            let cost = policy.charge_cost(
                a.limit,
                &self.costs,
                &charged,
                || (charge == Charge::Reported && has_breakdowns).then(|| plain.clone()),
                &mut errors,
            );
            costs.push((a.limit, cost));
        }
        self.cost_errors = errors;
        Spent { usage, costs }
    }

    /// The request's model: its body's `model` where the filter read the body, else the one
    /// the response names.
    fn model(&self) -> Option<String> {
        self.request_model.clone().or_else(|| {
            self.extractor
                .as_ref()
                .and_then(|x| x.model())
                .map(str::to_string)
        })
    }

    /// How the request ended, from its refusal, its admission and its response.
    fn status(&self) -> Status {
        if let Some(refusal) = self.refusal {
            return refusal;
        }
        if !self.allowed {
            return Status::ClientAborted;
        }
        match (self.ending, self.response) {
            (Ending::ClientAborted, _) => Status::ClientAborted,
            (Ending::UpstreamReset, _) => Status::UpstreamReset,
            (Ending::Complete, None) => Status::ClientAborted,
            (Ending::Complete, Some((400..=599, _))) => Status::UpstreamError,
            (Ending::Complete, Some(_)) if self.failure_allowed => Status::FailureModeAllowed,
            (Ending::Complete, Some(_)) => Status::Completed,
        }
    }

    /// The usage record of the finished request, charged `charge` (`spent`: the figures).
    fn record(&self, policy: &Policy, charge: Charge, spent: Option<&Spent>) -> UsageRecord {
        let status = self.status();
        let admission = if self.denied {
            Admission::Refused
        } else if !self.allowed {
            Admission::Pending
        } else if self.failure_allowed {
            Admission::FailureModeAllowed
        } else if self.reservations.any_leased() {
            Admission::Leased
        } else if self.reservations.is_empty() {
            Admission::Checked
        } else {
            Admission::Reserved
        };
        let source = match charge {
            Charge::Reported => Source::Reported,
            Charge::Estimated => Source::Estimated,
            Charge::Fixed => Source::Fixed,
            Charge::Declared => Source::Declared,
            Charge::Missing => Source::None,
            Charge::Free | Charge::Nothing => Source::Free,
        };
        let mut counters = std::collections::BTreeMap::new();
        let mut limits = Vec::with_capacity(self.applied.len());
        for a in &self.applied {
            let Some(limit) = policy.limits.get(a.limit) else {
                continue;
            };
            for (k, v) in &a.counters {
                counters.entry(k.clone()).or_insert_with(|| v.clone());
            }
            let shadow = limit.is_shadow();
            let outcome = if shadow && self.shadow_limited.contains(&limit.name) {
                LimitOutcome::ShadowLimited
            } else {
                match status {
                    Status::Limited
                        if !shadow && self.limited_by.as_ref().is_none_or(|n| *n == limit.name) =>
                    {
                        LimitOutcome::Limited
                    }
                    Status::FailureModeDenied => LimitOutcome::FailureModeDenied,
                    _ if self.failure_allowed => LimitOutcome::FailureModeAllowed,
                    _ => LimitOutcome::Allowed,
                }
            };
            let cost_limit = limit.cost.is_some().then_some(a.limit);
            limits.push(LimitRecord {
                name: limit.name.clone(),
                tokens: limit.tokens,
                enforcement: limit.enforcement,
                outcome,
                charged: spent.map_or(0, |s| s.amount(limit.tokens, cost_limit)),
            });
        }
        UsageRecord {
            status,
            admission,
            model: self.model(),
            usage: UsageFigures::new(source, spent.map(|s| &s.usage)),
            limits,
            counters,
            reserved: self.reservations.reserved(),
        }
    }
}

/// Tokens of one category to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CategoryReport {
    /// The category the tokens are of.
    pub category: TokenCategory,
    /// The descriptor of the limits that spend it.
    pub descriptor: RateLimitDescriptor,
    /// Tokens spent (> 0).
    pub tokens: u64,
}

/// What [`RequestFlow::finish`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// How the request was charged.
    pub charge: Charge,
    /// The usage charged: reported, or the fallback's.
    pub usage: Option<Usage>,
    /// A figure exceeded `usage.maxTokensPerResponse` and was cut to it.
    pub clamped: bool,
    /// Reports to queue (checkReport mode).
    pub reports: Vec<CategoryReport>,
    /// Commits to queue (reservation mode): one per reservation not admitted from a lease.
    pub commits: Vec<CommitOrder>,
    /// What the reservations admitted from a lease spent, for the lease table.
    pub leased: Vec<crate::reservation::LeasedSpend>,
    /// The request's usage record (`None`: no limit applied).
    pub record: Option<UsageRecord>,
}

/// A `CheckRateLimit` answer: the reply's bytes decoded, or why there is none.
fn decode_check_reply(
    reply: Result<&[u8], ServiceFailure>,
) -> Result<RateLimitResponse, ServiceFailure> {
    reply.and_then(|bytes| {
        RateLimitResponse::decode(bytes).map_err(|e| ServiceFailure::Undecodable(e.to_string()))
    })
}

/// The 500 reply for a request whose body the filter needs but the proxy withholds (Envoy
/// without `allow_on_headers_stop_iteration`) under failure mode `deny`.
pub fn body_unavailable_reply() -> LocalReply {
    LocalReply {
        status: 500,
        headers: vec![("content-type".into(), "application/json".into())],
        body: error_body(
            "The token rate limiter could not read the request body (Envoy lacks allow_on_headers_stop_iteration, or buffers less than requestBody.maxBytes).",
            "server_error",
            "rate_limit_body_unavailable",
        ),
    }
}

/// The 403 for a request a limit with `onError: deny` cannot be evaluated for (its identity
/// lacks a field the limit reads, ...). The message names the limit, not the expression: the
/// policy's details stay in the proxy's log.
pub fn unevaluable_reply(limit: &str) -> LocalReply {
    LocalReply {
        status: 403,
        headers: vec![("content-type".into(), "application/json".into())],
        body: error_body(
            &format!(
                "The token rate limit `{limit}` cannot be evaluated for this request (for example, \
                 the identity lacks a field the limit reads), so the request is refused."
            ),
            "permission_error",
            "rate_limit_policy_error",
        ),
    }
}

/// `{"error": {"message", "type", "code"}}`, OpenAI's error shape.
pub fn error_body(message: &str, kind: &str, code: &str) -> Vec<u8> {
    serde_json::json!({"error": {"message": message, "type": kind, "code": code}})
        .to_string()
        .into_bytes()
}

/// The headers of `response` ([`crate::headers::render`]): the rate-limit headers of the
/// format `known` names, `retry-after` and `retry-after-ms` when `limited`, the service's own.
fn rate_limit_headers(
    known: &crate::headers::Known,
    response: &RateLimitResponse,
    limited: bool,
) -> Vec<(String, String)> {
    crate::headers::render(
        known,
        &response.statuses,
        &response.response_headers_to_add,
        limited,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::MockHost;
    use ratelimit_proto::{RateLimit, RateLimitRequest, Unit};

    /// A chat request of user `alice`.
    fn host() -> MockHost {
        let mut h = MockHost::with_request_headers(&[("x-user", "alice")]);
        h.set_property("request.path", "/v1/chat/completions");
        h
    }

    fn policy(mode: &str) -> Policy {
        Policy::from_json(
            format!(
                r#"{{"rateLimitService": {{"cluster": "rl", "domain": "llm", "failureMode": "{mode}"}},
                "limits": {{
                  "per-user": {{"rates": [{{"limit": 100, "window": "1m"}}],
                    "when": [{{"predicate": "request.path.startsWith(\"/v1/\")"}}],
                    "counters": [{{"expression": "request.headers[\"x-user\"]"}}]}},
                  "prompts": {{"rates": [{{"limit": 1000, "window": "1h"}}], "tokens": "prompt"}}
                }}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn start(p: &Policy) -> (RequestFlow, RateLimitRequest) {
        let d = p.evaluate(&mut host());
        let (flow, bytes) = RequestFlow::start(p, d, "/v1/chat/completions");
        (
            flow,
            RateLimitRequest::decode(bytes.unwrap().as_slice()).unwrap(),
        )
    }

    fn status(code: Code, remaining: u32, reset: i64, name: &str) -> DescriptorStatus {
        DescriptorStatus {
            code: code as i32,
            current_limit: Some(RateLimit {
                name: name.into(),
                requests_per_unit: 100,
                unit: Unit::Minute as i32,
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(prost_types::Duration {
                seconds: reset,
                nanos: 0,
            }),
        }
    }

    #[test]
    fn check_request_has_zero_hits_and_all_applied_limits() {
        let p = policy("deny");
        let (_, req) = start(&p);
        assert_eq!(req.domain, "llm");
        assert_eq!(req.hits_addend, 0);
        let keys: Vec<&str> = req.descriptors[0]
            .entries
            .iter()
            .map(|e| e.key.as_str())
            .collect();
        assert_eq!(
            keys,
            vec![
                "limit.per-user",
                "limit.prompts",
                "request.headers[\"x-user\"]"
            ]
        );
    }

    #[test]
    fn ok_continues_with_rate_limit_headers_then_reports_per_category() {
        let p = policy("deny");
        let (mut flow, _) = start(&p);
        let reply = RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![status(Code::Ok, 40, 30, "per-user")],
            ..Default::default()
        };
        assert_eq!(
            flow.on_check_reply(&p, Ok(&reply.encode_to_vec())),
            Verdict::Allow
        );
        assert_eq!(
            flow.response_headers(),
            &[
                ("x-ratelimit-limit".to_string(), "100".to_string()),
                ("x-ratelimit-remaining".to_string(), "40".to_string()),
                ("x-ratelimit-reset".to_string(), "30".to_string()),
            ]
        );
        flow.on_response_headers(&p, Some("application/json"), None);
        assert!(flow.wants_body());
        flow.on_response_body(br#"{"usage":{"prompt_tokens":3,"#);
        flow.on_response_body(br#""completion_tokens":4,"total_tokens":7}}"#);
        let done = flow.finish(&p);
        let got: Vec<(TokenCategory, u64, usize)> = done
            .reports
            .iter()
            .map(|r| (r.category, r.tokens, r.descriptor.entries.len()))
            .collect();
        assert_eq!(
            got,
            vec![(TokenCategory::Total, 7, 2), (TokenCategory::Prompt, 3, 1)]
        );
        assert_eq!(flow.finish(&p), Finished::default(), "finish reports once");
    }

    #[test]
    fn over_limit_is_a_429_in_openai_error_shape_with_retry_after() {
        let p = policy("allow");
        let (mut flow, _) = start(&p);
        let reply = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![status(Code::OverLimit, 0, 42, "per-user")],
            ..Default::default()
        };
        let Verdict::Limited { reply, limit } = flow.on_check_reply(&p, Ok(&reply.encode_to_vec()))
        else {
            panic!("not limited");
        };
        assert_eq!(limit.as_deref(), Some("per-user"));
        assert_eq!(reply.status, 429);
        assert!(reply.headers.contains(&("retry-after".into(), "42".into())));
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["type"], "tokens");
        // A denied request reports nothing.
        flow.on_response_headers(&p, Some("application/json"), None);
        assert!(!flow.wants_body());
        assert!(flow.finish(&p).reports.is_empty());
    }

    #[test]
    fn a_refusal_without_statuses_says_to_retry_after_the_longest_enforced_window() {
        // Limitador's OVER_LIMIT has no statuses; per-user (1m) and prompts (1h) apply.
        let p = policy("deny");
        let over = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            ..Default::default()
        };
        let (mut flow, _) = start(&p);
        let Verdict::Limited { reply, .. } = flow.on_check_reply(&p, Ok(&over.encode_to_vec()))
        else {
            panic!("not limited");
        };
        let retry: Vec<_> = reply
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("retry-after"))
            .cloned()
            .collect();
        let expected = vec![
            ("retry-after".to_string(), "3600".to_string()),
            ("retry-after-ms".to_string(), "3600000".to_string()),
        ];
        assert_eq!(retry, expected);
        // Reservation mode: a Reserve refused without statuses, the same.
        let d = p.evaluate(&mut host());
        let (mut flow, calls) =
            RequestFlow::start_reservation(&p, d, "/v1/chat/completions", None, None);
        let refused = ratelimit_proto::ReserveResponse {
            code: Code::OverLimit as i32,
            ..Default::default()
        };
        let mut verdict = None;
        for i in 0..calls.len() {
            verdict = flow.on_reserve_reply(&p, i, Ok(&refused.encode_to_vec()));
        }
        let Some(Verdict::Limited { reply, .. }) = verdict else {
            panic!("not limited: {verdict:?}");
        };
        assert!(expected.iter().all(|h| reply.headers.contains(h)));
    }

    #[test]
    fn failures_follow_the_failure_mode() {
        for (mode, failure) in [
            ("deny", Err(ServiceFailure::Grpc(14))),
            ("deny", Ok(b"\xff\xff\xff".as_slice())),
            ("allow", Err(ServiceFailure::Grpc(4))),
        ] {
            let p = policy(mode);
            let (mut flow, _) = start(&p);
            match (mode, flow.on_check_reply(&p, failure)) {
                ("deny", Verdict::DenyOnFailure { reply, .. }) => assert_eq!(reply.status, 500),
                ("allow", Verdict::AllowOnFailure(ServiceFailure::Grpc(4))) => {}
                (m, v) => panic!("{m}: {v:?}"),
            }
        }
        let p = policy("deny");
        let (mut flow, _) = start(&p);
        let unknown = RateLimitResponse::default().encode_to_vec();
        assert!(matches!(
            flow.on_check_reply(&p, Ok(&unknown)),
            Verdict::DenyOnFailure {
                failure: ServiceFailure::UnknownCode,
                ..
            }
        ));
    }

    #[test]
    fn aborted_stream_reports_what_arrived_and_missing_usage_reports_nothing() {
        let p = policy("deny");
        let (mut flow, _) = start(&p);
        flow.on_check_reply(&p, Err(ServiceFailure::Grpc(14)));
        // Failure mode deny: nothing to report.
        assert!(flow.finish(&p).reports.is_empty());

        let p = policy("allow");
        let (mut flow, _) = start(&p);
        flow.on_check_reply(&p, Err(ServiceFailure::Grpc(14)));
        flow.on_response_headers(&p, Some("text/event-stream"), None);
        flow.on_response_body(b"data: {\"choices\":[],\"usage\":{\"total_tokens\":9,\"prompt_tokens\":2}}\n\ndata: [DO");
        let done = flow.finish(&p);
        assert_eq!(done.reports[0].tokens, 9);
        assert_eq!(done.reports[1].tokens, 2);

        // No usage: the estimate charges the words of the request's text fields and of the
        // answer's text, 5 characters per token of each word, rounded up.
        let (mut flow, _) = start(&p);
        let request = br#"{"model":"gpt-4o","prompt":"Once upon a time","max_tokens":null}"#;
        let (head, tail) = request.split_at(30);
        flow.on_request_body_chunk(head);
        flow.on_request_body_chunk(tail);
        assert_eq!(flow.request_bytes(), request.len() as u64);
        flow.on_request_complete();
        flow.on_check_reply(&p, Err(ServiceFailure::Grpc(14)));
        flow.on_response_headers(&p, Some("text/plain"), None);
        assert!(flow.wants_body());
        flow.on_response_body(b"there lived a dra");
        flow.on_response_body(b"gon named Smaug.");
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Estimated);
        let got: Vec<(TokenCategory, u64)> = done
            .reports
            .iter()
            .map(|r| (r.category, r.tokens))
            .collect();
        // Once, upon, a, time: 4; there, lived, a, named: 4, dragon and Smaug.: 2 each.
        assert_eq!(
            got,
            vec![(TokenCategory::Total, 4 + 8), (TokenCategory::Prompt, 4)]
        );
    }

    #[test]
    fn the_estimate_counts_the_text_of_a_stream_not_its_framing() {
        let p = policy("allow");
        let (mut flow, _) = start(&p);
        flow.on_request_body_chunk(CHAT_REQUEST);
        flow.on_request_complete();
        flow.on_check_reply(&p, Err(ServiceFailure::Grpc(14)));
        flow.on_response_headers(&p, Some("text/event-stream"), None);
        flow.on_response_status(Some(200), Responder::Upstream);
        let stream = concat!(
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Once\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" upon a\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes();
        for chunk in stream.chunks(50) {
            flow.on_response_body(chunk);
        }
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Estimated);
        // The request's 7 tokens of text and the answer's 3 words; bytes / 4 would be 21 and
        // 146.
        assert_eq!(
            tokens(&done),
            vec![
                (TokenCategory::Total, CHAT_REQUEST_TOKENS + 3),
                (TokenCategory::Prompt, CHAT_REQUEST_TOKENS)
            ]
        );

        // Bytes counted without their content (on_request_body_len): 5 per token.
        let (mut flow, _) = start(&p);
        flow.on_request_body_len(11);
        flow.on_request_complete();
        flow.on_check_reply(&p, Err(ServiceFailure::Grpc(14)));
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_status(Some(200), Responder::Upstream);
        flow.on_response_body(br#"{"choices":[{"message":{"role":"assistant","content":"Hi"}}]}"#);
        assert_eq!(
            tokens(&flow.finish(&p)),
            vec![(TokenCategory::Total, 3 + 1), (TokenCategory::Prompt, 3)]
        );
    }

    #[test]
    fn a_request_abandoned_during_its_check_costs_nothing() {
        let p = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "rl", "domain": "llm"}, "usage": {"fallback": "fixed", "fixedTokens": 100},
                 "limits": {"all": {"rates": [{"limit": 1000, "window": "1m"}]}}}"#,
        )
        .unwrap();
        let (mut flow, _) = start(&p);
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Nothing);
        assert!(done.reports.is_empty());
    }

    #[test]
    fn absurd_figures_are_clamped() {
        let p = policy("deny");
        let (mut flow, _) = start(&p);
        flow.on_check_reply(
            &p,
            Ok(&RateLimitResponse {
                overall_code: Code::Ok as i32,
                ..Default::default()
            }
            .encode_to_vec()),
        );
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_body(
            format!(
                r#"{{"usage":{{"total_tokens":{},"prompt_tokens":5}}}}"#,
                u64::MAX
            )
            .as_bytes(),
        );
        let done = flow.finish(&p);
        assert!(done.clamped);
        assert_eq!(done.reports[0].tokens, p.usage.max_tokens_per_response);
        assert_eq!(done.reports[1].tokens, 5);
    }

    #[test]
    fn fallback_fixed_and_none() {
        let fixed = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "rl", "domain": "llm"}, "usage": {"fallback": "fixed", "fixedTokens": 100},
                 "limits": {"all": {"rates": [{"limit": 1000, "window": "1m"}]}}}"#,
        )
        .unwrap();
        let (mut flow, _) = start(&fixed);
        flow.on_request_complete();
        flow.on_check_reply(
            &fixed,
            Ok(&RateLimitResponse {
                overall_code: Code::Ok as i32,
                ..Default::default()
            }
            .encode_to_vec()),
        );
        let done = flow.finish(&fixed);
        assert_eq!((done.charge, done.reports[0].tokens), (Charge::Fixed, 100));

        let none = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "rl", "domain": "llm"}, "usage": {"fallback": "none"},
                 "limits": {"all": {"rates": [{"limit": 1000, "window": "1m"}]}}}"#,
        )
        .unwrap();
        let (mut flow, _) = start(&none);
        flow.on_request_complete();
        flow.on_check_reply(
            &none,
            Ok(&RateLimitResponse {
                overall_code: Code::Ok as i32,
                ..Default::default()
            }
            .encode_to_vec()),
        );
        flow.on_response_headers(&none, Some("application/json"), None);
        flow.on_response_body(b"{}");
        let done = flow.finish(&none);
        assert_eq!(done.charge, Charge::Missing);
        assert!(done.reports.is_empty());
    }

    /// A chat request body whose text fields hold [`CHAT_REQUEST_TOKENS`] tokens.
    const CHAT_REQUEST: &[u8] =
        br#"{"model":"m","messages":[{"role":"user","content":"Tell me a story about dragons"}]}"#;
    /// Tell, me, a, story, about: 1 each; dragons: 2.
    const CHAT_REQUEST_TOKENS: u64 = 7;

    /// An allowed checkReport request of `policy`, its whole body ([`CHAT_REQUEST`]) sent.
    fn allowed(p: &Policy) -> RequestFlow {
        let (mut flow, _) = start(p);
        flow.on_request_body_chunk(CHAT_REQUEST);
        flow.on_request_complete();
        let ok = RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        };
        assert_eq!(
            flow.on_check_reply(p, Ok(&ok.encode_to_vec())),
            Verdict::Allow
        );
        flow
    }

    /// An admitted reservation-mode request of `policy` (hold `h` per category), its body
    /// read: `bound`.
    fn reserved(p: &Policy, bound: Option<RequestBound>) -> RequestFlow {
        let d = p.evaluate(&mut host());
        let (mut flow, calls) =
            RequestFlow::start_reservation(p, d, "/v1/chat/completions", bound, None);
        grant(p, &mut flow, calls.len());
        flow
    }

    /// Sends the whole request body, then grants the `n` reservations of `flow` (ids `h0`,
    /// `h1`, ...): the request is admitted.
    fn grant(p: &Policy, flow: &mut RequestFlow, n: usize) {
        flow.on_request_body_chunk(CHAT_REQUEST);
        flow.on_request_complete();
        let mut verdict = None;
        for i in 0..n {
            let reply = ratelimit_proto::ReserveResponse {
                code: Code::Ok as i32,
                reservation_id: format!("h{i}"),
                statuses: Vec::new(),
                hold_ttl: None,
            };
            verdict = flow.on_reserve_reply(p, i, Ok(&reply.encode_to_vec()));
        }
        assert_eq!(verdict, Some(Verdict::Allow));
    }

    fn tokens(done: &Finished) -> Vec<(TokenCategory, u64)> {
        done.reports
            .iter()
            .map(|r| (r.category, r.tokens))
            .collect()
    }

    fn committed(done: &Finished) -> Vec<(String, u64)> {
        done.commits
            .iter()
            .map(|c| (c.reservation_id.clone(), c.actual))
            .collect()
    }

    #[test]
    fn an_upstream_4xx_without_usage_costs_nothing_in_both_modes_and_releases_the_holds() {
        let p = policy("deny");
        for status in [400, 404, 413, 429] {
            let mut flow = allowed(&p);
            flow.on_response_headers(&p, Some("application/json"), None);
            flow.on_response_status(Some(status), Responder::Upstream);
            flow.on_response_body(br#"{"error":{"message":"prompt too long"}}"#);
            let done = flow.finish(&p);
            assert_eq!(done.charge, Charge::Free, "{status}");
            assert!(done.reports.is_empty() && done.usage.is_none());

            let mut flow = reserved(&p, None);
            flow.on_response_headers(&p, Some("application/json"), None);
            flow.on_response_status(Some(status), Responder::Upstream);
            let done = flow.finish(&p);
            assert_eq!(done.charge, Charge::Free);
            // Every hold is released by a commit of 0, none left to expire.
            assert_eq!(
                committed(&done),
                vec![("h0".to_string(), 0), ("h1".to_string(), 0)]
            );
        }
    }

    #[test]
    fn an_error_with_usage_is_charged_its_usage_whatever_its_status() {
        let p = policy("deny");
        for status in [400, 500] {
            let mut flow = allowed(&p);
            flow.on_response_headers(&p, Some("application/json"), None);
            flow.on_response_status(Some(status), Responder::Upstream);
            flow.on_response_body(
                br#"{"usage":{"prompt_tokens":3,"completion_tokens":0,"total_tokens":3}}"#,
            );
            let done = flow.finish(&p);
            assert_eq!(done.charge, Charge::Reported);
            assert_eq!(
                tokens(&done),
                vec![(TokenCategory::Total, 3), (TokenCategory::Prompt, 3)]
            );
        }
    }

    #[test]
    fn an_upstream_5xx_without_usage_is_charged_the_fallback_unless_configured_free() {
        let p = policy("deny");
        let mut flow = allowed(&p);
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_status(Some(500), Responder::Upstream);
        flow.on_response_body(
            br#"{"error":{"message":"The server had an error","type":"server_error"}}"#,
        );
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Estimated);
        // The request's text; an error object generates no text.
        assert_eq!(
            tokens(&done),
            vec![
                (TokenCategory::Total, CHAT_REQUEST_TOKENS),
                (TokenCategory::Prompt, CHAT_REQUEST_TOKENS)
            ]
        );

        let json = r#"{"rateLimitService": {"cluster": "rl", "domain": "llm"},
            "usage": {"errorResponses": {"clientErrors": "fallback", "serverErrors": "free"}},
            "limits": {"all": {"rates": [{"limit": 1000, "window": "1m"}]}}}"#;
        let p = Policy::from_json(json.as_bytes()).unwrap();
        let mut flow = allowed(&p);
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_status(Some(503), Responder::Upstream);
        assert_eq!(flow.finish(&p).charge, Charge::Free);
        let mut flow = allowed(&p);
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_status(Some(400), Responder::Upstream);
        assert_eq!(flow.finish(&p).charge, Charge::Estimated);
        assert!(Policy::from_json(
            br#"{"rateLimitService": {"cluster": "rl", "domain": "llm"},
                "usage": {"errorResponses": {"clientErrors": "estimate"}},
                "limits": {"all": {"rates": [{"limit": 1000, "window": "1m"}]}}}"#
        )
        .is_err());
    }

    #[test]
    fn envoys_own_reply_before_the_upstream_costs_nothing_even_when_errors_are_charged() {
        let json = r#"{"rateLimitService": {"cluster": "rl", "domain": "llm"},
            "usage": {"errorResponses": {"clientErrors": "fallback", "serverErrors": "fallback"}},
            "limits": {"all": {"rates": [{"limit": 1000, "window": "1m"}]}}}"#;
        let p = Policy::from_json(json.as_bytes()).unwrap();
        for status in [413, 431, 503] {
            let mut flow = allowed(&p);
            flow.on_response_headers(&p, Some("text/plain"), None);
            flow.on_response_status(Some(status), Responder::ProxyBeforeUpstream);
            flow.on_response_body(b"upstream connect error");
            let done = flow.finish(&p);
            assert_eq!(done.charge, Charge::Free, "{status}");
            assert!(done.reports.is_empty());
        }
        let mut flow = reserved(&p, None);
        flow.on_response_status(Some(503), Responder::ProxyBeforeUpstream);
        let done = flow.finish(&p);
        assert_eq!(
            (done.charge, committed(&done)),
            (Charge::Free, vec![("h0".to_string(), 0)])
        );
    }

    #[test]
    fn an_abandoned_upload_costs_nothing_and_its_hold_is_released() {
        let p = policy("deny");
        let (mut flow, _) = start(&p);
        flow.on_request_body_len(4000);
        let ok = RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..Default::default()
        };
        flow.on_check_reply(&p, Ok(&ok.encode_to_vec()));
        // No end of body, no response: the client gave up mid-upload.
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Free);
        assert!(done.reports.is_empty());

        let d = p.evaluate(&mut host());
        let (mut flow, calls) =
            RequestFlow::start_reservation(&p, d, "/v1/chat/completions", None, None);
        for i in 0..calls.len() {
            let reply = ratelimit_proto::ReserveResponse {
                code: Code::Ok as i32,
                reservation_id: format!("h{i}"),
                statuses: Vec::new(),
                hold_ttl: None,
            };
            flow.on_reserve_reply(&p, i, Ok(&reply.encode_to_vec()));
        }
        flow.on_request_body_len(4000);
        // Envoy's local reply after the upstream (a reset) of an upload never finished: free.
        flow.on_response_status(Some(503), Responder::ProxyAfterUpstream);
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Free);
        assert_eq!(
            committed(&done),
            vec![("h0".to_string(), 0), ("h1".to_string(), 0)]
        );
    }

    #[test]
    fn a_hang_up_after_a_declared_maximum_is_charged_the_prompt_estimate_plus_the_maximum() {
        let p = policy("deny");
        let bound = Some(RequestBound {
            prompt: 7,
            completion: Some(50),
        });
        // checkReport with the body read (a limit reads requestBodyJSON()).
        let mut flow = allowed(&p);
        flow.set_request_bound(bound);
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Declared);
        assert_eq!(
            tokens(&done),
            vec![(TokenCategory::Total, 57), (TokenCategory::Prompt, 7)]
        );
        // Reservation mode: the holds are committed as that amount.
        let mut flow = reserved(&p, bound);
        let done = flow.finish(&p);
        assert_eq!(
            committed(&done),
            vec![("h0".to_string(), 57), ("h1".to_string(), 7)]
        );
        // Envoy's timeout (its own 504 after the upstream had the request): the same.
        let mut flow = reserved(&p, bound);
        flow.on_response_headers(&p, Some("text/plain"), None);
        flow.on_response_status(Some(504), Responder::ProxyAfterUpstream);
        flow.on_response_body(b"upstream request timeout");
        assert_eq!(flow.finish(&p).charge, Charge::Declared);
        // Capped by reservation.maxAmount; without a declared maximum, the estimate.
        let capped = Policy::from_json(
            br#"{"rateLimitService": {"cluster": "rl", "domain": "llm"}, "reservation": {"maxAmount": 30},
                 "limits": {"all": {"rates": [{"limit": 1000, "window": "1m"}]}}}"#,
        )
        .unwrap();
        let mut flow = allowed(&capped);
        flow.set_request_bound(bound);
        assert_eq!(
            tokens(&flow.finish(&capped)),
            vec![(TokenCategory::Total, 30)]
        );
        let mut flow = allowed(&p);
        flow.set_request_bound(Some(RequestBound {
            prompt: 9,
            completion: None,
        }));
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Estimated);
        // The bound's prompt estimate (not the text of the chunks: the bound wins), no answer.
        assert_eq!(tokens(&done)[0], (TokenCategory::Total, 9));
        // An answer was seen (a stream cut short): the estimate over what passed, as before.
        let mut flow = allowed(&p);
        flow.set_request_bound(bound);
        flow.on_response_headers(&p, Some("text/event-stream"), None);
        flow.on_response_status(Some(200), Responder::Upstream);
        flow.on_response_body(b"data: {\"choices\":[]}\n\n");
        assert_eq!(flow.finish(&p).charge, Charge::Estimated);
    }

    /// Two cost limits (a prices table, a CEL expression over the response) beside a token
    /// limit: `onError` deny on the expression.
    fn cost_policy(mode: &str) -> Policy {
        Policy::from_json(
            format!(
                r#"{{"rateLimitService": {{"cluster": "rl", "domain": "llm", "mode": "{mode}"}},
                "reservation": {{"defaultAmount": 50, "maxAmount": 1000}},
                "limits": {{
                  "tokens": {{"rates": [{{"limit": 100000, "window": "1m"}}]}},
                  "dollars": {{"rates": [{{"limit": 1000000, "window": "30d"}}], "tokens": "cost",
                    "counters": [{{"expression": "request.headers[\"x-user\"]"}}],
                    "prices": {{"models": {{"m": {{"prompt": 2000000, "cached": 200000, "completion": 8000000}}}},
                               "default": {{"prompt": 1, "completion": 1}}}}}},
                  "weighted": {{"rates": [{{"limit": 1000000, "window": "1d"}}], "tokens": "cost",
                    "cost": "usage.prompt - 2 * usage.cached + usage.completion * 4"}}
                }}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    const CACHED_RESPONSE: &[u8] = br#"{"model":"m-2025-01-01","usage":{"prompt_tokens":100,"completion_tokens":10,"total_tokens":110,"prompt_tokens_details":{"cached_tokens":40}}}"#;

    #[test]
    fn each_cost_limit_reports_its_own_cost_beside_the_tokens_of_a_token_limit() {
        let p = cost_policy("checkReport");
        let mut flow = allowed(&p);
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_status(Some(200), Responder::Upstream);
        flow.on_response_body(CACHED_RESPONSE);
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Reported);
        let reports: Vec<(TokenCategory, u64, Vec<String>)> = done
            .reports
            .iter()
            .map(|r| {
                let limits = crate::policy::test_support::limit_keys(&r.descriptor);
                (r.category, r.tokens, limits)
            })
            .collect();
        // dollars (the response's model `m-2025-01-01` is priced as `m`): 60 × 2 + 40 × 0.2
        // + 10 × 8 = 208; weighted: 100 - 80 + 40 = 60.
        assert_eq!(
            reports,
            vec![
                (TokenCategory::Total, 110, vec!["limit.tokens".to_string()]),
                (TokenCategory::Cost, 208, vec!["limit.dollars".to_string()]),
                (TokenCategory::Cost, 60, vec!["limit.weighted".to_string()]),
            ]
        );
        // The counter of the cost limit rides with its report.
        assert!(done.reports[1]
            .descriptor
            .entries
            .iter()
            .any(|e| e.value == "alice"));
        let record = done.record.unwrap();
        let charged: Vec<(&str, u64)> = record
            .limits
            .iter()
            .map(|l| (l.name.as_str(), l.charged))
            .collect();
        assert_eq!(
            charged,
            [("dollars", 208), ("tokens", 110), ("weighted", 60)]
        );
        // checkReport without the body read: the response's model, priced as `m`.
        assert_eq!(record.model.as_deref(), Some("m-2025-01-01"));
        assert!(flow.take_cost_errors().is_empty());
    }

    #[test]
    fn a_cost_that_fails_on_the_reported_usage_is_charged_over_it_without_cached_tokens_and_counted(
    ) {
        let p = cost_policy("checkReport");
        let mut flow = allowed(&p);
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_status(Some(200), Responder::Upstream);
        // 90 of 100 prompt tokens cached: `weighted` is negative.
        flow.on_response_body(
            br#"{"usage":{"prompt_tokens":100,"completion_tokens":1,"total_tokens":101,"prompt_tokens_details":{"cached_tokens":90}}}"#,
        );
        let done = flow.finish(&p);
        let weighted = done
            .reports
            .iter()
            .find(|r| r.descriptor.entries[0].key == "limit.weighted")
            .map(|r| r.tokens);
        // Priced again as plain tokens: 100 prompt tokens, none cached, 1 completion token.
        assert_eq!(weighted, Some(100 + 4));
        let errors = flow.take_cost_errors();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().contains("limit `weighted`"),
            "{errors:?}"
        );
        assert!(errors[0].to_string().contains("negative"), "{errors:?}");
    }

    #[test]
    fn reservation_mode_holds_the_cost_of_the_bound_and_commits_the_actual_cost() {
        let p = cost_policy("reservation");
        let bound = RequestBound {
            prompt: 20,
            completion: Some(5000),
        };
        let d = p.evaluate(&mut host());
        let (mut flow, calls) = RequestFlow::start_reservation(
            &p,
            d,
            "/v1/chat/completions",
            Some(bound),
            Some("m".into()),
        );
        let plans: Vec<(TokenCategory, Option<usize>, u64)> = flow
            .reservations()
            .plans()
            .iter()
            .map(|r| (r.category, r.cost_limit, r.amount))
            .collect();
        // Each figure of a cost limit's bound is capped at reservation.maxAmount (1000):
        // dollars holds 20 × 2 + 1000 × 8 = 8040, weighted 20 + 4000; a token limit's whole
        // hold is capped: 1000.
        assert_eq!(
            plans,
            vec![
                (TokenCategory::Cost, Some(0), 8040),
                (TokenCategory::Total, None, 1000),
                (TokenCategory::Cost, Some(2), 4020),
            ]
        );
        grant(&p, &mut flow, calls.len());
        flow.on_response_headers(&p, Some("application/json"), None);
        flow.on_response_status(Some(200), Responder::Upstream);
        flow.on_response_body(CACHED_RESPONSE);
        let done = flow.finish(&p);
        assert_eq!(
            committed(&done),
            vec![
                ("h0".to_string(), 208),
                ("h1".to_string(), 110),
                ("h2".to_string(), 60)
            ]
        );
        assert_eq!(
            done.record.map(|r| r.reserved),
            Some([("cost", 8040 + 4020), ("total", 1000)].into())
        );
    }

    #[test]
    fn a_request_that_hangs_up_is_charged_the_cost_of_its_declared_bound() {
        let p = cost_policy("reservation");
        let bound = Some(RequestBound {
            prompt: 20,
            completion: Some(100),
        });
        let mut flow = reserved(&p, bound);
        flow.on_response_body(b"");
        let done = flow.finish(&p);
        assert_eq!(done.charge, Charge::Declared);
        // No model read with the body (`reserved` passes none) and none answered: the
        // default row, 1 per million of each.
        assert_eq!(
            committed(&done),
            vec![
                ("h0".to_string(), 1),
                ("h1".to_string(), 120),
                ("h2".to_string(), 420)
            ]
        );
    }
}
