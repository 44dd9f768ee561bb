//! Anthropic Messages request → OpenAI chat-completions request.

use serde_json::{Map, Value, json};

use super::{collapse_parts, empty_schema, model_value, str_field, text_part, type_of};
use crate::translate::{TranslateError, invalid};

/// An Anthropic Messages request as an OpenAI chat-completions request for
/// `upstream_model` (the client's `model` when empty).
pub fn anthropic_request_to_openai_chat(
    req: &Map<String, Value>,
    upstream_model: &str,
) -> Result<Map<String, Value>, TranslateError> {
    let mut out = Map::new();
    out.insert("model".into(), model_value(req, upstream_model));

    let mut messages = Vec::new();
    if let Some(system) = req.get("system")
        && let Some(m) = system_to_openai(system)?
    {
        messages.push(m);
    }
    let Some(Value::Array(msgs)) = req.get("messages") else {
        return Err(invalid(
            "messages: Field required (an array)",
            Some("messages"),
        ));
    };
    for (i, m) in msgs.iter().enumerate() {
        anthropic_message_to_openai(m, i, &mut messages)?;
    }
    out.insert("messages".into(), Value::Array(messages));

    match req.get("max_tokens") {
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            out.insert("max_completion_tokens".into(), Value::Number(n.clone()));
        }
        None | Some(Value::Null) => {
            return Err(invalid("max_tokens: Field required", Some("max_tokens")));
        }
        Some(_) => {
            return Err(invalid(
                "max_tokens: Input should be a non-negative integer",
                Some("max_tokens"),
            ));
        }
    }
    for key in ["temperature", "top_p"] {
        if let Some(v @ Value::Number(_)) = req.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(stops) = req.get("stop_sequences").and_then(Value::as_array)
        && !stops.is_empty()
    {
        if stops.iter().any(|s| !s.is_string()) {
            return Err(invalid(
                "stop_sequences: each entry must be a string",
                Some("stop_sequences"),
            ));
        }
        out.insert("stop".into(), Value::Array(stops.clone()));
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
        // Usage arrives only when asked for; the gateway always needs it.
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(user) = req
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
    {
        out.insert("user".into(), Value::String(user.to_owned()));
    }

    let tools = match req.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tools)) => tools
            .iter()
            .enumerate()
            .map(|(k, t)| tool_to_openai(t, k))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(invalid(
                "tools: Input should be a valid list",
                Some("tools"),
            ));
        }
    };
    // OpenAI refuses `tools: []`, and `tool_choice` or `parallel_tool_calls`
    // without tools.
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = req.get("tool_choice").filter(|c| !c.is_null()) {
            let (mapped, no_parallel) = tool_choice_to_openai(choice)?;
            out.insert("tool_choice".into(), mapped);
            if no_parallel {
                out.insert("parallel_tool_calls".into(), Value::Bool(false));
            }
        }
    }
    Ok(out)
}

fn system_to_openai(system: &Value) -> Result<Option<Value>, TranslateError> {
    let content = match system {
        Value::Null => return Ok(None),
        Value::String(s) if s.is_empty() => return Ok(None),
        Value::String(s) => Value::String(s.clone()),
        Value::Array(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.iter().enumerate() {
                match (type_of(b), str_field(b, "text")) {
                    (Some("text"), Some(t)) => parts.push(text_part(t)),
                    _ => {
                        return Err(invalid(
                            format!(
                                "system.{j}: only text blocks are supported in a system prompt"
                            ),
                            Some("system"),
                        ));
                    }
                }
            }
            if parts.is_empty() {
                return Ok(None);
            }
            collapse_parts(parts)
        }
        _ => {
            return Err(invalid(
                "system: Input should be a string or a list of text blocks",
                Some("system"),
            ));
        }
    };
    Ok(Some(json!({"role": "system", "content": content})))
}

