//! Property tests of the translators.
//!
//! 1. A request translated to the other format and back keeps its meaning
//!    (messages, roles, text, images, tools, tool calls and results, system,
//!    max_tokens, stop sequences, sampling, user), and the intermediate
//!    request is a valid conversation of its format (tool results right
//!    after the calls they answer).
//! 2. For every stream translator, arbitrary upstream chunk boundaries give
//!    byte-identical output and the same usage, text and model; the output
//!    follows the client format's grammar; and what the client's SDK rebuilds
//!    from it equals the translation of the equivalent plain response.
//! 3. No input, however malformed, makes a translator panic.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::fixtures::{
    self, AUsage, AnthropicSpec, OUsage, OpenAiSpec, ToolSpec, events_of, run, split,
};
use super::*;

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 ,.?]{1,12}",
        2 => "\\PC{1,12}",
        1 => Just("line one\nline \"two\" \\ ✓ ".to_owned()),
    ]
}

fn tool_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_]{0,10}"
}

fn json_object() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(Value::from),
        text().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ];
    let tree = leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,5}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop::collection::btree_map("[a-z_]{1,6}", tree, 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

fn schema() -> impl Strategy<Value = Value> {
    prop::collection::btree_set("[a-z]{1,6}", 0..3).prop_map(|props| {
        let props: Map<String, Value> = props
            .into_iter()
            .map(|p| (p, json!({"type": "string"})))
            .collect();
        json!({"type": "object", "properties": props})
    })
}

fn b64() -> impl Strategy<Value = String> {
    "[A-Za-z0-9+/]{4,24}"
}

fn anthropic_image() -> impl Strategy<Value = Value> {
    prop_oneof![
        (prop::sample::select(vec!["image/png", "image/jpeg", "image/gif", "image/webp"]), b64())
            .prop_map(|(mt, data)| json!({"type": "image", "source": {"type": "base64", "media_type": mt, "data": data}})),
        "[a-z]{1,8}".prop_map(|n| json!({"type": "image", "source": {"type": "url", "url": format!("https://example.com/{n}.png")}})),
    ]
}

fn anthropic_user_block() -> impl Strategy<Value = Value> {
    prop_oneof![3 => text().prop_map(|t| json!({"type": "text", "text": t})), 1 => anthropic_image()]
}

/// A tool result's content: a string or text blocks.
fn anthropic_result_content() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(
            text().prop_map(|t| json!({"type": "text", "text": t})),
            1..3
        )
        .prop_map(Value::Array),
    ]
}

#[derive(Debug, Clone)]
struct ATurn {
    user_string: Option<String>,
    user_blocks: Vec<Value>,
    results: Vec<Value>,
    assistant_string: Option<String>,
    assistant_texts: Vec<String>,
    assistant_tools: Vec<(String, Value)>,
}

fn a_turn() -> impl Strategy<Value = ATurn> {
    (
        prop::option::of(text()),
        prop::collection::vec(anthropic_user_block(), 1..3),
        prop::collection::vec(anthropic_result_content(), 1..4),
        prop::option::of(text()),
        prop::collection::vec(text(), 0..3),
        prop::collection::vec((tool_name(), json_object()), 0..3),
    )
        .prop_map(
            |(
                user_string,
                user_blocks,
                results,
                assistant_string,
                assistant_texts,
                assistant_tools,
            )| ATurn {
                user_string,
                user_blocks,
                results,
                assistant_string,
                assistant_texts,
                assistant_tools,
            },
        )
}

