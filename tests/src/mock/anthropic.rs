//! Anthropic Messages wire format, plain and streamed.

use super::openai::Reply;
use super::sse::Script;
use super::wire::{push_anthropic_usage, push_json_str, push_random_id, push_words};

/// Appends `"<prefix>01<random>"`, Anthropic's id style.
fn push_id(out: &mut Vec<u8>, prefix: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(prefix);
    out.extend_from_slice(b"01");
    push_random_id(out, 22);
    out.push(b'"');
}

fn stop_reason(r: &Reply<'_>) -> &'static [u8] {
    if r.tool.is_some() {
        b"\"tool_use\""
    } else {
        b"\"end_turn\""
    }
}

/// `POST /v1/messages`, not streamed.
pub(super) fn message_json(r: &Reply<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(400 + r.model.len() + r.words as usize * 8);
    out.extend_from_slice(b"{\"id\":");
    push_id(&mut out, b"msg_");
    out.extend_from_slice(b",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
    push_json_str(&mut out, r.model);
    match r.tool {
        None => {
            out.extend_from_slice(b",\"content\":[{\"type\":\"text\",\"text\":\"");
            push_words(&mut out, r.words);
            out.extend_from_slice(b"\"}]");
        }
        Some(name) => {
            out.extend_from_slice(b",\"content\":[{\"type\":\"tool_use\",\"id\":");
            push_id(&mut out, b"toolu_");
            out.extend_from_slice(b",\"name\":");
            push_json_str(&mut out, name);
            out.extend_from_slice(b",\"input\":{\"text\":\"");
            push_words(&mut out, r.words);
            out.extend_from_slice(b"\"}}]");
        }
    }
    out.extend_from_slice(b",\"stop_reason\":");
    out.extend_from_slice(stop_reason(r));
    out.extend_from_slice(b",\"stop_sequence\":null,\"usage\":");
    push_anthropic_usage(&mut out, &r.usage, r.usage.output + r.usage.reasoning);
    out.push(b'}');
    out
}

const DELTA_PRE: &[u8] =
    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":";

/// `POST /v1/messages` with `"stream": true`. With `usage` false (the
/// `x-mock-no-usage` control) `message_start` and `message_delta` carry no
/// `usage`.
pub(super) fn message_stream(r: &Reply<'_>, usage: bool) -> Script {
    let mut s = Script {
        words: r.words,
        ..Script::default()
    };

    let buf = s.head.buf();
    buf.extend_from_slice(
        b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":",
    );
    push_id(buf, b"msg_");
    buf.extend_from_slice(b",\"type\":\"message\",\"role\":\"assistant\",\"model\":");
    push_json_str(buf, r.model);
    buf.extend_from_slice(b",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null");
    if usage {
        buf.extend_from_slice(b",\"usage\":");
        push_anthropic_usage(buf, &r.usage, 1);
    }
    buf.extend_from_slice(b"}}\n\n");
    s.head.end();

    let buf = s.head.buf();
    buf.extend_from_slice(
        b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":",
    );
    match r.tool {
        None => buf.extend_from_slice(b"{\"type\":\"text\",\"text\":\"\"}}\n\n"),
        Some(name) => {
            buf.extend_from_slice(b"{\"type\":\"tool_use\",\"id\":");
            push_id(buf, b"toolu_");
            buf.extend_from_slice(b",\"name\":");
            push_json_str(buf, name);
            buf.extend_from_slice(b",\"input\":{}}}\n\n");
        }
    }
    s.head.end();

    s.head
        .buf()
        .extend_from_slice(b"event: ping\ndata: {\"type\": \"ping\"}\n\n");
    s.head.end();

    s.word_pre.extend_from_slice(DELTA_PRE);
    match r.tool {
        None => s
            .word_pre
            .extend_from_slice(b"{\"type\":\"text_delta\",\"text\":\""),
        Some(_) => {
            let buf = s.head.buf();
            buf.extend_from_slice(DELTA_PRE);
            buf.extend_from_slice(
                b"{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"text\\\":\\\"\"}}\n\n",
            );
            s.head.end();
            s.word_pre
                .extend_from_slice(b"{\"type\":\"input_json_delta\",\"partial_json\":\"");
            let buf = s.tail.buf();
            buf.extend_from_slice(DELTA_PRE);
            buf.extend_from_slice(
                b"{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"}\"}}\n\n",
            );
            s.tail.end();
        }
    }
    s.word_post.extend_from_slice(b"\"}}\n\n");

    s.tail.buf().extend_from_slice(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    );
    s.tail.end();

    let buf = s.tail.buf();
    buf.extend_from_slice(
        b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":",
    );
    buf.extend_from_slice(stop_reason(r));
    buf.extend_from_slice(b",\"stop_sequence\":null}");
    if usage {
        buf.extend_from_slice(b",\"usage\":{\"output_tokens\":");
        super::wire::push_u64(buf, r.usage.output + r.usage.reasoning);
        buf.push(b'}');
    }
    buf.extend_from_slice(b"}\n\n");
    s.tail.end();

    s.tail
        .buf()
        .extend_from_slice(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.tail.end();
    s
}
