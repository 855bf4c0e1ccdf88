//! The proxy-wasm layer: moves bytes between Envoy and the pure core. Built for `wasm32` only.
//!
//! One root context per plugin and VM owns the compiled [`Policy`], the [`ReportQueue`] and the
//! metrics; HTTP contexts share them through `Rc` (a VM is single-threaded). Checks are
//! dispatched from HTTP contexts, reports from the root context's tick, so that a report's call
//! outlives the stream that spent the tokens.

use crate::attributes::AttributeHost;
use crate::config::TokenCategory;
use crate::flow::{Charge, RequestFlow, ServiceFailure, Verdict};
use crate::policy::{Decision, Policy};
use crate::reports::{ReportOutcome, ReportQueue};
use crate::usage::Format;
use log::{debug, error, info, warn};
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType, MetricType};
use ratelimit_proto::{
    Code, RateLimitRequest, RateLimitResponse, CHECK_RATE_LIMIT, KUADRANT_SERVICE, REPORT,
};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root { context_id, ..Root::default() })
    });
}}

/// Follows Envoy's log level for wasm, so that a `debug!` Envoy would drop costs nothing (no
/// formatting, no host call). Read at configure time and on every tick (it can change at run
/// time through Envoy's admin API).
fn sync_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

/// Counter names, as they appear in Envoy's stats (Envoy may prefix them, e.g. `wasmcustom.`).
mod metric {
    pub const CHECKED: &str = "token_ratelimit.requests_checked";
    pub const ALLOWED: &str = "token_ratelimit.requests_allowed";
    pub const LIMITED: &str = "token_ratelimit.requests_limited";
    pub const FAILURE_ALLOWED: &str = "token_ratelimit.failure_mode_allowed";
    pub const FAILURE_DENIED: &str = "token_ratelimit.failure_mode_denied";
    pub const SERVICE_ERRORS: &str = "token_ratelimit.service_errors";
    pub const SERVICE_TIMEOUTS: &str = "token_ratelimit.service_timeouts";
    pub const EXPRESSION_ERRORS: &str = "token_ratelimit.expression_errors";
    pub const USAGE_MISSING: &str = "token_ratelimit.usage_missing";
    pub const USAGE_ESTIMATED: &str = "token_ratelimit.usage_estimated";
    pub const USAGE_FIXED: &str = "token_ratelimit.usage_fixed";
    pub const USAGE_CLAMPED: &str = "token_ratelimit.usage_clamped";
    pub const USAGE_INJECTED: &str = "token_ratelimit.usage_requested";
    pub const BODY_TIMEOUTS: &str = "token_ratelimit.request_body_timeouts";
    pub const REPORTS_SENT: &str = "token_ratelimit.reports_sent";
    pub const REPORTS_RETRIED: &str = "token_ratelimit.reports_retried";
    pub const REPORTS_DROPPED: &str = "token_ratelimit.reports_dropped";
    pub const TOKENS_DROPPED: &str = "token_ratelimit.tokens_dropped";
    pub const CONFIG_ERRORS: &str = "token_ratelimit.config_errors";
    pub const TOKENS_TOTAL: &str = "token_ratelimit.tokens_reported.total";
    pub const TOKENS_PROMPT: &str = "token_ratelimit.tokens_reported.prompt";
    pub const TOKENS_COMPLETION: &str = "token_ratelimit.tokens_reported.completion";
}

/// The counters every checked request increments: summed in the VM and added to Envoy's on the
/// root context's tick (one host call per counter and tick instead of one per request; Envoy's
/// stats lag by at most one `reporting.flushPeriod`).
#[derive(Debug, Clone, Copy)]
enum Hot {
    Checked,
    Allowed,
    TokensTotal,
    TokensPrompt,
    TokensCompletion,
}

/// The names of [`Hot`]'s counters, in its order.
const HOT_NAMES: [&str; 5] = [
    metric::CHECKED,
    metric::ALLOWED,
    metric::TOKENS_TOTAL,
    metric::TOKENS_PROMPT,
    metric::TOKENS_COMPLETION,
];

