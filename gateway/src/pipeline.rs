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

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use futures::stream::BoxStream;
use serde_json::{Map, Value};
use tokio::time::Instant;
use tollgate_schemas::events::{
    ApiFormat, Event, EventMeta, RequestEvent, TokenCounts, UsageEvent,
};
use tollgate_schemas::records::KeyRecord;
use tracing::{Instrument, Span};

use crate::auth::presented_secret;
use crate::config::ProviderKind;
use crate::error::{ApiStyle, GatewayError};
use crate::limits::{Limiter, Permit};
use crate::routing::Deployment;
use crate::sse::{OpenAiRelay, OpenAiUsage, SseEvent, SseFramer};
use crate::state::{App, RequestId};
use crate::translate::{self, StreamTranslator};
use crate::{events, proxy, tokens, trace, validate};

/// The API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    Chat,
    Completions,
    Embeddings,
    Messages,
    Responses,
}

impl Surface {
    pub fn style(self) -> ApiStyle {
        match self {
            Surface::Messages => ApiStyle::Anthropic,
            _ => ApiStyle::OpenAi,
        }
    }

    pub fn api(self) -> ApiFormat {
        match self {
            Surface::Chat => ApiFormat::OpenaiChat,
            Surface::Completions => ApiFormat::OpenaiCompletions,
            Surface::Embeddings => ApiFormat::OpenaiEmbeddings,
            Surface::Messages => ApiFormat::AnthropicMessages,
            Surface::Responses => ApiFormat::OpenaiResponses,
        }
    }

    /// The GenAI semantic conventions' `gen_ai.operation.name`.
    pub fn operation(self) -> &'static str {
        match self {
            Surface::Chat | Surface::Messages | Surface::Responses => "chat",
            Surface::Completions => "text_completion",
            Surface::Embeddings => "embeddings",
        }
    }

    pub fn route(self) -> &'static str {
        match self {
            Surface::Chat => "/v1/chat/completions",
            Surface::Completions => "/v1/completions",
            Surface::Embeddings => "/v1/embeddings",
            Surface::Messages => "/v1/messages",
            Surface::Responses => "/v1/responses",
        }
    }

    /// The table its body is checked against ([`crate::validate`]).
    pub fn validated_as(self) -> validate::Api {
        match self {
            Surface::Chat => validate::Api::Chat,
            Surface::Completions => validate::Api::Completions,
            Surface::Embeddings => validate::Api::Embeddings,
            Surface::Messages => validate::Api::Messages,
            Surface::Responses => validate::Api::Responses,
        }
    }

    /// The client's format, as the provider kind that speaks it natively.
    fn native(self) -> ProviderKind {
        match self {
            Surface::Messages => ProviderKind::Anthropic,
            _ => ProviderKind::Openai,
        }
    }

    /// The upstream path on deployment `d`.
    fn upstream_path(self, d: &Deployment) -> &'static str {
        match (d.provider, self) {
            (ProviderKind::Openai, Surface::Responses) if d.responses_api => "/responses",
            (ProviderKind::Openai, Surface::Responses) => "/chat/completions",
            (ProviderKind::Anthropic, _) => "/v1/messages",
            (ProviderKind::Openai, Surface::Chat | Surface::Messages) => "/chat/completions",
            (ProviderKind::Openai, Surface::Completions) => "/completions",
            (ProviderKind::Openai, Surface::Embeddings) => "/embeddings",
        }
    }
}

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

