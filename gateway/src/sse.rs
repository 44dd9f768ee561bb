//! Server-sent events: an incremental framer, and the OpenAI stream relay.
//!
//! The framer turns arbitrary byte chunks into complete events, so what the
//! relay emits depends only on the byte sequence, never on where the network
//! split it (a property test checks this). Each complete upstream event is
//! forwarded as soon as it is complete: nothing waits for the whole response.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tollgate_schemas::events::TokenCounts;

/// One complete SSE event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Feeds bytes, yields complete events. Handles `\n`, `\r\n` and `\r`
/// line ends, multi-line `data:`, comments and fields it does not know.
///
/// Cost is linear in the bytes pushed, however the network splits them: a
/// line that arrives in many chunks is scanned once (`scanned` remembers how
/// far the buffer is known to hold no line end), not once per chunk.
#[derive(Debug, Default)]
pub struct SseFramer {
    buf: BytesMut,
    /// `buf[..scanned]` holds no line end (nor a lone trailing `\r`).
    scanned: usize,
    current: SseEvent,
    has_data: bool,
}

impl SseFramer {
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        self.buf.extend_from_slice(chunk);
        loop {
            let Some(rel) = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
            else {
                self.scanned = self.buf.len();
                return;
            };
            let pos = self.scanned + rel;
            // A lone '\r' at the very end may be half of "\r\n": wait for more.
            if self.buf[pos] == b'\r' && pos + 1 == self.buf.len() {
                self.scanned = pos;
                return;
            }
            let skip = if self.buf[pos] == b'\r' && self.buf.get(pos + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            let line = self.buf.split_to(pos + skip);
            self.scanned = 0;
            self.line(&line[..pos], out);
        }
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        if line.is_empty() {
            if self.has_data || self.current.event.is_some() {
                out.push(std::mem::take(&mut self.current));
                self.has_data = false;
            }
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(&value);
                self.has_data = true;
            }
            b"event" => self.current.event = Some(value.into_owned()),
            _ => {}
        }
    }
}

/// OpenAI's usage block.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct OpenAiUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    pub completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct PromptDetails {
    #[serde(default)]
    pub cached_tokens: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct CompletionDetails {
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
}

