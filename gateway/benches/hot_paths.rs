//! criterion benchmarks of the gateway's per-request hot paths: request
//! parsing and the upstream body, SSE relay with usage extraction (plain
//! relay and translation both ways), plain-response usage, translation of
//! requests and responses, pricing, key and quota lookup, event encoding.
//!
//!     cargo bench -p tollgate-gateway --bench hot_paths
//!     cargo bench -p tollgate-gateway --bench hot_paths -- sse    # a subset
//!
//! Inputs look like what the mock upstream and the official SDKs send. The
//! per-stream figures are also reported per chunk (criterion's throughput in
//! elements), which is the number to compare against stream length.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rust_decimal::Decimal;
use serde_json::{Map, Value, json};
use tollgate_gateway::auth::KeyStore;
use tollgate_gateway::pipeline::{body_with_model, model_of, parse_object};
use tollgate_gateway::publisher::{Publisher, PublisherConfig};
use tollgate_gateway::quota::Quotas;
use tollgate_gateway::sse::{OpenAiUsage, SseEvent, SseFramer, relay_all};
use tollgate_gateway::translate::{self, StreamTranslator};
use tollgate_schemas::bus::{BusError, Outgoing, PublishReceipt};
use tollgate_schemas::events::{ApiFormat, Event, EventMeta, TokenCounts, UsageEvent};
use tollgate_schemas::records::{
    KeyRecord, ModelPrice, PriceBook, QuotaLevel, QuotaScope, QuotaState, quota_key,
};

fn chat_body(content_bytes: usize, stream: bool) -> Vec<u8> {
    let content: String = "lorem ipsum ".repeat(content_bytes / 12 + 1)[..content_bytes].to_owned();
    let mut b = json!({
        "model": "mock-gpt",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "max_tokens": 256,
        "temperature": 0.7,
    });
    if stream {
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
    }
    serde_json::to_vec(&b).unwrap()
}

