//! The meter: bus events into ClickHouse, exactly once in effect.
//!
//! It consumes the `TOLLGATE_EVENTS` stream through a durable pull consumer
//! (several meters may share it, each taking different messages), or, with
//! `bus = "kafka"`, the events topic through a consumer group (several
//! meters split its partitions; see `tollgate_schemas::bus::kafka`), batches
//! events on size or time, inserts them as RowBinary and commits a batch only
//! once ClickHouse has accepted it. [`pipeline`] has the moving parts and the
//! shutdown order; [`decode`] what counts as poison; [`config`] the knobs.
//!
//! # Why each event counts exactly once
//!
//! Delivery is at least once, and nothing in the transport can make it more:
//! a batch can be inserted and the meter killed before its ack, a commit can
//! be lost, the same event can be re-published after the bus's duplicate
//! window, or the whole stream can be replayed. So exactness is not something
//! the meter *does*; it is a property of how storage is *read*:
//!
//! 1. **Identity is the event body's `id`** (a UUIDv7 made once by the
//!    gateway), stored canonically as `event_id`. Never the `Nats-Msg-Id` and
//!    never the stream sequence: a re-published or replayed event has a new
//!    sequence and perhaps a new message id, but the same body, so the same
//!    `event_id`, `tenant_id` and `occurred_at`.
//! 2. **Storage tables are `ReplacingMergeTree`s ordered by
//!    `(tenant_id, occurred_at, event_id)` and partitioned by
//!    `toYYYYMM(occurred_at)`**, so every copy of an event has the same sorting
//!    key and lands in the same partition: copies are duplicates in exactly
//!    the sense ReplacingMergeTree collapses.
//! 3. **Everything finance and billing read is a view with `FINAL`**
//!    (`usage`, `requests`, `token_counts`), and the aggregates
//!    (`usage_hourly`, `usage_daily`) are plain views that `GROUP BY` over
//!    `usage`. `FINAL` collapses duplicates at read time, whether or not a
//!    background merge has happened yet, so a re-inserted batch is invisible
//!    the moment it lands. Merges are eventual; reads through `FINAL` are not.
//! 4. **No pre-aggregation.** A materialized view is fed by *inserts*, so a
//!    batch re-inserted after a crash would be summed twice, and
//!    non-replicated MergeTree on 18.16 has no insert deduplication to stop
//!    it. OpenMeter and Lago both dropped pre-aggregating views for this
//!    reason. Aggregating the deduplicated rows at query time is exact by
//!    construction, including for late events (they simply fall into their
//!    hour when read).
//! 5. **Ack only after insert.** A batch is committed only after every one of
//!    its rows is in ClickHouse, so a crash can cause a re-insert (absorbed
//!    by 3) but never a loss. An insert failure keeps the batch and retries;
//!    nothing is dropped and nothing is acked early.
//!
//! The price: reads pay for `FINAL` and the aggregation. The README has the
//! measured cost of a busy tenant's month (`tollgate-meter bench
//! --query-rows`).

pub mod bench;
pub mod config;
pub mod decode;
pub mod error;
pub mod metrics;
pub mod pipeline;
pub mod rows;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clickhouse::Client;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::Names;
use tollgate_schemas::bus::{
    BusKind, ConsumerSpec, EventBus, JetStreamBus, KafkaBus, StartFrom, StreamSettings, seq_of,
};

pub use crate::config::Config;
pub use crate::error::MeterError;
use crate::pipeline::{Mode, Pipeline, Stats, backoff, sleep_unless_cancelled};

