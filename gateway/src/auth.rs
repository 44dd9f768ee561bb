//! API-key authentication.
//!
//! Keys live in a JetStream KV bucket under the hex SHA-256 of their secret
//! (the secret itself is stored nowhere). A lookup hashes the presented
//! secret, reads the record from a moka cache or, on a miss, from the bucket
//! (so a key works as soon as it is written), and compares the stored digest
//! with the computed one in constant time. A watch on the bucket updates or
//! evicts cached records as they change, so revocation takes effect at every
//! gateway within the watch's latency (milliseconds), not the cache's TTL.
//! Misses are not cached, for the same reason.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::Utc;
use futures::StreamExt;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::records::{KeyRecord, secret_hash};

use crate::error::GatewayError;
use crate::kv_follow::Bucket;

#[derive(Clone)]
pub struct KeyStore {
    /// `None` for a store without a bucket ([`KeyStore::detached`]).
    kv: Option<Arc<Bucket>>,
    cache: moka::future::Cache<String, Arc<KeyRecord>>,
}

impl KeyStore {
    /// The keys bucket, opened now if NATS answers within `timeout`, else by
    /// [`KeyStore::watch`] once it does. Until then only cached keys (from
    /// [`KeyStore::remember`], e.g. the on-disk cache) authenticate; others
    /// get 503.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        timeout: Duration,
    ) -> Self {
        let kv = Arc::new(Bucket::new(js, bucket));
        if let Err(e) = kv.try_open(timeout).await {
            tracing::warn!(error = %e, "keys bucket unreachable at start; serving cached keys until it answers");
        }
        Self {
            kv: Some(kv),
            cache: Self::cache(),
        }
    }

    /// A store with no bucket behind it: it knows the keys given to
    /// [`KeyStore::remember`] and nothing else (benchmarks and tests).
    pub fn detached() -> Self {
        Self {
            kv: None,
            cache: Self::cache(),
        }
    }

    fn cache() -> moka::future::Cache<String, Arc<KeyRecord>> {
        moka::future::Cache::builder()
            .max_capacity(1_000_000)
            .time_to_live(Duration::from_secs(600))
            .build()
    }

    /// The keys bucket is open (NATS answered at least once).
    pub fn bucket_open(&self) -> bool {
        self.kv.as_ref().is_some_and(|b| b.get().is_some())
    }

    /// Key records cached (moka's estimate: it lags inserts a little).
    pub fn cached_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// At least one key record is cached.
    pub fn has_cached(&self) -> bool {
        self.cache.iter().next().is_some()
    }

    /// Every cached key record, by secret hash (for the on-disk cache).
    pub fn cached(&self) -> Vec<(String, KeyRecord)> {
        self.cache
            .iter()
            .map(|(hash, rec)| ((*hash).clone(), (*rec).clone()))
            .collect()
    }

    /// Caches a record read back from the on-disk cache (no secret: the
    /// record carries its hash). The bucket's watch replaces the whole cache
    /// once it subscribes.
    pub async fn restore(&self, record: KeyRecord) {
        self.cache
            .insert(record.secret_sha256.clone(), Arc::new(record))
            .await;
    }

    /// Caches `record` as the key of `secret`, as a watch update would.
    pub async fn remember(&self, secret: &str, mut record: KeyRecord) {
        let hash = secret_hash(secret);
        record.secret_sha256 = hash.clone();
        self.cache.insert(hash, Arc::new(record)).await;
    }

    /// Follows the bucket until `shutdown`, re-subscribing after errors.
    pub async fn watch(self, shutdown: CancellationToken) {
        let Some(bucket) = &self.kv else {
            return;
        };
        let Some(kv) = bucket.open(&shutdown).await else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut stream = match kv.watch_all().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "keys watch failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            // Anything may have changed while we were not watching.
            self.cache.invalidate_all();
            backoff = Duration::from_millis(100);
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    n = stream.next() => n,
                };
                match next {
                    Some(Ok(entry)) => match entry.operation {
                        kv::Operation::Put => {
                            match serde_json::from_slice::<KeyRecord>(&entry.value) {
                                Ok(rec) => self.cache.insert(entry.key, Arc::new(rec)).await,
                                Err(e) => {
                                    tracing::warn!(error = %e, "unreadable key record; evicting");
                                    self.cache.invalidate(&entry.key).await;
                                }
                            }
                        }
                        kv::Operation::Delete | kv::Operation::Purge => {
                            self.cache.invalidate(&entry.key).await
                        }
                    },
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "keys watch error; re-subscribing");
                        break;
                    }
                    None => break,
                }
            }
            self.cache.invalidate_all();
        }
    }

    /// The key for `secret`, if it exists and may be used now.
    pub async fn authenticate(&self, secret: &str) -> Result<Arc<KeyRecord>, GatewayError> {
        let hash = secret_hash(secret);
        let record = match self.cache.get(&hash).await {
            Some(r) => r,
            None => {
                let Some(bucket) = &self.kv else {
                    return Err(GatewayError::InvalidKey("invalid API key"));
                };
                let Some(kv) = bucket.get() else {
                    return Err(GatewayError::Unavailable("the key store is unreachable"));
                };
                let entry = kv
                    .get(&hash)
                    .await
                    .map_err(|_| GatewayError::Unavailable("the key store is unreachable"))?;
                let Some(bytes) = entry else {
                    return Err(GatewayError::InvalidKey("invalid API key"));
                };
                let rec: KeyRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| GatewayError::Internal(format!("corrupt key record: {e}")))?;
                let rec = Arc::new(rec);
                self.cache.insert(hash.clone(), rec.clone()).await;
                rec
            }
        };
        if !bool::from(record.secret_sha256.as_bytes().ct_eq(hash.as_bytes())) {
            return Err(GatewayError::InvalidKey("invalid API key"));
        }
        check_usable(&record)?;
        Ok(record)
    }

    /// Writes a key (CLI and tests; billing does this in production).
    pub async fn put(&self, secret: &str, mut record: KeyRecord) -> anyhow::Result<()> {
        let hash = secret_hash(secret);
        record.secret_sha256 = hash.clone();
        let Some(kv) = self.kv.as_ref().and_then(|b| b.get()) else {
            anyhow::bail!("this key store has no bucket (or it is unreachable)");
        };
        kv.put(&hash, serde_json::to_vec(&record)?.into()).await?;
        self.cache.invalidate(&hash).await;
        Ok(())
    }
}

