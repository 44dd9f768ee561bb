//! Typed, strict, layered configuration, validated at start-up.
//!
//! Loaded from a TOML file, then overridden by `TOLLGATE__SECTION__KEY`
//! environment variables (e.g. `TOLLGATE__NATS__URL`, `TOLLGATE__BUS=kafka`,
//! `TOLLGATE__KAFKA__BROKERS`). Unknown fields are
//! errors that name the field. Upstream API keys are never in the file: a
//! deployment names the environment variable that holds its key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;
use tollgate_schemas::bus::{BusKind, KafkaSettings};
use tollgate_schemas::records::{ModelPrice, PriceBook};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the event spool lives.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Largest request body accepted (413 above it).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default)]
    pub nats: NatsConfig,
    /// Which bus carries events (`nats`, the default, or `kafka`); NATS
    /// always runs for keys, quota states and prices.
    #[serde(default)]
    pub bus: BusKind,
    /// Read when `bus = "kafka"`.
    #[serde(default)]
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub limits: GlobalLimits,
    /// The client-facing HTTP server: header limits and read timeouts.
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The price book until billing publishes one to KV.
    #[serde(default)]
    pub prices: PricesConfig,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// Isolates every stream, subject and bucket name (tests); empty in production.
    #[serde(default)]
    pub namespace: String,
    #[serde(default = "default_stream_max_age_days")]
    pub stream_max_age_days: u64,
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: default_nats_url(),
            namespace: String::new(),
            stream_max_age_days: default_stream_max_age_days(),
            duplicate_window_secs: default_duplicate_window_secs(),
        }
    }
}

/// Gateway-wide limits, per replica. None by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalLimits {
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub max_concurrency: Option<u32>,
}

/// The largest `server.max_header_bytes` accepted.
pub const MAX_HEADER_BYTES_LIMIT: usize = 256 * 1024;
/// The largest `server.max_headers` accepted.
pub const MAX_HEADERS_LIMIT: usize = 1000;

