//! Batch Orchestrator: registers batches, knows when a batch is ready, and drives the
//! requested pipeline phase by phase.
//!
//! | HTTP (caller in `X-User-ID`, see `essay_common::identity`) | effect |
//! |---|---|
//! | `POST /v1/batches` `{course_code, expected_essay_count, class_id?}` | batch owned by the caller + slots' essay ids -> `batch.essays.registered` |
//! | `POST /v1/batches/{id}/pipelines` `{requested_pipeline: "cj_assessment", is_retry?}` | owner only: `commands.batch.pipeline` through the outbox |
//! | `GET /v1/batches/{id}` | owner only: status, pipeline (with its phase deadline), completed phases, last denial |
//! | `GET /internal/v1/batches/{id}/pipeline-state` | service to service, no user: owner and per-phase state in the original's `ProcessingPipelineState` (File Service asks it before accepting files) |
//!
//! Readiness: a GUEST batch (no class) is ready when its content is provisioned; a REGULAR
//! batch then asks for student matching and is ready on `els.batch.essays.ready`.
//!
//! Pipelines start from one command, `huleedu.commands.batch.pipeline.v1`, whoever sends it:
//! the original's API Gateway over Kafka, or this service's own HTTP endpoint, which checks
//! the request (404, 400, 409 at once) and enqueues the same command in its outbox. The
//! command's handler resolves the pipeline to phases ([`pipeline::resolve`], the original's
//! definitions, completed phases pruned), starts it now if the batch is ready and otherwise
//! when it becomes ready, or answers `pipeline.denied` with the reason (unknown or unsupported
//! pipeline, unknown batch, a pipeline still in progress, nothing left to run). A retry
//! (`is_retry`) after a failed pipeline runs the phases that did not complete.
//!
//! No batch waits forever: a batch whose provisioning ends with no essay fails with a reason,
//! and a phase that gets no outcome within `PHASE_TIMEOUT_SECS` (default one hour, the
//! original's `BATCH_PHASE_COMPLETION_TIMEOUT`) fails its pipeline with a reason
//! ([`deadlines`]); the teacher can then retry it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use essay_common::identity::Caller;
use essay_common::util::{now_ms, utc_timestamp, ApiError};
use essay_common::wire::{language_of, system_metadata, CourseCode};
use essay_common::{topics, Envelope, EventFactory, Service, Shutdown};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

pub mod deadlines;
mod http;
pub mod pipeline;
pub mod state_view;
#[doc(hidden)]
pub mod testing;

pub use http::router;

pub const NAME: &str = "batch_orchestrator_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    course_code TEXT NOT NULL,
    expected_count BIGINT NOT NULL,
    class_id TEXT,
    user_id TEXT,
    kind TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    status TEXT NOT NULL,
    excess_count BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS pipelines (
    batch_id TEXT PRIMARY KEY REFERENCES batches (batch_id),
    requested_pipeline TEXT NOT NULL,
    phases TEXT NOT NULL,
    next_phase BIGINT NOT NULL,
    status TEXT NOT NULL,
    is_retry BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS completed_phases (
    batch_id TEXT NOT NULL REFERENCES batches (batch_id),
    phase TEXT NOT NULL,
    PRIMARY KEY (batch_id, phase)
);
CREATE TABLE IF NOT EXISTS pipeline_denials (
    batch_id TEXT NOT NULL,
    requested_pipeline TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    denied_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS pipeline_denials_by_batch ON pipeline_denials (batch_id, denied_at);
";

/// A batch's readiness, as this service sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchStatus {
    AwaitingContent,
    AwaitingStudentMatching,
    Ready,
    /// Provisioning ended with no essay to process.
    Failed,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AwaitingContent => "AWAITING_CONTENT",
            Self::AwaitingStudentMatching => "AWAITING_STUDENT_MATCHING",
            Self::Ready => "READY",
            Self::Failed => "FAILED",
        }
    }
}

/// A pipeline's phases; names as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Spellcheck,
    CjAssessment,
}

impl Phase {
    pub fn command_topic(self) -> &'static str {
        match self {
            Self::Spellcheck => topics::SPELLCHECK_INITIATE,
            Self::CjAssessment => topics::CJ_INITIATE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spellcheck => "spellcheck",
            Self::CjAssessment => "cj_assessment",
        }
    }

    /// The `event_name` of the phase's command in the original's models.
    pub fn command_name(self) -> &'static str {
        match self {
            Self::Spellcheck => "batch.spellcheck.initiate.command",
            Self::CjAssessment => "batch.cj_assessment.initiate.command",
        }
    }

    /// The phase of a wire name, if this platform runs it.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "spellcheck" => Some(Self::Spellcheck),
            "cj_assessment" => Some(Self::CjAssessment),
            _ => None,
        }
    }
}

