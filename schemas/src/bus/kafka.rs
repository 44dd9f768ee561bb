//! Kafka implementation of the [`EventBus`](super::EventBus) (`rdkafka`,
//! bundled librdkafka).
//!
//! # Topic layout
//!
//! - One **events topic** (`kafka.topic`, default `<root>.events`, so
//!   `tollgate.events` in production) carries every event kind, with
//!   `kafka.partitions` partitions (default 12). A second **dead-letter
//!   topic** (`<root>.deadletter`) takes what the meter parks. Both are
//!   created with the admin API if missing (an existing topic is left as it
//!   is: partitions are the operator's decision).
//! - Every message is **keyed by tenant id** (the last token of its subject),
//!   so a tenant's events stay in one partition and in order.
//! - Headers: [`SUBJECT_HEADER`] (the NATS-style subject the rest of Tollgate
//!   speaks in, e.g. `tollgate.events.usage.acme`), [`EVENT_ID_HEADER`] (the
//!   idempotency key) and whatever the publisher adds (`traceparent`).
//!
//! # Producing
//!
//! Idempotent (`enable.idempotence`, which implies `acks=all`), so the
//! producer's own retries never duplicate or reorder a partition. A publish
//! waits for the broker's acknowledgement; after `publish_timeout_ms` an
//! unreachable broker is [`Unavailable`](super::BusErrorKind::Unavailable)
//! and the gateway spools, exactly as with NATS. The broker keeps no
//! long-lived dedup window like JetStream's, so a spooled event replayed
//! after a timeout that had in fact landed is stored twice; the meter and
//! billing deduplicate by event id, which is where exactness lives anyway.
//! An idempotent producer whose messages timed out bumps its epoch; a broker
//! that then fences it (tansu does), or a fatal librdkafka error, makes the
//! bus replace the producer (a new producer id): the failed publishes were
//! already spooled, so nothing is lost.
//!
//! # Consuming
//!
//! A durable consumer is a consumer group (`<durable>` in production,
//! `<root>.<durable>` under a test namespace) with auto-commit off. Subject
//! filters are applied on the subject header: a message that does not match
//! is never handed out but is marked done at once, so offsets advance past
//! it (billing skips request events this way).
//!
//! **Commits never pass an uncommitted offset.** Kafka commits one offset per
//! partition ("everything below is done"), while the meter commits batches
//! that may complete out of order. So each consumer tracks, per partition,
//! the offsets it has handed out and which of them are done; it commits the
//! end of the contiguous done prefix and nothing beyond. A batch committed
//! early just waits in the tracker until the ones before it are done.
//!
//! **Rebalance.** When partitions are revoked, the consumer commits (sync)
//! what is done for them, then forgets them: tokens still in flight for a
//! revoked partition are ignored when they come back (each partition's
//! tracking carries a generation), and the new owner is redelivered those
//! messages from the committed offset. That can insert a batch twice, which
//! the meter's `FINAL` views and billing's event-id dedup absorb; it can never
//! skip one.
//!
//! `lag()` answers from a background measurement (watermarks are a broker
//! round trip per partition, too slow for the meter's loop to wait on).
//!
//! Kafka has no per-message ack timer: a delivered message that is never
//! committed comes back only after a rebalance or restart (not after
//! `ack_wait`), and it holds back its partition's commit point meanwhile.
//! The meter retries inserts until they succeed, so this only matters for a
//! dead letter that cannot be parked; it is redelivered on the next restart.
//!
//! # Positions and the quota marker
//!
//! A position is `position(partition, offset + 1)` (see [`super`]): offsets
//! order a partition and nothing else. The gateway's local debit compares
//! the position the bus acknowledged for one of its events with the
//! `priced_seq` of the tenant's (or key's) quota snapshot. On Kafka billing
//! keeps its priced position **per partition** and writes, into a tenant's
//! snapshot, the position of the tenant's partition. Because events are keyed
//! by tenant, every event of that tenant (and of its keys) sits in that
//! partition, so the comparison is between positions of one partition: exact,
//! with no clock. (Changing the partition count of a live topic moves
//! tenants between partitions and breaks this, as it breaks Kafka's own
//! per-key ordering: add partitions only with the pipeline drained.)
//!
//! `head()` is the sum of the partitions' end offsets (the number of
//! messages appended); `heads()` the newest position of each partition;
//! `StartFrom::Position(p)` starts every partition at sequence `seq_of(p)`
//! (offset `seq - 1`), which is what the meter's `replay --from-seq` means on
//! Kafka; `StartFrom::Time` uses the broker's offsets-for-times. Both are for
//! ephemeral consumers (replay), which are assigned every partition and
//! commit nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Deserialize;

