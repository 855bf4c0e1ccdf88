//! The boundary between the filter's decisions and the proxy: every interaction the filter has
//! with Envoy, named once.
//!
//! The proxy-wasm adapter (`wasm`, built for `wasm32` only) is the one production
//! implementation and translates each method into one proxy-wasm host call (ABI 0.2.1);
//! [`MockHost`](super::mock::MockHost) plays Envoy in native tests. Calls act on the
//! *effective context*, as in proxy-wasm: the stream or root context whose callback is running,
//! or the one named by the last [`Host::set_effective_context`].

use std::time::{Duration, SystemTime};

/// A header map of the current stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderMap {
    /// The request's headers (`:path`, `:method`, ... included).
    RequestHeaders,
    /// The response's headers (`:status` included).
    ResponseHeaders,
}

/// A byte buffer the host holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Buffer {
    /// The request body Envoy has buffered so far (all of it while the filter pauses it).
    RequestBody,
    /// The current response body chunk.
    ResponseBody,
    /// The body of the gRPC reply being delivered (in `on_grpc_reply`).
    GrpcReply,
    /// The plugin configuration (in `on_configure`).
    PluginConfiguration,
}

/// What a stream callback tells the proxy to do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let the headers or body go on to the next filter.
    Continue,
    /// Hold them (a reply or a resume follows later). For a body: the proxy buffers it for the
    /// filter, and the next body callback sees all of it so far (Envoy's
    /// StopIterationAndBuffer; a body beyond Envoy's buffer limit is refused with `413`).
    Pause,
    /// For a body callback only: hold the body without buffering it for the filter. The proxy
    /// keeps what arrives and stops reading from the client while its buffer is full (Envoy's
    /// StopIterationAndWatermark: flow control, never a `413`); the next body callback sees
    /// only the chunks after this one. A resume sends everything kept.
    PauseWithWatermark,
}

/// Log levels, as proxy-wasm names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Finest detail.
    Trace,
    /// Per-request detail.
    Debug,
    /// Configuration and life-cycle events.
    Info,
    /// Something is wrong with a request or the service; the filter goes on.
    Warn,
    /// Something is wrong with the configuration or the proxy.
    Error,
}

/// One unary gRPC call to a cluster of the proxy.
#[derive(Debug, Clone, Copy)]
pub struct GrpcCall<'a> {
    /// The proxy's cluster name (`rateLimitService.cluster`).
    pub cluster: &'a str,
    /// Fully qualified service name, e.g. `kuadrant.service.ratelimit.v1.RateLimitService`.
    pub service: &'a str,
    /// Method name, e.g. `CheckRateLimit`.
    pub method: &'a str,
    /// The serialized request message (protobuf bytes).
    pub message: &'a [u8],
    /// Deadline of the call; the proxy answers gRPC status 4 (deadline exceeded) past it.
    pub timeout: Duration,
}

/// A reply the filter sends instead of calling the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// HTTP status.
    pub status: u32,
    /// Response headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// A JSON body in OpenAI's error shape (`{"error": {"message", "type", "code"}}`), so SDK
    /// clients parse it.
    pub body: Vec<u8>,
}

/// Every interaction the filter has with the proxy.
///
/// Reads answer `None` (or empty) when the host has nothing or refuses; writes whose failure
/// the filter cannot act on return nothing. No method may panic: an implementation maps every
/// host status to one of these answers.
pub trait Host {
    /// The property at `path` (e.g. `["request", "path"]`) as raw bytes in Envoy's encoding
    /// (see [`crate::attributes`]); `None` when absent.
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>>;
    /// Every header of `map` as `(lowercase name, value bytes)`, in the proxy's order.
    fn headers(&mut self, map: HeaderMap) -> Vec<(String, Vec<u8>)>;
    /// The first value of header `name` (lowercase) of `map`.
    fn header(&mut self, map: HeaderMap, name: &str) -> Option<Vec<u8>>;
    /// Replaces header `name` of `map` with `value`, or removes it when `value` is `None`.
    fn set_header(&mut self, map: HeaderMap, name: &str, value: Option<&str>);
    /// Adds a value of header `name` to `map` (keeping the values it had).
    fn add_header(&mut self, map: HeaderMap, name: &str, value: &str);
    /// `size` bytes of `buffer` from `start` (fewer when it is shorter).
    fn buffer(&mut self, buffer: Buffer, start: usize, size: usize) -> Option<Vec<u8>>;
    /// Replaces `size` bytes of `buffer` from `start` with `bytes`.
    fn set_buffer(&mut self, buffer: Buffer, start: usize, size: usize, bytes: &[u8]);
    /// Starts a gRPC call; its reply arrives in the calling context's `on_grpc_reply` with the
    /// returned token. `Err` carries the host's reason (e.g. an unknown cluster).
    fn dispatch_grpc(&mut self, call: &GrpcCall<'_>) -> Result<u32, String>;
    /// Cancels the gRPC call `token`; its reply never arrives.
    fn cancel_grpc(&mut self, token: u32);
    /// Answers the current stream's request with `reply`; the upstream is not called.
    fn send_reply(&mut self, reply: &LocalReply);
    /// Lets the current stream's paused request go on.
    fn resume_request(&mut self);
    /// Makes `context_id` the context later calls act on; `false` when it no longer exists.
    fn set_effective_context(&mut self, context_id: u32) -> bool;
    /// How often the root context's tick runs.
    fn set_tick_period(&mut self, period: Duration);
    /// Defines (or looks up) the counter metric `name`; `None` when the host refuses it.
    fn define_counter(&mut self, name: &str) -> Option<u32>;
    /// Adds `n` to counter `id`.
    fn add_to_counter(&mut self, id: u32, n: u64);
    /// The proxy's wall-clock time.
    fn now(&mut self) -> SystemTime;
    /// Sets the current stream's property `path` to `value` (Envoy keeps it as filter state
    /// `wasm.<path>`, which access logs read); a refusal is ignored.
    fn set_property(&mut self, path: &str, value: &[u8]);
    /// The value of `key` in the data every VM of the plugin shares (all worker threads of one
    /// proxy); `None` when absent.
    fn shared_data(&mut self, key: &str) -> Option<Vec<u8>>;
    /// Sets `key` in the shared data to `value` (the last writer wins).
    fn set_shared_data(&mut self, key: &str, value: &[u8]);
    /// Whether a message at `level` would be logged (so that it is not formatted in vain).
    fn log_enabled(&self, level: Level) -> bool;
    /// Logs `message` at `level` in the proxy's log.
    fn log(&mut self, level: Level, message: &str);
    /// Re-reads the proxy's log level (it can change at run time through Envoy's admin API).
    fn refresh_log_level(&mut self) {}
    /// Tells the proxy that the root context, which answered `false` to its shutdown
    /// (`proxy_on_done`), has finished (`proxy_done`).
    fn done(&mut self) {}
}

/// Logs through a [`Host`] at a level, formatting the message only when that level is on.
macro_rules! host_log {
    ($host:expr, $level:ident, $($arg:tt)+) => {{
        let level = $crate::filter::Level::$level;
        if $crate::filter::Host::log_enabled(&*$host, level) {
            let message = format!($($arg)+);
            $crate::filter::Host::log(&mut *$host, level, &message);
        }
    }};
}
pub(crate) use host_log;
