//! Translation between the OpenAI chat-completions format and Anthropic's
//! Messages format: requests, plain responses, error bodies and streams.
//!
//! Everything here is pure: JSON in, JSON (or SSE bytes) out, no I/O, no
//! clock except for OpenAI's `created` field. The pipeline decides *whether*
//! to translate; this module decides *how*.
//!
//! # Invariants
//!
//! - **Usage is never translated for billing.** The gateway reads token counts
//!   from what the upstream reported, in the upstream's own format
//!   ([`anthropic_usage_tokens`], [`crate::sse::OpenAiUsage::tokens`]), before any
//!   translation. Translation only reshapes the counts for the client, with
//!   ARCHITECTURE.md's token kinds as the pivot: Anthropic's `input_tokens`
//!   excludes cache reads and writes, OpenAI's `prompt_tokens` includes them
//!   (`prompt_tokens = input + cache_read + cache_write`,
//!   `cached_tokens = cache_read`).
//! - **Streams depend only on the byte sequence.** Each [`StreamTranslator`]
//!   is driven with complete upstream events (from [`crate::sse::SseFramer`]),
//!   keeps no clock and derives its ids from the upstream's, so wherever the
//!   network split the upstream bytes the client gets the same bytes (a
//!   property test checks this for every translator).
//! - **Nothing waits for the whole response.** Each upstream event produces
//!   its translation at once. The one exception is forced by the formats: an
//!   OpenAI upstream reports usage after its finish chunk, and Anthropic's
//!   `message_delta` must carry it, so `message_delta`/`message_stop` are
//!   written when the usage chunk (or `[DONE]`) arrives.
//! - **Meaning is kept or refused.** A field with no counterpart that changes
//!   what the model is asked to do (`n > 1`, `response_format`, images in tool
//!   results, server tools, ...) is a [`TranslateError::Invalid`], which the
//!   client sees as a 400 in its own format. Fields that only tune sampling or
//!   bookkeeping (`seed`, `top_k`, `cache_control`, `presence_penalty`, ...)
//!   are dropped silently.
//!
//! # Layout
//!
//! - [`request`]: request bodies, both ways.
//! - [`response`]: plain responses, usage, error bodies.
//! - [`wire`]: the stream events of both formats, as read and as written.
//! - [`anthropic_stream`]: translators that write Anthropic SSE
//!   ([`AnthropicPassthrough`], [`OpenAiToAnthropicStream`]).
//! - [`openai_stream`]: translators that write OpenAI chat SSE
//!   ([`AnthropicToOpenAiStream`], and [`crate::sse::OpenAiRelay`]).

pub mod anthropic_stream;
pub mod openai_stream;
pub mod request;
pub mod response;
pub mod responses;
pub mod wire;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod proptests;

use bytes::BytesMut;
use tollgate_schemas::events::TokenCounts;

use crate::sse::SseEvent;

pub use anthropic_stream::{AnthropicPassthrough, OpenAiToAnthropicStream};
pub use openai_stream::AnthropicToOpenAiStream;
pub use request::{anthropic_request_to_openai_chat, openai_chat_request_to_anthropic};
pub use response::{
    anthropic_error_to_openai, anthropic_response_to_openai_chat, anthropic_usage_tokens,
    openai_chat_response_to_anthropic, openai_error_to_anthropic,
};
pub use responses::{
    ChatToResponsesStream, chat_response_to_responses, echo_request_fields,
    responses_request_to_chat,
};

/// A request that cannot be expressed in the other format without changing
/// its meaning, or that is malformed.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("{message}")]
    Invalid {
        message: String,
        /// The top-level request field at fault, for OpenAI's `error.param`.
        param: Option<&'static str>,
    },
}

pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> TranslateError {
    TranslateError::Invalid {
        message: message.into(),
        param,
    }
}

/// One relayed stream, whatever the formats. The caller drives it with
/// complete upstream SSE events.
pub trait StreamTranslator: Send {
    /// Handles one upstream event; appends what the client gets to `out`.
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut);
    /// The upstream ended cleanly: appends any closing events still owed
    /// (e.g. `message_stop`, `[DONE]`). Idempotent.
    fn finish(&mut self, out: &mut BytesMut);
    /// The upstream-reported usage, once complete (`None`: never reported, or
    /// the stream was cut before the final counts; the caller estimates).
    fn usage(&self) -> Option<TokenCounts>;
    /// Generated text (and tool arguments) so far, for tokenizer estimates.
    fn text(&self) -> &str;
    /// The model the upstream says served the request.
    fn served_model(&self) -> Option<&str>;
    /// Has any generated content (text, reasoning, tool call) arrived?
    fn saw_content(&self) -> bool;
}

