//! The proxy-wasm layer: moves bytes between Envoy and the pure core. Built for `wasm32` only.
//!
//! One root context per plugin and VM owns the compiled [`Policy`], the [`ReportQueue`] and the
//! metrics; HTTP contexts share them through `Rc` (a VM is single-threaded). Checks are
//! dispatched from HTTP contexts, reports from the root context's tick, so that a report's call
//! outlives the stream that spent the tokens.

use crate::attributes::AttributeHost;
use crate::config::TokenCategory;
use crate::flow::{Charge, RequestFlow, ServiceFailure, Verdict};
use crate::policy::Policy;
use crate::reports::{ReportOutcome, ReportQueue};
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
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// Counter names, as they appear in Envoy's stats (Envoy may prefix them, e.g. `wasmcustom.`).
mod metric {
    pub const CHECKED: &str = "token_ratelimit.requests_checked";
    pub const ALLOWED: &str = "token_ratelimit.requests_allowed";
    pub const LIMITED: &str = "token_ratelimit.requests_limited";
    pub const FAILURE_ALLOWED: &str = "token_ratelimit.failure_mode_allowed";
    pub const FAILURE_DENIED: &str = "token_ratelimit.failure_mode_denied";
    pub const SERVICE_ERRORS: &str = "token_ratelimit.service_errors";
    pub const EXPRESSION_ERRORS: &str = "token_ratelimit.expression_errors";
    pub const USAGE_MISSING: &str = "token_ratelimit.usage_missing";
    pub const USAGE_ESTIMATED: &str = "token_ratelimit.usage_estimated";
    pub const USAGE_FIXED: &str = "token_ratelimit.usage_fixed";
    pub const REPORTS_SENT: &str = "token_ratelimit.reports_sent";
    pub const REPORTS_RETRIED: &str = "token_ratelimit.reports_retried";
    pub const REPORTS_DROPPED: &str = "token_ratelimit.reports_dropped";
    pub const TOKENS_DROPPED: &str = "token_ratelimit.tokens_dropped";
    pub const CONFIG_ERRORS: &str = "token_ratelimit.config_errors";
}

/// Counters defined lazily by name; a metric the host refuses is skipped silently.
#[derive(Default)]
struct Metrics {
    ids: HashMap<String, Option<u32>>,
}

impl Metrics {
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
}

type SharedRef = Rc<RefCell<Shared>>;

#[derive(Default)]
struct Root {
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

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
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
        let Some(policy) = self.policy.clone() else {
            return;
        };
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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            policy: self.policy.clone(),
            shared: self.shared.clone(),
            flow: RequestFlow::default(),
            check_token: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    policy: Option<Rc<Policy>>,
    shared: SharedRef,
    flow: RequestFlow,
    check_token: Option<u32>,
}

/// Attributes read through host calls.
struct HostAttributes;

impl AttributeHost for HostAttributes {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn request_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
    }
}

impl Http {
    /// Carries out a verdict. `paused`: the request waits for the check reply (resume it to let
    /// it through); otherwise the returned action lets it through or stops it.
    fn apply(&mut self, verdict: Verdict, paused: bool) -> Action {
        let mut shared = self.shared.borrow_mut();
        let reply = match verdict {
            Verdict::Allow => {
                shared.metrics.inc(metric::ALLOWED);
                None
            }
            Verdict::AllowOnFailure(failure) => {
                warn!(
                    "rate-limit service failed ({failure}); failure mode allow: request continues"
                );
                shared.metrics.inc(metric::SERVICE_ERRORS);
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
                shared.metrics.inc(metric::SERVICE_ERRORS);
                shared.metrics.inc(metric::FAILURE_DENIED);
                Some(reply)
            }
        };
        drop(shared);
        match reply {
            None if paused => {
                self.resume_http_request();
                Action::Continue
            }
            None => Action::Continue,
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

    fn finish(&mut self) {
        let Some(policy) = self.policy.clone() else {
            return;
        };
        let done = self.flow.finish(&policy);
        let mut shared = self.shared.borrow_mut();
        match done.charge {
            Charge::Nothing => return,
            Charge::Reported => {}
            Charge::Estimated | Charge::Fixed | Charge::Missing => {
                debug!("response carried no usage; charged: {:?} {:?}", done.charge, done.usage);
                shared.metrics.inc(metric::USAGE_MISSING);
                match done.charge {
                    Charge::Estimated => shared.metrics.inc(metric::USAGE_ESTIMATED),
                    Charge::Fixed => shared.metrics.inc(metric::USAGE_FIXED),
                    _ => {}
                }
            }
        }
        for r in done.reports {
            shared.metrics.add(
                &format!(
                    "token_ratelimit.tokens_reported.{}",
                    category_name(r.category)
                ),
                r.tokens,
            );
            shared.queue.add(r.descriptor, r.tokens);
        }
    }
}

fn category_name(c: TokenCategory) -> &'static str {
    c.as_str()
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
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        let decision = policy.evaluate(&mut HostAttributes);
        if !decision.errors.is_empty() {
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
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let (flow, check) = RequestFlow::start(&policy, decision, &path);
        self.flow = flow;
        let Some(bytes) = check else {
            return Action::Continue;
        };
        // Ask the upstream only for encodings whose usage can be read (a copy is decompressed;
        // the client still gets the encoding it accepts).
        if let Some(accept) = self.get_http_request_header("accept-encoding") {
            match crate::usage::readable_accept_encoding(&accept) {
                Some(kept) if kept == accept => {}
                Some(kept) => self.set_http_request_header("accept-encoding", Some(&kept)),
                None => self.set_http_request_header("accept-encoding", None),
            }
        }
        self.shared.borrow_mut().metrics.inc(metric::CHECKED);
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
                let verdict = self.flow.on_check_reply(&policy, Err(failure));
                self.apply(verdict, false)
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (k, v) in self.flow.response_headers().to_vec() {
            self.add_http_response_header(&k, &v);
        }
        if let Some(policy) = self.policy.clone() {
            let content_type = self.get_http_response_header("content-type");
            let encoding = self.get_http_response_header("content-encoding");
            self.flow
                .on_response_headers(&policy, content_type.as_deref(), encoding.as_deref());
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        self.flow.on_request_body_len(body_size);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.flow.wants_body() && body_size > 0 {
            if let Some(chunk) = self.get_http_response_body(0, body_size) {
                self.flow.on_response_body(&chunk);
            }
        }
        if end_of_stream {
            self.finish();
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        // After an abort (client gone, upstream reset) the stream never reached its end: what
        // arrived is accounted here. `finish` is idempotent.
        self.finish();
    }
}
