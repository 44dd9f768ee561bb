//! Billing's spans, exported only when traces are ([`tollgate_telemetry::enabled`]).
//!
//! Pricing is a batch consumer, so its spans *link* to the events' traces
//! (the `traceparent` each usage event carries from the gateway) rather than
//! joining one of them:
//!
//! - `billing.price_batch`: one per batch, linked to its events;
//! - `billing.debit`: one per priced event, a child of the batch span, linked
//!   to that event's trace, from pricing until the ledger row is stored;
//! - `billing.quota_state`: one per tenant whose quota state the batch
//!   refreshed, linked to that tenant's events in the batch.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use tollgate_schemas::events::UsageEvent;
use tracing::Span;
use tracing::field::Empty;

/// Links per span (OpenTelemetry's default limit is 128).
const MAX_LINKS: usize = 128;

/// The spans of one pricing batch; every method is a no-op when disabled.
pub struct PricingTrace {
    batch: Span,
    /// Event id → its `traceparent`.
    parents: BTreeMap<String, String>,
    debits: Vec<Span>,
}

impl PricingTrace {
    pub fn start(messages: usize) -> Self {
        let batch = if tollgate_telemetry::enabled() {
            tracing::info_span!(
                parent: None,
                "billing.price_batch",
                otel.kind = "consumer",
                messaging.operation.type = "process",
                tollgate.messages = messages,
                tollgate.priced = Empty,
            )
        } else {
            Span::none()
        };
        Self {
            batch,
            parents: BTreeMap::new(),
            debits: Vec::new(),
        }
    }

    fn on(&self) -> bool {
        !self.batch.is_disabled()
    }

    /// Remembers an event's trace, and links the batch to it.
    pub fn event(&mut self, event_id: String, traceparent: Option<&str>) {
        if !self.on() {
            return;
        }
        if let Some(tp) = traceparent {
            if self.parents.len() < MAX_LINKS {
                tollgate_telemetry::add_link(&self.batch, tp);
            }
            self.parents.insert(event_id, tp.to_owned());
        }
    }

    /// Opens the debit span of an event being priced.
    pub fn debit(&mut self, e: &UsageEvent, cost: Decimal, price_version: u64) {
        if !self.on() {
            return;
        }
        let span = tracing::info_span!(
            parent: &self.batch,
            "billing.debit",
            tollgate.entry_id = %e.meta.id,
            tollgate.tenant_id = e.meta.tenant_id.as_str(),
            tollgate.key_id = e.meta.key_id.as_str(),
            tollgate.model = e.requested_model.as_str(),
            tollgate.cost_usd = %cost,
            tollgate.price_version = price_version,
        );
        if let Some(tp) = self.parents.get(&e.meta.id.to_string()) {
            tollgate_telemetry::add_link(&span, tp);
        }
        self.debits.push(span);
    }

    /// The debits are stored: their spans end.
    pub fn stored(&mut self) {
        if self.on() {
            self.batch.record("tollgate.priced", self.debits.len());
        }
        self.debits.clear();
    }

    /// A tenant's quota state was refreshed from `events` of this batch.
    pub fn quota_state<'a>(
        &self,
        tenant_id: &str,
        state: Option<&str>,
        events: impl Iterator<Item = &'a UsageEvent>,
    ) {
        if !self.on() {
            return;
        }
        let span = tracing::info_span!(
            parent: &self.batch,
            "billing.quota_state",
            tollgate.tenant_id = tenant_id,
            tollgate.quota_state = state,
        );
        for e in events.take(MAX_LINKS) {
            if let Some(tp) = self.parents.get(&e.meta.id.to_string()) {
                tollgate_telemetry::add_link(&span, tp);
            }
        }
    }
}