/// Reads the body within the size limit (413) and the body read timeout
/// (408): a body that trickles in must not hold a connection for ever.
pub async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, GatewayError> {
    let max = app.config.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(GatewayError::PayloadTooLarge(max));
    }
    let limit_ms = app.config.server.body_read_timeout_ms;
    let read = tokio::time::timeout(
        Duration::from_millis(limit_ms),
        axum::body::to_bytes(body, max),
    )
    .await
    .map_err(|_| GatewayError::BodyTimeout(limit_ms))?;
    read.map_err(|e| {
        let e = e.into_inner();
        if e.is::<http_body_util::LengthLimitError>() {
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
        Ok(_) => Err(GatewayError::bad_request(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(GatewayError::bad_request(
            format!("We could not parse the JSON body of your request. ({e})"),
            None,
        )),
    }
}

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

/// The model name of a request body (400 when missing).
pub fn model_of(req: &Map<String, Value>) -> Result<String, GatewayError> {
    match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        _ => Err(GatewayError::bad_request(
            "you must provide a model parameter",
            Some("model"),
        )),
    }
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

fn admit(
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

/// The request in each wire format a deployment of the plan needs. A format
/// the client already speaks borrows the parsed request rather than copying
/// it (a copy costs as much as the prompt is long).
struct Bodies<'a> {
    /// Chat (or completions, embeddings) for OpenAI-format deployments.
    openai: Option<Cow<'a, Map<String, Value>>>,
    /// The Responses request itself, for deployments that serve `/responses`.
    openai_responses: Option<Cow<'a, Map<String, Value>>>,
    anthropic: Option<Cow<'a, Map<String, Value>>>,
}

/// `m` serialised with `model` as its `model` member, without copying `m`
/// (the output is the same as inserting it into a copy: keys stay sorted).
/// This is the upstream request body, once per attempt.
pub fn body_with_model(m: &Map<String, Value>, model: &str) -> Bytes {
    struct WithModel<'a>(&'a Map<String, Value>, &'a str);
    impl serde::Serialize for WithModel<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let (m, model) = (self.0, self.1);
            let missing = !m.contains_key("model");
            let mut out = s.serialize_map(Some(m.len() + usize::from(missing)))?;
            let mut pending = missing;
            for (k, v) in m {
                if pending && k.as_str() > "model" {
                    out.serialize_entry("model", model)?;
                    pending = false;
                }
                if k == "model" {
                    out.serialize_entry(k, model)?;
                } else {
                    out.serialize_entry(k, v)?;
                }
            }
            if pending {
                out.serialize_entry("model", model)?;
            }
            out.end()
        }
    }
    Bytes::from(serde_json::to_vec(&WithModel(m, model)).unwrap_or_default())
}

/// The client's own request for an OpenAI upstream: borrowed unless it
/// streams without `stream_options.include_usage: true`, which the gateway
/// always asks for.
fn native_openai(req: &Map<String, Value>, stream: bool) -> Cow<'_, Map<String, Value>> {
    let asks_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    if !stream || asks_usage {
        Cow::Borrowed(req)
    } else {
        Cow::Owned(with_stream_usage(req.clone(), stream))
    }
}

/// Always ask an OpenAI upstream for stream usage; stripped again if the
/// client did not ask for it.
fn with_stream_usage(mut m: Map<String, Value>, stream: bool) -> Map<String, Value> {
    if stream {
        let opts = m
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        match opts {
            Value::Object(o) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            other => *other = serde_json::json!({"include_usage": true}),
        }
    }
    m
}

fn bodies<'a>(
    surface: Surface,
    req: &'a Map<String, Value>,
    plan: &[Arc<Deployment>],
    stream: bool,
) -> Result<Bodies<'a>, GatewayError> {
    let needs = |p: ProviderKind| plan.iter().any(|d| d.provider == p);
    let invalid = |e: translate::TranslateError| match e {
        translate::TranslateError::Invalid { message, param } => {
            GatewayError::BadRequest { message, param }
        }
    };
    let native_responses =
        |d: &Arc<Deployment>| d.provider == ProviderKind::Openai && d.responses_api;
    let openai = if !needs(ProviderKind::Openai) {
        None
    } else if surface == Surface::Responses {
        if plan
            .iter()
            .any(|d| d.provider == ProviderKind::Openai && !d.responses_api)
        {
            let chat = translate::responses_request_to_chat(req).map_err(invalid)?;
            Some(Cow::Owned(with_stream_usage(chat, stream)))
        } else {
            None
        }
    } else if surface.native() == ProviderKind::Openai {
        Some(native_openai(req, stream))
    } else {
        Some(Cow::Owned(
            translate::anthropic_request_to_openai_chat(req, "").map_err(invalid)?,
        ))
    };
    let openai_responses = (surface == Surface::Responses && plan.iter().any(native_responses))
        .then_some(Cow::Borrowed(req));
    let anthropic = if !needs(ProviderKind::Anthropic) {
        None
    } else if surface.native() == ProviderKind::Anthropic {
        Some(Cow::Borrowed(req))
    } else if surface == Surface::Chat {
        Some(Cow::Owned(
            translate::openai_chat_request_to_anthropic(req, "").map_err(invalid)?,
        ))
    } else if surface == Surface::Responses {
        let chat = translate::responses_request_to_chat(req).map_err(invalid)?;
        Some(Cow::Owned(
            translate::openai_chat_request_to_anthropic(&chat, "").map_err(invalid)?,
        ))
    } else {
        return Err(GatewayError::bad_request(
            format!(
                "{} is not available for this model: it is served by an Anthropic deployment",
                surface.route()
            ),
            None,
        ));
    };
    Ok(Bodies {
        openai,
        openai_responses,
        anthropic,
    })
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
    surface: Surface,
    model: String,
    deployment: Arc<Deployment>,
    retries: u32,
    started: Instant,
    traceparent: String,
    request: Arc<Map<String, Value>>,
    admission: Admission,
    /// The server span, and the client span of the attempt that answered:
    /// both live until the response (or stream) ends, and get the usage.
    span: Span,
    upstream_span: Span,
    /// Time spent waiting on upstreams for the response headers (all attempts).
    upstream_wait: Duration,
}

