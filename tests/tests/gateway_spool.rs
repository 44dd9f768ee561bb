//! Guarantee 1 ("Nothing lost") at the gateway's edge: the event publisher and
//! its on-disk spool against a real `nats-server -js` that each test owns, so
//! it can stop and restart it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tollgate_gateway::publisher::{Publisher, PublisherConfig, PublisherHandle, REJECTED_DIR};
use tollgate_schemas::bus::{ConsumerSpec, EventBus, JetStreamBus, Outgoing, StreamSettings};
use tollgate_schemas::{EventKind, Names};
use tollgate_tests::eventually;
use tollgate_tests::harness::NatsServer;

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

struct Fixture {
    nats: NatsServer,
    bus: Arc<JetStreamBus>,
    names: Names,
    spool: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let nats = NatsServer::start().unwrap();
        let names = Names::namespaced("spooltest");
        let bus = JetStreamBus::connect(&nats.url(), names.clone(), StreamSettings::default())
            .await
            .unwrap();
        let spool = tempfile::Builder::new()
            .prefix("tollgate-spool-")
            .tempdir()
            .unwrap();
        Self {
            nats,
            bus: Arc::new(bus),
            names,
            spool,
        }
    }

    /// Quick to notice an outage and quick to come back, so tests stay short.
    fn config(&self) -> PublisherConfig {
        PublisherConfig {
            retry_backoff_max: Duration::from_millis(500),
            publish_timeout: Duration::from_secs(2),
            ..PublisherConfig::new(self.spool.path())
        }
    }

    /// Starts a publisher; waits (bounded) for a crashed predecessor's
    /// worker to let go of the spool's lock.
    async fn start(&self, config: PublisherConfig) -> (Publisher, PublisherHandle) {
        for _ in 0..50 {
            let bus: Arc<dyn EventBus> = self.bus.clone();
            match Publisher::start(bus, config.clone()).await {
                Ok(started) => return started,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("start publisher: {e}"),
            }
        }
        panic!("the spool is still locked after 5 s");
    }

    fn event(&self, seq: u64) -> Outgoing {
        let id = uuid::Uuid::now_v7().to_string();
        Outgoing {
            subject: self.names.event_subject(EventKind::Usage, "acme"),
            payload: Bytes::from(format!(r#"{{"id":"{id}","kind":"usage","seq":{seq}}}"#)),
            id,
            headers: vec![("traceparent".into(), TRACEPARENT.into())],
        }
    }

    async fn head_is(&self, n: u64) -> bool {
        matches!(self.bus.head().await, Ok(h) if h == n)
    }

    /// Every message in the stream as `(Nats-Msg-Id, seq)`, in stream order.
    /// Fails if there are more than `expect`.
    async fn stream_events(&self, expect: usize) -> Vec<(String, u64)> {
        let mut consumer = self
            .bus
            .consumer(ConsumerSpec::new(self.names.events_filter()))
            .await
            .unwrap();
        let mut out = Vec::with_capacity(expect);
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < expect && Instant::now() < deadline {
            for d in consumer
                .fetch(expect - out.len(), Duration::from_millis(500))
                .await
                .unwrap()
            {
                let event: serde_json::Value = serde_json::from_slice(&d.payload).unwrap();
                let id = d.header("Nats-Msg-Id").unwrap().to_owned();
                assert_eq!(
                    event["id"].as_str(),
                    Some(id.as_str()),
                    "payload travels with its id"
                );
                assert_eq!(
                    d.header("traceparent"),
                    Some(TRACEPARENT),
                    "headers travel too"
                );
                out.push((id, event["seq"].as_u64().unwrap()));
            }
        }
        let extra = consumer
            .fetch(100, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(
            extra.is_empty(),
            "{} more events than the {expect} expected",
            extra.len()
        );
        out
    }

    /// Events `0..n` are in the stream exactly once each, in publish order.
    async fn assert_exactly_once_in_order(&self, n: u64) {
        let events = self.stream_events(usize::try_from(n).unwrap()).await;
        let ids: HashSet<&str> = events.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids.len(),
            events.len(),
            "a duplicate event id reached the stream"
        );
        let seqs: Vec<u64> = events.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            seqs,
            (0..n).collect::<Vec<_>>(),
            "every event exactly once, in order"
        );
        assert!(
            self.head_is(n).await,
            "stream head {:?}, expected {n}",
            self.bus.head().await
        );
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_publishes_every_event_once_in_order() {
    let f = Fixture::new().await;
    let (publisher, handle) = f.start(f.config()).await;
    for seq in 0..1000 {
        publisher.publish(f.event(seq));
    }
    eventually(
        "the stream holds 1000 events",
        Duration::from_secs(15),
        || f.head_is(1000),
    )
    .await;
    f.assert_exactly_once_in_order(1000).await;
    assert!(publisher.bus_healthy());
    assert_eq!((publisher.spool_depth(), publisher.spool_bytes()), (0, 0));
    assert!(!publisher.spool_full());
    handle.shutdown(Duration::from_secs(5)).await;
    assert!(
        segments(f.spool.path()).is_empty(),
        "a healthy bus never touches the spool"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_while_nats_is_down_arrive_once_in_order_after_it_returns() {
    let mut f = Fixture::new().await;
    let (publisher, handle) = f.start(f.config()).await;
    for seq in 0..300 {
        publisher.publish(f.event(seq));
    }
    eventually(
        "the first 300 are in the stream",
        Duration::from_secs(10),
        || f.head_is(300),
    )
    .await;

    f.nats.stop();
    for seq in 300..2300 {
        publisher.publish(f.event(seq));
        if seq % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Every event is in the spool as soon as `publish` returns; wait for the
    // worker to have seen the outage too.
    eventually(
        "all 2000 are in the spool and the worker saw the bus go",
        Duration::from_secs(15),
        || async { publisher.spool_depth() == 2000 && !publisher.bus_healthy() },
    )
    .await;
    assert!(!publisher.bus_healthy());
    assert!(publisher.spool_bytes() > 0);
    assert!(!segments(f.spool.path()).is_empty());

    f.nats.restart().unwrap();
    eventually("the spool is replayed", Duration::from_secs(20), || async {
        publisher.spool_depth() == 0 && f.head_is(2300).await
    })
    .await;
    f.assert_exactly_once_in_order(2300).await;
    assert!(publisher.bus_healthy());
    assert_eq!(publisher.spool_bytes(), 0);
    assert!(
        segments(f.spool.path()).is_empty(),
        "drained segments are deleted"
    );
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_events_in_the_spool_delivers_them_after_restart() {
    let mut f = Fixture::new().await;
    f.nats.stop();
    let (publisher, handle) = f.start(f.config()).await;
    for seq in 0..500 {
        publisher.publish(f.event(seq));
    }
    eventually(
        "all 500 are in the spool",
        Duration::from_secs(15),
        || async { publisher.spool_depth() == 500 },
    )
    .await;
    // The crash: no shutdown, no drain, no final fsync.
    drop(publisher);
    drop(handle);

    let (publisher, handle) = f.start(f.config()).await;
    assert_eq!(
        publisher.spool_depth(),
        500,
        "the restarted gateway finds the spool"
    );
    f.nats.restart().unwrap();
    eventually(
        "the reopened spool is replayed",
        Duration::from_secs(20),
        || async { publisher.spool_depth() == 0 && f.head_is(500).await },
    )
    .await;
    f.assert_exactly_once_in_order(500).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_is_reported_and_still_loses_nothing() {
    let mut f = Fixture::new().await;
    f.nats.stop();
    let config = PublisherConfig {
        spool_max_bytes: 4096,
        ..f.config()
    };
    let (publisher, handle) = f.start(config).await;
    assert!(!publisher.spool_full());
    for seq in 0..100 {
        publisher.publish(f.event(seq));
    }
    eventually(
        "all 100 are in the spool",
        Duration::from_secs(15),
        || async { publisher.spool_depth() == 100 },
    )
    .await;
    assert!(
        publisher.spool_full(),
        "{} bytes spooled against a 4096-byte limit",
        publisher.spool_bytes()
    );
    assert!(
        publisher.spool_bytes() > 4096,
        "over the limit, events are still accepted"
    );

    f.nats.restart().unwrap();
    eventually("the spool drains", Duration::from_secs(20), || async {
        publisher.spool_depth() == 0 && f.head_is(100).await
    })
    .await;
    assert!(!publisher.spool_full());
    f.assert_exactly_once_in_order(100).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_line_from_a_crash_is_skipped_and_the_rest_replays() {
    let mut f = Fixture::new().await;
    f.nats.stop();
    let (publisher, handle) = f.start(f.config()).await;
    for seq in 0..300 {
        publisher.publish(f.event(seq));
    }
    eventually(
        "all 300 are in the spool",
        Duration::from_secs(15),
        || async { publisher.spool_depth() == 300 },
    )
    .await;
    handle.shutdown(Duration::from_secs(3)).await;
    drop(publisher);

    // What a crash mid-append leaves: a garbage line and a truncated record.
    let last = segments(f.spool.path()).pop().expect("a segment");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap();
    file.write_all(b"\0\0\0\0garbage\n").unwrap();
    file.write_all(br#"{"subject":"x","id":"torn-write","payl"#)
        .unwrap();
    drop(file);

    let (publisher, handle) = f.start(f.config()).await;
    assert_eq!(
        publisher.spool_depth(),
        302,
        "300 events and two broken lines"
    );
    // New events queue behind the reopened spool.
    for seq in 300..350 {
        publisher.publish(f.event(seq));
    }
    f.nats.restart().unwrap();
    eventually("the spool is replayed", Duration::from_secs(20), || async {
        publisher.spool_depth() == 0 && f.head_is(350).await
    })
    .await;
    f.assert_exactly_once_in_order(350).await;
    let corrupt =
        std::fs::read_to_string(f.spool.path().join(REJECTED_DIR).join("corrupt.jsonl")).unwrap();
    assert_eq!(
        corrupt.lines().count(),
        2,
        "both broken lines are kept for inspection: {corrupt}"
    );
    assert!(corrupt.contains(&hex_of(b"torn-write")));
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_nats_down_spools_what_is_in_memory() {
    let mut f = Fixture::new().await;
    f.nats.stop();
    let (publisher, handle) = f.start(f.config()).await;
    for seq in 0..100 {
        publisher.publish(f.event(seq));
    }
    let started = Instant::now();
    handle.shutdown(Duration::from_secs(3)).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown is bounded by its timeout"
    );
    assert_eq!(
        publisher.spool_depth(),
        100,
        "nothing in memory is left behind"
    );
    // After shutdown, publishing still never drops: straight to the spool.
    publisher.publish(f.event(100));
    assert_eq!(publisher.spool_depth(), 101);
    drop(publisher);

    f.nats.restart().unwrap();
    let (publisher, handle) = f.start(f.config()).await;
    eventually("the spool is replayed", Duration::from_secs(20), || async {
        publisher.spool_depth() == 0 && f.head_is(101).await
    })
    .await;
    f.assert_exactly_once_in_order(101).await;
    handle.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_bus_refuses_is_parked_not_dropped() {
    let f = Fixture::new().await;
    let (publisher, handle) = f.start(f.config()).await;
    let mut big = f.event(1);
    big.payload = Bytes::from(format!(
        r#"{{"id":"{}","pad":"{}"}}"#,
        big.id,
        "x".repeat(2 << 20)
    ));
    let big_id = big.id.clone();
    publisher.publish(f.event(0));
    publisher.publish(big);
    publisher.publish(f.event(1));
    eventually(
        "the two acceptable events are in the stream",
        Duration::from_secs(10),
        || f.head_is(2),
    )
    .await;
    let rejected = f.spool.path().join(REJECTED_DIR).join("rejected.jsonl");
    eventually(
        "the refused event is parked",
        Duration::from_secs(5),
        || async { rejected.exists() },
    )
    .await;
    let parked = std::fs::read_to_string(&rejected).unwrap();
    let record: serde_json::Value = serde_json::from_str(parked.lines().next().unwrap()).unwrap();
    assert_eq!(record["id"].as_str(), Some(big_id.as_str()));
    assert!(
        record["error"].as_str().is_some_and(|e| !e.is_empty()),
        "the error is kept: {}",
        record["error"]
    );
    assert_eq!(
        record["payload"]["id"].as_str(),
        Some(big_id.as_str()),
        "the event itself is kept"
    );
    assert!(
        publisher.bus_healthy(),
        "a refused event says nothing about the bus"
    );
    assert_eq!(publisher.spool_depth(), 0);
    handle.shutdown(Duration::from_secs(5)).await;
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A rejected event is visible (count at start, in `rejected_events`) and
/// comes back through `queue_rejected_for_replay` (what
/// `tollgate-gateway spool replay-rejected` runs) while the publisher runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_is_counted_and_replayed_on_request() {
    let f = Fixture::new().await;
    // What an earlier run parked: a valid event with the error it got.
    let parked = f.event(0);
    let dir = f.spool.path().join(REJECTED_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let line = serde_json::json!({
        "subject": parked.subject,
        "id": parked.id,
        "headers": parked.headers,
        "payload": serde_json::from_slice::<serde_json::Value>(&parked.payload).unwrap(),
        "error": "Rejected: maximum payload exceeded",
    });
    std::fs::write(dir.join("rejected.jsonl"), format!("{line}\n")).unwrap();

    let (publisher, handle) = f.start(f.config()).await;
    assert_eq!(publisher.rejected_events(), 1, "counted at start");
    assert!(
        !f.head_is(1).await,
        "a rejected event is never replayed by itself"
    );
    let (file, events) = tollgate_gateway::publisher::queue_rejected_for_replay(f.spool.path())
        .unwrap()
        .expect("there was a rejected file");
    assert_eq!(events, 1);
    assert!(file.exists());
    eventually(
        "the queued event reaches the stream",
        Duration::from_secs(15),
        || f.head_is(1),
    )
    .await;
    eventually("the count follows", Duration::from_secs(10), || async {
        publisher.rejected_events() == 0
    })
    .await;
    assert!(
        !file.exists(),
        "the replay file is gone once its events are back in the spool"
    );
    let events = f.stream_events(1).await;
    assert_eq!(events[0].0, parked.id);
    assert!(
        tollgate_gateway::publisher::queue_rejected_for_replay(f.spool.path())
            .unwrap()
            .is_none(),
        "nothing left to replay"
    );
    handle.shutdown(Duration::from_secs(5)).await;
}

/// Every event is on disk when `publish` returns: a publisher dropped like a
/// crash, with the bus healthy, loses nothing it was handed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_in_the_spool_when_publish_returns() {
    let f = Fixture::new().await;
    let (publisher, handle) = f.start(f.config()).await;
    for seq in 0..2000 {
        publisher.publish(f.event(seq));
    }
    // A crash right now: no drain, no flush.
    drop(handle);
    drop(publisher);
    let (publisher, handle) = f.start(f.config()).await;
    eventually("everything arrives", Duration::from_secs(20), || async {
        publisher.spool_depth() == 0 && f.head_is(2000).await
    })
    .await;
    f.assert_exactly_once_in_order(2000).await;
    handle.shutdown(Duration::from_secs(5)).await;
}
