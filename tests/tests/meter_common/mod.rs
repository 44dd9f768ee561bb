//! Helpers shared by the meter's tests (`meter_*.rs`): synthetic events,
//! publishing, the built `tollgate-meter` binary as a child, in-process
//! meters, and exact snapshots of what finance reads.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Timelike, Utc};
use rust_decimal::Decimal;
use tollgate_schemas::Names;
use tollgate_schemas::bus::{EventBus, JetStreamBus, Outgoing, StreamSettings};
use tollgate_schemas::events::{ApiFormat, Event, EventMeta, TokenCounts, UsageEvent};

/// A usage event with varied, deterministic facts; `occurred_at` spreads
/// events over three days so hours and days both aggregate several groups.
pub fn usage_event(i: u64) -> Event {
    let models = ["gpt-4o", "claude-sonnet", "mock-gpt"];
    let base: DateTime<Utc> = DateTime::from_str("2026-03-30T22:00:00Z").unwrap();
    let mut meta = EventMeta::new(
        format!("tenant-{}", i % 3),
        format!("key-{}", i % 4),
        format!("req-{i}"),
    );
    meta.occurred_at = base + chrono::Duration::seconds((i as i64 * 37) % (3 * 86_400));
    let tokens = TokenCounts {
        input_tokens: 10 + i % 97,
        output_tokens: 1 + i % 31,
        cache_read_tokens: i % 5,
        cache_write_tokens: i % 3,
        reasoning_tokens: i % 2,
    };
    Event::Usage(UsageEvent {
        meta,
        api: ApiFormat::OpenaiChat,
        requested_model: models[(i % 3) as usize].into(),
        model: models[(i % 3) as usize].into(),
        provider: "openai".into(),
        deployment: "primary".into(),
        tokens,
        estimated: i.is_multiple_of(11),
        status: 200,
        streamed: i.is_multiple_of(2),
        latency_ms: 100 + i % 400,
        ttft_ms: Some(20),
        retries: 0,
        price_version: 1,
        // Exact, with up to 12 places: 0.000000123456 per input token.
        cost: Decimal::new(i64::try_from(tokens.input_tokens * 123_456).unwrap(), 12)
            + Decimal::new(i64::try_from(i % 7).unwrap(), 3),
    })
}