/// Runs the meter until `shutdown` resolves, then drains: the partial batch
/// is inserted and committed before this returns. Serves `/metrics` and
/// `/healthz` on `metrics_listener` when given. NATS or ClickHouse being
/// unavailable (at start or later) pauses the meter; it does not end it.
pub async fn run(
    config: Config,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MeterError> {
    let cancel = CancellationToken::new();
    let handle = metrics::install();
    let server = async {
        if let Some(listener) = metrics_listener
            && let Err(e) = metrics::serve(listener, handle, cancel.clone()).await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    };
    let work = async {
        let result = consume(&config, &cancel).await;
        cancel.cancel();
        result
    };
    let watch = async {
        tokio::select! {
            () = shutdown => {
                tracing::info!("shutdown requested: flushing and committing");
                cancel.cancel();
            }
            () = cancel.cancelled() => {}
        }
    };
    let (result, (), ()) = tokio::join!(work, watch, server);
    result
}

async fn consume(config: &Config, cancel: &CancellationToken) -> Result<(), MeterError> {
    let names = Names::namespaced(&config.nats.namespace);
    let Some(bus) = connect_bus(config, names.clone(), Some(cancel)).await? else {
        return Ok(());
    };
    let ch = clickhouse_client(config);
    if !migrate(&ch, &config.clickhouse.database, Some(cancel)).await? {
        return Ok(());
    }
    let spec = ConsumerSpec {
        durable: Some(config.consumer.durable.clone()),
        filter: names.events_filter(),
        start: StartFrom::Beginning,
        ack_wait: config.ack_wait(),
        max_in_flight: config.consumer.max_in_flight,
    };
    let pipeline = Pipeline {
        bus,
        ch: ch.with_database(&config.clickhouse.database),
        spec,
        max_events: config.batch.max_events,
        max_wait: config.max_wait(),
        mode: Mode::Live,
        ack_delay: config.fault_ack_delay,
        stats: Arc::new(Stats::default()),
    };
    tracing::info!(
        stream = %names.events_stream,
        durable = %config.consumer.durable,
        database = %config.clickhouse.database,
        max_events = config.batch.max_events,
        max_wait_ms = config.batch.max_wait_ms,
        "meter consuming"
    );
    pipeline.run(cancel.clone()).await?;
    tracing::info!("meter stopped");
    Ok(())
}

/// A ClickHouse client as the meter uses it (no default database; 18.16
/// needs validation off).
pub fn clickhouse_client(config: &Config) -> Client {
    let mut ch = Client::default()
        .with_url(&config.clickhouse.url)
        .with_user(&config.clickhouse.user)
        .with_validation(false)
        .with_compression(match config.clickhouse.compression {
            config::InsertCompression::Lz4 => clickhouse::Compression::Lz4,
            config::InsertCompression::None => clickhouse::Compression::None,
        });
    if !config.clickhouse.password.expose().is_empty() {
        ch = ch.with_password(config.clickhouse.password.expose());
    }
    ch
}

/// Connects to the configured bus (NATS, or Kafka with `bus = "kafka"`; the
/// meter needs nothing else from NATS) and makes sure the streams or topics
/// exist. With `retry` (the live meter) it waits for the bus until cancelled
/// (`Ok(None)`); without, the first failure is the answer. Missing streams
/// and topics are created with default settings; existing ones are left as
/// they are (retention and partitions are the deployment's decision).
pub async fn connect_bus(
    config: &Config,
    names: Names,
    retry: Option<&CancellationToken>,
) -> Result<Option<Arc<dyn EventBus>>, MeterError> {
    let mut attempt = 0u32;
    loop {
        match try_connect_bus(config, names.clone()).await {
            Ok(bus) => return Ok(Some(bus)),
            Err(e) => {
                let Some(cancel) = retry else { return Err(e) };
                tracing::warn!(error = %e, bus = config.bus.as_str(), attempt, "bus not ready; retrying");
                if !sleep_unless_cancelled(backoff(attempt), cancel).await {
                    return Ok(None);
                }
                attempt += 1;
            }
        }
    }
}

async fn try_connect_bus(config: &Config, names: Names) -> Result<Arc<dyn EventBus>, MeterError> {
    Ok(match config.bus {
        BusKind::Nats => Arc::new(connect_jetstream(config, names).await?),
        BusKind::Kafka => Arc::new(KafkaBus::connect(&config.kafka, names).await?),
    })
}

/// The JetStream bus, creating missing streams with the default settings.
pub async fn connect_jetstream(config: &Config, names: Names) -> Result<JetStreamBus, MeterError> {
    let client = async_nats::ConnectOptions::new()
        .name("tollgate-meter")
        .connection_timeout(Duration::from_secs(5))
        .connect(config.nats.url.as_str())
        .await
        .map_err(|e| MeterError::Other(format!("connect to NATS at {}: {e}", config.nats.url)))?;
    let bus = JetStreamBus::from_client(client, names.clone());
    let mut missing = false;
    for stream in [&names.events_stream, &names.deadletter_stream] {
        if let Err(e) = bus.jetstream().get_stream(stream).await {
            use async_nats::jetstream::ErrorCode;
            use async_nats::jetstream::context::GetStreamErrorKind;
            match e.kind() {
                GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    missing = true
                }
                _ => return Err(MeterError::Other(format!("stream {stream}: {e}"))),
            }
        }
    }
    if missing {
        tracing::info!("creating the event streams with default settings");
        bus.ensure_streams(StreamSettings::default()).await?;
    }
    Ok(bus)
}

