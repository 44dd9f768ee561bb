//! The meter's "nothing lost, nothing counted twice" against real NATS and
//! ClickHouse: kill -9 between insert and ack, re-publication with new message
//! ids, and full replays with different batch sizes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod meter_common;

use std::time::Duration;

use meter_common::*;
use rand::Rng;
use tollgate_schemas::bus::EventBus;
use tollgate_schemas::events::{
    ApiFormat, CountSource, Event, EventMeta, RequestEvent, TokenCountEvent,
};
use tollgate_tests::eventually;
use tollgate_tests::harness::TestEnv;

/// Kill -9 the meter at random points under load, many times, with a pause
/// injected between insert and commit so that many kills land exactly there.
/// After a clean restart `usage` holds every event once and the aggregates
/// equal the sums of the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_insert_and_ack_loses_and_doubles_nothing() {
    let env = TestEnv::new();
    let bus = bus(&env.nats_url, &env.names).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meter.toml");
    // ack_wait 2 s: what a killed meter held comes back quickly.
    std::fs::write(
        &config,
        meter_toml(
            &env.nats_url,
            &env.id,
            &env.clickhouse_url,
            &env.database,
            150,
            2,
        ),
    )
    .unwrap();

    const N: u64 = 6_000;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let load = spawn_load(&bus, &env.names, &events, Duration::from_millis(40));

    let fault = [("TOLLGATE_METER_FAULT_ACK_DELAY_MS", "250".to_owned())];
    let mut kills_between_insert_and_ack = 0;
    let mut rng = rand::rng();
    for i in 0..12 {
        let mut meter = MeterProcess::spawn(
            &config,
            dir.path().join(format!("meter-{i}.log")),
            &fault,
            &["run"],
        );
        let life = rng.random_range(400..1_400);
        tokio::time::sleep(Duration::from_millis(life)).await;
        meter.kill9();
        let log = meter.log_text();
        let inserted = log
            .matches("fault injection: inserted, pausing before commit")
            .count();
        let committed = log.matches("fault injection: committed").count();
        if inserted > committed {
            kills_between_insert_and_ack += 1;
        }
    }
    tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .unwrap()
        .unwrap();
    println!("{kills_between_insert_and_ack} of 12 kills landed between an insert and its ack");
    assert!(
        kills_between_insert_and_ack >= 1,
        "no kill landed between insert and ack"
    );

    let _final = MeterProcess::spawn(&config, dir.path().join("meter-final.log"), &[], &["run"]);
    let ch = env.ch();
    eventually(
        "every event in usage and the consumer idle",
        Duration::from_secs(40),
        || {
            let ch = ch.clone();
            let (url, names) = (env.nats_url.clone(), env.names.clone());
            async move {
                count(&ch, "SELECT count() FROM usage").await == N
                    && consumer_idle(&url, &names, "meter").await
            }
        },
    )
    .await;
    assert_exact(&ch, &events).await;
    let raw = count(&ch, "SELECT count() FROM usage_events").await;
    println!(
        "usage_events holds {raw} physical rows for {N} events (re-inserts not yet merged away)"
    );
    assert!(raw >= N);
}

/// A redelivery the bus cannot deduplicate: every event published twice more
/// with new message ids. Nothing finance reads changes. Request and
/// token-count events are stored the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_events_with_new_message_ids_change_nothing() {
    let env = TestEnv::new();
    let bus = bus(&env.nats_url, &env.names).await;
    let config = tollgate_meter::Config::from_toml(&meter_toml(
        &env.nats_url,
        &env.id,
        &env.clickhouse_url,
        &env.database,
        500,
        30,
    ))
    .unwrap();
    let meter = InProcessMeter::start(config, None);

    const N: u64 = 2_000;
    let mut events: Vec<Event> = (0..N).map(usage_event).collect();
    for i in 0..50u64 {
        let meta = EventMeta::new(format!("tenant-{}", i % 3), "key-1", format!("req-{i}"));
        events.push(Event::Request(RequestEvent {
            meta: meta.clone(),
            api: ApiFormat::OpenaiChat,
            method: "POST".into(),
            route: "/v1/chat/completions".into(),
            model: Some("gpt-4o".into()),
            status: 200,
            error_type: None,
            streamed: false,
            latency_ms: 5,
            deployment: None,
        }));
        events.push(Event::TokenCount(TokenCountEvent {
            meta: EventMeta::new(format!("tenant-{}", i % 3), "key-1", format!("req-{i}")),
            api: ApiFormat::AnthropicCountTokens,
            model: "claude-sonnet".into(),
            input_tokens: 10 + i,
            source: CountSource::Tokenizer,
        }));
    }
    publish_all(
        &bus,
        events
            .iter()
            .map(|e| outgoing(&env.names, e, None))
            .collect(),
    )
    .await;
    let ch = env.ch();
    let settled = |expected_head: u64| {
        let (ch, url, names, bus) = (
            ch.clone(),
            env.nats_url.clone(),
            env.names.clone(),
            bus.clone(),
        );
        move || {
            let (ch, url, names, bus) = (ch.clone(), url.clone(), names.clone(), bus.clone());
            async move {
                bus.head().await.unwrap() == expected_head
                    && consumer_idle(&url, &names, "meter").await
                    && count(&ch, "SELECT count() FROM usage").await == N
            }
        }
    };
    let total = events.len() as u64;
    eventually(
        "the first publication stored",
        Duration::from_secs(30),
        settled(total),
    )
    .await;
    assert_exact(&ch, &events).await;
    assert_eq!(count(&ch, "SELECT count() FROM requests").await, 50);
    assert_eq!(count(&ch, "SELECT count() FROM token_counts").await, 50);
    let before = (
        usage_snapshot(&ch).await,
        hourly_snapshot(&ch).await,
        daily_snapshot(&ch).await,
    );

    for _ in 0..2 {
        let again = events
            .iter()
            .map(|e| outgoing(&env.names, e, Some(uuid::Uuid::now_v7().to_string())))
            .collect();
        publish_all(&bus, again).await;
    }
    eventually(
        "both re-publications consumed",
        Duration::from_secs(30),
        settled(3 * total),
    )
    .await;
    let after = (
        usage_snapshot(&ch).await,
        hourly_snapshot(&ch).await,
        daily_snapshot(&ch).await,
    );
    assert!(before.0 == after.0, "usage changed");
    assert_eq!(before.1, after.1, "usage_hourly changed");
    assert_eq!(before.2, after.2, "usage_daily changed");
    assert_exact(&ch, &events).await;
    assert_eq!(count(&ch, "SELECT count() FROM requests").await, 50);
    assert_eq!(count(&ch, "SELECT count() FROM token_counts").await, 50);
    meter.shutdown().await;
}

