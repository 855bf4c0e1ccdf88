//! The host functions: every `proxy_*` import of ABI 0.2.1 that the Rust SDK (proxy-wasm 0.2.5)
//! can make, a few Envoy-only extras, and the WASI preview1 calls a Rust `wasm32-wasip1` module
//! imports. Return codes follow Envoy's implementation (`WasmResult`), since an SDK panics on a
//! status it does not expect.

use crate::abi::{
    decode_pairs, encode_pairs, BufferType, LogLevel, MapType, MetricType, WasmResult,
};
use crate::state::{
    CallState, GrpcCall, HeaderChange, HostState, HttpCall, LocalReply, Metric, SharedQueue,
};
use std::time::Duration;
use wasmtime::{format_err, Caller, Linker};

type C<'a> = Caller<'a, HostState>;

/// A host call's failure: a status for the module, or a trap.
pub(crate) enum E {
    Status(WasmResult),
    Trap(wasmtime::Error),
}

impl From<WasmResult> for E {
    fn from(s: WasmResult) -> E {
        E::Status(s)
    }
}

impl From<wasmtime::Error> for E {
    fn from(e: wasmtime::Error) -> E {
        E::Trap(e)
    }
}

type R = Result<(), E>;

fn finish(r: R) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(WasmResult::Ok as i32),
        Err(E::Status(s)) => Ok(s as i32),
        Err(E::Trap(e)) => Err(e),
    }
}

fn read(c: &C<'_>, ptr: i32, len: i32) -> Result<Vec<u8>, E> {
    let mem = c.data().memory.ok_or(WasmResult::InvalidMemoryAccess)?;
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    let data = mem.data(c);
    let end = p.checked_add(l).ok_or(WasmResult::InvalidMemoryAccess)?;
    Ok(data
        .get(p..end)
        .ok_or(WasmResult::InvalidMemoryAccess)?
        .to_vec())
}

