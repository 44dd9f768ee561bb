//! Streams an Anthropic client reads: relayed from an Anthropic upstream, or
//! translated from an OpenAI chat stream.
//!
//! Anthropic's SDK rebuilds the message from the events, so the translated
//! stream follows Anthropic's sequence exactly: `message_start`,
//! `content_block_start`, `ping` (once, after the first block starts),
//! `content_block_delta`s, `content_block_stop`, further blocks, then
//! `message_delta` with the stop reason and usage, and `message_stop`.
//! Block indexes count from 0 in the order the blocks start, which is how
//! the SDK finds them (`content[index]`).
//!
//! Usage: an OpenAI upstream (always asked for `include_usage`) reports it
//! in a last chunk with no choices, after the finish chunk. `message_start`
//! cannot wait for it without holding back the whole answer, so it carries
//! zeros, and `message_delta` carries the real counts, input and cache
//! fields included; the SDK's `get_final_message()` takes every usage field
//! of `message_delta` over `message_start`'s, so the client ends up with the
//! upstream's counts. `message_delta` is therefore written when the usage
//! chunk arrives after the finish chunk (or at `[DONE]` if it never does).

use bytes::BytesMut;
use tollgate_schemas::events::TokenCounts;

use super::wire::{
    AnthropicEvent, EmptyObject, OpenAiChunk, OutBlock, OutDelta, OutError, OutEvent, OutMessage,
    OutStop, OutUsage, UsageTracker,
};
use super::{StreamTranslator, anthropic_id, stop_reason_from_finish, write_sse, write_sse_json};
use crate::sse::{OpenAiUsage, SseEvent};

fn push_text(text: &mut String, saw: &mut bool, t: &str) {
    if !t.is_empty() {
        *saw = true;
        text.push_str(t);
    }
}

/// Anthropic upstream → Anthropic client: every event forwarded as it came
/// (`event: X` / `data: Y`), while reading the usage, the served model and
/// the generated text.
#[derive(Debug, Default)]
pub struct AnthropicPassthrough {
    usage: UsageTracker,
    model: Option<String>,
    text: String,
    saw_content: bool,
}

impl AnthropicPassthrough {
    pub fn new() -> Self {
        Self::default()
    }

    fn observe(&mut self, ev: &AnthropicEvent<'_>) {
        match ev.kind.as_ref() {
            "message_start" => {
                if let Some(m) = &ev.message {
                    if self.model.is_none() {
                        self.model = m.model.as_deref().map(str::to_owned);
                    }
                    if let Some(u) = &m.usage {
                        self.usage.on_start(u);
                    }
                }
            }
            "content_block_delta" => {
                if let Some(d) = &ev.delta {
                    for t in [&d.text, &d.partial_json, &d.thinking]
                        .into_iter()
                        .flatten()
                    {
                        push_text(&mut self.text, &mut self.saw_content, t);
                    }
                }
            }
            "message_delta" => {
                if let Some(u) = &ev.usage {
                    self.usage.on_delta(u);
                }
            }
            "message_stop" => self.usage.on_stop(),
            _ => {}
        }
    }
}

impl StreamTranslator for AnthropicPassthrough {
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if let Ok(parsed) = serde_json::from_str::<AnthropicEvent<'_>>(&ev.data) {
            self.observe(&parsed);
        }
        write_sse(out, ev.event.as_deref(), &ev.data);
    }

    fn finish(&mut self, _out: &mut BytesMut) {}

    fn usage(&self) -> Option<TokenCounts> {
        self.usage.complete()
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

/// The content block currently open in the translated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text(usize),
    Tool(usize),
}

/// OpenAI chat-stream upstream → Anthropic client.
///
/// Text deltas (`content`, or `refusal`) go to a text block, opened at the
/// first non-empty text; each OpenAI tool call (by its `index`) becomes a
/// `tool_use` block whose `arguments` pieces are `input_json_delta`s.
/// Reasoning deltas (`reasoning_content`) count for the text estimate but
/// are not shown (an Anthropic client would need signed thinking blocks).
/// Arguments for a tool call whose block was already closed (interleaved
/// parallel calls, which OpenAI does not send) still go to that call's
/// block index, which is where the SDK accumulates them.
#[derive(Debug)]
pub struct OpenAiToAnthropicStream {
    client_model: String,
    id: String,
    started: bool,
    pinged: bool,
    open: Option<Open>,
    next_index: usize,
    /// OpenAI tool-call index → content block index.
    tools: Vec<(u64, usize)>,
    finish: Option<String>,
    usage: Option<OpenAiUsage>,
    closed: bool,
    model: Option<String>,
    text: String,
    saw_content: bool,
}

