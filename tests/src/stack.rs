//! In-process services for end-to-end tests: the mock upstream and a gateway
//! on port 0, wired to a [`TestEnv`]'s namespace on the real NATS.

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate_gateway::Config;
use tollgate_gateway::auth::KeyStore;
use tollgate_schemas::bus::{ConsumerSpec, EventBus, JetStreamBus, StreamSettings};
use tollgate_schemas::events::{Event, EventKind, UsageEvent};
use tollgate_schemas::records::{KeyRecord, PriceBook, QuotaState, price_book_key, quota_key};

use crate::harness::TestEnv;

/// A running service with a shutdown switch.
pub struct Service {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown; returns the service's result.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.task.take() {
            Some(t) => t.await?,
            None => Ok(()),
        }
    }

    /// Stops it abruptly, like a crash: no drain, no flush.
    pub fn abort(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start_mock() -> Service {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        crate::mock::serve(listener, async {
            let _ = rx.await;
        })
        .await?;
        Ok(())
    });
    Service {
        addr,
        stop: Some(tx),
        task: Some(task),
    }
}

/// The demo models against `mock_url`, plus `extra` TOML appended.
pub fn gateway_config(
    env: &TestEnv,
    nats_url: &str,
    mock_url: &str,
    data_dir: &std::path::Path,
    extra: &str,
) -> Config {
    Config::from_toml(&gateway_config_text(
        env, nats_url, mock_url, data_dir, extra,
    ))
    .unwrap()
}

/// [`gateway_config`] as TOML, for a gateway run as a process.
pub fn gateway_config_text(
    env: &TestEnv,
    nats_url: &str,
    mock_url: &str,
    data_dir: &std::path::Path,
    extra: &str,
) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{data}"
[nats]
url = "{nats_url}"
namespace = "{ns}"
[breaker]
failures = 2
open_ms = 500
[prices]
version = 7
[prices.models.mock-gpt]
input_per_million = "0.15"
output_per_million = "0.60"
cache_read_per_million = "0.075"
[[models]]
name = "mock-gpt"
[[models.deployments]]
name = "mock-openai"
provider = "openai"
base_url = "{mock_url}/v1"
upstream_model = "mock-gpt-4o-mini"
forward_headers = ["x-mock-"]
[prices.models.mock-claude]
input_per_million = "3.00"
output_per_million = "15.00"
cache_read_per_million = "0.30"
cache_write_per_million = "3.75"
[prices.models.mock-embed]
input_per_million = "0.02"
output_per_million = "0"
[[models]]
name = "mock-claude"
[[models.deployments]]
name = "mock-anthropic"
provider = "anthropic"
base_url = "{mock_url}"
upstream_model = "mock-claude-sonnet"
forward_headers = ["x-mock-", "anthropic-beta"]
[[models]]
name = "mock-embed"
[[models.deployments]]
name = "mock-embeddings"
provider = "openai"
base_url = "{mock_url}/v1"
upstream_model = "mock-embedding-small"
[[models]]
name = "mock-broken"
[[models.deployments]]
name = "broken"
provider = "openai"
base_url = "{mock_url}/v1"
upstream_model = "mock-fail-503"
{extra}
"#,
        data = data_dir.display(),
        ns = env.id,
    )
}

pub async fn start_gateway(config: Config) -> Service {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(tollgate_gateway::run(listener, config, async {
        let _ = rx.await;
    }));
    let mut svc = Service {
        addr,
        stop: Some(tx),
        task: Some(task),
    };
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if svc.task.as_ref().is_some_and(|t| t.is_finished()) {
            let result = svc.task.take().unwrap().await;
            panic!("gateway exited at start-up: {result:?}");
        }
        if let Ok(r) = client.get(format!("{}/healthz", svc.url())).send().await
            && r.status().is_success()
        {
            return svc;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gateway did not start");
}

/// Writes a key straight into the env's keys bucket.
pub async fn put_key(nats_url: &str, env: &TestEnv, secret: &str, record: KeyRecord) {
    let client = async_nats::connect(nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    KeyStore::open(&js, &env.names.kv_keys, Duration::from_secs(5))
        .await
        .put(secret, record)
        .await
        .unwrap();
}

/// Writes a quota state into the env's quota bucket, as billing does.
pub async fn put_quota(nats_url: &str, env: &TestEnv, state: &QuotaState) {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let kv = tollgate_schemas::kv::ensure(&js, &env.names.kv_quota, 1)
        .await
        .unwrap();
    kv.put(
        quota_key(state.scope, &state.id),
        serde_json::to_vec(state).unwrap().into(),
    )
    .await
    .unwrap();
}

/// Writes a price-book version into the env's prices bucket, as billing does.
pub async fn put_price_book(nats_url: &str, env: &TestEnv, book: &PriceBook) {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let kv = tollgate_schemas::kv::ensure(&js, &env.names.kv_prices, 1)
        .await
        .unwrap();
    kv.put(
        price_book_key(book.version),
        serde_json::to_vec(book).unwrap().into(),
    )
    .await
    .unwrap();
}

/// The position of the newest message in the env's events stream.
pub async fn stream_head(nats_url: &str, env: &TestEnv) -> u64 {
    JetStreamBus::connect(nats_url, env.names.clone(), StreamSettings::default())
        .await
        .unwrap()
        .head()
        .await
        .unwrap()
}

/// An unrestricted key of `tenant`.
pub fn key(tenant: &str, key_id: &str) -> KeyRecord {
    KeyRecord {
        key_id: key_id.into(),
        tenant_id: tenant.into(),
        name: String::new(),
        secret_sha256: String::new(),
        models: None,
        rpm: None,
        tpm: None,
        max_concurrency: None,
        expires_at: None,
        disabled: false,
        revoked: false,
        budget: None,
    }
}

/// Every event of `kind` in the env's stream, waiting up to `timeout` for at
/// least `at_least` of them.
pub async fn events(
    nats_url: &str,
    env: &TestEnv,
    kind: EventKind,
    at_least: usize,
    timeout: Duration,
) -> Vec<Event> {
    let bus = JetStreamBus::connect(nats_url, env.names.clone(), StreamSettings::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut c = bus
            .consumer(ConsumerSpec::new(env.names.kind_filter(kind)))
            .await
            .unwrap();
        let mut all = Vec::new();
        loop {
            let batch = c.fetch(1000, Duration::from_millis(300)).await.unwrap();
            if batch.is_empty() {
                break;
            }
            all.extend(
                batch
                    .into_iter()
                    .map(|d| Event::from_json(&d.payload).unwrap()),
            );
        }
        if all.len() >= at_least || tokio::time::Instant::now() >= deadline {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads an SSE body to the end as its `data:` payloads.
pub async fn sse_data(resp: reqwest::Response) -> Vec<String> {
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    text.split("\n\n")
        .filter_map(|e| {
            e.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

/// The usage event of request `rid`, waiting up to about 20 s for it.
pub async fn usage_event(nats_url: &str, env: &TestEnv, rid: &str) -> UsageEvent {
    for _ in 0..10 {
        let events = events(nats_url, env, EventKind::Usage, 1, Duration::from_secs(2)).await;
        if let Some(Event::Usage(u)) = events.into_iter().find(|e| e.meta().request_id == rid) {
            return u;
        }
    }
    panic!("no usage event for {rid}");
}

/// Splits an SSE body into (`event:` name, parsed `data:`) pairs; events
/// without a name get "" and events without data get `null`.
pub fn sse_events(text: &str) -> Vec<(String, serde_json::Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let ty = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_owned();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            (ty, serde_json::from_str(data).unwrap())
        })
        .collect()
}
