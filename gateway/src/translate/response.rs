//! Plain (non-streamed) responses, usage blocks and error bodies.
//!
//! The translated response echoes the model the client asked for; the usage
//! keeps the upstream's counts, reshaped (see the module docs of
//! [`super`]): OpenAI `prompt_tokens = input + cache_read + cache_write`,
//! `prompt_tokens_details.cached_tokens = cache_read`; Anthropic
//! `input_tokens = prompt_tokens - cached_tokens`,
//! `cache_read_input_tokens = cached_tokens`, no cache writes.

use serde_json::{Map, Value, json};
use tollgate_schemas::events::TokenCounts;

use super::{
    TranslateError, anthropic_id, finish_from_stop_reason, invalid, openai_id,
    stop_reason_from_finish, unix_now,
};
use crate::sse::OpenAiUsage;

fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The counts of an Anthropic `usage` object in Tollgate's token kinds.
/// Missing or null fields count 0; Anthropic reports no separate reasoning
/// count (thinking is inside `output_tokens`).
pub fn anthropic_usage_tokens(usage: &Value) -> TokenCounts {
    TokenCounts {
        input_tokens: u64_field(usage, "input_tokens"),
        output_tokens: u64_field(usage, "output_tokens"),
        cache_read_tokens: u64_field(usage, "cache_read_input_tokens"),
        cache_write_tokens: u64_field(usage, "cache_creation_input_tokens"),
        reasoning_tokens: 0,
    }
}

/// OpenAI's `usage` object for token counts.
pub(crate) fn openai_usage_value(t: &TokenCounts) -> Value {
    let prompt = t.input_tokens + t.cache_read_tokens + t.cache_write_tokens;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": t.output_tokens,
        "total_tokens": prompt + t.output_tokens,
        "prompt_tokens_details": {"cached_tokens": t.cache_read_tokens},
    })
}

/// Anthropic's `usage` object for token counts.
pub(crate) fn anthropic_usage_value(t: &TokenCounts) -> Value {
    json!({
        "input_tokens": t.input_tokens,
        "cache_creation_input_tokens": t.cache_write_tokens,
        "cache_read_input_tokens": t.cache_read_tokens,
        "output_tokens": t.output_tokens,
    })
}

/// An OpenAI `chat.completion` as an Anthropic `message`. Only the first
/// choice is used (translated requests never ask for more). Text parts are
/// joined into one text block; a refusal with no content becomes the text;
/// `tool_calls` become `tool_use` blocks, whose arguments must be a JSON
/// object.
pub fn openai_chat_response_to_anthropic(
    resp: &Value,
    client_model: &str,
) -> Result<Value, TranslateError> {
    let choice = resp
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| invalid("the upstream response has no choices", None))?;
    let message = choice.get("message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    let text = match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    };
    let refusal = message
        .get("refusal")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let text = if text.is_empty() { refusal } else { &text };
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    let calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for (k, c) in calls.iter().enumerate() {
        let f = c.get("function").unwrap_or(&Value::Null);
        let args = f
            .get("arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let input = if args.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            match serde_json::from_str::<Value>(args) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return Err(invalid(
                        format!(
                            "the upstream's tool call {k} has arguments that are not a JSON object"
                        ),
                        None,
                    ));
                }
            }
        };
        content.push(json!({
            "type": "tool_use",
            "id": c.get("id").and_then(Value::as_str).unwrap_or_default(),
            "name": f.get("name").and_then(Value::as_str).unwrap_or_default(),
            "input": input,
        }));
    }
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    let usage = resp
        .get("usage")
        .filter(|u| !u.is_null())
        .and_then(|u| serde_json::from_value::<OpenAiUsage>(u.clone()).ok())
        .map(|u| u.tokens())
        .unwrap_or_default();
    Ok(json!({
        "id": anthropic_id(resp.get("id").and_then(Value::as_str)),
        "type": "message",
        "role": "assistant",
        "model": client_model,
        "content": content,
        "stop_reason": stop_reason_from_finish(finish, !calls.is_empty()),
        "stop_sequence": null,
        "usage": anthropic_usage_value(&usage),
    }))
}

