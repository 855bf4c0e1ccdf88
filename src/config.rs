//! The plugin configuration: the `pluginConfig` of an Istio/Kuadrant `WasmPlugin`, or the
//! `configuration` string of Envoy's `envoy.filters.http.wasm`.
//!
//! Shaped like Kuadrant's `TokenRateLimitPolicy` spec (named limits with `rates`, `when`
//! predicates and `counters`), plus the rate-limit service to call. JSON on the wire (that is what
//! Envoy hands the plugin); the `token-ratelimit` command also reads YAML. Every field name is
//! camelCase and unknown fields are refused.
//!
//! ```yaml
//! rateLimitService:
//!   cluster: ratelimit        # Envoy cluster of a Limitador-compatible service (HTTP/2)
//!   domain: llm               # Limitador namespace the counters live in
//!   timeout: 100ms            # per CheckRateLimit call
//!   failureMode: deny         # deny | allow
//!   mode: auto                # auto | reservation | checkReport
//! auth:
//!   metadataNamespace: envoy.filters.http.ext_authz   # where `auth.*` is read from
//! reporting:
//!   flushPeriod: 100ms        # how often the root context sends aggregated reports
//!   timeout: 1s               # per Report call
//!   maxRetries: 3             # further attempts of a failed Report before it is dropped
//! reservation:                # what reservation mode holds before the upstream
//!   defaultAmount: 256        # tokens when the request declares nothing readable
//!   maxAmount: 100000         # most tokens one request reserves per category
//!   ttl: 60s                  # longest hold
//! limits:
//!   free:
//!     rates: [{limit: 50, window: 1m}]
//!     when: [{predicate: 'request.path == "/v1/chat/completions"'}]
//!     counters: [{expression: auth.identity.userid}]
//!     tokens: total           # total | prompt | completion | cost
//!   team-dollars:             # a cost budget: micro-dollars per 30 days
//!     rates: [{limit: 100000000, window: 30d}]
//!     counters: [{expression: auth.identity.team}]
//!     tokens: cost
//!     prices:                 # per million tokens, in the limit's unit
//!       default: {prompt: 2500000, cached: 250000, completion: 10000000}
//! ```

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A configuration that was refused, naming the field (a dotted path such as
/// `limits.free.rates[0].window`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Path of the offending field, `.` when the document itself is wrong.
    pub field: String,
    /// Why it was refused.
    pub reason: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration at `{}`: {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for ConfigError {}

/// What to do when the rate-limit service is unreachable, slow, or answers garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureMode {
    /// Refuse the request with an error reply (`500`). The default: a billing control fails closed.
    #[default]
    Deny,
    /// Let the request through unchecked (its tokens are still reported later).
    Allow,
}

/// Which usage figure a limit spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TokenCategory {
    /// `usage.total_tokens` (or prompt + completion when the total is absent).
    #[default]
    Total,
    /// `usage.prompt_tokens` (`input_tokens` in the Responses API).
    Prompt,
    /// `usage.completion_tokens` (`output_tokens` in the Responses API).
    Completion,
    /// A cost computed from the usage by the limit's `cost` expression or `prices` table, in
    /// the unit the limit's rates are written in (e.g. micro-dollars).
    Cost,
}

impl TokenCategory {
    /// All categories, in a fixed order.
    pub const ALL: [TokenCategory; 4] = [
        TokenCategory::Total,
        TokenCategory::Prompt,
        TokenCategory::Completion,
        TokenCategory::Cost,
    ];

    /// The name used in configuration and metrics: `total`, `prompt`, `completion`, `cost`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenCategory::Total => "total",
            TokenCategory::Prompt => "prompt",
            TokenCategory::Completion => "completion",
            TokenCategory::Cost => "cost",
        }
    }
}

