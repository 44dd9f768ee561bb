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

/// Which API's conventions a route follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiStyle {
    OpenAi,
    Anthropic,
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
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotFound(String),
    #[error("this API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("request body is larger than the {0}-byte limit")]
    PayloadTooLarge(usize),
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

    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Upstream { status, .. } => *status,
            Self::UpstreamRateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type` and `error.code`.
    fn openai_type_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::MissingKey => ("invalid_request_error", Some("missing_api_key")),
            Self::InvalidKey(_) => ("invalid_request_error", Some("invalid_api_key")),
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
            Self::Unavailable(_) => ("api_error", Some("service_unavailable")),
            Self::Internal(_) => ("api_error", None),
        }
    }

    /// Anthropic's `error.type`.
    fn anthropic_type(&self) -> &'static str {
        match self {
            Self::MissingKey | Self::InvalidKey(_) => "authentication_error",
            Self::ModelNotAllowed(_) => "permission_error",
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => "not_found_error",
            Self::BadRequest { .. } | Self::PayloadTooLarge(_) | Self::MethodNotAllowed(_) => {
                "invalid_request_error"
            }
            Self::RateLimited { .. } | Self::UpstreamRateLimited { .. } => "rate_limit_error",
            Self::Unavailable(_) => "overloaded_error",
            Self::Upstream { status, .. } if status.as_u16() == 529 => "overloaded_error",
            Self::Upstream { .. } | Self::Internal(_) => "api_error",
        }
    }

    /// The type name callers see, for request events and metrics.
    pub fn type_name(&self, style: ApiStyle) -> &'static str {
        match style {
            ApiStyle::OpenAi => self.openai_type_code().0,
            ApiStyle::Anthropic => self.anthropic_type(),
        }
    }

    pub fn into_response_for(self, style: ApiStyle) -> Response {
        let status = self.status();
        let message = match &self {
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
                    Self::BadRequest { param, .. } => *param,
                    Self::ModelNotFound(_) | Self::ModelNotAllowed(_) => Some("model"),
                    _ => None,
                };
                json!({"error": {"message": message, "type": ty, "param": param, "code": code}})
            }
            ApiStyle::Anthropic => {
                json!({"type": "error", "error": {"type": self.anthropic_type(), "message": message}})
            }
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(self, Self::PayloadTooLarge(_)) {
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

/// Errors outside a handler's knowledge of its style default to OpenAI's.
impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_response_for(ApiStyle::OpenAi)
    }
}
