//! No silent bypass, in a real Envoy: the shipped policy covers every model endpoint, a
//! Kuadrant policy pasted as it is either limits or is refused at configure time, and a limit
//! that cannot be evaluated for a request refuses it (`onError: deny`) unless told to skip.

use e2e::{bin, repo_root, Options, Reply, Stack};
use serde_json::{json, Value};
use std::process::Command;

const FREE: &str = "iamafreeuser";
const GOLD: &str = "iamagolduser";

/// The free tier's group predicate as shipped in envoy/envoy.yaml.
const FREE_GROUP: &str =
    r#"- predicate: auth.identity.groups.split(",").exists(g, g == "free")"#;

/// A filter metric as Envoy exports it.
fn metric(stack: &Stack, name: &str) -> u64 {
    stack.envoy_stat(&format!("wasmcustom.token_ratelimit.{name}"))
}

/// Spends the free user's 50 tokens on chat completions (22 a request) until refused. In
/// checkReport mode that is 0, 22, 44 admitted and 66 spent: every later request of the user
/// is refused, whatever it would cost. (Reservation mode refuses only what does not fit in
/// the 6 tokens left: a small embedding still would.)
fn spend_free_budget(stack: &Stack) {
    for _ in 0..5 {
        let r = stack.chat(FREE, 2, 20);
        if r.status == 429 {
            return;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        stack.await_reported(stack.served_tokens(FREE) + stack.served_tokens(GOLD));
    }
    panic!("the free user was never limited");
}

fn check_report() -> Options {
    Options {
        mode: Some("checkReport"),
        ..Options::default()
    }
}

/// One request per model endpoint the simulator serves, each with a small answer.
fn endpoint_requests() -> Vec<(&'static str, Value)> {
    vec![
        (
            "/v1/completions",
            json!({"model": "sim", "prompt": "a b", "max_tokens": 4}),
        ),
        ("/v1/embeddings", json!({"model": "sim", "input": "a b"})),
        (
            "/v1/responses",
            json!({"model": "sim", "input": "a b", "max_output_tokens": 4}),
        ),
        (
            "/v1/messages",
            json!({"model": "sim", "max_tokens": 4, "messages": [{"role": "user", "content": "a b"}]}),
        ),
        (
            "/v1beta/models/sim:generateContent",
            json!({"contents": [{"parts": [{"text": "a b"}]}], "generationConfig": {"maxOutputTokens": 4}}),
        ),
        (
            "/v1beta/models/sim:streamGenerateContent?alt=sse",
            json!({"contents": [{"parts": [{"text": "a b"}]}], "generationConfig": {"maxOutputTokens": 4}}),
        ),
    ]
}

fn assert_limited(r: &Reply, what: &str) {
    assert_eq!(r.status, 429, "{what}: {}", r.body);
    assert!(r.body.contains("'free'"), "{what}: {}", r.body);
}

#[test]
fn a_spent_free_user_is_refused_on_every_model_endpoint_and_gold_is_served() {
    let stack = Stack::start(check_report());
    spend_free_budget(&stack);
    let upstream = stack.upstream_requests();
    for (path, body) in endpoint_requests() {
        assert_limited(&stack.post(path, Some(FREE), &body), path);
        assert_eq!(stack.upstream_requests(), upstream, "{path} reached the upstream");
    }
    for (path, body) in endpoint_requests() {
        let r = stack.post(path, Some(GOLD), &body);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    // Gold's requests were charged: each endpoint's usage reached its counter.
    assert!(stack.await_reported(stack.served_tokens(GOLD) + stack.served_tokens(FREE)) > 0);
    let gold = stack.counter_of("user-2").expect("gold's counter");
    assert_eq!(gold.value, stack.served_tokens(GOLD));
}

#[test]
fn kuadrants_announcement_predicate_pasted_as_is_limits_free_and_not_gold() {
    // Kuadrant's TokenRateLimitPolicy announcement selects the free tier so, through
    // `request.auth` and the annotations of the identity Authorino writes for an API key.
    let announcement = r#"- predicate: request.auth.identity.metadata.annotations["kuadrant.io/groups"].split(",").exists(g, g == "free")"#;
    let stack = Stack::start(Options {
        edits: vec![(FREE_GROUP.into(), announcement.into())],
        ..Options::default()
    });
    spend_free_budget(&stack);
    for _ in 0..4 {
        assert_eq!(stack.chat(GOLD, 2, 20).status, 200);
    }
    assert_eq!(metric(&stack, "expression_errors"), 0);
}

/// Runs the `token-ratelimit` command.
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("token-ratelimit"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run token-ratelimit");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// envoy/envoy.yaml's `limits:` block (the tutorial's tiers), to be replaced.
fn shipped_limits_block() -> String {
    let text = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml")).expect("envoy.yaml");
    let start = text.find("                    limits:\n").expect("limits:");
    let end = text
        .find("          - name: envoy.filters.http.router")
        .expect("router");
    text[start..end].to_string()
}

#[test]
fn the_tutorial_tiers_as_a_token_rate_limit_policy_limit_free_and_not_gold_in_envoy() {
    let (ok, json, stderr) = cli(&[
        "json",
        "--cluster",
        "ratelimit",
        "--domain",
        "llm",
        "docs/examples/token-ratelimit-policy.yaml",
    ]);
    assert!(ok, "{stderr}");
    let cfg: Value = serde_json::from_str(&json).expect("plugin configuration JSON");
    // The policy's limits in place of the shipped ones (JSON is YAML).
    let limits = format!("                    limits: {}\n", cfg["limits"]);
    let stack = Stack::start(Options {
        edits: vec![(shipped_limits_block(), limits)],
        ..check_report()
    });
    spend_free_budget(&stack);
    let (path, body) = &endpoint_requests()[2];
    assert_limited(&stack.post(path, Some(FREE), body), path);
    for _ in 0..4 {
        assert_eq!(stack.chat(GOLD, 2, 20).status, 200);
    }
}

#[test]
fn policies_that_could_not_apply_are_refused_with_what_to_write_instead() {
    // Each pasted in place of the free tier's group predicate: the file is refused by the
    // command and by Envoy, never accepted to limit nothing.
    let cases = [
        (
            r#"- predicate: request.auth.identity.groups.exists(g, g == "free") && request.user_agent != """#,
            "`request.user_agent` is not an Envoy attribute",
        ),
        (
            r#"- predicate: source.ip != """#,
            "the fields of `source` are: address, port",
        ),
        (
            r#"- predicate: destination.adress != """#,
            "`destination.adress` is not an Envoy attribute",
        ),
        (
            r#"- predicate: connection.tls != """#,
            "`connection.tls` is not an Envoy attribute",
        ),
        (
            r#"- predicate: upstream.address != """#,
            "only known once the upstream is picked",
        ),
        (
            r#"- predicate: xds.route != """#,
            "`xds.route` is not an Envoy attribute",
        ),
        (
            r#"- predicate: metadata.identity.groups == "free""#,
            "dynamic metadata is read by namespace",
        ),
        (
            r#"- predicate: filter_state.a.b == "free""#,
            "filter state object is read as a whole",
        ),
        (
            r#"- predicate: identity.groups == "free""#,
            "`auth.identity`",
        ),
        (
            r#"- predicate: auth.identity.groups.lower() == "free""#,
            "write `lowerAscii`",
        ),
        (r#"- predicate: auth.identity.groups"#, "unchanged"),
        (
            r#"- predicate: request.url_path"#,
            "a predicate must be a bool",
        ),
    ];
    let shipped = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml")).expect("envoy.yaml");
    let dir = tempfile::tempdir().expect("temp dir");
    for (predicate, says) in cases {
        let file = dir.path().join("envoy.yaml");
        std::fs::write(&file, shipped.replacen(FREE_GROUP, predicate, 1)).expect("write");
        let (ok, _, stderr) = cli(&["validate", file.to_str().expect("path")]);
        if says == "unchanged" {
            // A string where a bool belongs is only known at run time: accepted, and
            // refused per request (onError deny), see the test below.
            assert!(ok, "{predicate}: {stderr}");
            continue;
        }
        assert!(!ok, "{predicate} passed validation");
        assert!(stderr.contains(says), "{predicate}: {stderr}");
        assert!(stderr.contains("limits.free.when[1].predicate"), "{predicate}: {stderr}");
    }
    // Envoy refuses such a configuration too, naming the field and the reason.
    let (mut envoy, _dir) = Stack::envoy_only(Options {
        edits: vec![(FREE_GROUP.into(), cases[0].0.into())],
        ..Options::default()
    });
    let log = envoy.output();
    assert!(
        envoy.exited().is_some_and(|code| code != 0),
        "envoy accepted a configuration that reads `request.user_agent`:\n{log}"
    );
    assert!(
        log.contains("`request.user_agent` is not an Envoy attribute"),
        "{log}"
    );
}

#[test]
fn a_missing_identity_field_refuses_with_on_error_deny_and_skips_with_on_error_skip() {
    // The demo identity has no `tier`: the free tier's predicate cannot be evaluated.
    let tier = r#"- predicate: auth.identity.tier == "free""#;
    let stack = Stack::start(Options {
        edits: vec![(FREE_GROUP.into(), tier.into())],
        ..Options::default()
    });
    let upstream = stack.upstream_requests();
    let r = stack.chat(FREE, 2, 20);
    assert_eq!(r.status, 403, "{}", r.body);
    let error = &r.json()["error"];
    assert_eq!(error["code"], "rate_limit_policy_error");
    assert_eq!(error["type"], "permission_error");
    assert!(error["message"].as_str().unwrap_or("").contains("`free`"), "{error}");
    assert_eq!(stack.upstream_requests(), upstream, "the upstream was called");
    assert_eq!(metric(&stack, "requests_refused_on_error.free"), 1);
    assert_eq!(metric(&stack, "expression_errors.free"), 1);
    // A limit that cannot be evaluated refuses every request it is evaluated for: gold users
    // too, as long as the free tier's predicate fails for them.
    assert_eq!(stack.chat(GOLD, 2, 20).status, 403);
    assert!(stack.envoy_log_count("onError deny: the request is refused") >= 1);

    // onError: skip keeps the old behaviour: the limit does not apply.
    let skip = format!("{tier}\n                        onError: skip");
    let stack = Stack::start(Options {
        edits: vec![(FREE_GROUP.into(), skip)],
        ..Options::default()
    });
    for _ in 0..4 {
        let r = stack.chat(FREE, 2, 20);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(stack.counter_of("user-1").is_none(), "a skipped limit counted");
    assert_eq!(metric(&stack, "expression_errors.free"), 4);
    assert_eq!(metric(&stack, "requests_refused_on_error"), 0);
    assert_eq!(stack.chat(GOLD, 2, 20).status, 200);
}
