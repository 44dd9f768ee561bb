//! ClickHouse rows, one struct per storage table, written as RowBinary.
//!
//! Field order and names are the insert's column list (validation is off for
//! 18.16, so they must match the DDL in `tollgate_schemas::migrations`).
//! `DateTime('UTC')` is seconds since the epoch as `u32`; `Decimal(38, 12)` is
//! an `i128` scaled by 10^12 ([`tollgate_schemas::money::to_ch_decimal`]).

use clickhouse::Row;
use serde::Serialize;

/// A row of `usage_events` (read through the `usage` view).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct UsageRow {
    pub event_id: String,
    pub occurred_at: u32,
    pub tenant_id: String,
    pub key_id: String,
    pub request_id: String,
    pub api: String,
    pub requested_model: String,
    pub model: String,
    pub provider: String,
    pub deployment: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost: i128,
    pub price_version: u64,
    pub estimated: bool,
    pub streamed: bool,
    pub status: u16,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub retries: u32,
    pub schema_version: String,
    pub stream_seq: u64,
    pub inserted_at: u32,
}

/// A row of `request_events` (read through the `requests` view).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct RequestRow {
    pub event_id: String,
    pub occurred_at: u32,
    pub tenant_id: String,
    pub key_id: String,
    pub request_id: String,
    pub api: String,
    pub method: String,
    pub route: String,
    pub model: Option<String>,
    pub status: u16,
    pub error_type: Option<String>,
    pub streamed: bool,
    pub latency_ms: u64,
    pub deployment: Option<String>,
    pub schema_version: String,
    pub stream_seq: u64,
    pub inserted_at: u32,
}

/// A row of `token_count_events` (read through the `token_counts` view).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize)]
pub struct TokenCountRow {
    pub event_id: String,
    pub occurred_at: u32,
    pub tenant_id: String,
    pub key_id: String,
    pub request_id: String,
    pub api: String,
    pub model: String,
    pub input_tokens: u64,
    pub source: String,
    pub schema_version: String,
    pub stream_seq: u64,
    pub inserted_at: u32,
}

/// The storage tables the meter writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    Usage,
    Request,
    TokenCount,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Usage, Table::Request, Table::TokenCount];

    pub fn name(self) -> &'static str {
        match self {
            Table::Usage => "usage_events",
            Table::Request => "request_events",
            Table::TokenCount => "token_count_events",
        }
    }
}
