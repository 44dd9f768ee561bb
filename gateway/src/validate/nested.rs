//! Checks of nested parameters: messages and their content, Anthropic's
//! `system`, prompts and inputs. Content parts and blocks are checked for
//! their shape (an object with a string `type`), never for which types
//! exist: new part types appear faster than any list of them.

use serde_json::{Map, Value};

use super::{Expected, Fault, Invalid, Loc, expect_str, one_of, type_is};

/// OpenAI's chat roles.
const OPENAI_ROLES: &[&str] = &[
    "system",
    "assistant",
    "user",
    "function",
    "tool",
    "developer",
];
/// Roles of a Responses input message.
const RESPONSES_ROLES: &[&str] = &["user", "assistant", "system", "developer"];
const ANTHROPIC_ROLES: &[&str] = &["user", "assistant"];
/// OpenAI's embeddings take at most this many inputs per request.
const MAX_EMBEDDING_INPUTS: usize = 2048;

fn object<'a>(v: &'a Value, loc: &Loc) -> Result<&'a Map<String, Value>, Invalid> {
    v.as_object()
        .ok_or_else(|| Invalid::type_error(loc, Expected::Object, v))
}

fn array<'a>(v: &'a Value, loc: &Loc) -> Result<&'a [Value], Invalid> {
    v.as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| Invalid::type_error(loc, Expected::Array, v))
}

fn non_empty<'a>(v: &'a Value, loc: &Loc) -> Result<&'a [Value], Invalid> {
    let a = array(v, loc)?;
    if a.is_empty() {
        return Err(Invalid::new(loc.clone(), Fault::EmptyArray));
    }
    Ok(a)
}

/// A required member of `obj`.
fn member<'a>(
    obj: &'a Map<String, Value>,
    key: &'static str,
    loc: &Loc,
) -> Result<&'a Value, Invalid> {
    obj.get(key)
        .ok_or_else(|| Invalid::new(loc.key(key), Fault::Missing))
}

/// Content parts or blocks: objects with a string `type`.
fn parts(items: &[Value], loc: &Loc) -> Result<(), Invalid> {
    for (i, part) in items.iter().enumerate() {
        let at = loc.index(i);
        let obj = object(part, &at)?;
        expect_str(member(obj, "type", &at)?, &at.key("type"))?;
    }
    Ok(())
}

/// A string, or a non-empty array of content parts.
fn content(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    match v {
        Value::String(_) => Ok(()),
        Value::Array(items) if items.is_empty() => {
            Err(Invalid::new(loc.clone(), Fault::EmptyArray))
        }
        Value::Array(items) => parts(items, loc),
        _ => Err(Invalid::type_error(loc, Expected::Content, v)),
    }
}

pub(super) fn openai_messages(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    for (i, m) in non_empty(v, loc)?.iter().enumerate() {
        let at = loc.index(i);
        let msg = object(m, &at)?;
        let role_at = at.key("role");
        let role = member(msg, "role", &at)?;
        one_of(role, OPENAI_ROLES, &role_at)?;
        let content_at = at.key("content");
        match (role.as_str(), msg.get("content")) {
            // An assistant turn may be only tool calls; a function result may be null.
            (Some("assistant" | "function"), None | Some(Value::Null)) => {}
            (_, None) => return Err(Invalid::new(content_at, Fault::Missing)),
            (_, Some(c)) => content(c, &content_at)?,
        }
        if let Some(name) = msg.get("name").filter(|n| !n.is_null()) {
            expect_str(name, &at.key("name"))?;
        }
        if role.as_str() == Some("tool") {
            expect_str(member(msg, "tool_call_id", &at)?, &at.key("tool_call_id"))?;
        }
        if let Some(calls) = msg.get("tool_calls").filter(|c| !c.is_null()) {
            let calls_at = at.key("tool_calls");
            for (j, call) in array(calls, &calls_at)?.iter().enumerate() {
                object(call, &calls_at.index(j))?;
            }
        }
    }
    Ok(())
}

