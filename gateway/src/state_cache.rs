//! The gateway's on-disk copy of what it follows from NATS KV: the key
//! records it has cached, the quota snapshots and the price-book versions.
//!
//! It is what lets a gateway start while NATS is down and still serve: the
//! events go to the spool, keys it had cached authenticate, quota snapshots
//! are enforced and usage is priced at the versions it knew. Files live in
//! `<data_dir>/state/` (`keys.json`, `quota.json`, `prices.json`), each one
//! JSON array written to a temp file and renamed, so a reader sees the old or
//! the new file, never half of one. Key records carry the SHA-256 of their
//! secret, never the secret, exactly as the keys bucket stores them.
//!
//! The copy is only a start-up fallback: once a bucket answers, its watch
//! replaces what came from disk (the keys cache is emptied on subscribe,
//! quota snapshots only move to higher versions, price versions are keyed by
//! version). It is written every [`WRITE_EVERY`] when it changed, and at
//! shutdown.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::records::{KeyRecord, PriceBook, QuotaState};

use crate::auth::KeyStore;
use crate::quota::Quotas;

/// How often the copy is refreshed while the gateway runs.
pub const WRITE_EVERY: Duration = Duration::from_secs(5);

const KEYS: &str = "keys.json";
const QUOTA: &str = "quota.json";
const PRICES: &str = "prices.json";

/// The directory and the bytes last written to each file.
pub struct StateCache {
    dir: PathBuf,
    written: [Vec<u8>; 3],
}

impl StateCache {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("state"),
            written: Default::default(),
        }
    }

    pub fn keys(&self) -> Vec<KeyRecord> {
        self.load(KEYS)
    }

    pub fn quota(&self) -> Vec<(String, QuotaState)> {
        self.load(QUOTA)
    }

    pub fn prices(&self) -> Vec<PriceBook> {
        self.load(PRICES)
    }

    /// A missing file is an empty list; an unreadable one is logged and
    /// ignored (it is a cache: NATS has the truth).
    fn load<T: DeserializeOwned>(&self, name: &str) -> Vec<T> {
        let path = self.dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "unreadable state cache file; ignored");
                Vec::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable state cache file; ignored");
                Vec::new()
            }
        }
    }

    /// Writes the keys, quota snapshots and price books that changed since
    /// the last write.
    pub fn write(
        &mut self,
        keys: &KeyStore,
        quotas: &Quotas,
        prices: &[PriceBook],
    ) -> io::Result<()> {
        let mut records: Vec<KeyRecord> = keys.cached().into_iter().map(|(_, r)| r).collect();
        records.sort_by(|a, b| a.secret_sha256.cmp(&b.secret_sha256));
        let mut snapshots = quotas.snapshots();
        snapshots.sort_by(|a, b| a.0.cmp(&b.0));
        fs::create_dir_all(&self.dir)?;
        self.write_one(0, KEYS, &records)?;
        self.write_one(1, QUOTA, &snapshots)?;
        self.write_one(2, PRICES, prices)
    }

    fn write_one<T: Serialize>(&mut self, slot: usize, name: &str, items: &[T]) -> io::Result<()> {
        let bytes = serde_json::to_vec(items).map_err(io::Error::other)?;
        if self.written.get(slot) == Some(&bytes) {
            return Ok(());
        }
        let tmp = self.dir.join(format!("{name}.tmp"));
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, self.dir.join(name))?;
        if let Some(w) = self.written.get_mut(slot) {
            *w = bytes;
        }
        Ok(())
    }
}

/// Refreshes the copy every [`WRITE_EVERY`] until `shutdown`, then once more.
pub async fn run(
    mut cache: StateCache,
    keys: KeyStore,
    quotas: Quotas,
    prices: impl Fn() -> Vec<PriceBook> + Send,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(WRITE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let last = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        if let Err(e) = cache.write(&keys, &quotas, &prices()) {
            tracing::warn!(error = %e, "could not write the gateway's state cache");
        }
        if last {
            return;
        }
    }
}
