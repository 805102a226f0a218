//! CEL expressions: parsed with the `cel` crate, then type-checked here
//! against what a contract may see, and evaluated on an event.
//!
//! The variables are `event` (`kind`, `name`, `at_ms`, `attrs`), `fields`
//! (only the fields in the manifest's `reads`, typed by the schema when it
//! is known) and `now_ms` (the host's time of the evaluation: a contract
//! has no clock of its own). The functions are CEL's operators, the
//! `has`/`all`/`exists`/`exists_one`/`map`/`filter` macros, and `size`,
//! `contains`, `startsWith`, `endsWith`, `int`, `uint`, `double`, `string`.
//!
//! Guaranteed: an expression that compiles names no other variable and no
//! other function, selects on `fields` only fields in `reads` (and the
//! evaluation is given no other), and its result has the required type,
//! or is `dyn` (an `attrs` value, an untyped field) and is then checked
//! when it is evaluated. Comprehensions do not nest and literals hold at
//! most 64 elements, so one evaluation costs at most the expression's size
//! times its longest list. Evaluation errors, never panics, on a
//! wrong-typed input, and its messages never quote a value.

use std::collections::BTreeMap;
use std::sync::Arc;

use cel::common::ast::{Expr, IdedExpr, LiteralValue};
use cel::{Context, Program, Value};

use crate::error::ConditionError;

/// Longest expression accepted (bytes).
pub const MAX_EXPRESSION_LEN: usize = 4096;
/// Deepest expression accepted (nested nodes), after parsing.
const MAX_DEPTH: usize = 48;
/// Deepest bracket nesting accepted before parsing: the parser recurses
/// deeply per bracket (about 130 KiB of stack per level in a debug
/// build), so deeper input is refused before it reaches the parser, and
/// the parser runs on a thread of its own with [`PARSER_STACK`].
const MAX_BRACKETS: usize = 24;
/// The parsing thread's stack.
const PARSER_STACK: usize = 64 << 20;
/// Most elements of a list or map literal.
const MAX_LITERAL_ELEMENTS: usize = 64;

/// A CEL type, as far as the checker tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CelType {
    /// `bool`.
    Bool,
    /// `int` (also timestamps, as milliseconds).
    Int,
    /// `uint`.
    UInt,
    /// `double`.
    Double,
    /// `string`.
    String,
    /// `bytes`.
    Bytes,
    /// `null`.
    Null,
    /// A list of one type.
    List(Box<CelType>),
    /// A map from strings to one type.
    Map(Box<CelType>),
    /// Known only at evaluation.
    Dyn,
    /// The `event` variable.
    Event,
    /// The `fields` variable.
    Fields,
}

impl CelType {
    fn name(&self) -> String {
        match self {
            CelType::Bool => "bool".into(),
            CelType::Int => "int".into(),
            CelType::UInt => "uint".into(),
            CelType::Double => "double".into(),
            CelType::String => "string".into(),
            CelType::Bytes => "bytes".into(),
            CelType::Null => "null".into(),
            CelType::List(t) => format!("list({})", t.name()),
            CelType::Map(t) => format!("map(string, {})", t.name()),
            CelType::Dyn => "dyn".into(),
            CelType::Event => "event".into(),
            CelType::Fields => "fields".into(),
        }
    }
    fn numeric(&self) -> bool {
        matches!(self, CelType::Int | CelType::UInt | CelType::Double)
    }
}

/// The fields an expression may name, and their types.
pub trait FieldTypes {
    /// Whether the field may be named.
    fn exists(&self, name: &str) -> bool;
    /// Its type (`Dyn` when not known).
    fn field_type(&self, name: &str) -> CelType;
}

/// Any field, all typed `dyn`: for checks without a schema.
pub struct AnyField;

impl FieldTypes for AnyField {
    fn exists(&self, _: &str) -> bool {
        true
    }
    fn field_type(&self, _: &str) -> CelType {
        CelType::Dyn
    }
}

