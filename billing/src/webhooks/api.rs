//! Admin routes for endpoints and deliveries.
//!
//! Every route first asks `tenant_exists`; a tenant's endpoint is found only
//! under that tenant (another tenant's id is a 404, indistinguishable from an
//! unknown one). Bodies are parsed here so malformed JSON gets the API's
//! error shape, not axum's plain-text rejection.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::Utc;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::endpoint::{self, Endpoint};
use super::{Inner, guard, is_event_type, log};
use crate::api_error::{ApiError, ApiResult};
use crate::routes::Routes;

pub(crate) type TenantExists = Arc<dyn Fn(&str) -> bool + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Api {
    inner: Arc<Inner>,
    tenant_exists: TenantExists,
}

/// The routes, stateless (so they can be listed without a service).
pub(crate) fn routes() -> Routes<Api> {
    Routes::new()
        .post("/admin/tenants/{id}/webhooks", create)
        .get("/admin/tenants/{id}/webhooks", list)
        .get("/admin/tenants/{id}/webhooks/{wid}", show)
        .patch("/admin/tenants/{id}/webhooks/{wid}", update)
        .delete("/admin/tenants/{id}/webhooks/{wid}", remove)
        .post("/admin/tenants/{id}/webhooks/{wid}/rotate-secret", rotate)
        .get("/admin/tenants/{id}/webhooks/{wid}/deliveries", deliveries)
        .post(
            "/admin/tenants/{id}/webhook-deliveries/{delivery_id}/redeliver",
            redeliver,
        )
}

pub(crate) fn state(inner: Arc<Inner>, tenant_exists: TenantExists) -> Api {
    Api {
        inner,
        tenant_exists,
    }
}

impl Api {
    fn tenant(&self, tenant_id: &str) -> ApiResult<()> {
        if (self.tenant_exists)(tenant_id) {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "tenant {tenant_id:?} not found"
            )))
        }
    }

    async fn endpoint(&self, tenant_id: &str, wid: &str) -> ApiResult<Endpoint> {
        self.tenant(tenant_id)?;
        self.inner
            .endpoints
            .get_for(tenant_id, wid)
            .await?
            .ok_or_else(|| not_found_endpoint(wid))
    }
}

