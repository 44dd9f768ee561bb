//! The admin API (master key) and the tenant API (the tenant's own key).
//!
//! Decimals are strings in and out. Errors are `{"error": {"type", "message"}}`.
//! The OpenAPI document describing both is `billing/openapi.json`, served at
//! `/openapi.json`; a test checks it against [`routes`], which is read off
//! the tables the router is built from (see [`crate::routes`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine;
use chrono::{DateTime, Utc};
use rand::RngCore;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tollgate_schemas::records::{
    KeyRecord, ModelPrice, QuotaScope, price_book_key, quota_key, secret_hash,
};

use crate::api_error::{ApiError, ApiResult};
use crate::ledger::Grant;
use crate::routes::Routes;
use crate::service::{Billing, month_start};
use crate::store::{self, BillingMode, InvoiceStatus, Tenant};
use crate::webhooks::AdminApi as Api;

type B = Arc<Billing>;

pub const OPENAPI: &str = include_str!("../openapi.json");

/// The service's route tables, stateless: `router` gives them their state,
/// `routes` lists them. One tuple, so a table added here is either used by
/// both or fails to compile.
fn tables() -> (Routes<B>, Routes<Api>, Routes<B>, Routes) {
    let admin = Routes::new()
        .post("/admin/tenants", create_tenant)
        .get("/admin/tenants", list_tenants)
        .get("/admin/tenants/{id}", get_tenant)
        .patch("/admin/tenants/{id}", patch_tenant)
        .post("/admin/tenants/{id}/keys", create_key)
        .get("/admin/tenants/{id}/keys", list_keys)
        .get("/admin/keys/{key_id}", get_key)
        .patch("/admin/keys/{key_id}", patch_key)
        .delete("/admin/keys/{key_id}", revoke_key)
        .post("/admin/tenants/{id}/credits", grant_credits)
        .get("/admin/tenants/{id}/credits", list_grants)
        .get("/admin/tenants/{id}/balance", admin_balance)
        .get("/admin/prices", list_prices)
        .put("/admin/prices/{model}", put_price)
        .get("/admin/prices/{model}", price_history)
        .get("/admin/tenants/{id}/invoices", admin_invoices)
        .post("/admin/tenants/{id}/invoices/finalize", finalize)
        .get("/admin/invoices/{invoice_id}", get_invoice)
        .post("/admin/invoices/{invoice_id}/void", void_invoice)
        .get("/admin/spend", spend);
    let tenant = Routes::new()
        .get("/v1/billing/balance", tenant_balance)
        .get("/v1/billing/usage", tenant_usage)
        .get("/v1/billing/invoices", tenant_invoices);
    let open = Routes::new()
        .get("/openapi.json", openapi)
        .get("/healthz", || async { "ok" })
        .get("/metrics", || async { crate::app::prometheus().render() });
    (admin, crate::webhooks::admin_api_routes(), tenant, open)
}

/// Every (method, path) the service answers, read off the tables `router`
/// is built from (the OpenAPI test compares them with `openapi.json`).
pub fn routes() -> Vec<(&'static str, &'static str)> {
    let (admin, hooks, tenant, open) = tables();
    [
        admin.listed(),
        hooks.listed(),
        tenant.listed(),
        open.listed(),
    ]
    .concat()
}

/// Every route of the service.
pub fn router(billing: B) -> Router {
    let tenant_exists = {
        let b = billing.clone();
        Arc::new(move |id: &str| {
            b.tenant_ids
                .read()
                .map(|ids| ids.contains(id))
                .unwrap_or(false)
        }) as Arc<dyn Fn(&str) -> bool + Send + Sync>
    };
    let (admin, hooks, tenant, open) = tables();
    let admin = admin
        .with_state(billing.clone())
        .merge(billing.webhooks.admin_routes(hooks, tenant_exists))
        .map(|r| {
            r.route_layer(middleware::from_fn_with_state(
                billing.clone(),
                require_admin,
            ))
        });
    let tenant = tenant.with_state(billing.clone());
    open.merge(admin)
        .merge(tenant)
        .into_router()
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::method_not_allowed("this method is not allowed on this route")
        })
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok())
}

