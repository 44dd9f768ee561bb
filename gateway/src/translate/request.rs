//! Request bodies: Anthropic Messages ⇄ OpenAI chat completions.
//!
//! | Anthropic | OpenAI |
//! |---|---|
//! | top-level `system` (string, or text blocks) | leading `system` message (string, or text parts); every `system`/`developer` message is hoisted back into `system` |
//! | `user` text / `image` (base64, url) / `document` (base64 PDF) blocks | `user` `text` / `image_url` (data URL, URL) / `file` (`file_data`) parts |
//! | `user` `tool_result` blocks | `role: tool` messages with `tool_call_id`, placed before the rest of that user turn |
//! | `assistant` `text` + `tool_use` blocks | `assistant` `content` + `tool_calls` (arguments as a JSON string) |
//! | `tools[]` `{name, description, input_schema}` | `tools[]` `{type: function, function: {name, description, parameters}}` |
//! | `tool_choice` `auto` / `any` / `tool` / `none`, `disable_parallel_tool_use` | `tool_choice` `auto` / `required` / `{function}` / `none`, `parallel_tool_calls: false` |
//! | `max_tokens` (required) | `max_completion_tokens` (or `max_tokens`; 4096 when neither) |
//! | `stop_sequences` | `stop` (string or array) |
//! | `temperature`, `top_p`, `stream` | same (temperature clamped to Anthropic's 0..=1); streamed chat always asks `stream_options.include_usage` |
//! | `metadata.user_id` | `user` (or `safety_identifier`) |
//!
//! Dropped silently (no counterpart, no change of meaning): `cache_control`,
//! `top_k`, `thinking` and prior-turn `thinking` blocks, `service_tier`,
//! a `tool_result`'s `is_error` flag, message `name`s, image `detail`,
//! `seed`, penalties, `logit_bias`, `store`, OpenAI `metadata`,
//! `reasoning_effort`, `verbosity`, `prompt_cache_key`.
//!
//! Refused ([`TranslateError::Invalid`]): Anthropic server tools and
//! server-side content blocks, images or documents inside `tool_result`,
//! Files-API sources; OpenAI `n > 1`, `response_format` other than `text`,
//! `logprobs`, audio, `file_id` files, legacy `functions`/`function_call`,
//! `web_search_options`, non-function tools, tool arguments that are not a
//! JSON object.

use serde_json::{Map, Value, json};

use super::{TranslateError, invalid};

/// Anthropic requires `max_tokens`; OpenAI requests may omit it.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn empty_schema() -> Value {
    json!({"type": "object", "properties": {}})
}

fn model_value(req: &Map<String, Value>, upstream_model: &str) -> Value {
    if upstream_model.is_empty() {
        req.get("model").cloned().unwrap_or(Value::Null)
    } else {
        Value::String(upstream_model.to_owned())
    }
}

