//! `token-ratelimit-oci`: the wasm module as an OCI image that Istio's agent pulls, and its push
//! to a registry. `make oci` runs `build`, `make push REGISTRY=host:port/name:tag` runs `push`.
//!
//! The image is the single-layer format Istio calls "compat" (pkg/wasm/imagefetcher.go in
//! istio/istio; the WasmPlugin docs): an OCI image manifest
//! (`application/vnd.oci.image.manifest.v1+json`) whose one layer
//! (`application/vnd.oci.image.layer.v1.tar+gzip`) is a tar holding the module as `plugin.wasm`,
//! with an OCI image config (`application/vnd.oci.image.config.v1+json`) whose `rootfs.diff_ids`
//! name the uncompressed tar. Every OCI registry stores it and every OCI client pulls it.
//!
//! The image is written as an OCI image layout directory (the image-spec's `image-layout.md`) by
//! the `ocidir` crate and pushed blob by blob, then the manifest's exact bytes, with the
//! `oci-client` crate, so the digest `build` prints is the digest the registry serves. The build
//! is reproducible: the same module gives the same image digest (tar entries with mtime 0,
//! uid/gid 0 and mode 0644; a gzip header without a time; no creation time in the config).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use ocidir::cap_std::{ambient_authority, fs::Dir};
use ocidir::oci_spec::image::{
    ConfigBuilder, Descriptor, HistoryBuilder, ImageConfigurationBuilder, ImageManifest,
    MediaType, PlatformBuilder, RootFsBuilder,
};
use ocidir::prelude::OciRead;
use ocidir::OciDir;
use sha2::{Digest as _, Sha256};

/// The name Istio's agent looks for in the layer's tar (any directory; only the base name counts).
const MODULE_FILE: &str = "plugin.wasm";

