//! The wasm module as an OCI image (work in progress).
