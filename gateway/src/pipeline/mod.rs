//! The request pipeline every model route shares.
//!
//! authenticate → read and validate the body → resolve the model (404
//! unknown, 403 not allowed) → quota (the local debit estimate, see
//! [`crate::quota`]) → limits → upstream with failover (translating
//! the request when the deployment speaks the other format) → relay, plain or
//! SSE (translating back) → a usage event with the exact cost. Every request,
//! refused or not, also produces a request event. One pipeline, whatever the
//! client's format or the upstream's: usage is always read from what the
//! upstream reported, in its own format, before any translation.

mod admission;
mod finish;
mod plain;
mod request;
mod stream;
mod surface;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tollgate_schemas::events::{Event, EventMeta, RequestEvent};
use tollgate_schemas::records::KeyRecord;
use tracing::{Instrument, Span};

use self::admission::admit;
pub use self::admission::{authenticate, resolve_model};
use self::finish::Finish;
use self::plain::plain_response;
pub use self::request::{model_of, parse_object, read_body};
use self::stream::stream_response;
pub use self::surface::Surface;
pub use self::upstream::body_with_model;
use self::upstream::{bodies, forwarded_headers};
use crate::config::ProviderKind;
use crate::error::GatewayError;
use crate::routing::Deployment;
use crate::state::{App, RequestId};
use crate::{events, proxy, trace, validate};

/// What one request has learned so far, for its request event.
struct Ctx {
    app: App,
    rid: RequestId,
    surface: Surface,
    started: Instant,
    traceparent: String,
    /// The server span (see [`crate::trace`]).
    span: Span,
    key: Option<Arc<KeyRecord>>,
    model: Option<String>,
    streamed: bool,
    deployment: Option<String>,
}

/// Runs one model request through the pipeline.
pub async fn handle(
    app: App,
    rid: RequestId,
    headers: HeaderMap,
    body: Body,
    surface: Surface,
) -> Response {
    let (span, traceparent) =
        trace::server_span(&headers, "POST", surface.route(), surface.operation(), &rid);
    let mut ctx = Ctx {
        traceparent,
        span: span.clone(),
        app,
        rid,
        surface,
        started: Instant::now(),
        key: None,
        model: None,
        streamed: false,
        deployment: None,
    };
    let style = surface.style();
    let (resp, error_type) = match serve(&mut ctx, &headers, body)
        .instrument(span.clone())
        .await
    {
        Ok(resp) => (resp, None),
        Err(e) => {
            let ty = e.type_name(style);
            (e.into_response_for(style), Some(ty))
        }
    };
    let status = resp.status().as_u16();
    let (tenant, key_id) = ctx
        .key
        .as_ref()
        .map(|k| (k.tenant_id.clone(), k.key_id.clone()))
        .unwrap_or_else(|| (events::UNAUTHENTICATED.to_owned(), String::new()));
    if tollgate_telemetry::enabled() {
        span.record("tollgate.tenant_id", tenant.as_str());
        span.record("tollgate.key_id", key_id.as_str());
        if let Some(m) = &ctx.model {
            span.record("gen_ai.request.model", m.as_str());
        }
        trace::record_status(&span, status, error_type);
    }
    record_request(
        &ctx.app,
        &ctx.traceparent,
        RequestEvent {
            meta: EventMeta::new(tenant, key_id, ctx.rid.0.as_ref()),
            api: surface.api(),
            method: "POST".into(),
            route: surface.route().into(),
            model: ctx.model.clone(),
            status,
            error_type: error_type
                .map(str::to_owned)
                .or_else(|| (status >= 400).then(|| "upstream_error".to_owned())),
            streamed: ctx.streamed,
            latency_ms: ctx.started.elapsed().as_millis() as u64,
            deployment: ctx.deployment.clone(),
        },
    );
    resp
}

