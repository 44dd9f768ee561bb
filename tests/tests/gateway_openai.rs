//! The OpenAI surface end to end: real NATS, the mock upstream over HTTP,
//! the gateway in-process. Each usage event must carry exactly the tokens
//! the client saw, and the cost header must equal the event's cost.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate_schemas::events::{Event, EventKind, UsageEvent};
use tollgate_tests::eventually;
use tollgate_tests::harness::TestEnv;
use tollgate_tests::stack::{self, Service};

/// The HTTP surface's tests (431s, bad paths, invalid parameters, two
/// credentials, slow clients), in this binary to save a link.
mod gateway_surface;

struct Fixture {
    env: TestEnv,
    _mock: Service,
    gw: Service,
    _dir: tempfile::TempDir,
    http: reqwest::Client,
    secret: String,
}

async fn fixture(extra: &str) -> Fixture {
    let env = TestEnv::new();
    let mock = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = stack::gateway_config(&env, &env.nats_url, &mock.url(), dir.path(), extra);
    let gw = stack::start_gateway(config).await;
    let secret = format!("tg_test_{}", uuid::Uuid::now_v7().simple());
    stack::put_key(&env.nats_url, &env, &secret, stack::key("acme", "k-acme")).await;
    Fixture {
        env,
        _mock: mock,
        gw,
        _dir: dir,
        http: reqwest::Client::new(),
        secret,
    }
}

impl Fixture {
    fn post(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{}", self.gw.url(), path))
            .bearer_auth(&self.secret)
            .json(&body)
    }

    async fn usage(&self, n: usize) -> Vec<UsageEvent> {
        stack::events(
            &self.env.nats_url,
            &self.env,
            EventKind::Usage,
            n,
            Duration::from_secs(10),
        )
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::Usage(u) => Some(u),
            _ => None,
        })
        .collect()
    }
}

fn chat(stream: bool) -> Value {
    json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "say something nice"}], "stream": stream})
}