/// Limits on what clients send, so slow or oversized requests cannot hold
/// connections or memory (see [`crate::server`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// A request head (request line and headers) must arrive complete within
    /// this long of the connection starting to wait for it: after accept, or
    /// after the previous response on a keep-alive connection. It is hyper's
    /// header-read timer, which starts when a connection begins waiting for a
    /// request, so it is also the idle timeout of keep-alive connections and
    /// the bound on slow-loris clients. Never cuts a request or stream in
    /// progress (those are bounded by `timeouts.total_ms`).
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// The whole request body must arrive within this long (408 after it).
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// Largest request head, request line and headers together (431 above it).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most request headers (431 above it).
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Connect to an upstream.
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// One attempt, until the upstream's response headers.
    #[serde(default = "default_attempt_ms")]
    pub attempt_ms: u64,
    /// The whole request, all attempts and the body (streams included).
    #[serde(default = "default_total_ms")]
    pub total_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_ms(),
            attempt_ms: default_attempt_ms(),
            total_ms: default_total_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open a deployment's breaker.
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// How long it stays open before one trial request.
    #[serde(default = "default_breaker_open_ms")]
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: default_breaker_failures(),
            open_ms: default_breaker_open_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: u64,
    /// Group commit: the spool (every event passes through it before its
    /// response ends) is fsynced this often. The only loss window left: a
    /// power loss or kernel crash can take the last interval's events; a
    /// process kill takes none.
    #[serde(default = "default_spool_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_spool_max_bytes(),
            fsync_interval_ms: default_spool_fsync_interval_ms(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricesConfig {
    #[serde(default)]
    pub version: u64,
    #[serde(default)]
    pub models: BTreeMap<String, ModelPrice>,
}

impl PricesConfig {
    pub fn book(&self) -> PriceBook {
        PriceBook {
            version: self.version,
            models: self.models.clone(),
            effective_from: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The public name clients use.
    pub name: String,
    pub deployments: Vec<DeploymentConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible API; `base_url` ends in `/v1`.
    Openai,
    /// Anthropic's Messages API; `base_url` without `/v1`.
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub name: String,
    pub provider: ProviderKind,
    pub base_url: String,
    /// Environment variable holding the upstream API key (none: no auth header).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Model name sent upstream; defaults to the public name.
    #[serde(default)]
    pub upstream_model: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Lower is tried first; equal priorities share traffic by weight.
    #[serde(default)]
    pub priority: u32,
    /// Prefixes of client request headers passed through to this upstream
    /// (e.g. `["anthropic-beta", "x-mock-"]`). None by default.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// The upstream serves OpenAI's Responses API itself (`/responses`):
    /// pass `/v1/responses` through instead of bridging it over chat.
    #[serde(default)]
    pub responses_api: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/tollgate-gateway")
}
fn default_max_body_bytes() -> usize {
    16 * 1024 * 1024
}
fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_stream_max_age_days() -> u64 {
    35
}
fn default_duplicate_window_secs() -> u64 {
    600
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    60_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_connect_ms() -> u64 {
    5_000
}
fn default_attempt_ms() -> u64 {
    60_000
}
fn default_total_ms() -> u64 {
    600_000
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_open_ms() -> u64 {
    10_000
}
fn default_spool_fsync_interval_ms() -> u64 {
    crate::publisher::DEFAULT_SYNC_INTERVAL.as_millis() as u64
}

fn default_spool_max_bytes() -> u64 {
    1 << 30
}
fn default_weight() -> u32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(Box<figment::Error>),
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// File (optional), then `TOLLGATE__*` environment overrides; validated.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            fig = fig.merge(Toml::file_exact(p));
        }
        fig = fig.merge(Env::prefixed("TOLLGATE__").split("__").lowercase(true));
        let config: Config = fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (tests), validated.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.bus == BusKind::Kafka
            && let Err(e) = self.kafka.validate()
        {
            return bad(e);
        }
        let mut seen = std::collections::HashSet::new();
        for m in &self.models {
            if !seen.insert(&m.name) {
                return bad(format!("models: {:?} is defined twice", m.name));
            }
            if m.deployments.is_empty() {
                return bad(format!("models.{}: needs at least one deployment", m.name));
            }
            for d in &m.deployments {
                if !(d.base_url.starts_with("http://") || d.base_url.starts_with("https://")) {
                    return bad(format!(
                        "models.{}.deployments.{}.base_url: must be http(s)",
                        m.name, d.name
                    ));
                }
                if d.weight == 0 {
                    return bad(format!(
                        "models.{}.deployments.{}.weight: must be > 0",
                        m.name, d.name
                    ));
                }
            }
        }
        for (model, price) in &self.prices.models {
            price
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("prices.models.{model}: {e}")))?;
        }
        if self.max_body_bytes == 0 {
            return bad("max_body_bytes: must be > 0".into());
        }
        let s = &self.server;
        for (name, v) in [
            ("header_read_timeout_ms", s.header_read_timeout_ms),
            ("body_read_timeout_ms", s.body_read_timeout_ms),
        ] {
            if v == 0 {
                return bad(format!("server.{name}: must be > 0"));
            }
        }
        if !(1024..=MAX_HEADER_BYTES_LIMIT).contains(&s.max_header_bytes) {
            return bad(format!(
                "server.max_header_bytes: must be between 1024 and {}",
                MAX_HEADER_BYTES_LIMIT
            ));
        }
        if !(1..=MAX_HEADERS_LIMIT).contains(&s.max_headers) {
            return bad(format!(
                "server.max_headers: must be between 1 and {}",
                MAX_HEADERS_LIMIT
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named() {
        let err = Config::from_toml("listen = \"127.0.0.1:1\"\nlisten_typo = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_typo"), "{err}");
    }

    #[test]
    fn defaults_and_a_model() {
        let c = Config::from_toml(
            r#"
            [prices]
            version = 2
            [prices.models.m]
            input_per_million = "1"
            output_per_million = "2"
            [[models]]
            name = "m"
            [[models.deployments]]
            name = "d"
            provider = "openai"
            base_url = "http://127.0.0.1:9/v1"
            "#,
        )
        .unwrap();
        assert_eq!(c.max_body_bytes, 16 * 1024 * 1024);
        assert!(c.limits.rpm.is_none());
        assert_eq!(c.prices.book().version, 2);
    }

    #[test]
    fn bad_prices_are_refused() {
        let err = Config::from_toml(
            "[prices.models.m]\ninput_per_million = \"0.0000001\"\noutput_per_million = \"1\"",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("prices.models.m"), "{err}");
    }
}
