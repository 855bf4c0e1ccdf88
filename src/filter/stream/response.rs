//! The response's part of a stream: the rate-limit headers added, how usage is read (the
//! format and encoding), the response body passed on as it arrives (only an injected usage
//! event withheld), and who answered (the upstream, or Envoy before or after it).

use super::StreamFilter;
use crate::filter::{host_log, Action, Buffer, HeaderMap, Host};
use crate::flow::Responder;
use crate::usage::{BodyFormat, Encoding, UsageEventWithholder};

/// The response header naming the shadow limits that would have refused the request
/// (comma-separated), which went on.
pub const SHADOW_HEADER: &str = "x-ratelimit-shadow-limited";

impl StreamFilter {
    /// The response headers arrived: adds the rate-limit headers and chooses how to read usage.
    pub fn on_response_headers(&mut self, host: &mut impl Host) -> Action {
        if self.is_released() {
            return Action::Continue;
        }
        for (k, v) in self.flow.response_headers() {
            host.add_header(HeaderMap::ResponseHeaders, k, v);
        }
        if !self.flow.shadow_limited().is_empty() {
            let names = self.flow.shadow_limited().join(", ");
            host.add_header(HeaderMap::ResponseHeaders, SHADOW_HEADER, &names);
        }
        if let (true, Some(policy)) = (self.flow.reads_response(), self.policy.clone()) {
            // Two single-header reads, not the header map: a response carries many headers
            // (an LLM API's often 20 or more), and every one of them would be copied into the
            // VM and allocated there; `content-encoding` is usually absent, which costs no
            // allocation at all (measured: 8,000 fewer instructions per request).
            let content_type = lossy(host.header(HeaderMap::ResponseHeaders, "content-type"));
            let encoding = lossy(host.header(HeaderMap::ResponseHeaders, "content-encoding"));
            self.flow
                .on_response_headers(&policy, content_type.as_deref(), encoding.as_deref());
            let (status, responder) = responder(host);
            self.flow.on_response_status(status, responder);
            if self.injected
                && BodyFormat::from_content_type(content_type.as_deref()) == BodyFormat::EventStream
                && Encoding::from_header(encoding.as_deref()) == Encoding::Identity
            {
                // The body may shrink: no content-length that would turn stale.
                host.set_header(HeaderMap::ResponseHeaders, "content-length", None);
                self.withholder = Some(UsageEventWithholder::new(policy.usage.max_body_bytes));
            }
        }
        Action::Continue
    }

    /// A response body chunk of `body_size` bytes arrived. It goes on to the client as it is,
    /// unless the filter asked for the usage event: that event is withheld (the chunk's bytes
    /// replaced, a partial event that may be it held until its end shows).
    pub fn on_response_body(
        &mut self,
        host: &mut impl Host,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        if self.is_released() {
            return Action::Continue;
        }
        if self.withholder.is_some() {
            self.withhold_usage_event(host, body_size, end_of_stream);
        } else if self.flow.wants_body() && body_size > 0 {
            if let Some(chunk) = host.buffer(Buffer::ResponseBody, 0, body_size) {
                self.flow.on_response_body_vec(chunk);
            }
        }
        if end_of_stream {
            self.finish(host);
        }
        Action::Continue
    }

    /// Reads the chunk for usage and replaces it with what the client gets: the chunk without
    /// the usage event the filter asked for.
    fn withhold_usage_event(&mut self, host: &mut impl Host, body_size: usize, end: bool) {
        let Some(withholder) = self.withholder.as_mut() else {
            return;
        };
        let chunk = match body_size {
            0 => Vec::new(),
            n => host.buffer(Buffer::ResponseBody, 0, n).unwrap_or_default(),
        };
        let before = withholder.withheld();
        let mut out = withholder.chunk(&chunk);
        if end {
            let rest = withholder.finish();
            if !rest.is_empty() {
                out.get_or_insert_with(|| chunk.clone())
                    .extend_from_slice(&rest);
            }
        }
        if withholder.withheld() > before {
            host_log!(
                host,
                Debug,
                "withheld the usage event the client did not ask for (include_usage added)"
            );
        }
        if let Some(out) = out {
            // The whole chunk is replaced (Envoy takes start 0 and the chunk's size).
            host.set_buffer(Buffer::ResponseBody, 0, body_size, &out);
        }
        if self.flow.wants_body() && !chunk.is_empty() {
            self.flow.on_response_body_vec(chunk);
        }
    }
}

/// The response's status and who sent it. A `2xx` is taken as the upstream's without asking
/// (one header read per response); otherwise Envoy's `response.code_details` tells: anything
/// but `via_upstream` is Envoy's own reply, sent before the request reached the upstream when
/// there was no upstream connection (`upstream.local_address` unset). Properties the proxy
/// does not answer count as the upstream's answer (charged as before).
fn responder(host: &mut impl Host) -> (Option<u16>, Responder) {
    let status = lossy(host.header(HeaderMap::ResponseHeaders, ":status"))
        .and_then(|s| s.trim().parse::<u16>().ok());
    if status.is_some_and(|s| (200..300).contains(&s)) {
        return (status, Responder::Upstream);
    }
    let details = host.property(&["response", "code_details"]);
    let responder = match details.as_deref() {
        None | Some(b"via_upstream") => Responder::Upstream,
        Some(_) => {
            let connected = host
                .property(&["upstream", "local_address"])
                .is_some_and(|a| !a.is_empty());
            if connected {
                Responder::ProxyAfterUpstream
            } else {
                Responder::ProxyBeforeUpstream
            }
        }
    };
    (status, responder)
}

/// A header value as text; invalid UTF-8 becomes U+FFFD.
fn lossy(value: Option<Vec<u8>>) -> Option<String> {
    value.map(|v| String::from_utf8_lossy(&v).into_owned())
}
