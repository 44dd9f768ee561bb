//! Billing: prices, credits, quota states, invoices and webhooks.
//!
//! Not built yet (issue 7). The crate exists so the workspace layout of
//! ARCHITECTURE.md is in place; it contains no behaviour.