/// An event attribute or field value given to an expression.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A string.
    Str(String),
}

impl Scalar {
    fn to_value(&self) -> Value {
        match self {
            Scalar::Bool(b) => Value::Bool(*b),
            Scalar::Int(i) => Value::Int(*i),
            Scalar::Str(s) => Value::String(Arc::new(s.clone())),
        }
    }
}

/// What an expression is evaluated on.
#[derive(Debug, Clone, Default)]
pub struct Inputs<'a> {
    /// The event's kind (`signal`, `field_written`, …).
    pub kind: &'a str,
    /// Its name (the signal, field, purpose or workload).
    pub name: &'a str,
    /// When it happened (host time, ms since the epoch).
    pub at_ms: i64,
    /// Its attributes.
    pub attrs: Option<&'a BTreeMap<String, Scalar>>,
    /// The readable fields' values (absent fields are absent).
    pub fields: Option<&'a BTreeMap<String, Scalar>>,
    /// The time of the evaluation.
    pub now_ms: i64,
}

/// A compiled, type-checked expression.
#[derive(Clone)]
pub struct Condition {
    source: String,
    program: Arc<Program>,
    result: CelType,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .field("result", &self.result)
            .finish()
    }
}

impl Condition {
    /// Parses `source` and checks it against `fields`; its result must be
    /// `expected` (or `dyn`, then checked at evaluation).
    pub fn compile(
        source: &str,
        fields: &dyn FieldTypes,
        expected: CelType,
    ) -> Result<Condition, ConditionError> {
        if source.len() > MAX_EXPRESSION_LEN {
            return Err(ConditionError::new(format!(
                "{} bytes; at most {MAX_EXPRESSION_LEN}",
                source.len()
            )));
        }
        if source.trim().is_empty() {
            return Err(ConditionError::new("empty expression"));
        }
        let program = parse(source)?;
        let mut checker = Checker {
            fields,
            scope: Vec::new(),
            in_loop: false,
        };
        let result = checker.check(program.expression(), 0)?;
        let fits = result == expected
            || result == CelType::Dyn
            || (expected == CelType::Dyn)
            || (expected.numeric() && result.numeric() && expected == CelType::Double);
        if !fits {
            return Err(ConditionError::new(format!(
                "the expression is a {}, not a {}",
                result.name(),
                expected.name()
            )));
        }
        Ok(Condition {
            source: source.to_owned(),
            program: Arc::new(program),
            result: expected,
        })
    }