/// The whole plugin configuration, as written by the user.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    /// `rateLimitService`: where the rate-limit service is, how requests are admitted.
    pub rate_limit_service: RateLimitServiceConfig,
    /// `auth`: where the identity of an auth filter is read from.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `reporting`: how reports and commits are sent.
    #[serde(default)]
    pub reporting: ReportingConfig,
    /// `usage`: how usage is read from responses.
    #[serde(default)]
    pub usage: UsageConfig,
    /// `requestBody`: how the request body is read.
    #[serde(default)]
    pub request_body: RequestBodyConfig,
    /// `reservation`: what reservation mode reserves by default.
    #[serde(default)]
    pub reservation: ReservationConfig,
    /// `rateLimitHeaders`: which rate-limit headers responses carry (default `draft03`).
    #[serde(default)]
    pub rate_limit_headers: RateLimitHeaders,
    /// Named limits; the names become descriptor entries `limit.<name>`.
    pub limits: BTreeMap<String, LimitConfig>,
}

/// Which rate-limit headers the filter adds to responses (`rateLimitHeaders`). Every `429`
/// carries `retry-after` (seconds) and `retry-after-ms` (milliseconds, read by OpenAI's SDKs)
/// whatever the choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitHeaders {
    /// `x-ratelimit-limit`, `x-ratelimit-remaining`, `x-ratelimit-reset` (seconds), as in
    /// draft-ietf-httpapi-ratelimit-headers-03 and Envoy's rate-limit filter.
    #[default]
    Draft03,
    /// OpenAI's names: `x-ratelimit-limit-tokens`, `x-ratelimit-remaining-tokens`,
    /// `x-ratelimit-reset-tokens` (a duration such as `6m0s`, `1.5s`, `20ms`).
    Openai,
    /// The IETF structured fields `RateLimit-Policy` and `RateLimit`
    /// (draft-ietf-httpapi-ratelimit-headers-09 and later).
    Ietf,
    /// No rate-limit headers (a `429` still carries `retry-after` and `retry-after-ms`).
    None,
}

/// Whether a limit refuses requests over its budget (`enforcement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Enforcement {
    /// Over budget: `429`, the upstream is not called.
    #[default]
    Enforce,
    /// Checked and spent like an enforced limit, never refuses: a request it would have
    /// refused goes on, marked (a response header, a metric, its usage record). For rolling a
    /// new budget out.
    Shadow,
}

/// Where the rate-limit service is and how to treat its failures.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitServiceConfig {
    /// Envoy cluster name of a Limitador-compatible gRPC service (the cluster must speak HTTP/2).
    pub cluster: String,
    /// Domain of every request, i.e. the Limitador namespace the counters live in.
    pub domain: String,
    /// Timeout of each `CheckRateLimit` call, e.g. `100ms` (default `100ms`).
    #[serde(default = "default_check_timeout")]
    pub timeout: String,
    /// What to do when the service fails (default `deny`).
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// How requests are admitted before the upstream (default `auto`).
    #[serde(default)]
    pub mode: AdmissionMode,
    /// Leases (reservation mode): a hot counter's requests admitted locally from a larger
    /// reservation held by the Envoy worker. Absent: off.
    #[serde(default)]
    pub lease: Option<LeaseConfig>,
}

/// `rateLimitService.lease`: when and how large a worker leases a counter's budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaseConfig {
    /// Off when false, keeping the other settings (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A lease holds this fraction of the smallest rate of the limits it serves, in (0, 0.25]
    /// (default 0.1), plus the holds of the requests it carries from the lease before. A
    /// number, or a string of one: Envoy hands a YAML `0.1` of a `Struct` configuration over
    /// as the string `"0.1"`.
    #[serde(
        default = "default_lease_fraction",
        deserialize_with = "number_or_numeric_string"
    )]
    pub fraction: f64,
    /// Most tokens a lease holds for new requests (default 1,000,000).
    #[serde(default = "default_lease_max_amount")]
    pub max_amount: u64,
    /// A counter is leased once the worker saw this many of its requests within one `ttl`,
    /// and only if a lease holds at least this many of its reservation amounts (default 4).
    #[serde(default = "default_lease_min_requests")]
    pub min_requests: u32,
    /// How long a lease's hold lives, e.g. `30s` (default `30s`; the service may cap it, and
    /// it never outlives the counter's window). Renewed after half of it.
    #[serde(default = "default_lease_ttl")]
    pub ttl: String,
}

fn default_lease_fraction() -> f64 {
    0.1
}

