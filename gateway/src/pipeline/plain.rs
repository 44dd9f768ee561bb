//! The plain (non-streamed) relay: the upstream's body read whole, its usage
//! read in the upstream's format, then passed on or translated.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;
use tollgate_schemas::events::TokenCounts;

use super::finish::Finish;
use super::surface::Surface;
use crate::config::ProviderKind;
use crate::error::GatewayError;
use crate::sse::OpenAiUsage;
use crate::translate;

/// Usage and served model of a plain upstream body, in the upstream's format.
fn plain_usage(provider: ProviderKind, body: &Value) -> (Option<TokenCounts>, Option<String>) {
    let model = body.get("model").and_then(Value::as_str).map(str::to_owned);
    let usage = match (provider, body.get("usage")) {
        (_, None | Some(Value::Null)) => None,
        (ProviderKind::Openai, Some(u)) => <OpenAiUsage as serde::Deserialize>::deserialize(u)
            .ok()
            .map(|u| u.tokens()),
        (ProviderKind::Anthropic, Some(u)) => Some(translate::anthropic_usage_tokens(u)),
    };
    (usage, model)
}

/// Generated text of a plain body in either format, for estimates.
fn plain_text(body: &Value) -> String {
    let mut out = String::new();
    for c in body
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let msg = c
            .get("message")
            .and_then(|m| m.get("content"))
            .and_then(Value::as_str);
        out.push_str(
            msg.or_else(|| c.get("text").and_then(Value::as_str))
                .unwrap_or_default(),
        );
    }
    for b in body
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(b.get("text").and_then(Value::as_str).unwrap_or_default());
    }
    out
}

pub(super) async fn plain_response(
    done: Finish,
    resp: reqwest::Response,
    limit_headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let status = resp.status();
    let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    let download = Instant::now();
    let bytes = resp.bytes().await.map_err(|e| GatewayError::Upstream {
        status: if e.is_timeout() {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        },
        message: "the upstream response was cut off".into(),
    })?;
    let download = download.elapsed();
    let provider = done.deployment.provider;
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    let (tokens, estimated, served) = if status.is_success() {
        match &parsed {
            Some(v) if done.surface == Surface::Responses && !done.translated() => {
                let model = v.get("model").and_then(Value::as_str).map(str::to_owned);
                match v.get("usage").filter(|u| !u.is_null()) {
                    Some(u) => (crate::responses_relay::usage_tokens(u), false, model),
                    None => (done.estimate(""), true, model),
                }
            }
            Some(v) => match plain_usage(provider, v) {
                (Some(t), model) => (t, false, model),
                (None, model) => (done.estimate(&plain_text(v)), true, model),
            },
            None => (done.estimate(""), true, None),
        }
    } else {
        (TokenCounts::default(), false, None)
    };
    // What the client gets: the upstream's bytes, or their translation.
    let client_body = if !done.translated() {
        bytes
    } else {
        let translated = match (status.is_success(), provider, &parsed) {
            (true, _, Some(v)) if done.surface == Surface::Responses => {
                let chat = match provider {
                    ProviderKind::Openai => Some(v.clone()),
                    ProviderKind::Anthropic => {
                        translate::anthropic_response_to_openai_chat(v, &done.model).ok()
                    }
                };
                chat.and_then(|c| translate::chat_response_to_responses(&c, &done.model).ok())
                    .map(|mut r| {
                        translate::echo_request_fields(&mut r, &done.request);
                        r
                    })
            }
            // A bridged Responses error is already OpenAI-shaped.
            (false, ProviderKind::Openai, Some(v)) if done.surface == Surface::Responses => {
                Some(v.clone())
            }
            (true, ProviderKind::Openai, Some(v)) => {
                translate::openai_chat_response_to_anthropic(v, &done.model).ok()
            }
            (true, ProviderKind::Anthropic, Some(v)) => {
                translate::anthropic_response_to_openai_chat(v, &done.model).ok()
            }
            (false, ProviderKind::Openai, _) => Some(translate::openai_error_to_anthropic(
                &bytes,
                status.as_u16(),
            )),
            (false, ProviderKind::Anthropic, _) => Some(translate::anthropic_error_to_openai(
                &bytes,
                status.as_u16(),
            )),
            _ => None,
        };
        match translated {
            Some(v) => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
            None => {
                done.record(tokens, estimated, 502, false, served, None);
                return Err(GatewayError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message: "the upstream's response could not be translated".into(),
                });
            }
        }
    };
    let cost = done.record(tokens, estimated, status.as_u16(), false, served, None);
    let mut out = Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
        h.extend(limit_headers);
        match content_type {
            Some(ct) if !done.translated() => {
                h.insert(header::CONTENT_TYPE, ct);
            }
            _ => {
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        done.common_headers(h);
        if let Ok(v) = HeaderValue::from_str(&cost.to_string()) {
            h.insert("x-tollgate-cost", v);
        }
    }
    done.record_overhead(download);
    out.body(Body::from(client_body))
        .map_err(|e| GatewayError::Internal(e.to_string()))
}