use super::{
    BusError, BusErrorKind, CommitToken, ConsumerSpec, Delivery, EventBus, EventConsumer, Outgoing,
    PublishReceipt, StartFrom, Token, position,
};
use crate::names::{Names, ROOT};

/// Header carrying the message's subject.
pub const SUBJECT_HEADER: &str = "tollgate-subject";
/// Header carrying the idempotency key (the event id).
pub const EVENT_ID_HEADER: &str = "tollgate-event-id";

/// How long metadata, watermark and commit calls may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The `[kafka]` section of each service's configuration. Only read when
/// `bus = "kafka"`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// `bootstrap.servers`: comma-separated `host:port`.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// The events topic; default `<root>.events` (`tollgate.events`).
    #[serde(default)]
    pub topic: Option<String>,
    /// The dead-letter topic; default `<root>.deadletter`.
    #[serde(default)]
    pub deadletter_topic: Option<String>,
    /// Partitions of topics this creates (existing topics are left alone).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics this creates.
    #[serde(default = "default_replication")]
    pub replication: i32,
    /// How long a publish may wait for the broker before the gateway spools.
    #[serde(default = "default_publish_timeout_ms")]
    pub publish_timeout_ms: u64,
    /// Consumer-group session timeout: how soon a dead meter's partitions
    /// move to the others.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// `security.protocol`: `plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`.
    #[serde(default)]
    pub security_protocol: Option<String>,
    /// `sasl.mechanism`: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`.
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    #[serde(default)]
    pub sasl_username: Option<String>,
    #[serde(default)]
    pub sasl_password: Option<String>,
    #[serde(default)]
    pub ssl_ca_location: Option<String>,
    #[serde(default)]
    pub ssl_certificate_location: Option<String>,
    #[serde(default)]
    pub ssl_key_location: Option<String>,
    #[serde(default)]
    pub ssl_key_password: Option<String>,
    /// Any other librdkafka property, passed through as is.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_partitions() -> i32 {
    12
}
fn default_replication() -> i32 {
    1
}
fn default_publish_timeout_ms() -> u64 {
    5_000
}
fn default_session_timeout_ms() -> u64 {
    10_000
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            topic: None,
            deadletter_topic: None,
            partitions: default_partitions(),
            replication: default_replication(),
            publish_timeout_ms: default_publish_timeout_ms(),
            session_timeout_ms: default_session_timeout_ms(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            properties: BTreeMap::new(),
        }
    }
}

fn secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k.contains("password") || k.contains("secret") || k.contains("sasl.oauthbearer.config")
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hide = |s: &Option<String>| s.as_ref().map(|_| "***");
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if secret_key(k) { "***" } else { v.as_str() };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("deadletter_topic", &self.deadletter_topic)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &hide(&self.sasl_password))
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &hide(&self.ssl_key_password))
            .field("properties", &props)
            .finish()
    }
}

impl KafkaSettings {
    /// Checks what types cannot; errors name the key (under `kafka.`).
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("kafka.brokers: expected host:port[,host:port...]".into());
        }
        if !(1..=1 << 20).contains(&self.partitions) {
            return Err("kafka.partitions: must be between 1 and 1048576".into());
        }
        if self.replication < 1 {
            return Err("kafka.replication: must be at least 1".into());
        }
        if self.publish_timeout_ms < 100 {
            return Err("kafka.publish_timeout_ms: must be at least 100".into());
        }
        if self.session_timeout_ms < 1_000 {
            return Err("kafka.session_timeout_ms: must be at least 1000".into());
        }
        for (key, topic) in [
            ("kafka.topic", &self.topic),
            ("kafka.deadletter_topic", &self.deadletter_topic),
        ] {
            if let Some(t) = topic
                && (t.is_empty()
                    || t.len() > 249
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                return Err(format!(
                    "{key}: use letters, digits, `.`, `_` and `-` (at most 249)"
                ));
            }
        }
        Ok(())
    }

    /// The librdkafka configuration shared by producer, consumers and admin.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        let optional = [
            ("security.protocol", &self.security_protocol),
            ("sasl.mechanism", &self.sasl_mechanism),
            ("sasl.username", &self.sasl_username),
            ("sasl.password", &self.sasl_password),
            ("ssl.ca.location", &self.ssl_ca_location),
            ("ssl.certificate.location", &self.ssl_certificate_location),
            ("ssl.key.location", &self.ssl_key_location),
            ("ssl.key.password", &self.ssl_key_password),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                c.set(k, v);
            }
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::new(BusErrorKind::Unavailable, e)
}

fn config_error(e: impl std::fmt::Display) -> BusError {
    BusError::new(BusErrorKind::Config, e)
}

fn classify(e: &KafkaError) -> BusErrorKind {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge | C::InvalidMessage | C::InvalidMessageSize | C::InvalidRecord,
        ) => BusErrorKind::Rejected,
        Some(C::TopicAuthorizationFailed | C::UnknownTopic | C::InvalidTopic) => {
            BusErrorKind::Config
        }
        _ => BusErrorKind::Unavailable,
    }
}