fn anthropic_request() -> impl Strategy<Value = Map<String, Value>> {
    let system = prop_oneof![
        Just(Value::Null),
        text().prop_map(Value::String),
        prop::collection::vec(
            text().prop_map(|t| json!({"type": "text", "text": t})),
            1..3
        )
        .prop_map(Value::Array),
    ];
    let tools = prop::collection::vec((tool_name(), prop::option::of(text()), schema()), 0..3);
    (
        system,
        prop::collection::vec(a_turn(), 0..4),
        text(),
        tools,
        (0usize..5, prop::option::of(any::<bool>())),
        (1u64..200_000, prop::option::of(prop::collection::vec(text(), 0..3))),
        (prop::option::of(0u32..=100), prop::option::of(0u32..=100)),
        (prop::option::of("[a-z0-9-]{1,12}"), any::<bool>()),
    )
        .prop_map(|(system, turns, last, tools, choice, (max, stops), (temp, top_p), (user, stream))| {
            let mut messages = Vec::new();
            let mut pending: Vec<String> = Vec::new();
            for (t, turn) in turns.iter().enumerate() {
                let mut blocks: Vec<Value> = pending
                    .drain(..)
                    .enumerate()
                    .map(|(k, id)| {
                        json!({"type": "tool_result", "tool_use_id": id, "content": turn.results[k % turn.results.len()]})
                    })
                    .collect();
                match (&turn.user_string, blocks.is_empty()) {
                    (Some(s), true) => messages.push(json!({"role": "user", "content": s})),
                    _ => {
                        blocks.extend(turn.user_blocks.iter().cloned());
                        messages.push(json!({"role": "user", "content": blocks}));
                    }
                }
                if turn.assistant_tools.is_empty() && (turn.assistant_string.is_some() || turn.assistant_texts.is_empty()) {
                    let s = turn.assistant_string.clone().unwrap_or_else(|| "ok".into());
                    messages.push(json!({"role": "assistant", "content": s}));
                    continue;
                }
                let mut content: Vec<Value> =
                    turn.assistant_texts.iter().map(|t| json!({"type": "text", "text": t})).collect();
                for (k, (name, input)) in turn.assistant_tools.iter().enumerate() {
                    let id = format!("toolu_{t}_{k}");
                    content.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
                    pending.push(id);
                }
                messages.push(json!({"role": "assistant", "content": content}));
            }
            let mut blocks: Vec<Value> = pending
                .drain(..)
                .map(|id| json!({"type": "tool_result", "tool_use_id": id, "content": "done"}))
                .collect();
            blocks.push(json!({"type": "text", "text": last}));
            messages.push(json!({"role": "user", "content": blocks}));

            let mut req = Map::new();
            req.insert("model".into(), json!("claude-client"));
            req.insert("max_tokens".into(), json!(max));
            req.insert("messages".into(), Value::Array(messages));
            if !system.is_null() {
                req.insert("system".into(), system);
            }
            if !tools.is_empty() {
                let first = tools[0].0.clone();
                let tools: Vec<Value> = tools
                    .into_iter()
                    .map(|(name, desc, schema)| {
                        let mut t = json!({"name": name, "input_schema": schema});
                        if let Some(d) = desc {
                            t["description"] = json!(d);
                        }
                        t
                    })
                    .collect();
                req.insert("tools".into(), Value::Array(tools));
                let (kind, disable) = choice;
                let mut c = match kind {
                    0 => json!({"type": "auto"}),
                    1 => json!({"type": "any"}),
                    2 => json!({"type": "none"}),
                    3 => json!({"type": "tool", "name": first}),
                    _ => Value::Null,
                };
                if let (Some(d), Value::Object(o)) = (disable, &mut c)
                    && kind != 2
                {
                    o.insert("disable_parallel_tool_use".into(), json!(d));
                }
                if !c.is_null() {
                    req.insert("tool_choice".into(), c);
                }
            }
            if let Some(s) = stops {
                req.insert("stop_sequences".into(), json!(s));
            }
            if let Some(t) = temp {
                req.insert("temperature".into(), json!(f64::from(t) / 100.0));
            }
            if let Some(p) = top_p {
                req.insert("top_p".into(), json!(f64::from(p) / 100.0));
            }
            if let Some(u) = user {
                req.insert("metadata".into(), json!({"user_id": u}));
            }
            if stream {
                req.insert("stream".into(), json!(true));
            }
            req
        })
}

fn openai_text_content() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(
            text().prop_map(|t| json!({"type": "text", "text": t})),
            1..3
        )
        .prop_map(Value::Array),
    ]
}

fn openai_user_content() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        3 => text().prop_map(|t| json!({"type": "text", "text": t})),
        1 => (prop::sample::select(vec!["image/png", "image/jpeg"]), b64())
            .prop_map(|(mt, d)| json!({"type": "image_url", "image_url": {"url": format!("data:{mt};base64,{d}")}})),
        1 => "[a-z]{1,8}".prop_map(|n| json!({"type": "image_url", "image_url": {"url": format!("https://example.com/{n}.jpg"), "detail": "low"}})),
    ];
    prop_oneof![
        text().prop_map(Value::String),
        prop::collection::vec(part, 1..3).prop_map(Value::Array),
    ]
}

#[derive(Debug, Clone)]
struct OTurn {
    user: Value,
    assistant: Option<Value>,
    calls: Vec<(String, Value)>,
    results: Vec<Value>,
}

