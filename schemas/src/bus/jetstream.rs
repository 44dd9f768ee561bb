//! JetStream implementation of the [`EventBus`](super::EventBus).
//!
//! The stream is created as ARCHITECTURE.md fixes it: file storage, limits
//! retention (never WorkQueue or Interest, so a replay can always rebuild
//! ClickHouse), a configurable max age (default 35 days) and a duplicate window
//! (default 10 minutes) that is longer than any in-memory publisher retry. A
//! spool replay after a long outage can land outside the window; that is safe,
//! because the meter deduplicates by event id, not by the bus.
//!
//! Commits are explicit per-message acks sent as fire-and-forget publishes,
//! then one flush. A lost ack only causes a redelivery, which the meter
//! absorbs; per-message (not ack-all) acks let several meters share a durable
//! consumer without acknowledging each other's in-flight work.
//!
//! A durable consumer is made to match its [`ConsumerSpec`] every time it is
//! opened: a changed `ack_wait` or `max_in_flight` is updated in place; a
//! changed filter (which nats-server 2.9 cannot update) recreates the
//! consumer at its ack floor, so nothing committed is delivered again except
//! what lay above the floor (the consumers deduplicate by event id).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{self, AckPolicy, DeliverPolicy, pull},
    message::PublishMessage as Publish,
    stream::{self, RetentionPolicy, StorageType},
};
use async_trait::async_trait;
use futures::StreamExt;

use super::{
    BusError, BusErrorKind, CommitToken, ConsumerSpec, Delivery, EventBus, EventConsumer, Outgoing,
    PublishReceipt, StartFrom, Token,
};
use crate::names::Names;

/// The stream's retention settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    pub max_age: Duration,
    pub duplicate_window: Duration,
    pub replicas: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(35 * 24 * 3600),
            duplicate_window: Duration::from_secs(600),
            replicas: 1,
        }
    }
}

pub(crate) struct Ack {
    acker: jetstream::message::Acker,
}

impl Ack {
    /// `+WPI`: restarts the message's `ack_wait`.
    pub(crate) async fn progress(&self) -> Result<(), BusError> {
        self.acker
            .ack_with(jetstream::AckKind::Progress)
            .await
            .map_err(unavailable)
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::new(BusErrorKind::Unavailable, e)
}

/// The JetStream bus over one NATS connection.
#[derive(Clone)]
pub struct JetStreamBus {
    client: async_nats::Client,
    js: jetstream::Context,
    names: Names,
}

impl JetStreamBus {
    /// Connects and makes sure the events and dead-letter streams exist with
    /// `settings` (updating them if they drifted).
    pub async fn connect(
        url: &str,
        names: Names,
        settings: StreamSettings,
    ) -> Result<Self, BusError> {
        let bus = Self::connect_lazy(url, names).await?;
        bus.ensure_streams(settings).await?;
        Ok(bus)
    }

    /// A client that connects in the background (and reconnects for ever):
    /// returns at once, whether or not NATS is up. The streams are not
    /// touched; call [`JetStreamBus::ensure_streams`] when it answers.
    pub async fn connect_lazy(url: &str, names: Names) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("tollgate")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(unavailable)?;
        Ok(Self::from_client(client, names))
    }

