//! The VM's contexts by id, the effective context, and who owns each gRPC call.
//!
//! Envoy (proxy-wasm-cpp-host) attributes every gRPC call to the *root* of the effective
//! context (`grpc_call` acts on `contextOrEffectiveContext()->root_context()`), so it answers
//! every call with `proxy_on_grpc_receive(<root id>, token, ..)` and a root context's token
//! counter, while the reply is, for the filter, the business of the context that dispatched
//! it: the stream for a check, the root for a report, or the root for a call a stream
//! dispatched after `set_effective_context(root)`. The layer therefore records the effective
//! context of each dispatch, by (root, token), and hands the reply to it.

// Compiled natively too, for its tests (src/lib.rs), where the exports that use it are not.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use crate::filter::{RootFilter, StreamFilter};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

/// One context of the VM.
// Each context has its own allocation (the registry's `Rc`) and root contexts are one per
// plugin: a small root in a stream-sized slot costs less than boxing every stream.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Context {
    /// A plugin's root context (`proxy_on_context_create(id, 0)`).
    Root(RootFilter),
    /// An HTTP stream, created by its root context.
    Stream(StreamFilter),
}

struct Entry {
    /// The root context's id (its own for a root context).
    root: u32,
    /// Behind its own cell, so that the registry is never borrowed while a callback runs: a
    /// callback may lead the host into another context's callback, or delete a context.
    context: Rc<RefCell<Context>>,
}

struct State {
    contexts: BTreeMap<u32, Entry>,
    /// The pending gRPC calls: (root id, token, the context that dispatched it). A few per
    /// stream in flight at most: a vector is small and quick enough.
    calls: Vec<(u32, u32, u32)>,
}