fn type_of(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Text parts (OpenAI) or blocks (Anthropic): `[{type: text, text}]`.
fn text_part(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// One text part as a plain string, anything else as the parts array.
fn collapse_parts(mut parts: Vec<Value>) -> Value {
    if parts.len() == 1 && type_of(&parts[0]) == Some("text") {
        if let Some(Value::String(s)) = parts
            .pop()
            .and_then(|mut p| p.get_mut("text").map(Value::take))
        {
            return Value::String(s);
        }
        return Value::String(String::new());
    }
    Value::Array(parts)
}

// ---------------------------------------------------------------------------
// Anthropic → OpenAI
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// OpenAI → Anthropic
// ---------------------------------------------------------------------------

/// An OpenAI chat-completions request as an Anthropic Messages request for
/// `upstream_model` (the client's `model` when empty).
pub fn openai_chat_request_to_anthropic(
    req: &Map<String, Value>,
    upstream_model: &str,
) -> Result<Map<String, Value>, TranslateError> {
    refuse_meaning_changes(req)?;
    let mut out = Map::new();
    out.insert("model".into(), model_value(req, upstream_model));

    let Some(Value::Array(msgs)) = req.get("messages") else {
        return Err(invalid(
            "messages: Field required (an array)",
            Some("messages"),
        ));
    };
    let (system, messages) = openai_messages_to_anthropic(msgs)?;
    if let Some(system) = system {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(messages));

    let max = ["max_completion_tokens", "max_tokens"]
        .into_iter()
        .find_map(|k| req.get(k).filter(|v| !v.is_null()));
    match max {
        None => {
            out.insert("max_tokens".into(), Value::from(DEFAULT_MAX_TOKENS));
        }
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            out.insert("max_tokens".into(), Value::Number(n.clone()));
        }
        Some(_) => {
            return Err(invalid(
                "max_completion_tokens: must be a non-negative integer",
                Some("max_completion_tokens"),
            ));
        }
    }
    if let Some(t) = req.get("temperature").and_then(Value::as_f64) {
        // OpenAI's range is 0..=2, Anthropic's 0..=1.
        out.insert(
            "temperature".into(),
            clamp_temperature(req.get("temperature"), t),
        );
    }
    if let Some(v @ Value::Number(_)) = req.get("top_p") {
        out.insert("top_p".into(), v.clone());
    }
    match req.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if !a.is_empty() {
                out.insert("stop_sequences".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => {
            return Err(invalid(
                "stop: must be a string or a list of strings",
                Some("stop"),
            ));
        }
    }
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        out.insert("stream".into(), Value::Bool(true));
    }
    let user = ["user", "safety_identifier"]
        .into_iter()
        .find_map(|k| req.get(k).and_then(Value::as_str).filter(|u| !u.is_empty()));
    if let Some(user) = user {
        out.insert("metadata".into(), json!({"user_id": user}));
    }

    let tools = match req.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(tools)) => tools
            .iter()
            .enumerate()
            .map(|(k, t)| tool_to_anthropic(t, k))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(invalid("tools: must be a list", Some("tools"))),
    };
    if !tools.is_empty() {
        out.insert("tools".into(), Value::Array(tools));
        let no_parallel = req.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false);
        let mut choice = match req.get("tool_choice") {
            None | Some(Value::Null) => no_parallel.then(|| json!({"type": "auto"})),
            Some(c) => Some(tool_choice_to_anthropic(c)?),
        };
        if let Some(c) = choice
            .as_mut()
            .filter(|c| no_parallel && type_of(c) != Some("none"))
        {
            c["disable_parallel_tool_use"] = Value::Bool(true);
        }
        if let Some(c) = choice {
            out.insert("tool_choice".into(), c);
        }
    }
    Ok(out)
}

fn clamp_temperature(original: Option<&Value>, t: f64) -> Value {
    if (0.0..=1.0).contains(&t) {
        original.cloned().unwrap_or(Value::Null)
    } else {
        Value::from(t.clamp(0.0, 1.0))
    }
}

/// Fields whose effect Anthropic cannot reproduce, and whose loss the
/// client would not notice until it relied on them.
fn refuse_meaning_changes(req: &Map<String, Value>) -> Result<(), TranslateError> {
    if let Some(n) = req.get("n").and_then(Value::as_u64).filter(|n| *n > 1) {
        return Err(invalid(
            format!("n: only 1 choice is available from an Anthropic model (asked for {n})"),
            Some("n"),
        ));
    }
    if let Some(rf) = req.get("response_format").filter(|v| !v.is_null())
        && type_of(rf) != Some("text")
    {
        return Err(invalid(
            "response_format: JSON modes are not available for an Anthropic model through this API; describe the format in the prompt or use a tool",
            Some("response_format"),
        ));
    }
    if req.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(invalid(
            "logprobs: not available for an Anthropic model",
            Some("logprobs"),
        ));
    }
    let audio_out = req
        .get("modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x.as_str() == Some("audio")));
    if audio_out || req.get("audio").is_some_and(|a| !a.is_null()) {
        return Err(invalid(
            "audio output is not available for an Anthropic model",
            Some("modalities"),
        ));
    }
    for key in ["functions", "function_call"] {
        if req.get(key).is_some_and(|v| !v.is_null()) {
            return Err(invalid(
                format!(
                    "{key}: the legacy functions API is not available for an Anthropic model; use tools"
                ),
                Some(if key == "functions" {
                    "functions"
                } else {
                    "function_call"
                }),
            ));
        }
    }
    if req.get("web_search_options").is_some_and(|v| !v.is_null()) {
        return Err(invalid(
            "web_search_options: web search is not available for an Anthropic model through this API",
            Some("web_search_options"),
        ));
    }
    Ok(())
}

