//! Quota enforcement with a local debit (ARCHITECTURE.md, "Local debit").
//!
//! Billing writes a [`QuotaState`] per tenant (credit balance or monthly
//! limit) and per key (budget) to the quota bucket. The gateway loads them
//! all at start-up and follows the bucket ([`crate::kv_follow`]), keeping the
//! newest snapshot of each (a snapshot whose `version` is not above the one
//! held is ignored, so a re-delivered or stale one can never roll the state
//! back).
//!
//! A snapshot says how much was left once billing had priced every usage
//! event up to stream position `priced_seq`. Billing runs behind the
//! requests, so on its own a snapshot lets a client spend for as long as
//! billing takes to catch up. The gateway closes that gap with its own
//! ledger per quota key: for every usage event it produces, it records
//! `(event id, cost, position)`, position unknown until the bus acknowledges
//! the event (the publisher's [`AckHook`](crate::publisher::AckHook)). Its
//! estimate of what is left is
//!
//! ```text
//! remaining(snapshot) − Σ cost of its own events not yet acknowledged
//!                     − Σ cost of its own events acknowledged after priced_seq
//! ```
//!
//! and a request is admitted while that is above zero, for the tenant and
//! for the key. There is no hold for `max_tokens`: admission does not know a
//! request's cost, only what earlier requests cost. When a newer snapshot
//! arrives, the entries at positions ≤ its `priced_seq` are dropped: billing
//! has counted them, and the gateway trusts billing for what billing has
//! priced.
//!
//! # The bound
//!
//! The debit is settled in [`Finish::record`](crate::pipeline), which runs
//! before the response completes: before the body is sent for a plain
//! response, before the stream's end for a streamed one. So a **sequential
//! client** (one request at a time) gets **at most one request past zero per
//! gateway replica**: the request admitted while the estimate was > 0 settles
//! its cost before the client sees its end, so the next one sees the
//! estimate ≤ 0 and is refused. The overshoot is at most that one request's
//! cost.
//!
//! **Concurrent clients** are not serialised: every request in flight was
//! admitted on an estimate that did not include the others' costs yet (they
//! are only known when they finish). Each in-flight request admitted while
//! the estimate was > 0 can overspend by its own cost, so the bound is
//! `concurrency × largest request cost`, per replica. A key's
//! `max_concurrency` bounds the first factor. Replicas do not see each
//! other's local debits, only billing's snapshots, so with `n` replicas the
//! bounds add up.
//!
//! # What is forgotten, and what is kept
//!
//! - Spend is tracked only for quota keys with a snapshot whose `remaining`
//!   is set; without a snapshot, or with `remaining = None` (unlimited), the
//!   request is admitted and nothing is kept.
//! - Entries not yet acknowledged stay until they are: they are in the
//!   publisher's channel or spool, which is bounded (`spool.max_bytes`; a
//!   full spool refuses work). An event the bus refuses for good (parked in
//!   `rejected/`) is never acknowledged and keeps counting locally until the
//!   process restarts; billing never prices it either, so this errs on the
//!   side of refusing.
//! - Acknowledged entries stay until a snapshot's `priced_seq` passes them.
//!   If billing stops writing snapshots they accumulate; past
//!   [`MAX_ACKED_ENTRIES`] per quota key the two oldest are merged into one
//!   at the later position (same total, dropped later: never an undercount).
//! - A restart forgets the ledger: spend on events billing has not priced
//!   yet is then only known once billing prices it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use parking_lot::Mutex;
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::records::{KeyRecord, QuotaScope, QuotaState, quota_key};

use crate::error::GatewayError;
use crate::kv_follow::{self, Bucket};

/// Acknowledged entries kept per quota key before the oldest are merged.
pub const MAX_ACKED_ENTRIES: usize = 4096;

