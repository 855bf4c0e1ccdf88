//! Kuadrant `TokenRateLimitPolicy` manifests as plugin configurations.
//!
//! The policy's limits (`spec.limits`, or `spec.defaults.limits` / `spec.overrides.limits`) are
//! already the plugin's `limits`; its top-level `when` predicates are added to every limit and
//! its `dataExtraction.response.totalTokens` pointers become `usage.paths.total`. What a policy
//! does not say (which rate-limit service, which domain, how to fail) comes from
//! [`ServiceFlags`]. Every field is checked: one token-ratelimit does not read is refused with
//! its path in the manifest, and the errors of the filter's own parser are moved back to the
//! manifest's paths ([`Translated::locate`]).

use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use token_ratelimit::config::ConfigError;

/// Istio's name for the gRPC port of the Limitador Service shipped in `istio/base/limitador.yaml`.
pub const DEFAULT_CLUSTER: &str = "outbound|8081||limitador.kuadrant-system.svc.cluster.local";
/// The plugin's own default `rateLimitService.timeout`.
pub const DEFAULT_TIMEOUT: &str = "100ms";
/// The plugin's own default `rateLimitService.failureMode`.
pub const DEFAULT_FAILURE_MODE: &str = "deny";
/// The plugin's own default `rateLimitService.mode`.
pub const DEFAULT_MODE: &str = "auto";
/// Where ext_authz (Authorino, i.e. a Kuadrant AuthPolicy) leaves the identity.
pub const DEFAULT_AUTH_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// The settings a `TokenRateLimitPolicy` does not carry. Only for policy input: a plugin
/// configuration sets them itself.
#[derive(clap::Args, Debug, Default)]
pub struct ServiceFlags {
    /// Envoy cluster of the Limitador-compatible service [policy input only; default:
    /// outbound|8081||limitador.kuadrant-system.svc.cluster.local, the Limitador of istio/]
    #[arg(long, value_name = "CLUSTER")]
    pub cluster: Option<String>,
    /// Limitador namespace of the counters [policy input only; default:
    /// <metadata.namespace>/<spec.targetRef.name>, as Kuadrant names it after the target]
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Timeout of each call to the service [policy input only; default: 100ms]
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// What to do when the service fails [policy input only; default: deny]
    #[arg(long, value_name = "MODE", value_parser = ["deny", "allow"])]
    pub failure_mode: Option<String>,
    /// How requests are admitted [policy input only; default: auto]
    #[arg(long, value_name = "MODE", value_parser = ["auto", "reservation", "checkReport"])]
    pub mode: Option<String>,
    /// Dynamic-metadata namespace `auth.*` is read from [policy input only; default:
    /// envoy.filters.http.ext_authz]
    #[arg(long, value_name = "NAMESPACE")]
    pub auth_namespace: Option<String>,
}

impl ServiceFlags {
    /// The flags given, as typed on the command line.
    pub fn given(&self) -> Vec<&'static str> {
        [
            (self.cluster.is_some(), "--cluster"),
            (self.domain.is_some(), "--domain"),
            (self.timeout.is_some(), "--timeout"),
            (self.failure_mode.is_some(), "--failure-mode"),
            (self.mode.is_some(), "--mode"),
            (self.auth_namespace.is_some(), "--auth-namespace"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }
}

/// The plugin configuration generated from a policy, in the order `istio/wasmplugin.yaml`
/// writes it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    /// `rateLimitService`, from the flags.
    pub rate_limit_service: Service,
    /// `auth`, from the flags.
    pub auth: Auth,
    /// `usage`, from `dataExtraction`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// `limits`, from the policy's limits.
    pub limits: BTreeMap<String, Limit>,
}

/// `rateLimitService`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub cluster: String,
    pub domain: String,
    pub timeout: String,
    pub failure_mode: String,
    pub mode: String,
}

/// `auth`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Auth {
    pub metadata_namespace: String,
}

/// `usage`: only the total-token pointers of `dataExtraction.response.totalTokens`.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub paths: UsagePaths,
}

/// `usage.paths`.
#[derive(Debug, Clone, Serialize)]
pub struct UsagePaths {
    pub total: Value,
}

/// One limit. The values are the manifest's, passed on for the filter's parser to check.
#[derive(Debug, Clone, Serialize)]
pub struct Limit {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counters: Option<Value>,
    /// Always `total`: a `TokenRateLimitPolicy` counts total tokens.
    pub tokens: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<Reservation>,
}

