//! Tollgate's test support: the harness (real NATS and ClickHouse) and the
//! mock upstream LLM. Test-only code: panics here fail a test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod billing;
pub mod harness;
pub mod mock;
pub mod otlp;
pub mod stack;
