//! The meter on Kafka (tansu): kill -9 between insert and commit, two meters
//! in one consumer group with rebalances mid-stream, and a replay. Each ends
//! with `usage` holding every event exactly once and the aggregates equal to
//! the sums of the events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod meter_common;

use std::time::Duration;

use meter_common::*;
use rand::Rng;
use tollgate_schemas::bus::{EventBus, KafkaBus};
use tollgate_schemas::events::Event;
use tollgate_tests::eventually;
use tollgate_tests::harness::{TestEnv, shared_tansu};

/// The meters' consumer group has committed everything (`pending` counts
/// from the group's committed offsets to the partitions' ends).
async fn group_idle(bus: &KafkaBus) -> bool {
    matches!(bus.pending("meter").await, Ok(0))
}

fn config_file(env: &TestEnv, dir: &std::path::Path, max_events: usize) -> std::path::PathBuf {
    let path = dir.join("meter.toml");
    std::fs::write(
        &path,
        kafka_meter_toml(
            &shared_tansu().brokers(),
            &env.id,
            &env.clickhouse_url,
            &env.database,
            max_events,
        ),
    )
    .unwrap();
    path
}

async fn wait_exact(env: &TestEnv, bus: &KafkaBus, events: &[Event], within: Duration) {
    let ch = env.ch();
    let n = events.len() as u64;
    eventually("every event in usage and the group idle", within, || {
        let ch = ch.clone();
        async move { count(&ch, "SELECT count() FROM usage").await == n && group_idle(bus).await }
    })
    .await;
    assert_exact(&ch, events).await;
}

/// Kill -9 the meter many times under load, each time after it has joined the
/// group and at a random moment, with a pause between insert and commit so
/// kills land there. A final meter then brings `usage` to exactly the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_kill_9_between_insert_and_commit_loses_and_doubles_nothing() {
    let env = TestEnv::new();
    let bus = kafka_bus(&shared_tansu().brokers(), &env.names).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&env, dir.path(), 150);

    const N: u64 = 4_000;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let load = spawn_load(&bus, &env.names, &events, Duration::from_millis(60));

    let fault = [("TOLLGATE_METER_FAULT_ACK_DELAY_MS", "250".to_owned())];
    let mut between = 0;
    let kills = 8;
    for i in 0..kills {
        let log = dir.path().join(format!("meter-{i}.log"));
        let mut meter = MeterProcess::spawn(&config, log.clone(), &fault, &["run"]);
        // A killed member holds its partitions until its session times out;
        // kill each meter only once it has partitions, so every life works.
        wait_for_log(&log, "kafka partitions assigned", Duration::from_secs(60)).await;
        wait_for_log(&log, "fault injection: inserted", Duration::from_secs(30)).await;
        let life = rand::rng().random_range(0..700);
        tokio::time::sleep(Duration::from_millis(life)).await;
        meter.kill9();
        let text = meter.log_text();
        let inserted = text
            .matches("fault injection: inserted, pausing before commit")
            .count();
        let committed = text.matches("fault injection: committed").count();
        if inserted > committed {
            between += 1;
        }
    }
    tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .unwrap()
        .unwrap();
    println!("{between} of {kills} kills landed between an insert and its commit");
    assert!(between >= 1, "no kill landed between insert and commit");

    let _final = MeterProcess::spawn(&config, dir.path().join("meter-final.log"), &[], &["run"]);
    wait_exact(&env, &bus, &events, Duration::from_secs(90)).await;
    let raw = count(&env.ch(), "SELECT count() FROM usage_events").await;
    println!("usage_events holds {raw} physical rows for {N} events");
    assert!(raw >= N);
}

