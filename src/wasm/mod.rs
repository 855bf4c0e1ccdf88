//! The proxy-wasm adapter (ABI 0.2.1), built for `wasm32` only: the module's exports, which
//! forward Envoy's callbacks to [`RootFilter`] and [`StreamFilter`], and [`Envoy`], the
//! [`Host`](crate::filter::Host) over the host calls. It decides nothing.
//!
//! Every callback goes to the context whose id Envoy passes (root and stream contexts live in
//! one registry, [`contexts`]); an id the registry does not know is ignored, never a panic.
//! That context is already effective when its callback runs: no `proxy_set_effective_context`
//! before delivering it. The exception is a gRPC reply: Envoy delivers every one to the root
//! context, and the layer hands it to the context that was *effective* when the call was
//! dispatched (the stream for a check; the root for a report, also when a stream's callback
//! dispatched it after `set_effective_context(root)`), making that context effective first
//! when it is a stream.

mod contexts;
mod envoy;
mod hostcalls;
mod pairs;

use crate::filter::{Action, RootFilter, StreamFilter};
use contexts::{with_context, with_root, with_stream, Context};
use envoy::Envoy;
use hostcalls::abi;
use std::alloc::Layout;
use std::ptr::{null_mut, NonNull};

fn action(action: Action) -> u32 {
    match action {
        Action::Continue => abi::ACTION_CONTINUE,
        Action::Pause => abi::ACTION_PAUSE,
        Action::PauseWithWatermark => abi::ACTION_PAUSE_WATERMARK,
    }
}

/// A stream callback's answer: the filter's, or Continue for a context it does not know.
fn stream_action(id: u32, f: impl FnOnce(&mut StreamFilter, &mut Envoy) -> Action) -> u32 {
    action(with_stream(id, |stream| f(stream, &mut Envoy)).unwrap_or(Action::Continue))
}

// --- Module start ------------------------------------------------------------------------

#[cfg(target_os = "wasi")]
extern "C" {
    /// Runs the module's static constructors (synthesized by the linker).
    fn __wasm_call_ctors();
}

/// The WASI reactor's start (Envoy calls it once after instantiation): runs the static
/// constructors, as the Rust SDK's `main!` does for a `cdylib`. The filter has nothing else to
/// set up: contexts are made on `proxy_on_context_create`.
#[no_mangle]
pub extern "C" fn _initialize() {
    #[cfg(target_os = "wasi")]
    // SAFETY: called once, by the host, before any other export: the constructors run once,
    // before anything depends on them.
    unsafe {
        __wasm_call_ctors();
    }
}

/// Declares the ABI version (Envoy reads the export's name).
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory for the host to hand buffers over in (header maps, bodies, properties). The buffer
/// is `size` bytes from the global allocator with `u8`'s layout, which is what
/// `hostcalls::returned_buffer` takes over with `Vec::from_raw_parts`. Null when it cannot be
/// had (the host then fails its call, not the VM).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let Ok(layout) = Layout::array::<u8>(size) else {
        return null_mut();
    };
    if size == 0 {
        // What a `Vec<u8>` of capacity 0 holds.
        return NonNull::<u8>::dangling().as_ptr();
    }
    // SAFETY: the layout's size is not zero.
    unsafe { std::alloc::alloc(layout) }
}

// --- Contexts ----------------------------------------------------------------------------

/// A new context: a root context (`parent_id` 0) or an HTTP stream of root `parent_id`. A
/// stream whose root is unknown is not made (its callbacks are then ignored).
#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_id: u32) {
    if parent_id == 0 {
        // Read once per root context: messages before the first configuration follow it too.
        crate::filter::Host::refresh_log_level(&mut Envoy);
        contexts::insert_root(context_id, RootFilter::new(context_id));
    } else if let Some(stream) = with_root(parent_id, |root| root.new_stream(context_id)) {
        contexts::insert_stream(context_id, parent_id, stream);
    }
}

