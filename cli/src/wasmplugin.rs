//! `token-ratelimit wasmplugin`: the Istio resources that enforce a `TokenRateLimitPolicy` with
//! token-ratelimit, as multi-document YAML for `kubectl apply -f -`:
//!
//! 1. a `WasmPlugin` (`extensions.istio.io/v1alpha1`) in the policy's namespace, targeting the
//!    policy's Gateway, with the generated plugin configuration and the settings of
//!    `istio/wasmplugin.yaml` (phase `STATS`, `failStrategy: FAIL_CLOSE`);
//! 2. the ConfigMap `limitador-limits` in `kuadrant-system` with the matching Limitador limits
//!    under `limits.yaml`, as `istio/kustomization.yaml` generates it for `istio/base/limitador.yaml`.

use crate::trlp::{PluginConfig, Translated};
use serde::Serialize;
use token_ratelimit::limits::LimitadorLimit;

/// The module's address when `--url` is not given (a placeholder: push the module's image and
/// give `--url` and `--sha256`).
pub const DEFAULT_URL: &str = "oci://registry.example.com/token-ratelimit:0.1.0";
/// The ConfigMap `istio/base/limitador.yaml` mounts.
pub const LIMITS_CONFIGMAP: &str = "limitador-limits";
/// The namespace of the Limitador in `istio/base/limitador.yaml`.
pub const LIMITS_NAMESPACE: &str = "kuadrant-system";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Resource<S: Serialize> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    #[serde(flatten)]
    body: S,
}

#[derive(Serialize)]
struct Metadata {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
}

#[derive(Serialize)]
struct WasmPluginBody<'a> {
    spec: WasmPluginSpec<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmPluginSpec<'a> {
    target_refs: Vec<TargetRef>,
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<&'a str>,
    image_pull_policy: &'static str,
    phase: &'static str,
    fail_strategy: &'static str,
    plugin_config: &'a PluginConfig,
}

#[derive(Serialize)]
struct TargetRef {
    group: &'static str,
    kind: &'static str,
    name: String,
}

#[derive(Serialize)]
struct ConfigMapBody {
    data: std::collections::BTreeMap<&'static str, String>,
}

/// What `wasmplugin` prints, and a note for stderr when the WasmPlugin applies to more traffic
/// than the policy targets.
pub struct Rendered {
    pub yaml: String,
    pub note: Option<String>,
}

/// The Gateway the WasmPlugin targets: `--gateway`, or the policy's own Gateway target.
fn gateway(policy: &Translated, flag: Option<&str>) -> Result<(String, Option<String>), String> {
    let t = &policy.target;
    let widened = |gw: &str| {
        format!(
            "the policy targets {}; the WasmPlugin applies its limits to all the traffic of \
             Gateway `{gw}` that their `when` predicates match",
            t.describe()
        )
    };
    match flag {
        Some(gw) => {
            let note = (t.kind != "Gateway" || t.name != gw || t.section_name.is_some())
                .then(|| widened(gw));
            Ok((gw.to_string(), note))
        }
        None if t.kind == "HTTPRoute" => Err(format!(
            "invalid configuration at `spec.targetRef`: a WasmPlugin cannot target an HTTPRoute \
             (`{}`): give `--gateway NAME`, the Gateway the route attaches to, and narrow the \
             limits to the route with a `when` predicate on its paths (e.g. \
             `request.url_path.startsWith(\"/v1/\")`), or target the Gateway in the policy",
            t.name
        )),
        None => match &t.section_name {
            Some(section) => Err(format!(
                "invalid configuration at `spec.targetRef.sectionName`: a WasmPlugin applies to \
                 a whole Gateway, not to its listener `{section}`: drop `sectionName`, or give \
                 `--gateway {}` to apply the limits to the whole Gateway",
                t.name
            )),
            None => Ok((t.name.clone(), None)),
        },
    }
}

/// `text` with `comment` lines inserted before its first line that starts with `line_start`.
fn comment_before(text: &str, line_start: &str, comment: &[&str]) -> String {
    let indent = &line_start[..line_start.len() - line_start.trim_start().len()];
    let mut out = String::with_capacity(text.len() + 256);
    let mut done = false;
    for line in text.split_inclusive('\n') {
        if !done && line.starts_with(line_start) {
            for c in comment {
                out.push_str(indent);
                out.push_str("# ");
                out.push_str(c);
                out.push('\n');
            }
            done = true;
        }
        out.push_str(line);
    }
    out
}