/// A number, or a string holding one (`"0.1"`).
fn number_or_numeric_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(f64),
        Text(String),
    }
    match Either::deserialize(d)? {
        Either::Number(n) => Ok(n),
        Either::Text(t) => t
            .trim()
            .parse::<f64>()
            .map_err(|_| serde::de::Error::custom(format!("`{t}` is not a number"))),
    }
}

fn default_lease_max_amount() -> u64 {
    1_000_000
}

fn default_lease_min_requests() -> u32 {
    4
}

fn default_lease_ttl() -> String {
    "30s".into()
}

/// How a request is admitted before the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AdmissionMode {
    /// `reservation`, falling back to `checkReport` for the life of the VM when the service
    /// answers `Reserve` with gRPC `UNIMPLEMENTED` (Limitador 2.4 and earlier).
    #[default]
    Auto,
    /// `Reserve` the request's estimated tokens before the upstream (refused: 429) and
    /// `Commit` the actual tokens after, which releases the hold. Concurrent requests cannot
    /// pass a budget together.
    Reservation,
    /// `CheckRateLimit` with zero hits before the upstream and `Report` of the actual tokens
    /// after. Nothing holds capacity in between.
    CheckReport,
}

fn default_check_timeout() -> String {
    "100ms".into()
}

/// Where the identity of an auth filter is read from.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthConfig {
    /// Dynamic-metadata namespace whose fields the CEL variable `auth` exposes:
    /// `auth.identity.userid` reads `metadata.filter_metadata[<namespace>].identity.userid`.
    /// Default `envoy.filters.http.ext_authz`, where ext_authz (Authorino) leaves it.
    #[serde(default = "default_auth_namespace")]
    pub metadata_namespace: String,
}

fn default_auth_namespace() -> String {
    "envoy.filters.http.ext_authz".into()
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            metadata_namespace: default_auth_namespace(),
        }
    }
}

/// How spent tokens are reported.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReportingConfig {
    /// Period of the root context's tick that sends aggregated reports (default `100ms`).
    #[serde(default = "default_flush_period")]
    pub flush_period: String,
    /// Timeout of each `Report` call (default `1s`).
    #[serde(default = "default_report_timeout")]
    pub timeout: String,
    /// Further attempts of a failed `Report` or `Commit` before its tokens are dropped and
    /// counted (default 8: with the default `flushPeriod`, retries span about 16 s, see
    /// [`crate::reports::Backoff`]).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_flush_period() -> String {
    "100ms".into()
}
fn default_report_timeout() -> String {
    "1s".into()
}
fn default_max_retries() -> u32 {
    8
}

impl Default for ReportingConfig {
    fn default() -> Self {
        ReportingConfig {
            flush_period: default_flush_period(),
            timeout: default_report_timeout(),
            max_retries: default_max_retries(),
        }
    }
}

/// What a response without usage is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Fallback {
    /// An estimate from the text exchanged, by the rule of
    /// [`WORD_CHARS_PER_TOKEN`](crate::estimate::WORD_CHARS_PER_TOKEN): prompt = the request's
    /// prompt estimate (its text fields), completion = the generated text of the response body
    /// (decompressed, as far as it got; every word of a body that is not JSON), total = their
    /// sum. Keys, ids and event-stream framing cost nothing.
    #[default]
    Estimate,
    /// `fixedTokens` in every category.
    Fixed,
    /// Nothing (the response is counted in `usage_missing` only).
    None,
}

/// What an error response the upstream answered without usage costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorCharge {
    /// Nothing: the upstream generated no tokens for it.
    Free,
    /// What `usage.fallback` charges any response without usage (the estimate by default).
    Fallback,
}

/// What error responses of the upstream cost when they carry no usage, per status class. A
/// response with usage is always charged its usage, whatever its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ErrorResponsesConfig {
    /// `4xx` (the request was refused before any generation: a prompt over the context, a bad
    /// parameter, the upstream's own rate limit). Default `free`.
    #[serde(default = "error_charge_free")]
    pub client_errors: ErrorCharge,
    /// `5xx` sent by the upstream (it may have generated before failing). Default `fallback`.
    #[serde(default = "error_charge_fallback")]
    pub server_errors: ErrorCharge,
}

fn error_charge_free() -> ErrorCharge {
    ErrorCharge::Free
}

fn error_charge_fallback() -> ErrorCharge {
    ErrorCharge::Fallback
}