/// What the orchestrator does when a phase ends: the next command, or the end of the pipeline.
#[derive(Debug, PartialEq, Eq)]
pub enum NextStep {
    Start(Phase),
    Complete { succeeded: bool },
}

/// The pipeline's decision after phase `finished` (at `index`) ended with `succeeded`.
pub fn after_phase(phases: &[Phase], index: usize, succeeded: bool) -> NextStep {
    match phases.get(index + 1) {
        Some(next) if succeeded => NextStep::Start(*next),
        _ => NextStep::Complete { succeeded },
    }
}

/// How long a phase may run without an outcome, unless `PHASE_TIMEOUT_SECS` says otherwise.
pub const DEFAULT_PHASE_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct BatchOrchestrator {
    db: ServiceDb,
    phase_timeout: Duration,
}

impl BatchOrchestrator {
    pub async fn open(db: ServiceDb) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        // Columns added after the first release: a database made by it gains them.
        db.add_column("batches", "failure_reason", "TEXT").await?;
        // The essays the next command names (the original's `essays_to_process`).
        db.add_column("batches", "essays", "TEXT").await?;
        db.add_column("batches", "assignment_id", "TEXT").await?;
        db.add_column("pipelines", "started_at", "BIGINT").await?;
        db.add_column("pipelines", "phase_deadline", "BIGINT")
            .await?;
        db.add_column("pipelines", "failure_reason", "TEXT").await?;
        Ok(Self {
            db,
            phase_timeout: DEFAULT_PHASE_TIMEOUT,
        })
    }

    /// How long a phase may go without an outcome before its pipeline fails.
    pub fn with_phase_timeout(mut self, timeout: Duration) -> Self {
        self.phase_timeout = timeout;
        self
    }

    pub fn phase_timeout(&self) -> Duration {
        self.phase_timeout
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// Registers a batch owned by `caller` and its essay ids; the batch row and its event
    /// commit together.
    pub async fn register(
        &self,
        caller: &Caller,
        req: RegisterBatch,
    ) -> Result<Registered, ApiError> {
        let course = CourseCode::parse(req.course_code.trim()).map_err(ApiError::bad_request)?;
        if !(1..=500).contains(&req.expected_essay_count) {
            return Err(ApiError::bad_request(
                "expected_essay_count must be between 1 and 500",
            ));
        }
        let batch_id = Uuid::new_v4().to_string();
        let correlation_id = Uuid::new_v4();
        let essay_ids: Vec<String> = (0..req.expected_essay_count)
            .map(|_| Uuid::new_v4().to_string())
            .collect();
        let kind = if req.class_id.is_some() {
            "REGULAR"
        } else {
            "GUEST"
        };
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        tx.execute(
            "INSERT INTO batches (batch_id, course_code, expected_count, class_id, user_id, kind,
                                  correlation_id, status, created_at, updated_at, assignment_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10)",
            params![
                &batch_id,
                course.as_str(),
                req.expected_essay_count as i64,
                req.class_id.clone(),
                caller.user_id(),
                kind,
                correlation_id.to_string(),
                BatchStatus::AwaitingContent.as_str(),
                now,
                req.assignment_id.clone()
            ],
        )
        .await?;
        let event = EVENTS.event(
            topics::BATCH_ESSAYS_REGISTERED,
            ("batch", &batch_id),
            correlation_id,
            // `BatchEssaysRegistered`; `batch_id` and `batch_kind` are this platform's extras.
            &json!({
                "event": "batch.essays.registered", "entity_id": batch_id,
                "expected_essay_count": req.expected_essay_count, "essay_ids": essay_ids,
                "metadata": system_metadata(&batch_id, "batch", None, "batch.essays.registered", None),
                "course_code": course.as_str(), "student_prompt_ref": null,
                "user_id": caller.user_id(), "org_id": null, "class_id": req.class_id,
                "batch_id": batch_id, "batch_kind": kind,
            }),
        )?;
        tx.enqueue(&event).await?;
        tx.commit().await?;
        Ok(Registered {
            batch_id,
            correlation_id,
            essay_ids,
            batch_kind: kind.into(),
        })
    }

    /// Checks a pipeline request and enqueues it as the client command (the same command the
    /// original's API Gateway sends); the command's handler starts the pipeline. Unknown batch:
    /// 404; unknown or unsupported pipeline, or phases out of order: 400; a pipeline in
    /// progress or nothing left to run: 409; someone else's batch: 403. Nothing is written for
    /// a refused request.
    pub async fn request_pipeline(
        &self,
        caller: &Caller,
        batch_id: &str,
        req: PipelineRequest,
    ) -> Result<PipelineAccepted, ApiError> {
        let requested = req.requested()?;
        let mut tx = self.db.begin().await?;
        let Some(batch) = lock_batch(&mut tx, batch_id).await? else {
            return Err(ApiError::not_found(format!("no batch {batch_id}")));
        };
        caller.must_own(batch.user_id.as_deref(), &format!("batch {batch_id}"))?;
        if batch.status == BatchStatus::Failed.as_str() {
            return Err(ApiError::conflict(format!(
                "batch {batch_id} failed ({}); register a new batch",
                batch
                    .failure_reason
                    .as_deref()
                    .unwrap_or("no reason recorded")
            )));
        }
        // The request's form first: a pipeline this platform can run, phases in its order.
        let full =
            pipeline::resolve(&requested, &[]).map_err(|r| ApiError::bad_request(r.detail))?;
        if req.phases.as_ref().is_some_and(|asked| *asked != full) {
            return Err(ApiError::bad_request(format!(
                "phases must be a pipeline, each phase once and in order: {requested} runs {}",
                full.iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(" -> ")
            )));
        }
        let completed = completed_phases(&mut tx, batch_id).await?;
        let phases = pipeline::resolve(&requested, &completed).map_err(|r| match r.reason {
            "already_completed" => ApiError::conflict(r.detail),
            _ => ApiError::bad_request(r.detail),
        })?;
        if let Some(active) = active_pipeline(&mut tx, batch_id).await? {
            return Err(ApiError::conflict(format!(
                "batch {batch_id} has a pipeline in progress ({active}); request another when it ends"
            )));
        }
        let user_id = caller.user_id();
        let command = EVENTS.event(
            topics::CLIENT_PIPELINE_REQUEST,
            ("batch", batch_id),
            batch.correlation_id,
            &json!({
                "batch_id": batch_id, "requested_pipeline": requested,
                "client_correlation_id": batch.correlation_id, "user_id": user_id,
                "is_retry": req.is_retry, "retry_reason": req.retry_reason,
                "prompt_payload": null,
            }),
        )?;
        let command_id = command.event_id().to_string();
        tx.enqueue(&command).await?;
        tx.commit().await?;
        Ok(PipelineAccepted {
            batch_id: batch_id.to_owned(),
            requested_pipeline: requested,
            phases: phases.iter().map(|p| p.as_str().to_owned()).collect(),
            command_id,
        })
    }

    /// The client command, from the original's API Gateway or from [`Self::request_pipeline`].
    async fn on_pipeline_request(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let cmd: ClientPipelineRequest = env.data()?;
        let Some(batch) = lock_batch(tx, &cmd.batch_id).await? else {
            let detail = format!("no batch {} is known here", cmd.batch_id);
            return deny(tx, env, &cmd, None, "batch_not_found", &detail).await;
        };
        if batch
            .user_id
            .as_deref()
            .is_some_and(|owner| owner != cmd.user_id)
        {
            let detail = format!("batch {} belongs to another user", cmd.batch_id);
            return deny(tx, env, &cmd, Some(&batch), "not_batch_owner", &detail).await;
        }
        if batch.status == BatchStatus::Failed.as_str() {
            let detail = format!(
                "the batch failed ({}); register a new batch",
                batch
                    .failure_reason
                    .as_deref()
                    .unwrap_or("no reason recorded")
            );
            return deny(tx, env, &cmd, Some(&batch), "batch_failed", &detail).await;
        }
        if let Some(active) = active_pipeline(tx, &cmd.batch_id).await? {
            let detail =
                format!("a pipeline is in progress ({active}); request again when it ends");
            return deny(tx, env, &cmd, Some(&batch), "pipeline_in_progress", &detail).await;
        }
        let completed = completed_phases(tx, &cmd.batch_id).await?;
        let phases = match pipeline::resolve(&cmd.requested_pipeline, &completed) {
            Ok(p) => p,
            Err(r) => return deny(tx, env, &cmd, Some(&batch), r.reason, &r.detail).await,
        };
        let phases_json = serde_json::to_string(&phases).expect("phases serialise");
        tx.execute(
            "INSERT INTO pipelines (batch_id, requested_pipeline, phases, next_phase, status, is_retry)
             VALUES ($1, $2, $3, 0, 'WAITING', $4)
             ON CONFLICT (batch_id) DO UPDATE SET requested_pipeline = $2, phases = $3,
                 next_phase = 0, status = 'WAITING', is_retry = $4, failure_reason = NULL,
                 started_at = NULL, phase_deadline = NULL",
            params![&cmd.batch_id, &cmd.requested_pipeline, phases_json, cmd.is_retry],
        )
        .await?;
        if batch.status == BatchStatus::Ready.as_str() {
            self.start_phase(tx, &batch, &phases, 0).await?;
        }
        Ok(())
    }

    /// The names of the phases the batch completed, in name order.
    pub(crate) async fn completed_phase_names(
        &self,
        batch_id: &str,
    ) -> Result<Vec<String>, DbError> {
        self.db
            .fetch_all(
                "SELECT phase FROM completed_phases WHERE batch_id = $1 ORDER BY phase",
                params![batch_id],
            )
            .await?
            .iter()
            .map(|r| r.text("phase"))
            .collect()
    }

    /// The batch as its owner sees it.
    pub async fn status(
        &self,
        caller: &Caller,
        batch_id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let Some(b) = self
            .db
            .fetch_optional(
                "SELECT b.batch_id, b.user_id, b.status, b.kind, b.expected_count, b.excess_count,
                        b.failure_reason, p.requested_pipeline, p.phases, p.next_phase,
                        p.status AS pipeline_status, p.is_retry, p.phase_deadline,
                        p.failure_reason AS pipeline_failure
                 FROM batches b LEFT JOIN pipelines p ON p.batch_id = b.batch_id
                 WHERE b.batch_id = $1",
                params![batch_id],
            )
            .await?
        else {
            return Err(ApiError::not_found(format!("no batch {batch_id}")));
        };
        caller.must_own(
            b.opt_text("user_id")?.as_deref(),
            &format!("batch {batch_id}"),
        )?;
        let completed = self.completed_phase_names(batch_id).await?;
        let denial = self
            .db
            .fetch_optional(
                "SELECT requested_pipeline, reason, detail FROM pipeline_denials
                 WHERE batch_id = $1 ORDER BY denied_at DESC LIMIT 1",
                params![batch_id],
            )
            .await?;
        let pipeline = match b.opt_text("pipeline_status")? {
            Some(status) => Some(json!({
                "status": status,
                "requested_pipeline": b.opt_text("requested_pipeline")?,
                "is_retry": b.opt_int("is_retry")? == Some(1),
                "phases": serde_json::from_str::<serde_json::Value>(
                    &b.opt_text("phases")?.unwrap_or_default()).unwrap_or_default(),
                "current_phase_index": b.opt_int("next_phase")?,
                // While RUNNING: when the current phase fails unless its outcome arrives.
                "phase_deadline_ms": if status == "RUNNING" { b.opt_int("phase_deadline")? } else { None },
                "failure_reason": b.opt_text("pipeline_failure")?,
            })),
            None => None,
        };
        let last_denial = match denial {
            Some(d) => Some(json!({"requested_pipeline": d.text("requested_pipeline")?,
                                   "reason": d.text("reason")?, "detail": d.text("detail")?})),
            None => None,
        };
        Ok(json!({
            "batch_id": b.text("batch_id")?, "status": b.text("status")?,
            "batch_kind": b.text("kind")?, "expected_essay_count": b.int("expected_count")?,
            "failure_reason": b.opt_text("failure_reason")?,
            "excess_files": b.int("excess_count")?,
            "pipeline": pipeline, "completed_phases": completed, "last_denial": last_denial,
        }))
    }

    async fn mark_ready(&self, tx: &mut Tx, batch: &BatchRow) -> Result<(), HandlerError> {
        if batch.status == BatchStatus::Ready.as_str() {
            return Ok(()); // already ready: nothing starts twice
        }
        set_status(tx, &batch.batch_id, BatchStatus::Ready).await?;
        let waiting = tx
            .fetch_optional(
                "SELECT phases FROM pipelines WHERE batch_id = $1 AND status = 'WAITING'",
                params![&batch.batch_id],
            )
            .await?;
        if let Some(p) = waiting {
            let phases: Vec<Phase> = serde_json::from_str(&p.text("phases")?)
                .map_err(|e| HandlerError::retry(format!("stored phases: {e}")))?;
            self.start_phase(tx, batch, &phases, 0).await?;
        }
        Ok(())
    }

    /// Sends the command of phase `index` and gives it until the phase deadline.
    async fn start_phase(
        &self,
        tx: &mut Tx,
        batch: &BatchRow,
        phases: &[Phase],
        index: usize,
    ) -> Result<(), HandlerError> {
        let phase = phases[index];
        let now = now_ms();
        let deadline = now.saturating_add(self.phase_timeout.as_millis() as i64);
        tx.execute(
            "UPDATE pipelines SET status = 'RUNNING', next_phase = $2, phase_deadline = $3,
                    started_at = COALESCE(started_at, $4)
             WHERE batch_id = $1",
            params![&batch.batch_id, index as i64, deadline, now],
        )
        .await?;
        let mut command = json!({
            "event_name": phase.command_name(), "entity_id": batch.batch_id,
            "entity_type": "batch", "parent_id": null, "timestamp": utc_timestamp(),
            "essays_to_process": batch.essays, "language": language_of(&batch.course_code),
            "batch_id": batch.batch_id, "phase": phase.as_str(),
        });
        if phase == Phase::CjAssessment {
            command["course_code"] = json!(batch.course_code);
            command["student_prompt_ref"] = json!(null);
            command["class_type"] = json!(batch.kind);
            command["assignment_id"] = json!(batch.assignment_id);
        }
        let event = EVENTS.event(
            phase.command_topic(),
            ("batch", &batch.batch_id),
            batch.correlation_id,
            &command,
        )?;
        tx.enqueue(&event).await?;
        Ok(())
    }
}

