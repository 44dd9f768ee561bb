//! Webhooks to tenants: endpoints, a durable delivery queue, signed attempts
//! with retries, and a log of every attempt.
//!
//! # The path of one event
//!
//! 1. [`Webhooks::emit`] fans an event out to every enabled endpoint of the
//!    tenant that subscribes to its type. Each (event, endpoint) pair is one
//!    *delivery*, published to the JetStream stream `names.webhooks_stream`
//!    on `<root>.webhooks.<endpoint_id>.<delivery_id>` with the exact body the
//!    receiver will get. Nothing is sent from `emit` itself.
//! 2. [`Webhooks::run`] pulls deliveries from a durable consumer and POSTs
//!    them, signed per the Standard Webhooks spec with the endpoint's
//!    *current* secret, and acks, naks with a delay, or terminates the message
//!    (see `worker`). Every attempt is written to ClickHouse
//!    (`webhook_deliveries`), which the admin API reads.
//!
//! # Idempotency: why one emit is one delivery
//!
//! The delivery id (`webhook-id`) is a UUIDv5 of the endpoint id and the
//! caller's idempotency key, so it is a pure function of *what* is being
//! delivered and *to whom*. It is also the JetStream `Nats-Msg-Id`: a second
//! emit with the same key inside the stream's duplicate window (one day) is
//! dropped by the server, and one outside it still carries the same
//! `webhook-id`, which receivers deduplicate on (the spec's contract). A
//! redelivery requested through the admin API republishes the same body and
//! `webhook-id` under a fresh `Nats-Msg-Id`, so the dedup window does not
//! swallow it.
//!
//! # Why the subject carries the delivery id
//!
//! The ClickHouse log has no room for the body, and the body must be
//! byte-identical on redelivery (it is signed). The stream keeps every
//! delivery (limits retention, `max_age` + one day), so the admin API finds
//! a delivery's body with a last-message-by-subject lookup.
//!
//! # Safety of destinations
//!
//! Unless `allow_private`, an endpoint may not point at a private, loopback,
//! link-local, unspecified or multicast address: checked on the literal host
//! and on its DNS answers when the endpoint is created, and again at every
//! attempt (literal hosts before sending; names through a resolver that drops
//! non-public answers, so a DNS answer that changed since creation, or a
//! rebinding attack, cannot reach the internal network). Redirects are not
//! followed and proxies from the environment are not used.
//!
//! Secrets (`whsec_...`) live in the KV record because signing needs them;
//! they are shown by the API only on creation and rotation, and are never
//! logged (the record's `Debug` redacts them).

mod api;

/// The admin API's state (opaque outside the module).
pub(crate) use api::Api as AdminApi;

/// The admin routes, stateless, for [`crate::admin`]'s tables.
pub(crate) fn admin_api_routes() -> crate::routes::Routes<AdminApi> {
    api::routes()
}
mod endpoint;
mod guard;
mod log;
mod queue;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use crate::error::ConfigError;
use crate::error::{Error, ResultExt as _};
use async_nats::jetstream;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tollgate_schemas::Names;

use self::endpoint::Endpoints;
use self::queue::{Job, Queue};

/// The event types an endpoint may subscribe to (and `emit` accepts).
pub const EVENT_TYPES: [&str; 5] = [
    "quota.warning",
    "quota.exhausted",
    "quota.restored",
    "credits.granted",
    "invoice.finalized",
];

/// Whether `event_type` is one Tollgate sends.
pub fn is_event_type(event_type: &str) -> bool {
    EVENT_TYPES.contains(&event_type)
}

/// How deliveries are attempted and retried.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Allow endpoints on private, loopback and link-local addresses: false
    /// in production; true in the local stack and tests.
    pub allow_private: bool,
    /// Per attempt (connect, send, response headers).
    pub timeout: Duration,
    /// A delivery still failing this long after it was enqueued is given up
    /// (outcome `expired`).
    pub max_age: Duration,
    /// Attempt `n` failing waits `backoff_base * 2^(n-1)` (±20 % jitter)...
    pub backoff_base: Duration,
    /// ...capped at this.
    pub backoff_max: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(3 * 86_400),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3_600),
        }
    }
}

impl WebhookConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_owned(),
            })
        };
        if self.timeout.is_zero() {
            return invalid(
                "webhooks.timeout_secs",
                "webhooks: timeout must be positive",
            );
        }
        if self.max_age.is_zero() {
            return invalid(
                "webhooks.max_age_secs",
                "webhooks: max_age must be positive",
            );
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return invalid(
                "webhooks.backoff_base_ms",
                "webhooks: need 0 < backoff_base <= backoff_max",
            );
        }
        Ok(())
    }
}

