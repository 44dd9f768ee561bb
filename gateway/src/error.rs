//! One error type for the gateway, and the one place that maps it to HTTP.
//!
//! Every error is rendered in the calling API's own shape (OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` or Anthropic's
//! `{"type": "error", "error": {"type", "message"}}`) with the status the
//! official SDKs map to the right exception. The request-id middleware adds
//! `x-request-id` to every response, errors included.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tollgate_schemas::records::QuotaScope;

pub use crate::api_style::ApiStyle;

impl From<crate::validate::Invalid> for GatewayError {
    fn from(invalid: crate::validate::Invalid) -> Self {
        GatewayError::Invalid(invalid)
    }
}

/// The limit a 429 is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
    GlobalRequests,
    GlobalTokens,
    GlobalConcurrency,
}

impl LimitKind {
    pub fn describe(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests per minute (key)",
            LimitKind::Tokens => "tokens per minute (key)",
            LimitKind::Concurrency => "concurrent requests (key)",
            LimitKind::GlobalRequests => "requests per minute (gateway)",
            LimitKind::GlobalTokens => "tokens per minute (gateway)",
            LimitKind::GlobalConcurrency => "concurrent requests (gateway)",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("missing API key: send it as `Authorization: Bearer <key>` or `x-api-key`")]
    MissingKey,
    #[error("{0}")]
    InvalidKey(&'static str),
    /// Two credentials (headers) in one request carrying different keys.
    #[error(
        "the request carries more than one API key (`Authorization` and `x-api-key` headers): send exactly one"
    )]
    ConflictingKeys,
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    #[error("this API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// A known parameter with the wrong type or value ([`crate::validate`]).
    #[error("{}", .0.message(ApiStyle::OpenAi))]
    Invalid(crate::validate::Invalid),
    #[error("request body is larger than the {0}-byte limit")]
    PayloadTooLarge(usize),
    #[error("request header fields too large: {0}")]
    HeadersTooLarge(String),
    #[error("the request body did not arrive within {0} ms")]
    BodyTimeout(u64),
    /// An error status produced below the handlers (see [`crate::edge`]).
    #[error("{message}")]
    Status { status: StatusCode, message: String },
    #[error("rate limit reached: {}; retry after {}s", .limit.describe(), .retry_after.as_secs().max(1))]
    RateLimited {
        limit: LimitKind,
        retry_after: Duration,
        headers: HeaderMap,
    },
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("{message}")]
    Upstream { status: StatusCode, message: String },
    #[error("{message}")]
    UpstreamRateLimited {
        retry_after: Duration,
        message: String,
    },
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    /// The tenant's credit (or spend limit) or the key's budget is used up.
    #[error("{}", quota_message(*.scope, ApiStyle::OpenAi))]
    InsufficientQuota { scope: QuotaScope },
    #[error("the gateway is not accepting work right now: {0}")]
    Unavailable(&'static str),
    #[error("internal error")]
    Internal(String),
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param,
        }
    }

    /// The status on an OpenAI route; see [`GatewayError::status_for`].
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey(_) | Self::ConflictingKeys => {
                StatusCode::UNAUTHORIZED
            }
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::BadRequest { .. } | Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Status { status, .. } => *status,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream { status, .. } => *status,
            Self::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::InsufficientQuota { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The status in `style`'s convention: the two APIs differ only on
    /// insufficient quota (OpenAI 429, Anthropic 400).
    pub fn status_for(&self, style: ApiStyle) -> StatusCode {
        match (self, style) {
            (Self::InsufficientQuota { .. }, ApiStyle::Anthropic) => StatusCode::BAD_REQUEST,
            _ => self.status(),
        }
    }

    /// OpenAI's `error.type` and `error.code`.
    fn openai_type_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::MissingKey => ("invalid_request_error", Some("missing_api_key")),
            Self::InvalidKey(_) => ("invalid_request_error", Some("invalid_api_key")),
            Self::ConflictingKeys => ("invalid_request_error", Some("invalid_api_key")),
            Self::Invalid(i) => ("invalid_request_error", Some(i.code())),
            Self::HeadersTooLarge(_) => (
                "invalid_request_error",
                Some("request_header_fields_too_large"),
            ),
            Self::BodyTimeout(_) => ("invalid_request_error", Some("request_timeout")),
            Self::Status { status, .. } if status.is_server_error() => ("api_error", None),
            Self::Status { .. } => ("invalid_request_error", None),
            Self::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::ModelNotAllowed(_) => ("permission_error", Some("model_not_allowed")),
            Self::BadRequest { .. } => ("invalid_request_error", None),
            Self::PayloadTooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            Self::RateLimited { limit, .. } => match limit {
                LimitKind::Tokens | LimitKind::GlobalTokens => {
                    ("tokens", Some("rate_limit_exceeded"))
                }
                _ => ("requests", Some("rate_limit_exceeded")),
            },
            Self::RouteNotFound(_) => ("invalid_request_error", Some("unknown_url")),
            Self::Upstream { .. } => ("api_error", Some("upstream_error")),
            Self::UpstreamRateLimited { .. } => ("requests", Some("upstream_rate_limited")),
            Self::MethodNotAllowed(_) => ("invalid_request_error", Some("method_not_allowed")),
            Self::InsufficientQuota { .. } => ("insufficient_quota", Some("insufficient_quota")),
            Self::Unavailable(_) => ("api_error", Some("service_unavailable")),
            Self::Internal(_) => ("api_error", None),
        }
    }

    /// Anthropic's `error.type`.
    fn anthropic_type(&self) -> &'static str {
        match self {
            Self::MissingKey | Self::InvalidKey(_) | Self::ConflictingKeys => {
                "authentication_error"
            }
            Self::ModelNotAllowed(_) => "permission_error",
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => "not_found_error",
            Self::Status { status, .. } => match status.as_u16() {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                s if s >= 500 => "api_error",
                _ => "invalid_request_error",
            },
            Self::BadRequest { .. }
            | Self::Invalid(_)
            | Self::HeadersTooLarge(_)
            | Self::BodyTimeout(_)
            | Self::PayloadTooLarge(_)
            | Self::MethodNotAllowed(_)
            | Self::InsufficientQuota { .. } => "invalid_request_error",
            Self::RateLimited { .. } | Self::UpstreamRateLimited { .. } => "rate_limit_error",
            Self::Unavailable(_) => "overloaded_error",
            Self::Upstream { status, .. } if status.as_u16() == 529 => "overloaded_error",
            Self::Upstream { .. } | Self::Internal(_) => "api_error",
        }
    }

    /// The type name callers see, for request events and metrics; a quota
    /// refusal is `insufficient_quota` on both APIs (Anthropic's body says
    /// `invalid_request_error`), so refusals are counted the same way.
    pub fn type_name(&self, style: ApiStyle) -> &'static str {
        if matches!(self, Self::InsufficientQuota { .. }) {
            return "insufficient_quota";
        }
        match style {
            ApiStyle::OpenAi => self.openai_type_code().0,
            ApiStyle::Anthropic => self.anthropic_type(),
        }
    }

    pub fn into_response_for(self, style: ApiStyle) -> Response {
        let status = self.status_for(style);
        let message = match &self {
            Self::InsufficientQuota { scope } => quota_message(*scope, style).to_owned(),
            Self::Invalid(i) => i.message(style),
            // Never echo internals to a client.
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let body = match style {
            ApiStyle::OpenAi => {
                let (ty, code) = self.openai_type_code();
                let param = match &self {
                    Self::BadRequest { param, .. } => param.map(str::to_owned),
                    Self::Invalid(i) => Some(i.param()),
                    Self::ModelNotFound(_) | Self::ModelNotAllowed(_) => Some("model".to_owned()),
                    _ => None,
                };
                json!({"error": {"message": message, "type": ty, "param": param, "code": code}})
            }
            ApiStyle::Anthropic => {
                json!({"type": "error", "error": {"type": self.anthropic_type(), "message": message}})
            }
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(self, Self::PayloadTooLarge(_) | Self::BodyTimeout(_)) {
            // The rest of the upload is never read: the client must not reuse
            // this connection.
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
        }
        let retry = match self {
            Self::RateLimited {
                retry_after,
                headers,
                ..
            } => {
                resp.headers_mut().extend(headers);
                Some(retry_after)
            }
            Self::UpstreamRateLimited { retry_after, .. } => Some(retry_after),
            _ => None,
        };
        if let Some(retry_after) = retry {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut()
                    .insert(HeaderName::from_static("retry-after"), v);
            }
        }
        resp
    }
}

