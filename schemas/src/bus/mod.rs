//! The `EventBus`: how gateway and meter speak to the event transport.
//!
//! Publishing takes an idempotency key (the event id) and headers (the W3C
//! `traceparent`). Consuming hands out batches and commits them explicitly,
//! only after the consumer has made them durable elsewhere. Nothing above this
//! module knows which transport runs: JetStream ([`jetstream`]) is the default,
//! Kafka ([`kafka`]) the other; [`BusKind`] picks one from configuration.
//!
//! Delivery is at least once. Exactly-once *in effect* is the consumer's job
//! (the meter deduplicates by event id); the bus's own dedup (JetStream's
//! duplicate window on `Nats-Msg-Id`, Kafka's idempotent producer) only saves
//! work.
//!
//! # Positions and lanes
//!
//! A position is a `u64` that orders messages **within a lane**. JetStream
//! has one lane (0) and the position is the stream sequence. Kafka has one
//! lane per partition and the position is [`position`]`(partition, offset +
//! 1)`: the partition in the bits above [`LANE_SHIFT`], the offset below. So
//! positions of one lane compare like sequences, 0 is below every message
//! of lane 0 (nothing yet), and positions of different lanes must never be
//! compared. Events are keyed by tenant, so a tenant's events share one lane
//! and the quota's "priced up to" marker (`QuotaState::priced_seq`) is a
//! position in the tenant's lane (see [`kafka`] for the whole argument).

pub mod jetstream;
pub mod kafka;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::names::Names;

pub use jetstream::{JetStreamBus, StreamSettings};
pub use kafka::{KafkaBus, KafkaSettings};

/// Bits of a position below the lane (partition) number: 2^40 messages per
/// partition, 2^24 partitions.
pub const LANE_SHIFT: u32 = 40;
const SEQ_MASK: u64 = (1 << LANE_SHIFT) - 1;

/// The position of the `seq`-th message (1-based) of `lane`.
pub fn position(lane: u32, seq: u64) -> u64 {
    (u64::from(lane) << LANE_SHIFT) | (seq & SEQ_MASK)
}

/// The lane a position belongs to (always 0 on JetStream).
pub fn lane_of(position: u64) -> u32 {
    u32::try_from(position >> LANE_SHIFT).unwrap_or(u32::MAX)
}

/// The 1-based sequence of a position within its lane.
pub fn seq_of(position: u64) -> u64 {
    position & SEQ_MASK
}

/// Which transport carries events. Keys, quota states and prices stay in
/// JetStream KV either way, so NATS always runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    #[default]
    Nats,
    Kafka,
}

impl BusKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BusKind::Nats => "nats",
            BusKind::Kafka => "kafka",
        }
    }
}

/// The events bus `kind` names: `js` itself for NATS, else a Kafka bus
/// (topics created if missing). The JetStream bus is always needed for KV.
pub async fn events_bus(
    kind: BusKind,
    js: &JetStreamBus,
    kafka: &KafkaSettings,
) -> Result<Arc<dyn EventBus>, BusError> {
    match kind {
        BusKind::Nats => Ok(Arc::new(js.clone())),
        BusKind::Kafka => Ok(Arc::new(
            KafkaBus::connect(kafka, js.names().clone()).await?,
        )),
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub subject: String,
    /// Idempotency key; the event id. The transport drops duplicates it can see.
    pub id: String,
    pub payload: Bytes,
    /// Extra headers, e.g. `traceparent`.
    pub headers: Vec<(String, String)>,
}

/// What the transport said about a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// Position in the message's lane (see the module docs).
    pub position: u64,
    /// The transport recognised the idempotency key and did not store it
    /// again (JetStream's duplicate window; Kafka never says so).
    pub duplicate: bool,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The first message still in the stream.
    Beginning,
    /// A position (inclusive). On Kafka, [`seq_of`] it in every partition.
    Position(u64),
    /// The first message published at or after this time.
    Time(DateTime<Utc>),
    /// Only messages published after the consumer is created.
    New,
}

/// How to consume.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// A durable name shares progress (and work) across processes; `None` is
    /// an ephemeral consumer that lives as long as this process.
    pub durable: Option<String>,
    /// Subject filter, e.g. `Names::events_filter()`.
    pub filter: String,
    pub start: StartFrom,
    /// How long a delivered, uncommitted message waits before redelivery
    /// (JetStream; Kafka redelivers what is uncommitted on a rebalance).
    /// Keep it short (seconds): it is how long the work a crashed consumer
    /// held stays invisible. A consumer whose work takes longer keeps it with
    /// [`in_progress`] every [`ConsumerSpec::progress_every`].
    pub ack_wait: Duration,
    /// Upper bound on delivered-but-uncommitted messages (backpressure).
    pub max_in_flight: usize,
}

impl ConsumerSpec {
    /// How often a consumer still working on deliveries should say so
    /// ([`in_progress`]): a third of `ack_wait`, so one lost heartbeat never
    /// lets a message expire.
    pub fn progress_every(&self) -> Duration {
        (self.ack_wait / 3).max(Duration::from_millis(100))
    }

