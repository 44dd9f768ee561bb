//! The meter's configuration: typed, strict, layered.
//!
//! Loaded from a TOML file, then overridden by `TOLLGATE__SECTION__KEY`
//! environment variables (e.g. `TOLLGATE__NATS__URL`,
//! `TOLLGATE__BATCH__MAX_EVENTS`). Unknown keys are errors, every default is a
//! named function, and [`Config::validate`] checks what types cannot. The
//! ClickHouse password is a [`Secret`]: it deserializes but never serializes
//! or prints.
//!
//! ```toml
//! bus = "nats"                   # or "kafka" (TOLLGATE__BUS)
//!
//! [nats]
//! url = "nats://127.0.0.1:4222"
//! namespace = ""                 # "" is production; tests isolate with one
//!
//! [kafka]                        # read when bus = "kafka" (TOLLGATE__KAFKA__BROKERS, ...)
//! brokers = "127.0.0.1:9092"
//! partitions = 12                # of topics the meter creates if missing
//! # security_protocol, sasl_mechanism, sasl_username, sasl_password,
//! # ssl_ca_location, ... and [kafka.properties] pass through to librdkafka
//!
//! [clickhouse]
//! url = "http://127.0.0.1:8123"
//! database = "tollgate"
//! user = "default"
//! password = ""
//! compression = "lz4"            # or "none": ClickHouse on the same host
//!
//! [batch]
//! max_events = 50000             # flush when a batch has this many events
//! max_wait_ms = 1000             # ... or this long after its first event
//!
//! [consumer]
//! durable = "tollgate-meter"     # meters sharing this name share the work
//! ack_wait_secs = 5             # what a killed meter held is redelivered after this
//! max_in_flight = 150000         # uncommitted events held (about 1 KiB each)
//!
//! [metrics]
//! listen = "127.0.0.1:9464"      # optional: /metrics and /healthz
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

use tollgate_schemas::bus::{BusKind, KafkaSettings};

use crate::error::MeterError;

