//! ClickHouse migrations: one numbered list, the single source of truth.
//!
//! Rules, so that applying twice equals applying once and every step runs on
//! both Debian's ClickHouse 18.16 and current ClickHouse:
//! - steps are never edited or deleted once released; a change is a new step;
//! - every statement is idempotent (`IF NOT EXISTS`; a column is added only
//!   after `system.columns` says it is missing, since 18.16 has no
//!   `ADD COLUMN IF NOT EXISTS`);
//! - no `LowCardinality`, `DateTime64`, `Map`, `JSON`, TTL or lightweight deletes;
//! - an applied step is recorded in `schema_migrations`, and a step already
//!   recorded is skipped.
//!
//! Storage tables are `ReplacingMergeTree`s keyed by the entity's identity, and
//! the finance contract (`usage`, `ledger`, `invoices`, `invoice_lines`) is a set
//! of views over them with `FINAL`: merges are eventual, but `FINAL` collapses
//! duplicates at read time, so the contract is exact *when read* whatever
//! re-inserts a crash caused. Duplicates of one entity always share their
//! partition (the partition key is a function of columns inside the identity).

use clickhouse::Client;

/// One schema step.
pub enum Step {
    /// A DDL statement; `{db}` is replaced by the database name.
    Sql(&'static str),
    /// `ALTER TABLE {db}.table ADD COLUMN column type`, skipped if present.
    AddColumn {
        table: &'static str,
        column: &'static str,
        ty: &'static str,
    },
}

pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub steps: &'static [Step],
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("invalid database name {0:?}: use letters, digits and _")]
    BadDatabase(String),
    #[error("migration {version} ({name}) failed: {source}")]
    Step {
        version: u32,
        name: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// The whole history, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage events and the usage view",
        steps: &[
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.usage_events (
                    event_id String,
                    occurred_at DateTime('UTC'),
                    tenant_id String,
                    key_id String,
                    request_id String,
                    api String,
                    requested_model String,
                    model String,
                    provider String,
                    deployment String,
                    input_tokens UInt64,
                    output_tokens UInt64,
                    cache_read_tokens UInt64,
                    cache_write_tokens UInt64,
                    reasoning_tokens UInt64,
                    cost Decimal(38, 12),
                    price_version UInt64,
                    estimated UInt8,
                    streamed UInt8,
                    status UInt16,
                    latency_ms UInt64,
                    ttft_ms Nullable(UInt64),
                    retries UInt32,
                    schema_version String,
                    stream_seq UInt64,
                    inserted_at DateTime('UTC')
                ) ENGINE = ReplacingMergeTree()
                PARTITION BY toYYYYMM(occurred_at)
                ORDER BY (tenant_id, occurred_at, event_id)",
            ),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.usage AS
                 SELECT event_id, occurred_at, tenant_id, key_id, request_id, api,
                        requested_model, model, provider, deployment,
                        input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                        reasoning_tokens, cost, price_version, estimated, streamed, status,
                        latency_ms, ttft_ms, retries, schema_version, stream_seq
                 FROM {db}.usage_events FINAL",
            ),
        ],
    },
    Migration {
        version: 2,
        name: "ledger",
        steps: &[
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.ledger_entries (
                    entry_id String,
                    tenant_id String,
                    kind Enum8('grant' = 1, 'debit' = 2, 'expiry' = 3, 'adjustment' = 4),
                    amount Decimal(38, 12),
                    occurred_at DateTime('UTC'),
                    grant_id String,
                    key_id String,
                    event_id String,
                    price_version UInt64,
                    note String,
                    version UInt64
                ) ENGINE = ReplacingMergeTree(version)
                PARTITION BY toYYYYMM(occurred_at)
                ORDER BY (tenant_id, occurred_at, entry_id)",
            ),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.ledger AS
                 SELECT entry_id, tenant_id, kind, amount, occurred_at, grant_id, key_id,
                        event_id, price_version, note
                 FROM {db}.ledger_entries FINAL",
            ),
        ],
    },
    Migration {
        version: 3,
        name: "invoices and invoice lines",
        steps: &[
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.invoices_store (
                    invoice_id String,
                    tenant_id String,
                    period_start DateTime('UTC'),
                    period_end DateTime('UTC'),
                    status Enum8('draft' = 1, 'finalized' = 2, 'void' = 3),
                    currency String,
                    subtotal Decimal(38, 12),
                    credits_applied Decimal(38, 12),
                    total Decimal(38, 12),
                    finalized_at Nullable(DateTime('UTC')),
                    version UInt64
                ) ENGINE = ReplacingMergeTree(version)
                ORDER BY (tenant_id, invoice_id)",
            ),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.invoices AS
                 SELECT invoice_id, tenant_id, period_start, period_end, status, currency,
                        subtotal, credits_applied, total, finalized_at
                 FROM {db}.invoices_store FINAL",
            ),
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.invoice_lines_store (
                    invoice_id String,
                    tenant_id String,
                    model String,
                    token_kind String,
                    quantity UInt64,
                    unit_price Decimal(38, 12),
                    amount Decimal(38, 12),
                    version UInt64
                ) ENGINE = ReplacingMergeTree(version)
                ORDER BY (tenant_id, invoice_id, model, token_kind)",
            ),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.invoice_lines AS
                 SELECT invoice_id, tenant_id, model, token_kind, quantity, unit_price, amount
                 FROM {db}.invoice_lines_store FINAL",
            ),
        ],
    },
    Migration {
        version: 4,
        name: "request and token-count events",
        steps: &[
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.request_events (
                    event_id String,
                    occurred_at DateTime('UTC'),
                    tenant_id String,
                    key_id String,
                    request_id String,
                    api String,
                    method String,
                    route String,
                    model Nullable(String),
                    status UInt16,
                    error_type Nullable(String),
                    streamed UInt8,
                    latency_ms UInt64,
                    deployment Nullable(String),
                    schema_version String,
                    stream_seq UInt64,
                    inserted_at DateTime('UTC')
                ) ENGINE = ReplacingMergeTree()
                PARTITION BY toYYYYMM(occurred_at)
                ORDER BY (tenant_id, occurred_at, event_id)",
            ),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.requests AS
                 SELECT event_id, occurred_at, tenant_id, key_id, request_id, api, method, route,
                        model, status, error_type, streamed, latency_ms, deployment,
                        schema_version, stream_seq
                 FROM {db}.request_events FINAL",
            ),
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.token_count_events (
                    event_id String,
                    occurred_at DateTime('UTC'),
                    tenant_id String,
                    key_id String,
                    request_id String,
                    api String,
                    model String,
                    input_tokens UInt64,
                    source String,
                    schema_version String,
                    stream_seq UInt64,
                    inserted_at DateTime('UTC')
                ) ENGINE = ReplacingMergeTree()
                PARTITION BY toYYYYMM(occurred_at)
                ORDER BY (tenant_id, occurred_at, event_id)",
            ),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.token_counts AS
                 SELECT event_id, occurred_at, tenant_id, key_id, request_id, api, model,
                        input_tokens, source, schema_version, stream_seq
                 FROM {db}.token_count_events FINAL",
            ),
        ],
    },
    // Aggregates are plain views over the deduplicated `usage`, exact by
    // query design: a materialized view is fed by inserts and would count a
    // batch re-inserted after a crash twice (see tollgate-meter's crate docs).
    Migration {
        version: 5,
        name: "usage aggregates by hour and day",
        steps: &[
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.usage_hourly AS
                 SELECT tenant_id, key_id, model, toStartOfHour(occurred_at) AS hour,
                        sum(input_tokens) AS input_tokens,
                        sum(output_tokens) AS output_tokens,
                        sum(cache_read_tokens) AS cache_read_tokens,
                        sum(cache_write_tokens) AS cache_write_tokens,
                        sum(reasoning_tokens) AS reasoning_tokens,
                        sum(cost) AS cost,
                        count() AS requests
                 FROM {db}.usage
                 GROUP BY tenant_id, key_id, model, hour",
            ),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.usage_daily AS
                 SELECT tenant_id, key_id, model, toDate(occurred_at) AS day,
                        sum(input_tokens) AS input_tokens,
                        sum(output_tokens) AS output_tokens,
                        sum(cache_read_tokens) AS cache_read_tokens,
                        sum(cache_write_tokens) AS cache_write_tokens,
                        sum(reasoning_tokens) AS reasoning_tokens,
                        sum(cost) AS cost,
                        count() AS requests
                 FROM {db}.usage
                 GROUP BY tenant_id, key_id, model, day",
            ),
        ],
    },
    // Billing: a debit carries what it priced (model and token counts), so
    // invoices are computed from the ledger alone; invoice lines get a line
    // number so one model and token kind can have a line per unit price (a
    // price change inside a period); webhook delivery attempts are logged.
    Migration {
        version: 6,
        name: "billing: priced debits, invoice lines per price, webhook deliveries",
        steps: &[
            Step::AddColumn {
                table: "ledger_entries",
                column: "model",
                ty: "String",
            },
            Step::AddColumn {
                table: "ledger_entries",
                column: "input_tokens",
                ty: "UInt64",
            },
            Step::AddColumn {
                table: "ledger_entries",
                column: "output_tokens",
                ty: "UInt64",
            },
            Step::AddColumn {
                table: "ledger_entries",
                column: "cache_read_tokens",
                ty: "UInt64",
            },
            Step::AddColumn {
                table: "ledger_entries",
                column: "cache_write_tokens",
                ty: "UInt64",
            },
            Step::Sql("DROP TABLE IF EXISTS {db}.ledger"),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.ledger AS
                 SELECT entry_id, tenant_id, kind, amount, occurred_at, grant_id, key_id,
                        event_id, price_version, note, model, input_tokens, output_tokens,
                        cache_read_tokens, cache_write_tokens
                 FROM {db}.ledger_entries FINAL",
            ),
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.invoice_lines_v2 (
                    invoice_id String,
                    tenant_id String,
                    line_no UInt32,
                    model String,
                    token_kind String,
                    quantity UInt64,
                    unit_price Decimal(38, 12),
                    amount Decimal(38, 12),
                    price_version UInt64,
                    version UInt64
                ) ENGINE = ReplacingMergeTree(version)
                ORDER BY (tenant_id, invoice_id, line_no)",
            ),
            Step::Sql(
                "INSERT INTO {db}.invoice_lines_v2
                 SELECT invoice_id, tenant_id, 0, model, token_kind, quantity, unit_price,
                        amount, 0, version
                 FROM {db}.invoice_lines_store FINAL
                 WHERE (SELECT count() FROM {db}.invoice_lines_v2) = 0",
            ),
            Step::Sql("DROP TABLE IF EXISTS {db}.invoice_lines"),
            Step::Sql(
                "CREATE VIEW IF NOT EXISTS {db}.invoice_lines AS
                 SELECT invoice_id, tenant_id, line_no, model, token_kind, quantity, unit_price,
                        amount, price_version
                 FROM {db}.invoice_lines_v2 FINAL",
            ),
            Step::Sql(
                "CREATE TABLE IF NOT EXISTS {db}.webhook_deliveries (
                    delivery_id String,
                    attempt UInt32,
                    endpoint_id String,
                    tenant_id String,
                    event_type String,
                    attempted_at DateTime('UTC'),
                    status_code UInt16,
                    outcome String,
                    error String,
                    next_attempt_at Nullable(DateTime('UTC'))
                ) ENGINE = ReplacingMergeTree()
                PARTITION BY toYYYYMM(attempted_at)
                ORDER BY (tenant_id, delivery_id, attempt)",
            ),
        ],
    },
];