/// How a pipeline ended, as `batch.pipeline.completed` reports it.
pub(crate) struct Ending<'a> {
    /// The phases that completed.
    pub completed: &'a [&'a str],
    /// The original's `BatchStatus`: `completed_successfully`, `completed_with_failures` or
    /// `failed_critically`.
    pub final_status: &'static str,
    pub successful_essays: usize,
    pub failed_essays: usize,
    pub reason: Option<&'a str>,
}

/// Ends the batch's pipeline (`COMPLETED`, or `FAILED` with the reason) and announces it in
/// the original's `BatchPipelineCompletedV1`.
pub(crate) async fn finish_pipeline(
    tx: &mut Tx,
    batch: &BatchRow,
    ending: Ending<'_>,
) -> Result<(), HandlerError> {
    let failed = ending.final_status == "failed_critically";
    let status = if failed { "FAILED" } else { "COMPLETED" };
    let started = tx
        .fetch_optional(
            "UPDATE pipelines SET status = $2, failure_reason = $3, phase_deadline = NULL
             WHERE batch_id = $1 RETURNING started_at",
            params![&batch.batch_id, status, ending.reason],
        )
        .await?
        .and_then(|r| r.opt_int("started_at").ok().flatten());
    // Measured from the first command of the pipeline; a pipeline that never started, zero.
    let duration = started.map_or(0.0, |s| (now_ms() - s).max(0) as f64 / 1000.0);
    let event = EVENTS.event(
        topics::PIPELINE_COMPLETED,
        ("batch", &batch.batch_id),
        batch.correlation_id,
        &json!({"event": "batch.pipeline.completed", "batch_id": batch.batch_id,
                "completed_phases": ending.completed, "final_status": ending.final_status,
                "processing_duration_seconds": duration,
                "successful_essay_count": ending.successful_essays,
                "failed_essay_count": ending.failed_essays,
                "correlation_id": batch.correlation_id,
                "metadata": system_metadata(&batch.batch_id, "batch", None, "batch.pipeline.completed", None),
                "entity_id": batch.batch_id, "status": status,
                "failure_reason": ending.reason}),
    )?;
    tx.enqueue(&event).await?;
    Ok(())
}