/// An Anthropic `message` as an OpenAI `chat.completion`. Text blocks are
/// joined into `content` (null when there is none but tool calls);
/// `tool_use` blocks become `tool_calls`; thinking and server-side blocks
/// are left out.
pub fn anthropic_response_to_openai_chat(
    resp: &Value,
    client_model: &str,
) -> Result<Value, TranslateError> {
    let blocks = resp
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("the upstream response has no content", None))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => {
                text.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default())
            }
            Some("tool_use") => {
                let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(json!({
                    "id": b.get("id").and_then(Value::as_str).unwrap_or_default(),
                    "type": "function",
                    "function": {
                        "name": b.get("name").and_then(Value::as_str).unwrap_or_default(),
                        "arguments": input.to_string(),
                    },
                }));
            }
            _ => {}
        }
    }
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { Value::String(text) },
        "refusal": null,
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let usage = anthropic_usage_tokens(resp.get("usage").unwrap_or(&Value::Null));
    Ok(json!({
        "id": openai_id(resp.get("id").and_then(Value::as_str)),
        "object": "chat.completion",
        "created": unix_now(),
        "model": client_model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_from_stop_reason(resp.get("stop_reason").and_then(Value::as_str)),
        }],
        "usage": openai_usage_value(&usage),
    }))
}

/// The upstream's error message, or its body, or the status's reason.
fn error_message(parsed: Option<&Value>, body: &[u8], status: u16) -> String {
    if let Some(m) = parsed
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("message"))
        .and_then(Value::as_str)
    {
        return m.to_owned();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if !text.is_empty() {
        return text.chars().take(1000).collect();
    }
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error");
    format!("upstream error {status} {reason}")
}

/// Anthropic's error `type` for a status, among the ones its SDK knows.
pub(crate) fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

/// An OpenAI-format upstream error body (any bytes) in Anthropic's shape,
/// `{"type": "error", "error": {"type", "message"}}`, typed by `status`
/// (which the caller keeps).
pub fn openai_error_to_anthropic(body: &[u8], status: u16) -> Value {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    json!({
        "type": "error",
        "error": {
            "type": anthropic_error_type(status),
            "message": error_message(parsed.as_ref(), body, status),
        },
    })
}

