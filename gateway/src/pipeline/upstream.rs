//! Building the upstream request: one body per wire format the plan's
//! deployments need (translated when the deployment speaks the other
//! format), the model set per attempt, and the client headers passed through.

use std::borrow::Cow;
use std::sync::Arc;

use axum::http::HeaderMap;
use bytes::Bytes;
use serde_json::{Map, Value};

use super::surface::Surface;
use crate::config::ProviderKind;
use crate::error::GatewayError;
use crate::routing::Deployment;
use crate::translate;

/// The request in each wire format a deployment of the plan needs. A format
/// the client already speaks borrows the parsed request rather than copying
/// it (a copy costs as much as the prompt is long).
pub(super) struct Bodies<'a> {
    /// Chat (or completions, embeddings) for OpenAI-format deployments.
    pub(super) openai: Option<Cow<'a, Map<String, Value>>>,
    /// The Responses request itself, for deployments that serve `/responses`.
    pub(super) openai_responses: Option<Cow<'a, Map<String, Value>>>,
    pub(super) anthropic: Option<Cow<'a, Map<String, Value>>>,
}

/// `m` serialised with `model` as its `model` member, without copying `m`
/// (the output is the same as inserting it into a copy: keys stay sorted).
/// This is the upstream request body, once per attempt.
pub fn body_with_model(m: &Map<String, Value>, model: &str) -> Bytes {
    struct WithModel<'a>(&'a Map<String, Value>, &'a str);
    impl serde::Serialize for WithModel<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let (m, model) = (self.0, self.1);
            let missing = !m.contains_key("model");
            let mut out = s.serialize_map(Some(m.len() + usize::from(missing)))?;
            let mut pending = missing;
            for (k, v) in m {
                if pending && k.as_str() > "model" {
                    out.serialize_entry("model", model)?;
                    pending = false;
                }
                if k == "model" {
                    out.serialize_entry(k, model)?;
                } else {
                    out.serialize_entry(k, v)?;
                }
            }
            if pending {
                out.serialize_entry("model", model)?;
            }
            out.end()
        }
    }
    Bytes::from(serde_json::to_vec(&WithModel(m, model)).unwrap_or_default())
}

/// The client's own request for an OpenAI upstream: borrowed unless it
/// streams without `stream_options.include_usage: true`, which the gateway
/// always asks for.
fn native_openai(req: &Map<String, Value>, stream: bool) -> Cow<'_, Map<String, Value>> {
    let asks_usage = req
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    if !stream || asks_usage {
        Cow::Borrowed(req)
    } else {
        Cow::Owned(with_stream_usage(req.clone(), stream))
    }
}

/// Always ask an OpenAI upstream for stream usage; stripped again if the
/// client did not ask for it.
fn with_stream_usage(mut m: Map<String, Value>, stream: bool) -> Map<String, Value> {
    if stream {
        let opts = m
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Map::new()));
        match opts {
            Value::Object(o) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            other => *other = serde_json::json!({"include_usage": true}),
        }
    }
    m
}

pub(super) fn bodies<'a>(
    surface: Surface,
    req: &'a Map<String, Value>,
    plan: &[Arc<Deployment>],
    stream: bool,
) -> Result<Bodies<'a>, GatewayError> {
    let needs = |p: ProviderKind| plan.iter().any(|d| d.provider == p);
    let invalid = |e: translate::TranslateError| match e {
        translate::TranslateError::Invalid { message, param } => {
            GatewayError::BadRequest { message, param }
        }
    };
    let native_responses =
        |d: &Arc<Deployment>| d.provider == ProviderKind::Openai && d.responses_api;
    let openai = if !needs(ProviderKind::Openai) {
        None
    } else if surface == Surface::Responses {
        if plan
            .iter()
            .any(|d| d.provider == ProviderKind::Openai && !d.responses_api)
        {
            let chat = translate::responses_request_to_chat(req).map_err(invalid)?;
            Some(Cow::Owned(with_stream_usage(chat, stream)))
        } else {
            None
        }
    } else if surface.native() == ProviderKind::Openai {
        Some(native_openai(req, stream))
    } else {
        Some(Cow::Owned(
            translate::anthropic_request_to_openai_chat(req, "").map_err(invalid)?,
        ))
    };
    let openai_responses = (surface == Surface::Responses && plan.iter().any(native_responses))
        .then_some(Cow::Borrowed(req));
    let anthropic = if !needs(ProviderKind::Anthropic) {
        None
    } else if surface.native() == ProviderKind::Anthropic {
        Some(Cow::Borrowed(req))
    } else if surface == Surface::Chat {
        Some(Cow::Owned(
            translate::openai_chat_request_to_anthropic(req, "").map_err(invalid)?,
        ))
    } else if surface == Surface::Responses {
        let chat = translate::responses_request_to_chat(req).map_err(invalid)?;
        Some(Cow::Owned(
            translate::openai_chat_request_to_anthropic(&chat, "").map_err(invalid)?,
        ))
    } else {
        return Err(GatewayError::bad_request(
            format!(
                "{} is not available for this model: it is served by an Anthropic deployment",
                surface.route()
            ),
            None,
        ));
    };
    Ok(Bodies {
        openai,
        openai_responses,
        anthropic,
    })
}

/// Client headers that some deployment of the plan passes through.
pub(super) fn forwarded_headers(
    headers: &HeaderMap,
    plan: &[Arc<Deployment>],
) -> Vec<(String, String)> {
    if plan.iter().all(|d| d.forward_headers.is_empty()) {
        return Vec::new();
    }
    headers
        .iter()
        .filter(|(k, _)| plan.iter().any(|d| d.forwards(k.as_str())))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The old way: copy, insert, serialise.
    fn copied(m: &Map<String, Value>, model: &str) -> Vec<u8> {
        let mut m = m.clone();
        m.insert("model".into(), Value::String(model.into()));
        serde_json::to_vec(&m).unwrap()
    }

    #[test]
    fn body_with_model_equals_a_copy_with_the_model_inserted() {
        for body in [
            serde_json::json!({"model": "public", "messages": [{"role": "user", "content": "hi \"x\""}], "stream": true}),
            serde_json::json!({"messages": [], "zeta": 1}),
            serde_json::json!({"a": 1, "b": {"model": "nested"}}),
            serde_json::json!({"zzz": null}),
            serde_json::json!({}),
        ] {
            let m = body.as_object().unwrap();
            assert_eq!(
                body_with_model(m, "up-1").to_vec(),
                copied(m, "up-1"),
                "{body}"
            );
        }
    }

    #[test]
    fn native_openai_borrows_unless_stream_usage_must_be_added() {
        let plain = serde_json::json!({"model": "m", "messages": []});
        assert!(matches!(
            native_openai(plain.as_object().unwrap(), false),
            Cow::Borrowed(_)
        ));
        let asks = serde_json::json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
        assert!(matches!(
            native_openai(asks.as_object().unwrap(), true),
            Cow::Borrowed(_)
        ));
        let silent = serde_json::json!({"model": "m", "stream": true});
        let got = native_openai(silent.as_object().unwrap(), true);
        assert_eq!(got["stream_options"]["include_usage"], Value::Bool(true));
    }
}
