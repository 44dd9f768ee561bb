//! The delivery worker: pull, attempt, settle, log.
//!
//! # Settling a message
//!
//! | result of the attempt                  | JetStream                 | logged as   |
//! |----------------------------------------|---------------------------|-------------|
//! | 2xx                                    | ack                       | `delivered` |
//! | 410 Gone                               | term; endpoint disabled   | `gone`      |
//! | endpoint deleted or disabled           | term, nothing sent        | `skipped`   |
//! | anything else, younger than `max_age`  | nak with a delay          | `failed`    |
//! | anything else, older than `max_age`    | term                      | `expired`   |
//!
//! The delay after failed attempt `n` is `backoff_base * 2^(n-1)` with ±20 %
//! jitter, capped at `backoff_max`, or the response's `Retry-After` (seconds)
//! when that is longer. `n` is JetStream's delivery count, which the durable
//! consumer keeps across restarts, so a restarted worker continues the
//! schedule. The delay is a nak with a delay (`-NAK {"delay": ns}`), which
//! nats-server 2.9 honours: the message stays pending on the consumer and is
//! redelivered when the delay is up (the tests check the spacing).
//!
//! # Concurrency
//!
//! At most [`MAX_IN_FLIGHT`] attempts run at once, and at most
//! [`PER_ENDPOINT`] to one endpoint, so a slow endpoint (every attempt running
//! to the timeout) takes a bounded share and the others keep flowing. A
//! delivery to an endpoint already at its limit is naked for about one
//! timeout without being attempted or logged; that counts as a delivery for
//! JetStream, so it also lengthens the delivery's later backoff (fitting: the
//! endpoint is saturated) and leaves a gap in its attempt numbers.
//!
//! The worker only pulls as many messages as it has free slots, so no message
//! waits in a local buffer while its `ack_wait` runs.
//!
//! # Shutdown
//!
//! Cancel → stop pulling → let the attempts in flight finish (each is bounded
//! by the timeout) and settle their messages → flush the delivery log. A
//! message pulled but never settled is redelivered after `ack_wait`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use rand::Rng as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::endpoint::Endpoint;
use super::log::{self, DeliveryRow, LogSender, Outcome};
use super::queue::Job;
use super::{Inner, WebhookConfig, guard};

/// Attempts in flight at once, over all endpoints.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Attempts in flight at once to one endpoint.
pub(crate) const PER_ENDPOINT: usize = 8;
/// How long one pull request waits for messages.
const PULL_WAIT: Duration = Duration::from_secs(5);
/// How long a delivery whose endpoint store read failed waits.
const STORE_RETRY: Duration = Duration::from_secs(5);
/// Bytes of a failed response's body kept in the log.
const SNIPPET: usize = 256;

pub(crate) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) {
    let (log, writer) = log::writer(inner.ch.clone());
    let writer = tokio::spawn(writer);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let busy = Busy::default();
    let tracker = TaskTracker::new();
    tracing::info!("webhook delivery worker started");

    'pull: loop {
        let first = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let want = 1 + slots.available_permits();
        let batch = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            b = inner.queue.consumer().batch().max_messages(want).expires(PULL_WAIT).messages() => b,
        };
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "webhook queue pull failed; retrying");
                drop(first);
                if !sleep_unless_cancelled(Duration::from_secs(1), &shutdown).await {
                    break;
                }
                continue;
            }
        };
        let mut first = Some(first);
        let mut received = 0usize;
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => break 'pull,
                n = tokio::time::timeout(PULL_WAIT * 2, batch.next()) => n,
            };
            let msg = match next {
                Err(_) | Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "webhook queue pull interrupted");
                    if received == 0
                        && !sleep_unless_cancelled(Duration::from_secs(1), &shutdown).await
                    {
                        break 'pull;
                    }
                    break;
                }
                Ok(Some(Ok(m))) => m,
            };
            received += 1;
            let permit = match first.take() {
                Some(p) => p,
                None => match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break 'pull,
                },
            };
            tracker.spawn(deliver(
                inner.clone(),
                msg,
                permit,
                busy.clone(),
                log.clone(),
            ));
        }
    }

    tracker.close();
    let drain = inner.config.timeout + Duration::from_secs(10);
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!("webhook attempts still running at shutdown; they will be redelivered");
    }
    drop(log);
    if let Err(e) = writer.await {
        tracing::error!(error = %e, "webhook delivery log writer failed");
    }
    tracing::info!("webhook delivery worker stopped");
}

async fn sleep_unless_cancelled(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = cancel.cancelled() => false,
    }
}

