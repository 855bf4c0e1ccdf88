//! token-ratelimit: a proxy-wasm HTTP filter that rate-limits LLM API traffic by the tokens it
//! consumes.
//!
//! The crate is a pure core that compiles and is tested natively ([`config`], [`policy`],
//! [`attributes`], [`usage`], [`request_body`], [`flow`], [`reports`], [`limits`]) under a thin
//! proxy-wasm layer (`host`, built for `wasm32` only) that moves bytes between Envoy and the core.

pub mod attributes;
pub mod config;
pub mod flow;
pub mod limits;
pub mod policy;
pub mod reports;
pub mod request_body;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod host;