/// `(system, messages)`. System and developer messages, wherever they are,
/// become the top-level `system` (Anthropic has no other place for them).
/// Consecutive tool messages, and the user message right after them, make
/// one user turn with the `tool_result` blocks first, as Anthropic requires.
fn openai_messages_to_anthropic(
    msgs: &[Value],
) -> Result<(Option<Value>, Vec<Value>), TranslateError> {
    let mut system_parts: Vec<Value> = Vec::new();
    let mut system_strings = 0usize;
    let mut out = Vec::with_capacity(msgs.len());
    let mut results: Vec<Value> = Vec::new();
    let flush = |results: &mut Vec<Value>, out: &mut Vec<Value>| {
        if !results.is_empty() {
            out.push(json!({"role": "user", "content": std::mem::take(results)}));
        }
    };
    for (i, m) in msgs.iter().enumerate() {
        let content = m.get("content");
        match str_field(m, "role") {
            Some("system" | "developer") => {
                if let Some(Value::String(_)) = content {
                    system_strings += 1;
                }
                for t in plain_texts(content, i)? {
                    if !t.is_empty() {
                        system_parts.push(text_part(t));
                    }
                }
            }
            Some("user") => {
                let blocks = user_to_anthropic(content, i)?;
                if results.is_empty() {
                    match content {
                        Some(Value::String(s)) => out.push(json!({"role": "user", "content": s})),
                        _ => out.push(json!({"role": "user", "content": blocks})),
                    }
                } else {
                    results.extend(blocks);
                    flush(&mut results, &mut out);
                }
            }
            Some("assistant") => {
                flush(&mut results, &mut out);
                if let Some(msg) = assistant_to_anthropic(m, i)? {
                    out.push(msg);
                }
            }
            Some("tool") => {
                let id = str_field(m, "tool_call_id").ok_or_else(|| {
                    invalid(
                        format!("messages.{i}.tool_call_id: Field required"),
                        Some("messages"),
                    )
                })?;
                let content = match content {
                    Some(Value::String(s)) => Value::String(s.clone()),
                    None | Some(Value::Null) => Value::String(String::new()),
                    _ => Value::Array(
                        plain_texts(content, i)?
                            .into_iter()
                            .map(text_part)
                            .collect(),
                    ),
                };
                results.push(json!({"type": "tool_result", "tool_use_id": id, "content": content}));
            }
            Some("function") => {
                return Err(invalid(
                    format!(
                        "messages.{i}.role: legacy `function` messages are not available for an Anthropic model; use tools"
                    ),
                    Some("messages"),
                ));
            }
            _ => {
                return Err(invalid(
                    format!(
                        "messages.{i}.role: must be one of system, developer, user, assistant, tool"
                    ),
                    Some("messages"),
                ));
            }
        }
    }
    flush(&mut results, &mut out);
    let system = match system_parts.len() {
        0 => None,
        1 if system_strings == 1 => Some(collapse_parts(system_parts)),
        _ => Some(Value::Array(system_parts)),
    };
    Ok((system, out))
}

/// The texts of a string or of an array of text parts.
fn plain_texts(content: Option<&Value>, i: usize) -> Result<Vec<&str>, TranslateError> {
    match content {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.as_str()]),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, p)| match (type_of(p), str_field(p, "text")) {
                (Some("text"), Some(t)) => Ok(t),
                (kind, _) => Err(invalid(
                    format!(
                        "messages.{i}.content.{j}: `{}` parts are not allowed here (text only)",
                        kind.unwrap_or("(none)")
                    ),
                    Some("messages"),
                )),
            })
            .collect(),
        Some(_) => Err(invalid(
            format!("messages.{i}.content: must be a string or a list of parts"),
            Some("messages"),
        )),
    }
}

