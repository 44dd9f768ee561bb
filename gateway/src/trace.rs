//! The gateway's spans: one server span per request and one client span per
//! upstream attempt, with the OpenTelemetry GenAI semantic-convention
//! attributes (`gen_ai.*`) plus tenant, key id and request id. Never the
//! key's secret: only ids are recorded.
//!
//! Without an exporter ([`tollgate_telemetry::enabled`] false) the server
//! span carries only the request id and trace id, for the logs, and no
//! attribute is recorded later: the JSON log layer reformats a span's fields
//! on every record, which would cost microseconds per request for nothing.

use axum::http::HeaderMap;
use tracing::Span;
use tracing::field::Empty;

use crate::state::RequestId;

/// The caller's `traceparent` header, if any (validated by the caller).
pub fn incoming(headers: &HeaderMap) -> Option<&str> {
    headers.get("traceparent").and_then(|v| v.to_str().ok())
}

/// Starts the server span of a request on `route` and continues the
/// caller's trace. Returns the span and the `traceparent` that events and
/// upstream calls carry.
pub fn server_span(
    headers: &HeaderMap,
    method: &'static str,
    route: &'static str,
    operation: &'static str,
    rid: &RequestId,
) -> (Span, String) {
    let span = if tollgate_telemetry::enabled() {
        tracing::info_span!(
            "gateway.request",
            otel.name = format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = method,
            http.route = route,
            http.response.status_code = Empty,
            gen_ai.operation.name = operation,
            gen_ai.system = Empty,
            gen_ai.request.model = Empty,
            gen_ai.response.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            tollgate.tenant_id = Empty,
            tollgate.key_id = Empty,
            tollgate.request_id = &*rid.0,
            tollgate.deployment = Empty,
            tollgate.cost_usd = Empty,
            error.type = Empty,
            trace_id = Empty,
        )
    } else {
        // No exporter: the caller's trace (or a new one) goes on in the
        // events, and the span only labels this request's log lines.
        let tp = tollgate_telemetry::handoff(incoming(headers));
        let span = tracing::info_span!(
            "request",
            request_id = &*rid.0,
            trace_id = tollgate_telemetry::trace_id(&tp).unwrap_or_default()
        );
        return (span, tp);
    };
    let tp = tollgate_telemetry::continue_trace(&span, incoming(headers));
    (span, tp)
}

/// Records `value` under `field` when spans are exported.
pub fn record(span: &Span, field: &'static str, value: impl tracing::Value) {
    if tollgate_telemetry::enabled() {
        span.record(field, value);
    }
}

/// Marks the span failed (5xx and transport errors, per the HTTP
/// semantic conventions for servers) and records the status.
pub fn record_status(span: &Span, status: u16, error_type: Option<&str>) {
    if !tollgate_telemetry::enabled() {
        return;
    }
    span.record("http.response.status_code", status);
    if let Some(t) = error_type {
        span.record("error.type", t);
    }
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The client span of one upstream attempt (a disabled span when not
/// exporting).
pub struct UpstreamSpan<'a> {
    pub operation: &'static str,
    pub system: &'static str,
    pub model: &'a str,
    pub deployment: &'a str,
    pub address: &'a str,
    pub tenant_id: &'a str,
    pub key_id: &'a str,
    pub request_id: &'a str,
}

impl UpstreamSpan<'_> {
    pub fn start(&self) -> Span {
        if !tollgate_telemetry::enabled() {
            return Span::none();
        }
        tracing::info_span!(
            "gen_ai.client",
            otel.name = format!("{} {}", self.operation, self.model),
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = self.operation,
            gen_ai.system = self.system,
            gen_ai.request.model = self.model,
            gen_ai.response.model = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            server.address = self.address,
            http.response.status_code = Empty,
            error.type = Empty,
            tollgate.deployment = self.deployment,
            tollgate.tenant_id = self.tenant_id,
            tollgate.key_id = self.key_id,
            tollgate.request_id = self.request_id,
        )
    }
}
