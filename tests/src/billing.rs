//! Billing in-process for end-to-end tests, with an admin client.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tollgate_billing::config::Config;

use crate::harness::TestEnv;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

/// Billing's config for `env`, with the demo price book (version 1).
pub fn billing_config(env: &TestEnv) -> Config {
    let text = billing_config_text(env);
    let config: Config = figment::Figment::new()
        .merge(<figment::providers::Toml as figment::providers::Format>::string(&text))
        .extract()
        .unwrap();
    config.validate().unwrap();
    config
}

/// [`billing_config`] as TOML, for billing run as a process.
pub fn billing_config_text(env: &TestEnv) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
admin_key = "{ADMIN_KEY}"
tick_ms = 200
[nats]
url = "{nats}"
namespace = "{ns}"
[clickhouse]
url = "{ch}"
database = "{db}"
[webhooks]
allow_private = true
backoff_base_ms = 200
backoff_max_secs = 2
[prices.models.mock-gpt]
input_per_million = "0.15"
output_per_million = "0.60"
cache_read_per_million = "0.075"
[prices.models.mock-claude]
input_per_million = "3.00"
output_per_million = "15.00"
cache_read_per_million = "0.30"
cache_write_per_million = "3.75"
[prices.models.mock-embed]
input_per_million = "0.02"
output_per_million = "0"
"#,
        nats = env.nats_url,
        ns = env.id,
        ch = env.clickhouse_url,
        db = env.database,
    )
}

/// A running billing service.
pub struct Billing {
    pub url: String,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<tollgate_billing::error::Result<()>>>,
    pub http: reqwest::Client,
}

impl Billing {
    pub async fn start(config: Config) -> Self {
        // Billing's logs in the test output (RUST_LOG overrides the level).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "tollgate_billing=info".into()),
            )
            .with_test_writer()
            .try_init();
        let (addr, stop, task) = tollgate_billing::app::spawn(config).await.unwrap();
        let b = Self {
            url: format!("http://{addr}"),
            stop,
            task: Some(task),
            http: reqwest::Client::new(),
        };
        for _ in 0..400 {
            if b.task.as_ref().is_some_and(|t| t.is_finished()) {
                panic!("billing exited at start-up");
            }
            if let Ok(r) = b.http.get(format!("{}/healthz", b.url)).send().await
                && r.status().is_success()
            {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("billing did not start");
    }

    /// Graceful stop.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    /// Abrupt stop, like a crash.
    pub fn kill(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// An admin call; returns (status, body).
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// An admin call that must answer `want`.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, v) = self.admin(method, path, body).await;
        assert_eq!(status, want, "{method} {path}: {v}");
        v
    }
}

impl Drop for Billing {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