fn lock(t: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a blocking librdkafka call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BusError> + Send + 'static,
) -> Result<T, BusError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| unavailable(format!("blocking task: {e}")))?
}

/// The Kafka bus: one idempotent producer, consumers on demand.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    settings: KafkaSettings,
    names: Names,
    topic: String,
    deadletter_topic: String,
    deadletter_prefix: String,
    /// Replaced when librdkafka reports a fatal error (an idempotent
    /// producer can fence itself after timeouts); never held across awaits.
    producer: std::sync::RwLock<(u64, FutureProducer)>,
}

fn make_producer(settings: &KafkaSettings) -> Result<FutureProducer, BusError> {
    settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set(
            "message.timeout.ms",
            settings.publish_timeout_ms.to_string(),
        )
        .create()
        .map_err(config_error)
}

impl KafkaBus {
    /// Creates the producer and the topics if missing. Fails with
    /// `Unavailable` if no broker answers within a few seconds.
    pub async fn connect(settings: &KafkaSettings, names: Names) -> Result<Self, BusError> {
        let bus = Self::new(settings, names)?;
        bus.ensure_topics().await?;
        Ok(bus)
    }

    /// The producer only; touches no broker.
    pub fn new(settings: &KafkaSettings, names: Names) -> Result<Self, BusError> {
        settings.validate().map_err(config_error)?;
        let producer = make_producer(settings)?;
        let topic = settings
            .topic
            .clone()
            .unwrap_or_else(|| format!("{}.events", names.root));
        let deadletter_topic = settings
            .deadletter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.deadletter", names.root));
        let deadletter_prefix = format!("{}.deadletter.", names.root);
        Ok(Self {
            inner: Arc::new(Inner {
                settings: settings.clone(),
                names,
                topic,
                deadletter_topic,
                deadletter_prefix,
                producer: std::sync::RwLock::new((0, producer)),
            }),
        })
    }

    fn producer(&self) -> (u64, FutureProducer) {
        self.inner
            .producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces producer `generation` if librdkafka declared it unusable or
    /// the broker fenced it: an idempotent producer whose messages timed
    /// out (broker unreachable) bumps its epoch, and a broker that does not
    /// follow (tansu) fences it from then on. A new producer gets a new id;
    /// nothing is lost (failed messages are spooled and replayed) and a
    /// duplicate is absorbed by the consumers' event-id dedup.
    fn recover(&self, generation: u64, producer: &FutureProducer, errors: &[&KafkaError]) {
        use RDKafkaErrorCode as C;
        let fenced = errors.iter().any(|e| {
            matches!(
                e.rdkafka_error_code(),
                Some(
                    C::ProducerFenced
                        | C::InvalidProducerEpoch
                        | C::OutOfOrderSequenceNumber
                        | C::UnknownProducerId
                        | C::InvalidProducerIdMapping
                        | C::Fatal
                )
            )
        });
        let fatal = producer.client().fatal_error();
        if !fenced && fatal.is_none() {
            return;
        }
        let mut current = self
            .inner
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 != generation {
            return; // another publish replaced it already
        }
        tracing::warn!(fatal = ?fatal, errors = errors.len(), "Kafka producer fenced or failed; creating a new one");
        match make_producer(&self.inner.settings) {
            Ok(fresh) => *current = (generation + 1, fresh),
            Err(e) => tracing::error!(error = %e, "cannot create a new Kafka producer"),
        }
    }

    /// The events topic.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    pub fn deadletter_topic(&self) -> &str {
        &self.inner.deadletter_topic
    }

    /// The consumer-group id of durable consumer `durable`.
    pub fn group_id(&self, durable: &str) -> String {
        if self.inner.names.root == ROOT {
            durable.to_owned()
        } else {
            format!("{}.{durable}", self.inner.names.root)
        }
    }

