//! The OpenAI-format routes: thin handlers over the shared [`pipeline`](crate::pipeline).

use axum::Extension;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tollgate_schemas::records::KeyRecord;

use crate::error::{ApiStyle, GatewayError};
use crate::pipeline::{self, Surface, authenticate, resolve_model};
use crate::state::{App, RequestId};

pub async fn chat_completions(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    pipeline::handle(app, rid, headers, body, Surface::Chat).await
}

pub async fn completions(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    pipeline::handle(app, rid, headers, body, Surface::Completions).await
}

pub async fn embeddings(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    pipeline::handle(app, rid, headers, body, Surface::Embeddings).await
}

pub async fn responses(
    State(app): State<App>,
    Extension(rid): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    pipeline::handle(app, rid, headers, body, Surface::Responses).await
}

fn model_object(id: &str) -> Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"})
}

fn may_use(key: &KeyRecord, model: &str) -> bool {
    key.models
        .as_ref()
        .is_none_or(|m| m.iter().any(|x| x == model))
}

pub async fn list_models(State(app): State<App>, headers: HeaderMap) -> Response {
    match authenticate(&app, &headers).await {
        Ok(key) => {
            let data: Vec<Value> = app
                .router
                .names
                .iter()
                .filter(|m| may_use(&key, m))
                .map(|m| model_object(m))
                .collect();
            axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => e.into_response_for(ApiStyle::OpenAi),
    }
}

/// The path is taken as a `Result` so that a key is checked before the
/// path: an unauthenticated caller gets 401 whatever the path holds.
pub async fn get_model(
    State(app): State<App>,
    headers: HeaderMap,
    model: Result<Path<String>, PathRejection>,
) -> Response {
    let result = async {
        let key = authenticate(&app, &headers).await?;
        let Path(model) = model.map_err(|e| {
            GatewayError::bad_request(
                format!("invalid model id in the path: {}", e.body_text()),
                None,
            )
        })?;
        resolve_model(&app, &key, &model)?;
        Ok::<_, GatewayError>(axum::Json(model_object(&model)).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.into_response_for(ApiStyle::OpenAi))
}