async fn require_admin(State(b): State<B>, req: Request, next: Next) -> Response {
    let ok = bearer(req.headers())
        .is_some_and(|k| bool::from(k.as_bytes().ct_eq(b.admin_key.as_bytes())));
    if !ok {
        return ApiError::unauthorized(
            "the admin API takes the master key as `Authorization: Bearer <key>` (or `x-api-key`)",
        )
        .into_response();
    }
    next.run(req).await
}

/// A malformed query string, as a 400 in the API's error shape.
fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request(format!("invalid query string: {}", e.body_text()))
}

/// Parses a JSON body into `T`, with a 400 naming the field on failure.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("invalid body at `{path}`: {}", e.inner());
        // `.` is the body as a whole (not JSON, or not an object): no field.
        if path == "." {
            ApiError::bad_request(message)
        } else {
            ApiError::invalid(path, message)
        }
    })
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn money(field: &str, d: Decimal) -> ApiResult<Decimal> {
    if d.normalize().scale() > 12 {
        return Err(ApiError::invalid(
            field,
            format!("{field} has more than 12 decimal places"),
        ));
    }
    Ok(d.normalize())
}

// ------------------------------------------------------------------ tenants

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    id: String,
    #[serde(default)]
    name: Option<String>,
    billing: BillingMode,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    monthly_limit: Option<Decimal>,
}

fn tenant_json(t: &Tenant) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "billing": t.billing,
        "monthly_limit": t.monthly_limit.map(|d| d.to_string()),
        "period_start": t.period_start,
        "created_at": t.created_at,
    })
}

async fn create_tenant(State(b): State<B>, bytes: axum::body::Bytes) -> ApiResult<Response> {
    let n: NewTenant = body(&bytes)?;
    if !valid_id(&n.id) {
        return Err(ApiError::invalid("id", "id must match [A-Za-z0-9_-]{1,64}"));
    }
    if let Some(l) = n.monthly_limit {
        money("monthly_limit", l)?;
        if l.is_sign_negative() {
            return Err(ApiError::invalid(
                "monthly_limit",
                "monthly_limit must not be negative",
            ));
        }
        if n.billing == BillingMode::Prepaid {
            return Err(ApiError::invalid(
                "monthly_limit",
                "monthly_limit applies to postpaid tenants; a prepaid tenant is limited by its credit",
            ));
        }
    }
    let mut st = b.state.lock().await;
    if st.tenants.contains_key(&n.id) {
        return Err(ApiError::conflict(format!(
            "tenant {} already exists",
            n.id
        )));
    }
    let now = Utc::now();
    let t = Tenant {
        name: n.name.unwrap_or_else(|| n.id.clone()),
        id: n.id,
        billing: n.billing,
        monthly_limit: n.monthly_limit.map(|d| d.normalize()),
        period_start: month_start(now),
        created_at: now,
    };
    b.put_tenant(&mut st, t.clone()).await?;
    Ok((StatusCode::CREATED, Json(tenant_json(&t))).into_response())
}

async fn list_tenants(State(b): State<B>) -> Json<Value> {
    let st = b.state.lock().await;
    Json(json!({"data": st.tenants.values().map(tenant_json).collect::<Vec<_>>()}))
}

async fn get_tenant(State(b): State<B>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let st = b.state.lock().await;
    let t = st
        .tenants
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no tenant {id}")))?;
    Ok(Json(tenant_json(t)))
}

