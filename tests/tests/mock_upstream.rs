//! The mock upstream against a real HTTP client: every route's JSON shape, SSE
//! framing, injected failures, cuts, controls and the token-count rule.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A mock served in-process on a free port; stops when dropped.
struct Mock {
    base: String,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Mock {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(tollgate_tests::mock::serve(listener, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Self {
            base: format!("http://{addr}"),
            client,
            _stop: stop,
        }
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .header("authorization", "Bearer ignored")
            .json(body)
    }

    async fn json(&self, path: &str, body: Value) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = self.post(path, &body).send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let value: Value = resp.json().await.unwrap();
        (status, headers, value)
    }

    async fn text(&self, req: reqwest::RequestBuilder) -> (reqwest::header::HeaderMap, String) {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let headers = resp.headers().clone();
        (headers, resp.text().await.unwrap())
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }
}

/// OpenAI SSE: the JSON of each `data:` event, and whether `[DONE]` ended it.
fn openai_events(body: &str) -> (Vec<Value>, bool) {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    let mut events = Vec::new();
    let mut done = false;
    for frame in body.split("\n\n").filter(|f| !f.is_empty()) {
        assert!(!done, "nothing after [DONE]");
        let data = frame.strip_prefix("data: ").unwrap();
        assert!(!data.contains('\n'), "one line per event: {frame:?}");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done)
}

/// Anthropic SSE: `(event name, data JSON)` pairs; the name equals `data.type`.
fn anthropic_events(body: &str) -> Vec<(String, Value)> {
    assert!(
        body.ends_with("\n\n"),
        "events end with a blank line: {body:?}"
    );
    body.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|frame| {
            let (event, data) = frame.split_once('\n').unwrap();
            let name = event.strip_prefix("event: ").unwrap().to_string();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], name.as_str());
            (name, data)
        })
        .collect()
}

fn reply(words: usize) -> String {
    (0..words)
        .map(|i| match i {
            0 => "mock ".to_string(),
            1 => "reply ".to_string(),
            _ => format!("word{} ", i - 1),
        })
        .collect()
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "mock-gpt",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "hello big  world"}]},
        ],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// Prompt tokens of `chat_body`: 3 + 3 words, 2 messages.
const CHAT_PROMPT: u64 = 6 + 2 * 3;

#[tokio::test]
async fn chat_completion_shape_and_counts() {
    let mock = Mock::start().await;
    let (status, headers, v) = mock
        .json(
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": 5, "n": 1, "tools": []})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    let expected = json!({
        "id": v["id"], "object": "chat.completion", "created": v["created"], "model": "mock-gpt",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply(5), "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": CHAT_PROMPT, "completion_tokens": 5, "total_tokens": CHAT_PROMPT + 5,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
        "system_fingerprint": "fp_mock",
    });
    assert_eq!(v, expected);

    // Default cap 16; max_completion_tokens wins over max_tokens; the header
    // overrides both and the cap.
    let (_, _, v) = mock
        .json("/v1/chat/completions", chat_body(json!({})))
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["choices"][0]["message"]["content"], reply(16));
    let (_, _, v) = mock
        .json(
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": 100})),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 16);
    let (_, _, v) = mock
        .json(
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": 9, "max_completion_tokens": 2})),
        )
        .await;
    assert_eq!(v["usage"]["completion_tokens"], 2);
    let v: Value = mock
        .post("/v1/chat/completions", &chat_body(json!({"max_tokens": 2})))
        .header("x-mock-output-tokens", "40")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 40);
    assert_eq!(v["choices"][0]["message"]["content"], reply(40));

    // Empty conversation: at least one prompt token.
    let (_, _, v) = mock
        .json(
            "/v1/chat/completions",
            json!({"model": "m", "messages": []}),
        )
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], 1);
}

