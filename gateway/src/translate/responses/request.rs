//! The Responses request as a chat-completions request.

use serde_json::{Map, Value, json};

use crate::translate::{TranslateError, invalid};

/// A Responses request as a chat completions request. The model is copied
/// as given (the caller replaces it).
pub fn responses_request_to_chat(
    req: &Map<String, Value>,
) -> Result<Map<String, Value>, TranslateError> {
    for (key, what) in [
        (
            "previous_response_id",
            "`previous_response_id` is not supported: this gateway does not store responses; send the whole conversation in `input`",
        ),
        (
            "conversation",
            "`conversation` is not supported: this gateway does not store conversations; send the whole conversation in `input`",
        ),
        (
            "prompt",
            "stored prompt templates (`prompt`) are not supported by this gateway",
        ),
    ] {
        if req.get(key).is_some_and(|v| !v.is_null()) {
            return Err(invalid(what, Some(static_param(key))));
        }
    }
    if req.get("background").and_then(Value::as_bool) == Some(true) {
        return Err(invalid(
            "background responses are not supported by this gateway",
            Some("background"),
        ));
    }
    if let Some(format) = req.get("text").and_then(|t| t.get("format")) {
        match format.get("type").and_then(Value::as_str) {
            None | Some("text") => {}
            Some(other) => {
                return Err(invalid(
                    format!("`text.format` of type `{other}` is not supported by this gateway"),
                    Some("text"),
                ));
            }
        }
    }

    let mut messages: Vec<Value> = Vec::new();
    match req.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                push_item(&mut messages, item)?;
            }
        }
        Some(_) => {
            return Err(invalid(
                "`instructions` must be a string",
                Some("instructions"),
            ));
        }
    }
    match req.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                push_item(&mut messages, item)?;
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => {
            return Err(invalid(
                "`input` must be a string or a list of input items",
                Some("input"),
            ));
        }
    }
    if messages.is_empty() {
        return Err(invalid("`input` is required", Some("input")));
    }

    let mut out = Map::new();
    if let Some(m) = req.get("model") {
        out.insert("model".into(), m.clone());
    }
    out.insert("messages".into(), Value::Array(messages));
    for key in ["temperature", "top_p", "user", "parallel_tool_calls"] {
        if let Some(v) = req.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(v) = req.get("max_output_tokens").filter(|v| !v.is_null()) {
        out.insert("max_completion_tokens".into(), v.clone());
    }
    match req.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) => {
            if !tools.is_empty() {
                let tools = tools.iter().map(chat_tool).collect::<Result<Vec<_>, _>>()?;
                out.insert("tools".into(), Value::Array(tools));
            }
        }
        Some(_) => return Err(invalid("`tools` must be a list", Some("tools"))),
    }
    if let Some(tc) = req.get("tool_choice").filter(|v| !v.is_null()) {
        out.insert("tool_choice".into(), chat_tool_choice(tc)?);
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(out)
}

fn static_param(key: &str) -> &'static str {
    match key {
        "previous_response_id" => "previous_response_id",
        "conversation" => "conversation",
        _ => "prompt",
    }
}

fn push_item(messages: &mut Vec<Value>, item: &Value) -> Result<(), TranslateError> {
    let Some(obj) = item.as_object() else {
        return Err(invalid("each input item must be an object", Some("input")));
    };
    match obj.get("type").and_then(Value::as_str) {
        None | Some("message") => push_message(messages, obj),
        Some("function_call") => {
            let call_id = str_field(obj, "call_id")?;
            let name = str_field(obj, "name")?;
            let arguments = obj.get("arguments").and_then(Value::as_str).unwrap_or("{}");
            let call = json!({
                "id": call_id, "type": "function",
                "function": {"name": name, "arguments": arguments},
            });
            // Consecutive calls (and calls right after the assistant's
            // text) are one assistant turn in chat.
            if let Some(last) = messages.last_mut()
                && last.get("role").and_then(Value::as_str) == Some("assistant")
                && let Some(last) = last.as_object_mut()
            {
                match last.get_mut("tool_calls") {
                    Some(Value::Array(calls)) => calls.push(call),
                    _ => {
                        last.insert("tool_calls".into(), json!([call]));
                    }
                }
                return Ok(());
            }
            messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
            Ok(())
        }
        Some("function_call_output") => {
            let call_id = str_field(obj, "call_id")?;
            let content = match obj.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match p.get("type").and_then(Value::as_str) {
                            Some("input_text" | "output_text") => {
                                s.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""));
                            }
                            Some(other) => {
                                return Err(invalid(
                                    format!(
                                        "`{other}` parts in a function call output are not supported by this gateway"
                                    ),
                                    Some("input"),
                                ));
                            }
                            None => {
                                return Err(invalid(
                                    "function call output parts need a `type`",
                                    Some("input"),
                                ));
                            }
                        }
                    }
                    s
                }
                _ => {
                    return Err(invalid(
                        "`function_call_output` needs an `output`",
                        Some("input"),
                    ));
                }
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": content}));
            Ok(())
        }
        // Reasoning items from an earlier turn: chat has nowhere to put them.
        Some("reasoning") => Ok(()),
        Some(other) => Err(invalid(
            format!("input items of type `{other}` are not supported by this gateway"),
            Some("input"),
        )),
    }
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, TranslateError> {
    obj.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("input item is missing `{key}`"), Some("input")))
}

