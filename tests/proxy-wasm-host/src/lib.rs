//! A proxy-wasm host for tests: loads a real proxy-wasm module (ABI 0.2.1, e.g. built with the
//! Rust `proxy-wasm` SDK for `wasm32-wasip1`) into [wasmtime] and plays Envoy's part, so a test
//! drives whole requests through the real artifact in milliseconds, deterministically.
//!
//! See `README.md` in this crate for the full guide. In short:
//!
//! ```no_run
//! use proxy_wasm_host::{Action, Host};
//!
//! let host = Host::load("target/wasm32-wasip1/release/my_filter.wasm").unwrap();
//! let plugin = host.plugin(br#"{"some": "config"}"#).expect("configuration accepted");
//!
//! let stream = plugin.http_stream();
//! stream.set_property(&["metadata"], b"...");                // a serialized envoy.config.core.v3.Metadata
//! let action = stream.request_headers(&[(":method", "POST"), (":path", "/v1/chat/completions")], false);
//! assert_eq!(action, Action::Pause);
//!
//! let call = &plugin.pending_grpc_calls()[0];
//! // let request: MyRequest = call.decode();
//! plugin.reply_grpc(call.token, b"...");              // or fail_grpc / timeout_grpc
//! assert_eq!(stream.request_resumed(), 1);
//!
//! stream.response_headers(&[(":status", "200")], false);
//! stream.response_body(br#"{"usage": {}}"#, true);
//! stream.finish();                                     // on_log, on_done, on_delete
//! plugin.tick();
//! assert_eq!(plugin.metric("my_filter.requests"), Some(1));
//! ```
//!
//! A trap in the module (a Rust panic traps on wasm32) makes the plain methods panic with the
//! panic message; every driving method has a `try_` twin returning `Result<_, Trap>`.

mod abi;
mod host;
mod imports;
mod state;

pub use abi::{
    decode_pairs, encode_pairs, grpc_status, Action, BufferType, LogLevel, MapType, MetricType,
    Pairs, WasmResult,
};
pub use host::{Host, LoadError, Plugin, PluginBuilder, Refused, Stage, Stream, Trap};
pub use state::{CallState, GrpcCall, HeaderChange, HttpCall, LocalReply, LogEntry, Metric};