#[derive(Debug)]
pub(crate) struct BatchRow {
    batch_id: String,
    kind: String,
    course_code: String,
    assignment_id: Option<String>,
    /// The essays the next command names, as the last event that listed them said.
    essays: serde_json::Value,
    class_id: Option<String>,
    user_id: Option<String>,
    status: String,
    failure_reason: Option<String>,
    correlation_id: Uuid,
}

/// Reads the batch with its row locked (an UPDATE first: a row lock on PostgreSQL, and on
/// SQLite the transaction already holds the write lock), so concurrent events of one batch
/// apply one after another.
pub(crate) async fn lock_batch(tx: &mut Tx, batch_id: &str) -> Result<Option<BatchRow>, DbError> {
    let row = tx
        .fetch_optional(
            "UPDATE batches SET updated_at = $2 WHERE batch_id = $1
             RETURNING batch_id, kind, course_code, assignment_id, essays, class_id, user_id, status,
                       failure_reason, correlation_id",
            params![batch_id, now_ms()],
        )
        .await?;
    row.map(|r| {
        Ok(BatchRow {
            batch_id: r.text("batch_id")?,
            kind: r.text("kind")?,
            course_code: r.text("course_code")?,
            assignment_id: r.opt_text("assignment_id")?,
            essays: r
                .opt_text("essays")?
                .and_then(|e| serde_json::from_str(&e).ok())
                .unwrap_or_else(|| json!([])),
            class_id: r.opt_text("class_id")?,
            user_id: r.opt_text("user_id")?,
            status: r.text("status")?,
            failure_reason: r.opt_text("failure_reason")?,
            correlation_id: Uuid::parse_str(&r.text("correlation_id")?).unwrap_or_default(),
        })
    })
    .transpose()
}

