//! Logs, OTLP traces and W3C trace context for Tollgate's services.
//!
//! [`init`] installs one `tracing` subscriber per process:
//!
//! - **Logs**: JSON lines on stderr (human-readable on a terminal), level from
//!   `RUST_LOG` (default `info`). Each service records the trace id as a
//!   `trace_id` field on its root spans (a request, an event, a batch), so
//!   every line logged inside one carries it, exporter or not.
//! - **Traces**: an OpenTelemetry layer exporting over OTLP, only when an
//!   endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` /
//!   `OTEL_TRACES_EXPORTER=none` do not turn it off. The standard variables
//!   are read by the SDK: `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or
//!   `http/protobuf`, the default), `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, headers,
//!   timeout and compression (none unless configured). Which spans go out:
//!   `TOLLGATE_OTEL_FILTER` (an `EnvFilter` directive), by default the
//!   `RUST_LOG` level without the ClickHouse client's per-query spans. With no endpoint no
//!   exporter runs, no OpenTelemetry layer is installed, and [`enabled`] is
//!   false, which the services use to skip the per-event spans entirely.
//!
//! Trace context crosses process boundaries as a W3C `traceparent` string:
//! the gateway reads it from the client, writes it into every event's
//! headers, and the meter and billing continue (or link to) it. The helpers
//! here ([`continue_trace`], [`set_parent`], [`add_link`]) work on plain
//! strings so nothing above them needs OpenTelemetry types.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rand::Rng;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are being exported. Per-event spans (meter, billing) are
/// only created when this is true: without an exporter they would cost
/// without anyone reading them.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; flushes buffered spans when shut down or dropped.
#[must_use = "dropping the guard shuts the exporter down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter.
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.force_flush() {
                tracing::warn!(error = %e, "flushing spans failed");
            }
            if let Err(e) = p.shutdown() {
                tracing::warn!(error = %e, "stopping the span exporter failed");
            }
            ENABLED.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether the environment asks for an exporter (an error names a setting
/// this build cannot honour).
fn exporter_wanted() -> Result<bool, String> {
    let set = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    if let Some(e) = set("OTEL_TRACES_EXPORTER") {
        match e.as_str() {
            "otlp" => {}
            "none" => return Ok(false),
            other => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER={other} is not supported (otlp or none)"
                ));
            }
        }
    }
    for k in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = set(k)
            && p != "grpc"
            && p != "http/protobuf"
        {
            return Err(format!("{k}={p} is not supported (grpc or http/protobuf)"));
        }
    }
    Ok(set("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some())
}

fn build_provider(default_service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .build()
        .map_err(|e| e.to_string())?;
    let has_name = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim_start().starts_with("service.name="))
        });
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !has_name {
        resource = resource.with_service_name(default_service.to_owned());
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    Auto,
    Json,
    Text,
}

/// [`init_with`] with [`LogFormat::Auto`].
pub fn init(default_service: &str) -> Telemetry {
    init_with(default_service, LogFormat::Auto)
}