impl OpenAiToAnthropicStream {
    pub fn new(client_model: &str) -> Self {
        Self {
            client_model: client_model.to_owned(),
            id: String::new(),
            started: false,
            pinged: false,
            open: None,
            next_index: 0,
            tools: Vec::new(),
            finish: None,
            usage: None,
            closed: false,
            model: None,
            text: String::new(),
            saw_content: false,
        }
    }

    fn emit(out: &mut BytesMut, ev: &OutEvent<'_>) {
        write_sse_json(out, Some(ev.name()), ev);
    }

    fn ensure_started(&mut self, upstream_id: Option<&str>, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = anthropic_id(upstream_id);
        let zero = TokenCounts::default();
        Self::emit(
            out,
            &OutEvent::MessageStart {
                message: OutMessage {
                    id: &self.id,
                    kind: "message",
                    role: "assistant",
                    model: &self.client_model,
                    content: [],
                    stop_reason: None,
                    stop_sequence: None,
                    usage: OutUsage::full(&zero),
                },
            },
        );
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        if let Some(Open::Text(index) | Open::Tool(index)) = self.open.take() {
            Self::emit(out, &OutEvent::ContentBlockStop { index });
        }
    }

    fn start_block(&mut self, block: OutBlock<'_>, out: &mut BytesMut) -> usize {
        self.close_block(out);
        let index = self.next_index;
        self.next_index += 1;
        Self::emit(
            out,
            &OutEvent::ContentBlockStart {
                index,
                content_block: block,
            },
        );
        if !self.pinged {
            self.pinged = true;
            Self::emit(out, &OutEvent::Ping);
        }
        index
    }

    fn on_text(&mut self, t: &str, out: &mut BytesMut) {
        if t.is_empty() {
            return;
        }
        push_text(&mut self.text, &mut self.saw_content, t);
        let index = match self.open {
            Some(Open::Text(i)) => i,
            _ => {
                let i = self.start_block(OutBlock::Text { text: "" }, out);
                self.open = Some(Open::Text(i));
                i
            }
        };
        Self::emit(
            out,
            &OutEvent::ContentBlockDelta {
                index,
                delta: OutDelta::TextDelta { text: t },
            },
        );
    }

    fn on_tool_call(&mut self, tc: &super::wire::OpenAiToolCallDelta<'_>, out: &mut BytesMut) {
        let key = tc.index.unwrap_or(0);
        let name = tc.function.as_ref().and_then(|f| f.name.as_deref());
        let args = tc
            .function
            .as_ref()
            .and_then(|f| f.arguments.as_deref())
            .unwrap_or_default();
        let index = match self.tools.iter().find(|(k, _)| *k == key) {
            Some(&(_, index)) => index,
            None => {
                // Deterministic when the upstream gives no id.
                let id = match tc.id.as_deref() {
                    Some(id) if !id.is_empty() => id.to_owned(),
                    _ => format!("toolu_{}_{key}", self.id.trim_start_matches("msg_")),
                };
                let name = name.unwrap_or_default();
                push_text(&mut self.text, &mut self.saw_content, name);
                self.saw_content = true;
                let index = self.start_block(
                    OutBlock::ToolUse {
                        id: &id,
                        name,
                        input: EmptyObject {},
                    },
                    out,
                );
                self.open = Some(Open::Tool(index));
                self.tools.push((key, index));
                index
            }
        };
        if !args.is_empty() {
            push_text(&mut self.text, &mut self.saw_content, args);
            Self::emit(
                out,
                &OutEvent::ContentBlockDelta {
                    index,
                    delta: OutDelta::InputJsonDelta { partial_json: args },
                },
            );
        }
    }

    /// `message_delta` and `message_stop`, once.
    fn close_message(&mut self, out: &mut BytesMut) {
        if self.closed {
            return;
        }
        self.ensure_started(None, out);
        self.close_block(out);
        if !self.pinged {
            self.pinged = true;
            Self::emit(out, &OutEvent::Ping);
        }
        self.closed = true;
        let stop_reason = stop_reason_from_finish(self.finish.as_deref(), !self.tools.is_empty());
        let usage = match &self.usage {
            Some(u) => OutUsage::full(&u.tokens()),
            None => OutUsage::default(),
        };
        Self::emit(
            out,
            &OutEvent::MessageDelta {
                delta: OutStop {
                    stop_reason,
                    stop_sequence: None,
                },
                usage,
            },
        );
        Self::emit(out, &OutEvent::MessageStop);
    }