    /// Creates the events and dead-letter topics if they do not exist, then
    /// waits (up to 10 s) until the broker's metadata shows them.
    pub async fn ensure_topics(&self) -> Result<(), BusError> {
        let s = &self.inner.settings;
        let admin: AdminClient<DefaultClientContext> =
            s.client_config().create().map_err(config_error)?;
        let topics = [
            NewTopic::new(
                &self.inner.topic,
                s.partitions,
                TopicReplication::Fixed(s.replication),
            ),
            NewTopic::new(
                &self.inner.deadletter_topic,
                s.partitions,
                TopicReplication::Fixed(s.replication),
            ),
        ];
        let options = AdminOptions::new()
            .request_timeout(Some(CALL_TIMEOUT))
            .operation_timeout(Some(CALL_TIMEOUT));
        let results = admin
            .create_topics(topics.iter(), &options)
            .await
            .map_err(|e| BusError::new(classify(&e), format!("create topics: {e}")))?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(BusError::new(
                        BusErrorKind::Config,
                        format!("create topic {topic}: {code}"),
                    ));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.partitions_of(&self.inner.topic).await {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) | Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(_) => return Err(config_error("topic has no partitions")),
                Err(e) => return Err(e),
            }
        }
    }

    /// The number of partitions of `topic` (0 if the broker does not know it).
    async fn partitions_of(&self, topic: &str) -> Result<i32, BusError> {
        let (_, producer) = self.producer();
        let topic = topic.to_owned();
        blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), CALL_TIMEOUT)
                .map_err(unavailable)?;
            let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                return Ok(0);
            };
            if t.error().is_some() {
                return Ok(0);
            }
            Ok(i32::try_from(t.partitions().len()).unwrap_or(i32::MAX))
        })
        .await
    }

    /// `(low, high)` watermarks of every partition of the events topic.
    async fn watermarks(&self) -> Result<Vec<(i64, i64)>, BusError> {
        let n = self.partitions_of(&self.inner.topic).await?;
        if n == 0 {
            return Err(config_error(format!(
                "topic {} does not exist",
                self.inner.topic
            )));
        }
        let (_, producer) = self.producer();
        let topic = self.inner.topic.clone();
        blocking(move || {
            (0..n)
                .map(|p| {
                    producer
                        .client()
                        .fetch_watermarks(&topic, p, CALL_TIMEOUT)
                        .map_err(unavailable)
                })
                .collect()
        })
        .await
    }

    fn record_topic(&self, subject: &str) -> &str {
        if subject.starts_with(&self.inner.deadletter_prefix) {
            &self.inner.deadletter_topic
        } else {
            &self.inner.topic
        }
    }

    /// Per partition (indexed by partition): its high watermark and the
    /// offset group `durable` resumes from (its committed offset, or the low
    /// watermark where it has committed nothing or less).
    async fn group_offsets(&self, durable: &str) -> Result<Vec<(i64, i64)>, BusError> {
        let marks = self.watermarks().await?;
        let consumer: BaseConsumer = self
            .consumer_config(&self.group_id(durable), "earliest")
            .create()
            .map_err(config_error)?;
        let topic = self.inner.topic.clone();
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..marks.len() {
                tpl.add_partition(&topic, i32::try_from(p).unwrap_or(0));
            }
            let committed = consumer
                .committed_offsets(tpl, CALL_TIMEOUT)
                .map_err(unavailable)?;
            let mut out: Vec<(i64, i64)> = marks.iter().map(|&(low, high)| (high, low)).collect();
            for e in committed.elements_for_topic(&topic) {
                let Some(slot) = usize::try_from(e.partition())
                    .ok()
                    .and_then(|p| out.get_mut(p))
                else {
                    continue;
                };
                if let Offset::Offset(o) = e.offset() {
                    slot.1 = o.max(slot.1);
                }
            }
            Ok(out)
        })
        .await
    }

    fn consumer_config(&self, group: &str, reset: &str) -> ClientConfig {
        let s = &self.inner.settings;
        let mut c = s.client_config();
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", reset)
            .set("session.timeout.ms", s.session_timeout_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (s.session_timeout_ms / 5).max(100).to_string(),
            );
        c
    }

    async fn assign_from(
        &self,
        consumer: &Arc<StreamConsumer<Ctx>>,
        start: StartFrom,
    ) -> Result<(), BusError> {
        let n = self.partitions_of(&self.inner.topic).await?;
        if n == 0 {
            return Err(config_error(format!(
                "topic {} does not exist",
                self.inner.topic
            )));
        }
        let topic = self.inner.topic.clone();
        let consumer = consumer.clone();
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            let at = |offset: Offset, tpl: &mut TopicPartitionList| {
                for p in 0..n {
                    tpl.add_partition_offset(&topic, p, offset)
                        .map_err(config_error)?;
                }
                Ok::<(), BusError>(())
            };
            match start {
                StartFrom::Beginning => at(Offset::Beginning, &mut tpl)?,
                StartFrom::New => at(Offset::End, &mut tpl)?,
                StartFrom::Position(p) => at(
                    Offset::Offset(i64::try_from(super::seq_of(p).max(1) - 1).unwrap_or(i64::MAX)),
                    &mut tpl,
                )?,
                StartFrom::Time(t) => {
                    let mut query = TopicPartitionList::new();
                    at(Offset::Offset(t.timestamp_millis()), &mut query)?;
                    let found = consumer
                        .offsets_for_times(query, CALL_TIMEOUT)
                        .map_err(unavailable)?;
                    for e in found.elements_for_topic(&topic) {
                        // No message at or after `t`: start at the end.
                        let offset = match e.offset() {
                            Offset::Offset(o) if o >= 0 => Offset::Offset(o),
                            _ => Offset::End,
                        };
                        tpl.add_partition_offset(&topic, e.partition(), offset)
                            .map_err(config_error)?;
                    }
                }
            }
            consumer.assign(&tpl).map_err(config_error)
        })
        .await
    }
}

