//! Passing OpenAI's Responses API through to an upstream that serves it:
//! usage in the Responses format, and a stream relay that forwards every
//! event untouched and reads usage from `response.completed`.

use bytes::BytesMut;
use serde_json::Value;
use tollgate_schemas::events::TokenCounts;

use crate::sse::SseEvent;
use crate::translate::StreamTranslator;

/// A Responses `usage` object in Tollgate's token kinds: input excludes
/// cached tokens, output includes reasoning.
pub fn usage_tokens(u: &Value) -> TokenCounts {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let cached = n(u.pointer("/input_tokens_details/cached_tokens"));
    TokenCounts {
        input_tokens: n(u.get("input_tokens")).saturating_sub(cached),
        output_tokens: n(u.get("output_tokens")),
        cache_read_tokens: cached,
        cache_write_tokens: 0,
        reasoning_tokens: n(u.pointer("/output_tokens_details/reasoning_tokens")),
    }
}

#[derive(Debug, Default)]
pub struct ResponsesPassthrough {
    usage: Option<TokenCounts>,
    text: String,
    model: Option<String>,
}

impl StreamTranslator for ResponsesPassthrough {
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
            match v.get("type").and_then(Value::as_str) {
                Some("response.output_text.delta" | "response.function_call_arguments.delta") => {
                    self.text
                        .push_str(v.get("delta").and_then(Value::as_str).unwrap_or_default());
                }
                Some("response.completed" | "response.incomplete" | "response.failed") => {
                    if let Some(r) = v.get("response") {
                        if let Some(u) = r.get("usage").filter(|u| !u.is_null()) {
                            self.usage = Some(usage_tokens(u));
                        }
                        self.model = r.get("model").and_then(Value::as_str).map(str::to_owned);
                    }
                }
                _ => {}
            }
        }
        if let Some(name) = &ev.event {
            out.extend_from_slice(b"event: ");
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(ev.data.as_bytes());
        out.extend_from_slice(b"\n\n");
    }

    fn finish(&mut self, _: &mut BytesMut) {}

    fn usage(&self) -> Option<TokenCounts> {
        self.usage
    }

    fn text(&self) -> &str {
        &self.text
    }

    fn served_model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn saw_content(&self) -> bool {
        !self.text.is_empty()
    }
}

/// Two translators in series: what the first emits is framed again and fed
/// to the second (Anthropic → chat → Responses). Usage, text and model are
/// the first's: it is the one that read the upstream.
pub struct Chain {
    first: Box<dyn StreamTranslator>,
    second: Box<dyn StreamTranslator>,
    framer: crate::sse::SseFramer,
    events: Vec<SseEvent>,
}

impl Chain {
    pub fn new(first: Box<dyn StreamTranslator>, second: Box<dyn StreamTranslator>) -> Self {
        Self {
            first,
            second,
            framer: crate::sse::SseFramer::default(),
            events: Vec::new(),
        }
    }

    fn pump(&mut self, middle: &[u8], out: &mut BytesMut) {
        self.framer.push(middle, &mut self.events);
        for e in self.events.drain(..) {
            self.second.on_event(&e, out);
        }
    }
}

impl StreamTranslator for Chain {
    fn on_event(&mut self, ev: &SseEvent, out: &mut BytesMut) {
        let mut middle = BytesMut::new();
        self.first.on_event(ev, &mut middle);
        self.pump(&middle, out);
    }

    fn finish(&mut self, out: &mut BytesMut) {
        let mut middle = BytesMut::new();
        self.first.finish(&mut middle);
        self.pump(&middle, out);
        self.second.finish(out);
    }

    fn usage(&self) -> Option<TokenCounts> {
        self.first.usage()
    }

    fn text(&self) -> &str {
        self.first.text()
    }

    fn served_model(&self) -> Option<&str> {
        self.first.served_model()
    }

    fn saw_content(&self) -> bool {
        self.first.saw_content()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_tokens_are_not_input() {
        let t = usage_tokens(&serde_json::json!({
            "input_tokens": 10, "input_tokens_details": {"cached_tokens": 4},
            "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 2}, "total_tokens": 17
        }));
        assert_eq!(
            (
                t.input_tokens,
                t.cache_read_tokens,
                t.output_tokens,
                t.reasoning_tokens
            ),
            (6, 4, 7, 2)
        );
    }
}
