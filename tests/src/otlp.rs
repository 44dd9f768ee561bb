//! A real OTLP trace receiver, both transports on one port: OTLP/HTTP
//! (`POST /v1/traces`, `application/x-protobuf`) and OTLP/gRPC (the
//! `TraceService/Export` unary call over HTTP/2, length-prefixed protobuf
//! with a `grpc-status` trailer), decoded into the `opentelemetry-proto`
//! types, the way a collector does. Tests point the services'
//! `OTEL_EXPORTER_OTLP_ENDPOINT` at it and read back what arrived; the
//! `tollgate-otlp-sink` binary serves it for the local stack and benchmarks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

/// One span as it arrived, flattened for assertions.
#[derive(Debug, Clone, Serialize)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn value_text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(kv.value.as_ref())))
        .collect()
}

/// Flattens an export request.
pub fn flatten(req: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_span_id: hex::encode(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: s.kind,
                    attributes: attributes(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                    start_unix_nano: s.start_time_unix_nano,
                    end_unix_nano: s.end_time_unix_nano,
                    status: s.status.as_ref().map(|st| st.code).unwrap_or(0),
                });
            }
        }
    }
    out
}

#[derive(Clone)]
struct Shared {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    /// Every batch that arrives, for a live consumer (the sink binary).
    feed: broadcast::Sender<Vec<ReceivedSpan>>,
}

/// A running receiver; stops on drop.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    shared: Shared,
    stop: Option<oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Listens on `addr` (port 0 for a free one).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Shared {
            spans: Arc::new(Mutex::new(Vec::new())),
            feed: broadcast::channel(1024).0,
        };
        let app = Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/v1/traces", post(traces))
            .route(GRPC_EXPORT, post(grpc_export))
            .with_state(shared.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            shared,
            stop: Some(tx),
        })
    }

    pub async fn start() -> Self {
        Self::start_on(([127, 0, 0, 1], 0).into()).await.unwrap()
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.spans.lock().unwrap().clone()
    }

    /// Spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Batches as they arrive.
    pub fn subscribe(&self) -> broadcast::Receiver<Vec<ReceivedSpan>> {
        self.shared.feed.subscribe()
    }

    /// Forgets what arrived so far (long-running sinks).
    pub fn clear(&self) {
        self.shared.spans.lock().unwrap().clear();
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The gRPC method OTLP exporters call.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

fn grpc_reply(status: u32, message: Option<Vec<u8>>) -> Response {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = Vec::new();
    if let Some(m) = message {
        let mut framed = Vec::with_capacity(5 + m.len());
        framed.push(0);
        framed.extend_from_slice(&u32::try_from(m.len()).unwrap_or(u32::MAX).to_be_bytes());
        framed.extend_from_slice(&m);
        frames.push(Ok(Frame::data(Bytes::from(framed))));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", status.into());
    frames.push(Ok(Frame::trailers(trailers)));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/grpc")
        .body(axum::body::Body::new(StreamBody::new(
            futures::stream::iter(frames),
        )))
        .unwrap_or_default()
}

/// One unary gRPC call: a 5-byte prefix (compressed flag, big-endian
/// length) and the message.
async fn grpc_export(State(shared): State<Shared>, body: Bytes) -> Response {
    const INVALID_ARGUMENT: u32 = 3;
    const UNIMPLEMENTED: u32 = 12;
    if body.len() < 5 {
        return grpc_reply(INVALID_ARGUMENT, None);
    }
    if body[0] != 0 {
        return grpc_reply(UNIMPLEMENTED, None); // compressed
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let Some(msg) = body.get(5..5 + len) else {
        return grpc_reply(INVALID_ARGUMENT, None);
    };
    let Ok(req) = ExportTraceServiceRequest::decode(msg) else {
        return grpc_reply(INVALID_ARGUMENT, None);
    };
    let spans = flatten(&req);
    let _ = shared.feed.send(spans.clone());
    shared.spans.lock().unwrap().extend(spans);
    grpc_reply(
        0,
        Some(ExportTraceServiceResponse::default().encode_to_vec()),
    )
}

async fn traces(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-protobuf") {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("expected application/x-protobuf, got {ct:?}"),
        )
            .into_response();
    }
    if headers.contains_key(header::CONTENT_ENCODING) {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "this receiver takes uncompressed bodies",
        )
            .into_response();
    }
    let req = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let spans = flatten(&req);
    let _ = shared.feed.send(spans.clone());
    shared.spans.lock().unwrap().extend(spans);
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}
