//! Checked arithmetic and indexing: the rewrite of CEL operators into calls of functions that
//! fail on overflow, a zero divisor or an out-of-range index instead of panicking.

use cel_interpreter::{ExecutionError, Value};
use cel_parser::{ArithmeticOp, Atom, Expression, Member, UnaryOp};
use std::sync::Arc;

/// Name of the function that replaces `+` (see [`checked_arithmetic`]).
pub(super) const CHECKED_ADD: &str = "__token_ratelimit_add";
/// Name of the function that replaces binary `-`.
pub(super) const CHECKED_SUB: &str = "__token_ratelimit_sub";
/// Name of the function that replaces `*`.
pub(super) const CHECKED_MUL: &str = "__token_ratelimit_mul";
/// Name of the function that replaces `/`.
pub(super) const CHECKED_DIV: &str = "__token_ratelimit_div";
/// Name of the function that replaces `%`.
pub(super) const CHECKED_MOD: &str = "__token_ratelimit_mod";
/// Name of the function that replaces unary `-`.
pub(super) const CHECKED_NEG: &str = "__token_ratelimit_neg";
/// Name of the function that replaces `x[i]` (unless `i` is a constant string).
pub(super) const CHECKED_INDEX: &str = "__token_ratelimit_index";

/// Rewrites the arithmetic operators (`+`, `-`, `*`, `/`, `%`, unary `-`) and indexing with a
/// computed or numeric index into calls of checked functions. The interpreter computes with Rust's operators: `/` and `%` panic on a zero
/// divisor and on `i64::MIN / -1` even in release builds, `+`, `-`, `*` and negation overflow
/// (a panic with overflow checks, a silently wrapped value without: `int(h) * 1000 > 5000`
/// would be false for a huge `h`), and timestamp and duration arithmetic panics in chrono on
/// overflow; `string[i]` overflows for `i = 2^63 - 1`. A request could choose such operands
/// (e.g. from a header), and a panic would kill the wasm VM. The checked functions return an error instead, as CEL specifies: the limit
/// does not apply.
pub(crate) fn checked_arithmetic(e: Expression) -> Expression {
    let b = |e: Box<Expression>| Box::new(checked_arithmetic(*e));
    let call = |name: &str, args: Vec<Expression>| {
        Expression::FunctionCall(
            Box::new(Expression::Ident(Arc::new(name.to_string()))),
            None,
            args,
        )
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
            Member::Index(i) if !matches!(i.as_ref(), Expression::Atom(Atom::String(_))) => call(
                CHECKED_INDEX,
                vec![checked_arithmetic(*t), checked_arithmetic(*i)],
            ),
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

/// Both operands as `f64`, when both are numbers (int, uint or double).
fn numeric_pair(a: &Value, b: &Value) -> Option<(f64, f64)> {
    let f = |v: &Value| match v {
        Value::Int(i) => Some(*i as f64),
        Value::UInt(u) => Some(*u as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    };
    Some((f(a)?, f(b)?))
}

/// `a + b` ([`CHECKED_ADD`]): int and uint sums, duration sums and timestamp plus duration
/// fail with an `overflow` error instead of wrapping or panicking; other operands (doubles,
/// strings, lists, ...) add as the interpreter adds them.
pub(super) fn cel_add(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = || ExecutionError::function_error("+", "overflow");
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x.checked_add(*y).map(Value::Int).ok_or_else(fail),
        (Value::UInt(x), Value::UInt(y)) => x.checked_add(*y).map(Value::UInt).ok_or_else(fail),
        (Value::Duration(x), Value::Duration(y)) => {
            x.checked_add(y).map(Value::Duration).ok_or_else(fail)
        }
        (Value::Timestamp(t), Value::Duration(d)) | (Value::Duration(d), Value::Timestamp(t)) => t
            .checked_add_signed(*d)
            .map(Value::Timestamp)
            .ok_or_else(fail),
        _ => a + b,
    }
}

/// `a - b` ([`CHECKED_SUB`]): int and uint differences, duration differences and timestamp
/// minus duration fail with an `overflow` error; other operands subtract as the interpreter
/// subtracts them.
pub(super) fn cel_sub(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = || ExecutionError::function_error("-", "overflow");
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x.checked_sub(*y).map(Value::Int).ok_or_else(fail),
        (Value::UInt(x), Value::UInt(y)) => x.checked_sub(*y).map(Value::UInt).ok_or_else(fail),
        (Value::Duration(x), Value::Duration(y)) => {
            x.checked_sub(y).map(Value::Duration).ok_or_else(fail)
        }
        (Value::Timestamp(t), Value::Duration(d)) => t
            .checked_sub_signed(*d)
            .map(Value::Timestamp)
            .ok_or_else(fail),
        _ => a - b,
    }
}

/// `a * b` ([`CHECKED_MUL`]): int and uint products fail with an `overflow` error; other
/// operands multiply as the interpreter multiplies them.
pub(super) fn cel_mul(a: Value, b: Value) -> cel_interpreter::ResolveResult {
    let fail = || ExecutionError::function_error("*", "overflow");
    match (&a, &b) {
        (Value::Int(x), Value::Int(y)) => x.checked_mul(*y).map(Value::Int).ok_or_else(fail),
        (Value::UInt(x), Value::UInt(y)) => x.checked_mul(*y).map(Value::UInt).ok_or_else(fail),
        _ => a * b,
    }
}

/// `-a` ([`CHECKED_NEG`]): an int fails with an `overflow` error at `i64::MIN`, a double is
/// negated, anything else is an unsupported operand.
pub(super) fn cel_neg(a: Value) -> cel_interpreter::ResolveResult {
    match a {
        Value::Int(x) => x
            .checked_neg()
            .map(Value::Int)
            .ok_or_else(|| ExecutionError::function_error("-", "overflow")),
        Value::Float(x) => Ok(Value::Float(-x)),
        other => Err(ExecutionError::UnsupportedUnaryOperator("minus", other)),
    }
}

/// `target[index]` ([`CHECKED_INDEX`]) as the interpreter computes it, without its unchecked
/// `index + 1`: a list or string index out of range (or negative) gives `null`, a missing map
/// key `null`; an index of the wrong type is an error.
pub(super) fn cel_index(target: Value, index: Value) -> cel_interpreter::ResolveResult {
    let found = |v: Option<&Value>| Ok(v.cloned().unwrap_or(Value::Null));
    match (target, index) {
        (Value::List(items), Value::Int(i)) => {
            found(usize::try_from(i).ok().and_then(|i| items.get(i)))
        }
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

/// `a / b` ([`CHECKED_DIV`]): int and uint division fail with an error on a zero divisor (and
/// `i64::MIN / -1`); any other pair of numbers divides as doubles; non-numbers are an error.
pub(super) fn cel_div(a: Value, b: Value) -> cel_interpreter::ResolveResult {
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

/// `a % b` ([`CHECKED_MOD`]): int and uint remainders fail with an error on a zero divisor (and
/// `i64::MIN % -1`); operands other than two ints or two uints are an error.
pub(super) fn cel_mod(a: Value, b: Value) -> cel_interpreter::ResolveResult {
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

#[cfg(test)]
mod tests {
    use crate::policy::test_support::MapHost;
    use crate::policy::Policy;

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
                request_headers: vec![
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

    /// A policy with one limit whose only counter is `expr`, evaluated over headers `a` and
    /// `b`: the counter's value, or the error.
    fn counter_of(expr: &str, a: &str, b: &str) -> Result<String, String> {
        let cfg = serde_json::json!({"rateLimitService": {"cluster": "c", "domain": "d"},
            "limits": {"l": {"rates": [{"limit": 1, "window": "1s"}], "counters": [{"expression": expr}]}}});
        let p = Policy::from_json(cfg.to_string().as_bytes()).unwrap();
        let mut h = MapHost {
            request_headers: vec![
                ("a".into(), a.as_bytes().to_vec()),
                ("b".into(), b.as_bytes().to_vec()),
            ],
            ..Default::default()
        };
        h.properties.insert(
            "request.time".into(),
            1_700_000_000_000_000_000i64.to_le_bytes().to_vec(),
        );
        let d = p.evaluate(&mut h);
        match (d.applied.first(), d.errors.first()) {
            (Some(a), _) => Ok(a.counters[0].1.clone()),
            (None, Some(e)) => Err(e.reason.clone()),
            (None, None) => panic!("no case gives neither"),
        }
    }

    #[test]
    fn overflowing_arithmetic_is_an_error_not_a_panic_or_a_wrapped_value() {
        // Found by the `cel_eval` fuzz target: `*` overflowed inside the interpreter (a panic
        // with overflow checks, a wrapped value in the wasm module).
        let i = "int(request.headers['a'])";
        let u = "uint(request.headers['a'])";
        for (expr, a, b) in [
            (
                format!("{i} * int(request.headers['b'])"),
                "9223372036854775807",
                "2",
            ),
            (
                format!("{i} + int(request.headers['b'])"),
                "9223372036854775807",
                "1",
            ),
            (
                format!("{i} - int(request.headers['b'])"),
                "-9223372036854775808",
                "1",
            ),
            (format!("-{i}"), "-9223372036854775808", ""),
            (format!("{u} * 2u"), "18446744073709551615", ""),
            (format!("{u} + 1u"), "18446744073709551615", ""),
            (format!("{u} - 1u"), "0", ""),
        ] {
            let got = counter_of(&expr, a, b);
            assert!(
                matches!(&got, Err(e) if e.contains("overflow")),
                "{expr} with {a}, {b}: {got:?}"
            );
        }
        // Indexing a string at 2^63 - 1 overflowed (`i + 1`) inside the interpreter.
        // Found by the `cel_eval` fuzz target.
        let at = "request.headers['a'][int(request.headers['b'])]";
        for i in ["9223372036854775807", "-1", "3"] {
            let got = counter_of(at, "abc", i);
            assert!(
                matches!(&got, Err(e) if e.contains("got Null")),
                "{i}: {got:?}"
            );
        }
        assert_eq!(counter_of(at, "abc", "1"), Ok("b".into()));
        assert_eq!(
            counter_of(
                "'abc'[0] + string([1, 2, 3][int(request.headers['b'])])",
                "",
                "2"
            ),
            Ok("a3".into())
        );
        assert_eq!(
            counter_of(
                "{'k': 'v'}[request.headers['a']] + {1: 'one'}[int(request.headers['b'])]",
                "k",
                "1"
            ),
            Ok("vone".into())
        );
        assert!(counter_of("[1][request.headers['a']]", "k", "")
            .unwrap_err()
            .contains("index"));
        // In range, the operators compute as before, for every type they take.
        assert_eq!(
            counter_of(
                &format!("{i} * int(request.headers['b']) - 1 + -{i}"),
                "6",
                "7"
            ),
            Ok("35".into())
        );
        assert_eq!(
            counter_of(&format!("{u} * 2u + 1u - 3u"), "6", ""),
            Ok("10".into())
        );
        assert_eq!(
            counter_of("1.5 * 2.0 - 0.5 + -1.0", "", ""),
            Ok("1.5".into())
        );
        assert_eq!(
            counter_of(
                "request.headers['a'] + '-' + request.headers['b']",
                "x",
                "y"
            ),
            Ok("x-y".into())
        );
        assert_eq!(counter_of("size([1] + [2, 3])", "", ""), Ok("3".into()));
        assert_eq!(
            counter_of(
                "string(request.time + duration('1h') - duration('30m'))",
                "",
                ""
            ),
            Ok("2023-11-14T22:43:20+00:00".into())
        );
        assert_eq!(
            counter_of(
                "(request.time - timestamp('2023-11-14T22:13:10Z')) == duration('10s')",
                "",
                ""
            ),
            Ok("true".into())
        );
    }
}
