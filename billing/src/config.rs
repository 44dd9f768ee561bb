//! Billing's configuration: TOML file, then `TOLLGATE_BILLING__SECTION__KEY`
//! environment overrides; unknown keys are errors.
//!
//! ```toml
//! listen = "127.0.0.1:8081"
//! admin_key_file = "/etc/tollgate/admin_key"   # or admin_key = "..." (or TOLLGATE_ADMIN_KEY)
//! warning_thresholds = ["0.8", "0.95"]          # fractions of the limit used
//!
//! bus = "nats"                  # or "kafka" (TOLLGATE_BILLING__BUS)
//!
//! [nats]
//! url = "nats://127.0.0.1:4222"
//! namespace = ""
//!
//! [kafka]                       # read when bus = "kafka" (TOLLGATE_BILLING__KAFKA__BROKERS, ...)
//! brokers = "127.0.0.1:9092"
//!
//! [clickhouse]
//! url = "http://127.0.0.1:8123"
//! database = "tollgate"
//! user = "default"
//! password = ""
//!
//! [consumer]
//! durable = "tollgate-billing"
//! max_batch = 1000              # events priced per batch
//! max_wait_ms = 200             # how long a fetch waits for a batch to fill
//! ack_wait_secs = 5             # what a crashed billing held is redelivered after this
//!
//! [webhooks]
//! allow_private = false       # refuse private and loopback destinations
//!
//! [prices.models.gpt-4o-mini]  # seeds price-book version 1 when the bucket is empty
//! input_per_million = "0.15"
//! output_per_million = "0.60"
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::error::ConfigError;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use rust_decimal::Decimal;
use serde::Deserialize;
use tollgate_schemas::bus::{BusKind, KafkaSettings};
use tollgate_schemas::records::ModelPrice;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The master key for `/admin/*`. Prefer `admin_key_file`.
    #[serde(default)]
    pub admin_key: Option<String>,
    #[serde(default)]
    pub admin_key_file: Option<PathBuf>,
    #[serde(default = "default_thresholds", with = "decimal_strings")]
    pub warning_thresholds: Vec<Decimal>,
    #[serde(default)]
    pub nats: NatsConfig,
    /// Which bus carries events; keys, quota and prices stay in NATS KV.
    #[serde(default)]
    pub bus: BusKind,
    #[serde(default)]
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub clickhouse: ClickHouseConfig,
    #[serde(default)]
    pub consumer: ConsumerConfig,
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    #[serde(default)]
    pub prices: PricesConfig,
    /// How often grants' expiry, deferred grants and period ends are checked.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    #[serde(default = "default_nats_url")]
    pub url: String,
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
    pub password: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Billing's durable consumer of events (every kind: see
    /// [`crate::priced`]). Billing is one process:
    /// the ledger has a single writer (see the crate docs).
    #[serde(default = "default_durable")]
    pub durable: String,
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    #[serde(default = "default_wait_ms")]
    pub max_wait_ms: u64,
    /// How long a delivered, unacknowledged event waits before the bus
    /// hands it out again. Short, because that is how long a crashed
    /// billing's batch stays unpriced (and the quota marker held below it);
    /// a batch that takes longer is kept with in-progress heartbeats.
    #[serde(default = "default_ack_wait_secs")]
    pub ack_wait_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    #[serde(default)]
    pub allow_private: bool,
    #[serde(default = "default_webhook_timeout")]
    pub timeout_secs: u64,
    #[serde(default = "default_webhook_max_age")]
    pub max_age_secs: u64,
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max_secs")]
    pub backoff_max_secs: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricesConfig {
    /// Seeds price-book version 1 when the prices bucket holds no version.
    #[serde(default)]
    pub models: BTreeMap<String, ModelPrice>,
}

mod decimal_strings {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Decimal>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| s.parse::<Decimal>().map_err(serde::de::Error::custom))
            .collect()
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_thresholds() -> Vec<Decimal> {
    vec![Decimal::new(8, 1), Decimal::new(95, 2)]
}
fn default_tick_ms() -> u64 {
    500
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
fn default_durable() -> String {
    "tollgate-billing".into()
}
fn default_batch() -> usize {
    1_000
}
fn default_wait_ms() -> u64 {
    200
}
fn default_ack_wait_secs() -> u64 {
    5
}
fn default_webhook_timeout() -> u64 {
    10
}
fn default_webhook_max_age() -> u64 {
    3 * 86_400
}
fn default_backoff_base_ms() -> u64 {
    5_000
}
fn default_backoff_max_secs() -> u64 {
    3_600
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
            password: String::new(),
        }
    }
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            durable: default_durable(),
            max_batch: default_batch(),
            max_wait_ms: default_wait_ms(),
            ack_wait_secs: default_ack_wait_secs(),
        }
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            allow_private: false,
            timeout_secs: default_webhook_timeout(),
            max_age_secs: default_webhook_max_age(),
            backoff_base_ms: default_backoff_base_ms(),
            backoff_max_secs: default_backoff_max_secs(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_key: None,
            admin_key_file: None,
            warning_thresholds: default_thresholds(),
            nats: NatsConfig::default(),
            bus: BusKind::default(),
            kafka: KafkaSettings::default(),
            clickhouse: ClickHouseConfig::default(),
            consumer: ConsumerConfig::default(),
            webhooks: WebhooksConfig::default(),
            prices: PricesConfig::default(),
            tick_ms: default_tick_ms(),
        }
    }
}