    /// The expression's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression to a value.
    pub fn eval(&self, inputs: &Inputs<'_>) -> Result<Scalar, ConditionError> {
        let mut ctx = Context::default();
        let attrs: std::collections::HashMap<String, Value> = inputs
            .attrs
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            .unwrap_or_default();
        let event: std::collections::HashMap<String, Value> = [
            (
                "kind".to_owned(),
                Value::String(Arc::new(inputs.kind.to_owned())),
            ),
            (
                "name".to_owned(),
                Value::String(Arc::new(inputs.name.to_owned())),
            ),
            ("at_ms".to_owned(), Value::Int(inputs.at_ms)),
            ("attrs".to_owned(), Value::from(attrs)),
        ]
        .into_iter()
        .collect();
        let fields: std::collections::HashMap<String, Value> = inputs
            .fields
            .map(|a| a.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
            .unwrap_or_default();
        ctx.add_variable_from_value("event", Value::from(event));
        ctx.add_variable_from_value("fields", Value::from(fields));
        ctx.add_variable_from_value("now_ms", Value::Int(inputs.now_ms));
        // The cel crate's messages quote the values involved (a field's
        // value may be personal data): only the kind of failure, and a
        // missing key's name, leave this function.
        let v = self.program.execute(&ctx).map_err(|e| {
            // A key is named only if the expression spells it (a key
            // computed from a value could be the value).
            let spelled = |k: &str| !k.is_empty() && k.len() <= 64 && self.source.contains(k);
            ConditionError::new(match e {
                cel::ExecutionError::NoSuchKey(k) if spelled(k.as_str()) => {
                    format!("evaluation failed: no attribute or field `{}`", k.as_str())
                }
                cel::ExecutionError::UndeclaredReference(r) if spelled(r.as_str()) => {
                    format!("evaluation failed: `{}` is not set", r.as_str())
                }
                _ => "evaluation failed: a value has the wrong type, or an operation is not defined for it (values are not shown)".to_owned(),
            })
        })?;
        let out = match v {
            Value::Bool(b) => Scalar::Bool(b),
            Value::Int(i) => Scalar::Int(i),
            Value::UInt(u) => Scalar::Int(
                i64::try_from(u)
                    .map_err(|_| ConditionError::new("a uint that does not fit in an int"))?,
            ),
            Value::String(s) => Scalar::Str(s.as_ref().clone()),
            other => {
                return Err(ConditionError::new(format!(
                    "the expression gave a {:?}, not a bool, int or string",
                    other.type_of()
                )))
            }
        };
        let fits = matches!(
            (&self.result, &out),
            (CelType::Dyn, _)
                | (CelType::Bool, Scalar::Bool(_))
                | (
                    CelType::Int | CelType::UInt | CelType::Double,
                    Scalar::Int(_)
                )
                | (CelType::String, Scalar::Str(_))
        );
        if !fits {
            return Err(ConditionError::new(format!(
                "the expression gave a value that is not a {}",
                self.result.name()
            )));
        }
        Ok(out)
    }

    /// Evaluates a condition: it must give a bool.
    pub fn holds(&self, inputs: &Inputs<'_>) -> Result<bool, ConditionError> {
        match self.eval(inputs)? {
            Scalar::Bool(b) => Ok(b),
            other => Err(ConditionError::new(format!(
                "the condition gave {other:?}, not a bool"
            ))),
        }
    }
}

/// The deepest nesting of `(`, `[` and `{` in `source`, strings included
/// (which can only make the count higher: safe).
fn bracket_depth(source: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for c in source.chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses on a thread with a large stack, after bounding the nesting.
fn parse(source: &str) -> Result<Program, ConditionError> {
    let depth = bracket_depth(source);
    if depth > MAX_BRACKETS {
        return Err(ConditionError::new(format!(
            "brackets nested {depth} deep; at most {MAX_BRACKETS}"
        )));
    }
    let text = source.to_owned();
    let parsed = std::thread::Builder::new()
        .name("sovra-cel-parse".into())
        .stack_size(PARSER_STACK)
        .spawn(move || {
            Program::compile(&text).map_err(|e| {
                e.errors
                    .first()
                    .map_or_else(|| e.to_string(), |x| x.msg.clone())
            })
        })
        .map_err(|e| ConditionError::new(format!("cannot start the parser: {e}")))?
        .join()
        .map_err(|_| ConditionError::new("the parser failed on this expression"))?;
    parsed.map_err(|m| ConditionError::new(format!("does not parse: {m}")))
}

struct Checker<'a> {
    fields: &'a dyn FieldTypes,
    scope: Vec<(String, CelType)>,
    // INVARIANT: comprehensions never nest (`in_loop`), and literals hold
    // at most MAX_LITERAL_ELEMENTS: one evaluation then costs at most the
    // expression's size times its longest list (a literal, an event's
    // attributes or a chain of `map`/`filter` over one), never a product
    // of lists.
    in_loop: bool,
}

fn compatible(a: &CelType, b: &CelType) -> bool {
    a == b
        || matches!(a, CelType::Dyn | CelType::Null)
        || matches!(b, CelType::Dyn | CelType::Null)
        || (a.numeric() && b.numeric())
        || matches!((a, b), (CelType::List(x), CelType::List(y)) if compatible(x, y))
        || matches!((a, b), (CelType::Map(x), CelType::Map(y)) if compatible(x, y))
}

impl Checker<'_> {
    fn check(&mut self, e: &IdedExpr, depth: usize) -> Result<CelType, ConditionError> {
        if depth > MAX_DEPTH {
            return Err(ConditionError::new(format!(
                "nested deeper than {MAX_DEPTH}"
            )));
        }
        let d = depth + 1;
        match &e.expr {
            Expr::Unspecified => Err(ConditionError::new("an empty expression")),
            Expr::Literal(l) => Ok(match l {
                LiteralValue::Boolean(_) => CelType::Bool,
                LiteralValue::Bytes(_) => CelType::Bytes,
                LiteralValue::Double(_) => CelType::Double,
                LiteralValue::Int(_) => CelType::Int,
                LiteralValue::Null => CelType::Null,
                LiteralValue::String(_) => CelType::String,
                LiteralValue::UInt(_) => CelType::UInt,
            }),
            Expr::Ident(name) => {
                if let Some((_, t)) = self.scope.iter().rev().find(|(n, _)| n == name) {
                    return Ok(t.clone());
                }
                match name.as_str() {
                    "event" => Ok(CelType::Event),
                    "fields" => Ok(CelType::Fields),
                    "now_ms" => Ok(CelType::Int),
                    _ => Err(ConditionError::new(format!(
                        "unknown variable `{name:.64}` (known: event, fields, now_ms)"
                    ))),
                }
            }
            Expr::Select(s) => self.select(s, d),
            Expr::List(l) => {
                if l.elements.len() > MAX_LITERAL_ELEMENTS {
                    return Err(ConditionError::new(format!(
                        "a list literal of {} elements; at most {MAX_LITERAL_ELEMENTS}",
                        l.elements.len()
                    )));
                }
                let mut elem: Option<CelType> = None;
                for x in &l.elements {
                    let t = self.check(x, d)?;
                    elem = Some(match elem {
                        Some(p) if p == t => p,
                        Some(_) => CelType::Dyn,
                        None => t,
                    });
                }
                Ok(CelType::List(Box::new(elem.unwrap_or(CelType::Dyn))))
            }
            Expr::Map(m) => {
                if m.entries.len() > MAX_LITERAL_ELEMENTS {
                    return Err(ConditionError::new(format!(
                        "a map literal of {} entries; at most {MAX_LITERAL_ELEMENTS}",
                        m.entries.len()
                    )));
                }
                for entry in &m.entries {
                    if let cel::common::ast::EntryExpr::MapEntry(me) = &entry.expr {
                        let k = self.check(&me.key, d)?;
                        if !matches!(k, CelType::String | CelType::Dyn) {
                            return Err(ConditionError::new("map keys must be strings"));
                        }
                        self.check(&me.value, d)?;
                    }
                }
                Ok(CelType::Map(Box::new(CelType::Dyn)))
            }
            Expr::Struct(_) => Err(ConditionError::new(
                "message literals are not supported (no message types are declared)",
            )),
            Expr::Comprehension(c) => self.comprehension(c, d),
            Expr::Call(call) => self.call(call, d),
        }
    }

