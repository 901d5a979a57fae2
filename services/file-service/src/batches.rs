//! Whether files of a batch may change, asked of Batch Orchestrator as the original's File
//! Service asks it: `GET /internal/v1/batches/{id}/pipeline-state` names the batch's owner and
//! each phase's state. Asked, not kept locally from events: the answer must include a batch
//! registered a moment ago (a teacher uploads right after registering, before any event could
//! arrive here) and a pipeline requested a moment ago.
//!
//! Files may change while the batch exists, belongs to the caller, and no phase has started
//! (the original's lock: a phase dispatched, in progress or completed locks the files).

use essay_common::http::{self, Failure, Policy};
use essay_common::identity::Caller;
use essay_common::util::ApiError;
use serde::Deserialize;

/// Where File Service finds Batch Orchestrator unless told (`BATCH_ORCHESTRATOR_URL`).
pub const DEFAULT_URL: &str = "http://127.0.0.1:4101";

/// Phase states that lock a batch's files (the original's `locking_statuses`).
const LOCKING: &[&str] = &[
    "dispatch_initiated",
    "in_progress",
    "completed_successfully",
    "completed_with_partial_success",
];

#[derive(Clone, Debug)]
pub struct BatchClient {
    base: String,
    http: reqwest::Client,
    policy: Policy,
}

#[derive(Deserialize)]
struct PipelineStateReply {
    user_id: Option<String>,
    #[serde(default)]
    pipeline_state: Option<serde_json::Map<String, serde_json::Value>>,
}

impl BatchClient {
    pub fn new(base_url: &str, policy: Policy) -> Result<Self, String> {
        let base = base_url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(format!(
                "BATCH_ORCHESTRATOR_URL must be an http:// URL (Batch Orchestrator's address), got {base_url:?}"
            ));
        }
        Ok(Self {
            http: policy.client()?,
            base,
            policy,
        })
    }

    /// `BATCH_ORCHESTRATOR_URL`, default [`DEFAULT_URL`].
    pub fn from_env() -> Result<Self, String> {
        let url = std::env::var("BATCH_ORCHESTRATOR_URL").unwrap_or_else(|_| DEFAULT_URL.into());
        Self::new(&url, Policy::default())
    }

    /// Ok if `caller` may add or remove files of `batch_id` now; otherwise the 4xx (or 503)
    /// that says why.
    pub async fn may_change_files(&self, caller: &Caller, batch_id: &str) -> Result<(), ApiError> {
        let url = format!(
            "{}/internal/v1/batches/{batch_id}/pipeline-state",
            self.base
        );
        let body = http::send(&self.policy, || self.http.get(&url))
            .await
            .map_err(|e| match e {
                Failure::Unavailable(cause) => ApiError::unavailable(format!(
                    "Batch Orchestrator at {} did not answer ({cause}); nothing was accepted, send again",
                    self.base
                )),
                Failure::Refused { status: 404, .. } => ApiError::not_found(format!(
                    "no batch {batch_id}: register it first (POST /v1/batches)"
                )),
                Failure::Refused { status, body } => ApiError::unavailable(format!(
                    "Batch Orchestrator refused to describe batch {batch_id} (HTTP {status} {body}); nothing was accepted"
                )),
            })?;
        let reply: PipelineStateReply = serde_json::from_slice(&body).map_err(|e| {
            ApiError::unavailable(format!(
                "Batch Orchestrator's pipeline state is not as expected ({e}); nothing was accepted"
            ))
        })?;
        caller.must_own(reply.user_id.as_deref(), &format!("batch {batch_id}"))?;
        if let Some((phase, status)) = locked_by(reply.pipeline_state.as_ref()) {
            return Err(ApiError::conflict(format!(
                "batch {batch_id} is locked: {phase} processing has started ({status}); its files can no longer change"
            )));
        }
        Ok(())
    }
}

/// The first phase whose state locks the files, with that state.
fn locked_by(
    state: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Option<(String, String)> {
    let state = state?;
    ["spellcheck", "ai_feedback", "cj_assessment", "nlp"]
        .iter()
        .find_map(|phase| {
            let status = state.get(*phase)?.get("status")?.as_str()?;
            LOCKING
                .contains(&status)
                .then(|| ((*phase).to_owned(), status.to_owned()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_phase_locks_the_files() {
        let state = |v: serde_json::Value| v.as_object().cloned();
        let open = state(
            serde_json::json!({"spellcheck": {"status": "requested_by_user"},
                                            "cj_assessment": {"status": "pending_dependencies"},
                                            "nlp": null}),
        );
        assert_eq!(locked_by(open.as_ref()), None);
        assert_eq!(locked_by(None), None);
        let started = state(serde_json::json!({"spellcheck": {"status": "in_progress"}}));
        assert_eq!(
            locked_by(started.as_ref()),
            Some(("spellcheck".into(), "in_progress".into()))
        );
        let done = state(
            serde_json::json!({"spellcheck": {"status": "completed_successfully"},
                                            "cj_assessment": {"status": "failed"}}),
        );
        assert_eq!(locked_by(done.as_ref()).unwrap().0, "spellcheck");
    }
}