    /// Wraps an existing client; does not touch the streams.
    pub fn from_client(client: async_nats::Client, names: Names) -> Self {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        Self { client, js, names }
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub async fn ensure_streams(&self, settings: StreamSettings) -> Result<(), BusError> {
        let events = stream::Config {
            name: self.names.events_stream.clone(),
            subjects: vec![self.names.events_filter()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: settings.max_age,
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            ..Default::default()
        };
        let dead = stream::Config {
            name: self.names.deadletter_stream.clone(),
            subjects: vec![self.names.deadletter_filter()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: settings.max_age,
            num_replicas: settings.replicas,
            ..Default::default()
        };
        for config in [events, dead] {
            self.ensure_stream(config).await?;
        }
        Ok(())
    }

    async fn ensure_stream(&self, config: stream::Config) -> Result<(), BusError> {
        let mut s = self
            .js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| {
                BusError::new(BusErrorKind::Config, format!("stream {}: {e}", config.name))
            })?;
        let info = s.info().await.map_err(unavailable)?;
        let current = &info.config;
        if current.max_age != config.max_age
            || current.duplicate_window != config.duplicate_window
            || current.subjects != config.subjects
        {
            self.js.update_stream(config.clone()).await.map_err(|e| {
                BusError::new(
                    BusErrorKind::Config,
                    format!("update stream {}: {e}", config.name),
                )
            })?;
        }
        Ok(())
    }

    /// Opens durable `name`, creating it, or bringing an existing one in line
    /// with `config` (see the module docs).
    async fn durable(
        stream: &stream::Stream,
        name: &str,
        config: pull::Config,
    ) -> Result<consumer::PullConsumer, BusError> {
        let config_error = |e: &dyn std::fmt::Display| {
            BusError::new(BusErrorKind::Config, format!("consumer {name}: {e}"))
        };
        let mut consumer: consumer::PullConsumer = stream
            .get_or_create_consumer(name, config.clone())
            .await
            .map_err(unavailable)?;
        let info = consumer.info().await.map_err(unavailable)?.clone();
        let current = &info.config;
        if current.filter_subject != config.filter_subject {
            let floor = info.ack_floor.stream_sequence;
            tracing::info!(
                consumer = name,
                from = %current.filter_subject,
                to = %config.filter_subject,
                ack_floor = floor,
                "consumer filter changed: recreating the consumer at its ack floor"
            );
            stream
                .delete_consumer(name)
                .await
                .map_err(|e| config_error(&e))?;
            let recreated = pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                },
                ..config
            };
            return stream
                .create_consumer(recreated)
                .await
                .map_err(|e| config_error(&e));
        }
        if current.ack_wait != config.ack_wait || current.max_ack_pending != config.max_ack_pending
        {
            let mut update = current.clone();
            update.ack_wait = config.ack_wait;
            update.max_ack_pending = config.max_ack_pending;
            tracing::info!(
                consumer = name,
                ack_wait = ?config.ack_wait,
                max_ack_pending = config.max_ack_pending,
                "updating the consumer's ack_wait and max_ack_pending"
            );
            stream
                .update_consumer(update)
                .await
                .map_err(|e| config_error(&e))?;
            return stream
                .get_consumer(name)
                .await
                .map_err(|e| config_error(&e));
        }
        Ok(consumer)
    }

    fn build(msg: &Outgoing) -> Publish {
        let mut headers = HeaderMap::new();
        for (k, v) in &msg.headers {
            headers.insert(k.as_str(), v.as_str());
        }
        Publish::build()
            .payload(msg.payload.clone())
            .headers(headers)
            .message_id(&msg.id)
    }

    fn classify(e: &jetstream::context::PublishError) -> BusErrorKind {
        use jetstream::context::PublishErrorKind as K;
        match e.kind() {
            K::MaxPayloadExceeded | K::WrongLastMessageId | K::WrongLastSequence => {
                BusErrorKind::Rejected
            }
            // Seen while nats-server shuts down or restarts: retried, never parked.
            K::StreamNotFound => BusErrorKind::Unavailable,
            _ => BusErrorKind::Unavailable,
        }
    }
}

#[async_trait]
impl EventBus for JetStreamBus {
    async fn publish(&self, msg: Outgoing) -> Result<PublishReceipt, BusError> {
        let mut results = self.publish_many(vec![msg]).await;
        results
            .pop()
            .unwrap_or_else(|| Err(unavailable("no result")))
    }

    async fn publish_many(&self, msgs: Vec<Outgoing>) -> Vec<Result<PublishReceipt, BusError>> {
        // Send all, then await all acks: one round trip for the whole batch.
        let mut pending = Vec::with_capacity(msgs.len());
        for msg in &msgs {
            let sent = self
                .js
                .send_publish(msg.subject.clone(), Self::build(msg))
                .await;
            pending.push(sent);
        }
        // Await the acks together: each has its own timeout, and against a
        // dead server they must all expire at once, not one after another.
        futures::future::join_all(pending.into_iter().map(|sent| async move {
            match sent {
                Ok(fut) => fut
                    .await
                    .map(|ack| PublishReceipt {
                        position: ack.sequence,
                        duplicate: ack.duplicate,
                    })
                    .map_err(|e| BusError::new(Self::classify(&e), e)),
                Err(e) => Err(BusError::new(Self::classify(&e), e)),
            }
        }))
        .await
    }

