//! Reading the request: the body within its size and time limits, parsed as
//! a JSON object, and its model (validation lives in [`crate::validate`]).

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::error::GatewayError;
use crate::state::App;

/// Reads the body within the size limit (413) and the body read timeout
/// (408): a body that trickles in must not hold a connection for ever.
pub async fn read_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, GatewayError> {
    let max = app.config.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(GatewayError::PayloadTooLarge(max));
    }
    let limit_ms = app.config.server.body_read_timeout_ms;
    let read = tokio::time::timeout(
        Duration::from_millis(limit_ms),
        axum::body::to_bytes(body, max),
    )
    .await
    .map_err(|_| GatewayError::BodyTimeout(limit_ms))?;
    read.map_err(|e| {
        let e = e.into_inner();
        if e.is::<http_body_util::LengthLimitError>() {
            GatewayError::PayloadTooLarge(max)
        } else {
            GatewayError::bad_request(format!("could not read the request body: {e}"), None)
        }
    })
}

/// Parses a JSON object body.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(GatewayError::bad_request(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(GatewayError::bad_request(
            format!("We could not parse the JSON body of your request. ({e})"),
            None,
        )),
    }
}

/// The model name of a request body (400 when missing).
pub fn model_of(req: &Map<String, Value>) -> Result<String, GatewayError> {
    match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m.clone()),
        _ => Err(GatewayError::bad_request(
            "you must provide a model parameter",
            Some("model"),
        )),
    }
}