#[derive(Parser)]
#[command(
    name = "token-ratelimit-oci",
    version,
    about = "Builds the wasm module's OCI image (the format Istio's WasmPlugin pulls) and pushes it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes an OCI image layout directory holding the module's image, replacing the
    /// directory, and prints the module's sha256 and the image's manifest digest.
    Build {
        /// The wasm module (a `\0asm` binary), e.g.
        /// target/wasm32-wasip1/release/token_ratelimit.wasm.
        #[arg(long)]
        wasm: PathBuf,
        /// The image layout directory to write (removed first if it exists).
        #[arg(long)]
        out: PathBuf,
        /// The tag recorded in the layout's index.json (`org.opencontainers.image.ref.name`).
        #[arg(long, default_value = "latest")]
        tag: String,
    },
    /// Pushes the image of a layout written by `build` to REFERENCE
    /// (`host[:port]/repository[:tag]`) and prints the WasmPlugin's `url` and `sha256`.
    ///
    /// Plain HTTP to loopback registries (localhost, 127.0.0.0/8, [::1]) and with
    /// `--plain-http`; HTTPS otherwise. Credentials, where the registry asks for them, from
    /// REGISTRY_USERNAME and REGISTRY_PASSWORD; anonymous without.
    Push {
        /// The image layout directory written by `build`.
        #[arg(long)]
        layout: PathBuf,
        /// Talk plain HTTP to a registry that is not on loopback.
        #[arg(long)]
        plain_http: bool,
        /// Also write a kustomize patch that sets the `token-ratelimit` WasmPlugin's `url` and
        /// `sha256` to the pushed image (istio/kustomization.yaml applies istio/module.yaml).
        #[arg(long)]
        patch: Option<PathBuf>,
        /// Also write a kustomize JSON patch (RFC 6902) that sets the module's `uri` and
        /// `sha256` in the `token-ratelimit` EnvoyFilter of per-model limits
        /// (istio/per-model/kustomization.yaml applies istio/per-model/module.yaml).
        #[arg(long)]
        envoyfilter_patch: Option<PathBuf>,
        /// Where to push, e.g. 127.0.0.1:5000/token-ratelimit:0.1.0.
        reference: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build { wasm, out, tag } => build(&wasm, &out, &tag).map(|built| {
            println!(
                "module: {} ({} bytes, sha256 {})",
                wasm.display(),
                built.module_size,
                built.module_sha256
            );
            println!(
                "image: {} (OCI image layout, tag {tag}), manifest {}",
                out.display(),
                built.manifest_digest
            );
        }),
        Command::Push {
            layout,
            plain_http,
            patch,
            envoyfilter_patch,
            reference,
        } => push(&layout, &reference, plain_http).and_then(|pushed| {
            println!("pushed: oci://{reference} (manifest {})", pushed.manifest_digest);
            println!("WasmPlugin spec:");
            println!("  url: oci://{reference}");
            println!("  sha256: {}", pushed.sha256());
            let patches = [
                (patch, wasmplugin_patch as fn(&str, &str) -> String),
                (envoyfilter_patch, envoyfilter_patch_of),
            ];
            for (path, text) in patches {
                if let Some(path) = path {
                    std::fs::write(&path, text(&reference, pushed.sha256()))
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("kustomize patch: {}", path.display());
                }
            }
            Ok(())
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("token-ratelimit-oci: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What `build` wrote: the module's size (bytes) and sha256 (hex), and the image manifest's
/// digest (`sha256:` and 64 hex digits).
struct Built {
    module_size: usize,
    module_sha256: String,
    manifest_digest: String,
}

fn build(wasm: &Path, out: &Path, tag: &str) -> Result<Built> {
    let module = std::fs::read(wasm).with_context(|| format!("reading {}", wasm.display()))?;
    // Istio's agent refuses anything else (pkg/wasm/cache.go: isValidWasmBinary).
    if module.len() < 8 || !module.starts_with(b"\0asm") {
        bail!("{} is not a wasm module (no \\0asm header)", wasm.display());
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let dir = Dir::open_ambient_dir(out, ambient_authority())
        .with_context(|| format!("opening {}", out.display()))?;
    let layout = OciDir::ensure(dir)?;

    let mut tar = tar::Builder::new(layout.create_gzip_layer(None)?);
    let mut header = tar::Header::new_ustar();
    header.set_size(module.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, MODULE_FILE, module.as_slice())?;
    let layer = tar.into_inner()?.complete()?;

    // ocidir starts a manifest from the empty config (`{}`), replaced below by the image's.
    let mut manifest = layout.new_empty_manifest()?.build()?;
    let empty_config = manifest.config().clone();
    // The image-spec's SHOULD, for registries that go by the manifest rather than its
    // Content-Type.
    manifest.set_media_type(Some(MediaType::ImageManifest));
    // `wasm`/`wasip1`: the platform the OCI ecosystem gives WASI preview 1 modules.
    let mut config = ImageConfigurationBuilder::default()
        .architecture("wasm")
        .os("wasip1")
        .config(ConfigBuilder::default().build()?)
        .rootfs(RootFsBuilder::default().typ("layers").diff_ids(Vec::<String>::new()).build()?)
        .build()?;
    let history = HistoryBuilder::default()
        .created_by(format!("token-ratelimit-oci build: {MODULE_FILE}"))
        .build()?;
    layout.push_layer_with_history(&mut manifest, &mut config, layer, Some(history));
    let platform = PlatformBuilder::default()
        .architecture("wasm")
        .os("wasip1")
        .build()?;
    let descriptor = layout.insert_manifest_and_config(manifest, config, Some(tag), platform)?;
    // Nothing refers to the empty config any more: leave only the image's blobs.
    let orphan = out.join("blobs/sha256").join(empty_config.digest().digest());
    std::fs::remove_file(&orphan).with_context(|| format!("removing {}", orphan.display()))?;
    Ok(Built {
        module_size: module.len(),
        module_sha256: hex(&Sha256::digest(&module)),
        manifest_digest: descriptor.digest().to_string(),
    })
}

/// What `push` did: the digest (`sha256:HEX`) of the manifest the registry now serves.
struct Pushed {
    manifest_digest: String,
}

impl Pushed {
    /// The WasmPlugin's `sha256` for an `oci://` URL: the manifest digest without `sha256:`
    /// (Istio's agent compares it with the digest of the manifest it pulls).
    fn sha256(&self) -> &str {
        self.manifest_digest
            .strip_prefix("sha256:")
            .unwrap_or(&self.manifest_digest)
    }
}

fn read_blob(layout: &OciDir, descriptor: &Descriptor) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    layout
        .read_blob(descriptor)?
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading blob {}", descriptor.digest()))?;
    let found = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
    if found != descriptor.digest().to_string() {
        bail!("blob {} holds {found}: the layout is corrupt", descriptor.digest());
    }
    Ok(bytes)
}

fn push(layout_dir: &Path, reference: &str, plain_http: bool) -> Result<Pushed> {
    for file in ["oci-layout", "index.json"] {
        if !layout_dir.join(file).is_file() {
            bail!(
                "{} is not an OCI image layout (no {file}): run `make oci` first",
                layout_dir.display()
            );
        }
    }
    let dir = Dir::open_ambient_dir(layout_dir, ambient_authority())
        .with_context(|| format!("opening {} (run `make oci` first)", layout_dir.display()))?;
    let layout = OciDir::open(dir)?;
    let index = layout.read_index()?;
    let [manifest_descriptor] = index.manifests().as_slice() else {
        bail!(
            "{} holds {} images; `build` writes one",
            layout_dir.display(),
            index.manifests().len()
        );
    };
    if manifest_descriptor.media_type() != &MediaType::ImageManifest {
        bail!("{} is not an OCI image manifest", manifest_descriptor.digest());
    }
    let manifest_bytes = read_blob(&layout, manifest_descriptor)?;
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("parsing manifest {}", manifest_descriptor.digest()))?;

    let image: oci_client::Reference = reference
        .parse()
        .with_context(|| format!("{reference:?} is not an image reference (host:port/name:tag)"))?;
    let loopback = is_loopback(image.registry());
    let protocol = if plain_http || loopback {
        oci_client::client::ClientProtocol::Http
    } else {
        oci_client::client::ClientProtocol::Https
    };
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol,
        ..Default::default()
    });
    let auth = match (
        std::env::var("REGISTRY_USERNAME"),
        std::env::var("REGISTRY_PASSWORD"),
    ) {
        (Ok(user), Ok(password)) => oci_client::secrets::RegistryAuth::Basic(user, password),
        _ => oci_client::secrets::RegistryAuth::Anonymous,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        client
            .auth(&image, &auth, oci_client::RegistryOperation::Push)
            .await
            .with_context(|| format!("authenticating to {}", image.registry()))?;
        for descriptor in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let blob = read_blob(&layout, descriptor)?;
            let digest = descriptor.digest().to_string();
            client
                .push_blob(&image, blob, &digest)
                .await
                .with_context(|| format!("pushing blob {digest} to {reference}"))?;
        }
        let content_type = http_header(MediaType::ImageManifest.to_string())?;
        client
            .push_manifest_raw(&image, manifest_bytes, content_type)
            .await
            .with_context(|| format!("pushing the manifest to {reference}"))?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(Pushed {
        manifest_digest: manifest_descriptor.digest().to_string(),
    })
}

fn http_header(value: String) -> Result<http::HeaderValue> {
    http::HeaderValue::try_from(value).map_err(|err| anyhow!("{err}"))
}

/// Whether a registry's `host[:port]` is on loopback, where plain HTTP is the norm (a local
/// `docker-registry`, a kind cluster's registry).
fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A strategic-merge patch of the `token-ratelimit` WasmPlugin (istio/wasmplugin.yaml) that pins
/// the pushed image: `url` `oci://REFERENCE` and `sha256` the manifest digest's hex.
fn wasmplugin_patch(reference: &str, sha256: &str) -> String {
    format!(
        "# Written by `make push` (token-ratelimit-oci push --patch): the image the WasmPlugin pulls,\n\
         # pinned by its manifest digest. istio/kustomization.yaml applies it to wasmplugin.yaml.\n\
         apiVersion: extensions.istio.io/v1alpha1\n\
         kind: WasmPlugin\n\
         metadata:\n  name: token-ratelimit\n  namespace: istio-system\n\
         spec:\n  url: oci://{reference}\n  sha256: {sha256}\n"
    )
}

/// The JSON patch (RFC 6902, as YAML) of the `token-ratelimit` EnvoyFilter
/// (istio/per-model/envoyfilter.yaml) that pins the pushed image in its first configPatch, the
/// filter's configuration: `vm_config.code.remote.http_uri.uri` `oci://REFERENCE` and
/// `remote.sha256` the manifest digest's hex, which Istio's agent checks as for a WasmPlugin.
fn envoyfilter_patch_of(reference: &str, sha256: &str) -> String {
    let remote = "/spec/configPatches/0/patch/value/typed_config/config/vm_config/code/remote";
    format!(
        "# Written by `make push` (token-ratelimit-oci push --envoyfilter-patch): the image the\n\
         # EnvoyFilter's Wasm configuration pulls, pinned by its manifest digest.\n\
         # istio/per-model/kustomization.yaml applies it to envoyfilter.yaml.\n\
         - op: add\n  path: {remote}/http_uri/uri\n  value: oci://{reference}\n\
         - op: add\n  path: {remote}/sha256\n  value: {sha256}\n"
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