fn o_turn() -> impl Strategy<Value = OTurn> {
    (
        openai_user_content(),
        prop::option::of(openai_text_content()),
        prop::collection::vec((tool_name(), json_object()), 0..3),
        prop::collection::vec(openai_text_content(), 1..3),
    )
        .prop_map(|(user, assistant, calls, results)| OTurn {
            user,
            assistant,
            calls,
            results,
        })
}

fn openai_request() -> impl Strategy<Value = Map<String, Value>> {
    let systems = prop::collection::vec(
        (
            prop::sample::select(vec!["system", "developer"]),
            openai_text_content(),
        ),
        0..3,
    );
    let tools = prop::collection::vec((tool_name(), prop::option::of(text()), schema()), 0..3);
    (
        systems,
        prop::collection::vec(o_turn(), 0..4),
        openai_user_content(),
        tools,
        (0usize..5, prop::option::of(any::<bool>())),
        (0usize..3, 1u64..100_000, 0usize..3),
        (prop::option::of(0u32..=100), prop::option::of(0u32..=100)),
        (prop::option::of("[a-z0-9]{1,8}"), any::<bool>(), prop::collection::vec(text(), 1..3)),
    )
        .prop_map(|(systems, turns, last, tools, choice, (max_kind, max, stop_kind), (temp, top_p), (user, stream, stops))| {
            let mut messages: Vec<Value> =
                systems.into_iter().map(|(role, content)| json!({"role": role, "content": content})).collect();
            for (t, turn) in turns.into_iter().enumerate() {
                messages.push(json!({"role": "user", "content": turn.user}));
                let mut a = json!({"role": "assistant", "content": turn.assistant.unwrap_or(Value::Null)});
                if turn.calls.is_empty() && a["content"].is_null() {
                    a["content"] = json!("ok");
                }
                let ids: Vec<String> = (0..turn.calls.len()).map(|k| format!("call_{t}_{k}")).collect();
                if !turn.calls.is_empty() {
                    a["tool_calls"] = turn
                        .calls
                        .iter()
                        .zip(&ids)
                        .map(|((name, args), id)| {
                            json!({"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}})
                        })
                        .collect();
                }
                messages.push(a);
                for (k, id) in ids.iter().enumerate() {
                    messages.push(json!({"role": "tool", "tool_call_id": id, "content": turn.results[k % turn.results.len()]}));
                }
            }
            messages.push(json!({"role": "user", "content": last}));

            let mut req = Map::new();
            req.insert("model".into(), json!("gpt-client"));
            req.insert("messages".into(), Value::Array(messages));
            match max_kind {
                0 => {}
                1 => {
                    req.insert("max_tokens".into(), json!(max));
                }
                _ => {
                    req.insert("max_completion_tokens".into(), json!(max));
                }
            }
            match stop_kind {
                0 => {}
                1 => {
                    req.insert("stop".into(), json!(stops[0]));
                }
                _ => {
                    req.insert("stop".into(), json!(stops));
                }
            }
            if !tools.is_empty() {
                let first = tools[0].0.clone();
                let tools: Vec<Value> = tools
                    .into_iter()
                    .map(|(name, desc, schema)| {
                        let mut f = json!({"name": name, "parameters": schema});
                        if let Some(d) = desc {
                            f["description"] = json!(d);
                        }
                        json!({"type": "function", "function": f})
                    })
                    .collect();
                req.insert("tools".into(), Value::Array(tools));
                let (kind, parallel) = choice;
                match kind {
                    0 => {
                        req.insert("tool_choice".into(), json!("auto"));
                    }
                    1 => {
                        req.insert("tool_choice".into(), json!("required"));
                    }
                    2 => {
                        req.insert("tool_choice".into(), json!("none"));
                    }
                    3 => {
                        req.insert("tool_choice".into(), json!({"type": "function", "function": {"name": first}}));
                    }
                    _ => {}
                }
                if let Some(p) = parallel {
                    req.insert("parallel_tool_calls".into(), json!(p));
                }
            }
            if let Some(t) = temp {
                req.insert("temperature".into(), json!(f64::from(t) / 100.0));
            }
            if let Some(p) = top_p {
                req.insert("top_p".into(), json!(f64::from(p) / 100.0));
            }
            if let Some(u) = user {
                req.insert("user".into(), json!(u));
            }
            if stream {
                req.insert("stream".into(), json!(true));
                req.insert("stream_options".into(), json!({"include_usage": true}));
            }
            req
        })
}

// ---------------------------------------------------------------------------
// Meaning: what must survive a round trip, in one normal form per format
// ---------------------------------------------------------------------------

fn texts_of(v: Option<&Value>) -> Vec<Value> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => vec![json!(s)],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").or_else(|| p.get("refusal")))
            .filter(|t| t.as_str() != Some(""))
            .cloned()
            .collect(),
        _ => Vec::new(),
    }
}

