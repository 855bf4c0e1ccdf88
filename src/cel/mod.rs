//! The filter's CEL layer over `cel-parser` and `cel-interpreter`, used when the policy is
//! compiled: [`guards`] refuses or rewrites, at configure time, the expressions that would
//! otherwise crash the wasm VM or read the request body unguarded; [`checked`] rewrites the
//! arithmetic and indexing operators into functions that fail instead of panicking or
//! wrapping; [`functions`] builds the root context with the functions expressions may call;
//! [`vocabulary`] refuses unknown identifiers and functions and a result of the wrong type.

pub(crate) mod checked;
pub(crate) mod functions;
pub(crate) mod guards;
pub(crate) mod vocabulary;
