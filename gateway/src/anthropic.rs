//! The Anthropic-format routes: `/v1/messages` over the shared
//! [`pipeline`](crate::pipeline), and `/v1/messages/count_tokens`, which is
//! recorded as a `token_count` event and never billed.

use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::time::Instant;
use tollgate_schemas::events::{
    ApiFormat, CountSource, Event, EventMeta, RequestEvent, TokenCountEvent,
};
use tracing::Instrument;

use crate::config::ProviderKind;
use crate::error::{ApiStyle, GatewayError};
use crate::pipeline::{
    self, Surface, authenticate, model_of, parse_object, read_body, resolve_model,
};
use crate::state::{App, RequestId};
use crate::{events, tokens, validate};

pub async fn messages(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    pipeline::handle(app, rid, headers, body, Surface::Messages).await
}

const ROUTE: &str = "/v1/messages/count_tokens";

pub async fn count_tokens(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (span, traceparent) =
        crate::trace::server_span(&headers, "POST", ROUTE, "count_tokens", &rid);
    let mut who = (events::UNAUTHENTICATED.to_owned(), String::new());
    let mut model_seen = None;
    let result = async {
        // Body first, as in the pipeline: never answer mid-upload.
        let bytes = read_body(&app, &headers, body).await?;
        let key = authenticate(&app, &headers).await?;
        who = (key.tenant_id.clone(), key.key_id.clone());
        let req = parse_object(&bytes)?;
        model_seen = req.get("model").and_then(Value::as_str).map(str::to_owned);
        validate::check(validate::Api::CountTokens, &req)?;
        let model = model_of(&req)?;
        resolve_model(&app, &key, &model)?;
        let version = headers
            .get("anthropic-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("2023-06-01");
        let (n, source) = match upstream_count(&app, &model, &req, version).await {
            Some(n) => (n, CountSource::Upstream),
            None => (tokens::estimate_request_input(&req), CountSource::Tokenizer),
        };
        let event = Event::TokenCount(TokenCountEvent {
            meta: EventMeta::new(key.tenant_id.clone(), key.key_id.clone(), rid.0.as_ref()),
            api: ApiFormat::AnthropicCountTokens,
            model,
            input_tokens: n,
            source,
        });
        events::emit(&app.publisher, &app.names, &event, &traceparent);
        Ok::<_, GatewayError>(axum::Json(serde_json::json!({"input_tokens": n})).into_response())
    }
    .instrument(span.clone())
    .await;
    let (resp, error_type) = match result {
        Ok(r) => (r, None),
        Err(e) => {
            let ty = e.type_name(ApiStyle::Anthropic);
            (
                e.into_response_for(ApiStyle::Anthropic),
                Some(ty.to_owned()),
            )
        }
    };
    crate::trace::record_status(&span, resp.status().as_u16(), error_type.as_deref());
    pipeline::record_request(
        &app,
        &traceparent,
        RequestEvent {
            meta: EventMeta::new(who.0, who.1, rid.0.as_ref()),
            api: ApiFormat::AnthropicCountTokens,
            method: "POST".into(),
            route: ROUTE.into(),
            model: model_seen,
            status: resp.status().as_u16(),
            error_type,
            streamed: false,
            latency_ms: started.elapsed().as_millis() as u64,
            deployment: None,
        },
    );
    resp
}

/// The count from the first Anthropic deployment of the model that answers;
/// `None` (use the tokenizer) when the model has none or it fails.
async fn upstream_count(
    app: &App,
    model: &str,
    req: &serde_json::Map<String, Value>,
    version: &str,
) -> Option<u64> {
    for d in app
        .router
        .plan(model)
        .into_iter()
        .filter(|d| d.provider == ProviderKind::Anthropic)
    {
        if !d.breaker.allow() {
            continue;
        }
        let mut body = req.clone();
        body.insert("model".into(), Value::String(d.upstream_model.clone()));
        let mut call = d
            .client
            .post(format!("{}/v1/messages/count_tokens", d.base_url))
            .header("anthropic-version", version)
            .timeout(Duration::from_millis(app.config.timeouts.attempt_ms))
            .json(&body);
        if let Some(k) = &d.api_key {
            call = call.header("x-api-key", k);
        }
        match call.send().await {
            Ok(r) if r.status().is_success() => {
                d.breaker.record_success();
                let v: Value = r.json().await.ok()?;
                return v.get("input_tokens").and_then(Value::as_u64);
            }
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => return None,
            _ => d.breaker.record_failure(),
        }
    }
    None
}
