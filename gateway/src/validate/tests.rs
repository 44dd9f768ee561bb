#![allow(clippy::unwrap_used, clippy::panic)]

use serde_json::{Value, json};

use super::*;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn chat(extra: Value) -> Map<String, Value> {
    let mut m = obj(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    m.extend(obj(extra));
    m
}

fn messages(extra: Value) -> Map<String, Value> {
    let mut m = obj(
        json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
    );
    m.extend(obj(extra));
    m
}

fn fault(api: Api, req: &Map<String, Value>) -> Invalid {
    match check_fields(api, req) {
        Err(i) => i,
        Ok(_) => panic!("{api:?} accepted {}", Value::Object(req.clone())),
    }
}

/// (api, body, OpenAI param, OpenAI code, message fragment)
type OpenAiRow = (
    Api,
    Map<String, Value>,
    &'static str,
    &'static str,
    &'static str,
);

#[test]
fn openai_faults_name_the_field_with_openais_words() {
    let rows: Vec<OpenAiRow> = vec![
        (
            Api::Chat,
            chat(json!({"messages": [{"role": 5, "content": "x"}]})),
            "messages[0].role",
            "invalid_type",
            "Invalid type for 'messages[0].role': expected one of 'system', 'assistant', 'user', 'function', 'tool', or 'developer', but got an integer instead.",
        ),
        (
            Api::Chat,
            chat(json!({"messages": [{"role": "robot", "content": "x"}]})),
            "messages[0].role",
            "invalid_value",
            "Invalid value: 'robot'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'.",
        ),
        (
            Api::Chat,
            chat(json!({"max_tokens": 0})),
            "max_tokens",
            "integer_below_min_value",
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        ),
        (
            Api::Chat,
            chat(json!({"max_completion_tokens": 0})),
            "max_completion_tokens",
            "integer_below_min_value",
            ">= 1",
        ),
        (
            Api::Chat,
            chat(json!({"n": 0})),
            "n",
            "integer_below_min_value",
            "",
        ),
        (
            Api::Chat,
            chat(json!({"n": 129})),
            "n",
            "integer_above_max_value",
            "<= 128, but got 129",
        ),
        (
            Api::Chat,
            chat(json!({"temperature": 2.5})),
            "temperature",
            "decimal_above_max_value",
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 2.5 instead.",
        ),
        (
            Api::Chat,
            chat(json!({"temperature": "hot"})),
            "temperature",
            "invalid_type",
            "expected a decimal, but got a string instead",
        ),
        (
            Api::Chat,
            chat(json!({"top_p": -0.1})),
            "top_p",
            "decimal_below_min_value",
            ">= 0",
        ),
        (
            Api::Chat,
            chat(json!({"presence_penalty": -3})),
            "presence_penalty",
            "decimal_below_min_value",
            ">= -2",
        ),
        (
            Api::Chat,
            chat(json!({"stream": "yes"})),
            "stream",
            "invalid_type",
            "expected a boolean",
        ),
        (
            Api::Chat,
            chat(json!({"stop": ["a", "b", "c", "d", "e"]})),
            "stop",
            "array_above_max_length",
            "maximum length 4, but got an array with length 5",
        ),
        (
            Api::Chat,
            chat(json!({"stop": ["a", 1]})),
            "stop[1]",
            "invalid_type",
            "",
        ),
        (
            Api::Chat,
            chat(json!({"top_logprobs": 21})),
            "top_logprobs",
            "integer_above_max_value",
            "",
        ),
        (
            Api::Chat,
            chat(json!({"seed": 1.5})),
            "seed",
            "invalid_type",
            "expected an integer, but got a decimal instead",
        ),
        (
            Api::Chat,
            chat(json!({"messages": []})),
            "messages",
            "empty_array",
            "empty array",
        ),
        (
            Api::Chat,
            chat(json!({"messages": "hi"})),
            "messages",
            "invalid_type",
            "expected an array, but got a string instead",
        ),
        (
            Api::Chat,
            chat(json!({"messages": [{"role": "user", "content": 5}]})),
            "messages[0].content",
            "invalid_type",
            "one of a string or array of objects",
        ),
        (
            Api::Chat,
            chat(json!({"messages": [{"role": "user"}]})),
            "messages[0].content",
            "missing_required_parameter",
            "Missing required parameter: 'messages[0].content'.",
        ),
        (
            Api::Chat,
            chat(json!({"messages": [{"role": "user", "content": [{"text": "x"}]}]})),
            "messages[0].content[0].type",
            "missing_required_parameter",
            "",
        ),
        (
            Api::Chat,
            chat(json!({"messages": [{"role": "tool", "content": "x"}]})),
            "messages[0].tool_call_id",
            "missing_required_parameter",
            "",
        ),
        (
            Api::Chat,
            chat(json!({"model": 5})),
            "model",
            "invalid_type",
            "expected a string",
        ),
        (
            Api::Chat,
            obj(json!({"messages": [{"role": "user", "content": "x"}]})),
            "model",
            "missing_required_parameter",
            "you must provide a model parameter",
        ),
        (
            Api::Chat,
            chat(json!({"stream_options": {"include_usage": true}})),
            "stream_options",
            "invalid_value",
            "only allowed when 'stream' is enabled",
        ),
        (
            Api::Chat,
            chat(json!({"stream": true, "stream_options": {"include_usage": "y"}})),
            "stream_options.include_usage",
            "invalid_type",
            "",
        ),
        (
            Api::Completions,
            obj(json!({"model": "m", "prompt": "x", "logprobs": 6})),
            "logprobs",
            "integer_above_max_value",
            "<= 5",
        ),
        (
            Api::Completions,
            obj(json!({"model": "m", "prompt": "x", "max_tokens": -1})),
            "max_tokens",
            "integer_below_min_value",
            ">= 0",
        ),
        (
            Api::Completions,
            obj(json!({"model": "m", "prompt": 5})),
            "prompt",
            "invalid_type",
            "",
        ),
        (
            Api::Completions,
            obj(json!({"model": "m"})),
            "prompt",
            "missing_required_parameter",
            "",
        ),
        (
            Api::Embeddings,
            obj(json!({"model": "m", "input": []})),
            "input",
            "empty_array",
            "",
        ),
        (
            Api::Embeddings,
            obj(json!({"model": "m", "input": ""})),
            "input",
            "invalid_value",
            "empty string",
        ),
        (
            Api::Embeddings,
            obj(json!({"model": "m", "input": "x", "dimensions": 0})),
            "dimensions",
            "integer_below_min_value",
            "",
        ),
        (
            Api::Embeddings,
            obj(json!({"model": "m", "input": "x", "encoding_format": "hex"})),
            "encoding_format",
            "invalid_value",
            "'float' and 'base64'",
        ),
        (
            Api::Embeddings,
            obj(json!({"model": "m", "input": "x", "stream": true})),
            "stream",
            "invalid_value",
            "",
        ),
        (
            Api::Responses,
            obj(json!({"model": "m", "input": "x", "max_output_tokens": 0})),
            "max_output_tokens",
            "integer_below_min_value",
            ">= 16",
        ),
        (
            Api::Responses,
            obj(json!({"model": "m", "input": [{"role": "robot", "content": "x"}]})),
            "input[0].role",
            "invalid_value",
            "",
        ),
        (
            Api::Responses,
            obj(json!({"model": "m", "input": "x", "temperature": 3})),
            "temperature",
            "decimal_above_max_value",
            "",
        ),
    ];
    let n = rows.len();
    for (api, req, param, code, fragment) in rows {
        let i = fault(api, &req);
        assert_eq!(i.param(), param, "{api:?} {}", Value::Object(req.clone()));
        assert_eq!(i.code(), code, "{api:?} {param}");
        let message = i.message(ApiStyle::OpenAi);
        assert!(message.contains(fragment), "{param}: {message}");
    }
    assert!(n >= 30);
}

#[test]
fn anthropic_faults_in_pydantic_words() {
    let rows: Vec<(Api, Map<String, Value>, &str)> = vec![
        (
            Api::Messages,
            messages(json!({"max_tokens": 0})),
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            Api::Messages,
            {
                let mut m = messages(json!({}));
                m.remove("max_tokens");
                m
            },
            "max_tokens: Field required",
        ),
        (
            Api::Messages,
            messages(json!({"max_tokens": "8"})),
            "max_tokens: Input should be a valid integer",
        ),
        (
            Api::Messages,
            messages(json!({"temperature": 1.5})),
            "temperature: Input should be less than or equal to 1",
        ),
        (
            Api::Messages,
            messages(json!({"top_p": 2})),
            "top_p: Input should be less than or equal to 1",
        ),
        (
            Api::Messages,
            messages(json!({"top_k": -1})),
            "top_k: Input should be greater than or equal to 0",
        ),
        (
            Api::Messages,
            messages(json!({"messages": [{"role": "system", "content": "x"}]})),
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            Api::Messages,
            messages(json!({"messages": [{"role": 5, "content": "x"}]})),
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            Api::Messages,
            messages(json!({"messages": [{"role": "user", "content": 5}]})),
            "messages.0.content: Input should be a valid string or a list of content blocks",
        ),
        (
            Api::Messages,
            messages(json!({"messages": []})),
            "messages: at least one message is required",
        ),
        (
            Api::Messages,
            messages(json!({"system": 5})),
            "system: Input should be a valid string or a list of text blocks",
        ),
        (
            Api::Messages,
            messages(json!({"system": [{"type": "image", "text": "x"}]})),
            "system.0.type: Input should be 'text'",
        ),
        (
            Api::Messages,
            messages(json!({"stop_sequences": [1]})),
            "stop_sequences.0: Input should be a valid string",
        ),
        (
            Api::Messages,
            messages(json!({"stream": 1})),
            "stream: Input should be a valid boolean",
        ),
        (
            Api::CountTokens,
            obj(json!({"model": "m"})),
            "messages: Field required",
        ),
    ];
    for (api, req, expected) in rows {
        let i = fault(api, &req);
        assert_eq!(i.message(ApiStyle::Anthropic), expected);
    }
}

#[test]
fn valid_and_unusual_requests_pass() {
    let ok: Vec<(Api, Map<String, Value>)> = vec![
        (
            Api::Chat,
            chat(json!({
                "temperature": 0, "top_p": 1, "n": 128, "max_tokens": 1,
                "max_completion_tokens": 1.0, "presence_penalty": -2, "frequency_penalty": 2,
                "stop": "x", "logprobs": true, "top_logprobs": 20, "seed": -5,
                "stream": true, "stream_options": {"include_usage": true, "future": 1},
                "a_field_from_next_year": {"anything": [1, 2]}, "reasoning_effort": "max",
                "temperature_unknown_cousin": "hot", "user": null, "n_unknown": -1,
            })),
        ),
        (
            Api::Chat,
            chat(json!({"messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be nice"}]},
                {"role": "user", "content": [{"type": "brand_new_part", "whatever": 1}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c", "content": "42"},
            ], "stop": ["a", "b", "c", "d"], "temperature": null})),
        ),
        (
            Api::Completions,
            obj(
                json!({"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 0, "echo": true, "logprobs": 5}),
            ),
        ),
        (
            Api::Embeddings,
            obj(
                json!({"model": "m", "input": ["a", "b"], "dimensions": 8, "encoding_format": "base64"}),
            ),
        ),
        (
            Api::Responses,
            obj(
                json!({"model": "m", "input": [{"role": "user", "content": "x"}, {"type": "function_call_output", "call_id": "c", "output": "1"}], "max_output_tokens": 16, "new_knob": true}),
            ),
        ),
        (
            Api::Messages,
            messages(json!({
                "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
                "temperature": 1, "top_k": 0, "top_p": 0.5, "stop_sequences": ["x"],
                "metadata": {"user_id": "u"}, "future_param": [1],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}],
            })),
        ),
        (
            Api::CountTokens,
            obj(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "system": "s"}),
            ),
        ),
    ];
    for (api, req) in ok {
        if let Err(i) = check_fields(api, &req) {
            panic!(
                "{api:?} refused {}: {}",
                Value::Object(req),
                i.message(api.style())
            );
        }
    }
    let streamed = check_fields(Api::Chat, &chat(json!({"stream": true}))).unwrap();
    assert!(streamed.stream);
    assert!(!check_fields(Api::Chat, &chat(json!({}))).unwrap().stream);
}

#[test]
fn paths_render_in_each_apis_form() {
    let loc = Loc::root().key("messages").index(2).key("content").index(0);
    assert_eq!(loc.openai(), "messages[2].content[0]");
    assert_eq!(loc.anthropic(), "messages.2.content.0");
}
