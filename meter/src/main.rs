//! `tollgate-meter`: parses the command line, loads the config, wires the
//! library. Nothing else lives here.
//!
//! ```text
//! tollgate-meter [--config FILE] [--check-config] [run]
//! tollgate-meter [--config FILE] replay (--from-seq N | --from-time RFC3339) [--to-seq M]
//! tollgate-meter [--config FILE] bench --events N [--query-rows M] [--keep]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use tollgate_meter::bench::{BenchArgs, bench};
use tollgate_meter::{Config, ReplayFrom, replay, run};

// The hot path allocates a few small strings per event on two threads;
// glibc's malloc spent a third of the meter's CPU on that, mimalloc a little.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tollgate-meter",
    version,
    about = "JetStream usage events into ClickHouse, exactly once in effect"
)]
struct Cli {
    /// TOML config; `TOLLGATE__SECTION__KEY` environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Load and validate the config, then exit.
    #[arg(long, global = true)]
    check_config: bool,
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_LOG_FORMAT",
        default_value = "auto"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    Auto,
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the event stream into ClickHouse until SIGTERM (the default).
    Run,
    /// Rebuild ClickHouse state from the stream (idempotent).
    Replay(ReplayCmd),
    /// Measure the meter against the raw JetStream consume rate.
    Bench(BenchCmd),
}

#[derive(Args)]
#[command(group(ArgGroup::new("from").required(true).args(["from_seq", "from_time"])))]
struct ReplayCmd {
    /// First stream sequence to replay.
    #[arg(long)]
    from_seq: Option<u64>,
    /// Replay messages published at or after this time (RFC 3339).
    #[arg(long)]
    from_time: Option<DateTime<Utc>>,
    /// Last stream sequence to replay (default: the head when it starts).
    #[arg(long)]
    to_seq: Option<u64>,
}

#[derive(Args)]
struct BenchCmd {
    /// How many synthetic usage events to publish and consume.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Also time a busy tenant's month in the aggregate views over this many rows.
    #[arg(long)]
    query_rows: Option<u64>,
    /// Keep the bench namespace's streams and database.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate-meter: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        eprintln!("tollgate-meter: config ok: {config:?}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tollgate-meter: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Inside the runtime: the gRPC span exporter needs one.
    let mut telemetry = {
        let _rt = runtime.enter();
        tollgate_telemetry::init_with(
            "tollgate-meter",
            match cli.log_format {
                LogFormat::Auto => tollgate_telemetry::LogFormat::Auto,
                LogFormat::Text => tollgate_telemetry::LogFormat::Text,
                LogFormat::Json => tollgate_telemetry::LogFormat::Json,
            },
        )
    };
    let result = runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run_meter(config).await,
            Command::Replay(cmd) => {
                let from = match (cmd.from_seq, cmd.from_time) {
                    (Some(seq), _) => ReplayFrom::Seq(seq),
                    (None, Some(t)) => ReplayFrom::Time(t),
                    (None, None) => anyhow::bail!("give --from-seq or --from-time"),
                };
                let report = replay(&config, from, cmd.to_seq, shutdown_signal()).await?;
                tracing::info!(
                    to_seq = report.to_seq,
                    messages = report.messages,
                    rows = report.rows,
                    poison = report.poison,
                    secs = report.elapsed.as_secs_f64(),
                    "replay done"
                );
                Ok(())
            }
            Command::Bench(cmd) => {
                let args = BenchArgs {
                    events: cmd.events,
                    query_rows: cmd.query_rows,
                    keep: cmd.keep,
                };
                let report = bench(&config, &args).await?;
                // The benchmark's figures are its output: stdout is the place.
                #[allow(clippy::print_stdout)]
                {
                    print!("{report}");
                }
                Ok(())
            }
        }
    });
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "tollgate-meter failed");
            eprintln!("tollgate-meter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_meter(config: Config) -> anyhow::Result<()> {
    let listener = match config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?,
        ),
        None => None,
    };
    run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// SIGTERM (systemd, Kubernetes, local.sh) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