fn anthropic_message_to_openai(
    m: &Value,
    i: usize,
    out: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    let content = m.get("content");
    match str_field(m, "role") {
        Some("user") => user_to_openai(content, i, out),
        Some("assistant") => assistant_to_openai(content, i, out),
        _ => Err(invalid(
            format!("messages.{i}.role: Input should be 'user' or 'assistant'"),
            Some("messages"),
        )),
    }
}

fn content_blocks(content: Option<&Value>, i: usize) -> Result<&[Value], TranslateError> {
    match content {
        Some(Value::Array(blocks)) => Ok(blocks),
        _ => Err(invalid(
            format!("messages.{i}.content: Input should be a string or a list of content blocks"),
            Some("messages"),
        )),
    }
}

fn user_to_openai(
    content: Option<&Value>,
    i: usize,
    out: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    if let Some(Value::String(s)) = content {
        out.push(json!({"role": "user", "content": s}));
        return Ok(());
    }
    let mut parts = Vec::new();
    for (j, b) in content_blocks(content, i)?.iter().enumerate() {
        match type_of(b) {
            Some("text") => parts.push(text_part(str_field(b, "text").unwrap_or_default())),
            Some("image") => parts.push(image_to_openai(b, i, j)?),
            Some("document") => parts.push(document_to_openai(b, i, j)?),
            // OpenAI wants tool results as their own messages right after the
            // assistant's tool calls: they go out first, the rest of the turn
            // follows as one user message.
            Some("tool_result") => out.push(tool_result_to_openai(b, i, j)?),
            other => return Err(unsupported_block(other, i, j)),
        }
    }
    if !parts.is_empty() {
        out.push(json!({"role": "user", "content": collapse_parts(parts)}));
    }
    Ok(())
}

fn unsupported_block(kind: Option<&str>, i: usize, j: usize) -> TranslateError {
    invalid(
        format!(
            "messages.{i}.content.{j}: content blocks of type `{}` cannot be sent to an OpenAI-format model",
            kind.unwrap_or("(none)")
        ),
        Some("messages"),
    )
}