/// Counters defined lazily by name; a metric the host refuses is skipped silently.
#[derive(Default)]
struct Metrics {
    ids: HashMap<String, Option<u32>>,
    /// Increments of the [`Hot`] counters not yet added to Envoy's.
    hot: [u64; 5],
}

impl Metrics {
    /// Counts `n` on a [`Hot`] counter (sent on the next [`Metrics::flush`]).
    fn hot(&mut self, counter: Hot, n: u64) {
        if let Some(pending) = self.hot.get_mut(counter as usize) {
            *pending = pending.saturating_add(n);
        }
    }

    /// Adds the [`Hot`] counts gathered since the last flush to Envoy's counters.
    fn flush(&mut self) {
        for (i, name) in HOT_NAMES.iter().enumerate() {
            let n = self.hot.get_mut(i).map(std::mem::take).unwrap_or(0);
            self.add(name, n);
        }
    }

    fn add(&mut self, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        let id = match self.ids.get(name) {
            Some(id) => *id,
            None => {
                let id = hostcalls::define_metric(MetricType::Counter, name).ok();
                self.ids.insert(name.to_string(), id);
                id
            }
        };
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn inc(&mut self, name: &str) {
        self.add(name, 1);
    }
}

/// State shared by the root context and its HTTP contexts.
#[derive(Default)]
struct Shared {
    queue: ReportQueue,
    metrics: Metrics,
    /// Expressions whose failure was already logged at warn level.
    warned: HashSet<String>,
    /// HTTP contexts holding their headers for a body that has not shown up yet, with the
    /// number of ticks waited.
    awaiting_body: Vec<(u32, u32)>,
    /// HTTP contexts the root context released (or refused) after waiting too long for their
    /// body; they stay out of the way for the rest of their life.
    released: HashSet<u32>,
    /// Envoy was seen not to deliver bodies while headers are held.
    body_unavailable: bool,
}

/// gRPC status of a call that timed out.
const GRPC_DEADLINE_EXCEEDED: u32 = 4;

/// How long a request may hold its headers waiting for its first body chunk (Evaluate mode).
const BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

type SharedRef = Rc<RefCell<Shared>>;

#[derive(Default)]
struct Root {
    context_id: u32,
    policy: Option<Rc<Policy>>,
    shared: SharedRef,
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let ok = status_code == 0
            && self
                .get_grpc_call_response_body(0, response_size)
                .and_then(|b| RateLimitResponse::decode(b.as_slice()).ok())
                .is_some_and(|r| r.overall_code == Code::Ok as i32);
        let mut shared = self.shared.borrow_mut();
        let outcome = shared.queue.reply(token_id, ok);
        record_report_outcome(&mut shared, outcome, status_code);
    }
}

fn record_report_outcome(shared: &mut Shared, outcome: ReportOutcome, status_code: u32) {
    match outcome {
        ReportOutcome::Delivered { .. } | ReportOutcome::Unknown => {}
        ReportOutcome::WillRetry { hits, attempt } => {
            debug!("report of {hits} tokens failed (gRPC status {status_code}); retry {attempt}");
            shared.metrics.inc(metric::REPORTS_RETRIED);
        }
        ReportOutcome::Dropped { hits } => {
            warn!("report of {hits} tokens failed (gRPC status {status_code}) after all retries; dropped");
            shared.metrics.inc(metric::REPORTS_DROPPED);
            shared.metrics.add(metric::TOKENS_DROPPED, u64::from(hits));
        }
    }
}