/// An OpenAI chat stream like the mock's: role chunk, `words` content
/// chunks, finish chunk, usage chunk, `[DONE]`.
fn openai_stream(words: usize) -> Vec<u8> {
    let head = r#"{"id":"chatcmpl-0123456789abcdef","object":"chat.completion.chunk","created":1700000000,"model":"mock-gpt-4o-mini","system_fingerprint":"fp_mock","choices":[{"index":0,"#;
    let mut s = String::new();
    s.push_str(&format!(
        "data: {head}\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
    ));
    for i in 0..words {
        s.push_str(&format!(
            "data: {head}\"delta\":{{\"content\":\"word{i} \"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
    }
    s.push_str(&format!(
        "data: {head}\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n"
    ));
    s.push_str(&format!(
        "data: {}\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{words},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0}}}}}}\n\n",
        &head[..head.len() - "\"choices\":[{\"index\":0,".len()],
        words + 12
    ));
    s.push_str("data: [DONE]\n\n");
    s.into_bytes()
}

/// An Anthropic Messages stream with `words` text deltas.
fn anthropic_stream(words: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut ev = |name: &str, data: Value| {
        s.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    };
    ev(
        "message_start",
        json!({"type":"message_start","message":{"id":"msg_0123","type":"message","role":"assistant","model":"mock-claude-sonnet","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}),
    );
    ev(
        "content_block_start",
        json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
    );
    for i in 0..words {
        ev(
            "content_block_delta",
            json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":format!("word{i} ")}}),
        );
    }
    ev(
        "content_block_stop",
        json!({"type":"content_block_stop","index":0}),
    );
    ev(
        "message_delta",
        json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":words}}),
    );
    ev("message_stop", json!({"type":"message_stop"}));
    s.into_bytes()
}

/// Splits `bytes` into network-sized chunks (16 KiB, as the mock writes).
fn chunks(bytes: &[u8]) -> Vec<&[u8]> {
    bytes.chunks(16 * 1024).collect()
}

fn drive(t: &mut dyn StreamTranslator, bytes: &[u8]) -> usize {
    let mut framer = SseFramer::default();
    let mut events: Vec<SseEvent> = Vec::new();
    let mut out = BytesMut::new();
    for c in chunks(bytes) {
        framer.push(c, &mut events);
        for e in events.drain(..) {
            t.on_event(&e, &mut out);
        }
    }
    t.finish(&mut out);
    assert!(t.usage().is_some());
    out.len()
}

fn bench_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    for size in [100usize, 10 * 1024, 1024 * 1024] {
        let body = chat_body(size, true);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse", size), &body, |b, body| {
            b.iter(|| {
                let m = parse_object(black_box(body)).unwrap();
                black_box(model_of(&m).unwrap());
                m
            })
        });
        // What the pipeline sends upstream: the parsed body with the
        // upstream model, serialised again (once per attempt).
        let parsed = parse_object(&body).unwrap();
        g.bench_with_input(
            BenchmarkId::new("upstream_body", size),
            &parsed,
            |b, parsed| b.iter(|| body_with_model(black_box(parsed), "mock-gpt-4o-mini")),
        );
        // Before: a copy of the map with the model inserted, serialised.
        g.bench_with_input(
            BenchmarkId::new("upstream_body_by_copy", size),
            &parsed,
            |b, parsed| {
                b.iter(|| {
                    let mut m: Map<String, Value> = parsed.clone();
                    m.insert("model".into(), Value::String("mock-gpt-4o-mini".into()));
                    serde_json::to_vec(&m).unwrap()
                })
            },
        );
    }
    g.finish();
}

fn bench_sse(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse");
    for words in [16usize, 1000] {
        let openai = openai_stream(words);
        let anthropic = anthropic_stream(words);
        g.throughput(Throughput::Elements(words as u64 + 4));
        g.bench_with_input(BenchmarkId::new("openai_relay", words), &openai, |b, s| {
            b.iter(|| {
                let (out, relay) = relay_all(&chunks(black_box(s)), false);
                assert!(relay.usage.is_some());
                out
            })
        });
        g.bench_with_input(
            BenchmarkId::new("anthropic_passthrough", words),
            &anthropic,
            |b, s| b.iter(|| drive(&mut translate::AnthropicPassthrough::new(), black_box(s))),
        );
        g.bench_with_input(
            BenchmarkId::new("openai_to_anthropic", words),
            &openai,
            |b, s| {
                b.iter(|| {
                    drive(
                        &mut translate::OpenAiToAnthropicStream::new("mock-claude"),
                        black_box(s),
                    )
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("anthropic_to_openai", words),
            &anthropic,
            |b, s| {
                b.iter(|| {
                    drive(
                        &mut translate::AnthropicToOpenAiStream::new("mock-gpt", true),
                        black_box(s),
                    )
                })
            },
        );
    }
    g.finish();
}

fn bench_plain_usage(c: &mut Criterion) {
    let body = serde_json::to_vec(&json!({
        "id": "chatcmpl-0123456789abcdef", "object": "chat.completion", "created": 1700000000,
        "model": "mock-gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "word ".repeat(16)}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28,
                  "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}
    }))
    .unwrap();
    c.bench_function("plain_usage/openai", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_slice(black_box(&body)).unwrap();
            let u: OpenAiUsage = serde_json::from_value(v["usage"].clone()).unwrap();
            u.tokens()
        })
    });
}

fn bench_translate(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    let req = parse_object(&chat_body(1000, true)).unwrap();
    g.bench_function("request_openai_to_anthropic", |b| {
        b.iter(|| {
            translate::openai_chat_request_to_anthropic(black_box(&req), "mock-claude").unwrap()
        })
    });
    let areq = translate::openai_chat_request_to_anthropic(&req, "mock-claude").unwrap();
    g.bench_function("request_anthropic_to_openai", |b| {
        b.iter(|| {
            translate::anthropic_request_to_openai_chat(black_box(&areq), "mock-gpt").unwrap()
        })
    });
    let aresp = json!({"id":"msg_0123","type":"message","role":"assistant","model":"mock-claude-sonnet",
        "content":[{"type":"text","text":"word ".repeat(16)}],"stop_reason":"end_turn","stop_sequence":null,
        "usage":{"input_tokens":12,"output_tokens":16,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}});
    g.bench_function("response_anthropic_to_openai", |b| {
        b.iter(|| {
            translate::anthropic_response_to_openai_chat(black_box(&aresp), "mock-gpt").unwrap()
        })
    });
    let oresp = translate::anthropic_response_to_openai_chat(&aresp, "mock-gpt").unwrap();
    g.bench_function("response_openai_to_anthropic", |b| {
        b.iter(|| {
            translate::openai_chat_response_to_anthropic(black_box(&oresp), "mock-claude").unwrap()
        })
    });
    g.finish();
}

fn price_book() -> PriceBook {
    let mut models = BTreeMap::new();
    for m in ["mock-gpt", "mock-claude", "mock-embed"] {
        models.insert(
            m.to_owned(),
            ModelPrice {
                input_per_million: "0.15".parse().unwrap(),
                output_per_million: "0.60".parse().unwrap(),
                cache_read_per_million: Some("0.075".parse().unwrap()),
                cache_write_per_million: None,
            },
        );
    }
    PriceBook {
        version: 7,
        models,
        effective_from: None,
    }
}

fn tokens() -> TokenCounts {
    TokenCounts {
        input_tokens: 1200,
        output_tokens: 345,
        cache_read_tokens: 200,
        cache_write_tokens: 0,
        reasoning_tokens: 0,
    }
}

fn bench_pricing(c: &mut Criterion) {
    let book = price_book();
    let t = tokens();
    c.bench_function("pricing/cost", |b| {
        b.iter(|| book.cost(black_box("mock-gpt"), black_box(&t)))
    });
}

fn key_record() -> KeyRecord {
    KeyRecord {
        key_id: "key_0123456789".into(),
        tenant_id: "acme".into(),
        name: "bench".into(),
        secret_sha256: String::new(),
        models: None,
        rpm: None,
        tpm: None,
        max_concurrency: None,
        expires_at: None,
        disabled: false,
        revoked: false,
        budget: None,
    }
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    let keys = KeyStore::detached();
    let secret = "tg_0123456789abcdef0123456789abcdef0123456789abcdef";
    futures::executor::block_on(async {
        for i in 0..10_000 {
            keys.remember(&format!("tg_other_{i}"), key_record()).await;
        }
        keys.remember(secret, key_record()).await;
    });
    g.bench_function("key", |b| {
        b.iter(|| futures::executor::block_on(keys.authenticate(black_box(secret))).unwrap())
    });
    let quotas = Quotas::detached();
    let key = key_record();
    for (scope, id) in [
        (QuotaScope::Tenant, key.tenant_id.as_str()),
        (QuotaScope::Key, key.key_id.as_str()),
    ] {
        quotas.apply(
            &quota_key(scope, id),
            QuotaState {
                scope,
                id: id.into(),
                tenant_id: key.tenant_id.clone(),
                state: QuotaLevel::Ok,
                remaining: Some(Decimal::from(1_000_000)),
                limit: None,
                threshold: None,
                version: 1,
                priced_seq: 0,
                updated_at: chrono::Utc::now(),
            },
        );
    }
    g.bench_function("quota_check", |b| {
        b.iter(|| quotas.check(black_box(&key)).unwrap())
    });
    let cost: Decimal = "0.000345".parse().unwrap();
    let mut seq = 0u64;
    g.bench_function("quota_debit_and_ack", |b| {
        b.iter(|| {
            seq += 1;
            let id = seq.to_string();
            quotas.debit(&key, &id, cost);
            quotas.acknowledged(&id, seq);
        })
    });
    g.finish();
}

/// A usage event as the gateway builds it for one chat completion.
fn usage_event(tokens: TokenCounts, cost: Decimal, price_version: u64) -> Event {
    Event::Usage(UsageEvent {
        meta: EventMeta::new("acme", "key_0123456789", "req_0190c0ffee0123456789abcdef"),
        api: ApiFormat::OpenaiChat,
        requested_model: "mock-gpt".into(),
        model: "mock-gpt-4o-mini".into(),
        provider: "openai".into(),
        deployment: "mock-openai".into(),
        cost,
        tokens,
        estimated: false,
        status: 200,
        streamed: true,
        latency_ms: 3,
        ttft_ms: Some(1),
        retries: 0,
        price_version,
    })
}

fn bench_event(c: &mut Criterion) {
    let book = price_book();
    c.bench_function("event/usage_build_and_encode", |b| {
        b.iter(|| {
            let t = tokens();
            let cost = book.cost("mock-gpt", &t);
            black_box(usage_event(t, cost, book.version).to_json())
        })
    });
}

/// A bus that acknowledges everything at once: what the publisher's own
/// cost looks like with the bus out of the picture.
struct AckAll(tollgate_schemas::Names);

#[async_trait::async_trait]
impl tollgate_schemas::bus::EventBus for AckAll {
    async fn publish(&self, _: Outgoing) -> Result<PublishReceipt, BusError> {
        Ok(PublishReceipt {
            position: 1,
            duplicate: false,
        })
    }
    async fn publish_many(&self, msgs: Vec<Outgoing>) -> Vec<Result<PublishReceipt, BusError>> {
        msgs.iter()
            .map(|_| {
                Ok(PublishReceipt {
                    position: 1,
                    duplicate: false,
                })
            })
            .collect()
    }
    async fn consumer(
        &self,
        _: tollgate_schemas::bus::ConsumerSpec,
    ) -> Result<Box<dyn tollgate_schemas::bus::EventConsumer>, BusError> {
        Err(BusError::new(
            tollgate_schemas::bus::BusErrorKind::Config,
            "not in a bench",
        ))
    }
    async fn ready(&self) -> Result<(), BusError> {
        Ok(())
    }
    async fn head(&self) -> Result<u64, BusError> {
        Ok(0)
    }
    async fn heads(&self) -> Result<Vec<u64>, BusError> {
        Ok(vec![0])
    }
    async fn pending(&self, _: &str) -> Result<u64, BusError> {
        Ok(0)
    }
    async fn committed(&self, _: &str) -> Result<Vec<u64>, BusError> {
        Ok(vec![0])
    }
    fn names(&self) -> &tollgate_schemas::Names {
        &self.0
    }
}

/// The cost of handing one usage event to the publisher, which now appends
/// it to the spool (one `write(2)`) before the response may end, against the
/// in-memory channel hand-off it replaced: the per-request price of "a kill
/// -9 loses nothing".
fn bench_publish(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let names = tollgate_schemas::Names::namespaced("bench");
    let bus: std::sync::Arc<dyn tollgate_schemas::bus::EventBus> =
        std::sync::Arc::new(AckAll(names.clone()));
    let (publisher, handle) = rt
        .block_on(Publisher::start(bus, PublisherConfig::new(dir.path())))
        .unwrap();
    let event = usage_event(tokens(), Decimal::new(123, 6), 1);
    let msg = Outgoing {
        subject: names.event_subject(event.kind(), "acme"),
        id: event.meta().id.to_string(),
        payload: bytes::Bytes::from(event.to_json()),
        headers: vec![(
            "traceparent".to_owned(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
        )],
    };
    let mut g = c.benchmark_group("publish");
    g.bench_function("spool_write_ahead", |b| {
        b.iter(|| publisher.publish(black_box(msg.clone())))
    });
    // The old path: a bounded channel drained by a task.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Outgoing>(65_536);
    rt.spawn(async move {
        let mut buf = Vec::new();
        while rx.recv_many(&mut buf, 256).await > 0 {
            buf.clear();
        }
    });
    g.bench_function("channel_only_before", |b| {
        b.iter(|| {
            let mut m = black_box(msg.clone());
            while let Err(tokio::sync::mpsc::error::TrySendError::Full(back)) = tx.try_send(m) {
                m = back;
                std::thread::yield_now();
            }
        })
    });
    g.finish();
    // Whole-process CPU per event (the caller's append plus the worker's read
    // back, decode and publish), which criterion's per-call time does not
    // see. Interleaved rounds, so a noisy neighbour hits both alike.
    const N: u64 = 200_000;
    for round in 1..=3 {
        let cpu = process_cpu();
        for _ in 0..N {
            publisher.publish(msg.clone());
        }
        while publisher.spool_depth() > 0 {
            std::thread::yield_now();
        }
        let spool = (process_cpu() - cpu) / N as f64;
        let cpu = process_cpu();
        for _ in 0..N {
            let mut m = msg.clone();
            while let Err(tokio::sync::mpsc::error::TrySendError::Full(back)) = tx.try_send(m) {
                m = back;
                std::thread::yield_now();
            }
        }
        while tx.capacity() < tx.max_capacity() {
            std::thread::yield_now();
        }
        let channel = (process_cpu() - cpu) / N as f64;
        eprintln!(
            "publish/cpu_per_event round {round}: spool write-ahead {:.2} µs, channel only {:.2} µs",
            spool * 1e6,
            channel * 1e6
        );
    }
    rt.block_on(handle.shutdown(std::time::Duration::from_secs(5)));
}

/// This process's user + system CPU seconds (`/proc/self/stat`, clock ticks
/// at the usual 100 Hz).
fn process_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

criterion_group!(
    benches,
    bench_publish,
    bench_request,
    bench_sse,
    bench_plain_usage,
    bench_translate,
    bench_pricing,
    bench_lookup,
    bench_event
);
criterion_main!(benches);
