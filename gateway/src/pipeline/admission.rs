//! Admission: who the caller is, whether the key may use the model, and the
//! limiters' permits (the quota check itself is [`crate::quota`]'s).

use std::sync::Arc;

use axum::http::HeaderMap;
use serde_json::{Map, Value};
use tollgate_schemas::records::KeyRecord;

use crate::auth::presented_secret;
use crate::error::GatewayError;
use crate::limits::{Limiter, Permit};
use crate::state::App;
use crate::tokens;

/// Authenticates (401 when missing or unusable).
pub async fn authenticate(app: &App, headers: &HeaderMap) -> Result<Arc<KeyRecord>, GatewayError> {
    let secret = presented_secret(headers)?.ok_or(GatewayError::MissingKey)?;
    app.keys.authenticate(secret).await
}

/// 404 for a model no deployment serves (whatever the key's allow-list),
/// 403 for one the key may not use.
pub fn resolve_model(app: &App, key: &KeyRecord, model: &str) -> Result<(), GatewayError> {
    if !app.router.contains(model) {
        return Err(GatewayError::ModelNotFound(model.to_owned()));
    }
    if key
        .models
        .as_ref()
        .is_some_and(|allowed| !allowed.iter().any(|m| m == model))
    {
        return Err(GatewayError::ModelNotAllowed(model.to_owned()));
    }
    Ok(())
}

/// The per-request limiters and their permits, held until the response ends.
pub(super) struct Admission {
    limiters: Vec<Arc<Limiter>>,
    _permits: Vec<Permit>,
    estimate: u64,
}

impl Admission {
    pub(super) fn settle(&self, actual: u64) {
        for l in &self.limiters {
            l.settle_tokens(self.estimate, actual);
        }
    }
}

pub(super) fn admit(
    app: &App,
    key: &KeyRecord,
    req: &Map<String, Value>,
) -> Result<(Admission, HeaderMap), GatewayError> {
    let mut limiters = Vec::new();
    if !app.limits.global.is_unlimited() {
        limiters.push(app.limits.global.clone());
    }
    if let Some(l) = app.limits.for_key(key) {
        limiters.push(l);
    }
    let estimate = if limiters.iter().any(|l| l.has_tpm()) {
        tokens::estimate_request_input(req)
    } else {
        0
    };
    let mut permits = Vec::with_capacity(limiters.len());
    for l in &limiters {
        permits.push(l.admit(estimate)?);
    }
    let headers = limiters.last().map(|l| l.headers()).unwrap_or_default();
    Ok((
        Admission {
            limiters,
            _permits: permits,
            estimate,
        },
        headers,
    ))
}
