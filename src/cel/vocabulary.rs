//! Configure-time checks of what an expression names: every free identifier is an attribute
//! root or a macro's variable, every function exists, and a result whose type the syntax tree
//! shows is of the type its place needs (a predicate is a bool). What passes can still fail
//! at run time (a missing attribute, a key absent from a map): the limit's `onError` decides
//! then.

use super::guards::MACROS;
use crate::attributes::{self, Field};
use cel_parser::{Atom, Expression, Member, RelationOp, UnaryOp};

/// The functions an expression may call: `cel-interpreter`'s standard ones (its
/// `Context::default`, with the `regex` and `chrono` features), the string extensions the
/// filter adds ([`super::functions::root_context`]), and `requestBodyJSON`.
pub(crate) const FUNCTIONS: [&str; 37] = [
    // cel-interpreter
    "contains",
    "size",
    "has",
    "map",
    "filter",
    "all",
    "max",
    "min",
    "startsWith",
    "endsWith",
    "string",
    "bytes",
    "double",
    "exists",
    "exists_one",
    "int",
    "uint",
    "matches",
    "duration",
    "timestamp",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
    // the filter's
    "split",
    "lowerAscii",
    "upperAscii",
    "trim",
    "replace",
    "join",
    attributes::REQUEST_BODY_JSON,
];

/// Names users of other CEL dialects write, and what to write here instead.
const HINTS: [(&str, &str); 8] = [
    ("lower", "lowerAscii"),
    ("toLower", "lowerAscii"),
    ("lowercase", "lowerAscii"),
    ("upper", "upperAscii"),
    ("toUpper", "upperAscii"),
    ("startswith", "startsWith"),
    ("endswith", "endsWith"),
    ("length", "size"),
];

/// Refuses a free identifier that is neither an attribute root nor the variable of an
/// enclosing macro, and a call of a function that does not exist.
#[cfg(test)]
pub(crate) fn check_names(e: &Expression) -> Result<(), String> {
    check(e, &mut Vec::new())
}

/// [`check_names`] for an expression that also sees `variables` (a cost expression's
/// `usage`).
pub(crate) fn check_names_with(e: &Expression, variables: &[&str]) -> Result<(), String> {
    check(e, &mut variables.iter().map(|v| v.to_string()).collect())
}

