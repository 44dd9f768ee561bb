//! Following a JetStream KV bucket whose every key matters: load what is
//! there at start-up, then apply each change as it happens.
//!
//! `watch_all` delivers only new changes, which suits a cache filled on a miss
//! (the key store), but the quota states and the price book are never read on
//! a miss: a gateway must know all of them. So the watch here first delivers
//! the latest value of every key (`LastPerSubject`), then the changes, on one
//! stream with no gap between the two. After an error it re-subscribes the
//! same way, re-delivering every key's latest value: consumers must treat a
//! value they already have as a no-op (quota states carry a version; price
//! books are keyed by version).

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A KV bucket that may not be reachable yet: the gateway starts (and serves
/// from what it cached on disk) while NATS is down, and opens its buckets
/// when NATS answers.
pub struct Bucket {
    js: async_nats::jetstream::Context,
    name: String,
    store: tokio::sync::OnceCell<kv::Store>,
}

impl Bucket {
    pub fn new(js: &async_nats::jetstream::Context, name: &str) -> Self {
        Self {
            js: js.clone(),
            name: name.to_owned(),
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// The store, if it has been opened.
    pub fn get(&self) -> Option<&kv::Store> {
        self.store.get()
    }

    /// One attempt to open (creating if needed) the bucket, bounded by `timeout`.
    pub async fn try_open(&self, timeout: Duration) -> anyhow::Result<&kv::Store> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        let store = tokio::time::timeout(
            timeout,
            tollgate_schemas::kv::ensure(&self.js, &self.name, 1),
        )
        .await
        .map_err(|_| anyhow::anyhow!("opening KV bucket {} timed out", self.name))??;
        Ok(self.store.get_or_init(|| async { store }).await)
    }

    /// Start-up: opens the bucket and reads every key's latest value, if NATS
    /// answers within `timeout`. The watch is returned for [`follow`] to go
    /// on with. `None` (logged) when it does not: the caller serves from its
    /// on-disk cache and follows the bucket once it opens.
    pub async fn load_at_start(
        &self,
        what: &'static str,
        timeout: Duration,
    ) -> (Option<kv::Watch>, Vec<kv::Entry>) {
        let loaded = async {
            let store = self.try_open(timeout).await?;
            let mut watch = subscribe(store).await?;
            let loaded = load(store, &mut watch, what, Duration::from_secs(10)).await?;
            anyhow::Ok((watch, loaded))
        }
        .await;
        match loaded {
            Ok((watch, loaded)) => (Some(watch), loaded),
            Err(e) => {
                tracing::warn!(error = %e, "{what} bucket unreachable at start; serving from the on-disk state cache until it answers");
                (None, Vec::new())
            }
        }
    }

    /// Opens the bucket, retrying with backoff; `None` if `shutdown` came first.
    pub async fn open(&self, shutdown: &CancellationToken) -> Option<&kv::Store> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.try_open(Duration::from_secs(5)).await {
                Ok(_) => return self.store.get(),
                Err(e) => {
                    tracing::debug!(bucket = %self.name, error = %e, "KV bucket not reachable yet")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// A watch that starts with every key's latest value.
pub async fn subscribe(store: &kv::Store) -> anyhow::Result<kv::Watch> {
    Ok(store.watch_with_history(">").await?)
}

/// Reads the values the bucket holds now from a fresh `watch` (until the one
/// with nothing pending after it), giving up after `timeout`.
pub async fn load(
    store: &kv::Store,
    watch: &mut kv::Watch,
    what: &'static str,
    timeout: Duration,
) -> anyhow::Result<Vec<kv::Entry>> {
    let mut entries = Vec::new();
    if store.status().await?.values() == 0 {
        return Ok(entries);
    }
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Some(Ok(entry))) => {
                let caught_up = entry.delta == 0;
                entries.push(entry);
                if caught_up {
                    return Ok(entries);
                }
            }
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => anyhow::bail!("the {what} watch ended during the initial load"),
            Err(_) => {
                tracing::warn!(
                    loaded = entries.len(),
                    "initial load of the {what} bucket timed out; the rest follows from the watch"
                );
                return Ok(entries);
            }
        }
    }
}

/// Applies every change to `on_entry` until `shutdown`, continuing `watch`
/// (if given) and re-subscribing with backoff after errors.
pub async fn follow(
    store: &kv::Store,
    what: &'static str,
    mut watch: Option<kv::Watch>,
    shutdown: &CancellationToken,
    mut on_entry: impl FnMut(kv::Entry),
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let stream = match watch.take() {
            Some(w) => Ok(w),
            None => subscribe(store).await,
        };
        match stream {
            Ok(mut stream) => loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(entry)) => {
                        backoff = Duration::from_millis(100);
                        on_entry(entry);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "{what} watch error; re-subscribing");
                        break;
                    }
                    None => {
                        tracing::warn!("{what} watch ended; re-subscribing");
                        break;
                    }
                }
            },
            Err(e) => tracing::warn!(error = %e, "{what} watch failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
