//! The known parameters of each model route, checked as OpenAI and Anthropic
//! check them, before anything is forwarded or billed.
//!
//! A request the provider would refuse with a 400 is refused here with the
//! same 400, in the client's API's words: OpenAI's `Invalid 'max_tokens':
//! integer below minimum value. ...` with `param` the JSON path of the field
//! (`messages[0].role`) and a `code` (`invalid_type`,
//! `integer_below_min_value`, ...); Anthropic's `invalid_request_error` with
//! `max_tokens: Input should be greater than or equal to 1` (its paths are
//! dotted, `messages.0.role`). So a refused request never reaches an upstream,
//! never produces a usage event, and is never a 5xx.
//!
//! Only known fields are checked, and only their types and ranges (the
//! OpenAI ones from OpenAI's OpenAPI description). A field no table lists is
//! never a reason to refuse: clients send fields newer than any spec, and the
//! upstream decides about them. `null` counts as absent for optional fields.
//!
//! The checks are tables ([`rules`]): one [`Field`] per known top-level
//! parameter, with a [`Check`] that is either a type with a range or a
//! function for nested structures ([`nested`]: messages, content, system,
//! prompts, inputs).

mod nested;
mod rules;

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::api_style::ApiStyle;

/// The request body formats that are validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Messages,
    CountTokens,
}

impl Api {
    pub fn style(self) -> ApiStyle {
        match self {
            Api::Messages | Api::CountTokens => ApiStyle::Anthropic,
            _ => ApiStyle::OpenAi,
        }
    }
}

/// What validation learned that the pipeline needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub stream: bool,
}

/// Checks `req` against `api`'s table and the rules between fields.
pub fn check(api: Api, req: &Map<String, Value>) -> Result<Checked, Invalid> {
    check_fields(api, req)
}

fn check_fields(api: Api, req: &Map<String, Value>) -> Result<Checked, Invalid> {
    for field in rules::table(api) {
        let loc = Loc::root().key(field.name);
        match req.get(field.name) {
            None => {
                if field.required {
                    return Err(Invalid::new(loc, Fault::Missing));
                }
            }
            Some(Value::Null) if !field.required => {}
            Some(v) => field.check.run(v, &loc)?,
        }
    }
    rules::across(api, req)
}

/// One known top-level parameter.
pub struct Field {
    pub name: &'static str,
    pub required: bool,
    pub check: Check,
}

/// What a parameter must be.
pub enum Check {
    Str,
    Bool,
    Object,
    Array,
    /// An integer (a float with no fraction passes) within the bounds.
    Int {
        min: Option<i64>,
        max: Option<i64>,
    },
    /// Any number within the bounds.
    Num {
        min: f64,
        max: f64,
    },
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// A string, or an array of at most `max` strings (`stop`).
    StrOrStrs {
        max: usize,
    },
    /// An array of strings (`stop_sequences`).
    Strs,
    /// A nested structure.
    With(fn(&Value, &Loc) -> Result<(), Invalid>),
}

impl Check {
    fn run(&self, v: &Value, loc: &Loc) -> Result<(), Invalid> {
        match self {
            Check::Str => expect_str(v, loc).map(|_| ()),
            Check::Bool => type_is(v.is_boolean(), Expected::Bool, v, loc),
            Check::Object => type_is(v.is_object(), Expected::Object, v, loc),
            Check::Array => type_is(v.is_array(), Expected::Array, v, loc),
            Check::Int { min, max } => {
                let Some(n) = as_integer(v) else {
                    return Err(Invalid::type_error(loc, Expected::Int, v));
                };
                in_range(
                    n,
                    min.map(|m| m as f64),
                    max.map(|m| m as f64),
                    true,
                    v,
                    loc,
                )
            }
            Check::Num { min, max } => match v.as_f64() {
                Some(n) => in_range(n, Some(*min), Some(*max), false, v, loc),
                None => Err(Invalid::type_error(loc, Expected::Num, v)),
            },
            Check::OneOf(allowed) => one_of(v, allowed, loc),
            Check::StrOrStrs { max } => match v {
                Value::String(_) => Ok(()),
                Value::Array(items) => {
                    if items.len() > *max {
                        return Err(Invalid::new(
                            loc.clone(),
                            Fault::TooLong {
                                max: *max,
                                got: items.len(),
                            },
                        ));
                    }
                    strings(items, loc)
                }
                _ => Err(Invalid::type_error(loc, Expected::StrOrStrs, v)),
            },
            Check::Strs => match v {
                Value::Array(items) => strings(items, loc),
                _ => Err(Invalid::type_error(loc, Expected::Array, v)),
            },
            Check::With(f) => f(v, loc),
        }
    }
}

fn strings(items: &[Value], loc: &Loc) -> Result<(), Invalid> {
    for (i, item) in items.iter().enumerate() {
        expect_str(item, &loc.index(i))?;
    }
    Ok(())
}

