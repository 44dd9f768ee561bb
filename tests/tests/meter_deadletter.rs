//! Poison messages go to the dead-letter subject with a reason, are counted,
//! and never block the events behind them. Also: the meter's HTTP endpoints.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod meter_common;

use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use meter_common::*;
use tollgate_meter::pipeline::{DEADLETTER_REASON_HEADER, DEADLETTER_SEQ_HEADER};
use tollgate_schemas::events::{Event, EventKind};
use tollgate_tests::eventually;
use tollgate_tests::harness::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_counted_and_the_stream_flows() {
    let env = TestEnv::new();
    let bus = bus(&env.nats_url, &env.names).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}", listener.local_addr().unwrap());
    let config = tollgate_meter::Config::from_toml(&meter_toml(
        &env.nats_url,
        &env.id,
        &env.clickhouse_url,
        &env.database,
        100,
        30,
    ))
    .unwrap();
    let meter = InProcessMeter::start(config, Some(listener));

    let events: Vec<Event> = (0..20).map(usage_event).collect();
    let mut msgs: Vec<_> = events[..10]
        .iter()
        .map(|e| outgoing(&env.names, e, None))
        .collect();
    let subject = env.names.event_subject(EventKind::Usage, "tenant-0");
    for (i, body) in [
        &b"{not json"[..],
        br#"{"id":"0191a2b3-c4d5-7e6f-8a9b-0c1d2e3f4a5b","schema_version":"9.0","kind":"usage"}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let mut m = outgoing(&env.names, &events[0], Some(format!("poison-{i}")));
        m.subject = subject.clone();
        m.payload = bytes::Bytes::copy_from_slice(body);
        msgs.push(m);
    }
    msgs.extend(events[10..].iter().map(|e| outgoing(&env.names, e, None)));
    publish_all(&bus, msgs).await;

    let ch = env.ch();
    eventually(
        "the events after the poison stored",
        Duration::from_secs(20),
        || {
            let (ch, url, names) = (ch.clone(), env.nats_url.clone(), env.names.clone());
            async move {
                count(&ch, "SELECT count() FROM usage").await == 20
                    && consumer_idle(&url, &names, "meter").await
            }
        },
    )
    .await;
    assert_exact(&ch, &events).await;

    // Both poison messages are parked with their reason and origin.
    let js = async_nats::jetstream::new(env.nats().await.unwrap());
    let dl = js.get_stream(&env.names.deadletter_stream).await.unwrap();
    let consumer = dl
        .create_consumer(pull::Config {
            filter_subject: env.names.deadletter_filter(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut parked = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.unwrap();
        let headers = m.headers.clone().unwrap();
        let reason = headers.get(DEADLETTER_REASON_HEADER).unwrap().to_string();
        let seq = headers.get(DEADLETTER_SEQ_HEADER).unwrap().to_string();
        assert_eq!(m.subject.as_str(), env.names.deadletter_subject(&subject));
        parked.push((reason, seq, m.payload.clone()));
    }
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(parked[0].0.starts_with("malformed"), "{:?}", parked[0].0);
    assert!(parked[1].0.contains("schema_version"), "{:?}", parked[1].0);
    assert_eq!(&parked[0].2[..], b"{not json");
    assert_eq!(parked[0].1, "11");

    // Counted, with a bounded reason label; health answers.
    let http = reqwest::Client::new();
    let metrics = http
        .get(format!("{metrics_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "tollgate_meter_dead_letters_total{reason=\"malformed\"}",
        "tollgate_meter_dead_letters_total{reason=\"unsupported_version\"}",
        "tollgate_meter_events_total{kind=\"usage\"}",
        "tollgate_meter_batch_size_messages_bucket",
        "tollgate_meter_insert_duration_seconds_bucket",
        "tollgate_meter_consumer_lag_messages",
    ] {
        assert!(metrics.contains(line), "/metrics lacks {line}:\n{metrics}");
    }
    let health = http
        .get(format!("{metrics_url}/healthz"))
        .send()
        .await
        .unwrap();
    assert!(health.status().is_success());
    meter.shutdown().await;
}
