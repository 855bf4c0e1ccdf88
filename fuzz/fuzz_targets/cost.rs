//! Cost budgets (`tokens: cost`): the cost CEL expression and the `prices` table.
//!
//! The first byte of the input picks the mode:
//! - 0: the rest up to the first newline is the limit's `cost` expression as text (refused or
//!   compiled, never a panic at configure time); what follows is decoded with `arbitrary` as
//!   the request and the usages, as in mode 1.
//! - 1: the expression is generated from `arbitrary`, typed (int, uint, double, bool) so that
//!   it compiles (asserted): `+ - * / %`, unary `-`, ternaries, comparisons, `&&`/`||`/`!`,
//!   `usage.*` figures, int and uint literals up to their extremes, `int()`/`uint()`/`double()`,
//!   `size()`, `requestBodyJSON(...)`, `request.headers[...]`, `usage.model == "..."`, map
//!   literals indexed by the model. A small reference evaluator computes what it must give
//!   where it only reads the usage and literals (checked arithmetic, CEL's truncated `/` and
//!   `%`, a missing map key is `null`).
//! - 2: a `prices` table of arbitrary rows (u64 prices, extremes included), checked against
//!   a reference computation, for monotonicity and through a policy.
//!
//! In modes 0 and 1 the policy is evaluated over a request from the input (headers, body
//! JSON), then `Policy::cost` and `Policy::charge_cost` run over arbitrary usage figures
//! (u64 extremes, figures above `i64::MAX`): `charge_cost` gives the cost when `cost` is Ok,
//! else the fallback usage's cost, else the limit's smallest rate (`onError: deny`) or 0
//! (`skip`), pushing one error per failed computation.
#![no_main]

mod common;

use arbitrary::{Arbitrary, Unstructured};
use common::MapHost;
use libfuzzer_sys::fuzz_target;
use std::cell::Cell;
use std::collections::BTreeMap;
use token_ratelimit::config::{PriceRow, PricesConfig};
use token_ratelimit::cost::{CostUsage, PriceTable, Prices};
use token_ratelimit::estimate::RequestBound;
use token_ratelimit::policy::{CostInputs, Policy};

/// Model names the usages, the maps and the price tables pick from: dated snapshots, a
/// prefix that is no snapshot (`gpt-4omni`), the empty model.
const MODELS: &[&str] = &[
    "",
    "a",
    "b",
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4o-2024-08-06",
    "gpt-4o-mini-2024-07-18",
    "gpt-4omni",
    "claude",
    "claude-3-opus",
];

/// Request headers the expressions read.
const HEADERS: &[&str] = &["x-a", "x-b", "x-model"];

/// Body fields the expressions read (`requestBodyJSON('/<field>')`).
const BODY_FIELDS: &[&str] = &["model", "n", "max_tokens"];

/// Most usages from the input evaluated per input.
const MAX_USAGES: usize = 8;

/// Usages evaluated for every input besides its own: `(prompt, completion, total, cached,
/// cacheWrite, reasoning, model)`.
const FIXED_USAGES: &[(u64, u64, u64, u64, u64, u64, &str)] = &[
    (0, 0, 0, 0, 0, 0, ""),
    (1000, 200, 1200, 300, 100, 50, "a"),
    (3, 1, 4, 0, 0, 0, "gpt-4o-2024-08-06"),
    (1_000_000, 10, 1_000_010, 0, 999_999, 10, "gpt-4o"),
    (i64::MAX as u64, 1, i64::MAX as u64, 0, 0, 1, "b"),
    (u64::MAX, u64::MAX, u64::MAX, 1, 1, u64::MAX, "gpt-4o"),
];

fn fixed_usages<'a>() -> impl Iterator<Item = CostUsage<'a>> {
    FIXED_USAGES.iter().map(
        |&(prompt, completion, total, cached, cache_write, reasoning, model)| CostUsage {
            prompt,
            completion,
            total,
            cached,
            cache_write,
            reasoning,
            model,
        },
    )
}

// ---------------------------------------------------------------------------------------
// Numbers

/// A u64 figure, extremes often.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum N {
    Zero,
    Small(u8),
    Medium(u32),
    Any(u64),
    I64Max,
    /// Above `i64::MAX`: the `usage` map cannot hold it.
    AboveI64(u32),
    Max,
    MaxMinus(u8),
}

impl N {
    fn get(self) -> u64 {
        match self {
            N::Zero => 0,
            N::Small(n) => u64::from(n),
            N::Medium(n) => u64::from(n),
            N::Any(n) => n,
            N::I64Max => i64::MAX as u64,
            N::AboveI64(n) => (i64::MAX as u64) + 1 + u64::from(n),
            N::Max => u64::MAX,
            N::MaxMinus(n) => u64::MAX - u64::from(n),
        }
    }
}

/// An int literal, extremes often.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum ILit {
    Small(i8),
    Any(i64),
    Max,
    Min,
    MinPlusOne,
    Million,
}

impl ILit {
    fn get(self) -> i64 {
        match self {
            ILit::Small(n) => i64::from(n),
            ILit::Any(n) => n,
            ILit::Max => i64::MAX,
            ILit::Min => i64::MIN,
            ILit::MinPlusOne => i64::MIN + 1,
            ILit::Million => 1_000_000,
        }
    }
}

/// A uint literal, extremes often.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum ULit {
    Small(u8),
    Any(u64),
    Max,
    I64Max,
    Million,
}

impl ULit {
    fn get(self) -> u64 {
        match self {
            ULit::Small(n) => u64::from(n),
            ULit::Any(n) => n,
            ULit::Max => u64::MAX,
            ULit::I64Max => i64::MAX as u64,
            ULit::Million => 1_000_000,
        }
    }
}

/// A model name: one of [`MODELS`] mostly.
#[derive(Arbitrary, Debug, Clone)]
enum Model {
    Known(u8),
    Other(String),
}

impl Model {
    fn name(&self) -> &str {
        match self {
            Model::Known(i) => MODELS[*i as usize % MODELS.len()],
            Model::Other(s) => s,
        }
    }
}

