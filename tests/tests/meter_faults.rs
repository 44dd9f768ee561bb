//! The meter under a ClickHouse outage: it pauses, keeps every batch, and
//! resumes by itself when ClickHouse is back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod meter_common;

use std::time::Duration;

use meter_common::*;
use tollgate_schemas::events::Event;
use tollgate_tests::eventually;
use tollgate_tests::harness::{ClickHouseServer, TestEnv, ch_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_outage_under_load_loses_nothing_and_the_meter_recovers_without_restart() {
    let env = TestEnv::new();
    let mut clickhouse = tokio::task::spawn_blocking(ClickHouseServer::start)
        .await
        .unwrap()
        .unwrap();
    let ch_url = clickhouse.http_url();
    let bus = bus(&env.nats_url, &env.names).await;
    // ack_wait 3 s: while ClickHouse is down, held messages are redelivered
    // and re-inserted after the outage, which the views must absorb.
    let config = tollgate_meter::Config::from_toml(&meter_toml(
        &env.nats_url,
        &env.id,
        &ch_url,
        "tollgate",
        200,
        3,
    ))
    .unwrap();
    let meter = InProcessMeter::start(config, None);

    const N: u64 = 2_500;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let load = spawn_load(&bus, &env.names, &events, Duration::from_millis(60));
    let ch = ch_client(&ch_url).with_database("tollgate");
    eventually("the meter storing events", Duration::from_secs(20), || {
        let ch = ch.clone();
        async move { count(&ch, "SELECT count() FROM usage").await > 0 }
    })
    .await;

    // Down for 4 s under load, then back on the same port with the same data.
    let stopped_at = count(&ch, "SELECT count() FROM usage").await;
    clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.stop();
        clickhouse
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.restart().unwrap();
        clickhouse
    })
    .await
    .unwrap();
    println!("ClickHouse was down for 4 s with {stopped_at} of {N} events stored");
    assert!(
        stopped_at < N,
        "the load ended before the outage; the test proves nothing"
    );

    tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .unwrap()
        .unwrap();
    eventually(
        "every event stored after the outage",
        Duration::from_secs(40),
        || {
            let (ch, url, names) = (ch.clone(), env.nats_url.clone(), env.names.clone());
            async move {
                count(&ch, "SELECT count() FROM usage").await == N
                    && consumer_idle(&url, &names, "meter").await
            }
        },
    )
    .await;
    assert_exact(&ch, &events).await;
    assert!(
        !meter.task.is_finished(),
        "the meter must have kept running"
    );
    meter.shutdown().await;
    drop(clickhouse);
}

/// Shutdown inserts and commits the partial batch: with a batch that would
/// otherwise wait a minute, stopping the meter stores it and acks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_flushes_the_partial_batch_and_commits_it() {
    let env = TestEnv::new();
    let bus = bus(&env.nats_url, &env.names).await;
    let toml = meter_toml(
        &env.nats_url,
        &env.id,
        &env.clickhouse_url,
        &env.database,
        1_000,
        120,
    )
    .replace("max_wait_ms = 100", "max_wait_ms = 60000");
    let meter = InProcessMeter::start(tollgate_meter::Config::from_toml(&toml).unwrap(), None);
    let events: Vec<Event> = (0..10).map(usage_event).collect();
    publish_all(
        &bus,
        events
            .iter()
            .map(|e| outgoing(&env.names, e, None))
            .collect(),
    )
    .await;

    let js = async_nats::jetstream::new(env.nats().await.unwrap());
    eventually(
        "all ten delivered to the meter",
        Duration::from_secs(20),
        || {
            let (js, names) = (js.clone(), env.names.clone());
            async move {
                let Ok(stream) = js.get_stream(&names.events_stream).await else {
                    return false;
                };
                stream
                    .consumer_info("meter")
                    .await
                    .is_ok_and(|i| i.num_ack_pending == 10)
            }
        },
    )
    .await;
    let ch = env.ch();
    assert_eq!(
        count(&ch, "SELECT count() FROM usage").await,
        0,
        "the batch should still be open"
    );
    meter.shutdown().await;
    assert_exact(&ch, &events).await;
    assert!(
        consumer_idle(&env.nats_url, &env.names, "meter").await,
        "shutdown must commit what it inserted"
    );
}

