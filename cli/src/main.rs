//! `token-ratelimit`: validates a plugin configuration with the filter's own code, prints the
//! matching Limitador `limits.yaml`, and turns a Kuadrant `TokenRateLimitPolicy` into the Istio
//! resources that enforce it with token-ratelimit.
//!
//! The FILE of `validate`, `limits` and `json` is either
//! - a plugin configuration: the configuration itself (YAML or JSON), an Envoy configuration
//!   that embeds it (`envoy.filters.http.wasm` with a `google.protobuf.Struct` configuration),
//!   or an Istio `WasmPlugin` manifest (`spec.pluginConfig`): the first mapping that has a
//!   `rateLimitService` key, in any YAML document of the file, is taken; or
//! - a Kuadrant `TokenRateLimitPolicy` manifest (`kuadrant.io/*`), alone, in a multi-document
//!   file or in a `List` (`kubectl get -o yaml`): its limits become the plugin configuration's
//!   `limits`, and the settings a policy does not carry (`rateLimitService`, `auth`) come from
//!   the flags `--cluster`, `--domain`, `--timeout`, `--failure-mode`, `--mode` and
//!   `--auth-namespace` (refused with a plugin configuration, which sets them itself). A file
//!   may hold one policy, or plugin configurations, not both.
//!
//! `wasmplugin` reads a policy only and prints a `WasmPlugin` and the `limitador-limits`
//! ConfigMap for `kubectl apply -f -` (see `wasmplugin.rs` and docs/KUADRANT.md).

mod trlp;
mod wasmplugin;

use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use token_ratelimit::limits::limitador_limits;
use token_ratelimit::policy::Policy;
use trlp::{ServiceFlags, Translated};

#[derive(Parser)]
#[command(
    version,
    about = "Validate token-ratelimit plugin configurations and Kuadrant TokenRateLimitPolicies, \
             generate Limitador limits and Istio WasmPlugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const FILE_HELP: &str = "Plugin configuration, Envoy configuration, WasmPlugin manifest or \
                         Kuadrant TokenRateLimitPolicy manifest (YAML or JSON)";

#[derive(Subcommand)]
enum Command {
    /// Check a plugin configuration, or the one a TokenRateLimitPolicy makes, exactly as the
    /// filter does at configure time.
    Validate {
        #[arg(help = FILE_HELP)]
        file: PathBuf,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Print the Limitador `limits.yaml` matching a plugin configuration or a
    /// TokenRateLimitPolicy.
    Limits {
        #[arg(help = FILE_HELP)]
        file: PathBuf,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Print the plugin configuration found in FILE (or made from its TokenRateLimitPolicy) as
    /// the JSON Envoy hands the filter.
    Json {
        #[arg(help = FILE_HELP)]
        file: PathBuf,
        #[command(flatten)]
        service: ServiceFlags,
    },
    /// Print an Istio WasmPlugin enforcing a TokenRateLimitPolicy with token-ratelimit, and the
    /// ConfigMap `limitador-limits` (kuadrant-system) with its Limitador limits, for
    /// `kubectl apply -f -`.
    Wasmplugin {
        /// Kuadrant TokenRateLimitPolicy manifest (YAML or JSON).
        file: PathBuf,
        #[command(flatten)]
        service: ServiceFlags,
        /// Address of the token-ratelimit module (an OCI image, or https://...).
        #[arg(long, value_name = "URL", default_value = wasmplugin::DEFAULT_URL)]
        url: String,
        /// The module's checksum the WasmPlugin pins: for an oci:// URL the pushed image's
        /// manifest digest, for https:// the module file's sha256 (64 hex digits, `sha256:`
        /// optional).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Gateway (in the policy's namespace) the WasmPlugin targets instead of the policy's
        /// target; needed for a policy that targets an HTTPRoute or a Gateway listener, whose
        /// limits then apply to all the Gateway's traffic their `when` predicates match.
        #[arg(long, value_name = "NAME")]
        gateway: Option<String>,
    },
}

/// What FILE holds.
enum Loaded {
    /// A plugin configuration, as found.
    Plugin(serde_json::Value),
    /// A TokenRateLimitPolicy, as a plugin configuration.
    Policy(Box<Translated>),
}

/// The first mapping with a `rateLimitService` key, depth first.
fn find_plugin_config(v: &serde_json::Value) -> Option<&serde_json::Value> {
    match v {
        serde_json::Value::Object(map) => {
            if map.contains_key("rateLimitService") {
                return Some(v);
            }
            map.values().find_map(find_plugin_config)
        }
        serde_json::Value::Array(items) => items.iter().find_map(find_plugin_config),
        _ => None,
    }
}

/// The TokenRateLimitPolicies of one document: itself, or the items of a `List`.
fn find_policies(doc: &serde_json::Value) -> Result<Vec<&serde_json::Value>, String> {
    if trlp::is_policy(doc)? {
        return Ok(vec![doc]);
    }
    let mut found = Vec::new();
    if doc.get("kind").and_then(|k| k.as_str()) == Some("List") {
        if let Some(items) = doc.get("items").and_then(|i| i.as_array()) {
            for item in items {
                if trlp::is_policy(item)? {
                    found.push(item);
                }
            }
        }
    }
    Ok(found)
}

fn load(path: &Path, flags: &ServiceFlags) -> Result<(Loaded, Policy), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut policies = Vec::new();
    let mut plugin = None;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_yaml::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| format!("not YAML or JSON: {e}"))?;
        docs.push(serde_json::to_value(value).map_err(|e| e.to_string())?);
    }
    for doc in &docs {
        policies.extend(find_policies(doc)?);
        if plugin.is_none() {
            plugin = find_plugin_config(doc);
        }
    }
    match (policies.as_slice(), plugin) {
        ([], None) => Err(
            "no plugin configuration (a mapping with `rateLimitService`) and no \
             TokenRateLimitPolicy found"
                .into(),
        ),
        ([], Some(cfg)) => {
            let given = flags.given();
            if !given.is_empty() {
                return Err(format!(
                    "{} {} for a TokenRateLimitPolicy only: this plugin configuration sets \
                     `rateLimitService` and `auth` itself",
                    given.join(", "),
                    if given.len() == 1 { "is" } else { "are" }
                ));
            }
            let bytes = serde_json::to_vec(cfg).map_err(|e| e.to_string())?;
            let policy = Policy::from_json(&bytes).map_err(|e| e.to_string())?;
            Ok((Loaded::Plugin(cfg.clone()), policy))
        }
        ([doc], None) => {
            let translated = trlp::translate(doc, flags)?;
            let bytes = serde_json::to_vec(&translated.config).map_err(|e| e.to_string())?;
            let policy = Policy::from_json(&bytes).map_err(|e| translated.locate(&e))?;
            Ok((Loaded::Policy(Box::new(translated)), policy))
        }
        ([_], Some(_)) => Err(
            "holds both a TokenRateLimitPolicy and a plugin configuration: give one per file"
                .into(),
        ),
        (many, _) => Err(format!(
            "holds {} TokenRateLimitPolicies: give one per file",
            many.len()
        )),
    }
}

