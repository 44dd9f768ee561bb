//! Turning events into bus messages: subject, id as idempotency key, and the
//! W3C `traceparent` header.

use axum::http::HeaderMap;
use bytes::Bytes;
use rand::Rng;
use tollgate_schemas::bus::Outgoing;
use tollgate_schemas::events::Event;

use crate::app::AppState;

/// Tenant of requests refused before a key was known.
pub const UNAUTHENTICATED: &str = "_unauthenticated";

/// Hands the event to the publisher (never waits for the broker).
pub fn emit(app: &AppState, event: &Event, traceparent: &str) {
    let meta = event.meta();
    app.publisher.publish(Outgoing {
        subject: app.names.event_subject(event.kind(), &meta.tenant_id),
        id: meta.id.to_string(),
        payload: Bytes::from(event.to_json()),
        headers: vec![("traceparent".to_owned(), traceparent.to_owned())],
    });
}

/// The caller's `traceparent` if it is valid W3C, else a new trace.
pub fn traceparent(headers: &HeaderMap) -> String {
    if let Some(v) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = v.split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() == 4
            && hex(parts[0], 2)
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
            && parts[1] != "00000000000000000000000000000000"
        {
            return v.to_ascii_lowercase();
        }
    }
    let mut rng = rand::rng();
    format!(
        "00-{:032x}-{:016x}-01",
        rng.random::<u128>() | 1,
        rng.random::<u64>() | 1
    )
}