/// Whether NATS-style `filter` (`*` one token, `>` the rest) matches `subject`.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    for f in filter.split('.') {
        match (f, s.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    s.next().is_none()
}

/// The tenant id: the last token of an event or dead-letter subject.
fn key_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, msg: Outgoing) -> Result<PublishReceipt, BusError> {
        let mut results = self.publish_many(vec![msg]).await;
        results
            .pop()
            .unwrap_or_else(|| Err(unavailable("no result")))
    }

    async fn publish_many(&self, msgs: Vec<Outgoing>) -> Vec<Result<PublishReceipt, BusError>> {
        // Enqueue all, then await all acknowledgements: librdkafka batches
        // and pipelines them, and against a dead broker they expire together.
        let (generation, producer) = self.producer();
        let mut pending = Vec::with_capacity(msgs.len());
        for msg in &msgs {
            let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len() + 2)
                .insert(Header {
                    key: SUBJECT_HEADER,
                    value: Some(msg.subject.as_str()),
                })
                .insert(Header {
                    key: EVENT_ID_HEADER,
                    value: Some(msg.id.as_str()),
                });
            for (k, v) in &msg.headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_str()),
                });
            }
            let record = FutureRecord::to(self.record_topic(&msg.subject))
                .key(key_of(&msg.subject))
                .payload(msg.payload.as_ref())
                .headers(headers);
            pending.push(producer.send_result(record).map_err(|(e, _)| e));
        }
        let raw = futures::future::join_all(pending.into_iter().map(|sent| async move {
            let fut = sent.map_err(Some)?;
            match fut.await {
                Ok(Ok(d)) => Ok(PublishReceipt {
                    position: position(
                        u32::try_from(d.partition).unwrap_or(0),
                        u64::try_from(d.offset).unwrap_or(0) + 1,
                    ),
                    duplicate: false,
                }),
                Ok(Err((e, _))) => Err(Some(e)),
                Err(_) => Err(None),
            }
        }))
        .await;
        let errors: Vec<&KafkaError> = raw
            .iter()
            .filter_map(|r| r.as_ref().err().and_then(Option::as_ref))
            .collect();
        if !errors.is_empty() {
            tracing::debug!(error = %errors[0], failed = errors.len(), "Kafka publish failed");
            self.recover(generation, &producer, &errors);
        }
        raw.into_iter()
            .map(|r| {
                r.map_err(|e| match e {
                    Some(e) => BusError::new(classify(&e), e),
                    None => unavailable("producer dropped the message"),
                })
            })
            .collect()
    }

    async fn consumer(&self, spec: ConsumerSpec) -> Result<Box<dyn EventConsumer>, BusError> {
        let tracker = Arc::new(Mutex::new(Tracker::default()));
        let lost_at = Arc::new(Mutex::new(None));
        let ctx = Ctx {
            tracker: tracker.clone(),
            topic: self.inner.topic.clone(),
            lost_at: lost_at.clone(),
        };
        let reset = match spec.start {
            StartFrom::New => "latest",
            _ => "earliest",
        };
        let (group, grouped) = match &spec.durable {
            Some(d) => (self.group_id(d), true),
            None => (
                format!(
                    "{}.ephemeral.{}",
                    self.inner.names.root,
                    uuid::Uuid::now_v7()
                ),
                false,
            ),
        };
        let consumer: StreamConsumer<Ctx> = self
            .consumer_config(&group, reset)
            .create_with_context(ctx)
            .map_err(config_error)?;
        let consumer = Arc::new(consumer);
        if grouped {
            if matches!(spec.start, StartFrom::Position(_) | StartFrom::Time(_)) {
                return Err(config_error(
                    "a durable Kafka consumer starts at the beginning or at new messages; \
                     positions and times are for ephemeral consumers",
                ));
            }
            consumer
                .subscribe(&[&self.inner.topic])
                .map_err(config_error)?;
        } else {
            self.assign_from(&consumer, spec.start).await?;
        }
        Ok(Box::new(KafkaConsumer {
            consumer,
            tracker,
            filter: spec.filter,
            topic: self.inner.topic.clone(),
            grouped,
            lag: Arc::new(Mutex::new(LagCell::default())),
            lost_at,
            rejoin_within: Duration::from_millis(self.inner.settings.session_timeout_ms * 2),
        }))
    }

    async fn ready(&self) -> Result<(), BusError> {
        match self.partitions_of(&self.inner.topic).await? {
            0 => Err(unavailable(format!(
                "topic {} not known to the broker",
                self.inner.topic
            ))),
            _ => Ok(()),
        }
    }

    async fn head(&self) -> Result<u64, BusError> {
        Ok(self
            .watermarks()
            .await?
            .iter()
            .map(|(_, high)| u64::try_from(*high).unwrap_or(0))
            .sum())
    }

    async fn heads(&self) -> Result<Vec<u64>, BusError> {
        Ok(self
            .watermarks()
            .await?
            .iter()
            .enumerate()
            .map(|(p, (_, high))| {
                position(
                    u32::try_from(p).unwrap_or(0),
                    u64::try_from(*high).unwrap_or(0),
                )
            })
            .collect())
    }

    async fn committed(&self, durable: &str) -> Result<Vec<u64>, BusError> {
        Ok(self
            .group_offsets(durable)
            .await?
            .into_iter()
            .enumerate()
            .map(|(p, (_, from))| {
                position(
                    u32::try_from(p).unwrap_or(0),
                    u64::try_from(from).unwrap_or(0),
                )
            })
            .collect())
    }

    async fn pending(&self, durable: &str) -> Result<u64, BusError> {
        Ok(self
            .group_offsets(durable)
            .await?
            .into_iter()
            .map(|(high, from)| u64::try_from(high - from).unwrap_or(0))
            .sum())
    }

    fn names(&self) -> &Names {
        &self.inner.names
    }
}

