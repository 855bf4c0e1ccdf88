//! Evaluating a [`Policy`] for one request: each limit's predicates, then its counters, over
//! attributes fetched lazily from the host (each at most once per request).

use super::{Applied, CompiledExpr, Cost, CostInputs, Decision, EvalError, Policy};
use crate::attributes::{self, AttributeHost};
use crate::config::OnError;
use cel_interpreter::objects::Key;
use cel_interpreter::{ExecutionError, Value};

impl Policy {
    /// Evaluates every limit for one request, reading attributes from `host` lazily.
    ///
    /// Never fails as a whole: [`Decision::applied`] holds the limits whose predicates are
    /// all `true` and whose counters all evaluated, in [`Policy::limits`] order. An expression
    /// that fails (a missing attribute or key, a predicate that is not a bool, an overflow, a
    /// counter of a type that has no string form) is in [`Decision::errors`]: with its limit's
    /// `onError: skip` the limit does not apply (a failing reservation amount falls back to
    /// the request's own bound); with `deny` evaluation stops there and
    /// [`Decision::refusal`] names it.
    pub fn evaluate(&self, host: &mut dyn AttributeHost) -> Decision {
        let mut eval = Evaluation {
            policy: self,
            host,
            cache: vec![None; self.attributes.len()],
            roots: vec![None; self.bindings.len()],
        };
        let mut decision = Decision::default();
        'limits: for (index, limit) in self.limits.iter().enumerate() {
            let fail = |decision: &mut Decision, expr: &CompiledExpr, reason: String| {
                decision.errors.push(EvalError {
                    limit: limit.name.clone(),
                    on_error: limit.on_error,
                    expression: expr.source.clone(),
                    reason,
                });
                limit.on_error == OnError::Deny
            };
            for pred in &limit.when {
                let reason = match eval.run(pred) {
                    Ok(Value::Bool(true)) => continue,
                    Ok(Value::Bool(false)) => continue 'limits,
                    Ok(other) => format!("a predicate must be a bool, got {:?}", other.type_of()),
                    Err(reason) => reason,
                };
                if fail(&mut decision, pred, reason) {
                    return decision;
                }
                continue 'limits;
            }
            let mut counters = Vec::with_capacity(limit.counters.len());
            for counter in &limit.counters {
                match eval.run(counter).and_then(counter_value) {
                    Ok(v) => counters.push((counter.source.clone(), v)),
                    Err(reason) => {
                        if fail(&mut decision, counter, reason) {
                            return decision;
                        }
                        continue 'limits;
                    }
                }
            }
            let mut amount = None;
            if let Some(e) = &limit.reservation_amount {
                match eval
                    .run(e)
                    .and_then(|v| whole_number(v, "a reservation amount"))
                {
                    Ok(n) => amount = Some(n),
                    Err(reason) => {
                        // `skip`: the limit still applies, with the request's own bound.
                        if fail(&mut decision, e, reason) {
                            return decision;
                        }
                    }
                }
            }
            if let Some(Cost::Expression(e)) = &limit.cost {
                // Evaluated with the usage, after the response: only its attributes now.
                decision.costs.push(CostInputs {
                    limit: index,
                    values: eval.capture(e),
                });
            }
            decision.applied.push(Applied {
                limit: index,
                counters,
                amount,
            });
        }
        decision
    }
}

/// Per-request evaluation state: the attribute cache (each attribute fetched at most once)
/// and the root variables built from it (each built at most once).
struct Evaluation<'p, 'h> {
    /// The policy being evaluated.
    policy: &'p Policy,
    /// Where the attributes are read from.
    host: &'h mut dyn AttributeHost,
    /// `None`: not fetched yet; `Some(None)`: absent on this request.
    cache: Vec<Option<Option<Value>>>,
    /// Per [`Policy::bindings`]: `None` until built.
    roots: Vec<Option<Value>>,
}

