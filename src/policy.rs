//! The compiled policy: limits with their rates, CEL `when` predicates and CEL `counters`,
//! evaluated per request into rate-limit descriptors.
//!
//! Everything is compiled once at configure time: CEL is parsed (`cel-parser`), the attribute
//! paths each expression reads are extracted from its syntax tree, and the CEL function registry
//! is built. Per request, an expression fetches only the attributes it uses (each at most once
//! per request, see [`Evaluation`]) and is evaluated in a child scope of the shared context.
//!
//! Descriptors follow Kuadrant's convention (see DESIGN.md §2): one descriptor per request with
//! an entry `limit.<name> = "1"` per limit that applies, plus one entry per counter, keyed by the
//! expression text, valued by its result as a string.

use crate::attributes::{self, Attribute, AttributeHost};
use crate::config::{self, ConfigError, FailureMode, Fallback, PluginConfig, TokenCategory};
use crate::usage::UsagePaths;
use cel_interpreter::extractors::This;
use cel_interpreter::objects::{Key, Map};
use cel_interpreter::{Context, ExecutionError, Value};
use cel_parser::{ArithmeticOp, Atom, Expression, Member, UnaryOp};
use ratelimit_proto::{Entry, RateLimitDescriptor};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Prefix of the descriptor entry that marks a limit as applying: `limit.<name>` = `"1"`.
pub const LIMIT_ENTRY_PREFIX: &str = "limit.";

/// A budget: `limit` tokens per `window_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    /// Tokens per window.
    pub limit: u64,
    /// Window length in seconds (Limitador's `seconds`: a fixed window from the first hit).
    pub window_seconds: u64,
}

/// A compiled CEL expression and the attributes it reads.
pub struct CompiledExpr {
    /// The source text, as configured (trimmed). Counter descriptor entries use it as key.
    pub source: String,
    expr: Expression,
    /// Indices into [`Policy::attributes`].
    attributes: Vec<usize>,
    /// Indices into [`Policy::bindings`]: the root variables this expression sees.
    bindings: Vec<usize>,
}

impl std::fmt::Debug for CompiledExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledExpr")
            .field("source", &self.source)
            .finish()
    }
}

/// One compiled limit.
#[derive(Debug)]
pub struct Limit {
    pub name: String,
    /// `limit.<name>`: the key of its descriptor entry.
    entry_key: String,
    pub rates: Vec<Rate>,
    pub when: Vec<CompiledExpr>,
    pub counters: Vec<CompiledExpr>,
    pub tokens: TokenCategory,
}

/// Rate-limit service settings with durations parsed.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub cluster: String,
    pub domain: String,
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    pub flush_period: Duration,
    pub report_timeout: Duration,
    pub max_retries: u32,
}

/// Usage settings, validated.
#[derive(Debug, Clone)]
pub struct UsageSettings {
    pub paths: UsagePaths,
    pub fallback: Fallback,
    pub fixed_tokens: u64,
    pub max_body_bytes: usize,
    pub inject_stream_usage: bool,
    /// Largest figure believed of one response (tokens).
    pub max_tokens_per_response: u64,
    /// Most request body bytes buffered.
    pub max_request_body_bytes: usize,
    /// Envoy lets the filter read the body while the headers are held.
    pub allow_on_headers_stop_iteration: bool,
}

/// The compiled plugin configuration.
pub struct Policy {
    pub service: ServiceSettings,
    pub usage: UsageSettings,
    /// Some expression reads the request body (`requestBodyJSON()`): the policy is evaluated
    /// once the body is complete.
    pub needs_body: bool,
    /// Limits in name order.
    pub limits: Vec<Limit>,
    /// Every attribute any expression reads, deduplicated.
    pub attributes: Vec<Attribute>,
    /// The request headers the policy reads, when it reads them by name only: the others are
    /// not converted for CEL (`None`: the whole map).
    header_names: Option<Vec<String>>,
    /// How each root variable an expression sees is built from attributes, deduplicated.
    bindings: Vec<Binding>,
    /// The `domain` field of every request to the service, encoded once.
    encoded_domain: Vec<u8>,
    context: Context<'static>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("service", &self.service)
            .field("limits", &self.limits)
            .field("attributes", &self.attributes)
            .finish()
    }
}

/// Why an expression could not be evaluated for a request (its limit then does not apply).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalError {
    pub limit: String,
    pub expression: String,
    pub reason: String,
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "limit `{}`: `{}` failed: {}",
            self.limit, self.expression, self.reason
        )
    }
}

/// A limit that applies to a request, with its counter entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Index into [`Policy::limits`].
    pub limit: usize,
    /// `(expression text, value)` per counter, in configuration order.
    pub counters: Vec<(String, String)>,
}

/// The outcome of evaluating the policy for one request.
#[derive(Debug, Default)]
pub struct Decision {
    /// Limits whose predicates all held and whose counters all evaluated.
    pub applied: Vec<Applied>,
    /// Expressions that failed (their limit does not apply).
    pub errors: Vec<EvalError>,
}

fn field(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: path.into(),
        reason: reason.into(),
    }
}

fn whole_seconds(text: &str, at: &str) -> Result<u64, ConfigError> {
    let d = config::parse_duration(text).map_err(|e| field(at, e))?;
    if d.subsec_nanos() != 0 {
        return Err(field(
            at,
            format!("`{text}`: a window must be whole seconds"),
        ));
    }
    Ok(d.as_secs())
}

