//! An OCI registry of the test's own ([`Registry`]): the CNCF distribution registry
//! (`docker-registry`, the Debian package, or `$DOCKER_REGISTRY`) on a free loopback port, its
//! storage in a temporary directory; and [`pull_like_istio`], which fetches a Wasm module from
//! it the way Istio's agent does for a WasmPlugin's `oci://` URL (pkg/wasm/imagefetcher.go in
//! istio/istio), with the `oci-client` crate.
//!
//! [`pulled_module`] is the module the tutorial tests run: built into an image and pushed by
//! `token-ratelimit-oci` (what `make oci` and `make push` run), then pulled back and checked.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{bin, free_port, target_dir, wait_until, wasm, Process};

/// The Debian package that provides `docker-registry`.
const INSTALL_HINT: &str = "install docker-registry (Debian package: apt-get install docker-registry)";

/// OCI image manifest (image-spec manifest.md).
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The layer of Istio's "compat" Wasm image: a gzipped tar holding `plugin.wasm`.
pub const OCI_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The layer of a Docker image that Istio's agent reads `plugin.wasm` from.
pub const DOCKER_LAYER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// The module layer of Istio's "oci" Wasm artifact format (the raw module).
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// The `docker-registry` binary: `$DOCKER_REGISTRY`, else the first on `PATH`, else Debian's
/// `/usr/bin/docker-registry`. Panics, saying what to install, when there is none.
pub fn docker_registry() -> PathBuf {
    if let Some(p) = std::env::var_os("DOCKER_REGISTRY").map(PathBuf::from) {
        assert!(
            p.exists(),
            "$DOCKER_REGISTRY ({}) does not exist: {INSTALL_HINT}",
            p.display()
        );
        return p;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("docker-registry"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("docker-registry is not on PATH: {INSTALL_HINT}"))
}

/// A `docker-registry serve` on `127.0.0.1`, plain HTTP, no authentication, killed when dropped.
pub struct Registry {
    /// The port it listens on.
    pub port: u16,
    _process: Process,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an empty registry on a free loopback port; returns once `GET /v2/` answers 200
    /// (panics with its log when it does not within 30 s).
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            ),
        )
        .expect("registry config");
        let mut process = Process::spawn(
            "docker-registry",
            Command::new(docker_registry()).arg("serve").arg(&config),
            dir.path(),
        );
        let url = format!("http://127.0.0.1:{port}/v2/");
        let ready = wait_until("docker-registry", Duration::from_secs(30), || {
            process.exited().is_some()
                || reqwest::blocking::get(&url).is_ok_and(|r| r.status().is_success())
        });
        if let Some(code) = process.exited() {
            panic!("docker-registry exited with {code}:\n{}", process.output());
        }
        assert!(ready, "docker-registry does not answer:\n{}", process.output());
        Registry {
            port,
            _process: process,
            _dir: dir,
        }
    }

    /// `127.0.0.1:<port>`, the registry part of an image reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// What [`pull_like_istio`] fetched: the module, the manifest's digest (`sha256:HEX`) and the
/// media types it went by.
#[derive(Debug)]
pub struct Pulled {
    pub module: Vec<u8>,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    pub config_media_type: String,
    pub layer_media_types: Vec<String>,
}

