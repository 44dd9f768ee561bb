//! The price book in force, followed from billing's prices bucket.
//!
//! Billing writes each price-book version under its own key
//! ([`price_book_key`](tollgate_schemas::records::price_book_key)) and never
//! rewrites one. The gateway loads every version at start-up, then follows
//! the bucket ([`crate::kv_follow`]), keeping every version it has seen. The
//! book in force is the highest version whose `effective_from` is unset or
//! has passed; a ticker re-evaluates that every [`TICK`], so a version
//! written ahead of time takes over on time (within a tick), and one written
//! for now within the watch's latency. Both are well inside the 2 s
//! ARCHITECTURE.md promises. While the bucket holds no version in force, the
//! config's `[prices]` book is used, as before billing existed.
//!
//! The book is read once per request, when its usage is priced
//! ([`AppState::price_book`](crate::state::AppState::price_book)): a request finishing just after a switch is
//! priced at the new version, and its usage event says so (`price_version`),
//! which is what billing prices it at.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::records::PriceBook;

use crate::kv_follow::{self, Bucket};

/// How often the book in force is re-evaluated against the clock.
pub const TICK: Duration = Duration::from_millis(250);

/// Every price-book version seen in the bucket, and the watch that follows it.
pub struct PriceFeed {
    kv: Bucket,
    /// The watch opened by the initial load, for [`PriceFeed::run`] to continue.
    watch: Mutex<Option<kv::Watch>>,
    versions: Arc<Mutex<BTreeMap<u64, Arc<PriceBook>>>>,
    fallback: Arc<PriceBook>,
}

impl PriceFeed {
    /// Opens (creating if needed) the prices bucket and loads every version
    /// in it, if NATS answers within `timeout`; else the versions `cached`
    /// (the on-disk cache) serve until [`PriceFeed::run`] loads the bucket.
    /// `fallback` (the config's book) is in force until a version is.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        fallback: PriceBook,
        timeout: Duration,
        cached: Vec<PriceBook>,
    ) -> Self {
        let kv = Bucket::new(js, bucket);
        let (watch, loaded) = kv.load_at_start("prices", timeout).await;
        let versions = cached
            .into_iter()
            .map(|book| (book.version, Arc::new(book)))
            .collect();
        let feed = Self {
            kv,
            watch: Mutex::new(watch),
            versions: Arc::new(Mutex::new(versions)),
            fallback: Arc::new(fallback),
        };
        for entry in loaded {
            feed.apply(&entry);
        }
        feed
    }

    /// Reads every version known, now and after [`PriceFeed::run`] took the
    /// feed (for the on-disk cache).
    pub fn versions(&self) -> impl Fn() -> Vec<PriceBook> + Send + 'static {
        let versions = Arc::clone(&self.versions);
        move || {
            versions
                .lock()
                .values()
                .map(|b| PriceBook::clone(b))
                .collect()
        }
    }

    /// The book in force at `now`.
    pub fn in_force(&self, now: DateTime<Utc>) -> Arc<PriceBook> {
        in_force(&self.versions.lock(), now).unwrap_or_else(|| self.fallback.clone())
    }

    /// Follows the bucket and the clock until `shutdown`, writing the book in
    /// force to `prices` whenever it changes.
    pub async fn run(self, prices: Arc<RwLock<Arc<PriceBook>>>, shutdown: CancellationToken) {
        install(&prices, self.in_force(Utc::now()));
        let watch = self.watch.lock().take();
        let follow = async {
            let Some(store) = self.kv.open(&shutdown).await else {
                return;
            };
            kv_follow::follow(store, "prices", watch, &shutdown, |entry| {
                self.apply(&entry);
                install(&prices, self.in_force(Utc::now()));
            })
            .await;
        };
        let tick = async {
            let mut ticker = tokio::time::interval(TICK);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = ticker.tick() => install(&prices, self.in_force(Utc::now())),
                }
            }
        };
        tokio::join!(follow, tick);
    }

    /// Records one bucket entry; unreadable ones are logged and skipped.
    fn apply(&self, entry: &kv::Entry) {
        if !entry.key.starts_with("v.") {
            return;
        }
        match entry.operation {
            kv::Operation::Put => match decode(&entry.value) {
                Ok(book) => {
                    self.versions.lock().insert(book.version, Arc::new(book));
                }
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "unreadable price book; ignored")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(version) = entry
                    .key
                    .strip_prefix("v.")
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    self.versions.lock().remove(&version);
                }
            }
        }
    }
}

/// The highest version in force at `now`, if any.
pub fn in_force(
    versions: &BTreeMap<u64, Arc<PriceBook>>,
    now: DateTime<Utc>,
) -> Option<Arc<PriceBook>> {
    versions
        .values()
        .rev()
        .find(|b| b.effective_from.is_none_or(|t| t <= now))
        .cloned()
}

/// A price book from the bucket, with every price valid.
pub fn decode(bytes: &[u8]) -> Result<PriceBook, String> {
    let book: PriceBook = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    for (model, price) in &book.models {
        price
            .validate()
            .map_err(|e| format!("model {model}: {e}"))?;
    }
    Ok(book)
}

/// Makes `book` the one requests are priced with, if it is not already.
fn install(prices: &RwLock<Arc<PriceBook>>, book: Arc<PriceBook>) {
    let mut current = match prices.write() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if Arc::ptr_eq(&current, &book) {
        return;
    }
    tracing::info!(
        version = book.version,
        previous = current.version,
        effective_from = ?book.effective_from,
        "price book version now in force"
    );
    metrics::gauge!("tollgate_gateway_price_book_version").set(book.version as f64);
    *current = book;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn book(version: u64, effective_from: Option<DateTime<Utc>>) -> Arc<PriceBook> {
        Arc::new(PriceBook {
            version,
            models: BTreeMap::new(),
            effective_from,
        })
    }

    #[test]
    fn the_highest_version_already_effective_is_in_force() {
        let now = Utc::now();
        let mut versions = BTreeMap::new();
        assert!(in_force(&versions, now).is_none());
        versions.insert(1, book(1, None));
        versions.insert(2, book(2, Some(now - chrono::Duration::seconds(5))));
        versions.insert(3, book(3, Some(now + chrono::Duration::seconds(5))));
        assert_eq!(in_force(&versions, now).unwrap().version, 2);
        assert_eq!(
            in_force(&versions, now + chrono::Duration::seconds(5))
                .unwrap()
                .version,
            3
        );
        let mut only_future = BTreeMap::new();
        only_future.insert(9, book(9, Some(now + chrono::Duration::seconds(1))));
        assert!(in_force(&only_future, now).is_none());
    }

    #[test]
    fn invalid_prices_are_refused() {
        let ok =
            r#"{"version":2,"models":{"m":{"input_per_million":"1","output_per_million":"2"}}}"#;
        assert_eq!(decode(ok.as_bytes()).unwrap().version, 2);
        let bad = r#"{"version":2,"models":{"m":{"input_per_million":"0.1234567","output_per_million":"2"}}}"#;
        assert!(decode(bad.as_bytes()).is_err());
        assert!(decode(b"not json").is_err());
    }
}