    fn on_chunk(&mut self, chunk: &OpenAiChunk<'_>, out: &mut BytesMut) {
        if let Some(e) = &chunk.error {
            // A mid-stream error ends the message; Anthropic says so with an
            // `error` event and nothing after it.
            self.ensure_started(chunk.id.as_deref(), out);
            self.closed = true;
            let message = e
                .message
                .as_deref()
                .unwrap_or("the upstream failed mid-stream");
            Self::emit(
                out,
                &OutEvent::Error {
                    error: OutError {
                        kind: "api_error",
                        message,
                    },
                },
            );
            return;
        }
        if self.model.is_none() {
            self.model = chunk.model.as_deref().map(str::to_owned);
        }
        self.ensure_started(chunk.id.as_deref(), out);
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            if let Some(d) = &choice.delta {
                if let Some(r) = &d.reasoning_content {
                    push_text(&mut self.text, &mut self.saw_content, r);
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
                self.close_block(out);
            }
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u);
        }
        if self.finish.is_some() && self.usage.is_some() {
            self.close_message(out);
        }
    }
}

impl StreamTranslator for OpenAiToAnthropicStream {
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if ev.data == "[DONE]" {
            self.close_message(out);
            return;
        }
        if self.closed {
            // Only a late usage chunk could matter, and it is too late to show.
            if let Ok(chunk) = serde_json::from_str::<OpenAiChunk<'_>>(&ev.data)
                && let Some(u) = chunk.usage
            {
                self.usage = Some(u);
            }
            return;
        }
        if let Ok(chunk) = serde_json::from_str::<OpenAiChunk<'_>>(&ev.data) {
            self.on_chunk(&chunk, out);
        }
    }

    fn finish(&mut self, out: &mut BytesMut) {
        if self.started {
            self.close_message(out);
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
    use crate::translate::fixtures::{self, OpenAiSpec, ToolSpec, events_of, run};

    #[test]
    fn passthrough_is_byte_identical_and_reads_usage() {
        let upstream =
            fixtures::anthropic_stream(&fixtures::AnthropicSpec::text(&["Hello", " world"]));
        let (out, t) = run(AnthropicPassthrough::new(), &[upstream.as_bytes()]);
        assert_eq!(out, upstream);
        let u = t.usage().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cache_read_tokens,
                u.cache_write_tokens,
                u.output_tokens
            ),
            (9, 4, 2, 6)
        );
        assert_eq!(t.text(), "Hello world");
        assert_eq!(t.served_model(), Some("claude-served"));
        assert!(t.saw_content());
    }

    #[test]
    fn passthrough_takes_input_fields_from_message_delta() {
        let mut spec = fixtures::AnthropicSpec::text(&["x"]);
        spec.delta_full_usage = true;
        spec.usage.input_tokens = 40;
        let upstream = fixtures::anthropic_stream(&spec);
        // message_start said 9 input tokens; the final message_delta says 40.
        let upstream = upstream.replacen("\"input_tokens\":40", "\"input_tokens\":9", 1);
        let (_, t) = run(AnthropicPassthrough::new(), &[upstream.as_bytes()]);
        assert_eq!(t.usage().unwrap().input_tokens, 40);
    }

    #[test]
    fn passthrough_cut_or_without_usage_reports_none() {
        let upstream = fixtures::anthropic_stream(&fixtures::AnthropicSpec::text(&["a", "b"]));
        let cut = &upstream[..upstream.find("event: message_delta").unwrap()];
        let (out, t) = run(AnthropicPassthrough::new(), &[cut.as_bytes()]);
        assert_eq!(out, cut);
        assert_eq!(
            t.usage(),
            None,
            "message_start's output count is a placeholder"
        );
        assert_eq!(t.text(), "ab");
        let mut spec = fixtures::AnthropicSpec::text(&["a"]);
        spec.with_usage = false;
        let (_, t) = run(
            AnthropicPassthrough::new(),
            &[fixtures::anthropic_stream(&spec).as_bytes()],
        );
        assert_eq!(t.usage(), None);
    }

    #[test]
    fn openai_text_stream_to_anthropic_sequence() {
        let upstream = fixtures::openai_stream(&OpenAiSpec::text(&["mock ", "reply "]));
        let (out, t) = run(
            OpenAiToAnthropicStream::new("mock-gpt"),
            &[upstream.as_bytes()],
        );
        let events = events_of(&out);
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        for (name, data) in &events {
            assert_eq!(data["type"], name.as_str(), "event name equals data type");
        }
        assert_eq!(events[0].1["message"]["id"], "msg_abc123");
        assert_eq!(events[0].1["message"]["model"], "mock-gpt");
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 0);
        assert_eq!(
            events[1].1["content_block"],
            serde_json::json!({"type": "text", "text": ""})
        );
        assert_eq!(
            events[3].1["delta"],
            serde_json::json!({"type": "text_delta", "text": "mock "})
        );
        assert_eq!(
            events[6].1["delta"],
            serde_json::json!({"stop_reason": "end_turn", "stop_sequence": null})
        );
        assert_eq!(
            events[6].1["usage"],
            serde_json::json!({"input_tokens": 8, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4, "output_tokens": 3})
        );
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
        assert_eq!(t.text(), "mock reply ");
        assert_eq!(t.served_model(), Some("gpt-served"));
        // The SDK's view equals the upstream's counts.
        let msg = fixtures::sdk_final_message(&out);
        assert_eq!(msg["usage"], events[6].1["usage"]);
        assert_eq!(
            msg["content"],
            serde_json::json!([{"type": "text", "text": "mock reply "}])
        );
    }

    #[test]
    fn openai_tool_stream_to_anthropic() {
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
        let (out, _) = run(OpenAiToAnthropicStream::new("m"), &[upstream.as_bytes()]);
        let names: Vec<String> = events_of(&out).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let msg = fixtures::sdk_final_message(&out);
        assert_eq!(
            msg["content"],
            serde_json::json!([
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}
            ])
        );
        assert_eq!(msg["stop_reason"], "tool_use");
    }

    #[test]
    fn openai_stream_without_usage_closes_at_done() {
        let mut spec = OpenAiSpec::text(&["a"]);
        spec.include_usage = false;
        let upstream = fixtures::openai_stream(&spec);
        let (out, t) = run(OpenAiToAnthropicStream::new("m"), &[upstream.as_bytes()]);
        let events = events_of(&out);
        assert_eq!(events.last().unwrap().0, "message_stop");
        assert_eq!(
            events[events.len() - 2].1["usage"],
            serde_json::json!({"output_tokens": 0})
        );
        assert_eq!(t.usage(), None);
        assert_eq!(t.text(), "a");
    }

    #[test]
    fn openai_stream_finish_is_idempotent_and_owes_closing() {
        let upstream = fixtures::openai_stream(&OpenAiSpec::text(&["a"]));
        // Cut right after the finish chunk: no usage, no [DONE].
        let cut = &upstream[..upstream.find("\"choices\":[]").unwrap()];
        let cut = &cut[..cut.rfind("data: ").unwrap()];
        let mut t = OpenAiToAnthropicStream::new("m");
        let (mut out, _) = fixtures::feed(&mut t, &[cut.as_bytes()]);
        assert!(!String::from_utf8_lossy(&out).contains("message_stop"));
        t.finish(&mut out);
        t.finish(&mut out);
        let events = events_of(&out);
        assert_eq!(
            events.iter().filter(|(n, _)| n == "message_stop").count(),
            1
        );
        assert_eq!(
            events[events.len() - 2].1["delta"]["stop_reason"],
            "end_turn"
        );
        // Nothing at all from the upstream: nothing owed.
        let mut t = OpenAiToAnthropicStream::new("m");
        let mut out = BytesMut::new();
        t.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn openai_stream_length_refusal_and_error() {
        let mut spec = OpenAiSpec::text(&["a"]);
        spec.finish = "length";
        let (out, _) = run(
            OpenAiToAnthropicStream::new("m"),
            &[fixtures::openai_stream(&spec).as_bytes()],
        );
        assert_eq!(
            fixtures::sdk_final_message(&out)["stop_reason"],
            "max_tokens"
        );

        let upstream = "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n\
                        data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n";
        let (out, _) = run(OpenAiToAnthropicStream::new("m"), &[upstream.as_bytes()]);
        let events = events_of(&out);
        assert_eq!(events.last().unwrap().0, "error");
        assert_eq!(
            events.last().unwrap().1["error"],
            serde_json::json!({"type": "api_error", "message": "boom"})
        );
    }
}
