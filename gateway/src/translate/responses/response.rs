//! The chat-completions answer as a Responses `response` object.

use serde_json::{Map, Value, json};
use tollgate_schemas::events::TokenCounts;

use crate::sse::OpenAiUsage;
use crate::translate::{TranslateError, invalid, unix_now};

/// The request fields a Responses `response` echoes back.
#[derive(Debug, Clone)]
pub(super) struct Echo {
    instructions: Value,
    max_output_tokens: Value,
    parallel_tool_calls: Value,
    temperature: Value,
    top_p: Value,
    tool_choice: Value,
    tools: Value,
    metadata: Value,
}

impl Default for Echo {
    fn default() -> Self {
        Self {
            instructions: Value::Null,
            max_output_tokens: Value::Null,
            parallel_tool_calls: Value::Bool(true),
            temperature: json!(1.0),
            top_p: json!(1.0),
            tool_choice: json!("auto"),
            tools: json!([]),
            metadata: json!({}),
        }
    }
}

impl Echo {
    pub(super) fn from_request(req: &Map<String, Value>) -> Self {
        let mut e = Self::default();
        let get = |k: &str| req.get(k).filter(|v| !v.is_null()).cloned();
        if let Some(v) = get("instructions") {
            e.instructions = v;
        }
        if let Some(v) = get("max_output_tokens") {
            e.max_output_tokens = v;
        }
        if let Some(v) = get("parallel_tool_calls") {
            e.parallel_tool_calls = v;
        }
        if let Some(v) = get("temperature") {
            e.temperature = v;
        }
        if let Some(v) = get("top_p") {
            e.top_p = v;
        }
        if let Some(v) = get("tool_choice") {
            e.tool_choice = v;
        }
        if let Some(v) = get("tools") {
            e.tools = v;
        }
        if let Some(v) = get("metadata") {
            e.metadata = v;
        }
        e
    }

    pub(super) fn apply(&self, resp: &mut Value) {
        if let Some(o) = resp.as_object_mut() {
            o.insert("instructions".into(), self.instructions.clone());
            o.insert("max_output_tokens".into(), self.max_output_tokens.clone());
            o.insert(
                "parallel_tool_calls".into(),
                self.parallel_tool_calls.clone(),
            );
            o.insert("temperature".into(), self.temperature.clone());
            o.insert("top_p".into(), self.top_p.clone());
            o.insert("tool_choice".into(), self.tool_choice.clone());
            o.insert("tools".into(), self.tools.clone());
            o.insert("metadata".into(), self.metadata.clone());
        }
    }
}

/// Copies the fields a response echoes (`instructions`, `max_output_tokens`,
/// `parallel_tool_calls`, `temperature`, `top_p`, `tool_choice`, `tools`,
/// `metadata`) from the client's Responses request into `response` (from
/// [`chat_response_to_responses`], which fills in defaults).
pub fn echo_request_fields(response: &mut Value, req: &Map<String, Value>) {
    Echo::from_request(req).apply(response);
}

/// Responses `usage` for token counts (input includes cache reads).
pub(super) fn responses_usage_value(t: &TokenCounts) -> Value {
    let input = t.input_tokens + t.cache_read_tokens + t.cache_write_tokens;
    json!({
        "input_tokens": input,
        "input_tokens_details": {
            "cached_tokens": t.cache_read_tokens,
            "cache_write_tokens": t.cache_write_tokens,
        },
        "output_tokens": t.output_tokens,
        "output_tokens_details": {"reasoning_tokens": t.reasoning_tokens},
        "total_tokens": input + t.output_tokens,
    })
}

/// The suffix of a chat completion id (`chatcmpl-abc` → `abc`); a fresh
/// UUIDv7 when there is none.
pub(super) fn id_suffix(chat_id: Option<&str>) -> String {
    match chat_id.map(|s| s.strip_prefix("chatcmpl-").unwrap_or(s)) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => uuid::Uuid::now_v7().simple().to_string(),
    }
}

pub(super) fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message", "id": id, "status": status, "role": "assistant",
        "content": [output_text_part(text)],
    })
}

pub(super) fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

pub(super) fn call_item(
    id: &str,
    call_id: &str,
    name: &str,
    arguments: &str,
    status: &str,
) -> Value {
    json!({
        "type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status,
    })
}

/// `(status, incomplete_details)` for a chat `finish_reason`.
pub(super) fn status_of(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

pub(super) fn item_status(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length" | "content_filter") => "incomplete",
        _ => "completed",
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn response_object(
    id: &str,
    created_at: u64,
    model: &str,
    status: &str,
    incomplete_details: Value,
    error: Value,
    output: Vec<Value>,
    usage: Option<&TokenCounts>,
    echo: &Echo,
) -> Value {
    let mut resp = json!({
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete_details,
        "model": model,
        "output": output,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": usage.map_or(Value::Null, responses_usage_value),
    });
    echo.apply(&mut resp);
    resp
}

/// A `chat.completion` as a Responses `response` object. Only the first
/// choice is used. Text (or a refusal) becomes one `message` item,
/// `tool_calls` become `function_call` items after it. The echoed request
/// fields get defaults; see [`echo_request_fields`].
pub fn chat_response_to_responses(
    chat: &Value,
    client_model: &str,
) -> Result<Value, TranslateError> {
    let choice = chat
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| invalid("the upstream response has no choices", None))?;
    let message = choice.get("message").unwrap_or(&Value::Null);
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    let suffix = id_suffix(chat.get("id").and_then(Value::as_str));
    let mut text = match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    };
    if text.is_empty()
        && let Some(r) = message.get("refusal").and_then(Value::as_str)
    {
        text = r.to_owned();
    }
    // Only the last item can have been cut short.
    let last_status = |is_last: bool| {
        if is_last {
            item_status(finish)
        } else {
            "completed"
        }
    };
    let mut output = Vec::new();
    let calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !text.is_empty() {
        output.push(message_item(
            &format!("msg_{suffix}"),
            &text,
            last_status(calls.is_empty()),
        ));
    }
    for (k, call) in calls.iter().enumerate() {
        let f = call.get("function").unwrap_or(&Value::Null);
        let call_id = match call.get("id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() => id.to_owned(),
            _ => format!("call_{suffix}_{k}"),
        };
        output.push(call_item(
            &format!("fc_{suffix}_{k}"),
            &call_id,
            f.get("name").and_then(Value::as_str).unwrap_or(""),
            f.get("arguments").and_then(Value::as_str).unwrap_or(""),
            last_status(k + 1 == calls.len()),
        ));
    }
    let usage = chat
        .get("usage")
        .filter(|u| !u.is_null())
        .and_then(|u| serde_json::from_value::<OpenAiUsage>(u.clone()).ok())
        .map(|u| u.tokens());
    let (status, incomplete) = status_of(finish);
    Ok(response_object(
        &format!("resp_{suffix}"),
        chat.get("created")
            .and_then(Value::as_u64)
            .unwrap_or_else(unix_now),
        client_model,
        status,
        incomplete,
        Value::Null,
        output,
        usage.as_ref(),
        &Echo::default(),
    ))
}