    fn select(
        &mut self,
        s: &cel::common::ast::SelectExpr,
        d: usize,
    ) -> Result<CelType, ConditionError> {
        let t = self.check(&s.operand, d)?;
        let field_type = match t {
            CelType::Event => match s.field.as_str() {
                "kind" | "name" => CelType::String,
                "at_ms" => CelType::Int,
                "attrs" => CelType::Map(Box::new(CelType::Dyn)),
                other => {
                    return Err(ConditionError::new(format!(
                        "`event` has no field `{other:.64}` (it has: kind, name, at_ms, attrs)"
                    )))
                }
            },
            CelType::Fields => {
                if !self.fields.exists(&s.field) {
                    return Err(ConditionError::new(format!(
                        "`fields.{:.64}` is not readable: add it to `reads`",
                        s.field
                    )));
                }
                self.fields.field_type(&s.field)
            }
            CelType::Map(v) => *v,
            CelType::Dyn => CelType::Dyn,
            other => {
                return Err(ConditionError::new(format!(
                    "a {} has no field `{:.64}`",
                    other.name(),
                    s.field
                )))
            }
        };
        Ok(if s.test { CelType::Bool } else { field_type })
    }

    fn comprehension(
        &mut self,
        c: &cel::common::ast::ComprehensionExpr,
        d: usize,
    ) -> Result<CelType, ConditionError> {
        if self.in_loop {
            return Err(ConditionError::new(
                "a macro (all, exists, exists_one, map, filter) inside another's body: comprehensions do not nest",
            ));
        }
        let range = self.check(&c.iter_range, d)?;
        let elem = match range {
            CelType::List(e) => *e,
            CelType::Map(_) => CelType::String,
            CelType::Dyn => CelType::Dyn,
            other => {
                return Err(ConditionError::new(format!(
                    "cannot iterate over a {}",
                    other.name()
                )))
            }
        };
        let accu = self.check(&c.accu_init, d)?;
        let mark = self.scope.len();
        self.scope.push((c.iter_var.clone(), elem));
        if let Some(v2) = &c.iter_var2 {
            self.scope.push((v2.clone(), CelType::Dyn));
        }
        self.scope.push((c.accu_var.clone(), accu));
        self.in_loop = true;
        let cond = self.check(&c.loop_cond, d);
        let step = self.check(&c.loop_step, d);
        self.in_loop = false;
        let result = self.check(&c.result, d);
        self.scope.truncate(mark);
        cond?;
        step?;
        // A `map` or `filter` accumulates list elements of an unknown
        // type: the result is a list; the others give a bool.
        result.map(|r| match r {
            CelType::List(_) => CelType::List(Box::new(CelType::Dyn)),
            other => other,
        })
    }

