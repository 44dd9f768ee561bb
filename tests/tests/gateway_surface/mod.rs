//! The gateway's HTTP surface (issue 16, items 4-7), in the `gateway_openai`
//! binary: bad input that the routes never see (oversized heads, bad paths,
//! rejections), invalid parameters refused before they are forwarded or
//! billed, two credentials in one request, and slow or idle connections.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_schemas::events::{Event, EventKind};
use tollgate_tests::stack;

use super::{Fixture, chat, fixture};

const ANTHROPIC_VERSION: &str = "2023-06-01";

impl Fixture {
    /// Requests the mock upstream has received.
    async fn upstream_hits(&self) -> u64 {
        let v: Value = self
            .http
            .get(format!("{}/mock/stats", self._mock.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["requests"].as_u64().unwrap()
    }
}

/// Asserts `resp` is an error of `status` in the shape of the API of `path`,
/// with its request id(s), and returns the body.
async fn shaped(resp: reqwest::Response, status: u16, path: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "{path}");
    let h = resp.headers().clone();
    let rid = h
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{path}: no x-request-id"))
        .clone();
    let anthropic = path.starts_with("/v1/messages");
    if anthropic {
        assert_eq!(h.get("request-id"), Some(&rid), "{path}: request-id");
    }
    let text = resp.text().await.unwrap();
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
    if anthropic {
        assert_eq!(body["type"], "error", "{body}");
        assert!(body["error"]["type"].is_string(), "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    } else {
        for k in ["message", "type", "param", "code"] {
            assert!(
                body["error"].get(k).is_some(),
                "{path}: no error.{k}: {body}"
            );
        }
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    body
}

#[tokio::test]
async fn oversized_heads_and_too_many_headers_get_a_shaped_431() {
    let f = fixture("").await;
    // Over the gateway's 64 KiB default, under hyper's own limit (1 MiB).
    let big = "x".repeat(100 * 1024);
    for path in ["/v1/chat/completions", "/v1/messages", "/v1/models"] {
        let url = format!("{}{path}", f.gw.url());
        let r = f
            .http
            .post(&url)
            .bearer_auth(&f.secret)
            .header("x-big", &big)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        let body = shaped(r, 431, path).await;
        let message = if path.starts_with("/v1/messages") {
            &body["error"]["message"]
        } else {
            assert_eq!(body["error"]["code"], "request_header_fields_too_large");
            &body["error"]["message"]
        };
        assert!(message.as_str().unwrap().contains("header"), "{body}");

        let mut many = f.http.post(&url).bearer_auth(&f.secret).json(&chat(false));
        for i in 0..150 {
            many = many.header(format!("x-extra-{i}"), "1");
        }
        shaped(many.send().await.unwrap(), 431, path).await;
    }
    // Neither reached the upstream.
    assert_eq!(f.upstream_hits().await, 0);
}

#[tokio::test]
async fn a_bad_path_is_401_before_400_and_every_rejection_is_shaped() {
    let f = fixture("").await;
    let url = |p: &str| format!("{}{p}", f.gw.url());
    // Not UTF-8 once decoded: the key is checked first.
    let bad = "/v1/models/%ff%fe";
    let r = f.http.get(url(bad)).send().await.unwrap();
    let body = shaped(r, 401, bad).await;
    assert_eq!(body["error"]["code"], "missing_api_key");
    let r = f
        .http
        .get(url(bad))
        .bearer_auth("tg_unknown")
        .send()
        .await
        .unwrap();
    shaped(r, 401, bad).await;
    let r = f
        .http
        .get(url(bad))
        .bearer_auth(&f.secret)
        .send()
        .await
        .unwrap();
    let body = shaped(r, 400, bad).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // A body that is not JSON, with and without a JSON content type.
    for (path, ct) in [
        ("/v1/chat/completions", "application/json"),
        ("/v1/chat/completions", "text/plain"),
        ("/v1/embeddings", "application/x-www-form-urlencoded"),
        ("/v1/messages", "application/json"),
        ("/v1/messages/count_tokens", "text/plain"),
    ] {
        let r = f
            .http
            .post(url(path))
            .bearer_auth(&f.secret)
            .header("content-type", ct)
            .body("{\"model\": ")
            .send()
            .await
            .unwrap();
        shaped(r, 400, path).await;
    }
    // A JSON body that is not an object.
    let r = f
        .http
        .post(url("/v1/chat/completions"))
        .bearer_auth(&f.secret)
        .json(&json!([1, 2]))
        .send()
        .await
        .unwrap();
    shaped(r, 400, "/v1/chat/completions").await;
    // Methods not allowed and unknown routes, on both APIs.
    for (method, path, status) in [
        (reqwest::Method::GET, "/v1/chat/completions", 405),
        (reqwest::Method::DELETE, "/v1/messages", 405),
        (reqwest::Method::PUT, "/v1/models", 405),
        (reqwest::Method::GET, "/v1/nope", 404),
        (reqwest::Method::POST, "/v1/messages/nope", 404),
        (reqwest::Method::GET, "/", 404),
    ] {
        let r = f
            .http
            .request(method, url(path))
            .bearer_auth(&f.secret)
            .send()
            .await
            .unwrap();
        shaped(r, status, path).await;
    }
    assert_eq!(f.upstream_hits().await, 0);
}

/// (route, body, OpenAI `param` or Anthropic message fragment)
fn invalid_rows() -> Vec<(&'static str, Value, &'static str)> {
    let m = |extra: Value| {
        let mut b = json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let a = |extra: Value| {
        let mut b = json!({"model": "mock-claude", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let chat = "/v1/chat/completions";
    let messages = "/v1/messages";
    vec![
        (
            chat,
            m(json!({"messages": [{"role": 5, "content": "hi"}]})),
            "messages[0].role",
        ),
        (
            chat,
            m(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            "messages[0].role",
        ),
        (
            chat,
            m(json!({"messages": [{"role": "user", "content": 7}]})),
            "messages[0].content",
        ),
        (chat, m(json!({"messages": []})), "messages"),
        (chat, m(json!({"model": 42})), "model"),
        (chat, m(json!({"max_tokens": 0})), "max_tokens"),
        (
            chat,
            m(json!({"max_completion_tokens": 0})),
            "max_completion_tokens",
        ),
        (chat, m(json!({"n": 0})), "n"),
        (chat, m(json!({"n": 129})), "n"),
        (chat, m(json!({"temperature": 2.5})), "temperature"),
        (chat, m(json!({"temperature": "warm"})), "temperature"),
        (chat, m(json!({"top_p": 1.5})), "top_p"),
        (chat, m(json!({"presence_penalty": 3})), "presence_penalty"),
        (
            chat,
            m(json!({"frequency_penalty": -2.5})),
            "frequency_penalty",
        ),
        (chat, m(json!({"stream": "true"})), "stream"),
        (chat, m(json!({"stop": ["a", "b", "c", "d", "e"]})), "stop"),
        (chat, m(json!({"logprobs": 1})), "logprobs"),
        (chat, m(json!({"top_logprobs": 21})), "top_logprobs"),
        (chat, m(json!({"seed": "7"})), "seed"),
        (
            "/v1/completions",
            json!({"model": "mock-gpt", "prompt": "hi", "logprobs": 6}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"model": "mock-gpt", "prompt": 5}),
            "prompt",
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock-embed", "input": []}),
            "input",
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock-embed", "input": "x", "dimensions": 0}),
            "dimensions",
        ),
        (
            "/v1/responses",
            json!({"model": "mock-gpt", "input": "hi", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            "/v1/responses",
            json!({"model": "mock-gpt", "input": "hi", "temperature": 9}),
            "temperature",
        ),
        (
            messages,
            a(json!({"max_tokens": 0})),
            "max_tokens: Input should be greater than or equal to 1",
        ),
        (
            messages,
            json!({"model": "mock-claude", "messages": [{"role": "user", "content": "hi"}]}),
            "max_tokens: Field required",
        ),
        (
            messages,
            a(json!({"temperature": 1.5})),
            "temperature: Input should be less than or equal to 1",
        ),
        (
            messages,
            a(json!({"top_k": -1})),
            "top_k: Input should be greater than or equal to 0",
        ),
        (
            messages,
            a(json!({"messages": [{"role": "system", "content": "hi"}]})),
            "messages.0.role",
        ),
        (messages, a(json!({"system": 5})), "system: Input should be"),
        (
            messages,
            a(json!({"messages": []})),
            "messages: at least one message is required",
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "mock-claude", "messages": "hi"}),
            "messages: Input should be a valid list",
        ),
    ]
}

#[tokio::test]
async fn invalid_parameters_are_refused_never_forwarded_nor_billed() {
    let f = fixture("").await;
    let rows = invalid_rows();
    assert!(rows.len() >= 30);
    let mut refused = Vec::new();
    for (path, body, expected) in rows {
        let r = f
            .http
            .post(format!("{}{path}", f.gw.url()))
            .bearer_auth(&f.secret)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body)
            .send()
            .await
            .unwrap();
        let rid = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let v = shaped(r, 400, path).await;
        if path.starts_with("/v1/messages") {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains(expected), "{path} {body}: {message}");
        } else {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
            assert_eq!(v["error"]["param"], expected, "{path} {body}: {v}");
            assert!(v["error"]["code"].is_string(), "{v}");
        }
        refused.push(rid);
    }
    assert_eq!(
        f.upstream_hits().await,
        0,
        "a refused request was forwarded"
    );
    // A valid request after them: once its usage event is in, any usage
    // event of a refused request would be too.
    let ok = f
        .post("/v1/chat/completions", chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let ok_rid = ok.headers()["x-request-id"].to_str().unwrap().to_owned();
    stack::usage_event(&f.env.nats_url, &f.env, &ok_rid).await;
    let usage = f.usage(1).await;
    assert_eq!(usage.len(), 1, "only the valid request is billed");
    assert_eq!(usage[0].meta.request_id, ok_rid);
    // Each refusal is still recorded, as a request event with its 400.
    let requests = stack::events(
        &f.env.nats_url,
        &f.env,
        EventKind::Request,
        refused.len() + 1,
        Duration::from_secs(10),
    )
    .await;
    for rid in &refused {
        let e = requests
            .iter()
            .find_map(|e| match e {
                Event::Request(r) if &r.meta.request_id == rid => Some(r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no request event for {rid}"));
        assert_eq!(e.status, 400);
    }
}

#[tokio::test]
async fn unusual_but_valid_requests_with_unknown_fields_are_served() {
    let f = fixture("").await;
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "mock-gpt", "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                {"role": "user", "content": "hi", "a_future_message_field": 1},
            ], "n": 1, "temperature": 0, "top_p": 1, "max_completion_tokens": 4,
               "stop": "zzz", "seed": 3, "a_field_no_spec_lists_yet": {"x": [1]},
               "reasoning_effort": "low", "user": null}),
        ),
        (
            "/v1/completions",
            json!({"model": "mock-gpt", "prompt": ["a", "b"], "max_tokens": 3, "echo": false, "new_knob": true}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "mock-embed", "input": ["a", "b"], "dimensions": 4, "brand_new": "x"}),
        ),
        (
            "/v1/responses",
            json!({"model": "mock-gpt", "input": "hi", "max_output_tokens": 16, "new_responses_knob": 1}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock-claude", "max_tokens": 4, "temperature": 1, "top_k": 0,
                   "system": [{"type": "text", "text": "s"}], "future_param": [1],
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
        ),
        (
            "/v1/messages/count_tokens",
            json!({"model": "mock-claude", "messages": [{"role": "user", "content": "hi"}], "future": 1}),
        ),
    ];
    for (path, body) in cases {
        let r = f
            .http
            .post(format!("{}{path}", f.gw.url()))
            .bearer_auth(&f.secret)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}: {text}");
    }
}

#[tokio::test]
async fn two_different_credentials_are_refused_the_same_key_twice_is_not() {
    let f = fixture("").await;
    let other = format!("tg_other_{}", uuid::Uuid::now_v7().simple());
    stack::put_key(
        &f.env.nats_url,
        &f.env,
        &other,
        stack::key("umbrella", "k-u"),
    )
    .await;
    let messages = json!({"model": "mock-claude", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    for (path, body) in [
        ("/v1/chat/completions", chat(false)),
        ("/v1/messages", messages),
    ] {
        let url = format!("{}{path}", f.gw.url());
        let bearer = |k: &str| format!("Bearer {k}");
        let two_kinds = f
            .http
            .post(&url)
            .header("authorization", bearer(&f.secret))
            .header("x-api-key", &other);
        let two_bearers = f
            .http
            .post(&url)
            .header("authorization", bearer(&f.secret))
            .header("authorization", bearer(&other));
        let two_api_keys = f
            .http
            .post(&url)
            .header("x-api-key", &other)
            .header("x-api-key", &f.secret);
        for req in [two_kinds, two_bearers, two_api_keys] {
            let r = req.json(&body).send().await.unwrap();
            let v = shaped(r, 401, path).await;
            assert!(
                v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("more than one API key"),
                "{v}"
            );
        }
        let same_twice = f
            .http
            .post(&url)
            .header("authorization", bearer(&f.secret))
            .header("x-api-key", &f.secret)
            .header("anthropic-version", ANTHROPIC_VERSION)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(same_twice.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(f.upstream_hits().await, 2, "only the agreeing requests");
}

const SHORT_TIMEOUTS: &str =
    "[server]\nheader_read_timeout_ms = 1000\nbody_read_timeout_ms = 1000\n";

/// Reads from `conn` until the server closes it (EOF or error), or `limit`.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn slow_loris_and_idle_connections_are_closed_by_the_header_timeout() {
    let f = fixture(SHORT_TIMEOUTS).await;
    let addr = f.gw.addr;
    // 50 clients sending a request head a byte every 200 ms (it would take
    // them about 20 s to finish it).
    let head = b"GET /v1/models HTTP/1.1\r\nhost: gateway\r\nx-slow: ".repeat(2);
    let mut slow = Vec::new();
    for _ in 0..50 {
        let head = head.clone();
        slow.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            let (mut rd, mut wr) = conn.split();
            let mut buf = [0u8; 1024];
            let mut bytes = head.iter();
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let deadline = tokio::time::sleep(Duration::from_secs(10));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        // The whole head sent and still open: a failure.
                        let b = bytes.next()?;
                        if wr.write_all(&[*b]).await.is_err() {
                            return Some(started.elapsed());
                        }
                    }
                    n = rd.read(&mut buf) => match n {
                        Ok(0) | Err(_) => return Some(started.elapsed()),
                        Ok(_) => {}
                    },
                    () = &mut deadline => return None,
                }
            }
        }));
    }
    // A connection that never sends a byte, and one idle after a request.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    for (i, task) in slow.into_iter().enumerate() {
        let closed = task.await.unwrap();
        let closed = closed.unwrap_or_else(|| panic!("slow client {i} was never closed"));
        assert!(
            closed < Duration::from_secs(4),
            "slow client {i} closed after {closed:?}"
        );
    }
    let silent_closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(silent_closed.is_some(), "a silent connection stays open");
    let idle_closed = closed_within(&mut kept, Duration::from_secs(5)).await;
    assert!(
        idle_closed.is_some(),
        "an idle keep-alive connection stays open"
    );
}

