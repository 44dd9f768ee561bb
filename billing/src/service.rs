//! The billing service's state and its three loops: pricing usage events,
//! the ticker (grant expiry, deferred grants, period ends) and the webhook
//! worker (in [`crate::webhooks`]).
//!
//! # Pricing, exactly once
//!
//! Billing reads usage events from its own durable consumer. For each batch it
//! (1) decodes the events, (2) asks ClickHouse which of their ids already have
//! a debit (`entry_id` = event id), (3) prices the new ones at the price-book
//! version each carries, (4) inserts their debits, (5) applies them to the
//! in-memory ledgers, (6) writes the quota snapshots of every tenant and key it
//! touched, with the stream position priced up to, and (7) acks. A crash
//! anywhere before (7) redelivers the batch; step (2) then finds the debits
//! already stored and skips them, and the in-memory state is rebuilt from
//! ClickHouse at start, so a balance never counts an event twice. A replay
//! of the whole stream or a re-publish after the dedup window is the same
//! case. Billing is a single process (one writer of the ledger): the check in
//! (2) and the update in (5) are not atomic across processes.
//!
//! # What lives where
//!
//! See [`crate::store`]. The in-memory [`State`] is a cache of durable
//! records: everything in it is rebuilt at start from JetStream KV and the
//! ClickHouse ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use clickhouse::Client;
use rust_decimal::Decimal;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tollgate_schemas::Names;
use tollgate_schemas::bus::{
    ConsumerSpec, Delivery, EventBus, EventConsumer, JetStreamBus, StartFrom, StreamSettings,
    in_progress, lane_of,
};
use tollgate_schemas::events::{Event, EventKind, UsageEvent};
use tollgate_schemas::money::to_ch_decimal;
use tollgate_schemas::records::{
    KeyRecord, PriceBook, QuotaScope, QuotaState, price_book_key, quota_key,
};

use crate::config::Config;
use crate::error::Error;
use crate::invoice::{self, PricedUsage};
use crate::ledger::{Grant, TenantLedger};
use crate::priced::Priced;
use crate::quota;
use crate::store::{
    self, BillingMode, Invoice, InvoiceLineRow, InvoiceRow, InvoiceStatus, KIND_DEBIT, KIND_EXPIRY,
    KIND_GRANT, LedgerRow, Tenant,
};
use crate::trace::PricingTrace;
use crate::webhooks::Webhooks;

/// Everything billing knows, rebuilt from durable state at start.
#[derive(Default)]
pub struct State {
    pub tenants: BTreeMap<String, Tenant>,
    /// Keys by key id.
    pub keys: BTreeMap<String, KeyRecord>,
    /// Key id by secret hash, for the tenant API.
    pub key_by_hash: HashMap<String, String>,
    pub grants: BTreeMap<String, Grant>,
    pub ledgers: HashMap<String, TenantLedger>,
    /// Lifetime spend per key (key budgets).
    pub key_spend: HashMap<String, Decimal>,
    /// Spend per tenant in the calendar month starting at `month_start`.
    pub month_start: DateTime<Utc>,
    pub month_spend: HashMap<String, Decimal>,
    pub prices: BTreeMap<u64, PriceBook>,
    /// Last snapshot written per quota key.
    pub quota: HashMap<String, QuotaState>,
    pub invoices: BTreeMap<String, Invoice>,
    /// Per lane (Kafka partition; JetStream has only lane 0): every event
    /// up to this position has been handled (usage priced, other kinds
    /// skipped), contiguously. See [`crate::priced`] and [`State::priced_for`].
    pub priced: Priced,
    /// The lane each tenant's events travel in (events are keyed by tenant).
    pub tenant_lane: HashMap<String, u32>,
    /// Tenants and keys whose last snapshot's `priced_seq` is below one of
    /// their events that billing has priced (a hole below it held the marker
    /// back): by tenant or key id, the highest such position. Their snapshots
    /// are rewritten once the marker passes it, or a gateway would keep
    /// counting those events on top of billing's figure.
    pub behind_tenants: HashMap<String, u64>,
    pub behind_keys: HashMap<String, (String, u64)>,
    /// A ledger insert failed in a way that may have stored it anyway: the
    /// in-memory state is rebuilt from ClickHouse before pricing again.
    pub needs_reload: bool,
    pub version: u64,
}

pub struct Billing {
    pub config: Config,
    pub names: Names,
    /// The events bus (JetStream or Kafka, per `bus` in the config).
    pub bus: Arc<dyn EventBus>,
    /// ClickHouse, with the billing database selected.
    pub ch: Client,
    pub kv_billing: kv::Store,
    pub kv_keys: kv::Store,
    pub kv_prices: kv::Store,
    pub kv_quota: kv::Store,
    pub webhooks: Webhooks,
    pub admin_key: String,
    pub thresholds: Vec<Decimal>,
    pub state: Mutex<State>,
    /// Tenant ids, readable without the async lock (webhook routes).
    pub tenant_ids: std::sync::RwLock<BTreeSet<String>>,
}

pub fn month_start(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(t)
}

pub fn next_month(t: DateTime<Utc>) -> DateTime<Utc> {
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().unwrap_or(t)
}

/// Whole seconds: ClickHouse's `DateTime` resolution, so period bounds
/// compare the same in Rust and SQL.
pub fn trunc_secs(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

fn dec(s: &str) -> crate::error::Result<Decimal> {
    s.parse::<Decimal>()
        .map_err(|e| Error::internal(format!("decimal {s:?} from ClickHouse"), e))
}

fn ch_dec(d: Decimal) -> crate::error::Result<i128> {
    to_ch_decimal(d).map_err(|e| Error::bug(e.to_string()))
}

fn now_micros() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0)
}

impl State {
    fn next_version(&mut self) -> u64 {
        self.version = (self.version + 1).max(now_micros());
        self.version
    }

    pub fn ledger(&mut self, tenant: &str) -> &mut TenantLedger {
        self.ledgers.entry(tenant.to_owned()).or_default()
    }

    /// The price-book version in force at `at`: the highest whose
    /// `effective_from` has passed.
    pub fn book_at(&self, at: DateTime<Utc>) -> Option<&PriceBook> {
        self.prices
            .values()
            .rev()
            .find(|b| b.effective_from.is_none_or(|e| e <= at))
    }

    /// Records that *everything* up to `position` of its lane is handled (a
    /// floor from a trusted source, e.g. the bus's committed floor), and that
    /// `tenant`'s events travel in that lane.
    pub fn observe_priced(&mut self, tenant: &str, position: u64) {
        if position == 0 {
            return;
        }
        self.priced.raise(&[position]);
        self.tenant_lane
            .insert(tenant.to_owned(), lane_of(position));
    }

    /// Records that billing is done with the one message at `position`, an
    /// event of `tenant` (priced, found already debited, or skipped).
    pub fn handled(&mut self, tenant: &str, position: u64) {
        if position == 0 {
            return;
        }
        self.priced.handled(position);
        self.tenant_lane
            .insert(tenant.to_owned(), lane_of(position));
    }

