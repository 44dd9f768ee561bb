//! The test harness: real `nats-server -js` and `clickhouse-server`, started
//! on free ports in temp dirs, isolated per test, cleaned up on drop.
//!
//! - [`shared()`] starts one NATS and one ClickHouse per test process (lazily)
//!   and [`TestEnv::new`] hands each test its own namespace: its own stream,
//!   KV buckets and ClickHouse database, so tests running in parallel never
//!   see each other's data. The database is dropped when the `TestEnv` drops.
//! - [`NatsServer::start`] / [`ClickHouseServer::start`] give a test its own
//!   server when it needs to stop and restart one (fault tests).
//!
//! Every server runs under a tiny `sh` supervisor whose stdin is a pipe from
//! the test process. When the test process exits, however it exits (even
//! `kill -9`), the pipe closes and the supervisor stops the server and removes
//! its temp dir, so no test leaves a server behind. A missing binary is an
//! error naming the install command, never a silent skip.

mod clickhouse;
mod nats;
mod process;
mod tansu;

use std::sync::OnceLock;

pub use self::clickhouse::ClickHouseServer;
pub use self::nats::NatsServer;
pub use self::process::{free_port, wait_for_port};
pub use self::tansu::{TansuServer, tansu_binary, tansu_client_properties};
use tollgate_schemas::Names;

/// The servers shared by every test of this process.
pub struct Shared {
    pub nats: NatsServer,
    pub clickhouse: ClickHouseServer,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

/// Starts (once) and returns the shared servers. Fails the test with a clear
/// message when a server binary is missing or does not start.
pub fn shared() -> &'static Shared {
    let result = SHARED.get_or_init(|| {
        let nats = NatsServer::start_for_process().map_err(|e| format!("{e:#}"))?;
        let clickhouse = ClickHouseServer::start_for_process().map_err(|e| format!("{e:#}"))?;
        Ok(Shared { nats, clickhouse })
    });
    match result {
        Ok(s) => s,
        Err(e) => panic!("test infrastructure failed to start: {e}"),
    }
}

static SHARED_TANSU: OnceLock<Result<TansuServer, String>> = OnceLock::new();

/// One tansu broker shared by every Kafka test of this process (started on
/// first use; tests isolate by topic and group names through their
/// namespace).
pub fn shared_tansu() -> &'static TansuServer {
    match SHARED_TANSU
        .get_or_init(|| TansuServer::start_for_process().map_err(|e| format!("{e:#}")))
    {
        Ok(s) => s,
        Err(e) => panic!("Kafka test broker failed to start: {e}"),
    }
}

/// One test's isolated slice of the shared servers.
pub struct TestEnv {
    pub id: String,
    pub names: Names,
    pub nats_url: String,
    pub clickhouse_url: String,
    pub database: String,
}

impl TestEnv {
    /// A fresh namespace and database (the database is created empty, without
    /// migrations; call [`TestEnv::migrate`] for the Tollgate schema).
    pub fn new() -> Self {
        let shared = shared();
        let id = format!("t{}", uuid::Uuid::now_v7().simple());
        let env = Self {
            names: Names::namespaced(&id),
            nats_url: shared.nats.url(),
            clickhouse_url: shared.clickhouse.http_url(),
            database: id.clone(),
            id,
        };
        if let Err(e) = shared
            .clickhouse
            .exec(&format!("CREATE DATABASE IF NOT EXISTS {}", env.database))
        {
            panic!("create test database: {e:#}");
        }
        env
    }

    /// A `clickhouse` client on this test's database.
    pub fn ch(&self) -> ::clickhouse::Client {
        ch_client(&self.clickhouse_url).with_database(&self.database)
    }

    /// Applies Tollgate's migrations to this test's database.
    pub async fn migrate(&self) -> anyhow::Result<Vec<u32>> {
        Ok(
            tollgate_schemas::migrations::apply(&ch_client(&self.clickhouse_url), &self.database)
                .await?,
        )
    }

    pub async fn nats(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(&self.nats_url).await?)
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and a plain HTTP call on
        // a blocking socket works inside or outside a runtime.
        let _ = shared()
            .clickhouse
            .exec(&format!("DROP DATABASE IF EXISTS {}", self.database));
    }
}

/// A `clickhouse` client as the services build it (validation off: 18.16).
pub fn ch_client(url: &str) -> ::clickhouse::Client {
    ::clickhouse::Client::default()
        .with_url(url)
        .with_validation(false)
}
