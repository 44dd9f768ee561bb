//! Sending a request upstream, with failover.
//!
//! Deployments are tried in the router's order. A connect error, a timeout
//! before the response headers, a 5xx or a 429 counts as a failure of that
//! deployment (its breaker hears about it) and moves on to the next one, as
//! long as nothing has reached the client yet — which is always true here,
//! since a response is only handed back once its headers say it succeeded.
//! Any other status (2xx, or a 4xx that is the caller's fault) is final.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use tokio::time::Instant;

use tracing::Instrument;

use crate::config::ProviderKind;
use crate::error::{ApiStyle, GatewayError};
use crate::routing::Deployment;
use crate::trace::{self, UpstreamSpan};

/// The response that will be relayed, and how it was obtained.
pub struct Upstream {
    pub deployment: Arc<Deployment>,
    pub response: reqwest::Response,
    /// Attempts beyond the first.
    pub retries: u32,
    /// The client span of the answering attempt (see [`crate::trace`]).
    pub span: tracing::Span,
    /// Time spent waiting for response headers, over all attempts.
    pub wait: Duration,
}

/// What to send; the body is rebuilt per deployment (its upstream model).
pub struct Outbound<'a> {
    /// Path under the deployment's base URL (it depends on its format).
    pub path: &'a (dyn Fn(&Deployment) -> &'static str + Sync),
    pub body: &'a (dyn Fn(&Deployment) -> Bytes + Sync),
    /// Client headers forwarded to deployments that allow them.
    pub forward: &'a [(String, String)],
    /// `anthropic-version` for Anthropic deployments.
    pub anthropic_version: &'a str,
    /// For the client span: the GenAI operation and who is asking.
    pub operation: &'static str,
    pub tenant_id: &'a str,
    pub key_id: &'a str,
    pub request_id: &'a str,
}

pub async fn send(
    plan: &[Arc<Deployment>],
    out: &Outbound<'_>,
    attempt_timeout: Duration,
    deadline: Instant,
) -> Result<Upstream, GatewayError> {
    let mut retries = 0u32;
    let mut last: Option<GatewayError> = None;
    let mut skipped_open = Vec::new();
    let started = Instant::now();
    for (i, d) in plan.iter().enumerate() {
        if !d.breaker.allow() {
            skipped_open.push(d.clone());
            continue;
        }
        if i > 0 && last.is_some() {
            retries += 1;
        }
        let span = UpstreamSpan {
            operation: out.operation,
            system: d.provider.as_str(),
            model: &d.upstream_model,
            deployment: &d.name,
            address: &d.base_url,
            tenant_id: out.tenant_id,
            key_id: out.key_id,
            request_id: out.request_id,
        }
        .start();
        match attempt(d, out, attempt_timeout, deadline, &span)
            .instrument(span.clone())
            .await
        {
            Ok(resp) => {
                let status = resp.status();
                trace::record(&span, "http.response.status_code", status.as_u16());
                if is_failure_status(status) {
                    tracing::warn!(deployment = %d.name, %status, "upstream failed; trying the next deployment if any");
                    trace::record(&span, "error.type", status.as_str());
                    trace::record(&span, "otel.status_code", "ERROR");
                    d.breaker.record_failure();
                    metrics::counter!("tollgate_gateway_upstream_failures_total", "deployment" => d.name.clone(), "reason" => status.as_str().to_owned()).increment(1);
                    last = Some(map_status(status, resp).await);
                    continue;
                }
                d.breaker.record_success();
                return Ok(Upstream {
                    deployment: d.clone(),
                    response: resp,
                    retries,
                    span,
                    wait: started.elapsed(),
                });
            }
            Err(e) => {
                trace::record(&span, "error.type", e.type_name(ApiStyle::OpenAi));
                trace::record(&span, "otel.status_code", "ERROR");
                d.breaker.record_failure();
                metrics::counter!("tollgate_gateway_upstream_failures_total", "deployment" => d.name.clone(), "reason" => "transport").increment(1);
                last = Some(e);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    // Every deployment is open or failed: nothing else to try.
    if last.is_none() && !skipped_open.is_empty() {
        return Err(GatewayError::Upstream {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "every deployment of this model is failing (circuit open); retry shortly"
                .into(),
        });
    }
    Err(last.unwrap_or(GatewayError::Upstream {
        status: StatusCode::BAD_GATEWAY,
        message: "no deployment could serve this request".into(),
    }))
}

/// Statuses that are the deployment's problem, not the caller's: 5xx, 429,
/// and 401/403/404, which mean the gateway's own upstream credentials or
/// model mapping are wrong (the caller's key and model were already checked).
fn is_failure_status(s: StatusCode) -> bool {
    s.is_server_error()
        || matches!(
            s,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::NOT_FOUND
        )
}

async fn attempt(
    d: &Deployment,
    out: &Outbound<'_>,
    attempt_timeout: Duration,
    deadline: Instant,
    span: &tracing::Span,
) -> Result<reqwest::Response, GatewayError> {
    let url = format!("{}{}", d.base_url, (out.path)(d));
    let remaining = deadline.saturating_duration_since(Instant::now());
    let mut req = d
        .client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(remaining)
        .body((out.body)(d));
    if let Some(key) = &d.api_key {
        req = match d.provider {
            ProviderKind::Openai => req.bearer_auth(key),
            ProviderKind::Anthropic => req.header("x-api-key", key),
        };
    }
    if d.provider == ProviderKind::Anthropic {
        req = req.header("anthropic-version", out.anthropic_version);
    }
    for (k, v) in out.forward {
        if d.forwards(k) {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    // The upstream (or a proxy in front of it) can join the trace.
    if let Some(tp) = tollgate_telemetry::traceparent_of(span) {
        req = req.header("traceparent", tp);
    }
    let wait = attempt_timeout.min(remaining);
    match tokio::time::timeout(wait, req.send()).await {
        Err(_) => Err(GatewayError::Upstream {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!("upstream did not answer within {} ms", wait.as_millis()),
        }),
        Ok(Err(e)) if e.is_timeout() => Err(GatewayError::Upstream {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: "upstream timed out".into(),
        }),
        Ok(Err(e)) => {
            tracing::warn!(deployment = %d.name, error = %e, "upstream transport error");
            Err(GatewayError::Upstream {
                status: StatusCode::BAD_GATEWAY,
                message: "could not reach the upstream".into(),
            })
        }
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// The client-facing error for an upstream failure status: 429 stays 429
/// (with the upstream's Retry-After), 503 and 504 stay, other 5xx are 502.
async fn map_status(status: StatusCode, resp: reqwest::Response) -> GatewayError {
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1);
    let detail = resp.text().await.unwrap_or_default();
    let detail: String = detail.chars().take(300).collect();
    if status == StatusCode::TOO_MANY_REQUESTS {
        return GatewayError::UpstreamRateLimited {
            retry_after: Duration::from_secs(retry_after),
            message: format!(
                "the upstream is rate limiting (retry after {retry_after}s): {detail}"
            ),
        };
    }
    if status.is_client_error() {
        tracing::error!(%status, %detail, "upstream refused the gateway's credentials or model mapping");
        return GatewayError::Upstream {
            status: StatusCode::BAD_GATEWAY,
            message: format!(
                "the upstream refused the gateway's request ({status}); this is a gateway configuration problem"
            ),
        };
    }
    let status = match status.as_u16() {
        503 | 504 => status,
        _ => StatusCode::BAD_GATEWAY,
    };
    GatewayError::Upstream {
        status,
        message: format!("upstream failed: {detail}"),
    }
}
