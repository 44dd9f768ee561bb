//! JetStream KV buckets, created in a way nats-server 2.9 accepts.
//!
//! async-nats 0.51's `create_key_value` sends a request whose reply it cannot
//! parse from a 2.9 server, so we create the bucket's backing stream
//! ourselves, with the layout the KV protocol defines (stream `KV_<bucket>`,
//! subjects `$KV.<bucket>.>`, one message per subject kept per `history`,
//! rollups allowed, deletes denied, direct gets on), then open it as a KV.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

/// Opens `bucket`, creating it if missing.
pub async fn ensure(
    js: &jetstream::Context,
    bucket: &str,
    history: i64,
) -> Result<kv::Store, crate::bus::BusError> {
    use crate::bus::{BusError, BusErrorKind};
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history.max(1),
        max_age: Duration::ZERO,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(|e| {
        BusError::new(
            BusErrorKind::Config,
            format!("create KV bucket {bucket}: {e}"),
        )
    })?;
    js.get_key_value(bucket).await.map_err(|e| {
        BusError::new(
            BusErrorKind::Unavailable,
            format!("open KV bucket {bucket}: {e}"),
        )
    })
}