/// Two meters sharing the durable consumer split the work and store every
/// event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meters_sharing_the_durable_consumer_store_each_event_once() {
    let env = TestEnv::new();
    let bus = bus(&env.nats_url, &env.names).await;
    let config = tollgate_meter::Config::from_toml(&meter_toml(
        &env.nats_url,
        &env.id,
        &env.clickhouse_url,
        &env.database,
        100,
        30,
    ))
    .unwrap();
    let meters = [
        InProcessMeter::start(config.clone(), None),
        InProcessMeter::start(config, None),
    ];
    let events: Vec<Event> = (0..3_000).map(usage_event).collect();
    publish_all(
        &bus,
        events
            .iter()
            .map(|e| outgoing(&env.names, e, None))
            .collect(),
    )
    .await;
    let ch = env.ch();
    eventually("every event stored", Duration::from_secs(30), || {
        let (ch, url, names) = (ch.clone(), env.nats_url.clone(), env.names.clone());
        async move {
            count(&ch, "SELECT count() FROM usage").await == 3_000
                && consumer_idle(&url, &names, "meter").await
        }
    })
    .await;
    assert_exact(&ch, &events).await;
    for m in meters {
        m.shutdown().await;
    }
}

/// `kill -9` of a meter with work in hand (its filling batch, what its client
/// prefetched): a new meter stores every event within seconds of starting,
/// not after a minute. The config leaves `ack_wait_secs` at its default, so
/// this measures the default; `TOLLGATE__CONSUMER__ACK_WAIT_SECS` in the
/// environment (the children inherit it) measures another value, e.g. 60,
/// the default before issue 16.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_work_the_next_meter_stores_everything_within_seconds() {
    let env = TestEnv::new();
    let bus = bus(&env.nats_url, &env.names).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meter.toml");
    // Defaults for [batch] (50,000 events or 1 s) and [consumer] ack_wait.
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{}\"\nnamespace = \"{}\"\n[clickhouse]\nurl = \"{}\"\ndatabase = \"{}\"\n\
             [consumer]\ndurable = \"meter\"\n",
            env.nats_url, env.id, env.clickhouse_url, env.database
        ),
    )
    .unwrap();
    let ch = env.ch();
    let mut meter = MeterProcess::spawn(&config, dir.path().join("meter-1.log"), &[], &["run"]);

    const N: u64 = 2_000;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let load = spawn_load(&bus, &env.names, &events, Duration::from_millis(40));
    eventually(
        "the first meter storing events",
        Duration::from_secs(30),
        || {
            let ch = ch.clone();
            async move { count(&ch, "SELECT count() FROM usage").await > 0 }
        },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(30), load)
        .await
        .unwrap()
        .unwrap();
    // Killed right after the last publish: the batch it was filling (up to
    // 1 s of events) is delivered to it and not stored.
    meter.kill9();
    let stored_at_kill = count(&ch, "SELECT count() FROM usage").await;
    println!("meter killed with {stored_at_kill} of {N} events stored");
    assert!(
        stored_at_kill < N,
        "everything was stored before the kill; the test proves nothing"
    );

    let started = std::time::Instant::now();
    let _next = MeterProcess::spawn(&config, dir.path().join("meter-2.log"), &[], &["run"]);
    eventually(
        "every event stored by the next meter",
        Duration::from_secs(90),
        || {
            let ch = ch.clone();
            async move { count(&ch, "SELECT count() FROM usage").await == N }
        },
    )
    .await;
    let took = started.elapsed();
    println!(
        "all {N} events stored {:.1} s after the next meter started ({} were missing)",
        took.as_secs_f64(),
        N - stored_at_kill
    );
    assert!(
        took < Duration::from_secs(10),
        "rows took {took:?} to appear after the restart"
    );
    assert_exact(&ch, &events).await;
}