fn valid_limit_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Policy {
    /// Validates and compiles a configuration. Errors name the field and the reason.
    pub fn compile(cfg: &PluginConfig) -> Result<Policy, ConfigError> {
        let svc = &cfg.rate_limit_service;
        if svc.cluster.trim().is_empty() {
            return Err(field("rateLimitService.cluster", "must not be empty"));
        }
        if svc.domain.trim().is_empty() {
            return Err(field("rateLimitService.domain", "must not be empty"));
        }
        let duration =
            |text: &str, at: &str| config::parse_duration(text).map_err(|e| field(at, e));
        let service = ServiceSettings {
            cluster: svc.cluster.clone(),
            domain: svc.domain.clone(),
            timeout: duration(&svc.timeout, "rateLimitService.timeout")?,
            failure_mode: svc.failure_mode,
            flush_period: duration(&cfg.reporting.flush_period, "reporting.flushPeriod")?,
            report_timeout: duration(&cfg.reporting.timeout, "reporting.timeout")?,
            max_retries: cfg.reporting.max_retries,
        };
        let u = &cfg.usage;
        let usage = UsageSettings {
            paths: UsagePaths::new(
                u.paths.prompt.clone(),
                u.paths.completion.clone(),
                u.paths.total.clone(),
            )
            .map_err(|e| field("usage.paths", e))?,
            fallback: u.fallback,
            fixed_tokens: u.fixed_tokens,
            max_body_bytes: u.max_body_bytes,
            inject_stream_usage: u.inject_stream_usage,
            max_tokens_per_response: u.max_tokens_per_response,
            max_request_body_bytes: cfg.request_body.max_bytes,
            allow_on_headers_stop_iteration: cfg.request_body.allow_on_headers_stop_iteration,
        };
        if u.fallback == Fallback::Fixed && u.fixed_tokens == 0 {
            return Err(field(
                "usage.fixedTokens",
                "must be greater than 0 with `fallback: fixed`",
            ));
        }
        if u.max_tokens_per_response == 0 {
            return Err(field(
                "usage.maxTokensPerResponse",
                "must be greater than 0",
            ));
        }
        if u.max_body_bytes == 0 {
            return Err(field("usage.maxBodyBytes", "must be greater than 0"));
        }
        if cfg.auth.metadata_namespace.trim().is_empty() {
            return Err(field("auth.metadataNamespace", "must not be empty"));
        }

        let mut attributes: Vec<Attribute> = Vec::new();
        // The request headers the policy reads by name; `None` once an expression needs the
        // whole map (`request.headers` itself, a computed name).
        let mut header_names: Option<Vec<String>> = Some(Vec::new());
        let mut compile_expr = |text: &str, at: String| -> Result<CompiledExpr, ConfigError> {
            let source = text.trim().to_string();
            if source.is_empty() {
                return Err(field(at, "empty CEL expression"));
            }
            if source.len() > MAX_EXPRESSION_BYTES {
                return Err(field(at, format!("a CEL expression may be at most {MAX_EXPRESSION_BYTES} bytes long")));
            }
            check_literals(&source).map_err(|e| field(&at, format!("CEL does not compile: {e}")))?;
            let expr = cel_parser::parse(&source)
                .map_err(|e| field(&at, format!("CEL does not compile: {e}")))?;
            if nested_deeper_than(&expr, MAX_EXPRESSION_DEPTH) {
                return Err(field(at, format!("a CEL expression may nest at most {MAX_EXPRESSION_DEPTH} levels deep")));
            }
            check_macro_arguments(&expr).map_err(|e| field(&at, e))?;
            let expr = checked_arithmetic(expr);
            let expr = body_json_as_attribute(expr).map_err(|e| field(&at, e))?;
            let mut paths = Vec::new();
            collect_paths(&expr, &mut paths);
            let mut indices = Vec::new();
            for p in paths {
                if let ([root, headers, rest @ ..], Some(names)) = (p.as_slice(), &mut header_names) {
                    if root == "request" && headers == "headers" {
                        match rest.first() {
                            Some(name) if !names.contains(name) => names.push(name.clone()),
                            Some(_) => {}
                            None => header_names = None,
                        }
                    }
                }
                let Some(attr) = Attribute::resolve(&p, &cfg.auth.metadata_namespace) else {
                    return Err(field(
                        &at,
                        format!(
                            "`{}` cannot be read as a whole; select a field of it",
                            p.join(".")
                        ),
                    ));
                };
                let idx = match attributes.iter().position(|a| a == &attr) {
                    Some(i) => i,
                    None => {
                        attributes.push(attr);
                        attributes.len() - 1
                    }
                };
                if !indices.contains(&idx) {
                    indices.push(idx);
                }
            }
            Ok(CompiledExpr {
                source,
                expr,
                attributes: indices,
                bindings: Vec::new(),
            })
        };

        let mut limits = Vec::with_capacity(cfg.limits.len());
        for (name, limit) in &cfg.limits {
            let at = format!("limits.{name}");
            if !valid_limit_name(name) {
                return Err(field(
                    &at,
                    "a limit name may only hold letters, digits, `-`, `_` and `.`",
                ));
            }
            if limit.rates.is_empty() {
                return Err(field(
                    format!("{at}.rates"),
                    "a limit needs at least one rate",
                ));
            }
            let mut rates = Vec::with_capacity(limit.rates.len());
            for (i, r) in limit.rates.iter().enumerate() {
                if r.limit == 0 {
                    return Err(field(
                        format!("{at}.rates[{i}].limit"),
                        "must be greater than 0",
                    ));
                }
                rates.push(Rate {
                    limit: r.limit,
                    window_seconds: whole_seconds(&r.window, &format!("{at}.rates[{i}].window"))?,
                });
            }
            let when = limit
                .when
                .iter()
                .enumerate()
                .map(|(i, p)| compile_expr(&p.predicate, format!("{at}.when[{i}].predicate")))
                .collect::<Result<Vec<_>, _>>()?;
            let counters = limit
                .counters
                .iter()
                .enumerate()
                .map(|(i, c)| compile_expr(&c.expression, format!("{at}.counters[{i}].expression")))
                .collect::<Result<Vec<_>, _>>()?;
            limits.push(Limit {
                entry_key: format!("{LIMIT_ENTRY_PREFIX}{name}"),
                name: name.clone(),
                rates,
                when,
                counters,
                tokens: limit.tokens,
            });
        }
        let needs_body = attributes
            .iter()
            .any(|a| matches!(a.source, attributes::Source::RequestBodyJson(_)));
        if needs_body && !usage.allow_on_headers_stop_iteration {
            return Err(field(
                "requestBody.allowOnHeadersStopIteration",
                "requestBodyJSON() reads the body before the request goes upstream: set it to true, \
                 and set allow_on_headers_stop_iteration: true in Envoy's Wasm plugin configuration (Envoy 1.35+)",
            ));
        }
        // The root variables of each expression, built per request from pre-allocated keys
        // (and shared by the expressions that see the same ones).
        let mut bindings: Vec<Binding> = Vec::new();
        for limit in &mut limits {
            for e in limit.when.iter_mut().chain(limit.counters.iter_mut()) {
                for b in Binding::for_expression(&e.attributes, &attributes) {
                    let idx = match bindings.iter().position(|x| *x == b) {
                        Some(i) => i,
                        None => {
                            bindings.push(b);
                            bindings.len() - 1
                        }
                    };
                    e.bindings.push(idx);
                }
            }
        }
        let mut encoded_domain = Vec::new();
        if !service.domain.is_empty() {
            prost::encoding::string::encode(1, &service.domain, &mut encoded_domain);
        }
        Ok(Policy {
            service,
            usage,
            needs_body,
            limits,
            attributes,
            header_names,
            bindings,
            encoded_domain,
            context: root_context(),
        })
    }

    /// Parses JSON bytes and compiles them.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigError> {
        Policy::compile(&config::parse_json(bytes)?)
    }

    /// Parses the configuration bytes Envoy hands the plugin (JSON or a serialized
    /// `google.protobuf.Struct`, see [`config::parse_plugin_config`]) and compiles them.
    pub fn from_plugin_config(bytes: &[u8]) -> Result<Policy, ConfigError> {
        Policy::compile(&config::parse_plugin_config(bytes)?)
    }

    /// Evaluates every limit for one request, reading attributes from `host` lazily.
    pub fn evaluate(&self, host: &mut dyn AttributeHost) -> Decision {
        let mut eval = Evaluation {
            policy: self,
            host,
            cache: vec![None; self.attributes.len()],
            roots: vec![None; self.bindings.len()],
        };
        let mut decision = Decision::default();
        'limits: for (index, limit) in self.limits.iter().enumerate() {
            for pred in &limit.when {
                match eval.run(pred) {
                    Ok(Value::Bool(true)) => {}
                    Ok(Value::Bool(false)) => continue 'limits,
                    Ok(other) => {
                        decision.errors.push(EvalError {
                            limit: limit.name.clone(),
                            expression: pred.source.clone(),
                            reason: format!(
                                "a predicate must be a bool, got {:?}",
                                other.type_of()
                            ),
                        });
                        continue 'limits;
                    }
                    Err(reason) => {
                        decision.errors.push(EvalError {
                            limit: limit.name.clone(),
                            expression: pred.source.clone(),
                            reason,
                        });
                        continue 'limits;
                    }
                }
            }
            let mut counters = Vec::with_capacity(limit.counters.len());
            for counter in &limit.counters {
                match eval.run(counter).and_then(counter_value) {
                    Ok(v) => counters.push((counter.source.clone(), v)),
                    Err(reason) => {
                        decision.errors.push(EvalError {
                            limit: limit.name.clone(),
                            expression: counter.source.clone(),
                            reason,
                        });
                        continue 'limits;
                    }
                }
            }
            decision.applied.push(Applied {
                limit: index,
                counters,
            });
        }
        decision
    }

    /// The descriptor for `CheckRateLimit`: every applied limit and its counters.
    pub fn check_descriptor(&self, applied: &[Applied]) -> RateLimitDescriptor {
        self.descriptor(applied.iter())
    }

    /// The descriptor for a `Report` of `category` tokens: only the applied limits that spend
    /// that category, or `None` when none does.
    pub fn report_descriptor(
        &self,
        applied: &[Applied],
        category: TokenCategory,
    ) -> Option<RateLimitDescriptor> {
        let mut matching = applied
            .iter()
            .filter(|a| self.limits.get(a.limit).map(|l| l.tokens) == Some(category))
            .peekable();
        matching.peek()?;
        Some(self.descriptor(matching))
    }

    fn descriptor<'a>(&self, applied: impl Iterator<Item = &'a Applied>) -> RateLimitDescriptor {
        let mut entries: Vec<Entry> = Vec::new();
        let mut counter_entries: Vec<Entry> = Vec::new();
        for a in applied {
            let Some(limit) = self.limits.get(a.limit) else {
                continue;
            };
            entries.push(Entry {
                key: limit.entry_key.clone(),
                value: "1".into(),
            });
            for (key, value) in &a.counters {
                if !counter_entries.iter().any(|e| &e.key == key) {
                    counter_entries.push(Entry {
                        key: key.clone(),
                        value: value.clone(),
                    });
                }
            }
        }
        entries.extend(counter_entries);
        RateLimitDescriptor { entries }
    }

    /// The encoded `CheckRateLimit` request (hits_addend 0) for the applied limits: the bytes
    /// of a `RateLimitRequest` with the domain and [`Policy::check_descriptor`], written
    /// directly (the domain encoded once, no entry built).
    pub fn encode_check_request(&self, applied: &[Applied]) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
        // (key, value) pairs of the descriptor, as `descriptor` orders them: the limit entries,
        // then each counter entry once.
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(applied.len() * 2);
        let mut counter_pairs: Vec<(&str, &str)> = Vec::new();
        for a in applied {
            if let Some(limit) = self.limits.get(a.limit) {
                pairs.push((limit.entry_key.as_str(), "1"));
                for (key, value) in &a.counters {
                    if !counter_pairs.iter().any(|(k, _)| k == key) {
                        counter_pairs.push((key.as_str(), value.as_str()));
                    }
                }
            }
        }
        pairs.append(&mut counter_pairs);
        let field_len = |s: &str| {
            if s.is_empty() {
                0
            } else {
                1 + encoded_len_varint(s.len() as u64) + s.len()
            }
        };
        let entry_len = |(k, v): &(&str, &str)| field_len(k) + field_len(v);
        let descriptor_len: usize = pairs
            .iter()
            .map(|p| {
                let n = entry_len(p);
                1 + encoded_len_varint(n as u64) + n
            })
            .sum();
        let mut out = Vec::with_capacity(
            self.encoded_domain.len() + 1 + encoded_len_varint(descriptor_len as u64) + descriptor_len,
        );
        out.extend_from_slice(&self.encoded_domain);
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(descriptor_len as u64, &mut out);
        for p in &pairs {
            encode_key(1, WireType::LengthDelimited, &mut out);
            encode_varint(entry_len(p) as u64, &mut out);
            for (tag, s) in [(1, p.0), (2, p.1)] {
                if !s.is_empty() {
                    encode_key(tag, WireType::LengthDelimited, &mut out);
                    encode_varint(s.len() as u64, &mut out);
                    out.extend_from_slice(s.as_bytes());
                }
            }
        }
        out
    }

    /// The limits that spend tokens of `category`.
    pub fn categories_in(&self, applied: &[Applied]) -> Vec<TokenCategory> {
        let mut cats: Vec<TokenCategory> = applied
            .iter()
            .filter_map(|a| self.limits.get(a.limit).map(|l| l.tokens))
            .collect();
        cats.sort();
        cats.dedup();
        cats
    }
}