#[tokio::test]
async fn plain_chat_usage_event_equals_what_the_client_saw() {
    let f = fixture("").await;
    let resp = f
        .post("/v1/chat/completions", chat(false))
        .header("x-mock-cached-tokens", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    let rid = h["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(h["x-tollgate-deployment"], "mock-openai");
    assert_eq!(h["x-tollgate-retries"], "0");
    let cost: Decimal = h["x-tollgate-cost"].to_str().unwrap().parse().unwrap();
    let body: Value = resp.json().await.unwrap();
    let usage = &body["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert_eq!(cached, 2);

    let events = f.usage(1).await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e.meta.request_id, rid);
    assert_eq!(e.meta.tenant_id, "acme");
    assert_eq!(e.tokens.input_tokens + e.tokens.cache_read_tokens, prompt);
    assert_eq!(e.tokens.cache_read_tokens, cached);
    assert_eq!(e.tokens.output_tokens, completion);
    assert!(!e.estimated && !e.streamed);
    assert_eq!(e.price_version, 7);
    assert_eq!(e.cost, cost, "header cost equals event cost");
    let expected = (Decimal::from(prompt - cached) * Decimal::new(15, 2)
        + Decimal::from(cached) * Decimal::new(75, 3)
        + Decimal::from(completion) * Decimal::new(60, 2))
        / Decimal::from(1_000_000);
    assert_eq!(cost, expected.normalize());
    assert_eq!(e.requested_model, "mock-gpt");

    // And the request event, with the same request id.
    let reqs = stack::events(
        &f.env.nats_url,
        &f.env,
        EventKind::Request,
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(reqs.iter().any(|r| r.meta().request_id == rid));
}

#[tokio::test]
async fn streamed_chat_with_and_without_include_usage() {
    let f = fixture("").await;
    // Without include_usage: no usage anywhere, no empty-choices chunk.
    let resp = f
        .post("/v1/chat/completions", chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let rid_plain = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let data = stack::sse_data(resp).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let mut text = String::new();
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("usage").is_none(), "usage leaked: {d}");
        assert!(!v["choices"].as_array().unwrap().is_empty());
        text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    assert!(!text.is_empty());

    // With include_usage: the last chunk before [DONE] has choices [] and usage.
    let mut body = chat(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = f.post("/v1/chat/completions", body).send().await.unwrap();
    let rid_usage = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let data = stack::sse_data(resp).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    let seen = last["usage"].clone();

    let events = f.usage(2).await;
    let by = |rid: &str| {
        events
            .iter()
            .find(|e| e.meta.request_id == rid)
            .cloned()
            .unwrap()
    };
    let e = by(&rid_usage);
    assert!(e.streamed && !e.estimated);
    assert_eq!(
        e.tokens.input_tokens,
        seen["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        e.tokens.output_tokens,
        seen["completion_tokens"].as_u64().unwrap()
    );
    assert!(e.ttft_ms.is_some());
    let p = by(&rid_plain);
    assert!(
        p.streamed && !p.estimated,
        "the gateway asked for usage even though the client did not"
    );
    assert_eq!(p.tokens.output_tokens, e.tokens.output_tokens);
}

#[tokio::test]
async fn legacy_completions_plain_and_streamed() {
    let f = fixture("").await;
    let resp = f
        .post(
            "/v1/completions",
            json!({"model": "mock-gpt", "prompt": "once upon a time"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "text_completion");
    let resp = f
        .post("/v1/completions", json!({"model": "mock-gpt", "prompt": "hi", "stream": true, "stream_options": {"include_usage": true}}))
        .send()
        .await
        .unwrap();
    let data = stack::sse_data(resp).await;
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    let events = f.usage(2).await;
    assert_eq!(events.len(), 2);
    assert!(events.iter().any(|e| e.streamed
        && e.tokens.output_tokens == last["usage"]["completion_tokens"].as_u64().unwrap()));
    assert!(events.iter().any(|e| !e.streamed
        && e.tokens.output_tokens == body["usage"]["completion_tokens"].as_u64().unwrap()));
}

async fn error_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    assert!(
        resp.headers().contains_key("x-request-id"),
        "every response has x-request-id"
    );
    let body: Value = resp.json().await.unwrap();
    for k in ["message", "type", "param", "code"] {
        assert!(
            body["error"].get(k).is_some(),
            "OpenAI error shape lacks {k}: {body}"
        );
    }
    (status, body)
}

#[tokio::test]
async fn every_error_status_in_openai_shape() {
    let f = fixture("").await;
    let url = format!("{}/v1/chat/completions", f.gw.url());
    // 401: missing, unknown, revoked, disabled, expired.
    let (s, _) = error_of(f.http.post(&url).json(&chat(false)).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = error_of(
        f.http
            .post(&url)
            .bearer_auth("tg_nope")
            .json(&chat(false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_api_key"))
    );
    for (i, mutate) in [
        |k: &mut tollgate_schemas::records::KeyRecord| k.revoked = true,
        |k: &mut tollgate_schemas::records::KeyRecord| k.disabled = true,
        |k: &mut tollgate_schemas::records::KeyRecord| {
            k.expires_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1))
        },
    ]
    .into_iter()
    .enumerate()
    {
        let secret = format!("tg_bad_{i}_{}", uuid::Uuid::now_v7().simple());
        let mut k = stack::key("acme", &format!("bad{i}"));
        mutate(&mut k);
        stack::put_key(&f.env.nats_url, &f.env, &secret, k).await;
        let (s, _) = error_of(
            f.http
                .post(&url)
                .header("x-api-key", &secret)
                .json(&chat(false))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "case {i}");
    }
    // 403 and 404 with a restricted key: unknown is 404 whatever the allow-list.
    let restricted = format!("tg_r_{}", uuid::Uuid::now_v7().simple());
    let mut k = stack::key("acme", "restricted");
    k.models = Some(vec!["mock-broken".into()]);
    stack::put_key(&f.env.nats_url, &f.env, &restricted, k).await;
    let (s, b) = error_of(
        f.http
            .post(&url)
            .bearer_auth(&restricted)
            .json(&chat(false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["type"].as_str()),
        (StatusCode::FORBIDDEN, Some("permission_error"))
    );
    let mut unknown = chat(false);
    unknown["model"] = json!("gpt-nonexistent");
    let (s, b) = error_of(
        f.http
            .post(&url)
            .bearer_auth(&restricted)
            .json(&unknown)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    // 400: malformed JSON, bad params.
    let (s, _) = error_of(
        f.http
            .post(&url)
            .bearer_auth(&f.secret)
            .body("{not json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, b) = error_of(
        f.post(
            "/v1/chat/completions",
            json!({"model": "mock-gpt", "messages": "hi"}),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        (s, b["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("messages"))
    );
    // 413 over the 16 MiB default.
    let big = "x".repeat(17 * 1024 * 1024);
    let (s, _) = error_of(
        f.http
            .post(&url)
            .bearer_auth(&f.secret)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    // 503 from an upstream that fails, after the breaker's failover.
    let mut broken = chat(false);
    broken["model"] = json!("mock-broken");
    let (s, _) = error_of(f.post("/v1/chat/completions", broken).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // Unknown route: OpenAI-shaped 404.
    let (s, _) = error_of(
        f.http
            .post(format!("{}/v1/nope", f.gw.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn rate_limits_say_which_limit_and_when_to_retry() {
    let f = fixture("").await;
    let secret = format!("tg_rl_{}", uuid::Uuid::now_v7().simple());
    let mut k = stack::key("acme", "limited");
    k.rpm = Some(2);
    stack::put_key(&f.env.nats_url, &f.env, &secret, k).await;
    let url = format!("{}/v1/chat/completions", f.gw.url());
    for _ in 0..2 {
        let r = f
            .http
            .post(&url)
            .bearer_auth(&secret)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
    }
    let r = f
        .http
        .post(&url)
        .bearer_auth(&secret)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry));
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
    let (_, b) = error_of(r).await;
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests per minute")
    );
}

#[tokio::test]
async fn models_lists_only_what_the_key_may_use() {
    let f = fixture("").await;
    let all: Value = f
        .http
        .get(format!("{}/v1/models", f.gw.url()))
        .bearer_auth(&f.secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["mock-gpt", "mock-claude", "mock-embed", "mock-broken"]
    );
    let restricted = format!("tg_m_{}", uuid::Uuid::now_v7().simple());
    let mut k = stack::key("acme", "mlist");
    k.models = Some(vec!["mock-gpt".into()]);
    stack::put_key(&f.env.nats_url, &f.env, &restricted, k).await;
    let some: Value = f
        .http
        .get(format!("{}/v1/models", f.gw.url()))
        .bearer_auth(&restricted)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(some["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn client_disconnect_mid_stream_still_produces_an_estimated_usage_event() {
    let f = fixture("").await;
    let resp = f
        .post("/v1/chat/completions", chat(true))
        .header("x-mock-output-tokens", "2000")
        .header("x-mock-chunk-delay-ms", "5")
        .send()
        .await
        .unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    let mut got = 0;
    while got < 3 {
        body.next().await.unwrap().unwrap();
        got += 1;
    }
    drop(body); // the client goes away
    let events = f.usage(1).await;
    let e = events
        .iter()
        .find(|e| e.meta.request_id == rid)
        .expect("usage event after disconnect");
    assert!(e.estimated && e.streamed);
    assert!(
        e.tokens.output_tokens > 0 && e.tokens.output_tokens < 2000,
        "{:?}",
        e.tokens
    );
    assert!(e.tokens.input_tokens > 0);
}

#[tokio::test]
async fn upstream_cut_mid_stream_gives_an_estimated_event() {
    let f = fixture("").await;
    let resp = f
        .post("/v1/chat/completions", chat(true))
        .header("x-mock-cut-after", "3")
        .send()
        .await
        .unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let data = stack::sse_data(resp).await;
    assert!(!data.contains(&"[DONE]".to_string()));
    let events = f.usage(1).await;
    let e = events.iter().find(|e| e.meta.request_id == rid).unwrap();
    assert!(e.estimated);
}

#[tokio::test]
async fn failover_and_the_breaker_open_and_close() {
    let env = TestEnv::new();
    let mock = stack::start_mock().await;
    let mock2 = stack::start_mock().await;
    let dir = tempfile::tempdir().unwrap();
    // "flaky" (priority 0) is a mock with failures injected; "backup" is
    // another mock without.
    let extra = format!(
        r#"
[[models]]
name = "ha"
[[models.deployments]]
name = "flaky"
provider = "openai"
base_url = "{m}/v1"
priority = 0
[[models.deployments]]
name = "backup"
provider = "openai"
base_url = "{m2}/v1"
priority = 1
"#,
        m = mock.url(),
        m2 = mock2.url()
    );
    let gw = stack::start_gateway(stack::gateway_config(
        &env,
        &env.nats_url,
        &mock.url(),
        dir.path(),
        &extra,
    ))
    .await;
    let secret = "tg_ha_secret";
    stack::put_key(&env.nats_url, &env, secret, stack::key("acme", "ha")).await;
    let http = reqwest::Client::new();
    let ask = || async {
        let r = http
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth(secret)
            .json(&json!({"model": "ha", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        (
            r.headers()["x-tollgate-deployment"]
                .to_str()
                .unwrap()
                .to_owned(),
            r.headers()["x-tollgate-retries"]
                .to_str()
                .unwrap()
                .to_owned(),
        )
    };
    // Healthy: the first priority serves.
    assert_eq!(ask().await, ("flaky".into(), "0".into()));
    // Two failures (the breaker's threshold): each fails over to backup.
    http.post(format!("{}/mock/fail-next", mock.url()))
        .json(&json!({"count": 2, "status": 503}))
        .send()
        .await
        .unwrap();
    assert_eq!(ask().await, ("backup".into(), "1".into()));
    // The breaker opens during this request, so not before this instant.
    let opening = tokio::time::Instant::now();
    assert_eq!(ask().await, ("backup".into(), "1".into()));
    // Open: flaky is skipped without an attempt.
    assert_eq!(ask().await, ("backup".into(), "0".into()));
    // After open_ms (500 in the stack's config), one trial succeeds and
    // closes it; until then every request goes to backup untried. The gateway
    // is another process, so its clock cannot be driven: wait for the trial
    // instead of sleeping past the window, and check the window held.
    eventually(
        "the breaker half-open",
        Duration::from_secs(10),
        async || {
            let served = ask().await;
            if served == ("flaky".into(), "0".into()) {
                return true;
            }
            assert_eq!(served, ("backup".into(), "0".into()), "while open");
            false
        },
    )
    .await;
    let open_for = opening.elapsed();
    assert!(
        open_for >= Duration::from_millis(500),
        "half-open after {open_for:?}, before open_ms = 500"
    );
    assert_eq!(ask().await, ("flaky".into(), "0".into()));
    // A dead deployment (connection refused) fails over too.
    let dead = format!(
        r#"
[[models]]
name = "dead-first"
[[models.deployments]]
name = "dead"
provider = "openai"
base_url = "http://127.0.0.1:{port}/v1"
[[models.deployments]]
name = "alive"
provider = "openai"
base_url = "{m}/v1"
priority = 1
"#,
        port = tollgate_tests::harness::free_port().unwrap(),
        m = mock.url()
    );
    let gw2 = stack::start_gateway(stack::gateway_config(
        &env,
        &env.nats_url,
        &mock.url(),
        tempfile::tempdir().unwrap().path(),
        &dead,
    ))
    .await;
    let r = http
        .post(format!("{}/v1/chat/completions", gw2.url()))
        .bearer_auth(secret)
        .json(&json!({"model": "dead-first", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-tollgate-deployment"], "alive");
}

#[tokio::test]
async fn a_revoked_key_is_refused_within_seconds() {
    let f = fixture("").await;
    let url = format!("{}/v1/chat/completions", f.gw.url());
    let ok = f
        .http
        .post(&url)
        .bearer_auth(&f.secret)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK); // now cached
    let mut k = stack::key("acme", "k-acme");
    k.revoked = true;
    stack::put_key(&f.env.nats_url, &f.env, &f.secret, k).await;
    let start = std::time::Instant::now();
    loop {
        let r = f
            .http
            .post(&url)
            .bearer_auth(&f.secret)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "revocation did not reach the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn fifty_concurrent_streams_all_metered() {
    let f = fixture("").await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let req = f.post("/v1/chat/completions", json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi there"}], "stream": true, "stream_options": {"include_usage": true}}));
        tasks.push(tokio::spawn(async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let data = stack::sse_data(r).await;
            let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
            last["usage"]["completion_tokens"].as_u64().unwrap()
        }));
    }
    let mut seen = 0;
    for t in tasks {
        seen += t.await.unwrap();
    }
    let events = f.usage(50).await;
    assert_eq!(events.len(), 50);
    assert_eq!(
        events.iter().map(|e| e.tokens.output_tokens).sum::<u64>(),
        seen
    );
}
