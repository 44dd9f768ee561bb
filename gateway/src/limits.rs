//! Rate limits: requests and tokens per minute, and concurrency, per key and
//! per gateway. Limits hold per replica (each gateway counts its own traffic);
//! N replicas admit up to N times a key's limit. Documented in the README.
//!
//! RPM and TPM are token buckets refilled continuously (capacity = the
//! per-minute limit), so `Retry-After` is exact: the time until enough refills.
//! TPM is charged with the tokenizer's estimate of the input before
//! forwarding and settled with the actual usage afterwards (the bucket may go
//! negative, which delays the next request rather than refusing this one).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;

use crate::error::{GatewayError, LimitKind};

#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(per_minute: u64) -> Self {
        let capacity = per_minute as f64;
        Self {
            capacity,
            level: capacity,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let rate = self.capacity / 60.0;
        self.level =
            (self.level + rate * now.duration_since(self.last).as_secs_f64()).min(self.capacity);
        self.last = now;
    }

    /// Takes `n` if available, else how long until it would be.
    fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.level >= n.min(self.capacity) {
            self.level -= n;
            Ok(())
        } else {
            let missing = n.min(self.capacity) - self.level;
            Err(Duration::from_secs_f64(missing / (self.capacity / 60.0)))
        }
    }

    fn adjust(&mut self, delta: f64) {
        self.level = (self.level - delta).min(self.capacity);
    }
}

/// The limiter state of one key (or of the whole gateway).
#[derive(Debug)]
pub struct Limiter {
    rpm: Option<(u32, Mutex<Bucket>)>,
    tpm: Option<(u64, Mutex<Bucket>)>,
    max_concurrency: Option<u32>,
    inflight: AtomicU32,
    global: bool,
}

impl Limiter {
    pub fn new(
        rpm: Option<u32>,
        tpm: Option<u64>,
        max_concurrency: Option<u32>,
        global: bool,
    ) -> Self {
        Self {
            rpm: rpm.map(|r| (r, Mutex::new(Bucket::new(r.into())))),
            tpm: tpm.map(|t| {
                // TPM admission estimates every request's tokens.
                crate::tokens::prepare();
                (t, Mutex::new(Bucket::new(t)))
            }),
            max_concurrency,
            inflight: AtomicU32::new(0),
            global,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.max_concurrency.is_none()
    }

    pub fn has_tpm(&self) -> bool {
        self.tpm.is_some()
    }

    fn kind(&self, key: LimitKind) -> LimitKind {
        match (self.global, key) {
            (true, LimitKind::Requests) => LimitKind::GlobalRequests,
            (true, LimitKind::Tokens) => LimitKind::GlobalTokens,
            (true, LimitKind::Concurrency) => LimitKind::GlobalConcurrency,
            (_, k) => k,
        }
    }

    /// Admits one request estimated at `tokens` input tokens, or says which
    /// limit refused it. The returned permit releases the concurrency slot.
    pub fn admit(self: &Arc<Self>, tokens: u64) -> Result<Permit, GatewayError> {
        if let Some(max) = self.max_concurrency {
            let prev = self.inflight.fetch_add(1, Ordering::AcqRel);
            if prev >= max {
                self.inflight.fetch_sub(1, Ordering::AcqRel);
                return Err(self.refusal(LimitKind::Concurrency, Duration::from_secs(1)));
            }
        }
        let permit = Permit {
            limiter: Some(self.clone()),
        };
        let now = Instant::now();
        // Each guard is dropped before `refusal` reads the buckets again.
        if let Some((_, b)) = &self.rpm {
            let taken = b.lock().take(1.0, now);
            taken.map_err(|wait| self.refusal(LimitKind::Requests, wait))?;
        }
        if let Some((_, b)) = &self.tpm {
            let taken = b.lock().take(tokens as f64, now);
            if let Err(wait) = taken {
                // Give the request back: it was not admitted.
                if let Some((_, r)) = &self.rpm {
                    r.lock().adjust(-1.0);
                }
                return Err(self.refusal(LimitKind::Tokens, wait));
            }
        }
        Ok(permit)
    }

    /// Settles TPM with the real count once known.
    pub fn settle_tokens(&self, estimated: u64, actual: u64) {
        if let Some((_, b)) = &self.tpm {
            b.lock().adjust(actual as f64 - estimated as f64);
        }
    }

    fn refusal(&self, limit: LimitKind, retry_after: Duration) -> GatewayError {
        GatewayError::RateLimited {
            limit: self.kind(limit),
            retry_after,
            headers: self.headers(),
        }
    }

    /// `x-ratelimit-*` headers describing this limiter now.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let now = Instant::now();
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(name, v);
            }
        };
        if let Some((limit, b)) = &self.rpm {
            let mut b = b.lock();
            b.refill(now);
            put("x-ratelimit-limit-requests", limit.to_string());
            put(
                "x-ratelimit-remaining-requests",
                (b.level.max(0.0).floor() as u64).to_string(),
            );
            let reset = (b.capacity - b.level) / (b.capacity / 60.0);
            put(
                "x-ratelimit-reset-requests",
                format!("{:.0}s", reset.ceil()),
            );
        }
        if let Some((limit, b)) = &self.tpm {
            let mut b = b.lock();
            b.refill(now);
            put("x-ratelimit-limit-tokens", limit.to_string());
            put(
                "x-ratelimit-remaining-tokens",
                (b.level.max(0.0).floor() as u64).to_string(),
            );
            let reset = (b.capacity - b.level) / (b.capacity / 60.0);
            put("x-ratelimit-reset-tokens", format!("{:.0}s", reset.ceil()));
        }
        if let Some(max) = self.max_concurrency {
            put("x-ratelimit-limit-concurrency", max.to_string());
            let used = self.inflight.load(Ordering::Acquire);
            put(
                "x-ratelimit-remaining-concurrency",
                max.saturating_sub(used).to_string(),
            );
        }
        h
    }
}

