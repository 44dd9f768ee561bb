//! Tollgate's gateway: a stateless OpenAI-compatible API that authenticates,
//! limits, routes with failover, relays (streams unbuffered), meters every
//! token and publishes the facts to the event bus.
//!
//! `main.rs` is thin; [`run`] is the testable entry point.

pub mod anthropic;
pub mod api_style;
pub mod app;
pub mod auth;
pub mod config;
pub mod edge;
pub mod error;
pub mod events;
pub mod kv_follow;
pub mod limits;
pub mod openai;
pub mod pipeline;
pub mod prices;
pub mod proxy;
pub mod publisher;
pub mod quota;
pub mod responses_relay;
pub mod routing;
pub mod server;
pub mod sse;
pub mod state;
pub mod state_cache;
pub mod telemetry;
pub mod tokens;
pub mod trace;
pub mod translate;
pub mod validate;

pub use app::run;
pub use config::Config;
