//! A [`Host`] that plays the proxy in native tests, benches and fuzz targets: it answers from
//! plain maps and records every call the filter makes.
//!
//! Built under `cfg(test)` and with the crate's `test-util` feature (never in the wasm module).

use super::{Buffer, GrpcCall, HeaderMap, Host, Level, LocalReply};
use crate::attributes::AttributeHost;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// One gRPC call the filter dispatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    /// The token the mock answered.
    pub token: u32,
    /// The context that dispatched it.
    pub context_id: u32,
    /// Cluster, service and method names.
    pub cluster: String,
    /// Fully qualified service name.
    pub service: String,
    /// Method name.
    pub method: String,
    /// The serialized request message.
    pub message: Vec<u8>,
    /// The call's deadline.
    pub timeout: Duration,
}

/// The proxy, played from maps. Fields are public so that a test sets up what the proxy has
/// and reads back what the filter did.
#[derive(Debug)]
pub struct MockHost {
    /// Properties by dotted path (`request.path`, `metadata.filter_metadata.ns.user`), as
    /// Envoy encodes them.
    pub properties: HashMap<String, Vec<u8>>,
    /// The request's headers (name lowercase).
    pub request_headers: Vec<(String, Vec<u8>)>,
    /// The response's headers (name lowercase).
    pub response_headers: Vec<(String, Vec<u8>)>,
    /// The request body buffered so far.
    pub request_body: Vec<u8>,
    /// The current response body chunk.
    pub response_body: Vec<u8>,
    /// The gRPC reply being delivered.
    pub grpc_reply: Vec<u8>,
    /// The plugin configuration.
    pub plugin_configuration: Vec<u8>,
    /// Every gRPC call dispatched, in order.
    pub dispatched: Vec<Dispatched>,
    /// When set, every dispatch fails with this reason.
    pub refuse_dispatch: Option<String>,
    /// Cancelled call tokens.
    pub cancelled: Vec<u32>,
    /// Local replies sent, with the context they were sent for.
    pub replies: Vec<(u32, LocalReply)>,
    /// Contexts whose request was resumed, in order.
    pub resumed: Vec<u32>,
    /// The context calls act on.
    pub effective_context: u32,
    /// Contexts that exist (`set_effective_context` fails for others); empty: all exist.
    pub live_contexts: Vec<u32>,
    /// The tick period last set.
    pub tick_period: Option<Duration>,
    /// Counter values by name.
    pub counters: HashMap<String, u64>,
    /// Counter names by id (index).
    pub counter_ids: Vec<String>,
    /// Host calls that defined a counter.
    pub counters_defined: usize,
    /// Host calls that added to a counter.
    pub counter_adds: usize,
    /// The wall-clock time answered.
    pub now: SystemTime,
    /// The data shared between VMs, by key.
    pub shared: HashMap<String, Vec<u8>>,
    /// Properties the filter set ([`Host::set_property`]), by path.
    pub set_properties: HashMap<String, Vec<u8>>,
    /// Messages logged at or above `log_level`.
    pub logs: Vec<(Level, String)>,
    /// The lowest level logged.
    pub log_level: Level,
    /// Number of property reads.
    pub property_reads: usize,
    /// Number of whole header-map reads.
    pub header_map_reads: usize,
    /// Attribute reads of policy evaluation (through [`AttributeHost`]), in order: property
    /// paths (dotted) and `<headers>` for the header map.
    pub fetched: Vec<String>,
    /// The request body as JSON, for `requestBodyJSON()` (through [`AttributeHost`]).
    pub body_json: Option<serde_json::Value>,
    /// The token the next dispatched call gets.
    pub next_token: u32,
}

