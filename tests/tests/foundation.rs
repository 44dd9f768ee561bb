//! The foundation against real servers: migrations, isolation, bus dedup.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use tollgate_schemas::bus::{ConsumerSpec, EventBus, JetStreamBus, Outgoing, StreamSettings};
use tollgate_schemas::events::{ApiFormat, Event, EventKind, EventMeta, RequestEvent};
use tollgate_schemas::migrations;
use tollgate_tests::harness::{TestEnv, ch_client, shared};

/// `SHOW CREATE` of every table and view, and the recorded migrations.
async fn schema_of(env: &TestEnv) -> Vec<String> {
    let ch = ch_client(&env.clickhouse_url);
    let tables: Vec<String> = ch
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(&env.database)
        .fetch_all()
        .await
        .unwrap();
    let mut out = Vec::new();
    for t in tables {
        let ddl: String = ch
            .query(&format!("SHOW CREATE TABLE {}.{}", env.database, t))
            .fetch_one()
            .await
            .unwrap();
        out.push(ddl);
    }
    let versions: Vec<(u32, String)> = ch
        .query(&format!(
            "SELECT version, name FROM {}.schema_migrations FINAL ORDER BY version",
            env.database
        ))
        .fetch_all()
        .await
        .unwrap();
    out.extend(versions.into_iter().map(|(v, n)| format!("{v}:{n}")));
    out
}

#[tokio::test]
async fn migrations_applied_twice_equal_once() {
    let env = TestEnv::new();
    let first = env.migrate().await.unwrap();
    assert_eq!(
        first,
        (1..=migrations::latest_version()).collect::<Vec<_>>()
    );
    let once = schema_of(&env).await;
    let second = env.migrate().await.unwrap();
    assert!(second.is_empty(), "second run applied {second:?}");
    assert_eq!(schema_of(&env).await, once);

    // The finance contract exists.
    let ch = env.ch();
    let tables: Vec<String> = ch.query("SHOW TABLES").fetch_all().await.unwrap();
    for t in ["usage", "ledger", "invoices", "invoice_lines"] {
        assert!(
            tables.contains(&t.to_string()),
            "{t} missing from {tables:?}"
        );
    }
}

