//! The filter's life, free of proxy-wasm: the [`Host`] trait names every interaction with the
//! proxy, [`RootFilter`] is the per-VM life (configuration, reports, metrics, stuck bodies) and
//! [`StreamFilter`] one request's life. The proxy-wasm adapter only forwards callbacks to these
//! and implements [`Host`] over host calls; native tests drive them through [`MockHost`].

mod host;
pub mod metrics;
#[cfg(any(test, feature = "test-util"))]
pub mod mock;
pub mod root;
mod spent;
pub mod stream;

pub(crate) use host::host_log;
pub use host::{Action, Buffer, GrpcCall, HeaderMap, Host, Level, LocalReply};
#[cfg(any(test, feature = "test-util"))]
pub use mock::MockHost;
pub use root::RootFilter;
pub use stream::StreamFilter;

#[cfg(test)]
mod tests;
