//! `tollgate-meter bench`: how fast the meter stores events, next to how fast
//! the bus (JetStream, or Kafka with `bus = "kafka"`) can hand them out at all.
//!
//! Method, in one process against the configured bus and ClickHouse:
//!
//! 1. Publish N synthetic usage events (realistic JSON with a `traceparent`
//!    header, 50 tenants) to a fresh namespace `bench<id>`, so nothing else
//!    shares the stream, and apply the migrations to a fresh database.
//! 2. **Raw rate**: a durable consumer with the meter's configuration
//!    (`max_in_flight`, `ack_wait`, fetches of `batch.max_events`) that only
//!    fetches and commits, from the first message until N are committed.
//! 3. **Meter rate**: the real pipeline (decode, batch, RowBinary insert,
//!    commit after insert) on its own durable consumer, from start until N
//!    events are committed; then `usage` must hold exactly N rows.
//!
//! The raw rate runs first so ClickHouse's background merges of the meter's
//! inserts cannot slow it down. Both rates are N / wall time.
//!
//! With `--query-rows M` it also times the aggregate views: M rows for one
//! busy tenant over a 31-day month plus M rows of 500 other tenants, then the
//! month's daily and hourly usage of the busy tenant.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clickhouse::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::Names;
use tollgate_schemas::bus::{BusKind, ConsumerSpec, EventBus, Outgoing, StartFrom};
use tollgate_schemas::events::{ApiFormat, Event, EventMeta, TokenCounts, UsageEvent};

use crate::config::Config;
use crate::error::MeterError;
use crate::pipeline::{Mode, Pipeline, Stats};
use crate::{clickhouse_client, connect_bus, connect_jetstream, migrate};

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub events: u64,
    /// Also time the aggregate views over this many rows of one tenant.
    pub query_rows: Option<u64>,
    /// Keep the namespace's streams and the database afterwards.
    pub keep: bool,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub events: u64,
    pub namespace: String,
    pub database: String,
    pub max_events: usize,
    pub max_wait_ms: u64,
    pub max_in_flight: usize,
    pub publish_secs: f64,
    pub raw_secs: f64,
    pub meter_secs: f64,
    pub query: Option<QueryReport>,
}

impl BenchReport {
    pub fn raw_rate(&self) -> f64 {
        self.events as f64 / self.raw_secs
    }
    pub fn meter_rate(&self) -> f64 {
        self.events as f64 / self.meter_secs
    }
    pub fn ratio(&self) -> f64 {
        self.meter_rate() / self.raw_rate()
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "tollgate-meter bench: {} usage events, namespace {}",
            self.events, self.namespace
        )?;
        writeln!(
            f,
            "  config: batch.max_events={} batch.max_wait_ms={} consumer.max_in_flight={}; {} CPUs",
            self.max_events,
            self.max_wait_ms,
            self.max_in_flight,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        )?;
        writeln!(
            f,
            "  publish:      {:>10.0} events/s ({:.2} s)",
            self.events as f64 / self.publish_secs,
            self.publish_secs
        )?;
        writeln!(
            f,
            "  raw consume:  {:>10.0} events/s ({:.2} s, fetch + commit only)",
            self.raw_rate(),
            self.raw_secs
        )?;
        writeln!(
            f,
            "  meter:        {:>10.0} events/s ({:.2} s, into ClickHouse, committed)",
            self.meter_rate(),
            self.meter_secs
        )?;
        writeln!(
            f,
            "  ratio:        {:>10.1} % of the raw consume rate",
            100.0 * self.ratio()
        )?;
        if let Some(q) = &self.query {
            write!(f, "{q}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct QueryReport {
    pub busy_rows: u64,
    pub other_rows: u64,
    /// (what, median seconds over the runs, rows returned)
    pub timings: Vec<(String, f64, usize)>,
}

impl fmt::Display for QueryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  aggregate queries: busy tenant {} rows in one month, plus {} rows of 500 other tenants (median of 5)",
            self.busy_rows, self.other_rows
        )?;
        for (what, secs, rows) in &self.timings {
            writeln!(f, "    {secs:>7.3} s  {what} ({rows} result rows)")?;
        }
        Ok(())
    }
}

