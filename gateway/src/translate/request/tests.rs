use super::*;
use crate::translate::TranslateError;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn err(r: Result<Map<String, Value>, TranslateError>) -> (String, Option<&'static str>) {
    match r {
        Err(TranslateError::Invalid { message, param }) => (message, param),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn anthropic_to_openai_system_string_and_blocks() {
    let req = obj(json!({
        "model": "claude", "max_tokens": 100, "system": "Be brief.",
        "messages": [{"role": "user", "content": "hi"}]
    }));
    let out = anthropic_request_to_openai_chat(&req, "gpt-x").unwrap();
    assert_eq!(out["model"], "gpt-x");
    assert_eq!(out["max_completion_tokens"], 100);
    assert_eq!(
        out["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    );
    assert!(out.get("stream").is_none());

    let req = obj(json!({
        "model": "claude", "max_tokens": 1,
        "system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "B"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    }));
    let out = anthropic_request_to_openai_chat(&req, "").unwrap();
    assert_eq!(
        out["model"], "claude",
        "empty upstream model keeps the client's"
    );
    assert_eq!(
        out["messages"][0],
        json!({"role": "system", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]})
    );
    assert_eq!(out["messages"][1], json!({"role": "user", "content": "hi"}));
}

#[test]
fn anthropic_to_openai_sampling_stream_and_user() {
    let req = obj(json!({
        "model": "c", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "stop_sequences": ["END", "STOP"], "stream": true, "metadata": {"user_id": "u-1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "hi"}]
    }));
    let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
    assert_eq!(out["temperature"], 0.5);
    assert_eq!(out["top_p"], 0.9);
    assert_eq!(out["stop"], json!(["END", "STOP"]));
    assert_eq!(out["stream"], true);
    assert_eq!(out["stream_options"], json!({"include_usage": true}));
    assert_eq!(out["user"], "u-1");
    assert!(out.get("top_k").is_none() && out.get("thinking").is_none());
}

#[test]
fn anthropic_to_openai_requires_max_tokens_and_messages() {
    let (msg, param) = err(anthropic_request_to_openai_chat(
        &obj(json!({"model": "c", "messages": []})),
        "m",
    ));
    assert!(msg.contains("max_tokens"));
    assert_eq!(param, Some("max_tokens"));
    let (_, param) = err(anthropic_request_to_openai_chat(
        &obj(json!({"model": "c", "max_tokens": 3})),
        "m",
    ));
    assert_eq!(param, Some("messages"));
    let (msg, _) = err(anthropic_request_to_openai_chat(
        &obj(
            json!({"model": "c", "max_tokens": 3, "messages": [{"role": "system", "content": "x"}]}),
        ),
        "m",
    ));
    assert!(msg.contains("messages.0.role"), "{msg}");
}

#[test]
fn anthropic_to_openai_tool_round() {
    let req = obj(json!({
        "model": "c", "max_tokens": 50,
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}, "cache_control": {"type": "ephemeral"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C", "is_error": false},
                {"type": "text", "text": "And tomorrow?"}
            ]}
        ]
    }));
    let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
    assert_eq!(
        out["tools"],
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}])
    );
    assert_eq!(out["tool_choice"], "required");
    assert_eq!(out["parallel_tool_calls"], false);
    assert_eq!(
        out["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "user", "content": "And tomorrow?"}
        ])
    );
    // Back again: the same conversation.
    let back = openai_chat_request_to_anthropic(&out, "c").unwrap();
    assert_eq!(
        back["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        back["tools"][0]["input_schema"],
        req["tools"][0]["input_schema"]
    );
    assert_eq!(
        back["messages"],
        json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {"type": "text", "text": "And tomorrow?"}
            ]}
        ])
    );
}

#[test]
fn anthropic_tool_choice_variants() {
    let base = |choice: Value| {
        obj(json!({
            "model": "c", "max_tokens": 1, "tool_choice": choice,
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "x"}]
        }))
    };
    let map = |choice: Value| anthropic_request_to_openai_chat(&base(choice), "m").unwrap();
    assert_eq!(map(json!({"type": "auto"}))["tool_choice"], "auto");
    assert_eq!(map(json!({"type": "none"}))["tool_choice"], "none");
    assert_eq!(
        map(json!({"type": "tool", "name": "f"}))["tool_choice"],
        json!({"type": "function", "function": {"name": "f"}})
    );
    assert!(
        map(json!({"type": "auto"}))
            .get("parallel_tool_calls")
            .is_none()
    );
    let (_, param) = err(anthropic_request_to_openai_chat(
        &base(json!({"type": "bogus"})),
        "m",
    ));
    assert_eq!(param, Some("tool_choice"));
    // No tools: neither tools nor tool_choice (OpenAI refuses both).
    let req = obj(
        json!({"model": "c", "max_tokens": 1, "tools": [], "tool_choice": {"type": "auto"}, "messages": []}),
    );
    let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
    assert!(out.get("tools").is_none() && out.get("tool_choice").is_none());
}