#[tokio::test]
async fn chat_stream_with_usage_ends_with_usage_chunk_and_done() {
    let mock = Mock::start().await;
    let body = chat_body(
        json!({"max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let (headers, text) = mock.text(mock.post("/v1/chat/completions", &body)).await;
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let (events, done) = openai_events(&text);
    assert!(done);
    // role chunk, 4 content chunks, finish chunk, usage chunk
    assert_eq!(events.len(), 7, "{text}");
    let id = events[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for e in &events {
        assert_eq!(e["id"], id);
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["model"], "mock-gpt");
        assert!(e.as_object().unwrap().contains_key("usage"));
    }
    assert_eq!(
        events[0]["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": null},
                "logprobs": null, "finish_reason": null}])
    );
    let content: String = events[1..5]
        .iter()
        .map(|e| {
            assert!(e["usage"].is_null());
            assert!(e["choices"][0]["finish_reason"].is_null());
            e["choices"][0]["delta"]["content"].as_str().unwrap()
        })
        .collect();
    assert_eq!(content, reply(4));
    assert_eq!(
        events[5]["choices"],
        json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}])
    );
    assert!(events[5]["usage"].is_null());
    assert_eq!(events[6]["choices"], json!([]));
    assert_eq!(events[6]["usage"]["prompt_tokens"], CHAT_PROMPT);
    assert_eq!(events[6]["usage"]["completion_tokens"], 4);
    assert_eq!(events[6]["usage"]["total_tokens"], CHAT_PROMPT + 4);
}

#[tokio::test]
async fn chat_stream_without_usage() {
    let mock = Mock::start().await;
    // Not asked: no usage key anywhere.
    let body = chat_body(json!({"max_tokens": 2, "stream": true}));
    let (_, text) = mock.text(mock.post("/v1/chat/completions", &body)).await;
    let (events, done) = openai_events(&text);
    assert!(done);
    assert_eq!(events.len(), 4);
    assert!(
        events
            .iter()
            .all(|e| !e.as_object().unwrap().contains_key("usage"))
    );
    assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");

    // Asked, but x-mock-no-usage (header or model segment) wins.
    let body = chat_body(
        json!({"max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let (_, text) = mock
        .text(
            mock.post("/v1/chat/completions", &body)
                .header("x-mock-no-usage", "1"),
        )
        .await;
    let (events, done) = openai_events(&text);
    assert!(done);
    assert_eq!(events.len(), 4);
    assert!(!text.contains("usage"));
    let mut body = body;
    body["model"] = json!("mock-gpt-no-usage");
    let (_, text) = mock.text(mock.post("/v1/chat/completions", &body)).await;
    assert!(!text.contains("\"usage\""), "{text}");
}

#[tokio::test]
async fn chat_tool_calls_plain_and_streamed() {
    let mock = Mock::start().await;
    let body = chat_body(json!({"max_tokens": 3}));
    let v: Value = mock
        .post("/v1/chat/completions", &body)
        .header("x-mock-tool-call", "get_weather")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"text": reply(3)}));
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // Streamed, with the control in the model name.
    let mut body = chat_body(
        json!({"max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}),
    );
    body["model"] = json!("mock-gpt-tool-call-lookup_city");
    let (_, text) = mock.text(mock.post("/v1/chat/completions", &body)).await;
    let (events, done) = openai_events(&text);
    assert!(done);
    let first = &events[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert_eq!(first["tool_calls"][0]["index"], 0);
    assert_eq!(first["tool_calls"][0]["function"]["name"], "lookup_city");
    assert!(
        first["tool_calls"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("call_")
    );
    let args: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"text": reply(3)})
    );
    let n = events.len();
    assert_eq!(events[n - 2]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(events[n - 1]["usage"]["completion_tokens"], 3);
}

#[tokio::test]
async fn cached_and_reasoning_tokens() {
    let mock = Mock::start().await;
    let body = chat_body(json!({"max_tokens": 4}));
    let v: Value = mock
        .post("/v1/chat/completions", &body)
        .header("x-mock-cached-tokens", "100")
        .header("x-mock-reasoning-tokens", "7")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], CHAT_PROMPT + 100);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 100);
    assert_eq!(u["completion_tokens"], 4 + 7);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 7);
    assert_eq!(u["total_tokens"], CHAT_PROMPT + 100 + 11);

    let body = json!({"model": "mock-claude-cached-tokens-50", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "one two"}]});
    let v: Value = mock
        .post("/v1/messages", &body)
        .header("x-mock-reasoning-tokens", "3")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 5, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 50, "output_tokens": 7})
    );
}