impl Root {
    /// Requests that wait for a body Envoy does not deliver while their headers are held
    /// (Envoy without allow_on_headers_stop_iteration) are released rather than left hanging.
    fn release_stuck_requests(&mut self, policy: &Policy) {
        let period = policy.service.flush_period.as_millis().max(1);
        let limit = (BODY_WAIT.as_millis() / period).max(1) as u32;
        let mut shared = self.shared.borrow_mut();
        if shared.awaiting_body.is_empty() {
            return;
        }
        let mut stuck = Vec::new();
        shared.awaiting_body.retain_mut(|(id, ticks)| {
            *ticks += 1;
            if *ticks >= limit {
                stuck.push(*id);
                false
            } else {
                true
            }
        });
        let deny = policy.service.failure_mode == crate::config::FailureMode::Deny;
        for &id in &stuck {
            error!(
                "request {id}: no body while its headers were held: Envoy needs allow_on_headers_stop_iteration: true \
                 in its Wasm plugin configuration for requestBodyJSON(); request {} (failure mode), \
                 and later requests are evaluated without their body",
                if deny { "refused" } else { "released unchecked" }
            );
            shared.metrics.inc(metric::BODY_TIMEOUTS);
            shared.released.insert(id);
            shared.body_unavailable = true;
        }
        // Replying or resuming calls back into this VM (the stream's callbacks, which then do
        // nothing): no borrow may be held.
        drop(shared);
        let reply = crate::flow::error_body(
            "The token rate limiter could not read the request body (Envoy lacks allow_on_headers_stop_iteration).",
            "server_error",
            "rate_limit_body_unavailable",
        );
        for id in stuck {
            if hostcalls::set_effective_context(id).is_ok() {
                if deny {
                    let _ = hostcalls::send_http_response(
                        500,
                        vec![("content-type", "application/json")],
                        Some(&reply),
                    );
                } else {
                    let _ = hostcalls::resume_http_request();
                }
            }
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        sync_log_level();
        let Some(bytes) = self.get_plugin_configuration() else {
            error!("token-ratelimit: no plugin configuration");
            self.shared.borrow_mut().metrics.inc(metric::CONFIG_ERRORS);
            return false;
        };
        match Policy::from_plugin_config(&bytes) {
            Ok(policy) => {
                info!(
                    "token-ratelimit: configured {} limit(s), domain `{}`, cluster `{}`",
                    policy.limits.len(),
                    policy.service.domain,
                    policy.service.cluster
                );
                self.set_tick_period(policy.service.flush_period);
                let mut shared = self.shared.borrow_mut();
                let old = std::mem::take(&mut shared.queue);
                shared.queue = ReportQueue::new(policy.service.max_retries);
                // Tokens from a previous configuration are still owed: keep them.
                shared.queue.absorb(old);
                self.policy = Some(Rc::new(policy));
                true
            }
            Err(e) => {
                error!("token-ratelimit: {e}");
                self.shared.borrow_mut().metrics.inc(metric::CONFIG_ERRORS);
                false
            }
        }
    }

    fn on_tick(&mut self) {
        sync_log_level();
        self.shared.borrow_mut().metrics.flush();
        let Some(policy) = self.policy.clone() else {
            return;
        };
        self.release_stuck_requests(&policy);
        let batch = self.shared.borrow_mut().queue.take_batch();
        for report in batch {
            let request = RateLimitRequest {
                domain: policy.service.domain.clone(),
                descriptors: vec![report.descriptor.clone()],
                hits_addend: report.hits,
            };
            let bytes = request.encode_to_vec();
            let result = self.dispatch_grpc_call(
                &policy.service.cluster,
                KUADRANT_SERVICE,
                REPORT,
                Vec::new(),
                Some(&bytes),
                policy.service.report_timeout,
            );
            let mut shared = self.shared.borrow_mut();
            match result {
                Ok(token) => {
                    shared.metrics.inc(metric::REPORTS_SENT);
                    shared.queue.sent(token, report);
                }
                Err(status) => {
                    let outcome = shared.queue.dispatch_failed(report);
                    debug!("report dispatch failed: {status:?}");
                    record_report_outcome(&mut shared, outcome, 14);
                }
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            policy: self.policy.clone(),
            shared: self.shared.clone(),
            flow: RequestFlow::default(),
            check_token: None,
            path: String::new(),
            body_mode: BodyMode::PassThrough,
            buffered: 0,
            headers_released: false,
            body_json: None,
            released: false,
            headers: None,
            method: String::new(),
            content_type: String::new(),
            accept_encoding: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// What the filter does with the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyMode {
    /// Count its bytes only.
    PassThrough,
    /// Hold it until complete, then evaluate the policy (`requestBodyJSON()`) and check.
    Evaluate,
    /// Hold it until complete, then add `stream_options.include_usage`.
    Inject,
}

struct Http {
    context_id: u32,
    policy: Option<Rc<Policy>>,
    shared: SharedRef,
    flow: RequestFlow,
    check_token: Option<u32>,
    path: String,
    body_mode: BodyMode,
    /// Bytes Envoy holds for us (we paused body iteration).
    buffered: usize,
    /// The request's headers went on (returned Continue or resumed).
    headers_released: bool,
    /// The request body parsed as JSON (for `requestBodyJSON()`).
    body_json: Option<serde_json::Value>,
    /// Released (or refused) by the root context: no more host calls for this stream.
    released: bool,
    /// The request headers, read once (one host call) in `on_http_request_headers`; handed
    /// to the policy's evaluation (`request.headers`).
    headers: Option<Vec<(String, Vec<u8>)>>,
    /// Headers the filter itself needs, taken from that map.
    method: String,
    content_type: String,
    accept_encoding: Option<String>,
}

/// Attributes read through host calls (and the parsed request body).
struct HostAttributes<'a> {
    body: Option<&'a serde_json::Value>,
    /// The `:path` header, already read: `request.path` without another host call.
    path: &'a str,
    /// The request headers, already read (taken by the first use).
    headers: Option<Vec<(String, Vec<u8>)>>,
}

impl AttributeHost for HostAttributes<'_> {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        if path == ["request", "path"] && !self.path.is_empty() {
            return Some(self.path.as_bytes().to_vec());
        }
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn request_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        match self.headers.take() {
            Some(headers) => headers,
            None => hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default(),
        }
    }