impl Finish {
    /// Prices `tokens`, debits the cost locally (before the response
    /// completes: see [`crate::quota`]), publishes the usage event, returns
    /// the cost.
    fn record(
        &self,
        tokens: TokenCounts,
        estimated: bool,
        status: u16,
        streamed: bool,
        served: Option<String>,
        ttft: Option<Duration>,
    ) -> rust_decimal::Decimal {
        let book = self.app.price_book();
        let cost = book.cost(&self.model, &tokens);
        self.admission.settle(tokens.total());
        let event = Event::Usage(UsageEvent {
            meta: EventMeta::new(
                self.key.tenant_id.clone(),
                self.key.key_id.clone(),
                self.rid.0.as_ref(),
            ),
            api: self.surface.api(),
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
        // Debit before emitting, so the bus's acknowledgement always finds it.
        self.app
            .quotas
            .debit(&self.key, &event.meta().id.to_string(), cost);
        events::emit(
            &self.app.publisher,
            &self.app.names,
            &event,
            &self.traceparent,
        );
        if tollgate_telemetry::enabled() {
            let served = match &event {
                Event::Usage(u) => u.model.as_str(),
                _ => "",
            };
            for span in [&self.span, &self.upstream_span] {
                span.record("gen_ai.response.model", served);
                span.record("gen_ai.usage.input_tokens", tokens.input_tokens);
                span.record("gen_ai.usage.output_tokens", tokens.output_tokens);
            }
            self.span
                .record("tollgate.cost_usd", cost.to_string().as_str());
        }
        metrics::counter!(
            "tollgate_gateway_cost_microdollars_total",
            "model" => self.model.clone()
        )
        .increment(microdollars(cost));
        for (kind, n) in [
            ("input", tokens.input_tokens),
            ("output", tokens.output_tokens),
            ("cache_read", tokens.cache_read_tokens),
            ("cache_write", tokens.cache_write_tokens),
        ] {
            if n > 0 {
                metrics::counter!("tollgate_gateway_tokens_total", "model" => self.model.clone(), "kind" => kind).increment(n);
            }
        }
        cost
    }

    /// The gateway's own time on this request so far: everything but the
    /// wait for upstream response headers and `also_upstream` (a plain
    /// body's download). Streams count up to their response headers.
    fn record_overhead(&self, also_upstream: Duration) {
        let own = self
            .started
            .elapsed()
            .saturating_sub(self.upstream_wait + also_upstream);
        metrics::histogram!(
            "tollgate_gateway_overhead_seconds",
            "route" => self.surface.route()
        )
        .record(own.as_secs_f64());
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

    fn translated(&self) -> bool {
        if self.surface == Surface::Responses {
            return !(self.deployment.provider == ProviderKind::Openai
                && self.deployment.responses_api);
        }
        self.surface.native() != self.deployment.provider
    }
}

/// A cost in millionths of a dollar, for the integer spend counter.
fn microdollars(cost: rust_decimal::Decimal) -> u64 {
    use rust_decimal::prelude::ToPrimitive;
    (cost * rust_decimal::Decimal::from(1_000_000))
        .round()
        .to_u64()
        .unwrap_or(0)
}

/// Usage and served model of a plain upstream body, in the upstream's format.
fn plain_usage(provider: ProviderKind, body: &Value) -> (Option<TokenCounts>, Option<String>) {
    let model = body.get("model").and_then(Value::as_str).map(str::to_owned);
    let usage = match (provider, body.get("usage")) {
        (_, None | Some(Value::Null)) => None,
        (ProviderKind::Openai, Some(u)) => <OpenAiUsage as serde::Deserialize>::deserialize(u)
            .ok()
            .map(|u| u.tokens()),
        (ProviderKind::Anthropic, Some(u)) => Some(translate::anthropic_usage_tokens(u)),
    };
    (usage, model)
}

/// Generated text of a plain body in either format, for estimates.
fn plain_text(body: &Value) -> String {
    let mut out = String::new();
    for c in body
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let msg = c
            .get("message")
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str);
        out.push_str(
            msg.or_else(|| c.get("text").and_then(Value::as_str))
                .unwrap_or_default(),
        );
    }
    for b in body
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default());
    }
    out
}

