//! Turning events into bus messages: subject, id as idempotency key, and the
//! W3C `traceparent` header.

use bytes::Bytes;
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