/// A word of the command line as a shell would need it.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `token-ratelimit <the arguments>`, for the headers of generated files.
fn command_line() -> String {
    std::iter::once("token-ratelimit".to_string())
        .chain(std::env::args().skip(1).map(|a| shell_word(&a)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(cli: Cli) -> Result<(), String> {
    let (Command::Validate { file, service }
    | Command::Limits { file, service }
    | Command::Json { file, service }
    | Command::Wasmplugin { file, service, .. }) = &cli.command;
    let at_file = |e: String| format!("{}: {e}", file.display());
    let (loaded, policy) = load(file, service).map_err(at_file)?;
    match (&cli.command, &loaded) {
        (Command::Validate { .. }, _) => {
            let rates: usize = policy.limits.iter().map(|l| l.rates.len()).sum();
            let from = match &loaded {
                Loaded::Plugin(_) => String::new(),
                Loaded::Policy(p) => format!(
                    " (TokenRateLimitPolicy {} on {})",
                    p.id(),
                    p.target.describe()
                ),
            };
            println!(
                "ok: {} limit(s), {} rate(s), domain `{}`, cluster `{}`{from}",
                policy.limits.len(),
                rates,
                policy.service.domain,
                policy.service.cluster
            );
        }
        (Command::Limits { .. }, _) => {
            let yaml =
                serde_yaml::to_string(&limitador_limits(&policy)).map_err(|e| e.to_string())?;
            println!("# Generated by `{}`: do not edit.", command_line());
            print!("{yaml}");
        }
        (Command::Json { .. }, Loaded::Plugin(cfg)) => println!("{cfg}"),
        (Command::Json { .. }, Loaded::Policy(p)) => println!(
            "{}",
            serde_json::to_string(&p.config).map_err(|e| e.to_string())?
        ),
        (Command::Wasmplugin { .. }, Loaded::Plugin(_)) => {
            return Err(at_file(
                "`wasmplugin` reads a TokenRateLimitPolicy; this is a plugin configuration \
                 (istio/wasmplugin.yaml shows a WasmPlugin written by hand)"
                    .into(),
            ))
        }
        (
            Command::Wasmplugin {
                url,
                sha256,
                gateway,
                ..
            },
            Loaded::Policy(p),
        ) => {
            let sha256 = sha256
                .as_deref()
                .map(wasmplugin::pinned_sha256)
                .transpose()?;
            if sha256.is_none() {
                eprintln!(
                    "token-ratelimit: note: the WasmPlugin does not pin the module; give --sha256 \
                     (the pushed image's digest) so that the gateway refuses any other"
                );
            }
            let rendered = wasmplugin::render(
                p,
                &limitador_limits(&policy),
                url,
                sha256.as_deref(),
                gateway.as_deref(),
                &command_line(),
            )
            .map_err(at_file)?;
            if let Some(note) = rendered.note {
                eprintln!("token-ratelimit: note: {note}");
            }
            print!("{}", rendered.yaml);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("token-ratelimit: {e}");
            ExitCode::FAILURE
        }
    }
}