/// A CEL string literal of `s` (JSON's escapes are CEL escapes).
fn cel_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// An int literal as CEL text (a negative one as a negation; `i64::MIN` has no literal).
fn int_literal(n: i64) -> String {
    match n {
        i64::MIN => "(-9223372036854775807 - 1)".into(),
        n if n < 0 => format!("(-{})", n.unsigned_abs()),
        n => n.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// Generated expressions, typed

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl Op {
    fn text(self) -> &'static str {
        match self {
            Op::Add => "+",
            Op::Sub => "-",
            Op::Mul => "*",
            Op::Div => "/",
            Op::Rem => "%",
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn text(self) -> &'static str {
        match self {
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }

    fn holds<T: Ord>(self, a: T, b: T) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
        }
    }
}

/// The six `usage` figures, by index.
const FIGURES: [&str; 6] = ["prompt", "completion", "total", "cached", "cacheWrite", "reasoning"];

/// An int-typed expression.
#[derive(Arbitrary, Debug, Clone)]
enum I {
    /// `usage.<figure>`
    Figure(u8),
    Lit(ILit),
    Bin(Op, Box<I>, Box<I>),
    Neg(Box<I>),
    Cond(Box<B>, Box<I>, Box<I>),
    /// `int(u)`
    OfUint(Box<U>),
    /// `int(d)`
    OfDouble(Box<D>),
    /// `int(request.headers[h])`
    Header(u8),
    /// `size(request.headers[h])`
    HeaderSize(u8),
    /// `int(requestBodyJSON('/f'))`
    Body(u8),
    /// `size(usage.model)`
    ModelSize,
    /// `(usage.model in {m: n, ...}) ? {m: n, ...}[usage.model] : else`
    ByModel(Vec<(Model, ILit)>, ILit),
    /// `{m: n, ...}[usage.model]`: `null` for a model it does not name.
    ByModelRaw(Vec<(Model, ILit)>),
}

/// A uint-typed expression.
#[derive(Arbitrary, Debug, Clone)]
enum U {
    Figure(u8),
    Lit(ULit),
    Bin(Op, Box<U>, Box<U>),
    Cond(Box<B>, Box<U>, Box<U>),
    /// `uint(i)`
    OfInt(Box<I>),
    /// `uint(d)`
    OfDouble(Box<D>),
    /// `uint(request.headers[h])`
    Header(u8),
    /// `uint(requestBodyJSON('/f'))`
    Body(u8),
    /// `{m: n, ...}[usage.model]` with uint values, guarded by `in`.
    ByModel(Vec<(Model, ULit)>, ULit),
}

/// A double-typed expression.
#[derive(Arbitrary, Debug, Clone)]
enum D {
    /// `<mantissa>.<fraction>e<exponent>`
    Lit(u32, u8, i16),
    /// `double("NaN")`, `double("inf")`, `double("-inf")`, `double("-0")`
    Special(u8),
    OfInt(Box<I>),
    OfUint(Box<U>),
    /// `double(request.headers[h])`
    Header(u8),
    /// `+ - * /` (a double has no `%`)
    Bin(Op, Box<D>, Box<D>),
}

/// A bool-typed expression.
#[derive(Arbitrary, Debug, Clone)]
enum B {
    Lit(bool),
    CmpI(Cmp, Box<I>, Box<I>),
    CmpU(Cmp, Box<U>, Box<U>),
    CmpD(Cmp, Box<D>, Box<D>),
    /// `usage.model == "..."`
    ModelIs(Model),
    /// `usage.model.startsWith("...")`
    ModelStarts(Model),
    /// `requestBodyJSON('/model') == "..."`
    BodyModelIs(Model),
    /// `request.headers[h] == "..."`
    HeaderIs(u8, String),
    And(Box<B>, Box<B>),
    Or(Box<B>, Box<B>),
    Not(Box<B>),
}

/// The whole cost expression: an int or a uint.
#[derive(Arbitrary, Debug, Clone)]
enum Top {
    Int(I),
    Uint(U),
}

/// Limits on a generated expression: nodes in all, and depth (each node nests up to 3 CEL
/// levels; the filter refuses more than 100, and more than 16 KiB).
struct Budget {
    nodes: u32,
    depth: u32,
}

const MAX_NODES: u32 = 40;
const MAX_DEPTH: u32 = 12;
/// Most entries of a generated map literal.
const MAX_ENTRIES: usize = 4;

impl Budget {
    /// Takes a node at `depth`: false when the budget is spent (the node becomes a leaf).
    fn take(&mut self, depth: u32) -> bool {
        if self.nodes == 0 || depth >= self.depth {
            return false;
        }
        self.nodes -= 1;
        true
    }
}

fn cut<T: Clone>(entries: &[T]) -> Vec<T> {
    entries.iter().take(MAX_ENTRIES).cloned().collect()
}

// Pruning: a copy of the tree within the budget (deeper nodes become leaves), so that what is
// rendered and what the reference evaluates are the same tree.
impl I {
    fn prune(&self, b: &mut Budget, d: u32) -> I {
        if !b.take(d) {
            return I::Lit(ILit::Small(1));
        }
        let bx = |e: I| Box::new(e);
        match self {
            I::Bin(op, x, y) => I::Bin(*op, bx(x.prune(b, d + 1)), bx(y.prune(b, d + 1))),
            I::Neg(x) => I::Neg(bx(x.prune(b, d + 1))),
            I::Cond(c, x, y) => I::Cond(
                Box::new(c.prune(b, d + 1)),
                bx(x.prune(b, d + 1)),
                bx(y.prune(b, d + 1)),
            ),
            I::OfUint(x) => I::OfUint(Box::new(x.prune(b, d + 1))),
            I::OfDouble(x) => I::OfDouble(Box::new(x.prune(b, d + 1))),
            I::ByModel(m, e) => I::ByModel(cut(m), *e),
            I::ByModelRaw(m) => I::ByModelRaw(cut(m)),
            leaf => leaf.clone(),
        }
    }
}

impl U {
    fn prune(&self, b: &mut Budget, d: u32) -> U {
        if !b.take(d) {
            return U::Lit(ULit::Small(1));
        }
        let bx = |e: U| Box::new(e);
        match self {
            U::Bin(op, x, y) => U::Bin(*op, bx(x.prune(b, d + 1)), bx(y.prune(b, d + 1))),
            U::Cond(c, x, y) => U::Cond(
                Box::new(c.prune(b, d + 1)),
                bx(x.prune(b, d + 1)),
                bx(y.prune(b, d + 1)),
            ),
            U::OfInt(x) => U::OfInt(Box::new(x.prune(b, d + 1))),
            U::OfDouble(x) => U::OfDouble(Box::new(x.prune(b, d + 1))),
            U::ByModel(m, e) => U::ByModel(cut(m), *e),
            leaf => leaf.clone(),
        }
    }
}

impl D {
    fn prune(&self, b: &mut Budget, d: u32) -> D {
        if !b.take(d) {
            return D::Lit(1, 5, 0);
        }
        match self {
            D::OfInt(x) => D::OfInt(Box::new(x.prune(b, d + 1))),
            D::OfUint(x) => D::OfUint(Box::new(x.prune(b, d + 1))),
            D::Bin(op, x, y) => {
                // A double has no `%`: it is a `/` here.
                let op = if let Op::Rem = op { Op::Div } else { *op };
                D::Bin(op, Box::new(x.prune(b, d + 1)), Box::new(y.prune(b, d + 1)))
            }
            leaf => leaf.clone(),
        }
    }
}

impl B {
    fn prune(&self, b: &mut Budget, d: u32) -> B {
        if !b.take(d) {
            return B::Lit(true);
        }
        let bx = |e: B| Box::new(e);
        match self {
            B::CmpI(c, x, y) => B::CmpI(*c, Box::new(x.prune(b, d + 1)), Box::new(y.prune(b, d + 1))),
            B::CmpU(c, x, y) => B::CmpU(*c, Box::new(x.prune(b, d + 1)), Box::new(y.prune(b, d + 1))),
            B::CmpD(c, x, y) => B::CmpD(*c, Box::new(x.prune(b, d + 1)), Box::new(y.prune(b, d + 1))),
            B::And(x, y) => B::And(bx(x.prune(b, d + 1)), bx(y.prune(b, d + 1))),
            B::Or(x, y) => B::Or(bx(x.prune(b, d + 1)), bx(y.prune(b, d + 1))),
            B::Not(x) => B::Not(bx(x.prune(b, d + 1))),
            leaf => leaf.clone(),
        }
    }
}

impl Top {
    fn prune(&self) -> Top {
        let mut b = Budget { nodes: MAX_NODES, depth: MAX_DEPTH };
        match self {
            Top::Int(e) => Top::Int(e.prune(&mut b, 0)),
            Top::Uint(e) => Top::Uint(e.prune(&mut b, 0)),
        }
    }
}

// Rendering, fully parenthesized.

fn header(h: u8) -> String {
    format!("request.headers[{}]", cel_string(HEADERS[h as usize % HEADERS.len()]))
}

fn body(f: u8) -> String {
    format!("requestBodyJSON('/{}')", BODY_FIELDS[f as usize % BODY_FIELDS.len()])
}

fn figure(f: u8) -> &'static str {
    FIGURES[f as usize % FIGURES.len()]
}