#[tokio::test]
async fn legacy_completions() {
    let mock = Mock::start().await;
    let (status, _, v) = mock
        .json(
            "/v1/completions",
            json!({"model": "mock-gpt", "prompt": "say  this now", "max_tokens": 3}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"],
        json!([{"text": reply(3), "index": 0, "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6})
    );

    // Prompt forms: strings and token arrays.
    let (_, _, v) = mock
        .json(
            "/v1/completions",
            json!({"model": "m", "prompt": ["a b", [1, 2, 3]]}),
        )
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], 5);

    let body = json!({"model": "mock-gpt", "prompt": "x", "max_tokens": 2, "stream": true,
                      "stream_options": {"include_usage": true}});
    let (_, text) = mock.text(mock.post("/v1/completions", &body)).await;
    let (events, done) = openai_events(&text);
    assert!(done);
    assert_eq!(events.len(), 4);
    let content: String = events[..2]
        .iter()
        .map(|e| {
            assert_eq!(e["object"], "text_completion");
            assert!(e["usage"].is_null());
            e["choices"][0]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(content, reply(2));
    assert_eq!(events[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[3]["choices"], json!([]));
    assert_eq!(
        events[3]["usage"],
        json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    );
}

fn messages_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "mock-claude",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "Be brief please", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "What is the weather"},
            {"role": "assistant", "content": [{"type": "text", "text": "Which city?"}]},
            {"role": "user", "content": [{"type": "text", "text": "Paris"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]},
        ],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// Prompt tokens of `messages_body`: system 3 + words 4 + 2 + 1, 3 messages.
const MESSAGES_PROMPT: u64 = 3 + 7 + 3 * 3;

#[tokio::test]
async fn anthropic_message_shape_and_count_tokens() {
    let mock = Mock::start().await;
    let (status, headers, v) = mock
        .json("/v1/messages", messages_body(json!({"max_tokens": 6})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("msg_01") && id.len() == 28, "{id}");
    assert_eq!(
        v,
        json!({"id": id, "type": "message", "role": "assistant", "model": "mock-claude",
               "content": [{"type": "text", "text": reply(6)}],
               "stop_reason": "end_turn", "stop_sequence": null,
               "usage": {"input_tokens": MESSAGES_PROMPT, "cache_creation_input_tokens": 0,
                         "cache_read_input_tokens": 0, "output_tokens": 6}})
    );

    let (status, _, v) = mock
        .json("/v1/messages/count_tokens", messages_body(json!({})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"input_tokens": MESSAGES_PROMPT}));
    let (_, _, v) = mock
        .json(
            "/v1/messages/count_tokens",
            json!({"model": "m", "system": "a b c", "messages": [{"role": "user", "content": "d"}]}),
        )
        .await;
    assert_eq!(v, json!({"input_tokens": 3 + 1 + 3}));

    // Tool use.
    let v: Value = mock
        .post("/v1/messages", &messages_body(json!({"max_tokens": 2})))
        .header("x-mock-tool-call", "get_weather")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    let block = &v["content"][0];
    assert_eq!(block["type"], "tool_use");
    assert!(block["id"].as_str().unwrap().starts_with("toolu_01"));
    assert_eq!(block["name"], "get_weather");
    assert_eq!(block["input"], json!({"text": reply(2)}));
}

#[tokio::test]
async fn anthropic_stream_event_sequence() {
    let mock = Mock::start().await;
    let body = messages_body(json!({"max_tokens": 3, "stream": true}));
    let (headers, text) = mock.text(mock.post("/v1/messages", &body)).await;
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = anthropic_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start = &events[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    assert_eq!(
        start["usage"],
        json!({"input_tokens": MESSAGES_PROMPT, "cache_creation_input_tokens": 0,
               "cache_read_input_tokens": 0, "output_tokens": 1})
    );
    assert_eq!(
        events[1].1,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    let text_out: String = events[3..6]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["index"], 0);
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text_out, reply(3));
    assert_eq!(
        events[6].1,
        json!({"type": "content_block_stop", "index": 0})
    );
    assert_eq!(
        events[7].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": 3}})
    );
    assert_eq!(events[8].1, json!({"type": "message_stop"}));
    // Byte-exact framing of the fixed events.
    assert!(text.contains("event: ping\ndata: {\"type\": \"ping\"}\n\n"));
    assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));

    // Tool use, streamed with input_json_delta.
    let (_, text) = mock
        .text(
            mock.post("/v1/messages", &body)
                .header("x-mock-tool-call", "get_weather"),
        )
        .await;
    let events = anthropic_events(&text);
    assert_eq!(events[1].1["content_block"]["type"], "tool_use");
    assert_eq!(events[1].1["content_block"]["name"], "get_weather");
    assert_eq!(events[1].1["content_block"]["input"], json!({}));
    let json_text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap(),
        json!({"text": reply(3)})
    );
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], 3);
}

