//! The client-facing HTTP/1.1 server: hyper's connection builder with the
//! limits axum's `serve` does not expose.
//!
//! - **Slow and idle clients.** hyper's header-read timer
//!   (`server.header_read_timeout_ms`) starts whenever a connection begins
//!   waiting for a request head, at accept and after each response, and
//!   closes the connection if the head is not complete in time. So a
//!   slow-loris client, or a keep-alive connection that stays idle, holds a
//!   file descriptor for at most that long. It never runs while a request is
//!   being served, so a long stream is not cut. A body that trickles in is
//!   bounded by `server.body_read_timeout_ms` in the pipeline (408).
//! - **Header limits in the API's own error shape.** hyper answers a head over
//!   its buffer or header-count limit with a bare 431 (no body, no request
//!   id). Its limits are therefore set well above the configured ones
//!   ([`hyper_limits`]), and [`crate::edge`] answers 431 in the OpenAI or
//!   Anthropic shape for anything between the two. Only a head beyond hyper's
//!   own limit (4 × the configured ones, at least 1 MiB) still gets hyper's
//!   bare 431: hyper must stop buffering somewhere.
//! - **Graceful drain.** On shutdown the listener closes, idle connections
//!   close at once, and requests and streams in progress finish (hyper-util's
//!   `GracefulShutdown`), as axum's `serve` did.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::serve::{Listener, ListenerExt};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::config::ServerConfig;

/// hyper's own limits, (read buffer bytes, header count): far enough above
/// the configured ones that the gateway, not hyper, answers a head that is a
/// little over them.
pub fn hyper_limits(cfg: &ServerConfig) -> (usize, usize) {
    (
        (cfg.max_header_bytes * 4).max(1024 * 1024),
        (cfg.max_headers * 4).max(400),
    )
}

/// Serves `router` on `listener` until `shutdown`, then drains: stops
/// accepting, closes idle connections and waits for the others to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: &ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (max_buf, max_headers) = hyper_limits(cfg);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms))
        .max_buf_size(max_buf)
        .max_headers(max_headers);
    // No Nagle: a stream's small SSE writes must leave at once, not wait for
    // the client's delayed ACK (measured: streamed throughput ×3.5).
    // axum's listener retries accept errors (EMFILE included) with a pause.
    let mut listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        // No upgrades: the gateway serves no WebSocket or CONNECT.
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                // Header timeouts, resets and parse errors: the client's doing.
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
