//! istio/'s manifests against Istio's and Kubernetes' API types (`manifests::check`): each file
//! a kustomization lists, what `kubectl kustomize` renders of it, and the WasmPlugin
//! `token-ratelimit wasmplugin` prints. The misspellings below are refused, which proves the
//! check looks.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The directories under istio/ with a kustomization.yaml.
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

/// The module.yaml `make push` writes for `url` and `sha256`.
fn module_patch(url: &str, sha256: &str) -> String {
    format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: token-ratelimit\n  namespace: istio-system\nspec:\n  url: {url}\n  sha256: {sha256}\n"
    )
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
            let text = std::fs::read_to_string(&file).expect("resource");
            let n =
                manifests::check_yaml(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            assert!(n > 0, "{} holds no manifest", file.display());
            checked.push(file);
        }
    }
    for expected in [
        "wasmplugin.yaml",
        "auth-demo.yaml",
        "limitador.yaml",
        "redis.yaml",
    ] {
        assert!(
            checked.iter().any(|f| f.ends_with(expected)),
            "istio/{expected} was not checked: {checked:?}"
        );
    }
}

#[test]
fn kubectl_kustomize_renders_the_pinned_wasmplugin_and_every_rendered_manifest_matches_the_types() {
    let digest = "8574ea937deb3b37a4b52e274f6b8fa910b5b11f1141acc6d37b5730a8fe984a";
    let url = "oci://registry.internal:5000/token-ratelimit:0.1.0";
    let rendered = manifests::kustomize_with_module(
        &repo_root().join("istio"),
        Some(&module_patch(url, digest)),
    )
    .unwrap_or_else(|e| panic!("kubectl kustomize istio/: {e}"));
    let n = manifests::check_yaml(&rendered).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    assert!(n >= 6, "{n} manifests rendered:\n{rendered}");
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .collect();
    let plugin = docs
        .iter()
        .find(|d| d["kind"] == "WasmPlugin")
        .expect("a WasmPlugin");
    assert_eq!(plugin["spec"]["url"].as_str(), Some(url));
    assert_eq!(plugin["spec"]["sha256"].as_str(), Some(digest));
    // The rest of the plugin is istio/wasmplugin.yaml's.
    assert_eq!(
        plugin["spec"]["pluginConfig"],
        yaml_file(&repo_root().join("istio/wasmplugin.yaml"))["spec"]["pluginConfig"]
    );
    let limits = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "limitador-limits")
        .expect("the limits ConfigMap");
    assert_eq!(
        limits["data"]["limits.yaml"].as_str(),
        Some(std::fs::read_to_string(repo_root().join("istio/limits.yaml")).expect("limits"))
            .as_deref()
    );
}

#[test]
fn kustomize_refuses_istio_without_the_module_patch_make_push_writes() {
    // Nothing is deployed with the placeholder URL by accident: without istio/module.yaml the
    // kustomization does not build.
    let err = manifests::kustomize_with_module(&repo_root().join("istio"), None)
        .expect_err("istio/ without module.yaml was rendered");
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
    let filter = manifest("auth-demo.yaml");
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
    let text = std::fs::read_to_string(repo_root().join("istio/limitador.yaml")).expect("file");
    let deployment = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_json::to_value(
                <serde_yaml::Value as serde::Deserialize>::deserialize(d).expect("YAML"),
            )
            .expect("JSON")
        })
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