/// One message: attempt it, settle it, log it.
async fn deliver(
    inner: Arc<Inner>,
    msg: jetstream::Message,
    _permit: OwnedSemaphorePermit,
    busy: Busy,
    log: LogSender,
) {
    let Some(job) = Job::from_headers(msg.headers.as_ref()) else {
        tracing::warn!(subject = %msg.subject, "webhook message without delivery headers; terminated");
        settle(&msg, AckKind::Term).await;
        return;
    };
    let span = tracing::info_span!(
        "webhook_delivery",
        tenant_id = %job.tenant_id,
        endpoint_id = %job.endpoint_id,
        delivery_id = %job.webhook_id,
        attempt = tracing::field::Empty,
    );
    async move {
        let Some(_slot) = busy.enter(&job.endpoint_id) else {
            settle(&msg, AckKind::Nak(Some(defer_delay(&inner.config)))).await;
            return;
        };
        let now = Utc::now();
        let (delivered, published) = match msg.info() {
            Ok(i) => (
                u64::try_from(i.delivered).unwrap_or(1).max(1),
                i.published.unix_timestamp(),
            ),
            Err(_) => (1, now.timestamp()),
        };
        let attempt = job
            .attempt_base
            .saturating_add(u32::try_from(delivered).unwrap_or(u32::MAX));
        tracing::Span::current().record("attempt", attempt);
        let age = Duration::from_secs(u64::try_from(now.timestamp() - published).unwrap_or(0));
        let mut row = DeliveryRow {
            delivery_id: job.webhook_id.clone(),
            attempt,
            endpoint_id: job.endpoint_id.clone(),
            tenant_id: job.tenant_id.clone(),
            event_type: job.event_type.clone(),
            attempted_at: log::ch_time(now),
            status_code: 0,
            outcome: String::new(),
            error: String::new(),
            next_attempt_at: None,
        };

        let endpoint = match inner.endpoints.get(&job.endpoint_id).await {
            Ok(ep) => ep.filter(|ep| ep.tenant_id == job.tenant_id),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "webhook endpoint read failed; delivery postponed");
                settle(&msg, AckKind::Nak(Some(STORE_RETRY))).await;
                return;
            }
        };
        let (outcome, ack) = match endpoint {
            None => {
                row.error = "endpoint deleted".into();
                (Outcome::Skipped, AckKind::Term)
            }
            Some(ep) if !ep.enabled => {
                row.error = "endpoint disabled".into();
                (Outcome::Skipped, AckKind::Term)
            }
            Some(ep) => attempt_once(&inner, &ep, &job, &msg.payload, delivered, age, &mut row).await,
        };
        settle(&msg, ack).await;
        row.outcome = outcome.as_str().to_owned();
        metrics::counter!("tollgate_billing_webhook_deliveries_total", "outcome" => outcome.as_str())
            .increment(1);
        match outcome {
            Outcome::Delivered => tracing::info!(status = row.status_code, "webhook delivered"),
            _ => tracing::info!(
                outcome = outcome.as_str(),
                status = row.status_code,
                error = %row.error,
                "webhook not delivered"
            ),
        }
        log.send(row).await;
    }
    .instrument(span)
    .await;
}

/// Sends once and decides how to settle.
async fn attempt_once(
    inner: &Inner,
    ep: &Endpoint,
    job: &Job,
    body: &Bytes,
    delivered: u64,
    age: Duration,
    row: &mut DeliveryRow,
) -> (Outcome, AckKind) {
    let started = Instant::now();
    let reply = send(inner, ep, job, body).await;
    metrics::histogram!("tollgate_billing_webhook_attempt_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    row.status_code = reply.status;
    row.error = reply.error;
    if (200..300).contains(&reply.status) {
        return (Outcome::Delivered, AckKind::Ack);
    }
    if reply.status == 410 {
        let disabled = inner
            .endpoints
            .modify(&ep.tenant_id, &ep.id, |e| {
                e.enabled = false;
                e.disabled_reason = Some("gone".into());
            })
            .await;
        match disabled {
            Ok(_) => tracing::warn!("endpoint answered 410 Gone; disabled"),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "endpoint answered 410 Gone but could not be disabled");
            }
        }
        return (Outcome::Gone, AckKind::Term);
    }
    if age >= inner.config.max_age {
        return (Outcome::Expired, AckKind::Term);
    }
    let delay = next_delay(&inner.config, delivered, reply.retry_after);
    row.next_attempt_at = chrono::Duration::from_std(delay)
        .ok()
        .map(|d| log::ch_time(Utc::now() + d));
    (Outcome::Failed, AckKind::Nak(Some(delay)))
}

async fn settle(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        tracing::warn!(error = %e, "webhook message not settled; it will be redelivered");
    }
}

/// What one POST came to. `status` is 0 when no response arrived.
struct Reply {
    status: u16,
    retry_after: Option<Duration>,
    error: String,
}

impl Reply {
    fn failed(error: impl Into<String>) -> Self {
        Self {
            status: 0,
            retry_after: None,
            error: error.into(),
        }
    }
}

