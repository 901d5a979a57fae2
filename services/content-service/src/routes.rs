//! The HTTP API, as the original Content Service answers it (routes, JSON bodies, status
//! codes), so its clients need no change.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use essay_common::content::{StorageId, PROVISIONAL_HEADER};
use essay_common::util::ApiError;
use serde_json::json;

use crate::{ContentService, MAX_CONTENT_BYTES};

pub fn router(svc: Arc<ContentService>) -> Router {
    Router::new()
        .route("/v1/content", post(upload))
        .route("/v1/content/{content_id}", get(download))
        .layer(DefaultBodyLimit::max(MAX_CONTENT_BYTES))
        .with_state(svc)
}

async fn upload(
    State(svc): State<Arc<ContentService>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("content may be at most {MAX_CONTENT_BYTES} bytes"),
        ),
        status => ApiError(status, e.body_text()),
    })?;
    if body.is_empty() {
        return Err(ApiError::bad_request("No data provided in request body."));
    }
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let content_type = text(header::CONTENT_TYPE.as_str())
        .filter(|t| !t.is_empty() && t.len() <= 100)
        .unwrap_or("application/octet-stream");
    // A malformed correlation id is only a tracing aid lost, not a reason to lose content.
    let correlation = text("x-correlation-id").and_then(|c| uuid::Uuid::parse_str(c).ok());
    let provisional = text(PROVISIONAL_HEADER).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let id = svc
        .save(&body, content_type, correlation, provisional)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"storage_id": id.as_str()})),
    ))
}

async fn download(
    State(svc): State<Arc<ContentService>>,
    Path(content_id): Path<String>,
) -> Result<Response, ApiError> {
    let id = StorageId::parse(&content_id)
        .map_err(|_| ApiError::bad_request("Invalid content ID format."))?;
    let content = svc
        .load(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("Content not found."))?;
    Ok((
        [(header::CONTENT_TYPE, content.content_type)],
        content.bytes,
    )
        .into_response())
}