impl BatchRow {
    /// How many essays the batch's next command names.
    pub(crate) fn essay_count(&self) -> usize {
        self.essays.as_array().map_or(0, Vec::len)
    }
}

/// Keeps the essays the next command will name.
async fn set_essays(
    tx: &mut Tx,
    batch_id: &str,
    essays: &serde_json::Value,
) -> Result<(), DbError> {
    if essays.is_array() {
        tx.execute(
            "UPDATE batches SET essays = $2 WHERE batch_id = $1",
            params![batch_id, essays.to_string()],
        )
        .await?;
    }
    Ok(())
}

async fn set_status(tx: &mut Tx, batch_id: &str, status: BatchStatus) -> Result<(), DbError> {
    tx.execute(
        "UPDATE batches SET status = $2 WHERE batch_id = $1",
        params![batch_id, status.as_str()],
    )
    .await?;
    Ok(())
}

/// Phases of the batch that completed (successfully, or with some essays failed).
async fn completed_phases(tx: &mut Tx, batch_id: &str) -> Result<Vec<Phase>, DbError> {
    Ok(tx
        .fetch_all(
            "SELECT phase FROM completed_phases WHERE batch_id = $1",
            params![batch_id],
        )
        .await?
        .iter()
        .filter_map(|r| r.text("phase").ok().and_then(|p| Phase::parse(&p)))
        .collect())
}

