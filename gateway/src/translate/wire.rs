//! The stream events of both formats: what the translators read from an
//! upstream (borrowing from the event's data where JSON escapes allow) and
//! what they write (fields in the providers' own order, `type` first).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use tollgate_schemas::events::TokenCounts;

use crate::sse::OpenAiUsage;

// ---------------------------------------------------------------------------
// Read: Anthropic stream events
// ---------------------------------------------------------------------------

/// Any Anthropic stream event; each member is present on the event types
/// that carry it.
#[derive(Debug, Deserialize)]
pub struct AnthropicEvent<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// `message_start`.
    #[serde(default, borrow)]
    pub message: Option<StartMessage<'a>>,
    /// `content_block_*`.
    #[serde(default)]
    pub index: Option<u64>,
    /// `content_block_start`.
    #[serde(default, borrow)]
    pub content_block: Option<ContentBlock<'a>>,
    /// `content_block_delta` and `message_delta`.
    #[serde(default, borrow)]
    pub delta: Option<EventDelta<'a>>,
    /// `message_delta`.
    #[serde(default)]
    pub usage: Option<AnthropicUsage>,
    /// `error`.
    #[serde(default, borrow)]
    pub error: Option<ErrorBody<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct StartMessage<'a> {
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub usage: Option<AnthropicUsage>,
}

#[derive(Debug, Deserialize)]
pub struct ContentBlock<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
}

/// A `content_block_delta`'s delta (`type` and its payload) or a
/// `message_delta`'s (`stop_reason`).
#[derive(Debug, Deserialize)]
pub struct EventDelta<'a> {
    #[serde(default, rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub partial_json: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub thinking: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub stop_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct ErrorBody<'a> {
    #[serde(default, rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
}

/// An Anthropic `usage` object; absent and null members are `None`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct AnthropicUsage {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
}

/// Anthropic usage as it accumulates over a stream: `message_start` gives
/// the input side and a placeholder output count, `message_delta` the final
/// output count (and, on current Anthropic, the input side again).
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageTracker {
    counts: TokenCounts,
    started: bool,
    final_seen: bool,
    stopped: bool,
}

impl UsageTracker {
    fn merge(&mut self, u: &AnthropicUsage) {
        let c = &mut self.counts;
        for (field, v) in [
            (&mut c.input_tokens, u.input_tokens),
            (&mut c.output_tokens, u.output_tokens),
            (&mut c.cache_read_tokens, u.cache_read_input_tokens),
            (&mut c.cache_write_tokens, u.cache_creation_input_tokens),
        ] {
            if let Some(v) = v {
                *field = v;
            }
        }
    }

    pub fn on_start(&mut self, u: &AnthropicUsage) {
        self.merge(u);
        self.started = true;
    }

    pub fn on_delta(&mut self, u: &AnthropicUsage) {
        self.merge(u);
        self.final_seen = true;
    }

    pub fn on_stop(&mut self) {
        self.stopped = true;
    }

    /// The final counts: after `message_delta`'s usage, or after a clean
    /// `message_stop` when only `message_start` had any. A stream cut before
    /// then has only `message_start`'s placeholder output count, so it gives
    /// `None` and the caller estimates.
    pub fn complete(&self) -> Option<TokenCounts> {
        (self.final_seen || (self.started && self.stopped)).then_some(self.counts)
    }
}

// ---------------------------------------------------------------------------
// Read: OpenAI chat chunks
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct OpenAiChunk<'a> {
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub choices: Vec<OpenAiChoice<'a>>,
    #[serde(default)]
    pub usage: Option<OpenAiUsage>,
    /// A mid-stream error (`data: {"error": {...}}`).
    #[serde(default, borrow)]
    pub error: Option<ErrorBody<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct OpenAiChoice<'a> {
    #[serde(default)]
    pub index: u64,
    #[serde(default, borrow)]
    pub delta: Option<OpenAiDelta<'a>>,
    #[serde(default, borrow)]
    pub finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct OpenAiDelta<'a> {
    #[serde(default, borrow)]
    pub content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub tool_calls: Option<Vec<OpenAiToolCallDelta<'a>>>,
}

#[derive(Debug, Deserialize)]
pub struct OpenAiToolCallDelta<'a> {
    #[serde(default)]
    pub index: Option<u64>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub function: Option<OpenAiFunctionDelta<'a>>,
}

#[derive(Debug, Deserialize)]
pub struct OpenAiFunctionDelta<'a> {
    #[serde(default, borrow)]
    pub name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub arguments: Option<Cow<'a, str>>,
}

// ---------------------------------------------------------------------------
// Write: Anthropic stream events
// ---------------------------------------------------------------------------

/// An Anthropic stream event as written; `type` comes first.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutEvent<'a> {
    MessageStart {
        message: OutMessage<'a>,
    },
    ContentBlockStart {
        index: usize,
        content_block: OutBlock<'a>,
    },
    Ping,
    ContentBlockDelta {
        index: usize,
        delta: OutDelta<'a>,
    },
    ContentBlockStop {
        index: usize,
    },
    MessageDelta {
        delta: OutStop<'a>,
        usage: OutUsage,
    },
    MessageStop,
    Error {
        error: OutError<'a>,
    },
}

impl OutEvent<'_> {
    /// The SSE `event:` name, equal to the `type`.
    pub fn name(&self) -> &'static str {
        match self {
            OutEvent::MessageStart { .. } => "message_start",
            OutEvent::ContentBlockStart { .. } => "content_block_start",
            OutEvent::Ping => "ping",
            OutEvent::ContentBlockDelta { .. } => "content_block_delta",
            OutEvent::ContentBlockStop { .. } => "content_block_stop",
            OutEvent::MessageDelta { .. } => "message_delta",
            OutEvent::MessageStop => "message_stop",
            OutEvent::Error { .. } => "error",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct OutMessage<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub role: &'static str,
    pub model: &'a str,
    pub content: [(); 0],
    pub stop_reason: Option<&'a str>,
    pub stop_sequence: Option<&'a str>,
    pub usage: OutUsage,
}