impl Default for ErrorResponsesConfig {
    fn default() -> Self {
        ErrorResponsesConfig {
            client_errors: error_charge_free(),
            server_errors: error_charge_fallback(),
        }
    }
}

/// Custom usage locations: JSON pointers per category, tried in order before the format's own.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsagePathsConfig {
    /// JSON pointers (RFC 6901) to the prompt tokens.
    #[serde(default)]
    pub prompt: Vec<String>,
    /// JSON pointers to the completion tokens.
    #[serde(default)]
    pub completion: Vec<String>,
    /// JSON pointers to the total tokens.
    #[serde(default)]
    pub total: Vec<String>,
    /// JSON pointers to the cached prompt tokens (reported, not charged).
    #[serde(default)]
    pub cached: Vec<String>,
    /// JSON pointers to the prompt tokens written to the cache (`cacheWrite`; reported, not
    /// charged).
    #[serde(default)]
    pub cache_write: Vec<String>,
    /// JSON pointers to the reasoning tokens (reported, not charged).
    #[serde(default)]
    pub reasoning: Vec<String>,
}

/// How usage is read from responses and what a response without usage costs.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageConfig {
    /// Custom usage locations, tried before each format's own.
    #[serde(default)]
    pub paths: UsagePathsConfig,
    /// What a response without usage is charged (default `estimate`).
    #[serde(default)]
    pub fallback: Fallback,
    /// Tokens charged per category with `fallback: fixed`.
    #[serde(default)]
    pub fixed_tokens: u64,
    /// What error responses of the upstream without usage cost (default: `4xx` free, `5xx`
    /// the fallback).
    #[serde(default)]
    pub error_responses: ErrorResponsesConfig,
    /// Most bytes kept to find usage: a whole JSON document, or one event of a stream
    /// (default 4 MiB).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Add `stream_options.include_usage: true` to OpenAI streaming requests that lack it
    /// (default true), so that streamed responses report usage.
    #[serde(default = "default_true")]
    pub inject_stream_usage: bool,
    /// Largest figure (tokens) believed of one response; larger ones are cut to it and
    /// counted (default 100,000,000). An upstream cannot flood the service with reports.
    #[serde(default = "default_max_tokens_per_response")]
    pub max_tokens_per_response: u64,
    /// Write each limited request's usage record to filter state `wasm.token_ratelimit` for
    /// the access log (default true; see [`crate::record`]).
    #[serde(default = "default_true")]
    pub record: bool,
}

fn default_max_tokens_per_response() -> u64 {
    100_000_000
}

fn default_true() -> bool {
    true
}

/// What reservation mode reserves by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReservationConfig {
    /// Tokens reserved per token category when the filter cannot read what the request
    /// declares (no body in hand), and the completion tokens assumed for a request that
    /// declares no maximum (default 256).
    #[serde(default = "default_reservation_amount")]
    pub default_amount: u64,
    /// Most tokens one request reserves per token category (default 100,000). A reservation is
    /// also never larger than the smallest limit it reserves against.
    #[serde(default = "default_reservation_max")]
    pub max_amount: u64,
    /// How long a hold lives at most, e.g. `60s` (default `60s`; the service may cap it, and a
    /// hold never outlives its counter's window). A request that outlives its hold is still
    /// charged in full by its commit.
    #[serde(default = "default_reservation_ttl")]
    pub ttl: String,
}

fn default_reservation_amount() -> u64 {
    256
}

fn default_reservation_max() -> u64 {
    100_000
}

fn default_reservation_ttl() -> String {
    "60s".into()
}

impl Default for ReservationConfig {
    fn default() -> Self {
        ReservationConfig {
            default_amount: default_reservation_amount(),
            max_amount: default_reservation_max(),
            ttl: default_reservation_ttl(),
        }
    }
}

/// A limit's own reservation, overriding the default amount (as Kuadrant's policy does).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitReservationConfig {
    /// CEL expression of the tokens to reserve (an int or uint ≥ 0), over the request's
    /// attributes and `requestBodyJSON()`; capped by `reservation.maxAmount`.
    #[serde(default)]
    pub amount: Option<String>,
    /// How long this limit's hold lives at most (default `reservation.ttl`).
    #[serde(default)]
    pub ttl: Option<String>,
}

