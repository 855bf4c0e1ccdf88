//! The official `openai` Python SDK against the stack (installed from PyPI into `.venv` on
//! first use, see [`e2e::python_with_openai`]): a streamed chat completion read with the naive
//! loop `chunk.choices[0].delta.content` runs through, although the filter added
//! `stream_options.include_usage` to the request (it withholds the usage chunk the client did not
//! ask for, and charges the tokens it reports); a client that asks for usage gets its usage
//! chunk; a chat completion that is not streamed works too. Each time, the tokens charged equal
//! the tokens the simulator served.

use e2e::{run_python, Options, Stack};

const GOLD: &str = "iamagolduser";

fn base_url(stack: &Stack) -> String {
    format!("http://127.0.0.1:{}/v1", stack.ports.listener)
}

/// Runs `scenario` of `openai_sdk.py`; returns what the SDK saw, after checking that the
/// tokens charged for it equal the tokens served.
fn sdk(stack: &Stack, scenario: &str) -> serde_json::Value {
    let served_before = stack.served_tokens(GOLD);
    let charged_before = stack.reported_tokens();
    let seen = run_python("openai_sdk.py", &[&base_url(stack), GOLD, scenario]);
    let served = stack.served_tokens(GOLD) - served_before;
    assert!(served > 0, "{scenario}: the simulator served tokens");
    let charged = stack.await_reported(charged_before + served) - charged_before;
    assert_eq!(
        charged, served,
        "{scenario}: charged what was served ({seen})"
    );
    seen
}

#[test]
fn the_naive_stream_loop_runs_and_the_injected_usage_is_charged() {
    let stack = Stack::start(Options::default());
    let seen = sdk(&stack, "naive");
    assert!(seen["chunks"].as_u64().unwrap_or(0) > 0, "{seen}");
    assert!(!seen["text"].as_str().unwrap_or("").is_empty(), "{seen}");
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.usage_requested"),
        1
    );
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.usage_missing"),
        0
    );
}

#[test]
fn a_client_that_asks_for_usage_gets_its_usage_chunk() {
    let stack = Stack::start(Options::default());
    let seen = sdk(&stack, "include_usage");
    assert_eq!(seen["usage_chunks"], 1, "{seen}");
    let usage = &seen["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap_or(0)
                + usage["completion_tokens"].as_u64().unwrap_or(0)
        ),
        "{seen}"
    );
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.usage_requested"),
        0
    );
}

#[test]
fn a_chat_completion_not_streamed_works() {
    let stack = Stack::start(Options::default());
    let seen = sdk(&stack, "plain");
    assert!(
        seen["usage"]["total_tokens"].as_u64().unwrap_or(0) > 0,
        "{seen}"
    );
}