/// Anthropic usage as written. `None` members are left out (a
/// `message_delta` that knows only the output count).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct OutUsage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    pub output_tokens: u64,
}

impl OutUsage {
    pub fn full(t: &TokenCounts) -> Self {
        Self {
            input_tokens: Some(t.input_tokens),
            cache_creation_input_tokens: Some(t.cache_write_tokens),
            cache_read_input_tokens: Some(t.cache_read_tokens),
            output_tokens: t.output_tokens,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutBlock<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: EmptyObject,
    },
}

/// Serializes as `{}`.
#[derive(Debug, Serialize)]
pub struct EmptyObject {}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutDelta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Debug, Serialize)]
pub struct OutStop<'a> {
    pub stop_reason: &'a str,
    pub stop_sequence: Option<&'a str>,
}

#[derive(Debug, Serialize)]
pub struct OutError<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub message: &'a str,
}

// ---------------------------------------------------------------------------
// Write: OpenAI chat chunks
// ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
pub struct OutChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [OutChoice<'a>],
    /// Absent (`None`), `null` (`Some(None)`: include_usage, not the last
    /// chunk) or the usage (the last chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<OutOpenAiUsage>>,
}

#[derive(Debug, Serialize)]
pub struct OutChoice<'a> {
    pub index: u32,
    pub delta: OutChunkDelta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'a str>,
}

#[derive(Debug, Default, Serialize)]
pub struct OutChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<[OutToolCall<'a>; 1]>,
}

#[derive(Debug, Serialize)]
pub struct OutToolCall<'a> {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'a str>,
    pub function: OutFunction<'a>,
}

#[derive(Debug, Serialize)]
pub struct OutFunction<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub arguments: &'a str,
}

#[derive(Debug, Serialize)]
pub struct OutOpenAiUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub prompt_tokens_details: OutPromptDetails,
}

#[derive(Debug, Serialize)]
pub struct OutPromptDetails {
    pub cached_tokens: u64,
}

impl OutOpenAiUsage {
    /// `prompt_tokens` includes cache reads and writes; `cached_tokens` is
    /// the reads.
    pub fn from_counts(t: &TokenCounts) -> Self {
        let prompt = t.input_tokens + t.cache_read_tokens + t.cache_write_tokens;
        Self {
            prompt_tokens: prompt,
            completion_tokens: t.output_tokens,
            total_tokens: prompt + t.output_tokens,
            prompt_tokens_details: OutPromptDetails {
                cached_tokens: t.cache_read_tokens,
            },
        }
    }
}

/// OpenAI's mid-stream error chunk, `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct OutOpenAiError<'a> {
    pub error: OutOpenAiErrorBody<'a>,
}

#[derive(Debug, Serialize)]
pub struct OutOpenAiErrorBody<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<()>,
    pub code: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_events_put_type_first() {
        let ev = OutEvent::ContentBlockStart {
            index: 1,
            content_block: OutBlock::ToolUse {
                id: "t",
                name: "f",
                input: EmptyObject {},
            },
        };
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}"#
        );
        assert_eq!(
            serde_json::to_string(&OutEvent::Ping).unwrap(),
            r#"{"type":"ping"}"#
        );
        let start = OutEvent::MessageStart {
            message: OutMessage {
                id: "msg_1",
                kind: "message",
                role: "assistant",
                model: "m",
                content: [],
                stop_reason: None,
                stop_sequence: None,
                usage: OutUsage {
                    output_tokens: 0,
                    ..OutUsage::full(&TokenCounts::default())
                },
            },
        };
        assert_eq!(
            serde_json::to_string(&start).unwrap(),
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0}}}"#
        );
    }

    #[test]
    fn written_chunks_have_three_usage_states() {
        let choice = [OutChoice {
            index: 0,
            delta: OutChunkDelta::default(),
            logprobs: None,
            finish_reason: Some("stop"),
        }];
        let mut chunk = OutChunk {
            id: "c",
            object: "chat.completion.chunk",
            created: 1,
            model: "m",
            choices: &choice,
            usage: None,
        };
        assert_eq!(
            serde_json::to_string(&chunk).unwrap(),
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}"#
        );
        chunk.usage = Some(None);
        assert!(
            serde_json::to_string(&chunk)
                .unwrap()
                .ends_with(r#""usage":null}"#)
        );
    }

    #[test]
    fn usage_tracker_waits_for_final_counts() {
        let mut t = UsageTracker::default();
        assert!(t.complete().is_none());
        t.on_start(&AnthropicUsage {
            input_tokens: Some(9),
            output_tokens: Some(1),
            cache_read_input_tokens: Some(2),
            cache_creation_input_tokens: None,
        });
        assert!(
            t.complete().is_none(),
            "a placeholder output count is not final"
        );
        t.on_delta(&AnthropicUsage {
            output_tokens: Some(5),
            ..AnthropicUsage::default()
        });
        let c = t.complete().unwrap();
        assert_eq!(
            (c.input_tokens, c.cache_read_tokens, c.output_tokens),
            (9, 2, 5)
        );
        let mut t = UsageTracker::default();
        t.on_start(&AnthropicUsage {
            input_tokens: Some(3),
            output_tokens: Some(1),
            ..AnthropicUsage::default()
        });
        t.on_stop();
        assert_eq!(t.complete().unwrap().input_tokens, 3);
    }
}