    fn request_body_json(&mut self, pointer: &str) -> Option<serde_json::Value> {
        self.body?.pointer(pointer).cloned()
    }
}

fn record_service_failure(shared: &mut Shared, failure: &ServiceFailure) {
    shared.metrics.inc(metric::SERVICE_ERRORS);
    if *failure == ServiceFailure::Grpc(GRPC_DEADLINE_EXCEEDED) {
        shared.metrics.inc(metric::SERVICE_TIMEOUTS);
    }
}

impl Http {
    /// Carries out a verdict. `paused`: the request waits for the check reply (resume it to let
    /// it through); otherwise the returned action lets it through or stops it.
    fn apply(&mut self, verdict: Verdict, paused: bool) -> Action {
        let mut shared = self.shared.borrow_mut();
        let reply = match verdict {
            Verdict::Allow => {
                shared.metrics.hot(Hot::Allowed, 1);
                None
            }
            Verdict::AllowOnFailure(failure) => {
                warn!(
                    "rate-limit service failed ({failure}); failure mode allow: request continues"
                );
                record_service_failure(&mut shared, &failure);
                shared.metrics.inc(metric::FAILURE_ALLOWED);
                None
            }
            Verdict::Limited { reply, limit } => {
                shared.metrics.inc(metric::LIMITED);
                if let Some(name) = &limit {
                    shared.metrics.inc(&format!("{}.{name}", metric::LIMITED));
                }
                Some(reply)
            }
            Verdict::DenyOnFailure { reply, failure } => {
                warn!("rate-limit service failed ({failure}); failure mode deny: request refused");
                record_service_failure(&mut shared, &failure);
                shared.metrics.inc(metric::FAILURE_DENIED);
                Some(reply)
            }
        };
        drop(shared);
        match reply {
            None if paused => {
                if self.body_mode != BodyMode::PassThrough
                    && self.buffered > 0
                    && !self.headers_released
                {
                    // The body is being held for a rewrite: it all goes on at its end
                    // (`release_body`).
                } else {
                    self.headers_released = true;
                    self.resume_http_request();
                }
                Action::Continue
            }
            None => {
                self.headers_released = true;
                Action::Continue
            }
            Some(reply) => {
                let headers: Vec<(&str, &str)> = reply
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                self.send_http_response(reply.status, headers, Some(&reply.body));
                Action::Pause
            }
        }
    }