/// Replaying the whole stream (duplicates with new message ids and a poison
/// message included) into an empty database, twice, with batch sizes 7 and
/// 1000, gives identical `usage` and aggregates; replaying again is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_stream_twice_with_different_batch_sizes_gives_identical_aggregates() {
    let env = TestEnv::new();
    let bus = bus(&env.nats_url, &env.names).await;
    const N: u64 = 1_200;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let mut msgs: Vec<_> = events
        .iter()
        .map(|e| outgoing(&env.names, e, None))
        .collect();
    // A tenth of the events again under new message ids, and one poison message.
    msgs.extend(
        events
            .iter()
            .step_by(10)
            .map(|e| outgoing(&env.names, e, Some(uuid::Uuid::now_v7().to_string()))),
    );
    let mut poison = outgoing(&env.names, &events[0], Some("poison-1".into()));
    poison.payload = bytes::Bytes::from_static(b"{\"kind\": \"usage\", \"oops\": true}");
    msgs.push(poison);
    publish_all(&bus, msgs).await;

    let dir = tempfile::tempdir().unwrap();
    let dbs = [format!("{}_a", env.database), format!("{}_b", env.database)];
    let _drop = DropDatabases(env.clickhouse_url.clone(), dbs.to_vec());
    let mut snapshots = Vec::new();
    for (db, batch) in dbs.iter().zip([7usize, 1_000]) {
        let config = dir.path().join(format!("{db}.toml"));
        std::fs::write(
            &config,
            meter_toml(&env.nats_url, &env.id, &env.clickhouse_url, db, batch, 30),
        )
        .unwrap();
        for _ in 0..(if batch == 7 { 2 } else { 1 }) {
            let mut replay = MeterProcess::spawn(
                &config,
                dir.path().join(format!("{db}.log")),
                &[],
                &["replay", "--from-seq", "1"],
            );
            let status = tokio::time::timeout(Duration::from_secs(45), async {
                loop {
                    if let Some(s) = replay.child.try_wait().unwrap() {
                        return s;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await
            .expect("replay did not finish within 45 s");
            assert!(status.success(), "replay failed: {}", replay.log_text());
        }
        let ch = tollgate_tests::harness::ch_client(&env.clickhouse_url).with_database(db);
        assert_exact(&ch, &events).await;
        snapshots.push((
            usage_snapshot(&ch).await,
            hourly_snapshot(&ch).await,
            daily_snapshot(&ch).await,
        ));
    }
    assert!(
        snapshots[0].0 == snapshots[1].0,
        "usage differs between the replays"
    );
    assert_eq!(
        snapshots[0].1, snapshots[1].1,
        "usage_hourly differs between the replays"
    );
    assert_eq!(
        snapshots[0].2, snapshots[1].2,
        "usage_daily differs between the replays"
    );
}

struct DropDatabases(String, Vec<String>);

impl Drop for DropDatabases {
    fn drop(&mut self) {
        let port: u16 = self.0.rsplit(':').next().unwrap().parse().unwrap();
        for db in &self.1 {
            let sql = format!("DROP DATABASE IF EXISTS {db}");
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = write!(
                    s,
                    "POST / HTTP/1.0\r\nContent-Length: {}\r\n\r\n{sql}",
                    sql.len()
                );
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
    }
}
