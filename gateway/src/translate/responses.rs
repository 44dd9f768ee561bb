//! OpenAI's Responses API (`POST /v1/responses`) served over chat
//! completions: the request becomes a chat request, and the chat answer
//! (plain or streamed) becomes a Responses `response` object or event stream.
//!
//! Only what chat completions can express is accepted: text and image
//! input, function tools, function calls and their outputs. Server-side
//! state (`previous_response_id`, `conversation`, `background`), built-in
//! tools (web search, file search, computer use, ...) and structured output
//! through `text.format` are refused with [`TranslateError::Invalid`].
//!
//! Usage: the Responses `input_tokens` includes cached tokens (like chat's
//! `prompt_tokens`), `input_tokens_details.cached_tokens` is the cache read
//! and `cache_write_tokens` the cache write (0 from chat upstreams);
//! [`StreamTranslator::usage`] reports Tollgate's token kinds (input
//! excluding cache reads).
//!
//! The stream follows OpenAI's event grammar: `response.created`,
//! `response.in_progress`, then per output item `response.output_item.added`,
//! (for a message) `response.content_part.added`,
//! `response.output_text.delta`s, `response.output_text.done`,
//! `response.content_part.done`, (for a function call)
//! `response.function_call_arguments.delta`s and `.done`, then
//! `response.output_item.done`; finally `response.completed` with the whole
//! response and its usage. Every event carries `type` and a
//! `sequence_number` counting from 0, and no `[DONE]` is written. A
//! truncated answer (`finish_reason: length`) still ends with
//! `response.completed` (the SDK's `get_final_response()` needs it), whose
//! response has `status: "incomplete"` and
//! `incomplete_details.reason: "max_output_tokens"`.

use std::borrow::Cow;

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tollgate_schemas::events::TokenCounts;

use super::wire::{ErrorBody, OpenAiChoice, OpenAiToolCallDelta};
use super::{StreamTranslator, TranslateError, invalid, unix_now, write_sse_json};
use crate::sse::{OpenAiUsage, SseEvent};

// ---------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Response object
// ---------------------------------------------------------------------------

/// The request fields a Responses `response` echoes back.
#[derive(Debug, Clone)]
struct Echo {
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
    fn from_request(req: &Map<String, Value>) -> Self {
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

    fn apply(&self, resp: &mut Value) {
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
fn responses_usage_value(t: &TokenCounts) -> Value {
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
fn id_suffix(chat_id: Option<&str>) -> String {
    match chat_id.map(|s| s.strip_prefix("chatcmpl-").unwrap_or(s)) {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => uuid::Uuid::now_v7().simple().to_string(),
    }
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "type": "message", "id": id, "status": status, "role": "assistant",
        "content": [output_text_part(text)],
    })
}

fn output_text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({
        "type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status,
    })
}

/// `(status, incomplete_details)` for a chat `finish_reason`.
fn status_of(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

fn item_status(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length" | "content_filter") => "incomplete",
        _ => "completed",
    }
}

#[allow(clippy::too_many_arguments)]
fn response_object(
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

// ---------------------------------------------------------------------------
// Stream
// ---------------------------------------------------------------------------

/// A chat chunk, with `created` (which [`super::wire::OpenAiChunk`] skips).
#[derive(Debug, Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    created: Option<u64>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Vec<OpenAiChoice<'a>>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
    #[serde(default, borrow)]
    error: Option<ErrorBody<'a>>,
}

/// One output item of the translated stream.
#[derive(Debug)]
enum Item {
    Message {
        id: String,
        text: String,
        status: &'static str,
    },
    Call {
        /// The chat tool-call index.
        key: u64,
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        status: &'static str,
    },
}

impl Item {
    fn value(&self) -> Value {
        match self {
            Item::Message { id, text, status } => message_item(id, text, status),
            Item::Call {
                id,
                call_id,
                name,
                arguments,
                status,
                ..
            } => call_item(id, call_id, name, arguments, status),
        }
    }
}

/// Chat SSE stream (asked with `include_usage`) → Responses SSE stream.
#[derive(Debug)]
pub struct ChatToResponsesStream {
    client_model: String,
    echo: Echo,
    suffix: String,
    created_at: u64,
    seq: u64,
    started: bool,
    items: Vec<Item>,
    /// Index into `items` of the item still open (not yet `output_item.done`).
    open: Option<usize>,
    finish: Option<String>,
    usage: Option<OpenAiUsage>,
    closed: bool,
    model: Option<String>,
    text: String,
    saw_content: bool,
}

impl ChatToResponsesStream {
    pub fn new(client_model: &str) -> Self {
        Self {
            client_model: client_model.to_owned(),
            echo: Echo::default(),
            suffix: String::new(),
            created_at: 0,
            seq: 0,
            started: false,
            items: Vec::new(),
            open: None,
            finish: None,
            usage: None,
            closed: false,
            model: None,
            text: String::new(),
            saw_content: false,
        }
    }

