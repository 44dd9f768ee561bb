//! Test fixtures: upstream streams and plain bodies in the exact shapes the
//! mock upstream (and the real providers) send, and client-side
//! accumulators that rebuild a message the way the official SDKs do
//! (Anthropic's `get_final_message()`, OpenAI's chat stream state).

use bytes::BytesMut;
use serde_json::{Value, json};

use super::StreamTranslator;
use crate::sse::SseFramer;

/// One tool call: its id, name and argument pieces as streamed.
#[derive(Debug, Clone)]
pub struct ToolSpec<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub args: &'a [&'a str],
}

impl ToolSpec<'_> {
    /// The whole arguments as an object (`{}` when none were sent).
    pub fn input(&self) -> Value {
        let s: String = self.args.concat();
        if s.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&s).unwrap_or(Value::Null)
        }
    }
}

/// Anthropic usage counts of a fixture.
#[derive(Debug, Clone, Copy)]
pub struct AUsage {
    pub input_tokens: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub output_tokens: u64,
}

/// An Anthropic Messages stream.
#[derive(Debug, Clone)]
pub struct AnthropicSpec<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub thinking: Option<&'a str>,
    pub texts: Vec<&'a str>,
    pub tools: Vec<ToolSpec<'a>>,
    pub stop_reason: &'a str,
    pub usage: AUsage,
    /// `false`: the mock's `no-usage` (no usage in message_start or message_delta).
    pub with_usage: bool,
    /// Current Anthropic: message_delta's usage repeats the input and cache fields.
    pub delta_full_usage: bool,
}