/// The status of the batch's pipeline if one is waiting or running.
async fn active_pipeline(tx: &mut Tx, batch_id: &str) -> Result<Option<String>, DbError> {
    tx.fetch_optional(
        "SELECT status FROM pipelines WHERE batch_id = $1 AND status IN ('WAITING', 'RUNNING')",
        params![batch_id],
    )
    .await?
    .map(|r| r.text("status"))
    .transpose()
}

/// Records a refused pipeline request and answers it with `pipeline.denied`.
async fn deny(
    tx: &mut Tx,
    env: &Envelope,
    cmd: &ClientPipelineRequest,
    batch: Option<&BatchRow>,
    reason: &str,
    detail: &str,
) -> Result<(), HandlerError> {
    tracing::info!(
        batch_id = cmd.batch_id,
        reason,
        detail,
        "pipeline request denied"
    );
    tx.execute(
        "INSERT INTO pipeline_denials (batch_id, requested_pipeline, reason, detail, denied_at)
         VALUES ($1, $2, $3, $4, $5)",
        params![
            &cmd.batch_id,
            &cmd.requested_pipeline,
            reason,
            detail,
            now_ms()
        ],
    )
    .await?;
    let now = utc_timestamp();
    let correlation = batch.map_or(env.correlation_id, |b| b.correlation_id);
    // This platform keeps no credit ledger: its denials are never about credits, and nothing
    // would be charged for a pipeline that does not run (see docs/adding-a-service.md).
    let event = EVENTS.event(
        topics::PIPELINE_DENIED,
        ("batch", &cmd.batch_id),
        correlation,
        &json!({
            "event_name": "pipeline.denied", "entity_id": cmd.batch_id, "entity_type": "batch",
            "parent_id": null, "timestamp": now, "batch_id": cmd.batch_id,
            "user_id": cmd.user_id, "org_id": null, "requested_pipeline": cmd.requested_pipeline,
            "denial_reason": reason, "required_credits": 0, "available_credits": 0,
            "resource_breakdown": null, "denied_at": now, "detail": detail,
        }),
    )?;
    tx.enqueue(&event).await?;
    Ok(())
}