/// How the request body is read (for `requestBodyJSON()` and `include_usage` injection).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestBodyConfig {
    /// Most request body bytes buffered (default 1 MiB, Envoy's default buffer limit). A larger
    /// body passes unmodified, and `requestBodyJSON()` finds nothing in it.
    #[serde(default = "default_max_request_body_bytes")]
    pub max_bytes: usize,
    /// Must mirror `allow_on_headers_stop_iteration: true` in Envoy's Wasm plugin configuration
    /// (Envoy 1.35 and later): with it the filter can read the body before the request's headers
    /// go upstream, which `requestBodyJSON()` needs. Default false.
    #[serde(default)]
    pub allow_on_headers_stop_iteration: bool,
}

fn default_max_request_body_bytes() -> usize {
    1 << 20
}

impl Default for RequestBodyConfig {
    fn default() -> Self {
        RequestBodyConfig {
            max_bytes: default_max_request_body_bytes(),
            allow_on_headers_stop_iteration: false,
        }
    }
}

fn default_max_body_bytes() -> usize {
    4 << 20
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            paths: UsagePathsConfig::default(),
            fallback: Fallback::default(),
            fixed_tokens: 0,
            error_responses: ErrorResponsesConfig::default(),
            max_body_bytes: default_max_body_bytes(),
            inject_stream_usage: true,
            max_tokens_per_response: default_max_tokens_per_response(),
            record: true,
        }
    }
}

/// One named limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitConfig {
    /// At least one rate; several rates are several windows (e.g. per minute AND per day).
    pub rates: Vec<RateConfig>,
    /// CEL predicates that must all be true for the limit to apply (none: always applies).
    #[serde(default)]
    pub when: Vec<PredicateConfig>,
    /// CEL expressions whose values select the counter (e.g. one counter per user).
    #[serde(default)]
    pub counters: Vec<CounterConfig>,
    /// Which usage figure this limit spends (default `total`); `cost`: what its `cost`
    /// expression or `prices` table makes of the usage.
    #[serde(default)]
    pub tokens: TokenCategory,
    /// With `tokens: cost`: a CEL expression of the request's cost, an int or uint ≥ 0 in the
    /// unit of the limit's rates, over `usage.prompt`, `usage.completion`, `usage.total`,
    /// `usage.cached`, `usage.cacheWrite`, `usage.reasoning` (ints, tokens; 0 when not
    /// reported), `usage.model` (a string) and the request's attributes.
    #[serde(default)]
    pub cost: Option<String>,
    /// With `tokens: cost`: prices per million tokens per model (instead of `cost`).
    #[serde(default)]
    pub prices: Option<PricesConfig>,
    /// What reservation mode reserves for this limit (default: the request's own bound).
    #[serde(default)]
    pub reservation: Option<LimitReservationConfig>,
    /// What a request gets when a predicate, counter or reservation amount of this limit
    /// cannot be evaluated for it (default `deny`).
    #[serde(default)]
    pub on_error: OnError,
    /// `enforce` (default) or `shadow`: a shadow limit never refuses.
    #[serde(default)]
    pub enforcement: Enforcement,
}

/// A price table (`prices`): what a million tokens of each category cost, in the unit of the
/// limit's rates, per model. The request's model is its body's `model`, else the one the
/// response names; it picks the row of the same name, else the row whose name it starts with
/// followed by `-` (the longest: `gpt-4o` prices `gpt-4o-2024-08-06`), else `default`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PricesConfig {
    /// Rows by model name.
    #[serde(default)]
    pub models: BTreeMap<String, PriceRow>,
    /// The row of a model not in `models`, or of a request whose model is unknown.
    pub default: PriceRow,
}