pub fn outgoing(names: &Names, event: &Event, msg_id: Option<String>) -> Outgoing {
    Outgoing {
        subject: names.event_subject(event.kind(), &event.meta().tenant_id),
        id: msg_id.unwrap_or_else(|| event.meta().id.to_string()),
        payload: Bytes::from(event.to_json()),
        headers: vec![(
            "traceparent".into(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        )],
    }
}

pub async fn bus(env_nats_url: &str, names: &Names) -> JetStreamBus {
    JetStreamBus::connect(env_nats_url, names.clone(), StreamSettings::default())
        .await
        .unwrap()
}

/// Publishes and asserts every message was stored (not deduplicated).
pub async fn publish_all(bus: &dyn EventBus, msgs: Vec<Outgoing>) {
    for chunk in msgs.chunks(500) {
        for r in bus.publish_many(chunk.to_vec()).await {
            let receipt = r.unwrap();
            assert!(!receipt.duplicate, "publish unexpectedly deduplicated");
        }
    }
}

/// Load in the background: publishes `events` 40 at a time with `pause`
/// between chunks, on any bus, while a meter runs (or is killed).
pub fn spawn_load<B: EventBus + Clone>(
    bus: &B,
    names: &Names,
    events: &[Event],
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    let (bus, names, events) = (bus.clone(), names.clone(), events.to_vec());
    tokio::spawn(async move {
        for chunk in events.chunks(40) {
            publish_all(
                &bus,
                chunk.iter().map(|e| outgoing(&names, e, None)).collect(),
            )
            .await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// A meter config for a test.
pub fn meter_toml(
    nats_url: &str,
    namespace: &str,
    ch_url: &str,
    database: &str,
    max_events: usize,
    ack_wait_secs: u64,
) -> String {
    format!(
        "[nats]\nurl = \"{nats_url}\"\nnamespace = \"{namespace}\"\n\
         [clickhouse]\nurl = \"{ch_url}\"\ndatabase = \"{database}\"\n\
         [batch]\nmax_events = {max_events}\nmax_wait_ms = 100\n\
         [consumer]\ndurable = \"meter\"\nack_wait_secs = {ack_wait_secs}\nmax_in_flight = {}\n",
        (max_events * 4).max(100)
    )
}

/// The `tollgate-meter` binary cargo built next to this test.
pub fn meter_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("tollgate-meter");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (./deploy/local.sh test does)",
        bin.display()
    );
    bin
}

/// A service child process (the meter, or any binary taking `--config`);
/// killed (SIGKILL) on drop.
pub struct MeterProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl MeterProcess {
    pub fn spawn(config: &Path, log: PathBuf, envs: &[(&str, String)], args: &[&str]) -> Self {
        Self::spawn_program(&meter_bin(), config, log, envs, args)
    }

    /// `program --config CONFIG ARGS...` with stderr to `log`; the test's
    /// own `OTEL_*` naming and sampling settings are not inherited.
    pub fn spawn_program(
        program: &Path,
        config: &Path,
        log: PathBuf,
        envs: &[(&str, String)],
        args: &[&str],
    ) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.arg("--config").arg(config).args(args);
        for k in [
            "OTEL_SERVICE_NAME",
            "OTEL_RESOURCE_ATTRIBUTES",
            "OTEL_TRACES_SAMPLER",
        ] {
            cmd.env_remove(k);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for MeterProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the library's meter in this process until the returned sender fires.
pub struct InProcessMeter {
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), tollgate_meter::MeterError>>,
}

impl InProcessMeter {
    pub fn start(
        config: tollgate_meter::Config,
        listener: Option<tokio::net::TcpListener>,
    ) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tollgate_meter::run(config, listener, async move {
            let _ = rx.await;
        }));
        Self {
            stop: Some(tx),
            task,
        }
    }

    /// Graceful shutdown; fails the test if it takes longer than 20 s.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        result
            .expect("meter did not shut down within 20 s")
            .unwrap()
            .unwrap();
    }
}

pub async fn count(ch: &clickhouse::Client, sql: &str) -> u64 {
    ch.query(sql).fetch_one::<u64>().await.unwrap_or(0)
}

/// A query's whole result as TSV text.
pub async fn tsv(ch: &clickhouse::Client, sql: &str) -> String {
    let mut cursor = ch.query(sql).fetch_bytes("TSV").unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = cursor.next().await.unwrap() {
        out.extend_from_slice(&chunk);
    }
    String::from_utf8(out).unwrap()
}

/// Every row of `usage` except `stream_seq` (the transport position of
/// whichever copy `FINAL` kept), in a fixed order.
pub async fn usage_snapshot(ch: &clickhouse::Client) -> String {
    tsv(
        ch,
        "SELECT event_id, occurred_at, tenant_id, key_id, request_id, api, requested_model, model, provider,
                deployment, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens,
                toString(cost), price_version, estimated, streamed, status, latency_ms, ttft_ms, retries, schema_version
         FROM usage ORDER BY event_id",
    )
    .await
}

pub async fn hourly_snapshot(ch: &clickhouse::Client) -> String {
    tsv(
        ch,
        "SELECT tenant_id, key_id, model, hour, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                reasoning_tokens, toString(cost), requests
         FROM usage_hourly ORDER BY tenant_id, key_id, model, hour",
    )
    .await
}

pub async fn daily_snapshot(ch: &clickhouse::Client) -> String {
    tsv(
        ch,
        "SELECT tenant_id, key_id, model, day, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                reasoning_tokens, toString(cost), requests
         FROM usage_daily ORDER BY tenant_id, key_id, model, day",
    )
    .await
}

/// Sums per group: [input, output, cache_read, cache_write, reasoning, requests] and cost.
pub type Sums = BTreeMap<(String, String, String, String), ([u64; 6], Decimal)>;

/// What `usage_daily` (by_hour = false) or `usage_hourly` must say, computed
/// in Rust from the events themselves.
pub fn expected(events: &[Event], by_hour: bool) -> Sums {
    let mut out = Sums::new();
    for e in events {
        let Event::Usage(u) = e else { continue };
        let t = u.meta.occurred_at;
        let bucket = if by_hour {
            t.date_naive()
                .and_hms_opt(t.hour(), 0, 0)
                .unwrap()
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        } else {
            t.date_naive().format("%Y-%m-%d").to_string()
        };
        let key = (
            u.meta.tenant_id.clone(),
            u.meta.key_id.clone(),
            u.model.clone(),
            bucket,
        );
        let entry = out.entry(key).or_insert(([0; 6], Decimal::ZERO));
        let k = &u.tokens;
        for (slot, v) in entry.0.iter_mut().zip([
            k.input_tokens,
            k.output_tokens,
            k.cache_read_tokens,
            k.cache_write_tokens,
            k.reasoning_tokens,
            1,
        ]) {
            *slot += v;
        }
        entry.1 += u.cost;
    }
    out
}

/// Parses an hourly or daily snapshot into [`Sums`].
pub fn parse_sums(snapshot: &str) -> Sums {
    let mut out = Sums::new();
    for line in snapshot.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 11, "{line}");
        let n = |i: usize| f[i].parse::<u64>().unwrap();
        out.insert(
            (f[0].into(), f[1].into(), f[2].into(), f[3].into()),
            (
                [n(4), n(5), n(6), n(7), n(8), n(10)],
                Decimal::from_str(f[9]).unwrap().normalize(),
            ),
        );
    }
    out
}

