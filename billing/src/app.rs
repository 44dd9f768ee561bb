//! The service's lifecycle: `run(listener, config, shutdown)`.
//!
//! Shutdown: cancel → stop accepting HTTP and drain → stop the pricing loop
//! (an unacked batch is redelivered and deduplicated), the ticker and the
//! webhook worker (an unfinished delivery is redelivered; receivers dedupe by
//! `webhook-id`).

use std::sync::OnceLock;

use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::ResultExt as _;
use crate::service::Billing;

/// The process-wide Prometheus recorder.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed (several services
            // in one test process); then ours renders empty.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Serves billing on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> crate::error::Result<()> {
    // Installs the recorder before anything records (`/metrics` renders it).
    let _recorder = prometheus();
    let billing = Billing::open(config).await?;
    let work = CancellationToken::new();
    let pricing = tokio::spawn(billing.clone().run_pricing(work.clone()));
    let ticker = tokio::spawn(billing.clone().run_ticker(work.clone()));
    let webhooks = tokio::spawn(billing.webhooks.clone().run(work.clone()));
    let app: Router = crate::admin::router(billing.clone());
    tracing::info!(addr = %listener.local_addr().internal_ctx(|| "local address".into())?, "billing listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    work.cancel();
    let _ = tokio::join!(pricing, ticker, webhooks);
    drop(billing);
    served.internal_ctx(|| "serve HTTP".into())?;
    Ok(())
}

/// Runs `run` on a background task, for tests: returns the bound address
/// and a handle that stops it when cancelled.
pub async fn spawn(
    config: Config,
) -> crate::error::Result<(
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<crate::error::Result<()>>,
)> {
    let listener = TcpListener::bind(config.listen)
        .await
        .internal_ctx(|| format!("listen on {}", config.listen))?;
    let addr = listener
        .local_addr()
        .internal_ctx(|| "local address".into())?;
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(run(listener, config, shutdown.clone()));
    Ok((addr, shutdown, handle))
}