/// Nothing to do at VM start (the VM configuration is not used).
#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _vm_configuration_size: usize) -> u32 {
    1
}

/// The plugin configuration, accepted (1) or refused (0).
#[no_mangle]
pub extern "C" fn proxy_on_configure(root_id: u32, _configuration_size: usize) -> u32 {
    let accepted = with_root(root_id, |root| root.on_configure(&mut Envoy));
    u32::from(accepted.unwrap_or(false))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    with_root(root_id, |root| root.on_tick(&mut Envoy));
}

/// The context is done as far as the filter is concerned (1), or, for a root context whose
/// leases' commits (and last reports) are on their way, not yet (0): it calls `proxy_done`
/// once they are answered.
#[no_mangle]
pub extern "C" fn proxy_on_done(context_id: u32) -> u32 {
    let done = with_root(context_id, |root| root.on_done(&mut Envoy));
    u32::from(done.unwrap_or(true))
}

/// The context is gone: dropped from the registry.
#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    contexts::remove(context_id);
}

// --- HTTP stream callbacks ----------------------------------------------------------------

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    end_of_stream: u32,
) -> u32 {
    stream_action(context_id, |stream, host| {
        stream.on_request_headers(host, end_of_stream != 0)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_request_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: u32,
) -> u32 {
    stream_action(context_id, |stream, host| {
        stream.on_request_body(host, body_size, end_of_stream != 0)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, _num_trailers: usize) -> u32 {
    stream_action(context_id, |stream, host| stream.on_request_trailers(host))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: u32,
) -> u32 {
    stream_action(context_id, |stream, host| stream.on_response_headers(host))
}

#[no_mangle]
pub extern "C" fn proxy_on_response_body(
    context_id: u32,
    body_size: usize,
    end_of_stream: u32,
) -> u32 {
    stream_action(context_id, |stream, host| {
        stream.on_response_body(host, body_size, end_of_stream != 0)
    })
}

#[no_mangle]
pub extern "C" fn proxy_on_response_trailers(_context_id: u32, _num_trailers: usize) -> u32 {
    abi::ACTION_CONTINUE
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context_id: u32) {
    with_stream(context_id, |stream| stream.on_log(&mut Envoy));
}

// --- gRPC replies -------------------------------------------------------------------------

/// A gRPC reply for `token`: `status` 0 with the reply's `size` bytes in the gRPC receive
/// buffer, or a failure's status with no bytes. Envoy delivers it to the root context (see
/// [`contexts`]); it goes to the context that dispatched the call, made effective first when
/// that is another one (a stream's resume or local reply acts on the effective context). A
/// reply for a stream that is gone goes to the root context, which owns what the stream left
/// behind (a hold granted too late to be used).
fn grpc_reply(context_id: u32, token: u32, status: u32, size: usize) {
    let owner = contexts::reply_owner(context_id, token);
    let target = if owner == context_id
        || (contexts::contains(owner) && hostcalls::set_effective_context(owner))
    {
        owner
    } else {
        context_id
    };
    with_context(target, |context| {
        match context {
            Context::Root(root) => root.on_grpc_reply(&mut Envoy, token, status, size),
            Context::Stream(stream) => stream.on_grpc_reply(&mut Envoy, token, status, size),
        }
        Some(())
    });
}

/// A unary call succeeded: its message is in the gRPC receive buffer.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(context_id: u32, token: u32, size: usize) {
    grpc_reply(context_id, token, 0, size);
}

/// A call failed (or timed out) with gRPC status `status`.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(context_id: u32, token: u32, status: u32) {
    grpc_reply(context_id, token, status, 0);
}

/// Stream metadata: the filter makes unary calls only.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive_initial_metadata(_context_id: u32, _token: u32, _n: u32) {}

/// Stream metadata: the filter makes unary calls only.
#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(_context_id: u32, _token: u32, _n: u32) {}