#[async_trait]
impl Service for BatchOrchestrator {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[
            topics::CLIENT_PIPELINE_REQUEST,
            topics::PROVISIONING_COMPLETED,
            topics::EXCESS_CONTENT,
            topics::ASSOCIATIONS_CONFIRMED,
            topics::BATCH_ESSAYS_READY,
            topics::PHASE_OUTCOME,
        ]
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        if env.event_type == topics::CLIENT_PIPELINE_REQUEST {
            return self.on_pipeline_request(tx, env).await;
        }
        let batch_id = env.batch_id()?;
        let Some(batch) = lock_batch(tx, &batch_id).await? else {
            // Not ours (another orchestrator's batch on a shared cluster): nothing to do.
            tracing::debug!(
                batch_id,
                topic = env.event_type,
                "event for an unknown batch"
            );
            return Ok(());
        };
        match env.event_type.as_str() {
            topics::PROVISIONING_COMPLETED => {
                if batch.status != BatchStatus::AwaitingContent.as_str() {
                    return Ok(());
                }
                if env.data["provisioned_count"].as_i64() == Some(0) {
                    return self.fail_batch(tx, &batch, env).await;
                }
                let essays = env.data["essays_for_processing"].clone();
                set_essays(tx, &batch_id, &essays).await?;
                let batch = BatchRow { essays, ..batch };
                if batch.kind == "GUEST" {
                    self.mark_ready(tx, &batch).await?;
                } else {
                    set_status(tx, &batch_id, BatchStatus::AwaitingStudentMatching).await?;
                    let event = EVENTS.event(
                        topics::MATCHING_INITIATE,
                        ("batch", &batch_id),
                        batch.correlation_id,
                        &json!({"event_name": "batch.student.matching.initiate.command",
                                "entity_id": batch_id, "entity_type": "batch", "parent_id": null,
                                "timestamp": utc_timestamp(),
                                "essays_to_process": batch.essays, "class_id": batch.class_id,
                                "course_code": batch.course_code, "batch_id": batch_id}),
                    )?;
                    tx.enqueue(&event).await?;
                }
            }
            topics::EXCESS_CONTENT => {
                tx.execute(
                    "UPDATE batches SET excess_count = excess_count + 1 WHERE batch_id = $1",
                    params![&batch_id],
                )
                .await?;
            }
            // Recorded by Essay Lifecycle, which then reports the batch ready.
            topics::ASSOCIATIONS_CONFIRMED => {}
            topics::BATCH_ESSAYS_READY => {
                let essays = env.data["ready_essays"].clone();
                set_essays(tx, &batch_id, &essays).await?;
                self.mark_ready(tx, &BatchRow { essays, ..batch }).await?
            }
            topics::PHASE_OUTCOME => {
                let Some(p) = tx
                    .fetch_optional(
                        "SELECT phases, next_phase FROM pipelines WHERE batch_id = $1 AND status = 'RUNNING'",
                        params![&batch_id],
                    )
                    .await?
                else {
                    return Ok(());
                };
                let phases: Vec<Phase> = serde_json::from_str(&p.text("phases")?)
                    .map_err(|e| HandlerError::retry(format!("stored phases: {e}")))?;
                let index = p.int("next_phase")? as usize;
                let outcome = PhaseOutcome::of(env)?;
                let reported = outcome.phase.as_str();
                if phases.get(index).map(|p| p.as_str()) != Some(reported) {
                    return Ok(()); // an outcome for a phase we are not running: stale
                }
                let succeeded = outcome.succeeded();
                // The next phase reads what this one produced (the corrected texts).
                set_essays(tx, &batch_id, &json!(outcome.processed_essays)).await?;
                let batch = BatchRow {
                    essays: json!(outcome.processed_essays),
                    ..batch
                };
                if succeeded {
                    tx.execute(
                        "INSERT INTO completed_phases (batch_id, phase) VALUES ($1, $2)
                         ON CONFLICT (batch_id, phase) DO NOTHING",
                        params![&batch_id, reported],
                    )
                    .await?;
                }
                match after_phase(&phases, index, succeeded) {
                    NextStep::Start(_) => self.start_phase(tx, &batch, &phases, index + 1).await?,
                    NextStep::Complete { succeeded } => {
                        let done = if succeeded { index + 1 } else { index };
                        let completed: Vec<&str> =
                            phases.iter().take(done).map(|p| p.as_str()).collect();
                        let reason = (!succeeded)
                            .then(|| format!("{reported} ended {}", outcome.phase_status));
                        let final_status = match (succeeded, outcome.failed_essay_ids.len()) {
                            (false, _) => "failed_critically",
                            (true, 0) => "completed_successfully",
                            (true, _) => "completed_with_failures",
                        };
                        let ending = Ending {
                            completed: &completed,
                            final_status,
                            successful_essays: outcome.processed_essays.len(),
                            failed_essays: outcome.failed_essay_ids.len(),
                            reason: reason.as_deref(),
                        };
                        finish_pipeline(tx, &batch, ending).await?;
                    }
                }
            }
            other => tracing::warn!(topic = other, "unexpected topic"),
        }
        Ok(())
    }

    fn router(self: Arc<Self>) -> Option<Router> {
        Some(router(self))
    }

    async fn background(self: Arc<Self>, shutdown: Shutdown) {
        let tick = essay_common::runtime::tick_for(self.phase_timeout);
        essay_common::runtime::every(shutdown, tick, "phase deadlines", || {
            self.fail_overdue_phases()
        })
        .await
    }
}

