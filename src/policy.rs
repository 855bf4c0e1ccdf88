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
use cel_parser::{ArithmeticOp, Atom, Expression, Member};
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
        let mut compile_expr = |text: &str, at: String| -> Result<CompiledExpr, ConfigError> {
            let source = text.trim().to_string();
            if source.is_empty() {
                return Err(field(at, "empty CEL expression"));
            }
            let expr = cel_parser::parse(&source)
                .map_err(|e| field(&at, format!("CEL does not compile: {e}")))?;
            let expr = checked_arithmetic(expr);
            let expr = body_json_as_attribute(expr).map_err(|e| field(&at, e))?;
            let mut paths = Vec::new();
            collect_paths(&expr, &mut paths);
            let mut indices = Vec::new();
            for p in paths {
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
        Ok(Policy {
            service,
            usage,
            needs_body,
            limits,
            attributes,
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
                key: format!("{LIMIT_ENTRY_PREFIX}{}", limit.name),
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

/// Per-request evaluation state: the attribute cache (each attribute fetched at most once).
struct Evaluation<'p, 'h> {
    policy: &'p Policy,
    host: &'h mut dyn AttributeHost,
    /// `None`: not fetched yet; `Some(None)`: absent on this request.
    cache: Vec<Option<Option<Value>>>,
}

impl Evaluation<'_, '_> {
    fn value(&mut self, index: usize) -> Option<Value> {
        if let Some(Some(cached)) = self.cache.get(index) {
            return cached.clone();
        }
        let attr = self.policy.attributes.get(index)?;
        let v = attributes::fetch(attr, self.host);
        if let Some(slot) = self.cache.get_mut(index) {
            *slot = Some(v.clone());
        }
        v
    }

    fn run(&mut self, expr: &CompiledExpr) -> Result<Value, String> {
        // Build the root variables this expression uses, from the attributes it reads.
        let mut roots: Vec<(String, MapBuilder)> = Vec::new();
        for &i in &expr.attributes {
            let Some(attr) = self.policy.attributes.get(i) else {
                continue;
            };
            let Some((root, rest)) = attr.cel_path.split_first() else {
                continue;
            };
            let (root, rest) = (root.clone(), rest.to_vec());
            let value = self.value(i);
            let pos = match roots.iter().position(|(r, _)| *r == root) {
                Some(p) => p,
                None => {
                    roots.push((root, MapBuilder::default()));
                    roots.len() - 1
                }
            };
            if let (Some(v), Some((_, builder))) = (value, roots.get_mut(pos)) {
                builder.insert(&rest, v);
            }
        }
        let mut scope = self.policy.context.new_inner_scope();
        for (name, builder) in roots {
            scope.add_variable_from_value(name, builder.build());
        }
        scope.resolve(&expr.expr).map_err(|e| describe(&e))
    }
}

fn describe(e: &ExecutionError) -> String {
    e.to_string()
}

/// Nested maps built from attribute paths.
#[derive(Default)]
struct MapBuilder {
    entries: HashMap<String, Node>,
}

enum Node {
    Leaf(Value),
    Branch(MapBuilder),
}

impl MapBuilder {
    fn insert(&mut self, path: &[String], value: Value) {
        let Some((first, rest)) = path.split_first() else {
            return;
        };
        if rest.is_empty() {
            // A longer path already made this a map: keep the map.
            if !matches!(self.entries.get(first), Some(Node::Branch(_))) {
                self.entries.insert(first.clone(), Node::Leaf(value));
            }
            return;
        }
        let node = self
            .entries
            .entry(first.clone())
            .or_insert_with(|| Node::Branch(MapBuilder::default()));
        if let Node::Leaf(_) = node {
            *node = Node::Branch(MapBuilder::default());
        }
        if let Node::Branch(b) = node {
            b.insert(rest, value);
        }
    }

    fn build(self) -> Value {
        let map: HashMap<Key, Value> = self
            .entries
            .into_iter()
            .map(|(k, n)| {
                let v = match n {
                    Node::Leaf(v) => v,
                    Node::Branch(b) => b.build(),
                };
                (Key::String(Arc::new(k)), v)
            })
            .collect();
        Value::Map(Map { map: Arc::new(map) })
    }
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

/// Name of the function that replaces `/` (see [`checked_arithmetic`]).
const CHECKED_DIV: &str = "__token_ratelimit_div";
/// Name of the function that replaces `%`.
const CHECKED_MOD: &str = "__token_ratelimit_mod";

/// Rewrites `a / b` and `a % b` into calls of checked functions. The interpreter divides with
/// Rust's `/` and `%`, which panic on a zero divisor and on `i64::MIN / -1` even in release
/// builds; a request could choose such operands (e.g. from a header), and a panic would kill
/// the wasm VM. The checked functions return an error instead: the limit does not apply.
fn checked_arithmetic(e: Expression) -> Expression {
    let b = |e: Box<Expression>| Box::new(checked_arithmetic(*e));
    match e {
        Expression::Arithmetic(l, op @ (ArithmeticOp::Divide | ArithmeticOp::Modulus), r) => {
            let name = if op == ArithmeticOp::Divide {
                CHECKED_DIV
            } else {
                CHECKED_MOD
            };
            Expression::FunctionCall(
                Box::new(Expression::Ident(Arc::new(name.to_string()))),
                None,
                vec![checked_arithmetic(*l), checked_arithmetic(*r)],
            )
        }
        Expression::Arithmetic(l, op, r) => Expression::Arithmetic(b(l), op, b(r)),
        Expression::Relation(l, op, r) => Expression::Relation(b(l), op, b(r)),
        Expression::Ternary(c, t, f) => Expression::Ternary(b(c), b(t), b(f)),
        Expression::Or(l, r) => Expression::Or(b(l), b(r)),
        Expression::And(l, r) => Expression::And(b(l), b(r)),
        Expression::Unary(op, x) => Expression::Unary(op, b(x)),
        Expression::Member(t, m) => {
            let m = match *m {
                Member::Index(i) => Member::Index(b(i)),
                Member::Fields(fields) => Member::Fields(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k, checked_arithmetic(v)))
                        .collect(),
                ),
                attr @ Member::Attribute(_) => attr,
            };
            Expression::Member(b(t), Box::new(m))
        }
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
    ctx.add_function(CHECKED_DIV, cel_div);
    ctx.add_function(CHECKED_MOD, cel_mod);
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