/// Identifies a delivered message for its commit.
pub(crate) struct Mark {
    partition: i32,
    offset: i64,
    /// The partition tracking it was delivered under; stale after a revoke.
    generation: u64,
}

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// Per-partition contiguity of done offsets (see the module docs).
#[derive(Default)]
struct Tracker {
    parts: HashMap<i32, Part>,
}

struct Part {
    generation: u64,
    /// Offsets handed out (or skipped) and not yet behind the commit point;
    /// `true` once done.
    open: BTreeMap<i64, bool>,
    /// Everything below this offset is done (-1: nothing yet).
    done_below: i64,
    /// What the group has committed (as far as this consumer knows).
    committed: i64,
}

impl Part {
    fn new() -> Self {
        Self {
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            open: BTreeMap::new(),
            done_below: -1,
            committed: -1,
        }
    }

    fn advance(&mut self) {
        while let Some((&offset, &done)) = self.open.first_key_value() {
            if !done {
                break;
            }
            self.open.pop_first();
            self.done_below = offset + 1;
        }
    }
}

impl Tracker {
    fn delivered(&mut self, partition: i32, offset: i64, done: bool) -> u64 {
        let part = self.parts.entry(partition).or_insert_with(Part::new);
        // A message below the commit point again (a seek): never commit past
        // it until it is done.
        if offset < part.done_below {
            part.done_below = offset;
        }
        part.open.insert(offset, done);
        if done {
            part.advance();
        }
        part.generation
    }

    fn mark(&mut self, m: &Mark) {
        if let Some(part) = self.parts.get_mut(&m.partition)
            && part.generation == m.generation
            && let Some(done) = part.open.get_mut(&m.offset)
        {
            *done = true;
            part.advance();
        }
    }

    /// Partitions whose done prefix is past what was committed.
    fn due(&self) -> Vec<(i32, i64, u64)> {
        self.parts
            .iter()
            .filter(|(_, p)| p.done_below > p.committed)
            .map(|(&n, p)| (n, p.done_below, p.generation))
            .collect()
    }

    fn committed(&mut self, list: &[(i32, i64, u64)]) {
        for &(n, offset, generation) in list {
            if let Some(p) = self.parts.get_mut(&n)
                && p.generation == generation
            {
                p.committed = p.committed.max(offset);
            }
        }
    }

    /// Forgets `partitions`, returning what is due for them.
    fn revoke(&mut self, partitions: &[i32]) -> Vec<(i32, i64, u64)> {
        let mut due = Vec::new();
        for n in partitions {
            if let Some(p) = self.parts.remove(n)
                && p.done_below > p.committed
            {
                due.push((*n, p.done_below, p.generation));
            }
        }
        due
    }
}

fn commit_list(topic: &str, due: &[(i32, i64, u64)]) -> Result<TopicPartitionList, BusError> {
    let mut tpl = TopicPartitionList::new();
    for &(p, offset, _) in due {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))
            .map_err(config_error)?;
    }
    Ok(tpl)
}