#[derive(Debug, Deserialize)]
pub struct RegisterBatch {
    pub course_code: String,
    pub expected_essay_count: u32,
    #[serde(default)]
    pub class_id: Option<String>,
    /// The assignment the essays answer: CJ grades them by its anchor essays.
    #[serde(default)]
    pub assignment_id: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Registered {
    pub batch_id: String,
    pub correlation_id: Uuid,
    pub essay_ids: Vec<String>,
    pub batch_kind: String,
}

/// `els.batch.phase.outcome` (`ELSBatchPhaseOutcomeV1`), from this platform's Essay Lifecycle
/// or the original's.
#[derive(Debug, Deserialize)]
struct PhaseOutcome {
    #[serde(rename = "phase_name")]
    phase: String,
    /// The original's `BatchStatus` value.
    phase_status: String,
    #[serde(default)]
    processed_essays: Vec<serde_json::Value>,
    #[serde(default)]
    failed_essay_ids: Vec<String>,
}

impl PhaseOutcome {
    fn of(env: &Envelope) -> Result<Self, HandlerError> {
        env.data()
    }

    /// Whether the batch may go on to the next phase: anything but a failure of the whole
    /// phase (some essays failing still lets the others go on, as in the original).
    fn succeeded(&self) -> bool {
        !matches!(
            self.phase_status.as_str(),
            "failed_critically" | "content_ingestion_failed" | "cancelled"
        )
    }
}

/// A pipeline request over HTTP: the pipeline by name as the original's clients send it, or
/// (this platform's earlier form) its phases in order.
#[derive(Debug, Default, Deserialize)]
pub struct PipelineRequest {
    #[serde(default)]
    pub requested_pipeline: Option<String>,
    #[serde(default)]
    pub phases: Option<Vec<Phase>>,
    #[serde(default)]
    pub is_retry: bool,
    #[serde(default)]
    pub retry_reason: Option<String>,
}

impl PipelineRequest {
    pub fn named(pipeline: &str) -> Self {
        Self {
            requested_pipeline: Some(pipeline.into()),
            ..Self::default()
        }
    }

    /// The pipeline asked for: `requested_pipeline`, or the last of `phases`.
    fn requested(&self) -> Result<String, ApiError> {
        match (&self.requested_pipeline, &self.phases) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(phases)) => phases
                .last()
                .map(|p| p.as_str().to_owned())
                .ok_or_else(|| ApiError::bad_request("phases must name at least one phase")),
            (None, None) => Err(ApiError::bad_request(
                "name the pipeline: {\"requested_pipeline\": \"cj_assessment\"}",
            )),
        }
    }
}

/// A pipeline request accepted: its command is on its way.
#[derive(Debug, Serialize)]
pub struct PipelineAccepted {
    pub batch_id: String,
    pub requested_pipeline: String,
    /// What it will run, as resolved now.
    pub phases: Vec<String>,
    /// The event id of the `commands.batch.pipeline` command.
    pub command_id: String,
}

/// `ClientBatchPipelineRequestV1`, the original's client command.
#[derive(Debug, Deserialize)]
struct ClientPipelineRequest {
    batch_id: String,
    requested_pipeline: String,
    user_id: String,
    #[serde(default)]
    is_retry: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_in_order_and_stop_on_failure() {
        let p = [Phase::Spellcheck, Phase::CjAssessment];
        assert_eq!(
            after_phase(&p, 0, true),
            NextStep::Start(Phase::CjAssessment)
        );
        assert_eq!(
            after_phase(&p, 1, true),
            NextStep::Complete { succeeded: true }
        );
        assert_eq!(
            after_phase(&p, 0, false),
            NextStep::Complete { succeeded: false }
        );
        assert_eq!(
            serde_json::from_str::<Vec<Phase>>(r#"["spellcheck","cj_assessment"]"#).unwrap(),
            p
        );
    }
}
