//! The state the host keeps for one VM (one wasmtime `Store`): contexts, streams, calls, logs,
//! metrics. Host functions (`imports.rs`) change it; the test API (`host.rs`) reads it.

use crate::abi::{LogLevel, MapType, MetricType, Pairs, WasmResult};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime::{Memory, TypedFunc};

/// One line the module logged with `proxy_log`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub level: LogLevel,
    pub message: String,
    /// The effective context when the line was logged (0 outside any context, e.g. `_initialize`).
    pub context_id: u32,
}

/// A reply the module sent with `proxy_send_local_response`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
    /// -1 when the module sent no gRPC status (an HTTP reply).
    pub grpc_status: i32,
}

impl LocalReply {
    /// The body as text (lossy UTF-8).
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header of the reply (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where a call stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallState {
    /// Dispatched, not yet answered.
    Pending,
    /// Answered with a message (gRPC) or a response (HTTP).
    Answered,
    /// Closed with a non-zero gRPC status (or an HTTP call failure).
    Failed(u32),
    /// Cancelled (or closed) by the module (`proxy_grpc_cancel` / `proxy_grpc_close`).
    CancelledByModule,
    /// Cancelled by the host because the root context it belongs to was deleted, as Envoy does.
    /// (Deleting a stream cancels nothing: Envoy attributes every call to the root context.)
    CancelledByHost,
}

/// A gRPC call (`proxy_grpc_call`) or stream (`proxy_grpc_stream`) the module made.
#[derive(Clone, Debug)]
pub struct GrpcCall {
    pub token: u32,
    /// The effective context when the module dispatched it (a stream's callback, or whatever
    /// context the module made effective with `proxy_set_effective_context`).
    pub context_id: u32,
    /// The root context the call belongs to, as in Envoy (proxy-wasm-cpp-host dispatches on
    /// `contextOrEffectiveContext()->root_context()`): its callbacks are delivered with this id,
    /// and only this context's deletion cancels it.
    pub root_context_id: u32,
    /// The cluster name (or serialized `GrpcService`), as given.
    pub upstream: String,
    pub service: String,
    pub method: String,
    pub initial_metadata: Pairs,
    /// The request message (for a stream: the messages sent so far, concatenated in `messages`).
    pub message: Vec<u8>,
    pub timeout: Duration,
    pub state: CallState,
    /// `true` for a stream (`proxy_grpc_stream`).
    pub is_stream: bool,
    /// Messages sent on a stream with `proxy_grpc_send`.
    pub messages: Vec<Vec<u8>>,
    /// `proxy_grpc_send(.., end_stream = true)` was called, or the module closed the stream.
    pub local_closed: bool,
}

impl GrpcCall {
    /// `service/method`, e.g. `kuadrant.service.ratelimit.v1.RateLimitService/CheckRateLimit`.
    pub fn full_method(&self) -> String {
        format!("{}/{}", self.service, self.method)
    }

    /// Decodes the request message; panics (failing the test) with the decode error.
    pub fn decode<M: prost::Message + Default>(&self) -> M {
        M::decode(self.message.as_slice()).unwrap_or_else(|e| {
            panic!(
                "gRPC call {} ({}) carries a message that does not decode as {}: {e}",
                self.token,
                self.full_method(),
                std::any::type_name::<M>()
            )
        })
    }
}

/// An HTTP call (`proxy_http_call`) the module made.
#[derive(Clone, Debug)]
pub struct HttpCall {
    pub token: u32,
    /// The effective context when the module dispatched it.
    pub context_id: u32,
    /// The root context the call belongs to (its callback is delivered with this id), as for
    /// [`GrpcCall::root_context_id`].
    pub root_context_id: u32,
    pub upstream: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub trailers: Pairs,
    pub timeout: Duration,
    pub state: CallState,
}

impl HttpCall {
    pub fn header(&self, name: &str) -> Option<String> {
        get_header(&self.headers, name)
    }
}

/// A change the module made to one of a stream's header maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderChange {
    Add(MapType, String, Vec<u8>),
    Replace(MapType, String, Vec<u8>),
    Remove(MapType, String),
    SetAll(MapType, Pairs),
}

/// A defined metric.
#[derive(Clone, Debug)]
pub struct Metric {
    pub name: String,
    pub kind: MetricType,
    /// Counter or gauge value.
    pub value: u64,
    /// Values recorded in a histogram.
    pub recorded: Vec<u64>,
}

pub(crate) fn get_header(map: &Pairs, name: &str) -> Option<String> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// A header map slot of a stream. `live`: the filter holds the map (during its callback, or
/// while it paused it): it may read and change it. Otherwise only what Envoy keeps after the
/// callback is readable (request headers, through the stream info; the rest in the log phase).
#[derive(Default)]
pub(crate) struct Slot {
    pub map: Option<Pairs>,
    pub live: bool,
}

/// One direction of an HTTP stream, as Envoy's filter manager sees it for this filter.
#[derive(Default)]
pub(crate) struct Side {
    pub headers: Slot,
    pub trailers: Slot,
    /// The body the filter sees (it accumulates while the filter answers `Pause` to its body
    /// callbacks: StopIterationAndBuffer). `None` before the first body callback.
    pub body: Option<Vec<u8>>,
    /// What left the filter (what the next filter or the client received).
    pub forwarded: Vec<u8>,
    /// What Envoy keeps without showing it to the filter again (the filter answered
    /// StopIterationAndWatermark): it goes on before `body` when the side continues.
    pub kept: Vec<u8>,
    /// The filter's last body callback answered `Pause` (StopIterationAndBuffer).
    pub buffering: bool,
    /// The headers callback stopped all iteration (a `Pause`, which Envoy turns into
    /// StopAllIterationAndWatermark): body and trailers wait, unseen, until the filter resumes.
    pub held: bool,
    pub waiting_body: Option<Vec<u8>>,
    pub waiting_eos: bool,
    pub waiting_trailers: Option<Pairs>,
    /// `proxy_continue_stream` calls, and whether one is still to be carried out (after the
    /// current callback returns, as Envoy defers it).
    pub resumed: u32,
    pub resume_pending: bool,
    pub reset: bool,
    /// This side is over (a local reply ended the stream): no more callbacks.
    pub over: bool,
}

impl Side {
    /// The side continues: what Envoy kept, then the buffered body, leave the filter.
    pub(crate) fn forward(&mut self) {
        self.forwarded.append(&mut self.kept);
        if let Some(b) = self.body.as_mut() {
            self.forwarded.append(b);
        }
    }
}

#[derive(Default)]
pub(crate) struct StreamState {
    pub request: Side,
    pub response: Side,
    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    /// Properties the module set with `proxy_set_property`.
    pub module_properties: HashMap<Vec<u8>, Vec<u8>>,
    pub local_reply: Option<LocalReply>,
    /// The local reply went (or will not go) through the filter's response callbacks.
    pub local_reply_done: bool,
    pub downstream_resumed: u32,
    pub changes: Vec<HeaderChange>,
    /// Every callback the host made for this stream, with what it returned.
    pub callbacks: Vec<String>,
    pub log_phase: bool,
    pub deleted: bool,
}

/// Data shared by all VMs of one [`crate::Host`] with the same vm_id (Envoy keys it by vm_id).
#[derive(Default)]
pub(crate) struct SharedStore {
    pub data: HashMap<(String, String), (Vec<u8>, u32)>,
    pub queues: Vec<SharedQueue>,
}

pub(crate) struct SharedQueue {
    pub vm_id: String,
    pub name: String,
    /// (plugin instance serial, root context id) that registered it.
    pub owner: (u64, u32),
    pub items: VecDeque<Vec<u8>>,
    /// on_queue_ready notifications not yet delivered.
    pub ready: u32,
}

pub(crate) type Shared = Arc<Mutex<SharedStore>>;

/// What is readable only during one callback.
#[derive(Default)]
pub(crate) struct CallbackScope {
    pub vm_configuration: Option<Vec<u8>>,
    pub plugin_configuration: Option<Vec<u8>>,
    pub grpc_receive: Option<Vec<u8>>,
    pub grpc_initial_metadata: Option<Pairs>,
    pub grpc_trailing_metadata: Option<Pairs>,
    pub http_call_headers: Option<Pairs>,
    pub http_call_body: Option<Vec<u8>>,
    pub http_call_trailers: Option<Pairs>,
}

pub(crate) struct HostState {
    /// Serial of this VM within the process (to route shared-queue notifications).
    pub serial: u64,
    pub vm_id: String,
    pub memory: Option<Memory>,
    pub malloc: Option<TypedFunc<i32, i32>>,