/// How one root variable (`request`, `auth`, ...) of an expression is built from the
/// attributes it reads: a tree of map keys, allocated once at configure time, with attribute
/// indices at its nodes.
#[derive(Debug, Clone, PartialEq)]
struct Binding {
    name: String,
    node: BindNode,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct BindNode {
    /// The attribute whose value this node holds, if any.
    attribute: Option<usize>,
    /// Map entries, when the node is a map.
    children: Vec<(Arc<String>, BindNode)>,
}

impl BindNode {
    fn insert(&mut self, path: &[String], attribute: usize) {
        let Some((first, rest)) = path.split_first() else {
            self.attribute = Some(attribute);
            return;
        };
        let pos = match self.children.iter().position(|(k, _)| **k == *first) {
            Some(p) => p,
            None => {
                self.children
                    .push((Arc::new(first.clone()), BindNode::default()));
                self.children.len() - 1
            }
        };
        if let Some((_, child)) = self.children.get_mut(pos) {
            child.insert(rest, attribute);
        }
    }

    /// The node's value: a map of the entries whose values are there, or, when none is, the
    /// attribute's own value (a longer path wins over a shorter one).
    fn build(&self, values: &[Option<Option<Value>>]) -> Option<Value> {
        if !self.children.is_empty() {
            let map = self.map(values);
            if !map.is_empty() {
                return Some(Value::Map(Map { map: Arc::new(map) }));
            }
        }
        self.attribute
            .and_then(|i| values.get(i).cloned().flatten().flatten())
    }

    fn map(&self, values: &[Option<Option<Value>>]) -> HashMap<Key, Value> {
        let mut map = HashMap::with_capacity(self.children.len());
        for (key, child) in &self.children {
            if let Some(v) = child.build(values) {
                map.insert(Key::String(key.clone()), v);
            }
        }
        map
    }
}

impl Binding {
    /// The root variables an expression reading `indices` sees, in order of first use.
    fn for_expression(indices: &[usize], attributes: &[Attribute]) -> Vec<Binding> {
        let mut out: Vec<Binding> = Vec::new();
        for &i in indices {
            let Some((root, rest)) = attributes.get(i).and_then(|a| a.cel_path.split_first())
            else {
                continue;
            };
            let pos = match out.iter().position(|b| b.name == *root) {
                Some(p) => p,
                None => {
                    out.push(Binding {
                        name: root.clone(),
                        node: BindNode::default(),
                    });
                    out.len() - 1
                }
            };
            if let Some(b) = out.get_mut(pos) {
                b.node.insert(rest, i);
            }
        }
        out
    }

    /// The root variable's value: always a map (empty when no attribute is there).
    fn build(&self, values: &[Option<Option<Value>>]) -> Value {
        Value::Map(Map {
            map: Arc::new(self.node.map(values)),
        })
    }
}

/// Per-request evaluation state: the attribute cache (each attribute fetched at most once)
/// and the root variables built from it (each built at most once).
struct Evaluation<'p, 'h> {
    policy: &'p Policy,
    host: &'h mut dyn AttributeHost,
    /// `None`: not fetched yet; `Some(None)`: absent on this request.
    cache: Vec<Option<Option<Value>>>,
    /// Per [`Policy::bindings`]: `None` until built.
    roots: Vec<Option<Value>>,
}

impl Evaluation<'_, '_> {
    fn fetch(&mut self, index: usize) {
        if let Some(Some(_)) = self.cache.get(index) {
            return;
        }
        let Some(attr) = self.policy.attributes.get(index) else {
            return;
        };
        let v = match (&attr.source, &self.policy.header_names) {
            (attributes::Source::RequestHeaders, Some(names)) => {
                Some(attributes::fetch_headers(self.host, Some(names)))
            }
            _ => attributes::fetch(attr, self.host),
        };
        if let Some(slot) = self.cache.get_mut(index) {
            *slot = Some(v);
        }
    }

    fn run(&mut self, expr: &CompiledExpr) -> Result<Value, String> {
        // Fetch what this expression reads (in order, each attribute once per request), then
        // bind its root variables, each built once per request.
        for &i in &expr.attributes {
            self.fetch(i);
        }
        let policy = self.policy;
        let mut scope = policy.context.new_inner_scope();
        for &b in &expr.bindings {
            let Some(binding) = policy.bindings.get(b) else {
                continue;
            };
            let value = match self.roots.get(b) {
                Some(Some(v)) => v.clone(),
                _ => {
                    let v = binding.build(&self.cache);
                    if let Some(slot) = self.roots.get_mut(b) {
                        *slot = Some(v.clone());
                    }
                    v
                }
            };
            scope.add_variable_from_value(binding.name.as_str(), value);
        }
        scope.resolve(&expr.expr).map_err(|e| describe(&e))
    }
}

fn describe(e: &ExecutionError) -> String {
    e.to_string()
}

/// The string form of a counter value (the descriptor entry's value).
fn counter_value(v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.as_ref().clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::UInt(u) => Ok(u.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!(
            "a counter must be a string, int, uint, double or bool, got {:?}",
            other.type_of()
        )),
    }
}

/// Extracts the attribute paths an expression reads: maximal chains of field selections and
/// constant-string indexing rooted at an attribute root (`request.headers["x-api-key"]` gives
/// `request.headers.x-api-key`).
fn collect_paths(e: &Expression, out: &mut Vec<Vec<String>>) {
    if let Some(path) = attribute_path(e) {
        if !out.contains(&path) {
            out.push(path);
        }
        return;
    }
    match e {
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => {
            collect_paths(a, out);
            collect_paths(b, out);
        }
        Expression::Ternary(a, b, c) => {
            collect_paths(a, out);
            collect_paths(b, out);
            collect_paths(c, out);
        }
        Expression::Unary(_, a) => collect_paths(a, out),
        Expression::Member(target, member) => {
            collect_paths(target, out);
            match member.as_ref() {
                Member::Index(i) => collect_paths(i, out),
                Member::Fields(fields) => fields.iter().for_each(|(_, v)| collect_paths(v, out)),
                Member::Attribute(_) => {}
            }
        }
        Expression::FunctionCall(func, target, args) => {
            collect_paths(func, out);
            if let Some(t) = target {
                collect_paths(t, out);
            }
            args.iter().for_each(|a| collect_paths(a, out));
        }
        Expression::List(items) => items.iter().for_each(|x| collect_paths(x, out)),
        Expression::Map(entries) => {
            for (k, v) in entries {
                collect_paths(k, out);
                collect_paths(v, out);
            }
        }
        Expression::Atom(_) | Expression::Ident(_) => {}
    }
}

fn attribute_path(e: &Expression) -> Option<Vec<String>> {
    match e {
        Expression::Ident(name) if attributes::ROOTS.contains(&name.as_str()) => {
            Some(vec![name.as_ref().clone()])
        }
        Expression::Member(target, member) => {
            let segment = match member.as_ref() {
                Member::Attribute(name) => name.as_ref().clone(),
                Member::Index(index) => match index.as_ref() {
                    Expression::Atom(Atom::String(s)) => s.as_ref().clone(),
                    _ => return None,
                },
                Member::Fields(_) => return None,
            };
            let mut p = attribute_path(target)?;
            p.push(segment);
            Some(p)
        }
        _ => None,
    }
}

