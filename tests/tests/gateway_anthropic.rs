//! The Anthropic surface and cross-format translation end to end: real NATS,
//! the mock upstream speaking both formats over HTTP, the gateway in-process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate_schemas::events::{EventKind, UsageEvent};
use tollgate_tests::harness::TestEnv;
use tollgate_tests::stack::{self, Service};

struct Fixture {
    env: TestEnv,
    _mock: Service,
    gw: Service,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
}

const SECRET: &str = "tg_anthropic_test";

async fn fixture() -> Fixture {
    let env = TestEnv::new();
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = stack::start_gateway(stack::gateway_config(
        &env,
        &env.nats_url,
        &mock.url(),
        dir.path(),
        "",
    ))
    .await;
    stack::put_key(&env.nats_url, &env, SECRET, stack::key("acme", "k1")).await;
    Fixture {
        env,
        _mock: mock,
        gw,
        _dir: dir,
        http: reqwest::Client::new(),
    }
}

impl Fixture {
    fn messages(&self, body: Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/messages", self.gw.url()))
            .header("x-api-key", SECRET)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
    }

    async fn usage_of(&self, rid: &str) -> UsageEvent {
        stack::usage_event(&self.env.nats_url, &self.env, rid).await
    }
}

fn msg(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "system": "be brief", "stream": stream,
           "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "tell me more"}]}]})
}

#[tokio::test]
async fn messages_plain_native_usage_and_headers() {
    let f = fixture().await;
    let r = f
        .messages(msg("mock-claude", false))
        .header("x-mock-cached-tokens", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(r.headers()["request-id"].to_str().unwrap(), rid);
    let cost = r.headers()["x-tollgate-cost"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "message");
    let u = f.usage_of(&rid).await;
    assert_eq!(
        u.tokens.input_tokens,
        body["usage"]["input_tokens"].as_u64().unwrap()
    );
    assert_eq!(u.tokens.cache_read_tokens, 3);
    assert_eq!(
        u.tokens.output_tokens,
        body["usage"]["output_tokens"].as_u64().unwrap()
    );
    assert_eq!(u.provider, "anthropic");
    assert_eq!(u.cost.to_string(), cost);
}

async fn anthropic_stream_checks(f: &Fixture, model: &str) {
    let r = f.messages(msg(model, true)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{model}");
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let text = r.text().await.unwrap();
    let evs = stack::sse_events(&text);
    let types: Vec<&str> = evs.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(types.first(), Some(&"message_start"), "{model}: {types:?}");
    assert_eq!(types.last(), Some(&"message_stop"));
    for t in [
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
    ] {
        assert!(types.contains(&t), "{model} lacks {t}: {types:?}");
    }
    for (t, d) in &evs {
        assert_eq!(
            d["type"].as_str(),
            Some(t.as_str()),
            "event name equals data.type"
        );
    }
    let start = &evs[0].1["message"]["usage"];
    let delta = &evs.iter().find(|(t, _)| t == "message_delta").unwrap().1["usage"];
    let input = delta
        .get("input_tokens")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| start["input_tokens"].as_u64().unwrap());
    let u = f.usage_of(&rid).await;
    assert!(u.streamed && !u.estimated, "{model}");
    assert_eq!(u.tokens.input_tokens, input, "{model}");
    assert_eq!(
        u.tokens.output_tokens,
        delta["output_tokens"].as_u64().unwrap(),
        "{model}"
    );
}

#[tokio::test]
async fn messages_stream_native_and_translated_from_an_openai_upstream() {
    let f = fixture().await;
    anthropic_stream_checks(&f, "mock-claude").await;
    anthropic_stream_checks(&f, "mock-gpt").await;
}

#[tokio::test]
async fn messages_plain_translated_from_an_openai_upstream() {
    let f = fixture().await;
    let r = f.messages(msg("mock-gpt", false)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "message");
    assert_eq!(body["model"], "mock-gpt");
    assert_eq!(body["stop_reason"], "end_turn");
    let u = f.usage_of(&rid).await;
    assert_eq!(u.provider, "openai");
    assert_eq!(
        u.tokens.input_tokens,
        body["usage"]["input_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u.tokens.output_tokens,
        body["usage"]["output_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn openai_client_on_an_anthropic_upstream_plain_and_streamed() {
    let f = fixture().await;
    let url = format!("{}/v1/chat/completions", f.gw.url());
    let body = json!({"model": "mock-claude", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]});
    let r = f
        .http
        .post(&url)
        .bearer_auth(SECRET)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    let u = f.usage_of(&rid).await;
    assert_eq!(
        u.tokens.input_tokens,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        u.tokens.output_tokens,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = f
        .http
        .post(&url)
        .bearer_auth(SECRET)
        .json(&sbody)
        .send()
        .await
        .unwrap();
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let data = stack::sse_data(r).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    let u = f.usage_of(&rid).await;
    assert_eq!(
        u.tokens.output_tokens,
        last["usage"]["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn count_tokens_is_recorded_never_billed() {
    let f = fixture().await;
    for model in ["mock-claude", "mock-gpt"] {
        let r = f
            .http
            .post(format!("{}/v1/messages/count_tokens", f.gw.url()))
            .header("x-api-key", SECRET)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "one two three"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        assert!(v["input_tokens"].as_u64().unwrap() > 0);
    }
    let counts = stack::events(
        &f.env.nats_url,
        &f.env,
        EventKind::TokenCount,
        2,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(counts.len(), 2);
    let usage = stack::events(
        &f.env.nats_url,
        &f.env,
        EventKind::Usage,
        0,
        Duration::from_millis(500),
    )
    .await;
    assert!(
        usage.is_empty(),
        "count_tokens must not produce usage events"
    );
}

#[tokio::test]
async fn anthropic_errors_in_anthropic_shape() {
    let f = fixture().await;
    let url = format!("{}/v1/messages", f.gw.url());
    let check = |r: reqwest::Response, status: u16, ty: &'static str| async move {
        assert_eq!(r.status().as_u16(), status);
        assert!(r.headers().contains_key("request-id"));
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], ty, "{v}");
        assert!(v["error"]["message"].is_string());
    };
    check(
        f.http
            .post(&url)
            .json(&msg("mock-claude", false))
            .send()
            .await
            .unwrap(),
        401,
        "authentication_error",
    )
    .await;
    check(
        f.messages(msg("nope", false)).send().await.unwrap(),
        404,
        "not_found_error",
    )
    .await;
    check(
        f.messages(json!({"model": "mock-claude", "messages": []}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_request_error",
    )
    .await;
    check(
        f.http
            .post(&url)
            .header("x-api-key", SECRET)
            .body("{")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_request_error",
    )
    .await;
}

#[tokio::test]
async fn embeddings_are_metered_input_only() {
    let f = fixture().await;
    let r = f
        .http
        .post(format!("{}/v1/embeddings", f.gw.url()))
        .bearer_auth(SECRET)
        .json(
            &json!({"model": "mock-embed", "input": ["a b c", "d e"], "encoding_format": "base64"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: Value = r.json().await.unwrap();
    assert!(
        v["data"][0]["embedding"].is_string(),
        "base64 passes through"
    );
    let u = f.usage_of(&rid).await;
    assert_eq!(
        u.tokens.input_tokens,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(u.tokens.output_tokens, 0);
}