pub(crate) fn expect_str<'a>(v: &'a Value, loc: &Loc) -> Result<&'a str, Invalid> {
    v.as_str()
        .ok_or_else(|| Invalid::type_error(loc, Expected::Str, v))
}

pub(crate) fn type_is(ok: bool, expected: Expected, v: &Value, loc: &Loc) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(Invalid::type_error(loc, expected, v))
    }
}

pub(crate) fn one_of(
    v: &Value,
    allowed: &'static [&'static str],
    loc: &Loc,
) -> Result<(), Invalid> {
    let s = v
        .as_str()
        .ok_or_else(|| Invalid::type_error(loc, Expected::OneOf(allowed), v))?;
    if allowed.contains(&s) {
        Ok(())
    } else {
        Err(Invalid::new(
            loc.clone(),
            Fault::Value {
                got: s.to_owned(),
                allowed,
            },
        ))
    }
}

fn as_integer(v: &Value) -> Option<f64> {
    if v.is_i64() || v.is_u64() {
        return v.as_f64();
    }
    v.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0)
}

fn in_range(
    n: f64,
    min: Option<f64>,
    max: Option<f64>,
    integer: bool,
    v: &Value,
    loc: &Loc,
) -> Result<(), Invalid> {
    let got = v.to_string();
    if let Some(min) = min.filter(|m| n < *m) {
        return Err(Invalid::new(
            loc.clone(),
            Fault::Below { min, got, integer },
        ));
    }
    if let Some(max) = max.filter(|m| n > *m) {
        return Err(Invalid::new(
            loc.clone(),
            Fault::Above { max, got, integer },
        ));
    }
    Ok(())
}

/// One step of a path into the body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

/// Where in the body a fault is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loc(Vec<Seg>);

impl Loc {
    pub fn root() -> Self {
        Self::default()
    }

    pub fn key(&self, k: &'static str) -> Self {
        let mut l = self.clone();
        l.0.push(Seg::Key(k));
        l
    }

    pub fn index(&self, i: usize) -> Self {
        let mut l = self.clone();
        l.0.push(Seg::Index(i));
        l
    }

    /// OpenAI's form: `messages[0].content[1].type`.
    pub fn openai(&self) -> String {
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Key(k) if s.is_empty() => s.push_str(k),
                Seg::Key(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Seg::Index(i) => {
                    let _ = write!(s, "[{i}]");
                }
            }
        }
        s
    }

    /// Anthropic's (pydantic's) form: `messages.0.content.1.type`.
    pub fn anthropic(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|seg| match seg {
                Seg::Key(k) => (*k).to_owned(),
                Seg::Index(i) => i.to_string(),
            })
            .collect();
        parts.join(".")
    }
}

/// The type a value should have had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Str,
    Int,
    Num,
    Bool,
    Object,
    Array,
    OneOf(&'static [&'static str]),
    StrOrArray,
    StrOrStrs,
    /// Message content: a string or an array of content parts.
    Content,
    /// Anthropic's `system`: a string or an array of text blocks.
    System,
}

impl Expected {
    fn openai(self) -> String {
        match self {
            Expected::Str => "a string".into(),
            Expected::Int => "an integer".into(),
            Expected::Num => "a decimal".into(),
            Expected::Bool => "a boolean".into(),
            Expected::Object => "an object".into(),
            Expected::Array => "an array".into(),
            Expected::OneOf(v) => format!("one of {}", quoted(v, ", or ")),
            Expected::StrOrArray => "one of a string or array".into(),
            Expected::StrOrStrs => "one of a string or array of strings".into(),
            Expected::Content | Expected::System => "one of a string or array of objects".into(),
        }
    }

    fn anthropic(self) -> String {
        match self {
            Expected::Str => "a valid string".into(),
            Expected::Int => "a valid integer".into(),
            Expected::Num => "a valid number".into(),
            Expected::Bool => "a valid boolean".into(),
            Expected::Object => "a valid dictionary".into(),
            Expected::Array => "a valid list".into(),
            Expected::OneOf(v) => quoted(v, " or "),
            Expected::StrOrArray => "a valid string or a valid list".into(),
            Expected::StrOrStrs => "a valid string or a list of strings".into(),
            Expected::Content => "a valid string or a list of content blocks".into(),
            Expected::System => "a valid string or a list of text blocks".into(),
        }
    }
}

/// `'a', 'b'<last>'c'` (OpenAI: `, or `; pydantic: ` or `).
fn quoted(values: &[&str], last: &str) -> String {
    let q: Vec<String> = values.iter().map(|v| format!("'{v}'")).collect();
    match q.split_last() {
        None => String::new(),
        Some((only, [])) => only.clone(),
        // Two values take no comma: `'a' or 'b'`.
        Some((end, [first])) => format!("{first}{}{end}", last.trim_start_matches(',')),
        Some((end, rest)) => format!("{}{last}{end}", rest.join(", ")),
    }
}