    pub root_id: u32,
    pub next_context_id: u32,
    /// Live contexts: id → root id (0 for a root context).
    pub contexts: BTreeMap<u32, u32>,
    pub streams: BTreeMap<u32, StreamState>,
    /// The context host calls act on (`proxy_set_effective_context` changes it).
    pub effective: u32,
    /// The context whose callback runs (0 outside any callback).
    pub callback_context: u32,
    /// Successful `proxy_set_effective_context` calls: (the context whose callback ran, the
    /// context made effective).
    pub effective_switches: Vec<(u32, u32)>,
    pub scope: CallbackScope,
    /// (code, message) returned by `proxy_get_status` during a gRPC callback.
    pub status: (u32, String),

    pub properties: HashMap<Vec<u8>, Vec<u8>>,
    pub module_properties: HashMap<Vec<u8>, Vec<u8>>,
    pub clusters: Option<Vec<String>>,
    pub dispatch_failure: Option<WasmResult>,
    /// Envoy's `allow_on_headers_stop_iteration` (default false).
    pub allow_stop_iteration: bool,
    /// Envoy's buffer limit (`per_connection_buffer_limit_bytes`, default 1 MiB): a request
    /// body buffered for the filter beyond it is refused with `413`.
    pub buffer_limit: usize,

    pub logs: Vec<LogEntry>,
    pub log_level: LogLevel,
    pub echo_logs: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,

