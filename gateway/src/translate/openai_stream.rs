//! Streams an OpenAI chat client reads: translated from an Anthropic
//! upstream, or relayed from an OpenAI one ([`OpenAiRelay`], whose logic
//! lives in [`crate::sse`]).
//!
//! The translated stream is what OpenAI sends: a first chunk with
//! `delta: {role: "assistant", content: ""}`, content deltas, tool-call
//! deltas (`index`, `id`, `type`, `function.name` and empty `arguments`
//! first, then `arguments` pieces), a finish chunk with an empty delta and
//! the `finish_reason`, then — only when the client asked for
//! `stream_options.include_usage` — a chunk with `choices: []` and the
//! usage, and `data: [DONE]`. With `include_usage` every other chunk carries
//! `"usage": null`, as OpenAI's do; without it no chunk mentions usage.
//! Chat SSE has no `event:` lines.

use bytes::BytesMut;
use tollgate_schemas::events::TokenCounts;

use super::wire::{
    AnthropicEvent, OutChoice, OutChunk, OutChunkDelta, OutFunction, OutOpenAiError,
    OutOpenAiErrorBody, OutOpenAiUsage, OutToolCall, UsageTracker,
};
use super::{StreamTranslator, finish_from_stop_reason, openai_id, unix_now, write_sse_json};
use crate::sse::{OpenAiRelay, SseEvent};

impl StreamTranslator for OpenAiRelay {
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        OpenAiRelay::on_event(self, ev, out);
    }

    fn finish(&mut self, _out: &mut BytesMut) {}

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

/// What a content block of the upstream message became.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    /// The OpenAI `tool_calls` index.
    Tool(usize),
    /// Thinking and anything else the client is not shown.
    Hidden,
}

/// Anthropic upstream → OpenAI chat client.
#[derive(Debug)]
pub struct AnthropicToOpenAiStream {
    client_model: String,
    include_usage: bool,
    created: u64,
    id: String,
    started: bool,
    /// Anthropic block index → what it became.
    blocks: Vec<(u64, Block)>,
    tool_count: usize,
    finish_sent: bool,
    done: bool,
    usage: UsageTracker,
    model: Option<String>,
    text: String,
    saw_content: bool,
}

impl AnthropicToOpenAiStream {
    pub fn new(client_model: &str, include_usage: bool) -> Self {
        Self {
            client_model: client_model.to_owned(),
            include_usage,
            created: unix_now(),
            id: String::new(),
            started: false,
            blocks: Vec::new(),
            tool_count: 0,
            finish_sent: false,
            done: false,
            usage: UsageTracker::default(),
            model: None,
            text: String::new(),
            saw_content: false,
        }
    }

    /// Fixes the chunks' `created` (the one clock reading), for tests.
    pub fn with_created(mut self, created: u64) -> Self {
        self.created = created;
        self
    }

