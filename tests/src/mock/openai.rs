//! OpenAI wire format: chat completions and legacy completions, plain and
//! streamed.

use super::sse::Script;
use super::wire::{
    Usage, push_json_str, push_openai_usage, push_random_id, push_u64, push_words, unix_now,
};

/// What to answer.
pub(super) struct Reply<'a> {
    pub model: &'a str,
    pub words: u64,
    /// Answer with a call of this tool instead of text.
    pub tool: Option<&'a str>,
    pub usage: Usage,
}

const FINGERPRINT: &[u8] = b"\"system_fingerprint\":\"fp_mock\"";

/// Appends `"id":"<prefix><random>"`.
fn push_id(out: &mut Vec<u8>, prefix: &[u8]) {
    out.extend_from_slice(b"\"id\":\"");
    out.extend_from_slice(prefix);
    push_random_id(out, 29);
    out.push(b'"');
}

/// Appends `"call_<random>"`.
fn push_call_id(out: &mut Vec<u8>) {
    out.extend_from_slice(b"\"call_");
    push_random_id(out, 24);
    out.push(b'"');
}

/// `POST /v1/chat/completions`, not streamed.
pub(super) fn chat_json(r: &Reply<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(640 + r.model.len() + r.words as usize * 8);
    out.push(b'{');
    push_id(&mut out, b"chatcmpl-");
    out.extend_from_slice(b",\"object\":\"chat.completion\",\"created\":");
    push_u64(&mut out, unix_now());
    out.extend_from_slice(b",\"model\":");
    push_json_str(&mut out, r.model);
    out.extend_from_slice(b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",");
    match r.tool {
        None => {
            out.extend_from_slice(b"\"content\":\"");
            push_words(&mut out, r.words);
            out.extend_from_slice(
                b"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":\"stop\"}]",
            );
        }
        Some(name) => {
            out.extend_from_slice(b"\"content\":null,\"tool_calls\":[{\"id\":");
            push_call_id(&mut out);
            out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
            push_json_str(&mut out, name);
            out.extend_from_slice(b",\"arguments\":\"{\\\"text\\\":\\\"");
            push_words(&mut out, r.words);
            out.extend_from_slice(
                b"\\\"}\"}}],\"refusal\":null},\"logprobs\":null,\"finish_reason\":\"tool_calls\"}]",
            );
        }
    }
    out.extend_from_slice(b",\"usage\":");
    push_openai_usage(&mut out, &r.usage, true);
    out.push(b',');
    out.extend_from_slice(FINGERPRINT);
    out.push(b'}');
    out
}

/// `POST /v1/chat/completions` with `"stream": true`.
pub(super) fn chat_stream(r: &Reply<'_>, include_usage: bool) -> Script {
    let mut pre = Vec::with_capacity(160 + r.model.len());
    pre.extend_from_slice(b"data: {");
    push_id(&mut pre, b"chatcmpl-");
    pre.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
    push_u64(&mut pre, unix_now());
    pre.extend_from_slice(b",\"model\":");
    push_json_str(&mut pre, r.model);
    pre.push(b',');
    pre.extend_from_slice(FINGERPRINT);
    pre.extend_from_slice(b",\"choices\":[");
    let post: &[u8] = if include_usage {
        b"],\"usage\":null}\n\n"
    } else {
        b"]}\n\n"
    };
    const NOT_DONE: &[u8] = b",\"logprobs\":null,\"finish_reason\":null}";

    let mut s = Script {
        words: r.words,
        ..Script::default()
    };
    let event = |buf: &mut Vec<u8>, choice: &[&[u8]]| {
        buf.extend_from_slice(&pre);
        for part in choice {
            buf.extend_from_slice(part);
        }
        buf.extend_from_slice(post);
    };

    // Head: the role chunk (with the tool call's header), and for a tool the
    // opening of its arguments.
    match r.tool {
        None => {
            event(
                s.head.buf(),
                &[
                    b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}",
                    NOT_DONE,
                ],
            );
            s.head.end();
        }
        Some(name) => {
            let mut header = Vec::with_capacity(160 + name.len());
            header.extend_from_slice(
                b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"index\":0,\"id\":",
            );
            push_call_id(&mut header);
            header.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
            push_json_str(&mut header, name);
            header.extend_from_slice(b",\"arguments\":\"\"}}],\"refusal\":null}");
            event(s.head.buf(), &[&header, NOT_DONE]);
            s.head.end();
            event(
                s.head.buf(),
                &[
                    b"{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"text\\\":\\\"\"}}]}",
                    NOT_DONE,
                ],
            );
            s.head.end();
        }
    }

    // Token events.
    s.word_pre.extend_from_slice(&pre);
    match r.tool {
        None => {
            s.word_pre
                .extend_from_slice(b"{\"index\":0,\"delta\":{\"content\":\"");
            s.word_post.extend_from_slice(b"\"}");
        }
        Some(_) => {
            s.word_pre.extend_from_slice(
                b"{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"",
            );
            s.word_post.extend_from_slice(b"\"}}]}");
        }
    }
    s.word_post.extend_from_slice(NOT_DONE);
    s.word_post.extend_from_slice(post);

    // Tail: close the arguments, the finish chunk, the usage chunk, [DONE].
    let finish: &[u8] = match r.tool {
        None => b"{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}",
        Some(_) => {
            event(
                s.tail.buf(),
                &[
                    b"{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"}\"}}]}",
                    NOT_DONE,
                ],
            );
            s.tail.end();
            b"{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"tool_calls\"}"
        }
    };
    event(s.tail.buf(), &[finish]);
    s.tail.end();
    if include_usage {
        let buf = s.tail.buf();
        buf.extend_from_slice(&pre);
        buf.extend_from_slice(b"],\"usage\":");
        push_openai_usage(buf, &r.usage, true);
        buf.extend_from_slice(b"}\n\n");
        s.tail.end();
    }
    s.tail.buf().extend_from_slice(b"data: [DONE]\n\n");
    s.tail.end();
    s
}