/// One model's prices per million tokens, in the unit of the limit's rates (whole numbers).
/// A request costs `⌈(uncached prompt × prompt + cached × cached + cacheWrite × cacheWrite +
/// non-reasoning completion × completion + reasoning × reasoning) / 1,000,000⌉`, where the
/// uncached prompt is the prompt without its cached and cache-write tokens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriceRow {
    /// A million prompt (input) tokens.
    pub prompt: u64,
    /// A million completion (output) tokens.
    pub completion: u64,
    /// A million prompt tokens read from the provider's cache (default: `prompt`).
    #[serde(default)]
    pub cached: Option<u64>,
    /// A million prompt tokens written to the provider's cache (default: `prompt`).
    #[serde(default)]
    pub cache_write: Option<u64>,
    /// A million reasoning tokens (default: `completion`).
    #[serde(default)]
    pub reasoning: Option<u64>,
}

/// What happens to a request for which a limit's expression fails at run time (a missing
/// attribute or key, a value of the wrong type, an overflow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnError {
    /// Refuse the request (403, an error in OpenAI's shape): a limit that cannot be evaluated
    /// never turns into an unlimited budget.
    #[default]
    Deny,
    /// The limit does not apply to the request (the others still do); a failing
    /// reservation amount falls back to the request's own bound.
    Skip,
}

/// A budget of `limit` tokens per `window`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateConfig {
    /// Tokens allowed per window (> 0).
    pub limit: u64,
    /// Window length, a duration of whole seconds such as `30s`, `1m`, `1h`, `1d`, `1h30m`.
    pub window: String,
}

/// A `when` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PredicateConfig {
    /// A CEL expression that evaluates to a bool.
    pub predicate: String,
}

/// A `counters` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CounterConfig {
    /// A CEL expression whose value (string, int, uint, double or bool) qualifies the counter.
    pub expression: String,
}

/// Parses a plugin configuration from JSON bytes, with the path of the failing field in errors.
///
/// Only the document's shape is checked here; [`crate::policy::Policy::compile`] checks the
/// values (durations, CEL, rates).
pub fn parse_json(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(path, e.into_inner().to_string())
    })
}

/// Parses the plugin configuration as Envoy hands it over: JSON (a `google.protobuf.StringValue`
/// configuration, or what Istio makes of a `WasmPlugin`'s `pluginConfig`), or a serialized
/// `google.protobuf.Struct` (what Envoy 1.40 passes for a configuration of `@type`
/// `google.protobuf.Struct`). Whole numbers in a `Struct` (always doubles there) become integers.
pub fn parse_plugin_config(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    // The first byte cannot tell the two apart: a Struct starts with the tag of its first map
    // entry (0x0a) and that entry's length, which is `{` (0x7b) for a 123-byte entry. So a
    // document that looks like JSON and is not is tried as a Struct before it is refused.
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none() {
        return parse_json(bytes);
    }
    let looks_like_json = first == Some(&b'{');
    if looks_like_json {
        match parse_json(bytes) {
            Ok(cfg) => return Ok(cfg),
            Err(json_error) => return parse_struct(bytes).map_err(|_| json_error),
        }
    }
    parse_struct(bytes)
}

/// Parses a serialized `google.protobuf.Struct` configuration.
fn parse_struct(bytes: &[u8]) -> Result<PluginConfig, ConfigError> {
    let structure = <prost_types::Struct as prost::Message>::decode(bytes).map_err(|e| {
        ConfigError::new(
            ".",
            format!("neither JSON nor a google.protobuf.Struct: {e}"),
        )
    })?;
    let json = struct_to_json(structure);
    let text = serde_json::to_vec(&json).map_err(|e| ConfigError::new(".", e.to_string()))?;
    parse_json(&text)
}

fn struct_to_json(s: prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        s.fields
            .into_iter()
            .map(|(k, v)| (k, value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n >= 0.0 && n <= u64::MAX as f64 {
                serde_json::Value::from(n as u64)
            } else if n.fract() == 0.0 && n < 0.0 && n >= i64::MIN as f64 {
                serde_json::Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
        }
        Some(Kind::StructValue(s)) => struct_to_json(s),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.into_iter().map(value_to_json).collect())
        }
    }
}

