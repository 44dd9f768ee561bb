//! The gateway's edge: what every request passes before its route, and every
//! response after it.
//!
//! - The request head within `server.max_header_bytes` and
//!   `server.max_headers`, else 431 in the API's shape (hyper's own limits
//!   sit above these, see [`crate::server`]).
//! - A safety net for answers that no handler shaped: an error status whose
//!   body is not JSON (an extractor's plain-text rejection, a relayed
//!   upstream page) is rewritten into the API's error shape, keeping its
//!   status and the text as the message. So every error a client reads is in
//!   its own API's format, whatever produced it.
//!
//! The request-id middleware sits outside this one, so these answers carry
//! `x-request-id` like any other.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, Uri, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::config::ServerConfig;
use crate::error::{ApiStyle, GatewayError};
use crate::state::App;

/// Bytes of a non-JSON error body quoted in the rewritten message.
const QUOTED_BYTES: usize = 512;

pub async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let style = ApiStyle::for_path(req.uri().path());
    if let Err(e) = check_head(req.method(), req.uri(), req.headers(), &app.config.server) {
        return e.into_response_for(style);
    }
    let resp = next.run(req).await;
    shape(resp, style).await
}

/// The request line and headers as HTTP/1.1 sends them, against the limits.
pub fn check_head(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    cfg: &ServerConfig,
) -> Result<(), GatewayError> {
    if headers.len() > cfg.max_headers {
        return Err(GatewayError::HeadersTooLarge(format!(
            "the request has {} headers; at most {} are accepted",
            headers.len(),
            cfg.max_headers
        )));
    }
    // "METHOD TARGET HTTP/1.1\r\n", then "name: value\r\n" per header.
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let line = method.as_str().len() + target + 12;
    let size = headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4);
    if size > cfg.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge(format!(
            "the request's headers are {size} bytes; at most {} are accepted",
            cfg.max_header_bytes
        )));
    }
    Ok(())
}

/// Rewrites an error response without a JSON body into `style`'s shape.
async fn shape(resp: Response, style: ApiStyle) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(resp.headers()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(QUOTED_BYTES)])
            .trim()
            .to_owned(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned()
    } else {
        text
    };
    let mut shaped = GatewayError::Status { status, message }.into_response_for(style);
    // Keep what the original said about the connection and retries.
    for name in [header::CONNECTION, header::RETRY_AFTER, header::ALLOW] {
        if let Some(v) = parts.headers.get(&name) {
            shaped.headers_mut().insert(name, v.clone());
        }
    }
    shaped
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.trim_start().to_ascii_lowercase();
            ct.starts_with("application/json") || ct.contains("+json")
        })
}

/// A plain-text response of `status` (tests of [`shape`]).
#[cfg(test)]
fn plain(status: axum::http::StatusCode, text: &'static str) -> Response {
    let mut r = Response::new(axum::body::Body::from(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use axum::http::StatusCode;

    use super::*;

    async fn json_of(r: Response) -> serde_json::Value {
        let b = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&b).unwrap()
    }

    #[tokio::test]
    async fn plain_text_errors_take_the_apis_shape() {
        let r = shape(
            plain(StatusCode::BAD_REQUEST, "Invalid URL: bad UTF-8"),
            ApiStyle::OpenAi,
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let v = json_of(r).await;
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["message"], "Invalid URL: bad UTF-8");
        assert!(v["error"]["param"].is_null() && v["error"].get("code").is_some());

        let r = shape(plain(StatusCode::BAD_GATEWAY, ""), ApiStyle::Anthropic).await;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        let v = json_of(r).await;
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "api_error");
        assert_eq!(v["error"]["message"], "Bad Gateway");
    }

    #[tokio::test]
    async fn json_errors_and_successes_pass_unchanged() {
        let mut ok = plain(StatusCode::OK, "fine");
        ok.headers_mut().remove(header::CONTENT_TYPE);
        let r = shape(ok, ApiStyle::OpenAi).await;
        let b = axum::body::to_bytes(r.into_body(), 64).await.unwrap();
        assert_eq!(&b[..], b"fine");
        let mut json = plain(StatusCode::NOT_FOUND, "{\"error\":1}");
        json.headers_mut().insert(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        let v = json_of(shape(json, ApiStyle::OpenAi).await).await;
        assert_eq!(v["error"], 1);
    }

    #[test]
    fn head_limits_count_headers_and_bytes() {
        let cfg = ServerConfig {
            max_header_bytes: 2048,
            max_headers: 3,
            ..ServerConfig::default()
        };
        let uri: Uri = "/v1/models".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        assert!(check_head(&Method::GET, &uri, &h, &cfg).is_ok());
        h.insert("b", "x".repeat(2048).parse().unwrap());
        let e = check_head(&Method::GET, &uri, &h, &cfg).unwrap_err();
        assert_eq!(e.status(), StatusCode::from_u16(431).unwrap());
        let mut h = HeaderMap::new();
        for n in ["a", "b", "c", "d"] {
            h.insert(n, "1".parse().unwrap());
        }
        assert!(check_head(&Method::GET, &uri, &h, &cfg).is_err());
    }
}