fn map_literal<T: Copy>(entries: &[(Model, T)], value: impl Fn(T) -> String) -> String {
    let items: Vec<String> = entries
        .iter()
        .map(|(m, v)| format!("{}: {}", cel_string(m.name()), value(*v)))
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// An expression tree that writes itself as CEL text.
trait Render {
    fn render(&self, out: &mut String);
}

/// `(l op r)`.
fn infix(out: &mut String, l: &dyn Render, op: &str, r: &dyn Render) {
    out.push('(');
    l.render(out);
    out.push_str(&format!(" {op} "));
    r.render(out);
    out.push(')');
}

/// `name(x)`.
fn call(out: &mut String, name: &str, x: &dyn Render) {
    out.push_str(name);
    out.push('(');
    x.render(out);
    out.push(')');
}

/// `(c ? x : y)`.
fn ternary(out: &mut String, c: &B, x: &dyn Render, y: &dyn Render) {
    out.push('(');
    c.render(out);
    out.push_str(" ? ");
    x.render(out);
    out.push_str(" : ");
    y.render(out);
    out.push(')');
}

impl Render for I {
    fn render(&self, out: &mut String) {
        match self {
            I::Figure(f) => out.push_str(&format!("usage.{}", figure(*f))),
            I::Lit(n) => out.push_str(&int_literal(n.get())),
            I::Bin(op, x, y) => infix(out, x.as_ref(), op.text(), y.as_ref()),
            I::Neg(x) => {
                out.push_str("(-");
                x.render(out);
                out.push(')');
            }
            I::Cond(c, x, y) => ternary(out, c, x.as_ref(), y.as_ref()),
            I::OfUint(x) => call(out, "int", x.as_ref()),
            I::OfDouble(x) => call(out, "int", x.as_ref()),
            I::Header(h) => out.push_str(&format!("int({})", header(*h))),
            I::HeaderSize(h) => out.push_str(&format!("size({})", header(*h))),
            I::Body(f) => out.push_str(&format!("int({})", body(*f))),
            I::ModelSize => out.push_str("size(usage.model)"),
            I::ByModel(m, e) => {
                let map = map_literal(m, |v: ILit| int_literal(v.get()));
                out.push_str(&format!(
                    "((usage.model in {map}) ? {map}[usage.model] : {})",
                    int_literal(e.get())
                ));
            }
            I::ByModelRaw(m) => {
                let map = map_literal(m, |v: ILit| int_literal(v.get()));
                out.push_str(&format!("{map}[usage.model]"));
            }
        }
    }
}

impl Render for U {
    fn render(&self, out: &mut String) {
        match self {
            U::Figure(f) => out.push_str(&format!("uint(usage.{})", figure(*f))),
            U::Lit(n) => out.push_str(&format!("{}u", n.get())),
            U::Bin(op, x, y) => infix(out, x.as_ref(), op.text(), y.as_ref()),
            U::Cond(c, x, y) => ternary(out, c, x.as_ref(), y.as_ref()),
            U::OfInt(x) => call(out, "uint", x.as_ref()),
            U::OfDouble(x) => call(out, "uint", x.as_ref()),
            U::Header(h) => out.push_str(&format!("uint({})", header(*h))),
            U::Body(f) => out.push_str(&format!("uint({})", body(*f))),
            U::ByModel(m, e) => {
                let map = map_literal(m, |v: ULit| format!("{}u", v.get()));
                out.push_str(&format!(
                    "((usage.model in {map}) ? {map}[usage.model] : {}u)",
                    e.get()
                ));
            }
        }
    }
}

impl Render for D {
    fn render(&self, out: &mut String) {
        match self {
            D::Lit(m, f, e) => out.push_str(&format!("{m}.{f}e{e}")),
            D::Special(s) => out.push_str(
                ["double(\"NaN\")", "double(\"inf\")", "double(\"-inf\")", "double(\"-0\")"]
                    [*s as usize % 4],
            ),
            D::OfInt(x) => call(out, "double", x.as_ref()),
            D::OfUint(x) => call(out, "double", x.as_ref()),
            D::Header(h) => out.push_str(&format!("double({})", header(*h))),
            D::Bin(op, x, y) => infix(out, x.as_ref(), op.text(), y.as_ref()),
        }
    }
}

impl Render for B {
    fn render(&self, out: &mut String) {
        match self {
            B::Lit(v) => out.push_str(if *v { "true" } else { "false" }),
            B::CmpI(c, x, y) => infix(out, x.as_ref(), c.text(), y.as_ref()),
            B::CmpU(c, x, y) => infix(out, x.as_ref(), c.text(), y.as_ref()),
            B::CmpD(c, x, y) => infix(out, x.as_ref(), c.text(), y.as_ref()),
            B::ModelIs(m) => out.push_str(&format!("(usage.model == {})", cel_string(m.name()))),
            B::ModelStarts(m) => {
                out.push_str(&format!("usage.model.startsWith({})", cel_string(m.name())))
            }
            B::BodyModelIs(m) => {
                out.push_str(&format!("({} == {})", body(0), cel_string(m.name())))
            }
            B::HeaderIs(h, v) => out.push_str(&format!("({} == {})", header(*h), cel_string(v))),
            B::And(x, y) => infix(out, x.as_ref(), "&&", y.as_ref()),
            B::Or(x, y) => infix(out, x.as_ref(), "||", y.as_ref()),
            B::Not(x) => call(out, "!", x.as_ref()),
        }
    }
}

impl Top {
    fn render(&self) -> String {
        let mut out = String::new();
        match self {
            Top::Int(e) => e.render(&mut out),
            Top::Uint(e) => e.render(&mut out),
        }
        out
    }
}

// The reference: what an expression that reads only the usage and literals gives. `None`:
// not modelled here (doubles, headers, the body, `size`, `&&`/`||`, null compared), so not
// checked.

/// A value of the reference.
#[derive(Debug, Clone, Copy, PartialEq)]
enum V {
    Int(i64),
    UInt(u64),
    Bool(bool),
    Null,
}

/// `Some(Err(()))`: the expression fails (an overflow, a zero divisor, a wrong type).
type R = Option<Result<V, ()>>;

/// The figures as the `usage` map holds them (every one fits an int, or the map fails first).
struct RefUsage<'a> {
    figures: [i64; 6],
    model: &'a str,
}

