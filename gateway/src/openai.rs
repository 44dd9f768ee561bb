//! The OpenAI-format surface: chat completions, legacy completions, models.
//!
//! One pipeline per request: authenticate → read and validate the body →
//! resolve the model (404 unknown, 403 not allowed) → limits → upstream with
//! failover → relay (plain or SSE) → usage event with the exact cost. Every
//! request, refused or not, also produces a request event.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::{Bytes, BytesMut};
use futures::Stream;
use futures::stream::BoxStream;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tollgate_schemas::events::{ApiFormat, Event, EventMeta, RequestEvent, TokenCounts, UsageEvent};
use tollgate_schemas::records::KeyRecord;

use crate::app::{App, RequestId};
use crate::auth::presented_secret;
use crate::error::{ApiStyle, GatewayError};
use crate::limits::{Limiter, Permit};
use crate::routing::Deployment;
use crate::sse::{OpenAiRelay, OpenAiUsage, SseEvent, SseFramer};
use crate::{events, proxy, tokens};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
    fn api(self) -> ApiFormat {
        match self {
            Endpoint::Chat => ApiFormat::OpenaiChat,
            Endpoint::Completions => ApiFormat::OpenaiCompletions,
        }
    }
    fn route(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

pub async fn chat_completions(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, rid, headers, body, Endpoint::Chat).await
}

pub async fn completions(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(app, rid, headers, body, Endpoint::Completions).await
}

/// What one request has learned so far, for its request event.
struct Ctx {
    app: App,
    rid: RequestId,
    endpoint: Endpoint,
    started: Instant,
    traceparent: String,
    key: Option<Arc<KeyRecord>>,
    model: Option<String>,
    streamed: bool,
    deployment: Option<String>,
}

async fn handle(app: App, rid: RequestId, headers: HeaderMap, body: Body, endpoint: Endpoint) -> Response {
    let mut ctx = Ctx {
        traceparent: events::traceparent(&headers),
        app,
        rid,
        endpoint,
        started: Instant::now(),
        key: None,
        model: None,
        streamed: false,
        deployment: None,
    };
    let (resp, error_type) = match serve(&mut ctx, &headers, body).await {
        Ok(resp) => (resp, None),
        Err(e) => {
            let ty = e.type_name(ApiStyle::OpenAi);
            (e.into_response_for(ApiStyle::OpenAi), Some(ty))
        }
    };
    let status = resp.status().as_u16();
    metrics::counter!("tollgate_gateway_requests_total", "route" => endpoint.route(), "status" => status.to_string())
        .increment(1);
    let (tenant, key_id) = ctx
        .key
        .as_ref()
        .map(|k| (k.tenant_id.clone(), k.key_id.clone()))
        .unwrap_or_else(|| (events::UNAUTHENTICATED.to_owned(), String::new()));
    let event = Event::Request(RequestEvent {
        meta: EventMeta::new(tenant, key_id, ctx.rid.0.as_ref()),
        api: endpoint.api(),
        method: "POST".into(),
        route: endpoint.route().into(),
        model: ctx.model.clone(),
        status,
        error_type: error_type.map(str::to_owned).or_else(|| (status >= 400).then(|| "upstream_error".to_owned())),
        streamed: ctx.streamed,
        latency_ms: ctx.started.elapsed().as_millis() as u64,
        deployment: ctx.deployment.clone(),
    });
    events::emit(&ctx.app, &event, &ctx.traceparent);
    resp
}

/// Reads the body within the size limit, as OpenAI-shaped errors.
pub async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, GatewayError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok())
        && len > max {
            return Err(GatewayError::PayloadTooLarge(max));
        }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        if e.to_string().contains("length limit") {
            GatewayError::PayloadTooLarge(max)
        } else {
            GatewayError::bad_request(format!("could not read the request body: {e}"), None)
        }
    })
}

/// Parses a JSON object body.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(GatewayError::bad_request("the request body must be a JSON object", None)),
        Err(e) => Err(GatewayError::bad_request(
            format!("We could not parse the JSON body of your request. ({e})"),
            None,
        )),
    }
}

/// Authenticates; the error is 401 in the caller's style.
pub async fn authenticate(app: &App, headers: &HeaderMap) -> Result<Arc<KeyRecord>, GatewayError> {
    let secret = presented_secret(headers).ok_or(GatewayError::MissingKey)?;
    app.keys.authenticate(secret).await
}

