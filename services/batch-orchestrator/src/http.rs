//! The HTTP API (see the crate docs for the table). Public routes take the caller from
//! `X-User-ID`; `/internal/...` routes are for the platform's services only.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use essay_common::identity::Caller;
use essay_common::util::{parse_uuid, ApiError, JsonBody};
use serde_json::json;

use crate::{BatchOrchestrator, PipelineRequest, RegisterBatch, Registered};

type Svc = State<Arc<BatchOrchestrator>>;

pub fn router(svc: Arc<BatchOrchestrator>) -> Router {
    Router::new()
        .route("/v1/batches", post(register))
        .route("/v1/batches/{batch_id}", get(status))
        .route("/v1/batches/{batch_id}/pipelines", post(pipeline))
        .route(
            "/internal/v1/batches/{batch_id}/pipeline-state",
            get(pipeline_state),
        )
        .with_state(svc)
}

async fn register(
    State(svc): Svc,
    caller: Caller,
    JsonBody(req): JsonBody<RegisterBatch>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    Ok((StatusCode::CREATED, Json(svc.register(&caller, req).await?)))
}

async fn status(
    State(svc): Svc,
    caller: Caller,
    Path(batch_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    Ok(Json(svc.status(&caller, &batch_id).await?))
}

async fn pipeline(
    State(svc): Svc,
    caller: Caller,
    Path(batch_id): Path<String>,
    JsonBody(req): JsonBody<PipelineRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    let accepted = svc.request_pipeline(&caller, &batch_id, req).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(accepted))))
}

async fn pipeline_state(
    State(svc): Svc,
    Path(batch_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    Ok(Json(svc.pipeline_state(&batch_id).await?))
}
