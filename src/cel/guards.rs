//! Configure-time checks and rewrites of CEL expressions: refusing what the parser or the
//! interpreter would panic on (bad literals, macros without arguments), bounding size and
//! depth to the wasm stack, and turning `requestBodyJSON('/pointer')` into an attribute.

use crate::attributes;
use cel_parser::{Atom, Expression, Member};

/// Rewrites `requestBodyJSON('/pointer')` into the attribute `requestBodyJSON['/pointer']`, so
/// that it is fetched (the body parsed once) like any other attribute. The argument must be a
/// constant string holding a JSON pointer.
pub(crate) fn body_json_as_attribute(e: Expression) -> Result<Expression, String> {
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
pub(crate) const MAX_EXPRESSION_BYTES: usize = 16 * 1024;

/// The deepest CEL syntax tree accepted. Compiling and evaluating recurse once per level, and
/// the wasm module's stack is 1 MiB: about 1,600 levels (`[[[...]]]`, `1 + 1 + ...`) overflow
/// it, which traps the VM. Real predicates and counters nest less than 20 deep.
pub(crate) const MAX_EXPRESSION_DEPTH: usize = 100;

/// Whether `e` nests deeper than `limit` levels (recursing at most `limit` deep).
pub(crate) fn nested_deeper_than(e: &Expression, limit: usize) -> bool {
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
pub(crate) const MACROS: [&str; 5] = ["map", "filter", "all", "exists", "exists_one"];

/// Refuses a macro call without its variable and expression (`list.map(x)`): the interpreter
/// reads a macro's arguments by position without checking their number, so such a call
/// compiles but panics, killing the wasm VM, on every request that evaluates it.
pub(crate) fn check_macro_arguments(e: &Expression) -> Result<(), String> {
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
        Expression::Map(entries) => entries
            .iter()
            .try_for_each(|(k, v)| rec(k).and_then(|_| rec(v))),
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
pub(crate) fn check_literals(src: &str) -> Result<(), String> {
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
            b'r' | b'R' | b'b' | b'B' if matches!(bytes.get(i + 1), Some(b'"' | b'\'')) => {
                Some(i + 1)
            }
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
            i += if c == b'-' && bytes.get(i + 1) == Some(&b'-') {
                2
            } else {
                1
            };
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
                b'\\' if k + 1 < bytes.len() && bytes[k + 1] != b'\n' => {
                    k += 1 + src_char_len(bytes, k + 1)
                }
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
        while k < b.len()
            && (if hex {
                b[k].is_ascii_hexdigit()
            } else {
                b[k].is_ascii_digit()
            })
        {
            k += 1;
        }
        k
    };
    let exponent = |k: usize| -> Option<usize> {
        if !matches!(b.get(k), Some(b'e' | b'E')) {
            return None;
        }
        let k = if matches!(b.get(k + 1), Some(b'-' | b'+')) {
            k + 2
        } else {
            k + 1
        };
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
    let strip =
        |s: &str, drop: &[char]| s.chars().filter(|c| !drop.contains(c)).collect::<String>();
    match (float, hex, unsigned) {
        (true, _, _) => t.parse::<f64>().is_ok(),
        (false, false, false) => t.parse::<i64>().is_ok(),
        (false, false, true) => t[..t.len() - 1].parse::<u64>().is_ok(),
        (false, true, false) => i64::from_str_radix(&strip(t, &['x', 'X']), 16).is_ok(),
        (false, true, true) => u64::from_str_radix(&strip(t, &['x', 'X', 'u', 'U']), 16).is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::test_support::{refused, MapHost};
    use crate::policy::Policy;

    #[test]
    fn request_body_json_is_an_attribute() {
        let cfg = r#"{"rateLimitService": {"cluster": "c", "domain": "d"}, "requestBody": {"allowOnHeadersStopIteration": true},
          "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}],
            "when": [{"predicate": "requestBodyJSON('/model').startsWith('gpt-')"}],
            "counters": [{"expression": "requestBodyJSON('/model')"}, {"expression": "requestBodyJSON('/n') + 1"}]}}}"#;
        let p = Policy::from_json(cfg.as_bytes()).unwrap();
        assert!(p.needs_body);
        let d = p.evaluate(&mut MapHost {
            body_json: Some(serde_json::json!({"model": "gpt-4o", "n": 2})),
            ..MapHost::default()
        });
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
            .evaluate(&mut MapHost {
                body_json: Some(serde_json::json!({"model": "llama"})),
                ..MapHost::default()
            })
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
            assert!(
                e.reason.starts_with("CEL does not compile: "),
                "{expr}: {e}"
            );
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
            assert!(
                e.reason.contains("takes a variable and an expression"),
                "{expr}: {e}"
            );
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
}