/// Reads a streamed body until it ends or breaks: (text, broke).
async fn read_until_error(resp: reqwest::Response) -> (String, bool) {
    let mut stream = resp.bytes_stream();
    let mut got = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => return (String::from_utf8(got).unwrap(), true),
        }
    }
    (String::from_utf8(got).unwrap(), false)
}

#[tokio::test]
async fn cut_after_drops_the_connection_mid_stream() {
    let mock = Mock::start().await;
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let resp = mock
        .post("/v1/chat/completions", &body)
        .header("x-mock-cut-after", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (text, broke) = read_until_error(resp).await;
    assert!(broke, "the body must end with an error, got {text:?}");
    let (events, done) = openai_events(&text);
    assert!(!done);
    assert_eq!(events.len(), 4, "role chunk and 3 content chunks: {text}");
    assert!(
        events
            .iter()
            .all(|e| e["choices"][0]["finish_reason"].is_null())
    );

    // Anthropic, with a chunk delay, through the model name.
    let body =
        messages_body(json!({"model": "mock-claude-cut-after-2-chunk-delay-ms-5", "stream": true}));
    let resp = mock.post("/v1/messages", &body).send().await.unwrap();
    let (text, broke) = read_until_error(resp).await;
    assert!(broke);
    let events = anthropic_events(&text);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta"
        ]
    );

    // The server is still fine afterwards.
    let (status, _, _) = mock
        .json("/v1/chat/completions", chat_body(json!({})))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn injected_failures_in_each_providers_shape() {
    let mock = Mock::start().await;
    let resp = mock
        .post("/v1/chat/completions", &chat_body(json!({})))
        .header("x-mock-fail", "429")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    let err = v["error"].as_object().unwrap();
    assert!(err["message"].is_string());
    assert_eq!(err["type"], "requests");
    assert!(err["param"].is_null());
    assert_eq!(err["code"], "rate_limit_exceeded");

    let (status, headers, v) = mock
        .json(
            "/v1/chat/completions",
            chat_body(json!({"model": "mock-fail-503", "stream": true})),
        )
        .await;
    assert_eq!(status, 503);
    assert!(!headers.contains_key("retry-after"));
    assert_eq!(v["error"]["type"], "server_error");

    let (status, _, v) = mock
        .json(
            "/v1/messages",
            messages_body(json!({"model": "mock-claude-fail-529"})),
        )
        .await;
    assert_eq!(status, 529);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert!(v["error"]["message"].is_string());
    let resp = mock
        .post("/v1/messages", &messages_body(json!({})))
        .header("x-mock-fail", "429")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");

    let (status, _, v) = mock
        .json(
            "/v1/embeddings",
            json!({"model": "mock-embed-fail-500", "input": "x"}),
        )
        .await;
    assert_eq!(status, 500);
    assert_eq!(v["error"]["type"], "server_error");
}