fn int_op(op: Op, x: i64, y: i64) -> Result<V, ()> {
    match op {
        Op::Add => x.checked_add(y),
        Op::Sub => x.checked_sub(y),
        Op::Mul => x.checked_mul(y),
        Op::Div => x.checked_div(y),
        Op::Rem => x.checked_rem(y),
    }
    .map(V::Int)
    .ok_or(())
}

fn uint_op(op: Op, x: u64, y: u64) -> Result<V, ()> {
    match op {
        Op::Add => x.checked_add(y),
        Op::Sub => x.checked_sub(y),
        Op::Mul => x.checked_mul(y),
        Op::Div => x.checked_div(y),
        Op::Rem => x.checked_rem(y),
    }
    .map(V::UInt)
    .ok_or(())
}

/// The value of a map literal at `model` (the last entry of a key wins: `None` when a key
/// repeats, CEL refuses those).
fn by_model<T: Copy>(entries: &[(Model, T)], model: &str) -> Option<Option<T>> {
    let mut names: Vec<&str> = entries.iter().map(|(m, _)| m.name()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    Some(entries.iter().find(|(m, _)| m.name() == model).map(|(_, v)| *v))
}

impl I {
    fn reference(&self, u: &RefUsage<'_>) -> R {
        Some(match self {
            I::Figure(f) => Ok(V::Int(u.figures[*f as usize % 6])),
            I::Lit(n) => Ok(V::Int(n.get())),
            I::Bin(op, x, y) => {
                let (x, y) = (x.reference(u)?, y.reference(u)?);
                match (x, y) {
                    (Ok(V::Int(x)), Ok(V::Int(y))) => int_op(*op, x, y),
                    (Ok(V::Null), _) | (_, Ok(V::Null)) => return None,
                    _ => Err(()),
                }
            }
            I::Neg(x) => match x.reference(u)? {
                Ok(V::Int(x)) => x.checked_neg().map(V::Int).ok_or(()),
                Ok(V::Null) => return None,
                _ => Err(()),
            },
            I::Cond(c, x, y) => match c.reference(u)? {
                Ok(V::Bool(true)) => return x.reference(u),
                Ok(V::Bool(false)) => return y.reference(u),
                _ => Err(()),
            },
            I::OfUint(x) => match x.reference(u)? {
                Ok(V::UInt(n)) => i64::try_from(n).map(V::Int).map_err(|_| ()),
                Ok(V::Null) => return None,
                _ => Err(()),
            },
            I::ByModel(m, e) => Ok(match by_model(m, u.model)? {
                Some(v) => V::Int(v.get()),
                None => V::Int(e.get()),
            }),
            I::ByModelRaw(m) => Ok(match by_model(m, u.model)? {
                Some(v) => V::Int(v.get()),
                None => V::Null,
            }),
            I::OfDouble(_) | I::Header(_) | I::HeaderSize(_) | I::Body(_) | I::ModelSize => {
                return None
            }
        })
    }
}

impl U {
    fn reference(&self, u: &RefUsage<'_>) -> R {
        Some(match self {
            // Figures are ≥ 0.
            U::Figure(f) => Ok(V::UInt(u.figures[*f as usize % 6] as u64)),
            U::Lit(n) => Ok(V::UInt(n.get())),
            U::Bin(op, x, y) => match (x.reference(u)?, y.reference(u)?) {
                (Ok(V::UInt(x)), Ok(V::UInt(y))) => uint_op(*op, x, y),
                _ => Err(()),
            },
            U::Cond(c, x, y) => match c.reference(u)? {
                Ok(V::Bool(true)) => return x.reference(u),
                Ok(V::Bool(false)) => return y.reference(u),
                _ => Err(()),
            },
            U::OfInt(x) => match x.reference(u)? {
                Ok(V::Int(n)) => u64::try_from(n).map(V::UInt).map_err(|_| ()),
                Ok(V::Null) => return None,
                _ => Err(()),
            },
            U::ByModel(m, e) => Ok(match by_model(m, u.model)? {
                Some(v) => V::UInt(v.get()),
                None => V::UInt(e.get()),
            }),
            U::OfDouble(_) | U::Header(_) | U::Body(_) => return None,
        })
    }
}

impl B {
    fn reference(&self, u: &RefUsage<'_>) -> R {
        Some(match self {
            B::Lit(v) => Ok(V::Bool(*v)),
            B::CmpI(c, x, y) => match (x.reference(u)?, y.reference(u)?) {
                (Ok(V::Int(x)), Ok(V::Int(y))) => Ok(V::Bool(c.holds(x, y))),
                (Ok(V::Null), _) | (_, Ok(V::Null)) => return None,
                _ => Err(()),
            },
            B::CmpU(c, x, y) => match (x.reference(u)?, y.reference(u)?) {
                (Ok(V::UInt(x)), Ok(V::UInt(y))) => Ok(V::Bool(c.holds(x, y))),
                _ => Err(()),
            },
            B::ModelIs(m) => Ok(V::Bool(u.model == m.name())),
            B::ModelStarts(m) => Ok(V::Bool(u.model.starts_with(m.name()))),
            B::Not(x) => match x.reference(u)? {
                Ok(V::Bool(v)) => Ok(V::Bool(!v)),
                _ => Err(()),
            },
            // Both sides known and without error: CEL's commutative error absorption is not
            // modelled.
            B::And(x, y) | B::Or(x, y) => match (x.reference(u)?, y.reference(u)?) {
                (Ok(V::Bool(x)), Ok(V::Bool(y))) => {
                    Ok(V::Bool(if let B::And(..) = self { x && y } else { x || y }))
                }
                _ => return None,
            },
            B::CmpD(..) | B::BodyModelIs(_) | B::HeaderIs(..) => return None,
        })
    }
}

impl Top {
    /// The cost the expression must give (`Err`: it must fail), `None` when not modelled.
    fn reference(&self, u: &CostUsage<'_>) -> Option<Result<u64, ()>> {
        let figures = [u.prompt, u.completion, u.total, u.cached, u.cache_write, u.reasoning];
        if figures.iter().any(|&n| n > i64::MAX as u64) {
            return Some(Err(()));
        }
        let r = RefUsage {
            figures: figures.map(|n| n as i64),
            model: u.model,
        };
        let v = match self {
            Top::Int(e) => e.reference(&r)?,
            Top::Uint(e) => e.reference(&r)?,
        };
        Some(match v {
            Ok(V::Int(n)) => u64::try_from(n).map_err(|_| ()),
            Ok(V::UInt(n)) => Ok(n),
            _ => Err(()),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The request and the usages

/// A header value: bytes, or a number written out (for `int()`, `uint()`, `double()`).
#[derive(Arbitrary, Debug)]
enum HeaderValue {
    Bytes(Vec<u8>),
    Int(i64),
    UInt(u64),
    Float(f64),
    Model(Model),
}

impl HeaderValue {
    fn encode(&self) -> Vec<u8> {
        match self {
            HeaderValue::Bytes(b) => b.clone(),
            HeaderValue::Int(i) => i.to_string().into_bytes(),
            HeaderValue::UInt(u) => u.to_string().into_bytes(),
            HeaderValue::Float(f) => f.to_string().into_bytes(),
            HeaderValue::Model(m) => m.name().as_bytes().to_vec(),
        }
    }
}

/// A body field's JSON value.
#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Model(Model),
    Array(Vec<u8>),
}

impl Json {
    fn value(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Json::Null => J::Null,
            Json::Bool(b) => J::Bool(*b),
            Json::Int(i) => J::from(*i),
            Json::UInt(u) => J::from(*u),
            Json::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
            Json::Str(s) => J::String(s.clone()),
            Json::Model(m) => J::String(m.name().to_string()),
            Json::Array(items) => J::Array(items.iter().map(|&n| J::from(n)).collect()),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Request {
    /// (index into HEADERS, value)
    headers: Vec<(u8, HeaderValue)>,
    /// (index into BODY_FIELDS, value); `None`: no body.
    body: Option<Vec<(u8, Json)>>,
}

impl Request {
    fn host(&self) -> MapHost {
        let mut host = MapHost::default();
        for (i, v) in &self.headers {
            host.request_headers
                .push((HEADERS[*i as usize % HEADERS.len()].to_string(), v.encode()));
        }
        host.body_json = self.body.as_ref().map(|fields| {
            serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(i, v)| (BODY_FIELDS[*i as usize % BODY_FIELDS.len()].to_string(), v.value()))
                    .collect(),
            )
        });
        host
    }
}

/// Usage figures, as a response may report them (not necessarily consistent).
#[derive(Arbitrary, Debug, Clone)]
struct Figures {
    prompt: N,
    completion: N,
    total: N,
    cached: N,
    cache_write: N,
    reasoning: N,
    model: Model,
}

impl Figures {
    fn usage(&self) -> CostUsage<'_> {
        CostUsage {
            prompt: self.prompt.get(),
            completion: self.completion.get(),
            total: self.total.get(),
            cached: self.cached.get(),
            cache_write: self.cache_write.get(),
            reasoning: self.reasoning.get(),
            model: self.model.name(),
        }
    }
}

/// What a request declares about itself (reservation mode's bound).
#[derive(Arbitrary, Debug)]
struct Bound {
    prompt: N,
    completion: Option<N>,
    known: bool,
    default_completion: N,
    cap: N,
    model: Model,
}

/// The limit around the expression, the request, and what it spends.
#[derive(Arbitrary, Debug)]
struct Case {
    deny: bool,
    /// A counter `request.headers['x-a']`: the limit applies only to requests that have it.
    counter: bool,
    /// Rate limits (0 is refused: taken as 1).
    rates: (N, Option<N>, Option<N>),
    request: Request,
    bound: Option<Bound>,
    fallback: Option<Figures>,
    usages: Vec<Figures>,
}

fn rates(r: (N, Option<N>, Option<N>)) -> Vec<u64> {
    [Some(r.0), r.1, r.2]
        .into_iter()
        .flatten()
        .map(|n| n.get().max(1))
        .collect()
}

fn rates_json(limits: &[u64]) -> serde_json::Value {
    serde_json::Value::Array(
        limits
            .iter()
            .zip(["1m", "1h", "1d"])
            .map(|(l, w)| serde_json::json!({"limit": l, "window": w}))
            .collect(),
    )
}

/// A configuration with the cost limit `c` (and a token limit `a` before it, so that `c` is
/// not the first).
fn config(limit: serde_json::Value) -> Vec<u8> {
    let cfg = serde_json::json!({
        "rateLimitService": {"cluster": "ratelimit", "domain": "llm"},
        "requestBody": {"allowOnHeadersStopIteration": true},
        "limits": {
            "a": {"rates": [{"limit": 10, "window": "1m"}], "tokens": "total", "onError": "skip"},
            "c": limit,
        },
    });
    serde_json::to_vec(&cfg).expect("the configuration serializes")
}

fn cost_limit(expr: &str, case: &Case, limits: &[u64]) -> serde_json::Value {
    let mut limit = serde_json::json!({
        "rates": rates_json(limits),
        "tokens": "cost",
        "cost": expr,
        "onError": if case.deny { "deny" } else { "skip" },
    });
    if case.counter {
        limit["counters"] = serde_json::json!([{"expression": "request.headers['x-a']"}]);
    }
    limit
}

/// `charge_cost` is the cost when it is computed, else the fallback's cost, else the limit's
/// smallest rate (`deny`) or 0 (`skip`), with one error per failed computation; the fallback
/// is asked only when the cost fails.
fn check_charge(
    policy: &Policy,
    limit: usize,
    inputs: &[CostInputs],
    u: &CostUsage<'_>,
    fallback: Option<&CostUsage<'_>>,
    deny: bool,
    limits: &[u64],
) -> Result<u64, String> {
    let cost = policy.cost(limit, inputs, u);
    let failed = if deny { *limits.iter().min().expect("a rate") } else { 0 };

    let mut errors = Vec::new();
    let asked = Cell::new(false);
    let charged = policy.charge_cost(limit, inputs, u, || None, &mut errors);
    match &cost {
        Ok(n) => assert_eq!((charged, errors.len()), (*n, 0), "{cost:?} {errors:?}"),
        Err(_) => assert_eq!((charged, errors.len()), (failed, 1), "{cost:?} {errors:?}"),
    }

    if let Some(f) = fallback {
        let second = policy.cost(limit, inputs, f);
        let mut errors = Vec::new();
        let charged = policy.charge_cost(
            limit,
            inputs,
            u,
            || {
                asked.set(true);
                Some(f.clone())
            },
            &mut errors,
        );
        assert_eq!(asked.get(), cost.is_err());
        let expected = match (&cost, &second) {
            (Ok(n), _) => (*n, 0),
            (Err(_), Ok(n)) => (*n, 1),
            (Err(_), Err(_)) => (failed, 2),
        };
        assert_eq!((charged, errors.len()), expected, "{cost:?} {second:?} {errors:?}");
        for e in &errors {
            assert!(e.to_string().starts_with("limit `c`: cost failed: "), "{e}");
        }
    }
    cost
}

/// Modes 0 and 1: compile `expr` as limit `c`'s cost (a generated one must compile), evaluate
/// it over the request and the usages.
fn run_expression(expr: &str, generated: Option<&Top>, case: &Case) {
    let limits = rates(case.rates);
    let json = config(cost_limit(expr, case, &limits));
    let policy = match Policy::from_json(&json) {
        Ok(p) => p,
        Err(e) => {
            assert!(generated.is_none(), "a generated cost expression is refused: {e:?}\n{expr}");
            assert!(e.field.starts_with("limits.c."), "{e:?}");
            return;
        }
    };
    let c = policy.limits.iter().position(|l| l.name == "c").expect("limit c");
    assert_eq!(policy.limits.len(), 2);

    let mut host = case.request.host();
    let decision = policy.evaluate(&mut host);
    let applied = decision.applied.iter().any(|a| a.limit == c);
    assert_eq!(applied, decision.costs.iter().any(|i| i.limit == c));
    assert!(decision.costs.iter().all(|i| i.limit == c));

    let bound = case.bound.as_ref().map(|b| {
        let rb = RequestBound {
            prompt: b.prompt.get(),
            completion: b.completion.map(N::get),
        };
        let (default, cap) = (b.default_completion.get(), b.cap.get());
        let u = CostUsage::bound(b.known.then_some(&rb), default, cap, b.model.name());
        assert!(u.prompt <= cap && u.completion <= cap, "{u:?}");
        assert_eq!(u.total, u.prompt.saturating_add(u.completion));
        assert_eq!((u.cached, u.cache_write, u.reasoning), (0, 0, 0));
        u
    });
    let fallback = case.fallback.as_ref().map(Figures::usage);
    let usages = case
        .usages
        .iter()
        .take(MAX_USAGES)
        .map(Figures::usage)
        .chain(bound)
        .chain(fixed_usages());
    for u in usages {
        let cost = check_charge(&policy, c, &decision.costs, &u, fallback.as_ref(), case.deny, &limits);
        if [u.prompt, u.completion, u.total, u.cached, u.cache_write, u.reasoning]
            .iter()
            .any(|&n| n > i64::MAX as u64)
        {
            assert!(cost.is_err(), "a figure above i64::MAX: {cost:?}");
        }
        if let Some(top) = generated {
            if let Some(expected) = top.reference(&u) {
                // The reference reads no request attribute: the captured inputs do not matter.
                assert_eq!(cost.clone().map_err(|_| ()), expected, "{expr}\n{u:?}\n{cost:?}");
                assert_eq!(policy.cost(c, &[], &u).map_err(|_| ()), expected);
            }
        }
        // Without the captured attributes (a limit that did not apply): a value or an error.
        let _ = policy.cost(c, &[], &u);
        // The token limit has no cost, and there is no third limit.
        assert!(policy.cost(0, &decision.costs, &u).is_err());
        assert!(policy.cost(2, &decision.costs, &u).is_err());
        let mut errors = Vec::new();
        assert_eq!(policy.charge_cost(2, &decision.costs, &u, || None, &mut errors), 0);
        assert!(errors.is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// Prices tables

/// A price per million tokens, extremes often.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Price {
    Zero,
    Small(u16),
    /// Whole units per token: n × 1,000,000.
    PerToken(u16),
    Any(u64),
    Max,
}

impl Price {
    fn get(self) -> u64 {
        match self {
            Price::Zero => 0,
            Price::Small(n) => u64::from(n),
            Price::PerToken(n) => u64::from(n) * 1_000_000,
            Price::Any(n) => n,
            Price::Max => u64::MAX,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct Row {
    prompt: Price,
    completion: Price,
    cached: Option<Price>,
    cache_write: Option<Price>,
    reasoning: Option<Price>,
}

impl Row {
    fn config(&self) -> PriceRow {
        PriceRow {
            prompt: self.prompt.get(),
            completion: self.completion.get(),
            cached: self.cached.map(Price::get),
            cache_write: self.cache_write.map(Price::get),
            reasoning: self.reasoning.map(Price::get),
        }
    }
}

/// Which category more tokens are added to.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum More {
    Uncached,
    Cached,
    CacheWrite,
    Answer,
    Reasoning,
}

#[derive(Arbitrary, Debug)]
struct Probe {
    usage: Figures,
    more: More,
    tokens: N,
}

#[derive(Arbitrary, Debug)]
struct PricesCase {
    models: Vec<(Model, Row)>,
    default: Row,
    deny: bool,
    rates: (N, Option<N>, Option<N>),
    /// 1: the limit has a `cost` expression too; 2: the table is on a `tokens: total` limit.
    misconfigured: u8,
    fallback: Option<Figures>,
    probes: Vec<Probe>,
}

/// A row's prices per category (per million tokens): uncached prompt, cached, cache write,
/// answer (completion without reasoning), reasoning. Unset prices are the prompt's and the
/// completion's.
fn resolved(row: &PriceRow) -> [u64; 5] {
    [
        row.prompt,
        row.cached.unwrap_or(row.prompt),
        row.cache_write.unwrap_or(row.prompt),
        row.completion,
        row.reasoning.unwrap_or(row.completion),
    ]
}

/// The row that prices `model`: the one of that name, else the longest name followed by `-`
/// that `model` starts with, else the default.
fn reference_row<'t>(cfg: &'t PricesConfig, model: &str) -> &'t PriceRow {
    if let Some(row) = cfg.models.get(model) {
        return row;
    }
    let mut best: Option<(&String, &PriceRow)> = None;
    for (name, row) in &cfg.models {
        let snapshot = model.len() > name.len()
            && model.as_bytes().starts_with(name.as_bytes())
            && model.as_bytes()[name.len()] == b'-';
        if snapshot && best.is_none_or(|(b, _)| name.len() > b.len()) {
            best = Some((name, row));
        }
    }
    best.map_or(&cfg.default, |(_, row)| row)
}

/// Tokens per category of `u` (as [`resolved`] orders them), made consistent: cached and
/// cache-write tokens are part of the prompt (cached first), reasoning tokens part of the
/// completion.
fn split(u: &CostUsage<'_>) -> [u64; 5] {
    let mut rest = u.prompt;
    let cached = u.cached.min(rest);
    rest -= cached;
    let cache_write = u.cache_write.min(rest);
    rest -= cache_write;
    let reasoning = u.reasoning.min(u.completion);
    [rest, cached, cache_write, u.completion - reasoning, reasoning]
}

/// ⌈Σ tokens × price / 1,000,000⌉, `None` above `u64::MAX`.
fn reference_cost(tokens: [u64; 5], prices: [u64; 5]) -> Option<u64> {
    let mut sum: u128 = 0;
    for (t, p) in tokens.into_iter().zip(prices) {
        sum = sum.checked_add(u128::from(t) * u128::from(p))?;
    }
    let whole = sum / 1_000_000 + u128::from(sum % 1_000_000 != 0);
    u64::try_from(whole).ok()
}

/// `u` with `n` more tokens in `more` (`None` when a figure would overflow).
fn with_more<'m>(u: &CostUsage<'m>, more: More, n: u64) -> Option<CostUsage<'m>> {
    let mut v = u.clone();
    match more {
        More::Uncached => v.prompt = v.prompt.checked_add(n)?,
        More::Cached => {
            v.prompt = v.prompt.checked_add(n)?;
            v.cached = v.cached.checked_add(n)?;
        }
        More::CacheWrite => {
            v.prompt = v.prompt.checked_add(n)?;
            v.cache_write = v.cache_write.checked_add(n)?;
        }
        More::Answer => v.completion = v.completion.checked_add(n)?,
        More::Reasoning => {
            v.completion = v.completion.checked_add(n)?;
            v.reasoning = v.reasoning.checked_add(n)?;
        }
    }
    v.total = v.prompt.saturating_add(v.completion);
    Some(v)
}

fn run_prices(case: &PricesCase) {
    let cfg = PricesConfig {
        models: case
            .models
            .iter()
            .map(|(m, row)| (m.name().to_string(), row.config()))
            .collect::<BTreeMap<_, _>>(),
        default: case.default.config(),
    };
    let empty_name = cfg.models.keys().any(|k| k.trim().is_empty());
    let table = match PriceTable::compile(&cfg) {
        Ok(t) => t,
        Err(e) => {
            assert!(empty_name, "a table without an empty model name is refused: {e}");
            return;
        }
    };
    assert!(!empty_name, "a table with an empty model name compiles");
    let zero_row = PriceRow { prompt: 0, completion: 0, cached: None, cache_write: None, reasoning: None };
    let zero = PriceTable::compile(&PricesConfig {
        models: cfg.models.keys().map(|k| (k.clone(), zero_row.clone())).collect(),
        default: zero_row,
    })
    .expect("the zero table compiles");

    // The same table through a policy.
    let limits = rates(case.rates);
    let row_json = |r: &PriceRow| {
        let mut v = serde_json::json!({"prompt": r.prompt, "completion": r.completion});
        for (k, p) in [("cached", r.cached), ("cacheWrite", r.cache_write), ("reasoning", r.reasoning)] {
            if let Some(p) = p {
                v[k] = p.into();
            }
        }
        v
    };
    let models: serde_json::Map<String, serde_json::Value> =
        cfg.models.iter().map(|(k, r)| (k.clone(), row_json(r))).collect();
    let mut limit = serde_json::json!({
        "rates": rates_json(&limits),
        "tokens": "cost",
        "prices": {"models": models, "default": row_json(&cfg.default)},
        "onError": if case.deny { "deny" } else { "skip" },
    });
    match case.misconfigured % 8 {
        1 => limit["cost"] = "usage.total".into(),
        2 => limit["tokens"] = "total".into(),
        _ => {}
    }
    let policy = match Policy::from_json(&config(limit)) {
        Ok(p) => {
            assert!(!matches!(case.misconfigured % 8, 1 | 2), "a misconfigured table compiles");
            Some(p)
        }
        Err(e) => {
            assert!(matches!(case.misconfigured % 8, 1 | 2), "a valid table is refused: {e:?}");
            None
        }
    };
    let fallback = case.fallback.as_ref().map(Figures::usage);

    let fixed = fixed_usages().enumerate().map(|(i, u)| {
        let more = [More::Uncached, More::Cached, More::CacheWrite, More::Answer, More::Reasoning][i % 5];
        (u, more, 1_000_000 - 1)
    });
    let probes = case
        .probes
        .iter()
        .take(MAX_USAGES)
        .map(|p| (p.usage.usage(), p.more, p.tokens.get()))
        .chain(fixed);
    for (u, more, tokens) in probes {
        let cost = table.cost(&u);

        // The row, and the reference cost.
        let row = reference_row(&cfg, u.model);
        let prices = resolved(row);
        let p = table.row(u.model);
        assert_eq!(
            [p.prompt, p.cached, p.cache_write, p.completion, p.reasoning],
            prices,
            "the row of {:?}",
            u.model
        );
        let expected = reference_cost(split(&u), prices);
        assert_eq!(cost.clone().ok(), expected, "{u:?} at {prices:?}: {cost:?}");
        if prices == [0; 5] {
            assert_eq!(cost, Ok(0));
        }
        assert_eq!(zero.cost(&u), Ok(0));
        let all_zero = Prices { prompt: 0, cached: 0, cache_write: 0, completion: 0, reasoning: 0 };
        assert_eq!(all_zero.cost(&u), Ok(0));

        // The figures made consistent cost the same; more tokens in any category never cost
        // less (nor bring a cost too large back under u64::MAX).
        let [uncached, cached, cache_write, answer, reasoning] = split(&u);
        let consistent = CostUsage {
            prompt: uncached + cached + cache_write,
            completion: answer + reasoning,
            total: u.total,
            cached,
            cache_write,
            reasoning,
            model: u.model,
        };
        assert_eq!(table.cost(&consistent), cost, "{u:?} against {consistent:?}");
        if let Some(bigger) = with_more(&consistent, more, tokens) {
            let more = table.cost(&bigger);
            match (&cost, &more) {
                (Ok(a), Ok(b)) => assert!(b >= a, "{consistent:?}: {a}, {bigger:?}: {b}"),
                (Ok(_), Err(_)) => {}
                (Err(_), Ok(b)) => panic!("{consistent:?} costs too much, {bigger:?} costs {b}"),
                (Err(_), Err(_)) => {}
            }
        }

        if let Some(policy) = &policy {
            let c = policy.limits.iter().position(|l| l.name == "c").expect("limit c");
            let charged = check_charge(policy, c, &[], &u, fallback.as_ref(), case.deny, &limits);
            assert_eq!(charged, cost);
        }
    }
}

// ---------------------------------------------------------------------------------------

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let (text, rest) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let text = String::from_utf8_lossy(text);
            let Ok(case) = Case::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            run_expression(&text, None, &case);
        }
        1 => {
            let mut u = Unstructured::new(rest);
            let Ok(top) = Top::arbitrary(&mut u) else {
                return;
            };
            let Ok(case) = Case::arbitrary_take_rest(u) else {
                return;
            };
            let top = top.prune();
            let expr = top.render();
            run_expression(&expr, Some(&top), &case);
        }
        _ => {
            let Ok(case) = PricesCase::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            run_prices(&case);
        }
    }
});