pub fn normalized(mut s: Sums) -> Sums {
    for v in s.values_mut() {
        v.1 = v.1.normalize();
    }
    s
}

/// Asserts `usage` holds exactly `events` (each once) and both aggregates
/// equal the sums computed from the events.
pub async fn assert_exact(ch: &clickhouse::Client, events: &[Event]) {
    let ids: Vec<String> = ch
        .query("SELECT event_id FROM usage ORDER BY event_id")
        .fetch_all()
        .await
        .unwrap();
    let mut want: Vec<String> = events
        .iter()
        .filter(|e| matches!(e, Event::Usage(_)))
        .map(|e| e.meta().id.to_string())
        .collect();
    want.sort();
    assert_eq!(
        ids.len(),
        want.len(),
        "usage has {} rows, expected {}",
        ids.len(),
        want.len()
    );
    assert!(
        ids == want,
        "usage's event ids differ from the published ones"
    );
    assert_eq!(
        parse_sums(&daily_snapshot(ch).await),
        normalized(expected(events, false)),
        "usage_daily"
    );
    assert_eq!(
        parse_sums(&hourly_snapshot(ch).await),
        normalized(expected(events, true)),
        "usage_hourly"
    );
    let (n, cost): (u64, String) = ch
        .query("SELECT count(), toString(sum(cost)) FROM usage")
        .fetch_one()
        .await
        .unwrap();
    let total: Decimal = events
        .iter()
        .filter_map(|e| {
            if let Event::Usage(u) = e {
                Some(u.cost)
            } else {
                None
            }
        })
        .sum();
    assert_eq!(n as usize, want.len());
    assert_eq!(
        Decimal::from_str(&cost).unwrap().normalize(),
        total.normalize(),
        "sum(cost)"
    );
}

/// The durable consumer has delivered and committed everything.
pub async fn consumer_idle(nats_url: &str, names: &Names, durable: &str) -> bool {
    let Ok(client) = async_nats::connect(nats_url).await else {
        return false;
    };
    let js = async_nats::jetstream::new(client);
    let Ok(stream) = js.get_stream(&names.events_stream).await else {
        return false;
    };
    match stream.consumer_info(durable).await {
        Ok(info) => info.num_pending == 0 && info.num_ack_pending == 0,
        Err(_) => false,
    }
}

// ------------------------------------------------------------------ Kafka

/// Kafka settings for a test meter or publisher on `brokers` (tansu).
pub fn kafka_settings(brokers: &str) -> tollgate_schemas::bus::KafkaSettings {
    tollgate_schemas::bus::KafkaSettings {
        brokers: brokers.to_owned(),
        partitions: 3,
        session_timeout_ms: 6_000,
        properties: tollgate_tests::harness::tansu_client_properties(),
        ..Default::default()
    }
}

pub async fn kafka_bus(brokers: &str, names: &Names) -> tollgate_schemas::bus::KafkaBus {
    tollgate_schemas::bus::KafkaBus::connect(&kafka_settings(brokers), names.clone())
        .await
        .unwrap()
}

/// [`meter_toml`] on Kafka (the meter does not touch NATS then).
pub fn kafka_meter_toml(
    brokers: &str,
    namespace: &str,
    ch_url: &str,
    database: &str,
    max_events: usize,
) -> String {
    let base = meter_toml(
        "nats://127.0.0.1:1",
        namespace,
        ch_url,
        database,
        max_events,
        30,
    );
    let props: String = tollgate_tests::harness::tansu_client_properties()
        .iter()
        .map(|(k, v)| format!("\"{k}\" = \"{v}\"\n"))
        .collect();
    format!(
        "bus = \"kafka\"\n{base}[kafka]\nbrokers = \"{brokers}\"\npartitions = 3\n\
         session_timeout_ms = 6000\n[kafka.properties]\n{props}"
    )
}

/// Waits until `log`'s file contains `needle` (bounded).
pub async fn wait_for_log(log: &Path, needle: &str, timeout: Duration) {
    tollgate_tests::eventually_or(
        &format!("{} to say {needle:?}", log.display()),
        timeout,
        || format!(":\n{}", std::fs::read_to_string(log).unwrap_or_default()),
        async || std::fs::read_to_string(log).is_ok_and(|t| t.contains(needle)),
    )
    .await;
}
