//! The proxy-wasm adapter (ABI 0.2.1), built for `wasm32` only: the module's exports, which
//! forward Envoy's callbacks to [`RootFilter`] and [`StreamFilter`], and [`Envoy`], the
//! [`Host`](crate::filter::Host) over the host calls. It decides nothing.
//!
//! Every callback goes to the context whose id Envoy passes: root and stream contexts live in
//! one registry, keyed by that id. A gRPC reply therefore reaches the context the call belongs
//! to (the *effective* context when it was dispatched, which may be the root context while a
//! stream's callback runs), not the one that happened to be running. An id the registry does
//! not know is ignored, never a panic. The context is already effective when its callback
//! runs (Envoy makes it so): no `proxy_set_effective_context` before delivering.

mod envoy;
mod hostcalls;
mod pairs;

use crate::filter::{Action, RootFilter, StreamFilter};
use envoy::Envoy;
use hostcalls::abi;
use std::alloc::Layout;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ptr::{null_mut, NonNull};
use std::rc::Rc;

/// One context of the VM.
// Each context has its own allocation (the registry's `Rc`) and root contexts are one per
// plugin: a small root in a stream-sized slot costs less than boxing every stream.
#[allow(clippy::large_enum_variant)]
enum Context {
    /// A plugin's root context (`proxy_on_context_create(id, 0)`).
    Root(RootFilter),
    /// An HTTP stream, created by its root context.
    Stream(StreamFilter),
}

thread_local! {
    /// Every live context by id. A context sits behind its own `Rc<RefCell<_>>` so that the
    /// registry is not borrowed while a callback runs: a callback may lead the host into
    /// another context's callback (or delete a context) without touching a borrowed cell.
    static CONTEXTS: RefCell<BTreeMap<u32, Rc<RefCell<Context>>>> =
        const { RefCell::new(BTreeMap::new()) };
}

/// The context `id`, if the registry knows it.
fn lookup(id: u32) -> Option<Rc<RefCell<Context>>> {
    CONTEXTS
        .try_with(|contexts| contexts.try_borrow().ok()?.get(&id).cloned())
        .ok()
        .flatten()
}

/// Runs `f` on context `id`; `None` when it is unknown, or busy (a callback of that same
/// context is running further up the stack).
fn with_context<R>(id: u32, f: impl FnOnce(&mut Context) -> Option<R>) -> Option<R> {
    let cell = lookup(id)?;
    let mut context = cell.try_borrow_mut().ok()?;
    f(&mut context)
}

fn with_root<R>(id: u32, f: impl FnOnce(&mut RootFilter) -> R) -> Option<R> {
    with_context(id, |context| match context {
        Context::Root(root) => Some(f(root)),
        Context::Stream(_) => None,
    })
}

fn with_stream<R>(id: u32, f: impl FnOnce(&mut StreamFilter) -> R) -> Option<R> {
    with_context(id, |context| match context {
        Context::Stream(stream) => Some(f(stream)),
        Context::Root(_) => None,
    })
}

fn action(action: Action) -> u32 {
    match action {
        Action::Continue => abi::ACTION_CONTINUE,
        Action::Pause => abi::ACTION_PAUSE,
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
    let context = if parent_id == 0 {
        // Read once per root context: messages before the first configuration follow it too.
        crate::filter::Host::refresh_log_level(&mut Envoy);
        Context::Root(RootFilter::new(context_id))
    } else {
        match with_root(parent_id, |root| root.new_stream(context_id)) {
            Some(stream) => Context::Stream(stream),
            None => return,
        }
    };
    let _ = CONTEXTS.try_with(|contexts| {
        if let Ok(mut contexts) = contexts.try_borrow_mut() {
            contexts.insert(context_id, Rc::new(RefCell::new(context)));
        }
    });
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

/// The context is done as far as the filter is concerned (1): nothing is left to finish.
#[no_mangle]
pub extern "C" fn proxy_on_done(_context_id: u32) -> u32 {
    1
}

/// The context is gone: dropped from the registry.
#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    // The context is dropped after the registry's borrow ends (a drop touches no host).
    let removed = CONTEXTS
        .try_with(|contexts| {
            contexts
                .try_borrow_mut()
                .ok()
                .and_then(|mut contexts| contexts.remove(&context_id))
        })
        .ok()
        .flatten();
    drop(removed);
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
pub extern "C" fn proxy_on_request_trailers(_context_id: u32, _num_trailers: usize) -> u32 {
    abi::ACTION_CONTINUE
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

/// A gRPC reply for `token`, to the context that owns the call: `status` 0 with the reply's
/// `size` bytes in the gRPC receive buffer, or a failure's status with no bytes.
fn grpc_reply(context_id: u32, token: u32, status: u32, size: usize) {
    with_context(context_id, |context| {
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