    async fn consumer(&self, spec: ConsumerSpec) -> Result<Box<dyn EventConsumer>, BusError> {
        let deliver_policy = match spec.start {
            StartFrom::Beginning => DeliverPolicy::All,
            StartFrom::Position(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq.max(1),
            },
            StartFrom::Time(t) => DeliverPolicy::ByStartTime {
                start_time: time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                    t.timestamp_nanos_opt().unwrap_or(0),
                ))
                .map_err(|e| BusError::new(BusErrorKind::Config, e))?,
            },
            StartFrom::New => DeliverPolicy::New,
        };
        let config = pull::Config {
            durable_name: spec.durable.clone(),
            filter_subject: spec.filter.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: spec.ack_wait,
            deliver_policy,
            max_ack_pending: i64::try_from(spec.max_in_flight).unwrap_or(i64::MAX),
            inactive_threshold: if spec.durable.is_some() {
                Duration::ZERO
            } else {
                Duration::from_secs(300)
            },
            ..Default::default()
        };
        let stream = self
            .js
            .get_stream(&self.names.events_stream)
            .await
            .map_err(|e| BusError::new(BusErrorKind::Config, e))?;
        let consumer: consumer::PullConsumer = match &spec.durable {
            Some(name) => Self::durable(&stream, name, config).await?,
            None => stream.create_consumer(config).await.map_err(unavailable)?,
        };
        let batch = spec.max_in_flight.clamp(1, 10_000);
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(unavailable)?;
        Ok(Box::new(JetStreamConsumer {
            client: self.client.clone(),
            consumer,
            messages,
        }))
    }

    async fn ready(&self) -> Result<(), BusError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(unavailable("not connected to NATS"));
        }
        self.js
            .get_stream(&self.names.events_stream)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn head(&self) -> Result<u64, BusError> {
        let mut s = self
            .js
            .get_stream(&self.names.events_stream)
            .await
            .map_err(unavailable)?;
        Ok(s.info().await.map_err(unavailable)?.state.last_sequence)
    }

    async fn heads(&self) -> Result<Vec<u64>, BusError> {
        Ok(vec![self.head().await?])
    }

    async fn committed(&self, durable: &str) -> Result<Vec<u64>, BusError> {
        let stream = self
            .js
            .get_stream(&self.names.events_stream)
            .await
            .map_err(unavailable)?;
        match stream.consumer_info(durable).await {
            Ok(info) => Ok(vec![info.ack_floor.stream_sequence]),
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                Ok(vec![0])
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn pending(&self, durable: &str) -> Result<u64, BusError> {
        let stream = self
            .js
            .get_stream(&self.names.events_stream)
            .await
            .map_err(unavailable)?;
        let mut consumer: consumer::PullConsumer =
            stream.get_consumer(durable).await.map_err(unavailable)?;
        let info = consumer.info().await.map_err(unavailable)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    fn names(&self) -> &Names {
        &self.names
    }
}

struct JetStreamConsumer {
    client: async_nats::Client,
    consumer: consumer::PullConsumer,
    messages: pull::Stream,
}

impl JetStreamConsumer {
    fn convert(msg: jetstream::Message) -> Result<Delivery, BusError> {
        let info = msg
            .info()
            .map_err(|e| BusError::new(BusErrorKind::Rejected, e))?;
        let (position, attempt) = (
            info.stream_sequence,
            u64::try_from(info.delivered).unwrap_or(1),
        );
        let (msg, acker) = msg.split();
        let headers = msg
            .headers
            .as_ref()
            .map(|h| {
                let mut out = Vec::with_capacity(h.len());
                for (k, vs) in h.iter() {
                    for v in vs {
                        out.push((k.to_string(), v.as_str().to_owned()));
                    }
                }
                out
            })
            .unwrap_or_default();
        Ok(Delivery {
            subject: msg.subject.to_string(),
            payload: msg.payload,
            headers,
            position,
            attempt,
            commit: CommitToken(Token::JetStream(Ack { acker })),
        })
    }
}

#[async_trait]
impl EventConsumer for JetStreamConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let mut out = Vec::with_capacity(max.min(4096));
        let deadline = tokio::time::Instant::now() + wait;
        while out.len() < max {
            let next = match tokio::time::timeout_at(deadline, self.messages.next()).await {
                Err(_) => break,
                Ok(None) => return Err(unavailable("consumer stream ended")),
                Ok(Some(Err(e))) => {
                    // Missed heartbeats while disconnected surface here; the
                    // stream keeps trying, so report and let the caller decide.
                    if out.is_empty() {
                        return Err(unavailable(e));
                    }
                    break;
                }
                Ok(Some(Ok(m))) => m,
            };
            out.push(Self::convert(next)?);
        }
        Ok(out)
    }

    async fn commit(&mut self, tokens: Vec<CommitToken>) -> Result<(), BusError> {
        for t in &tokens {
            // A token from another transport cannot be ours: nothing to ack.
            if let Token::JetStream(a) = &t.0 {
                a.acker.ack().await.map_err(unavailable)?;
            }
        }
        self.client.flush().await.map_err(unavailable)?;
        Ok(())
    }

    async fn release(&mut self, tokens: Vec<CommitToken>) -> Result<(), BusError> {
        for t in &tokens {
            if let Token::JetStream(a) = &t.0 {
                a.acker
                    .ack_with(jetstream::AckKind::Nak(None))
                    .await
                    .map_err(unavailable)?;
            }
        }
        self.client.flush().await.map_err(unavailable)?;
        Ok(())
    }

    async fn lag(&mut self) -> Result<u64, BusError> {
        let info = self.consumer.info().await.map_err(unavailable)?;
        Ok(info.num_pending)
    }
}