/// Rewrites `requestBodyJSON('/pointer')` into the attribute `requestBodyJSON['/pointer']`, so
/// that it is fetched (the body parsed once) like any other attribute. The argument must be a
/// constant string holding a JSON pointer.
fn body_json_as_attribute(e: Expression) -> Result<Expression, String> {
    let rec = |e: Box<Expression>| body_json_as_attribute(*e).map(Box::new);
    Ok(match e {
        Expression::FunctionCall(f, None, args) if matches!(f.as_ref(), Expression::Ident(n) if n.as_str() == attributes::REQUEST_BODY_JSON) => {
            match args.as_slice() {
                [Expression::Atom(Atom::String(p))] if p.is_empty() || p.starts_with('/') => {
                    Expression::Member(
                        f,
                        Box::new(Member::Index(Box::new(Expression::Atom(Atom::String(
                            p.clone(),
                        ))))),
                    )
                }
                _ => {
                    return Err(format!(
                        "{}() takes one constant JSON pointer, e.g. requestBodyJSON('/model')",
                        attributes::REQUEST_BODY_JSON
                    ))
                }
            }
        }
        Expression::Arithmetic(l, op, r) => Expression::Arithmetic(rec(l)?, op, rec(r)?),
        Expression::Relation(l, op, r) => Expression::Relation(rec(l)?, op, rec(r)?),
        Expression::Ternary(c, t, f) => Expression::Ternary(rec(c)?, rec(t)?, rec(f)?),
        Expression::Or(l, r) => Expression::Or(rec(l)?, rec(r)?),
        Expression::And(l, r) => Expression::And(rec(l)?, rec(r)?),
        Expression::Unary(op, x) => Expression::Unary(op, rec(x)?),
        Expression::Member(t, m) => {
            let m = match *m {
                Member::Index(i) => Member::Index(rec(i)?),
                Member::Fields(fields) => Member::Fields(
                    fields
                        .into_iter()
                        .map(|(k, v)| body_json_as_attribute(v).map(|v| (k, v)))
                        .collect::<Result<_, _>>()?,
                ),
                attr @ Member::Attribute(_) => attr,
            };
            Expression::Member(rec(t)?, Box::new(m))
        }
        Expression::FunctionCall(f, t, args) => Expression::FunctionCall(
            rec(f)?,
            t.map(rec).transpose()?,
            args.into_iter()
                .map(body_json_as_attribute)
                .collect::<Result<_, _>>()?,
        ),
        Expression::List(items) => Expression::List(
            items
                .into_iter()
                .map(body_json_as_attribute)
                .collect::<Result<_, _>>()?,
        ),
        Expression::Map(entries) => Expression::Map(
            entries
                .into_iter()
                .map(|(k, v)| Ok((body_json_as_attribute(k)?, body_json_as_attribute(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        leaf @ (Expression::Atom(_) | Expression::Ident(_)) => leaf,
    })
}

/// The longest CEL expression accepted. Parsing is iterative, but dropping the syntax tree and
/// every later pass recurse once per level, and a tree is at most about half as deep as its
/// source is long: with this bound even a refused tree is dropped well within the wasm
/// module's 1 MiB stack.
const MAX_EXPRESSION_BYTES: usize = 16 * 1024;

/// The deepest CEL syntax tree accepted. Compiling and evaluating recurse once per level, and
/// the wasm module's stack is 1 MiB: about 1,600 levels (`[[[...]]]`, `1 + 1 + ...`) overflow
/// it, which traps the VM. Real predicates and counters nest less than 20 deep.
const MAX_EXPRESSION_DEPTH: usize = 100;

/// Whether `e` nests deeper than `limit` levels (recursing at most `limit` deep).
fn nested_deeper_than(e: &Expression, limit: usize) -> bool {
    let Some(l) = limit.checked_sub(1) else {
        return true;
    };
    match e {
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => nested_deeper_than(a, l) || nested_deeper_than(b, l),
        Expression::Ternary(a, b, c) => {
            nested_deeper_than(a, l) || nested_deeper_than(b, l) || nested_deeper_than(c, l)
        }
        Expression::Unary(_, a) => nested_deeper_than(a, l),
        Expression::Member(t, m) => {
            nested_deeper_than(t, l)
                || match m.as_ref() {
                    Member::Index(i) => nested_deeper_than(i, l),
                    Member::Fields(fields) => fields.iter().any(|(_, v)| nested_deeper_than(v, l)),
                    Member::Attribute(_) => false,
                }
        }
        Expression::FunctionCall(f, t, args) => {
            nested_deeper_than(f, l)
                || t.as_ref().is_some_and(|t| nested_deeper_than(t, l))
                || args.iter().any(|a| nested_deeper_than(a, l))
        }
        Expression::List(items) => items.iter().any(|x| nested_deeper_than(x, l)),
        Expression::Map(entries) => entries
            .iter()
            .any(|(k, v)| nested_deeper_than(k, l) || nested_deeper_than(v, l)),
        Expression::Atom(_) | Expression::Ident(_) => false,
    }
}

/// The interpreter's macros: they take a variable and an expression (`list.exists(x, x > 1)`).
const MACROS: [&str; 5] = ["map", "filter", "all", "exists", "exists_one"];

/// Refuses a macro call without its variable and expression (`list.map(x)`): the interpreter
/// reads a macro's arguments by position without checking their number, so such a call
/// compiles but panics, killing the wasm VM, on every request that evaluates it.
fn check_macro_arguments(e: &Expression) -> Result<(), String> {
    let rec = check_macro_arguments;
    match e {
        Expression::FunctionCall(f, target, args) => {
            if let Expression::Ident(name) = f.as_ref() {
                // Without a target, the list is the first argument.
                let needed = if target.is_some() { 2 } else { 3 };
                if MACROS.contains(&name.as_str()) && args.len() < needed {
                    return Err(format!(
                        "`{name}` takes a variable and an expression, e.g. `list.{name}(x, x == \"a\")`"
                    ));
                }
            }
            rec(f)?;
            if let Some(t) = target {
                rec(t)?;
            }
            args.iter().try_for_each(rec)
        }
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => rec(a).and_then(|_| rec(b)),
        Expression::Ternary(a, b, c) => rec(a).and_then(|_| rec(b)).and_then(|_| rec(c)),
        Expression::Unary(_, a) => rec(a),
        Expression::Member(t, m) => {
            rec(t)?;
            match m.as_ref() {
                Member::Index(i) => rec(i),
                Member::Fields(fields) => fields.iter().try_for_each(|(_, v)| rec(v)),
                Member::Attribute(_) => Ok(()),
            }
        }
        Expression::List(items) => items.iter().try_for_each(rec),
        Expression::Map(entries) => entries.iter().try_for_each(|(k, v)| rec(k).and_then(|_| rec(v))),
        Expression::Atom(_) | Expression::Ident(_) => Ok(()),
    }
}

/// Refuses the literals that `cel-parser` 0.8 cannot convert. Its grammar converts literal
/// tokens with `unwrap()`, so an integer literal out of range (`9223372036854775808`,
/// `18446744073709551616u`, `0x1_0000_0000_0000_0000`), a negative hex uint (`-0x1u`), or a string or
/// bytes literal with a bad escape (`"\o"`, `'\x4'`) panics inside the parser, which kills the
/// wasm VM, instead of failing. This walks the expression as the parser's lexer does
/// (longest match at each position; whitespace and `//` comments skipped) and converts each
/// literal token with the grammar's own conversion first.
fn check_literals(src: &str) -> Result<(), String> {
    let bytes = src.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            // `//[^\n\r]*[\n\r]*`
            while i < bytes.len() && !matches!(bytes[i], b'\n' | b'\r') {
                i += 1;
            }
            continue;
        }
        let quote_at = match c {
            b'"' | b'\'' => Some(i),
            b'r' | b'R' | b'b' | b'B' if matches!(bytes.get(i + 1), Some(b'"' | b'\'')) => Some(i + 1),
            _ => None,
        };
        if let Some(q) = quote_at {
            let is_bytes = matches!(c, b'b' | b'B');
            if let Some(end) = quoted_literal_end(bytes, q, is_bytes) {
                let token = &src[i..end];
                let ok = if is_bytes {
                    cel_parser::parse_bytes(&token[2..token.len() - 1]).is_ok()
                } else {
                    cel_parser::parse_string(token).is_ok()
                };
                if !ok {
                    return Err(format!("invalid escape sequence in the literal {token}"));
                }
                i = end;
                continue;
            }
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.') {
            if let Some(end) = number_literal_end(bytes, i) {
                let token = &src[i..end];
                if !number_literal_converts(token) {
                    return Err(format!("the number {token} is out of range"));
                }
                i = end;
                continue;
            }
            // `--` is one token: the second `-` does not start a number.
            i += if c == b'-' && bytes.get(i + 1) == Some(&b'-') { 2 } else { 1 };
            continue;
        }
        i += 1;
    }
    Ok(())
}

/// The end (exclusive) of the longest string (`is_bytes`: bytes) literal whose opening quote is
/// at `q`: strings are `"([^"\\]*(?:\\.[^"\\]*)*)"`, bytes `b"(\\.|[^"\n])*"` (or with `'`).
fn quoted_literal_end(bytes: &[u8], q: usize, is_bytes: bool) -> Option<usize> {
    let quote = bytes[q];
    let mut end = None;
    let mut k = q + 1;
    while k < bytes.len() {
        let c = bytes[k];
        if is_bytes {
            // Any byte but a newline or the quote is content; a backslash may also escape the
            // next character, which lets the match go on past a quote it escapes.
            if c == b'\n' {
                break;
            }
            if c == quote {
                end = Some(k + 1);
                if k == q + 1 || bytes[k - 1] != b'\\' {
                    break;
                }
            }
            k += 1;
        } else {
            // A backslash always escapes the next character (not a newline); a string ends at
            // its first unescaped quote.
            match c {
                _ if c == quote => return Some(k + 1),
                b'\\' if k + 1 < bytes.len() && bytes[k + 1] != b'\n' => k += 1 + src_char_len(bytes, k + 1),
                b'\\' => return None,
                _ => k += 1,
            }
        }
    }
    end
}

/// The length of the UTF-8 character that starts at `at`.
fn src_char_len(bytes: &[u8], at: usize) -> usize {
    match bytes[at] {
        b if b < 0x80 => 1,
        b if b >= 0xf0 => 4,
        b if b >= 0xe0 => 3,
        _ => 2,
    }
}

/// The end (exclusive) of the longest number literal at `i`, if any: `-?[0-9]+`,
/// `-?0[xX][0-9a-fA-F]+`, `[0-9]+[uU]`, `-?0[xX][0-9a-fA-F]+[uU]`,
/// `[-+]?[0-9]*\.[0-9]+([eE][-+]?[0-9]+)?`, `[-+]?[0-9]+[eE][-+]?[0-9]+`.
fn number_literal_end(b: &[u8], i: usize) -> Option<usize> {
    let digits = |mut k: usize, hex: bool| {
        while k < b.len() && (if hex { b[k].is_ascii_hexdigit() } else { b[k].is_ascii_digit() }) {
            k += 1;
        }
        k
    };
    let exponent = |k: usize| -> Option<usize> {
        if !matches!(b.get(k), Some(b'e' | b'E')) {
            return None;
        }
        let k = if matches!(b.get(k + 1), Some(b'-' | b'+')) { k + 2 } else { k + 1 };
        let e = digits(k, false);
        (e > k).then_some(e)
    };
    let mut best: Option<usize> = None;
    let mut consider = |end: Option<usize>| {
        if let Some(e) = end {
            best = Some(best.map_or(e, |b: usize| b.max(e)));
        }
    };
    let minus = usize::from(b[i] == b'-');
    let sign = usize::from(matches!(b[i], b'-' | b'+'));
    // Integers (decimal, then uint) and hex.
    if b[i] != b'+' {
        let start = i + minus;
        let end = digits(start, false);
        if end > start {
            consider(Some(end));
            if b[i] != b'-' && matches!(b.get(end), Some(b'u' | b'U')) {
                consider(Some(end + 1));
            }
        }
        if b.get(start) == Some(&b'0') && matches!(b.get(start + 1), Some(b'x' | b'X')) {
            let end = digits(start + 2, true);
            if end > start + 2 {
                consider(Some(end));
                if matches!(b.get(end), Some(b'u' | b'U')) {
                    consider(Some(end + 1));
                }
            }
        }
    }
    // Floats.
    let start = i + sign;
    let int_end = digits(start, false);
    if b.get(int_end) == Some(&b'.') {
        let frac_end = digits(int_end + 1, false);
        if frac_end > int_end + 1 {
            consider(Some(exponent(frac_end).unwrap_or(frac_end)));
        }
    }
    if int_end > start {
        consider(exponent(int_end));
    }
    best
}

/// Whether a number token converts as the grammar converts it.
fn number_literal_converts(t: &str) -> bool {
    let hex = t.contains(['x', 'X']);
    let unsigned = t.ends_with(['u', 'U']);
    let float = !hex && t.contains(['.', 'e', 'E']);
    let strip = |s: &str, drop: &[char]| s.chars().filter(|c| !drop.contains(c)).collect::<String>();
    match (float, hex, unsigned) {
        (true, _, _) => t.parse::<f64>().is_ok(),
        (false, false, false) => t.parse::<i64>().is_ok(),
        (false, false, true) => t[..t.len() - 1].parse::<u64>().is_ok(),
        (false, true, false) => i64::from_str_radix(&strip(t, &['x', 'X']), 16).is_ok(),
        (false, true, true) => u64::from_str_radix(&strip(t, &['x', 'X', 'u', 'U']), 16).is_ok(),
    }
}

/// Name of the function that replaces `+` (see [`checked_arithmetic`]).
const CHECKED_ADD: &str = "__token_ratelimit_add";
/// Name of the function that replaces binary `-`.
const CHECKED_SUB: &str = "__token_ratelimit_sub";
/// Name of the function that replaces `*`.
const CHECKED_MUL: &str = "__token_ratelimit_mul";
/// Name of the function that replaces `/`.
const CHECKED_DIV: &str = "__token_ratelimit_div";
/// Name of the function that replaces `%`.
const CHECKED_MOD: &str = "__token_ratelimit_mod";
/// Name of the function that replaces unary `-`.
const CHECKED_NEG: &str = "__token_ratelimit_neg";
/// Name of the function that replaces `x[i]` (unless `i` is a constant string).
const CHECKED_INDEX: &str = "__token_ratelimit_index";

/// Rewrites the arithmetic operators (`+`, `-`, `*`, `/`, `%`, unary `-`) and indexing with a
/// computed or numeric index into calls of checked functions. The interpreter computes with Rust's operators: `/` and `%` panic on a zero
/// divisor and on `i64::MIN / -1` even in release builds, `+`, `-`, `*` and negation overflow
/// (a panic with overflow checks, a silently wrapped value without: `int(h) * 1000 > 5000`
/// would be false for a huge `h`), and timestamp and duration arithmetic panics in chrono on
/// overflow; `string[i]` overflows for `i = 2^63 - 1`. A request could choose such operands
/// (e.g. from a header), and a panic would kill the wasm VM. The checked functions return an error instead, as CEL specifies: the limit
/// does not apply.
fn checked_arithmetic(e: Expression) -> Expression {
    let b = |e: Box<Expression>| Box::new(checked_arithmetic(*e));
    let call = |name: &str, args: Vec<Expression>| {
        Expression::FunctionCall(Box::new(Expression::Ident(Arc::new(name.to_string()))), None, args)
    };
    match e {
        Expression::Arithmetic(l, op, r) => {
            let name = match op {
                ArithmeticOp::Add => CHECKED_ADD,
                ArithmeticOp::Subtract => CHECKED_SUB,
                ArithmeticOp::Multiply => CHECKED_MUL,
                ArithmeticOp::Divide => CHECKED_DIV,
                ArithmeticOp::Modulus => CHECKED_MOD,
            };
            call(name, vec![checked_arithmetic(*l), checked_arithmetic(*r)])
        }
        Expression::Unary(UnaryOp::Minus, x) => call(CHECKED_NEG, vec![checked_arithmetic(*x)]),
        Expression::Relation(l, op, r) => Expression::Relation(b(l), op, b(r)),
        Expression::Ternary(c, t, f) => Expression::Ternary(b(c), b(t), b(f)),
        Expression::Or(l, r) => Expression::Or(b(l), b(r)),
        Expression::And(l, r) => Expression::And(b(l), b(r)),
        Expression::Unary(op, x) => Expression::Unary(op, b(x)),
        Expression::Member(t, m) => match *m {
            // `x[i]` with an index other than a constant string (those name attributes and map
            // keys): the interpreter computes `i + 1` unchecked for a string `x`.
            Member::Index(i) if !matches!(i.as_ref(), Expression::Atom(Atom::String(_))) => {
                call(CHECKED_INDEX, vec![checked_arithmetic(*t), checked_arithmetic(*i)])
            }
            Member::Index(i) => Expression::Member(b(t), Box::new(Member::Index(b(i)))),
            Member::Fields(fields) => Expression::Member(
                b(t),
                Box::new(Member::Fields(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k, checked_arithmetic(v)))
                        .collect(),
                )),
            ),
            attr @ Member::Attribute(_) => Expression::Member(b(t), Box::new(attr)),
        },
        Expression::FunctionCall(f, t, args) => Expression::FunctionCall(
            b(f),
            t.map(b),
            args.into_iter().map(checked_arithmetic).collect(),
        ),
        Expression::List(items) => {
            Expression::List(items.into_iter().map(checked_arithmetic).collect())
        }
        Expression::Map(entries) => Expression::Map(
            entries
                .into_iter()
                .map(|(k, v)| (checked_arithmetic(k), checked_arithmetic(v)))
                .collect(),
        ),
        leaf @ (Expression::Atom(_) | Expression::Ident(_)) => leaf,
    }
}

fn numeric_pair(a: &Value, b: &Value) -> Option<(f64, f64)> {
    let f = |v: &Value| match v {
        Value::Int(i) => Some(*i as f64),
        Value::UInt(u) => Some(*u as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    };
    Some((f(a)?, f(b)?))
}

fn cel_add(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = || ExecutionError::function_error("+", "overflow");
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x.checked_add(*y).map(Value::Int).ok_or_else(fail),
        (Value::UInt(x), Value::UInt(y)) => x.checked_add(*y).map(Value::UInt).ok_or_else(fail),
        (Value::Duration(x), Value::Duration(y)) => x.checked_add(y).map(Value::Duration).ok_or_else(fail),
        (Value::Timestamp(t), Value::Duration(d)) | (Value::Duration(d), Value::Timestamp(t)) => {
            t.checked_add_signed(*d).map(Value::Timestamp).ok_or_else(fail)
        }
        _ => a + b,
    }
}

fn cel_sub(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = || ExecutionError::function_error("-", "overflow");
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x.checked_sub(*y).map(Value::Int).ok_or_else(fail),
        (Value::UInt(x), Value::UInt(y)) => x.checked_sub(*y).map(Value::UInt).ok_or_else(fail),
        (Value::Duration(x), Value::Duration(y)) => x.checked_sub(y).map(Value::Duration).ok_or_else(fail),
        (Value::Timestamp(t), Value::Duration(d)) => t.checked_sub_signed(*d).map(Value::Timestamp).ok_or_else(fail),
        _ => a - b,
    }
}