fn check_db(db: &str) -> Result<(), MigrationError> {
    let ok = !db.is_empty()
        && db.len() <= 64
        && db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !db.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(MigrationError::BadDatabase(db.to_owned()))
    }
}

/// Applies every migration not yet recorded in `{db}.schema_migrations`.
/// Returns the versions applied by this call. The client must not have a
/// default database set that does not exist yet.
pub async fn apply(client: &Client, db: &str) -> Result<Vec<u32>, MigrationError> {
    check_db(db)?;
    client
        .query(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
        .execute()
        .await?;
    client
        .query(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (
                version UInt32, name String, applied_at DateTime('UTC')
             ) ENGINE = ReplacingMergeTree() ORDER BY version"
        ))
        .execute()
        .await?;
    let done: Vec<u32> = client
        .query(&format!(
            "SELECT DISTINCT version FROM {db}.schema_migrations"
        ))
        .fetch_all()
        .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        let wrap = |source| MigrationError::Step {
            version: m.version,
            name: m.name,
            source,
        };
        for step in m.steps {
            match step {
                Step::Sql(sql) => {
                    client
                        .query(&sql.replace("{db}", db))
                        .execute()
                        .await
                        .map_err(wrap)?;
                }
                Step::AddColumn { table, column, ty } => {
                    let present: u64 = client
                        .query("SELECT count() FROM system.columns WHERE database = ? AND table = ? AND name = ?")
                        .bind(db)
                        .bind(*table)
                        .bind(*column)
                        .fetch_one()
                        .await
                        .map_err(wrap)?;
                    if present == 0 {
                        client
                            .query(&format!(
                                "ALTER TABLE {db}.{table} ADD COLUMN {column} {ty}"
                            ))
                            .execute()
                            .await
                            .map_err(wrap)?;
                    }
                }
            }
        }
        client
            .query(&format!(
                "INSERT INTO {db}.schema_migrations (version, name, applied_at) VALUES (?, ?, now())"
            ))
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await
            .map_err(wrap)?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        applied.push(m.version);
    }
    Ok(applied)
}

/// The latest version this code knows.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_strictly_increase() {
        let v: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(v.windows(2).all(|w| w[0] < w[1]), "{v:?}");
        assert_eq!(v.first(), Some(&1));
    }

    #[test]
    fn sql_avoids_what_18_16_or_current_clickhouse_lacks() {
        for m in MIGRATIONS {
            for s in m.steps {
                if let Step::Sql(sql) = s {
                    for banned in [
                        "LowCardinality",
                        "DateTime64",
                        "Map(",
                        "JSON",
                        " TTL ",
                        "IF NOT EXISTS ADD",
                    ] {
                        assert!(
                            !sql.contains(banned),
                            "migration {} uses {banned}",
                            m.version
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn database_names_are_checked() {
        assert!(check_db("tollgate").is_ok());
        assert!(check_db("t_0193").is_ok());
        assert!(check_db("x; DROP").is_err());
        assert!(check_db("").is_err());
    }
}