/// The `sha256` a WasmPlugin pins: for an `oci://` URL, Istio's agent compares it with the
/// image's manifest digest (for `https://`, with the module file's sha256), as 64 lower-case
/// hex digits without the `sha256:` of a digest
/// string (which is accepted and dropped here).
///
/// # Errors
///
/// Anything but 64 hex digits.
pub fn pinned_sha256(given: &str) -> Result<String, String> {
    let hex = given.strip_prefix("sha256:").unwrap_or(given);
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(format!(
            "--sha256 {given:?}: expected the pushed image's digest (64 hex digits)"
        ))
    }
}

/// The two documents for `policy`; `command` is the command line, for the headers.
///
/// # Errors
///
/// A target a WasmPlugin cannot have (see [`gateway`]), or a serialization failure.
pub fn render(
    policy: &Translated,
    limits: &[LimitadorLimit],
    url: &str,
    sha256: Option<&str>,
    gateway_flag: Option<&str>,
    command: &str,
) -> Result<Rendered, String> {
    let (gw, note) = gateway(policy, gateway_flag)?;
    let id = policy.id();
    let plugin = Resource {
        api_version: "extensions.istio.io/v1alpha1",
        kind: "WasmPlugin",
        metadata: Metadata {
            name: format!("token-ratelimit-{}", policy.name),
            namespace: policy.namespace.clone(),
        },
        body: WasmPluginBody {
            spec: WasmPluginSpec {
                target_refs: vec![TargetRef {
                    group: "gateway.networking.k8s.io",
                    kind: "Gateway",
                    name: gw.clone(),
                }],
                url,
                sha256,
                image_pull_policy: "IfNotPresent",
                phase: "STATS",
                fail_strategy: "FAIL_CLOSE",
                plugin_config: &policy.config,
            },
        },
    };
    let plugin_yaml = serde_yaml::to_string(&plugin).map_err(|e| e.to_string())?;
    let plugin_yaml = comment_before(
        &plugin_yaml,
        "  phase: ",
        &[
            "After authentication/authorization, so that the identity an auth filter left",
            "(ext_authz with Authorino, i.e. a Kuadrant AuthPolicy) is in dynamic metadata.",
        ],
    );
    let plugin_yaml = comment_before(
        &plugin_yaml,
        "  pluginConfig:",
        &[
            "Predicates on `request.url_path` assume the gateway normalizes paths",
            "(meshConfig.pathNormalization.normalization: DECODE_AND_MERGE_SLASHES).",
            "A WasmPlugin cannot set Envoy's allow_on_headers_stop_iteration, so reservations",
            "hold reservation.defaultAmount unless a limit sets its own reservation.amount.",
        ],
    );

    let limits_yaml = serde_yaml::to_string(limits).map_err(|e| e.to_string())?;
    let configmap = Resource {
        api_version: "v1",
        kind: "ConfigMap",
        metadata: Metadata {
            name: LIMITS_CONFIGMAP.to_string(),
            namespace: Some(LIMITS_NAMESPACE.to_string()),
        },
        body: ConfigMapBody {
            data: [(
                "limits.yaml",
                format!("# Generated by `{command}`: do not edit.\n{limits_yaml}"),
            )]
            .into_iter()
            .collect(),
        },
    };
    let configmap_yaml = serde_yaml::to_string(&configmap).map_err(|e| e.to_string())?;

    let mut yaml = format!(
        "# Generated by `{command}` from TokenRateLimitPolicy {id}: do not edit.\n\
         # Apply with `{command} | kubectl apply -f -`. Push the module\n\
         # (target/wasm32-wasip1/release/token_ratelimit.wasm) as an OCI image and give its\n\
         # address and digest with --url and --sha256.\n"
    );
    if let Some(note) = &note {
        yaml.push_str(&format!("# Note: {note}.\n"));
    }
    yaml.push_str(&format!(
        "#\n# token-ratelimit on Gateway `{gw}` with the limits of TokenRateLimitPolicy {id}.\n"
    ));
    yaml.push_str(&plugin_yaml);
    yaml.push_str(&format!(
        "---\n# The Limitador limits of TokenRateLimitPolicy {id}, for the Limitador of\n\
         # istio/base/limitador.yaml (it mounts this ConfigMap). It replaces the limits there.\n"
    ));
    yaml.push_str(&configmap_yaml);
    Ok(Rendered { yaml, note })
}