struct Ctx {
    tracker: Arc<Mutex<Tracker>>,
    topic: String,
    /// Since when this member has had partitions revoked (or lost, when its
    /// session timed out while the broker was unreachable) without the
    /// rebalance completing: cleared by the next assignment, even an empty
    /// one.
    lost_at: Arc<Mutex<Option<std::time::Instant>>>,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        let due = lock(&self.tracker).revoke(&partitions);
        let lost = consumer.assignment_lost();
        self.lost_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert_with(std::time::Instant::now);
        tracing::info!(
            ?partitions,
            committing = due.len(),
            lost,
            "kafka partitions revoked"
        );
        if due.is_empty() {
            return;
        }
        // Commit what is done for the partitions we are losing, before the
        // new owner starts from the committed offsets.
        match commit_list(&self.topic, &due) {
            Ok(list) => {
                if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
                    tracing::warn!(error = %e, "commit on revoke failed; the new owner redelivers");
                }
            }
            Err(e) => tracing::warn!(error = %e, "commit on revoke failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            *self
                .lost_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            let partitions: Vec<i32> = tpl
                .elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect();
            tracing::info!(?partitions, "kafka partitions assigned");
        }
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer<Ctx>>,
    tracker: Arc<Mutex<Tracker>>,
    filter: String,
    topic: String,
    /// A consumer group (durable): commits go to the broker.
    grouped: bool,
    lag: Arc<Mutex<LagCell>>,
    /// See [`Ctx::lost_at`].
    lost_at: Arc<Mutex<Option<std::time::Instant>>>,
    /// How long a member dropped by the group may take to be assigned
    /// partitions again before `fetch` fails (callers then reopen it).
    rejoin_within: Duration,
}

impl KafkaConsumer {
    /// Commits what is due; `sync` waits for the broker's answer.
    async fn flush(&self, sync: bool) -> Result<(), BusError> {
        if !self.grouped {
            return Ok(());
        }
        let due = lock(&self.tracker).due();
        if due.is_empty() {
            return Ok(());
        }
        let list = commit_list(&self.topic, &due)?;
        if sync {
            let consumer = self.consumer.clone();
            blocking(move || {
                consumer
                    .commit(&list, CommitMode::Sync)
                    .map_err(|e| BusError::new(classify(&e), e))
            })
            .await?;
        } else {
            self.consumer
                .commit(&list, CommitMode::Async)
                .map_err(|e| BusError::new(classify(&e), e))?;
        }
        lock(&self.tracker).committed(&due);
        Ok(())
    }
}

#[async_trait]
impl EventConsumer for KafkaConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        // A rebalance normally completes within a session timeout. If this
        // member's partitions were revoked or lost (session timed out while
        // the broker was unreachable) and no assignment (not even an empty
        // one) has followed in twice that, say so: the caller reopens the
        // consumer as a new member (seen with tansu after a long outage).
        let lost = *self
            .lost_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(at) = lost
            && at.elapsed() > self.rejoin_within
        {
            return Err(unavailable(format!(
                "partitions revoked {:.0?} ago and the group has not reassigned; reopen the consumer",
                at.elapsed()
            )));
        }
        let mut out = Vec::new();
        let mut skipped = false;
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < max {
            let msg = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    if out.is_empty() && !skipped {
                        return Err(BusError::new(classify(&e), e));
                    }
                    break;
                }
                Ok(Ok(m)) => m,
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            let mut subject = None;
            let mut headers = Vec::new();
            if let Some(h) = msg.headers() {
                for i in 0..h.count() {
                    let Some(header) = h.try_get(i) else { continue };
                    let value = String::from_utf8_lossy(header.value.unwrap_or_default());
                    if header.key == SUBJECT_HEADER {
                        subject = Some(value.to_string());
                    }
                    headers.push((header.key.to_owned(), value.into_owned()));
                }
            }
            let subject = subject.filter(|s| subject_matches(&self.filter, s));
            let generation = lock(&self.tracker).delivered(partition, offset, subject.is_none());
            let Some(subject) = subject else {
                skipped = true;
                continue;
            };
            out.push(Delivery {
                subject,
                payload: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
                headers,
                position: position(
                    u32::try_from(partition).unwrap_or(0),
                    u64::try_from(offset).unwrap_or(0) + 1,
                ),
                attempt: 1,
                commit: CommitToken(Token::Kafka(Mark {
                    partition,
                    offset,
                    generation,
                })),
            });
        }
        if skipped && let Err(e) = self.flush(false).await {
            tracing::debug!(error = %e, "committing skipped messages failed; retried later");
        }
        Ok(out)
    }

    async fn commit(&mut self, tokens: Vec<CommitToken>) -> Result<(), BusError> {
        {
            let mut t = lock(&self.tracker);
            for token in &tokens {
                if let Token::Kafka(m) = &token.0 {
                    t.mark(m);
                }
            }
        }
        self.flush(true).await
    }

    async fn release(&mut self, tokens: Vec<CommitToken>) -> Result<(), BusError> {
        // No per-message nak: the partition's commit point stays below these
        // (the tracker never passes an open offset), and whoever owns the
        // partition next resumes there.
        drop(tokens);
        Ok(())
    }

    async fn lag(&mut self) -> Result<u64, BusError> {
        // Asking the broker for watermarks is a round trip per partition,
        // too slow for the meter's loop to wait on: answer with the last
        // measurement and refresh it in the background (at most one query
        // in flight). Only the very first call waits.
        let first = {
            let mut l = self
                .lag
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let start = !l.refreshing;
            l.refreshing = true;
            if start { Some(l.value.is_none()) } else { None }
        };
        if let Some(wait) = first {
            let (consumer, topic, cell) =
                (self.consumer.clone(), self.topic.clone(), self.lag.clone());
            let query = tokio::task::spawn_blocking(move || {
                let measured = measure_lag(&consumer, &topic);
                let mut l = cell
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                l.refreshing = false;
                if let Ok(v) = &measured {
                    l.value = Some(*v);
                }
                measured
            });
            if wait {
                return query
                    .await
                    .map_err(|e| unavailable(format!("blocking task: {e}")))?;
            }
        }
        let l = self
            .lag
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        l.value
            .ok_or_else(|| unavailable("consumer lag not measured yet"))
    }
}

