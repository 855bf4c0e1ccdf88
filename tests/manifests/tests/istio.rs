//! istio/'s manifests against Istio's and Kubernetes' API types (`manifests::check`): each file
//! a kustomization lists, what `kubectl kustomize` renders of it, and the WasmPlugin
//! `token-ratelimit wasmplugin` prints. The misspellings below are refused, which proves the
//! check looks.

use std::path::{Path, PathBuf};
use std::process::Command;

use manifests::find;
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// istio/ and the directories under it with a kustomization.yaml (base/, per-model/).
fn kustomizations() -> Vec<PathBuf> {
    let istio = repo_root().join("istio");
    let mut dirs = vec![istio.clone()];
    for entry in std::fs::read_dir(&istio).expect("istio/") {
        let path = entry.expect("entry").path();
        if path.join("kustomization.yaml").is_file() {
            dirs.push(path);
        }
    }
    dirs
}

fn yaml_file(path: &Path) -> serde_yaml::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first document of an istio/ file, as JSON.
fn manifest(file: &str) -> Value {
    serde_json::to_value(yaml_file(&repo_root().join("istio").join(file))).expect("JSON")
}

const DIGEST: &str = "8574ea937deb3b37a4b52e274f6b8fa910b5b11f1141acc6d37b5730a8fe984a";
const URL: &str = "oci://registry.internal:5000/token-ratelimit:0.1.0";

/// The module.yaml `make push` writes for the WasmPlugin (`token-ratelimit-oci push --patch`).
fn wasmplugin_patch(url: &str, sha256: &str) -> String {
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: token-ratelimit\n  namespace: istio-system\nspec:\n  url: {url}\n  sha256: {sha256}\n"
    )
}

/// The per-model/module.yaml `make push` writes for the EnvoyFilter
/// (`token-ratelimit-oci push --envoyfilter-patch`).
fn envoyfilter_patch(url: &str, sha256: &str) -> String {
    let remote = "/spec/configPatches/0/patch/value/typed_config/config/vm_config/code/remote";
    format!(
        "- op: add\n  path: {remote}/http_uri/uri\n  value: {url}\n- op: add\n  path: {remote}/sha256\n  value: {sha256}\n"
    )
}

/// What `kubectl kustomize istio/<kustomization>` renders with both patches of `make push`,
/// checked against the types; its documents.
fn rendered(kustomization: &str) -> Vec<Value> {
    let wasmplugin = wasmplugin_patch(URL, DIGEST);
    let envoyfilter = envoyfilter_patch(URL, DIGEST);
    let text = manifests::kustomize_with(
        &repo_root().join("istio"),
        kustomization,
        &[
            ("module.yaml", Some(&wasmplugin)),
            ("per-model/module.yaml", Some(&envoyfilter)),
        ],
    )
    .unwrap_or_else(|e| panic!("kubectl kustomize istio/{kustomization}: {e}"));
    manifests::check_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    manifests::documents(&text).expect("YAML")
}

fn limits_configmap(docs: &[Value]) -> &str {
    find(docs, "ConfigMap", "limitador-limits").expect("the limits ConfigMap")["data"]
        ["limits.yaml"]
        .as_str()
        .expect("limits.yaml")
}

fn istio_file(file: &str) -> String {
    std::fs::read_to_string(repo_root().join("istio").join(file)).expect(file)
}

