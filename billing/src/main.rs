//! `tollgate-billing`: parse the CLI, load config, run. Nothing else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tollgate_billing::config::Config;

#[derive(Parser)]
#[command(
    name = "tollgate-billing",
    about = "Tollgate billing: prices, credits, quota states, invoices and webhooks"
)]
struct Cli {
    /// TOML config; `TOLLGATE_BILLING__SECTION__KEY` environment variables override it.
    #[arg(long, env = "TOLLGATE_BILLING_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut telemetry = tollgate_telemetry::init("tollgate-billing");
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "invalid configuration");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        return match config.admin_key() {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "invalid configuration");
                ExitCode::from(2)
            }
        };
    }
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, listen = %config.listen, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal.cancel();
    });
    let result = tollgate_billing::app::run(listener, config, shutdown).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "billing failed");
            ExitCode::FAILURE
        }
    }
}
