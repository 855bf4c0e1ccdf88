//! The proxy-wasm ABI 0.2.1 host calls the filter makes, and safe wrappers over them.
//!
//! Only the imports [`Host`](crate::filter::Host) needs are declared. Every status and enum
//! crosses the boundary as a plain `u32` (an unexpected value from the host is never undefined
//! behaviour), and every wrapper maps every status to an answer: no panic. Buffers the host
//! returns were allocated through our `proxy_on_memory_allocate`; the wrappers take them over.

use super::pairs::{encode_pairs, encode_path};
use std::ptr::{null, null_mut};

/// ABI 0.2.1 constants (as proxy-wasm-cpp-host and the Rust SDK's `types.rs` define them).
pub(crate) mod abi {
    /// `WasmResult::Ok`.
    pub const OK: u32 = 0;

    /// `MapType::HttpRequestHeaders`.
    pub const MAP_REQUEST_HEADERS: u32 = 0;
    /// `MapType::HttpResponseHeaders`.
    pub const MAP_RESPONSE_HEADERS: u32 = 2;

    /// `BufferType::HttpRequestBody`.
    pub const BUFFER_REQUEST_BODY: u32 = 0;
    /// `BufferType::HttpResponseBody`.
    pub const BUFFER_RESPONSE_BODY: u32 = 1;
    /// `BufferType::GrpcReceiveBuffer`.
    pub const BUFFER_GRPC_RECEIVE: u32 = 5;
    /// `BufferType::PluginConfiguration`.
    pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

    /// `StreamType::HttpRequest` (`proxy_continue_stream`).
    pub const STREAM_REQUEST: u32 = 0;

    /// `MetricType::Counter`.
    pub const METRIC_COUNTER: u32 = 0;

    /// `FilterHeadersStatus` / `FilterDataStatus` `Continue`.
    pub const ACTION_CONTINUE: u32 = 0;
    /// `StopIteration` (headers) / `StopIterationAndBuffer` (body).
    pub const ACTION_PAUSE: u32 = 1;
    /// `FilterDataStatus::StopIterationAndWatermark` (body callbacks only).
    pub const ACTION_PAUSE_WATERMARK: u32 = 2;

    /// `LogLevel::Trace` .. `LogLevel::Error`; `Critical` is 5.
    pub const LOG_TRACE: u32 = 0;
    pub const LOG_DEBUG: u32 = 1;
    pub const LOG_INFO: u32 = 2;
    pub const LOG_WARN: u32 = 3;
    pub const LOG_ERROR: u32 = 4;

    /// The name of a `WasmResult`, for messages.
    pub fn status_name(status: u32) -> &'static str {
        match status {
            0 => "Ok",
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            5 => "BadExpression",
            6 => "InvalidMemoryAccess",
            7 => "Empty",
            8 => "CasMismatch",
            9 => "ResultMismatch",
            10 => "InternalFailure",
            11 => "BrokenConnection",
            12 => "Unimplemented",
            _ => "unknown status",
        }
    }
}

use abi::OK;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_set_buffer_bytes(
        buffer_type: u32,
        start: usize,
        size: usize,
        buffer_data: *const u8,
        buffer_size: usize,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_cancel(token: u32) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_done() -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
}

/// Calls a host function that returns a buffer through two out-pointers, and takes the buffer
/// over. `Ok(None)`: OK without data (a null pointer); `Err(status)`: any other status (nothing
/// was handed over).
fn returned_buffer(
    call: impl FnOnce(*mut *mut u8, *mut usize) -> u32,
) -> Result<Option<Vec<u8>>, u32> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let status = call(&mut data, &mut size);
    if status != OK {
        return Err(status);
    }
    if data.is_null() {
        return Ok(None);
    }
    // SAFETY: on OK the host wrote a buffer of `size` bytes it obtained from our
    // `proxy_on_memory_allocate(size)` (the global allocator, `u8`'s layout, capacity `size`),
    // filled it, and handed it over: nobody else owns it. That is what
    // `Vec::from_raw_parts(_, size, size)` requires.
    Ok(Some(unsafe { Vec::from_raw_parts(data, size, size) }))
}

/// `proxy_log`; a refusal is ignored.
pub(crate) fn log(level: u32, message: &str) {
    // SAFETY: the message is a live slice for the duration of the call, which only reads it.
    unsafe { proxy_log(level, message.as_ptr(), message.len()) };
}

/// `proxy_get_log_level`.
pub(crate) fn log_level() -> Option<u32> {
    let mut level = 0u32;
    // SAFETY: the host writes one `u32` through a pointer to a local.
    let status = unsafe { proxy_get_log_level(&mut level) };
    (status == OK).then_some(level)
}

/// `proxy_get_current_time_nanoseconds`.
pub(crate) fn current_time_nanos() -> Option<u64> {
    let mut nanos = 0u64;
    // SAFETY: the host writes one `u64` through a pointer to a local.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    (status == OK).then_some(nanos)
}

/// `proxy_set_tick_period_milliseconds`; a refusal is ignored.
pub(crate) fn set_tick_period_ms(period: u32) {
    // SAFETY: no memory crosses the boundary.
    unsafe { proxy_set_tick_period_milliseconds(period) };
}

/// `proxy_get_property`: the value at the NUL-joined `path`; `None` when absent, empty or
/// refused.
pub(crate) fn property(path: &[&str]) -> Option<Vec<u8>> {
    let path = encode_path(path);
    returned_buffer(|data, size| {
        // SAFETY: the path is a live slice the host only reads; `data`/`size` point to locals
        // of `returned_buffer`, written once by the host.
        unsafe { proxy_get_property(path.as_ptr(), path.len(), data, size) }
    })
    .ok()
    .flatten()
}

