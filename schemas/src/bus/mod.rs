//! The `EventBus`: how gateway and meter speak to the event transport.
//!
//! Publishing takes an idempotency key (the event id) and headers (the W3C
//! `traceparent`). Consuming hands out batches and commits them explicitly,
//! only after the consumer has made them durable elsewhere. Nothing above this
//! module knows which transport runs: JetStream ([`jetstream`]) is the default;
//! a Kafka implementation goes behind the same traits.
//!
//! Delivery is at least once. Exactly-once *in effect* is the consumer's job
//! (the meter deduplicates by event id); the bus's own dedup (JetStream's
//! duplicate window on `Nats-Msg-Id`) only saves work.

pub mod jetstream;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

pub use jetstream::{JetStreamBus, StreamSettings};

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
    /// Position in the stream (JetStream sequence, Kafka offset).
    pub position: u64,
    /// The transport recognised the idempotency key and did not store it again.
    pub duplicate: bool,
}

/// Where a new consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The first message still in the stream.
    Beginning,
    /// A stream position (inclusive).
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
    /// How long a delivered, uncommitted message waits before redelivery.
    pub ack_wait: Duration,
    /// Upper bound on delivered-but-uncommitted messages (backpressure).
    pub max_in_flight: usize,
}

impl ConsumerSpec {
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
    /// Position in the stream (JetStream stream sequence).
    pub position: u64,
    /// How many times it has been delivered (1 the first time).
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
pub struct CommitToken(pub(crate) jetstream::Ack);

impl std::fmt::Debug for CommitToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitToken")
    }
}

/// Whether a caller should retry. Callers branch on this, not on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusErrorKind {
    /// The broker is unreachable or timed out: try again later (or spool).
    Unavailable,
    /// The message is unacceptable (too large, bad subject): retrying won't help.
    Rejected,
    /// Misconfiguration (stream missing, config conflict).
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

    /// The position of the newest message in the stream (0 when empty).
    async fn head(&self) -> Result<u64, BusError>;
}

#[async_trait]
pub trait EventConsumer: Send {
    /// Up to `max` deliveries: returns as soon as `max` are in hand, else
    /// when `wait` has passed (possibly empty).
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError>;

    /// Commits deliveries: they will not be delivered again. Call only once
    /// what they carry is durable downstream.
    async fn commit(&mut self, tokens: Vec<CommitToken>) -> Result<(), BusError>;

    /// Messages the consumer has not yet been delivered (lag), if known.
    async fn lag(&mut self) -> Result<u64, BusError>;
}