fn user_to_anthropic(content: Option<&Value>, i: usize) -> Result<Vec<Value>, TranslateError> {
    let parts = match content {
        Some(Value::String(s)) => {
            return Ok(if s.is_empty() {
                Vec::new()
            } else {
                vec![text_part(s)]
            });
        }
        Some(Value::Array(parts)) => parts,
        _ => {
            return Err(invalid(
                format!("messages.{i}.content: must be a string or a list of parts"),
                Some("messages"),
            ));
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        match type_of(p) {
            Some("text") => {
                let t = str_field(p, "text").unwrap_or_default();
                // Anthropic refuses empty text blocks.
                if !t.is_empty() {
                    blocks.push(text_part(t));
                }
            }
            Some("image_url") => {
                let url = p
                    .get("image_url")
                    .and_then(|u| u.get("url"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                blocks.push(image_to_anthropic(url, i, j)?);
            }
            Some("file") => blocks.push(file_to_anthropic(
                p.get("file").unwrap_or(&Value::Null),
                i,
                j,
            )?),
            other => {
                return Err(invalid(
                    format!(
                        "messages.{i}.content.{j}: `{}` parts cannot be sent to an Anthropic model",
                        other.unwrap_or("(none)")
                    ),
                    Some("messages"),
                ));
            }
        }
    }
    Ok(blocks)
}

/// `(media_type, base64 data)` of a `data:<type>;base64,<data>` URL.
fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?;
    Some((media_type, data))
}

fn image_to_anthropic(url: &str, i: usize, j: usize) -> Result<Value, TranslateError> {
    if let Some((media_type, data)) = parse_data_url(url) {
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(invalid(
        format!(
            "messages.{i}.content.{j}.image_url.url: must be an http(s) URL or a base64 data URL"
        ),
        Some("messages"),
    ))
}

fn file_to_anthropic(file: &Value, i: usize, j: usize) -> Result<Value, TranslateError> {
    let parsed = str_field(file, "file_data").and_then(parse_data_url);
    match parsed {
        Some((media_type @ "application/pdf", data)) => {
            let mut doc = json!({"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}});
            if let Some(name) = str_field(file, "filename").filter(|n| *n != "document.pdf") {
                doc["title"] = Value::String(name.to_owned());
            }
            Ok(doc)
        }
        _ => Err(invalid(
            format!(
                "messages.{i}.content.{j}.file: only inline PDF `file_data` can be sent to an Anthropic model (no file ids)"
            ),
            Some("messages"),
        )),
    }
}

fn assistant_to_anthropic(m: &Value, i: usize) -> Result<Option<Value>, TranslateError> {
    let content = m.get("content");
    let calls = match m.get("tool_calls") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(c)) => c.as_slice(),
        Some(_) => {
            return Err(invalid(
                format!("messages.{i}.tool_calls: must be a list"),
                Some("messages"),
            ));
        }
    };
    if m.get("function_call").is_some_and(|f| !f.is_null()) {
        return Err(invalid(
            format!(
                "messages.{i}.function_call: the legacy functions API is not available for an Anthropic model; use tool_calls"
            ),
            Some("messages"),
        ));
    }
    if calls.is_empty()
        && let Some(Value::String(s)) = content
    {
        // An empty assistant turn says nothing, and Anthropic refuses it.
        return Ok((!s.is_empty()).then(|| json!({"role": "assistant", "content": s})));
    }
    let mut blocks = Vec::new();
    match content {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            if !s.is_empty() {
                blocks.push(text_part(s));
            }
        }
        Some(Value::Array(parts)) => {
            for (j, p) in parts.iter().enumerate() {
                let text = match type_of(p) {
                    Some("text") => str_field(p, "text"),
                    Some("refusal") => str_field(p, "refusal"),
                    _ => None,
                };
                match text {
                    Some(t) if !t.is_empty() => blocks.push(text_part(t)),
                    Some(_) => {}
                    None => {
                        return Err(invalid(
                            format!(
                                "messages.{i}.content.{j}: assistant content parts must be text or refusal"
                            ),
                            Some("messages"),
                        ));
                    }
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                format!("messages.{i}.content: must be a string or a list of parts"),
                Some("messages"),
            ));
        }
    }
    for (k, c) in calls.iter().enumerate() {
        blocks.push(tool_call_to_anthropic(c, i, k)?);
    }
    Ok((!blocks.is_empty()).then(|| json!({"role": "assistant", "content": blocks})))
}

fn tool_call_to_anthropic(c: &Value, i: usize, k: usize) -> Result<Value, TranslateError> {
    let at = |what: &str| format!("messages.{i}.tool_calls.{k}{what}");
    if !matches!(type_of(c), None | Some("function")) {
        return Err(invalid(
            at(": only function tool calls can be sent to an Anthropic model"),
            Some("messages"),
        ));
    }
    let f = c.get("function").unwrap_or(&Value::Null);
    let (Some(id), Some(name)) = (str_field(c, "id"), str_field(f, "name")) else {
        return Err(invalid(
            at(": a tool call needs an id and a function name"),
            Some("messages"),
        ));
    };
    let input = match f.get("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Err(invalid(
                    at(
                        ".function.arguments: must be a JSON object (Anthropic tool inputs are objects)",
                    ),
                    Some("messages"),
                ));
            }
        },
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            return Err(invalid(
                at(".function.arguments: must be a JSON string"),
                Some("messages"),
            ));
        }
    };
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

