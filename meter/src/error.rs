//! The meter's one error type.
//!
//! Only start-up can fail the meter: once it runs, a ClickHouse or NATS
//! outage pauses it (retry with backoff) rather than ending it, and a bad
//! event goes to the dead-letter subject. So these variants are what an
//! operator sees when `tollgate-meter run` exits non-zero.

use tollgate_schemas::bus::BusError;
use tollgate_schemas::migrations::MigrationError;

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("event bus: {0}")]
    Bus(#[from] BusError),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("migrations: {0}")]
    Migration(#[from] MigrationError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}