#[tokio::test]
async fn migrations_on_an_existing_database_keep_its_data() {
    let env = TestEnv::new();
    env.migrate().await.unwrap();
    env.ch()
        .query("INSERT INTO usage_events (event_id, tenant_id, occurred_at, cost, inserted_at) VALUES ('e1', 'acme', now(), 1.25, now())")
        .execute()
        .await
        .unwrap();
    // Simulate a database made by an older release: forget the newest step.
    env.ch()
        .query(&format!(
            "ALTER TABLE schema_migrations DELETE WHERE version = {}",
            migrations::latest_version()
        ))
        .execute()
        .await
        .unwrap();
    // Mutations are asynchronous on 18.16: wait until it is gone.
    for _ in 0..100 {
        let n: u64 = env
            .ch()
            .query("SELECT count() FROM schema_migrations WHERE version = ?")
            .bind(migrations::latest_version())
            .fetch_one()
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let applied = env.migrate().await.unwrap();
    assert_eq!(applied, vec![migrations::latest_version()]);
    let (n, cost): (u64, String) = env
        .ch()
        .query("SELECT count(), toString(sum(cost)) FROM usage")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((n, cost.as_str()), (1, "1.250000000000"));
}

#[tokio::test]
async fn usage_view_is_exact_under_duplicate_inserts() {
    let env = TestEnv::new();
    env.migrate().await.unwrap();
    for _ in 0..3 {
        env.ch()
            .query("INSERT INTO usage_events (event_id, tenant_id, occurred_at, input_tokens, cost, inserted_at) VALUES ('e1', 'acme', toDateTime('2026-11-01 00:00:00'), 7, 0.5, now())")
            .execute()
            .await
            .unwrap();
    }
    let raw: u64 = env
        .ch()
        .query("SELECT count() FROM usage_events")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(raw, 3, "storage keeps the re-inserts until a merge");
    let (n, tokens): (u64, u64) = env
        .ch()
        .query("SELECT count(), sum(input_tokens) FROM usage")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((n, tokens), (1, 7), "the contract view is exact when read");
}

async fn publish_request_event(
    bus: &JetStreamBus,
    event: &Event,
) -> tollgate_schemas::bus::PublishReceipt {
    bus.publish(Outgoing {
        subject: bus
            .names()
            .event_subject(event.kind(), &event.meta().tenant_id),
        id: event.meta().id.to_string(),
        payload: Bytes::from(event.to_json()),
        headers: vec![(
            "traceparent".into(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        )],
    })
    .await
    .unwrap()
}

fn request_event(tenant: &str) -> Event {
    Event::Request(RequestEvent {
        meta: EventMeta::new(tenant, "k1", "req-1"),
        api: ApiFormat::OpenaiChat,
        method: "POST".into(),
        route: "/v1/chat/completions".into(),
        model: Some("mock-gpt".into()),
        status: 200,
        error_type: None,
        streamed: false,
        latency_ms: 1,
        deployment: None,
    })
}

#[tokio::test]
async fn same_event_published_twice_is_stored_once() {
    let env = TestEnv::new();
    let bus = JetStreamBus::connect(&env.nats_url, env.names.clone(), StreamSettings::default())
        .await
        .unwrap();
    let event = request_event("acme");
    let a = publish_request_event(&bus, &event).await;
    let b = publish_request_event(&bus, &event).await;
    assert!(!a.duplicate);
    assert!(
        b.duplicate,
        "second publish must be recognised as a duplicate"
    );
    assert_eq!(a.position, b.position);
    assert_eq!(bus.head().await.unwrap(), 1);

    // And it is delivered once, with its headers, and commits.
    let mut consumer = bus
        .consumer(ConsumerSpec::new(env.names.events_filter()))
        .await
        .unwrap();
    let batch = consumer.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].header("traceparent").map(str::len), Some(55));
    assert_eq!(
        env.names.kind_of_subject(&batch[0].subject),
        Some(EventKind::Request)
    );
    assert_eq!(Event::from_json(&batch[0].payload).unwrap(), event);
    consumer
        .commit(batch.into_iter().map(|d| d.commit).collect())
        .await
        .unwrap();
    assert!(
        consumer
            .fetch(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn uncommitted_deliveries_come_back() {
    let env = TestEnv::new();
    let bus = JetStreamBus::connect(&env.nats_url, env.names.clone(), StreamSettings::default())
        .await
        .unwrap();
    publish_request_event(&bus, &request_event("acme")).await;
    let mut spec = ConsumerSpec::new(env.names.events_filter());
    spec.durable = Some("meter".into());
    spec.ack_wait = Duration::from_secs(1);
    let mut c = bus.consumer(spec.clone()).await.unwrap();
    let first = c.fetch(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(first.len(), 1);
    drop(first); // never committed
    let again = c.fetch(1, Duration::from_secs(3)).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(again[0].attempt >= 2, "attempt {}", again[0].attempt);
}

/// Two tests' worth of traffic on the shared servers, in parallel: neither
/// sees the other's stream messages, KV buckets or ClickHouse rows.
#[tokio::test]
async fn parallel_tests_never_see_each_other() {
    let (a, b) = (TestEnv::new(), TestEnv::new());
    assert_ne!(a.names, b.names);
    assert_ne!(a.database, b.database);
    async fn run(env: &TestEnv, tenant: &'static str, n: usize) -> (Vec<String>, Vec<String>) {
        let (url, names) = (env.nats_url.clone(), env.names.clone());
        let ch = env.ch();
        {
            env.migrate().await.unwrap();
            let bus = JetStreamBus::connect(&url, names.clone(), StreamSettings::default())
                .await
                .unwrap();
            for _ in 0..n {
                publish_request_event(&bus, &request_event(tenant)).await;
            }
            ch.query(&format!("INSERT INTO usage_events (event_id, tenant_id, occurred_at, cost, inserted_at) VALUES ('{tenant}', '{tenant}', now(), 1, now())"))
                .execute()
                .await
                .unwrap();
            let mut c = bus
                .consumer(ConsumerSpec::new(names.events_filter()))
                .await
                .unwrap();
            let got = c.fetch(100, Duration::from_secs(1)).await.unwrap();
            let tenants: Vec<String> = ch
                .query("SELECT DISTINCT tenant_id FROM usage")
                .fetch_all()
                .await
                .unwrap();
            (
                got.into_iter()
                    .map(|d| {
                        Event::from_json(&d.payload)
                            .unwrap()
                            .meta()
                            .tenant_id
                            .clone()
                    })
                    .collect::<Vec<_>>(),
                tenants,
            )
        }
    }
    let ((ga, ta), (gb, tb)) = tokio::join!(run(&a, "alpha", 5), run(&b, "beta", 7));
    assert_eq!(ga.len(), 5);
    assert_eq!(gb.len(), 7);
    assert!(ga.iter().all(|t| t == "alpha") && gb.iter().all(|t| t == "beta"));
    assert_eq!(ta, vec!["alpha".to_string()]);
    assert_eq!(tb, vec!["beta".to_string()]);
}

#[test]
fn shared_servers_are_real_and_answer() {
    let s = shared();
    let version = s.clickhouse.exec("SELECT version()").unwrap();
    assert!(!version.trim().is_empty());
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.nats.port())).is_ok());
}

#[tokio::test]
async fn kv_buckets_are_created_once_and_work() {
    let env = TestEnv::new();
    let js = async_nats::jetstream::new(env.nats().await.unwrap());
    let kv = tollgate_schemas::kv::ensure(&js, &env.names.kv_keys, 1)
        .await
        .unwrap();
    kv.put("k", "v1".into()).await.unwrap();
    // Ensuring again opens the same bucket, data intact.
    let again = tollgate_schemas::kv::ensure(&js, &env.names.kv_keys, 1)
        .await
        .unwrap();
    assert_eq!(again.get("k").await.unwrap().as_deref(), Some(&b"v1"[..]));
    assert_eq!(again.get("missing").await.unwrap(), None);
}

// ------------------------------------------------------------------ the bus
//
// The same bus-level suite against both implementations: JetStream on the
// shared nats-server, Kafka on the shared tansu broker. Nothing in `suite`
// knows which bus it has.

mod suite {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use tollgate_schemas::Names;
    use tollgate_schemas::bus::{
        ConsumerSpec, Delivery, EventBus, EventConsumer, Outgoing, StartFrom, lane_of, seq_of,
    };
    use tollgate_schemas::events::{Event, EventKind};

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn outgoing(names: &Names, event: &Event) -> Outgoing {
        Outgoing {
            subject: names.event_subject(event.kind(), &event.meta().tenant_id),
            id: event.meta().id.to_string(),
            payload: Bytes::from(event.to_json()),
            headers: vec![("traceparent".into(), TRACEPARENT.into())],
        }
    }

    fn usage(tenant: &str) -> Event {
        let mut e = crate::request_event(tenant);
        if let Event::Request(r) = &e {
            e = Event::Usage(crate::usage_event_from(r.meta.clone()));
        }
        e
    }

    fn id_of(d: &Delivery) -> String {
        Event::from_json(&d.payload).unwrap().meta().id.to_string()
    }

    /// Fetches until `n` deliveries are in hand or `within` passes (a Kafka
    /// group needs a moment to join).
    async fn fetch_n(c: &mut Box<dyn EventConsumer>, n: usize, within: Duration) -> Vec<Delivery> {
        let deadline = tokio::time::Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n && tokio::time::Instant::now() < deadline {
            out.extend(
                c.fetch(n - out.len(), Duration::from_millis(500))
                    .await
                    .unwrap(),
            );
        }
        out
    }

    async fn publish(bus: &Arc<dyn EventBus>, events: &[Event]) -> Vec<u64> {
        let names = bus.names().clone();
        bus.publish_many(events.iter().map(|e| outgoing(&names, e)).collect())
            .await
            .into_iter()
            .map(|r| r.unwrap().position)
            .collect()
    }

    fn durable(filter: String, name: &str) -> ConsumerSpec {
        let mut spec = ConsumerSpec::new(filter);
        spec.durable = Some(name.into());
        spec.ack_wait = Duration::from_secs(1);
        spec
    }

    pub async fn publish_consume_commit(bus: Arc<dyn EventBus>) {
        let names = bus.names().clone();
        let events: Vec<Event> = (0..3).map(|_| crate::request_event("acme")).collect();
        publish(&bus, &events).await;
        assert_eq!(bus.head().await.unwrap(), 3);
        let spec = durable(names.events_filter(), "meter");
        let mut c = bus.consumer(spec.clone()).await.unwrap();
        let got = fetch_n(&mut c, 3, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 3);
        for (d, e) in got.iter().zip(&events) {
            assert_eq!(d.header("traceparent"), Some(TRACEPARENT));
            assert_eq!(names.kind_of_subject(&d.subject), Some(EventKind::Request));
            assert_eq!(&Event::from_json(&d.payload).unwrap(), e);
        }
        c.commit(got.into_iter().map(|d| d.commit).collect())
            .await
            .unwrap();
        assert_eq!(bus.pending("meter").await.unwrap(), 0);
        drop(c);
        // Reopened, the durable consumer has nothing more to give.
        let mut again = bus.consumer(spec).await.unwrap();
        let more = fetch_n(&mut again, 1, Duration::from_secs(6)).await;
        assert!(
            more.is_empty(),
            "committed messages came back: {}",
            more.len()
        );
    }

    pub async fn uncommitted_deliveries_come_back(bus: Arc<dyn EventBus>) {
        let names = bus.names().clone();
        let events: Vec<Event> = (0..3).map(|_| crate::request_event("acme")).collect();
        publish(&bus, &events).await;
        let spec = durable(names.events_filter(), "meter");
        let mut c = bus.consumer(spec.clone()).await.unwrap();
        let mut got = fetch_n(&mut c, 3, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 3);
        // The 2nd and 3rd are committed, the 1st never is: out of order.
        let first = got.remove(0);
        let first_id = id_of(&first);
        c.commit(got.into_iter().map(|d| d.commit).collect())
            .await
            .unwrap();
        assert!(
            bus.pending("meter").await.unwrap() >= 1,
            "a commit passed an uncommitted message"
        );
        drop(first);
        drop(c);
        let mut again = bus.consumer(spec).await.unwrap();
        let back = fetch_n(&mut again, 1, Duration::from_secs(20)).await;
        assert_eq!(back.len(), 1, "the uncommitted message never came back");
        assert_eq!(id_of(&back[0]), first_id);
        assert!(back[0].attempt >= 1);
    }

    pub async fn filters_skip_and_still_commit(bus: Arc<dyn EventBus>) {
        let names = bus.names().clone();
        let mut events = Vec::new();
        for i in 0..6 {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            events.push(crate::request_event(tenant));
            events.push(usage(tenant));
        }
        events.push(crate::request_event("acme")); // the last one is skipped
        publish(&bus, &events).await;
        let spec = durable(names.kind_filter(EventKind::Usage), "billing");
        let mut c = bus.consumer(spec).await.unwrap();
        let got = fetch_n(&mut c, 6, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 6);
        assert!(
            got.iter()
                .all(|d| names.kind_of_subject(&d.subject) == Some(EventKind::Usage))
        );
        c.commit(got.into_iter().map(|d| d.commit).collect())
            .await
            .unwrap();
        let extra = c.fetch(10, Duration::from_secs(1)).await.unwrap();
        assert!(extra.is_empty());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let pending = bus.pending("billing").await.unwrap();
            if pending == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{pending} messages outside the filter were never committed"
            );
            c.fetch(10, Duration::from_millis(200)).await.unwrap();
        }
    }

    pub async fn tenants_keep_order_and_positions(bus: Arc<dyn EventBus>) {
        let names = bus.names().clone();
        let tenants = ["acme", "globex", "initech"];
        let events: Vec<Event> = (0..30)
            .map(|i| crate::request_event(tenants[i % 3]))
            .collect();
        let positions = publish(&bus, &events).await;
        let mut by_tenant: HashMap<&str, Vec<u64>> = HashMap::new();
        for (e, p) in events.iter().zip(&positions) {
            by_tenant
                .entry(tenants.iter().find(|t| **t == e.meta().tenant_id).unwrap())
                .or_default()
                .push(*p);
        }
        for (t, ps) in &by_tenant {
            assert!(
                ps.iter().all(|p| lane_of(*p) == lane_of(ps[0])),
                "{t}'s events span lanes"
            );
            assert!(ps.windows(2).all(|w| w[0] < w[1]), "{t}: {ps:?}");
        }
        assert_eq!(bus.head().await.unwrap(), 30);
        let heads = bus.heads().await.unwrap();
        assert_eq!(heads.iter().map(|h| seq_of(*h)).sum::<u64>(), 30);
        for (lane, h) in heads.iter().enumerate() {
            assert_eq!(lane_of(*h) as usize, lane);
        }
        let mut c = bus
            .consumer(ConsumerSpec::new(names.events_filter()))
            .await
            .unwrap();
        let got = fetch_n(&mut c, 30, Duration::from_secs(20)).await;
        assert_eq!(got.len(), 30);
        for t in tenants {
            let sent: Vec<String> = events
                .iter()
                .filter(|e| e.meta().tenant_id == t)
                .map(|e| e.meta().id.to_string())
                .collect();
            let seen: Vec<String> = got
                .iter()
                .filter(|d| d.subject.ends_with(&format!(".{t}")))
                .map(id_of)
                .collect();
            assert_eq!(seen, sent, "{t}'s events out of order");
        }
    }

    pub async fn ephemeral_consumers_start_where_asked(bus: Arc<dyn EventBus>) {
        let names = bus.names().clone();
        let early: Vec<Event> = (0..5).map(|_| crate::request_event("acme")).collect();
        let positions = publish(&bus, &early).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let cut = chrono::Utc::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let late: Vec<Event> = (0..5).map(|_| crate::request_event("acme")).collect();
        publish(&bus, &late).await;

        let spec = |start| {
            let mut s = ConsumerSpec::new(names.events_filter());
            s.start = start;
            s
        };
        let mut c = bus
            .consumer(spec(StartFrom::Position(positions[2])))
            .await
            .unwrap();
        let got = fetch_n(&mut c, 8, Duration::from_secs(20)).await;
        let ids: Vec<String> = got.iter().map(id_of).collect();
        let want: Vec<String> = early[2..]
            .iter()
            .chain(&late)
            .map(|e| e.meta().id.to_string())
            .collect();
        assert_eq!(ids, want, "StartFrom::Position");

        let mut c = bus.consumer(spec(StartFrom::Time(cut))).await.unwrap();
        let got = fetch_n(&mut c, 5, Duration::from_secs(20)).await;
        let ids: Vec<String> = got.iter().map(id_of).collect();
        let want: Vec<String> = late.iter().map(|e| e.meta().id.to_string()).collect();
        assert_eq!(ids, want, "StartFrom::Time");
        assert!(
            c.fetch(5, Duration::from_millis(500))
                .await
                .unwrap()
                .is_empty()
        );
        let mut c = bus.consumer(spec(StartFrom::New)).await.unwrap();
        assert!(
            c.fetch(5, Duration::from_secs(1)).await.unwrap().is_empty(),
            "StartFrom::New delivered old messages"
        );
    }
}