/// Legacy usage objects carry the details only when there is something in them.
fn legacy_detailed(u: &Usage) -> bool {
    u.cached > 0 || u.reasoning > 0
}

/// `POST /v1/completions`, not streamed.
pub(super) fn completion_json(r: &Reply<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(400 + r.model.len() + r.words as usize * 8);
    out.push(b'{');
    push_id(&mut out, b"cmpl-");
    out.extend_from_slice(b",\"object\":\"text_completion\",\"created\":");
    push_u64(&mut out, unix_now());
    out.extend_from_slice(b",\"model\":");
    push_json_str(&mut out, r.model);
    out.push(b',');
    out.extend_from_slice(FINGERPRINT);
    out.extend_from_slice(b",\"choices\":[{\"text\":\"");
    push_words(&mut out, r.words);
    out.extend_from_slice(
        b"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":",
    );
    push_openai_usage(&mut out, &r.usage, legacy_detailed(&r.usage));
    out.push(b'}');
    out
}

/// `POST /v1/completions` with `"stream": true`.
pub(super) fn completion_stream(r: &Reply<'_>, include_usage: bool) -> Script {
    let mut pre = Vec::with_capacity(96);
    pre.extend_from_slice(b"data: {");
    push_id(&mut pre, b"cmpl-");
    pre.extend_from_slice(b",\"object\":\"text_completion\",\"created\":");
    push_u64(&mut pre, unix_now());
    pre.extend_from_slice(b",\"choices\":[");
    // After the choices: the model, the fingerprint (and `"usage":null`).
    let mut mid = Vec::with_capacity(64 + r.model.len());
    mid.extend_from_slice(b"],\"model\":");
    push_json_str(&mut mid, r.model);
    mid.push(b',');
    mid.extend_from_slice(FINGERPRINT);

    let mut s = Script {
        words: r.words,
        ..Script::default()
    };
    s.word_pre.extend_from_slice(&pre);
    s.word_pre.extend_from_slice(b"{\"text\":\"");
    s.word_post
        .extend_from_slice(b"\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}");
    s.word_post.extend_from_slice(&mid);
    if include_usage {
        s.word_post.extend_from_slice(b",\"usage\":null");
    }
    s.word_post.extend_from_slice(b"}\n\n");

    let buf = s.tail.buf();
    buf.extend_from_slice(&pre);
    buf.extend_from_slice(
        b"{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}",
    );
    buf.extend_from_slice(&mid);
    if include_usage {
        buf.extend_from_slice(b",\"usage\":null");
    }
    buf.extend_from_slice(b"}\n\n");
    s.tail.end();
    if include_usage {
        let buf = s.tail.buf();
        buf.extend_from_slice(&pre);
        buf.extend_from_slice(&mid);
        buf.extend_from_slice(b",\"usage\":");
        push_openai_usage(buf, &r.usage, legacy_detailed(&r.usage));
        buf.extend_from_slice(b"}\n\n");
        s.tail.end();
    }
    s.tail.buf().extend_from_slice(b"data: [DONE]\n\n");
    s.tail.end();
    s
}
