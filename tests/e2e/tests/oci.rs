//! The module's OCI image (`make oci`, `make push`: `token-ratelimit-oci build` and `push`)
//! through a real registry, the CNCF distribution registry of Debian's `docker-registry`
//! package on a free loopback port, pulled back with `oci-client` the way Istio's agent pulls
//! a WasmPlugin's `oci://` URL (`e2e::registry::pull_like_istio`). The tutorial tests
//! (tests/tutorial.rs) run Envoy with a module pulled this way.

use e2e::registry::{
    build_image, oci_tool, printed_pin, pull_like_istio, Registry, OCI_LAYER_TAR_GZIP, OCI_MANIFEST,
};

fn built_module() -> Vec<u8> {
    std::fs::read(e2e::wasm()).expect("built module")
}

/// The `manifest sha256:HEX` digest `token-ratelimit-oci build` printed.
fn built_digest(build_output: &str) -> String {
    build_output
        .split_whitespace()
        .skip_while(|w| *w != "manifest")
        .nth(1)
        .unwrap_or_else(|| panic!("no manifest digest in:\n{build_output}"))
        .to_string()
}

/// Builds the image and pushes it to `registry` as `token-ratelimit:TAG`; returns the
/// reference, build's manifest digest and push's printed pin.
fn build_and_push(registry: &Registry, tag: &str) -> (String, String, String) {
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("oci");
    let digest = built_digest(&build_image(&layout));
    let reference = format!("{}/token-ratelimit:{tag}", registry.host());
    let pushed = oci_tool(&[
        "push",
        "--layout",
        &layout.display().to_string(),
        &reference,
    ]);
    assert!(
        pushed.contains(&format!("url: oci://{reference}")),
        "push prints the WasmPlugin url:\n{pushed}"
    );
    (reference, digest, printed_pin(&pushed))
}

#[test]
fn the_pushed_image_is_the_single_layer_format_istio_pulls_and_holds_the_built_module() {
    let registry = Registry::start();
    let (reference, digest, pin) = build_and_push(&registry, "0.1.0");
    // The pin for an oci:// URL is the manifest digest, the one `build` printed.
    assert_eq!(format!("sha256:{pin}"), digest);

    let pulled = pull_like_istio(&reference, Some(&pin)).expect("pulled as Istio does");
    assert_eq!(pulled.manifest_digest, digest);
    assert_eq!(pulled.manifest_media_type, OCI_MANIFEST);
    assert_eq!(
        pulled.config_media_type,
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(pulled.layer_media_types, [OCI_LAYER_TAR_GZIP]);
    assert!(
        pulled.module == built_module(),
        "the module changed on its way"
    );
}

#[test]
fn make_pushs_patch_makes_kubectl_kustomize_render_a_wasmplugin_that_pulls_the_pushed_module() {
    // The walk-through's path: `make push` writes istio/module.yaml, `kubectl apply -k istio/`
    // applies what `kubectl kustomize istio/` renders, and Istio's agent pulls the WasmPlugin's
    // url and checks it against its sha256.
    let registry = Registry::start();
    let work = tempfile::tempdir().expect("temp dir");
    let layout = work.path().join("oci");
    let digest = built_digest(&build_image(&layout));
    let reference = format!("{}/token-ratelimit:0.1.0", registry.host());
    let patch = work.path().join("module.yaml");
    let pushed = oci_tool(&[
        "push",
        "--layout",
        &layout.display().to_string(),
        "--patch",
        &patch.display().to_string(),
        &reference,
    ]);
    assert!(pushed.contains("kustomize patch:"), "{pushed}");
    let module = std::fs::read_to_string(&patch).expect("the patch push wrote");

    let rendered = manifests::kustomize_with(
        &e2e::repo_root().join("istio"),
        "",
        &[("module.yaml", Some(&module))],
    )
    .unwrap_or_else(|e| panic!("kubectl kustomize istio/: {e}"));
    manifests::check_yaml(&rendered).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    let docs = manifests::documents(&rendered).expect("YAML");
    let plugin = manifests::find(&docs, "WasmPlugin", "token-ratelimit").expect("the WasmPlugin");
    let url = plugin["spec"]["url"].as_str().expect("url");
    let sha256 = plugin["spec"]["sha256"].as_str().expect("sha256");
    assert_eq!(url, format!("oci://{reference}"));
    assert_eq!(format!("sha256:{sha256}"), digest);

    let pulled = pull_like_istio(url.trim_start_matches("oci://"), Some(sha256))
        .expect("the rendered WasmPlugin's module pulls and matches its pin");
    assert!(
        pulled.module == built_module(),
        "the module changed on its way"
    );
}

#[test]
fn a_pin_that_is_not_the_images_digest_is_refused_and_a_pull_by_digest_gets_the_same_module() {
    let registry = Registry::start();
    let (reference, digest, pin) = build_and_push(&registry, "pinned");
    let mut wrong = pin.clone().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).expect("hex");
    let err = pull_like_istio(&reference, Some(&wrong)).expect_err("a wrong pin is refused");
    assert!(err.contains("digest mismatch"), "{err}");

    let by_digest = format!("{}/token-ratelimit@{digest}", registry.host());
    let pulled = pull_like_istio(&by_digest, Some(&pin)).expect("pulled by digest");
    assert!(pulled.module == built_module());
}

