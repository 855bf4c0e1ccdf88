//! Checks Kubernetes manifests against the API types of what they configure, as `kubectl apply`
//! with strict field validation (its default) and the API server's schema check would:
//! Istio's `WasmPlugin` and `EnvoyFilter` against Istio's types (the `istio-api-rs` crate, whose
//! types kopium generated from the CRDs Istio publishes, here Istio 1.27's), and Kubernetes'
//! own kinds against `k8s-openapi`.
//!
//! A document is decoded into its type, encoded again and compared with what it was: a field the
//! type does not have (`failStratgy`, `matches`) is lost on the way and reported as unknown, a
//! value that is not one of a field's values (`phase: STAT`) or of the wrong shape fails to
//! decode. Free-form fields (a WasmPlugin's `pluginConfig`, an EnvoyFilter patch's `value`)
//! stay free-form, as in Istio's CRDs; what the plugin reads of them is checked by
//! `token-ratelimit validate`, and the Envoy side of a patch by a real Envoy (tests/e2e).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use istio_api_rs::extensions::v1alpha1::wasm_plugin::WasmPlugin;
use istio_api_rs::networking::v1alpha3::envoy_filter::EnvoyFilter;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};

/// Checks one manifest (a JSON object with `apiVersion` and `kind`) against its kind's type.
///
/// Errors: the kind is not one this checker knows (so that nothing passes unchecked), the
/// document does not decode into the type (a wrong enum value, a string for a number, a
/// missing required field), or a field of the document has no place in the type (reported
/// with its path, e.g. `spec.failStratgy`).
pub fn check(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or("<no name>");
    let what = format!("{kind} {name} ({api_version})");
    let result = match (api_version, kind) {
        ("extensions.istio.io/v1alpha1", "WasmPlugin") => round_trip::<WasmPlugin>(doc),
        ("networking.istio.io/v1alpha3", "EnvoyFilter") => round_trip::<EnvoyFilter>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("v1", "Namespace") => round_trip::<Namespace>(doc),
        ("v1", "Secret") => round_trip::<Secret>(doc),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        _ => Err("not a kind this check knows: add its type to manifests::check".to_string()),
    };
    result.map_err(|e| format!("{what}: {e}"))
}

/// Checks every document of a multi-document YAML text (`---` separated; empty documents
/// skipped). Errors name the document's kind and name.
pub fn check_yaml(text: &str) -> Result<usize, String> {
    let docs = documents(text)?;
    docs.iter().try_for_each(check)?;
    Ok(docs.len())
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T = serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    let again = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    compare("", doc, &again, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Records where `again` (the document after the round trip) lost or changed what `original`
/// had.
fn compare(path: &str, original: &Value, again: &Value, problems: &mut Vec<String>) {
    let at = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (original, again) {
        (Value::Object(fields), Value::Object(kept)) => {
            for (key, value) in fields {
                match kept.get(key) {
                    Some(v) => compare(&at(key), value, v, problems),
                    // An empty value the type leaves out says nothing either way.
                    None if is_empty(value) => {}
                    None => problems.push(format!("unknown field {}", at(key))),
                }
            }
        }
        (Value::Array(items), Value::Array(kept)) if items.len() == kept.len() => {
            for (i, (item, k)) in items.iter().zip(kept).enumerate() {
                compare(&format!("{path}[{i}]"), item, k, problems);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => problems.push(format!("{path}: {a} is read as {b}")),
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// What `kubectl kustomize` renders of the kustomization `kustomization` (a directory relative
/// to `root`, `""` for `root` itself) in a copy of `root` (istio/, so that the kustomization's
/// bases come along) in which each `(path, text)` of `files` (relative to `root`) is written
/// with `Some(text)` and removed with `None`: the patches `make push` writes (`module.yaml`,
/// `per-model/module.yaml`). The result is what `kubectl apply -k` would apply, as one
/// multi-document YAML text; the repository's files stay as they are.
///
/// Errors: `kubectl` is missing, or kustomize refused the directory (its stderr).
pub fn kustomize_with(
    root: &std::path::Path,
    kustomization: &str,
    files: &[(&str, Option<&str>)],
) -> Result<String, String> {
    let tmp = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let copy = tmp.path().join("root");
    copy_dir(root, &copy).map_err(|e| format!("copying {}: {e}", root.display()))?;
    for (path, text) in files {
        let file = copy.join(path);
        match text {
            Some(text) => std::fs::write(&file, text).map_err(|e| format!("{path}: {e}"))?,
            None if file.exists() => {
                std::fs::remove_file(&file).map_err(|e| format!("{path}: {e}"))?
            }
            None => {}
        }
    }
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(copy.join(kustomization))
        .output()
        .map_err(|e| format!("kubectl (`.ci/run` installs it): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    String::from_utf8(out.stdout).map_err(|e| format!("kubectl kustomize printed non-UTF-8: {e}"))
}

/// The documents of a multi-document YAML text, as JSON (empty documents skipped).
///
/// Errors: a document is not YAML, or has no JSON form.
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| format!("not YAML: {e}"))?;
        if !value.is_null() {
            docs.push(serde_json::to_value(&value).map_err(|e| e.to_string())?);
        }
    }
    Ok(docs)
}

/// The document of `kind` named `name` (`metadata.name`) among `docs` (as [`documents`] gives
/// them), if any.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let path = entry?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        if path.is_dir() {
            copy_dir(&path, &to.join(name))?;
        } else {
            std::fs::copy(&path, to.join(name))?;
        }
    }
    Ok(())
}