    /// Evaluates the policy and dispatches the check. `complete`: the request has no more
    /// body to come; `body`: the complete body in hand (Evaluate mode), rewritten in place.
    fn check(&mut self, policy: &Rc<Policy>, complete: bool, body: Option<&mut Vec<u8>>) -> Action {
        let decision = policy.evaluate(&mut HostAttributes {
            body: self.body_json.as_ref(),
            path: &self.path,
            headers: self.headers.take(),
        });
        self.record_errors(&decision);
        let (flow, check) = RequestFlow::start(policy, decision, &self.path);
        self.flow = flow;
        let Some(bytes) = check else {
            return self.release_body();
        };
        // Ask the upstream only for encodings whose usage can be read (a copy is decompressed;
        // the client still gets the encoding it accepts).
        if let Some(accept) = self.accept_encoding.take() {
            match crate::usage::readable_accept_encoding(&accept) {
                Some(kept) if kept == accept => {}
                Some(kept) => self.set_http_request_header("accept-encoding", Some(&kept)),
                None => self.set_http_request_header("accept-encoding", None),
            }
        }
        if policy.usage.inject_stream_usage
            && Format::is_openai_streaming(&self.path)
            && self.is_json_post()
        {
            match body {
                Some(body) => self.inject(body),
                None if !complete => {
                    // The body may change length: let Envoy frame it (chunked) instead of a
                    // content-length that could turn stale. (The headers cannot wait for the
                    // body: Envoy delivers no body while a plugin holds the headers.)
                    self.set_http_request_header("content-length", None);
                    self.body_mode = BodyMode::Inject;
                }
                None => {}
            }
        }
        self.shared.borrow_mut().metrics.hot(Hot::Checked, 1);
        match self.dispatch_grpc_call(
            &policy.service.cluster,
            KUADRANT_SERVICE,
            CHECK_RATE_LIMIT,
            Vec::new(),
            Some(&bytes),
            policy.service.timeout,
        ) {
            Ok(token) => {
                self.check_token = Some(token);
                Action::Pause
            }
            Err(status) => {
                let failure = ServiceFailure::Dispatch(format!("{status:?}"));
                let verdict = self.flow.on_check_reply(policy, Err(failure));
                self.apply(verdict, false)
            }
        }
    }

    /// Whether the root context released this stream (see [`Shared::released`]).
    fn is_released(&mut self) -> bool {
        if !self.released {
            let shared = self.shared.borrow();
            self.released =
                !shared.released.is_empty() && shared.released.contains(&self.context_id);
        }
        self.released
    }

    /// Counts the expressions that failed, logging each at warn level once.
    fn record_errors(&self, decision: &Decision) {
        if decision.errors.is_empty() {
            return;
        }
        let mut shared = self.shared.borrow_mut();
        for e in &decision.errors {
            shared.metrics.inc(metric::EXPRESSION_ERRORS);
            let key = format!("{}\u{0}{}", e.limit, e.expression);
            if shared.warned.insert(key) {
                warn!("{e} (the limit does not apply; logged once, then at debug level)");
            } else {
                debug!("{e}");
            }
        }
    }

    fn is_json_post(&self) -> bool {
        let (method, content_type) = (&self.method, &self.content_type);
        method.eq_ignore_ascii_case("POST") && content_type.to_ascii_lowercase().contains("json")
    }

