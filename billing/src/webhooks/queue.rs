//! The durable delivery queue: a JetStream stream and one durable pull
//! consumer.
//!
//! - Stream `names.webhooks_stream` on `names.webhooks_filter()`: file
//!   storage, limits retention, `max_age` = the delivery max age + one day (so
//!   a delivery's body outlives its last attempt and can be redelivered), a
//!   one-day duplicate window (the emit dedup).
//! - Consumer: explicit acks, `max_deliver` unlimited (we give up by age, not
//!   by count), `ack_wait` longer than an attempt can take, and no limit on
//!   acks pending: a delivery waiting out its backoff is "pending" to
//!   JetStream, and a cap would let one dead endpoint's backlog stall every
//!   other endpoint.
//!
//! One message is one delivery: the body is the payload, and who it is for
//! travels in headers ([`Job`]).

use std::time::Duration;

use crate::error::{Error, ResultExt as _};
use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    message::PublishMessage,
    stream::{self, RetentionPolicy, StorageType},
};
use bytes::Bytes;
use tollgate_schemas::Names;

use super::WebhookConfig;

/// The durable consumer's name (per stream, so namespaces never share it).
pub(crate) const CONSUMER: &str = "tollgate-billing-webhooks";
const DUPLICATE_WINDOW: Duration = Duration::from_secs(86_400);
/// Margin of `ack_wait` over the attempt timeout: DNS, the KV read of the
/// endpoint and the ack itself happen outside the HTTP timeout.
const ACK_MARGIN: Duration = Duration::from_secs(30);

const H_WEBHOOK_ID: &str = "Tollgate-Webhook-Id";
const H_TENANT: &str = "Tollgate-Tenant-Id";
const H_ENDPOINT: &str = "Tollgate-Endpoint-Id";
const H_EVENT: &str = "Tollgate-Event-Type";
/// Added to JetStream's delivery count to number attempts: 0 for an emit,
/// the highest attempt logged so far for an admin redelivery (so attempt
/// numbers stay unique per delivery id in the log).
const H_ATTEMPT_BASE: &str = "Tollgate-Attempt-Base";

/// Who one queued delivery is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Job {
    /// The `webhook-id` the receiver sees; the delivery id.
    pub webhook_id: String,
    pub tenant_id: String,
    pub endpoint_id: String,
    pub event_type: String,
    pub attempt_base: u32,
}

impl Job {
    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(H_WEBHOOK_ID, self.webhook_id.as_str());
        h.insert(H_TENANT, self.tenant_id.as_str());
        h.insert(H_ENDPOINT, self.endpoint_id.as_str());
        h.insert(H_EVENT, self.event_type.as_str());
        h.insert(H_ATTEMPT_BASE, self.attempt_base.to_string().as_str());
        h
    }

    pub fn from_headers(h: Option<&HeaderMap>) -> Option<Self> {
        let h = h?;
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        Some(Self {
            webhook_id: get(H_WEBHOOK_ID)?,
            tenant_id: get(H_TENANT)?,
            endpoint_id: get(H_ENDPOINT)?,
            event_type: get(H_EVENT)?,
            attempt_base: get(H_ATTEMPT_BASE)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        })
    }
}

/// `msg_` + UUIDv5 of the endpoint and the idempotency key: the same event
/// for the same endpoint always gets the same `webhook-id`. (v5, not v7: the
/// id must be a function of its inputs, not of time.)
pub(crate) fn delivery_id(endpoint_id: &str, idempotency_key: &str) -> String {
    let name = format!("tollgate.webhook\u{0}{endpoint_id}\u{0}{idempotency_key}");
    format!(
        "msg_{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple()
    )
}

/// `<root>.webhooks.<endpoint_id>.<delivery_id>`.
pub(crate) fn subject(names: &Names, endpoint_id: &str, delivery_id: &str) -> String {
    format!("{}.{delivery_id}", names.webhook_subject(endpoint_id))
}

pub(crate) struct Queue {
    js: jetstream::Context,
    names: Names,
    stream: stream::Stream,
    consumer: PullConsumer,
}