/// 404 for a model no deployment serves (whatever the key's allow-list),
/// 403 for one the key may not use.
pub fn resolve_model(app: &App, key: &KeyRecord, model: &str) -> Result<(), GatewayError> {
    if !app.router.contains(model) {
        return Err(GatewayError::ModelNotFound(model.to_owned()));
    }
    if let Some(allowed) = &key.models
        && !allowed.iter().any(|m| m == model) {
            return Err(GatewayError::ModelNotAllowed(model.to_owned()));
        }
    Ok(())
}

fn validate(endpoint: Endpoint, req: &Map<String, Value>) -> Result<bool, GatewayError> {
    match endpoint {
        Endpoint::Chat => match req.get("messages") {
            Some(Value::Array(a)) if !a.is_empty() => {
                if a.iter().any(|m| !m.is_object()) {
                    return Err(GatewayError::bad_request("each message must be an object", Some("messages")));
                }
            }
            Some(Value::Array(_)) => {
                return Err(GatewayError::bad_request("'messages' must contain at least one message", Some("messages")));
            }
            Some(_) => return Err(GatewayError::bad_request("'messages' must be an array", Some("messages"))),
            None => return Err(GatewayError::bad_request("you must provide 'messages'", Some("messages"))),
        },
        Endpoint::Completions => match req.get("prompt") {
            Some(Value::String(_)) | Some(Value::Array(_)) => {}
            Some(_) => return Err(GatewayError::bad_request("'prompt' must be a string or an array", Some("prompt"))),
            None => return Err(GatewayError::bad_request("you must provide 'prompt'", Some("prompt"))),
        },
    }
    for (field, want) in [("max_tokens", "integer"), ("max_completion_tokens", "integer"), ("n", "integer")] {
        if let Some(v) = req.get(field)
            && !(v.is_null() || v.is_u64()) {
                return Err(GatewayError::bad_request(format!("'{field}' must be a non-negative {want}"), None));
            }
    }
    if let Some(t) = req.get("temperature")
        && !(t.is_null() || t.as_f64().is_some_and(|t| (0.0..=2.0).contains(&t))) {
            return Err(GatewayError::bad_request("'temperature' must be a number between 0 and 2", Some("temperature")));
        }
    let stream = match req.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(GatewayError::bad_request("'stream' must be a boolean", Some("stream"))),
    };
    match req.get("stream_options") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            if !stream {
                return Err(GatewayError::bad_request(
                    "'stream_options' is only allowed when 'stream' is true",
                    Some("stream_options"),
                ));
            }
            if o.get("include_usage").is_some_and(|v| !v.is_boolean() && !v.is_null()) {
                return Err(GatewayError::bad_request("'include_usage' must be a boolean", Some("stream_options")));
            }
        }
        Some(_) => return Err(GatewayError::bad_request("'stream_options' must be an object", Some("stream_options"))),
    }
    Ok(stream)
}

/// The per-request limiters and their permits, held until the response ends.
struct Admission {
    limiters: Vec<Arc<Limiter>>,
    _permits: Vec<Permit>,
    estimate: u64,
}

impl Admission {
    fn settle(&self, actual: u64) {
        for l in &self.limiters {
            l.settle_tokens(self.estimate, actual);
        }
    }
}

fn admit(app: &App, key: &KeyRecord, req: &Map<String, Value>) -> Result<(Admission, HeaderMap), GatewayError> {
    let mut limiters = Vec::new();
    if !app.limits.global.is_unlimited() {
        limiters.push(app.limits.global.clone());
    }
    if let Some(l) = app.limits.for_key(key) {
        limiters.push(l);
    }
    let estimate = if limiters.iter().any(|l| l.has_tpm()) { tokens::estimate_request_input(req) } else { 0 };
    let mut permits = Vec::with_capacity(limiters.len());
    for l in &limiters {
        permits.push(l.admit(estimate)?);
    }
    let headers = limiters.last().map(|l| l.headers()).unwrap_or_default();
    Ok((Admission { limiters, _permits: permits, estimate }, headers))
}