const BUSY_TENANT: &str = "busy-tenant";
const MONTH_START: &str = "2026-03-01 00:00:00";

pub async fn bench(config: &Config, args: &BenchArgs) -> Result<BenchReport, MeterError> {
    if args.events == 0 {
        return Err(MeterError::Config("--events must be at least 1".into()));
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    let namespace = format!("bench{}", &id[id.len() - 12..]);
    let database = format!("bench_{}", &id[id.len() - 12..]);
    let names = Names::namespaced(&namespace);
    let Some(bus) = connect_bus(config, names.clone(), None).await? else {
        return Err(MeterError::Other("the bus is unavailable".into()));
    };
    let root = clickhouse_client(config);
    migrate(&root, &database, None).await?;
    let ch = root.with_database(&database);

    let result = measure(config, args, &bus, &names, &ch).await;
    if !args.keep {
        // Kafka topics of the bench namespace are left to the broker's retention.
        if config.bus == BusKind::Nats
            && let Ok(js) = connect_jetstream(config, names.clone()).await
        {
            for stream in [&names.events_stream, &names.deadletter_stream] {
                let _ = js.jetstream().delete_stream(stream).await;
            }
        }
        let _ = ch
            .query(&format!("DROP DATABASE IF EXISTS {database}"))
            .execute()
            .await;
    }
    let (publish_secs, raw_secs, meter_secs, query) = result?;
    Ok(BenchReport {
        events: args.events,
        namespace,
        database,
        max_events: config.batch.max_events,
        max_wait_ms: config.batch.max_wait_ms,
        max_in_flight: config.consumer.max_in_flight,
        publish_secs,
        raw_secs,
        meter_secs,
        query,
    })
}

async fn measure(
    config: &Config,
    args: &BenchArgs,
    bus: &Arc<dyn EventBus>,
    names: &Names,
    ch: &Client,
) -> Result<(f64, f64, f64, Option<QueryReport>), MeterError> {
    let publish_secs = publish(bus, names, args.events).await?;
    let spec = |durable: &str| ConsumerSpec {
        durable: Some(durable.to_owned()),
        filter: names.events_filter(),
        start: StartFrom::Beginning,
        ack_wait: config.ack_wait(),
        max_in_flight: config.consumer.max_in_flight,
    };
    tracing::info!("raw consume");
    let raw_secs = raw_consume(bus, spec("bench-raw"), config, args.events).await?;
    tracing::info!("meter");
    let meter_secs = meter(bus, ch, spec("bench-meter"), config, args.events).await?;
    let stored: u64 = ch.query("SELECT count() FROM usage").fetch_one().await?;
    if stored != args.events {
        return Err(MeterError::Other(format!(
            "usage holds {stored} rows, expected {}",
            args.events
        )));
    }
    let query = match args.query_rows {
        Some(rows) if rows > 0 => Some(query_bench(ch, rows).await?),
        _ => None,
    };
    Ok((publish_secs, raw_secs, meter_secs, query))
}

/// Synthetic, realistic usage events.
fn synthetic(rng: &mut StdRng, names: &Names) -> Outgoing {
    const MODELS: [(&str, &str); 4] = [
        ("gpt-4o", "openai"),
        ("gpt-4o-mini", "openai"),
        ("claude-sonnet", "anthropic"),
        ("claude-haiku", "anthropic"),
    ];
    let tenant = format!("tenant-{:02}", rng.random_range(0..50));
    let key = format!("key-{}", rng.random_range(0..5));
    let (model, provider) = MODELS[rng.random_range(0..MODELS.len())];
    let tokens = TokenCounts {
        input_tokens: rng.random_range(10..4_000),
        output_tokens: rng.random_range(1..1_000),
        cache_read_tokens: rng.random_range(0..2_000),
        cache_write_tokens: rng.random_range(0..500),
        reasoning_tokens: rng.random_range(0..100),
    };
    // $2.50 / $10 per million input / output tokens, exact at scale 12.
    let cost = Decimal::new(
        i64::try_from(tokens.input_tokens * 2_500_000 + tokens.output_tokens * 10_000_000)
            .unwrap_or(0),
        12,
    );
    let event = Event::Usage(UsageEvent {
        meta: EventMeta::new(
            tenant.clone(),
            key,
            format!("req_{}", uuid::Uuid::now_v7().simple()),
        ),
        api: ApiFormat::OpenaiChat,
        requested_model: model.to_owned(),
        model: format!("{model}-2026-01-01"),
        provider: provider.to_owned(),
        deployment: format!("{provider}-primary"),
        tokens,
        estimated: false,
        status: 200,
        streamed: rng.random_bool(0.5),
        latency_ms: rng.random_range(50..5_000),
        ttft_ms: Some(rng.random_range(20..800)),
        retries: 0,
        price_version: 3,
        cost,
    });
    let trace: u128 = rng.random();
    let span: u64 = rng.random();
    Outgoing {
        subject: names.event_subject(event.kind(), &tenant),
        id: event.meta().id.to_string(),
        payload: Bytes::from(event.to_json()),
        headers: vec![(
            "traceparent".into(),
            format!("00-{trace:032x}-{span:016x}-01"),
        )],
    }
}

async fn publish(bus: &Arc<dyn EventBus>, names: &Names, n: u64) -> Result<f64, MeterError> {
    let bar = indicatif::ProgressBar::new(n);
    let mut rng = StdRng::seed_from_u64(7);
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let chunk = (n - sent).min(5_000);
        let msgs: Vec<Outgoing> = (0..chunk).map(|_| synthetic(&mut rng, names)).collect();
        for r in bus.publish_many(msgs).await {
            r?;
        }
        sent += chunk;
        bar.set_position(sent);
    }
    bar.finish_and_clear();
    Ok(started.elapsed().as_secs_f64())
}

