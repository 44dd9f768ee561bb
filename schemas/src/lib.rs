//! The Tollgate contract: every byte that crosses a process boundary.
//!
//! - [`events`]: the request, usage and token-count events (JSON, versioned).
//! - [`names`]: stream, subject and KV bucket names, defined once.
//! - [`migrations`]: the ClickHouse DDL, numbered and idempotent.
//! - [`bus`]: the `EventBus` abstraction and its JetStream implementation.
//! - [`money`]: exact decimal helpers shared by pricing and storage.

pub mod bus;
pub mod events;
pub mod kv;
pub mod migrations;
pub mod money;
pub mod names;
pub mod records;

pub use events::{Event, EventKind, RequestEvent, TokenCountEvent, UsageEvent};
pub use names::Names;