#[test]
fn anthropic_server_tools_and_blocks_are_refused() {
    let req = obj(json!({
        "model": "c", "max_tokens": 1,
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        "messages": [{"role": "user", "content": "x"}]
    }));
    let (msg, param) = err(anthropic_request_to_openai_chat(&req, "m"));
    assert!(msg.contains("web_search_20250305"), "{msg}");
    assert_eq!(param, Some("tools"));
    let req = obj(json!({
        "model": "c", "max_tokens": 1,
        "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
        ]}]}]
    }));
    let (msg, _) = err(anthropic_request_to_openai_chat(&req, "m"));
    assert!(msg.contains("messages.0.content.0.content.0"), "{msg}");
    let req = obj(json!({
        "model": "c", "max_tokens": 1,
        "messages": [{"role": "assistant", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]}]
    }));
    let (msg, _) = err(anthropic_request_to_openai_chat(&req, "m"));
    assert!(msg.contains("server_tool_use"), "{msg}");
}

#[test]
fn images_and_documents_both_ways() {
    let req = obj(json!({
        "model": "c", "max_tokens": 1,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
            {"type": "document", "title": "report.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0"}}
        ]}]
    }));
    let out = anthropic_request_to_openai_chat(&req, "m").unwrap();
    assert_eq!(
        out["messages"][0]["content"],
        json!([
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "file", "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0"}}
        ])
    );
    let back = openai_chat_request_to_anthropic(&out, "c").unwrap();
    assert_eq!(back["messages"], req["messages"]);

    let bad = obj(
        json!({"model": "g", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}),
    );
    assert_eq!(
        err(openai_chat_request_to_anthropic(&bad, "c")).1,
        Some("messages")
    );
    let bad = obj(
        json!({"model": "g", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]}),
    );
    assert!(
        err(openai_chat_request_to_anthropic(&bad, "c"))
            .0
            .contains("input_audio")
    );
    let bad = obj(
        json!({"model": "g", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-1"}}]}]}),
    );
    assert!(
        err(openai_chat_request_to_anthropic(&bad, "c"))
            .0
            .contains("file ids")
    );
}

#[test]
fn openai_to_anthropic_systems_are_hoisted() {
    let req = obj(json!({
        "model": "g",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi", "name": "bob"}
        ]
    }));
    let out = openai_chat_request_to_anthropic(&req, "claude-x").unwrap();
    assert_eq!(out["model"], "claude-x");
    assert_eq!(out["system"], "Be brief.");
    assert_eq!(out["max_tokens"], DEFAULT_MAX_TOKENS);
    assert_eq!(out["messages"], json!([{"role": "user", "content": "hi"}]));

    let req = obj(json!({
        "model": "g", "max_tokens": 7, "max_completion_tokens": 9,
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "A"}]},
            {"role": "user", "content": "hi"},
            {"role": "system", "content": "B"}
        ]
    }));
    let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
    assert_eq!(
        out["system"],
        json!([{"type": "text", "text": "A"}, {"type": "text", "text": "B"}])
    );
    assert_eq!(out["max_tokens"], 9, "max_completion_tokens wins");
    let req = obj(json!({"model": "g", "max_tokens": 7, "messages": []}));
    assert_eq!(
        openai_chat_request_to_anthropic(&req, "c").unwrap()["max_tokens"],
        7
    );
}

#[test]
fn openai_to_anthropic_sampling_and_stop() {
    let req = obj(json!({
        "model": "g", "temperature": 1.5, "top_p": 0.5, "stop": "END", "stream": true,
        "stream_options": {"include_usage": true}, "user": "u", "seed": 3, "presence_penalty": 0.1,
        "n": 1, "response_format": {"type": "text"}, "logprobs": false,
        "messages": [{"role": "user", "content": "x"}]
    }));
    let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
    assert_eq!(out["temperature"], 1.0, "clamped to Anthropic's range");
    assert_eq!(out["top_p"], 0.5);
    assert_eq!(out["stop_sequences"], json!(["END"]));
    assert_eq!(out["stream"], true);
    assert_eq!(out["metadata"], json!({"user_id": "u"}));
    for k in [
        "stream_options",
        "seed",
        "presence_penalty",
        "n",
        "response_format",
        "logprobs",
        "user",
    ] {
        assert!(out.get(k).is_none(), "{k} dropped");
    }
    let req = obj(json!({"model": "g", "temperature": 0.3, "stop": ["a", "b"], "messages": []}));
    let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
    assert_eq!(out["temperature"], 0.3);
    assert_eq!(out["stop_sequences"], json!(["a", "b"]));
}