/// Two meters share the group while events stream in: meter B joins (the
/// partitions are split), then meter A leaves (SIGTERM; B takes them all).
/// Nothing is lost or doubled, and both meters really held partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_two_meters_rebalance_mid_stream() {
    let env = TestEnv::new();
    let bus = kafka_bus(&shared_tansu().brokers(), &env.names).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(&env, dir.path(), 100);

    const N: u64 = 4_000;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let load = {
        let (bus, names, events) = (bus.clone(), env.names.clone(), events.clone());
        tokio::spawn(async move {
            for chunk in events.chunks(50) {
                publish_all(
                    &bus,
                    chunk.iter().map(|e| outgoing(&names, e, None)).collect(),
                )
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = MeterProcess::spawn(&config, log_a.clone(), &[], &["run"]);
    wait_for_log(&log_a, "kafka partitions assigned", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _b = MeterProcess::spawn(&config, log_b.clone(), &[], &["run"]);
    // B's join makes A give partitions up (commit on revoke) and both get some.
    wait_for_log(&log_a, "kafka partitions revoked", Duration::from_secs(60)).await;
    wait_for_log(&log_b, "kafka partitions assigned", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !load.is_finished(),
        "the stream ended before the rebalance: not mid-stream"
    );
    // A leaves cleanly: B is given everything.
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(a.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(s) = a.child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("meter A did not stop within 30 s");
    assert!(exit.success(), "meter A: {}", a.log_text());
    tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .unwrap()
        .unwrap();
    wait_exact(&env, &bus, &events, Duration::from_secs(90)).await;
    let b_text = std::fs::read_to_string(&log_b).unwrap();
    let b_assignments: Vec<&str> = b_text
        .lines()
        .filter(|l| l.contains("kafka partitions assigned"))
        .collect();
    assert!(
        b_assignments.iter().any(|l| l.contains("[0, 1, 2]")),
        "B never held every partition after A left: {b_assignments:?}"
    );
}

/// `replay --from-seq 1` on Kafka into two empty databases (batch sizes 7 and
/// 1000), duplicates with new ids and a poison message included: both equal
/// the events exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_replay_rebuilds_usage_exactly() {
    let env = TestEnv::new();
    let bus = kafka_bus(&shared_tansu().brokers(), &env.names).await;
    const N: u64 = 900;
    let events: Vec<Event> = (0..N).map(usage_event).collect();
    let mut msgs: Vec<_> = events
        .iter()
        .map(|e| outgoing(&env.names, e, None))
        .collect();
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
    for (suffix, batch) in [("a", 7usize), ("b", 1_000)] {
        let db = format!("{}_{suffix}", env.database);
        let config = dir.path().join(format!("{db}.toml"));
        std::fs::write(
            &config,
            kafka_meter_toml(
                &shared_tansu().brokers(),
                &env.id,
                &env.clickhouse_url,
                &db,
                batch,
            ),
        )
        .unwrap();
        let mut replay = MeterProcess::spawn(
            &config,
            dir.path().join(format!("{db}.log")),
            &[],
            &["replay", "--from-seq", "1"],
        );
        let status = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let Some(s) = replay.child.try_wait().unwrap() {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if status.is_err() {
            let ch = tollgate_tests::harness::ch_client(&env.clickhouse_url).with_database(&db);
            let n = count(&ch, "SELECT count() FROM usage_events").await;
            let heads = bus.heads().await.unwrap();
            panic!(
                "replay did not finish within 60 s: rows {n}, heads {:?}",
                heads
                    .iter()
                    .map(|h| (
                        tollgate_schemas::bus::lane_of(*h),
                        tollgate_schemas::bus::seq_of(*h)
                    ))
                    .collect::<Vec<_>>()
            );
        }
        let status = status.unwrap();
        assert!(status.success(), "replay failed: {}", replay.log_text());
        let ch = tollgate_tests::harness::ch_client(&env.clickhouse_url).with_database(&db);
        assert_exact(&ch, &events).await;
        let _ = ch
            .query(&format!("DROP DATABASE IF EXISTS {db}"))
            .execute()
            .await;
    }
}

/// A poison message on Kafka is parked in the dead-letter topic (with its
/// reason, origin subject and position) and does not hold the partition
/// back: the good events around it are stored and the group's offsets pass it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_poison_goes_to_the_deadletter_topic_and_the_partition_moves_on() {
    let env = TestEnv::new();
    let brokers = shared_tansu().brokers();
    let bus = kafka_bus(&brokers, &env.names).await;
    let events: Vec<Event> = (0..30).map(usage_event).collect();
    let mut msgs: Vec<_> = events
        .iter()
        .map(|e| outgoing(&env.names, e, None))
        .collect();
    let mut poison = outgoing(&env.names, &events[0], Some("poison-1".into()));
    poison.payload = bytes::Bytes::from_static(b"{\"kind\": \"usage\", \"oops\": true}");
    let poison_subject = poison.subject.clone();
    msgs.insert(10, poison);
    publish_all(&bus, msgs).await;

    let mconf = tollgate_meter::Config::from_toml(&kafka_meter_toml(
        &brokers,
        &env.id,
        &env.clickhouse_url,
        &env.database,
        100,
    ))
    .unwrap();
    let meter = InProcessMeter::start(mconf, None);
    wait_exact(&env, &bus, &events, Duration::from_secs(60)).await;
    meter.shutdown().await;

    // Read the dead-letter topic through a bus whose events topic it is.
    let mut dl_settings = kafka_settings(&brokers);
    dl_settings.topic = Some(bus.deadletter_topic().to_owned());
    let dl = KafkaBus::new(&dl_settings, env.names.clone()).unwrap();
    let mut c = dl
        .consumer(tollgate_schemas::bus::ConsumerSpec::new(
            env.names.deadletter_filter(),
        ))
        .await
        .unwrap();
    let mut parked = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while parked.is_empty() && tokio::time::Instant::now() < deadline {
        parked = c.fetch(10, Duration::from_millis(500)).await.unwrap();
    }
    assert_eq!(parked.len(), 1, "one dead letter");
    let d = &parked[0];
    assert_eq!(d.subject, env.names.deadletter_subject(&poison_subject));
    assert_eq!(
        d.header(tollgate_meter::pipeline::DEADLETTER_SUBJECT_HEADER),
        Some(poison_subject.as_str())
    );
    assert!(
        d.header(tollgate_meter::pipeline::DEADLETTER_REASON_HEADER)
            .is_some_and(|r| !r.is_empty())
    );
    assert_eq!(&d.payload[..], b"{\"kind\": \"usage\", \"oops\": true}");
}
