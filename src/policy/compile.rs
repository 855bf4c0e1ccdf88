//! Compiling the plugin configuration into a [`Policy`]: settings validated, every CEL
//! expression guarded, rewritten and parsed once, the attributes it reads resolved.

use super::binding::Binding;
use super::{
    CompiledExpr, Cost, Limit, Policy, Rate, ReservationSettings, ServiceSettings, UsageSettings,
    LIMIT_ENTRY_PREFIX, USAGE_FIELDS, USAGE_VARIABLE,
};
use crate::attributes::{self, Attribute};
use crate::cel::checked::checked_arithmetic;
use crate::cel::functions::root_context;
use crate::cel::guards::{
    body_json_as_attribute, check_literals, check_macro_arguments, nested_deeper_than,
    MAX_EXPRESSION_BYTES, MAX_EXPRESSION_DEPTH,
};
use crate::cel::vocabulary::{check_fields_of, check_names_with, static_type, walk};
use crate::config::{self, ConfigError, Fallback, PluginConfig, TokenCategory};
use crate::cost::PriceTable;
use crate::usage::UsagePaths;
use cel_parser::{Atom, Expression, Member};

/// A [`ConfigError`] at `path`.
fn field(path: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: path.into(),
        reason: reason.into(),
    }
}

/// A duration (`1m`, `30s`, ...) at `at` as whole seconds; a fraction of a second is refused.
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

/// Whether `name` may name a limit: not empty, only ASCII letters, digits, `-`, `_` and `.`.
fn valid_limit_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Where an expression stands, which decides the type its value must have.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// A `when` predicate: a bool.
    Predicate,
    /// A counter: anything with a string form.
    Counter,
    /// A reservation amount: an int or uint.
    Amount,
    /// A cost: an int or uint, over the `usage` variable too.
    Cost,
}

impl Place {
    /// Refuses `found`, a type the syntax tree shows, where it cannot stand.
    fn check_type(self, found: &str) -> Result<(), String> {
        match (self, found) {
            (Place::Predicate, "bool")
            | (Place::Amount | Place::Cost, "int" | "uint")
            | (Place::Counter, "string" | "int" | "uint" | "double" | "bool" | "list" | "map") => {
                Ok(())
            }
            (Place::Predicate, t) => Err(format!(
                "a predicate must be a bool, and this expression is a {t}: compare it, e.g. `request.url_path == \"/v1/chat/completions\"`"
            )),
            (Place::Amount, t) => Err(format!(
                "a reservation amount must be an int or uint (tokens), and this expression is a {t}"
            )),
            (Place::Cost, t) => Err(format!(
                "a cost must be an int or uint (in the unit of the limit's rates), and this expression is a {t}"
            )),
            (Place::Counter, t) => Err(format!(
                "a counter must be a string, number, bool, list or map, and this expression is a {t}"
            )),
        }
    }
}

/// Validates `rateLimitService.lease`.
fn lease_settings(
    l: &config::LeaseConfig,
    mode: config::AdmissionMode,
) -> Result<crate::lease::LeaseSettings, ConfigError> {
    if mode == config::AdmissionMode::CheckReport {
        return Err(field(
            "rateLimitService.lease",
            "leases hold budget by reservation: they need `mode: reservation` or `auto`, not `checkReport`",
        ));
    }
    if !(l.fraction > 0.0 && l.fraction <= crate::lease::MAX_FRACTION) {
        return Err(field(
            "rateLimitService.lease.fraction",
            format!("must be in (0, {}]", crate::lease::MAX_FRACTION),
        ));
    }
    if l.max_amount == 0 || l.max_amount > crate::lease::MAX_AMOUNT {
        return Err(field(
            "rateLimitService.lease.maxAmount",
            format!("must be in [1, {}]", crate::lease::MAX_AMOUNT),
        ));
    }
    if l.min_requests == 0 {
        return Err(field(
            "rateLimitService.lease.minRequests",
            "must be at least 1",
        ));
    }
    let ttl = config::parse_duration(&l.ttl).map_err(|e| field("rateLimitService.lease.ttl", e))?;
    if ttl < crate::lease::MIN_TTL {
        return Err(field(
            "rateLimitService.lease.ttl",
            format!("must be at least {} s", crate::lease::MIN_TTL.as_secs()),
        ));
    }
    Ok(crate::lease::LeaseSettings {
        fraction: l.fraction,
        max_amount: l.max_amount,
        min_requests: l.min_requests,
        ttl,
    })
}

