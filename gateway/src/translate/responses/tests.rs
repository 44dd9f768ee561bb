use super::*;
use bytes::BytesMut;
use serde_json::{Map, Value, json};

use crate::translate::fixtures::{self, OUsage, OpenAiSpec, ToolSpec, events_of, run, split};
use crate::translate::{StreamTranslator, TranslateError};
use proptest::prelude::*;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("test input is an object"),
    }
}

fn err_of(v: Value) -> (String, Option<&'static str>) {
    match responses_request_to_chat(&obj(v)) {
        Err(TranslateError::Invalid { message, param }) => (message, param),
        Ok(r) => panic!("expected an error, got {r:?}"),
    }
}

#[test]
fn string_input_becomes_one_user_message() {
    let chat = responses_request_to_chat(&obj(json!({
        "model": "gpt-x", "input": "Hi", "instructions": "Be brief.",
        "max_output_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1",
        "store": true, "metadata": {"a": "b"}, "reasoning": {"effort": "low"},
        "text": {"format": {"type": "text"}}, "stream": true,
    })))
    .unwrap();
    assert_eq!(
        Value::Object(chat),
        json!({
            "model": "gpt-x",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9, "user": "u1",
            "stream": true, "stream_options": {"include_usage": true},
        })
    );
}

#[test]
fn item_list_maps_messages_calls_and_outputs() {
    let chat = responses_request_to_chat(&obj(json!({
        "model": "m",
        "input": [
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
            ]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me check."}]},
            {"type": "function_call", "call_id": "call_1", "name": "look", "arguments": "{\"x\":1}"},
            {"type": "function_call", "call_id": "call_2", "name": "look", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "a cat"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "a dog"}]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "call_3", "name": "more", "arguments": "{}"},
        ],
        "tools": [{"type": "function", "name": "look", "description": "Look.", "parameters": {"type": "object"}, "strict": true}],
        "tool_choice": {"type": "function", "name": "look"},
        "parallel_tool_calls": false,
    })))
    .unwrap();
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
            ]},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": "{\"x\":1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "look", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
            {"role": "tool", "tool_call_id": "call_2", "content": "a dog"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_3", "type": "function", "function": {"name": "more", "arguments": "{}"}},
            ]},
        ])
    );
    assert_eq!(
        chat["tools"],
        json!([{"type": "function", "function": {"name": "look", "description": "Look.", "parameters": {"type": "object"}, "strict": true}}])
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "look"}})
    );
    assert_eq!(chat["parallel_tool_calls"], false);
    assert!(!chat.contains_key("stream"));
    for choice in ["auto", "none", "required"] {
        let chat =
            responses_request_to_chat(&obj(json!({"input": "x", "tool_choice": choice}))).unwrap();
        assert_eq!(chat["tool_choice"], choice);
    }
}

#[test]
fn unsupported_requests_are_refused_clearly() {
    let (m, p) = err_of(json!({"input": "x", "tools": [{"type": "web_search"}]}));
    assert!(m.contains("built-in tool `web_search`"), "{m}");
    assert_eq!(p, Some("tools"));
    let (m, p) = err_of(json!({"input": "x", "previous_response_id": "resp_1"}));
    assert!(m.contains("previous_response_id"), "{m}");
    assert_eq!(p, Some("previous_response_id"));
    let (_, p) = err_of(json!({"input": "x", "conversation": "conv_1"}));
    assert_eq!(p, Some("conversation"));
    let (_, p) = err_of(json!({"input": "x", "background": true}));
    assert_eq!(p, Some("background"));
    let (m, p) = err_of(
        json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {}}}}),
    );
    assert!(m.contains("json_schema"), "{m}");
    assert_eq!(p, Some("text"));
    let (_, p) = err_of(json!({"input": "x", "tool_choice": {"type": "web_search_preview"}}));
    assert_eq!(p, Some("tool_choice"));
    let (m, _) = err_of(
        json!({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]}),
    );
    assert!(m.contains("file_id"), "{m}");
    let (_, p) = err_of(json!({"input": [{"type": "web_search_call", "id": "ws_1"}]}));
    assert_eq!(p, Some("input"));
    let (_, p) = err_of(json!({"model": "m"}));
    assert_eq!(p, Some("input"));
    // Ignored, not refused.
    assert!(
        responses_request_to_chat(&obj(
            json!({"input": "x", "previous_response_id": null, "store": false, "background": false})
        ))
        .is_ok()
    );
}