impl Evaluation<'_, '_> {
    /// Fetches attribute `index` into the cache unless it is there (request headers by name
    /// only, when the policy reads them so).
    fn fetch(&mut self, index: usize) {
        if let Some(Some(_)) = self.cache.get(index) {
            return;
        }
        let Some(attr) = self.policy.attributes.get(index) else {
            return;
        };
        // `auth` and `request.auth` are two attributes of one source: read it once.
        let first = self
            .policy
            .first_of_source
            .get(index)
            .copied()
            .unwrap_or(index);
        if first != index {
            self.fetch(first);
            let v = self.cache.get(first).cloned().flatten();
            if let Some(slot) = self.cache.get_mut(index) {
                *slot = v;
            }
            return;
        }
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

    /// Evaluates `expr` for this request: its value, or the interpreter's error as text.
    fn run(&mut self, expr: &CompiledExpr) -> Result<Value, String> {
        let policy = self.policy;
        let mut scope = policy.context.new_inner_scope();
        self.bind(expr, |b, value| {
            if let Some(binding) = policy.bindings.get(b) {
                scope.add_variable_from_value(binding.name.as_str(), value);
            }
        });
        scope.resolve(&expr.expr).map_err(|e| describe(&e))
    }

    /// The root variables `expr` sees, captured for its evaluation after the response.
    fn capture(&mut self, expr: &CompiledExpr) -> Vec<(usize, Value)> {
        let mut out = Vec::with_capacity(expr.bindings.len());
        self.bind(expr, |b, value| out.push((b, value)));
        out
    }

    /// Hands `f` each root variable `expr` sees, as (index into the bindings, value): what it
    /// reads is fetched (in order, each attribute once per request), each root built once per
    /// request.
    fn bind(&mut self, expr: &CompiledExpr, mut f: impl FnMut(usize, Value)) {
        for &i in &expr.attributes {
            self.fetch(i);
        }
        for &b in &expr.bindings {
            let Some(binding) = self.policy.bindings.get(b) else {
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
            f(b, value);
        }
    }
}

/// The text of an interpreter error, as [`EvalError::reason`] holds it.
fn describe(e: &ExecutionError) -> String {
    e.to_string()
}

/// The string form of a counter value (the descriptor entry's value): a string as is, a
/// number or bool in CEL's notation, a list or map as compact JSON with map keys in sorted
/// order (so one value always gives one counter).
fn counter_value(v: Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.as_ref().clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::UInt(u) => Ok(u.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        v @ (Value::List(_) | Value::Map(_)) => {
            let json = canonical_json(&v, 0)?;
            serde_json::to_string(&json).map_err(|e| e.to_string())
        }
        other => Err(format!(
            "a counter must be a string, int, uint, double, bool, list or map, got {:?}",
            other.type_of()
        )),
    }
}

/// How deep a list or map counter may nest (bounded: the conversion recurses).
const MAX_COUNTER_DEPTH: usize = 32;

/// A list or map counter value as JSON, map keys sorted.
fn canonical_json(v: &Value, depth: usize) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    if depth > MAX_COUNTER_DEPTH {
        return Err(format!(
            "a counter may nest at most {MAX_COUNTER_DEPTH} lists or maps deep"
        ));
    }
    Ok(match v {
        Value::Null => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::UInt(u) => J::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::String(s) => J::String(s.as_ref().clone()),
        Value::List(items) => J::Array(
            items
                .iter()
                .map(|x| canonical_json(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Value::Map(m) => {
            // Sorted here: serde_json keeps insertion order when a crate enables its
            // `preserve_order` feature, and a CEL map iterates in hash order.
            let mut sorted = std::collections::BTreeMap::new();
            for (k, x) in m.map.iter() {
                let key = match k {
                    Key::String(s) => s.as_ref().clone(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                sorted.insert(key, canonical_json(x, depth + 1)?);
            }
            J::Object(sorted.into_iter().collect())
        }
        other => J::String(format!("{other:?}")),
    })
}

/// A whole number ≥ 0 that an expression gives as an int or uint: a reservation amount, a
/// cost. `what` names it in the errors (`a reservation amount must not be negative, got -1`).
pub(super) fn whole_number(v: Value, what: &str) -> Result<u64, String> {
    match v {
        Value::UInt(n) => Ok(n),
        Value::Int(n) => {
            u64::try_from(n).map_err(|_| format!("{what} must not be negative, got {n}"))
        }
        other => Err(format!(
            "{what} must be an int or uint, got {:?}",
            other.type_of()
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::OnError;
    use crate::policy::test_support::{host, MapHost, TUTORIAL};
    use crate::policy::{Policy, Rate};

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
    fn missing_identity_refuses_the_request_by_default() {
        let p = Policy::from_json(TUTORIAL.as_bytes()).unwrap();
        let mut h = MapHost::default();
        h.properties
            .insert("request.path".into(), b"/v1/chat/completions".to_vec());
        let d = p.evaluate(&mut h);
        assert!(d.applied.is_empty());
        // Evaluation stops at the first failure of an `onError: deny` limit.
        assert_eq!(d.errors.len(), 1);
        let refusal = d.refusal().unwrap();
        assert_eq!(refusal.limit, "free");
        assert!(
            refusal.reason.to_lowercase().contains("no such key"),
            "{:?}",
            d.errors
        );
    }

    #[test]
    fn on_error_skip_keeps_the_other_limits() {
        let cfg = TUTORIAL.replace(
            r#""counters": [{"expression": "auth.identity.userid"}]
    },"#,
            r#""counters": [{"expression": "auth.identity.userid"}], "onError": "skip"
    },"#,
        );
        assert_ne!(cfg, TUTORIAL);
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        // The identity has no groups: `free` (skip) does not apply, `gold` (deny) refuses.
        let mut h = host("/v1/chat/completions", "user-1", "gold");
        h.set_metadata(&[(
            "envoy.filters.http.ext_authz",
            serde_json::json!({"identity": {"userid": "user-1"}}),
        )]);
        let d = p.evaluate(&mut h);
        assert_eq!(d.errors.len(), 2);
        assert_eq!(d.errors[0].on_error, OnError::Skip);
        assert_eq!(d.refusal().map(|e| e.limit.as_str()), Some("gold"));
        // With groups the skipped limit's failure is gone and gold applies.
        let d = p.evaluate(&mut host("/v1/chat/completions", "user-2", "gold"));
        assert_eq!((d.errors.len(), d.applied.len()), (0, 1));
    }

    #[test]
    fn typed_identity_in_predicates_and_counters() {
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
          "auth": {"metadataNamespace": "envoy.filters.http.jwt_authn"},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
            "when": [
              {"predicate": "auth.claims.groups.exists(g, g == \"gold\")"},
              {"predicate": "auth.claims.level >= 2 && auth.claims.premium"},
              {"predicate": "request.auth.claims.org.name == \"acme\""}
            ],
            "counters": [
              {"expression": "auth.claims.sub"},
              {"expression": "auth.claims.level"},
              {"expression": "auth.claims.groups"},
              {"expression": "auth.claims.org"}
            ]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        let claims = |groups: serde_json::Value| {
            serde_json::json!({"claims": {"sub": "alice", "groups": groups, "level": 2,
                "premium": true, "org": {"name": "acme", "id": 7}}})
        };
        let mut h = MapHost::default();
        h.set_metadata(&[(
            "envoy.filters.http.jwt_authn",
            claims(serde_json::json!(["free", "gold"])),
        )]);
        let d = p.evaluate(&mut h);
        assert_eq!(d.errors, vec![]);
        let values: Vec<&str> = d.applied[0]
            .counters
            .iter()
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            values,
            vec![
                "alice",
                "2",
                r#"["free","gold"]"#,
                r#"{"id":7,"name":"acme"}"#
            ]
        );
        // `auth` and `request.auth` are one read of the metadata per request.
        assert_eq!(h.fetched, vec!["metadata".to_string()]);
        let mut h = MapHost::default();
        h.set_metadata(&[(
            "envoy.filters.http.jwt_authn",
            claims(serde_json::json!(["free"])),
        )]);
        assert!(p.evaluate(&mut h).applied.is_empty());
    }

    #[test]
    fn headers_and_typed_properties() {
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
            "when": [{"predicate": "request.headers[\"x-tier\"].lowerAscii() == \"basic\" && source.port > 1000 && has(request.headers.host)"}],
            "counters": [{"expression": "request.headers[\"x-tier\"]"}, {"expression": "source.port"}]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        let mut h = MapHost {
            request_headers: vec![
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
        // The type is only known at run time: an identity field.
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}], "when": [{"predicate": "auth.identity.userid"}]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        let d = p.evaluate(&mut host("/", "user-1", "free"));
        assert!(d.applied.is_empty());
        assert!(d.refusal().unwrap().reason.contains("must be a bool"));
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
            request_headers: vec![
                ("x-a".into(), b"1".to_vec()),
                ("x-b".into(), b"B".to_vec()),
                ("x-a".into(), b"2".to_vec()),
                ("x-c".into(), b"C".to_vec()),
            ],
            ..Default::default()
        };
        // By name: only x-a and x-b are converted; repeated headers are joined.
        let p = Policy::from_json(
            cfg(r#"request.headers["x-a"] == "1,2" && !has(request.headers.xz)"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            p.header_names,
            Some(vec!["x-a".to_string(), "xz".to_string(), "x-b".to_string()])
        );
        let d = p.evaluate(&mut host());
        assert_eq!(d.errors, vec![]);
        assert_eq!(d.applied[0].counters[0].1, "B");
        // As a whole: every header is there.
        for when in [
            r#"request.headers.exists(k, k == "x-c")"#,
            r#"size(request.headers) == 3"#,
        ] {
            let p = Policy::from_json(cfg(when).as_bytes()).unwrap();
            assert_eq!(p.header_names, None, "{when}");
            let d = p.evaluate(&mut host());
            assert_eq!((d.applied.len(), d.errors), (1, vec![]), "{when}");
        }
    }
}