/// Revoked, disabled and expired keys are refused (401).
pub fn check_usable(record: &KeyRecord) -> Result<(), GatewayError> {
    if record.revoked {
        return Err(GatewayError::InvalidKey("this API key has been revoked"));
    }
    if record.disabled {
        return Err(GatewayError::InvalidKey("this API key is disabled"));
    }
    if record.expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(GatewayError::InvalidKey("this API key has expired"));
    }
    Ok(())
}

/// The secret from `Authorization: Bearer`, `X-API-Key` or `x-api-key`
/// (header names are case-insensitive, so the last two are one).
///
/// Every credential header is read: a request may repeat one, or send both
/// (SDKs set one, a proxy or a user's extra header the other), and they must
/// agree. Two different keys are refused (401) rather than billing whichever
/// came first. `Authorization` with another scheme than Bearer is not a key.
pub fn presented_secret(headers: &axum::http::HeaderMap) -> Result<Option<&str>, GatewayError> {
    let bearer = headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let v = v.trim();
            let (scheme, rest) = v.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case("bearer ").then(|| rest.trim())
        });
    let api_key = headers
        .get_all("x-api-key")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim);
    let mut found: Option<&str> = None;
    for secret in bearer.chain(api_key).filter(|s| !s.is_empty()) {
        match found {
            Some(first) if first != secret => return Err(GatewayError::ConflictingKeys),
            _ => found = Some(secret),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::http::{HeaderMap, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn one_key_however_it_is_sent() {
        for h in [
            headers(&[("authorization", "Bearer k1")]),
            headers(&[("authorization", "bearer  k1 ")]),
            headers(&[("x-api-key", "k1")]),
            headers(&[("authorization", "Bearer k1"), ("x-api-key", "k1")]),
            headers(&[("x-api-key", "k1"), ("x-api-key", "k1")]),
            headers(&[("authorization", "Basic eDp5"), ("x-api-key", "k1")]),
        ] {
            assert_eq!(presented_secret(&h).unwrap(), Some("k1"), "{h:?}");
        }
        assert_eq!(presented_secret(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            presented_secret(&headers(&[("authorization", "Bearer ")])).unwrap(),
            None
        );
    }

    #[test]
    fn two_different_keys_are_refused() {
        for h in [
            headers(&[("authorization", "Bearer k1"), ("x-api-key", "k2")]),
            headers(&[
                ("authorization", "Bearer k1"),
                ("authorization", "Bearer k2"),
            ]),
            headers(&[("x-api-key", "k1"), ("x-api-key", "k2")]),
        ] {
            assert!(
                matches!(presented_secret(&h), Err(GatewayError::ConflictingKeys)),
                "{h:?}"
            );
        }
    }
}
