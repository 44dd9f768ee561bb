//! Prometheus metrics and the small HTTP server for `/metrics` and `/healthz`.
//!
//! Names follow Prometheus conventions (`*_total` counters, base units in
//! the name); every label has a small fixed set of values (`kind`: the three
//! event kinds; `table`: the three storage tables; `reason`: the four poison
//! reasons). Events per second is `rate(tollgate_meter_events_total[1m])`.
//!
//! The recorder is process-global (the `metrics` facade has one), installed
//! once; several meters in one process (tests) share it.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Events stored, by `kind` (counted per batch handed to ClickHouse).
pub const EVENTS_TOTAL: &str = "tollgate_meter_events_total";
/// Poison messages, by `reason`.
pub const DEAD_LETTERS_TOTAL: &str = "tollgate_meter_dead_letters_total";
/// Poison messages that could not be parked (they are redelivered).
pub const DEAD_LETTER_FAILURES_TOTAL: &str = "tollgate_meter_dead_letter_failures_total";
/// Messages per batch.
pub const BATCH_SIZE: &str = "tollgate_meter_batch_size_messages";
/// Duration of one successful INSERT, by `table`.
pub const INSERT_SECONDS: &str = "tollgate_meter_insert_duration_seconds";
/// Failed INSERT attempts (each is retried), by `table`.
pub const INSERT_FAILURES_TOTAL: &str = "tollgate_meter_insert_failures_total";
/// Messages in the stream not yet delivered to the consumer.
pub const CONSUMER_LAG: &str = "tollgate_meter_consumer_lag_messages";
pub const REDELIVERIES_TOTAL: &str = "tollgate_meter_redeliveries_total";
pub const FETCH_ERRORS_TOTAL: &str = "tollgate_meter_fetch_errors_total";
pub const COMMIT_FAILURES_TOTAL: &str = "tollgate_meter_commit_failures_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder once; `None` if another recorder was already
/// installed in this process (then `/metrics` answers 503).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(BATCH_SIZE.into()),
                    &[
                        1.0, 10.0, 100.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 25_000.0,
                        50_000.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(INSERT_SECONDS.into()),
                        &[
                            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                        ],
                    )
                });
            let builder = match builder {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "metric buckets rejected; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder is already installed; /metrics will be unavailable"
                );
                return None;
            }
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(EVENTS_TOTAL, "Events stored in ClickHouse, by kind");
    metrics::describe_counter!(
        DEAD_LETTERS_TOTAL,
        "Poison messages sent to the dead-letter subject, by reason"
    );
    metrics::describe_counter!(
        DEAD_LETTER_FAILURES_TOTAL,
        "Poison messages that could not be dead-lettered"
    );
    metrics::describe_histogram!(BATCH_SIZE, "Messages per batch");
    metrics::describe_histogram!(
        INSERT_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one ClickHouse INSERT"
    );
    metrics::describe_counter!(
        INSERT_FAILURES_TOTAL,
        "Failed ClickHouse INSERT attempts (retried)"
    );
    metrics::describe_gauge!(
        CONSUMER_LAG,
        "Messages in the stream not yet delivered to this consumer"
    );
    metrics::describe_counter!(REDELIVERIES_TOTAL, "Messages delivered more than once");
    metrics::describe_counter!(FETCH_ERRORS_TOTAL, "Failed fetches from the event bus");
    metrics::describe_counter!(
        COMMIT_FAILURES_TOTAL,
        "Failed commits (their messages are redelivered)"
    );
}

/// Serves `/metrics` and `/healthz` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    handle: Option<PrometheusHandle>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let render = handle.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    match render {
                        Some(h) => (StatusCode::OK, h.render()),
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "metrics recorder unavailable\n".to_owned(),
                        ),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let upkeep = async {
        // Histograms' summaries and idle handling need a periodic upkeep.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            if let Some(h) = &handle {
                h.run_upkeep();
            }
        }
    };
    tokio::select! {
        r = axum::serve(listener, app).with_graceful_shutdown(cancel.clone().cancelled_owned()) => r,
        () = upkeep => Ok(()),
    }
}