/// Test-only fault injection: a pause between a batch's successful insert and
/// its commit, in milliseconds, read from this environment variable. It widens
/// the crash window the kill -9 test aims at; production never sets it.
pub const FAULT_ACK_DELAY_ENV: &str = "TOLLGATE_METER_FAULT_ACK_DELAY_MS";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which bus carries events (and dead letters). With `kafka` the meter
    /// needs nothing from NATS.
    #[serde(default)]
    pub bus: BusKind,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub consumer: ConsumerConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// See [`FAULT_ACK_DELAY_ENV`]. Never read from the file.
    #[serde(skip)]
    pub fault_ack_delay: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// Isolates streams and subjects (`Names::namespaced`); "" is production.
    #[serde(default)]
    pub namespace: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    #[serde(default = "default_clickhouse_url")]
    pub url: String,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_clickhouse_user")]
    pub user: String,
    #[serde(default)]
    pub password: Secret,
    /// Compression of inserts: `lz4` (the default: fewer bytes on the wire,
    /// for CPU on both ends) or `none` (ClickHouse on the same host or a fast
    /// link, where CPU is the scarcer resource; on one 2-core machine the
    /// bench measured no difference).
    #[serde(default)]
    pub compression: InsertCompression,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InsertCompression {
    #[default]
    Lz4,
    None,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    #[serde(default = "default_durable")]
    pub durable: String,
    #[serde(default = "default_ack_wait_secs")]
    pub ack_wait_secs: u64,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` and `/healthz` listen; absent means no endpoint.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// A string that never leaves the process through `Debug` or `Serialize`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_clickhouse_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_database() -> String {
    "tollgate".into()
}
fn default_clickhouse_user() -> String {
    "default".into()
}
/// Big enough that ClickHouse sees about one insert a second at 50,000
/// events/s (fewer parts to merge: half its CPU per event against 10,000);
/// below that rate `max_wait_ms` flushes first.
fn default_max_events() -> usize {
    50_000
}
fn default_max_wait_ms() -> u64 {
    1_000
}
fn default_durable() -> String {
    "tollgate-meter".into()
}
/// Short: it is how long what a killed meter held stays out of ClickHouse
/// (ARCHITECTURE.md's freshness is 1 s). Batches held longer (a slow or
/// unavailable ClickHouse) are kept alive with in-progress heartbeats every
/// third of it, so a short value costs no redeliveries.
fn default_ack_wait_secs() -> u64 {
    5
}
/// Three batches: one filling while two are inserted.
fn default_max_in_flight() -> usize {
    150_000
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: default_nats_url(),
            namespace: String::new(),
        }
    }
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: default_clickhouse_url(),
            database: default_database(),
            user: default_clickhouse_user(),
            password: Secret::default(),
            compression: InsertCompression::default(),
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_events: default_max_events(),
            max_wait_ms: default_max_wait_ms(),
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            durable: default_durable(),
            ack_wait_secs: default_ack_wait_secs(),
            max_in_flight: default_max_in_flight(),
        }
    }
}

impl Config {
    /// The file (if any), then `TOLLGATE__SECTION__KEY` overrides, then
    /// validation. Errors name the offending key and where it came from.
    pub fn load(file: Option<&Path>) -> Result<Self, MeterError> {
        let mut figment = Figment::new();
        if let Some(path) = file {
            if !path.exists() {
                return Err(MeterError::Config(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("TOLLGATE__").split("__"));
        let mut config: Config = figment
            .extract()
            .map_err(|e| MeterError::Config(e.to_string()))?;
        config.fault_ack_delay = std::env::var(FAULT_ACK_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML string (no environment), then validates. For tests.
    pub fn from_toml(text: &str) -> Result<Self, MeterError> {
        let config: Config = Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| MeterError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), MeterError> {
        let bad = |key: &str, why: &str| Err(MeterError::Config(format!("{key}: {why}")));
        if self.bus == BusKind::Kafka {
            self.kafka.validate().map_err(MeterError::Config)?;
        }
        let ns = &self.nats.namespace;
        if !ns
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("nats.namespace", "use letters, digits, `_` and `-` only");
        }
        if !self.nats.url.contains("://") && !self.nats.url.contains(':') {
            return bad("nats.url", "expected e.g. nats://127.0.0.1:4222");
        }
        if !(self.clickhouse.url.starts_with("http://")
            || self.clickhouse.url.starts_with("https://"))
        {
            return bad(
                "clickhouse.url",
                "expected an http(s) URL, e.g. http://127.0.0.1:8123",
            );
        }
        let db = &self.clickhouse.database;
        if db.is_empty()
            || db.starts_with(|c: char| c.is_ascii_digit())
            || !db.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad(
                "clickhouse.database",
                "use letters, digits and `_`, not starting with a digit",
            );
        }
        if self.batch.max_events == 0 || self.batch.max_events > 1_000_000 {
            return bad("batch.max_events", "must be between 1 and 1000000");
        }
        if self.batch.max_wait_ms == 0 || self.batch.max_wait_ms > 60_000 {
            return bad("batch.max_wait_ms", "must be between 1 and 60000");
        }
        let durable = &self.consumer.durable;
        if durable.is_empty()
            || !durable
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return bad("consumer.durable", "use letters, digits, `_` and `-` only");
        }
        if self.consumer.ack_wait_secs == 0 {
            return bad("consumer.ack_wait_secs", "must be at least 1");
        }
        if self.consumer.ack_wait_secs * 1000 <= self.batch.max_wait_ms {
            return bad(
                "consumer.ack_wait_secs",
                "must be longer than batch.max_wait_ms, or batches redeliver before they flush",
            );
        }
        if self.consumer.max_in_flight < self.batch.max_events {
            return bad(
                "consumer.max_in_flight",
                "must be at least batch.max_events, or a batch can never fill (2-5x lets fetching overlap inserts)",
            );
        }
        Ok(())
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.batch.max_wait_ms)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.consumer.ack_wait_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.clickhouse.database, "tollgate");
        assert_eq!(c.batch.max_events, 50_000);
        assert_eq!(c.batch.max_wait_ms, 1_000);
        assert_eq!(c.consumer.durable, "tollgate-meter");
        assert_eq!(c.nats.namespace, "");
        assert!(c.metrics.listen.is_none());
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = Config::from_toml("[batch]\nmax_event = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_event"), "{e}");
        let e = Config::from_toml("[bacth]\n").unwrap_err().to_string();
        assert!(e.contains("bacth"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = Config::from_toml("[batch]\nmax_events = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_events"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let e = Config::from_toml("[batch]\nmax_events = 100\n[consumer]\nmax_in_flight = 10\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("consumer.max_in_flight"), "{e}");
        let e = Config::from_toml("[clickhouse]\ndatabase = \"x;y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("clickhouse.database"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_toml("[clickhouse]\npassword = \"hunter2\"\n").unwrap();
        assert_eq!(c.clickhouse.password.expose(), "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own signature
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meter.toml");
        std::fs::write(
            &path,
            "[nats]\nurl = \"nats://file:4222\"\n[batch]\nmax_events = 7\n",
        )
        .unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("TOLLGATE__NATS__URL", "nats://env:4222");
            jail.set_env("TOLLGATE__BATCH__MAX_WAIT_MS", "250");
            let c = Config::load(Some(&path)).map_err(|e| e.to_string())?;
            assert_eq!(c.nats.url, "nats://env:4222");
            assert_eq!(c.batch.max_events, 7);
            assert_eq!(c.batch.max_wait_ms, 250);
            assert_eq!(c.bus, BusKind::Nats);
            jail.set_env("TOLLGATE__BUS", "kafka");
            jail.set_env("TOLLGATE__KAFKA__BROKERS", "k1:9092,k2:9092");
            let c = Config::load(Some(&path)).map_err(|e| e.to_string())?;
            assert_eq!(c.bus, BusKind::Kafka);
            assert_eq!(c.kafka.brokers, "k1:9092,k2:9092");
            Ok(())
        });
    }

    #[test]
    fn kafka_settings_are_validated_and_strict() {
        let c = Config::from_toml(
            "bus = \"kafka\"\n[kafka]\nbrokers = \"b:9092\"\npartitions = 3\nsasl_password = \"pw\"\n[kafka.properties]\n\"client.id\" = \"m\"\n",
        )
        .unwrap();
        assert_eq!(c.kafka.partitions, 3);
        assert!(!format!("{c:?}").contains("\"pw\""));
        let e = Config::from_toml("bus = \"kafka\"\n[kafka]\npartitions = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.partitions"), "{e}");
        let e = Config::from_toml("[kafka]\nbroker = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker"), "{e}");
        let e = Config::from_toml("bus = \"rabbit\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rabbit") || e.contains("variant"), "{e}");
    }
}