/// Refuses a read of the `usage` variable (a cost expression's) that is not one of `fields`:
/// `usage.promt`, `usage["x"]`, or `usage` as a whole.
pub(crate) fn check_fields_of(
    e: &Expression,
    variable: &str,
    fields: &[&str],
) -> Result<(), String> {
    let unknown = |name: &str| {
        format!(
            "`{variable}.{name}` is not a usage figure; `{variable}` has {}",
            fields
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut result = Ok(());
    walk(e, &mut |x| {
        if result.is_err() {
            return false;
        }
        match x {
            Expression::Member(target, member) if matches!(target.as_ref(), Expression::Ident(n) if n.as_str() == variable) =>
            {
                let name = match member.as_ref() {
                    Member::Attribute(name) => Some(name.as_str()),
                    Member::Index(i) => match i.as_ref() {
                        Expression::Atom(Atom::String(s)) => Some(s.as_str()),
                        _ => None,
                    },
                    Member::Fields(_) => None,
                };
                match name {
                    Some(n) if fields.contains(&n) => {}
                    Some(n) => result = Err(unknown(n)),
                    None => {
                        result = Err(format!(
                            "read `{variable}` by a constant field name, e.g. `{variable}.prompt`"
                        ))
                    }
                }
                false
            }
            Expression::Ident(n) if n.as_str() == variable => {
                result = Err(format!(
                    "read one figure of `{variable}` at a time, e.g. `{variable}.prompt`"
                ));
                false
            }
            _ => true,
        }
    });
    result
}

/// Calls `f` on `e` and, while `f` returns true, on the expressions below it.
pub(crate) fn walk(e: &Expression, f: &mut dyn FnMut(&Expression) -> bool) {
    if !f(e) {
        return;
    }
    match e {
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => {
            walk(a, f);
            walk(b, f);
        }
        Expression::Ternary(a, b, c) => {
            walk(a, f);
            walk(b, f);
            walk(c, f);
        }
        Expression::Unary(_, a) => walk(a, f),
        Expression::Member(t, m) => {
            walk(t, f);
            match m.as_ref() {
                Member::Index(i) => walk(i, f),
                Member::Fields(fields) => fields.iter().for_each(|(_, v)| walk(v, f)),
                Member::Attribute(_) => {}
            }
        }
        Expression::FunctionCall(func, target, args) => {
            walk(func, f);
            if let Some(t) = target {
                walk(t, f);
            }
            args.iter().for_each(|a| walk(a, f));
        }
        Expression::List(items) => items.iter().for_each(|x| walk(x, f)),
        Expression::Map(entries) => entries.iter().for_each(|(k, v)| {
            walk(k, f);
            walk(v, f);
        }),
        Expression::Atom(_) | Expression::Ident(_) => {}
    }
}

fn known_function(name: &str) -> bool {
    FUNCTIONS.contains(&name)
}

fn unknown_identifier(name: &str) -> String {
    let hint = match name {
        "response" => " (response attributes are not known before the upstream answers: the policy is evaluated before)".to_string(),
        "usage" => " (the usage is known after the response: only a `tokens: cost` limit's `cost` expression reads it)".to_string(),
        "headers" => " (the request headers are `request.headers`)".to_string(),
        "identity" => " (the identity an auth filter left is `auth.identity`)".to_string(),
        "path" | "url_path" | "method" | "host" => format!(" (did you mean `request.{name}`?)"),
        _ => String::new(),
    };
    format!(
        "`{name}` is not defined; expressions read the attributes {}{hint}",
        attributes::ROOTS
            .iter()
            .filter(|r| **r != attributes::REQUEST_BODY_JSON)
            .map(|r| format!("`{r}`"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn unknown_function(name: &str) -> String {
    match HINTS.iter().find(|(n, _)| *n == name) {
        Some((_, instead)) => format!("there is no function `{name}`; write `{instead}`"),
        None => format!(
            "there is no function `{name}`; the functions are: {}",
            FUNCTIONS.join(", ")
        ),
    }
}

fn check(e: &Expression, bound: &mut Vec<String>) -> Result<(), String> {
    match e {
        Expression::Ident(name) => {
            if attributes::ROOTS.contains(&name.as_str()) || bound.iter().any(|b| b == &**name) {
                Ok(())
            } else {
                Err(unknown_identifier(name))
            }
        }
        Expression::FunctionCall(func, target, args) => {
            let Expression::Ident(name) = func.as_ref() else {
                return Err("only named functions can be called".into());
            };
            if !known_function(name) {
                return Err(unknown_function(name));
            }
            if MACROS.contains(&name.as_str()) {
                // `list.m(x, body)` or `m(list, x, body)`: the list sees the outer scope, the
                // body the variable too.
                let (list, rest): (Option<&Expression>, &[Expression]) = match target {
                    Some(t) => (Some(t.as_ref()), args.as_slice()),
                    None => (args.first(), args.get(1..).unwrap_or_default()),
                };
                if let Some(list) = list {
                    check(list, bound)?;
                }
                if let [Expression::Ident(var), body, ..] = rest {
                    bound.push(var.as_ref().clone());
                    let result = check(body, bound);
                    bound.pop();
                    return result;
                }
                return Err(format!(
                    "`{name}` takes a variable and an expression, e.g. `list.{name}(x, x == \"a\")`"
                ));
            }
            if name.as_str() == "has" {
                // `has(x.f)` tests a field: the path must still name an attribute.
                return args.iter().try_for_each(|a| check(a, bound));
            }
            if let Some(t) = target {
                check(t, bound)?;
            }
            args.iter().try_for_each(|a| check(a, bound))
        }
        Expression::Arithmetic(a, _, b)
        | Expression::Relation(a, _, b)
        | Expression::Or(a, b)
        | Expression::And(a, b) => {
            check(a, bound)?;
            check(b, bound)
        }
        Expression::Ternary(a, b, c) => {
            check(a, bound)?;
            check(b, bound)?;
            check(c, bound)
        }
        Expression::Unary(_, a) => check(a, bound),
        Expression::Member(t, m) => {
            check(t, bound)?;
            match m.as_ref() {
                Member::Index(i) => check(i, bound),
                Member::Fields(fields) => fields.iter().try_for_each(|(_, v)| check(v, bound)),
                Member::Attribute(_) => Ok(()),
            }
        }
        Expression::List(items) => items.iter().try_for_each(|x| check(x, bound)),
        Expression::Map(entries) => entries.iter().try_for_each(|(k, v)| {
            check(k, bound)?;
            check(v, bound)
        }),
        Expression::Atom(_) => Ok(()),
    }
}

/// The CEL type of `e` when the syntax tree alone shows it (`"bool"`, `"string"`, `"int"`,
/// ...), `None` when it depends on values (an identity field, arithmetic).
pub(crate) fn static_type(e: &Expression) -> Option<&'static str> {
    match e {
        Expression::Atom(a) => Some(match a {
            Atom::Int(_) => "int",
            Atom::UInt(_) => "uint",
            Atom::Float(_) => "double",
            Atom::String(_) => "string",
            Atom::Bytes(_) => "bytes",
            Atom::Bool(_) => "bool",
            Atom::Null => "null",
        }),
        Expression::Relation(_, RelationOp::In, _) | Expression::Relation(..) => Some("bool"),
        Expression::Or(..) | Expression::And(..) => Some("bool"),
        Expression::Unary(UnaryOp::Not | UnaryOp::DoubleNot, _) => Some("bool"),
        Expression::List(_) => Some("list"),
        Expression::Map(_) => Some("map"),
        Expression::Ternary(_, a, b) => {
            let t = static_type(a)?;
            (static_type(b)? == t).then_some(t)
        }
        Expression::FunctionCall(func, _, _) => match func.as_ref() {
            Expression::Ident(name) => match name.as_str() {
                "has" | "exists" | "all" | "exists_one" | "startsWith" | "endsWith"
                | "contains" | "matches" => Some("bool"),
                "size" | "int" => Some("int"),
                "uint" => Some("uint"),
                "double" => Some("double"),
                "string" | "lowerAscii" | "upperAscii" | "trim" | "replace" | "join" => {
                    Some("string")
                }
                "split" | "map" | "filter" => Some("list"),
                "timestamp" => Some("timestamp"),
                "duration" => Some("duration"),
                _ => None,
            },
            _ => None,
        },
        Expression::Ident(_) | Expression::Member(..) => attribute_type(e),
        Expression::Arithmetic(..) | Expression::Unary(..) => None,
    }
}

/// The type of an attribute of Envoy's vocabulary selected by `e` (`request.url_path` is a
/// string), `None` for anything else.
fn attribute_type(e: &Expression) -> Option<&'static str> {
    let Expression::Member(target, member) = e else {
        return None;
    };
    let (Expression::Ident(root), Member::Attribute(name)) = (target.as_ref(), member.as_ref())
    else {
        // `request.headers["x"]`: a header is a string.
        if let (Expression::Member(t, m), Member::Index(_)) = (target.as_ref(), member.as_ref()) {
            if let (Expression::Ident(root), Member::Attribute(name)) = (t.as_ref(), m.as_ref()) {
                if root.as_str() == "request" && name.as_str() == "headers" {
                    return Some("string");
                }
            }
        }
        return None;
    };
    if root.as_str() == crate::policy::USAGE_VARIABLE {
        // Only a cost expression gets this far with it (`check_names_with`).
        return Some(if name.as_str() == "model" {
            "string"
        } else {
            "int"
        });
    }
    match attributes::known_field(root, name)? {
        Field::Value(kind) => Some(kind.cel_type()),
        Field::Headers => Some("map"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(src: &str) -> Result<(), String> {
        check_names(&cel_parser::parse(src).unwrap())
    }

    fn ty(src: &str) -> Option<&'static str> {
        static_type(&cel_parser::parse(src).unwrap())
    }

    #[test]
    fn macro_variables_are_bound_only_in_their_body() {
        assert_eq!(
            names(r#"auth.identity.groups.exists(g, g == "free")"#),
            Ok(())
        );
        assert_eq!(names(r#"[1, 2].all(x, [3].exists(y, x < y))"#), Ok(()));
        let e = names(r#"auth.identity.groups.exists(g, g == "free") && g == "x""#).unwrap_err();
        assert!(e.starts_with("`g` is not defined"), "{e}");
    }

    #[test]
    fn unknown_identifiers_and_functions_are_refused_with_a_hint() {
        let e = names(r#"response.code == 200"#).unwrap_err();
        assert!(e.contains("not known before the upstream answers"), "{e}");
        let e = names(r#"headers["x"] == "a""#).unwrap_err();
        assert!(e.contains("`request.headers`"), "{e}");
        let e = names(r#"request.path.lower() == "a""#).unwrap_err();
        assert_eq!(e, "there is no function `lower`; write `lowerAscii`");
        let e = names(r#"frobnicate(request.path)"#).unwrap_err();
        assert!(
            e.contains("there is no function `frobnicate`; the functions are: contains"),
            "{e}"
        );
        assert_eq!(
            names(r#"has(auth.identity.groups) && request.path.startsWith("/v1")"#),
            Ok(())
        );
        assert_eq!(names(r#"requestBodyJSON('/model') == "m""#), Ok(()));
    }

    #[test]
    fn every_listed_function_exists_in_the_root_context() {
        let ctx = super::super::functions::root_context();
        for f in FUNCTIONS {
            if f == attributes::REQUEST_BODY_JSON {
                continue;
            }
            let src = format!("{f}()");
            let err = ctx
                .new_inner_scope()
                .resolve(&cel_parser::parse(&src).unwrap())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(!err.contains("Undeclared"), "{f}: {err}");
        }
        let err = ctx
            .resolve(&cel_parser::parse("frobnicate()").unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("Undeclared"), "{err}");
    }

    #[test]
    fn static_types_follow_the_syntax_tree() {
        assert_eq!(ty(r#"request.url_path == "/v1""#), Some("bool"));
        assert_eq!(ty(r#"request.url_path"#), Some("string"));
        assert_eq!(ty(r#"request.headers["x-tier"]"#), Some("string"));
        assert_eq!(ty(r#"connection.mtls"#), Some("bool"));
        assert_eq!(ty(r#"source.port"#), Some("int"));
        assert_eq!(ty(r#"auth.identity.admin"#), None);
        assert_eq!(ty(r#"size(auth.identity.groups)"#), Some("int"));
        assert_eq!(ty(r#"true ? "a" : "b""#), Some("string"));
        assert_eq!(ty(r#"true ? "a" : 1"#), None);
        assert_eq!(ty(r#"x.exists(g, g == 1)"#), Some("bool"));
        assert_eq!(ty(r#"1 + 2"#), None);
    }
}