async fn patch_tenant(
    State(b): State<B>,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let patch: BTreeMap<String, Value> = body(&bytes)?;
    let mut st = b.state.lock().await;
    let mut t = st
        .tenants
        .get(&id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no tenant {id}")))?;
    for (k, v) in patch {
        match k.as_str() {
            "name" => {
                t.name = v
                    .as_str()
                    .ok_or_else(|| ApiError::invalid("name", "name must be a string"))?
                    .to_owned()
            }
            "monthly_limit" => t.monthly_limit = opt_decimal("monthly_limit", &v)?,
            "billing" => {
                t.billing = serde_json::from_value(v).map_err(|_| {
                    ApiError::invalid("billing", "billing must be prepaid or postpaid")
                })?
            }
            other => return Err(ApiError::invalid(other, format!("unknown field {other}"))),
        }
    }
    if t.billing == BillingMode::Prepaid && t.monthly_limit.is_some() {
        return Err(ApiError::invalid(
            "monthly_limit",
            "monthly_limit applies to postpaid tenants",
        ));
    }
    b.put_tenant(&mut st, t.clone()).await?;
    Ok(Json(tenant_json(&t)))
}

fn opt_decimal(field: &str, v: &Value) -> ApiResult<Option<Decimal>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => {
            let d: Decimal = s.parse().map_err(|_| {
                ApiError::invalid(field, format!("{field} must be a decimal string"))
            })?;
            if d.is_sign_negative() {
                return Err(ApiError::invalid(
                    field,
                    format!("{field} must not be negative"),
                ));
            }
            Ok(Some(money(field, d)?))
        }
        _ => Err(ApiError::invalid(
            field,
            format!("{field} must be a decimal string or null"),
        )),
    }
}

// --------------------------------------------------------------------- keys

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    rpm: Option<u32>,
    #[serde(default)]
    tpm: Option<u64>,
    #[serde(default)]
    max_concurrency: Option<u32>,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    budget: Option<Decimal>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
}

fn key_json(k: &KeyRecord, b: &crate::service::State) -> Value {
    let spent = b.key_spend.get(&k.key_id).copied().unwrap_or_default();
    json!({
        "id": k.key_id,
        "tenant_id": k.tenant_id,
        "name": k.name,
        "models": k.models,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "max_concurrency": k.max_concurrency,
        "budget": k.budget.map(|d| d.to_string()),
        "spent": spent.to_string(),
        "expires_at": k.expires_at,
        "disabled": k.disabled,
        "revoked": k.revoked,
        "state": b.quota.get(&quota_key(QuotaScope::Key, &k.key_id)).map(|q| q.state.as_str()).unwrap_or("ok"),
    })
}

fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "sk-tg-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