/// Applies the migrations; retries while ClickHouse is unavailable when
/// `retry` is given. `Ok(false)`: cancelled before it could.
pub async fn migrate(
    ch: &Client,
    database: &str,
    retry: Option<&CancellationToken>,
) -> Result<bool, MeterError> {
    let mut attempt = 0u32;
    loop {
        match tollgate_schemas::migrations::apply(ch, database).await {
            Ok(applied) => {
                if !applied.is_empty() {
                    tracing::info!(?applied, database, "migrations applied");
                }
                return Ok(true);
            }
            Err(e) => {
                let Some(cancel) = retry else {
                    return Err(e.into());
                };
                tracing::warn!(error = %e, attempt, "ClickHouse migrations failed; retrying");
                if !sleep_unless_cancelled(backoff(attempt), cancel).await {
                    return Ok(false);
                }
                attempt += 1;
            }
        }
    }
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    Seq(u64),
    Time(DateTime<Utc>),
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// The last stream position replayed.
    pub to_seq: u64,
    /// Messages committed (events stored and poison skipped).
    pub messages: u64,
    pub rows: u64,
    pub poison: u64,
    pub elapsed: Duration,
}

/// Rebuilds ClickHouse state from the stream: every event from `from` up to
/// `to_seq` (default: the stream's head when the replay starts) is inserted
/// again through an ephemeral consumer, with the configured batch size. It is
/// idempotent (the views collapse what is already there), does not disturb
/// the live meter's durable consumer, and does not dead-letter poison again.
/// Shows a progress bar on a terminal.
pub async fn replay(
    config: &Config,
    from: ReplayFrom,
    to_seq: Option<u64>,
    shutdown: impl Future<Output = ()>,
) -> Result<ReplayReport, MeterError> {
    let started = Instant::now();
    let names = Names::namespaced(&config.nats.namespace);
    let Some(bus) = connect_bus(config, names.clone(), None).await? else {
        return Err(MeterError::Other("NATS unavailable".into()));
    };
    let ch = clickhouse_client(config);
    migrate(&ch, &config.clickhouse.database, None).await?;
    // One stop position per lane: the lane's head, or `to_seq` within the
    // lane if lower (on Kafka `--to-seq`/`--from-seq` apply to every
    // partition's own sequence, i.e. offset + 1).
    let heads = bus.heads().await?;
    let stop_at: Vec<u64> = heads
        .iter()
        .map(|&h| match to_seq {
            Some(t) if t < seq_of(h) => h - seq_of(h) + t,
            _ => h,
        })
        .collect();
    let first = match from {
        ReplayFrom::Seq(s) => s.max(1),
        ReplayFrom::Time(_) => 1,
    };
    let last = stop_at.iter().map(|p| seq_of(*p)).max().unwrap_or(0);
    // Messages in range, for the progress bar (an upper bound for --from-time).
    let total: u64 = stop_at
        .iter()
        .map(|p| (seq_of(*p) + 1).saturating_sub(first))
        .sum();
    let empty = ReplayReport {
        to_seq: last,
        messages: 0,
        rows: 0,
        poison: 0,
        elapsed: started.elapsed(),
    };
    if total == 0 {
        return Ok(empty);
    }
    let stats = Arc::new(Stats::default());
    let pipeline = Pipeline {
        bus,
        ch: ch.with_database(&config.clickhouse.database),
        spec: ConsumerSpec {
            durable: None,
            filter: names.events_filter(),
            start: match from {
                ReplayFrom::Seq(s) => StartFrom::Position(s.max(1)),
                ReplayFrom::Time(t) => StartFrom::Time(t),
            },
            ack_wait: config.ack_wait(),
            max_in_flight: config.consumer.max_in_flight,
        },
        max_events: config.batch.max_events,
        max_wait: config.max_wait(),
        mode: Mode::Replay { stop_at },
        ack_delay: None,
        stats: stats.clone(),
    };
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "replay {bar:40.cyan/blue} {pos}/{len} messages ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let cancel = CancellationToken::new();
    let progress = async {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        while !cancel.is_cancelled() {
            tick.tick().await;
            let done = stats.committed.load(std::sync::atomic::Ordering::Relaxed);
            bar.set_position(done.min(total));
        }
    };
    let work = async {
        let r = pipeline.run(cancel.clone()).await;
        cancel.cancel();
        r
    };
    let watch = async {
        tokio::select! {
            () = shutdown => cancel.cancel(),
            () = cancel.cancelled() => {}
        }
    };
    let (result, (), ()) = tokio::join!(work, progress, watch);
    result?;
    bar.finish_with_message("done");
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Ok(ReplayReport {
        to_seq: last,
        messages: load(&stats.committed),
        rows: load(&stats.inserted),
        poison: load(&stats.dead_letters),
        elapsed: started.elapsed(),
    })
}