/// The last lag measurement of a consumer, refreshed in the background.
#[derive(Default)]
struct LagCell {
    value: Option<u64>,
    refreshing: bool,
}

/// Σ over assigned partitions of (end offset − the consumer's position).
fn measure_lag(consumer: &StreamConsumer<Ctx>, topic: &str) -> Result<u64, BusError> {
    let positions = consumer.position().map_err(unavailable)?;
    let mut lag = 0u64;
    for e in positions.elements_for_topic(topic) {
        let (low, high) = consumer
            .fetch_watermarks(topic, e.partition(), CALL_TIMEOUT)
            .map_err(unavailable)?;
        let at = match e.offset() {
            Offset::Offset(o) => o.max(low),
            _ => low,
        };
        lag += u64::try_from(high - at).unwrap_or(0);
    }
    Ok(lag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_nats() {
        assert!(subject_matches("t.events.>", "t.events.usage.acme"));
        assert!(subject_matches("t.events.usage.>", "t.events.usage.acme"));
        assert!(!subject_matches(
            "t.events.usage.>",
            "t.events.request.acme"
        ));
        assert!(subject_matches("t.events.*.acme", "t.events.usage.acme"));
        assert!(!subject_matches("t.events.>", "t.events"));
        assert!(!subject_matches("t.events.usage", "t.events.usage.acme"));
        assert!(!subject_matches("t.events.>", "u.events.usage.acme"));
    }

    #[test]
    fn commits_never_pass_an_open_offset() {
        let mut t = Tracker::default();
        let g = t.delivered(0, 0, false);
        t.delivered(0, 1, false);
        t.delivered(0, 2, true); // skipped by the filter
        t.delivered(0, 3, false);
        // 1 and 3 done out of order: 0 still open, nothing is due.
        for offset in [1, 3] {
            t.mark(&Mark {
                partition: 0,
                offset,
                generation: g,
            });
        }
        assert!(t.due().is_empty());
        t.mark(&Mark {
            partition: 0,
            offset: 0,
            generation: g,
        });
        let due = t.due();
        assert_eq!(due, vec![(0, 4, g)]);
        t.committed(&due);
        assert!(t.due().is_empty());
    }

    #[test]
    fn revoked_partitions_ignore_stale_tokens() {
        let mut t = Tracker::default();
        let old = t.delivered(1, 10, false);
        t.delivered(1, 11, false);
        t.mark(&Mark {
            partition: 1,
            offset: 10,
            generation: old,
        });
        assert_eq!(t.revoke(&[1]), vec![(1, 11, old)]);
        // Reassigned: redelivered from the committed offset 11.
        let new = t.delivered(1, 11, false);
        assert_ne!(old, new);
        t.mark(&Mark {
            partition: 1,
            offset: 11,
            generation: old,
        });
        assert!(t.due().is_empty(), "a stale token must not commit");
        t.mark(&Mark {
            partition: 1,
            offset: 11,
            generation: new,
        });
        assert_eq!(t.due(), vec![(1, 12, new)]);
    }

    #[test]
    fn positions_order_within_a_partition() {
        let a = position(3, 5);
        assert_eq!(super::super::lane_of(a), 3);
        assert_eq!(super::super::seq_of(a), 5);
        assert!(position(3, 5) < position(3, 6));
        assert!(position(0, 0) < position(0, 1));
    }

    #[test]
    fn secrets_do_not_print() {
        let mut s = KafkaSettings {
            sasl_password: Some("hunter2".into()),
            ..Default::default()
        };
        s.properties
            .insert("sasl.oauthbearer.client.secret".into(), "hunter3".into());
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("hunter3"),
            "{shown}"
        );
    }
}