    fn chunk(&self, out: &mut BytesMut, delta: OutChunkDelta<'_>, finish_reason: Option<&str>) {
        let choice = [OutChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason,
        }];
        let chunk = OutChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.client_model,
            choices: &choice,
            usage: self.include_usage.then_some(None),
        };
        write_sse_json(out, None, &chunk);
    }

    fn ensure_started(&mut self, upstream_id: Option<&str>, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        self.id = openai_id(upstream_id);
        let delta = OutChunkDelta {
            role: Some("assistant"),
            content: Some(""),
            tool_calls: None,
        };
        self.chunk(out, delta, None);
    }

    fn push_text(&mut self, t: &str) {
        if !t.is_empty() {
            self.saw_content = true;
            self.text.push_str(t);
        }
    }

    fn content(&mut self, t: &str, out: &mut BytesMut) {
        if t.is_empty() {
            return;
        }
        self.push_text(t);
        self.chunk(
            out,
            OutChunkDelta {
                content: Some(t),
                ..OutChunkDelta::default()
            },
            None,
        );
    }

    fn tool_delta(&self, out: &mut BytesMut, call: OutToolCall<'_>) {
        self.chunk(
            out,
            OutChunkDelta {
                tool_calls: Some([call]),
                ..OutChunkDelta::default()
            },
            None,
        );
    }

    /// The finish chunk, then (include_usage) the usage chunk.
    fn send_finish(&mut self, stop_reason: Option<&str>, out: &mut BytesMut) {
        if self.finish_sent {
            return;
        }
        self.finish_sent = true;
        self.chunk(
            out,
            OutChunkDelta::default(),
            Some(finish_from_stop_reason(stop_reason)),
        );
        let usage = self.usage.complete().filter(|_| self.include_usage);
        if let Some(usage) = usage {
            let chunk = OutChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.client_model,
                choices: &[],
                usage: Some(Some(OutOpenAiUsage::from_counts(&usage))),
            };
            write_sse_json(out, None, &chunk);
        }
    }

    fn send_done(&mut self, out: &mut BytesMut) {
        if self.done {
            return;
        }
        self.send_finish(None, out);
        self.done = true;
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    fn on_parsed(&mut self, ev: &AnthropicEvent<'_>, out: &mut BytesMut) {
        match ev.kind.as_ref() {
            "message_start" => {
                let m = ev.message.as_ref();
                if let Some(u) = m.and_then(|m| m.usage.as_ref()) {
                    self.usage.on_start(u);
                }
                if self.model.is_none() {
                    self.model = m.and_then(|m| m.model.as_deref()).map(str::to_owned);
                }
                self.ensure_started(m.and_then(|m| m.id.as_deref()), out);
            }
            "content_block_start" => {
                self.ensure_started(None, out);
                let (Some(index), Some(block)) = (ev.index, &ev.content_block) else {
                    return;
                };
                let kind = match block.kind.as_ref() {
                    "text" => {
                        self.content(block.text.as_deref().unwrap_or_default(), out);
                        Block::Text
                    }
                    "tool_use" => {
                        let k = self.tool_count;
                        self.tool_count += 1;
                        let name = block.name.as_deref().unwrap_or_default();
                        self.push_text(name);
                        self.saw_content = true;
                        let call = OutToolCall {
                            index: k,
                            id: Some(block.id.as_deref().unwrap_or_default()),
                            kind: Some("function"),
                            function: OutFunction {
                                name: Some(name),
                                arguments: "",
                            },
                        };
                        self.tool_delta(out, call);
                        Block::Tool(k)
                    }
                    _ => Block::Hidden,
                };
                self.blocks.push((index, kind));
            }
            "content_block_delta" => {
                self.ensure_started(None, out);
                let Some(d) = &ev.delta else { return };
                let block = ev
                    .index
                    .and_then(|i| self.blocks.iter().find(|(b, _)| *b == i))
                    .map(|(_, k)| *k);
                match (d.kind.as_deref(), block) {
                    (Some("text_delta"), _) => {
                        self.content(d.text.as_deref().unwrap_or_default(), out)
                    }
                    (Some("input_json_delta"), Some(Block::Tool(k))) => {
                        let args = d.partial_json.as_deref().unwrap_or_default();
                        if !args.is_empty() {
                            self.push_text(args);
                            let call = OutToolCall {
                                index: k,
                                id: None,
                                kind: None,
                                function: OutFunction {
                                    name: None,
                                    arguments: args,
                                },
                            };
                            self.tool_delta(out, call);
                        }
                    }
                    (Some("thinking_delta"), _) => {
                        self.push_text(d.thinking.as_deref().unwrap_or_default())
                    }
                    // signature_delta, citations_delta, deltas of unknown blocks.
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(u) = &ev.usage {
                    self.usage.on_delta(u);
                }
                self.ensure_started(None, out);
                let stop = ev.delta.as_ref().and_then(|d| d.stop_reason.as_deref());
                self.send_finish(stop, out);
            }
            "message_stop" => {
                self.usage.on_stop();
                self.ensure_started(None, out);
                self.send_done(out);
            }
            "error" => {
                let e = ev.error.as_ref();
                let kind = e.and_then(|e| e.kind.as_deref()).unwrap_or("api_error");
                let (kind, code) = match kind {
                    "overloaded_error" => ("api_error", Some("overloaded")),
                    "rate_limit_error" => ("requests", Some("rate_limit_exceeded")),
                    "invalid_request_error" => ("invalid_request_error", None),
                    _ => ("api_error", None),
                };
                let message = e
                    .and_then(|e| e.message.as_deref())
                    .unwrap_or("the upstream failed mid-stream");
                let body = OutOpenAiErrorBody {
                    message,
                    kind,
                    param: None,
                    code,
                };
                write_sse_json(out, None, &OutOpenAiError { error: body });
                // OpenAI ends a failed stream with the error: no [DONE].
                self.done = true;
            }
            // ping, and event types newer than this code.
            _ => {}
        }
    }
}

impl StreamTranslator for AnthropicToOpenAiStream {
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if self.done {
            return;
        }
        if let Ok(parsed) = serde_json::from_str::<AnthropicEvent<'_>>(&ev.data) {
            self.on_parsed(&parsed, out);
        }
    }

    fn finish(&mut self, out: &mut BytesMut) {
        if self.started {
            self.send_done(out);
        }
    }

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

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::translate::fixtures::{self, AnthropicSpec, chunks_of, feed, run};

    fn translator(include_usage: bool) -> AnthropicToOpenAiStream {
        AnthropicToOpenAiStream::new("mock-claude", include_usage).with_created(1_700_000_000)
    }

    #[test]
    fn text_stream_with_include_usage() {
        let upstream = fixtures::anthropic_stream(&AnthropicSpec::text(&["Hello", " world"]));
        let (out, t) = run(translator(true), &[upstream.as_bytes()]);
        let text = out.clone();
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert!(!text.contains("event:"));
        let chunks = chunks_of(&out);
        assert_eq!(chunks.len(), 5, "{text}");
        for c in &chunks {
            assert_eq!(c["id"], "chatcmpl-01abc");
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["created"], 1_700_000_000);
            assert_eq!(c["model"], "mock-claude");
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(
            chunks[1]["choices"][0]["delta"],
            json!({"content": "Hello"})
        );
        assert_eq!(
            chunks[3]["choices"][0],
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"})
        );
        for c in &chunks[..4] {
            assert_eq!(c["usage"], Value::Null);
            assert!(c.as_object().unwrap().contains_key("usage"));
        }
        assert_eq!(chunks[4]["choices"], json!([]));
        assert_eq!(
            chunks[4]["usage"],
            json!({"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21, "prompt_tokens_details": {"cached_tokens": 4}})
        );
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
    }

    #[test]
    fn text_stream_without_include_usage_never_mentions_usage() {
        let upstream = fixtures::anthropic_stream(&AnthropicSpec::text(&["Hello"]));
        let (out, t) = run(translator(false), &[upstream.as_bytes()]);
        assert!(!out.contains("usage"), "{out}");
        assert_eq!(chunks_of(&out).len(), 3);
        assert!(t.usage().is_some(), "the gateway still saw it");
    }

    #[test]
    fn tool_stream_as_openai_tool_calls() {
        let mut spec = AnthropicSpec::text(&["Let me check."]);
        spec.thinking = Some("thinking about it");
        spec.tools = vec![
            fixtures::ToolSpec {
                id: "toolu_a",
                name: "get_weather",
                args: &["{\"city\": ", "\"Paris\"}"],
            },
            fixtures::ToolSpec {
                id: "toolu_b",
                name: "noop",
                args: &[],
            },
        ];
        spec.stop_reason = "tool_use";
        let upstream = fixtures::anthropic_stream(&spec);
        let (out, t) = run(translator(true), &[upstream.as_bytes()]);
        let chunks = chunks_of(&out);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["delta"])
            .collect();
        assert!(deltas.contains(&&json!({"tool_calls": [{"index": 0, "id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})));
        assert!(deltas.contains(
            &&json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]})
        ));
        assert!(deltas.contains(&&json!({"tool_calls": [{"index": 1, "id": "toolu_b", "type": "function", "function": {"name": "noop", "arguments": ""}}]})));
        let acc = fixtures::openai_accumulate(&out);
        assert_eq!(acc["message"]["content"], "Let me check.");
        assert_eq!(
            acc["message"]["tool_calls"],
            json!([
                {"id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "toolu_b", "type": "function", "function": {"name": "noop", "arguments": ""}}
            ])
        );
        assert_eq!(acc["finish_reason"], "tool_calls");
        assert!(
            t.text().contains("thinking about it"),
            "reasoning counts for estimates"
        );
        assert!(!out.contains("thinking about it"), "but is not shown");
    }

    #[test]
    fn finish_owes_the_end_once() {
        let upstream = fixtures::anthropic_stream(&AnthropicSpec::text(&["a"]));
        let cut = &upstream[..upstream.find("event: message_stop").unwrap()];
        let mut t = translator(true);
        let (mut out, _) = feed(&mut t, &[cut.as_bytes()]);
        assert!(!String::from_utf8_lossy(&out).contains("[DONE]"));
        assert!(t.usage().is_some(), "message_delta had the final counts");
        t.finish(&mut out);
        t.finish(&mut out);
        assert_eq!(String::from_utf8_lossy(&out).matches("[DONE]").count(), 1);
        assert_eq!(
            String::from_utf8_lossy(&out)
                .matches("\"finish_reason\":\"stop\"")
                .count(),
            1
        );

        // Cut before message_delta: finish writes a finish chunk but no usage
        // chunk (message_start's output count is only a placeholder).
        let cut = &upstream[..upstream.find("event: message_delta").unwrap()];
        let mut t = translator(true);
        let (mut out, _) = feed(&mut t, &[cut.as_bytes()]);
        assert_eq!(t.usage(), None);
        t.finish(&mut out);
        let chunks = chunks_of(&out);
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
        let mut t = translator(true);
        let mut out = BytesMut::new();
        t.finish(&mut out);
        assert!(out.is_empty(), "nothing started, nothing owed");
    }

    #[test]
    fn stop_reasons_and_errors() {
        let mut spec = AnthropicSpec::text(&["a"]);
        spec.stop_reason = "max_tokens";
        let (out, _) = run(
            translator(false),
            &[fixtures::anthropic_stream(&spec).as_bytes()],
        );
        assert_eq!(fixtures::openai_accumulate(&out)["finish_reason"], "length");

        let upstream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"c\"}}\n\n\
                        event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";
        let mut t = translator(true);
        let (mut out, _) = feed(&mut t, &[upstream.as_bytes()]);
        t.finish(&mut out);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.ends_with("data: {\"error\":{\"message\":\"Overloaded\",\"type\":\"api_error\",\"param\":null,\"code\":\"overloaded\"}}\n\n"), "{text}");
        assert!(!text.contains("[DONE]"));
    }

    #[test]
    fn openai_relay_through_the_trait() {
        let upstream = fixtures::openai_stream(&fixtures::OpenAiSpec::text(&["x"]));
        let mut relay: Box<dyn StreamTranslator> = Box::new(OpenAiRelay::new(false));
        let (mut out, _) = feed(relay.as_mut(), &[upstream.as_bytes()]);
        relay.finish(&mut out);
        assert!(String::from_utf8_lossy(&out).ends_with("data: [DONE]\n\n"));
        assert_eq!(relay.usage().unwrap().input_tokens, 8);
        assert_eq!(relay.text(), "x");
        assert_eq!(relay.served_model(), Some("gpt-served"));
        assert!(relay.saw_content());
    }
}
