//! Per-model limits on Istio (istio/per-model/): the walk-through's path end to end, with the
//! gateway played by a real Envoy. `token-ratelimit-oci push` (as `make push`) pushes the image
//! to a real registry and writes the EnvoyFilter's patch, `kubectl kustomize istio/per-model/`
//! renders the EnvoyFilter `kubectl apply -k` would apply, its module is pulled back by the
//! `uri` and `sha256` it names, as Istio's agent does, and its Wasm filter configuration (the
//! `EXTENSION_CONFIG` patch, with the agent's local copy of the module in place of
//! `remote`) runs in Envoy in place of envoy/envoy.yaml's, so that the per-model limit is
//! enforced on the request body.

use e2e::registry::{build_image, oci_tool, pull_like_istio, Registry};
use e2e::{Options, Stack};
use serde_json::{json, Value};

const GOLD: &str = "iamagolduser";
const FREE: &str = "iamafreeuser";

/// The module and the Wasm filter configuration of the EnvoyFilter rendered from
/// istio/per-model/ with what `make push` wrote, after pushing to a local registry.
fn pushed_and_rendered() -> (Vec<u8>, Value) {
    let registry = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("oci");
    build_image(&layout);
    let reference = format!("{}/token-ratelimit:per-model", registry.host());
    let wasmplugin = work.path().join("module.yaml");
    let envoyfilter = work.path().join("envoyfilter-module.yaml");
    oci_tool(&[
        "push",
        "--layout",
        &layout.display().to_string(),
        "--patch",
        &wasmplugin.display().to_string(),
        "--envoyfilter-patch",
        &envoyfilter.display().to_string(),
        &reference,
    ]);
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("a patch push wrote");
    let (wasmplugin, envoyfilter) = (read(&wasmplugin), read(&envoyfilter));
    let text = manifests::kustomize_with(
        &e2e::repo_root().join("istio"),
        "per-model",
        &[
            ("module.yaml", Some(&wasmplugin)),
            ("per-model/module.yaml", Some(&envoyfilter)),
        ],
    )
    .unwrap_or_else(|e| panic!("kubectl kustomize istio/per-model/: {e}"));
    manifests::check_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let docs = manifests::documents(&text).expect("YAML");
    let filter = manifests::find(&docs, "EnvoyFilter", "token-ratelimit").expect("the EnvoyFilter");
    let wasm = filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"].clone();
    let remote = &wasm["config"]["vm_config"]["code"]["remote"];
    let uri = remote["http_uri"]["uri"].as_str().expect("uri");
    assert_eq!(uri, format!("oci://{reference}"));
    let pulled = pull_like_istio(
        uri.trim_start_matches("oci://"),
        Some(remote["sha256"].as_str().expect("sha256")),
    )
    .expect("the EnvoyFilter's module pulls and matches its pin");
    assert!(pulled.module == std::fs::read(e2e::wasm()).expect("built module"));
    (pulled.module, wasm)
}

/// envoy/envoy.yaml with its Wasm filter's configuration replaced by `wasm`, whose module is
/// loaded from the path the stack substitutes (what Istio's agent does with `remote`: it
/// fetches the module and hands Envoy a local copy) and whose rate-limit cluster is the
/// stack's; written to `dir`, returned as the path for [`Options::config`].
fn envoy_config_with(mut wasm: Value, dir: &std::path::Path) -> &'static str {
    wasm["config"]["vm_config"]["code"] = json!({
        "local": {"filename": "target/wasm32-wasip1/release/token_ratelimit.wasm"}
    });
    wasm["config"]["configuration"]["value"]["rateLimitService"]["cluster"] = json!("ratelimit");
    let text = std::fs::read_to_string(e2e::repo_root().join(e2e::DEFAULT_CONFIG)).expect("config");
    let mut config: Value = serde_yaml::from_str(&text).expect("envoy.yaml");
    let filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_array_mut()
        .expect("http_filters");
    let filter = filters
        .iter_mut()
        .find(|f| f["name"] == "envoy.filters.http.wasm")
        .expect("the wasm filter");
    filter["typed_config"] = wasm;
    let path = dir.join("envoy-per-model.yaml");
    std::fs::write(&path, serde_yaml::to_string(&config).expect("YAML")).expect("write config");
    Box::leak(path.display().to_string().into_boxed_str())
}

fn chat(stack: &Stack, key: &str, model: &str) -> u16 {
    let mut body = e2e::chat_body(2, 20, false);
    body["model"] = json!(model);
    let status = stack.post("/v1/chat/completions", Some(key), &body).status;
    if status == 200 {
        // Every charge reaches the service before the next admission.
        let served = stack.served_total();
        assert_eq!(stack.await_reported(served), served, "reports lag behind");
    }
    status
}

#[test]
fn the_per_model_envoyfilter_from_kustomize_limits_one_model_per_user_and_leaves_the_tier_budget() {
    let (module, wasm) = pushed_and_rendered();
    let dir = tempfile::tempdir().expect("temp dir");
    let module_path = dir.path().join("pulled.wasm");
    std::fs::write(&module_path, module).expect("module");
    let stack = Stack::start(Options {
        config: Some(envoy_config_with(wasm, dir.path())),
        wasm: Some(module_path),
        ..Options::default()
    });

    // gpt-4o: 100 tokens per minute per user. Requests of 2 + 20 = 22 tokens reserve 22 (the
    // body is read before the headers go upstream): 0, 22, 44, 66 fit, 88 + 22 does not.
    let statuses: Vec<u16> = (0..6).map(|_| chat(&stack, GOLD, "gpt-4o")).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "{}",
        stack.config_text()
    );
    assert_eq!(stack.served_tokens(GOLD), 88);
    // Another model still has the gold tier's 200 - 88: the per-model budget is its own.
    assert_eq!(chat(&stack, GOLD, "sim"), 200);
    assert_eq!(stack.served_tokens(GOLD), 110);
    // And the free tier is as with the WasmPlugin: 50 tokens, whatever the model.
    let free: Vec<u16> = (0..3).map(|_| chat(&stack, FREE, "sim")).collect();
    assert_eq!(free, [200, 200, 429]);
}