/// Parses a duration such as `100ms`, `1s`, `1m`, `2h`, `1d` or a sum of those (`1h30m`).
///
/// Errors name what is wrong; a duration of zero is refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let bytes = s.as_bytes();
    let mut total_ms: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "`{text}` is not a duration (e.g. 100ms, 30s, 1m, 1h, 1d)"
            ));
        }
        let number: u64 = s[start..i]
            .parse()
            .map_err(|_| format!("`{text}`: number too large"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit_ms: u64 = match &s[unit_start..i] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(format!("`{text}`: missing unit (ms, s, m, h or d)")),
            other => {
                return Err(format!(
                    "`{text}`: unknown unit `{other}` (ms, s, m, h or d)"
                ))
            }
        };
        total_ms = number
            .checked_mul(unit_ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(|| format!("`{text}`: duration too large"))?;
    }
    if total_ms == 0 {
        return Err(format!("`{text}`: a duration must be greater than zero"));
    }
    Ok(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0s")
            .unwrap_err()
            .contains("greater than zero"));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999s")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_duration("99999999999999999s")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn unknown_field_is_named_with_its_path() {
        let err = parse_json(
            br#"{"rateLimitService":{"cluster":"c","domain":"d"},
                 "limits":{"free":{"rates":[{"limit":1,"window":"1m","burst":3}]}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "limits.free.rates[0].burst");
        assert!(err.reason.contains("unknown field `burst`"), "{err}");
    }

    #[test]
    fn defaults_apply() {
        let cfg = parse_json(br#"{"rateLimitService":{"cluster":"c","domain":"d"},"limits":{}}"#)
            .unwrap();
        assert_eq!(cfg.rate_limit_service.failure_mode, FailureMode::Deny);
        assert_eq!(cfg.rate_limit_service.timeout, "100ms");
        assert_eq!(cfg.auth.metadata_namespace, "envoy.filters.http.ext_authz");
        assert_eq!(cfg.reporting.max_retries, 8);
    }

    #[test]
    fn a_serialized_struct_is_read_like_json() {
        use prost::Message;
        use prost_types::value::Kind;
        fn v(kind: Kind) -> prost_types::Value {
            prost_types::Value { kind: Some(kind) }
        }
        fn obj(fields: Vec<(&str, prost_types::Value)>) -> prost_types::Value {
            v(Kind::StructValue(prost_types::Struct {
                fields: fields
                    .into_iter()
                    .map(|(k, x)| (k.to_string(), x))
                    .collect(),
            }))
        }
        let rate = obj(vec![
            ("limit", v(Kind::NumberValue(50.0))),
            ("window", v(Kind::StringValue("1m".into()))),
        ]);
        let limit = obj(vec![(
            "rates",
            v(Kind::ListValue(prost_types::ListValue {
                values: vec![rate],
            })),
        )]);
        let Some(Kind::StructValue(root)) = obj(vec![
            (
                "rateLimitService",
                obj(vec![
                    ("cluster", v(Kind::StringValue("c".into()))),
                    ("domain", v(Kind::StringValue("d".into()))),
                ]),
            ),
            ("limits", obj(vec![("free", limit)])),
        ])
        .kind
        else {
            panic!("obj builds a struct value")
        };
        let cfg = parse_plugin_config(&root.encode_to_vec()).unwrap();
        assert_eq!(cfg.limits["free"].rates[0].limit, 50);
        let err = parse_plugin_config(b"\xff\xff").unwrap_err();
        assert!(err.reason.contains("neither JSON"), "{err}");

        // A Struct whose first entry is 123 bytes long starts with "\n{", as if it were JSON.
        let mut root = root;
        let limits = root.fields.remove("limits").unwrap();
        let found = (1..200).find_map(|n| {
            let mut r = root.clone();
            let Some(Kind::StructValue(mut l)) = limits.kind.clone() else {
                panic!("limits is a struct")
            };
            let free = l.fields.remove("free").unwrap();
            l.fields.insert(format!("l{}", "x".repeat(n)), free);
            r.fields.insert("limits".into(), v(Kind::StructValue(l)));
            let bytes = r.encode_to_vec();
            (bytes.get(..2) == Some(b"\n{")).then_some(bytes)
        });
        let bytes = found.expect("some padding gives a 123-byte first entry");
        assert_eq!(parse_plugin_config(&bytes).unwrap().limits.len(), 1);
    }

    #[test]
    fn bad_enum_value_is_refused() {
        let err = parse_json(
            br#"{"rateLimitService":{"cluster":"c","domain":"d","failureMode":"maybe"},"limits":{}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "rateLimitService.failureMode");
    }
}