#[tokio::test]
async fn a_stream_and_a_slow_upstream_outlive_the_header_timeout() {
    let f = fixture(SHORT_TIMEOUTS).await;
    // About 3 s of events, each 150 ms apart: three times the timeout.
    let started = Instant::now();
    let r = f
        .post("/v1/chat/completions", chat(true))
        .header("x-mock-chunk-delay-ms", "150")
        .header("x-mock-output-tokens", "20")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let data = stack::sse_data(r).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let words = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count();
    assert_eq!(words, 20, "every token event arrived");
    assert!(started.elapsed() > Duration::from_millis(2500));
    // A plain answer that takes twice the timeout to start.
    let r = f
        .post("/v1/chat/completions", chat(false))
        .header("x-mock-latency-ms", "2000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.json::<Value>().await.unwrap()["usage"].is_object());
}

#[tokio::test]
async fn a_body_that_trickles_in_gets_a_shaped_408() {
    let f = fixture(SHORT_TIMEOUTS).await;
    for path in ["/v1/chat/completions", "/v1/messages"] {
        let mut conn = TcpStream::connect(f.gw.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: 1000\r\n\r\n",
            f.secret
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = conn.write_all(b" ").await; }
                    n = conn.read(&mut buf) => match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buf[..n]),
                    },
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{path}: the connection was never closed");
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = String::from_utf8_lossy(&answer).to_string();
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("\r\nx-request-id: req_"), "{text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let v: Value = serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        if path.starts_with("/v1/messages") {
            assert!(lower.contains("\r\nrequest-id: req_"), "{text}");
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "invalid_request_error");
        } else {
            assert_eq!(v["error"]["code"], "request_timeout");
        }
    }
    assert_eq!(f.upstream_hits().await, 0);
}

#[tokio::test]
async fn shutdown_drains_a_stream_in_progress_and_closes_idle_connections() {
    let Fixture {
        env: _env,
        _mock: _upstream,
        gw,
        _dir,
        http,
        secret,
    } = fixture("").await;
    let addr = gw.addr;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let r = http
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(&secret)
        .header("x-mock-chunk-delay-ms", "100")
        .header("x-mock-output-tokens", "15")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let reading = tokio::spawn(stack::sse_data(r));
    let shutdown = tokio::spawn(tokio::time::timeout(Duration::from_secs(20), gw.shutdown()));
    // The drain has begun once the idle connection is closed, and the
    // stream (about 1.5 s) is still going then.
    assert!(
        closed_within(&mut idle, Duration::from_secs(2))
            .await
            .is_some(),
        "shutdown left an idle connection open"
    );
    assert!(!reading.is_finished(), "the stream ended before the drain");
    let data = reading.await.unwrap();
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "the stream was cut by the shutdown"
    );
    shutdown
        .await
        .unwrap()
        .expect("shutdown did not finish")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}
