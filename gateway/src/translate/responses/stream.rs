//! The chat-completions stream as a Responses event stream.

use std::borrow::Cow;

use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tollgate_schemas::events::TokenCounts;

use super::response::{
    Echo, call_item, id_suffix, item_status, message_item, output_text_part, response_object,
    status_of,
};
use crate::sse::{OpenAiUsage, SseEvent};
use crate::translate::wire::{ErrorBody, OpenAiChoice, OpenAiToolCallDelta};
use crate::translate::{StreamTranslator, unix_now, write_sse_json};

/// A chat chunk, with `created` (which [`crate::translate::wire::OpenAiChunk`] skips).
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