/// An Anthropic-format upstream error body (any bytes) in OpenAI's shape,
/// `{"error": {"message", "type", "param", "code"}}`, typed by the
/// Anthropic error type when there is one, else by `status`.
pub fn anthropic_error_to_openai(body: &[u8], status: u16) -> Value {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let kind = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .unwrap_or_else(|| anthropic_error_type(status));
    let (ty, code): (&str, Option<&str>) = match kind {
        "authentication_error" => ("invalid_request_error", Some("invalid_api_key")),
        "permission_error" => ("permission_error", None),
        "not_found_error" => ("invalid_request_error", Some("not_found")),
        "rate_limit_error" => ("requests", Some("rate_limit_exceeded")),
        "billing_error" => ("insufficient_quota", Some("insufficient_quota")),
        "request_too_large" => ("invalid_request_error", Some("request_too_large")),
        "overloaded_error" => ("api_error", Some("overloaded")),
        "timeout_error" => ("api_error", Some("timeout")),
        "api_error" => ("api_error", None),
        _ => ("invalid_request_error", None),
    };
    json!({
        "error": {
            "message": error_message(parsed.as_ref(), body, status),
            "type": ty,
            "param": null,
            "code": code,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_usage_in_token_kinds() {
        let t = anthropic_usage_tokens(&json!({
            "input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 3, "output_tokens": 7,
            "server_tool_use": {"web_search_requests": 1}
        }));
        assert_eq!(
            t,
            TokenCounts {
                input_tokens: 10,
                output_tokens: 7,
                cache_read_tokens: 5,
                cache_write_tokens: 3,
                reasoning_tokens: 0
            }
        );
        let t = anthropic_usage_tokens(&json!({"output_tokens": 2, "input_tokens": null}));
        assert_eq!((t.input_tokens, t.output_tokens), (0, 2));
        assert_eq!(anthropic_usage_tokens(&Value::Null), TokenCounts::default());
    }

    #[test]
    fn openai_text_response_to_anthropic() {
        let resp = json!({
            "id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "gpt-served",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "mock reply ", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                      "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 1}}
        });
        let out = openai_chat_response_to_anthropic(&resp, "mock-gpt").unwrap();
        assert_eq!(
            out,
            json!({
                "id": "msg_abc", "type": "message", "role": "assistant", "model": "mock-gpt",
                "content": [{"type": "text", "text": "mock reply "}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4, "output_tokens": 5}
            })
        );
        // The translated usage reads back as the same token kinds.
        let back = anthropic_usage_tokens(&out["usage"]);
        let orig = serde_json::from_value::<OpenAiUsage>(resp["usage"].clone())
            .unwrap()
            .tokens();
        assert_eq!(
            (
                back.input_tokens,
                back.cache_read_tokens,
                back.output_tokens
            ),
            (
                orig.input_tokens,
                orig.cache_read_tokens,
                orig.output_tokens
            )
        );
    }

    #[test]
    fn openai_tool_response_to_anthropic() {
        let resp = json!({
            "id": "chatcmpl-t", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": ""}}
                ]}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        });
        let out = openai_chat_response_to_anthropic(&resp, "m").unwrap();
        assert_eq!(
            out["content"],
            json!([
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "noop", "input": {}}
            ])
        );
        assert_eq!(out["stop_reason"], "tool_use");
        assert_eq!(out["usage"]["input_tokens"], 3);

        let mut bad = resp.clone();
        bad["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = json!("{not json");
        assert!(openai_chat_response_to_anthropic(&bad, "m").is_err());
        assert!(openai_chat_response_to_anthropic(&json!({"choices": []}), "m").is_err());
        assert!(openai_chat_response_to_anthropic(&json!("x"), "m").is_err());
    }

    #[test]
    fn openai_edge_responses_to_anthropic() {
        let resp = json!({"choices": [{"finish_reason": "content_filter", "message": {"content": null, "refusal": "I can't."}}]});
        let out = openai_chat_response_to_anthropic(&resp, "m").unwrap();
        assert_eq!(
            out["content"],
            json!([{"type": "text", "text": "I can't."}])
        );
        assert_eq!(out["stop_reason"], "refusal");
        assert_eq!(out["usage"]["output_tokens"], 0, "no usage: zeros");
        assert!(out["id"].as_str().unwrap().starts_with("msg_"));
        let resp = json!({"choices": [{"finish_reason": "length", "message": {"content": ""}}]});
        let out = openai_chat_response_to_anthropic(&resp, "m").unwrap();
        assert_eq!(out["content"], json!([]));
        assert_eq!(out["stop_reason"], "max_tokens");
    }

    #[test]
    fn anthropic_response_to_openai() {
        let resp = json!({
            "id": "msg_01abc", "type": "message", "role": "assistant", "model": "claude-served",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me check. "},
                {"type": "text", "text": "One moment."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 5, "output_tokens": 7}
        });
        let out = anthropic_response_to_openai_chat(&resp, "mock-claude").unwrap();
        assert_eq!(out["id"], "chatcmpl-01abc");
        assert_eq!(out["object"], "chat.completion");
        assert_eq!(out["model"], "mock-claude");
        assert!(out["created"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(
            out["choices"],
            json!([{"index": 0, "logprobs": null, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Let me check. One moment.", "refusal": null,
                "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]
            }}])
        );
        assert_eq!(
            out["usage"],
            json!({"prompt_tokens": 17, "completion_tokens": 7, "total_tokens": 24, "prompt_tokens_details": {"cached_tokens": 5}})
        );
        let only_tool = json!({"content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "stop_reason": "tool_use"});
        let out = anthropic_response_to_openai_chat(&only_tool, "m").unwrap();
        assert_eq!(out["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(out["usage"]["total_tokens"], 0);
        let empty = json!({"content": [], "stop_reason": "max_tokens"});
        let out = anthropic_response_to_openai_chat(&empty, "m").unwrap();
        assert_eq!(out["choices"][0]["message"]["content"], "");
        assert_eq!(out["choices"][0]["finish_reason"], "length");
        assert!(anthropic_response_to_openai_chat(&json!({"type": "error"}), "m").is_err());
    }

    #[test]
    fn errors_are_reshaped() {
        let body = br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        assert_eq!(
            openai_error_to_anthropic(body, 429),
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}})
        );
        for (status, ty) in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (422, "invalid_request_error"),
            (500, "api_error"),
            (503, "overloaded_error"),
            (529, "overloaded_error"),
        ] {
            assert_eq!(
                openai_error_to_anthropic(b"{}", status)["error"]["type"],
                ty,
                "{status}"
            );
        }
        assert_eq!(
            openai_error_to_anthropic(b"  bad gateway  ", 502)["error"]["message"],
            "bad gateway"
        );
        assert_eq!(
            openai_error_to_anthropic(b"", 503)["error"]["message"],
            "upstream error 503 Service Unavailable"
        );

        let body =
            br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(
            anthropic_error_to_openai(body, 529),
            json!({"error": {"message": "Overloaded", "type": "api_error", "param": null, "code": "overloaded"}})
        );
        let body = br#"{"type":"error","error":{"type":"not_found_error","message":"model: x"}}"#;
        assert_eq!(
            anthropic_error_to_openai(body, 404)["error"]["code"],
            "not_found"
        );
        assert_eq!(
            anthropic_error_to_openai(b"oops", 401)["error"]["code"],
            "invalid_api_key"
        );
        assert_eq!(
            anthropic_error_to_openai(b"oops", 429)["error"]["type"],
            "requests"
        );
        assert_eq!(
            anthropic_error_to_openai(b"oops", 400)["error"]["message"],
            "oops"
        );
    }
}