#[test]
fn openai_meaning_changes_are_refused() {
    for (extra, param) in [
        (json!({"n": 2}), "n"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"logprobs": true}), "logprobs"),
        (json!({"modalities": ["text", "audio"]}), "modalities"),
        (json!({"functions": [{"name": "f"}]}), "functions"),
        (json!({"function_call": "auto"}), "function_call"),
        (json!({"web_search_options": {}}), "web_search_options"),
        (
            json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
            "tools",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "allowed_tools"}}),
            "tool_choice",
        ),
    ] {
        let mut req = obj(json!({"model": "g", "messages": [{"role": "user", "content": "x"}]}));
        req.extend(obj(extra.clone()));
        let (msg, p) = err(openai_chat_request_to_anthropic(&req, "c"));
        assert_eq!(p, Some(param), "{extra}: {msg}");
    }
}

#[test]
fn openai_to_anthropic_tools_and_results() {
    let req = obj(json!({
        "model": "g", "parallel_tool_calls": false,
        "tools": [{"type": "function", "function": {"name": "f", "description": "F", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}, "strict": true}},
                  {"type": "function", "function": {"name": "g"}}],
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": ""}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
            {"role": "assistant", "content": "done"}
        ]
    }));
    let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
    assert_eq!(
        out["tools"],
        json!([
            {"name": "f", "description": "F", "input_schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
            {"name": "g", "input_schema": {"type": "object", "properties": {}}}
        ])
    );
    assert_eq!(
        out["tool_choice"],
        json!({"type": "auto", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        out["messages"],
        json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                {"type": "tool_use", "id": "call_2", "name": "g", "input": {}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "two"}]}
            ]},
            {"role": "assistant", "content": "done"}
        ])
    );
    let mut choice = req.clone();
    for (c, want) in [
        (
            json!("required"),
            json!({"type": "any", "disable_parallel_tool_use": true}),
        ),
        (json!("none"), json!({"type": "none"})),
        (
            json!({"type": "function", "function": {"name": "g"}}),
            json!({"type": "tool", "name": "g", "disable_parallel_tool_use": true}),
        ),
    ] {
        choice.insert("tool_choice".into(), c);
        assert_eq!(
            openai_chat_request_to_anthropic(&choice, "c").unwrap()["tool_choice"],
            want
        );
    }
}

#[test]
fn openai_bad_tool_arguments_are_refused() {
    let req = obj(json!({"model": "g", "messages": [
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1,2]"}}]}
    ]}));
    let (msg, _) = err(openai_chat_request_to_anthropic(&req, "c"));
    assert!(
        msg.contains("messages.0.tool_calls.0.function.arguments"),
        "{msg}"
    );
    let req =
        obj(json!({"model": "g", "messages": [{"role": "function", "name": "f", "content": "x"}]}));
    assert!(
        err(openai_chat_request_to_anthropic(&req, "c"))
            .0
            .contains("legacy")
    );
    let req = obj(json!({"model": "g", "messages": [{"role": "tool", "content": "x"}]}));
    assert!(
        err(openai_chat_request_to_anthropic(&req, "c"))
            .0
            .contains("tool_call_id")
    );
}

#[test]
fn tool_messages_merge_with_the_next_user_message() {
    let req = obj(json!({"model": "g", "messages": [
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r"},
        {"role": "user", "content": "next"},
        {"role": "user", "content": "again"}
    ]}));
    let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
    assert_eq!(
        out["messages"],
        json!([
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "r"}, {"type": "text", "text": "next"}]},
            {"role": "user", "content": "again"}
        ])
    );
    // And the way back splits them again.
    let back = anthropic_request_to_openai_chat(&out, "g").unwrap();
    assert_eq!(
        back["messages"],
        json!([
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r"},
            {"role": "user", "content": "next"},
            {"role": "user", "content": "again"}
        ])
    );
}

#[test]
fn empty_assistant_turns_are_dropped() {
    let req = obj(json!({"model": "g", "messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": "b"}
    ]}));
    let out = openai_chat_request_to_anthropic(&req, "c").unwrap();
    assert_eq!(
        out["messages"],
        json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    );
}