fn a_block(b: &Value) -> Option<Value> {
    match b["type"].as_str() {
        Some("text") if b["text"] == "" => None,
        Some("text") => Some(json!({"text": b["text"]})),
        Some("image") => Some(json!({"image": b["source"]})),
        Some("tool_use") => Some(json!({"tool_use": [b["id"], b["name"], b["input"]]})),
        Some("tool_result") => {
            Some(json!({"tool_result": [b["tool_use_id"], texts_of(b.get("content"))]}))
        }
        _ => None,
    }
}

fn anthropic_meaning(req: &Map<String, Value>) -> Value {
    let messages: Vec<Value> = req["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let blocks: Vec<Value> = match &m["content"] {
                Value::String(s) if s.is_empty() => Vec::new(),
                Value::String(s) => vec![json!({"text": s})],
                Value::Array(b) => b.iter().filter_map(a_block).collect(),
                _ => unreachable!(),
            };
            json!({"role": m["role"], "content": blocks})
        })
        .collect();
    let tools = req.get("tools").cloned().unwrap_or(json!([]));
    let has_tools = !tools.as_array().unwrap().is_empty();
    let choice = match req.get("tool_choice") {
        _ if !has_tools => Value::Null,
        None => json!({"type": "auto"}),
        Some(c) => json!({"type": c["type"], "name": c.get("name")}),
    };
    let no_parallel = has_tools
        && req
            .get("tool_choice")
            .is_some_and(|c| c["disable_parallel_tool_use"] == true);
    json!({
        "system": texts_of(req.get("system")),
        "messages": messages,
        "tools": tools,
        "tool_choice": choice,
        "no_parallel": no_parallel,
        "max_tokens": req["max_tokens"],
        "stop": req.get("stop_sequences").cloned().unwrap_or(json!([])),
        "temperature": req.get("temperature"),
        "top_p": req.get("top_p"),
        "user": req.get("metadata").map(|m| &m["user_id"]),
        "stream": req.get("stream") == Some(&json!(true)),
    })
}

fn o_part(p: &Value) -> Option<Value> {
    match p["type"].as_str() {
        Some("text") if p["text"] == "" => None,
        Some("text") => Some(json!({"text": p["text"]})),
        Some("image_url") => Some(json!({"image": p["image_url"]["url"]})),
        _ => None,
    }
}

fn openai_meaning(req: &Map<String, Value>) -> Value {
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for m in req["messages"].as_array().unwrap() {
        match m["role"].as_str().unwrap() {
            "system" | "developer" => system.extend(texts_of(m.get("content"))),
            "user" => {
                let parts: Vec<Value> = match &m["content"] {
                    Value::String(s) => vec![json!({"text": s})],
                    Value::Array(p) => p.iter().filter_map(o_part).collect(),
                    _ => unreachable!(),
                };
                messages.push(json!({"role": "user", "content": parts}));
            }
            "assistant" => {
                let calls: Vec<Value> = m
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        let args = c["function"]["arguments"].as_str().unwrap();
                        let args: Value = if args.is_empty() { json!({}) } else { serde_json::from_str(args).unwrap() };
                        json!([c["id"], c["function"]["name"], args])
                    })
                    .collect();
                messages.push(json!({"role": "assistant", "content": texts_of(m.get("content")), "calls": calls}));
            }
            "tool" => messages.push(json!({"role": "tool", "id": m["tool_call_id"], "content": texts_of(m.get("content"))})),
            other => unreachable!("{other}"),
        }
    }
    let max = req
        .get("max_completion_tokens")
        .or(req.get("max_tokens"))
        .cloned()
        .unwrap_or(json!(4096));
    let stop = match req.get("stop") {
        Some(Value::String(s)) => json!([s]),
        Some(a @ Value::Array(_)) => a.clone(),
        _ => json!([]),
    };
    let tools = req.get("tools").cloned().unwrap_or(json!([]));
    let has_tools = !tools.as_array().unwrap().is_empty();
    let choice = match req.get("tool_choice") {
        _ if !has_tools => Value::Null,
        None => json!("auto"),
        Some(c) => c.clone(),
    };
    let no_parallel =
        has_tools && choice != "none" && req.get("parallel_tool_calls") == Some(&json!(false));
    json!({
        "system": system,
        "messages": messages,
        "tools": tools,
        "tool_choice": choice,
        "no_parallel": no_parallel,
        "max_tokens": max,
        "stop": stop,
        "temperature": req.get("temperature"),
        "top_p": req.get("top_p"),
        "user": req.get("user"),
        "stream": req.get("stream") == Some(&json!(true)),
    })
}