impl OpenAiUsage {
    /// ARCHITECTURE.md's token kinds: input excludes cache reads.
    pub fn tokens(&self) -> TokenCounts {
        let cached = self
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        TokenCounts {
            input_tokens: self.prompt_tokens.saturating_sub(cached),
            output_tokens: self.completion_tokens,
            cache_read_tokens: cached,
            cache_write_tokens: 0,
            reasoning_tokens: self
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

/// A JSON string that borrows from the input unless it holds escapes
/// (serde's own `Cow` support does not borrow inside an `Option`).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

// The chunk as read for metering: its strings borrow from the event's data
// unless they hold escapes, so a chunk costs no allocation for its text.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
    #[serde(default, borrow)]
    model: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    /// Legacy completions stream text here.
    #[serde(default, borrow)]
    text: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Text<'a>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Text<'a>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Text<'a>>,
    #[serde(default, borrow)]
    arguments: Option<Text<'a>>,
}

/// The state of one relayed OpenAI stream (chat or legacy completions).
#[derive(Debug, Default)]
pub struct OpenAiRelay {
    /// Did the client ask for `stream_options.include_usage`?
    pub client_wants_usage: bool,
    pub usage: Option<OpenAiUsage>,
    /// Generated text so far, for the tokenizer when usage never comes.
    pub text: String,
    pub saw_content: bool,
    pub done: bool,
    pub model: Option<String>,
}

impl OpenAiRelay {
    pub fn new(client_wants_usage: bool) -> Self {
        Self {
            client_wants_usage,
            ..Default::default()
        }
    }

    /// Handles one upstream event; appends what the client gets to `out`.
    pub fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if ev.data == "[DONE]" {
            self.done = true;
            out.extend_from_slice(b"data: [DONE]\n\n");
            return;
        }
        let mut forward = true;
        let mut strip_null_usage = false;
        if let Ok(chunk) = serde_json::from_str::<Chunk>(&ev.data) {
            if self.model.is_none() {
                self.model = chunk.model.map(|m| m.0.into_owned());
            }
            for c in &chunk.choices {
                if let Some(t) = &c.text {
                    self.push_text(&t.0);
                }
                if let Some(d) = &c.delta {
                    for t in [&d.content, &d.reasoning_content].into_iter().flatten() {
                        self.push_text(&t.0);
                    }
                    for tc in d.tool_calls.iter().flatten() {
                        if let Some(f) = &tc.function {
                            for t in [&f.name, &f.arguments].into_iter().flatten() {
                                self.push_text(&t.0);
                            }
                        }
                    }
                }
            }
            if let Some(u) = chunk.usage {
                self.usage = Some(u);
                // The usage-only chunk exists because we asked for it.
                if !self.client_wants_usage && chunk.choices.is_empty() {
                    forward = false;
                }
            } else if !self.client_wants_usage {
                strip_null_usage = true;
            }
        }
        if !forward {
            return;
        }
        out.extend_from_slice(b"data: ");
        if strip_null_usage && ev.data.contains("\"usage\":null") {
            out.extend_from_slice(strip_usage_null(&ev.data).as_bytes());
        } else {
            out.extend_from_slice(ev.data.as_bytes());
        }
        out.extend_from_slice(b"\n\n");
    }

    fn push_text(&mut self, t: &str) {
        if !t.is_empty() {
            self.saw_content = true;
            self.text.push_str(t);
        }
    }
}

/// Removes the `"usage":null` member OpenAI adds to every chunk when usage
/// was requested, so a client that did not ask sees what OpenAI sends it.
fn strip_usage_null(data: &str) -> String {
    data.replacen(",\"usage\":null", "", 1)
        .replacen("\"usage\":null,", "", 1)
}

/// Frames and relays a whole byte sequence (tests and benchmarks).
pub fn relay_all(chunks: &[&[u8]], client_wants_usage: bool) -> (Bytes, OpenAiRelay) {
    let mut framer = SseFramer::default();
    let mut relay = OpenAiRelay::new(client_wants_usage);
    let mut out = BytesMut::new();
    let mut events = Vec::new();
    for c in chunks {
        framer.push(c, &mut events);
        for e in events.drain(..) {
            relay.on_event(&e, &mut out);
        }
    }
    (out.freeze(), relay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn upstream_stream() -> String {
        let mut s = String::new();
        s.push_str(": keep-alive\n\n");
        s.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n");
        for w in ["Hello", " wor", "ld ✓"] {
            s.push_str(&format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}},\"finish_reason\":null}}],\"usage\":null}}\r\n\r\n"));
        }
        s.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n");
        s.push_str("data: [DONE]\n\n");
        s
    }

    #[test]
    fn usage_is_extracted_and_kept_when_asked() {
        let s = upstream_stream();
        let (out, relay) = relay_all(&[s.as_bytes()], true);
        let t = relay.usage.unwrap().tokens();
        assert_eq!(
            (
                t.input_tokens,
                t.cache_read_tokens,
                t.output_tokens,
                t.reasoning_tokens
            ),
            (5, 4, 3, 1)
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("\"choices\":[],\"usage\":{"));
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(relay.text, "Hello world ✓");
    }

    #[test]
    fn usage_chunk_and_nulls_are_stripped_when_not_asked() {
        let s = upstream_stream();
        let (out, relay) = relay_all(&[s.as_bytes()], false);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(!text.contains("usage"), "{text}");
        assert!(relay.usage.is_some(), "the gateway still saw the usage");
        assert_eq!(text.matches("data: ").count(), 5);
        for line in text.lines().filter(|l| l.starts_with("data: {")) {
            serde_json::from_str::<serde_json::Value>(&line[6..]).unwrap();
        }
    }

    proptest! {
        /// Arbitrary chunk boundaries give identical output and usage.
        #[test]
        fn chunk_boundaries_do_not_matter(cuts in proptest::collection::vec(0usize..2000, 0..40), wants in any::<bool>()) {
            let s = upstream_stream();
            let bytes = s.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for c in cuts { chunks.push(&bytes[prev..c]); prev = c; }
            chunks.push(&bytes[prev..]);
            let (whole, r1) = relay_all(&[bytes], wants);
            let (split, r2) = relay_all(&chunks, wants);
            prop_assert_eq!(whole, split);
            prop_assert_eq!(r1.usage, r2.usage);
            prop_assert_eq!(r1.text, r2.text);
        }
    }
}