    fn call(
        &mut self,
        call: &cel::common::ast::CallExpr,
        d: usize,
    ) -> Result<CelType, ConditionError> {
        let mut args = Vec::with_capacity(call.args.len() + 1);
        if let Some(t) = &call.target {
            args.push(self.check(t, d)?);
        }
        for a in &call.args {
            args.push(self.check(a, d)?);
        }
        let sig = Sig {
            f: call.func_name.as_str(),
            args,
            method: call.target.is_some(),
        };
        match sig.logic() {
            Some(r) => r,
            None => sig.other(),
        }
    }
}

/// A call's function and argument types (the target first, for a method).
struct Sig<'a> {
    f: &'a str,
    args: Vec<CelType>,
    method: bool,
}

fn is(t: &CelType, want: &CelType) -> bool {
    t == want || *t == CelType::Dyn
}

impl Sig<'_> {
    fn bad(&self, why: &str) -> ConditionError {
        let types: Vec<String> = self.args.iter().map(CelType::name).collect();
        ConditionError::new(format!(
            "`{}` cannot take ({}): {why}",
            display_name(self.f),
            types.join(", ")
        ))
    }

    fn arity(&self, n: usize) -> Result<(), ConditionError> {
        if self.args.len() == n {
            Ok(())
        } else {
            Err(self.bad(&format!("it takes {n} argument(s)")))
        }
    }

    /// The logical and comparison operators; `None` for anything else.
    fn logic(&self) -> Option<Result<CelType, ConditionError>> {
        LOGIC.contains(&self.f).then(|| self.logic_checked())
    }

    fn logic_checked(&self) -> Result<CelType, ConditionError> {
        use cel::common::ast::operators as op;
        let (f, args) = (self.f, &self.args);
        let bad = |why: &str| self.bad(why);
        let arity = |n: usize| self.arity(n);
        match f {
            op::LOGICAL_AND | op::LOGICAL_OR => {
                arity(2)?;
                if args.iter().all(|a| is(a, &CelType::Bool)) {
                    Ok(CelType::Bool)
                } else {
                    Err(bad("both sides must be bools"))
                }
            }
            op::LOGICAL_NOT | op::NOT_STRICTLY_FALSE => {
                arity(1)?;
                if is(&args[0], &CelType::Bool) {
                    Ok(CelType::Bool)
                } else {
                    Err(bad("it negates a bool"))
                }
            }
            op::NEGATE => {
                arity(1)?;
                if args[0].numeric() || args[0] == CelType::Dyn {
                    Ok(args[0].clone())
                } else {
                    Err(bad("it negates a number"))
                }
            }
            op::EQUALS | op::NOT_EQUALS => {
                arity(2)?;
                if compatible(&args[0], &args[1]) {
                    Ok(CelType::Bool)
                } else {
                    Err(bad("the two sides can never be equal"))
                }
            }
            op::LESS | op::LESS_EQUALS | op::GREATER | op::GREATER_EQUALS => {
                arity(2)?;
                let (a, b) = (&args[0], &args[1]);
                let ok = (a.numeric() || *a == CelType::Dyn) && (b.numeric() || *b == CelType::Dyn)
                    || (is(a, &CelType::String) && is(b, &CelType::String))
                    || (is(a, &CelType::Bytes) && is(b, &CelType::Bytes));
                if ok {
                    Ok(CelType::Bool)
                } else {
                    Err(bad(
                        "it orders two numbers, two strings or two byte strings",
                    ))
                }
            }
            _ => Err(self.bad("not a logical or comparison operator")),
        }
    }

    /// Arithmetic, membership, indexing and the functions.
    fn other(&self) -> Result<CelType, ConditionError> {
        use cel::common::ast::operators as op;
        let (f, args) = (self.f, &self.args);
        let bad = |why: &str| self.bad(why);
        let arity = |n: usize| self.arity(n);
        match f {
            op::ADD | op::SUBSTRACT | op::MULTIPLY | op::DIVIDE | op::MODULO => {
                arity(2)?;
                let (a, b) = (&args[0], &args[1]);
                if *a == CelType::Dyn || *b == CelType::Dyn {
                    return Ok(if *a == CelType::Dyn { b.clone() } else { a.clone() });
                }
                if a.numeric() && a == b {
                    return Ok(a.clone());
                }
                if f == op::ADD {
                    match (a, b) {
                        (CelType::String, CelType::String) => return Ok(CelType::String),
                        (CelType::Bytes, CelType::Bytes) => return Ok(CelType::Bytes),
                        (CelType::List(x), CelType::List(y)) => {
                            return Ok(CelType::List(Box::new(if x == y { *x.clone() } else { CelType::Dyn })))
                        }
                        _ => {}
                    }
                }
                Err(bad("arithmetic needs two numbers of the same type"))
            }
            op::CONDITIONAL => {
                arity(3)?;
                if !is(&args[0], &CelType::Bool) {
                    return Err(bad("the condition must be a bool"));
                }
                if args[1] == args[2] {
                    Ok(args[1].clone())
                } else if compatible(&args[1], &args[2]) {
                    Ok(CelType::Dyn)
                } else {
                    Err(bad("the two branches have different types"))
                }
            }
            op::IN => {
                arity(2)?;
                match &args[1] {
                    CelType::List(e) if compatible(&args[0], e) => Ok(CelType::Bool),
                    CelType::Map(_) if is(&args[0], &CelType::String) => Ok(CelType::Bool),
                    CelType::Dyn => Ok(CelType::Bool),
                    _ => Err(bad("`in` tests membership of a list or a map's keys")),
                }
            }
            op::INDEX => {
                arity(2)?;
                match (&args[0], &args[1]) {
                    (CelType::List(e), i) if is(i, &CelType::Int) || is(i, &CelType::UInt) => Ok(*e.clone()),
                    (CelType::Map(v), k) if is(k, &CelType::String) => Ok(*v.clone()),
                    (CelType::Dyn, _) => Ok(CelType::Dyn),
                    _ => Err(bad("it indexes a list by an int or a map by a string")),
                }
            }
            "size" => {
                arity(1)?;
                match &args[0] {
                    CelType::String | CelType::Bytes | CelType::List(_) | CelType::Map(_) | CelType::Dyn => {
                        Ok(CelType::Int)
                    }
                    _ => Err(bad("it measures a string, bytes, a list or a map")),
                }
            }
            "contains" | "startsWith" | "endsWith" => {
                if !self.method {
                    return Err(bad("it is a method: `s.contains(x)`"));
                }
                arity(2)?;
                if is(&args[0], &CelType::String) && is(&args[1], &CelType::String) {
                    Ok(CelType::Bool)
                } else {
                    Err(bad("it compares two strings"))
                }
            }
            "int" | "uint" | "double" | "string" => {
                arity(1)?;
                Ok(match f {
                    "int" => CelType::Int,
                    "uint" => CelType::UInt,
                    "double" => CelType::Double,
                    _ => CelType::String,
                })
            }
            other => Err(ConditionError::new(format!(
                "unknown function `{}` (available: the operators, has, all, exists, exists_one, map, filter, size, contains, startsWith, endsWith, int, uint, double, string)",
                display_name(other)
            ))),
        }
    }
}