fn cel_mul(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = || ExecutionError::function_error("*", "overflow");
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x.checked_mul(*y).map(Value::Int).ok_or_else(fail),
        (Value::UInt(x), Value::UInt(y)) => x.checked_mul(*y).map(Value::UInt).ok_or_else(fail),
        _ => a * b,
    }
}

fn cel_neg(a: Value) -> cel_interpreter::ResolveResult {
    match a {
        Value::Int(x) => x
            .checked_neg()
            .map(Value::Int)
            .ok_or_else(|| ExecutionError::function_error("-", "overflow")),
        Value::Float(x) => Ok(Value::Float(-x)),
        other => Err(ExecutionError::UnsupportedUnaryOperator("minus", other)),
    }
}

/// `target[index]` as the interpreter computes it, without its unchecked `index + 1`.
fn cel_index(target: Value, index: Value) -> cel_interpreter::ResolveResult {
    let found = |v: Option<&Value>| Ok(v.cloned().unwrap_or(Value::Null));
    match (target, index) {
        (Value::List(items), Value::Int(i)) => found(usize::try_from(i).ok().and_then(|i| items.get(i))),
        (Value::String(s), Value::Int(i)) => Ok(usize::try_from(i)
            .ok()
            .and_then(|i| s.get(i..i.checked_add(1)?))
            .map_or(Value::Null, |c| Value::String(Arc::new(c.to_string())))),
        (Value::Map(map), Value::String(k)) => found(map.get(&k.into())),
        (Value::Map(map), Value::Bool(k)) => found(map.get(&k.into())),
        (Value::Map(map), Value::Int(k)) => found(map.get(&k.into())),
        (Value::Map(map), Value::UInt(k)) => found(map.get(&k.into())),
        (Value::Map(_), index) => Err(ExecutionError::UnsupportedMapIndex(index)),
        (Value::List(_), index) => Err(ExecutionError::UnsupportedListIndex(index)),
        (value, index) => Err(ExecutionError::UnsupportedIndex(value, index)),
    }
}