    /// Adds `stream_options.include_usage` to the complete request body in hand.
    fn inject(&mut self, body: &mut Vec<u8>) {
        if let Some(new) = crate::usage::inject_include_usage(body) {
            debug!("added stream_options.include_usage to the request");
            self.set_http_request_body(0, body.len(), &new);
            if !self.headers_released {
                self.set_http_request_header("content-length", Some(&new.len().to_string()));
            }
            self.shared.borrow_mut().metrics.inc(metric::USAGE_INJECTED);
            *body = new;
        }
    }

    /// The body may go on: continue now (headers and body, if the check allowed the request
    /// while its body was held), unless the check is still pending (its reply resumes).
    fn release_body(&mut self) -> Action {
        if self.check_token.is_some() && !self.headers_released {
            return Action::Pause;
        }
        self.headers_released = true;
        Action::Continue
    }

    fn finish(&mut self) {
        let Some(policy) = self.policy.clone() else {
            return;
        };
        let done = self.flow.finish(&policy);
        let mut shared = self.shared.borrow_mut();
        if done.clamped {
            warn!(
                "a response reported more than usage.maxTokensPerResponse ({}) tokens; charged that many",
                policy.usage.max_tokens_per_response
            );
            shared.metrics.inc(metric::USAGE_CLAMPED);
        }
        match done.charge {
            Charge::Nothing => return,
            Charge::Reported => {}
            Charge::Estimated | Charge::Fixed | Charge::Missing => {
                debug!(
                    "response carried no usage; charged: {:?} {:?}",
                    done.charge, done.usage
                );
                shared.metrics.inc(metric::USAGE_MISSING);
                match done.charge {
                    Charge::Estimated => shared.metrics.inc(metric::USAGE_ESTIMATED),
                    Charge::Fixed => shared.metrics.inc(metric::USAGE_FIXED),
                    _ => {}
                }
            }
        }
        for r in done.reports {
            shared.metrics.hot(tokens_reported(r.category), r.tokens);
            shared.queue.add(r.descriptor, r.tokens);
        }
    }
}

