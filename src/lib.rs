//! token-ratelimit: a proxy-wasm HTTP filter that rate-limits LLM API traffic by the tokens it
//! consumes.
//!
//! The crate is a pure core that compiles and is tested natively under a thin proxy-wasm
//! adapter (`wasm`, built for `wasm32` only) that moves bytes between Envoy and the core:
//! - [`filter`]: the [`filter::Host`] trait (every interaction with the proxy) and the life of
//!   the root context and of each stream;
//! - [`config`], [`policy`]: the plugin configuration and the compiled policy (CEL predicates
//!   and counters, descriptors);
//! - [`attributes`]: Envoy's attribute vocabulary and encodings;
//! - [`usage`]: where each provider reports usage, JSON and SSE, compressed or not;
//! - [`request_body`]: the request-body rewrite (`stream_options.include_usage`);
//! - [`estimate`]: what a request declares about its size (for reservations);
//! - [`flow`]: one request's pure state machine; [`reports`]: the report and commit queues;
//! - [`headers`]: the rate-limit headers of responses, per `rateLimitHeaders`;
//! - [`limits`]: the Limitador limits generated from a policy.

pub mod attributes;
mod cel;
pub mod config;
pub mod cost;
pub mod estimate;
pub mod filter;
pub mod flow;
pub mod headers;
pub mod lease;
pub mod limits;
pub mod policy;
pub mod record;
pub mod reports;
pub mod reservation;
pub mod request_body;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod wasm;
/// The adapter's context registry and gRPC call routing, tested natively.
#[cfg(all(test, not(target_arch = "wasm32")))]
#[path = "wasm/contexts.rs"]
mod wasm_contexts;
/// The proxy-wasm encodings of the adapter, tested natively.
#[cfg(all(test, not(target_arch = "wasm32")))]
#[path = "wasm/pairs.rs"]
mod wasm_pairs;
