//! OpenAI chat-completions request → Anthropic Messages request.

use serde_json::{Map, Value, json};

use super::{
    DEFAULT_MAX_TOKENS, collapse_parts, empty_schema, model_value, str_field, text_part, type_of,
};
use crate::translate::{TranslateError, invalid};

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
