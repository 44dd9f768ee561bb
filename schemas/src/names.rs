//! Every stream, subject and KV bucket name, defined once.
//!
//! Production uses [`Names::production`]. Tests (and anyone running several
//! isolated Tollgates on one NATS) use [`Names::namespaced`], which prefixes
//! every name so two namespaces never share a subject, stream or bucket.

use crate::events::EventKind;

/// Subject root of production traffic.
pub const ROOT: &str = "tollgate";
/// The events stream of ARCHITECTURE.md.
pub const EVENTS_STREAM: &str = "TOLLGATE_EVENTS";
/// Poison events land here with the reason in a header.
pub const DEADLETTER_STREAM: &str = "TOLLGATE_DEADLETTER";
/// API keys, by SHA-256 hash of the secret (hex).
pub const KV_KEYS: &str = "tollgate_keys";
/// Quota states per tenant and key, written by billing.
pub const KV_QUOTA: &str = "tollgate_quota";
/// The versioned price book, written by billing: one key per version.
pub const KV_PRICES: &str = "tollgate_prices";
/// Billing's own durable state: tenants, credit grants, webhook endpoints,
/// finalized invoices (one bucket, keys prefixed by record type).
pub const KV_BILLING: &str = "tollgate_billing";
/// Webhook deliveries waiting to be sent (billing's durable queue).
pub const WEBHOOKS_STREAM: &str = "TOLLGATE_WEBHOOKS";

/// The concrete names one deployment (or one test) uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Subject root, `tollgate` in production.
    pub root: String,
    pub events_stream: String,
    pub deadletter_stream: String,
    pub kv_keys: String,
    pub kv_quota: String,
    pub kv_prices: String,
    pub kv_billing: String,
    pub webhooks_stream: String,
}

impl Default for Names {
    fn default() -> Self {
        Self::production()
    }
}

impl Names {
    pub fn production() -> Self {
        Self {
            root: ROOT.to_owned(),
            events_stream: EVENTS_STREAM.to_owned(),
            deadletter_stream: DEADLETTER_STREAM.to_owned(),
            kv_keys: KV_KEYS.to_owned(),
            kv_quota: KV_QUOTA.to_owned(),
            kv_prices: KV_PRICES.to_owned(),
            kv_billing: KV_BILLING.to_owned(),
            webhooks_stream: WEBHOOKS_STREAM.to_owned(),
        }
    }

    /// Names isolated under `ns` (letters, digits, `_` and `-` only).
    /// An empty namespace is production.
    pub fn namespaced(ns: &str) -> Self {
        if ns.is_empty() {
            return Self::production();
        }
        Self {
            root: format!("{ns}.{ROOT}"),
            events_stream: format!("{ns}_{EVENTS_STREAM}"),
            deadletter_stream: format!("{ns}_{DEADLETTER_STREAM}"),
            kv_keys: format!("{ns}_{KV_KEYS}"),
            kv_quota: format!("{ns}_{KV_QUOTA}"),
            kv_prices: format!("{ns}_{KV_PRICES}"),
            kv_billing: format!("{ns}_{KV_BILLING}"),
            webhooks_stream: format!("{ns}_{WEBHOOKS_STREAM}"),
        }
    }

    /// `<root>.events.<kind>.<tenant_id>`
    pub fn event_subject(&self, kind: EventKind, tenant_id: &str) -> String {
        format!("{}.events.{}.{}", self.root, kind.as_str(), tenant_id)
    }

    /// Matches every event subject.
    pub fn events_filter(&self) -> String {
        format!("{}.events.>", self.root)
    }

    /// Matches every event of one kind.
    pub fn kind_filter(&self, kind: EventKind) -> String {
        format!("{}.events.{}.>", self.root, kind.as_str())
    }

    /// Where a poison event from `origin_subject` is parked.
    pub fn deadletter_subject(&self, origin_subject: &str) -> String {
        let tail = origin_subject
            .strip_prefix(&format!("{}.", self.root))
            .unwrap_or(origin_subject);
        format!("{}.deadletter.{}", self.root, tail)
    }

    /// Subject of webhook deliveries to endpoint `endpoint_id`.
    pub fn webhook_subject(&self, endpoint_id: &str) -> String {
        format!("{}.webhooks.{}", self.root, endpoint_id)
    }

    /// Matches every webhook delivery.
    pub fn webhooks_filter(&self) -> String {
        format!("{}.webhooks.>", self.root)
    }

    pub fn deadletter_filter(&self) -> String {
        format!("{}.deadletter.>", self.root)
    }

    /// The kind encoded in an event subject, if it is one.
    pub fn kind_of_subject(&self, subject: &str) -> Option<EventKind> {
        let rest = subject.strip_prefix(&self.root)?.strip_prefix(".events.")?;
        let kind = rest.split('.').next()?;
        EventKind::parse(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_never_overlap_production() {
        let p = Names::production();
        let t = Names::namespaced("t1");
        assert_eq!(
            p.event_subject(EventKind::Usage, "acme"),
            "tollgate.events.usage.acme"
        );
        assert_eq!(
            t.event_subject(EventKind::Usage, "acme"),
            "t1.tollgate.events.usage.acme"
        );
        assert_ne!(p.events_stream, t.events_stream);
        assert_ne!(p.kv_keys, t.kv_keys);
        assert_eq!(
            t.kind_of_subject("t1.tollgate.events.usage.acme"),
            Some(EventKind::Usage)
        );
        assert_eq!(p.kind_of_subject("t1.tollgate.events.usage.acme"), None);
        assert_eq!(
            p.deadletter_subject("tollgate.events.usage.acme"),
            "tollgate.deadletter.events.usage.acme"
        );
    }
}