/// Fetches the Wasm module of `reference` (`host:port/name:tag` or `...@sha256:HEX`, plain
/// HTTP) as Istio's agent does for a WasmPlugin `url: oci://reference` with `sha256: pin`:
///
/// - the manifest, accepted as an OCI image manifest or a Docker schema 2 manifest; with a pin,
///   refused unless the manifest's digest is `sha256:<pin>`;
/// - Docker schema 2: the module is `plugin.wasm` in the last layer, a
///   `rootfs.diff.tar.gzip`; otherwise first the "compat" format (the last layer an OCI
///   `tar+gzip` holding `plugin.wasm`), then the "oci" artifact format (exactly two layers, one
///   of them the raw module, `application/vnd.module.wasm.content.layer.v1+wasm`);
/// - every blob checked against its digest (by `oci-client`), and the module refused unless
///   it starts with the Wasm magic `\0asm` and has at least 8 bytes.
///
/// Errors are the reason the agent would give, as text.
pub fn pull_like_istio(reference: &str, pin: Option<&str>) -> Result<Pulled, String> {
    let image: oci_client::Reference = reference.parse().map_err(|e| format!("{e}"))?;
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (raw, digest) = client
            .pull_manifest_raw(&image, &auth, &[OCI_MANIFEST, DOCKER_MANIFEST])
            .await
            .map_err(|e| format!("fetching the manifest: {e}"))?;
        let computed = format!("sha256:{}", hex(&Sha256::digest(&raw)));
        if computed != digest {
            return Err(format!("the manifest is {computed}, the registry says {digest}"));
        }
        if let Some(pin) = pin {
            if digest != format!("sha256:{pin}") {
                return Err(format!(
                    "module digest mismatch: the WasmPlugin pins sha256 {pin}, the image is {digest}"
                ));
            }
        }
        let manifest: oci_client::manifest::OciImageManifest =
            serde_json::from_slice(&raw).map_err(|e| format!("parsing the manifest: {e}"))?;
        let manifest_media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| OCI_MANIFEST.to_string());
        let layer_media_types: Vec<String> =
            manifest.layers.iter().map(|l| l.media_type.clone()).collect();
        let last = manifest.layers.last().ok_or("the image has no layer")?;
        let fetch = |layer: oci_client::manifest::OciDescriptor| {
            let (client, image) = (&client, &image);
            async move {
                let mut blob = Vec::new();
                client
                    .pull_blob(image, &layer, &mut blob)
                    .await
                    .map_err(|e| format!("fetching layer {}: {e}", layer.digest))?;
                Ok::<_, String>(blob)
            }
        };
        let module = if manifest_media_type == DOCKER_MANIFEST {
            if last.media_type != DOCKER_LAYER_TAR_GZIP {
                return Err(format!("docker image: last layer is {}", last.media_type));
            }
            plugin_wasm_in_tar_gz(&fetch(last.clone()).await?)?
        } else if last.media_type == OCI_LAYER_TAR_GZIP {
            plugin_wasm_in_tar_gz(&fetch(last.clone()).await?)?
        } else if manifest.layers.len() == 2 {
            let layer = manifest
                .layers
                .iter()
                .find(|l| l.media_type == WASM_LAYER)
                .ok_or("oci artifact: no layer of the Wasm media type")?;
            fetch(layer.clone()).await?
        } else {
            return Err(format!(
                "not a Wasm image Istio pulls: layers {layer_media_types:?}"
            ));
        };
        if module.len() < 8 || !module.starts_with(b"\0asm") {
            return Err("fetched file is not a valid Wasm binary".into());
        }
        Ok(Pulled {
            module,
            manifest_digest: digest,
            manifest_media_type,
            config_media_type: manifest.config.media_type.clone(),
            layer_media_types,
        })
    })
}

/// The file whose base name is `plugin.wasm` in a gzipped tar.
fn plugin_wasm_in_tar_gz(blob: &[u8]) -> Result<Vec<u8>, String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if path.file_name().is_some_and(|n| n == "plugin.wasm") {
            let mut module = Vec::new();
            entry.read_to_end(&mut module).map_err(|e| e.to_string())?;
            return Ok(module);
        }
    }
    Err("plugin.wasm not found in the layer".into())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `token-ratelimit-oci ARGS`, asserting success; its standard output.
pub fn oci_tool(args: &[&str]) -> String {
    let out = Command::new(bin("token-ratelimit-oci"))
        .args(args)
        .output()
        .expect("token-ratelimit-oci");
    assert!(
        out.status.success(),
        "token-ratelimit-oci {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value after `  sha256: ` in `token-ratelimit-oci push`'s output (the WasmPlugin pin).
pub fn printed_pin(push_output: &str) -> String {
    push_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("sha256: "))
        .unwrap_or_else(|| panic!("no `sha256:` line in:\n{push_output}"))
        .to_string()
}

/// Builds the image of the built module ([`wasm`]) into `layout` with `token-ratelimit-oci
/// build` (as `make oci` does); the tool's output.
pub fn build_image(layout: &Path) -> String {
    oci_tool(&[
        "build",
        "--wasm",
        &wasm().display().to_string(),
        "--out",
        &layout.display().to_string(),
        "--tag",
        "e2e",
    ])
}

/// The module the tutorial tests load into Envoy: the built module, imaged and pushed to a
/// fresh [`Registry`] by `token-ratelimit-oci` and pulled back by [`pull_like_istio`] with the
/// pin `push` printed. Asserts the pulled bytes are the built module's. Done once per test
/// process; the registry is stopped afterwards and the module kept in the target directory
/// (`tmp/pulled-<sha256>.wasm`).
pub fn pulled_module() -> PathBuf {
    static PULLED: OnceLock<PathBuf> = OnceLock::new();
    PULLED
        .get_or_init(|| {
            let registry = Registry::start();
            let work = tempfile::tempdir().expect("temp dir");
            let layout = work.path().join("oci");
            build_image(&layout);
            let reference = format!("{}/token-ratelimit:e2e", registry.host());
            let pushed = oci_tool(&["push", "--layout", &layout.display().to_string(), &reference]);
            let pulled = pull_like_istio(&reference, Some(&printed_pin(&pushed)))
                .unwrap_or_else(|e| panic!("pulling {reference} as Istio does: {e}"));
            let built = std::fs::read(wasm()).expect("built module");
            assert!(pulled.module == built, "the pulled module differs from the built one");
            let dir = target_dir().join("tmp");
            std::fs::create_dir_all(&dir).expect("target/tmp");
            // Named by content: test processes that pull the same module share one file.
            let path = dir.join(format!("pulled-{}.wasm", hex(&Sha256::digest(&pulled.module))));
            let partial = dir.join(format!("pulled-{}.partial", std::process::id()));
            std::fs::write(&partial, &pulled.module).expect("pulled module");
            std::fs::rename(&partial, &path).expect("pulled module");
            path
        })
        .clone()
}
