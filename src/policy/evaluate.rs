//! Evaluating a [`Policy`] for one request: each limit's predicates, then its counters, over
//! attributes fetched lazily from the host (each at most once per request).

use super::{Applied, CompiledExpr, Decision, EvalError, Policy};
use crate::attributes::{self, AttributeHost};
use cel_interpreter::{ExecutionError, Value};

impl Policy {
    /// Evaluates every limit for one request, reading attributes from `host` lazily.
    ///
    /// Never fails as a whole: [`Decision::applied`] holds the limits whose predicates are
    /// all `true` and whose counters all evaluated, in [`Policy::limits`] order; a limit whose
    /// predicate is not a bool or whose expression fails (a missing attribute, an overflow, a
    /// counter that is not a string, int, uint, double or bool) does not apply, and the
    /// failure is in [`Decision::errors`].
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
            // A limit whose amount cannot be evaluated still applies (it is enforced with the
            // request's own bound); the error is counted like any other.
            let amount = limit.reservation_amount.as_ref().and_then(|e| {
                match eval.run(e).and_then(amount_value) {
                    Ok(n) => Some(n),
                    Err(reason) => {
                        decision.errors.push(EvalError {
                            limit: limit.name.clone(),
                            expression: e.source.clone(),
                            reason,
                        });
                        None
                    }
                }
            });
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

/// The text of an interpreter error, as [`EvalError::reason`] holds it.
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

/// A reservation amount: a non-negative int or uint (tokens).
fn amount_value(v: Value) -> Result<u64, String> {
    match v {
        Value::UInt(n) => Ok(n),
        Value::Int(n) => u64::try_from(n)
            .map_err(|_| format!("a reservation amount must not be negative, got {n}")),
        other => Err(format!(
            "a reservation amount must be an int or uint, got {:?}",
            other.type_of()
        )),
    }
}

#[cfg(test)]
mod tests {
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
