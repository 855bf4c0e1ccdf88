//! Identity from real auth filters in a real Envoy: the claims `envoy.filters.http.jwt_authn`
//! verified (the shipped example `envoy/jwt-authn.yaml`), and the identity an ext_authz server
//! answered over gRPC (`tests/e2e/config/ext-authz-grpc.yaml` with the test server of
//! `e2e::authz`, answering as Authorino does). Both leave a google.protobuf.Struct in dynamic
//! metadata, which the filter reads typed: lists, maps, numbers and bools as such.
//!
//! The budgets run in the shipped admission mode (`auto`, reserving against ratelimit-service)
//! unless a test says otherwise: a chat request of two words and `max_tokens: 20` reserves 22
//! tokens (a token per word of up to 5 characters, + 20) and is served 22, so a budget of 50
//! admits two (0 + 22 and 22 + 22 fit, 44 + 22 does not) and refuses the third.

use e2e::jwt::{oct_keys_of, sign_hs256, sign_hs256_raw, OctKey};
use e2e::{Options, Reply, Stack};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The example under test.
const JWT_CONFIG: &str = "envoy/jwt-authn.yaml";
/// The issuer the example's provider accepts.
const ISSUER: &str = "token-ratelimit-demo";
/// What the free tier admits of 22-token requests in a row before refusing (see the top).
const FREE_ADMITS: usize = 2;

/// Sends `chat_as(authorization, 2, 20)` (22 tokens) until one is refused or `max_requests`
/// were sent; returns the statuses. After each admitted request it waits until the service was
/// charged every token the upstream served, so that the next admission sees the spend.
fn spend_until_limited(stack: &Stack, authorization: &str, max_requests: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..max_requests {
        let r = stack.chat_as(Some(authorization), 2, 20);
        statuses.push(r.status);
        if r.status != 200 {
            break;
        }
        let served = stack.served_total();
        assert_eq!(
            stack.await_reported(served),
            served,
            "reported tokens lag behind served"
        );
    }
    statuses
}

/// `statuses` of `n` admitted requests, then a refused one.
fn admitted_then_429(n: usize) -> Vec<u16> {
    [vec![200; n], vec![429]].concat()
}

/// Asserts `r` is the filter's 429 in OpenAI's shape for a budget of `limit`.
fn assert_rate_limited(r: &Reply, limit: u64) {
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        r.header("x-ratelimit-limit"),
        Some(limit.to_string().as_str())
    );
}

