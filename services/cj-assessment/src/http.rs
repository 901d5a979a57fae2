//! What a teacher reads of a judgement: `GET /v1/batches/{batch_id}/comparisons` (the batch's
//! owner, `X-User-ID`) lists the latest run's comparisons with the judge's justification of
//! each, and per essay the verdicts it won and lost.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use essay_common::identity::Caller;
use essay_common::util::{parse_uuid, ApiError};
use outbox::portable::params;
use serde_json::{json, Value};

use crate::CjAssessment;

pub fn router(svc: Arc<CjAssessment>) -> Router {
    Router::new()
        .route("/v1/batches/{batch_id}/comparisons", get(comparisons))
        .with_state(svc.clone())
        .merge(crate::anchors::router(svc))
}

async fn comparisons(
    State(svc): State<Arc<CjAssessment>>,
    caller: Caller,
    Path(batch_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    Ok(Json(svc.comparisons(&caller, &batch_id).await?))
}

impl CjAssessment {
    /// The latest run's comparisons of a batch, for its owner.
    pub async fn comparisons(&self, caller: &Caller, batch_id: &str) -> Result<Value, ApiError> {
        let run = self
            .db
            .fetch_optional(
                "SELECT cj_batch_id, run, status, user_id, judge, failure_reason FROM cj_batches
                 WHERE batch_id = $1 ORDER BY run DESC LIMIT 1",
                params![batch_id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no judgement of batch {batch_id}")))?;
        caller.must_own(
            run.opt_text("user_id")?.as_deref(),
            &format!("batch {batch_id}"),
        )?;
        let cj_batch_id = run.text("cj_batch_id")?;
        let rows = self
            .db
            .fetch_all(
                "SELECT essay_a, essay_b, winner, reason FROM cj_comparisons
                 WHERE cj_batch_id = $1 ORDER BY essay_a, essay_b",
                params![&cj_batch_id],
            )
            .await?;
        let mut per_essay: std::collections::BTreeMap<String, (Vec<Value>, Vec<Value>)> =
            Default::default();
        let mut list = Vec::with_capacity(rows.len());
        for r in &rows {
            let (a, b, winner, reason) = (
                r.text("essay_a")?,
                r.text("essay_b")?,
                r.text("winner")?,
                r.text("reason")?,
            );
            let loser = if winner == a { b.clone() } else { a.clone() };
            per_essay
                .entry(winner.clone())
                .or_default()
                .0
                .push(json!({"against": loser, "justification": reason}));
            per_essay
                .entry(loser.clone())
                .or_default()
                .1
                .push(json!({"against": winner, "justification": reason}));
            list.push(
                json!({"essay_a": a, "essay_b": b, "winner": winner, "justification": reason}),
            );
        }
        let essays: Vec<Value> = per_essay
            .into_iter()
            .map(|(id, (won, lost))| json!({"essay_id": id, "won": won, "lost": lost}))
            .collect();
        Ok(json!({
            "batch_id": batch_id, "run": run.int("run")?, "status": run.text("status")?,
            "judge": run.opt_text("judge")?, "failure_reason": run.opt_text("failure_reason")?,
            "comparisons": list, "essays": essays,
        }))
    }
}
