//! The state every request shares: configuration, the key store, quotas,
//! limits, the price book in force, the bus and the event publisher; and the
//! request id each request carries.
//!
//! [`crate::app`] builds it and hands it to the routes; the handlers and the
//! pipeline read it. It depends on no handler, so nothing imports its way
//! back to the routes.

use std::sync::{Arc, RwLock};

use tollgate_schemas::Names;
use tollgate_schemas::bus::EventBus;
use tollgate_schemas::records::PriceBook;

use crate::auth::KeyStore;
use crate::config::Config;
use crate::limits::Limits;
use crate::publisher::Publisher;
use crate::quota::Quotas;
use crate::routing::Router as ModelRouter;

pub struct AppState {
    pub config: Config,
    pub names: Names,
    pub router: ModelRouter,
    pub keys: KeyStore,
    pub limits: Limits,
    pub quotas: Quotas,
    /// The book in force: billing's from KV (`crate::prices::PriceFeed`, which
    /// installs each new one here), else the config's.
    pub prices: Arc<RwLock<Arc<PriceBook>>>,
    pub bus: Arc<dyn EventBus>,
    pub publisher: Publisher,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

pub type App = Arc<AppState>;

impl AppState {
    pub fn price_book(&self) -> Arc<PriceBook> {
        match self.prices.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The request id of this request: `x-request-id` on the response and
/// `request_id` in its events.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);
