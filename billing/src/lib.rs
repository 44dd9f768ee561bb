//! Billing: prices, credits, quota states, invoices and webhooks.

pub mod api_error;
pub mod invoice;
pub mod ledger;
pub mod webhooks;
