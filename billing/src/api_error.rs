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
            Error::ClickHouse { .. } => {
                "ClickHouse is unavailable; retry later".to_owned()
            }
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