impl Queue {
    pub async fn open(
        js: jetstream::Context,
        names: &Names,
        config: &WebhookConfig,
    ) -> crate::error::Result<Self> {
        let wanted = stream::Config {
            name: names.webhooks_stream.clone(),
            subjects: vec![names.webhooks_filter()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: config.max_age + Duration::from_secs(86_400),
            duplicate_window: DUPLICATE_WINDOW.min(config.max_age),
            num_replicas: 1,
            ..Default::default()
        };
        let mut stream = js
            .get_or_create_stream(wanted.clone())
            .await
            .nats_ctx(|| format!("stream {}", wanted.name))?;
        let current = stream.info().await?.config.clone();
        if current.max_age != wanted.max_age
            || current.duplicate_window != wanted.duplicate_window
            || current.subjects != wanted.subjects
        {
            let mut update = current;
            update.max_age = wanted.max_age;
            update.duplicate_window = wanted.duplicate_window;
            update.subjects = wanted.subjects.clone();
            js.update_stream(update)
                .await
                .nats_ctx(|| format!("update stream {}", wanted.name))?;
            stream = js.get_stream(&wanted.name).await?;
        }

        let consumer_config = pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            description: Some("billing webhook deliveries".into()),
            filter_subject: names.webhooks_filter(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.timeout + ACK_MARGIN,
            deliver_policy: DeliverPolicy::All,
            max_deliver: -1,
            max_ack_pending: -1,
            inactive_threshold: Duration::ZERO,
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(CONSUMER, consumer_config.clone())
            .await
            .nats_ctx(|| "webhook consumer".into())?;
        let info = consumer.info().await?.config.clone();
        if info.ack_wait != consumer_config.ack_wait
            || info.max_deliver != consumer_config.max_deliver
            || info.max_ack_pending != consumer_config.max_ack_pending
        {
            // A config change (a longer timeout): ack_wait must keep
            // exceeding it.
            consumer = stream
                .update_consumer(consumer_config)
                .await
                .nats_ctx(|| "update webhook consumer".into())?;
        }
        Ok(Self {
            js,
            names: names.clone(),
            stream,
            consumer,
        })
    }

    pub fn consumer(&self) -> &PullConsumer {
        &self.consumer
    }

    /// Publishes one delivery with `msg_id` as `Nats-Msg-Id`; true when the
    /// server reported it a duplicate (already enqueued).
    pub async fn publish(
        &self,
        job: &Job,
        body: Bytes,
        msg_id: &str,
    ) -> crate::error::Result<bool> {
        let subject = subject(&self.names, &job.endpoint_id, &job.webhook_id);
        let ack = self
            .js
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(body)
                    .headers(job.headers())
                    .message_id(msg_id),
            )
            .await?
            .await?;
        Ok(ack.duplicate)
    }

    /// The queued body and job of a delivery, while the stream retains it.
    pub async fn find(
        &self,
        endpoint_id: &str,
        delivery_id: &str,
    ) -> crate::error::Result<Option<(Job, Bytes)>> {
        use jetstream::stream::LastRawMessageErrorKind as K;
        let subject = subject(&self.names, endpoint_id, delivery_id);
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Job::from_headers(Some(&m.headers)).map(|job| (job, m.payload))),
            Err(e) if matches!(e.kind(), K::NoMessageFound) => Ok(None),
            Err(e) => Err(Error::nats("look up a queued webhook delivery", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_deterministic_per_endpoint() {
        let a = delivery_id("ep_1", "quota.warning:acme:7");
        assert_eq!(a, delivery_id("ep_1", "quota.warning:acme:7"));
        assert_ne!(a, delivery_id("ep_2", "quota.warning:acme:7"));
        assert_ne!(a, delivery_id("ep_1", "quota.warning:acme:8"));
        assert!(a.starts_with("msg_"));
        assert!(!a.contains('.'));
    }

    #[test]
    fn job_headers_round_trip() {
        let job = Job {
            webhook_id: "msg_x".into(),
            tenant_id: "acme".into(),
            endpoint_id: "ep_y".into(),
            event_type: "quota.warning".into(),
            attempt_base: 3,
        };
        assert_eq!(Job::from_headers(Some(&job.headers())), Some(job));
        assert_eq!(Job::from_headers(None), None);
    }

    #[test]
    fn subjects_stay_under_the_filter() {
        let names = Names::namespaced("t1");
        let s = subject(&names, "ep_1", "msg_2");
        assert!(s.starts_with(names.webhooks_filter().trim_end_matches('>')));
    }
}