impl Default for MockHost {
    fn default() -> Self {
        MockHost {
            properties: HashMap::new(),
            request_headers: Vec::new(),
            response_headers: Vec::new(),
            request_body: Vec::new(),
            response_body: Vec::new(),
            grpc_reply: Vec::new(),
            plugin_configuration: Vec::new(),
            dispatched: Vec::new(),
            refuse_dispatch: None,
            cancelled: Vec::new(),
            replies: Vec::new(),
            resumed: Vec::new(),
            effective_context: 0,
            live_contexts: Vec::new(),
            tick_period: None,
            counters: HashMap::new(),
            counter_ids: Vec::new(),
            counters_defined: 0,
            counter_adds: 0,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            shared: HashMap::new(),
            set_properties: HashMap::new(),
            logs: Vec::new(),
            log_level: Level::Debug,
            property_reads: 0,
            header_map_reads: 0,
            fetched: Vec::new(),
            body_json: None,
            next_token: 1,
        }
    }
}

/// A JSON value as a `google.protobuf.Value`, as an auth filter's Struct holds it.
fn json_to_proto(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(json_to_proto).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(json_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as a `google.protobuf.Struct`.
fn json_to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_proto(v)))
            .collect(),
    }
}

/// Serialized `envoy.config.core.v3.Metadata` with one namespace per entry of `namespaces`
/// (a JSON object per namespace), as Envoy answers the property `metadata`.
pub fn encode_metadata(namespaces: &[(&str, serde_json::Value)]) -> Vec<u8> {
    use prost::Message;
    let metadata = crate::attributes::Metadata {
        filter_metadata: namespaces
            .iter()
            .map(|(ns, v)| {
                let fields = match v {
                    serde_json::Value::Object(m) => json_to_struct(m.clone()),
                    _ => prost_types::Struct::default(),
                };
                (ns.to_string(), fields)
            })
            .collect(),
    };
    metadata.encode_to_vec()
}

impl MockHost {
    /// Sets the stream's dynamic metadata (the property `metadata`) to these namespaces, each a
    /// JSON object, as auth filters leave them.
    pub fn set_metadata(&mut self, namespaces: &[(&str, serde_json::Value)]) {
        self.properties
            .insert("metadata".into(), encode_metadata(namespaces));
    }

    /// A host whose request carries `headers` (`(name, value)`, names lowercase).
    pub fn with_request_headers(headers: &[(&str, &str)]) -> Self {
        MockHost {
            request_headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.as_bytes().to_vec()))
                .collect(),
            ..MockHost::default()
        }
    }

    /// A host whose plugin configuration is `configuration` (JSON or a serialized Struct).
    pub fn with_configuration(configuration: impl Into<Vec<u8>>) -> Self {
        MockHost {
            plugin_configuration: configuration.into(),
            ..MockHost::default()
        }
    }

    /// Sets property `path` (dotted) to a string value.
    pub fn set_property(&mut self, path: &str, value: impl Into<Vec<u8>>) {
        self.properties.insert(path.to_string(), value.into());
    }

    /// The value of counter `name` (0 when never moved).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// The calls dispatched to `method`.
    pub fn calls(&self, method: &str) -> Vec<&Dispatched> {
        self.dispatched
            .iter()
            .filter(|d| d.method == method)
            .collect()
    }

    /// The messages logged at `level`.
    pub fn logged(&self, level: Level) -> Vec<&str> {
        self.logs
            .iter()
            .filter(|(l, _)| *l == level)
            .map(|(_, m)| m.as_str())
            .collect()
    }

    fn map(&mut self, map: HeaderMap) -> &mut Vec<(String, Vec<u8>)> {
        match map {
            HeaderMap::RequestHeaders => &mut self.request_headers,
            HeaderMap::ResponseHeaders => &mut self.response_headers,
        }
    }

    fn buf(&mut self, buffer: Buffer) -> &mut Vec<u8> {
        match buffer {
            Buffer::RequestBody => &mut self.request_body,
            Buffer::ResponseBody => &mut self.response_body,
            Buffer::GrpcReply => &mut self.grpc_reply,
            Buffer::PluginConfiguration => &mut self.plugin_configuration,
        }
    }
}