fn tool_to_anthropic(t: &Value, k: usize) -> Result<Value, TranslateError> {
    if type_of(t) != Some("function") {
        return Err(invalid(
            format!("tools.{k}: only function tools can be sent to an Anthropic model"),
            Some("tools"),
        ));
    }
    let f = t.get("function").unwrap_or(&Value::Null);
    let name = str_field(f, "name").ok_or_else(|| {
        invalid(
            format!("tools.{k}.function.name: Field required"),
            Some("tools"),
        )
    })?;
    let mut tool = Map::new();
    tool.insert("name".into(), Value::String(name.to_owned()));
    if let Some(d) = f.get("description").filter(|d| d.is_string()) {
        tool.insert("description".into(), d.clone());
    }
    let schema = f
        .get("parameters")
        .filter(|s| s.is_object())
        .cloned()
        .unwrap_or_else(empty_schema);
    tool.insert("input_schema".into(), schema);
    Ok(Value::Object(tool))
}

fn tool_choice_to_anthropic(c: &Value) -> Result<Value, TranslateError> {
    match c {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({"type": "auto"})),
            "required" => Ok(json!({"type": "any"})),
            "none" => Ok(json!({"type": "none"})),
            _ => Err(invalid(
                "tool_choice: must be auto, required, none or a function",
                Some("tool_choice"),
            )),
        },
        Value::Object(_) if type_of(c) == Some("function") => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(
                        "tool_choice.function.name: Field required",
                        Some("tool_choice"),
                    )
                })?;
            Ok(json!({"type": "tool", "name": name}))
        }
        _ => Err(invalid(
            "tool_choice: only auto, required, none or a named function can be sent to an Anthropic model",
            Some("tool_choice"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn err(r: Result<Map<String, Value>, TranslateError>) -> (String, Option<&'static str>) {
        match r {
            Err(TranslateError::Invalid { message, param }) => (message, param),
            Ok(v) => panic!("expected an error, got {v:?}"),
        }
    }

    #[test]
    fn anthropic_to_openai_system_string_and_blocks() {
        let req = obj(json!({
            "model": "claude", "max_tokens": 100, "system": "Be brief.",
            "messages": [{"role": "user", "content": "hi"}]
        }));
        let out = anthropic_request_to_openai_chat(&req, "gpt-x").unwrap();
        assert_eq!(out["model"], "gpt-x");
        assert_eq!(out["max_completion_tokens"], 100);
        assert_eq!(
            out["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
        );
        assert!(out.get("stream").is_none());

        let req = obj(json!({
            "model": "claude", "max_tokens": 1,
            "system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        }));
        let out = anthropic_request_to_openai_chat(&req, "").unwrap();
        assert_eq!(
            out["model"], "claude",
            "empty upstream model keeps the client's"
        );
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]})
        );
        assert_eq!(out["messages"][1], json!({"role": "user", "content": "hi"}));
    }

    #[test]
    fn anthropic_to_openai_sampling_stream_and_user() {
        let req = obj(json!({
            "model": "c", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
            "stop_sequences": ["END", "STOP"], "stream": true, "metadata": {"user_id": "u-1"},
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "hi"}]
        }));
        let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["top_p"], 0.9);
        assert_eq!(out["stop"], json!(["END", "STOP"]));
        assert_eq!(out["stream"], true);
        assert_eq!(out["stream_options"], json!({"include_usage": true}));
        assert_eq!(out["user"], "u-1");
        assert!(out.get("top_k").is_none() && out.get("thinking").is_none());
    }

    #[test]
    fn anthropic_to_openai_requires_max_tokens_and_messages() {
        let (msg, param) = err(anthropic_request_to_openai_chat(
            &obj(json!({"model": "c", "messages": []})),
            "m",
        ));
        assert!(msg.contains("max_tokens"));
        assert_eq!(param, Some("max_tokens"));
        let (_, param) = err(anthropic_request_to_openai_chat(
            &obj(json!({"model": "c", "max_tokens": 3})),
            "m",
        ));
        assert_eq!(param, Some("messages"));
        let (msg, _) = err(anthropic_request_to_openai_chat(
            &obj(
                json!({"model": "c", "max_tokens": 3, "messages": [{"role": "system", "content": "x"}]}),
            ),
            "m",
        ));
        assert!(msg.contains("messages.0.role"), "{msg}");
    }

    #[test]
    fn anthropic_to_openai_tool_round() {
        let req = obj(json!({
            "model": "c", "max_tokens": 50,
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}, "cache_control": {"type": "ephemeral"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C", "is_error": false},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ]
        }));
        let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
        assert_eq!(
            out["tools"],
            json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
        );
        assert_eq!(out["tool_choice"], "required");
        assert_eq!(out["parallel_tool_calls"], false);
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
                {"role": "user", "content": "And tomorrow?"}
            ])
        );
        // Back again: the same conversation.
        let back = openai_chat_request_to_anthropic(&out, "c").unwrap();
        assert_eq!(
            back["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            back["tools"][0]["input_schema"],
            req["tools"][0]["input_schema"]
        );
        assert_eq!(
            back["messages"],
            json!([
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ])
        );
    }

    #[test]
    fn anthropic_tool_choice_variants() {
        let base = |choice: Value| {
            obj(json!({
                "model": "c", "max_tokens": 1, "tool_choice": choice,
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "messages": [{"role": "user", "content": "x"}]
            }))
        };
        let map = |choice: Value| anthropic_request_to_openai_chat(&base(choice), "m").unwrap();
        assert_eq!(map(json!({"type": "auto"}))["tool_choice"], "auto");
        assert_eq!(map(json!({"type": "none"}))["tool_choice"], "none");
        assert_eq!(
            map(json!({"type": "tool", "name": "f"}))["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert!(
            map(json!({"type": "auto"}))
                .get("parallel_tool_calls")
                .is_none()
        );
        let (_, param) = err(anthropic_request_to_openai_chat(
            &base(json!({"type": "bogus"})),
            "m",
        ));
        assert_eq!(param, Some("tool_choice"));
        // No tools: neither tools nor tool_choice (OpenAI refuses both).
        let req = obj(
            json!({"model": "c", "max_tokens": 1, "tools": [], "tool_choice": {"type": "auto"}, "messages": []}),
        );
        let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
        assert!(out.get("tools").is_none() && out.get("tool_choice").is_none());
    }

    #[test]
    fn anthropic_server_tools_and_blocks_are_refused() {
        let req = obj(json!({
            "model": "c", "max_tokens": 1,
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
            "messages": [{"role": "user", "content": "x"}]
        }));
        let (msg, param) = err(anthropic_request_to_openai_chat(&req, "m"));
        assert!(msg.contains("web_search_20250305"), "{msg}");
        assert_eq!(param, Some("tools"));
        let req = obj(json!({
            "model": "c", "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
            ]}]}]
        }));
        let (msg, _) = err(anthropic_request_to_openai_chat(&req, "m"));
        assert!(msg.contains("messages.0.content.0.content.0"), "{msg}");
        let req = obj(json!({
            "model": "c", "max_tokens": 1,
            "messages": [{"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]}]
        }));
        let (msg, _) = err(anthropic_request_to_openai_chat(&req, "m"));
        assert!(msg.contains("server_tool_use"), "{msg}");
    }

    #[test]
    fn images_and_documents_both_ways() {
        let req = obj(json!({
            "model": "c", "max_tokens": 1,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
                {"type": "document", "title": "report.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0"}}
            ]}]
        }));
        let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
        assert_eq!(
            out["messages"][0]["content"],
            json!([
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                {"type": "file", "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0"}}
            ])
        );
        let back = openai_chat_request_to_anthropic(&out, "c").unwrap();
        assert_eq!(back["messages"], req["messages"]);

        let bad = obj(
            json!({"model": "g", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}),
        );
        assert_eq!(
            err(openai_chat_request_to_anthropic(&bad, "c")).1,
            Some("messages")
        );
        let bad = obj(
            json!({"model": "g", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]}),
        );
        assert!(
            err(openai_chat_request_to_anthropic(&bad, "c"))
                .0
                .contains("input_audio")
        );
        let bad = obj(
            json!({"model": "g", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-1"}}]}]}),
        );
        assert!(
            err(openai_chat_request_to_anthropic(&bad, "c"))
                .0
                .contains("file ids")
        );
    }

    #[test]
    fn openai_to_anthropic_systems_are_hoisted() {
        let req = obj(json!({
            "model": "g",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi", "name": "bob"}
            ]
        }));
        let out = openai_chat_request_to_anthropic(&req, "claude-x").unwrap();
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["system"], "Be brief.");
        assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(out["messages"], json!([{"role": "user", "content": "hi"}]));

        let req = obj(json!({
            "model": "g", "max_tokens": 7, "max_completion_tokens": 9,
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "A"}]},
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "B"}
            ]
        }));
        let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
        assert_eq!(
            out["system"],
            json!([{"type": "text", "text": "A"}, {"type": "text", "text": "B"}])
        );
        assert_eq!(out["max_tokens"], 9, "max_completion_tokens wins");
        let req = obj(json!({"model": "g", "max_tokens": 7, "messages": []}));
        assert_eq!(
            openai_chat_request_to_anthropic(&req, "c").unwrap()["max_tokens"],
            7
        );
    }

    #[test]
    fn openai_to_anthropic_sampling_and_stop() {
        let req = obj(json!({
            "model": "g", "temperature": 1.5, "top_p": 0.5, "stop": "END", "stream": true,
            "stream_options": {"include_usage": true}, "user": "u", "seed": 3, "presence_penalty": 0.1,
            "n": 1, "response_format": {"type": "text"}, "logprobs": false,
            "messages": [{"role": "user", "content": "x"}]
        }));
        let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
        assert_eq!(out["temperature"], 1.0, "clamped to Anthropic's range");
        assert_eq!(out["top_p"], 0.5);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["stream"], true);
        assert_eq!(out["metadata"], json!({"user_id": "u"}));
        for k in [
            "stream_options",
            "seed",
            "presence_penalty",
            "n",
            "response_format",
            "logprobs",
            "user",
        ] {
            assert!(out.get(k).is_none(), "{k} dropped");
        }
        let req =
            obj(json!({"model": "g", "temperature": 0.3, "stop": ["a", "b"], "messages": []}));
        let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
        assert_eq!(out["temperature"], 0.3);
        assert_eq!(out["stop_sequences"], json!(["a", "b"]));
    }

    #[test]
    fn openai_meaning_changes_are_refused() {
        for (extra, param) in [
            (json!({"n": 2}), "n"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": "auto"}), "function_call"),
            (json!({"web_search_options": {}}), "web_search_options"),
            (
                json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
                "tools",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "allowed_tools"}}),
                "tool_choice",
            ),
        ] {
            let mut req =
                obj(json!({"model": "g", "messages": [{"role": "user", "content": "x"}]}));
            req.extend(obj(extra.clone()));
            let (msg, p) = err(openai_chat_request_to_anthropic(&req, "c"));
            assert_eq!(p, Some(param), "{extra}: {msg}");
        }
    }

    #[test]
    fn openai_to_anthropic_tools_and_results() {
        let req = obj(json!({
            "model": "g", "parallel_tool_calls": false,
            "tools": [{"type": "function", "function": {"name": "f", "description": "F", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}, "strict": true}},
                      {"type": "function", "function": {"name": "g"}}],
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "one"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "done"}
            ]
        }));
        let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
        assert_eq!(
            out["tools"],
            json!([
                {"name": "f", "description": "F", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
                {"name": "g", "input_schema": {"type": "object", "properties": {}}}
            ])
        );
        assert_eq!(
            out["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        assert_eq!(
            out["messages"],
            json!([
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "g", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "two"}]}
                ]},
                {"role": "assistant", "content": "done"}
            ])
        );
        let mut choice = req.clone();
        for (c, want) in [
            (
                json!("required"),
                json!({"type": "any", "disable_parallel_tool_use": true}),
            ),
            (json!("none"), json!({"type": "none"})),
            (
                json!({"type": "function", "function": {"name": "g"}}),
                json!({"type": "tool", "name": "g", "disable_parallel_tool_use": true}),
            ),
        ] {
            choice.insert("tool_choice".into(), c);
            assert_eq!(
                openai_chat_request_to_anthropic(&choice, "c").unwrap()["tool_choice"],
                want
            );
        }
    }

    #[test]
    fn openai_bad_tool_arguments_are_refused() {
        let req = obj(json!({"model": "g", "messages": [
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1,2]"}}]}
        ]}));
        let (msg, _) = err(openai_chat_request_to_anthropic(&req, "c"));
        assert!(
            msg.contains("messages.0.tool_calls.0.function.arguments"),
            "{msg}"
        );
        let req = obj(
            json!({"model": "g", "messages": [{"role": "function", "name": "f", "content": "x"}]}),
        );
        assert!(
            err(openai_chat_request_to_anthropic(&req, "c"))
                .0
                .contains("legacy")
        );
        let req = obj(json!({"model": "g", "messages": [{"role": "tool", "content": "x"}]}));
        assert!(
            err(openai_chat_request_to_anthropic(&req, "c"))
                .0
                .contains("tool_call_id")
        );
    }

    #[test]
    fn tool_messages_merge_with_the_next_user_message() {
        let req = obj(json!({"model": "g", "messages": [
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
            {"role": "user", "content": "next"},
            {"role": "user", "content": "again"}
        ]}));
        let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
        assert_eq!(
            out["messages"],
            json!([
                {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "r"}, {"type": "text", "text": "next"}]},
                {"role": "user", "content": "again"}
            ])
        );
        // And the way back splits them again.
        let back = anthropic_request_to_openai_chat(&out, "g").unwrap();
        assert_eq!(
            back["messages"],
            json!([
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "r"},
                {"role": "user", "content": "next"},
                {"role": "user", "content": "again"}
            ])
        );
    }

    #[test]
    fn empty_assistant_turns_are_dropped() {
        let req = obj(json!({"model": "g", "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": [{"type": "text", "text": ""}]},
            {"role": "user", "content": "b"}
        ]}));
        let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
        assert_eq!(
            out["messages"],
            json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        );
    }
}
