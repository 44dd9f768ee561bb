//! The whole pipeline on Kafka (tansu): gateway → Kafka → meter → ClickHouse,
//! and billing pricing from Kafka. What clients saw is what `usage` says, and
//! an unreachable broker during traffic loses and doubles nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod meter_common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meter_common::*;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate_gateway::publisher::{Publisher, PublisherConfig};
use tollgate_schemas::bus::{BusKind, EventBus, KafkaBus};
use tollgate_schemas::events::Event;
use tollgate_tests::billing::{Billing, billing_config};
use tollgate_tests::eventually;
use tollgate_tests::harness::{TansuServer, TestEnv, shared_tansu};
use tollgate_tests::stack;

/// What a client saw of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    tenant: String,
    input: u64,
    output: u64,
    /// `x-tollgate-cost` (plain responses only).
    cost: Option<Decimal>,
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()[name].to_str().unwrap().to_owned()
}

async fn openai(http: &reqwest::Client, url: &str, secret: &str, stream: bool) -> (String, Seen) {
    let mut body =
        json!({"model": "mock-gpt", "messages": [{"role": "user", "content": "count the tokens"}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let resp = http
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = header(&resp, "x-request-id");
    let (usage, cost) = if stream {
        let chunks = stack::sse_data(resp).await;
        let usage = chunks
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .find(|c| c["usage"].is_object())
            .expect("a usage chunk")["usage"]
            .clone();
        (usage, None)
    } else {
        let cost = header(&resp, "x-tollgate-cost").parse().unwrap();
        let body: Value = resp.json().await.unwrap();
        (body["usage"].clone(), Some(cost))
    };
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (
        rid,
        Seen {
            tenant: String::new(),
            input: usage["prompt_tokens"].as_u64().unwrap() - cached,
            output: usage["completion_tokens"].as_u64().unwrap(),
            cost,
        },
    )
}

async fn anthropic(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    stream: bool,
) -> (String, Seen) {
    let body = json!({"model": "mock-claude", "max_tokens": 64, "stream": stream,
        "messages": [{"role": "user", "content": "count the tokens"}]});
    let resp = http
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", secret)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = header(&resp, "request-id");
    let seen = if stream {
        let events: Vec<Value> = stack::sse_data(resp)
            .await
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let start = events
            .iter()
            .find(|e| e["type"] == "message_start")
            .unwrap();
        let delta = events
            .iter()
            .rev()
            .find(|e| e["type"] == "message_delta")
            .unwrap();
        Seen {
            tenant: String::new(),
            input: start["message"]["usage"]["input_tokens"].as_u64().unwrap(),
            output: delta["usage"]["output_tokens"].as_u64().unwrap(),
            cost: None,
        }
    } else {
        let cost = header(&resp, "x-tollgate-cost").parse().unwrap();
        let body: Value = resp.json().await.unwrap();
        Seen {
            tenant: String::new(),
            input: body["usage"]["input_tokens"].as_u64().unwrap(),
            output: body["usage"]["output_tokens"].as_u64().unwrap(),
            cost: Some(cost),
        }
    };
    (rid, seen)
}

#[derive(clickhouse::Row, serde::Deserialize, Debug)]
struct UsageRow {
    request_id: String,
    tenant_id: String,
    input_tokens: u64,
    output_tokens: u64,
    cost: String,
}

/// Gateway, meter and billing all on Kafka; clients through the OpenAI and
/// Anthropic APIs, plain and streamed, for two tenants. Every request's
/// tokens (and, for plain responses, `x-tollgate-cost`) equal its row in
/// `usage`, exactly, and billing debited each usage event once at that cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_stack_client_seen_tokens_equal_usage() {
    let env = TestEnv::new();
    let brokers = shared_tansu().brokers();
    let kafka = kafka_settings(&brokers);
    let mock = stack::start_mock().await;
    let mut bconf = billing_config(&env);
    bconf.bus = BusKind::Kafka;
    bconf.kafka = kafka.clone();
    let billing = Billing::start(bconf).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gconf = stack::gateway_config(&env, &env.nats_url, &mock.url(), dir.path(), "");
    gconf.bus = BusKind::Kafka;
    gconf.kafka = kafka.clone();
    let gateway = stack::start_gateway(gconf).await;
    let mconf = tollgate_meter::Config::from_toml(&kafka_meter_toml(
        &brokers,
        &env.id,
        &env.clickhouse_url,
        &env.database,
        500,
    ))
    .unwrap();
    let meter = InProcessMeter::start(mconf, None);

    let tenants = [
        ("acme", "sk-kafka-acme-0123456789"),
        ("globex", "sk-kafka-globex-0123456789"),
    ];
    for (tenant, secret) in tenants {
        stack::put_key(
            &env.nats_url,
            &env,
            secret,
            stack::key(tenant, &format!("k-{tenant}")),
        )
        .await;
    }
    let http = reqwest::Client::new();
    let url = gateway.url();
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    for round in 0..3 {
        for (tenant, secret) in tenants {
            for (rid, mut s) in [
                openai(&http, &url, secret, false).await,
                openai(&http, &url, secret, true).await,
                anthropic(&http, &url, secret, false).await,
                anthropic(&http, &url, secret, round % 2 == 0).await,
            ] {
                s.tenant = tenant.to_owned();
                assert!(seen.insert(rid, s).is_none(), "request ids are unique");
            }
        }
    }
    let n = seen.len() as u64;
    let ch = env.ch();
    eventually("every request in usage", Duration::from_secs(60), || {
        let ch = ch.clone();
        async move { count(&ch, "SELECT count() FROM usage").await == n }
    })
    .await;
    let rows: Vec<UsageRow> = ch
        .query(
            "SELECT request_id, tenant_id, input_tokens, output_tokens, toString(cost) FROM usage",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rows.len() as u64, n);
    let mut costs: BTreeMap<String, Decimal> = BTreeMap::new();
    for r in &rows {
        let s = seen
            .get(&r.request_id)
            .unwrap_or_else(|| panic!("usage has a request no client made: {r:?}"));
        assert_eq!(
            (r.tenant_id.as_str(), r.input_tokens, r.output_tokens),
            (s.tenant.as_str(), s.input, s.output),
            "request {}",
            r.request_id
        );
        let cost: Decimal = r.cost.parse().unwrap();
        if let Some(c) = s.cost {
            assert_eq!(cost.normalize(), c.normalize(), "cost of {}", r.request_id);
        }
        costs.insert(r.request_id.clone(), cost);
    }
    // Billing priced every usage event from Kafka, once, at the same cost.
    eventually(
        "billing debited every event",
        Duration::from_secs(60),
        || {
            let ch = ch.clone();
            async move { count(&ch, "SELECT count() FROM ledger WHERE kind = 'debit'").await == n }
        },
    )
    .await;
    let debits: Vec<(String, String)> = ch
        .query(
            "SELECT u.request_id, toString(abs(l.amount)) FROM ledger AS l
             ANY INNER JOIN (SELECT event_id, request_id FROM usage) AS u USING event_id
             WHERE l.kind = 'debit'",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(debits.len() as u64, n);
    for (rid, amount) in debits {
        assert_eq!(
            amount.parse::<Decimal>().unwrap().normalize(),
            costs[&rid].normalize(),
            "billing's debit of {rid}"
        );
    }
    let total: Decimal = costs.values().sum();
    println!("{n} requests on Kafka: tokens and costs equal usage; billing debited {total} USD");
    meter.shutdown().await;
    gateway.shutdown().await.unwrap();
    billing.stop().await;
}

/// The broker becomes unreachable (frozen) while events flow: the publisher
/// spools to disk, the broker returns, the spool drains, and the meter
/// stores every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_unreachable_gateway_spools_and_every_event_arrives_once() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,tollgate_schemas=debug".into()),
        )
        .with_test_writer()
        .try_init();
    let env = TestEnv::new();
    let mut tansu = TansuServer::start().unwrap();
    let mut settings = kafka_settings(&tansu.brokers());
    settings.publish_timeout_ms = 2_000;
    let bus = Arc::new(
        KafkaBus::connect(&settings, env.names.clone())
            .await
            .unwrap(),
    );
    let spool = tempfile::tempdir().unwrap();
    let (publisher, handle) = Publisher::start(
        bus.clone() as Arc<dyn EventBus>,
        PublisherConfig {
            retry_backoff_max: Duration::from_millis(500),
            publish_timeout: Duration::from_secs(2),
            ..PublisherConfig::new(spool.path())
        },
    )
    .await
    .unwrap();
    // The outage tests the gateway's spool, not group membership: with a
    // session longer than the outage, tansu never has to re-form the group
    // (its rejoin after a lapsed session can stall for a minute; README).
    let mconf = tollgate_meter::Config::from_toml(
        &kafka_meter_toml(
            &tansu.brokers(),
            &env.id,
            &env.clickhouse_url,
            &env.database,
            200,
        )
        .replace("session_timeout_ms = 6000", "session_timeout_ms = 30000"),
    )
    .unwrap();
    let meter = InProcessMeter::start(mconf, None);

    const N: u64 = 600;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let mut max_spooled = 0;
    for (i, e) in events.iter().enumerate() {
        if i == 200 {
            tansu.pause().unwrap();
        }
        if i == 450 {
            assert!(
                max_spooled > 0,
                "nothing was spooled while the broker was gone"
            );
            tansu.resume().unwrap();
        }
        publisher.publish(outgoing(&env.names, e, None));
        max_spooled = max_spooled.max(publisher.spool_depth());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("spool depth reached {max_spooled} events during the outage");
    eventually("the spool drained", Duration::from_secs(60), || {
        let p = publisher.clone();
        async move { p.spool_depth() == 0 && p.bus_healthy() }
    })
    .await;
    let ch = env.ch();
    eventually("every event in usage", Duration::from_secs(90), || {
        let ch = ch.clone();
        async move { count(&ch, "SELECT count() FROM usage").await == N }
    })
    .await;
    eventually("the meters' group idle", Duration::from_secs(60), || {
        let bus = bus.clone();
        async move { matches!(bus.pending("meter").await, Ok(0)) }
    })
    .await;
    assert_exact(&ch, &events).await;
    handle.shutdown(Duration::from_secs(10)).await;
    meter.shutdown().await;
}