/// OpenAI's rule: tool messages answer calls of the assistant message right
/// before them (after other tool messages), each call id at most once.
fn openai_structure_ok(msgs: &[Value]) -> Result<(), String> {
    let mut open: Vec<String> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        match m["role"].as_str() {
            Some("tool") => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                let pos = open
                    .iter()
                    .position(|o| o == id)
                    .ok_or(format!("message {i}: tool result for {id} without a call"))?;
                open.remove(pos);
            }
            Some("assistant") => {
                open = m["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
                    .collect();
            }
            _ => open.clear(),
        }
        if m["role"] == "system" && i > 0 {
            return Err(format!("message {i}: system message after the start"));
        }
    }
    Ok(())
}

/// Anthropic's rules: roles user/assistant; tool results come first in the
/// user message right after the assistant message with those tool uses.
fn anthropic_structure_ok(msgs: &[Value]) -> Result<(), String> {
    let mut prev_uses: Vec<String> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let blocks = m["content"].as_array().cloned().unwrap_or_default();
        match m["role"].as_str() {
            Some("user") => {
                let mut seen_other = false;
                for b in &blocks {
                    if b["type"] == "tool_result" {
                        if seen_other {
                            return Err(format!("message {i}: tool_result after other content"));
                        }
                        let id = b["tool_use_id"].as_str().unwrap_or_default();
                        if !prev_uses.iter().any(|u| u == id) {
                            return Err(format!(
                                "message {i}: tool_result {id} does not answer the previous message"
                            ));
                        }
                    } else {
                        seen_other = true;
                        if b["type"] == "text" && b["text"] == "" {
                            return Err(format!("message {i}: empty text block"));
                        }
                    }
                }
                prev_uses.clear();
            }
            Some("assistant") => {
                prev_uses = blocks
                    .iter()
                    .filter(|b| b["type"] == "tool_use")
                    .map(|b| b["id"].as_str().unwrap_or_default().to_owned())
                    .collect();
            }
            other => return Err(format!("message {i}: role {other:?}")),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Anthropic → OpenAI → Anthropic keeps the meaning.
    #[test]
    fn anthropic_request_round_trip_keeps_meaning(req in anthropic_request()) {
        let openai = anthropic_request_to_openai_chat(&req, "gpt-up").unwrap();
        prop_assert_eq!(&openai["model"], "gpt-up");
        let msgs = openai["messages"].as_array().unwrap();
        if let Err(e) = openai_structure_ok(msgs) { prop_assert!(false, "{}\n{:#?}", e, openai); }
        prop_assert_eq!(
            openai.get("stream_options").is_some(),
            req.get("stream") == Some(&json!(true)),
            "a streamed request always asks for usage"
        );
        let back = openai_chat_request_to_anthropic(&openai, "claude-up").unwrap();
        prop_assert_eq!(&back["model"], "claude-up");
        if let Err(e) = anthropic_structure_ok(back["messages"].as_array().unwrap()) {
            prop_assert!(false, "{}\n{:#?}", e, back);
        }
        prop_assert_eq!(anthropic_meaning(&back), anthropic_meaning(&req));
    }

    /// OpenAI → Anthropic → OpenAI keeps the meaning.
    #[test]
    fn openai_request_round_trip_keeps_meaning(req in openai_request()) {
        let anthropic = openai_chat_request_to_anthropic(&req, "claude-up").unwrap();
        if let Err(e) = anthropic_structure_ok(anthropic["messages"].as_array().unwrap()) {
            prop_assert!(false, "{}\n{:#?}", e, anthropic);
        }
        prop_assert!(anthropic["max_tokens"].is_u64(), "Anthropic requires max_tokens");
        let back = anthropic_request_to_openai_chat(&anthropic, "gpt-up").unwrap();
        if let Err(e) = openai_structure_ok(back["messages"].as_array().unwrap()) {
            prop_assert!(false, "{}\n{:#?}", e, back);
        }
        prop_assert_eq!(openai_meaning(&back), openai_meaning(&req));
    }
}

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

/// Owned pieces of a generated stream (specs borrow from them).
#[derive(Debug, Clone)]
struct StreamGen {
    texts: Vec<String>,
    thinking: Option<String>,
    /// (id, name, argument pieces)
    tools: Vec<(String, String, Vec<String>)>,
    reason: usize,
    usage: [u64; 4],
    with_usage: bool,
    full_delta_usage: bool,
    crlf: bool,
}

/// A JSON object's text cut into pieces at char boundaries.
fn pieces(v: &Value, cuts: &[usize]) -> Vec<String> {
    let s = v.to_string();
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| c % (s.len() + 1))
        .filter(|c| s.is_char_boundary(*c))
        .collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in at.into_iter().chain([s.len()]) {
        if c > prev {
            out.push(s[prev..c].to_owned());
            prev = c;
        }
    }
    out
}