fn usage_event_from(meta: EventMeta) -> tollgate_schemas::events::UsageEvent {
    tollgate_schemas::events::UsageEvent {
        meta,
        api: ApiFormat::OpenaiChat,
        requested_model: "mock-gpt".into(),
        model: "mock-gpt".into(),
        provider: "openai".into(),
        deployment: "mock-1".into(),
        tokens: tollgate_schemas::events::TokenCounts {
            input_tokens: 3,
            output_tokens: 4,
            ..Default::default()
        },
        estimated: false,
        status: 200,
        streamed: false,
        latency_ms: 1,
        ttft_ms: None,
        retries: 0,
        price_version: 1,
        cost: rust_decimal::Decimal::new(1, 3),
    }
}

macro_rules! bus_suite {
    ($bus:ident, $make:path) => {
        mod $bus {
            use super::suite;
            #[tokio::test]
            async fn publish_consume_commit() {
                let (_env, bus) = $make().await;
                suite::publish_consume_commit(bus).await;
            }
            #[tokio::test]
            async fn uncommitted_deliveries_come_back() {
                let (_env, bus) = $make().await;
                suite::uncommitted_deliveries_come_back(bus).await;
            }
            #[tokio::test]
            async fn filters_skip_and_still_commit() {
                let (_env, bus) = $make().await;
                suite::filters_skip_and_still_commit(bus).await;
            }
            #[tokio::test]
            async fn tenants_keep_order_and_positions() {
                let (_env, bus) = $make().await;
                suite::tenants_keep_order_and_positions(bus).await;
            }
            #[tokio::test]
            async fn ephemeral_consumers_start_where_asked() {
                let (_env, bus) = $make().await;
                suite::ephemeral_consumers_start_where_asked(bus).await;
            }
        }
    };
}