/// The webhook subsystem: emit events, run the delivery worker, serve the
/// admin routes. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Endpoints,
    queue: Queue,
    /// On the billing database.
    ch: clickhouse::Client,
    http: reqwest::Client,
    config: WebhookConfig,
}

impl Webhooks {
    /// Opens (creating when missing) the endpoint records in the billing KV
    /// bucket, the delivery stream and its durable consumer.
    pub async fn open(
        js: jetstream::Context,
        names: &Names,
        ch: clickhouse::Client,
        db: &str,
        config: WebhookConfig,
    ) -> crate::error::Result<Self> {
        config.validate()?;
        let kv = tollgate_schemas::kv::ensure(&js, &names.kv_billing, 1)
            .await
            .nats_ctx(|| "open the billing KV bucket".into())?;
        let endpoints = Endpoints::new(js.clone(), kv);
        let queue = Queue::open(js, names, &config).await?;
        let http = guard::http_client(&config)?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoints,
                queue,
                ch: ch.with_database(db),
                http,
                config,
            }),
        })
    }

    /// Fans an event out: one delivery per endpoint of the tenant that is
    /// enabled and subscribed to `event_type`. `data` must be a JSON object;
    /// its `tenant_id` is set to `tenant_id` when missing (and must equal it
    /// when present). Emitting again with the same `idempotency_key` enqueues
    /// nothing new within the stream's duplicate window, and never produces a
    /// different `webhook-id`.
    #[tracing::instrument(skip_all, fields(tenant_id, event_type))]
    pub async fn emit(
        &self,
        tenant_id: &str,
        event_type: &str,
        data: Value,
        idempotency_key: &str,
    ) -> crate::error::Result<()> {
        if !is_event_type(event_type) {
            return Err(Error::bug(format!(
                "unknown webhook event type {event_type:?}"
            )));
        }
        let Value::Object(mut data) = data else {
            return Err(Error::bug("webhook event data must be a JSON object"));
        };
        match data.get("tenant_id") {
            None => {
                data.insert("tenant_id".into(), Value::String(tenant_id.to_owned()));
            }
            Some(Value::String(t)) if t == tenant_id => {}
            Some(_) => return Err(Error::bug("webhook event data names another tenant_id")),
        }
        let targets: Vec<_> = self
            .inner
            .endpoints
            .list_tenant(tenant_id)
            .await?
            .into_iter()
            .filter(|e| e.enabled && e.subscribed(event_type))
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_vec(&json!({
            "type": event_type,
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "data": data,
        }))?;
        let body = bytes::Bytes::from(body);
        // Publish to every endpoint before reporting a failure: the caller's
        // retry is safe (same delivery ids), and one bad publish must not
        // starve the other endpoints.
        let mut first_error = None;
        for ep in targets {
            let job = Job {
                webhook_id: queue::delivery_id(&ep.id, idempotency_key),
                tenant_id: tenant_id.to_owned(),
                endpoint_id: ep.id.clone(),
                event_type: event_type.to_owned(),
                attempt_base: 0,
            };
            let msg_id = job.webhook_id.clone();
            match self.inner.queue.publish(&job, body.clone(), &msg_id).await {
                Ok(duplicate) => tracing::debug!(
                    endpoint_id = %job.endpoint_id,
                    delivery_id = %job.webhook_id,
                    duplicate,
                    "webhook enqueued"
                ),
                Err(e) => {
                    tracing::warn!(endpoint_id = %job.endpoint_id, error = %format!("{e:#}"), "webhook enqueue failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs the delivery worker until `shutdown`, then lets the attempts in
    /// flight finish (each is bounded by the timeout) and flushes the log.
    pub async fn run(self, shutdown: CancellationToken) {
        worker::run(self.inner, shutdown).await;
    }

    /// The admin routes, with full paths (`/admin/tenants/{id}/webhooks...`);
    /// merge them into a router that already enforces the master key.
    /// `tenant_exists` gates every route (404 when false).
    pub fn admin_router(
        &self,
        tenant_exists: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> axum::Router {
        self.admin_routes(api::routes(), tenant_exists)
            .into_router()
    }

    /// `routes` (from [`api::routes`]) given their state, keeping their list.
    pub(crate) fn admin_routes(
        &self,
        routes: crate::routes::Routes<api::Api>,
        tenant_exists: Arc<dyn Fn(&str) -> bool + Send + Sync>,
    ) -> crate::routes::Routes {
        routes.with_state(api::state(self.inner.clone(), tenant_exists))
    }
}