/// Quota snapshots, their local ledgers, and the watch that follows the bucket.
#[derive(Clone)]
pub struct Quotas {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` for a table without a bucket ([`Quotas::detached`]).
    kv: Option<Bucket>,
    /// By KV key (`tenant.<id>`, `key.<id>`). No capacity bound and no TTL:
    /// a snapshot is never re-read on a miss, so an eviction would lift a
    /// refusal. Its size is the number of snapshots billing writes.
    tracked: moka::sync::Cache<String, Shared>,
    /// Event id → the ledgers holding its unacknowledged entry.
    pending: Mutex<HashMap<Arc<str>, Vec<Shared>>>,
    /// The watch opened by the initial load, for [`Quotas::watch`] to continue.
    initial: Mutex<Option<kv::Watch>>,
}

type Shared = Arc<Mutex<Tracked>>;

/// One quota key's newest snapshot and the spend the gateway has seen since.
struct Tracked {
    state: QuotaState,
    /// Event id → cost, for events the bus has not acknowledged yet.
    unacked: HashMap<Arc<str>, Decimal>,
    /// Position → cost, for acknowledged events after `state.priced_seq`.
    acked: BTreeMap<u64, Decimal>,
    /// Σ of both.
    spent: Decimal,
}

impl Tracked {
    fn new(state: QuotaState) -> Self {
        Self {
            state,
            unacked: HashMap::new(),
            acked: BTreeMap::new(),
            spent: Decimal::ZERO,
        }
    }

    fn limited(&self) -> bool {
        self.state.remaining.is_some()
    }

    /// `remaining − spent`; `None` = unlimited.
    fn estimate(&self) -> Option<Decimal> {
        self.state.remaining.map(|r| r - self.spent)
    }

    /// Takes a newer snapshot: drops what billing has priced.
    fn replace(&mut self, state: QuotaState) {
        self.state = state;
        if !self.limited() {
            self.unacked.clear();
            self.acked.clear();
            self.spent = Decimal::ZERO;
            return;
        }
        let keep = self
            .acked
            .split_off(&self.state.priced_seq.saturating_add(1));
        let priced = std::mem::replace(&mut self.acked, keep);
        self.spent -= priced.values().copied().sum::<Decimal>();
    }

    fn debit(&mut self, event_id: &Arc<str>, cost: Decimal) {
        if let Some(old) = self.unacked.insert(event_id.clone(), cost) {
            self.spent -= old;
        }
        self.spent += cost;
    }

    fn acknowledged(&mut self, event_id: &str, position: u64) {
        let Some(cost) = self.unacked.remove(event_id) else {
            return;
        };
        if position <= self.state.priced_seq {
            // Billing priced it before we heard back from the bus.
            self.spent -= cost;
            return;
        }
        *self.acked.entry(position).or_default() += cost;
        while self.acked.len() > MAX_ACKED_ENTRIES {
            let (Some((_, first)), Some((second, _))) =
                (self.acked.pop_first(), self.acked.first_key_value())
            else {
                break;
            };
            let second = *second;
            *self.acked.entry(second).or_default() += first;
        }
    }
}

impl Quotas {
    /// Opens (creating if needed) the quota bucket and loads every snapshot,
    /// if NATS answers within `timeout`. Otherwise the table starts with the
    /// snapshots `cached` (the on-disk cache) and [`Quotas::watch`] loads the
    /// bucket once NATS answers.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        bucket: &str,
        timeout: Duration,
        cached: Vec<(String, QuotaState)>,
    ) -> Self {
        let kv = Bucket::new(js, bucket);
        let (initial, loaded) = kv.load_at_start("quota", timeout).await;
        let quotas = Self {
            inner: Arc::new(Inner {
                kv: Some(kv),
                tracked: moka::sync::Cache::builder().build(),
                pending: Mutex::new(HashMap::new()),
                initial: Mutex::new(initial),
            }),
        };
        for (key, state) in cached {
            quotas.apply(&key, state);
        }
        for entry in loaded {
            quotas.on_entry(entry);
        }
        quotas.update_gauge();
        tracing::info!(
            snapshots = quotas.inner.tracked.entry_count(),
            "quota states loaded"
        );
        quotas
    }

    /// Quotas with no bucket behind them: snapshots come only from
    /// [`Quotas::apply`] (benchmarks and tests).
    pub fn detached() -> Self {
        Self {
            inner: Arc::new(Inner {
                kv: None,
                tracked: moka::sync::Cache::builder().build(),
                pending: Mutex::new(HashMap::new()),
                initial: Mutex::new(None),
            }),
        }
    }

    /// Follows the bucket until `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) {
        let Some(bucket) = &self.inner.kv else {
            return;
        };
        let Some(kv) = bucket.open(&shutdown).await else {
            return;
        };
        let initial = self.inner.initial.lock().take();
        kv_follow::follow(kv, "quota", initial, &shutdown, |entry| {
            self.on_entry(entry)
        })
        .await;
    }

    fn on_entry(&self, entry: kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<QuotaState>(&entry.value) {
                Ok(state) => {
                    self.apply(&entry.key, state);
                }
                Err(e) => {
                    tracing::warn!(key = %entry.key, error = %e, "unreadable quota state; ignored")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.inner.tracked.invalidate(&entry.key);
                self.update_gauge();
            }
        }
    }

    /// Every snapshot held, by KV key (for the on-disk cache).
    pub fn snapshots(&self) -> Vec<(String, QuotaState)> {
        self.inner
            .tracked
            .iter()
            .map(|(key, t)| ((*key).clone(), t.lock().state.clone()))
            .collect()
    }

    /// Takes snapshot `state` for KV key `key` unless the one held is as new
    /// or newer. Returns whether it was taken.
    pub fn apply(&self, key: &str, state: QuotaState) -> bool {
        if let Some(t) = self.inner.tracked.get(key) {
            let mut t = t.lock();
            if state.version <= t.state.version {
                tracing::debug!(
                    key,
                    version = state.version,
                    held = t.state.version,
                    "stale quota state ignored"
                );
                return false;
            }
            t.replace(state);
            return true;
        }
        self.inner
            .tracked
            .insert(key.to_owned(), Arc::new(Mutex::new(Tracked::new(state))));
        self.update_gauge();
        true
    }

    /// Refuses with [`GatewayError::InsufficientQuota`] when the tenant's or
    /// the key's estimate is ≤ 0 (the tenant is checked first). No snapshot, or an unlimited one, admits.
    pub fn check(&self, key: &KeyRecord) -> Result<(), GatewayError> {
        for (scope, id) in [
            (QuotaScope::Tenant, key.tenant_id.as_str()),
            (QuotaScope::Key, key.key_id.as_str()),
        ] {
            if self
                .estimate(scope, id)
                .is_some_and(|left| left <= Decimal::ZERO)
            {
                metrics::counter!("tollgate_gateway_quota_refusals_total", "scope" => scope.as_str())
                    .increment(1);
                return Err(GatewayError::InsufficientQuota { scope });
            }
        }
        Ok(())
    }

    /// What is left by the local estimate; `None` without a snapshot or when
    /// unlimited.
    pub fn estimate(&self, scope: QuotaScope, id: &str) -> Option<Decimal> {
        self.inner
            .tracked
            .get(&quota_key(scope, id))
            .and_then(|t| t.lock().estimate())
    }

    /// Debits `cost` of usage event `event_id` to the tenant's and the key's
    /// ledgers (those with a limited snapshot), position unknown until the bus
    /// acknowledges the event.
    pub fn debit(&self, key: &KeyRecord, event_id: &str, cost: Decimal) {
        self.debit_ids(&key.tenant_id, &key.key_id, event_id, cost);
    }

    /// [`Quotas::debit`] by tenant and key id (a restart re-debits the usage
    /// events its spool still holds, which billing has not priced).
    pub fn debit_ids(&self, tenant_id: &str, key_id: &str, event_id: &str, cost: Decimal) {
        if cost.is_zero() {
            return;
        }
        let mut holders = Vec::new();
        let id: Arc<str> = Arc::from(event_id);
        for (scope, owner) in [(QuotaScope::Tenant, tenant_id), (QuotaScope::Key, key_id)] {
            if let Some(t) = self.inner.tracked.get(&quota_key(scope, owner)) {
                let mut guard = t.lock();
                if guard.limited() {
                    guard.debit(&id, cost);
                    drop(guard);
                    holders.push(t);
                }
            }
        }
        if !holders.is_empty() {
            self.inner.pending.lock().insert(id, holders);
        }
    }

    /// The bus stored usage event `event_id` at `position`. Unknown ids (not
    /// debited here, or already acknowledged) cost one map lookup.
    pub fn acknowledged(&self, event_id: &str, position: u64) {
        let holders = self.inner.pending.lock().remove(event_id);
        for t in holders.into_iter().flatten() {
            t.lock().acknowledged(event_id, position);
        }
    }

    fn update_gauge(&self) {
        self.inner.tracked.run_pending_tasks();
        metrics::gauge!("tollgate_gateway_quota_snapshots")
            .set(self.inner.tracked.entry_count() as f64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use chrono::Utc;
    use tollgate_schemas::records::QuotaLevel;

    fn state(version: u64, remaining: Option<&str>, priced_seq: u64) -> QuotaState {
        QuotaState {
            scope: QuotaScope::Tenant,
            id: "acme".into(),
            tenant_id: "acme".into(),
            state: QuotaLevel::Ok,
            remaining: remaining.map(|r| r.parse().unwrap()),
            limit: None,
            threshold: None,
            version,
            priced_seq,
            updated_at: Utc::now(),
        }
    }

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn ledger_follows_acks_and_priced_seq() {
        let mut t = Tracked::new(state(1, Some("1"), 10));
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("a".into(), "b".into(), "c".into());
        t.debit(&a, d("0.25"));
        t.debit(&b, d("0.25"));
        t.debit(&c, d("0.25"));
        assert_eq!(t.estimate(), Some(d("0.25")));
        // Acknowledged at or below what billing priced: dropped at once.
        t.acknowledged("a", 10);
        assert_eq!(t.estimate(), Some(d("0.5")));
        t.acknowledged("b", 11);
        t.acknowledged("c", 12);
        t.acknowledged("c", 12);
        assert_eq!(t.estimate(), Some(d("0.5")));
        // Billing priced b but not c; remaining says so.
        t.replace(state(2, Some("0.75"), 11));
        assert_eq!(t.estimate(), Some(d("0.5")));
        t.replace(state(3, Some("0.5"), 12));
        assert_eq!(t.estimate(), Some(d("0.5")));
        assert!(t.acked.is_empty() && t.unacked.is_empty());
        // Unlimited forgets everything.
        t.debit(&a, d("1"));
        t.replace(state(4, None, 12));
        assert_eq!(t.estimate(), None);
        assert_eq!(t.spent, Decimal::ZERO);
    }

    #[test]
    fn acked_entries_are_bounded_without_losing_spend() {
        let mut t = Tracked::new(state(1, Some("1000000"), 0));
        let n = MAX_ACKED_ENTRIES as u64 + 100;
        for i in 1..=n {
            let id: Arc<str> = i.to_string().into();
            t.debit(&id, d("1"));
            t.acknowledged(&id, i);
        }
        assert_eq!(t.acked.len(), MAX_ACKED_ENTRIES);
        assert_eq!(t.spent, Decimal::from(n));
        assert_eq!(t.acked.values().copied().sum::<Decimal>(), Decimal::from(n));
        // Merged entries are dropped no earlier than their last position.
        t.replace(state(2, Some("1000000"), n - 1));
        assert_eq!(t.spent, Decimal::ONE);
    }
}