    /// Echo the client's request fields (`instructions`, `tools`, ...) in the
    /// streamed response objects instead of defaults.
    pub fn with_request(mut self, req: &Map<String, Value>) -> Self {
        self.echo = Echo::from_request(req);
        self
    }

    fn emit(&mut self, out: &mut BytesMut, kind: &'static str, mut data: Value) {
        if let Some(o) = data.as_object_mut() {
            o.insert("type".into(), json!(kind));
            o.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        write_sse_json(out, Some(kind), &data);
    }

    fn response(&self, status: &str, incomplete: Value, error: Value, usage: bool) -> Value {
        let output = if status == "in_progress" {
            Vec::new()
        } else {
            self.items.iter().map(Item::value).collect()
        };
        let usage = if usage {
            self.usage.map(|u| u.tokens())
        } else {
            None
        };
        response_object(
            &format!("resp_{}", self.suffix),
            self.created_at,
            &self.client_model,
            status,
            incomplete,
            error,
            output,
            usage.as_ref(),
            &self.echo,
        )
    }

    fn ensure_started(&mut self, chunk: Option<&Chunk<'_>>, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        self.suffix = id_suffix(chunk.and_then(|c| c.id.as_deref()));
        self.created_at = chunk.and_then(|c| c.created).unwrap_or_else(unix_now);
        let resp = self.response("in_progress", Value::Null, Value::Null, false);
        self.emit(out, "response.created", json!({ "response": resp }));
        let resp = self.response("in_progress", Value::Null, Value::Null, false);
        self.emit(out, "response.in_progress", json!({ "response": resp }));
    }

    fn push_text(&mut self, t: &str) {
        if !t.is_empty() {
            self.saw_content = true;
            self.text.push_str(t);
        }
    }

    /// Ends the open item (`...done` events), with `status`.
    fn close_item(&mut self, status: &'static str, out: &mut BytesMut) {
        let Some(index) = self.open.take() else {
            return;
        };
        let Some(item) = self.items.get_mut(index) else {
            return;
        };
        match item {
            Item::Message {
                id,
                text,
                status: s,
            } => {
                *s = status;
                let (id, text) = (id.clone(), text.clone());
                self.emit(
                    out,
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}),
                );
                self.emit(
                    out,
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": output_text_part(&text)}),
                );
            }
            Item::Call {
                id,
                name,
                arguments,
                status: s,
                ..
            } => {
                *s = status;
                let data = json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments});
                self.emit(out, "response.function_call_arguments.done", data);
            }
        }
        if let Some(item) = self.items.get(index) {
            let item = item.value();
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            );
        }
    }

    fn on_text(&mut self, t: &str, out: &mut BytesMut) {
        if t.is_empty() {
            return;
        }
        self.push_text(t);
        let index = match self.open {
            Some(i) if matches!(self.items.get(i), Some(Item::Message { .. })) => i,
            _ => {
                self.close_item("completed", out);
                let index = self.items.len();
                let id = if self.items.is_empty() {
                    format!("msg_{}", self.suffix)
                } else {
                    format!("msg_{}_{index}", self.suffix)
                };
                let added = json!({
                    "type": "message", "id": id, "status": "in_progress",
                    "role": "assistant", "content": [],
                });
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                );
                self.emit(
                    out,
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": index, "content_index": 0, "part": output_text_part("")}),
                );
                self.items.push(Item::Message {
                    id,
                    text: String::new(),
                    status: "in_progress",
                });
                self.open = Some(index);
                index
            }
        };
        let mut item_id = String::new();
        if let Some(Item::Message { id, text, .. }) = self.items.get_mut(index) {
            text.push_str(t);
            item_id.clone_from(id);
        }
        self.emit(
            out,
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": index, "content_index": 0, "delta": t, "logprobs": []}),
        );
    }

    fn on_tool_call(&mut self, tc: &OpenAiToolCallDelta<'_>, out: &mut BytesMut) {
        let key = tc.index.unwrap_or(0);
        let name = tc.function.as_ref().and_then(|f| f.name.as_deref());
        let args = tc
            .function
            .as_ref()
            .and_then(|f| f.arguments.as_deref())
            .unwrap_or_default();
        let found = self
            .items
            .iter()
            .position(|it| matches!(it, Item::Call { key: k, .. } if *k == key));
        let index = match found {
            Some(i) => i,
            None => {
                self.close_item("completed", out);
                let index = self.items.len();
                let id = format!("fc_{}_{key}", self.suffix);
                let call_id = match tc.id.as_deref() {
                    Some(id) if !id.is_empty() => id.to_owned(),
                    _ => format!("call_{}_{key}", self.suffix),
                };
                let name = name.unwrap_or_default().to_owned();
                self.push_text(&name);
                self.saw_content = true;
                let added = call_item(&id, &call_id, &name, "", "in_progress");
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                );
                self.items.push(Item::Call {
                    key,
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                    status: "in_progress",
                });
                self.open = Some(index);
                index
            }
        };
        if args.is_empty() {
            return;
        }
        self.push_text(args);
        let mut item_id = String::new();
        if let Some(Item::Call { id, arguments, .. }) = self.items.get_mut(index) {
            arguments.push_str(args);
            item_id.clone_from(id);
        }
        self.emit(
            out,
            "response.function_call_arguments.delta",
            json!({"item_id": item_id, "output_index": index, "delta": args}),
        );
    }

    /// `response.completed`, once.
    fn complete(&mut self, out: &mut BytesMut) {
        if self.closed {
            return;
        }
        self.ensure_started(None, out);
        let finish = self.finish.clone();
        self.close_item(item_status(finish.as_deref()), out);
        self.closed = true;
        let (status, incomplete) = status_of(finish.as_deref());
        let resp = self.response(status, incomplete, Value::Null, true);
        self.emit(out, "response.completed", json!({ "response": resp }));
    }

    fn on_chunk(&mut self, chunk: &Chunk<'_>, out: &mut BytesMut) {
        self.ensure_started(Some(chunk), out);
        if let Some(e) = &chunk.error {
            // A mid-stream error ends the response: `response.failed`.
            self.close_item("incomplete", out);
            self.closed = true;
            let message = e
                .message
                .as_deref()
                .unwrap_or("the upstream failed mid-stream");
            let error = json!({"code": "server_error", "message": message});
            let resp = self.response("failed", Value::Null, error, true);
            self.emit(out, "response.failed", json!({ "response": resp }));
            return;
        }
        if self.model.is_none() {
            self.model = chunk.model.as_deref().map(str::to_owned);
        }
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            if let Some(d) = &choice.delta {
                if let Some(r) = &d.reasoning_content {
                    self.push_text(r);
                }
                for t in [&d.content, &d.refusal].into_iter().flatten() {
                    self.on_text(t, out);
                }
                for tc in d.tool_calls.iter().flatten() {
                    self.on_tool_call(tc, out);
                }
            }
            if let Some(f) = &choice.finish_reason {
                self.finish = Some(f.as_ref().to_owned());
                self.close_item(item_status(Some(f)), out);
            }
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        if self.finish.is_some() && self.usage.is_some() {
            self.complete(out);
        }
    }
}