#[test]
fn building_the_same_module_twice_gives_the_same_image_digest() {
    let work = tempfile::tempdir().expect("temp dir");
    let first = built_digest(&build_image(&work.path().join("a")));
    let second = built_digest(&build_image(&work.path().join("b")));
    assert_eq!(first, second);
    // And `build` replaces a layout rather than adding a second image to it: push takes
    // exactly one.
    let again = built_digest(&build_image(&work.path().join("a")));
    assert_eq!(again, first);
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(work.path().join("a/index.json")).expect("index.json"),
    )
    .expect("index.json is JSON");
    assert_eq!(index["manifests"].as_array().map(Vec::len), Some(1));
    let blobs = std::fs::read_dir(work.path().join("a/blobs/sha256"))
        .expect("blobs")
        .count();
    assert_eq!(blobs, 3, "manifest, config and layer, nothing else");
}

#[test]
fn a_bare_module_pushed_as_a_generic_file_layer_is_not_an_image_istio_pulls() {
    // What `oras push REF token_ratelimit.wasm` makes: one layer of oras's default file media
    // type holding the raw module. Istio's agent finds neither a tar+gzip layer nor the Wasm
    // artifact's two layers in it.
    let registry = Registry::start();
    let reference = format!("{}/token-ratelimit:bare", registry.host());
    let image: oci_client::Reference = reference.parse().expect("reference");
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(client.push(
            &image,
            &[oci_client::client::ImageLayer::new(
                built_module(),
                "application/vnd.oci.image.layer.v1.tar".to_string(),
                None,
            )],
            oci_client::client::Config::new(
                b"{}".to_vec(),
                "application/vnd.oci.empty.v1+json".to_string(),
                None,
            ),
            &oci_client::secrets::RegistryAuth::Anonymous,
            None,
        ))
        .expect("pushed");
    let err = pull_like_istio(&reference, None).expect_err("not a Wasm image");
    assert!(err.contains("not a Wasm image Istio pulls"), "{err}");
}

#[test]
fn build_refuses_a_file_that_is_not_a_wasm_module_and_push_a_directory_without_an_image() {
    let work = tempfile::tempdir().expect("temp dir");
    let not_wasm = work.path().join("module.wasm");
    std::fs::write(&not_wasm, b"#!/bin/sh\necho hi\n").expect("file");
    let tool = e2e::bin("token-ratelimit-oci");
    let out = std::process::Command::new(&tool)
        .args(["build", "--wasm"])
        .arg(&not_wasm)
        .arg("--out")
        .arg(work.path().join("oci"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a wasm module"), "{stderr}");
    assert!(!work.path().join("oci").exists(), "nothing is written");

    let out = std::process::Command::new(&tool)
        .args(["push", "--layout"])
        .arg(work.path())
        .arg("127.0.0.1:1/token-ratelimit:x")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not an OCI image layout"), "{stderr}");
}