#[test]
fn plain_response_maps_text_tool_calls_and_usage() {
    let mut spec = OpenAiSpec::text(&["Checking", "."]);
    spec.tools = vec![ToolSpec {
        id: "call_a",
        name: "get_weather",
        args: &["{\"city\":", "\"Paris\"}"],
    }];
    spec.finish = "tool_calls";
    let resp = chat_response_to_responses(&fixtures::openai_plain(&spec), "client-m").unwrap();
    assert_eq!(resp["id"], "resp_abc123");
    assert_eq!(resp["object"], "response");
    assert_eq!(resp["created_at"], 1_700_000_000u64);
    assert_eq!(resp["status"], "completed");
    assert_eq!(resp["model"], "client-m");
    assert_eq!(resp["error"], Value::Null);
    assert_eq!(resp["incomplete_details"], Value::Null);
    assert_eq!(
        resp["output"],
        json!([
            {"type": "message", "id": "msg_abc123", "status": "completed", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
            {"type": "function_call", "id": "fc_abc123_0", "call_id": "call_a", "name": "get_weather",
             "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
        ])
    );
    assert_eq!(
        resp["usage"],
        json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
               "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 15})
    );
    for k in [
        "instructions",
        "max_output_tokens",
        "parallel_tool_calls",
        "temperature",
        "tool_choice",
        "tools",
        "top_p",
        "metadata",
        "text",
        "truncation",
    ] {
        assert!(resp.get(k).is_some(), "{k}");
    }

    let mut spec = OpenAiSpec::text(&["cut"]);
    spec.finish = "length";
    let mut resp = chat_response_to_responses(&fixtures::openai_plain(&spec), "m").unwrap();
    assert_eq!(resp["status"], "incomplete");
    assert_eq!(
        resp["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(resp["output"][0]["status"], "incomplete");
    echo_request_fields(
        &mut resp,
        &obj(json!({"instructions": "hi", "max_output_tokens": 5, "temperature": 0.3})),
    );
    assert_eq!(resp["instructions"], "hi");
    assert_eq!(resp["max_output_tokens"], 5);
    assert_eq!(resp["temperature"], 0.3);
    assert_eq!(resp["top_p"], 1.0);

    assert!(chat_response_to_responses(&json!({"choices": []}), "m").is_err());
}

/// Rebuilds the response the way the `openai` Python SDK's
/// `ResponseStreamState` does, checking indexes on the way.
fn sdk_final_response(events: &[(String, Value)]) -> Value {
    let mut snapshot = Value::Null;
    for (name, data) in events {
        let idx = data["output_index"].as_u64().unwrap_or(0) as usize;
        match name.as_str() {
            "response.created" => snapshot = data["response"].clone(),
            "response.output_item.added" => {
                let output = snapshot["output"].as_array_mut().unwrap();
                assert_eq!(output.len(), idx);
                output.push(data["item"].clone());
            }
            "response.content_part.added" => {
                let item = &mut snapshot["output"][idx];
                assert_eq!(item["id"], data["item_id"]);
                item["content"]
                    .as_array_mut()
                    .unwrap()
                    .push(data["part"].clone());
            }
            "response.output_text.delta" => {
                let part = &mut snapshot["output"][idx]["content"]
                    [data["content_index"].as_u64().unwrap() as usize];
                let t = format!(
                    "{}{}",
                    part["text"].as_str().unwrap(),
                    data["delta"].as_str().unwrap()
                );
                part["text"] = json!(t);
            }
            "response.function_call_arguments.delta" => {
                let item = &mut snapshot["output"][idx];
                assert_eq!(item["id"], data["item_id"]);
                let a = format!(
                    "{}{}",
                    item["arguments"].as_str().unwrap(),
                    data["delta"].as_str().unwrap()
                );
                item["arguments"] = json!(a);
            }
            "response.completed" => return data["response"].clone(),
            _ => {}
        }
    }
    panic!("no response.completed");
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

fn check_envelope(events: &[(String, Value)]) {
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str(), "event name equals data type");
        assert_eq!(data["sequence_number"], i as u64);
    }
}

#[test]
fn text_stream_follows_the_responses_grammar() {
    let upstream = fixtures::openai_stream(&OpenAiSpec::text(&["mock ", "reply ✓"]));
    let (out, t) = run(
        ChatToResponsesStream::new("client-m"),
        &[upstream.as_bytes()],
    );
    assert!(!out.contains("[DONE]"));
    let events = events_of(&out);
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    check_envelope(&events);
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[0].1["response"]["id"], "resp_abc123");
    assert_eq!(events[0].1["response"]["output"], json!([]));
    assert_eq!(events[2].1["item"]["id"], "msg_abc123");
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(events[6].1["text"], deltas.as_str());
    let done = &events[9].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["model"], "client-m");
    assert_eq!(done["output"][0]["content"][0]["text"], deltas.as_str());
    assert_eq!(
        done["usage"],
        json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
               "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 15})
    );
    assert_eq!(sdk_final_response(&events)["output"], done["output"]);
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
    assert_eq!(t.text(), "mock reply ✓");
    assert_eq!(t.served_model(), Some("gpt-served"));
    assert!(t.saw_content());
}

#[test]
fn tool_stream_emits_function_call_items() {
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
    let req = obj(json!({"input": "x", "tools": [{"type": "function", "name": "get_weather"}]}));
    let (out, _) = run(
        ChatToResponsesStream::new("m").with_request(&req),
        &[upstream.as_bytes()],
    );
    let events = events_of(&out);
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    check_envelope(&events);
    assert_eq!(events[11].1["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(events[11].1["name"], "get_weather");
    let done = &events[17].1["response"];
    assert_eq!(done["tools"], req["tools"]);
    let plain = chat_response_to_responses(&fixtures::openai_plain(&spec), "m").unwrap();
    assert_eq!(done["output"], plain["output"]);
    assert_eq!(sdk_final_response(&events)["output"], plain["output"]);
}

#[test]
fn finish_is_idempotent_and_owes_completion() {
    let upstream = fixtures::openai_stream(&OpenAiSpec::text(&["a"]));
    let cut = &upstream[..upstream.find("\"choices\":[]").unwrap()];
    let cut = &cut[..cut.rfind("data: ").unwrap()];
    let mut t = ChatToResponsesStream::new("m");
    let (mut out, _) = fixtures::feed(&mut t, &[cut.as_bytes()]);
    assert!(!String::from_utf8_lossy(&out).contains("response.completed"));
    t.finish(&mut out);
    t.finish(&mut out);
    let events = events_of(&out);
    check_envelope(&events);
    assert_eq!(
        names(&events)
            .iter()
            .filter(|n| **n == "response.completed")
            .count(),
        1
    );
    assert_eq!(events.last().unwrap().1["response"]["usage"], Value::Null);
    assert_eq!(t.usage(), None);

    let mut t = ChatToResponsesStream::new("m");
    let mut out = BytesMut::new();
    t.finish(&mut out);
    assert!(out.is_empty());
}

#[test]
fn length_is_incomplete_and_errors_fail() {
    let mut spec = OpenAiSpec::text(&["a"]);
    spec.finish = "length";
    let (out, _) = run(
        ChatToResponsesStream::new("m"),
        &[fixtures::openai_stream(&spec).as_bytes()],
    );
    let events = events_of(&out);
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["status"], "incomplete");
    assert_eq!(done["incomplete_details"]["reason"], "max_output_tokens");

    let upstream = "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n\
                    data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n";
    let (out, _) = run(ChatToResponsesStream::new("m"), &[upstream.as_bytes()]);
    let events = events_of(&out);
    check_envelope(&events);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "response.failed");
    assert_eq!(data["response"]["status"], "failed");
    assert_eq!(data["response"]["error"]["message"], "boom");
}

#[derive(Debug, Clone)]
struct Gen {
    texts: Vec<String>,
    tools: Vec<(String, Vec<String>)>,
    reason: usize,
    with_usage: bool,
    usage: [u64; 4],
    crlf: bool,
}

fn gen_stream() -> impl Strategy<Value = Gen> {
    (
        prop::collection::vec("\\PC{0,12}", 0..5),
        prop::collection::vec(
            ("[a-z_]{1,8}", prop::collection::vec("[ -~]{0,10}", 0..4)),
            0..3,
        ),
        0usize..4,
        any::<bool>(),
        [0u64..1000, 0u64..1000, 0u64..1000, 0u64..1000],
        any::<bool>(),
    )
        .prop_map(|(texts, tools, reason, with_usage, usage, crlf)| Gen {
            texts,
            tools,
            reason,
            with_usage,
            usage,
            crlf,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// Same bytes whatever the cuts; the grammar's envelope; the SDK's
    /// final response equals `response.completed` and the plain mapping.
    #[test]
    fn chat_to_responses_ignores_chunk_boundaries(g in gen_stream(), cuts in prop::collection::vec(0usize..100_000, 0..40)) {
        let ids: Vec<String> = (0..g.tools.len()).map(|k| format!("call_{k}")).collect();
        let args: Vec<Vec<&str>> = g.tools.iter().map(|(_, a)| a.iter().map(String::as_str).collect()).collect();
        let texts: Vec<&str> = g.texts.iter().map(String::as_str).collect();
        let mut spec = OpenAiSpec::text(&texts);
        spec.tools = g.tools.iter().enumerate().map(|(k, (name, _))| ToolSpec { id: &ids[k], name, args: &args[k] }).collect();
        spec.finish = ["stop", "length", "tool_calls", "content_filter"][g.reason];
        spec.include_usage = g.with_usage;
        spec.usage = OUsage { prompt: g.usage[0] + g.usage[1], cached: g.usage[1], completion: g.usage[2] + g.usage[3], reasoning: g.usage[3] };
        let mut upstream = fixtures::openai_stream(&spec);
        if g.crlf {
            upstream = upstream.replace('\n', "\r\n");
        }
        let bytes = upstream.as_bytes();
        let (whole, a) = run(ChatToResponsesStream::new("client-model"), &[bytes]);
        let (parts, b) = run(ChatToResponsesStream::new("client-model"), &split(bytes, &cuts));
        prop_assert_eq!(&whole, &parts);
        prop_assert_eq!(a.usage(), b.usage());
        prop_assert_eq!(a.text(), b.text());
        prop_assert!(!whole.contains("[DONE]"));

        let events = events_of(&whole);
        check_envelope(&events);
        prop_assert_eq!(events.iter().filter(|(n, _)| n == "response.completed").count(), 1);
        let done = &events.last().unwrap().1["response"];
        let plain = chat_response_to_responses(&fixtures::openai_plain(&spec), "client-model").unwrap();
        for k in ["id", "model", "status", "incomplete_details", "output", "usage", "created_at"] {
            prop_assert_eq!(&done[k], &plain[k], "{}", k);
        }
        prop_assert_eq!(&sdk_final_response(&events)["output"], &plain["output"]);
        if g.with_usage {
            let t = a.usage().unwrap();
            prop_assert_eq!((t.input_tokens, t.cache_read_tokens, t.output_tokens, t.reasoning_tokens),
                            (g.usage[0], g.usage[1], g.usage[2] + g.usage[3], g.usage[3]));
        } else {
            prop_assert_eq!(a.usage(), None);
        }
    }
}
