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
//! Refused ([`TranslateError::Invalid`](crate::translate::TranslateError::Invalid)): Anthropic server tools and
//! server-side content blocks, images or documents inside `tool_result`,
//! Files-API sources; OpenAI `n > 1`, `response_format` other than `text`,
//! `logprobs`, audio, `file_id` files, legacy `functions`/`function_call`,
//! `web_search_options`, non-function tools, tool arguments that are not a
//! JSON object.

mod anthropic_to_openai;
mod openai_to_anthropic;

use serde_json::{Map, Value, json};

pub use self::anthropic_to_openai::anthropic_request_to_openai_chat;
pub use self::openai_to_anthropic::openai_chat_request_to_anthropic;

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

#[cfg(test)]
mod tests;