    /// The highest marker of any lane; for display and the gauge.
    pub fn priced_seq(&self) -> u64 {
        self.priced.max_floor()
    }

    /// The `priced_seq` of `tenant`'s (and its keys') quota snapshots: the
    /// priced position of the tenant's lane. Gateways compare it only with
    /// positions of the tenant's own events, which share that lane (Kafka
    /// keys by tenant; JetStream has one lane), so the comparison is exact.
    /// A tenant billing has not seen an event of gets lane 0's: exact if it
    /// is in lane 0, and below every position of any other lane, which only
    /// makes a gateway keep its local debit longer (errs toward refusing).
    pub fn priced_for(&self, tenant: &str) -> u64 {
        let lane = self.tenant_lane.get(tenant).copied().unwrap_or(0);
        self.priced.floor(lane)
    }

    /// Whether every lane is priced up to `heads` (indexed by lane).
    pub fn priced_all(&self, heads: &[u64]) -> bool {
        self.priced.covers(heads)
    }

    /// Notes that `tenant` and `key` had an event at `position` in this
    /// batch; see [`State::behind_tenants`].
    fn note_event(&mut self, tenant: &str, key: &str, position: u64) {
        let t = self.behind_tenants.entry(tenant.to_owned()).or_default();
        *t = (*t).max(position);
        let k = self
            .behind_keys
            .entry(key.to_owned())
            .or_insert_with(|| (tenant.to_owned(), 0));
        k.1 = k.1.max(position);
    }

    /// The tenants and keys in `behind_*` that the marker has now passed
    /// (their snapshots must be rewritten); removes them.
    fn caught_up(&mut self) -> (Vec<String>, Vec<String>) {
        let tenants: Vec<String> = self
            .behind_tenants
            .iter()
            .filter(|(t, p)| **p <= self.priced_for(t))
            .map(|(t, _)| t.clone())
            .collect();
        for t in &tenants {
            self.behind_tenants.remove(t);
        }
        let keys: Vec<String> = self
            .behind_keys
            .iter()
            .filter(|(_, (t, p))| *p <= self.priced_for(t))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            self.behind_keys.remove(k);
        }
        (tenants, keys)
    }

    fn roll_month(&mut self, now: DateTime<Utc>) {
        let m = month_start(now);
        if m != self.month_start {
            self.month_start = m;
            self.month_spend.clear();
        }
    }
}

impl Billing {
    /// Connects, migrates, opens every bucket and rebuilds the state.
    pub async fn open(config: Config) -> crate::error::Result<Arc<Self>> {
        let admin_key = config.admin_key()?;
        let names = Names::namespaced(&config.nats.namespace);
        let jsbus =
            JetStreamBus::connect(&config.nats.url, names.clone(), StreamSettings::default())
                .await?;
        let js = jsbus.jetstream().clone();
        let bus = tollgate_schemas::bus::events_bus(config.bus, &jsbus, &config.kafka).await?;
        let mut root = Client::default()
            .with_url(&config.clickhouse.url)
            .with_user(&config.clickhouse.user)
            .with_validation(false);
        if !config.clickhouse.password.is_empty() {
            root = root.with_password(&config.clickhouse.password);
        }
        let db = config.clickhouse.database.clone();
        tollgate_schemas::migrations::apply(&root, &db).await?;
        let ch = root.with_database(&db);
        let kv_billing = tollgate_schemas::kv::ensure(&js, &names.kv_billing, 1).await?;
        let kv_keys = tollgate_schemas::kv::ensure(&js, &names.kv_keys, 1).await?;
        let kv_prices = tollgate_schemas::kv::ensure(&js, &names.kv_prices, 1).await?;
        let kv_quota = tollgate_schemas::kv::ensure(&js, &names.kv_quota, 1).await?;
        let webhooks = Webhooks::open(
            js.clone(),
            &names,
            ch.clone(),
            &db,
            config.webhooks.to_webhook_config(),
        )
        .await?;
        let billing = Arc::new(Self {
            thresholds: config.thresholds(),
            config,
            names,
            bus,
            ch,
            kv_billing,
            kv_keys,
            kv_prices,
            kv_quota,
            webhooks,
            admin_key,
            state: Mutex::new(State::default()),
            tenant_ids: std::sync::RwLock::new(BTreeSet::new()),
        });
        billing.load().await?;
        Ok(billing)
    }

    async fn load(&self) -> crate::error::Result<()> {
        let mut st = self.state.lock().await;
        self.load_into(&mut st).await
    }