/// A counter's `set_variables`: each counter expression (as the generated limits name it, the
/// descriptor entry `descriptors[0]['<expression>']`) with its value.
fn vars(pairs: &[(&str, &str)]) -> Value {
    pairs
        .iter()
        .map(|(expression, value)| (format!("descriptors[0]['{expression}']"), json!(value)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The live counters of the limit `name`, as (set_variables, charged) pairs.
fn counters_of_limit(stack: &Stack, name: &str) -> Vec<(Value, u64)> {
    stack
        .counters()
        .as_array()
        .expect("counters")
        .iter()
        .filter(|c| c["limit"]["name"] == name)
        .map(|c| {
            let max = c["limit"]["max_value"].as_u64().unwrap_or(0);
            let remaining = c["remaining"].as_u64().unwrap_or(0);
            (c["set_variables"].clone(), max - remaining)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// jwt_authn: envoy/jwt-authn.yaml
// ---------------------------------------------------------------------------------------------

/// The example's demo key, read from its JWKS.
fn demo_key() -> OctKey {
    let text = std::fs::read_to_string(e2e::repo_root().join(JWT_CONFIG)).expect(JWT_CONFIG);
    let keys = oct_keys_of(&text);
    assert_eq!(keys.len(), 1, "one demo key in {JWT_CONFIG}");
    keys.into_iter().next().expect("a key")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// `Bearer <JWT>` of `claims` plus the example's issuer and an expiry in an hour, signed with
/// the demo key.
fn bearer(claims: Value) -> String {
    let mut claims = claims;
    claims["iss"] = ISSUER.into();
    if claims.get("exp").is_none() {
        claims["exp"] = (now() + 3600).into();
    }
    format!("Bearer {}", sign_hs256(&demo_key(), &claims))
}

/// A user's token: `sub`, the `groups` list claim, and the number and bool claims the
/// predicates of `with_premium_limit` read (every limit reads its claims on every request, so
/// each token carries them all).
fn user(sub: &str, groups: &[&str], tier_level: u32, premium: bool) -> String {
    bearer(json!({
        "sub": sub, "groups": groups, "tier_level": tier_level, "premium": premium
    }))
}

fn jwt_stack(mode: Option<&'static str>, edits: Vec<(String, String)>) -> Stack {
    Stack::start(Options {
        config: Some(JWT_CONFIG),
        mode,
        edits,
        ..Options::default()
    })
}

/// An edit of the example adding limits (YAML at the indentation of its `limits` entries).
fn add_limits(yaml: &str) -> Vec<(String, String)> {
    const LIMITS: &str = "                    limits:\n";
    vec![(LIMITS.to_string(), format!("{LIMITS}{yaml}"))]
}

#[test]
fn jwt_free_user_is_limited_on_its_sub_claim_and_the_refused_request_never_reaches_the_upstream() {
    let stack = jwt_stack(None, Vec::new());
    let alice = user("alice", &["free"], 1, false);
    assert_eq!(
        spend_until_limited(&stack, &alice, 10),
        admitted_then_429(FREE_ADMITS)
    );

    let upstream_before = stack.upstream_requests();
    let r = stack.chat_as(Some(&alice), 2, 20);
    assert_rate_limited(&r, 50);
    assert_eq!(
        stack.upstream_requests(),
        upstream_before,
        "a limited request reached the upstream"
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("'free'"));

    // The counter is keyed by the `sub` claim and charged what the upstream served.
    let counter = stack.counter_of("alice").expect("alice's counter");
    assert_eq!(counter.max, 50);
    assert_eq!(counter.value, 22 * FREE_ADMITS as u64);
    assert_eq!(
        counters_of_limit(&stack, "free"),
        vec![(vars(&[("auth.claims.sub", "alice")]), 44)]
    );
    assert!(counters_of_limit(&stack, "gold").is_empty());
    assert!(stack.await_no_holds(Duration::from_secs(10)));
}

#[test]
fn jwt_gold_user_is_not_limited_at_the_free_spend_and_two_free_users_have_separate_counters() {
    let stack = jwt_stack(None, Vec::new());
    let alice = user("alice", &["free"], 1, false);
    let bob = user("bob", &["free"], 1, false);
    let carol = user("carol", &["gold"], 2, true);
    assert_eq!(
        spend_until_limited(&stack, &alice, 10),
        admitted_then_429(FREE_ADMITS)
    );

    // Another free user (another `sub`) has a budget of its own: what is left after this
    // request's hold.
    let r = stack.chat_as(Some(&bob), 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit"), Some("50"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("28"));

    // The gold user spends what refused alice, and more, without being refused.
    let spent_by_alice = FREE_ADMITS + 1;
    for _ in 0..spent_by_alice + 1 {
        let r = stack.chat_as(Some(&carol), 2, 20);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit"), Some("200"));
    }
    let served = stack.served_total();
    assert_eq!(stack.await_reported(served), served);

    assert_eq!(
        counters_of_limit(&stack, "free"),
        vec![
            (vars(&[("auth.claims.sub", "alice")]), 44),
            (vars(&[("auth.claims.sub", "bob")]), 22),
        ]
    );
    assert_eq!(
        counters_of_limit(&stack, "gold"),
        vec![(vars(&[("auth.claims.sub", "carol")]), 22 * 4)]
    );
}

#[test]
fn jwt_predicates_compare_number_and_bool_claims_as_numbers_and_bools() {
    let stack = jwt_stack(
        None,
        add_limits(
            r#"                      premium:
                        rates:
                        - {limit: 1000, window: 1m}
                        when:
                        - predicate: request.url_path == "/v1/chat/completions"
                        - predicate: auth.claims.premium == true
                        - predicate: auth.claims.tier_level >= 2
                        counters:
                        - expression: auth.claims.sub
                        tokens: total
"#,
        ),
    );
    for (sub, tier_level, premium) in [
        ("carol", 2, true),
        ("dave", 1, true),
        ("erin", 3, false),
        ("frank", 7, true),
    ] {
        let r = stack.chat_as(Some(&user(sub, &["gold"], tier_level, premium)), 2, 20);
        assert_eq!(r.status, 200, "{sub}: {}", r.body);
    }
    let served = stack.served_total();
    assert_eq!(stack.await_reported(served), served);
    // Only the users with `premium: true` and `tier_level >= 2` are counted by `premium`; every
    // user by `gold`.
    assert_eq!(
        counters_of_limit(&stack, "premium"),
        vec![
            (vars(&[("auth.claims.sub", "carol")]), 22),
            (vars(&[("auth.claims.sub", "frank")]), 22),
        ]
    );
    assert_eq!(counters_of_limit(&stack, "gold").len(), 4);
}

#[test]
fn jwt_a_counter_over_list_and_map_claims_is_their_compact_json_with_sorted_keys() {
    let stack = jwt_stack(
        None,
        add_limits(
            r#"                      by_groups:
                        rates:
                        - {limit: 1000, window: 1m}
                        when:
                        - predicate: request.url_path == "/v1/chat/completions"
                        counters:
                        - expression: auth.claims.groups
                        - expression: auth.claims.org
                        tokens: total
"#,
        ),
    );
    let key = demo_key();
    let exp = now() + 3600;
    // Two users with equal claims, the `org` object's keys in opposite orders in the token.
    let tokens = [
        format!(
            r#"{{"iss":"{ISSUER}","exp":{exp},"sub":"grace","groups":["free","vip"],"org":{{"name":"acme","id":7}},"tier_level":1,"premium":false}}"#
        ),
        format!(
            r#"{{"iss":"{ISSUER}","exp":{exp},"sub":"heidi","groups":["free","vip"],"org":{{"id":7,"name":"acme"}},"tier_level":1,"premium":false}}"#
        ),
    ]
    .map(|payload| format!("Bearer {}", sign_hs256_raw(&key, &payload)));
    for token in &tokens {
        let r = stack.chat_as(Some(token), 2, 20);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let served = stack.served_total();
    assert_eq!(stack.await_reported(served), served);
    // One counter for both: the list in its order, the object with its keys sorted and the
    // whole number `7` (a double in the Struct) as an integer.
    assert_eq!(
        counters_of_limit(&stack, "by_groups"),
        vec![(
            vars(&[
                ("auth.claims.groups", r#"["free","vip"]"#),
                ("auth.claims.org", r#"{"id":7,"name":"acme"}"#),
            ]),
            44
        )]
    );
    // The free tier still counts them apart, by `sub`.
    assert_eq!(counters_of_limit(&stack, "free").len(), 2);
}

#[test]
fn jwt_a_verified_token_without_the_claim_a_predicate_reads_is_refused_by_default() {
    let stack = jwt_stack(None, Vec::new());
    // Verified by jwt_authn (signature, issuer), but there is no `groups` claim for the tiers'
    // predicates: the limits cannot be evaluated, and `onError` defaults to deny.
    let no_groups = bearer(json!({"sub": "mallory"}));
    let r = stack.chat_as(Some(&no_groups), 2, 20);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["error"]["code"], "rate_limit_policy_error");
    assert_eq!(stack.upstream_requests(), 0);
    assert_eq!(
        stack.envoy_stat("wasmcustom.token_ratelimit.requests_refused_on_error"),
        1
    );
    // A `groups` claim that is not a list cannot be asked for its members either.
    let r = stack.chat_as(Some(&bearer(json!({"sub": "mallory", "groups": 5}))), 2, 20);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(stack.upstream_requests(), 0);
    // The rate-limit service was never asked.
    assert_eq!(stack.service_metric("ratelimit_reserve_calls_total"), 0);
    assert_eq!(stack.counters(), json!([]));
}

#[test]
fn jwt_requests_without_a_valid_token_get_401_from_jwt_authn() {
    let stack = jwt_stack(None, Vec::new());
    let claims = json!({"sub": "alice", "groups": ["free"], "tier_level": 1, "premium": false});
    let other_key = OctKey {
        kid: Some("demo".into()),
        secret: b"not-the-demo-key-of-the-example!!".to_vec(),
    };
    let forged = format!(
        "Bearer {}",
        sign_hs256(&other_key, &{
            let mut c = claims.clone();
            c["iss"] = ISSUER.into();
            c["exp"] = (now() + 3600).into();
            c
        })
    );
    let expired = bearer(json!({
        "sub": "alice", "groups": ["free"], "tier_level": 1, "premium": false,
        "exp": now() - 600
    }));
    let wrong_issuer = format!(
        "Bearer {}",
        sign_hs256(&demo_key(), &{
            let mut c = claims.clone();
            c["iss"] = "someone-else".into();
            c["exp"] = (now() + 3600).into();
            c
        })
    );
    for (what, authorization) in [
        ("no token", None),
        ("not a JWT", Some("Bearer not-a-jwt")),
        ("another key", Some(forged.as_str())),
        ("expired", Some(expired.as_str())),
        ("another issuer", Some(wrong_issuer.as_str())),
    ] {
        let r = stack.chat_as(authorization, 2, 20);
        assert_eq!(r.status, 401, "{what}: {}", r.body);
    }
    assert_eq!(stack.upstream_requests(), 0);
    assert_eq!(stack.service_metric("ratelimit_reserve_calls_total"), 0);
    // The same claims under the demo key pass.
    let r = stack.chat_as(Some(&bearer(claims)), 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn jwt_the_example_limits_every_model_endpoint_and_no_other_path() {
    // checkReport: once the counter is past its limit every request is refused whatever it
    // declares (a reservation of a few tokens could still fit in what is left).
    let stack = jwt_stack(Some("checkReport"), Vec::new());
    let alice = user("alice", &["free"], 1, false);
    let carol = user("carol", &["gold"], 2, true);
    // Checks see 0, 22, 44 (< 50: allowed), then 66 (refused).
    assert_eq!(
        spend_until_limited(&stack, &alice, 10),
        admitted_then_429(3)
    );

    let endpoints: [(&str, Value); 8] = [
        (
            "/v1/chat/completions",
            json!({"model": "sim", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 5}),
        ),
        (
            "/v1/completions",
            json!({"model": "sim", "prompt": "a b", "max_tokens": 5}),
        ),
        ("/v1/embeddings", json!({"model": "sim", "input": "a b"})),
        (
            "/v1/responses",
            json!({"model": "sim", "input": "a b", "max_output_tokens": 5}),
        ),
        (
            "/v1/messages",
            json!({"model": "sim", "max_tokens": 5, "messages": [{"role": "user", "content": "a b"}]}),
        ),
        (
            "/v1beta/models/sim:generateContent",
            json!({"contents": [{"parts": [{"text": "a b"}]}]}),
        ),
        (
            "/v1beta/models/sim:streamGenerateContent?alt=sse",
            json!({"contents": [{"parts": [{"text": "a b"}]}]}),
        ),
        (
            "/v1/models/sim:generateContent",
            json!({"contents": [{"parts": [{"text": "a b"}]}]}),
        ),
    ];
    for (path, body) in &endpoints {
        let before = stack.upstream_requests();
        let r = stack.post_with(path, None, body, &[("authorization", alice.as_str())]);
        assert_rate_limited(&r, 50);
        assert_eq!(
            stack.upstream_requests(),
            before,
            "{path} reached the upstream"
        );
        // The same request of a gold user is served: the body is one the upstream takes.
        let r = stack.post_with(path, None, body, &[("authorization", carol.as_str())]);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.header("x-ratelimit-limit"), Some("200"), "{path}");
    }
    // A path that is not a model endpoint (listing the models) is not limited.
    let r = stack
        .raw_request(
            "GET",
            "/v1/models",
            &[("authorization", alice.as_str())],
            b"",
        )
        .expect("GET /v1/models");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit"), None);
}

#[test]
fn jwt_the_demo_token_command_in_the_example_mints_a_token_envoy_accepts() {
    let text = std::fs::read_to_string(e2e::repo_root().join(JWT_CONFIG)).expect(JWT_CONFIG);
    let commands: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start_matches('#').trim().strip_prefix("python3 -c "))
        .collect();
    assert_eq!(commands.len(), 1, "one python3 command in {JWT_CONFIG}");
    let command = format!("python3 -c {}", commands[0]);
    assert!(
        command.ends_with(" alice free"),
        "the command mints alice's free token: {command}"
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &command])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    let claims = e2e::jwt::claims_of(&token);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["groups"], json!(["free"]));

    let stack = jwt_stack(None, Vec::new());
    let r = stack.chat_as(Some(&format!("Bearer {token}")), 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit"), Some("50"));
    let served = stack.served_total();
    assert_eq!(stack.await_reported(served), served);
    assert_eq!(stack.counter_of("alice").map(|c| c.max), Some(50));
}

// ---------------------------------------------------------------------------------------------
// ext_authz over gRPC: tests/e2e/config/ext-authz-grpc.yaml and e2e::authz
// ---------------------------------------------------------------------------------------------

const EXT_AUTHZ_CONFIG: &str = "tests/e2e/config/ext-authz-grpc.yaml";

const FREE: &str = "iamafreeuser";
const FREE_2: &str = "iamanotherfreeuser";
const GOLD: &str = "iamagolduser";
/// In no tier by its `groups` list; `free` by its Kuadrant annotation.
const BETA: &str = "iamabetauser";

/// The identity object Authorino leaves for an API key: `groups` as a list, and the Kubernetes
/// Secret's annotations (Kuadrant writes the groups there as one comma-separated string).
fn identity(userid: &str, groups: &[&str], annotated_groups: &str) -> Value {
    json!({"identity": {
        "userid": userid,
        "groups": groups,
        "metadata": {"annotations": {
            "kuadrant.io/groups": annotated_groups,
            "secret.kuadrant.io/user-id": userid
        }}
    }})
}

fn ext_authz_stack(edits: Vec<(String, String)>) -> Stack {
    Stack::start(Options {
        config: Some(EXT_AUTHZ_CONFIG),
        authz: Some(vec![
            (FREE, identity("user-1", &["free"], "free")),
            (GOLD, identity("user-2", &["gold"], "gold")),
            (FREE_2, identity("user-3", &["free"], "free")),
            (BETA, identity("user-4", &["beta"], "beta,free")),
        ]),
        edits,
        ..Options::default()
    })
}

fn apikey(key: &str) -> String {
    format!("APIKEY {key}")
}

#[test]
fn ext_authz_grpc_identity_picks_the_tier_by_groups_list_free_is_limited_and_gold_is_not() {
    let stack = ext_authz_stack(Vec::new());
    assert_eq!(
        spend_until_limited(&stack, &apikey(FREE), 10),
        admitted_then_429(FREE_ADMITS)
    );
    let upstream_before = stack.upstream_requests();
    let r = stack.chat(FREE, 2, 20);
    assert_rate_limited(&r, 50);
    assert_eq!(
        stack.upstream_requests(),
        upstream_before,
        "a limited request reached the upstream"
    );

    // Another free user has its own counter.
    let r = stack.chat(FREE_2, 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("28"));
    // Gold and a user in no tier spend more than refused the free user, unrefused.
    for _ in 0..FREE_ADMITS + 2 {
        let r = stack.chat(GOLD, 2, 20);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit"), Some("200"));
        let r = stack.chat(BETA, 2, 20);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit"), None);
    }
    // Every token served is charged, but those of the user in no tier.
    let unlimited = stack.served_tokens(BETA);
    assert_eq!(unlimited, 22 * (FREE_ADMITS as u64 + 2));
    let charged = stack.served_total() - unlimited;
    assert_eq!(stack.await_reported(charged), charged);

    // Counters keyed by `auth.identity.userid`, the one Authorino answered.
    assert_eq!(
        counters_of_limit(&stack, "free"),
        vec![
            (vars(&[("auth.identity.userid", "user-1")]), 44),
            (vars(&[("auth.identity.userid", "user-3")]), 22),
        ]
    );
    assert_eq!(
        counters_of_limit(&stack, "gold"),
        vec![(vars(&[("auth.identity.userid", "user-2")]), 22 * 4)]
    );
    assert_eq!(stack.counter_of("user-4"), None);
    // Every request was checked by the authorization server (and allowed).
    let authz = stack.authz.as_ref().expect("authz server");
    let requests = (FREE_ADMITS + 2) + 1 + 2 * (FREE_ADMITS + 2);
    assert_eq!(authz.checks(), requests as u64);
    assert!(authz
        .seen()
        .iter()
        .all(|s| s.allowed && s.path == "/v1/chat/completions"));
}

#[test]
fn ext_authz_grpc_kuadrant_annotation_predicate_pasted_as_is_selects_the_free_tier() {
    // The free tier as Kuadrant writes it: the groups of the Secret's annotation, split.
    let kuadrant = r#"request.auth.identity.metadata.annotations["kuadrant.io/groups"].split(",").exists(g, g == "free")"#;
    let stack = ext_authz_stack(vec![(
        "predicate: auth.identity.groups.exists(g, g == \"free\")".into(),
        format!("predicate: '{kuadrant}'"),
    )]);
    // Rendered and read back: the expression is in the configuration byte for byte.
    let config: Value = serde_yaml::from_str(&stack.config_text()).expect("YAML");
    let free = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][1]["typed_config"]["config"]["configuration"]["value"]
        ["limits"]["free"];
    assert_eq!(free["when"][1]["predicate"], kuadrant);

    // user-4's annotation says "beta,free" (its `groups` list does not name free): free tier.
    assert_eq!(
        spend_until_limited(&stack, &apikey(BETA), 10),
        admitted_then_429(FREE_ADMITS)
    );
    let r = stack.chat(BETA, 2, 20);
    assert_rate_limited(&r, 50);
    // user-1's annotation says "free"; gold's "gold" keeps it out of the free tier.
    let r = stack.chat(FREE, 2, 20);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit"), Some("50"));
    for _ in 0..FREE_ADMITS + 2 {
        let r = stack.chat(GOLD, 2, 20);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit"), Some("200"));
    }
    let served = stack.served_total();
    assert_eq!(stack.await_reported(served), served);
    assert_eq!(
        counters_of_limit(&stack, "free"),
        vec![
            (vars(&[("auth.identity.userid", "user-1")]), 22),
            (vars(&[("auth.identity.userid", "user-4")]), 44),
        ]
    );
    assert_eq!(
        counters_of_limit(&stack, "gold"),
        vec![(vars(&[("auth.identity.userid", "user-2")]), 22 * 4)]
    );
}

#[test]
fn ext_authz_grpc_unknown_api_key_gets_the_authorization_servers_401_and_nothing_else_runs() {
    let stack = ext_authz_stack(Vec::new());
    let r = stack.chat("not-a-key", 2, 20);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        r.header("www-authenticate"),
        Some("APIKEY realm=\"api-key-users\"")
    );
    let r = stack.chat_as(None, 2, 20);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(stack.upstream_requests(), 0);
    assert_eq!(stack.service_metric("ratelimit_reserve_calls_total"), 0);
    let authz = stack.authz.as_ref().expect("authz server");
    assert_eq!(authz.checks(), 2);
    assert!(authz.seen().iter().all(|s| !s.allowed));
}
