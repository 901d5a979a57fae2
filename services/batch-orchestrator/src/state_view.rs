//! A batch's pipeline state in the original's `ProcessingPipelineState` shape, served at
//! `GET /internal/v1/batches/{id}/pipeline-state` with the batch's owner, as the original's
//! Batch Orchestrator serves it: File Service (this platform's and the original's) asks it
//! whether a batch exists, whose it is and whether processing has locked its files.

use essay_common::util::{iso_from_ms as iso, ApiError};
use outbox::portable::params;
use serde_json::{json, Value};

use crate::{BatchOrchestrator, Phase};

/// The original's phases, as `ProcessingPipelineState` lists them.
const PHASES: [&str; 4] = ["spellcheck", "nlp", "ai_feedback", "cj_assessment"];

/// A phase's `PipelineExecutionStatus` value.
pub fn phase_status(
    phase: &str,
    phases: &[Phase],
    current: usize,
    pipeline_status: &str,
    completed: &[String],
) -> Option<&'static str> {
    if completed.iter().any(|c| c == phase) {
        return Some("completed_successfully");
    }
    let index = phases.iter().position(|p| p.as_str() == phase)?;
    Some(match (pipeline_status, index.cmp(&current)) {
        ("WAITING", _) if index == 0 => "requested_by_user",
        ("WAITING", _) => "pending_dependencies",
        ("RUNNING", std::cmp::Ordering::Equal) => "in_progress",
        ("RUNNING", std::cmp::Ordering::Greater) => "pending_dependencies",
        ("FAILED", std::cmp::Ordering::Equal) => "failed",
        ("FAILED", std::cmp::Ordering::Greater) => "skipped_due_to_dependency_failure",
        // Before the current phase, or a completed pipeline: the phase completed.
        _ => "completed_successfully",
    })
}

impl BatchOrchestrator {
    pub async fn pipeline_state(&self, batch_id: &str) -> Result<Value, ApiError> {
        let Some(b) = self
            .db
            .fetch_optional(
                "SELECT b.user_id, b.updated_at, p.requested_pipeline, p.phases, p.next_phase,
                        p.status AS pipeline_status, p.started_at, p.failure_reason
                 FROM batches b LEFT JOIN pipelines p ON p.batch_id = b.batch_id
                 WHERE b.batch_id = $1",
                params![batch_id],
            )
            .await?
        else {
            return Err(ApiError::not_found(format!("no batch {batch_id}")));
        };
        let completed = self.completed_phase_names(batch_id).await?;
        let phases: Vec<Phase> = b
            .opt_text("phases")?
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or_default();
        let current = b.opt_int("next_phase")?.unwrap_or(0) as usize;
        let pipeline_status = b.opt_text("pipeline_status")?.unwrap_or_default();
        let failure = b.opt_text("failure_reason")?;
        let started = b.opt_int("started_at")?.map(iso);
        let mut state = serde_json::Map::new();
        state.insert("batch_id".into(), batch_id.into());
        let requested: Vec<String> = b.opt_text("requested_pipeline")?.into_iter().collect();
        state.insert("requested_pipelines".into(), json!(requested));
        for phase in PHASES {
            let detail = phase_status(phase, &phases, current, &pipeline_status, &completed).map(
                |status| {
                    json!({
                        "status": status,
                        "essay_counts": {"total": 0, "pending_dispatch_or_processing": 0,
                                         "successful": 0, "failed": 0},
                        "started_at": if status == "requested_by_user" || status == "pending_dependencies" { None } else { started.clone() },
                        "completed_at": null,
                        "error_info": if status == "failed" { Some(json!({"message": failure})) } else { None },
                        "progress_percentage": null,
                    })
                },
            );
            state.insert(phase.into(), detail.unwrap_or(Value::Null));
        }
        state.insert("last_updated".into(), iso(b.int("updated_at")?).into());
        Ok(
            json!({"batch_id": batch_id, "pipeline_state": state, "user_id": b.opt_text("user_id")?}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::{CjAssessment, Spellcheck};

    #[test]
    fn phase_states_follow_the_pipeline() {
        let p = [Spellcheck, CjAssessment];
        let done = vec!["spellcheck".to_owned()];
        assert_eq!(phase_status("nlp", &p, 0, "RUNNING", &[]), None);
        assert_eq!(
            phase_status("spellcheck", &p, 0, "WAITING", &[]),
            Some("requested_by_user")
        );
        assert_eq!(
            phase_status("cj_assessment", &p, 0, "WAITING", &[]),
            Some("pending_dependencies")
        );
        assert_eq!(
            phase_status("spellcheck", &p, 0, "RUNNING", &[]),
            Some("in_progress")
        );
        assert_eq!(
            phase_status("spellcheck", &p, 1, "RUNNING", &done),
            Some("completed_successfully")
        );
        assert_eq!(
            phase_status("cj_assessment", &p, 1, "FAILED", &done),
            Some("failed")
        );
        assert_eq!(
            phase_status("cj_assessment", &p, 0, "FAILED", &[]),
            Some("skipped_due_to_dependency_failure")
        );
    }
}