    /// Fills `st` (a fresh state, or one carrying only the marker) from
    /// KV, ClickHouse and the bus.
    async fn load_into(&self, st: &mut State) -> crate::error::Result<()> {
        let now = Utc::now();
        st.month_start = month_start(now);
        for (_, book) in store::list_json::<PriceBook>(&self.kv_prices, "v.").await? {
            st.prices.insert(book.version, book);
        }
        if st.prices.is_empty() && !self.config.prices.models.is_empty() {
            let book = PriceBook {
                version: 1,
                models: self.config.prices.models.clone(),
                effective_from: None,
            };
            store::put_json(&self.kv_prices, &price_book_key(1), &book).await?;
            tracing::info!(models = book.models.len(), "seeded price-book version 1");
            st.prices.insert(1, book);
        }
        for (_, t) in store::list_json::<Tenant>(&self.kv_billing, "tenant.").await? {
            st.tenants.insert(t.id.clone(), t);
        }
        for (_, g) in store::list_json::<Grant>(&self.kv_billing, "grant.").await? {
            st.grants.insert(g.id.clone(), g);
        }
        for (_, i) in store::list_json::<Invoice>(&self.kv_billing, "invoice.").await? {
            st.invoices.insert(i.id.clone(), i);
        }
        for (hash, k) in store::list_json::<KeyRecord>(&self.kv_keys, "").await? {
            st.key_by_hash.insert(hash, k.key_id.clone());
            st.keys.insert(k.key_id.clone(), k);
        }
        for (key, q) in store::list_json::<QuotaState>(&self.kv_quota, "").await? {
            st.version = st.version.max(q.version);
            // Only the lane is taken from a stored snapshot: its marker may
            // come from a billing that advanced it past holes. The marker
            // itself starts from the bus's committed floor (below), which
            // never passes an event no billing has handled.
            if q.priced_seq != 0 {
                st.tenant_lane
                    .insert(q.tenant_id.clone(), lane_of(q.priced_seq));
            }
            st.quota.insert(key, q);
        }
        match self.bus.committed(&self.config.consumer.durable).await {
            Ok(floors) => st.priced.raise(&floors),
            Err(e) => {
                tracing::warn!(error = %e, "committed floor unavailable; the marker starts lower")
            }
        }
        // Grants are in KV first; make sure ClickHouse has every one (idempotent).
        let rows: Vec<LedgerRow> = st
            .grants
            .values()
            .map(grant_row)
            .collect::<Result<_, _>>()?;
        self.insert_ledger(&rows).await?;

        // The ledgers, from ClickHouse.
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct DebitAt {
            tenant_id: String,
            at: u32,
            amount: String,
        }
        let debits = self
            .ch
            .query(
                "SELECT tenant_id, toUInt32(occurred_at) AS at, toString(-sum(amount)) AS amount
                 FROM ledger_entries FINAL WHERE kind = 'debit'
                 GROUP BY tenant_id, occurred_at ORDER BY tenant_id, occurred_at",
            )
            .fetch_all::<DebitAt>()
            .await?;
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Sum {
            id: String,
            amount: String,
        }
        let expiries = self
            .ch
            .query(
                "SELECT grant_id AS id, toString(-sum(amount)) AS amount
                 FROM ledger_entries FINAL WHERE kind = 'expiry' GROUP BY grant_id",
            )
            .fetch_all::<Sum>()
            .await?;
        let key_spend = self
            .ch
            .query(
                "SELECT key_id AS id, toString(-sum(amount)) AS amount
                 FROM ledger_entries FINAL WHERE kind = 'debit' GROUP BY key_id",
            )
            .fetch_all::<Sum>()
            .await?;
        let month = self
            .ch
            .query(
                "SELECT tenant_id AS id, toString(-sum(amount)) AS amount
                 FROM ledger_entries FINAL WHERE kind = 'debit' AND occurred_at >= toDateTime(?, 'UTC')
                 GROUP BY tenant_id",
            )
            .bind(store::ch_time(st.month_start))
            .fetch_all::<Sum>()
            .await?;
        let mut per_tenant: HashMap<String, Vec<(DateTime<Utc>, Decimal)>> = HashMap::new();
        for d in debits {
            let at = DateTime::from_timestamp(i64::from(d.at), 0).unwrap_or(now);
            per_tenant
                .entry(d.tenant_id)
                .or_default()
                .push((at, dec(&d.amount)?));
        }
        let expiry_of: HashMap<String, Decimal> = expiries
            .into_iter()
            .map(|s| Ok((s.id, dec(&s.amount)?)))
            .collect::<crate::error::Result<_>>()?;
        let tenants: BTreeSet<String> = st
            .tenants
            .keys()
            .cloned()
            .chain(per_tenant.keys().cloned())
            .collect();
        for tenant in tenants {
            let grants: Vec<Grant> = st
                .grants
                .values()
                .filter(|g| g.tenant_id == tenant)
                .cloned()
                .collect();
            let exp: Vec<(String, Decimal)> = grants
                .iter()
                .filter_map(|g| expiry_of.get(&g.id).map(|a| (g.id.clone(), *a)))
                .collect();
            let debits = per_tenant.remove(&tenant).unwrap_or_default();
            let ledger = crate::ledger::replay_at(grants, debits, exp, now);
            st.ledgers.insert(tenant, ledger);
        }
        for s in key_spend {
            st.key_spend.insert(s.id, dec(&s.amount)?);
        }
        for s in month {
            st.month_spend.insert(s.id, dec(&s.amount)?);
        }
        if let Ok(mut ids) = self.tenant_ids.write() {
            *ids = st.tenants.keys().cloned().collect();
        }
        let tenants: Vec<String> = st.tenants.keys().cloned().collect();
        let keys: Vec<String> = st.keys.keys().cloned().collect();
        // `touched`: every snapshot is rewritten with this process's marker,
        // so none keeps one it cannot vouch for.
        self.refresh_quota(st, &tenants, &keys, true).await?;
        tracing::info!(
            tenants = st.tenants.len(),
            keys = st.keys.len(),
            grants = st.grants.len(),
            price_versions = st.prices.len(),
            priced_seq = st.priced_seq(),
            "billing state loaded"
        );
        Ok(())
    }