/// The operators [`Sig::logic`] checks.
const LOGIC: &[&str] = &[
    cel::common::ast::operators::LOGICAL_AND,
    cel::common::ast::operators::LOGICAL_OR,
    cel::common::ast::operators::LOGICAL_NOT,
    cel::common::ast::operators::NOT_STRICTLY_FALSE,
    cel::common::ast::operators::NEGATE,
    cel::common::ast::operators::EQUALS,
    cel::common::ast::operators::NOT_EQUALS,
    cel::common::ast::operators::LESS,
    cel::common::ast::operators::LESS_EQUALS,
    cel::common::ast::operators::GREATER,
    cel::common::ast::operators::GREATER_EQUALS,
];

/// An operator's name as written (`_<_` is `<`).
fn display_name(f: &str) -> String {
    let t = f.trim_matches('_');
    let t = t.strip_prefix('@').unwrap_or(t);
    t.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> BTreeMap<String, CelType> {
        [
            ("score".to_owned(), CelType::Int),
            ("customer_kind".to_owned(), CelType::String),
        ]
        .into_iter()
        .collect()
    }

    fn ok(src: &str) -> Condition {
        match Condition::compile(src, &fields(), CelType::Bool) {
            Ok(c) => c,
            Err(e) => panic!("{src}: {e}"),
        }
    }
    fn err(src: &str) -> String {
        match Condition::compile(src, &fields(), CelType::Bool) {
            Ok(_) => panic!("{src} compiled"),
            Err(e) => e.message().to_owned(),
        }
    }

    #[test]
    fn well_typed_conditions_compile_and_evaluate() {
        let attrs: BTreeMap<String, Scalar> = [("amount".to_owned(), Scalar::Int(6_000_000))]
            .into_iter()
            .collect();
        let vals: BTreeMap<String, Scalar> = [
            ("score".to_owned(), Scalar::Int(720)),
            ("customer_kind".to_owned(), Scalar::Str("government".into())),
        ]
        .into_iter()
        .collect();
        let inputs = Inputs {
            kind: "signal",
            name: "export_requested",
            at_ms: 10,
            attrs: Some(&attrs),
            fields: Some(&vals),
            now_ms: 20,
        };
        for (src, want) in [
            ("fields.score >= 700", true),
            (
                "fields.customer_kind == 'government' && event.attrs.amount > 5000000",
                true,
            ),
            (
                "event.name.startsWith('export') && now_ms > event.at_ms",
                true,
            ),
            ("has(event.attrs.missing)", false),
            ("['a', 'b'].exists(x, x == 'b')", true),
            ("size(fields.customer_kind) == 10", true),
            ("event.kind in ['signal', 'field_written']", true),
        ] {
            assert_eq!(ok(src).holds(&inputs), Ok(want), "{src}");
        }
    }

    #[test]
    fn ill_typed_conditions_are_refused_with_the_reason() {
        assert!(err("fields.email == 'x'").contains("add it to `reads`"));
        assert!(err("customer.id == 'x'").contains("unknown variable `customer`"));
        assert!(err("fields.score == 'high'").contains("can never be equal"));
        assert!(err("fields.score + 1").contains("not a bool"));
        assert!(err("event.time > 1").contains("`event` has no field `time`"));
        assert!(err("fields.score.matches('x')").contains("unknown function `matches`"));
        assert!(err("fields.customer_kind > 3").contains("orders"));
        assert!(err("fields.score &&").contains("does not parse"));
        assert!(err("").contains("empty"));
        assert!(err(&"(".repeat(5000)).contains("at most"));
    }

    #[test]
    fn a_dynamic_value_of_the_wrong_type_fails_at_evaluation_not_with_a_panic() {
        let c = ok("event.attrs.amount > 5");
        let attrs: BTreeMap<String, Scalar> = [("amount".to_owned(), Scalar::Str("lots".into()))]
            .into_iter()
            .collect();
        let r = c.holds(&Inputs {
            attrs: Some(&attrs),
            ..Inputs::default()
        });
        assert!(r.is_err(), "{r:?}");
        // A missing attribute is an error too, not `false`.
        assert!(c.holds(&Inputs::default()).is_err());
    }

    #[test]
    fn costly_expressions_are_refused_and_errors_quote_no_value() {
        let zeros = vec!["0"; 65].join(", ");
        assert!(err(&format!("size([{zeros}]) > 0")).contains("at most 64"));
        assert!(err("[1, 2].all(a, [3, 4].all(b, a < b))").contains("do not nest"));
        assert!(err("size([1, 2].map(a, [3].map(b, b))) > 0").contains("do not nest"));
        // Chained (not nested) macros are fine.
        ok("[1, 2].map(a, a + 1).filter(b, b > 2).size() == 1");
        // A type error at evaluation does not show the value it met.
        let types: BTreeMap<String, CelType> =
            [("email".to_owned(), CelType::Dyn)].into_iter().collect();
        let c = Condition::compile("[fields.email, 0][0] < 5", &types, CelType::Bool).unwrap();
        let vals: BTreeMap<String, Scalar> =
            [("email".to_owned(), Scalar::Str("alice@example.com".into()))]
                .into_iter()
                .collect();
        let e = c
            .holds(&Inputs {
                fields: Some(&vals),
                ..Inputs::default()
            })
            .unwrap_err();
        assert!(!e.message().contains("alice"), "{e}");
        // A value expression gives the type it was compiled for.
        let v = Condition::compile("event.attrs.v", &types, CelType::Int).unwrap();
        let attrs: BTreeMap<String, Scalar> = [("v".to_owned(), Scalar::Str("abc".into()))]
            .into_iter()
            .collect();
        let e = v
            .eval(&Inputs {
                attrs: Some(&attrs),
                ..Inputs::default()
            })
            .unwrap_err();
        assert!(e.message().contains("not a int"), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused_and_the_deepest_accepted_evaluates() {
        for (open, close) in [("!(", ")"), ("[", "]"), ("(", ")")] {
            let src = format!("{}true{}", open.repeat(100), close.repeat(100));
            let e = err(&src);
            assert!(e.contains("nested 100 deep"), "{e}");
        }
        // The deepest nesting accepted parses, checks and evaluates on an
        // ordinary (2 MiB) thread, as the server's are.
        let src = format!("{}true{}", "!(".repeat(24), ")".repeat(24));
        assert_eq!(ok(&src).holds(&Inputs::default()), Ok(true));
        // Long chains that need no brackets are bounded by the checker.
        let src = format!("event{} == 1", ".a".repeat(200));
        assert!(err(&src).contains("deeper than"));
    }
}
