//! A minimal OTLP/HTTP trace receiver for the local stack and benchmarks:
//! decodes what the services export (protobuf, `opentelemetry-proto` types)
//! and writes one JSON line per span to stdout (or `--out FILE`). Not a
//! tracing backend: point `OTEL_EXPORTER_OTLP_ENDPOINT` at a real collector
//! (Jaeger, Tempo, an OpenTelemetry Collector) for anything but a look.
//!
//!     tollgate-otlp-sink --listen 127.0.0.1:4318 --out /tmp/spans.jsonl
//!     OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 ./deploy/local.sh up

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use tokio::sync::broadcast::error::RecvError;
use tollgate_tests::otlp::OtlpReceiver;

#[derive(Parser)]
#[command(
    name = "tollgate-otlp-sink",
    about = "OTLP/HTTP trace receiver writing spans as JSON lines"
)]
struct Args {
    /// Address to listen on (OTLP/HTTP's standard port is 4318).
    #[arg(long, default_value = "127.0.0.1:4318")]
    listen: SocketAddr,
    /// Append spans to this file instead of stdout.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let receiver = match OtlpReceiver::start_on(args.listen).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate-otlp-sink: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let mut out: Box<dyn Write + Send> = match &args.out {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => {
                eprintln!("tollgate-otlp-sink: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        None => Box::new(std::io::stdout()),
    };
    eprintln!("listening on http://{}", receiver.addr);
    let mut feed = receiver.subscribe();
    let mut total = 0u64;
    loop {
        tokio::select! {
            batch = feed.recv() => match batch {
                Ok(spans) => {
                    // Keep memory flat: the sink only streams.
                    receiver.clear();
                    total += spans.len() as u64;
                    for s in spans {
                        if let Ok(line) = serde_json::to_string(&s) {
                            let _ = writeln!(out, "{line}");
                        }
                    }
                    let _ = out.flush();
                }
                Err(RecvError::Lagged(n)) => eprintln!("tollgate-otlp-sink: fell behind, {n} batches not written"),
                Err(RecvError::Closed) => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("tollgate-otlp-sink: {total} spans received");
    ExitCode::SUCCESS
}