/// Publishes a request event and counts it.
pub fn record_request(app: &App, traceparent: &str, event: RequestEvent) {
    metrics::counter!(
        "tollgate_gateway_requests_total",
        "route" => event.route.clone(),
        "model" => event.model.clone().filter(|m| app.router.contains(m)).unwrap_or_else(|| "_other".into()),
        "status" => event.status.to_string()
    )
    .increment(1);
    metrics::histogram!("tollgate_gateway_request_duration_seconds", "route" => event.route.clone())
        .record(event.latency_ms as f64 / 1000.0);
    events::emit(
        &app.publisher,
        &app.names,
        &Event::Request(event),
        traceparent,
    );
}

async fn serve(ctx: &mut Ctx, headers: &HeaderMap, body: Body) -> Result<Response, GatewayError> {
    let app = ctx.app.clone();
    // Read the body before anything can refuse the request: a response sent
    // while the client is still writing makes the server drop the connection,
    // and a client reusing it sees a spurious connection error.
    let bytes = read_body(&app, headers, body).await?;
    let key = authenticate(&app, headers).await?;
    ctx.key = Some(key.clone());
    let req = parse_object(&bytes)?;
    ctx.model = req.get("model").and_then(Value::as_str).map(str::to_owned);
    let stream = validate::check(ctx.surface.validated_as(), &req)?.stream;
    let model = model_of(&req)?;
    ctx.streamed = stream;
    resolve_model(&app, &key, &model)?;
    app.quotas.check(&key)?;
    if app.publisher.spool_full() {
        return Err(GatewayError::Unavailable("the event spool is full"));
    }
    let (admission, limit_headers) = admit(&app, &key, &req)?;
    let client_wants_usage = stream
        && req
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);

    let plan = app.router.plan(&model);
    let bodies = bodies(ctx.surface, &req, &plan, stream)?;
    let forward = forwarded_headers(headers, &plan);
    let anthropic_version = headers
        .get("anthropic-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("2023-06-01")
        .to_owned();
    let surface = ctx.surface;
    let body_for = |d: &Deployment| -> Bytes {
        let base = match d.provider {
            ProviderKind::Openai if surface == Surface::Responses && d.responses_api => {
                bodies.openai_responses.as_ref()
            }
            ProviderKind::Openai => bodies.openai.as_ref(),
            ProviderKind::Anthropic => bodies.anthropic.as_ref(),
        };
        match base {
            Some(m) => body_with_model(m, &d.upstream_model),
            None => body_with_model(&Map::new(), &d.upstream_model),
        }
    };
    let path_for = move |d: &Deployment| surface.upstream_path(d);
    let timeouts = &app.config.timeouts;
    let deadline = ctx.started + Duration::from_millis(timeouts.total_ms);
    let upstream = proxy::send(
        &plan,
        &proxy::Outbound {
            path: &path_for,
            body: &body_for,
            forward: &forward,
            anthropic_version: &anthropic_version,
            operation: surface.operation(),
            tenant_id: &key.tenant_id,
            key_id: &key.key_id,
            request_id: &ctx.rid.0,
        },
        Duration::from_millis(timeouts.attempt_ms),
        deadline,
    )
    .await?;
    ctx.deployment = Some(upstream.deployment.name.clone());
    trace::record(
        &ctx.span,
        "gen_ai.system",
        upstream.deployment.provider.as_str(),
    );
    trace::record(
        &ctx.span,
        "tollgate.deployment",
        upstream.deployment.name.as_str(),
    );
    let done = Finish {
        app: app.clone(),
        rid: ctx.rid.clone(),
        key,
        surface: ctx.surface,
        model,
        deployment: upstream.deployment.clone(),
        retries: upstream.retries,
        started: ctx.started,
        traceparent: ctx.traceparent.clone(),
        request: Arc::new(req),
        admission,
        span: ctx.span.clone(),
        upstream_span: upstream.span,
        upstream_wait: upstream.wait,
    };
    if stream && upstream.response.status().is_success() {
        done.record_overhead(Duration::ZERO);
        Ok(stream_response(
            done,
            upstream.response,
            client_wants_usage,
            limit_headers,
        ))
    } else {
        plain_response(done, upstream.response, limit_headers).await
    }
}