    pub tick_period_ms: u32,
    pub time_ns: u64,
    pub monotonic_ns: u64,
    pub rng: u64,

    pub grpc_calls: BTreeMap<u32, GrpcCall>,
    pub next_grpc_call: u32,
    pub next_grpc_stream: u32,
    pub http_calls: BTreeMap<u32, HttpCall>,
    pub next_http_call: u32,

    pub metrics: Vec<Metric>,
    pub metric_ids: HashMap<(String, u32), u32>,

    pub shared: Shared,
    /// Contexts that called `proxy_done`.
    pub done_calls: Vec<u32>,
    pub exit_code: Option<i32>,
}

impl HostState {
    pub fn new(serial: u64, vm_id: String, shared: Shared) -> HostState {
        HostState {
            serial,
            vm_id,
            memory: None,
            malloc: None,
            root_id: 0,
            next_context_id: 1,
            contexts: BTreeMap::new(),
            streams: BTreeMap::new(),
            effective: 0,
            callback_context: 0,
            effective_switches: Vec::new(),
            scope: CallbackScope::default(),
            status: (0, String::new()),
            properties: HashMap::new(),
            module_properties: HashMap::new(),
            clusters: None,
            dispatch_failure: None,
            allow_stop_iteration: false,
            buffer_limit: 1024 * 1024,
            logs: Vec::new(),
            log_level: LogLevel::Trace,
            echo_logs: true,
            stdout: Vec::new(),
            stderr: Vec::new(),
            tick_period_ms: 0,
            // 2025-01-01T00:00:00Z: a fixed clock, so that no scenario depends on timing.
            time_ns: 1_735_689_600 * 1_000_000_000,
            monotonic_ns: 1_000_000_000,
            rng: 0x9E37_79B9_7F4A_7C15,
            grpc_calls: BTreeMap::new(),
            next_grpc_call: 1,
            next_grpc_stream: 2,
            http_calls: BTreeMap::new(),
            next_http_call: 1,
            metrics: Vec::new(),
            metric_ids: HashMap::new(),
            shared,
            done_calls: Vec::new(),
            exit_code: None,
        }
    }

    /// The root context of context `id` (itself for a root context). Envoy attributes gRPC and
    /// HTTP calls to it.
    pub fn root_of(&self, id: u32) -> u32 {
        match self.contexts.get(&id) {
            Some(0) => id,
            Some(root) => *root,
            None => self.root_id,
        }
    }

    pub fn alloc_context_id(&mut self) -> u32 {
        let id = self.next_context_id;
        self.next_context_id += 1;
        id
    }

    pub fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic, seeded per plugin.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The stream the effective context is, if it is one.
    pub fn stream(&self) -> Option<&StreamState> {
        self.streams.get(&self.effective).filter(|s| !s.deleted)
    }

    pub fn stream_mut(&mut self) -> Option<&mut StreamState> {
        let id = self.effective;
        self.streams.get_mut(&id).filter(|s| !s.deleted)
    }