    pub async fn insert_ledger(&self, rows: &[LedgerRow]) -> crate::error::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.ch.insert::<LedgerRow>("ledger_entries").await?;
        for r in rows {
            insert.write(r).await?;
        }
        insert.end().await?;
        Ok(())
    }

    // ---------------------------------------------------------------- pricing

    /// Billing's consumer: every event kind (see [`crate::priced`] for why
    /// not only usage), a short `ack_wait` so what a crashed billing held
    /// comes back within seconds, and room for a few batches.
    pub fn consumer_spec(&self) -> ConsumerSpec {
        ConsumerSpec {
            durable: Some(self.config.consumer.durable.clone()),
            filter: self.names.events_filter(),
            start: StartFrom::Beginning,
            ack_wait: self.config.ack_wait(),
            max_in_flight: self.config.consumer.max_batch * 4,
        }
    }

    /// Prices usage events until `shutdown`.
    ///
    /// A batch is held until it is priced: on failure (ClickHouse down) it is
    /// retried with backoff, never dropped and never acknowledged, with
    /// in-progress heartbeats so that `ack_wait` does not hand it to anyone
    /// else meanwhile. Holding it also keeps the loop from pricing later
    /// events first. On shutdown what is held is released (nak), so the
    /// next billing gets it at once instead of after `ack_wait`.
    pub async fn run_pricing(self: Arc<Self>, shutdown: CancellationToken) {
        let spec = self.consumer_spec();
        let mut backoff = Duration::from_millis(100);
        let mut consumer: Option<Box<dyn EventConsumer>> = None;
        let mut next_floor = tokio::time::Instant::now();
        while !shutdown.is_cancelled() {
            let c = match consumer.as_mut() {
                Some(c) => c,
                None => match self.bus.consumer(spec.clone()).await {
                    Ok(c) => {
                        next_floor = tokio::time::Instant::now();
                        consumer.insert(c)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "billing consumer unavailable; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            // Holes nobody will fill (committed by an earlier process,
            // removed from the stream) are closed by the bus's floor.
            if tokio::time::Instant::now() >= next_floor {
                if self.state.lock().await.priced.has_hole() {
                    self.sync_committed_floor().await;
                }
                next_floor = tokio::time::Instant::now() + FLOOR_EVERY;
            }
            // Not cancelled by shutdown: a fetch returns within max_wait_ms,
            // and what it took must be released, not dropped.
            let fetched = c
                .fetch(
                    self.config.consumer.max_batch,
                    Duration::from_millis(self.config.consumer.max_wait_ms),
                )
                .await;
            let batch = match fetched {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "billing fetch failed; retrying");
                    consumer = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if batch.is_empty() {
                continue;
            }
            let (prepared, tokens) = self.prepare(batch);
            if shutdown.is_cancelled() {
                release(c.as_mut(), tokens).await;
                break;
            }
            let Some(tokens) = self
                .price_held(c.as_mut(), &prepared, tokens, &spec, &shutdown)
                .await
            else {
                break;
            };
            if let Err(e) = c.commit(tokens).await {
                tracing::warn!(error = %e, "billing ack failed; the batch will be redelivered and deduplicated");
            }
        }
        // Whatever the client took from the server and nobody fetched yet
        // would otherwise wait for ack_wait: give it back too.
        if let Some(c) = consumer.as_mut() {
            for _ in 0..4 {
                match c.fetch(spec.max_in_flight, Duration::from_millis(20)).await {
                    Ok(b) if !b.is_empty() => {
                        release(c.as_mut(), b.into_iter().map(|d| d.commit).collect()).await;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Raises the marker to the bus's committed floor and rewrites the
    /// snapshots that were waiting for it.
    async fn sync_committed_floor(&self) {
        let floors = match self.bus.committed(&self.config.consumer.durable).await {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "committed floor unavailable");
                return;
            }
        };
        let mut st = self.state.lock().await;
        let before = st.priced.clone();
        st.priced.raise(&floors);
        if st.priced == before {
            return;
        }
        let (tenants, keys) = st.caught_up();
        if let Err(e) = self.refresh_quota(&mut st, &tenants, &keys, true).await {
            tracing::warn!(error = %format!("{e:#}"), "quota refresh after the committed floor failed");
        }
        metrics::gauge!("tollgate_billing_priced_seq").set(st.priced_seq() as f64);
    }

    /// Step (1): decodes a batch; returns it with its commit tokens.
    fn prepare(&self, batch: Vec<Delivery>) -> (Prepared, Vec<tollgate_schemas::bus::CommitToken>) {
        let mut tokens = Vec::with_capacity(batch.len());
        let mut p = Prepared::default();
        for d in batch {
            let tenant = d.subject.rsplit('.').next().unwrap_or_default().to_owned();
            let kind = self.names.kind_of_subject(&d.subject);
            if kind == Some(EventKind::Usage) {
                match Event::from_json(&d.payload) {
                    Ok(Event::Usage(u)) => {
                        p.events.push(Priceable {
                            event: u,
                            position: d.position,
                            traceparent: d.header("traceparent").map(str::to_owned),
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // The meter parks poison events in the dead-letter
                        // stream; billing skips them (they carry no
                        // trustworthy amount).
                        tracing::warn!(subject = %d.subject, error = %e, "undecodable usage event skipped");
                        metrics::counter!("tollgate_billing_events_skipped_total").increment(1);
                    }
                }
            }
            // Request and token-count events are never billed: handled as
            // soon as seen.
            p.positions.push((tenant, d.position));
            tokens.push(d.commit);
        }
        (p, tokens)
    }

    /// Prices `prepared` until it succeeds, heartbeating `tokens`; `None`
    /// when shutdown came first (the tokens were released).
    async fn price_held(
        &self,
        c: &mut dyn EventConsumer,
        prepared: &Prepared,
        tokens: Vec<tollgate_schemas::bus::CommitToken>,
        spec: &ConsumerSpec,
        shutdown: &CancellationToken,
    ) -> Option<Vec<tollgate_schemas::bus::CommitToken>> {
        let every = spec.progress_every();
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attempt = 0u32;
        loop {
            let result = {
                let work = self.price_batch(prepared);
                tokio::pin!(work);
                loop {
                    tokio::select! {
                        r = &mut work => break r,
                        _ = beat.tick() => heartbeat(&tokens).await,
                    }
                }
            };
            let Err(e) = result else {
                return Some(tokens);
            };
            // Nothing acked: the batch stays here and is retried; debits
            // already stored are skipped by step (2).
            tracing::error!(error = %format!("{e:#}"), attempt, "pricing a batch failed; retrying it");
            metrics::counter!("tollgate_billing_pricing_errors_total").increment(1);
            let until = tokio::time::Instant::now()
                + Duration::from_millis(100u64 << attempt.min(5)).min(Duration::from_secs(2));
            attempt += 1;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => {
                        release(c, tokens).await;
                        return None;
                    }
                    () = tokio::time::sleep_until(until) => break,
                    _ = beat.tick() => heartbeat(&tokens).await,
                }
            }
        }
    }

    /// Steps (2) to (6) of the module docs, for one attempt at a batch.
    async fn price_batch(&self, batch: &Prepared) -> crate::error::Result<()> {
        if self.state.lock().await.needs_reload {
            self.reload().await?;
        }
        let started = std::time::Instant::now();
        let mut trace = PricingTrace::start(batch.positions.len());
        for p in &batch.events {
            trace.event(p.event.meta.id.to_string(), p.traceparent.as_deref());
        }
        // (2) which of these are already debited?
        let mut seen: BTreeSet<String> = BTreeSet::new();
        if !batch.events.is_empty() {
            let ids: Vec<String> = batch
                .events
                .iter()
                .map(|p| p.event.meta.id.to_string())
                .collect();
            let tenants: BTreeSet<&str> = batch
                .events
                .iter()
                .map(|p| p.event.meta.tenant_id.as_str())
                .collect();
            let existing: Vec<String> = self
                .ch
                .query(
                    // `has` rather than `IN ?`: 18.16 reads a bound array
                    // after IN as one Array value.
                    "SELECT entry_id FROM ledger_entries WHERE has(?, tenant_id) AND has(?, entry_id)",
                )
                .bind(tenants.into_iter().collect::<Vec<_>>())
                .bind(&ids)
                .fetch_all::<String>()
                .await?;
            seen.extend(existing);
        }
        let mut st = self.state.lock().await;
        let now = Utc::now();
        st.roll_month(now);
        // (3) price
        let mut rows = Vec::new();
        let mut priced: Vec<(&UsageEvent, Decimal, u64)> = Vec::new();
        for p in &batch.events {
            let e = &p.event;
            let id = e.meta.id.to_string();
            if !seen.insert(id.clone()) {
                metrics::counter!("tollgate_billing_duplicates_skipped_total").increment(1);
                continue;
            }
            let (version, cost) = match st.prices.get(&e.price_version) {
                Some(book) => (book.version, book.cost(&e.requested_model, &e.tokens)),
                None => {
                    metrics::counter!("tollgate_billing_price_version_unknown_total").increment(1);
                    match st.book_at(e.meta.occurred_at) {
                        Some(book) => (book.version, book.cost(&e.requested_model, &e.tokens)),
                        None => (0, e.cost),
                    }
                }
            };
            if cost != e.cost {
                tracing::warn!(event_id = %id, gateway = %e.cost, billing = %cost, version, "gateway and billing prices differ; billing's figure is debited");
                metrics::counter!("tollgate_billing_price_mismatch_total").increment(1);
            }
            rows.push(LedgerRow {
                entry_id: id.clone(),
                tenant_id: e.meta.tenant_id.clone(),
                kind: KIND_DEBIT,
                amount: ch_dec(-cost)?,
                occurred_at: store::ch_time(e.meta.occurred_at),
                grant_id: String::new(),
                key_id: e.meta.key_id.clone(),
                event_id: id,
                price_version: version,
                note: String::new(),
                version: 1,
                model: e.requested_model.clone(),
                input_tokens: e.tokens.input_tokens,
                output_tokens: e.tokens.output_tokens,
                cache_read_tokens: e.tokens.cache_read_tokens,
                cache_write_tokens: e.tokens.cache_write_tokens,
            });
            trace.debit(e, cost, version);
            priced.push((e, cost, version));
        }
        // Burn-down attribution is decided here, so the stored row names the
        // (first) grant the debit burned. The ledgers it touches are kept
        // as they were, to be put back if the insert fails.
        let mut before: HashMap<String, Option<TenantLedger>> = HashMap::new();
        for ((e, cost, _), row) in priced.iter().zip(rows.iter_mut()) {
            if cost.is_zero() {
                continue;
            }
            let tenant = &e.meta.tenant_id;
            if !before.contains_key(tenant) {
                let kept = st.ledgers.get(tenant).cloned();
                before.insert(tenant.clone(), kept);
            }
            let alloc = st.ledger(tenant).debit(*cost, e.meta.occurred_at);
            if let Some(a) = alloc.iter().find(|a| a.grant_id.is_some()) {
                row.grant_id = a.grant_id.clone().unwrap_or_default();
            }
            if alloc.len() > 1 {
                row.note = alloc
                    .iter()
                    .map(|a| {
                        format!(
                            "{}={}",
                            a.grant_id.as_deref().unwrap_or("uncovered"),
                            a.amount
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",");
            }
        }
        // (4) store. If this fails the in-memory debits above must not stay.
        // A failed insert may still have landed (a timeout after the write),
        // and then step (2) would skip those events next time while the
        // ledgers lack them: so the state is also rebuilt from ClickHouse
        // before the next attempt.
        if let Err(e) = self.insert_ledger(&rows).await {
            for (tenant, ledger) in before {
                match ledger {
                    Some(l) => st.ledgers.insert(tenant, l),
                    None => st.ledgers.remove(&tenant),
                };
            }
            st.needs_reload = true;
            return Err(e);
        }
        trace.stored();
        // (5) apply
        let mut tenants = BTreeSet::new();
        let mut keys = BTreeSet::new();
        let month = st.month_start;
        for (e, cost, _) in &priced {
            *st.key_spend.entry(e.meta.key_id.clone()).or_default() += *cost;
            if e.meta.occurred_at >= month {
                *st.month_spend.entry(e.meta.tenant_id.clone()).or_default() += *cost;
            }
            tenants.insert(e.meta.tenant_id.clone());
            keys.insert(e.meta.key_id.clone());
            metrics::counter!("tollgate_billing_events_priced_total").increment(1);
        }
        // The marker: every position of the batch is handled now. Its usage
        // events' tenants and keys (priced now or before: a redelivery) need
        // a snapshot whose marker passes them.
        for (tenant, position) in &batch.positions {
            st.handled(tenant, *position);
        }
        for p in &batch.events {
            st.note_event(&p.event.meta.tenant_id, &p.event.meta.key_id, p.position);
        }
        let (caught_tenants, caught_keys) = st.caught_up();
        tenants.extend(caught_tenants);
        keys.extend(caught_keys);
        for p in &batch.events {
            tenants.insert(p.event.meta.tenant_id.clone());
            keys.insert(p.event.meta.key_id.clone());
        }
        // (6) snapshots
        let tenants: Vec<String> = tenants.into_iter().collect();
        let keys: Vec<String> = keys.into_iter().collect();
        self.refresh_quota(&mut st, &tenants, &keys, true).await?;
        for t in &tenants {
            let state = st
                .quota
                .get(&quota_key(QuotaScope::Tenant, t))
                .map(|q| q.state.as_str());
            let of_tenant = priced.iter().map(|(e, _, _)| *e);
            trace.quota_state(t, state, of_tenant.filter(|e| &e.meta.tenant_id == t));
        }
        metrics::gauge!("tollgate_billing_priced_seq").set(st.priced_seq() as f64);
        metrics::gauge!("tollgate_billing_priced_holes")
            .set(st.priced.unhandled_below_highest() as f64);
        metrics::histogram!("tollgate_billing_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Rebuilds the in-memory state from durable records, keeping the
    /// marker (which no durable record holds exactly). The state is replaced
    /// only once the rebuild succeeded: with ClickHouse down the old one
    /// stays, flagged for another try before the next batch is priced.
    pub async fn reload(&self) -> crate::error::Result<()> {
        let mut st = self.state.lock().await;
        let mut fresh = State {
            priced: st.priced.clone(),
            tenant_lane: st.tenant_lane.clone(),
            behind_tenants: st.behind_tenants.clone(),
            behind_keys: st.behind_keys.clone(),
            ..State::default()
        };
        match self.load_into(&mut fresh).await {
            Ok(()) => {
                *st = fresh;
                Ok(())
            }
            Err(e) => {
                st.needs_reload = true;
                Err(e)
            }
        }
    }

    // ------------------------------------------------------------------ quota

    /// Computes and writes the snapshots of `tenants` and `keys`. With
    /// `touched`, a snapshot is rewritten even when unchanged, so gateways
    /// see the new `priced_seq`.
    pub async fn refresh_quota(
        &self,
        st: &mut State,
        tenants: &[String],
        keys: &[String],
        touched: bool,
    ) -> crate::error::Result<()> {
        let now = Utc::now();
        // (scope, id, tenant, remaining, limit)
        type Wanted = (QuotaScope, String, String, Option<Decimal>, Option<Decimal>);
        let mut wanted: Vec<Wanted> = Vec::new();
        for t in tenants {
            let Some(tenant) = st.tenants.get(t).cloned() else {
                continue;
            };
            let (remaining, limit) = match (tenant.billing, tenant.monthly_limit) {
                (BillingMode::Prepaid, _) => {
                    let l = st.ledger(t);
                    (Some(l.balance(now)), Some(l.live_granted(now)))
                }
                (BillingMode::Postpaid, Some(limit)) => {
                    let spent = st.month_spend.get(t).copied().unwrap_or_default();
                    (Some(limit - spent), Some(limit))
                }
                (BillingMode::Postpaid, None) => (None, None),
            };
            wanted.push((QuotaScope::Tenant, t.clone(), t.clone(), remaining, limit));
        }
        for k in keys {
            let Some(key) = st.keys.get(k) else { continue };
            let qk = quota_key(QuotaScope::Key, k);
            match key.budget {
                Some(budget) => {
                    let spent = st.key_spend.get(k).copied().unwrap_or_default();
                    wanted.push((
                        QuotaScope::Key,
                        k.clone(),
                        key.tenant_id.clone(),
                        Some(budget - spent),
                        Some(budget),
                    ));
                }
                // A key without a budget needs a snapshot only to replace one
                // it had.
                None if st.quota.contains_key(&qk) => {
                    wanted.push((
                        QuotaScope::Key,
                        k.clone(),
                        key.tenant_id.clone(),
                        None,
                        None,
                    ));
                }
                None => {}
            }
        }
        for (scope, id, tenant_id, remaining, limit) in wanted {
            let key = quota_key(scope, &id);
            let (level, threshold) = quota::level(remaining, limit, &self.thresholds);
            let prev = st.quota.get(&key);
            let unchanged = prev.is_some_and(|p| {
                p.state == level
                    && p.remaining == remaining
                    && p.limit == limit
                    && p.threshold == threshold
                    && (!touched || p.priced_seq == st.priced_for(&tenant_id))
            });
            if unchanged {
                continue;
            }
            let crossings =
                quota::crossings(prev.map(|p| (p.state, p.threshold)), (level, threshold));
            let snapshot = QuotaState {
                scope,
                id: id.clone(),
                tenant_id: tenant_id.clone(),
                state: level,
                remaining,
                limit,
                threshold,
                version: st.next_version(),
                priced_seq: st.priced_for(&tenant_id),
                updated_at: now,
            };
            store::put_json(&self.kv_quota, &key, &snapshot).await?;
            for event_type in crossings {
                let mut data = json!({
                    "tenant_id": tenant_id,
                    "scope": scope.as_str(),
                    "state": level.as_str(),
                    "remaining": remaining.map(|r| r.to_string()),
                    "limit": limit.map(|l| l.to_string()),
                    "threshold": threshold.map(|t| t.to_string()),
                });
                if scope == QuotaScope::Key {
                    data["key_id"] = json!(id);
                }
                let idem = format!("{key}:{event_type}:{}", snapshot.version);
                if let Err(e) = self
                    .webhooks
                    .emit(&tenant_id, event_type, data, &idem)
                    .await
                {
                    tracing::error!(error = %format!("{e:#}"), tenant = %tenant_id, event_type, "webhook enqueue failed");
                }
            }
            metrics::gauge!("tollgate_billing_quota_state", "scope" => scope.as_str(), "state" => level.as_str())
                .increment(1.0);
            if let Some(p) = st.quota.get(&key) {
                metrics::gauge!("tollgate_billing_quota_state", "scope" => scope.as_str(), "state" => p.state.as_str())
                    .decrement(1.0);
            }
            st.quota.insert(key, snapshot);
        }
        Ok(())
    }

    // ----------------------------------------------------------------- ticker

    /// Expires grants, settles debt from grants that became effective,
    /// rolls the month, and finalizes invoices whose period ended.
    pub async fn run_ticker(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %format!("{e:#}"), "billing tick failed");
            }
        }
    }

    pub async fn tick(&self) -> crate::error::Result<()> {
        let now = Utc::now();
        let due: Vec<(String, DateTime<Utc>)> = {
            let mut st = self.state.lock().await;
            let month_before = st.month_start;
            st.roll_month(now);
            let mut rows = Vec::new();
            let mut changed = Vec::new();
            let tenants: Vec<String> = st.ledgers.keys().cloned().collect();
            for t in &tenants {
                let l = st.ledger(t);
                let settled = l.settle_debt(now);
                let expired = l.expire_due(now);
                if !settled.is_empty() || !expired.is_empty() {
                    changed.push(t.clone());
                }
                for x in expired {
                    rows.push(LedgerRow {
                        entry_id: format!("exp_{}", x.grant_id),
                        tenant_id: t.clone(),
                        kind: KIND_EXPIRY,
                        amount: ch_dec(-x.amount)?,
                        occurred_at: store::ch_time(x.at),
                        grant_id: x.grant_id,
                        key_id: String::new(),
                        event_id: String::new(),
                        price_version: 0,
                        note: String::new(),
                        version: 1,
                        model: String::new(),
                        input_tokens: 0,
                        output_tokens: 0,
                        cache_read_tokens: 0,
                        cache_write_tokens: 0,
                    });
                }
            }
            if let Err(e) = self.insert_ledger(&rows).await {
                drop(st);
                self.reload().await?;
                return Err(e);
            }
            if month_before != st.month_start {
                // Postpaid monthly limits start over.
                changed.extend(st.tenants.keys().cloned());
            }
            // Grants whose effective time has come change live totals.
            changed.extend(
                st.grants
                    .values()
                    .filter(|g| {
                        g.effective_at <= now && g.effective_at > now - chrono::Duration::seconds(5)
                    })
                    .map(|g| g.tenant_id.clone()),
            );
            changed.sort();
            changed.dedup();
            self.refresh_quota(&mut st, &changed, &[], false).await?;
            st.tenants
                .values()
                .filter(|t| next_month(t.period_start) <= now)
                .map(|t| (t.id.clone(), next_month(t.period_start)))
                .collect()
        };
        for (tenant, end) in due {
            self.finalize(&tenant, Some(end)).await?;
        }
        Ok(())
    }

    // --------------------------------------------------------------- invoices

    /// The usage of `tenant` in `[start, end)`, summed per model and price version.
    async fn priced_usage(
        &self,
        st: &State,
        tenant: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> crate::error::Result<Vec<PricedUsage>> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct U {
            model: String,
            price_version: u64,
            input_tokens: u64,
            output_tokens: u64,
            cache_read_tokens: u64,
            cache_write_tokens: u64,
        }
        let rows = self
            .ch
            .query(
                "SELECT model, price_version, sum(input_tokens) AS input_tokens,
                        sum(output_tokens) AS output_tokens,
                        sum(cache_read_tokens) AS cache_read_tokens,
                        sum(cache_write_tokens) AS cache_write_tokens
                 FROM ledger_entries FINAL
                 WHERE tenant_id = ? AND kind = 'debit'
                   AND occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')
                 GROUP BY model, price_version",
            )
            .bind(tenant)
            .bind(store::ch_time(start))
            .bind(store::ch_time(end))
            .fetch_all::<U>()
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let price = st
                .prices
                .get(&r.price_version)
                .and_then(|b| b.models.get(&r.model))
                .cloned();
            let Some(price) = price else {
                // Unpriced model (cost 0): no invoice line.
                continue;
            };
            out.push(PricedUsage {
                model: r.model,
                price_version: r.price_version,
                price,
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cache_read_tokens: r.cache_read_tokens,
                cache_write_tokens: r.cache_write_tokens,
            });
        }
        Ok(out)
    }

    /// Credit available to an invoice ending at `end`: grants effective
    /// before it, minus expiries before it, minus credits applied by earlier
    /// invoices that are not void.
    fn available_credit(st: &State, tenant: &str, end: DateTime<Utc>, except: &str) -> Decimal {
        let granted: Decimal = st
            .grants
            .values()
            .filter(|g| g.tenant_id == tenant && g.effective_at < end)
            .map(|g| g.amount)
            .sum();
        let expired: Decimal = st
            .ledgers
            .get(tenant)
            .map(|l| {
                l.grants()
                    .iter()
                    .filter(|v| v.grant.expires_at.is_some_and(|x| x < end))
                    .filter_map(|v| v.expired)
                    .sum()
            })
            .unwrap_or_default();
        let applied: Decimal = st
            .invoices
            .values()
            .filter(|i| {
                i.tenant_id == tenant
                    && i.status == InvoiceStatus::Finalized
                    && i.id != except
                    && i.period_end <= end
            })
            .map(|i| i.credits_applied)
            .sum();
        granted - expired - applied
    }

    pub fn invoice_id(tenant: &str, period_start: DateTime<Utc>) -> String {
        let name = format!("{tenant}/{}", period_start.timestamp());
        format!(
            "inv_{}",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple()
        )
    }

    /// The invoice `tenant` would get for `[start, end)` (status finalized,
    /// not stored): what a replay must reproduce.
    pub async fn invoice_for(
        &self,
        tenant: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> crate::error::Result<Invoice> {
        let st = self.state.lock().await;
        let mut t = st
            .tenants
            .get(tenant)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no tenant {tenant}")))?;
        t.period_start = start;
        self.compute_invoice(&st, &t, end, InvoiceStatus::Finalized)
            .await
    }

    /// The open invoice of `tenant` as of now (status draft).
    pub async fn draft(&self, tenant: &str) -> crate::error::Result<Option<Invoice>> {
        let st = self.state.lock().await;
        let Some(t) = st.tenants.get(tenant).cloned() else {
            return Ok(None);
        };
        let end = trunc_secs(Utc::now()).min(next_month(t.period_start));
        self.compute_invoice(&st, &t, end, InvoiceStatus::Draft)
            .await
            .map(Some)
    }

    async fn compute_invoice(
        &self,
        st: &State,
        t: &Tenant,
        end: DateTime<Utc>,
        status: InvoiceStatus,
    ) -> crate::error::Result<Invoice> {
        let usage = self.priced_usage(st, &t.id, t.period_start, end).await?;
        let lines = invoice::lines(&usage);
        let id = Self::invoice_id(&t.id, t.period_start);
        let totals = invoice::totals(&lines, Self::available_credit(st, &t.id, end, &id));
        Ok(Invoice {
            id,
            tenant_id: t.id.clone(),
            period_start: t.period_start,
            period_end: end,
            status,
            currency: "USD".into(),
            subtotal: totals.subtotal,
            credits_applied: totals.credits_applied,
            total: totals.total,
            lines,
            finalized_at: None,
            voided_at: None,
        })
    }

    /// Waits (up to 5 s) until billing has priced everything the stream held
    /// when called, so a finalized invoice includes usage just served.
    async fn catch_up(&self) {
        let Ok(heads) = self.bus.heads().await else {
            return;
        };
        let head = heads.iter().copied().max().unwrap_or(0);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if self.state.lock().await.priced_all(&heads) {
                return;
            }
            // The stream also holds request events; billing's position only
            // moves with usage events. Checking the consumer's pending count
            // is the exact test.
            if self.pending_usage().await == Some(0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!(head, "finalizing before billing caught up with the stream");
    }

    /// Usage events billing's consumer has not acknowledged yet.
    pub async fn pending_usage(&self) -> Option<u64> {
        self.bus.pending(&self.config.consumer.durable).await.ok()
    }

    /// Closes the open invoice of `tenant` at `end` (default now), opens the
    /// next one, writes ClickHouse and KV, and raises `invoice.finalized`.
    pub async fn finalize(
        &self,
        tenant: &str,
        end: Option<DateTime<Utc>>,
    ) -> crate::error::Result<Option<Invoice>> {
        self.catch_up().await;
        let mut st = self.state.lock().await;
        let Some(t) = st.tenants.get(tenant).cloned() else {
            return Ok(None);
        };
        let end = trunc_secs(end.unwrap_or_else(Utc::now)).max(t.period_start);
        let mut inv = self
            .compute_invoice(&st, &t, end, InvoiceStatus::Finalized)
            .await?;
        let now = Utc::now();
        inv.finalized_at = Some(now);
        let version = st.next_version();
        self.write_invoice_rows(&inv, version).await?;
        store::put_json(&self.kv_billing, &format!("invoice.{}", inv.id), &inv).await?;
        let mut next = t.clone();
        next.period_start = end;
        store::put_json(&self.kv_billing, &format!("tenant.{}", t.id), &next).await?;
        st.tenants.insert(t.id.clone(), next);
        st.invoices.insert(inv.id.clone(), inv.clone());
        drop(st);
        metrics::counter!("tollgate_billing_invoices_finalized_total").increment(1);
        let data = json!({
            "tenant_id": inv.tenant_id,
            "invoice_id": inv.id,
            "period_start": inv.period_start,
            "period_end": inv.period_end,
            "currency": inv.currency,
            "subtotal": inv.subtotal.to_string(),
            "credits_applied": inv.credits_applied.to_string(),
            "total": inv.total.to_string(),
        });
        if let Err(e) = self
            .webhooks
            .emit(
                tenant,
                "invoice.finalized",
                data,
                &format!("invoice:{}", inv.id),
            )
            .await
        {
            tracing::error!(error = %format!("{e:#}"), "webhook enqueue failed");
        }
        Ok(Some(inv))
    }

    pub async fn write_invoice_rows(
        &self,
        inv: &Invoice,
        version: u64,
    ) -> crate::error::Result<()> {
        let mut insert = self.ch.insert::<InvoiceRow>("invoices_store").await?;
        insert
            .write(&InvoiceRow {
                invoice_id: inv.id.clone(),
                tenant_id: inv.tenant_id.clone(),
                period_start: store::ch_time(inv.period_start),
                period_end: store::ch_time(inv.period_end),
                status: inv.status.as_i8(),
                currency: inv.currency.clone(),
                subtotal: ch_dec(inv.subtotal)?,
                credits_applied: ch_dec(inv.credits_applied)?,
                total: ch_dec(inv.total)?,
                finalized_at: inv.finalized_at.map(store::ch_time),
                version,
            })
            .await?;
        insert.end().await?;
        let mut insert = self.ch.insert::<InvoiceLineRow>("invoice_lines_v2").await?;
        for l in &inv.lines {
            insert
                .write(&InvoiceLineRow {
                    invoice_id: inv.id.clone(),
                    tenant_id: inv.tenant_id.clone(),
                    line_no: l.line_no,
                    model: l.model.clone(),
                    token_kind: l.token_kind.clone(),
                    quantity: l.quantity,
                    unit_price: ch_dec(l.unit_price)?,
                    amount: ch_dec(l.amount)?,
                    price_version: l.price_version,
                    version,
                })
                .await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// finalized → void. Its credits become available to later invoices.
    pub async fn void_invoice(
        &self,
        id: &str,
    ) -> crate::error::Result<Result<Invoice, &'static str>> {
        let mut st = self.state.lock().await;
        let Some(mut inv) = st.invoices.get(id).cloned() else {
            return Ok(Err("not_found"));
        };
        if inv.status != InvoiceStatus::Finalized {
            return Ok(Err("not_finalized"));
        }
        inv.status = InvoiceStatus::Void;
        inv.voided_at = Some(Utc::now());
        let version = st.next_version();
        self.write_invoice_rows(&inv, version).await?;
        store::put_json(&self.kv_billing, &format!("invoice.{}", inv.id), &inv).await?;
        st.invoices.insert(inv.id.clone(), inv.clone());
        Ok(Ok(inv))
    }

    // ------------------------------------------------------------- mutations

    /// Records a grant: KV, ClickHouse, ledger, snapshot, webhook.
    pub async fn grant(&self, g: Grant) -> crate::error::Result<Grant> {
        let mut st = self.state.lock().await;
        store::put_json(&self.kv_billing, &format!("grant.{}", g.id), &g).await?;
        self.insert_ledger(&[grant_row(&g)?]).await?;
        st.grants.insert(g.id.clone(), g.clone());
        let now = Utc::now();
        let l = st.ledger(&g.tenant_id);
        l.add_grant(g.clone());
        l.settle_debt(now);
        self.refresh_quota(&mut st, std::slice::from_ref(&g.tenant_id), &[], false)
            .await?;
        drop(st);
        metrics::counter!("tollgate_billing_credits_granted_total").increment(1);
        let data = json!({
            "tenant_id": g.tenant_id,
            "grant_id": g.id,
            "amount": g.amount.to_string(),
            "priority": g.priority,
            "effective_at": g.effective_at,
            "expires_at": g.expires_at,
        });
        if let Err(e) = self
            .webhooks
            .emit(
                &g.tenant_id,
                "credits.granted",
                data,
                &format!("grant:{}", g.id),
            )
            .await
        {
            tracing::error!(error = %format!("{e:#}"), "webhook enqueue failed");
        }
        Ok(g)
    }

    pub async fn put_tenant(&self, st: &mut State, t: Tenant) -> crate::error::Result<()> {
        store::put_json(&self.kv_billing, &format!("tenant.{}", t.id), &t).await?;
        let id = t.id.clone();
        st.tenants.insert(id.clone(), t);
        if let Ok(mut ids) = self.tenant_ids.write() {
            ids.insert(id.clone());
        }
        self.refresh_quota(st, std::slice::from_ref(&id), &[], false)
            .await
    }

    pub async fn put_key(&self, st: &mut State, k: KeyRecord) -> crate::error::Result<()> {
        store::put_json(&self.kv_keys, &k.secret_sha256, &k).await?;
        st.key_by_hash
            .insert(k.secret_sha256.clone(), k.key_id.clone());
        let id = k.key_id.clone();
        st.keys.insert(id.clone(), k);
        self.refresh_quota(st, &[], std::slice::from_ref(&id), false)
            .await
    }
}

fn grant_row(g: &Grant) -> crate::error::Result<LedgerRow> {
    Ok(LedgerRow {
        entry_id: g.id.clone(),
        tenant_id: g.tenant_id.clone(),
        kind: KIND_GRANT,
        amount: ch_dec(g.amount)?,
        occurred_at: store::ch_time(g.effective_at),
        grant_id: g.id.clone(),
        key_id: String::new(),
        event_id: String::new(),
        price_version: 0,
        note: g.note.clone(),
        version: 1,
        model: String::new(),
        input_tokens: 0,
        output_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
    })
}

/// How often the marker is checked against the bus's committed floor while
/// it has a hole.
const FLOOR_EVERY: Duration = Duration::from_secs(1);

/// A usage event of a batch, with where it came from.
struct Priceable {
    event: UsageEvent,
    position: u64,
    traceparent: Option<String>,
}

/// A decoded batch.
#[derive(Default)]
struct Prepared {
    events: Vec<Priceable>,
    /// Every message of the batch: (tenant of its subject, position).
    positions: Vec<(String, u64)>,
}

async fn heartbeat(tokens: &[tollgate_schemas::bus::CommitToken]) {
    if let Err(e) = in_progress(tokens).await {
        tracing::warn!(error = %e, "in-progress heartbeat failed; the batch may be redelivered (deduplicated)");
    }
}

async fn release(c: &mut dyn EventConsumer, tokens: Vec<tollgate_schemas::bus::CommitToken>) {
    let n = tokens.len();
    match c.release(tokens).await {
        Ok(()) => tracing::info!(
            messages = n,
            "released unpriced messages for prompt redelivery"
        ),
        Err(e) => {
            tracing::warn!(error = %e, messages = n, "releasing failed; they come back after ack_wait")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn priced_positions_are_kept_per_lane_and_given_per_tenant() {
        use tollgate_schemas::bus::position;
        let mut st = State::default();
        // JetStream: one lane, the marker is the stream sequence.
        st.observe_priced("acme", 7);
        st.observe_priced("globex", 9);
        assert_eq!(st.priced_for("acme"), 9);
        assert_eq!(st.priced_for("unseen"), 9);
        // Kafka: acme in partition 2, globex in partition 1.
        let mut st = State::default();
        st.observe_priced("acme", position(2, 5));
        st.observe_priced("globex", position(1, 40));
        st.observe_priced("initech", position(0, 3));
        assert_eq!(st.priced_for("acme"), position(2, 5));
        assert_eq!(st.priced_for("globex"), position(1, 40));
        // Never seen: partition 0's marker, below every position of the
        // other partitions (a gateway keeps its debit longer, never shorter).
        assert_eq!(st.priced_for("unseen"), position(0, 3));
        assert!(st.priced_for("unseen") < position(1, 1));
        assert!(st.priced_all(&[position(0, 3), position(1, 40), position(2, 5)]));
        assert!(!st.priced_all(&[position(0, 3), position(1, 41), position(2, 5)]));
        // An empty partition needs nothing priced.
        assert!(st.priced_all(&[
            position(0, 3),
            position(1, 40),
            position(2, 5),
            position(3, 0)
        ]));
    }

    #[test]
    fn the_marker_never_passes_a_batch_not_priced_yet() {
        let mut st = State::default();
        // JetStream positions: 1-3 priced; 4-6 (a batch whose pricing failed,
        // or held by a crashed billing) not yet; 7-9 priced; 10 a request
        // event (skipped kinds are handled as soon as seen).
        for p in [1, 2, 3, 7, 8, 9] {
            st.handled("acme", p);
        }
        st.handled("globex", 10);
        assert_eq!(st.priced_for("acme"), 3);
        assert_eq!(st.priced_for("globex"), 3, "one lane on JetStream");
        assert!(!st.priced_all(&[10]));
        // Tenants with events above the hole wait for a snapshot rewrite.
        st.note_event("acme", "k1", 8);
        st.note_event("globex", "k2", 2);
        let (tenants, keys) = st.caught_up();
        assert_eq!(tenants, vec!["globex".to_owned()]);
        assert_eq!(keys, vec!["k2".to_owned()]);
        assert!(st.behind_tenants.contains_key("acme"));
        // The failed batch is retried and succeeds, out of order.
        st.handled("acme", 5);
        st.handled("acme", 4);
        assert_eq!(st.priced_for("acme"), 5);
        assert!(
            st.caught_up().0.is_empty(),
            "acme's event at 8 is still above the marker"
        );
        st.handled("acme", 6);
        assert_eq!(st.priced_for("acme"), 10);
        assert!(st.priced_all(&[10]));
        let (tenants, keys) = st.caught_up();
        assert_eq!(tenants, vec!["acme".to_owned()]);
        assert_eq!(keys, vec!["k1".to_owned()]);
        assert!(st.behind_tenants.is_empty() && st.behind_keys.is_empty());
    }

    #[test]
    fn months() {
        let t = Utc.with_ymd_and_hms(2026, 12, 15, 10, 0, 0).unwrap();
        assert_eq!(
            month_start(t),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            next_month(t),
            Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap()
        );
    }

    #[test]
    fn invoice_ids_are_deterministic() {
        let t = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
        assert_eq!(
            Billing::invoice_id("acme", t),
            Billing::invoice_id("acme", t)
        );
        assert_ne!(
            Billing::invoice_id("acme", t),
            Billing::invoice_id("acme2", t)
        );
    }
}