impl Policy {
    /// Validates and compiles a configuration. Errors name the field and the reason.
    ///
    /// # Errors
    ///
    /// The first value refused, as a [`ConfigError`] whose `field` is the dotted path of the
    /// setting (`rateLimitService.timeout`, `limits.free.when[0].predicate`, ...):
    /// - an empty `cluster`, `domain` or `auth.metadataNamespace`, a duration that does not
    ///   parse, a usage path that is not a JSON pointer;
    /// - `fixedTokens` 0 with `fallback: fixed`, `maxTokensPerResponse` or `maxBodyBytes` 0;
    /// - a limit name that is empty or holds other characters than letters, digits, `-`, `_`
    ///   and `.`; a limit without rates; a rate of 0 tokens or a window not in whole seconds;
    /// - a CEL expression that is empty, longer than 16 KiB, nested deeper than 100 levels,
    ///   does not parse (or holds a literal the parser cannot convert), calls a macro without
    ///   its variable and expression, calls `requestBodyJSON()` with anything but one constant
    ///   JSON pointer, names an identifier that is no attribute root nor macro variable or a
    ///   function that does not exist, reads an attribute outside Envoy's vocabulary (or one
    ///   only known after the upstream is picked, or a whole root), or whose type, when the
    ///   syntax tree shows it, does not fit its place (a predicate that is not a bool);
    /// - `requestBodyJSON()` used without `requestBody.allowOnHeadersStopIteration`;
    /// - `rateLimitService.lease` with `mode: checkReport`, a `fraction` outside (0, 0.25], a
    ///   `maxAmount` of 0 or above `u32::MAX`, `minRequests` 0, a `ttl` under 2 s.
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
            mode: svc.mode,
            lease: match svc.lease.as_ref().filter(|l| l.enabled) {
                None => None,
                Some(l) => Some(lease_settings(l, svc.mode)?),
            },
        };
        let r = &cfg.reservation;
        let reservation = ReservationSettings {
            default_amount: r.default_amount,
            max_amount: r.max_amount,
            ttl: duration(&r.ttl, "reservation.ttl")?,
        };
        if r.max_amount == 0 {
            return Err(field("reservation.maxAmount", "must be greater than 0"));
        }
        let u = &cfg.usage;
        let usage = UsageSettings {
            paths: UsagePaths::new(
                u.paths.prompt.clone(),
                u.paths.completion.clone(),
                u.paths.total.clone(),
            )
            .and_then(|p| {
                p.with_reported(
                    u.paths.cached.clone(),
                    u.paths.cache_write.clone(),
                    u.paths.reasoning.clone(),
                )
            })
            .map_err(|e| field("usage.paths", e))?,
            fallback: u.fallback,
            fixed_tokens: u.fixed_tokens,
            error_responses: u.error_responses,
            max_body_bytes: u.max_body_bytes,
            inject_stream_usage: u.inject_stream_usage,
            record: u.record,
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
        let mut compile_expr = |text: &str,
                                at: String,
                                place: Place|
         -> Result<CompiledExpr, ConfigError> {
            let source = text.trim().to_string();
            if source.is_empty() {
                return Err(field(at, "empty CEL expression"));
            }
            if source.len() > MAX_EXPRESSION_BYTES {
                return Err(field(
                    at,
                    format!("a CEL expression may be at most {MAX_EXPRESSION_BYTES} bytes long"),
                ));
            }
            check_literals(&source)
                .map_err(|e| field(&at, format!("CEL does not compile: {e}")))?;
            let expr = cel_parser::parse(&source)
                .map_err(|e| field(&at, format!("CEL does not compile: {e}")))?;
            if nested_deeper_than(&expr, MAX_EXPRESSION_DEPTH) {
                return Err(field(
                    at,
                    format!("a CEL expression may nest at most {MAX_EXPRESSION_DEPTH} levels deep"),
                ));
            }
            check_macro_arguments(&expr).map_err(|e| field(&at, e))?;
            let variables: &[&str] = match place {
                Place::Cost => &[USAGE_VARIABLE],
                _ => &[],
            };
            check_names_with(&expr, variables).map_err(|e| field(&at, e))?;
            if let Place::Cost = place {
                check_fields_of(&expr, USAGE_VARIABLE, &USAGE_FIELDS).map_err(|e| field(&at, e))?;
            }
            if let Some(found) = static_type(&expr) {
                place.check_type(found).map_err(|e| field(&at, e))?;
            }
            let expr = checked_arithmetic(expr);
            let expr = body_json_as_attribute(expr).map_err(|e| field(&at, e))?;
            let mut paths = Vec::new();
            collect_paths(&expr, &mut paths);
            let mut indices = Vec::new();
            for p in paths {
                if let ([root, headers, rest @ ..], Some(names)) = (p.as_slice(), &mut header_names)
                {
                    if root == "request" && headers == "headers" {
                        match rest.first() {
                            Some(name) if !names.contains(name) => names.push(name.clone()),
                            Some(_) => {}
                            None => header_names = None,
                        }
                    }
                }
                let attr = Attribute::resolve(&p, &cfg.auth.metadata_namespace)
                    .map_err(|e| field(&at, e))?;
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
                .map(|(i, p)| {
                    compile_expr(
                        &p.predicate,
                        format!("{at}.when[{i}].predicate"),
                        Place::Predicate,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let counters = limit
                .counters
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    compile_expr(
                        &c.expression,
                        format!("{at}.counters[{i}].expression"),
                        Place::Counter,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let own = limit.reservation.as_ref();
            let reservation_amount = own
                .and_then(|r| r.amount.as_deref())
                .map(|a| compile_expr(a, format!("{at}.reservation.amount"), Place::Amount))
                .transpose()?;
            let reservation_ttl = own
                .and_then(|r| r.ttl.as_deref())
                .map(|t| duration(t, &format!("{at}.reservation.ttl")))
                .transpose()?;
            let cost = match (limit.tokens, &limit.cost, &limit.prices) {
                (TokenCategory::Cost, Some(_), Some(_)) => {
                    return Err(field(
                        format!("{at}.prices"),
                        "a limit computes its cost by a `cost` expression or by a `prices` table, not both",
                    ))
                }
                (TokenCategory::Cost, Some(c), None) => Some(Cost::Expression(compile_expr(
                    c,
                    format!("{at}.cost"),
                    Place::Cost,
                )?)),
                (TokenCategory::Cost, None, Some(p)) => Some(Cost::Prices(
                    PriceTable::compile(p).map_err(|e| field(format!("{at}.prices.models"), e))?,
                )),
                (TokenCategory::Cost, None, None) => {
                    return Err(field(
                        format!("{at}.tokens"),
                        "`tokens: cost` needs a `cost` expression or a `prices` table",
                    ))
                }
                (_, Some(_), _) => {
                    return Err(field(
                        format!("{at}.cost"),
                        "a `cost` expression needs `tokens: cost`",
                    ))
                }
                (_, _, Some(_)) => {
                    return Err(field(
                        format!("{at}.prices"),
                        "a `prices` table needs `tokens: cost`",
                    ))
                }
                (_, None, None) => None,
            };
            limits.push(Limit {
                entry_key: format!("{LIMIT_ENTRY_PREFIX}{name}"),
                name: name.clone(),
                rates,
                when,
                counters,
                tokens: limit.tokens,
                cost,
                reservation_amount,
                reservation_ttl,
                on_error: limit.on_error,
                enforcement: limit.enforcement,
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
            let exprs = limit
                .when
                .iter_mut()
                .chain(limit.counters.iter_mut())
                .chain(limit.reservation_amount.iter_mut())
                .chain(limit.cost.iter_mut().filter_map(|c| match c {
                    Cost::Expression(e) => Some(e),
                    Cost::Prices(_) => None,
                }));
            for e in exprs {
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
        let first_of_source = attributes
            .iter()
            .enumerate()
            .map(|(i, a)| {
                attributes
                    .iter()
                    .position(|b| b.source == a.source)
                    .unwrap_or(i)
            })
            .collect();
        let mut encoded_domain = Vec::new();
        if !service.domain.is_empty() {
            prost::encoding::string::encode(1, &service.domain, &mut encoded_domain);
        }
        Ok(Policy {
            service,
            usage,
            reservation,
            needs_body,
            rate_limit_headers: cfg.rate_limit_headers,
            has_shadow: limits.iter().any(Limit::is_shadow),
            limits,
            attributes,
            first_of_source,
            header_names,
            bindings,
            encoded_domain,
            context: root_context(),
            usage_keys: Default::default(),
        })
    }

    /// Parses JSON bytes and compiles them.
    ///
    /// # Errors
    ///
    /// A document that is not a configuration ([`config::parse_json`]: `field` is the path of
    /// the wrong field, `.` for the document itself), or one [`Policy::compile`] refuses.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigError> {
        Policy::compile(&config::parse_json(bytes)?)
    }

    /// Parses the configuration bytes Envoy hands the plugin (JSON or a serialized
    /// `google.protobuf.Struct`, see [`config::parse_plugin_config`]) and compiles them.
    ///
    /// # Errors
    ///
    /// Bytes that are not a configuration in either form, or one [`Policy::compile`] refuses.
    pub fn from_plugin_config(bytes: &[u8]) -> Result<Policy, ConfigError> {
        Policy::compile(&config::parse_plugin_config(bytes)?)
    }
}

/// Extracts the attribute paths an expression reads: maximal chains of field selections and
/// constant-string indexing rooted at an attribute root (`request.headers["x-api-key"]` gives
/// `request.headers.x-api-key`).
fn collect_paths(e: &Expression, out: &mut Vec<Vec<String>>) {
    walk(e, &mut |x| match attribute_path(x) {
        Some(path) => {
            if !out.contains(&path) {
                out.push(path);
            }
            false
        }
        None => true,
    });
}

/// The attribute path `e` reads when it is a chain of field selections and constant-string
/// indices on an attribute root, else `None`.
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

#[cfg(test)]
mod tests {
    use crate::policy::test_support::refused;
    use crate::policy::Policy;

    fn with_predicate(predicate: &str) -> String {
        format!(
            r#"{{"rateLimitService": {{"cluster": "c", "domain": "d"}},
              "limits": {{"l": {{"rates": [{{"limit": 1, "window": "1s"}}],
                "when": [{{"predicate": {}}}]}}}}}}"#,
            serde_json::to_string(predicate).unwrap()
        )
    }

    #[test]
    fn a_typo_under_every_attribute_root_is_refused_at_configure_time() {
        for (predicate, says) in [
            (
                r#"request.url_pth == "/v1""#,
                "`request.url_pth` is not an Envoy attribute",
            ),
            (
                r#"source.adress == "a""#,
                "`source.adress` is not an Envoy attribute",
            ),
            (
                r#"destination.prt == 1"#,
                "`destination.prt` is not an Envoy attribute",
            ),
            (
                r#"connection.mtsl"#,
                "`connection.mtsl` is not an Envoy attribute",
            ),
            (
                r#"upstream.adress == "a""#,
                "`upstream.adress` is not an Envoy attribute",
            ),
            (
                r#"upstream.address == "a""#,
                "only known once the upstream is picked",
            ),
            (
                r#"xds.route_nam == "r""#,
                "`xds.route_nam` is not an Envoy attribute",
            ),
            (
                r#"metadata.filtr_metadata.ns.x == "a""#,
                "dynamic metadata is read by namespace",
            ),
            (
                r#"filter_state.a.b == "a""#,
                "filter state object is read as a whole",
            ),
            (r#"reqest.url_path == "/v1""#, "`reqest` is not defined"),
            (
                r#"response.code == 200"#,
                "not known before the upstream answers",
            ),
            (r#"request.url_path.lower() == "/v1""#, "write `lowerAscii`"),
            (
                r#"request.url_path"#,
                "a predicate must be a bool, and this expression is a string",
            ),
            (r#""free""#, "a predicate must be a bool"),
            (
                r#"size(request.headers)"#,
                "a predicate must be a bool, and this expression is a int",
            ),
        ] {
            let e = refused(&with_predicate(predicate));
            assert_eq!(e.field, "limits.l.when[0].predicate", "{predicate}");
            assert!(e.reason.contains(says), "{predicate}: {}", e.reason);
        }
    }

    #[test]
    fn kuadrant_spellings_and_typed_fields_compile() {
        for predicate in [
            r#"request.auth.identity.metadata.annotations["kuadrant.io/groups"].split(",").exists(g, g == "free")"#,
            r#"auth.identity.groups.split(",").exists(g, g == "free")"#,
            r#"has(auth.claims.groups) && auth.claims.groups.exists(g, g == "gold")"#,
            r#"auth.claims.exp > 1700000000 && auth.claims.admin"#,
            r#"metadata.filter_metadata["envoy.filters.http.jwt_authn"].claims.sub != """#,
            r#"xds.route_metadata.filter_metadata["llm"].tier == "gold""#,
            r#"filter_state["my.key"] == "v" && xds.node.id != "" && connection.mtls"#,
        ] {
            Policy::from_json(with_predicate(predicate).as_bytes())
                .unwrap_or_else(|e| panic!("{predicate}: {e}"));
        }
    }

    #[test]
    fn a_reservation_amount_that_is_no_number_is_refused() {
        let e = refused(
            r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
              "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
                "reservation": {"amount": "\"many\""}}}}"#,
        );
        assert_eq!(e.field, "limits.l.reservation.amount", "{e}");
        assert!(e.reason.contains("must be an int or uint"), "{e}");
        let e = refused(
            r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
              "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}], "onError": "ignore"}}}"#,
        );
        assert!(e.reason.contains("unknown variant `ignore`"), "{e}");
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