/// POSTs the body, signed with the endpoint's current secret at the current
/// time. Never logs the secret or the URL (a URL may carry a token).
async fn send(inner: &Inner, ep: &Endpoint, job: &Job, body: &Bytes) -> Reply {
    let url = match guard::parse_url(&ep.url) {
        Ok(u) => u,
        Err(e) => return Reply::failed(e.0),
    };
    if let Err(e) = guard::check_literal(&url, inner.config.allow_private) {
        return Reply::failed(e.0);
    }
    let timestamp = Utc::now().timestamp();
    let signature = match standardwebhooks::Webhook::new(&ep.secret)
        .and_then(|w| w.sign(&job.webhook_id, timestamp, body))
    {
        Ok(s) => s,
        Err(_) => return Reply::failed("cannot sign with the endpoint's secret"),
    };
    let request = inner
        .http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", job.webhook_id.as_str())
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.clone());
    let deadline = Instant::now() + inner.config.timeout;
    let response = match tokio::time::timeout_at(deadline, request.send()).await {
        Err(_) => return Reply::failed("timed out"),
        Ok(Err(e)) => return Reply::failed(describe(&e)),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let error = if status.is_success() {
        String::new()
    } else {
        let mut response = response;
        let snippet = match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let end = chunk.len().min(SNIPPET);
                String::from_utf8_lossy(&chunk[..end]).trim().to_owned()
            }
            _ => String::new(),
        };
        if snippet.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {snippet}", status.as_u16())
        }
    };
    Reply {
        status: status.as_u16(),
        retry_after,
        error,
    }
}

/// A transport error without its URL: the kind, then the causes.
fn describe(e: &reqwest::Error) -> String {
    let mut out = String::from(if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connect error"
    } else {
        "request error"
    });
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `backoff_base * 2^(delivered-1)`, capped, scaled by `1 + jitter`, capped.
pub(crate) fn backoff(config: &WebhookConfig, delivered: u64, jitter: f64) -> Duration {
    let exp = u32::try_from(delivered.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(31);
    let raw = config
        .backoff_base
        .saturating_mul(2u32.saturating_pow(exp))
        .min(config.backoff_max);
    raw.mul_f64((1.0 + jitter).max(0.0)).min(config.backoff_max)
}

/// The backoff with jitter, or `Retry-After` when longer (never beyond
/// `max_age`: by then the delivery expires anyway).
pub(crate) fn next_delay(
    config: &WebhookConfig,
    delivered: u64,
    retry_after: Option<Duration>,
) -> Duration {
    let jitter = rand::rng().random_range(-0.2..=0.2);
    let delay = backoff(config, delivered, jitter);
    match retry_after {
        Some(r) => delay.max(r.min(config.max_age)),
        None => delay,
    }
}

/// How long a delivery to a saturated endpoint waits: about one attempt.
fn defer_delay(config: &WebhookConfig) -> Duration {
    config
        .timeout
        .min(Duration::from_secs(10))
        .mul_f64(rand::rng().random_range(0.5..1.5))
}

/// Attempts in flight per endpoint.
#[derive(Clone, Default)]
struct Busy(Arc<Mutex<HashMap<String, usize>>>);

struct Slot {
    busy: Busy,
    endpoint_id: String,
}

impl Busy {
    fn enter(&self, endpoint_id: &str) -> Option<Slot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(endpoint_id.to_owned()).or_insert(0);
        if *n >= PER_ENDPOINT {
            return None;
        }
        *n += 1;
        Some(Slot {
            busy: self.clone(),
            endpoint_id: endpoint_id.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.busy.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.endpoint_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.endpoint_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> WebhookConfig {
        WebhookConfig {
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(3600),
            ..WebhookConfig::default()
        }
    }

    #[test]
    fn backoff_doubles_then_caps() {
        let c = config();
        assert_eq!(backoff(&c, 1, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&c, 2, 0.0), Duration::from_secs(10));
        assert_eq!(backoff(&c, 3, 0.0), Duration::from_secs(20));
        assert_eq!(backoff(&c, 11, 0.0), Duration::from_secs(3600));
        assert_eq!(backoff(&c, 10_000, 0.0), Duration::from_secs(3600));
        assert_eq!(backoff(&c, 10_000, 0.2), Duration::from_secs(3600));
        assert_eq!(backoff(&c, 1, 0.2), Duration::from_secs(6));
        assert_eq!(backoff(&c, 1, -0.2), Duration::from_secs(4));
        assert_eq!(backoff(&c, 0, 0.0), Duration::from_secs(5));
    }

    #[test]
    fn retry_after_wins_when_longer() {
        let c = config();
        assert!(next_delay(&c, 1, Some(Duration::from_secs(60))) >= Duration::from_secs(60));
        assert!(next_delay(&c, 1, Some(Duration::from_secs(1))) <= Duration::from_secs(6));
        let huge = next_delay(&c, 1, Some(Duration::from_secs(u64::MAX / 4)));
        assert_eq!(huge, c.max_age);
    }

    #[test]
    fn endpoints_have_bounded_slots() {
        let busy = Busy::default();
        let slots: Vec<_> = (0..PER_ENDPOINT).filter_map(|_| busy.enter("a")).collect();
        assert_eq!(slots.len(), PER_ENDPOINT);
        assert!(busy.enter("a").is_none());
        assert!(busy.enter("b").is_some());
        drop(slots);
        assert!(busy.enter("a").is_some());
        assert!(busy.0.lock().unwrap().is_empty());
    }
}