fn stream_gen() -> impl Strategy<Value = StreamGen> {
    let tool = (
        tool_name(),
        json_object(),
        prop::collection::vec(0usize..200, 0..5),
    );
    (
        prop::collection::vec(text(), 0..5),
        prop::option::of(text()),
        prop::collection::vec(tool, 0..3),
        0usize..4,
        [0u64..5000, 0u64..5000, 0u64..5000, 0u64..5000],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(texts, thinking, tools, reason, usage, with_usage, full_delta_usage, crlf)| {
                StreamGen {
                    texts,
                    thinking,
                    tools: tools
                        .into_iter()
                        .enumerate()
                        .map(|(k, (name, input, cuts))| {
                            (format!("tool_{k}"), name, pieces(&input, &cuts))
                        })
                        .collect(),
                    reason,
                    usage,
                    with_usage,
                    full_delta_usage,
                    crlf,
                }
            },
        )
}

fn arg_refs(g: &StreamGen) -> Vec<Vec<&str>> {
    g.tools
        .iter()
        .map(|(_, _, p)| p.iter().map(String::as_str).collect())
        .collect()
}

fn tool_specs<'a>(g: &'a StreamGen, refs: &'a [Vec<&'a str>]) -> Vec<ToolSpec<'a>> {
    g.tools
        .iter()
        .zip(refs)
        .map(|((id, name, _), args)| ToolSpec { id, name, args })
        .collect()
}

fn crlf(s: String, yes: bool) -> String {
    if yes {
        format!(": keep-alive\r\n\r\n{}", s.replace('\n', "\r\n"))
    } else {
        s
    }
}