async fn raw_consume(
    bus: &Arc<dyn EventBus>,
    spec: ConsumerSpec,
    config: &Config,
    n: u64,
) -> Result<f64, MeterError> {
    let mut consumer = bus.consumer(spec).await?;
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut got = 0u64;
    while got < n {
        let batch = consumer
            .fetch(config.batch.max_events, config.max_wait())
            .await?;
        if batch.is_empty() {
            if last_progress.elapsed() > Duration::from_secs(30) {
                return Err(MeterError::Other(format!(
                    "raw consumer stalled at {got}/{n}"
                )));
            }
            continue;
        }
        last_progress = Instant::now();
        got += batch.len() as u64;
        consumer
            .commit(batch.into_iter().map(|d| d.commit).collect())
            .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn meter(
    bus: &Arc<dyn EventBus>,
    ch: &Client,
    spec: ConsumerSpec,
    config: &Config,
    n: u64,
) -> Result<f64, MeterError> {
    let stats = Arc::new(Stats::default());
    let pipeline = Pipeline {
        bus: bus.clone(),
        ch: ch.clone(),
        spec,
        max_events: config.batch.max_events,
        max_wait: config.max_wait(),
        mode: Mode::Live,
        ack_delay: None,
        stats: stats.clone(),
    };
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let watch = async {
        let mut last = (0u64, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let done = stats.committed.load(Ordering::Relaxed);
            if done >= n {
                let secs = started.elapsed().as_secs_f64();
                cancel.cancel();
                return Ok(secs);
            }
            if done > last.0 {
                last = (done, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(60) {
                cancel.cancel();
                return Err(MeterError::Other(format!("meter stalled at {done}/{n}")));
            }
        }
    };
    let (run, secs) = tokio::join!(pipeline.run(cancel.clone()), watch);
    run?;
    secs
}

async fn query_bench(ch: &Client, rows: u64) -> Result<QueryReport, MeterError> {
    tracing::info!(rows, "generating the busy tenant's month");
    // 31 days = 2,678,400 s; rows spread evenly, 20 keys, 8 models.
    let generate = |tenant_expr: &str, n: u64| {
        format!(
            "INSERT INTO usage_events (event_id, occurred_at, tenant_id, key_id, request_id, api, requested_model,
                 model, provider, deployment, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                 reasoning_tokens, cost, price_version, estimated, streamed, status, latency_ms, retries,
                 schema_version, stream_seq, inserted_at)
             SELECT toString(generateUUIDv4()),
                    toDateTime('{MONTH_START}', 'UTC') + intDiv(number * 2678400, {n}),
                    {tenant_expr}, concat('key-', toString(number % 20)), concat('req-', toString(number)),
                    'openai_chat', concat('model-', toString(number % 8)), concat('model-', toString(number % 8)),
                    'openai', 'primary', number % 4000, number % 1000, number % 2000, number % 500, number % 100,
                    toDecimal128(number % 4000, 12) / 400000, 3, 0, number % 2, 200,
                    number % 5000, 0, '1.0', number, now()
             FROM numbers({n})"
        )
    };
    ch.query(&generate(&format!("'{BUSY_TENANT}'"), rows))
        .execute()
        .await?;
    ch.query(&generate("concat('other-', toString(number % 500))", rows))
        .execute()
        .await?;
    let month = format!(
        "tenant_id = '{BUSY_TENANT}' AND day >= toDate('2026-03-01') AND day < toDate('2026-04-01')"
    );
    let queries = vec![
        (
            "usage_daily: the month by day (31 rows)".to_owned(),
            format!(
                "SELECT day, sum(input_tokens), sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens),
                        sum(reasoning_tokens), sum(cost), sum(requests)
                 FROM usage_daily WHERE {month} GROUP BY day ORDER BY day"
            ),
        ),
        (
            "usage_daily: the month by key, model and day".to_owned(),
            format!("SELECT * FROM usage_daily WHERE {month} ORDER BY day, key_id, model"),
        ),
        (
            "usage_hourly: the month by model and hour".to_owned(),
            format!(
                "SELECT model, hour, sum(input_tokens), sum(output_tokens), sum(cost), sum(requests)
                 FROM usage_hourly WHERE tenant_id = '{BUSY_TENANT}'
                   AND hour >= toDateTime('{MONTH_START}', 'UTC') AND hour < toDateTime('2026-04-01 00:00:00', 'UTC')
                 GROUP BY model, hour ORDER BY model, hour"
            ),
        ),
        (
            "usage: the month's totals straight from the view".to_owned(),
            format!(
                "SELECT count(), sum(input_tokens), sum(output_tokens), sum(cost) FROM usage
                 WHERE tenant_id = '{BUSY_TENANT}' AND occurred_at >= toDateTime('{MONTH_START}', 'UTC')
                   AND occurred_at < toDateTime('2026-04-01 00:00:00', 'UTC')"
            ),
        ),
    ];
    let mut timings = Vec::new();
    for (what, sql) in queries {
        let mut runs = Vec::new();
        let mut result_rows = 0;
        for _ in 0..5 {
            let started = Instant::now();
            let mut cursor = ch.query(&sql).fetch_bytes("TSV")?;
            let mut bytes = Vec::new();
            while let Some(chunk) = cursor.next().await? {
                bytes.extend_from_slice(&chunk);
            }
            runs.push(started.elapsed().as_secs_f64());
            result_rows = bytes.iter().filter(|b| **b == b'\n').count();
        }
        runs.sort_by(f64::total_cmp);
        timings.push((what, runs[runs.len() / 2], result_rows));
    }
    Ok(QueryReport {
        busy_rows: rows,
        other_rows: rows,
        timings,
    })
}