/// A limit's `reservation`.
#[derive(Debug, Clone, Serialize)]
pub struct Reservation {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// What the policy targets (`spec.targetRef`).
#[derive(Debug, Clone)]
pub struct Target {
    /// `Gateway` or `HTTPRoute`.
    pub kind: String,
    pub name: String,
    pub section_name: Option<String>,
}

impl Target {
    /// `Gateway `gw``, `HTTPRoute `chat` section `rule-1``.
    pub fn describe(&self) -> String {
        match &self.section_name {
            Some(section) => format!("{} `{}` section `{section}`", self.kind, self.name),
            None => format!("{} `{}`", self.kind, self.name),
        }
    }
}

/// A policy turned into a plugin configuration.
#[derive(Debug, Clone)]
pub struct Translated {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`, when the manifest has one.
    pub namespace: Option<String>,
    pub target: Target,
    pub config: PluginConfig,
    /// Where the limits were: `spec`, `spec.defaults` or `spec.overrides`.
    proper_at: &'static str,
    /// How many top-level `when` predicates lead every limit's `when`.
    top_when: usize,
}

impl Translated {
    /// `namespace/name` of the policy (`name` alone without a namespace).
    pub fn id(&self) -> String {
        qualified(self.namespace.as_deref(), &self.name)
    }

    /// An error of the filter's parser on [`Translated::config`], at the manifest's path (or
    /// the flag) it comes from.
    pub fn locate(&self, err: &ConfigError) -> String {
        let flag = match err.field.as_str() {
            "rateLimitService.cluster" => Some("--cluster"),
            "rateLimitService.domain" => Some("--domain"),
            "rateLimitService.timeout" => Some("--timeout"),
            "rateLimitService.failureMode" => Some("--failure-mode"),
            "rateLimitService.mode" => Some("--mode"),
            "auth.metadataNamespace" => Some("--auth-namespace"),
            _ => None,
        };
        if let Some(flag) = flag {
            return format!("invalid {flag}: {}", err.reason);
        }
        at(
            &self.manifest_path(&err.field),
            without_position(&err.reason),
        )
        .to_string()
    }

    fn manifest_path(&self, field: &str) -> String {
        let proper = self.proper_at;
        if let Some(rest) = field.strip_prefix("usage.paths") {
            let rest = rest.strip_prefix(".total").unwrap_or(rest);
            return format!("{proper}.dataExtraction.response.totalTokens{rest}");
        }
        let Some(after) = field.strip_prefix("limits.") else {
            return match field {
                "limits" => format!("{proper}.limits"),
                other => other.to_string(),
            };
        };
        // The longest limit name the path starts with (names may hold dots).
        let name = self
            .config
            .limits
            .keys()
            .filter(|name| {
                after
                    .strip_prefix(name.as_str())
                    .is_some_and(|r| r.is_empty() || r.starts_with('.') || r.starts_with('['))
            })
            .max_by_key(|name| name.len());
        let Some(name) = name else {
            return format!("{proper}.{field}");
        };
        let rest = &after[name.len()..];
        if let Some(when) = rest.strip_prefix(".when[") {
            if let Some((index, tail)) = when.split_once(']') {
                if let Ok(i) = index.parse::<usize>() {
                    return if i < self.top_when {
                        format!("{proper}.when[{i}]{tail}")
                    } else {
                        format!("{proper}.limits.{name}.when[{}]{tail}", i - self.top_when)
                    };
                }
            }
        }
        format!("{proper}.limits.{name}{rest}")
    }
}

/// `reason` without serde's ` at line L column C`, a position in the generated JSON that the
/// user never sees.
fn without_position(reason: &str) -> String {
    let Some(i) = reason.rfind(" at line ") else {
        return reason.to_string();
    };
    let tail = &reason[i + " at line ".len()..];
    let position = tail.split_once(" column ").is_some_and(|(line, column)| {
        [line, column]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    if position {
        reason[..i].to_string()
    } else {
        reason.to_string()
    }
}

/// `namespace/name`, or `name` without a namespace.
pub fn qualified(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// A refusal at `field` of the manifest, worded as the filter words its own.
fn at(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Whether `doc` is a `TokenRateLimitPolicy` manifest; an error for one of another API group.
pub fn is_policy(doc: &Value) -> Result<bool, String> {
    if doc.get("kind").and_then(Value::as_str) != Some("TokenRateLimitPolicy") {
        return Ok(false);
    }
    match doc.get("apiVersion").and_then(Value::as_str) {
        Some(v) if v.starts_with("kuadrant.io/") => Ok(true),
        other => Err(format!(
            "a TokenRateLimitPolicy of apiVersion `{}`: token-ratelimit reads Kuadrant's \
             (`kuadrant.io/v1alpha1`)",
            other.unwrap_or("")
        )),
    }
}

/// Refuses every key of `map` not in `known`, naming it under `path`.
fn only(map: &Map<String, Value>, path: &str, known: &[&str]) -> Result<(), ConfigError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(at(
            &format!("{path}.{k}"),
            format!(
                "unknown field `{k}`: token-ratelimit reads {}",
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn mapping<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ConfigError> {
    match v {
        Value::Null => Err(at(path, "missing")),
        v => v.as_object().ok_or_else(|| at(path, "expected a mapping")),
    }
}

fn string<'a>(map: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a str, ConfigError> {
    match map.get(key) {
        None => Err(at(&format!("{path}.{key}"), "missing")),
        Some(v) => v
            .as_str()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| at(&format!("{path}.{key}"), "expected a non-empty string")),
    }
}

/// A list at `path`, or nothing when absent.
fn list(v: Option<&Value>, path: &str) -> Result<Vec<Value>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(at(path, "expected a list")),
    }
}

/// The policy `doc` (a `TokenRateLimitPolicy`, see [`is_policy`]) as a plugin configuration.
///
/// # Errors
///
/// The first field refused, as `invalid configuration at `<path in the manifest>`: <reason>`.
pub fn translate(doc: &Value, flags: &ServiceFlags) -> Result<Translated, String> {
    translate_checked(doc, flags).map_err(|e| e.to_string())
}

fn translate_checked(doc: &Value, flags: &ServiceFlags) -> Result<Translated, ConfigError> {
    let metadata = mapping(doc.get("metadata").unwrap_or(&Value::Null), "metadata")?;
    let name = string(metadata, "name", "metadata")?.to_string();
    let namespace = match metadata.get("namespace") {
        None | Some(Value::Null) => None,
        Some(_) => Some(string(metadata, "namespace", "metadata")?.to_string()),
    };
    let spec = mapping(doc.get("spec").unwrap_or(&Value::Null), "spec")?;
    only(
        spec,
        "spec",
        &[
            "targetRef",
            "limits",
            "when",
            "dataExtraction",
            "defaults",
            "overrides",
        ],
    )?;

    let target = target(spec)?;

    // Kuadrant's own rules: one of `limits`, `defaults` or `overrides`. With a single policy,
    // defaults and overrides are simply its limits (nothing lower or higher to merge with).
    let (proper_at, proper) = match (spec.get("defaults"), spec.get("overrides")) {
        (Some(_), Some(_)) => {
            return Err(at(
                "spec.overrides",
                "`spec.defaults` and `spec.overrides` are mutually exclusive",
            ))
        }
        (Some(d), None) => ("spec.defaults", mapping(d, "spec.defaults")?),
        (None, Some(o)) => ("spec.overrides", mapping(o, "spec.overrides")?),
        (None, None) => ("spec", spec),
    };
    if proper_at != "spec" {
        for key in ["limits", "when", "dataExtraction"] {
            if spec.contains_key(key) {
                return Err(at(
                    &format!("spec.{key}"),
                    format!("not allowed next to `{proper_at}`: move it into `{proper_at}`"),
                ));
            }
        }
        only(
            proper,
            proper_at,
            &["strategy", "limits", "when", "dataExtraction"],
        )?;
        if let Some(s) = proper.get("strategy") {
            if !matches!(s.as_str(), Some("atomic" | "merge")) {
                return Err(at(
                    &format!("{proper_at}.strategy"),
                    "expected `atomic` or `merge`",
                ));
            }
        }
    }

    let top_when = list(proper.get("when"), &format!("{proper_at}.when"))?;
    let limits_at = format!("{proper_at}.limits");
    let limits_map = mapping(proper.get("limits").unwrap_or(&Value::Null), &limits_at)?;
    if limits_map.is_empty() {
        return Err(at(
            &limits_at,
            "a TokenRateLimitPolicy needs at least one limit",
        ));
    }
    let mut limits = BTreeMap::new();
    for (limit_name, limit) in limits_map {
        let path = format!("{limits_at}.{limit_name}");
        limits.insert(limit_name.clone(), self::limit(limit, &path, &top_when)?);
    }

    let usage = match proper.get("dataExtraction") {
        None | Some(Value::Null) => None,
        Some(d) => {
            let path = format!("{proper_at}.dataExtraction");
            let d = mapping(d, &path)?;
            only(d, &path, &["response"])?;
            match d.get("response") {
                None | Some(Value::Null) => None,
                Some(r) => {
                    let path = format!("{path}.response");
                    let r = mapping(r, &path)?;
                    only(r, &path, &["totalTokens"])?;
                    r.get("totalTokens").map(|t| Usage {
                        paths: UsagePaths { total: t.clone() },
                    })
                }
            }
        }
    };

    let or = |flag: &Option<String>, default: &str| flag.clone().unwrap_or(default.to_string());
    let config = PluginConfig {
        rate_limit_service: Service {
            cluster: or(&flags.cluster, DEFAULT_CLUSTER),
            domain: flags
                .domain
                .clone()
                .unwrap_or_else(|| qualified(namespace.as_deref(), &target.name)),
            timeout: or(&flags.timeout, DEFAULT_TIMEOUT),
            failure_mode: or(&flags.failure_mode, DEFAULT_FAILURE_MODE),
            mode: or(&flags.mode, DEFAULT_MODE),
        },
        auth: Auth {
            metadata_namespace: or(&flags.auth_namespace, DEFAULT_AUTH_NAMESPACE),
        },
        usage,
        limits,
    };
    Ok(Translated {
        name,
        namespace,
        target,
        config,
        proper_at,
        top_when: top_when.len(),
    })
}

/// `spec.targetRef`, as Kuadrant accepts it: a Gateway API `Gateway` or `HTTPRoute`.
fn target(spec: &Map<String, Value>) -> Result<Target, ConfigError> {
    let path = "spec.targetRef";
    let t = mapping(
        spec.get("targetRef").ok_or_else(|| {
            at(
                path,
                "missing: a TokenRateLimitPolicy names the Gateway or HTTPRoute it applies to",
            )
        })?,
        path,
    )?;
    only(t, path, &["group", "kind", "name", "sectionName"])?;
    let group = string(t, "group", path)?;
    if group != "gateway.networking.k8s.io" {
        return Err(at(
            "spec.targetRef.group",
            format!("`{group}`: the only supported group is `gateway.networking.k8s.io`"),
        ));
    }
    let kind = string(t, "kind", path)?;
    if !matches!(kind, "Gateway" | "HTTPRoute") {
        return Err(at(
            "spec.targetRef.kind",
            format!("`{kind}`: a TokenRateLimitPolicy targets a `Gateway` or an `HTTPRoute`"),
        ));
    }
    let section_name = match t.get("sectionName") {
        None | Some(Value::Null) => None,
        Some(_) => Some(string(t, "sectionName", path)?.to_string()),
    };
    Ok(Target {
        kind: kind.to_string(),
        name: string(t, "name", path)?.to_string(),
        section_name,
    })
}

/// One limit of the policy at `path`, the policy's top-level predicates first.
fn limit(v: &Value, path: &str, top_when: &[Value]) -> Result<Limit, ConfigError> {
    let l = mapping(v, path)?;
    if l.contains_key("tokens") {
        return Err(at(
            &format!("{path}.tokens"),
            "a token-ratelimit plugin setting, not a TokenRateLimitPolicy field: a \
             TokenRateLimitPolicy limit counts total tokens (write a plugin configuration to \
             count prompt or completion tokens)",
        ));
    }
    only(l, path, &["rates", "when", "counters", "reservation"])?;
    let rates = match l.get("rates") {
        None | Some(Value::Null) => {
            return Err(at(
                &format!("{path}.rates"),
                "missing: token-ratelimit needs at least one rate per limit (Kuadrant applies \
                 no limit without rates)",
            ))
        }
        Some(r) => r.clone(),
    };
    let mut when = top_when.to_vec();
    when.extend(list(l.get("when"), &format!("{path}.when"))?);
    let reservation = match l.get("reservation") {
        None | Some(Value::Null) => None,
        Some(r) => Some(reservation(r, &format!("{path}.reservation"))?),
    };
    Ok(Limit {
        rates: Some(rates),
        when,
        counters: l.get("counters").filter(|c| !c.is_null()).cloned(),
        tokens: "total",
        reservation,
    })
}

/// A limit's `reservation`: `amount` an integer or a CEL expression, `ttl` a CEL
/// `duration("…")` literal (the plugin takes the duration itself).
fn reservation(v: &Value, path: &str) -> Result<Reservation, ConfigError> {
    let r = mapping(v, path)?;
    only(r, path, &["amount", "ttl"])?;
    let amount = match r.get("amount") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.is_u64() => Some(Value::String(n.to_string())),
        Some(Value::Number(_)) => {
            return Err(at(
                &format!("{path}.amount"),
                "expected a whole number of tokens ≥ 0 or a CEL expression",
            ))
        }
        Some(other) => Some(other.clone()),
    };
    let ttl = match r.get("ttl") {
        None | Some(Value::Null) => None,
        Some(t) => Some(duration_literal(t).ok_or_else(|| {
            at(
                &format!("{path}.ttl"),
                "token-ratelimit takes a literal `duration(\"30s\")` only, not another CEL \
                 expression",
            )
        })?),
    };
    Ok(Reservation { amount, ttl })
}

/// `30s` of the CEL `duration("30s")` (or `duration('30s')`).
fn duration_literal(v: &Value) -> Option<String> {
    let inner = v
        .as_str()?
        .trim()
        .strip_prefix("duration(")?
        .strip_suffix(')')?
        .trim();
    let text = inner
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| inner.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))?;
    (!text.contains(['"', '\'', '\\'])).then(|| text.to_string())
}