fn push_message(messages: &mut Vec<Value>, obj: &Map<String, Value>) -> Result<(), TranslateError> {
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("user") => "user",
        Some("assistant") => "assistant",
        // Most chat-compatible upstreams know only `system`.
        Some("system" | "developer") => "system",
        Some(other) => {
            return Err(invalid(
                format!("unknown message role `{other}`"),
                Some("input"),
            ));
        }
        None => return Err(invalid("input messages need a `role`", Some("input"))),
    };
    let content = match obj.get("content") {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => {
            let mut chat_parts = Vec::with_capacity(parts.len());
            let mut has_image = false;
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        let t = p.get("text").and_then(Value::as_str).unwrap_or("");
                        chat_parts.push(json!({"type": "text", "text": t}));
                    }
                    Some("refusal") => {
                        let t = p.get("refusal").and_then(Value::as_str).unwrap_or("");
                        chat_parts.push(json!({"type": "text", "text": t}));
                    }
                    Some("input_image") => {
                        if role != "user" {
                            return Err(invalid(
                                "images are only supported in user messages",
                                Some("input"),
                            ));
                        }
                        let Some(url) = p.get("image_url").and_then(Value::as_str) else {
                            return Err(invalid(
                                "images by `file_id` are not supported by this gateway; send an `image_url`",
                                Some("input"),
                            ));
                        };
                        let mut image = json!({"url": url});
                        if let Some(d) = p.get("detail").and_then(Value::as_str) {
                            image["detail"] = json!(d);
                        }
                        chat_parts.push(json!({"type": "image_url", "image_url": image}));
                        has_image = true;
                    }
                    Some(other) => {
                        return Err(invalid(
                            format!("`{other}` content is not supported by this gateway"),
                            Some("input"),
                        ));
                    }
                    None => {
                        return Err(invalid("content parts need a `type`", Some("input")));
                    }
                }
            }
            if has_image {
                Value::Array(chat_parts)
            } else {
                // Text only: one string, which every chat upstream accepts.
                let sep = if role == "user" { "\n" } else { "" };
                let texts: Vec<&str> = chat_parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                Value::String(texts.join(sep))
            }
        }
        _ => {
            return Err(invalid(
                "message `content` must be a string or a list of parts",
                Some("input"),
            ));
        }
    };
    messages.push(json!({"role": role, "content": content}));
    Ok(())
}

fn chat_tool(tool: &Value) -> Result<Value, TranslateError> {
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                return Err(invalid("function tools need a `name`", Some("tools")));
            };
            let mut f = Map::new();
            f.insert("name".into(), json!(name));
            for key in ["description", "parameters", "strict"] {
                if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                    f.insert(key.into(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": f}))
        }
        Some(other) => Err(invalid(
            format!(
                "built-in tool `{other}` is not supported by this gateway; only `function` tools are"
            ),
            Some("tools"),
        )),
        None => Err(invalid("tools need a `type`", Some("tools"))),
    }
}

fn chat_tool_choice(tc: &Value) -> Result<Value, TranslateError> {
    match tc {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(tc.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err(invalid(
                    "`tool_choice` of type `function` needs a `name`",
                    Some("tool_choice"),
                )),
            }
        }
        _ => Err(invalid(
            format!("`tool_choice` {tc} is not supported by this gateway"),
            Some("tool_choice"),
        )),
    }
}