    /// A header map, for reading (`write == false`) or changing. Mirrors Envoy: a map the
    /// context does not have is `BadArgument` (`NotFound` in the log phase).
    pub fn map(&mut self, t: MapType, write: bool) -> Result<&mut Pairs, WasmResult> {
        fn scope_map(m: &mut Option<Pairs>) -> Result<&mut Pairs, WasmResult> {
            m.as_mut().ok_or(WasmResult::BadArgument)
        }
        match t {
            MapType::GrpcReceiveInitialMetadata => {
                return scope_map(&mut self.scope.grpc_initial_metadata)
            }
            MapType::GrpcReceiveTrailingMetadata => {
                return scope_map(&mut self.scope.grpc_trailing_metadata)
            }
            MapType::HttpCallResponseHeaders => {
                return scope_map(&mut self.scope.http_call_headers)
            }
            MapType::HttpCallResponseTrailers => {
                return scope_map(&mut self.scope.http_call_trailers)
            }
            _ => {}
        }
        let stream = self.stream_mut().ok_or(WasmResult::BadArgument)?;
        let log_phase = stream.log_phase;
        let missing = if log_phase {
            WasmResult::NotFound
        } else {
            WasmResult::BadArgument
        };
        let slot = match t {
            MapType::HttpRequestHeaders => &mut stream.request.headers,
            MapType::HttpRequestTrailers => &mut stream.request.trailers,
            MapType::HttpResponseHeaders => &mut stream.response.headers,
            _ => &mut stream.response.trailers,
        };
        let readable = if write {
            slot.live && !log_phase
        } else {
            match t {
                // Envoy falls back to the stream info's request headers.
                MapType::HttpRequestHeaders => true,
                MapType::HttpRequestTrailers => slot.live && !log_phase,
                _ => slot.live || log_phase,
            }
        };
        if !readable {
            return Err(missing);
        }
        slot.map.as_mut().ok_or(missing)
    }

    pub fn record_change(&mut self, change: HeaderChange) {
        if let Some(s) = self.stream_mut() {
            s.changes.push(change);
        }
    }

    /// Looks a property up: what the module set, the stream's, the plugin's, then the ones
    /// derived from headers as Envoy does (`request.path` from `:path`, ...).
    pub fn property(&self, path: &[u8]) -> Option<Vec<u8>> {
        if let Some(s) = self.stream() {
            if let Some(v) = s
                .module_properties
                .get(path)
                .or_else(|| s.properties.get(path))
            {
                return Some(v.clone());
            }
        }
        if let Some(v) = self
            .module_properties
            .get(path)
            .or_else(|| self.properties.get(path))
        {
            return Some(v.clone());
        }
        let s = self.stream()?;
        let header = |slot: &Slot, name: &str| -> Option<Vec<u8>> {
            slot.map
                .as_ref()?
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let parts: Vec<&[u8]> = path.split(|b| *b == 0).collect();
        let req = &s.request.headers;
        match parts.as_slice() {
            [b"request", b"path"] => header(req, ":path"),
            [b"request", b"url_path"] => {
                header(req, ":path").map(|p| p.split(|b| *b == b'?').next().unwrap_or(&[]).to_vec())
            }
            [b"request", b"query"] => {
                header(req, ":path").map(|p| match p.iter().position(|b| *b == b'?') {
                    Some(i) => p[i + 1..].to_vec(),
                    None => Vec::new(),
                })
            }
            [b"request", b"method"] => header(req, ":method"),
            [b"request", b"host"] => header(req, ":authority"),
            [b"request", b"scheme"] => header(req, ":scheme"),
            [b"request", b"id"] => header(req, "x-request-id"),
            [b"request", b"useragent"] => header(req, "user-agent"),
            [b"request", b"referer"] => header(req, "referer"),
            [b"request", b"headers", name] => header(req, &String::from_utf8_lossy(name)),
            [b"response", b"code"] => {
                let code = header(&s.response.headers, ":status")?;
                let code: i64 = String::from_utf8_lossy(&code).parse().ok()?;
                Some(code.to_le_bytes().to_vec())
            }
            [b"response", b"headers", name] => {
                header(&s.response.headers, &String::from_utf8_lossy(name))
            }
            _ => None,
        }
    }
}

/// Joins path segments the way the SDK sends them: NUL-separated.
pub(crate) fn property_key(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}