/// Holds a concurrency slot until dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Option<Arc<Limiter>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(l) = self.limiter.take()
            && l.max_concurrency.is_some()
        {
            l.inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Per-key limiters, created on first use, evicted when idle.
pub struct Limits {
    keys: moka::sync::Cache<String, Arc<Limiter>>,
    pub global: Arc<Limiter>,
}

impl Limits {
    pub fn new(global: &crate::config::GlobalLimits) -> Self {
        Self {
            keys: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(300))
                .build(),
            global: Arc::new(Limiter::new(
                global.rpm,
                global.tpm,
                global.max_concurrency,
                true,
            )),
        }
    }

    /// The limiter of a key; rebuilt when the key's limits changed.
    pub fn for_key(&self, key: &tollgate_schemas::records::KeyRecord) -> Option<Arc<Limiter>> {
        if key.rpm.is_none() && key.tpm.is_none() && key.max_concurrency.is_none() {
            return None;
        }
        let cache_key = format!(
            "{}:{:?}:{:?}:{:?}",
            key.key_id, key.rpm, key.tpm, key.max_concurrency
        );
        Some(self.keys.get_with(cache_key, || {
            Arc::new(Limiter::new(key.rpm, key.tpm, key.max_concurrency, false))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_refuses_with_retry_after() {
        let l = Arc::new(Limiter::new(Some(2), None, None, false));
        let _a = l.admit(0).unwrap();
        let _b = l.admit(0).unwrap();
        match l.admit(0) {
            Err(GatewayError::RateLimited {
                limit,
                retry_after,
                headers,
            }) => {
                assert_eq!(limit, LimitKind::Requests);
                assert!(
                    retry_after > Duration::from_secs(20) && retry_after <= Duration::from_secs(30)
                );
                assert_eq!(headers["x-ratelimit-limit-requests"], "2");
                assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn concurrency_slot_is_released_on_drop() {
        let l = Arc::new(Limiter::new(None, None, Some(1), false));
        let p = l.admit(0).unwrap();
        assert!(matches!(
            l.admit(0),
            Err(GatewayError::RateLimited {
                limit: LimitKind::Concurrency,
                ..
            })
        ));
        drop(p);
        assert!(l.admit(0).is_ok());
    }

    #[test]
    fn tpm_settles_with_actual_usage() {
        let l = Arc::new(Limiter::new(None, Some(100), None, false));
        drop(l.admit(50).unwrap());
        l.settle_tokens(50, 100); // used the whole minute's budget
        assert!(matches!(
            l.admit(10),
            Err(GatewayError::RateLimited {
                limit: LimitKind::Tokens,
                ..
            })
        ));
    }
}