fn image_to_openai(b: &Value, i: usize, j: usize) -> Result<Value, TranslateError> {
    let source = b.get("source").unwrap_or(&Value::Null);
    let url = match type_of(source) {
        Some("base64") => format!(
            "data:{};base64,{}",
            str_field(source, "media_type").unwrap_or("image/png"),
            str_field(source, "data").unwrap_or_default()
        ),
        Some("url") => str_field(source, "url").unwrap_or_default().to_owned(),
        _ => {
            return Err(invalid(
                format!(
                    "messages.{i}.content.{j}.source: only base64 and url images can be sent to an OpenAI-format model"
                ),
                Some("messages"),
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn document_to_openai(b: &Value, i: usize, j: usize) -> Result<Value, TranslateError> {
    let source = b.get("source").unwrap_or(&Value::Null);
    match (type_of(source), str_field(source, "media_type")) {
        (Some("base64"), Some(mt @ "application/pdf")) => {
            let filename = str_field(b, "title").unwrap_or("document.pdf");
            let data = str_field(source, "data").unwrap_or_default();
            Ok(
                json!({"type": "file", "file": {"filename": filename, "file_data": format!("data:{mt};base64,{data}")}}),
            )
        }
        (Some("text"), _) => Ok(text_part(str_field(source, "data").unwrap_or_default())),
        _ => Err(invalid(
            format!(
                "messages.{i}.content.{j}.source: only base64 PDF and plain-text documents can be sent to an OpenAI-format model"
            ),
            Some("messages"),
        )),
    }
}

fn tool_result_to_openai(b: &Value, i: usize, j: usize) -> Result<Value, TranslateError> {
    let id = str_field(b, "tool_use_id").ok_or_else(|| {
        invalid(
            format!("messages.{i}.content.{j}.tool_use_id: Field required"),
            Some("messages"),
        )
    })?;
    let content = match b.get("content") {
        None | Some(Value::Null) => Value::String(String::new()),
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(blocks)) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (k, c) in blocks.iter().enumerate() {
                match (type_of(c), str_field(c, "text")) {
                    (Some("text"), Some(t)) => parts.push(text_part(t)),
                    (kind, _) => {
                        return Err(invalid(
                            format!(
                                "messages.{i}.content.{j}.content.{k}: `{}` blocks in a tool result cannot be sent to an OpenAI-format model (tool messages take text only)",
                                kind.unwrap_or("(none)")
                            ),
                            Some("messages"),
                        ));
                    }
                }
            }
            if parts.is_empty() {
                Value::String(String::new())
            } else {
                collapse_parts(parts)
            }
        }
        Some(_) => {
            return Err(invalid(
                format!(
                    "messages.{i}.content.{j}.content: Input should be a string or a list of blocks"
                ),
                Some("messages"),
            ));
        }
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
}

fn assistant_to_openai(
    content: Option<&Value>,
    i: usize,
    out: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    if let Some(Value::String(s)) = content {
        out.push(json!({"role": "assistant", "content": s}));
        return Ok(());
    }
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for (j, b) in content_blocks(content, i)?.iter().enumerate() {
        match type_of(b) {
            Some("text") => {
                let t = str_field(b, "text").unwrap_or_default();
                if !t.is_empty() {
                    texts.push(text_part(t));
                }
            }
            Some("tool_use") => {
                let (Some(id), Some(name)) = (str_field(b, "id"), str_field(b, "name")) else {
                    return Err(invalid(
                        format!("messages.{i}.content.{j}: tool_use blocks need an id and a name"),
                        Some("messages"),
                    ));
                };
                let input = match b.get("input") {
                    None | Some(Value::Null) => "{}".to_owned(),
                    Some(v) => v.to_string(),
                };
                calls.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": input}}));
            }
            // Earlier turns' reasoning: OpenAI has nowhere to put it and the
            // answer does not depend on it.
            Some("thinking" | "redacted_thinking") => {}
            other => return Err(unsupported_block(other, i, j)),
        }
    }
    let content = match (texts.is_empty(), calls.is_empty()) {
        (true, false) => Value::Null,
        (true, true) => Value::String(String::new()),
        (false, _) => collapse_parts(texts),
    };
    let mut msg = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        msg["tool_calls"] = Value::Array(calls);
    }
    out.push(msg);
    Ok(())
}

fn tool_to_openai(t: &Value, k: usize) -> Result<Value, TranslateError> {
    match type_of(t) {
        None | Some("custom") => {}
        Some(other) => {
            return Err(invalid(
                format!(
                    "tools.{k}: the server tool `{other}` is not available on an OpenAI-format model"
                ),
                Some("tools"),
            ));
        }
    }
    let name = str_field(t, "name")
        .ok_or_else(|| invalid(format!("tools.{k}.name: Field required"), Some("tools")))?;
    let mut function = Map::new();
    function.insert("name".into(), Value::String(name.to_owned()));
    if let Some(d) = t.get("description").filter(|d| d.is_string()) {
        function.insert("description".into(), d.clone());
    }
    let schema = t
        .get("input_schema")
        .filter(|s| s.is_object())
        .cloned()
        .unwrap_or_else(empty_schema);
    function.insert("parameters".into(), schema);
    Ok(json!({"type": "function", "function": function}))
}

/// OpenAI `tool_choice`, and whether parallel tool calls are disabled.
fn tool_choice_to_openai(choice: &Value) -> Result<(Value, bool), TranslateError> {
    let no_parallel = choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        == Some(true);
    let mapped = match type_of(choice) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = str_field(choice, "name")
                .ok_or_else(|| invalid("tool_choice.name: Field required", Some("tool_choice")))?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(invalid(
                "tool_choice: Input should be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}",
                Some("tool_choice"),
            ));
        }
    };
    Ok((mapped, no_parallel))
}