pub(super) fn anthropic_messages(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    let items = array(v, loc)?;
    if items.is_empty() {
        return Err(Invalid::new(
            loc.clone(),
            Fault::Rule("at least one message is required"),
        ));
    }
    for (i, m) in items.iter().enumerate() {
        let at = loc.index(i);
        let msg = object(m, &at)?;
        one_of(member(msg, "role", &at)?, ANTHROPIC_ROLES, &at.key("role"))?;
        let content_at = at.key("content");
        match member(msg, "content", &at)? {
            Value::String(_) => {}
            Value::Array(blocks) => parts(blocks, &content_at)?,
            other => return Err(Invalid::type_error(&content_at, Expected::Content, other)),
        }
    }
    Ok(())
}

/// Anthropic's `system`: a string, or an array of text blocks.
pub(super) fn anthropic_system(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    let blocks = match v {
        Value::String(_) => return Ok(()),
        Value::Array(blocks) => blocks,
        other => return Err(Invalid::type_error(loc, Expected::System, other)),
    };
    for (i, b) in blocks.iter().enumerate() {
        let at = loc.index(i);
        let block = object(b, &at)?;
        one_of(member(block, "type", &at)?, &["text"], &at.key("type"))?;
        expect_str(member(block, "text", &at)?, &at.key("text"))?;
    }
    Ok(())
}

/// `stream_options`: an object whose `include_usage` is a boolean.
pub(super) fn stream_options(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    let o = object(v, loc)?;
    if let Some(u) = o.get("include_usage").filter(|u| !u.is_null()) {
        type_is(u.is_boolean(), Expected::Bool, u, &loc.key("include_usage"))?;
    }
    Ok(())
}

/// One prompt or input item: text, a token, or an array of tokens.
fn text_or_tokens(items: &[Value], loc: &Loc) -> Result<(), Invalid> {
    for (i, item) in items.iter().enumerate() {
        let ok = item.is_string() || item.is_u64() || item.is_array();
        type_is(ok, Expected::StrOrArray, item, &loc.index(i))?;
    }
    Ok(())
}

/// Legacy completions' `prompt`: a string, strings, tokens or token arrays.
pub(super) fn prompt(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    match v {
        Value::String(_) => Ok(()),
        Value::Array(items) => text_or_tokens(items, loc),
        other => Err(Invalid::type_error(loc, Expected::StrOrArray, other)),
    }
}

/// Embeddings' `input`: a non-empty string, or 1 to 2,048 items.
pub(super) fn embedding_input(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    match v {
        Value::String(s) if s.is_empty() => Err(Invalid::new(
            loc.clone(),
            Fault::Rule("'input' cannot be an empty string."),
        )),
        Value::String(_) => Ok(()),
        Value::Array(items) if items.is_empty() => {
            Err(Invalid::new(loc.clone(), Fault::EmptyArray))
        }
        Value::Array(items) if items.len() > MAX_EMBEDDING_INPUTS => Err(Invalid::new(
            loc.clone(),
            Fault::TooLong {
                max: MAX_EMBEDDING_INPUTS,
                got: items.len(),
            },
        )),
        Value::Array(items) => text_or_tokens(items, loc),
        other => Err(Invalid::type_error(loc, Expected::StrOrArray, other)),
    }
}

/// The Responses API's `input`: a string, or an array of items (objects);
/// an item with a `role` is a message whose role must be known.
pub(super) fn responses_input(v: &Value, loc: &Loc) -> Result<(), Invalid> {
    let items = match v {
        Value::String(_) => return Ok(()),
        Value::Array(items) => items,
        other => return Err(Invalid::type_error(loc, Expected::StrOrArray, other)),
    };
    for (i, item) in items.iter().enumerate() {
        let at = loc.index(i);
        let obj = object(item, &at)?;
        if let Some(role) = obj.get("role") {
            one_of(role, RESPONSES_ROLES, &at.key("role"))?;
        }
    }
    Ok(())
}