/// Installs logging and, when configured, the OTLP exporter. Call once per
/// process, inside the Tokio runtime (the gRPC exporter needs one).
/// `default_service` names the service when `OTEL_SERVICE_NAME` does not.
pub fn init_with(default_service: &str, format: LogFormat) -> Telemetry {
    use std::io::IsTerminal;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let text = match format {
        LogFormat::Auto => std::io::stderr().is_terminal(),
        LogFormat::Json => false,
        LogFormat::Text => true,
    };
    let fmt = if text {
        fmt.boxed()
    } else {
        fmt.json().boxed()
    };
    let (provider, problem) = match exporter_wanted() {
        Ok(false) => (None, None),
        Ok(true) => match build_provider(default_service) {
            Ok(p) => (Some(p), None),
            Err(e) => (None, Some(e)),
        },
        Err(e) => (None, Some(e)),
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("tollgate"))
            .with_filter(otel_filter())
    });
    // `try_init`: a test process may have installed a subscriber already.
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init();
    if let Some(e) = problem {
        tracing::error!(error = %e, "OTLP trace export is misconfigured; not exporting");
    }
    if provider.is_some() {
        ENABLED.store(true, Ordering::Relaxed);
        tracing::info!(service = default_service, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// Which spans are exported: `TOLLGATE_OTEL_FILTER` (an `EnvFilter`
/// directive), else `RUST_LOG` with the `clickhouse` client's own spans
/// left out: it opens a span per query, and the meter's and billing's
/// periodic queries would each make a one-span trace. Tollgate's own
/// `meter.insert` and billing spans cover the inserts that matter.
fn otel_filter() -> tracing_subscriber::EnvFilter {
    if let Ok(f) = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_OTEL_FILTER") {
        return f;
    }
    let base = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    tracing_subscriber::EnvFilter::try_new(format!("{base},clickhouse=off"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,clickhouse=off"))
}

fn remote_context(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// The span context a `traceparent` names, if it is valid W3C.
pub fn span_context(traceparent: &str) -> Option<SpanContext> {
    remote_context(traceparent).map(|cx| cx.span().span_context().clone())
}

/// Whether `traceparent` is a valid W3C header value (version 00 layout,
/// lower-case hex, non-zero ids; a later version may append fields).
pub fn is_valid(traceparent: &str) -> bool {
    let b = traceparent.as_bytes();
    let hex = |r: std::ops::Range<usize>| {
        b.get(r)
            .is_some_and(|s| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')))
    };
    let zero = |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(|&c| c == b'0'));
    let version_ok = match b.get(0..2) {
        Some(b"00") => b.len() == 55,
        Some(b"ff") => false,
        _ => b.len() >= 55 && b.get(55).is_none_or(|&c| c == b'-'),
    };
    version_ok
        && hex(0..2)
        && b.get(2) == Some(&b'-')
        && hex(3..35)
        && !zero(3..35)
        && b.get(35) == Some(&b'-')
        && hex(36..52)
        && !zero(36..52)
        && b.get(52) == Some(&b'-')
        && hex(53..55)
}

/// The `traceparent` to hand on when not exporting: the caller's (lower
/// case) if valid, else a fresh trace. Cheap: no OpenTelemetry types.
pub fn handoff(incoming: Option<&str>) -> String {
    match incoming.map(str::to_ascii_lowercase) {
        Some(tp) if is_valid(&tp) => tp,
        _ => new_traceparent(),
    }
}

/// Makes `span` a child of the remote span `traceparent` names (no-op when
/// not exporting or invalid).
pub fn set_parent(span: &Span, traceparent: &str) {
    if enabled()
        && let Some(cx) = remote_context(traceparent)
    {
        let _ = span.set_parent(cx);
    }
}

/// Links `span` to the remote span `traceparent` names (no-op when not
/// exporting or invalid).
pub fn add_link(span: &Span, traceparent: &str) {
    if enabled()
        && let Some(sc) = span_context(traceparent)
    {
        span.add_link(sc);
    }
}

/// Links `span` to another local span (no-op when not exporting).
pub fn link_span(span: &Span, to: &Span) {
    if enabled() {
        let cx = to.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.add_link(sc);
        }
    }
}

/// The `traceparent` naming `span` itself, for the next hop.
pub fn traceparent_of(span: &Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Continues the caller's trace in `span` (a service's root span) and
/// returns the `traceparent` to hand on: `span` as the parent when
/// exporting, else the caller's own header, else a fresh trace. Records
/// the trace id in the span's `trace_id` field, if it has one, for logs.
pub fn continue_trace(span: &Span, incoming: Option<&str>) -> String {
    // Lenient about case (some clients send upper-case hex), strict otherwise.
    let incoming = incoming
        .map(str::to_ascii_lowercase)
        .filter(|tp| is_valid(tp));
    if let Some(tp) = &incoming {
        set_parent(span, tp);
    }
    let tp = traceparent_of(span)
        .or(incoming)
        .unwrap_or_else(new_traceparent);
    if let Some(id) = trace_id(&tp) {
        span.record("trace_id", id);
    }
    tp
}

/// A new sampled trace with a random root.
pub fn new_traceparent() -> String {
    let mut rng = rand::rng();
    format!(
        "00-{:032x}-{:016x}-01",
        rng.random::<u128>() | 1,
        rng.random::<u64>() | 1
    )
}

/// The trace id part of a `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.get(3..35)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_rejects_traceparents() {
        assert!(is_valid(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid("garbage"));
        assert!(!is_valid(""));
        assert!(!is_valid(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"
        ));
        assert!(!is_valid(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
        assert!(is_valid(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
        ));
        // Agrees with OpenTelemetry's own parser on what both accept.
        for tp in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            &new_traceparent(),
        ] {
            assert_eq!(is_valid(tp), remote_context(tp).is_some(), "{tp}");
        }
        let tp = new_traceparent();
        assert!(is_valid(&tp), "{tp}");
        assert_eq!(trace_id(&tp).unwrap().len(), 32);
    }

    #[test]
    fn without_an_exporter_the_callers_trace_is_handed_on() {
        let span = tracing::info_span!("t", trace_id = tracing::field::Empty);
        let tp = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        assert_eq!(continue_trace(&span, Some(tp)), tp.to_ascii_lowercase());
        let fresh = continue_trace(&span, Some("nonsense"));
        assert!(is_valid(&fresh));
        assert_ne!(trace_id(&fresh), trace_id(tp));
    }
}