/// OpenAI's name for the JSON type of `v`.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What is wrong at a [`Loc`].
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    Missing,
    Type {
        expected: Expected,
        got: &'static str,
    },
    Below {
        min: f64,
        got: String,
        integer: bool,
    },
    Above {
        max: f64,
        got: String,
        integer: bool,
    },
    EmptyArray,
    TooLong {
        max: usize,
        got: usize,
    },
    Value {
        got: String,
        allowed: &'static [&'static str],
    },
    /// A rule in words, the same in both APIs.
    Rule(&'static str),
}

/// A refused parameter: where, and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub loc: Loc,
    pub fault: Fault,
}

fn bound(b: f64) -> String {
    if b.fract() == 0.0 && b.abs() < 1e15 {
        format!("{}", b as i64)
    } else {
        format!("{b}")
    }
}

impl Invalid {
    pub fn new(loc: Loc, fault: Fault) -> Self {
        Self { loc, fault }
    }

    pub fn type_error(loc: &Loc, expected: Expected, got: &Value) -> Self {
        Self::new(
            loc.clone(),
            Fault::Type {
                expected,
                got: json_type(got),
            },
        )
    }

    /// OpenAI's `param`: the path of the field at fault.
    pub fn param(&self) -> String {
        self.loc.openai()
    }

    /// OpenAI's `code`.
    pub fn code(&self) -> &'static str {
        match &self.fault {
            Fault::Missing => "missing_required_parameter",
            Fault::Type { .. } => "invalid_type",
            Fault::Below { integer: true, .. } => "integer_below_min_value",
            Fault::Below { .. } => "decimal_below_min_value",
            Fault::Above { integer: true, .. } => "integer_above_max_value",
            Fault::Above { .. } => "decimal_above_max_value",
            Fault::EmptyArray => "empty_array",
            Fault::TooLong { .. } => "array_above_max_length",
            Fault::Value { .. } | Fault::Rule(_) => "invalid_value",
        }
    }

    pub fn message(&self, style: ApiStyle) -> String {
        match style {
            ApiStyle::OpenAi => self.openai_message(),
            ApiStyle::Anthropic => self.anthropic_message(),
        }
    }

    fn openai_message(&self) -> String {
        let p = self.param();
        let kind = |integer: bool| if integer { "integer" } else { "decimal" };
        match &self.fault {
            // OpenAI's own words for this one.
            Fault::Missing if p == "model" => "you must provide a model parameter".into(),
            Fault::Missing => format!("Missing required parameter: '{p}'."),
            Fault::Type { expected, got } => format!(
                "Invalid type for '{p}': expected {}, but got {got} instead.",
                expected.openai()
            ),
            Fault::Below { min, got, integer } => format!(
                "Invalid '{p}': {} below minimum value. Expected a value >= {}, but got {got} instead.",
                kind(*integer),
                bound(*min)
            ),
            Fault::Above { max, got, integer } => format!(
                "Invalid '{p}': {} above maximum value. Expected a value <= {}, but got {got} instead.",
                kind(*integer),
                bound(*max)
            ),
            Fault::EmptyArray => format!(
                "Invalid '{p}': empty array. Expected an array with minimum length 1, but got an empty array instead."
            ),
            Fault::TooLong { max, got } => format!(
                "Invalid '{p}': array too long. Expected an array with maximum length {max}, but got an array with length {got} instead."
            ),
            Fault::Value { got, allowed } => format!(
                "Invalid value: '{got}'. Supported values are: {}.",
                quoted(allowed, ", and ")
            ),
            Fault::Rule(m) => (*m).to_owned(),
        }
    }

    fn anthropic_message(&self) -> String {
        let what = match &self.fault {
            Fault::Missing => "Field required".to_owned(),
            Fault::Type { expected, .. } => format!("Input should be {}", expected.anthropic()),
            Fault::Below { min, .. } => {
                format!("Input should be greater than or equal to {}", bound(*min))
            }
            Fault::Above { max, .. } => {
                format!("Input should be less than or equal to {}", bound(*max))
            }
            Fault::EmptyArray => {
                "List should have at least 1 item after validation, not 0".to_owned()
            }
            Fault::TooLong { max, got } => {
                format!("List should have at most {max} items after validation, not {got}")
            }
            Fault::Value { allowed, .. } => format!("Input should be {}", quoted(allowed, " or ")),
            Fault::Rule(m) => (*m).to_owned(),
        };
        let at = self.loc.anthropic();
        if at.is_empty() {
            what
        } else {
            format!("{at}: {what}")
        }
    }
}

#[cfg(test)]
mod tests;
