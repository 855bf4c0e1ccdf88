//! The CEL functions the filter adds to the standard ones, and the root context that holds
//! them.

use super::checked::{
    cel_add, cel_div, cel_index, cel_mod, cel_mul, cel_neg, cel_sub, CHECKED_ADD, CHECKED_DIV,
    CHECKED_INDEX, CHECKED_MOD, CHECKED_MUL, CHECKED_NEG, CHECKED_SUB,
};
use cel_interpreter::extractors::This;
use cel_interpreter::{Context, Value};
use std::sync::Arc;

/// The shared CEL context: the standard functions plus the string extensions Kuadrant's
/// policies use (`split`, `lowerAscii`, `upperAscii`, `trim`, `replace`, `join`), and the
/// checked arithmetic and indexing functions that the rewritten expressions call (see
/// [`super::checked::checked_arithmetic`]). It holds no variables.
pub(crate) fn root_context() -> Context<'static> {
    let mut ctx = Context::default();
    ctx.add_function("split", cel_split);
    ctx.add_function("lowerAscii", cel_lower_ascii);
    ctx.add_function("upperAscii", cel_upper_ascii);
    ctx.add_function("trim", cel_trim);
    ctx.add_function("replace", cel_replace);
    ctx.add_function("join", cel_join);
    ctx.add_function(CHECKED_ADD, cel_add);
    ctx.add_function(CHECKED_SUB, cel_sub);
    ctx.add_function(CHECKED_MUL, cel_mul);
    ctx.add_function(CHECKED_DIV, cel_div);
    ctx.add_function(CHECKED_MOD, cel_mod);
    ctx.add_function(CHECKED_NEG, cel_neg);
    ctx.add_function(CHECKED_INDEX, cel_index);
    ctx
}

/// `s.split(sep)`: the list of the parts of `s` between occurrences of `sep`.
fn cel_split(This(this): This<Arc<String>>, sep: Arc<String>) -> cel_interpreter::ResolveResult {
    Ok(Value::List(Arc::new(
        this.split(sep.as_str())
            .map(|s| Value::String(Arc::new(s.to_string())))
            .collect(),
    )))
}

/// `s.lowerAscii()`: `s` with ASCII letters lowercased (other characters unchanged).
fn cel_lower_ascii(This(this): This<Arc<String>>) -> String {
    this.to_ascii_lowercase()
}

/// `s.upperAscii()`: `s` with ASCII letters uppercased (other characters unchanged).
fn cel_upper_ascii(This(this): This<Arc<String>>) -> String {
    this.to_ascii_uppercase()
}

/// `s.trim()`: `s` without leading and trailing (Unicode) whitespace.
fn cel_trim(This(this): This<Arc<String>>) -> String {
    this.trim().to_string()
}

/// `s.replace(from, to)`: `s` with every occurrence of `from` replaced by `to`.
fn cel_replace(This(this): This<Arc<String>>, from: Arc<String>, to: Arc<String>) -> String {
    this.replace(from.as_str(), to.as_str())
}

/// `list.join(sep)`: the items joined by `sep`; a string item as is, any other in its debug
/// form.
fn cel_join(This(this): This<Arc<Vec<Value>>>, sep: Arc<String>) -> String {
    let parts: Vec<String> = this
        .iter()
        .map(|v| match v {
            Value::String(s) => s.as_ref().clone(),
            other => format!("{other:?}"),
        })
        .collect();
    parts.join(sep.as_str())
}