#[test]
fn every_file_a_kustomization_lists_matches_istios_and_kubernetes_types() {
    let mut checked = Vec::new();
    for dir in kustomizations() {
        let kustomization = yaml_file(&dir.join("kustomization.yaml"));
        let resources = kustomization["resources"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{}: no resources", dir.display()));
        for resource in resources {
            let file = dir.join(resource.as_str().expect("a path"));
            let text = std::fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let n =
                manifests::check_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(n > 0, "{} holds no manifest", file.display());
            checked.push(file);
        }
    }
    for expected in [
        "istio/wasmplugin.yaml",
        "istio/per-model/envoyfilter.yaml",
        "istio/base/auth-demo.yaml",
        "istio/base/limitador.yaml",
        "istio/base/redis.yaml",
    ] {
        assert!(
            checked.iter().any(|f| f.ends_with(expected)),
            "{expected} was not checked: {checked:?}"
        );
    }
}

#[test]
fn kubectl_kustomize_renders_the_pinned_wasmplugin_and_every_rendered_manifest_matches_the_types() {
    let docs = rendered("");
    assert!(docs.len() >= 6, "{} manifests rendered", docs.len());
    let plugin = find(&docs, "WasmPlugin", "token-ratelimit").expect("the WasmPlugin");
    assert_eq!(plugin["spec"]["url"], URL);
    assert_eq!(plugin["spec"]["sha256"], DIGEST);
    // The rest of the plugin is istio/wasmplugin.yaml's.
    assert_eq!(
        plugin["spec"]["pluginConfig"],
        manifest("wasmplugin.yaml")["spec"]["pluginConfig"]
    );
    assert_eq!(limits_configmap(&docs), istio_file("limits.yaml"));
    assert!(find(&docs, "EnvoyFilter", "token-ratelimit").is_none());
    // The base: Limitador and the demo auth step.
    assert!(find(&docs, "Deployment", "limitador").is_some());
    assert!(find(&docs, "EnvoyFilter", "token-ratelimit-demo-auth").is_some());
}

/// The Wasm filter configuration (`envoy.extensions.filters.http.wasm.v3.Wasm`) the per-model
/// EnvoyFilter's first patch adds.
fn wasm_of(filter: &Value) -> &Value {
    &filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
}

#[test]
fn kubectl_kustomize_per_model_renders_the_pinned_envoyfilter_in_place_of_the_wasmplugin() {
    let docs = rendered("per-model");
    assert!(
        find(&docs, "WasmPlugin", "token-ratelimit").is_none(),
        "the WasmPlugin would charge every request a second time"
    );
    let filter = find(&docs, "EnvoyFilter", "token-ratelimit").expect("the EnvoyFilter");
    let remote = &wasm_of(filter)["config"]["vm_config"]["code"]["remote"];
    assert_eq!(remote["http_uri"]["uri"], URL);
    assert_eq!(remote["sha256"], DIGEST);
    // The rest is per-model/envoyfilter.yaml's.
    let mut shipped = manifest("per-model/envoyfilter.yaml");
    let mut got = filter.clone();
    for f in [&mut shipped, &mut got] {
        wasm_of_mut(f)["config"]["vm_config"]["code"] = Value::Null;
    }
    assert_eq!(got["spec"], shipped["spec"]);
    assert_eq!(limits_configmap(&docs), istio_file("per-model/limits.yaml"));
    assert!(find(&docs, "Deployment", "limitador").is_some());
    assert!(find(&docs, "EnvoyFilter", "token-ratelimit-demo-auth").is_some());
}

fn wasm_of_mut(filter: &mut Value) -> &mut Value {
    &mut filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
}

#[test]
fn the_per_model_envoyfilter_inserts_the_filter_its_extension_config_defines_with_the_body_flag() {
    let filter = manifest("per-model/envoyfilter.yaml");
    let patches = filter["spec"]["configPatches"]
        .as_array()
        .expect("configPatches");
    assert_eq!(patches.len(), 2);
    let (extension, http_filter) = (&patches[0], &patches[1]);
    assert_eq!(extension["applyTo"], "EXTENSION_CONFIG");
    assert_eq!(extension["patch"]["operation"], "ADD");
    assert_eq!(http_filter["applyTo"], "HTTP_FILTER");
    assert_eq!(http_filter["patch"]["operation"], "INSERT_BEFORE");
    assert_eq!(
        http_filter["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
        "envoy.filters.http.router"
    );
    // The chain's filter takes its configuration, over ECDS, from the extension config.
    let name = &extension["patch"]["value"]["name"];
    assert!(name.is_string());
    assert_eq!(&http_filter["patch"]["value"]["name"], name);
    let wasm = wasm_of(&filter);
    let type_urls = &http_filter["patch"]["value"]["config_discovery"]["type_urls"];
    assert_eq!(type_urls, &json!([wasm["@type"]]));
    assert_eq!(
        wasm["@type"],
        "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
    );
    // What the WasmPlugin cannot set, and the plugin's mirror of it.
    assert_eq!(wasm["config"]["allow_on_headers_stop_iteration"], true);
    let plugin = &wasm["config"]["configuration"]["value"];
    assert_eq!(plugin["requestBody"]["allowOnHeadersStopIteration"], true);
    assert_eq!(wasm["config"]["failure_policy"], "FAIL_CLOSED");
    // The same gateway, service and tiers as the WasmPlugin.
    let wasmplugin = manifest("wasmplugin.yaml");
    assert_eq!(
        filter["spec"]["workloadSelector"]["labels"],
        wasmplugin["spec"]["selector"]["matchLabels"]
    );
    let tiers = &wasmplugin["spec"]["pluginConfig"];
    assert_eq!(plugin["rateLimitService"], tiers["rateLimitService"]);
    assert_eq!(plugin["auth"], tiers["auth"]);
    for tier in ["free", "gold"] {
        assert_eq!(plugin["limits"][tier], tiers["limits"][tier], "{tier}");
    }
    assert!(plugin["limits"]["gpt-4o"]["when"]
        .to_string()
        .contains("requestBodyJSON('/model')"));
}

#[test]
fn kustomize_refuses_either_kustomization_without_the_patch_make_push_writes() {
    // Nothing is deployed with the placeholder URL by accident: without its module.yaml a
    // kustomization does not build.
    let wasmplugin = wasmplugin_patch(URL, DIGEST);
    let envoyfilter = envoyfilter_patch(URL, DIGEST);
    let istio = repo_root().join("istio");
    let err = manifests::kustomize_with(
        &istio,
        "",
        &[
            ("module.yaml", None),
            ("per-model/module.yaml", Some(&envoyfilter)),
        ],
    )
    .expect_err("istio/ without module.yaml was rendered");
    assert!(err.contains("module.yaml"), "{err}");
    let err = manifests::kustomize_with(
        &istio,
        "per-model",
        &[
            ("module.yaml", Some(&wasmplugin)),
            ("per-model/module.yaml", None),
        ],
    )
    .expect_err("istio/per-model/ without module.yaml was rendered");
    assert!(err.contains("module.yaml"), "{err}");
}

/// `check` of `doc` with `edit` applied; the error, which must come.
fn refused(mut doc: Value, edit: impl FnOnce(&mut Value)) -> String {
    edit(&mut doc);
    manifests::check(&doc).expect_err("the misspelling was accepted")
}

fn rename(object: &mut Value, from: &str, to: &str) {
    let map = object.as_object_mut().expect("an object");
    let value = map.remove(from).unwrap_or_else(|| panic!("no {from}"));
    map.insert(to.into(), value);
}

#[test]
fn misspelled_wasmplugin_fields_and_values_are_refused() {
    let plugin = manifest("wasmplugin.yaml");
    assert_eq!(manifests::check(&plugin), Ok(()));

    let e = refused(plugin.clone(), |p| {
        rename(&mut p["spec"], "failStrategy", "failStratgy")
    });
    assert!(e.contains("unknown field spec.failStratgy"), "{e}");
    let e = refused(plugin.clone(), |p| {
        p["spec"]["failStrategy"] = json!("FAIL_CLOSED")
    });
    assert!(
        e.contains("spec.failStrategy") && e.contains("FAIL_CLOSED"),
        "{e}"
    );
    let e = refused(plugin.clone(), |p| p["spec"]["phase"] = json!("STAT"));
    assert!(e.contains("spec.phase") && e.contains("STAT"), "{e}");
    let e = refused(plugin.clone(), |p| rename(&mut p["spec"], "phase", "stage"));
    assert!(e.contains("unknown field spec.stage"), "{e}");
    let e = refused(plugin.clone(), |p| {
        p["spec"]["imagePullPolicy"] = json!("IfNotPresnt")
    });
    assert!(
        e.contains("spec.imagePullPolicy") && e.contains("IfNotPresnt"),
        "{e}"
    );
    let e = refused(plugin.clone(), |p| {
        rename(&mut p["spec"], "imagePullPolicy", "pullPolicy")
    });
    assert!(e.contains("unknown field spec.pullPolicy"), "{e}");
    // `match` exists; `matches` does not, nor a mode outside its values.
    let mut with_match = plugin.clone();
    with_match["spec"]["match"] = json!([{"mode": "SERVER", "ports": [{"number": 8080}]}]);
    assert_eq!(manifests::check(&with_match), Ok(()));
    let e = refused(with_match.clone(), |p| {
        rename(&mut p["spec"], "match", "matches")
    });
    assert!(e.contains("unknown field spec.matches"), "{e}");
    let e = refused(with_match.clone(), |p| {
        p["spec"]["match"][0]["mode"] = json!("SERVERS")
    });
    assert!(e.contains("spec.match[0].mode"), "{e}");
    let e = refused(with_match, |p| {
        rename(&mut p["spec"]["match"][0], "ports", "port")
    });
    assert!(e.contains("unknown field spec.match[0].port"), "{e}");
    let e = refused(plugin.clone(), |p| {
        rename(&mut p["spec"], "selector", "workloadSelector")
    });
    assert!(e.contains("unknown field spec.workloadSelector"), "{e}");
    let e = refused(plugin, |p| p["spec"]["sha256"] = json!(42));
    assert!(e.contains("spec.sha256"), "{e}");
}

#[test]
fn misspelled_envoyfilter_fields_and_values_are_refused() {
    for file in ["base/auth-demo.yaml", "per-model/envoyfilter.yaml"] {
        misspelled_fields_and_values_of_an_envoyfilter_are_refused(manifest(file));
    }
    let filter = manifest("per-model/envoyfilter.yaml");
    let e = refused(filter.clone(), |f| {
        f["spec"]["configPatches"][0]["applyTo"] = json!("EXTENSION_CONFIGS")
    });
    assert!(e.contains("spec.configPatches[0].applyTo"), "{e}");
    let e = refused(filter, |f| {
        rename(
            &mut f["spec"]["configPatches"][1]["match"]["listener"]["filterChain"]["filter"],
            "subFilter",
            "subfilter",
        )
    });
    assert!(
        e.contains(
            "unknown field spec.configPatches[1].match.listener.filterChain.filter.subfilter"
        ),
        "{e}"
    );
}

fn misspelled_fields_and_values_of_an_envoyfilter_are_refused(filter: Value) {
    assert_eq!(manifests::check(&filter), Ok(()));

    let e = refused(filter.clone(), |f| {
        rename(&mut f["spec"], "configPatches", "configPatch")
    });
    assert!(e.contains("unknown field spec.configPatch"), "{e}");
    let e = refused(filter.clone(), |f| {
        rename(&mut f["spec"], "workloadSelector", "selector")
    });
    assert!(e.contains("unknown field spec.selector"), "{e}");
    let e = refused(filter.clone(), |f| {
        f["spec"]["configPatches"][0]["applyTo"] = json!("HTTP_FILTERS")
    });
    assert!(e.contains("spec.configPatches[0].applyTo"), "{e}");
    let e = refused(filter.clone(), |f| {
        f["spec"]["configPatches"][0]["patch"]["operation"] = json!("INSERT_FIRS")
    });
    assert!(e.contains("spec.configPatches[0].patch.operation"), "{e}");
    let e = refused(filter.clone(), |f| {
        f["spec"]["configPatches"][0]["match"]["context"] = json!("GATEWAYS")
    });
    assert!(e.contains("spec.configPatches[0].match.context"), "{e}");
    let e = refused(filter, |f| {
        rename(&mut f["spec"]["configPatches"][0], "match", "matches")
    });
    assert!(
        e.contains("unknown field spec.configPatches[0].matches"),
        "{e}"
    );
}

#[test]
fn misspelled_kubernetes_fields_are_refused_and_unknown_kinds_are_not_waved_through() {
    let deployment = manifests::documents(&istio_file("base/limitador.yaml"))
        .expect("YAML")
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    assert_eq!(manifests::check(&deployment), Ok(()));
    let e = refused(deployment.clone(), |d| {
        rename(&mut d["spec"], "replicas", "replica")
    });
    assert!(e.contains("unknown field spec.replica"), "{e}");
    let e = refused(deployment, |d| {
        d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!(["Always"])
    });
    assert!(e.contains("imagePullPolicy"), "{e}");

    let e = refused(
        json!({"apiVersion": "extensions.istio.io/v1", "kind": "WasmPlugin"}),
        |_| {},
    );
    assert!(e.contains("not a kind this check knows"), "{e}");
}

#[test]
fn the_wasmplugin_the_cli_prints_matches_istios_types() {
    let cli = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("debug/token-ratelimit");
    assert!(
        cli.exists(),
        "{} is missing: run `make build` first",
        cli.display()
    );
    let out = Command::new(&cli)
        .current_dir(repo_root())
        .args(["wasmplugin", "cli/tests/fixtures/tiers.yaml"])
        .args([
            "--url",
            "oci://registry.internal:5000/token-ratelimit:0.1.0",
        ])
        .args(["--sha256", &"ab".repeat(32)])
        .output()
        .expect("token-ratelimit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(manifests::check_yaml(&text), Ok(2), "{text}");
}
