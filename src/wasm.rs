//! The proxy-wasm adapter, built for `wasm32` only: forwards Envoy's callbacks to
//! [`RootFilter`] and [`StreamFilter`] and implements [`Host`] over proxy-wasm host calls
//! (ABI 0.2.1, through the `proxy-wasm` crate). It decides nothing.

use crate::filter::{
    Action, Buffer, GrpcCall, HeaderMap, Host, Level, LocalReply, RootFilter, StreamFilter,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{self, BufferType, ContextType, LogLevel, MapType, MetricType};
use std::time::{Duration, SystemTime};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(Root(RootFilter::new(context_id)))
    });
}}

/// [`Host`] over proxy-wasm host calls on the effective context. A host status other than OK
/// reads as absent (reads) or is ignored (writes).
struct Envoy;

fn map_type(map: HeaderMap) -> MapType {
    match map {
        HeaderMap::RequestHeaders => MapType::HttpRequestHeaders,
        HeaderMap::ResponseHeaders => MapType::HttpResponseHeaders,
    }
}

fn buffer_type(buffer: Buffer) -> BufferType {
    match buffer {
        Buffer::RequestBody => BufferType::HttpRequestBody,
        Buffer::ResponseBody => BufferType::HttpResponseBody,
        Buffer::GrpcReply => BufferType::GrpcReceiveBuffer,
        Buffer::PluginConfiguration => BufferType::PluginConfiguration,
    }
}

fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Trace => LogLevel::Trace,
        Level::Debug => LogLevel::Debug,
        Level::Info => LogLevel::Info,
        Level::Warn => LogLevel::Warn,
        Level::Error => LogLevel::Error,
    }
}

fn log_filter(level: Level) -> log::LevelFilter {
    match level {
        Level::Trace => log::LevelFilter::Trace,
        Level::Debug => log::LevelFilter::Debug,
        Level::Info => log::LevelFilter::Info,
        Level::Warn => log::LevelFilter::Warn,
        Level::Error => log::LevelFilter::Error,
    }
}

impl Host for Envoy {
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn headers(&mut self, map: HeaderMap) -> Vec<(String, Vec<u8>)> {
        hostcalls::get_map_bytes(map_type(map)).unwrap_or_default()
    }

    fn header(&mut self, map: HeaderMap, name: &str) -> Option<Vec<u8>> {
        hostcalls::get_map_value_bytes(map_type(map), name)
            .ok()
            .flatten()
    }

    fn set_header(&mut self, map: HeaderMap, name: &str, value: Option<&str>) {
        let _ = hostcalls::set_map_value(map_type(map), name, value);
    }

    fn add_header(&mut self, map: HeaderMap, name: &str, value: &str) {
        let _ = hostcalls::add_map_value(map_type(map), name, value);
    }

    fn buffer(&mut self, buffer: Buffer, start: usize, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(buffer_type(buffer), start, size)
            .ok()
            .flatten()
    }

    fn set_buffer(&mut self, buffer: Buffer, start: usize, size: usize, bytes: &[u8]) {
        let _ = hostcalls::set_buffer(buffer_type(buffer), start, size, bytes);
    }

    fn dispatch_grpc(&mut self, call: &GrpcCall<'_>) -> Result<u32, String> {
        hostcalls::dispatch_grpc_call(
            call.cluster,
            call.service,
            call.method,
            Vec::new(),
            Some(call.message),
            call.timeout,
        )
        .map_err(|status| format!("{status:?}"))
    }

    fn cancel_grpc(&mut self, token: u32) {
        let _ = hostcalls::cancel_grpc_call(token);
    }

    fn send_reply(&mut self, reply: &LocalReply) {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _ = hostcalls::send_http_response(reply.status, headers, Some(&reply.body));
    }

    fn resume_request(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn set_effective_context(&mut self, context_id: u32) -> bool {
        hostcalls::set_effective_context(context_id).is_ok()
    }

    fn set_tick_period(&mut self, period: Duration) {
        let _ = hostcalls::set_tick_period(period);
    }

    fn define_counter(&mut self, name: &str) -> Option<u32> {
        hostcalls::define_metric(MetricType::Counter, name).ok()
    }

    fn add_to_counter(&mut self, id: u32, n: u64) {
        let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn now(&mut self) -> SystemTime {
        hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn log_enabled(&self, level: Level) -> bool {
        log_filter(level) <= log::max_level()
    }

    fn log(&mut self, level: Level, message: &str) {
        let _ = hostcalls::log(log_level(level), message);
    }

    fn refresh_log_level(&mut self) {
        // Follows Envoy's log level, so that a message Envoy would drop costs nothing.
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
    }
}

fn action(a: Action) -> types::Action {
    match a {
        Action::Continue => types::Action::Continue,
        Action::Pause => types::Action::Pause,
    }
}

struct Root(RootFilter);

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.0
            .on_grpc_reply(&mut Envoy, token_id, status_code, response_size);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.0.on_configure(&mut Envoy)
    }

    fn on_tick(&mut self) {
        self.0.on_tick(&mut Envoy);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http(self.0.new_stream(context_id))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http(StreamFilter);

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        self.0
            .on_grpc_reply(&mut Envoy, token_id, status_code, response_size);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(
        &mut self,
        _num_headers: usize,
        end_of_stream: bool,
    ) -> types::Action {
        action(self.0.on_request_headers(&mut Envoy, end_of_stream))
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        action(self.0.on_request_body(&mut Envoy, body_size, end_of_stream))
    }

    fn on_http_response_headers(
        &mut self,
        _num_headers: usize,
        _end_of_stream: bool,
    ) -> types::Action {
        action(self.0.on_response_headers(&mut Envoy))
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> types::Action {
        action(
            self.0
                .on_response_body(&mut Envoy, body_size, end_of_stream),
        )
    }

    fn on_log(&mut self) {
        self.0.on_log(&mut Envoy);
    }
}