async fn create_key(
    State(b): State<B>,
    Path(tenant): Path<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let n: NewKey = if bytes.is_empty() {
        body(b"{}")?
    } else {
        body(&bytes)?
    };
    if let Some(budget) = n.budget {
        money("budget", budget)?;
        if budget.is_sign_negative() {
            return Err(ApiError::invalid("budget", "budget must not be negative"));
        }
    }
    let mut st = b.state.lock().await;
    if !st.tenants.contains_key(&tenant) {
        return Err(ApiError::not_found(format!("no tenant {tenant}")));
    }
    let secret = new_secret();
    let key_id = format!("key_{}", uuid::Uuid::now_v7().simple());
    let k = KeyRecord {
        key_id: key_id.clone(),
        tenant_id: tenant,
        name: n.name.unwrap_or_default(),
        secret_sha256: secret_hash(&secret),
        models: n.models,
        rpm: n.rpm,
        tpm: n.tpm,
        max_concurrency: n.max_concurrency,
        expires_at: n.expires_at,
        disabled: false,
        revoked: false,
        budget: n.budget.map(|d| d.normalize()),
    };
    b.put_key(&mut st, k.clone()).await?;
    let mut out = key_json(&k, &st);
    out["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn list_keys(State(b): State<B>, Path(tenant): Path<String>) -> ApiResult<Json<Value>> {
    let st = b.state.lock().await;
    if !st.tenants.contains_key(&tenant) {
        return Err(ApiError::not_found(format!("no tenant {tenant}")));
    }
    let data: Vec<Value> = st
        .keys
        .values()
        .filter(|k| k.tenant_id == tenant)
        .map(|k| key_json(k, &st))
        .collect();
    Ok(Json(json!({ "data": data })))
}

async fn get_key(State(b): State<B>, Path(key_id): Path<String>) -> ApiResult<Json<Value>> {
    let st = b.state.lock().await;
    let k = st
        .keys
        .get(&key_id)
        .ok_or_else(|| ApiError::not_found(format!("no key {key_id}")))?;
    Ok(Json(key_json(k, &st)))
}

async fn patch_key(
    State(b): State<B>,
    Path(key_id): Path<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let patch: BTreeMap<String, Value> = body(&bytes)?;
    let mut st = b.state.lock().await;
    let mut k = st
        .keys
        .get(&key_id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no key {key_id}")))?;
    if k.revoked {
        return Err(ApiError::conflict("a revoked key cannot be changed"));
    }
    for (name, v) in patch {
        let bad = |what: &str| ApiError::invalid(name.clone(), format!("{name} must be {what}"));
        match name.as_str() {
            "name" => k.name = v.as_str().ok_or_else(|| bad("a string"))?.to_owned(),
            "models" => {
                k.models =
                    serde_json::from_value(v).map_err(|_| bad("a list of model names or null"))?
            }
            "rpm" => k.rpm = serde_json::from_value(v).map_err(|_| bad("an integer or null"))?,
            "tpm" => k.tpm = serde_json::from_value(v).map_err(|_| bad("an integer or null"))?,
            "max_concurrency" => {
                k.max_concurrency =
                    serde_json::from_value(v).map_err(|_| bad("an integer or null"))?
            }
            "budget" => k.budget = opt_decimal("budget", &v)?,
            "expires_at" => {
                k.expires_at =
                    serde_json::from_value(v).map_err(|_| bad("an RFC 3339 time or null"))?
            }
            "disabled" => k.disabled = v.as_bool().ok_or_else(|| bad("a boolean"))?,
            other => return Err(ApiError::invalid(other, format!("unknown field {other}"))),
        }
    }
    b.put_key(&mut st, k.clone()).await?;
    Ok(Json(key_json(&k, &st)))
}

async fn revoke_key(State(b): State<B>, Path(key_id): Path<String>) -> ApiResult<StatusCode> {
    let mut st = b.state.lock().await;
    let mut k = st
        .keys
        .get(&key_id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no key {key_id}")))?;
    // The record stays (revoked), so every gateway's watch sees the change
    // and refuses the key with a clear reason.
    k.revoked = true;
    b.put_key(&mut st, k).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------ credits

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGrant {
    #[serde(with = "rust_decimal::serde::str")]
    amount: Decimal,
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    effective_at: Option<DateTime<Utc>>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    note: Option<String>,
}

async fn grant_credits(
    State(b): State<B>,
    Path(tenant): Path<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let n: NewGrant = body(&bytes)?;
    let amount = money("amount", n.amount)?;
    if amount <= Decimal::ZERO {
        return Err(ApiError::invalid("amount", "amount must be positive"));
    }
    let now = Utc::now();
    let effective_at = n.effective_at.unwrap_or(now);
    if n.expires_at.is_some_and(|x| x <= effective_at) {
        return Err(ApiError::invalid(
            "expires_at",
            "expires_at must be after effective_at",
        ));
    }
    if !b.state.lock().await.tenants.contains_key(&tenant) {
        return Err(ApiError::not_found(format!("no tenant {tenant}")));
    }
    let g = Grant {
        id: format!("grant_{}", uuid::Uuid::now_v7().simple()),
        tenant_id: tenant,
        amount,
        priority: n.priority.unwrap_or(1),
        effective_at,
        expires_at: n.expires_at,
        created_at: now,
        note: n.note.unwrap_or_default(),
    };
    let g = b.grant(g).await?;
    Ok((StatusCode::CREATED, Json(grant_json(&g))).into_response())
}

fn grant_json(g: &Grant) -> Value {
    json!({
        "id": g.id,
        "tenant_id": g.tenant_id,
        "amount": g.amount.to_string(),
        "priority": g.priority,
        "effective_at": g.effective_at,
        "expires_at": g.expires_at,
        "created_at": g.created_at,
        "note": g.note,
    })
}

async fn list_grants(State(b): State<B>, Path(tenant): Path<String>) -> ApiResult<Json<Value>> {
    let mut st = b.state.lock().await;
    if !st.tenants.contains_key(&tenant) {
        return Err(ApiError::not_found(format!("no tenant {tenant}")));
    }
    let views = st.ledger(&tenant).grants();
    Ok(Json(json!({ "data": views })))
}

// ------------------------------------------------------------------ balance

async fn balance_json(b: &Billing, tenant: &str) -> ApiResult<Value> {
    let mut st = b.state.lock().await;
    let t = st
        .tenants
        .get(tenant)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no tenant {tenant}")))?;
    let now = Utc::now();
    let l = st.ledger(tenant);
    let balance = l.balance(now);
    let granted = l.live_granted(now);
    let q = st.quota.get(&quota_key(QuotaScope::Tenant, tenant));
    Ok(json!({
        "tenant_id": tenant,
        "billing": t.billing,
        "currency": "USD",
        "balance": balance.to_string(),
        "granted": granted.to_string(),
        "state": q.map(|q| q.state.as_str()).unwrap_or("ok"),
        "remaining": q.and_then(|q| q.remaining).map(|r| r.to_string()),
        "limit": q.and_then(|q| q.limit).map(|r| r.to_string()),
        "monthly_limit": t.monthly_limit.map(|d| d.to_string()),
        "month_spend": st.month_spend.get(tenant).copied().unwrap_or_default().to_string(),
        "priced_seq": st.priced_for(tenant),
    }))
}

async fn admin_balance(State(b): State<B>, Path(tenant): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(balance_json(&b, &tenant).await?))
}

// ------------------------------------------------------------------- prices

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPrice {
    #[serde(with = "rust_decimal::serde::str")]
    input_per_million: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    output_per_million: Decimal,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    cache_read_per_million: Option<Decimal>,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    cache_write_per_million: Option<Decimal>,
    #[serde(default)]
    effective_from: Option<DateTime<Utc>>,
}

async fn put_price(
    State(b): State<B>,
    Path(model): Path<String>,
    bytes: axum::body::Bytes,
) -> ApiResult<Response> {
    let n: NewPrice = body(&bytes)?;
    let price = ModelPrice {
        input_per_million: n.input_per_million.normalize(),
        output_per_million: n.output_per_million.normalize(),
        cache_read_per_million: n.cache_read_per_million.map(|d| d.normalize()),
        cache_write_per_million: n.cache_write_per_million.map(|d| d.normalize()),
    };
    price.validate().map_err(ApiError::bad_request)?;
    if model.is_empty() || model.len() > 256 {
        return Err(ApiError::invalid(
            "model",
            "model name must be 1 to 256 characters",
        ));
    }
    let mut st = b.state.lock().await;
    let at = n.effective_from.unwrap_or_else(Utc::now);
    if let Some(later) = st
        .prices
        .values()
        .find(|v| v.effective_from.is_some_and(|e| e > at))
    {
        return Err(ApiError::conflict(format!(
            "price-book version {} is scheduled after {at}; schedule changes in time order",
            later.version
        )));
    }
    let mut book = st.prices.values().next_back().cloned().unwrap_or_default();
    book.version = st.prices.keys().next_back().copied().unwrap_or(0) + 1;
    book.models.insert(model.clone(), price);
    book.effective_from = n.effective_from;
    store::put_json(&b.kv_prices, &price_book_key(book.version), &book).await?;
    st.prices.insert(book.version, book.clone());
    tracing::info!(version = book.version, model = %model, "new price-book version");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "model": model,
            "version": book.version,
            "effective_from": book.effective_from,
            "price": book.models.get(&model),
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct VersionQuery {
    #[serde(default)]
    version: Option<u64>,
}

/// The price book in force (or `?version=N`), with the list of versions.
async fn list_prices(
    State(b): State<B>,
    q: Result<Query<VersionQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    let st = b.state.lock().await;
    let current = match q.version {
        Some(v) => st
            .prices
            .get(&v)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no price-book version {v}")))?,
        None => st.book_at(Utc::now()).cloned().unwrap_or_default(),
    };
    Ok(Json(json!({
        "version": current.version,
        "models": current.models,
        "effective_from": current.effective_from,
        "versions": st.prices.values().map(|v| json!({"version": v.version, "effective_from": v.effective_from})).collect::<Vec<_>>(),
    })))
}

async fn price_history(State(b): State<B>, Path(model): Path<String>) -> ApiResult<Json<Value>> {
    let st = b.state.lock().await;
    let mut out = Vec::new();
    let mut last: Option<&ModelPrice> = None;
    for v in st.prices.values() {
        let p = v.models.get(&model);
        if p.is_some() && p != last {
            out.push(json!({"version": v.version, "effective_from": v.effective_from, "price": p}));
        }
        last = p;
    }
    if out.is_empty() {
        return Err(ApiError::not_found(format!(
            "model {model} has never been priced"
        )));
    }
    Ok(Json(json!({"model": model, "data": out})))
}

// ----------------------------------------------------------------- invoices

async fn invoices_of(b: &Billing, tenant: &str) -> ApiResult<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    if let Some(draft) = b.draft(tenant).await? {
        out.push(serde_json::to_value(draft)?);
    }
    let st = b.state.lock().await;
    let mut done: Vec<&store::Invoice> = st
        .invoices
        .values()
        .filter(|i| i.tenant_id == tenant)
        .collect();
    done.sort_by_key(|i| std::cmp::Reverse(i.period_start));
    for i in done {
        out.push(serde_json::to_value(i)?);
    }
    Ok(out)
}

async fn admin_invoices(State(b): State<B>, Path(tenant): Path<String>) -> ApiResult<Json<Value>> {
    if !b.state.lock().await.tenants.contains_key(&tenant) {
        return Err(ApiError::not_found(format!("no tenant {tenant}")));
    }
    Ok(Json(json!({"data": invoices_of(&b, &tenant).await?})))
}

async fn get_invoice(State(b): State<B>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let st = b.state.lock().await;
    let i = st
        .invoices
        .get(&id)
        .ok_or_else(|| ApiError::not_found(format!("no finalized invoice {id}")))?;
    Ok(Json(serde_json::to_value(i)?))
}

async fn finalize(State(b): State<B>, Path(tenant): Path<String>) -> ApiResult<Json<Value>> {
    let inv = b
        .finalize(&tenant, None)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no tenant {tenant}")))?;
    Ok(Json(serde_json::to_value(inv)?))
}

async fn void_invoice(State(b): State<B>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    match b.void_invoice(&id).await? {
        Ok(inv) => Ok(Json(serde_json::to_value(inv)?)),
        Err("not_found") => Err(ApiError::not_found(format!("no finalized invoice {id}"))),
        Err(_) => Err(ApiError::conflict("only a finalized invoice can be voided")),
    }
}

// -------------------------------------------------------------------- spend

#[derive(Deserialize)]
struct SpendQuery {
    #[serde(default)]
    group_by: Option<String>,
    #[serde(default)]
    from: Option<DateTime<Utc>>,
    #[serde(default)]
    to: Option<DateTime<Utc>>,
}

#[derive(clickhouse::Row, Deserialize)]
struct SpendRow {
    group: String,
    cost: String,
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
}

async fn spend_rows(
    b: &Billing,
    tenant: Option<&str>,
    q: &SpendQuery,
    allowed: &[&str],
) -> ApiResult<Value> {
    let group = q.group_by.as_deref().unwrap_or(allowed[0]);
    let column = match group {
        "tenant" if allowed.contains(&"tenant") => "tenant_id",
        "key" if allowed.contains(&"key") => "key_id",
        "model" if allowed.contains(&"model") => "model",
        "day" if allowed.contains(&"day") => "toString(toDate(occurred_at))",
        other => {
            return Err(ApiError::invalid(
                "group_by",
                format!(
                    "group_by must be one of {}, got {other:?}",
                    allowed.join(", ")
                ),
            ));
        }
    };
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or_else(|| month_start(to));
    if from > to {
        return Err(ApiError::invalid("from", "from must not be after to"));
    }
    let sql = format!(
        "SELECT {column} AS group, toString(-sum(amount)) AS cost, count() AS requests,
                sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                sum(cache_read_tokens) AS cache_read_tokens, sum(cache_write_tokens) AS cache_write_tokens
         FROM ledger_entries FINAL
         WHERE kind = 'debit' AND occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')
           AND (? = '' OR tenant_id = ?)
         GROUP BY group ORDER BY group"
    );
    let rows =
        b.ch.query(&sql)
            .bind(store::ch_time(from))
            .bind(store::ch_time(to).saturating_add(u32::from(to.timestamp_subsec_nanos() > 0)))
            .bind(tenant.unwrap_or(""))
            .bind(tenant.unwrap_or(""))
            .fetch_all::<SpendRow>()
            .await?;
    let key = match group {
        "tenant" => "tenant_id",
        "key" => "key_id",
        "day" => "day",
        _ => "model",
    };
    let data: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let cost = r
                .cost
                .parse::<Decimal>()
                .map(|d| d.normalize().to_string())
                .unwrap_or(r.cost);
            json!({
                key: r.group,
                "cost": cost,
                "requests": r.requests,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "cache_read_tokens": r.cache_read_tokens,
                "cache_write_tokens": r.cache_write_tokens,
            })
        })
        .collect();
    Ok(json!({"group_by": group, "from": from, "to": to, "currency": "USD", "data": data}))
}

async fn spend(
    State(b): State<B>,
    q: Result<Query<SpendQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    Ok(Json(
        spend_rows(&b, None, &q, &["tenant", "key", "model", "day"]).await?,
    ))
}

// ------------------------------------------------------------ tenant API

/// The tenant of the presented key, if the key is live.
async fn tenant_of(b: &Billing, headers: &HeaderMap) -> ApiResult<(String, String)> {
    let secret = bearer(headers).ok_or_else(|| {
        ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
    })?;
    let hash = secret_hash(secret);
    let st = b.state.lock().await;
    let k = st
        .key_by_hash
        .get(&hash)
        .and_then(|id| st.keys.get(id))
        .filter(|k| bool::from(k.secret_sha256.as_bytes().ct_eq(hash.as_bytes())))
        .ok_or_else(|| ApiError::unauthorized("invalid API key"))?;
    if k.revoked || k.disabled || k.expires_at.is_some_and(|x| x <= Utc::now()) {
        return Err(ApiError::unauthorized(
            "this API key is revoked, disabled or expired",
        ));
    }
    Ok((k.tenant_id.clone(), k.key_id.clone()))
}

async fn tenant_balance(State(b): State<B>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let (tenant, key_id) = tenant_of(&b, &headers).await?;
    let mut out = balance_json(&b, &tenant).await?;
    let st = b.state.lock().await;
    if let Some(k) = st.keys.get(&key_id) {
        out["key"] = key_json(k, &st);
    }
    Ok(Json(out))
}

async fn tenant_usage(
    State(b): State<B>,
    headers: HeaderMap,
    q: Result<Query<SpendQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(query_error)?;
    let (tenant, _) = tenant_of(&b, &headers).await?;
    Ok(Json(
        spend_rows(&b, Some(&tenant), &q, &["model", "key", "day"]).await?,
    ))
}

async fn tenant_invoices(State(b): State<B>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let (tenant, _) = tenant_of(&b, &headers).await?;
    let mut all = invoices_of(&b, &tenant).await?;
    // A void invoice is history for the operator, not the tenant's bill.
    all.retain(|i| i["status"] != json!(InvoiceStatus::Void));
    Ok(Json(json!({"data": all})))
}
