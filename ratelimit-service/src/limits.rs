//! Reading Limitador's `limits.yaml`.
//!
//! The file is a YAML list of limits, the format `limitador-server` reads:
//!
//! ```yaml
//! - namespace: llm                    # the gRPC request's `domain`
//!   name: free-per-minute            # optional, shown in metrics and statuses
//!   max_value: 50                    # hits (tokens) allowed per window
//!   seconds: 60                      # fixed window length, starting at the first hit
//!   conditions:                      # CEL predicates over `descriptors`, all must hold
//!     - "descriptors[0]['limit.free'] == '1'"
//!   variables:                       # CEL expressions: one counter per distinct value
//!     - "descriptors[0]['auth.identity.userid']"
//! ```
//!
//! This reader is stricter than Limitador's, because a mistake in this file silently disables a
//! limit: unknown fields, a missing `max_value` or `seconds`, a zero `seconds`, an empty
//! namespace, CEL that does not parse, CEL that names a variable other than `descriptors` (the
//! only one a request binds; `limit` is also bound in conditions) and two entries that are the
//! same limit (same namespace, seconds, conditions and variables: Limitador would keep only one)
//! are refused, with the entry's position and the reason.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use limitador::limit::{Expression, Limit, Predicate};
use serde::Deserialize;

/// Why a limits file was refused. `Display` gives a one-line message naming the file (when
/// known), the entry (0-based position in the list, and its name if it has one) and the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsError(String);

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitsError {}

/// One entry of the file, as written. Field names are Limitador's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitEntry {
    namespace: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    max_value: u64,
    seconds: u64,
    #[serde(default)]
    conditions: Vec<String>,
    #[serde(default)]
    variables: Vec<String>,
}

/// CEL variables a request context binds: `descriptors` (a list of string maps, one per request
/// descriptor) and, for conditions only, `limit` (`limit.name`, `limit.id`).
const BOUND_IN_VARIABLES: &[&str] = &["descriptors"];
const BOUND_IN_CONDITIONS: &[&str] = &["descriptors", "limit"];

/// Reads and checks the limits file at `path`. See the module docs for what is refused.
pub fn load_limits_file(path: &Path) -> Result<Vec<Limit>, LimitsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LimitsError(format!("cannot read limits file {}: {e}", path.display())))?;
    parse_limits(&text).map_err(|e| LimitsError(format!("limits file {}: {}", path.display(), e.0)))
}

/// Parses and checks the text of a limits file. See the module docs for what is refused.
pub fn parse_limits(text: &str) -> Result<Vec<Limit>, LimitsError> {
    if text.trim().is_empty() {
        return Err(LimitsError(
            "the file is empty; write `[]` for a service with no limits".into(),
        ));
    }
    let entries: Vec<LimitEntry> = serde_yaml::from_str(text).map_err(|e| {
        LimitsError(format!(
            "not a YAML list of limits (namespace, name, max_value, seconds, conditions, variables): {e}"
        ))
    })?;

    let mut limits = Vec::with_capacity(entries.len());
    // Limitador's identity of a limit, to refuse duplicates: position of the first one.
    let mut seen: HashMap<(String, u64, Vec<String>, Vec<String>), usize> = HashMap::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let what = match &entry.name {
            Some(name) => format!("limit #{index} ({name:?})"),
            None => format!("limit #{index}"),
        };
        let limit =
            build_limit(entry).map_err(|reason| LimitsError(format!("{what}: {reason}")))?;

        let mut conditions: Vec<String> = limit.conditions().into_iter().collect();
        conditions.sort();
        let mut variables: Vec<String> = limit.variables().into_iter().collect();
        variables.sort();
        let key = (
            limit.namespace().as_ref().to_string(),
            limit.seconds(),
            conditions,
            variables,
        );
        if let Some(first) = seen.insert(key, index) {
            return Err(LimitsError(format!(
                "{what}: same namespace, seconds, conditions and variables as limit #{first}; \
                 Limitador would keep only one of them (merge them, or change the window)"
            )));
        }
        limits.push(limit);
    }
    Ok(limits)
}

fn build_limit(entry: LimitEntry) -> Result<Limit, String> {
    if entry.namespace.is_empty() {
        return Err("`namespace` is empty".into());
    }
    if entry.seconds == 0 {
        return Err("`seconds` must be at least 1".into());
    }
    let mut conditions = Vec::with_capacity(entry.conditions.len());
    for source in &entry.conditions {
        check_variables(source, "condition", BOUND_IN_CONDITIONS)?;
        let predicate = Predicate::parse(source)
            .map_err(|e| format!("condition {source:?} is not valid CEL: {e}"))?;
        conditions.push(predicate);
    }
    let mut variables = Vec::with_capacity(entry.variables.len());
    for source in &entry.variables {
        check_variables(source, "variable", BOUND_IN_VARIABLES)?;
        variables.push(
            Expression::parse(source)
                .map_err(|e| format!("variable {source:?} is not valid CEL: {e}"))?,
        );
    }
    let mut limit = match entry.id {
        Some(id) => Limit::with_id(
            id,
            entry.namespace,
            entry.max_value,
            entry.seconds,
            conditions,
            variables,
        ),
        None => Limit::new(
            entry.namespace,
            entry.max_value,
            entry.seconds,
            conditions,
            variables,
        ),
    };
    if let Some(name) = entry.name {
        limit.set_name(name);
    }
    Ok(limit)
}