impl WebhooksConfig {
    pub fn to_webhook_config(&self) -> crate::webhooks::WebhookConfig {
        crate::webhooks::WebhookConfig {
            allow_private: self.allow_private,
            timeout: Duration::from_secs(self.timeout_secs),
            max_age: Duration::from_secs(self.max_age_secs),
            backoff_base: Duration::from_millis(self.backoff_base_ms),
            backoff_max: Duration::from_secs(self.backoff_max_secs),
        }
    }
}

impl Config {
    /// File (if any), then `TOLLGATE_BILLING__*` variables; `TOLLGATE_ADMIN_KEY`
    /// sets the master key when nothing else does.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            fig = fig.merge(Toml::file_exact(p));
        }
        let mut config: Config = fig
            .merge(Env::prefixed("TOLLGATE_BILLING__").split("__"))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        if config.admin_key.is_none() && config.admin_key_file.is_none() {
            config.admin_key = std::env::var("TOLLGATE_ADMIN_KEY").ok();
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let ensure = |ok: bool, field: &'static str, message: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::Invalid { field, message })
            }
        };
        if self.bus == BusKind::Kafka {
            self.kafka
                .validate()
                .map_err(|message| ConfigError::Invalid {
                    field: "kafka",
                    message,
                })?;
        }
        for t in &self.warning_thresholds {
            ensure(
                *t > Decimal::ZERO && *t < Decimal::ONE,
                "warning_thresholds",
                format!("warning_thresholds must be fractions between 0 and 1, got {t}"),
            )?;
        }
        for (model, p) in &self.prices.models {
            p.validate().map_err(|e| ConfigError::Invalid {
                field: "prices.models",
                message: format!("prices.models.{model}: {e}"),
            })?;
        }
        ensure(
            self.tick_ms > 0,
            "tick_ms",
            "tick_ms must be positive".into(),
        )?;
        ensure(
            self.consumer.max_batch > 0,
            "consumer.max_batch",
            "consumer.max_batch must be positive".into(),
        )?;
        ensure(
            self.consumer.ack_wait_secs > 0
                && self.consumer.ack_wait_secs * 1000 > self.consumer.max_wait_ms,
            "consumer.ack_wait_secs",
            "consumer.ack_wait_secs must be at least 1 and longer than consumer.max_wait_ms".into(),
        )?;
        Ok(())
    }

    /// The consumer's `ack_wait`.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.consumer.ack_wait_secs)
    }

    /// The master key, from `admin_key` or the file `admin_key_file`.
    pub fn admin_key(&self) -> Result<String, ConfigError> {
        let short = || ConfigError::Invalid {
            field: "admin_key",
            message: "the admin key must be at least 16 characters".into(),
        };
        if let Some(k) = &self.admin_key {
            if k.len() < 16 {
                return Err(short());
            }
            return Ok(k.clone());
        }
        if let Some(path) = &self.admin_key_file {
            let k = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Invalid {
                    field: "admin_key_file",
                    message: format!("read admin_key_file {}: {e}", path.display()),
                })?
                .trim()
                .to_owned();
            if k.len() < 16 {
                return Err(short());
            }
            return Ok(k);
        }
        Err(ConfigError::Invalid {
            field: "admin_key",
            message: "no admin key: set admin_key_file, admin_key or TOLLGATE_ADMIN_KEY".into(),
        })
    }

    pub fn thresholds(&self) -> Vec<Decimal> {
        let mut t = self.warning_thresholds.clone();
        t.sort();
        t.dedup();
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_value_is_a_config_error_naming_the_field() {
        let config = Config {
            tick_ms: 0,
            ..Config::default()
        };
        match config.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "tick_ms");
                assert_eq!(message, "tick_ms must be positive");
            }
            other => panic!("expected an invalid tick_ms, got {other:?}"),
        }
        let config = Config {
            admin_key: Some("short".into()),
            ..Config::default()
        };
        let e = config.admin_key().unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "admin_key",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "the admin key must be at least 16 characters"
        );
    }
}
