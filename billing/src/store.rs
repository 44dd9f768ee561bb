//! Billing's durable records and where they live.
//!
//! - JetStream KV, bucket `names.kv_billing`: tenants (`tenant.<id>`), credit
//!   grants (`grant.<id>`), finalized and void invoices (`invoice.<id>`), and
//!   webhook endpoints (`webhook.<id>`, see [`crate::webhooks`]).
//! - JetStream KV, `names.kv_keys`: API keys by secret hash (read by gateways).
//! - JetStream KV, `names.kv_prices`: one key per price-book version.
//! - JetStream KV, `names.kv_quota`: quota snapshots (read by gateways).
//! - ClickHouse: the ledger (grants, debits, expiries) and the invoices, for
//!   finance. Grants are written to both; the KV copy is the source and is
//!   re-inserted into ClickHouse at start (idempotent), so an emptied
//!   ClickHouse is rebuilt by replaying the stream.

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use clickhouse::Row;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::invoice::Line;

/// Prepaid tenants stop at zero credit; postpaid ones are invoiced, with an
/// optional monthly spend limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingMode {
    Prepaid,
    Postpaid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub billing: BillingMode,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub monthly_limit: Option<Decimal>,
    /// Start of the open (draft) invoice's period.
    pub period_start: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvoiceStatus {
    Draft,
    Finalized,
    Void,
}

impl InvoiceStatus {
    pub fn as_i8(self) -> i8 {
        match self {
            InvoiceStatus::Draft => 1,
            InvoiceStatus::Finalized => 2,
            InvoiceStatus::Void => 3,
        }
    }
}

/// An invoice as the API serves it and the KV keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    pub id: String,
    pub tenant_id: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub status: InvoiceStatus,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub subtotal: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub credits_applied: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
    pub lines: Vec<Line>,
    #[serde(default)]
    pub finalized_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub voided_at: Option<DateTime<Utc>>,
}

/// Reads a JSON record; `None` when absent or deleted.
pub async fn get_json<T: DeserializeOwned>(
    store: &kv::Store,
    key: &str,
) -> crate::error::Result<Option<T>> {
    match store.get(key).await? {
        Some(bytes) if !bytes.is_empty() => Ok(Some(serde_json::from_slice(&bytes)?)),
        _ => Ok(None),
    }
}

pub async fn put_json<T: Serialize>(
    store: &kv::Store,
    key: &str,
    value: &T,
) -> crate::error::Result<u64> {
    Ok(store.put(key, serde_json::to_vec(value)?.into()).await?)
}

/// Every record whose key starts with `prefix`.
pub async fn list_json<T: DeserializeOwned>(
    store: &kv::Store,
    prefix: &str,
) -> crate::error::Result<Vec<(String, T)>> {
    let mut keys = store.keys().await?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if !key.starts_with(prefix) {
            continue;
        }
        if let Some(v) = get_json::<T>(store, &key).await? {
            out.push((key, v));
        }
    }
    Ok(out)
}

/// `DateTime('UTC')` in RowBinary: seconds since the epoch.
pub fn ch_time(t: DateTime<Utc>) -> u32 {
    u32::try_from(t.timestamp().max(0)).unwrap_or(u32::MAX)
}

/// A row of `ledger_entries` (finance reads the `ledger` view).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct LedgerRow {
    pub entry_id: String,
    pub tenant_id: String,
    /// Enum8: grant = 1, debit = 2, expiry = 3, adjustment = 4.
    pub kind: i8,
    /// Decimal(38, 12): grants positive, debits and expiries negative.
    pub amount: i128,
    pub occurred_at: u32,
    pub grant_id: String,
    pub key_id: String,
    pub event_id: String,
    pub price_version: u64,
    pub note: String,
    pub version: u64,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

pub const KIND_GRANT: i8 = 1;
pub const KIND_DEBIT: i8 = 2;
pub const KIND_EXPIRY: i8 = 3;

/// A row of `invoices_store` (finance reads the `invoices` view).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct InvoiceRow {
    pub invoice_id: String,
    pub tenant_id: String,
    pub period_start: u32,
    pub period_end: u32,
    pub status: i8,
    pub currency: String,
    pub subtotal: i128,
    pub credits_applied: i128,
    pub total: i128,
    pub finalized_at: Option<u32>,
    pub version: u64,
}

/// A row of `invoice_lines_v2` (finance reads the `invoice_lines` view).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct InvoiceLineRow {
    pub invoice_id: String,
    pub tenant_id: String,
    pub line_no: u32,
    pub model: String,
    pub token_kind: String,
    pub quantity: u64,
    pub unit_price: i128,
    pub amount: i128,
    pub price_version: u64,
    pub version: u64,
}