fn cel_div(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = |m: &str| ExecutionError::function_error("/", m);
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x
            .checked_div(*y)
            .map(Value::Int)
            .ok_or_else(|| fail("division by zero or overflow")),
        (Value::UInt(x), Value::UInt(y)) => x
            .checked_div(*y)
            .map(Value::UInt)
            .ok_or_else(|| fail("division by zero")),
        _ => numeric_pair(&a, &b)
            .map(|(x, y)| Value::Float(x / y))
            .ok_or_else(|| fail("operands must be numbers")),
    }
}

fn cel_mod(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = |m: &str| ExecutionError::function_error("%", m);
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x
            .checked_rem(*y)
            .map(Value::Int)
            .ok_or_else(|| fail("modulus by zero or overflow")),
        (Value::UInt(x), Value::UInt(y)) => x
            .checked_rem(*y)
            .map(Value::UInt)
            .ok_or_else(|| fail("modulus by zero")),
        _ => Err(fail("operands must be integers of one type")),
    }
}

/// The shared CEL context: the standard functions plus the string extensions Kuadrant's
/// policies use (`split`, `lowerAscii`, `upperAscii`, `trim`, `replace`, `join`).
fn root_context() -> Context<'static> {
    let mut ctx = Context::default();
    ctx.add_function("split", cel_split);
    ctx.add_function("lowerAscii", cel_lower_ascii);
    ctx.add_function("upperAscii", cel_upper_ascii);
    ctx.add_function("trim", cel_trim);
    ctx.add_function("replace", cel_replace);
    ctx.add_function("join", cel_join);
    ctx.add_function(CHECKED_ADD, cel_add);
    ctx.add_function(CHECKED_SUB, cel_sub);
    ctx.add_function(CHECKED_MUL, cel_mul);
    ctx.add_function(CHECKED_DIV, cel_div);
    ctx.add_function(CHECKED_MOD, cel_mod);
    ctx.add_function(CHECKED_NEG, cel_neg);
    ctx.add_function(CHECKED_INDEX, cel_index);
    ctx
}

fn cel_split(This(this): This<Arc<String>>, sep: Arc<String>) -> cel_interpreter::ResolveResult {
    Ok(Value::List(Arc::new(
        this.split(sep.as_str())
            .map(|s| Value::String(Arc::new(s.to_string())))
            .collect(),
    )))
}

fn cel_lower_ascii(This(this): This<Arc<String>>) -> String {
    this.to_ascii_lowercase()
}

fn cel_upper_ascii(This(this): This<Arc<String>>) -> String {
    this.to_ascii_uppercase()
}

fn cel_trim(This(this): This<Arc<String>>) -> String {
    this.trim().to_string()
}

fn cel_replace(This(this): This<Arc<String>>, from: Arc<String>, to: Arc<String>) -> String {
    this.replace(from.as_str(), to.as_str())
}

