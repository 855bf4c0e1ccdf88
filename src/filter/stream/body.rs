//! The request body's part of a stream: what the filter reads of it (at most
//! `requestBody.maxBytes`, chunk by chunk, while Envoy keeps the chunks under flow control),
//! when it is complete (its end, an empty last chunk, or trailers), and the `include_usage`
//! rewrite of its last bytes.

use super::{BodyMode, Rewrite, StreamFilter};
use crate::filter::metrics::names;
use crate::filter::{host_log, Action, Buffer, HeaderMap, Host};
use crate::policy::Policy;
use std::rc::Rc;

impl StreamFilter {
    /// A request body chunk arrived: `body_size` is what the proxy shows the filter now (all of
    /// what it keeps after a [`Action::Pause`], else this chunk).
    ///
    /// Envoy never buffers the body against its buffer limit for the filter: while the filter
    /// needs the body (for the policy: `requestBodyJSON()`, a reservation's bound; or to add
    /// `include_usage`) it copies each chunk, at most `requestBody.maxBytes` in all, and Envoy
    /// keeps the chunks under flow control ([`Action::PauseWithWatermark`]); a body that grows
    /// beyond goes on unread. The chunk that completes the JSON document is held with
    /// [`Action::Pause`], so that a body ending with trailers can still be rewritten.
    pub fn on_request_body(
        &mut self,
        host: &mut impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        // After a Pause, Envoy shows everything it keeps; otherwise only this chunk.
        let (offset, chunk_len) = if self.buffering {
            (self.kept, body_size.saturating_sub(self.kept))
        } else {
            (0, body_size)
        };
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        // Every chunk is read once: its text is the prompt of the fallback estimate (when the
        // body is not read whole), and the body the filter needs is copied from it.
        // Released by the root context (the body stopped arriving): the proxy answers no call.
        let released = self.shared.borrow().is_released(self.context_id);
        let chunk = if chunk_len > 0 && !released {
            host.buffer(Buffer::RequestBody, offset, chunk_len)
        } else {
            None
        };
        match &chunk {
            Some(bytes) => self.flow.on_request_body_chunk(bytes),
            None => self.flow.on_request_body_len(chunk_len as u64),
        }
        if end_of_stream {
            self.flow.on_request_complete();
        }
        if self.body_mode == BodyMode::PassThrough {
            if self.waiting_for_admission() {
                // Envoy hands the body over while the headers wait for their admission (with
                // allow_on_headers_stop_iteration): going on here would send the request
                // upstream before its answer. Envoy keeps the body until the resume.
                return self.keep(chunk_len);
            }
            return self.forward();
        }
        if released {
            // Released by the root context (the body stopped arriving): this callback runs
            // inside its resume call, where the proxy answers no header or property call. The
            // request goes on unchecked (logged and counted there).
            self.released = true;
            self.headers_released = true;
            self.body_mode = BodyMode::PassThrough;
            self.held = Vec::new();
            return self.forward();
        }
        if self.held.len().saturating_add(chunk_len) > policy.usage.max_request_body_bytes {
            self.kept = self.kept.saturating_add(chunk_len);
            self.buffering = false;
            return self.body_over_limit(host, &policy, end_of_stream);
        }
        match chunk {
            Some(chunk) => self.held.extend_from_slice(&chunk),
            None if chunk_len == 0 => {}
            None => {
                // The proxy did not show the chunk: the body cannot be read whole.
                self.kept = self.kept.saturating_add(chunk_len);
                self.buffering = false;
                return self.body_over_limit(host, &policy, end_of_stream);
            }
        }
        if !end_of_stream {
            // The root context releases the request should the rest not come.
            self.shared.borrow_mut().body_progress(self.context_id);
            // Copied; Envoy keeps it. The chunk that completes the document stays in view.
            if crate::request_body::is_complete_json(&self.held) {
                self.kept = self.kept.saturating_add(chunk_len);
                self.buffering = true;
                return Action::Pause;
            }
            return self.keep(chunk_len);
        }
        // What of the body the proxy still lets the filter change: all of it after a Pause,
        // else the last chunk (at `kept`).
        let rewrite = if self.buffering {
            Rewrite::Whole
        } else {
            Rewrite::From(self.kept)
        };
        self.body_complete(host, &policy, rewrite)
    }

    /// Envoy keeps this chunk of `len` bytes (flow control) and the filter reads no more of it.
    pub(super) fn keep(&mut self, len: usize) -> Action {
        self.kept = self.kept.saturating_add(len);
        self.buffering = false;
        Action::PauseWithWatermark
    }

    /// The body goes on: Envoy sends what it kept and this chunk.
    pub(super) fn forward(&mut self) -> Action {
        self.kept = 0;
        self.buffering = false;
        Action::Continue
    }