impl Host for MockHost {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        self.property_reads += 1;
        self.properties.get(&path.join(".")).cloned()
    }

    fn headers(&mut self, map: HeaderMap) -> Vec<(String, Vec<u8>)> {
        self.header_map_reads += 1;
        self.map(map).clone()
    }

    fn header(&mut self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
        self.map(map)
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn set_header(&mut self, map: HeaderMap, name: &str, value: Option<&str>) {
        let headers = self.map(map);
        headers.retain(|(k, _)| k != name);
        if let Some(v) = value {
            headers.push((name.to_string(), v.as_bytes().to_vec()));
        }
    }

    fn add_header(&mut self, map: HeaderMap, name: &str, value: &str) {
        self.map(map)
            .push((name.to_string(), value.as_bytes().to_vec()));
    }

    fn buffer(&mut self, buffer: Buffer, start: usize, size: usize) -> Option<Vec<u8>> {
        let b = self.buf(buffer);
        if b.is_empty() {
            return None;
        }
        let end = start.saturating_add(size).min(b.len());
        b.get(start.min(end)..end).map(<[u8]>::to_vec)
    }

    fn set_buffer(&mut self, buffer: Buffer, start: usize, size: usize, bytes: &[u8]) {
        let b = self.buf(buffer);
        let start = start.min(b.len());
        let end = start.saturating_add(size).min(b.len());
        b.splice(start..end, bytes.iter().copied());
    }

    fn dispatch_grpc(&mut self, call: &GrpcCall<'_>) -> Result<u32, String> {
        if let Some(reason) = &self.refuse_dispatch {
            return Err(reason.clone());
        }
        let token = self.next_token;
        self.next_token += 1;
        self.dispatched.push(Dispatched {
            token,
            context_id: self.effective_context,
            cluster: call.cluster.to_string(),
            service: call.service.to_string(),
            method: call.method.to_string(),
            message: call.message.to_vec(),
            timeout: call.timeout,
        });
        Ok(token)
    }

    fn cancel_grpc(&mut self, token: u32) {
        self.cancelled.push(token);
    }

    fn send_reply(&mut self, reply: &LocalReply) {
        self.replies.push((self.effective_context, reply.clone()));
    }

    fn resume_request(&mut self) {
        self.resumed.push(self.effective_context);
    }

    fn set_effective_context(&mut self, context_id: u32) -> bool {
        if !self.live_contexts.is_empty() && !self.live_contexts.contains(&context_id) {
            return false;
        }
        self.effective_context = context_id;
        true
    }

    fn set_tick_period(&mut self, period: Duration) {
        self.tick_period = Some(period);
    }

    fn define_counter(&mut self, name: &str) -> Option<u32> {
        self.counters_defined += 1;
        let id = match self.counter_ids.iter().position(|n| n == name) {
            Some(i) => i,
            None => {
                self.counter_ids.push(name.to_string());
                self.counter_ids.len() - 1
            }
        };
        u32::try_from(id).ok()
    }

    fn add_to_counter(&mut self, id: u32, n: u64) {
        self.counter_adds += 1;
        if let Some(name) = self.counter_ids.get(id as usize) {
            *self.counters.entry(name.clone()).or_default() += n;
        }
    }

    fn now(&mut self) -> SystemTime {
        self.now
    }

    fn shared_data(&mut self, key: &str) -> Option<Vec<u8>> {
        self.shared.get(key).cloned()
    }

    fn set_property(&mut self, path: &str, value: &[u8]) {
        self.set_properties.insert(path.to_string(), value.to_vec());
    }

    fn set_shared_data(&mut self, key: &str, value: &[u8]) {
        self.shared.insert(key.to_string(), value.to_vec());
    }

    fn log_enabled(&self, level: Level) -> bool {
        level >= self.log_level
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_string()));
    }
}

/// The mock answers attribute reads too, so that policy evaluation can be tested without a
/// stream: `request.headers` from [`MockHost::request_headers`], properties from
/// [`MockHost::properties`], the body from [`MockHost::body_json`]; each read is logged in
/// [`MockHost::fetched`].
impl AttributeHost for MockHost {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        self.fetched.push(path.join("."));
        Host::property(self, path)
    }

    fn request_headers(&mut self) -> Vec<(String, Vec<u8>)> {
        self.fetched.push("<headers>".into());
        self.headers(HeaderMap::RequestHeaders)
    }

    fn request_body_json(&mut self, pointer: &str) -> Option<serde_json::Value> {
        self.body_json.as_ref()?.pointer(pointer).cloned()
    }
}