#[tokio::test]
async fn fail_next_and_stats() {
    let mock = Mock::start().await;
    let v: Value = mock.get("/mock/stats").await.json().await.unwrap();
    assert_eq!(v["requests"], 0);

    let (status, _, v) = mock
        .json("/mock/fail-next", json!({"count": 2, "status": 502}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"count": 2, "status": 502}));
    let (s1, _, _) = mock
        .json("/v1/chat/completions", chat_body(json!({})))
        .await;
    let (s2, _, v2) = mock.json("/v1/messages", messages_body(json!({}))).await;
    let (s3, _, _) = mock
        .json("/v1/chat/completions", chat_body(json!({})))
        .await;
    assert_eq!((s1, s2, s3), (502, 502, 200));
    assert_eq!(v2["type"], "error");

    assert_eq!(mock.get("/v1/models").await.status(), 200);
    let v: Value = mock.get("/mock/stats").await.json().await.unwrap();
    assert_eq!(v["requests"], 4);
    assert_eq!(v["fail_next_remaining"], 0);

    let (status, _, _) = mock
        .json("/mock/fail-next", json!({"count": 1, "status": 200}))
        .await;
    assert_eq!(status, 400);
    let resp = mock
        .client
        .post(format!("{}/mock/reset", mock.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = mock.get("/mock/stats").await.json().await.unwrap();
    assert_eq!(v["requests"], 0);
}

#[tokio::test]
async fn bad_bodies_get_400_in_the_providers_shape() {
    let mock = Mock::start().await;
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        let resp = mock
            .client
            .post(format!("{}{path}", mock.base))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{path}");
        assert!(v["error"]["message"].is_string());
    }
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let resp = mock
            .client
            .post(format!("{}{path}", mock.base))
            .body("[1,")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // Valid JSON without the required fields.
    let (status, _, v) = mock
        .json("/v1/chat/completions", json!({"model": "m"}))
        .await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("messages"));
    let (status, _, v) = mock.json("/v1/messages", json!({"messages": []})).await;
    assert_eq!(status, 400);
    assert_eq!(v["type"], "error");
    let (status, _, _) = mock
        .json("/v1/embeddings", json!({"model": "e", "input": []}))
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let mock = Mock::start().await;
    let (status, _, v) = mock
        .json(
            "/v1/embeddings",
            json!({"model": "mock-embed", "input": "the quick brown fox"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "mock-embed");
    assert_eq!(v["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["object"], "embedding");
    assert_eq!(data[0]["index"], 0);
    let floats: Vec<f32> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(floats.len(), 8);
    let norm: f32 = floats.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "unit vector, norm {norm}");

    // Same input, base64: the little-endian f32 bytes of the same vector.
    let (_, _, v) = mock
        .json(
            "/v1/embeddings",
            json!({"model": "mock-embed", "input": ["the quick brown fox", "jumps"], "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data[0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, floats);

    // dimensions, token inputs, bad encoding_format.
    let (_, _, v) = mock
        .json(
            "/v1/embeddings",
            json!({"model": "e", "input": [[1, 2, 3], [4]], "dimensions": 3}),
        )
        .await;
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 3);
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    let (status, _, v) = mock
        .json(
            "/v1/embeddings",
            json!({"model": "e", "input": "x", "encoding_format": "int8"}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn models_health_and_unknown_routes() {
    let mock = Mock::start().await;
    let resp = mock.get("/healthz").await;
    assert_eq!(resp.status(), 200);
    let v: Value = mock.get("/v1/models").await.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mock-gpt", "mock-claude", "mock-embed"]);
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["object"] == "model")
    );
    let resp = mock.get("/v1/nope").await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn latency_and_chunk_delay() {
    let mock = Mock::start().await;
    let t = Instant::now();
    let (status, _, _) = mock
        .json(
            "/v1/chat/completions",
            chat_body(json!({"model": "mock-gpt-latency-ms-150"})),
        )
        .await;
    assert_eq!(status, 200);
    assert!(t.elapsed() >= Duration::from_millis(150));

    // 1 role + 3 content + finish + [DONE] events, 40 ms apart.
    let t = Instant::now();
    let body = chat_body(json!({"max_tokens": 3, "stream": true}));
    let resp = mock
        .post("/v1/chat/completions", &body)
        .header("x-mock-chunk-delay-ms", "40")
        .send()
        .await
        .unwrap();
    let first = t.elapsed();
    let mut chunks = 0;
    let mut stream = resp.bytes_stream();
    while let Some(c) = stream.next().await {
        c.unwrap();
        chunks += 1;
    }
    let total = t.elapsed();
    assert!(total >= Duration::from_millis(5 * 40), "{total:?}");
    assert!(
        first < total,
        "headers before the events: {first:?} {total:?}"
    );
    assert!(chunks >= 2, "events arrive separately ({chunks} chunks)");
}

#[tokio::test]
async fn long_streams_are_complete() {
    let mock = Mock::start().await;
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (_, text) = mock
        .text(
            mock.post("/v1/chat/completions", &body)
                .header("x-mock-output-tokens", "5000"),
        )
        .await;
    let (events, done) = openai_events(&text);
    assert!(done);
    assert_eq!(events.len(), 5000 + 3);
    assert_eq!(events[5000]["choices"][0]["delta"]["content"], "word4998 ");
    assert_eq!(events[5002]["usage"]["completion_tokens"], 5000);

    // The cap is 100000.
    let v: Value = mock
        .post("/v1/completions", &json!({"model": "m", "prompt": "p"}))
        .header("x-mock-output-tokens", "250000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 100_000);
}

#[tokio::test]
async fn binary_announces_its_address_and_stops_on_sigterm() {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate-mock-upstream"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let base = line.strip_prefix("listening on ").unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let mut stdout = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout)
        .await
        .unwrap();
    assert!(stdout.is_empty(), "nothing on stdout: {stdout:?}");
    assert!(
        lines.next_line().await.unwrap().is_none(),
        "one line on stderr"
    );
}