/// The first value of a header in a header map (as Envoy's single-header read answers).
/// Invalid UTF-8 becomes U+FFFD: the SDK's string variants panic on it, which a client can send.
fn header_value(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// One header of `map`, by a single-header read. Invalid UTF-8 becomes U+FFFD (see
/// [`header_value`]); a host error reads as absent.
fn single_header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// The `token_ratelimit.tokens_reported.<category>` counter.
fn tokens_reported(c: TokenCategory) -> Hot {
    match c {
        TokenCategory::Total => Hot::TokensTotal,
        TokenCategory::Prompt => Hot::TokensPrompt,
        TokenCategory::Completion => Hot::TokensCompletion,
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if self.check_token != Some(token_id) {
            return;
        }
        self.check_token = None;
        let Some(policy) = self.policy.clone() else {
            self.resume_http_request();
            return;
        };
        let body;
        let reply = if status_code != 0 {
            Err(ServiceFailure::Grpc(status_code))
        } else {
            body = self
                .get_grpc_call_response_body(0, response_size)
                .unwrap_or_default();
            Ok(body.as_slice())
        };
        let verdict = self.flow.on_check_reply(&policy, reply);
        self.apply(verdict, true);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        // One host call for every header the filter and the policy read.
        let headers = hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default();
        self.path = header_value(&headers, ":path").unwrap_or_default();
        self.method = header_value(&headers, ":method").unwrap_or_default();
        self.content_type = header_value(&headers, "content-type").unwrap_or_default();
        self.accept_encoding = header_value(&headers, "accept-encoding");
        self.headers = Some(headers);
        if policy.needs_body && !end_of_stream && self.shared.borrow().body_unavailable {
            // Envoy was seen not to deliver bodies while headers are held: the failure mode
            // decides (allow: evaluate without the body, where requestBodyJSON() finds nothing).
            if policy.service.failure_mode == crate::config::FailureMode::Deny {
                let reply = crate::flow::error_body(
                    "The token rate limiter cannot read the request body (Envoy lacks allow_on_headers_stop_iteration).",
                    "server_error",
                    "rate_limit_body_unavailable",
                );
                self.send_http_response(
                    500,
                    vec![("content-type", "application/json")],
                    Some(&reply),
                );
                return Action::Pause;
            }
            return self.check(&policy, false, None);
        }
        if policy.needs_body && !end_of_stream {
            // Evaluated when the body is complete (Envoy delivers it while the headers are held,
            // with allow_on_headers_stop_iteration). The root context releases a request whose
            // body never shows up, so that a misconfigured Envoy cannot hang it.
            self.body_mode = BodyMode::Evaluate;
            self.shared
                .borrow_mut()
                .awaiting_body
                .push((self.context_id, 0));
            return Action::Pause;
        }
        self.check(&policy, end_of_stream, None)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let new_bytes = body_size.saturating_sub(self.buffered);
        self.flow.on_request_body_len(new_bytes);
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        if self.body_mode == BodyMode::PassThrough {
            return Action::Continue;
        }
        {
            let mut shared = self.shared.borrow_mut();
            shared
                .awaiting_body
                .retain(|(id, _)| *id != self.context_id);
            if shared.released.contains(&self.context_id) {
                // Released by the root context: this callback runs inside its resume call,
                // where Envoy answers no header or property call. The request goes on unchecked
                // (logged and counted there).
                self.released = true;
                self.headers_released = true;
                self.body_mode = BodyMode::PassThrough;
                return Action::Continue;
            }
        }
        if !end_of_stream {
            if self.body_mode == BodyMode::Inject && body_size > policy.usage.max_request_body_bytes
            {
                debug!("request body over requestBody.maxBytes: include_usage not added");
                self.body_mode = BodyMode::PassThrough;
                self.buffered = 0;
                return self.release_body();
            }
            // Hold it (Envoy buffers) until it is complete.
            self.buffered = body_size;
            return Action::Pause;
        }
        let mut body = self.get_http_request_body(0, body_size).unwrap_or_default();
        self.buffered = 0;
        match self.body_mode {
            BodyMode::Evaluate => {
                self.body_mode = BodyMode::PassThrough;
                self.body_json = serde_json::from_slice(&body).ok();
                // The whole request is here: inject now if the policy allows it.
                let action = self.check(&policy, true, Some(&mut body));
                if matches!(action, Action::Continue) {
                    self.headers_released = true;
                }
                action
            }
            BodyMode::Inject => {
                self.body_mode = BodyMode::PassThrough;
                self.inject(&mut body);
                self.release_body()
            }
            BodyMode::PassThrough => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.is_released() {
            return Action::Continue;
        }
        for (k, v) in self.flow.response_headers() {
            self.add_http_response_header(k, v);
        }
        if let (true, Some(policy)) = (self.flow.reads_response(), self.policy.clone()) {
            // Two single-header reads, not the header map: a response carries many headers
            // (an LLM API's often 20 or more), and every one of them would be copied into the
            // VM and allocated there; `content-encoding` is usually absent, which costs no
            // allocation at all (measured: 8,000 fewer instructions per request, docs/PERFORMANCE.md).
            let content_type = single_header(MapType::HttpResponseHeaders, "content-type");
            let encoding = single_header(MapType::HttpResponseHeaders, "content-encoding");
            self.flow
                .on_response_headers(&policy, content_type.as_deref(), encoding.as_deref());
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.is_released() {
            return Action::Continue;
        }
        if self.flow.wants_body() && body_size > 0 {
            if let Some(chunk) = self.get_http_response_body(0, body_size) {
                self.flow.on_response_body_vec(chunk);
            }
        }
        if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        {
            let mut shared = self.shared.borrow_mut();
            shared
                .awaiting_body
                .retain(|(id, _)| *id != self.context_id);
            if shared.released.remove(&self.context_id) {
                return;
            }
        }
        // After an abort (client gone, upstream reset) the stream never reached its end: what
        // arrived is accounted here. `finish` is idempotent.
        self.finish();
    }
}