impl StreamTranslator for ChatToResponsesStream {
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if ev.data == "[DONE]" {
            self.complete(out);
            return;
        }
        let Ok(chunk) = serde_json::from_str::<Chunk<'_>>(&ev.data) else {
            return;
        };
        if self.closed {
            // Only a late usage chunk could matter (for billing).
            if let Some(u) = chunk.usage {
                self.usage = Some(u);
            }
            return;
        }
        self.on_chunk(&chunk, out);
    }

    fn finish(&mut self, out: &mut BytesMut) {
        if self.started {
            self.complete(out);
        }
    }

    fn usage(&self) -> Option<TokenCounts> {
        self.usage.map(|u| u.tokens())
    }

    fn text(&self) -> &str {
        &self.text
    }

    fn served_model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn saw_content(&self) -> bool {
        self.saw_content
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::fixtures::{self, OUsage, OpenAiSpec, ToolSpec, events_of, run, split};
    use proptest::prelude::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("test input is an object"),
        }
    }

    fn err_of(v: Value) -> (String, Option<&'static str>) {
        match responses_request_to_chat(&obj(v)) {
            Err(TranslateError::Invalid { message, param }) => (message, param),
            Ok(r) => panic!("expected an error, got {r:?}"),
        }
    }

    #[test]
    fn string_input_becomes_one_user_message() {
        let chat = responses_request_to_chat(&obj(json!({
            "model": "gpt-x", "input": "Hi", "instructions": "Be brief.",
            "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1",
            "store": true, "metadata": {"a": "b"}, "reasoning": {"effort": "low"},
            "text": {"format": {"type": "text"}}, "stream": true,
        })))
        .unwrap();
        assert_eq!(
            Value::Object(chat),
            json!({
                "model": "gpt-x",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
                "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1",
                "stream": true, "stream_options": {"include_usage": true},
            })
        );
    }

    #[test]
    fn item_list_maps_messages_calls_and_outputs() {
        let chat = responses_request_to_chat(&obj(json!({
            "model": "m",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
                ]},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
                {"type": "function_call", "call_id": "call_1", "name": "look", "arguments": "{\"x\":1}"},
                {"type": "function_call", "call_id": "call_2", "name": "look", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "a cat"},
                {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "a dog"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "call_3", "name": "more", "arguments": "{}"},
            ],
            "tools": [{"type": "function", "name": "look", "description": "Look.", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "look"},
            "parallel_tool_calls": false,
        })))
        .unwrap();
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "system", "content": "Use tools."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                ]},
                {"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"x\":1}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
                {"role": "tool", "tool_call_id": "call_2", "content": "a dog"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_3", "type": "function", "function": {"name": "more", "arguments": "{}"}},
                ]},
            ])
        );
        assert_eq!(
            chat["tools"],
            json!([{"type": "function", "function": {"name": "look", "description": "Look.", "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            chat["tool_choice"],
            json!({"type": "function", "function": {"name": "look"}})
        );
        assert_eq!(chat["parallel_tool_calls"], false);
        assert!(!chat.contains_key("stream"));
        for choice in ["auto", "none", "required"] {
            let chat =
                responses_request_to_chat(&obj(json!({"input": "x", "tool_choice": choice})))
                    .unwrap();
            assert_eq!(chat["tool_choice"], choice);
        }
    }

    #[test]
    fn unsupported_requests_are_refused_clearly() {
        let (m, p) = err_of(json!({"input": "x", "tools": [{"type": "web_search"}]}));
        assert!(m.contains("built-in tool `web_search`"), "{m}");
        assert_eq!(p, Some("tools"));
        let (m, p) = err_of(json!({"input": "x", "previous_response_id": "resp_1"}));
        assert!(m.contains("previous_response_id"), "{m}");
        assert_eq!(p, Some("previous_response_id"));
        let (_, p) = err_of(json!({"input": "x", "conversation": "conv_1"}));
        assert_eq!(p, Some("conversation"));
        let (_, p) = err_of(json!({"input": "x", "background": true}));
        assert_eq!(p, Some("background"));
        let (m, p) = err_of(
            json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {}}}}),
        );
        assert!(m.contains("json_schema"), "{m}");
        assert_eq!(p, Some("text"));
        let (_, p) = err_of(json!({"input": "x", "tool_choice": {"type": "web_search_preview"}}));
        assert_eq!(p, Some("tool_choice"));
        let (m, _) = err_of(
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}),
        );
        assert!(m.contains("file_id"), "{m}");
        let (_, p) = err_of(json!({"input": [{"type": "web_search_call", "id": "ws_1"}]}));
        assert_eq!(p, Some("input"));
        let (_, p) = err_of(json!({"model": "m"}));
        assert_eq!(p, Some("input"));
        // Ignored, not refused.
        assert!(
            responses_request_to_chat(&obj(json!({"input": "x", "previous_response_id": null, "store": false, "background": false})))
                .is_ok()
        );
    }

    #[test]
    fn plain_response_maps_text_tool_calls_and_usage() {
        let mut spec = OpenAiSpec::text(&["Checking", "."]);
        spec.tools = vec![ToolSpec {
            id: "call_a",
            name: "get_weather",
            args: &["{\"city\":", "\"Paris\"}"],
        }];
        spec.finish = "tool_calls";
        let resp = chat_response_to_responses(&fixtures::openai_plain(&spec), "client-m").unwrap();
        assert_eq!(resp["id"], "resp_abc123");
        assert_eq!(resp["object"], "response");
        assert_eq!(resp["created_at"], 1_700_000_000u64);
        assert_eq!(resp["status"], "completed");
        assert_eq!(resp["model"], "client-m");
        assert_eq!(resp["error"], Value::Null);
        assert_eq!(resp["incomplete_details"], Value::Null);
        assert_eq!(
            resp["output"],
            json!([
                {"type": "message", "id": "msg_abc123", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
                {"type": "function_call", "id": "fc_abc123_0", "call_id": "call_a", "name": "get_weather",
                 "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
            ])
        );
        assert_eq!(
            resp["usage"],
            json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                   "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 15})
        );
        for k in [
            "instructions",
            "max_output_tokens",
            "parallel_tool_calls",
            "temperature",
            "tool_choice",
            "tools",
            "top_p",
            "metadata",
            "text",
            "truncation",
        ] {
            assert!(resp.get(k).is_some(), "{k}");
        }

        let mut spec = OpenAiSpec::text(&["cut"]);
        spec.finish = "length";
        let mut resp = chat_response_to_responses(&fixtures::openai_plain(&spec), "m").unwrap();
        assert_eq!(resp["status"], "incomplete");
        assert_eq!(
            resp["incomplete_details"],
            json!({"reason": "max_output_tokens"})
        );
        assert_eq!(resp["output"][0]["status"], "incomplete");
        echo_request_fields(
            &mut resp,
            &obj(json!({"instructions": "hi", "max_output_tokens": 5, "temperature": 0.3})),
        );
        assert_eq!(resp["instructions"], "hi");
        assert_eq!(resp["max_output_tokens"], 5);
        assert_eq!(resp["temperature"], 0.3);
        assert_eq!(resp["top_p"], 1.0);

        assert!(chat_response_to_responses(&json!({"choices": []}), "m").is_err());
    }

    /// Rebuilds the response the way the `openai` Python SDK's
    /// `ResponseStreamState` does, checking indexes on the way.
    fn sdk_final_response(events: &[(String, Value)]) -> Value {
        let mut snapshot = Value::Null;
        for (name, data) in events {
            let idx = data["output_index"].as_u64().unwrap_or(0) as usize;
            match name.as_str() {
                "response.created" => snapshot = data["response"].clone(),
                "response.output_item.added" => {
                    let output = snapshot["output"].as_array_mut().unwrap();
                    assert_eq!(output.len(), idx);
                    output.push(data["item"].clone());
                }
                "response.content_part.added" => {
                    let item = &mut snapshot["output"][idx];
                    assert_eq!(item["id"], data["item_id"]);
                    item["content"]
                        .as_array_mut()
                        .unwrap()
                        .push(data["part"].clone());
                }
                "response.output_text.delta" => {
                    let part = &mut snapshot["output"][idx]["content"]
                        [data["content_index"].as_u64().unwrap() as usize];
                    let t = format!(
                        "{}{}",
                        part["text"].as_str().unwrap(),
                        data["delta"].as_str().unwrap()
                    );
                    part["text"] = json!(t);
                }
                "response.function_call_arguments.delta" => {
                    let item = &mut snapshot["output"][idx];
                    assert_eq!(item["id"], data["item_id"]);
                    let a = format!(
                        "{}{}",
                        item["arguments"].as_str().unwrap(),
                        data["delta"].as_str().unwrap()
                    );
                    item["arguments"] = json!(a);
                }
                "response.completed" => return data["response"].clone(),
                _ => {}
            }
        }
        panic!("no response.completed");
    }

    fn names(events: &[(String, Value)]) -> Vec<&str> {
        events.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn check_envelope(events: &[(String, Value)]) {
        for (i, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], name.as_str(), "event name equals data type");
            assert_eq!(data["sequence_number"], i as u64);
        }
    }

    #[test]
    fn text_stream_follows_the_responses_grammar() {
        let upstream = fixtures::openai_stream(&OpenAiSpec::text(&["mock ", "reply ✓"]));
        let (out, t) = run(
            ChatToResponsesStream::new("client-m"),
            &[upstream.as_bytes()],
        );
        assert!(!out.contains("[DONE]"));
        let events = events_of(&out);
        assert_eq!(
            names(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        check_envelope(&events);
        assert_eq!(events[0].1["response"]["status"], "in_progress");
        assert_eq!(events[0].1["response"]["id"], "resp_abc123");
        assert_eq!(events[0].1["response"]["output"], json!([]));
        assert_eq!(events[2].1["item"]["id"], "msg_abc123");
        let deltas: String = events
            .iter()
            .filter(|(n, _)| n == "response.output_text.delta")
            .map(|(_, d)| d["delta"].as_str().unwrap())
            .collect();
        assert_eq!(events[6].1["text"], deltas.as_str());
        let done = &events[9].1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["model"], "client-m");
        assert_eq!(done["output"][0]["content"][0]["text"], deltas.as_str());
        assert_eq!(
            done["usage"],
            json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
                   "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 15})
        );
        assert_eq!(sdk_final_response(&events)["output"], done["output"]);
        let u = t.usage().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cache_read_tokens,
                u.output_tokens,
                u.reasoning_tokens
            ),
            (8, 4, 3, 1)
        );
        assert_eq!(t.text(), "mock reply ✓");
        assert_eq!(t.served_model(), Some("gpt-served"));
        assert!(t.saw_content());
    }

    #[test]
    fn tool_stream_emits_function_call_items() {
        let mut spec = OpenAiSpec::text(&["Checking."]);
        spec.tools = vec![
            ToolSpec {
                id: "call_a",
                name: "get_weather",
                args: &["{\"city\":", "\"Paris\"}"],
            },
            ToolSpec {
                id: "call_b",
                name: "get_time",
                args: &["{}"],
            },
        ];
        spec.finish = "tool_calls";
        let upstream = fixtures::openai_stream(&spec);
        let req =
            obj(json!({"input": "x", "tools": [{"type": "function", "name": "get_weather"}]}));
        let (out, _) = run(
            ChatToResponsesStream::new("m").with_request(&req),
            &[upstream.as_bytes()],
        );
        let events = events_of(&out);
        assert_eq!(
            names(&events),
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        check_envelope(&events);
        assert_eq!(events[11].1["arguments"], "{\"city\":\"Paris\"}");
        assert_eq!(events[11].1["name"], "get_weather");
        let done = &events[17].1["response"];
        assert_eq!(done["tools"], req["tools"]);
        let plain = chat_response_to_responses(&fixtures::openai_plain(&spec), "m").unwrap();
        assert_eq!(done["output"], plain["output"]);
        assert_eq!(sdk_final_response(&events)["output"], plain["output"]);
    }

    #[test]
    fn finish_is_idempotent_and_owes_completion() {
        let upstream = fixtures::openai_stream(&OpenAiSpec::text(&["a"]));
        let cut = &upstream[..upstream.find("\"choices\":[]").unwrap()];
        let cut = &cut[..cut.rfind("data: ").unwrap()];
        let mut t = ChatToResponsesStream::new("m");
        let (mut out, _) = fixtures::feed(&mut t, &[cut.as_bytes()]);
        assert!(!String::from_utf8_lossy(&out).contains("response.completed"));
        t.finish(&mut out);
        t.finish(&mut out);
        let events = events_of(&out);
        check_envelope(&events);
        assert_eq!(
            names(&events)
                .iter()
                .filter(|n| **n == "response.completed")
                .count(),
            1
        );
        assert_eq!(events.last().unwrap().1["response"]["usage"], Value::Null);
        assert_eq!(t.usage(), None);

        let mut t = ChatToResponsesStream::new("m");
        let mut out = BytesMut::new();
        t.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn length_is_incomplete_and_errors_fail() {
        let mut spec = OpenAiSpec::text(&["a"]);
        spec.finish = "length";
        let (out, _) = run(
            ChatToResponsesStream::new("m"),
            &[fixtures::openai_stream(&spec).as_bytes()],
        );
        let events = events_of(&out);
        let done = &events.last().unwrap().1["response"];
        assert_eq!(done["status"], "incomplete");
        assert_eq!(done["incomplete_details"]["reason"], "max_output_tokens");

        let upstream = "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n\
                        data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n";
        let (out, _) = run(ChatToResponsesStream::new("m"), &[upstream.as_bytes()]);
        let events = events_of(&out);
        check_envelope(&events);
        let (name, data) = events.last().unwrap();
        assert_eq!(name, "response.failed");
        assert_eq!(data["response"]["status"], "failed");
        assert_eq!(data["response"]["error"]["message"], "boom");
    }

    #[derive(Debug, Clone)]
    struct Gen {
        texts: Vec<String>,
        tools: Vec<(String, Vec<String>)>,
        reason: usize,
        with_usage: bool,
        usage: [u64; 4],
        crlf: bool,
    }

    fn gen_stream() -> impl Strategy<Value = Gen> {
        (
            prop::collection::vec("\\PC{0,12}", 0..5),
            prop::collection::vec(
                ("[a-z_]{1,8}", prop::collection::vec("[ -~]{0,10}", 0..4)),
                0..3,
            ),
            0usize..4,
            any::<bool>(),
            [0u64..1000, 0u64..1000, 0u64..1000, 0u64..1000],
            any::<bool>(),
        )
            .prop_map(|(texts, tools, reason, with_usage, usage, crlf)| Gen {
                texts,
                tools,
                reason,
                with_usage,
                usage,
                crlf,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

        /// Same bytes whatever the cuts; the grammar's envelope; the SDK's
        /// final response equals `response.completed` and the plain mapping.
        #[test]
        fn chat_to_responses_ignores_chunk_boundaries(g in gen_stream(), cuts in prop::collection::vec(0usize..100_000, 0..40)) {
            let ids: Vec<String> = (0..g.tools.len()).map(|k| format!("call_{k}")).collect();
            let args: Vec<Vec<&str>> = g.tools.iter().map(|(_, a)| a.iter().map(String::as_str).collect()).collect();
            let texts: Vec<&str> = g.texts.iter().map(String::as_str).collect();
            let mut spec = OpenAiSpec::text(&texts);
            spec.tools = g.tools.iter().enumerate().map(|(k, (name, _))| ToolSpec { id: &ids[k], name, args: &args[k] }).collect();
            spec.finish = ["stop", "length", "tool_calls", "content_filter"][g.reason];
            spec.include_usage = g.with_usage;
            spec.usage = OUsage { prompt: g.usage[0] + g.usage[1], cached: g.usage[1], completion: g.usage[2] + g.usage[3], reasoning: g.usage[3] };
            let mut upstream = fixtures::openai_stream(&spec);
            if g.crlf {
                upstream = upstream.replace('\n', "\r\n");
            }
            let bytes = upstream.as_bytes();
            let (whole, a) = run(ChatToResponsesStream::new("client-model"), &[bytes]);
            let (parts, b) = run(ChatToResponsesStream::new("client-model"), &split(bytes, &cuts));
            prop_assert_eq!(&whole, &parts);
            prop_assert_eq!(a.usage(), b.usage());
            prop_assert_eq!(a.text(), b.text());
            prop_assert!(!whole.contains("[DONE]"));

            let events = events_of(&whole);
            check_envelope(&events);
            prop_assert_eq!(events.iter().filter(|(n, _)| n == "response.completed").count(), 1);
            let done = &events.last().unwrap().1["response"];
            let plain = chat_response_to_responses(&fixtures::openai_plain(&spec), "client-model").unwrap();
            for k in ["id", "model", "status", "incomplete_details", "output", "usage", "created_at"] {
                prop_assert_eq!(&done[k], &plain[k], "{}", k);
            }
            prop_assert_eq!(&sdk_final_response(&events)["output"], &plain["output"]);
            if g.with_usage {
                let t = a.usage().unwrap();
                prop_assert_eq!((t.input_tokens, t.cache_read_tokens, t.output_tokens, t.reasoning_tokens),
                                (g.usage[0], g.usage[1], g.usage[2] + g.usage[3], g.usage[3]));
            } else {
                prop_assert_eq!(a.usage(), None);
            }
        }
    }
}