    /// The body the filter copied is complete (its end, or the request's trailers); `rewrite`:
    /// what of it the proxy still lets the filter change.
    pub(super) fn body_complete(
        &mut self,
        host: &mut impl Host,
        policy: &Rc<Policy>,
        rewrite: Rewrite,
    ) -> Action {
        self.shared.borrow_mut().body_arrived(self.context_id);
        let mut body = std::mem::take(&mut self.held);
        self.rewrite = rewrite;
        let action = match std::mem::replace(&mut self.body_mode, BodyMode::PassThrough) {
            BodyMode::Evaluate => {
                self.body_json = serde_json::from_slice(&body).ok();
                // The whole request is here: inject now if the policy allows it.
                match self.check(host, policy, true, Some(&mut body)) {
                    Action::Continue => {
                        self.headers_released = true;
                        self.forward()
                    }
                    _ => Action::PauseWithWatermark,
                }
            }
            BodyMode::Inject => {
                self.inject(host, &mut body);
                self.release_body()
            }
            BodyMode::PassThrough => self.forward(),
        };
        self.rewrite = Rewrite::None;
        action
    }

    /// The copied body outgrew `requestBody.maxBytes`: it goes on unread and unmodified, the
    /// policy is evaluated without it (`requestBodyJSON()` finds nothing; a reservation holds
    /// `reservation.defaultAmount`), and no `include_usage` is added.
    pub(super) fn body_over_limit(
        &mut self,
        host: &mut impl Host,
        policy: &Rc<Policy>,
        complete: bool,
    ) -> Action {
        host_log!(
            host,
            Debug,
            "request body over requestBody.maxBytes ({} bytes): it goes on unread",
            policy.usage.max_request_body_bytes
        );
        self.shared
            .borrow_mut()
            .metrics
            .inc(host, names::BODY_OVER_LIMIT);
        self.shared.borrow_mut().body_arrived(self.context_id);
        self.held = Vec::new();
        self.body_unread = true;
        match std::mem::replace(&mut self.body_mode, BodyMode::PassThrough) {
            BodyMode::Evaluate => match self.check(host, policy, complete, None) {
                Action::Continue => {
                    self.headers_released = true;
                    self.forward()
                }
                // Waiting for the admission (or refused): Envoy keeps the rest under flow
                // control, never beyond its buffer.
                _ => Action::PauseWithWatermark,
            },
            _ => self.release_body(),
        }
    }

    /// The request's trailers arrived (HTTP/2, or chunked HTTP/1.1): the request is complete,
    /// and a body held for the filter is complete with it. The trailers wait while the request
    /// waits for its admission.
    pub fn on_request_trailers(&mut self, host: &mut impl Host) -> Action {
        self.flow.on_request_complete();
        let Some(policy) = self.policy.clone() else {
            return Action::Continue;
        };
        if self.body_mode != BodyMode::PassThrough {
            if self.shared.borrow().is_released(self.context_id) {
                // Released by the root context (see `on_request_body`).
                self.released = true;
                self.headers_released = true;
                self.body_mode = BodyMode::PassThrough;
                self.held = Vec::new();
                self.kept = 0;
                return Action::Continue;
            }
            // After a Pause the proxy still shows (and lets the filter change) the whole body;
            // otherwise the last chunk went by.
            let rewrite = if self.buffering {
                Rewrite::Whole
            } else {
                Rewrite::None
            };
            return match self.body_complete(host, &policy, rewrite) {
                Action::Continue => Action::Continue,
                _ => Action::Pause,
            };
        }
        if self.waiting_for_admission() {
            return Action::Pause;
        }
        Action::Continue
    }

    pub(super) fn is_json_post(&self) -> bool {
        let (method, content_type) = (&self.method, &self.content_type);
        method.eq_ignore_ascii_case("POST") && content_type.to_ascii_lowercase().contains("json")
    }

    /// Adds `stream_options.include_usage` to the complete request body in hand, where the
    /// proxy still lets the filter change it ([`Rewrite`]): the whole body, or its last chunk
    /// when the member goes in there (it is added before the closing brace).
    pub(super) fn inject(&mut self, host: &mut impl Host, body: &mut Vec<u8>) {
        let Some(new) = crate::request_body::inject_include_usage(body) else {
            return;
        };
        match self.rewrite {
            Rewrite::Whole => host.set_buffer(Buffer::RequestBody, 0, body.len(), &new),
            Rewrite::From(start)
                if start <= body.len() && new.get(..start) == body.get(..start) =>
            {
                let tail = new.get(start..).unwrap_or_default();
                host.set_buffer(Buffer::RequestBody, 0, body.len() - start, tail)
            }
            _ => {
                host_log!(
                    host,
                    Debug,
                    "stream_options.include_usage not added: the part of the body to change already went on"
                );
                return;
            }
        }
        host_log!(
            host,
            Debug,
            "added stream_options.include_usage to the request"
        );
        self.injected = true;
        if !self.headers_released {
            host.set_header(
                HeaderMap::RequestHeaders,
                "content-length",
                Some(&new.len().to_string()),
            );
        }
        self.shared
            .borrow_mut()
            .metrics
            .inc(host, names::USAGE_INJECTED);
        *body = new;
    }

    /// The body may go on: continue now (headers and body, if the check allowed the request
    /// while its body was held), unless the check is still pending (its reply resumes).
    pub(super) fn release_body(&mut self) -> Action {
        if self.waiting_for_admission() {
            // The filter needs no more of the body: Envoy keeps it under flow control.
            self.buffering = false;
            return Action::PauseWithWatermark;
        }
        self.headers_released = true;
        self.forward()
    }
}