/// Anthropic's event grammar, as the SDK relies on it.
fn anthropic_sequence_ok(events: &[(String, Value)]) -> Result<(), String> {
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    if names.first() != Some(&"message_start") {
        return Err(format!("must start with message_start: {names:?}"));
    }
    if names.len() < 3 || names[names.len() - 2..] != ["message_delta", "message_stop"] {
        return Err(format!(
            "must end with message_delta, message_stop: {names:?}"
        ));
    }
    if names.iter().filter(|n| **n == "ping").count() != 1 {
        return Err(format!("one ping: {names:?}"));
    }
    let mut open: Option<u64> = None;
    let mut next = 0u64;
    for (i, (name, data)) in events.iter().enumerate() {
        if data["type"] != name.as_str() {
            return Err(format!("event {i}: name {name} but type {}", data["type"]));
        }
        let index = data["index"].as_u64();
        match name.as_str() {
            "content_block_start" => {
                if open.is_some() || index != Some(next) {
                    return Err(format!("event {i}: block start out of order: {names:?}"));
                }
                open = index;
                next += 1;
                if next == 1 && names.get(i + 1) != Some(&"ping") {
                    return Err(format!("ping must follow the first block start: {names:?}"));
                }
            }
            "content_block_delta" if open.is_none() || index != open => {
                return Err(format!("event {i}: delta outside its block: {names:?}"));
            }
            "content_block_stop" => {
                if index != open {
                    return Err(format!(
                        "event {i}: stop of a block that is not open: {names:?}"
                    ));
                }
                open = None;
            }
            "message_delta" if open.is_some() => {
                return Err(format!("message_delta with block {open:?} open"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn normalized_calls(message: &Value) -> Vec<Value> {
    message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let args = c["function"]["arguments"].as_str().unwrap_or_default();
            let args: Value = if args.is_empty() {
                json!({})
            } else {
                serde_json::from_str(args).unwrap()
            };
            json!([c["id"], c["function"]["name"], args])
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Anthropic → Anthropic: byte-identical relay whatever the cuts, and the
    /// upstream's usage.
    #[test]
    fn passthrough_ignores_chunk_boundaries(g in stream_gen(), cuts in prop::collection::vec(0usize..100_000, 0..40)) {
        let refs = arg_refs(&g);
        let texts: Vec<&str> = g.texts.iter().map(String::as_str).collect();
        let mut spec = AnthropicSpec::text(&texts);
        spec.thinking = g.thinking.as_deref();
        spec.tools = tool_specs(&g, &refs);
        spec.usage = AUsage { input_tokens: g.usage[0], cache_read: g.usage[1], cache_write: g.usage[2], output_tokens: g.usage[3] };
        spec.with_usage = g.with_usage;
        spec.delta_full_usage = g.full_delta_usage;
        let plain = fixtures::anthropic_stream(&spec);
        let upstream = crlf(plain.clone(), g.crlf);
        let bytes = upstream.as_bytes();
        let (whole, a) = run(AnthropicPassthrough::new(), &[bytes]);
        let (parts, b) = run(AnthropicPassthrough::new(), &split(bytes, &cuts));
        prop_assert_eq!(&whole, &parts);
        prop_assert_eq!(&whole, &plain, "the relay writes what the upstream sent");
        prop_assert_eq!(a.usage(), b.usage());
        prop_assert_eq!(a.text(), b.text());
        let want = g.with_usage.then(|| anthropic_usage_tokens(&fixtures::anthropic_plain(&spec)["usage"]));
        prop_assert_eq!(a.usage(), want);
    }

    /// OpenAI → Anthropic: same bytes whatever the cuts; Anthropic's exact
    /// grammar; the SDK's final message equals the plain translation.
    #[test]
    fn openai_to_anthropic_ignores_chunk_boundaries(g in stream_gen(), cuts in prop::collection::vec(0usize..100_000, 0..40)) {
        let refs = arg_refs(&g);
        let texts: Vec<&str> = g.texts.iter().map(String::as_str).collect();
        let mut spec = OpenAiSpec::text(&texts);
        spec.tools = tool_specs(&g, &refs);
        spec.finish = ["stop", "length", "tool_calls", "content_filter"][g.reason];
        spec.include_usage = g.with_usage;
        spec.usage = OUsage { prompt: g.usage[0] + g.usage[1], cached: g.usage[1], completion: g.usage[2] + g.usage[3], reasoning: g.usage[3] };
        let upstream = crlf(fixtures::openai_stream(&spec), g.crlf);
        let bytes = upstream.as_bytes();
        let (whole, a) = run(OpenAiToAnthropicStream::new("client-model"), &[bytes]);
        let (parts, b) = run(OpenAiToAnthropicStream::new("client-model"), &split(bytes, &cuts));
        prop_assert_eq!(&whole, &parts);
        prop_assert_eq!(a.usage(), b.usage());
        prop_assert_eq!(a.text(), b.text());
        prop_assert_eq!(a.served_model(), Some("gpt-served"));

        let events = events_of(&whole);
        if let Err(e) = anthropic_sequence_ok(&events) { prop_assert!(false, "{}\n{}", e, whole); }
        let sdk = fixtures::sdk_final_message(&whole);
        let plain = openai_chat_response_to_anthropic(&fixtures::openai_plain(&spec), "client-model").unwrap();
        for k in ["id", "model", "role", "content", "stop_reason", "usage"] {
            prop_assert_eq!(&sdk[k], &plain[k], "{}", k);
        }
        if g.with_usage {
            let t = a.usage().unwrap();
            prop_assert_eq!((t.input_tokens, t.cache_read_tokens, t.output_tokens, t.reasoning_tokens),
                            (g.usage[0], g.usage[1], g.usage[2] + g.usage[3], g.usage[3]));
        } else {
            prop_assert_eq!(a.usage(), None);
        }
    }

    /// Anthropic → OpenAI: same bytes whatever the cuts; usage only when
    /// asked, in the last chunk; the SDK's accumulated choice equals the
    /// plain translation.
    #[test]
    fn anthropic_to_openai_ignores_chunk_boundaries(
        g in stream_gen(),
        include_usage in any::<bool>(),
        cuts in prop::collection::vec(0usize..100_000, 0..40),
    ) {
        let refs = arg_refs(&g);
        let texts: Vec<&str> = g.texts.iter().map(String::as_str).collect();
        let mut spec = AnthropicSpec::text(&texts);
        spec.thinking = g.thinking.as_deref();
        spec.tools = tool_specs(&g, &refs);
        spec.stop_reason = ["end_turn", "max_tokens", "tool_use", "stop_sequence"][g.reason];
        spec.usage = AUsage { input_tokens: g.usage[0], cache_read: g.usage[1], cache_write: g.usage[2], output_tokens: g.usage[3] };
        spec.with_usage = g.with_usage;
        spec.delta_full_usage = g.full_delta_usage;
        let upstream = crlf(fixtures::anthropic_stream(&spec), g.crlf);
        let bytes = upstream.as_bytes();
        let make = || AnthropicToOpenAiStream::new("client-model", include_usage).with_created(1_700_000_000);
        let (whole, a) = run(make(), &[bytes]);
        let (parts, b) = run(make(), &split(bytes, &cuts));
        prop_assert_eq!(&whole, &parts);
        prop_assert_eq!(a.usage(), b.usage());
        prop_assert_eq!(a.text(), b.text());
        prop_assert!(whole.ends_with("data: [DONE]\n\n"));
        prop_assert_eq!(whole.matches("[DONE]").count(), 1);

        let chunks = fixtures::chunks_of(&whole);
        let usage_chunk = include_usage && g.with_usage;
        for (i, c) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            prop_assert_eq!(c.as_object().unwrap().contains_key("usage"), include_usage);
            if usage_chunk && last {
                prop_assert_eq!(&c["choices"], &json!([]));
            } else {
                prop_assert_eq!(c["choices"].as_array().unwrap().len(), 1);
                prop_assert!(c["usage"].is_null());
            }
        }
        let acc = fixtures::openai_accumulate(&whole);
        let plain = anthropic_response_to_openai_chat(&fixtures::anthropic_plain(&spec), "client-model").unwrap();
        let choice = &plain["choices"][0];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        prop_assert_eq!(text(&acc["message"]["content"]), text(&choice["message"]["content"]));
        prop_assert_eq!(normalized_calls(&acc["message"]), normalized_calls(&choice["message"]));
        prop_assert_eq!(&acc["finish_reason"], &choice["finish_reason"]);
        if usage_chunk {
            prop_assert_eq!(&acc["usage"], &plain["usage"]);
        }
        prop_assert_eq!(a.usage().is_some(), g.with_usage);
    }

    /// Nothing panics, whatever the JSON.
    #[test]
    fn translators_never_panic(v in arbitrary_json(), data in "\\PC{0,80}") {
        if let Value::Object(m) = &v {
            let _ = anthropic_request_to_openai_chat(m, "x");
            let _ = openai_chat_request_to_anthropic(m, "x");
        }
        let _ = openai_chat_response_to_anthropic(&v, "x");
        let _ = anthropic_response_to_openai_chat(&v, "x");
        let _ = anthropic_usage_tokens(&v);
        let body = v.to_string();
        let _ = openai_error_to_anthropic(body.as_bytes(), 500);
        let _ = anthropic_error_to_openai(data.as_bytes(), 400);
        let mut translators: Vec<Box<dyn StreamTranslator>> = vec![
            Box::new(AnthropicPassthrough::new()),
            Box::new(OpenAiToAnthropicStream::new("m")),
            Box::new(AnthropicToOpenAiStream::new("m", true)),
        ];
        let mut out = bytes::BytesMut::new();
        for t in &mut translators {
            for d in [body.as_str(), data.as_str(), "[DONE]"] {
                t.on_event(&crate::sse::SseEvent { event: Some("x".into()), data: d.to_owned() }, &mut out);
            }
            t.finish(&mut out);
        }
    }
}

/// JSON shaped like requests and events, so the translators' inner paths run.
fn arbitrary_json() -> impl Strategy<Value = Value> {
    let key = prop::sample::select(vec![
        "messages",
        "role",
        "content",
        "type",
        "text",
        "system",
        "tools",
        "tool_choice",
        "tool_calls",
        "function",
        "arguments",
        "name",
        "id",
        "input",
        "source",
        "url",
        "image_url",
        "tool_use_id",
        "tool_call_id",
        "max_tokens",
        "stop",
        "stop_sequences",
        "choices",
        "message",
        "delta",
        "usage",
        "index",
        "content_block",
        "partial_json",
        "error",
        "n",
        "file",
        "data",
        "media_type",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            "user",
            "assistant",
            "system",
            "tool",
            "developer",
            "text",
            "image",
            "tool_use",
            "tool_result",
            "image_url",
            "function",
            "auto",
            "any",
            "required",
            "none",
            "base64",
            "url",
            "message_start",
            "content_block_start",
            "content_block_delta",
            "message_delta",
            "message_stop",
            "text_delta",
            "input_json_delta",
            "data:image/png;base64,AAAA",
            "{\"a\":1}",
            "[1]",
            "",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..5).prop_map(|m| Value::Object(
                m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
            )),
        ]
    })
}