    pub fn new(filter: impl Into<String>) -> Self {
        Self {
            durable: None,
            filter: filter.into(),
            start: StartFrom::Beginning,
            ack_wait: Duration::from_secs(30),
            max_in_flight: 50_000,
        }
    }
}

/// One delivered message.
#[derive(Debug)]
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    /// Position in its lane (see the module docs).
    pub position: u64,
    /// How many times it has been delivered (1 the first time; Kafka does
    /// not count redeliveries and always says 1).
    pub attempt: u64,
    pub commit: CommitToken,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Opaque handle that commits one delivery.
pub struct CommitToken(pub(crate) Token);

// Boxing the JetStream ack would cost an allocation per delivery on the hot
// path; the token was already this size before Kafka existed.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Token {
    JetStream(jetstream::Ack),
    Kafka(kafka::Mark),
}

impl std::fmt::Debug for CommitToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitToken")
    }
}

/// Tells the transport these deliveries are still being worked on, so they
/// are not redelivered while their `ack_wait` would have run out (JetStream
/// `+WPI`, which restarts each message's timer). Kafka has no per-message
/// timer: nothing to do.
pub async fn in_progress(tokens: &[CommitToken]) -> Result<(), BusError> {
    for t in tokens {
        match &t.0 {
            Token::JetStream(a) => a.progress().await?,
            Token::Kafka(_) => {}
        }
    }
    Ok(())
}

/// Whether a caller should retry. Callers branch on this, not on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusErrorKind {
    /// The broker is unreachable or timed out: try again later (or spool).
    Unavailable,
    /// The message is unacceptable (too large, bad subject): retrying won't help.
    Rejected,
    /// Misconfiguration (a stream config conflict). Publishers retry it like
    /// `Unavailable`: only `Rejected` says the message itself is at fault.
    Config,
}

#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct BusError {
    pub kind: BusErrorKind,
    pub message: String,
}

impl BusError {
    pub fn new(kind: BusErrorKind, message: impl std::fmt::Display) -> Self {
        Self {
            kind,
            message: message.to_string(),
        }
    }
    pub fn is_retryable(&self) -> bool {
        self.kind == BusErrorKind::Unavailable
    }
}

#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Publishes and waits for the transport's durable acknowledgement.
    async fn publish(&self, msg: Outgoing) -> Result<PublishReceipt, BusError>;

    /// Publishes many, pipelined, and waits for all acknowledgements.
    /// Results are in input order.
    async fn publish_many(&self, msgs: Vec<Outgoing>) -> Vec<Result<PublishReceipt, BusError>>;

    /// Opens (or joins, for a durable name) a consumer.
    async fn consumer(&self, spec: ConsumerSpec) -> Result<Box<dyn EventConsumer>, BusError>;

    /// Ok when the transport is reachable and the stream exists.
    async fn ready(&self) -> Result<(), BusError>;

    /// How many messages have been appended to the events stream (0 when
    /// empty): JetStream's last sequence, the sum of Kafka's end offsets.
    async fn head(&self) -> Result<u64, BusError>;

    /// The newest position of each lane, indexed by lane; an empty lane
    /// says `position(lane, 0)`. One entry on JetStream.
    async fn heads(&self) -> Result<Vec<u64>, BusError>;

    /// Per lane (indexed by lane), the position up to which the durable
    /// consumer `durable` has committed *every* message: JetStream's ack
    /// floor, Kafka's committed offsets (or the low watermark where nothing
    /// is committed). A lower bound that never passes an uncommitted
    /// message; `[0]` when the consumer does not exist yet.
    async fn committed(&self, durable: &str) -> Result<Vec<u64>, BusError>;

    /// Messages the durable consumer `durable` has not committed yet
    /// (including ones outside its filter on Kafka, until it skips them).
    async fn pending(&self, durable: &str) -> Result<u64, BusError>;

    /// The subject and stream names this bus was opened with.
    fn names(&self) -> &Names;
}

#[async_trait]
pub trait EventConsumer: Send {
    /// Up to `max` deliveries: returns as soon as `max` are in hand, else
    /// when `wait` has passed (possibly empty).
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;

    /// Commits deliveries: they will not be delivered again. Call only once
    /// what they carry is durable downstream.
    async fn commit(&mut self, tokens: Vec<CommitToken>) -> Result<(), BusError>;

    /// Gives deliveries back uncommitted, to be delivered again promptly
    /// (to this consumer or another sharing its durable name) rather than
    /// after `ack_wait`: what a consumer holds when it shuts down before
    /// finishing. JetStream naks each message; Kafka has nothing to do (a
    /// closing member's partitions are reassigned and resume at the commit
    /// point, which never passed these).
    async fn release(&mut self, tokens: Vec<CommitToken>) -> Result<(), BusError>;

    /// Messages the consumer has not yet been delivered (lag), if known.
    async fn lag(&mut self) -> Result<u64, BusError>;
}