/// What a client refused for quota reads, in each API's wording (Anthropic's
/// own answer starts "Your credit balance is too low").
pub fn quota_message(scope: QuotaScope, style: ApiStyle) -> &'static str {
    match (scope, style) {
        (QuotaScope::Tenant, ApiStyle::OpenAi) => {
            "You exceeded your current quota: your credit balance (or monthly spend limit) is used up. Please add credits or raise the limit in Tollgate billing, then retry."
        }
        (QuotaScope::Key, ApiStyle::OpenAi) => {
            "You exceeded your current quota: this API key's budget is used up. Please raise the key's budget or use another key."
        }
        (QuotaScope::Tenant, ApiStyle::Anthropic) => {
            "Your credit balance is too low to access the Tollgate API. Please add credits or raise your spend limit in Tollgate billing, then retry."
        }
        (QuotaScope::Key, ApiStyle::Anthropic) => {
            "Your credit balance is too low to access the Tollgate API with this API key: its budget is used up. Please raise the key's budget or use another key."
        }
    }
}

/// Errors outside a handler's knowledge of its style default to OpenAI's.
impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_response_for(ApiStyle::OpenAi)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn render(e: GatewayError, style: ApiStyle) -> (StatusCode, serde_json::Value) {
        let resp = e.into_response_for(style);
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn insufficient_quota_in_each_apis_convention() {
        let tenant = || GatewayError::InsufficientQuota {
            scope: QuotaScope::Tenant,
        };
        let (status, body) = render(tenant(), ApiStyle::OpenAi).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(body["error"]["code"], "insufficient_quota");
        assert!(body["error"]["param"].is_null());
        let (status, body) = render(tenant(), ApiStyle::Anthropic).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Your credit balance is too low")
        );
        for style in [ApiStyle::OpenAi, ApiStyle::Anthropic] {
            assert_eq!(tenant().type_name(style), "insufficient_quota");
        }
    }
}