/// Anthropic `stop_reason` for an OpenAI `finish_reason`. A `stop` after
/// tool calls is `tool_use` (some OpenAI-compatible servers say `stop`), so
/// clients that loop on `tool_use` still run the tools.
pub(crate) fn stop_reason_from_finish(finish: Option<&str>, had_tool_calls: bool) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ if had_tool_calls => "tool_use",
        _ => "end_turn",
    }
}

/// OpenAI `finish_reason` for an Anthropic `stop_reason`.
pub(crate) fn finish_from_stop_reason(stop: Option<&str>) -> &'static str {
    match stop {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") => "tool_calls",
        Some("refusal") => "content_filter",
        // end_turn, stop_sequence, pause_turn, and anything newer.
        _ => "stop",
    }
}

/// Anthropic message id (`msg_...`) from an OpenAI completion id: the same
/// suffix, so the two are easy to correlate in logs and the result is
/// deterministic. A fresh UUIDv7 (time-ordered, like every id we mint) when
/// the upstream gave none.
pub(crate) fn anthropic_id(openai_id: Option<&str>) -> String {
    let suffix = openai_id.map(|s| s.strip_prefix("chatcmpl-").unwrap_or(s));
    match suffix {
        Some(s) if !s.is_empty() => format!("msg_{s}"),
        _ => format!("msg_{}", uuid::Uuid::now_v7().simple()),
    }
}

/// OpenAI completion id (`chatcmpl-...`) from an Anthropic message id.
pub(crate) fn openai_id(anthropic_id: Option<&str>) -> String {
    let suffix = anthropic_id.map(|s| s.strip_prefix("msg_").unwrap_or(s));
    match suffix {
        Some(s) if !s.is_empty() => format!("chatcmpl-{s}"),
        _ => format!("chatcmpl-{}", uuid::Uuid::now_v7().simple()),
    }
}

/// Seconds since the Unix epoch, for OpenAI's `created`.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Appends one SSE event. `data` may hold newlines: each line becomes its
/// own `data:` line, so the client's framer rebuilds exactly `data`.
pub(crate) fn write_sse(out: &mut BytesMut, event: Option<&str>, data: &str) {
    if let Some(e) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(b"\n");
    }
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"\n");
}

/// Appends one SSE event whose data is `value` as JSON (never multi-line).
pub(crate) fn write_sse_json<T: serde::Serialize>(
    out: &mut BytesMut,
    event: Option<&str>,
    value: &T,
) {
    use bytes::BufMut;
    if let Some(e) = event {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"data: ");
    // Serializing our own event structs into memory cannot fail (string keys
    // only, no fallible Serialize impls, an infallible writer).
    let _ = serde_json::to_writer(out.writer(), value);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_the_upstream_suffix() {
        assert_eq!(anthropic_id(Some("chatcmpl-abc")), "msg_abc");
        assert_eq!(openai_id(Some("msg_01XYZ")), "chatcmpl-01XYZ");
        assert_eq!(anthropic_id(Some("weird")), "msg_weird");
        assert!(anthropic_id(None).starts_with("msg_"));
        assert!(openai_id(Some("")).starts_with("chatcmpl-"));
        assert!(openai_id(Some("")).len() > "chatcmpl-".len());
    }

    #[test]
    fn stop_reasons_map_both_ways() {
        assert_eq!(stop_reason_from_finish(Some("stop"), false), "end_turn");
        assert_eq!(stop_reason_from_finish(Some("stop"), true), "tool_use");
        assert_eq!(stop_reason_from_finish(Some("length"), true), "max_tokens");
        assert_eq!(
            stop_reason_from_finish(Some("tool_calls"), false),
            "tool_use"
        );
        assert_eq!(
            stop_reason_from_finish(Some("content_filter"), false),
            "refusal"
        );
        assert_eq!(stop_reason_from_finish(None, false), "end_turn");
        for (stop, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("pause_turn", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(finish_from_stop_reason(Some(stop)), finish);
        }
        assert_eq!(finish_from_stop_reason(None), "stop");
    }

    #[test]
    fn multi_line_data_stays_one_event() {
        let mut out = BytesMut::new();
        write_sse(&mut out, Some("x"), "a\nb");
        assert_eq!(&out[..], b"event: x\ndata: a\ndata: b\n\n");
        let mut events = Vec::new();
        crate::sse::SseFramer::default().push(&out, &mut events);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data, "a\nb");
    }
}
