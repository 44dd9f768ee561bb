//! Tollgate's test support: the harness (real NATS and ClickHouse) and the
//! mock upstream LLM; [`eventually`], the one way a test waits for a
//! condition. Test-only code: panics here fail a test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod billing;
pub mod eventually;
pub mod harness;
pub mod mock;
pub mod otlp;
pub mod stack;

pub use eventually::{eventually, eventually_or};
