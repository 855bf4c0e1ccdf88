//! [`Host`] over the proxy-wasm host calls: each method converts the core's types to ABI
//! values, makes one host call on the effective context, and converts the answer back. A status
//! other than OK reads as absent (reads) or is ignored (writes).

use super::contexts;
use super::hostcalls::{self as host, abi};
use super::pairs::decode_pairs;
use crate::filter::{Buffer, GrpcCall, HeaderMap, Host, Level, LocalReply};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The proxy's log level as last read (`proxy_get_log_level`): messages below it are not
/// formatted. Trace until the first read, so that nothing is lost before it.
static LOG_LEVEL: AtomicU32 = AtomicU32::new(abi::LOG_TRACE);

/// The proxy, as the filter's core sees it.
pub(crate) struct Envoy;

fn map_type(map: HeaderMap) -> u32 {
    match map {
        HeaderMap::RequestHeaders => abi::MAP_REQUEST_HEADERS,
        HeaderMap::ResponseHeaders => abi::MAP_RESPONSE_HEADERS,
    }
}

fn buffer_type(buffer: Buffer) -> u32 {
    match buffer {
        Buffer::RequestBody => abi::BUFFER_REQUEST_BODY,
        Buffer::ResponseBody => abi::BUFFER_RESPONSE_BODY,
        Buffer::GrpcReply => abi::BUFFER_GRPC_RECEIVE,
        Buffer::PluginConfiguration => abi::BUFFER_PLUGIN_CONFIGURATION,
    }
}

fn log_level(level: Level) -> u32 {
    match level {
        Level::Trace => abi::LOG_TRACE,
        Level::Debug => abi::LOG_DEBUG,
        Level::Info => abi::LOG_INFO,
        Level::Warn => abi::LOG_WARN,
        Level::Error => abi::LOG_ERROR,
    }
}

/// Milliseconds as the ABI's `u32`, saturated.
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Host for Envoy {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        host::property(path)
    }

    fn headers(&mut self, map: HeaderMap) -> Vec<(String, Vec<u8>)> {
        host::header_map(map_type(map))
            .and_then(|bytes| decode_pairs(&bytes))
            .unwrap_or_default()
    }

    fn header(&mut self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
        host::header(map_type(map), name)
    }

    fn set_header(&mut self, map: HeaderMap, name: &str, value: Option<&str>) {
        match value {
            Some(value) => host::replace_header(map_type(map), name, value),
            None => host::remove_header(map_type(map), name),
        }
    }

    fn add_header(&mut self, map: HeaderMap, name: &str, value: &str) {
        host::add_header(map_type(map), name, value);
    }

    fn buffer(&mut self, buffer: Buffer, start: usize, size: usize) -> Option<Vec<u8>> {
        host::buffer(buffer_type(buffer), start, size)
    }

    fn set_buffer(&mut self, buffer: Buffer, start: usize, size: usize, bytes: &[u8]) {
        host::set_buffer(buffer_type(buffer), start, size, bytes);
    }

    fn dispatch_grpc(&mut self, call: &GrpcCall<'_>) -> Result<u32, String> {
        host::grpc_call(
            call.cluster,
            call.service,
            call.method,
            call.message,
            millis(call.timeout),
        )
        .inspect(|&token| contexts::dispatched(token))
        .map_err(|status| abi::status_name(status).to_string())
    }

    fn cancel_grpc(&mut self, token: u32) {
        contexts::cancelled(token);
        host::grpc_cancel(token);
    }

    fn send_reply(&mut self, reply: &LocalReply) {
        let headers = super::pairs::encode_pairs(
            reply
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_bytes())),
        );
        host::send_local_response(reply.status, &headers, &reply.body);
    }

    fn resume_request(&mut self) {
        host::continue_stream(abi::STREAM_REQUEST);
    }

    fn set_effective_context(&mut self, context_id: u32) -> bool {
        let ok = host::set_effective_context(context_id);
        if ok {
            contexts::set_effective(context_id);
        }
        ok
    }

    fn set_tick_period(&mut self, period: Duration) {
        host::set_tick_period_ms(millis(period));
    }

    fn define_counter(&mut self, name: &str) -> Option<u32> {
        host::define_metric(abi::METRIC_COUNTER, name)
    }

    fn add_to_counter(&mut self, id: u32, n: u64) {
        host::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn now(&mut self) -> SystemTime {
        host::current_time_nanos()
            .and_then(|nanos| UNIX_EPOCH.checked_add(Duration::from_nanos(nanos)))
            .unwrap_or(UNIX_EPOCH)
    }

    fn shared_data(&mut self, key: &str) -> Option<Vec<u8>> {
        host::shared_data(key)
    }

    fn set_property(&mut self, path: &str, value: &[u8]) {
        host::set_property(path, value);
    }

    fn set_shared_data(&mut self, key: &str, value: &[u8]) {
        host::set_shared_data(key, value);
    }

    fn log_enabled(&self, level: Level) -> bool {
        log_level(level) >= LOG_LEVEL.load(Ordering::Relaxed)
    }

    fn log(&mut self, level: Level, message: &str) {
        host::log(log_level(level), message);
    }

    fn done(&mut self) {
        host::done();
    }

    fn refresh_log_level(&mut self) {
        // Follows the proxy's level (Envoy's admin API can change it at run time), so that a
        // message it would drop costs nothing.
        if let Some(level) = host::log_level() {
            LOG_LEVEL.store(level, Ordering::Relaxed);
        }
    }
}