/// Refuses CEL that does not parse or that reads a variable no request binds (such a limit would
/// never apply).
fn check_variables(source: &str, kind: &str, bound: &[&str]) -> Result<(), String> {
    let expression = Expression::parse(source)
        .map_err(|e| format!("{kind} {source:?} is not valid CEL: {e}"))?;
    for variable in expression.variables() {
        if !bound.contains(&variable.as_str()) {
            return Err(format!(
                "{kind} {source:?} reads `{variable}`, but a request only binds {}, so the \
                 limit would never apply (the limitador engine also counts macro variables \
                 such as `x` in `descriptors.exists(x, ..)` as unbound): \
                 write e.g. descriptors[0]['{variable}']",
                bound
                    .iter()
                    .map(|b| format!("`{b}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
- namespace: llm
  name: free
  max_value: 50
  seconds: 60
  conditions: ["descriptors[0]['limit.free'] == '1'"]
  variables: ["descriptors[0]['auth.identity.userid']"]
- namespace: llm
  max_value: 1000
  seconds: 86400
  conditions: ["descriptors[0]['limit.free'] == '1'"]
  variables: ["descriptors[0]['auth.identity.userid']"]
"#;

    #[test]
    fn reads_limitador_format() {
        let limits = parse_limits(GOOD).unwrap();
        assert_eq!(limits.len(), 2);
        assert_eq!(limits[0].name(), Some("free"));
        assert_eq!(limits[0].max_value(), 50);
        assert_eq!(limits[0].seconds(), 60);
        assert_eq!(limits[0].namespace().as_ref(), "llm");
        assert!(limits[0]
            .variables()
            .contains("descriptors[0]['auth.identity.userid']"));
        assert_eq!(limits[1].name(), None);
        assert_eq!(limits[1].seconds(), 86400);
    }

    #[test]
    fn empty_list_is_no_limits_but_empty_file_is_refused() {
        assert!(parse_limits("[]").unwrap().is_empty());
        assert!(parse_limits("  \n").unwrap_err().0.contains("empty"));
    }

    fn err(text: &str) -> String {
        parse_limits(text).unwrap_err().to_string()
    }

    #[test]
    fn refuses_unknown_field() {
        let e = err("- {namespace: llm, max_values: 5, seconds: 60}");
        assert!(e.contains("unknown field `max_values`"), "{e}");
    }

    #[test]
    fn refuses_missing_max_value() {
        let e = err("- {namespace: llm, seconds: 60}");
        assert!(e.contains("missing field `max_value`"), "{e}");
    }

    #[test]
    fn refuses_zero_window_and_empty_namespace() {
        let e = err("- {namespace: llm, name: x, max_value: 5, seconds: 0}");
        assert!(
            e.contains("limit #0 (\"x\")") && e.contains("`seconds`"),
            "{e}"
        );
        let e = err("- {namespace: '', max_value: 5, seconds: 1}");
        assert!(e.contains("`namespace` is empty"), "{e}");
    }

    #[test]
    fn refuses_bad_cel() {
        let e = err("- {namespace: llm, max_value: 5, seconds: 1}\n\
             - {namespace: llm, max_value: 5, seconds: 1, conditions: [\"descriptors[0][ == \"]}");
        assert!(e.starts_with("limit #1: condition"), "{e}");
        assert!(e.contains("not valid CEL"), "{e}");
    }

    #[test]
    fn refuses_unbound_variable() {
        let e = err("- {namespace: llm, max_value: 5, seconds: 1, variables: [\"user\"]}");
        assert!(e.contains("reads `user`"), "{e}");
        let e = err(
            "- {namespace: llm, max_value: 5, seconds: 1, conditions: [\"request.path == '/'\"]}",
        );
        assert!(e.contains("reads `request`"), "{e}");
    }

    #[test]
    fn accepts_limit_binding_and_functions() {
        let limits = parse_limits(
            "- {namespace: llm, name: n, max_value: 5, seconds: 1, conditions: \
               [\"limit.name == 'n'\", \"size(descriptors) > 0\"]}",
        )
        .unwrap();
        assert_eq!(limits[0].conditions().len(), 2);
    }

    #[test]
    fn refuses_macro_variables_the_engine_would_never_bind() {
        let e = err("- {namespace: llm, max_value: 5, seconds: 1, \
               conditions: [\"descriptors.exists(d, d.x == '1')\"]}");
        assert!(e.contains("reads `d`") && e.contains("never apply"), "{e}");
    }

    #[test]
    fn refuses_duplicate_limit() {
        let e = err(
            "- {namespace: llm, max_value: 5, seconds: 60, variables: [\"descriptors[0].u\"]}\n\
             - {namespace: llm, max_value: 9, seconds: 60, variables: [\"descriptors[0].u\"]}",
        );
        assert!(e.contains("limit #1") && e.contains("as limit #0"), "{e}");
    }

    #[test]
    fn refuses_non_list() {
        let e = err("namespace: llm\nmax_value: 5\nseconds: 60\n");
        assert!(e.contains("not a YAML list of limits"), "{e}");
    }
}