async fn jetstream_bus() -> (TestEnv, std::sync::Arc<dyn EventBus>) {
    let env = TestEnv::new();
    let bus = JetStreamBus::connect(&env.nats_url, env.names.clone(), StreamSettings::default())
        .await
        .unwrap();
    (env, std::sync::Arc::new(bus))
}

async fn kafka_bus() -> (TestEnv, std::sync::Arc<dyn EventBus>) {
    let env = TestEnv::new();
    let settings = tollgate_schemas::bus::KafkaSettings {
        brokers: tollgate_tests::harness::shared_tansu().brokers(),
        partitions: 3,
        properties: tollgate_tests::harness::tansu_client_properties(),
        ..Default::default()
    };
    let bus = tollgate_schemas::bus::KafkaBus::connect(&settings, env.names.clone())
        .await
        .unwrap();
    (env, std::sync::Arc::new(bus))
}

bus_suite!(bus_on_jetstream, crate::jetstream_bus);
bus_suite!(bus_on_kafka, crate::kafka_bus);

/// A durable whose filter changes (billing went from usage-only to every
/// kind) is recreated at its ack floor: nothing it had not committed is
/// skipped, and nothing before the floor comes back. Its new `ack_wait` holds.
#[tokio::test]
async fn a_durable_with_a_new_filter_resumes_at_its_ack_floor() {
    let env = TestEnv::new();
    let bus = JetStreamBus::connect(&env.nats_url, env.names.clone(), StreamSettings::default())
        .await
        .unwrap();
    let publish = |kind: EventKind, i: usize| Outgoing {
        subject: env.names.event_subject(kind, "acme"),
        id: format!("{kind:?}-{i}"),
        payload: Bytes::from(format!(r#"{{"i":{i}}}"#)),
        headers: Vec::new(),
    };
    // Stream positions 1..=10 usage, 11..=20 request.
    let mut msgs: Vec<Outgoing> = (0..10).map(|i| publish(EventKind::Usage, i)).collect();
    msgs.extend((0..10).map(|i| publish(EventKind::Request, i)));
    for r in bus.publish_many(msgs).await {
        r.unwrap();
    }
    let mut spec = ConsumerSpec::new(env.names.kind_filter(EventKind::Usage));
    spec.durable = Some("billing".into());
    let mut c = bus.consumer(spec.clone()).await.unwrap();
    let mut first = c.fetch(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(first.len(), 10);
    let rest = first.split_off(5);
    c.commit(first.into_iter().map(|d| d.commit).collect())
        .await
        .unwrap();
    drop(rest); // delivered, never committed
    drop(c);

    spec.filter = env.names.events_filter();
    spec.ack_wait = Duration::from_secs(7);
    let mut c = bus.consumer(spec).await.unwrap();
    let mut positions = Vec::new();
    loop {
        let batch = c.fetch(100, Duration::from_millis(500)).await.unwrap();
        if batch.is_empty() {
            break;
        }
        positions.extend(batch.iter().map(|d| d.position));
    }
    assert_eq!(
        positions,
        (6..=20).collect::<Vec<u64>>(),
        "resumes right after the ack floor (5), with the new filter's messages"
    );
    let info = bus
        .jetstream()
        .get_stream(&env.names.events_stream)
        .await
        .unwrap()
        .consumer_info("billing")
        .await
        .unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(7));
    assert_eq!(info.config.filter_subject, env.names.events_filter());
}
