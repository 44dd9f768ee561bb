//! The mock upstream LLM server (OpenAI and Anthropic wire formats) for the
//! demo stack, tests and benchmarks. See `tollgate_tests::mock` for routes,
//! controls and token counts.
//!
//! Prints one line, `listening on http://ADDR`, to stderr once bound, and
//! nothing to stdout. Stops gracefully on SIGTERM or ctrl-c (requests in
//! flight get up to 5 s).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How long requests in flight may run after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "tollgate-mock-upstream",
    about = "Mock upstream LLM speaking the OpenAI and Anthropic wire formats"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "TOLLGATE_MOCK_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "tollgate-mock-upstream: cannot listen on {}: {e}",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tollgate-mock-upstream: no local address: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("listening on http://{addr}");

    let (signalled_tx, signalled_rx) = oneshot::channel::<()>();
    let server = tollgate_tests::mock::serve(listener, async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(());
    });
    let drain_deadline = async move {
        match signalled_rx.await {
            Ok(()) => tokio::time::sleep(DRAIN).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = server => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate-mock-upstream: {e}");
                ExitCode::FAILURE
            }
        },
        () = drain_deadline => ExitCode::SUCCESS,
    }
}

/// Completes on ctrl-c or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
