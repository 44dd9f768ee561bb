//! The one place billing's [`Error`] becomes an HTTP response, in the one
//! error shape of the admin and tenant APIs:
//! `{"error": {"type", "message"}}`, plus `"field"` when a request field is
//! at fault and `"retry_after"` (seconds, also the `Retry-After` header) when
//! a dependency is down.
//!
//! | variant | status | `type` |
//! |---|---|---|
//! | `BadRequest` | 400 | `invalid_request_error` |
//! | `Unauthorized` | 401 | `authentication_error` |
//! | `Forbidden` | 403 | `permission_error` |
//! | `NotFound` | 404 | `not_found_error` |
//! | `MethodNotAllowed` | 405 | `invalid_request_error` |
//! | `Conflict` | 409 | `conflict_error` |
//! | `ClickHouse`, `Nats` | 503 + `Retry-After` | `unavailable_error` |
//! | `Config`, `Internal` | 500 | `api_error` |
//!
//! Outage and internal details are logged, never sent: the caller gets a
//! generic message.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub use crate::error::Error as ApiError;
use crate::error::Error;

pub type ApiResult<T> = Result<T, ApiError>;

/// Seconds a client should wait before retrying after a 503.
pub const RETRY_AFTER_SECS: u64 = 5;

impl Error {
    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::ClickHouse { .. } | Error::Nats { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Config(_) | Error::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `type` of the JSON body (the names clients already rely on).
    pub fn type_name(&self) -> &'static str {
        match self {
            Error::BadRequest { .. } | Error::MethodNotAllowed(_) => "invalid_request_error",
            Error::Unauthorized(_) => "authentication_error",
            Error::Forbidden(_) => "permission_error",
            Error::NotFound(_) => "not_found_error",
            Error::Conflict(_) => "conflict_error",
            Error::ClickHouse { .. } | Error::Nats { .. } => "unavailable_error",
            Error::Config(_) | Error::Internal { .. } => "api_error",
        }
    }

    /// The message the caller sees.
    fn public_message(&self) -> String {
        match self {
            Error::ClickHouse { .. } => "ClickHouse is unavailable; retry later".to_owned(),
            Error::Nats { .. } => "NATS is unavailable; retry later".to_owned(),
            Error::Config(_) | Error::Internal { .. } => {
                "internal error; see the billing service's logs".to_owned()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let mut error = json!({"type": self.type_name(), "message": self.public_message()});
        match &self {
            Error::BadRequest {
                field: Some(field), ..
            } => {
                error["field"] = json!(field);
            }
            Error::ClickHouse { .. } | Error::Nats { .. } => {
                tracing::warn!(error = %self, "dependency unavailable");
                error["retry_after"] = json!(RETRY_AFTER_SECS);
            }
            Error::Config(_) | Error::Internal { .. } => {
                tracing::error!(error = %self, "internal error");
            }
            _ => {}
        }
        let mut response = (status, Json(json!({ "error": error }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ConfigError;
    use crate::error::ErrorKind;

    async fn render(e: Error) -> (StatusCode, Option<String>, serde_json::Value) {
        let r = e.into_response();
        let status = r.status();
        let retry = r
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn client_mistakes_are_4xx_in_the_existing_shape() {
        let cases = [
            (Error::bad_request("bad"), 400, "invalid_request_error"),
            (Error::unauthorized("no key"), 401, "authentication_error"),
            (Error::forbidden("not yours"), 403, "permission_error"),
            (Error::not_found("no tenant t"), 404, "not_found_error"),
            (
                Error::method_not_allowed("no"),
                405,
                "invalid_request_error",
            ),
            (Error::conflict("exists"), 409, "conflict_error"),
        ];
        for (e, status, kind) in cases {
            let message = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Client);
            assert!(!e.is_retryable());
            let (s, retry, body) = render(e).await;
            assert_eq!(s.as_u16(), status);
            assert_eq!(retry, None);
            assert_eq!(body["error"]["type"], kind);
            assert_eq!(body["error"]["message"], message.as_str());
            assert!(body["error"].get("field").is_none(), "{body}");
        }
    }

    #[tokio::test]
    async fn validation_names_the_field() {
        let (s, retry, body) = render(Error::invalid("amount", "amount must be positive")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(retry, None);
        assert_eq!(
            body,
            json!({"error": {
                "type": "invalid_request_error",
                "message": "amount must be positive",
                "field": "amount",
            }})
        );
    }

    #[tokio::test]
    async fn outages_are_503_with_retry_after() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        for (e, who) in [
            (Error::clickhouse("insert ledger", refused()), "ClickHouse"),
            (
                Error::from(clickhouse::error::Error::Custom("down".into())),
                "ClickHouse",
            ),
            (Error::nats("put tenant.t", refused()), "NATS"),
        ] {
            assert_eq!(e.kind(), ErrorKind::Unavailable);
            assert!(e.is_retryable());
            let (s, retry, body) = render(e).await;
            assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                retry.as_deref(),
                Some(RETRY_AFTER_SECS.to_string().as_str())
            );
            assert_eq!(body["error"]["type"], "unavailable_error");
            assert_eq!(body["error"]["retry_after"], RETRY_AFTER_SECS);
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.starts_with(who), "{message}");
            assert!(!message.contains("refused"), "no detail leaks: {message}");
        }
    }

    #[tokio::test]
    async fn only_bugs_are_500_and_their_detail_stays_in_the_logs() {
        let config = ConfigError::Invalid {
            field: "tick_ms",
            message: "tick_ms must be positive".into(),
        };
        let decode = serde_json::from_slice::<u32>(b"{").unwrap_err();
        for e in [
            Error::bug("secret detail"),
            Error::internal("decode", "secret detail"),
            Error::from(decode),
            Error::from(config),
        ] {
            assert_eq!(e.kind(), ErrorKind::Internal);
            let (s, retry, body) = render(e).await;
            assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(retry, None);
            assert_eq!(
                body,
                json!({"error": {
                    "type": "api_error",
                    "message": "internal error; see the billing service's logs",
                }})
            );
        }
    }
}