async fn plain_response(
    done: Finish,
    resp: reqwest::Response,
    limit_headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let status = resp.status();
    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let download = Instant::now();
    let bytes = resp.bytes().await.map_err(|e| GatewayError::Upstream {
        status: if e.is_timeout() {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        },
        message: "the upstream response was cut off".into(),
    })?;
    let download = download.elapsed();
    let provider = done.deployment.provider;
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    let (tokens, estimated, served) = if status.is_success() {
        match &parsed {
            Some(v) if done.surface == Surface::Responses && !done.translated() => {
                let model = v.get("model").and_then(Value::as_str).map(str::to_owned);
                match v.get("usage").filter(|u| !u.is_null()) {
                    Some(u) => (crate::responses_relay::usage_tokens(u), false, model),
                    None => (done.estimate(""), true, model),
                }
            }
            Some(v) => match plain_usage(provider, v) {
                (Some(t), model) => (t, false, model),
                (None, model) => (done.estimate(&plain_text(v)), true, model),
            },
            None => (done.estimate(""), true, None),
        }
    } else {
        (TokenCounts::default(), false, None)
    };
    // What the client gets: the upstream's bytes, or their translation.
    let client_body = if !done.translated() {
        bytes
    } else {
        let translated = match (status.is_success(), provider, &parsed) {
            (true, _, Some(v)) if done.surface == Surface::Responses => {
                let chat = match provider {
                    ProviderKind::Openai => Some(v.clone()),
                    ProviderKind::Anthropic => {
                        translate::anthropic_response_to_openai_chat(v, &done.model).ok()
                    }
                };
                chat.and_then(|c| translate::chat_response_to_responses(&c, &done.model).ok())
                    .map(|mut r| {
                        translate::echo_request_fields(&mut r, &done.request);
                        r
                    })
            }
            // A bridged Responses error is already OpenAI-shaped.
            (false, ProviderKind::Openai, Some(v)) if done.surface == Surface::Responses => {
                Some(v.clone())
            }
            (true, ProviderKind::Openai, Some(v)) => {
                translate::openai_chat_response_to_anthropic(v, &done.model).ok()
            }
            (true, ProviderKind::Anthropic, Some(v)) => {
                translate::anthropic_response_to_openai_chat(v, &done.model).ok()
            }
            (false, ProviderKind::Openai, _) => Some(translate::openai_error_to_anthropic(
                &bytes,
                status.as_u16(),
            )),
            (false, ProviderKind::Anthropic, _) => Some(translate::anthropic_error_to_openai(
                &bytes,
                status.as_u16(),
            )),
            _ => None,
        };
        match translated {
            Some(v) => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
            None => {
                done.record(tokens, estimated, 502, false, served, None);
                return Err(GatewayError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message: "the upstream's response could not be translated".into(),
                });
            }
        }
    };
    let cost = done.record(tokens, estimated, status.as_u16(), false, served, None);
    let mut out = Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
        h.extend(limit_headers);
        match content_type {
            Some(ct) if !done.translated() => {
                h.insert(header::CONTENT_TYPE, ct);
            }
            _ => {
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        done.common_headers(h);
        if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
            h.insert("x-tollgate-cost", v);
        }
    }
    done.record_overhead(download);
    out.body(Body::from(client_body))
        .map_err(|e| GatewayError::Internal(e.to_string()))
}

fn translator(done: &Finish, client_wants_usage: bool) -> Box<dyn StreamTranslator> {
    if done.surface == Surface::Responses {
        let to_responses = || {
            Box::new(translate::ChatToResponsesStream::new(&done.model).with_request(&done.request))
        };
        return match done.deployment.provider {
            ProviderKind::Openai if !done.translated() => {
                Box::new(crate::responses_relay::ResponsesPassthrough::default())
            }
            ProviderKind::Openai => to_responses(),
            ProviderKind::Anthropic => Box::new(crate::responses_relay::Chain::new(
                Box::new(translate::AnthropicToOpenAiStream::new(&done.model, true)),
                to_responses(),
            )),
        };
    }
    match (done.surface.native(), done.deployment.provider) {
        (ProviderKind::Openai, ProviderKind::Openai) => {
            Box::new(OpenAiRelay::new(client_wants_usage))
        }
        (ProviderKind::Anthropic, ProviderKind::Anthropic) => {
            Box::new(translate::AnthropicPassthrough::new())
        }
        (ProviderKind::Anthropic, ProviderKind::Openai) => {
            Box::new(translate::OpenAiToAnthropicStream::new(&done.model))
        }
        (ProviderKind::Openai, ProviderKind::Anthropic) => Box::new(
            translate::AnthropicToOpenAiStream::new(&done.model, client_wants_usage),
        ),
    }
}

