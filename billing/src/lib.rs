//! Billing: prices, credits, quota states, invoices and webhooks.
//!
//! - [`service`]: the state and the pricing loop (exactly once, see its docs),
//!   quota snapshots, the ticker and invoices.
//! - [`ledger`]: credit grants and their burn-down, pure.
//! - [`invoice`]: invoice lines, the rounding rule and totals, pure.
//! - [`quota`]: quota levels and the webhook crossings, pure.
//! - [`priced`]: the contiguous "priced up to" marker gateways trust, pure.
//! - [`webhooks`]: endpoints, the durable delivery queue and the worker.
//! - [`admin`]: the admin and tenant HTTP APIs; [`app`]: the lifecycle;
//!   [`routes`]: the router that lists its routes (for the OpenAPI test).
//! - [`error`]: the crate's one error type (client mistake, dependency
//!   outage, bug); [`api_error`]: the one place it becomes an HTTP status.
//! - [`trace`]: the pricing spans, linked to the events' traces.

pub mod admin;
pub mod api_error;
pub mod app;
pub mod config;
pub mod error;
pub mod invoice;
pub mod ledger;
pub mod priced;
pub mod quota;
pub mod routes;
pub mod service;
pub mod store;
pub mod trace;
pub mod webhooks;