async fn serve(ctx: &mut Ctx, headers: &HeaderMap, body: Body) -> Result<Response, GatewayError> {
    let app = ctx.app.clone();
    let key = authenticate(&app, headers).await?;
    ctx.key = Some(key.clone());
    let bytes = read_body(headers, body, app.config.max_body_bytes).await?;
    let req = parse_object(&bytes)?;
    let model = match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(GatewayError::bad_request("you must provide a model parameter", Some("model"))),
    };
    ctx.model = Some(model.clone());
    let stream = validate(ctx.endpoint, &req)?;
    ctx.streamed = stream;
    resolve_model(&app, &key, &model)?;
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
    let forward = forwarded_headers(headers, &plan);
    let req = Arc::new(req);
    let body_for = |d: &Deployment| -> Bytes {
        let mut m = (*req).clone();
        m.insert("model".into(), Value::String(d.upstream_model.clone()));
        if stream {
            // Always ask for usage; stripped again if the client did not.
            let opts = m.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(o) = opts {
                o.insert("include_usage".into(), Value::Bool(true));
            } else {
                *opts = serde_json::json!({"include_usage": true});
            }
        }
        Bytes::from(serde_json::to_vec(&m).unwrap_or_default())
    };
    let timeouts = &app.config.timeouts;
    let deadline = ctx.started + Duration::from_millis(timeouts.total_ms);
    let upstream = proxy::send(
        &plan,
        &proxy::Outbound { path: ctx.endpoint.path(), body: &body_for, forward: &forward },
        Duration::from_millis(timeouts.attempt_ms),
        deadline,
    )
    .await?;
    ctx.deployment = Some(upstream.deployment.name.clone());
    let done = Finish {
        app: app.clone(),
        rid: ctx.rid.clone(),
        key,
        endpoint: ctx.endpoint,
        model,
        deployment: upstream.deployment.clone(),
        retries: upstream.retries,
        started: ctx.started,
        traceparent: ctx.traceparent.clone(),
        request: req,
        admission,
    };
    if stream && upstream.response.status().is_success() {
        Ok(stream_response(done, upstream.response, client_wants_usage, limit_headers))
    } else {
        plain_response(done, upstream.response, limit_headers).await
    }
}

/// Client headers that some deployment of the plan passes through.
fn forwarded_headers(headers: &HeaderMap, plan: &[Arc<Deployment>]) -> Vec<(String, String)> {
    if plan.iter().all(|d| d.forward_headers.is_empty()) {
        return Vec::new();
    }
    headers
        .iter()
        .filter(|(k, _)| plan.iter().any(|d| d.forwards(k.as_str())))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// Everything needed to record a request's usage once it is known.
struct Finish {
    app: App,
    rid: RequestId,
    key: Arc<KeyRecord>,
    endpoint: Endpoint,
    model: String,
    deployment: Arc<Deployment>,
    retries: u32,
    started: Instant,
    traceparent: String,
    request: Arc<Map<String, Value>>,
    admission: Admission,
}

impl Finish {
    /// Prices `tokens`, publishes the usage event, returns the cost.
    fn record(&self, tokens: TokenCounts, estimated: bool, status: u16, streamed: bool, served: Option<String>, ttft: Option<Duration>) -> rust_decimal::Decimal {
        let book = self.app.price_book();
        let cost = book.cost(&self.model, &tokens);
        self.admission.settle(tokens.input_tokens + tokens.output_tokens + tokens.cache_read_tokens + tokens.cache_write_tokens);
        let event = Event::Usage(UsageEvent {
            meta: EventMeta::new(self.key.tenant_id.clone(), self.key.key_id.clone(), self.rid.0.as_ref()),
            api: self.endpoint.api(),
            requested_model: self.model.clone(),
            model: served.unwrap_or_else(|| self.deployment.upstream_model.clone()),
            provider: self.deployment.provider.as_str().into(),
            deployment: self.deployment.name.clone(),
            tokens,
            estimated,
            status,
            streamed,
            latency_ms: self.started.elapsed().as_millis() as u64,
            ttft_ms: ttft.map(|d| d.as_millis() as u64),
            retries: self.retries,
            price_version: book.version,
            cost,
        });
        events::emit(&self.app, &event, &self.traceparent);
        metrics::counter!("tollgate_gateway_tokens_total", "model" => self.model.clone(), "kind" => "input").increment(tokens.input_tokens);
        metrics::counter!("tollgate_gateway_tokens_total", "model" => self.model.clone(), "kind" => "output").increment(tokens.output_tokens);
        cost
    }

    /// The tokenizer's estimate when the upstream reported nothing.
    fn estimate(&self, output_text: &str) -> TokenCounts {
        TokenCounts {
            input_tokens: tokens::estimate_request_input(&self.request),
            output_tokens: tokens::count(output_text),
            ..TokenCounts::default()
        }
    }

    fn common_headers(&self, h: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(&self.deployment.name) {
            h.insert("x-tollgate-deployment", v);
        }
        h.insert("x-tollgate-retries", HeaderValue::from(self.retries));
    }
}

#[derive(Deserialize)]
struct PlainBody {
    #[serde(default)]
    usage: Option<OpenAiUsage>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Value>,
}

async fn plain_response(done: Finish, resp: reqwest::Response, limit_headers: HeaderMap) -> Result<Response, GatewayError> {
    let status = resp.status();
    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let bytes = resp.bytes().await.map_err(|e| GatewayError::Upstream {
        status: if e.is_timeout() { StatusCode::GATEWAY_TIMEOUT } else { StatusCode::BAD_GATEWAY },
        message: "the upstream response was cut off".into(),
    })?;
    let (tokens, estimated, served) = if status.is_success() {
        match serde_json::from_slice::<PlainBody>(&bytes) {
            Ok(PlainBody { usage: Some(u), model, .. }) => (u.tokens(), false, model),
            Ok(PlainBody { usage: None, model, choices }) => {
                let text: String = choices.iter().map(choice_text).collect();
                (done.estimate(&text), true, model)
            }
            Err(_) => (done.estimate(""), true, None),
        }
    } else {
        (TokenCounts::default(), false, None)
    };
    let cost = done.record(tokens, estimated, status.as_u16(), false, served, None);
    let mut out = Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
        h.extend(limit_headers);
        if let Some(ct) = content_type {
            h.insert(header::CONTENT_TYPE, ct);
        }
        done.common_headers(h);
        if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
            h.insert("x-tollgate-cost", v);
        }
    }
    out.body(Body::from(bytes)).map_err(|e| GatewayError::Internal(e.to_string()))
}