fn not_found_endpoint(wid: &str) -> ApiError {
    ApiError::not_found(format!("webhook endpoint {wid:?} not found"))
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

/// `None`/`[]` = every event; each named type must be one we send.
fn check_events(events: Option<Vec<String>>) -> ApiResult<Option<Vec<String>>> {
    let Some(mut events) = events else {
        return Ok(None);
    };
    if let Some(bad) = events.iter().find(|e| !is_event_type(e)) {
        return Err(ApiError::invalid(
            "events",
            format!(
                "unknown event type {bad:?}; expected any of {}",
                super::EVENT_TYPES.join(", ")
            ),
        ));
    }
    events.sort();
    events.dedup();
    Ok(if events.is_empty() {
        None
    } else {
        Some(events)
    })
}

async fn check_url(inner: &Inner, raw: &str) -> ApiResult<String> {
    let url = guard::parse_url(raw).map_err(|e| ApiError::invalid("url", e.0))?;
    guard::check_url(&url, inner.config.allow_private)
        .await
        .map_err(|e| ApiError::invalid("url", e.0))?;
    Ok(url.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    url: String,
    #[serde(default)]
    events: Option<Vec<String>>,
}

async fn create(
    State(api): State<Api>,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    api.tenant(&tenant_id)?;
    let body: CreateBody = parse(&body)?;
    let events = check_events(body.events)?;
    let url = check_url(&api.inner, &body.url).await?;
    let now = Utc::now();
    let ep = Endpoint {
        id: endpoint::new_id(),
        tenant_id,
        url,
        events,
        enabled: true,
        secret: endpoint::new_secret(),
        created_at: now,
        updated_at: now,
        disabled_reason: None,
    };
    api.inner.endpoints.create(&ep).await?;
    tracing::info!(tenant_id = %ep.tenant_id, endpoint_id = %ep.id, "webhook endpoint created");
    let mut view = ep.view();
    if let Some(map) = view.as_object_mut() {
        map.insert("secret".into(), Value::String(ep.secret.clone()));
    }
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list(State(api): State<Api>, Path(tenant_id): Path<String>) -> ApiResult<Json<Value>> {
    api.tenant(&tenant_id)?;
    let data: Vec<Value> = api
        .inner
        .endpoints
        .list_tenant(&tenant_id)
        .await?
        .iter()
        .map(Endpoint::view)
        .collect();
    Ok(Json(json!({ "data": data })))
}

async fn show(
    State(api): State<Api>,
    Path((tenant_id, wid)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(api.endpoint(&tenant_id, &wid).await?.view()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    #[serde(default)]
    url: Option<String>,
    /// Present and `null` = every event.
    #[serde(default, deserialize_with = "present")]
    events: Option<Option<Vec<String>>>,
    #[serde(default)]
    enabled: Option<bool>,
}

fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `PATCH`: change the url, the events, or re-enable (e.g. after a 410).
async fn update(
    State(api): State<Api>,
    Path((tenant_id, wid)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    api.endpoint(&tenant_id, &wid).await?;
    let body: UpdateBody = parse(&body)?;
    let url = match &body.url {
        Some(u) => Some(check_url(&api.inner, u).await?),
        None => None,
    };
    let events = body.events.map(check_events).transpose()?;
    let ep = api
        .inner
        .endpoints
        .modify(&tenant_id, &wid, |ep| {
            if let Some(u) = &url {
                ep.url.clone_from(u);
            }
            if let Some(ev) = &events {
                ep.events.clone_from(ev);
            }
            if let Some(enabled) = body.enabled {
                ep.enabled = enabled;
                if enabled {
                    ep.disabled_reason = None;
                }
            }
        })
        .await?
        .ok_or_else(|| not_found_endpoint(&wid))?;
    Ok(Json(ep.view()))
}

async fn remove(
    State(api): State<Api>,
    Path((tenant_id, wid)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    api.tenant(&tenant_id)?;
    if api.inner.endpoints.delete(&tenant_id, &wid).await? {
        tracing::info!(%tenant_id, endpoint_id = %wid, "webhook endpoint deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found_endpoint(&wid))
    }
}

async fn rotate(
    State(api): State<Api>,
    Path((tenant_id, wid)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    api.tenant(&tenant_id)?;
    let secret = endpoint::new_secret();
    let ep = api
        .inner
        .endpoints
        .modify(&tenant_id, &wid, |ep| ep.secret.clone_from(&secret))
        .await?
        .ok_or_else(|| not_found_endpoint(&wid))?;
    tracing::info!(%tenant_id, endpoint_id = %wid, "webhook secret rotated");
    Ok(Json(json!({ "id": ep.id, "secret": ep.secret })))
}

/// `?limit=` (default 100, at most 1000) and `?delivery_id=`.
async fn deliveries(
    State(api): State<Api>,
    Path((tenant_id, wid)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let ep = api.endpoint(&tenant_id, &wid).await?;
    let mut limit = 100u64;
    let mut delivery_id = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "limit" => {
                limit = v
                    .parse::<u64>()
                    .ok()
                    .filter(|l| (1..=1000).contains(l))
                    .ok_or_else(|| ApiError::invalid("limit", "limit must be 1 to 1000"))?;
            }
            "delivery_id" => delivery_id = Some(v.into_owned()),
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter {other:?}"),
                ));
            }
        }
    }
    let rows = log::list(
        &api.inner.ch,
        &tenant_id,
        &ep.id,
        delivery_id.as_deref(),
        limit,
    )
    .await?;
    let data: Vec<Value> = rows.iter().map(log::DeliveryRow::view).collect();
    Ok(Json(json!({ "data": data })))
}

/// Re-enqueues a finished delivery (same body, same `webhook-id`) under a
/// fresh `Nats-Msg-Id`. A delivery still being retried is a 409: a second
/// copy would race the first.
async fn redeliver(
    State(api): State<Api>,
    Path((tenant_id, delivery_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    api.tenant(&tenant_id)?;
    let unknown = || ApiError::not_found(format!("webhook delivery {delivery_id:?} not found"));
    if !endpoint::plausible_id(&delivery_id) {
        return Err(unknown());
    }
    let known = log::lookup(&api.inner.ch, &tenant_id, &delivery_id)
        .await?
        .ok_or_else(unknown)?;
    if known.last_outcome == log::Outcome::Failed.as_str() {
        return Err(ApiError::conflict(
            "this delivery is still being retried; redeliver it once it has ended",
        ));
    }
    let ep = api
        .inner
        .endpoints
        .get_for(&tenant_id, &known.endpoint_id)
        .await?
        .ok_or_else(|| not_found_endpoint(&known.endpoint_id))?;
    if !ep.enabled {
        return Err(ApiError::conflict(
            "the endpoint is disabled; enable it before redelivering",
        ));
    }
    let (mut job, body) = api
        .inner
        .queue
        .find(&ep.id, &delivery_id)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "webhook delivery {delivery_id:?} is older than the queue's retention"
            ))
        })?;
    if job.tenant_id != tenant_id || job.webhook_id != delivery_id {
        return Err(unknown());
    }
    job.attempt_base = known.last_attempt;
    let msg_id = format!("{delivery_id}.redeliver.{}", uuid::Uuid::now_v7().simple());
    api.inner.queue.publish(&job, body, &msg_id).await?;
    tracing::info!(%tenant_id, endpoint_id = %ep.id, %delivery_id, "webhook redelivery enqueued");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "delivery_id": delivery_id, "status": "enqueued" })),
    )
        .into_response())
}