/// `proxy_set_property` of the one-segment `path`; a refusal is ignored.
pub(crate) fn set_property(path: &str, value: &[u8]) {
    // SAFETY: path and value are live slices the host only reads.
    unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) };
}

/// `proxy_get_shared_data`: the value of `key` in the data the VMs of one plugin share (every
/// worker's); `None` when absent or refused.
pub(crate) fn shared_data(key: &str) -> Option<Vec<u8>> {
    let mut cas = 0u32;
    returned_buffer(|data, size| {
        // SAFETY: the key is a live slice the host only reads; `data`/`size` point to locals
        // of `returned_buffer` and `cas` to a local here, each written once by the host.
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas) }
    })
    .ok()
    .flatten()
}

/// `proxy_set_shared_data` without a compare-and-swap (cas 0); a refusal is ignored.
pub(crate) fn set_shared_data(key: &str, value: &[u8]) {
    // SAFETY: key and value are live slices the host only reads.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), 0) };
}

/// `proxy_get_header_map_pairs`, as the encoded map (see [`super::pairs::decode_pairs`]);
/// `None` when refused.
pub(crate) fn header_map(map: u32) -> Option<Vec<u8>> {
    returned_buffer(|data, size| {
        // SAFETY: `data`/`size` point to locals of `returned_buffer`, written once by the host.
        unsafe { proxy_get_header_map_pairs(map, data, size) }
    })
    .map(Option::unwrap_or_default)
    .ok()
}

/// `proxy_get_header_map_value`: `None` when the header is absent or the map refused; an OK
/// without data is an empty value.
pub(crate) fn header(map: u32, name: &str) -> Option<Vec<u8>> {
    returned_buffer(|data, size| {
        // SAFETY: the name is a live slice the host only reads; `data`/`size` point to locals
        // of `returned_buffer`, written once by the host.
        unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), data, size) }
    })
    .ok()
    .map(Option::unwrap_or_default)
}

/// `proxy_replace_header_map_value`; a refusal is ignored.
pub(crate) fn replace_header(map: u32, name: &str, value: &str) {
    // SAFETY: name and value are live slices the host only reads.
    unsafe {
        proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    };
}

/// `proxy_remove_header_map_value`; a refusal is ignored.
pub(crate) fn remove_header(map: u32, name: &str) {
    // SAFETY: the name is a live slice the host only reads.
    unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) };
}

/// `proxy_add_header_map_value`; a refusal is ignored.
pub(crate) fn add_header(map: u32, name: &str, value: &str) {
    // SAFETY: name and value are live slices the host only reads.
    unsafe {
        proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    };
}

/// `proxy_get_buffer_bytes`: up to `max_size` bytes from `start`; `None` when the buffer is
/// absent, empty there, or refused.
pub(crate) fn buffer(buffer: u32, start: usize, max_size: usize) -> Option<Vec<u8>> {
    returned_buffer(|data, size| {
        // SAFETY: `data`/`size` point to locals of `returned_buffer`, written once by the host.
        unsafe { proxy_get_buffer_bytes(buffer, start, max_size, data, size) }
    })
    .ok()
    .flatten()
}

/// `proxy_set_buffer_bytes`; a refusal is ignored.
pub(crate) fn set_buffer(buffer: u32, start: usize, size: usize, bytes: &[u8]) {
    // SAFETY: the bytes are a live slice the host only reads.
    unsafe { proxy_set_buffer_bytes(buffer, start, size, bytes.as_ptr(), bytes.len()) };
}

/// `proxy_grpc_call` without initial metadata: the call's token, or the host's status.
pub(crate) fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32, u32> {
    // An empty map, encoded (as the SDK sends it).
    let metadata = encode_pairs(std::iter::empty());
    let mut token = 0u32;
    // SAFETY: every pointer is a live slice the host only reads, and `token` a local the host
    // writes once.
    let status = unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    };
    if status == OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// `proxy_grpc_cancel`; an unknown token is ignored.
pub(crate) fn grpc_cancel(token: u32) {
    // SAFETY: no memory crosses the boundary.
    unsafe { proxy_grpc_cancel(token) };
}

/// `proxy_send_local_response` (an HTTP reply: no gRPC status, no details); a refusal is
/// ignored.
pub(crate) fn send_local_response(status: u32, headers: &[u8], body: &[u8]) {
    // SAFETY: headers and body are live slices the host only reads; the details are absent
    // (null, 0).
    unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    };
}

/// `proxy_continue_stream`; a refusal is ignored.
pub(crate) fn continue_stream(stream: u32) {
    // SAFETY: no memory crosses the boundary.
    unsafe { proxy_continue_stream(stream) };
}

/// `proxy_set_effective_context`: `false` when the host refuses (the context is gone).
pub(crate) fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: no memory crosses the boundary.
    unsafe { proxy_set_effective_context(context_id) == OK }
}

/// The root context has finished its shutdown work (`proxy_done`).
pub(crate) fn done() {
    // SAFETY: no arguments; the status is not actionable.
    let _ = unsafe { proxy_done() };
}

/// `proxy_define_metric`: the metric's id.
pub(crate) fn define_metric(metric_type: u32, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: the name is a live slice the host only reads; `id` a local it writes once.
    let status = unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

/// `proxy_increment_metric`; a refusal is ignored.
pub(crate) fn increment_metric(id: u32, offset: i64) {
    // SAFETY: no memory crosses the boundary.
    unsafe { proxy_increment_metric(id, offset) };
}