thread_local! {
    static STATE: RefCell<State> = const {
        RefCell::new(State { contexts: BTreeMap::new(), calls: Vec::new() })
    };
    /// The context host calls act on: the one whose callback runs, or the one named by the
    /// last successful `proxy_set_effective_context`.
    static EFFECTIVE: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` on the registry's state; `None` in the (impossible) case that it is in use.
fn state<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    STATE
        .try_with(|state| state.try_borrow_mut().ok().map(|mut s| f(&mut s)))
        .ok()
        .flatten()
}

/// The context the host calls act on now.
pub(crate) fn effective() -> u32 {
    EFFECTIVE.try_with(Cell::get).unwrap_or(0)
}

/// The host made `id` the effective context.
pub(crate) fn set_effective(id: u32) {
    let _ = EFFECTIVE.try_with(|e| e.set(id));
}

/// Restores the effective context of the callback further up the stack when dropped.
pub(crate) struct Scope(u32);

impl Drop for Scope {
    fn drop(&mut self) {
        set_effective(self.0);
    }
}

/// A callback of context `id` starts: the host made it effective.
fn enter(id: u32) -> Scope {
    let outer = effective();
    set_effective(id);
    Scope(outer)
}

/// Adds a root context.
pub(crate) fn insert_root(id: u32, root: RootFilter) {
    insert(id, id, Context::Root(root));
}

/// Adds stream `id` of root context `root`.
pub(crate) fn insert_stream(id: u32, root: u32, stream: StreamFilter) {
    insert(id, root, Context::Stream(stream));
}

fn insert(id: u32, root: u32, context: Context) {
    let context = Rc::new(RefCell::new(context));
    // A context the id named before (the host reuses none) is dropped once the registry is no
    // longer borrowed.
    let replaced = state(|s| s.contexts.insert(id, Entry { root, context }));
    drop(replaced);
}

/// Drops context `id` (a root context's pending calls with it: the host cancels them).
pub(crate) fn remove(id: u32) {
    // Dropped once the registry is no longer borrowed.
    let removed = state(|s| {
        let entry = s.contexts.remove(&id);
        if entry.as_ref().is_some_and(|e| e.root == id) {
            s.calls.retain(|&(root, _, _)| root != id);
        }
        entry
    });
    drop(removed);
}

/// Whether the registry knows context `id`.
pub(crate) fn contains(id: u32) -> bool {
    state(|s| s.contexts.contains_key(&id)).unwrap_or(false)
}

/// The root context of context `id` (itself for a root, or an id the registry does not know).
fn root_of(state: &State, id: u32) -> u32 {
    state.contexts.get(&id).map_or(id, |e| e.root)
}

/// Removes the pending call `token` of root context `root`; the context that dispatched it.
fn take_call(state: &mut State, root: u32, token: u32) -> Option<u32> {
    let at = state
        .calls
        .iter()
        .position(|&(r, t, _)| r == root && t == token)?;
    Some(state.calls.swap_remove(at).2)
}

/// The effective context dispatched the gRPC call `token`.
pub(crate) fn dispatched(token: u32) {
    let owner = effective();
    state(|s| {
        let root = root_of(s, owner);
        take_call(s, root, token);
        s.calls.push((root, token, owner));
    });
}

/// The effective context cancelled the gRPC call `token`: no reply comes.
pub(crate) fn cancelled(token: u32) {
    let context = effective();
    state(|s| {
        let root = root_of(s, context);
        take_call(s, root, token);
    });
}

/// The context the reply to `token`, delivered to context `id`, belongs to: the one that
/// dispatched the call, else `id` itself. The call is no longer pending.
pub(crate) fn reply_owner(id: u32, token: u32) -> u32 {
    state(|s| {
        let root = root_of(s, id);
        take_call(s, root, token)
    })
    .flatten()
    .unwrap_or(id)
}

/// Runs `f` on context `id` as the effective context; `None` when the registry does not know
/// it, or when it is busy (a callback of that same context is running further up the stack).
pub(crate) fn with_context<R>(id: u32, f: impl FnOnce(&mut Context) -> Option<R>) -> Option<R> {
    let cell = state(|s| s.contexts.get(&id).map(|e| e.context.clone())).flatten()?;
    let mut context = cell.try_borrow_mut().ok()?;
    let _scope = enter(id);
    f(&mut context)
}

/// [`with_context`] for a root context.
pub(crate) fn with_root<R>(id: u32, f: impl FnOnce(&mut RootFilter) -> R) -> Option<R> {
    with_context(id, |context| match context {
        Context::Root(root) => Some(f(root)),
        Context::Stream(_) => None,
    })
}

/// [`with_context`] for a stream.
pub(crate) fn with_stream<R>(id: u32, f: impl FnOnce(&mut StreamFilter) -> R) -> Option<R> {
    with_context(id, |context| match context {
        Context::Stream(stream) => Some(f(stream)),
        Context::Root(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root `root` and its stream `stream`, in a fresh registry (tests run on their own
    /// threads: each has its own thread-local state).
    fn root_and_stream(root: u32, stream: u32) {
        let root_filter = RootFilter::new(root);
        insert_stream(stream, root, root_filter.new_stream(stream));
        insert_root(root, root_filter);
    }

    fn is_stream(id: u32) -> bool {
        with_stream(id, |_| ()).is_some()
    }

    #[test]
    fn a_check_dispatched_by_a_stream_is_answered_to_the_stream() {
        root_and_stream(1, 2);
        with_stream(2, |_| dispatched(5));
        // Envoy delivers it to the root context; the harness to the stream.
        assert_eq!(reply_owner(1, 5), 2);
        with_stream(2, |_| dispatched(7));
        assert_eq!(reply_owner(2, 7), 2);
        // Answered once.
        assert_eq!(reply_owner(1, 5), 1);
    }

    #[test]
    fn a_call_dispatched_by_a_stream_for_its_root_is_answered_to_the_root() {
        root_and_stream(1, 2);
        with_stream(2, |_| {
            set_effective(1);
            dispatched(9);
            set_effective(2);
            dispatched(11);
        });
        // The stream is gone before the replies.
        remove(2);
        assert_eq!(reply_owner(1, 9), 1);
        assert_eq!(
            reply_owner(1, 11),
            2,
            "the stream's: dropped, as it is gone"
        );
        assert!(!contains(2));
    }

    #[test]
    fn the_effective_context_is_the_callbacks_and_comes_back_after_a_nested_one() {
        root_and_stream(1, 2);
        assert_eq!(effective(), 0);
        with_root(1, |_| {
            assert_eq!(effective(), 1);
            with_stream(2, |_| assert_eq!(effective(), 2));
            assert_eq!(effective(), 1);
        });
        assert_eq!(effective(), 0);
    }

    #[test]
    fn tokens_of_two_roots_do_not_mix() {
        root_and_stream(1, 2);
        root_and_stream(10, 20);
        with_stream(2, |_| dispatched(5));
        with_stream(20, |_| dispatched(5));
        assert_eq!(reply_owner(10, 5), 20);
        assert_eq!(reply_owner(1, 5), 2);
    }

    #[test]
    fn a_cancelled_call_and_a_deleted_roots_calls_are_forgotten() {
        root_and_stream(1, 2);
        with_stream(2, |_| {
            dispatched(5);
            cancelled(5);
        });
        assert_eq!(reply_owner(1, 5), 1, "unknown: to the context Envoy names");
        with_stream(2, |_| dispatched(7));
        remove(1);
        assert_eq!(reply_owner(1, 7), 1);
    }

    #[test]
    fn unknown_and_busy_contexts_are_ignored() {
        root_and_stream(1, 2);
        assert!(is_stream(2));
        assert!(!is_stream(1), "a root is not a stream");
        assert!(with_root(3, |_| ()).is_none());
        // A callback of a context whose callback is running further up the stack.
        with_stream(2, |_| assert!(!is_stream(2)));
        remove(2);
        assert!(!is_stream(2));
        remove(2);
    }
}