fn stream_response(
    done: Finish,
    resp: reqwest::Response,
    client_wants_usage: bool,
    limit_headers: HeaderMap,
) -> Response {
    let mut headers = limit_headers;
    done.common_headers(&mut headers);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    let relay = StreamRelay {
        upstream: Box::pin(resp.bytes_stream()),
        framer: SseFramer::default(),
        translator: translator(&done, client_wants_usage),
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
    translator: Box<dyn StreamTranslator>,
    events: Vec<SseEvent>,
    first_token: Option<Duration>,
    finish: Option<Finish>,
    ended: bool,
}

impl StreamRelay {
    fn finish(&mut self) {
        let Some(done) = self.finish.take() else {
            return;
        };
        let (tokens, estimated) = match self.translator.usage() {
            Some(t) => (t, false),
            None => (done.estimate(self.translator.text()), true),
        };
        if estimated {
            metrics::counter!("tollgate_gateway_estimated_usage_total", "route" => done.surface.route()).increment(1);
        }
        let served = self.translator.served_model().map(str::to_owned);
        done.record(tokens, estimated, 200, true, served, self.first_token);
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
                        this.translator.on_event(&ev, &mut out);
                    }
                    if this.first_token.is_none() && this.translator.saw_content() {
                        this.first_token = this.finish.as_ref().map(|f| f.started.elapsed());
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out.freeze())));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    // Tell the client in its own format, so an SDK raises
                    // instead of taking a truncated answer for a whole one.
                    tracing::warn!(error = %e, "upstream stream cut off");
                    this.ended = true;
                    let style = this.finish.as_ref().map(|f| f.surface.style());
                    this.finish();
                    return Poll::Ready(Some(Ok(stream_error(style))));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    let mut out = BytesMut::new();
                    this.translator.finish(&mut out);
                    this.finish();
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out.freeze())));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

/// The error event a client gets when the upstream cuts a stream off.
fn stream_error(style: Option<ApiStyle>) -> Bytes {
    const MESSAGE: &str =
        "the upstream connection was cut off mid-stream; the response is incomplete";
    match style {
        Some(ApiStyle::Anthropic) => {
            let v = serde_json::json!({"type": "error", "error": {"type": "api_error", "message": MESSAGE}});
            Bytes::from(format!("event: error\ndata: {v}\n\n"))
        }
        _ => {
            let v = serde_json::json!({"error": {"message": MESSAGE, "type": "api_error", "param": null, "code": "upstream_stream_cut"}});
            Bytes::from(format!("data: {v}\n\n"))
        }
    }
}

impl Drop for StreamRelay {
    fn drop(&mut self) {
        // The client went away mid-stream: its usage still counts.
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The old way: copy, insert, serialise.
    fn copied(m: &Map<String, Value>, model: &str) -> Vec<u8> {
        let mut m = m.clone();
        m.insert("model".into(), Value::String(model.into()));
        serde_json::to_vec(&m).unwrap()
    }

    #[test]
    fn body_with_model_equals_a_copy_with_the_model_inserted() {
        for body in [
            serde_json::json!({"model": "public", "messages": [{"role": "user", "content": "hi \"x\""}], "stream": true}),
            serde_json::json!({"messages": [], "zeta": 1}),
            serde_json::json!({"a": 1, "b": {"model": "nested"}}),
            serde_json::json!({"zzz": null}),
            serde_json::json!({}),
        ] {
            let m = body.as_object().unwrap();
            assert_eq!(
                body_with_model(m, "up-1").to_vec(),
                copied(m, "up-1"),
                "{body}"
            );
        }
    }

    #[test]
    fn native_openai_borrows_unless_stream_usage_must_be_added() {
        let plain = serde_json::json!({"model": "m", "messages": []});
        assert!(matches!(
            native_openai(plain.as_object().unwrap(), false),
            Cow::Borrowed(_)
        ));
        let asks = serde_json::json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
        assert!(matches!(
            native_openai(asks.as_object().unwrap(), true),
            Cow::Borrowed(_)
        ));
        let silent = serde_json::json!({"model": "m", "stream": true});
        let got = native_openai(silent.as_object().unwrap(), true);
        assert_eq!(got["stream_options"]["include_usage"], Value::Bool(true));
    }
}
