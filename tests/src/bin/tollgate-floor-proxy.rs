//! The floor for the gateway's overhead: a proxy with the gateway's own I/O
//! stack (axum server with `TCP_NODELAY`, reqwest client with the gateway's
//! pool settings, mimalloc, the default multi-thread runtime) and no logic at
//! all. It forwards every request's method, path, body and content type to
//! the upstream and streams the response back unbuffered.
//!
//! The benchmark harness measures it like a gateway (`./deploy/local.sh bench
//! --floor`): its added latency and throughput are what the extra process hop
//! costs on this machine, whatever a proxy does, so the gateway's figures
//! minus the floor's are what auth, limits, quota, pricing, usage extraction
//! and the durable publish cost.
//!
//! Usage: `tollgate-floor-proxy --listen 127.0.0.1:8080 --upstream
//! http://127.0.0.1:9000`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use clap::Parser;
use futures::TryStreamExt;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "A proxy with the gateway's I/O stack and no logic: the floor of its overhead")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Base URL every request is forwarded to (path and query appended).
    #[arg(long)]
    upstream: String,
}

#[derive(Clone)]
struct Upstream {
    client: reqwest::Client,
    base: String,
}

async fn forward(State(up): State<Upstream>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // Read the whole body first, as the gateway does (it parses it).
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let mut out = up
        .client
        .request(parts.method, format!("{}{path}", up.base))
        .body(body);
    for (name, value) in &parts.headers {
        // Everything but what belongs to this hop (the mock reads its
        // `x-mock-*` controls from the rest).
        if !matches!(
            name.as_str(),
            "host" | "content-length" | "connection" | "transfer-encoding" | "keep-alive"
        ) {
            out = out.header(name, value);
        }
    }
    let resp = match out.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = resp.status();
    let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
    let mut response = Response::new(Body::from_stream(resp.bytes_stream().map_err(|e| {
        // A cut upstream ends the client's body with an error too.
        std::io::Error::other(e)
    })));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    response
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()?;
    let state = Upstream {
        client,
        base: args.upstream.trim_end_matches('/').to_owned(),
    };
    let app = Router::new().fallback(forward).with_state(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
