//! Finishing a request: pricing its usage with the book in force, the local
//! debit, the usage event, and the spans' and counters' figures.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tollgate_schemas::events::{Event, EventMeta, TokenCounts, UsageEvent};
use tollgate_schemas::records::KeyRecord;
use tracing::Span;

use super::admission::Admission;
use super::surface::Surface;
use crate::config::ProviderKind;
use crate::routing::Deployment;
use crate::state::{App, RequestId};
use crate::{events, tokens};

/// Everything needed to record a request's usage once it is known.
pub(super) struct Finish {
    pub(super) app: App,
    pub(super) rid: RequestId,
    pub(super) key: Arc<KeyRecord>,
    pub(super) surface: Surface,
    pub(super) model: String,
    pub(super) deployment: Arc<Deployment>,
    pub(super) retries: u32,
    pub(super) started: Instant,
    pub(super) traceparent: String,
    pub(super) request: Arc<Map<String, Value>>,
    pub(super) admission: Admission,
    /// The server span, and the client span of the attempt that answered:
    /// both live until the response (or stream) ends, and get the usage.
    pub(super) span: Span,
    pub(super) upstream_span: Span,
    /// Time spent waiting on upstreams for the response headers (all attempts).
    pub(super) upstream_wait: Duration,
}

impl Finish {
    /// Prices `tokens`, debits the cost locally (before the response
    /// completes: see [`crate::quota`]), publishes the usage event, returns
    /// the cost.
    pub(super) fn record(
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
    pub(super) fn record_overhead(&self, also_upstream: Duration) {
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
    pub(super) fn estimate(&self, output_text: &str) -> TokenCounts {
        TokenCounts {
            input_tokens: tokens::estimate_request_input(&self.request),
            output_tokens: tokens::count(output_text),
            ..TokenCounts::default()
        }
    }

    pub(super) fn common_headers(&self, h: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_str(&self.deployment.name) {
            h.insert("x-tollgate-deployment", v);
        }
        h.insert("x-tollgate-retries", HeaderValue::from(self.retries));
    }

    pub(super) fn translated(&self) -> bool {
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