fn cel_join(This(this): This<Arc<Vec<Value>>>, sep: Arc<String>) -> String {
    let parts: Vec<String> = this
        .iter()
        .map(|v| match v {
            Value::String(s) => s.as_ref().clone(),
            other => format!("{other:?}"),
        })
        .collect();
    parts.join(sep.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host backed by maps.
    #[derive(Default)]
    pub(crate) struct MapHost {
        pub properties: HashMap<String, Vec<u8>>,
        pub headers: Vec<(String, Vec<u8>)>,
        pub fetched: Vec<String>,
    }

    impl AttributeHost for MapHost {
        fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
            let key = path.join(".");
            self.fetched.push(key.clone());
            self.properties.get(&key).cloned()
        }
        fn request_headers(&mut self) -> Vec<(String, Vec<u8>)> {
            self.fetched.push("<headers>".into());
            self.headers.clone()
        }
    }

    const TUTORIAL: &str = r#"{
      "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
      "limits": {
        "free": {
          "rates": [{"limit": 50, "window": "1m"}],
          "when": [
            {"predicate": "request.path == \"/v1/chat/completions\""},
            {"predicate": "auth.identity.groups.split(\",\").exists(g, g == \"free\")"}
          ],
          "counters": [{"expression": "auth.identity.userid"}]
        },
        "gold": {
          "rates": [{"limit": 200, "window": "1m"}, {"limit": 5000, "window": "1d"}],
          "when": [
            {"predicate": "request.path == \"/v1/chat/completions\""},
            {"predicate": "auth.identity.groups.split(\",\").exists(g, g == \"gold\")"}
          ],
          "counters": [{"expression": "auth.identity.userid"}],
          "tokens": "completion"
        }
      }
    }"#;

    fn host(path: &str, user: &str, groups: &str) -> MapHost {
        let mut h = MapHost::default();
        h.properties.insert("request.path".into(), path.into());
        let ns = "metadata.filter_metadata.envoy.filters.http.ext_authz.identity";
        h.properties.insert(format!("{ns}.userid"), user.into());
        h.properties.insert(format!("{ns}.groups"), groups.into());
        h
    }

    #[test]
    fn tutorial_policy_selects_the_group_limit_and_counter() {
        let p = Policy::from_json(TUTORIAL.as_bytes()).unwrap();
        assert_eq!(
            p.limits[1].rates[1],
            Rate {
                limit: 5000,
                window_seconds: 86400
            }
        );
        let d = p.evaluate(&mut host("/v1/chat/completions", "user-1", "free"));
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.applied.len(), 1);
        let desc = p.check_descriptor(&d.applied);
        let pairs: Vec<(&str, &str)> = desc
            .entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![("limit.free", "1"), ("auth.identity.userid", "user-1")]
        );
    }

    #[test]
    fn attributes_are_fetched_once_and_only_when_needed() {
        let p = Policy::from_json(TUTORIAL.as_bytes()).unwrap();
        let mut h = host("/v1/models", "user-1", "free");
        let d = p.evaluate(&mut h);
        assert!(d.applied.is_empty());
        // The path predicate is false for both limits: identity is never read.
        assert_eq!(h.fetched, vec!["request.path".to_string()]);
    }

    #[test]
    fn missing_identity_means_the_limit_does_not_apply() {
        let p = Policy::from_json(TUTORIAL.as_bytes()).unwrap();
        let mut h = MapHost::default();
        h.properties
            .insert("request.path".into(), b"/v1/chat/completions".to_vec());
        let d = p.evaluate(&mut h);
        assert!(d.applied.is_empty());
        assert_eq!(d.errors.len(), 2);
        assert!(
            d.errors[0].reason.to_lowercase().contains("no such key"),
            "{:?}",
            d.errors
        );
    }

    #[test]
    fn report_descriptor_holds_only_the_limits_of_that_category() {
        let p = Policy::from_json(
            TUTORIAL
                .replace(r#"exists(g, g == \"gold\")"#, r#"exists(g, g == \"free\")"#)
                .as_bytes(),
        )
        .unwrap();
        let d = p.evaluate(&mut host("/v1/chat/completions", "u", "free"));
        assert_eq!(d.applied.len(), 2);
        assert_eq!(
            p.categories_in(&d.applied),
            vec![TokenCategory::Total, TokenCategory::Completion]
        );
        let total = p
            .report_descriptor(&d.applied, TokenCategory::Total)
            .unwrap();
        assert_eq!(total.entries[0].key, "limit.free");
        assert_eq!(total.entries.len(), 2);
        let completion = p
            .report_descriptor(&d.applied, TokenCategory::Completion)
            .unwrap();
        assert_eq!(completion.entries[0].key, "limit.gold");
        assert!(p
            .report_descriptor(&d.applied, TokenCategory::Prompt)
            .is_none());
        // The check descriptor has both limits and one shared counter entry.
        let check = p.check_descriptor(&d.applied);
        let keys: Vec<&str> = check.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            vec!["limit.free", "limit.gold", "auth.identity.userid"]
        );
    }

    #[test]
    fn headers_and_typed_properties() {
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
            "when": [{"predicate": "request.headers[\"x-tier\"].lowerAscii() == \"basic\" && source.port > 1000 && has(request.headers.host)"}],
            "counters": [{"expression": "request.headers[\"x-tier\"]"}, {"expression": "source.port"}]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        let mut h = MapHost {
            headers: vec![
                ("x-tier".into(), b"BASIC".to_vec()),
                ("host".into(), b"example".to_vec()),
            ],
            ..Default::default()
        };
        h.properties
            .insert("source.port".into(), 40000i64.to_le_bytes().to_vec());
        let d = p.evaluate(&mut h);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(
            d.applied[0].counters,
            vec![
                (
                    "request.headers[\"x-tier\"]".to_string(),
                    "BASIC".to_string()
                ),
                ("source.port".to_string(), "40000".to_string())
            ]
        );
        // Headers were read once although three expressions use them.
        assert_eq!(h.fetched.iter().filter(|f| *f == "<headers>").count(), 1);
    }

    #[test]
    fn a_non_bool_predicate_is_an_error_not_a_match() {
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}], "when": [{"predicate": "request.path"}]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        let mut h = MapHost::default();
        h.properties.insert("request.path".into(), b"/".to_vec());
        let d = p.evaluate(&mut h);
        assert!(d.applied.is_empty());
        assert!(d.errors[0].reason.contains("must be a bool"));
    }

    #[test]
    fn division_by_zero_and_overflow_are_errors_not_panics() {
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
            "when": [{"predicate": "int(request.headers['a']) / int(request.headers['b']) > 0 || int(request.headers['a']) % int(request.headers['b']) == 0"}],
            "counters": [{"expression": "[1.0 / 2.0, 7 / 2, 7u % 4u][1]"}]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        for (a, b, applies) in [
            ("1", "0", false),
            ("-9223372036854775808", "-1", false),
            ("8", "2", true),
        ] {
            let mut h = MapHost {
                headers: vec![
                    ("a".into(), a.as_bytes().to_vec()),
                    ("b".into(), b.as_bytes().to_vec()),
                ],
                ..Default::default()
            };
            let d = p.evaluate(&mut h);
            assert_eq!(d.applied.len() == 1, applies, "{a} / {b}: {:?}", d.errors);
            if applies {
                assert_eq!(d.applied[0].counters[0].1, "3");
            } else {
                assert!(
                    d.errors[0].reason.contains("by zero or overflow"),
                    "{:?}",
                    d.errors
                );
            }
        }
    }

    #[test]
    fn request_body_json_is_an_attribute() {
        struct BodyHost(serde_json::Value);
        impl AttributeHost for BodyHost {
            fn property(&mut self, _: &[&str]) -> Option<Vec<u8>> {
                None
            }
            fn request_headers(&mut self) -> Vec<(String, Vec<u8>)> {
                Vec::new()
            }
            fn request_body_json(&mut self, pointer: &str) -> Option<serde_json::Value> {
                self.0.pointer(pointer).cloned()
            }
        }
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"}, "requestBody": {"allowOnHeadersStopIteration": true},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
            "when": [{"predicate": "requestBodyJSON('/model').startsWith('gpt-')"}],
            "counters": [{"expression": "requestBodyJSON('/model')"}, {"expression": "requestBodyJSON('/n') + 1"}]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        assert!(p.needs_body);
        let d = p.evaluate(&mut BodyHost(
            serde_json::json!({"model": "gpt-4o", "n": 2}),
        ));
        assert_eq!(d.errors, vec![]);
        assert_eq!(
            d.applied[0].counters[0],
            (
                "requestBodyJSON('/model')".to_string(),
                "gpt-4o".to_string()
            )
        );
        assert_eq!(d.applied[0].counters[1].1, "3");
        assert!(p
            .evaluate(&mut BodyHost(serde_json::json!({"model": "llama"})))
            .applied
            .is_empty());
        // Without Envoy's knob the policy is refused; a non-constant pointer is refused.
        let e = refused(&cfg.replace(
            r#""allowOnHeadersStopIteration": true"#,
            r#""maxBytes": 10"#,
        ));
        assert_eq!(e.field, "requestBody.allowOnHeadersStopIteration");
        let e = refused(&cfg.replace(
            "requestBodyJSON('/model').startsWith",
            "requestBodyJSON(request.path).startsWith",
        ));
        assert_eq!(e.field, "limits.l.when[0].predicate");
    }

    #[test]
    fn headers_are_read_by_name_or_as_a_whole() {
        let cfg = |when: &str| {
            format!(
                r#"{{"rateLimitService": {{"cluster": "c", "domain": "d"}},
                  "limits": {{"l": {{"rates": [{{"limit": 1, "window": "1s"}}],
                    "when": [{{"predicate": {}}}],
                    "counters": [{{"expression": "request.headers[\"x-b\"]"}}]}}}}}}"#,
                serde_json::to_string(when).unwrap()
            )
        };
        let host = || MapHost {
            headers: vec![
                ("x-a".into(), b"1".to_vec()),
                ("x-b".into(), b"B".to_vec()),
                ("x-a".into(), b"2".to_vec()),
                ("x-c".into(), b"C".to_vec()),
            ],
            ..Default::default()
        };
        // By name: only x-a and x-b are converted; repeated headers are joined.
        let p = Policy::from_json(cfg(r#"request.headers["x-a"] == "1,2" && !has(request.headers.xz)"#).as_bytes()).unwrap();
        assert_eq!(p.header_names, Some(vec!["x-a".to_string(), "xz".to_string(), "x-b".to_string()]));
        let d = p.evaluate(&mut host());
        assert_eq!(d.errors, vec![]);
        assert_eq!(d.applied[0].counters[0].1, "B");
        // As a whole: every header is there.
        for when in [r#"request.headers.exists(k, k == "x-c")"#, r#"size(request.headers) == 3"#] {
            let p = Policy::from_json(cfg(when).as_bytes()).unwrap();
            assert_eq!(p.header_names, None, "{when}");
            let d = p.evaluate(&mut host());
            assert_eq!((d.applied.len(), d.errors), (1, vec![]), "{when}");
        }
    }

    #[test]
    fn the_encoded_check_request_is_the_prost_encoding() {
        use prost::Message;
        let p = Policy::from_json(
            TUTORIAL
                .replace(r#"exists(g, g == \"gold\")"#, r#"exists(g, g == \"free\")"#)
                .as_bytes(),
        )
        .unwrap();
        for (user, groups) in [("user-1", "free"), ("", "free"), ("u", "gold"), ("ü", "free")] {
            let d = p.evaluate(&mut host("/v1/chat/completions", user, groups));
            let want = ratelimit_proto::RateLimitRequest {
                domain: p.service.domain.clone(),
                descriptors: vec![p.check_descriptor(&d.applied)],
                hits_addend: 0,
            }
            .encode_to_vec();
            assert_eq!(p.encode_check_request(&d.applied), want, "{user} {groups}");
        }
        let long = "x".repeat(300);
        let applied = vec![Applied {
            limit: 0,
            counters: vec![("k".into(), long.clone()), ("k".into(), "dup".into())],
        }];
        let want = ratelimit_proto::RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![p.check_descriptor(&applied)],
            hits_addend: 0,
        }
        .encode_to_vec();
        assert_eq!(p.encode_check_request(&applied), want);
    }

    /// A policy with one limit whose only counter is `expr`, evaluated over headers `a` and
    /// `b`: the counter's value, or the error.
    fn counter_of(expr: &str, a: &str, b: &str) -> Result<String, String> {
        let cfg = serde_json::json!({"rateLimitService": {"cluster": "c", "domain": "d"},
            "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}], "counters": [{"expression": expr}]}}});
        let p = Policy::from_json(cfg.to_string().as_bytes()).unwrap();
        let mut h = MapHost {
            headers: vec![("a".into(), a.as_bytes().to_vec()), ("b".into(), b.as_bytes().to_vec())],
            ..Default::default()
        };
        h.properties.insert("request.time".into(), 1_700_000_000_000_000_000i64.to_le_bytes().to_vec());
        let d = p.evaluate(&mut h);
        match (d.applied.first(), d.errors.first()) {
            (Some(a), _) => Ok(a.counters[0].1.clone()),
            (None, Some(e)) => Err(e.reason.clone()),
            (None, None) => unreachable!(),
        }
    }

    #[test]
    fn overflowing_arithmetic_is_an_error_not_a_panic_or_a_wrapped_value() {
        // Found by the `cel_eval` fuzz target: `*` overflowed inside the interpreter (a panic
        // with overflow checks, a wrapped value in the wasm module).
        let i = "int(request.headers['a'])";
        let u = "uint(request.headers['a'])";
        for (expr, a, b) in [
            (format!("{i} * int(request.headers['b'])"), "9223372036854775807", "2"),
            (format!("{i} + int(request.headers['b'])"), "9223372036854775807", "1"),
            (format!("{i} - int(request.headers['b'])"), "-9223372036854775808", "1"),
            (format!("-{i}"), "-9223372036854775808", ""),
            (format!("{u} * 2u"), "18446744073709551615", ""),
            (format!("{u} + 1u"), "18446744073709551615", ""),
            (format!("{u} - 1u"), "0", ""),
        ] {
            let got = counter_of(&expr, a, b);
            assert!(matches!(&got, Err(e) if e.contains("overflow")), "{expr} with {a}, {b}: {got:?}");
        }
        // Indexing a string at 2^63 - 1 overflowed (`i + 1`) inside the interpreter.
        // Found by the `cel_eval` fuzz target.
        let at = "request.headers['a'][int(request.headers['b'])]";
        for i in ["9223372036854775807", "-1", "3"] {
            let got = counter_of(at, "abc", i);
            assert!(matches!(&got, Err(e) if e.contains("got Null")), "{i}: {got:?}");
        }
        assert_eq!(counter_of(at, "abc", "1"), Ok("b".into()));
        assert_eq!(counter_of("'abc'[0] + string([1, 2, 3][int(request.headers['b'])])", "", "2"), Ok("a3".into()));
        assert_eq!(counter_of("{'k': 'v'}[request.headers['a']] + {1: 'one'}[int(request.headers['b'])]", "k", "1"), Ok("vone".into()));
        assert!(counter_of("[1][request.headers['a']]", "k", "").unwrap_err().contains("index"));
        // In range, the operators compute as before, for every type they take.
        assert_eq!(counter_of(&format!("{i} * int(request.headers['b']) - 1 + -{i}"), "6", "7"), Ok("35".into()));
        assert_eq!(counter_of(&format!("{u} * 2u + 1u - 3u"), "6", ""), Ok("10".into()));
        assert_eq!(counter_of("1.5 * 2.0 - 0.5 + -1.0", "", ""), Ok("1.5".into()));
        assert_eq!(counter_of("request.headers['a'] + '-' + request.headers['b']", "x", "y"), Ok("x-y".into()));
        assert_eq!(counter_of("size([1] + [2, 3])", "", ""), Ok("3".into()));
        assert_eq!(
            counter_of("string(request.time + duration('1h') - duration('30m'))", "", ""),
            Ok("2023-11-14T22:43:20+00:00".into())
        );
        assert_eq!(counter_of("(request.time - timestamp('2023-11-14T22:13:10Z')) == duration('10s')", "", ""), Ok("true".into()));
    }

    #[test]
    fn literals_the_parser_would_panic_on_are_refused() {
        // Found by the `config` fuzz target: cel-parser 0.8 converts literals with unwrap().
        for expr in [
            "request.path == 9223372036854775808",
            "99999999999999999999999 > 1",
            "18446744073709551616u",
            "0x8000000000000000 == 1",
            "0x10000000000000000u",
            "-0x1u",
            r#"auth.identity.groups == "gold\ons""#,
            r#"'\x4'"#,
            r#""\u12""#,
            r#"r"x" + "\q""#,
            r#"b"\z""#,
            r#"b'\400'"#,
        ] {
            let cfg = format!(
                r#"{{"rateLimitService": {{"cluster": "c", "domain": "d"}},
                  "limits": {{"l": {{"rates": [{{"limit": 1, "window": "1s"}}], "when": [{{"predicate": {}}}]}}}}}}"#,
                serde_json::to_string(expr).unwrap()
            );
            let e = refused(&cfg);
            assert_eq!(e.field, "limits.l.when[0].predicate", "{expr}");
            assert!(e.reason.starts_with("CEL does not compile: "), "{expr}: {e}");
        }
        // Their valid neighbours still compile, including text that only looks like them
        // inside strings and comments.
        for expr in [
            "request.size == 9223372036854775807 || request.size == -9223372036854775808",
            "18446744073709551615u > 0u && 0x7fffffffffffffff > -0x8000000000000000 && 0xffffffffffffffffu > 0u",
            "1e999 > 1.5 && .5 < +1.5e3 && -.5 < 2E-3",
            r#"request.path == "99999999999999999999 \\o \"" || request.path == '\x41\u0042\101\n\'"' || request.path == r'\q'"#,
            "b\"\\x41\\101\" != b'' // 99999999999999999999 \"\\o\n && true",
            "request.path--99999999999999999999.5 > 1.0 || x99999999999999999999 == 1",
        ] {
            let cfg = format!(
                r#"{{"rateLimitService": {{"cluster": "c", "domain": "d"}},
                  "limits": {{"l": {{"rates": [{{"limit": 1, "window": "1s"}}], "when": [{{"predicate": {}}}]}}}}}}"#,
                serde_json::to_string(expr).unwrap()
            );
            if let Err(e) = Policy::from_json(cfg.as_bytes()) {
                assert!(!e.reason.contains("out of range") && !e.reason.contains("invalid escape"), "{expr}: {e}");
            }
        }
    }

    #[test]
    fn macros_without_their_variable_and_expression_are_refused() {
        // Found by the `config` fuzz target: `.map(m,)` compiled, and every evaluation then
        // panicked in the interpreter (index out of bounds), killing the VM.
        for expr in [
            "requestBodyJSON('/messages').map(m,).size() > 0",
            "auth.identity.groups.split(',').exists(g)",
            "[1].all()",
            "exists_one([1], x)",
            "size([1].filter(x, x > 0).map(y)) > 0",
        ] {
            let cfg = serde_json::json!({"rateLimitService": {"cluster": "c", "domain": "d"}, "requestBody": {"allowOnHeadersStopIteration": true},
                "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}], "when": [{"predicate": expr}]}}});
            let e = refused(&cfg.to_string());
            assert_eq!(e.field, "limits.l.when[0].predicate", "{expr}");
            assert!(e.reason.contains("takes a variable and an expression"), "{expr}: {e}");
        }
        let cfg = serde_json::json!({"rateLimitService": {"cluster": "c", "domain": "d"},
            "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
              "when": [{"predicate": "[1, 2].map(x, x * 2).filter(x, x > 2).all(x, x == 4) && [1].exists(x, x == 1) && exists_one([1], x, x == 1)"}]}}});
        let p = Policy::from_json(cfg.to_string().as_bytes()).unwrap();
        assert_eq!(p.evaluate(&mut MapHost::default()).applied.len(), 1);
    }

    #[test]
    fn expressions_too_deep_or_too_long_for_the_wasm_stack_are_refused() {
        // Found while fuzzing `config`, whose target works on the module's 1 MiB stack, by a
        // probe with inputs longer than the fuzzer reached: `[[[...1...]]]` or `1 + 1 + ...`
        // about 1,600 deep overflowed that stack (compiling or evaluating), which traps the VM.
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let policy = |expr: &str| {
                    let cfg = serde_json::json!({"rateLimitService": {"cluster": "c", "domain": "d"},
                        "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}], "counters": [{"expression": expr}]}}});
                    Policy::from_json(cfg.to_string().as_bytes())
                };
                let nested = |n: usize| format!("size({}1{})", "[".repeat(n), "]".repeat(n));
                for expr in [nested(2000), vec!["1"; 2000].join(" + "), vec!["1"; 3000].join(" + ")] {
                    let e = policy(&expr).unwrap_err();
                    assert!(e.reason.contains("nest at most 100 levels"), "{e}");
                }
                let huge = vec!["1"; 20_000].join("+");
                assert!(policy(&huge).unwrap_err().reason.contains("at most 16384 bytes"));
                // Long but flat lists are fine, and so is nesting up to the bound.
                let users: Vec<String> = (0..1000).map(|i| format!("'user-{i}'")).collect();
                let p = policy(&format!("request.headers['x-user'] in [{}] ? 1 : 0", users.join(", "))).unwrap();
                assert_eq!(p.evaluate(&mut MapHost::default()).applied[0].counters[0].1, "0");
                policy(&nested(95)).unwrap()
            })
            .unwrap()
            .join()
            .map(|p| {
                // Evaluated on a larger stack: this unoptimized build of the interpreter takes
                // over ten times the stack per level that the release module does.
                std::thread::Builder::new()
                    .stack_size(16 << 20)
                    .spawn(move || p.evaluate(&mut MapHost::default()).applied[0].counters[0].1.clone())
                    .unwrap()
                    .join()
                    .unwrap()
            })
            .map(|v| assert_eq!(v, "1"))
            .unwrap();
    }

    fn refused(cfg: &str) -> ConfigError {
        Policy::from_json(cfg.as_bytes()).unwrap_err()
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let base = |limit: &str| {
            format!(
                r#"{{"rateLimitService": {{"cluster": "c", "domain": "d"}}, "limits": {{"l": {limit}}}}}"#
            )
        };
        let e = refused(&base(r#"{"rates": []}"#));
        assert_eq!(e.field, "limits.l.rates");
        let e = refused(&base(r#"{"rates": [{"limit": 1, "window": "1x"}]}"#));
        assert_eq!(e.field, "limits.l.rates[0].window");
        let e = refused(&base(r#"{"rates": [{"limit": 1, "window": "1500ms"}]}"#));
        assert!(e.reason.contains("whole seconds"));
        let e = refused(&base(r#"{"rates": [{"limit": 0, "window": "1s"}]}"#));
        assert_eq!(e.field, "limits.l.rates[0].limit");
        let e = refused(&base(
            r#"{"rates": [{"limit": 1, "window": "1s"}], "when": [{"predicate": "request.path =="}]}"#,
        ));
        assert_eq!(e.field, "limits.l.when[0].predicate");
        assert!(e.reason.contains("CEL does not compile"));
        let e = refused(&base(
            r#"{"rates": [{"limit": 1, "window": "1s"}], "counters": [{"expression": "  "}]}"#,
        ));
        assert_eq!(e.field, "limits.l.counters[0].expression");
        let e = refused(&base(
            r#"{"rates": [{"limit": 1, "window": "1s"}], "tokens": "cached"}"#,
        ));
        assert_eq!(e.field, "limits.l.tokens");
        let e = refused(r#"{"rateLimitService": {"cluster": "", "domain": "d"}, "limits": {}}"#);
        assert_eq!(e.field, "rateLimitService.cluster");
        let e = refused(
            r#"{"rateLimitService": {"cluster": "c", "domain": "d", "timeout": "soon"}, "limits": {}}"#,
        );
        assert_eq!(e.field, "rateLimitService.timeout");
        let e = refused(
            r#"{"rateLimitService": {"cluster": "c", "domain": "d"}, "limits": {"a b": {"rates": [{"limit": 1, "window": "1s"}]}}}"#,
        );
        assert_eq!(e.field, "limits.a b");
        let e = refused(r#"{"rateLimitService": {"cluster": "c", "domain": "d"}}"#);
        assert!(e.reason.contains("missing field `limits`"), "{e}");
        let e = refused("not json");
        assert_eq!(e.field, ".");
    }
}