fn read_str(c: &C<'_>, ptr: i32, len: i32) -> Result<String, E> {
    Ok(String::from_utf8_lossy(&read(c, ptr, len)?).into_owned())
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> R {
    let mem = c.data().memory.ok_or(WasmResult::InvalidMemoryAccess)?;
    mem.write(c, ptr as u32 as usize, bytes)
        .map_err(|_| E::Status(WasmResult::InvalidMemoryAccess))
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> R {
    write(c, ptr, &v.to_le_bytes())
}

fn write_u64(c: &mut C<'_>, ptr: i32, v: u64) -> R {
    write(c, ptr, &v.to_le_bytes())
}

/// Copies bytes into memory the module allocates (`proxy_on_memory_allocate`), and writes the
/// pointer and the size where the module asked. The module owns (and frees) that memory.
fn give(c: &mut C<'_>, bytes: &[u8], ptr_ptr: i32, size_ptr: i32) -> R {
    let malloc = c
        .data()
        .malloc
        .clone()
        .ok_or(WasmResult::InvalidMemoryAccess)?;
    let ptr = malloc.call(&mut *c, bytes.len() as i32)?;
    if ptr == 0 {
        return Err(WasmResult::InvalidMemoryAccess.into());
    }
    write(c, ptr, bytes)?;
    write_u32(c, ptr_ptr, ptr as u32)?;
    write_u32(c, size_ptr, bytes.len() as u32)
}

fn emit_log(state: &mut HostState, level: LogLevel, message: String) {
    if state.echo_logs {
        println!("[wasm {level:<5} ctx={}] {message}", state.effective);
    }
    state.logs.push(crate::state::LogEntry {
        level,
        message,
        context_id: state.effective,
    });
}

// ---------------------------------------------------------------------------------------------
// env: logging, time, ticks

fn proxy_log(c: &mut C<'_>, level: i32, ptr: i32, len: i32) -> R {
    let msg = read_str(c, ptr, len)?;
    let level = LogLevel::from_u32(level as u32).ok_or(WasmResult::BadArgument)?;
    emit_log(c.data_mut(), level, msg);
    Ok(())
}

fn proxy_get_log_level(c: &mut C<'_>, ptr: i32) -> R {
    let level = c.data().log_level as u32;
    write_u32(c, ptr, level)
}

fn proxy_get_current_time_nanoseconds(c: &mut C<'_>, ptr: i32) -> R {
    let t = c.data().time_ns;
    write_u64(c, ptr, t)
}

fn proxy_set_tick_period_milliseconds(c: &mut C<'_>, ms: i32) -> R {
    c.data_mut().tick_period_ms = ms as u32;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// env: buffers

fn buffer(state: &mut HostState, t: BufferType) -> Option<&mut Vec<u8>> {
    match t {
        BufferType::HttpRequestBody => state.stream_mut()?.request.body.as_mut(),
        BufferType::HttpResponseBody => state.stream_mut()?.response.body.as_mut(),
        BufferType::GrpcReceiveBuffer => state.scope.grpc_receive.as_mut(),
        BufferType::HttpCallResponseBody => state.scope.http_call_body.as_mut(),
        BufferType::VmConfiguration => state.scope.vm_configuration.as_mut(),
        BufferType::PluginConfiguration => state.scope.plugin_configuration.as_mut(),
        BufferType::DownstreamData | BufferType::UpstreamData | BufferType::CallData => None,
    }
}

fn proxy_get_buffer_bytes(
    c: &mut C<'_>,
    t: i32,
    start: i32,
    max: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> R {
    let t = BufferType::from_u32(t as u32).ok_or(WasmResult::BadArgument)?;
    let (start, max) = (start as u32 as usize, max as u32 as usize);
    let bytes = {
        let buf = buffer(c.data_mut(), t).ok_or(WasmResult::NotFound)?;
        if start >= buf.len() || max == 0 {
            // Envoy copies nothing and answers Ok (the SDK then sees no data).
            return Ok(());
        }
        let end = start.saturating_add(max).min(buf.len());
        buf[start..end].to_vec()
    };
    give(c, &bytes, ptr_ptr, size_ptr)
}

fn proxy_set_buffer_bytes(c: &mut C<'_>, t: i32, start: i32, size: i32, ptr: i32, len: i32) -> R {
    let t = BufferType::from_u32(t as u32).ok_or(WasmResult::BadArgument)?;
    let data = read(c, ptr, len)?;
    let (start, size) = (start as u32 as usize, size as u32 as usize);
    let buf = buffer(c.data_mut(), t).ok_or(WasmResult::NotFound)?;
    // Envoy: start 0 drains `size` bytes and prepends; start at or past the end appends.
    if start == 0 {
        let drain = size.min(buf.len());
        buf.drain(..drain);
        buf.splice(0..0, data);
    } else if start >= buf.len() {
        buf.extend_from_slice(&data);
    } else {
        return Err(WasmResult::BadArgument.into());
    }
    Ok(())
}

fn proxy_get_buffer_status(c: &mut C<'_>, t: i32, len_ptr: i32, flags_ptr: i32) -> R {
    let t = BufferType::from_u32(t as u32).ok_or(WasmResult::BadArgument)?;
    let len = buffer(c.data_mut(), t).ok_or(WasmResult::NotFound)?.len();
    write_u32(c, len_ptr, len as u32)?;
    write_u32(c, flags_ptr, 0)
}

// ---------------------------------------------------------------------------------------------
// env: header maps

fn map_type(t: i32) -> Result<MapType, E> {
    Ok(MapType::from_u32(t as u32).ok_or(WasmResult::BadArgument)?)
}

fn proxy_get_header_map_pairs(c: &mut C<'_>, t: i32, ptr_ptr: i32, size_ptr: i32) -> R {
    let t = map_type(t)?;
    let bytes = encode_pairs(c.data_mut().map(t, false)?);
    give(c, &bytes, ptr_ptr, size_ptr)
}

fn proxy_get_header_map_size(c: &mut C<'_>, t: i32, size_ptr: i32) -> R {
    let t = map_type(t)?;
    let size = encode_pairs(c.data_mut().map(t, false)?).len();
    write_u32(c, size_ptr, size as u32)
}

fn proxy_set_header_map_pairs(c: &mut C<'_>, t: i32, ptr: i32, len: i32) -> R {
    let t = map_type(t)?;
    let bytes = read(c, ptr, len)?;
    let pairs = decode_pairs(&bytes).ok_or(WasmResult::BadArgument)?;
    let pairs: Vec<_> = pairs
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let state = c.data_mut();
    *state.map(t, true)? = pairs.clone();
    state.record_change(HeaderChange::SetAll(t, pairs));
    Ok(())
}

fn proxy_get_header_map_value(
    c: &mut C<'_>,
    t: i32,
    k: i32,
    kl: i32,
    ptr_ptr: i32,
    size_ptr: i32,
) -> R {
    let t = map_type(t)?;
    let key = read_str(c, k, kl)?;
    let value = {
        let map = c.data_mut().map(t, false)?;
        // Envoy returns the first value of a repeated header.
        map.iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&key))
            .map(|(_, v)| v.clone())
            .ok_or(WasmResult::NotFound)?
    };
    give(c, &value, ptr_ptr, size_ptr)
}

fn proxy_replace_header_map_value(c: &mut C<'_>, t: i32, k: i32, kl: i32, v: i32, vl: i32) -> R {
    let t = map_type(t)?;
    let key = read_str(c, k, kl)?.to_ascii_lowercase();
    let value = read(c, v, vl)?;
    let state = c.data_mut();
    let map = state.map(t, true)?;
    match map.iter().position(|(name, _)| *name == key) {
        Some(i) => {
            map[i].1 = value.clone();
            let mut j = i + 1;
            while j < map.len() {
                if map[j].0 == key {
                    map.remove(j);
                } else {
                    j += 1;
                }
            }
        }
        None => map.push((key.clone(), value.clone())),
    }
    state.record_change(HeaderChange::Replace(t, key, value));
    Ok(())
}

fn proxy_add_header_map_value(c: &mut C<'_>, t: i32, k: i32, kl: i32, v: i32, vl: i32) -> R {
    let t = map_type(t)?;
    let key = read_str(c, k, kl)?.to_ascii_lowercase();
    let value = read(c, v, vl)?;
    let state = c.data_mut();
    state.map(t, true)?.push((key.clone(), value.clone()));
    state.record_change(HeaderChange::Add(t, key, value));
    Ok(())
}

fn proxy_remove_header_map_value(c: &mut C<'_>, t: i32, k: i32, kl: i32) -> R {
    let t = map_type(t)?;
    let key = read_str(c, k, kl)?.to_ascii_lowercase();
    let state = c.data_mut();
    state.map(t, true)?.retain(|(name, _)| *name != key);
    state.record_change(HeaderChange::Remove(t, key));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// env: properties

fn proxy_get_property(c: &mut C<'_>, p: i32, pl: i32, ptr_ptr: i32, size_ptr: i32) -> R {
    let path = read(c, p, pl)?;
    let value = c.data().property(&path).ok_or(WasmResult::NotFound)?;
    give(c, &value, ptr_ptr, size_ptr)
}

fn proxy_set_property(c: &mut C<'_>, p: i32, pl: i32, v: i32, vl: i32) -> R {
    let path = read(c, p, pl)?;
    let value = read(c, v, vl)?;
    let state = c.data_mut();
    match state.stream_mut() {
        Some(s) => s.module_properties.insert(path, value),
        None => state.module_properties.insert(path, value),
    };
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// env: shared data and queues

fn proxy_get_shared_data(
    c: &mut C<'_>,
    k: i32,
    kl: i32,
    ptr_ptr: i32,
    size_ptr: i32,
    cas_ptr: i32,
) -> R {
    let key = read_str(c, k, kl)?;
    let entry = {
        let state = c.data();
        let shared = state.shared.lock().unwrap();
        shared.data.get(&(state.vm_id.clone(), key)).cloned()
    };
    let (value, cas) = entry.ok_or(WasmResult::NotFound)?;
    give(c, &value, ptr_ptr, size_ptr)?;
    write_u32(c, cas_ptr, cas)
}

fn proxy_set_shared_data(c: &mut C<'_>, k: i32, kl: i32, v: i32, vl: i32, cas: i32) -> R {
    let key = read_str(c, k, kl)?;
    let value = read(c, v, vl)?;
    let state = c.data();
    let mut shared = state.shared.lock().unwrap();
    let slot = shared
        .data
        .entry((state.vm_id.clone(), key))
        .or_insert((Vec::new(), 0));
    if cas != 0 && cas as u32 != slot.1 {
        return Err(WasmResult::CasMismatch.into());
    }
    slot.0 = value;
    slot.1 = slot.1.wrapping_add(1).max(1);
    Ok(())
}

fn proxy_register_shared_queue(c: &mut C<'_>, n: i32, nl: i32, id_ptr: i32) -> R {
    let name = read_str(c, n, nl)?;
    let id = {
        let state = c.data();
        let root = state
            .contexts
            .get(&state.effective)
            .copied()
            .filter(|r| *r != 0)
            .unwrap_or(state.effective);
        let owner = (state.serial, root);
        let mut shared = state.shared.lock().unwrap();
        match shared
            .queues
            .iter()
            .position(|q| q.vm_id == state.vm_id && q.name == name)
        {
            Some(i) => {
                shared.queues[i].owner = owner;
                i + 1
            }
            None => {
                shared.queues.push(SharedQueue {
                    vm_id: state.vm_id.clone(),
                    name,
                    owner,
                    items: Default::default(),
                    ready: 0,
                });
                shared.queues.len()
            }
        }
    };
    write_u32(c, id_ptr, id as u32)
}

fn proxy_resolve_shared_queue(c: &mut C<'_>, vm: i32, vml: i32, n: i32, nl: i32, id_ptr: i32) -> R {
    let mut vm_id = read_str(c, vm, vml)?;
    let name = read_str(c, n, nl)?;
    if vm_id.is_empty() {
        vm_id = c.data().vm_id.clone();
    }
    let id = {
        let shared = c.data().shared.lock().unwrap();
        shared
            .queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
    };
    let id = id.ok_or(WasmResult::NotFound)?;
    write_u32(c, id_ptr, id as u32 + 1)
}

fn proxy_dequeue_shared_queue(c: &mut C<'_>, id: i32, ptr_ptr: i32, size_ptr: i32) -> R {
    let item = {
        let mut shared = c.data().shared.lock().unwrap();
        let q = shared
            .queues
            .get_mut((id as u32 as usize).wrapping_sub(1))
            .ok_or(WasmResult::NotFound)?;
        q.items.pop_front().ok_or(WasmResult::Empty)?
    };
    give(c, &item, ptr_ptr, size_ptr)
}

fn proxy_enqueue_shared_queue(c: &mut C<'_>, id: i32, v: i32, vl: i32) -> R {
    let value = read(c, v, vl)?;
    let mut shared = c.data().shared.lock().unwrap();
    let q = shared
        .queues
        .get_mut((id as u32 as usize).wrapping_sub(1))
        .ok_or(WasmResult::NotFound)?;
    q.items.push_back(value);
    q.ready += 1;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// env: stream control

fn proxy_continue_stream(c: &mut C<'_>, t: i32) -> R {
    match t {
        0 | 1 => {}
        2 => {}
        3 => return Err(WasmResult::Unimplemented.into()),
        _ => return Err(WasmResult::BadArgument.into()),
    }
    // Envoy answers Ok on a context without a stream (a root context) and does nothing.
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(());
    };
    match t {
        0 | 1 => {
            let side = if t == 0 {
                &mut s.request
            } else {
                &mut s.response
            };
            side.resumed += 1;
            // Envoy continues after the VM call returns; the maps are no longer the filter's.
            side.resume_pending = true;
            side.headers.live = false;
            side.trailers.live = false;
        }
        _ => s.downstream_resumed += 1,
    }
    Ok(())
}

fn proxy_close_stream(c: &mut C<'_>, t: i32) -> R {
    if !(0..=3).contains(&t) {
        return Err(WasmResult::BadArgument.into());
    }
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(());
    };
    match t {
        0 => s.request.reset = true,
        1 => s.response.reset = true,
        _ => {}
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn proxy_send_local_response(
    c: &mut C<'_>,
    status: i32,
    d: i32,
    dl: i32,
    b: i32,
    bl: i32,
    h: i32,
    hl: i32,
    grpc_status: i32,
) -> R {
    let details = read_str(c, d, dl)?;
    let body = read(c, b, bl)?;
    let headers = decode_pairs(&read(c, h, hl)?).ok_or(WasmResult::BadArgument)?;
    let Some(s) = c.data_mut().stream_mut() else {
        return Ok(());
    };
    if s.local_reply.is_some() {
        // Envoy queues it, but a stream answers once: the first reply stands.
        return Ok(());
    }
    s.local_reply = Some(LocalReply {
        status: status as u32,
        details,
        body,
        headers: headers
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect(),
        grpc_status,
    });
    Ok(())
}

fn proxy_set_effective_context(c: &mut C<'_>, id: i32) -> R {
    let state = c.data_mut();
    let id = id as u32;
    let alive =
        state.contexts.contains_key(&id) && state.streams.get(&id).is_none_or(|s| !s.deleted);
    if !alive {
        return Err(WasmResult::BadArgument.into());
    }
    state.effective = id;
    let callback = state.callback_context;
    state.effective_switches.push((callback, id));
    Ok(())
}

fn proxy_done(c: &mut C<'_>) -> R {
    let state = c.data_mut();
    let id = state.effective;
    state.done_calls.push(id);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// env: HTTP and gRPC calls

fn check_upstream(state: &HostState, upstream: &str) -> R {
    if let Some(status) = state.dispatch_failure {
        return Err(status.into());
    }
    if let Some(clusters) = &state.clusters {
        if !clusters.iter().any(|c| c == upstream) {
            // Envoy: an unknown cluster is BadArgument ("should be ClusterNotFound").
            return Err(WasmResult::BadArgument.into());
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn proxy_http_call(
    c: &mut C<'_>,
    u: i32,
    ul: i32,
    h: i32,
    hl: i32,
    b: i32,
    bl: i32,
    t: i32,
    tl: i32,
    timeout: i32,
    token_ptr: i32,
) -> R {
    let upstream = read_str(c, u, ul)?;
    let headers = decode_pairs(&read(c, h, hl)?).ok_or(WasmResult::BadArgument)?;
    let body = read(c, b, bl)?;
    let trailers = decode_pairs(&read(c, t, tl)?).ok_or(WasmResult::BadArgument)?;
    check_upstream(c.data(), &upstream)?;
    for required in [":path", ":method", ":authority"] {
        if !headers.iter().any(|(k, _)| k == required) {
            return Err(WasmResult::BadArgument.into());
        }
    }
    let state = c.data_mut();
    let token = state.next_http_call;
    state.next_http_call += 1;
    let context_id = state.effective;
    let root_context_id = state.root_of(context_id);
    state.http_calls.insert(
        token,
        HttpCall {
            token,
            context_id,
            root_context_id,
            upstream,
            headers,
            body,
            trailers,
            timeout: Duration::from_millis(timeout as u32 as u64),
            state: CallState::Pending,
        },
    );
    write_u32(c, token_ptr, token)
}

#[allow(clippy::too_many_arguments)]
fn proxy_grpc_call(
    c: &mut C<'_>,
    u: i32,
    ul: i32,
    s: i32,
    sl: i32,
    m: i32,
    ml: i32,
    md: i32,
    mdl: i32,
    msg: i32,
    msgl: i32,
    timeout: i32,
    token_ptr: i32,
) -> R {
    let upstream = read_str(c, u, ul)?;
    let service = read_str(c, s, sl)?;
    let method = read_str(c, m, ml)?;
    let initial_metadata = decode_pairs(&read(c, md, mdl)?).ok_or(WasmResult::ParseFailure)?;
    let message = read(c, msg, msgl)?;
    check_upstream(c.data(), &upstream)?;
    let state = c.data_mut();
    let token = state.next_grpc_call;
    state.next_grpc_call += 2; // calls odd, streams even, as in proxy-wasm-cpp-host
                               // Envoy: the call belongs to the root of the effective context, whichever context made it.
    let context_id = state.effective;
    let root_context_id = state.root_of(context_id);
    state.grpc_calls.insert(
        token,
        GrpcCall {
            token,
            context_id,
            root_context_id,
            upstream,
            service,
            method,
            initial_metadata,
            message,
            timeout: Duration::from_millis(timeout as u32 as u64),
            state: CallState::Pending,
            is_stream: false,
            messages: Vec::new(),
            local_closed: false,
        },
    );
    write_u32(c, token_ptr, token)
}

#[allow(clippy::too_many_arguments)]
fn proxy_grpc_stream(
    c: &mut C<'_>,
    u: i32,
    ul: i32,
    s: i32,
    sl: i32,
    m: i32,
    ml: i32,
    md: i32,
    mdl: i32,
    token_ptr: i32,
) -> R {
    let upstream = read_str(c, u, ul)?;
    let service = read_str(c, s, sl)?;
    let method = read_str(c, m, ml)?;
    let initial_metadata = decode_pairs(&read(c, md, mdl)?).ok_or(WasmResult::ParseFailure)?;
    check_upstream(c.data(), &upstream)?;
    let state = c.data_mut();
    let token = state.next_grpc_stream;
    state.next_grpc_stream += 2;
    // Envoy: the call belongs to the root of the effective context, whichever context made it.
    let context_id = state.effective;
    let root_context_id = state.root_of(context_id);
    state.grpc_calls.insert(
        token,
        GrpcCall {
            token,
            context_id,
            root_context_id,
            upstream,
            service,
            method,
            initial_metadata,
            message: Vec::new(),
            timeout: Duration::ZERO,
            state: CallState::Pending,
            is_stream: true,
            messages: Vec::new(),
            local_closed: false,
        },
    );
    write_u32(c, token_ptr, token)
}

fn proxy_grpc_send(c: &mut C<'_>, token: i32, msg: i32, ml: i32, end: i32) -> R {
    let message = read(c, msg, ml)?;
    let call = c
        .data_mut()
        .grpc_calls
        .get_mut(&(token as u32))
        .ok_or(WasmResult::NotFound)?;
    if !call.is_stream || call.state != CallState::Pending {
        return Err(WasmResult::NotFound.into());
    }
    if call.local_closed {
        return Err(WasmResult::BadArgument.into());
    }
    call.message.extend_from_slice(&message);
    call.messages.push(message);
    if end != 0 {
        call.local_closed = true;
    }
    Ok(())
}

fn proxy_grpc_cancel(c: &mut C<'_>, token: i32) -> R {
    let call = c
        .data_mut()
        .grpc_calls
        .get_mut(&(token as u32))
        .ok_or(WasmResult::NotFound)?;
    if call.state != CallState::Pending {
        return Err(WasmResult::NotFound.into());
    }
    call.state = CallState::CancelledByModule;
    Ok(())
}

fn proxy_grpc_close(c: &mut C<'_>, token: i32) -> R {
    let call = c
        .data_mut()
        .grpc_calls
        .get_mut(&(token as u32))
        .ok_or(WasmResult::NotFound)?;
    if call.state != CallState::Pending {
        return Err(WasmResult::NotFound.into());
    }
    if call.is_stream {
        call.local_closed = true;
    } else {
        // Envoy: closing a unary call cancels it.
        call.state = CallState::CancelledByModule;
    }
    Ok(())
}

fn proxy_get_status(c: &mut C<'_>, code_ptr: i32, ptr_ptr: i32, size_ptr: i32) -> R {
    let (code, message) = c.data().status.clone();
    write_u32(c, code_ptr, code)?;
    if message.is_empty() {
        write_u32(c, ptr_ptr, 0)?;
        write_u32(c, size_ptr, 0)
    } else {
        give(c, message.as_bytes(), ptr_ptr, size_ptr)
    }
}

fn proxy_call_foreign_function(
    c: &mut C<'_>,
    n: i32,
    nl: i32,
    _a: i32,
    _al: i32,
    _rp: i32,
    _rs: i32,
) -> R {
    let name = read_str(c, n, nl)?;
    emit_log(
        c.data_mut(),
        LogLevel::Debug,
        format!("(host) proxy_call_foreign_function({name}): no foreign functions in this host"),
    );
    Err(WasmResult::NotFound.into())
}

// ---------------------------------------------------------------------------------------------
// env: metrics

fn proxy_define_metric(c: &mut C<'_>, t: i32, n: i32, nl: i32, id_ptr: i32) -> R {
    let kind = MetricType::from_u32(t as u32).ok_or(WasmResult::BadArgument)?;
    let name = read_str(c, n, nl)?;
    let state = c.data_mut();
    let id = match state.metric_ids.get(&(name.clone(), t as u32)) {
        Some(id) => *id,
        None => {
            state.metrics.push(Metric {
                name: name.clone(),
                kind,
                value: 0,
                recorded: Vec::new(),
            });
            let id = state.metrics.len() as u32;
            state.metric_ids.insert((name, t as u32), id);
            id
        }
    };
    write_u32(c, id_ptr, id)
}

fn metric(state: &mut HostState, id: i32) -> Result<&mut Metric, E> {
    Ok(state
        .metrics
        .get_mut((id as u32 as usize).wrapping_sub(1))
        .ok_or(WasmResult::NotFound)?)
}

fn proxy_increment_metric(c: &mut C<'_>, id: i32, offset: i64) -> R {
    let m = metric(c.data_mut(), id)?;
    match m.kind {
        // Envoy: a counter only grows; an offset of 0 or less is BadArgument.
        MetricType::Counter if offset > 0 => m.value = m.value.saturating_add(offset as u64),
        MetricType::Counter => return Err(WasmResult::BadArgument.into()),
        MetricType::Gauge if offset > 0 => m.value = m.value.saturating_add(offset as u64),
        MetricType::Gauge => m.value = m.value.saturating_sub(offset.unsigned_abs()),
        MetricType::Histogram => return Err(WasmResult::BadArgument.into()),
    }
    Ok(())
}

fn proxy_record_metric(c: &mut C<'_>, id: i32, value: i64) -> R {
    let m = metric(c.data_mut(), id)?;
    let value = value as u64;
    match m.kind {
        MetricType::Counter => m.value = m.value.saturating_add(value),
        MetricType::Gauge => m.value = value,
        MetricType::Histogram => m.recorded.push(value),
    }
    Ok(())
}

fn proxy_get_metric(c: &mut C<'_>, id: i32, ptr: i32) -> R {
    let m = metric(c.data_mut(), id)?;
    if m.kind == MetricType::Histogram {
        return Err(WasmResult::BadArgument.into());
    }
    let v = m.value;
    write_u64(c, ptr, v)
}

// ---------------------------------------------------------------------------------------------
// wasi_snapshot_preview1: the minimum a Rust wasm32-wasip1 reactor imports.

const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: i32 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const ERRNO_NOSYS: i32 = 52;
const ERRNO_SPIPE: i32 = 70;

fn errno(r: R) -> wasmtime::Result<i32> {
    match r {
        Ok(()) => Ok(ERRNO_SUCCESS),
        Err(E::Status(_)) => Ok(ERRNO_FAULT),
        Err(E::Trap(e)) => Err(e),
    }
}

fn fd_write(
    c: &mut C<'_>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    nwritten: i32,
) -> wasmtime::Result<i32> {
    if fd != 1 && fd != 2 {
        return Ok(ERRNO_BADF);
    }
    let mut out = Vec::new();
    let r = (|| -> R {
        for i in 0..iovs_len {
            let iov = read(c, iovs + i * 8, 8)?;
            let ptr = u32::from_le_bytes(iov[0..4].try_into().unwrap());
            let len = u32::from_le_bytes(iov[4..8].try_into().unwrap());
            out.extend_from_slice(&read(c, ptr as i32, len as i32)?);
        }
        Ok(())
    })();
    if let Err(e) = r {
        return errno(Err(e));
    }
    let state = c.data_mut();
    if state.echo_logs {
        let text = String::from_utf8_lossy(&out);
        if fd == 1 {
            print!("[wasm stdout] {text}");
        } else {
            print!("[wasm stderr] {text}");
        }
    }
    if fd == 1 {
        state.stdout.extend_from_slice(&out);
    } else {
        state.stderr.extend_from_slice(&out);
    }
    errno(write_u32(c, nwritten, out.len() as u32))
}

fn random_get(c: &mut C<'_>, buf: i32, len: i32) -> wasmtime::Result<i32> {
    let mut bytes = Vec::with_capacity(len as u32 as usize);
    while bytes.len() < len as u32 as usize {
        let r = c.data_mut().next_random();
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    bytes.truncate(len as u32 as usize);
    errno(write(c, buf, &bytes))
}

fn clock_time_get(c: &mut C<'_>, id: i32, _precision: i64, out: i32) -> wasmtime::Result<i32> {
    let t = match id {
        0 => c.data().time_ns,
        1..=3 => c.data().monotonic_ns,
        _ => return Ok(ERRNO_INVAL),
    };
    errno(write_u64(c, out, t))
}

fn fd_fdstat_get(c: &mut C<'_>, fd: i32, out: i32) -> wasmtime::Result<i32> {
    if !(0..=2).contains(&fd) {
        return Ok(ERRNO_BADF);
    }
    let mut stat = [0u8; 24];
    stat[0] = 2; // character device
    stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    errno(write(c, out, &stat))
}

/// Adds every host function to the linker.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    macro_rules! env {
        ($name:ident ( $($a:ident : $t:ty),* )) => {
            linker.func_wrap("env", stringify!($name), |mut c: C<'_>, $($a: $t),*| finish($name(&mut c, $($a),*)))?;
        };
    }
    env!(proxy_log(level: i32, ptr: i32, len: i32));
    env!(proxy_get_log_level(ptr: i32));
    env!(proxy_get_current_time_nanoseconds(ptr: i32));
    env!(proxy_set_tick_period_milliseconds(ms: i32));
    env!(proxy_get_buffer_bytes(t: i32, start: i32, max: i32, pp: i32, sp: i32));
    env!(proxy_set_buffer_bytes(t: i32, start: i32, size: i32, p: i32, l: i32));
    env!(proxy_get_buffer_status(t: i32, lp: i32, fp: i32));
    env!(proxy_get_header_map_pairs(t: i32, pp: i32, sp: i32));
    env!(proxy_get_header_map_size(t: i32, sp: i32));
    env!(proxy_set_header_map_pairs(t: i32, p: i32, l: i32));
    env!(proxy_get_header_map_value(t: i32, k: i32, kl: i32, pp: i32, sp: i32));
    env!(proxy_replace_header_map_value(t: i32, k: i32, kl: i32, v: i32, vl: i32));
    env!(proxy_add_header_map_value(t: i32, k: i32, kl: i32, v: i32, vl: i32));
    env!(proxy_remove_header_map_value(t: i32, k: i32, kl: i32));
    env!(proxy_get_property(p: i32, pl: i32, pp: i32, sp: i32));
    env!(proxy_set_property(p: i32, pl: i32, v: i32, vl: i32));
    env!(proxy_get_shared_data(k: i32, kl: i32, pp: i32, sp: i32, cp: i32));
    env!(proxy_set_shared_data(k: i32, kl: i32, v: i32, vl: i32, cas: i32));
    env!(proxy_register_shared_queue(n: i32, nl: i32, ip: i32));
    env!(proxy_resolve_shared_queue(vm: i32, vml: i32, n: i32, nl: i32, ip: i32));
    env!(proxy_dequeue_shared_queue(id: i32, pp: i32, sp: i32));
    env!(proxy_enqueue_shared_queue(id: i32, v: i32, vl: i32));
    env!(proxy_continue_stream(t: i32));
    env!(proxy_close_stream(t: i32));
    env!(proxy_send_local_response(status: i32, d: i32, dl: i32, b: i32, bl: i32, h: i32, hl: i32, g: i32));
    env!(proxy_set_effective_context(id: i32));
    env!(proxy_done());
    env!(proxy_http_call(u: i32, ul: i32, h: i32, hl: i32, b: i32, bl: i32, t: i32, tl: i32, timeout: i32, tp: i32));
    env!(proxy_grpc_call(u: i32, ul: i32, s: i32, sl: i32, m: i32, ml: i32, md: i32, mdl: i32, msg: i32, msgl: i32, timeout: i32, tp: i32));
    env!(proxy_grpc_stream(u: i32, ul: i32, s: i32, sl: i32, m: i32, ml: i32, md: i32, mdl: i32, tp: i32));
    env!(proxy_grpc_send(token: i32, msg: i32, ml: i32, end: i32));
    env!(proxy_grpc_cancel(token: i32));
    env!(proxy_grpc_close(token: i32));
    env!(proxy_get_status(cp: i32, pp: i32, sp: i32));
    env!(proxy_call_foreign_function(n: i32, nl: i32, a: i32, al: i32, rp: i32, rs: i32));
    env!(proxy_define_metric(t: i32, n: i32, nl: i32, ip: i32));
    env!(proxy_increment_metric(id: i32, offset: i64));
    env!(proxy_record_metric(id: i32, value: i64));
    env!(proxy_get_metric(id: i32, ptr: i32));
    // ABI 0.1.0 names Envoy still provides.
    linker.func_wrap("env", "proxy_continue_request", |mut c: C<'_>| {
        finish(proxy_continue_stream(&mut c, 0))
    })?;
    linker.func_wrap("env", "proxy_continue_response", |mut c: C<'_>| {
        finish(proxy_continue_stream(&mut c, 1))
    })?;
    linker.func_wrap("env", "proxy_clear_route_cache", |_c: C<'_>| Ok(0i32))?;

    const WASI: &str = "wasi_snapshot_preview1";
    linker.func_wrap(
        WASI,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, out: i32| fd_write(&mut c, fd, iovs, n, out),
    )?;
    linker.func_wrap(WASI, "random_get", |mut c: C<'_>, buf: i32, len: i32| {
        random_get(&mut c, buf, len)
    })?;
    linker.func_wrap(
        WASI,
        "clock_time_get",
        |mut c: C<'_>, id: i32, p: i64, out: i32| clock_time_get(&mut c, id, p, out),
    )?;
    linker.func_wrap(WASI, "clock_res_get", |mut c: C<'_>, _id: i32, out: i32| {
        errno(write_u64(&mut c, out, 1))
    })?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        linker.func_wrap(WASI, name, |mut c: C<'_>, count: i32, size: i32| {
            errno(write_u32(&mut c, count, 0).and_then(|_| write_u32(&mut c, size, 0)))
        })?;
    }
    for name in ["environ_get", "args_get"] {
        linker.func_wrap(WASI, name, |_c: C<'_>, _a: i32, _b: i32| Ok(ERRNO_SUCCESS))?;
    }
    linker.func_wrap(
        WASI,
        "proc_exit",
        |mut c: C<'_>, code: i32| -> wasmtime::Result<()> {
            c.data_mut().exit_code = Some(code);
            Err(format_err!("the module called proc_exit({code})"))
        },
    )?;
    linker.func_wrap(WASI, "fd_fdstat_get", |mut c: C<'_>, fd: i32, out: i32| {
        fd_fdstat_get(&mut c, fd, out)
    })?;
    linker.func_wrap(WASI, "fd_close", |_c: C<'_>, fd: i32| {
        Ok(if (0..=2).contains(&fd) { 0 } else { ERRNO_BADF })
    })?;
    linker.func_wrap(WASI, "fd_prestat_get", |_c: C<'_>, _fd: i32, _out: i32| {
        Ok(ERRNO_BADF)
    })?;
    linker.func_wrap(
        WASI,
        "fd_prestat_dir_name",
        |_c: C<'_>, _fd: i32, _p: i32, _l: i32| Ok(ERRNO_BADF),
    )?;
    linker.func_wrap(
        WASI,
        "fd_seek",
        |_c: C<'_>, _fd: i32, _o: i64, _w: i32, _out: i32| Ok(ERRNO_SPIPE),
    )?;
    linker.func_wrap(
        WASI,
        "fd_read",
        |mut c: C<'_>, fd: i32, _iovs: i32, _n: i32, out: i32| {
            if fd != 0 {
                return Ok(ERRNO_BADF);
            }
            errno(write_u32(&mut c, out, 0))
        },
    )?;
    linker.func_wrap(WASI, "sched_yield", |_c: C<'_>| Ok(ERRNO_SUCCESS))?;
    linker.func_wrap(
        WASI,
        "poll_oneoff",
        |_c: C<'_>, _i: i32, _o: i32, _n: i32, _r: i32| Ok(ERRNO_NOSYS),
    )?;
    Ok(())
}
