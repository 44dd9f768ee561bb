//! The delivery log: one row per attempt in `webhook_deliveries`
//! (ReplacingMergeTree keyed by tenant, delivery id and attempt number, so a
//! row written twice is one row).
//!
//! Attempts are logged after the message is settled (acked, naked or
//! terminated): the log never holds up a delivery. Rows go through a bounded
//! channel to one writer that batches them (up to 500 rows or 500 ms) and
//! retries a failed insert a few times; on shutdown it drains what is left.

use std::time::Duration;

use chrono::{DateTime, TimeZone as _, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const TABLE: &str = "webhook_deliveries";
const BATCH: usize = 500;
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// How one attempt ended. Also the `outcome` label of
/// `tollgate_billing_webhook_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// 2xx: acked.
    Delivered,
    /// Anything else: naked with a backoff, to be retried.
    Failed,
    /// 410 Gone: the endpoint is disabled, the message terminated.
    Gone,
    /// Failed and older than `max_age`: terminated.
    Expired,
    /// The endpoint was deleted or disabled: terminated without sending.
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Failed => "failed",
            Outcome::Gone => "gone",
            Outcome::Expired => "expired",
            Outcome::Skipped => "skipped",
        }
    }
}

/// A row of `webhook_deliveries` (columns in DDL order; validation is off).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub(crate) struct DeliveryRow {
    pub delivery_id: String,
    pub attempt: u32,
    pub endpoint_id: String,
    pub tenant_id: String,
    pub event_type: String,
    /// `DateTime('UTC')`: seconds since the epoch.
    pub attempted_at: u32,
    /// 0 when no response arrived.
    pub status_code: u16,
    pub outcome: String,
    pub error: String,
    pub next_attempt_at: Option<u32>,
}

pub(crate) fn ch_time(t: DateTime<Utc>) -> u32 {
    u32::try_from(t.timestamp().max(0)).unwrap_or(u32::MAX)
}

fn rfc3339(secs: u32) -> Value {
    match Utc.timestamp_opt(i64::from(secs), 0).single() {
        Some(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        None => Value::Null,
    }
}

impl DeliveryRow {
    /// The API's view of one attempt.
    pub fn view(&self) -> Value {
        json!({
            "delivery_id": self.delivery_id,
            "attempt": self.attempt,
            "endpoint_id": self.endpoint_id,
            "event_type": self.event_type,
            "attempted_at": rfc3339(self.attempted_at),
            "status_code": self.status_code,
            "outcome": self.outcome,
            "error": self.error,
            "next_attempt_at": self.next_attempt_at.map(rfc3339),
        })
    }
}

/// The sending half: cheap to clone, one per in-flight attempt.
#[derive(Clone)]
pub(crate) struct LogSender(mpsc::Sender<DeliveryRow>);

impl LogSender {
    pub async fn send(&self, row: DeliveryRow) {
        if self.0.send(row).await.is_err() {
            tracing::warn!("webhook delivery log writer is gone; attempt not logged");
        }
    }
}

/// Starts the writer; it ends once every sender is dropped and the rows are
/// flushed.
pub(crate) fn writer(ch: clickhouse::Client) -> (LogSender, impl Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(4_096);
    (LogSender(tx), write_loop(ch, rx))
}

async fn write_loop(ch: clickhouse::Client, mut rx: mpsc::Receiver<DeliveryRow>) {
    let mut buf = Vec::with_capacity(BATCH);
    loop {
        buf.clear();
        if rx.recv_many(&mut buf, BATCH).await == 0 {
            return;
        }
        // Gather a little more so a burst is one insert.
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while buf.len() < BATCH {
            let room = BATCH - buf.len();
            match tokio::time::timeout_at(deadline, rx.recv_many(&mut buf, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        insert_with_retry(&ch, &buf).await;
    }
}

async fn insert_with_retry(ch: &clickhouse::Client, rows: &[DeliveryRow]) {
    let mut wait = Duration::from_millis(200);
    for attempt in 1..=5 {
        match insert(ch, rows).await {
            Ok(()) => return,
            Err(e) if attempt == 5 => {
                tracing::error!(rows = rows.len(), error = %e, "webhook delivery log insert failed; attempts not logged");
            }
            Err(e) => {
                tracing::warn!(rows = rows.len(), error = %e, "webhook delivery log insert failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

async fn insert(ch: &clickhouse::Client, rows: &[DeliveryRow]) -> clickhouse::error::Result<()> {
    let mut insert = ch
        .insert::<DeliveryRow>(TABLE)
        .await?
        .with_timeouts(Some(Duration::from_secs(10)), Some(Duration::from_secs(30)));
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// Attempts to one endpoint, newest first.
pub(crate) async fn list(
    ch: &clickhouse::Client,
    tenant_id: &str,
    endpoint_id: &str,
    delivery_id: Option<&str>,
    limit: u64,
) -> clickhouse::error::Result<Vec<DeliveryRow>> {
    let by_delivery = if delivery_id.is_some() {
        " AND delivery_id = ?"
    } else {
        ""
    };
    let sql = format!(
        "SELECT ?fields FROM {TABLE} FINAL
         WHERE tenant_id = ? AND endpoint_id = ?{by_delivery}
         ORDER BY attempted_at DESC, delivery_id DESC, attempt DESC
         LIMIT ?"
    );
    let mut q = ch.query(&sql).bind(tenant_id).bind(endpoint_id);
    if let Some(d) = delivery_id {
        q = q.bind(d);
    }
    q.bind(limit).fetch_all::<DeliveryRow>().await
}

/// What the log knows of one delivery of a tenant.
pub(crate) struct Known {
    pub endpoint_id: String,
    pub last_attempt: u32,
    pub last_outcome: String,
}

pub(crate) async fn lookup(
    ch: &clickhouse::Client,
    tenant_id: &str,
    delivery_id: &str,
) -> clickhouse::error::Result<Option<Known>> {
    let rows: Vec<(String, u32, String)> = ch
        .query(&format!(
            "SELECT endpoint_id, max(attempt), argMax(outcome, attempt) FROM {TABLE} FINAL
             WHERE tenant_id = ? AND delivery_id = ?
             GROUP BY endpoint_id"
        ))
        .bind(tenant_id)
        .bind(delivery_id)
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .max_by_key(|r| r.1)
        .map(|(endpoint_id, last_attempt, last_outcome)| Known {
            endpoint_id,
            last_attempt,
            last_outcome,
        }))
}