impl<'a> AnthropicSpec<'a> {
    pub fn text(texts: &[&'a str]) -> Self {
        Self {
            id: "msg_01abc",
            model: "claude-served",
            thinking: None,
            texts: texts.to_vec(),
            tools: Vec::new(),
            stop_reason: "end_turn",
            usage: AUsage {
                input_tokens: 9,
                cache_read: 4,
                cache_write: 2,
                output_tokens: 6,
            },
            with_usage: true,
            delta_full_usage: false,
        }
    }
}

fn event(out: &mut String, name: &str, data: &Value) {
    out.push_str("event: ");
    out.push_str(name);
    out.push_str("\ndata: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
}

pub fn anthropic_stream(s: &AnthropicSpec<'_>) -> String {
    let mut out = String::new();
    let u = s.usage;
    let mut message = json!({
        "id": s.id, "type": "message", "role": "assistant", "model": s.model, "content": [],
        "stop_reason": null, "stop_sequence": null,
    });
    if s.with_usage {
        message["usage"] = json!({
            "input_tokens": u.input_tokens, "cache_creation_input_tokens": u.cache_write,
            "cache_read_input_tokens": u.cache_read, "output_tokens": 1,
        });
    }
    event(
        &mut out,
        "message_start",
        &json!({"type": "message_start", "message": message}),
    );
    let mut index = 0;
    let mut pinged = false;
    let mut start = |out: &mut String, index: usize, block: Value| {
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        if !pinged {
            pinged = true;
            // The mock writes ping with a space, as Anthropic does.
            out.push_str("event: ping\ndata: {\"type\": \"ping\"}\n\n");
        }
    };
    let delta = |out: &mut String, index: usize, d: Value| {
        event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": d}),
        );
    };
    let stop = |out: &mut String, index: usize| {
        event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    };
    if let Some(t) = s.thinking {
        start(
            &mut out,
            index,
            json!({"type": "thinking", "thinking": "", "signature": ""}),
        );
        delta(
            &mut out,
            index,
            json!({"type": "thinking_delta", "thinking": t}),
        );
        delta(
            &mut out,
            index,
            json!({"type": "signature_delta", "signature": "c2ln"}),
        );
        stop(&mut out, index);
        index += 1;
    }
    if !s.texts.is_empty() {
        start(&mut out, index, json!({"type": "text", "text": ""}));
        for t in &s.texts {
            delta(&mut out, index, json!({"type": "text_delta", "text": t}));
        }
        stop(&mut out, index);
        index += 1;
    }
    for tool in &s.tools {
        start(
            &mut out,
            index,
            json!({"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}),
        );
        delta(
            &mut out,
            index,
            json!({"type": "input_json_delta", "partial_json": ""}),
        );
        for a in tool.args {
            delta(
                &mut out,
                index,
                json!({"type": "input_json_delta", "partial_json": a}),
            );
        }
        stop(&mut out, index);
        index += 1;
    }
    let mut md = json!({"type": "message_delta", "delta": {"stop_reason": s.stop_reason, "stop_sequence": null}});
    if s.with_usage {
        md["usage"] = if s.delta_full_usage {
            json!({
                "input_tokens": u.input_tokens, "cache_creation_input_tokens": u.cache_write,
                "cache_read_input_tokens": u.cache_read, "output_tokens": u.output_tokens,
            })
        } else {
            json!({"output_tokens": u.output_tokens})
        };
    }
    event(&mut out, "message_delta", &md);
    event(&mut out, "message_stop", &json!({"type": "message_stop"}));
    out
}

/// The plain Anthropic response equivalent to a stream.
pub fn anthropic_plain(s: &AnthropicSpec<'_>) -> Value {
    let mut content = Vec::new();
    if let Some(t) = s.thinking {
        content.push(json!({"type": "thinking", "thinking": t, "signature": "c2ln"}));
    }
    if !s.texts.is_empty() {
        content.push(json!({"type": "text", "text": s.texts.concat()}));
    }
    for tool in &s.tools {
        content.push(
            json!({"type": "tool_use", "id": tool.id, "name": tool.name, "input": tool.input()}),
        );
    }
    let u = s.usage;
    json!({
        "id": s.id, "type": "message", "role": "assistant", "model": s.model, "content": content,
        "stop_reason": s.stop_reason, "stop_sequence": null,
        "usage": {"input_tokens": u.input_tokens, "cache_creation_input_tokens": u.cache_write,
                  "cache_read_input_tokens": u.cache_read, "output_tokens": u.output_tokens},
    })
}

/// OpenAI usage counts of a fixture.
#[derive(Debug, Clone, Copy)]
pub struct OUsage {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
    pub reasoning: u64,
}

/// An OpenAI chat stream.
#[derive(Debug, Clone)]
pub struct OpenAiSpec<'a> {
    pub id: &'a str,
    pub model: &'a str,
    pub texts: Vec<&'a str>,
    pub tools: Vec<ToolSpec<'a>>,
    pub finish: &'a str,
    /// The upstream sends `"usage": null` on every chunk and a usage chunk.
    pub include_usage: bool,
    pub usage: OUsage,
}

impl<'a> OpenAiSpec<'a> {
    pub fn text(texts: &[&'a str]) -> Self {
        Self {
            id: "chatcmpl-abc123",
            model: "gpt-served",
            texts: texts.to_vec(),
            tools: Vec::new(),
            finish: "stop",
            include_usage: true,
            usage: OUsage {
                prompt: 12,
                cached: 4,
                completion: 3,
                reasoning: 1,
            },
        }
    }

    fn usage_value(&self) -> Value {
        let u = self.usage;
        json!({
            "prompt_tokens": u.prompt, "completion_tokens": u.completion, "total_tokens": u.prompt + u.completion,
            "prompt_tokens_details": {"cached_tokens": u.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": u.reasoning, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        })
    }
}

pub fn openai_stream(s: &OpenAiSpec<'_>) -> String {
    let mut out = String::new();
    let chunk = |out: &mut String, choices: Value, usage: Option<Value>| {
        let mut c = json!({
            "id": s.id, "object": "chat.completion.chunk", "created": 1_700_000_000u64, "model": s.model,
            "system_fingerprint": "fp_mock", "choices": choices,
        });
        match usage {
            Some(u) => c["usage"] = u,
            None if s.include_usage => c["usage"] = Value::Null,
            None => {}
        }
        out.push_str("data: ");
        out.push_str(&c.to_string());
        out.push_str("\n\n");
    };
    let delta =
        |d: Value| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": null}]);
    let first_content = if s.texts.is_empty() && !s.tools.is_empty() {
        Value::Null
    } else {
        json!("")
    };
    chunk(
        &mut out,
        delta(json!({"role": "assistant", "content": first_content, "refusal": null})),
        None,
    );
    for t in &s.texts {
        chunk(&mut out, delta(json!({"content": t})), None);
    }
    for (k, tool) in s.tools.iter().enumerate() {
        chunk(
            &mut out,
            delta(
                json!({"tool_calls": [{"index": k, "id": tool.id, "type": "function", "function": {"name": tool.name, "arguments": ""}}]}),
            ),
            None,
        );
        for a in tool.args {
            chunk(
                &mut out,
                delta(json!({"tool_calls": [{"index": k, "function": {"arguments": a}}]})),
                None,
            );
        }
    }
    chunk(
        &mut out,
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": s.finish}]),
        None,
    );
    if s.include_usage {
        chunk(&mut out, json!([]), Some(s.usage_value()));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

/// The plain OpenAI response equivalent to a stream.
pub fn openai_plain(s: &OpenAiSpec<'_>) -> Value {
    let text: String = s.texts.concat();
    let mut message = json!({"role": "assistant", "content": text, "refusal": null});
    if !s.tools.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = s
            .tools
            .iter()
            .map(|t| json!({"id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.args.concat()}}))
            .collect();
    }
    let mut resp = json!({
        "id": s.id, "object": "chat.completion", "created": 1_700_000_000u64, "model": s.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": s.finish}],
    });
    if s.include_usage {
        resp["usage"] = s.usage_value();
    }
    resp
}

/// Frames `chunks` and drives `t` with the events; no `finish`.
pub fn feed<T: StreamTranslator + ?Sized>(t: &mut T, chunks: &[&[u8]]) -> (BytesMut, usize) {
    let mut framer = SseFramer::default();
    let mut out = BytesMut::new();
    let mut events = Vec::new();
    let mut n = 0;
    for c in chunks {
        framer.push(c, &mut events);
        for e in events.drain(..) {
            n += 1;
            t.on_event(&e, &mut out);
        }
    }
    (out, n)
}

/// Feeds everything, then `finish`; the output as text.
pub fn run<T: StreamTranslator>(mut t: T, chunks: &[&[u8]]) -> (String, T) {
    let (mut out, _) = feed(&mut t, chunks);
    t.finish(&mut out);
    (String::from_utf8(out.to_vec()).unwrap(), t)
}

/// `chunks` cut at `cuts` (positions, any order, clamped).
pub fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::with_capacity(cuts.len() + 1);
    let mut prev = 0;
    for c in cuts {
        chunks.push(&bytes[prev..c]);
        prev = c;
    }
    chunks.push(&bytes[prev..]);
    chunks
}

fn framed(out: &[u8]) -> Vec<crate::sse::SseEvent> {
    let mut events = Vec::new();
    SseFramer::default().push(out, &mut events);
    events
}

/// An Anthropic SSE body as `(event name, data JSON)`.
pub fn events_of(out: impl AsRef<[u8]>) -> Vec<(String, Value)> {
    framed(out.as_ref())
        .into_iter()
        .map(|e| {
            (
                e.event.unwrap_or_default(),
                serde_json::from_str(&e.data).unwrap(),
            )
        })
        .collect()
}

/// An OpenAI SSE body's chunks (not `[DONE]`); checks no `event:` lines.
pub fn chunks_of(out: impl AsRef<[u8]>) -> Vec<Value> {
    framed(out.as_ref())
        .into_iter()
        .inspect(|e| assert!(e.event.is_none()))
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect()
}

/// Rebuilds the message like the Anthropic SDK's `get_final_message()`,
/// checking the block indexes on the way.
pub fn sdk_final_message(out: impl AsRef<[u8]>) -> Value {
    let mut msg = Value::Null;
    let mut json_bufs: Vec<String> = Vec::new();
    for (name, data) in events_of(out) {
        assert_eq!(data["type"], name.as_str());
        match name.as_str() {
            "message_start" => msg = data["message"].clone(),
            "content_block_start" => {
                let content = msg["content"].as_array_mut().unwrap();
                assert_eq!(data["index"], content.len(), "blocks start in index order");
                content.push(data["content_block"].clone());
                json_bufs.push(String::new());
            }
            "content_block_delta" => {
                let i = data["index"].as_u64().unwrap() as usize;
                let block = &mut msg["content"][i];
                let d = &data["delta"];
                match d["type"].as_str().unwrap() {
                    "text_delta" => {
                        let t = format!(
                            "{}{}",
                            block["text"].as_str().unwrap(),
                            d["text"].as_str().unwrap()
                        );
                        block["text"] = Value::String(t);
                    }
                    "input_json_delta" => {
                        json_bufs[i].push_str(d["partial_json"].as_str().unwrap());
                        if let Ok(v) = serde_json::from_str::<Value>(&json_bufs[i]) {
                            block["input"] = v;
                        }
                    }
                    other => panic!("unexpected delta {other}"),
                }
            }
            "message_delta" => {
                msg["stop_reason"] = data["delta"]["stop_reason"].clone();
                msg["stop_sequence"] = data["delta"]["stop_sequence"].clone();
                let u = &data["usage"];
                msg["usage"]["output_tokens"] = u["output_tokens"].clone();
                for k in [
                    "input_tokens",
                    "cache_creation_input_tokens",
                    "cache_read_input_tokens",
                ] {
                    if !u[k].is_null() {
                        msg["usage"][k] = u[k].clone();
                    }
                }
            }
            "ping" | "content_block_stop" | "message_stop" => {}
            other => panic!("unexpected event {other}"),
        }
    }
    msg
}

/// Rebuilds the choice like the OpenAI SDK's chat stream state:
/// `{message: {role, content, tool_calls}, finish_reason, usage}`.
pub fn openai_accumulate(out: impl AsRef<[u8]>) -> Value {
    let mut content: Option<String> = None;
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = Value::Null;
    let mut usage = Value::Null;
    for c in chunks_of(out) {
        if !c["usage"].is_null() {
            usage = c["usage"].clone();
        }
        let Some(choice) = c["choices"].get(0) else {
            continue;
        };
        let d = &choice["delta"];
        if let Some(t) = d["content"].as_str() {
            content.get_or_insert_with(String::new).push_str(t);
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let k = tc["index"].as_u64().unwrap() as usize;
            if k == calls.len() {
                calls.push(json!({"id": tc["id"], "type": tc["type"], "function": {"name": tc["function"]["name"], "arguments": ""}}));
            }
            let args = format!(
                "{}{}",
                calls[k]["function"]["arguments"].as_str().unwrap(),
                tc["function"]["arguments"].as_str().unwrap_or_default()
            );
            calls[k]["function"]["arguments"] = Value::String(args);
        }
        if !choice["finish_reason"].is_null() {
            finish = choice["finish_reason"].clone();
        }
    }
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({"message": message, "finish_reason": finish, "usage": usage})
}