fn choice_text(c: &Value) -> String {
    let msg = c.get("message").and_then(|m| m.get("content")).and_then(Value::as_str);
    let text = c.get("text").and_then(Value::as_str);
    msg.or(text).unwrap_or_default().to_owned()
}

fn stream_response(done: Finish, resp: reqwest::Response, client_wants_usage: bool, limit_headers: HeaderMap) -> Response {
    let mut headers = limit_headers;
    done.common_headers(&mut headers);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let relay = StreamRelay {
        upstream: Box::pin(resp.bytes_stream()),
        framer: SseFramer::default(),
        relay: OpenAiRelay::new(client_wants_usage),
        events: Vec::new(),
        first_token: None,
        finish: Some(done),
        ended: false,
    };
    (StatusCode::OK, headers, Body::from_stream(relay)).into_response()
}

/// Relays an upstream SSE stream event by event. Whatever ends it (the
/// upstream finishing, the upstream cutting off, or the client going away,
/// which drops this value) records the usage exactly once: the upstream's
/// figures if it sent them, else the tokenizer's estimate, marked estimated.
struct StreamRelay {
    upstream: BoxStream<'static, reqwest::Result<Bytes>>,
    framer: SseFramer,
    relay: OpenAiRelay,
    events: Vec<SseEvent>,
    first_token: Option<Duration>,
    finish: Option<Finish>,
    ended: bool,
}

impl StreamRelay {
    fn finish(&mut self) {
        let Some(done) = self.finish.take() else { return };
        let (tokens, estimated) = match self.relay.usage {
            Some(u) => (u.tokens(), false),
            None => (done.estimate(&self.relay.text), true),
        };
        if estimated {
            metrics::counter!("tollgate_gateway_estimated_usage_total", "route" => done.endpoint.route()).increment(1);
        }
        done.record(tokens, estimated, 200, true, self.relay.model.clone(), self.first_token);
    }
}

impl Stream for StreamRelay {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    this.framer.push(&chunk, &mut this.events);
                    let mut out = BytesMut::new();
                    for ev in this.events.drain(..) {
                        this.relay.on_event(&ev, &mut out);
                    }
                    if this.first_token.is_none() && this.relay.saw_content {
                        this.first_token = this.finish.as_ref().map(|f| f.started.elapsed());
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out.freeze())));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream cut off");
                    this.ended = true;
                    this.finish();
                    return Poll::Ready(None);
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    this.finish();
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for StreamRelay {
    fn drop(&mut self) {
        // The client went away mid-stream: its usage still counts.
        self.finish();
    }
}

fn model_object(id: &str) -> Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"})
}

fn may_use(key: &KeyRecord, model: &str) -> bool {
    key.models.as_ref().is_none_or(|m| m.iter().any(|x| x == model))
}

pub async fn list_models(State(app): State<App>, headers: HeaderMap) -> Response {
    match authenticate(&app, &headers).await {
        Ok(key) => {
            let data: Vec<Value> = app.router.names.iter().filter(|m| may_use(&key, m)).map(|m| model_object(m)).collect();
            axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => e.into_response_for(ApiStyle::OpenAi),
    }
}

pub async fn get_model(State(app): State<App>, headers: HeaderMap, Path(model): Path<String>) -> Response {
    let result = async {
        let key = authenticate(&app, &headers).await?;
        resolve_model(&app, &key, &model)?;
        Ok::<_, GatewayError>(axum::Json(model_object(&model)).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.into_response_for(ApiStyle::OpenAi))
}
