//! Turning events into bus messages: subject, id as idempotency key, and the
//! W3C `traceparent` header.

use bytes::Bytes;
use tollgate_schemas::bus::Outgoing;
use tollgate_schemas::events::Event;

use tollgate_schemas::Names;

use crate::publisher::Publisher;

/// Tenant of requests refused before a key was known.
pub const UNAUTHENTICATED: &str = "_unauthenticated";

/// Hands the event to the publisher (never waits for the broker).
pub fn emit(publisher: &Publisher, names: &Names, event: &Event, traceparent: &str) {
    let meta = event.meta();
    publisher.publish(Outgoing {
        subject: names.event_subject(event.kind(), &meta.tenant_id),
        id: meta.id.to_string(),
        payload: Bytes::from(event.to_json()),
        headers: vec![("traceparent".to_owned(), traceparent.to_owned())],
    });
}
