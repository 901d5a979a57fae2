//! Essay Lifecycle: one slot per expected essay of a registered batch, content assigned to
//! slots, and every essay moved through its [`state::EssayState`] machine as phases run.
//!
//! Consumes registration, content, matching and phase events (see [`Service::consumes`]);
//! emits slot assignments, provisioning completion, matching requests, per-essay spellcheck
//! requests, batch CJ requests and `batch.phase.outcome` once every essay of a phase is
//! terminal. Content that arrives before its batch is registered is parked in
//! `pending_content` and assigned when the registration arrives.
//!
//! A batch waits for its files until its provisioning deadline (`PROVISIONING_TIMEOUT_SECS`,
//! default 24 hours as in the original): then the slots still empty become `CONTENT_MISSING`
//! and provisioning completes with what arrived ([`deadline`]); with nothing at all, Batch
//! Orchestrator fails the batch with that reason. A file arriving later is excess content.
//!
//! `GET /v1/batches/{id}/essays` answers the batch's owner only (`X-User-ID`).

pub mod deadline;
pub mod state;

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use essay_common::identity::Caller;
use essay_common::util::{now_ms, parse_uuid, utc_timestamp, ApiError};
use essay_common::wire::{essay_ref, language_of, system_metadata};
use essay_common::{topics, Envelope, EventFactory, Service, Shutdown};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use state::{EssayEvent, EssayState};

pub const NAME: &str = "essay_lifecycle_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    expected_count BIGINT NOT NULL,
    class_id TEXT,
    kind TEXT NOT NULL,
    course_code TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    provisioning_completed BIGINT NOT NULL DEFAULT 0,
    essays_ready_sent BIGINT NOT NULL DEFAULT 0,
    current_phase TEXT,
    phase_status TEXT,
    phase_runs BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS essays (
    essay_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL REFERENCES batches (batch_id),
    slot_index BIGINT NOT NULL,
    state TEXT NOT NULL,
    file_upload_id TEXT UNIQUE,
    filename TEXT,
    text_storage_id TEXT,
    corrected_text_storage_id TEXT,
    error_code TEXT,
    spelling_errors BIGINT,
    student_id TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS essays_by_batch ON essays (batch_id, slot_index);
CREATE TABLE IF NOT EXISTS batch_gate (batch_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS pending_content (
    file_upload_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    envelope TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_by_batch ON pending_content (batch_id);
";

/// How long a batch waits for its files unless `PROVISIONING_TIMEOUT_SECS` says otherwise
/// (the original's 24 hours).
pub const DEFAULT_PROVISIONING_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(24 * 3600);

#[derive(Clone)]
pub struct EssayLifecycle {
    db: ServiceDb,
    provisioning_timeout: std::time::Duration,
}

#[derive(Clone, Debug)]
struct Batch {
    batch_id: String,
    class_id: Option<String>,
    /// GUEST or REGULAR (the original's `class_type`).
    kind: String,
    user_id: Option<String>,
    course_code: String,
    correlation_id: Uuid,
    provisioning_completed: bool,
    essays_ready_sent: bool,
    current_phase: Option<String>,
    phase_status: Option<String>,
    phase_runs: i64,
}

/// `BatchEssaysRegistered`: the batch is its `entity_id` (the original sends no `batch_id`).
#[derive(Deserialize)]
struct Registered {
    #[serde(rename = "entity_id")]
    batch_id: String,
    essay_ids: Vec<String>,
    course_code: String,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    class_id: Option<String>,
    #[serde(default)]
    batch_kind: Option<String>,
}

/// `EssayContentProvisionedV1` / `EssayValidationFailedV1`: the batch is `entity_id`.
#[derive(Deserialize)]
struct Content {
    #[serde(rename = "entity_id")]
    batch_id: String,
    file_upload_id: String,
    original_file_name: String,
    /// Set for provisioned content, absent for a file that failed validation.
    #[serde(default)]
    text_storage_id: Option<String>,
    #[serde(default)]
    validation_error_code: Option<String>,
}

#[derive(Deserialize)]
struct Association {
    essay_id: String,
    #[serde(default)]
    student_id: Option<String>,
}

/// `batch.spellcheck.phase.completed` (`SpellcheckPhaseCompletedV1`): the essay is the entity.
#[derive(Deserialize)]
struct EssayResult {
    batch_id: String,
    #[serde(rename = "entity_id")]
    essay_id: String,
    /// `completed` or `failed` (the original's `ProcessingStatus`).
    status: String,
    /// This platform's Spellchecker adds it; the original's does not (then unknown).
    #[serde(default)]
    error_count: Option<i64>,
    #[serde(default)]
    corrected_text_storage_id: Option<String>,
}

impl EssayLifecycle {
    pub async fn open(db: ServiceDb) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        // Added after the first release: a database made by it gains them.
        db.add_column("batches", "user_id", "TEXT").await?;
        db.add_column("batches", "provisioning_deadline", "BIGINT")
            .await?;
        Ok(Self {
            db,
            provisioning_timeout: DEFAULT_PROVISIONING_TIMEOUT,
        })
    }

    /// How long a registered batch waits for its files.
    pub fn with_provisioning_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.provisioning_timeout = timeout;
        self
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// Locks and reads a batch (see `batch_orchestrator::lock_batch` for why an UPDATE).
    async fn lock_batch(&self, tx: &mut Tx, batch_id: &str) -> Result<Option<Batch>, HandlerError> {
        let Some(r) = tx
            .fetch_optional(
                "UPDATE batches SET updated_at = $2 WHERE batch_id = $1
                 RETURNING batch_id, class_id, kind, user_id, course_code, correlation_id,
                           provisioning_completed, essays_ready_sent, current_phase, phase_status,
                           phase_runs",
                params![batch_id, now_ms()],
            )
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(Batch {
            batch_id: r.text("batch_id")?,
            class_id: r.opt_text("class_id")?,
            kind: r.text("kind")?,
            user_id: r.opt_text("user_id")?,
            course_code: r.text("course_code")?,
            correlation_id: Uuid::parse_str(&r.text("correlation_id")?).unwrap_or_default(),
            provisioning_completed: r.int("provisioning_completed")? != 0,
            essays_ready_sent: r.int("essays_ready_sent")? != 0,
            current_phase: r.opt_text("current_phase")?,
            phase_status: r.opt_text("phase_status")?,
            phase_runs: r.int("phase_runs")?,
        }))
    }

    /// Serialises registration and content of one batch even before the batch row exists:
    /// without it, content parked while the registration commits would never be assigned.
    async fn gate(&self, tx: &mut Tx, batch_id: &str) -> Result<(), HandlerError> {
        tx.execute(
            "INSERT INTO batch_gate (batch_id) VALUES ($1)
             ON CONFLICT (batch_id) DO UPDATE SET batch_id = excluded.batch_id",
            params![batch_id],
        )
        .await?;
        Ok(())
    }

    async fn emit(
        &self,
        tx: &mut Tx,
        topic: &'static str,
        aggregate: (&str, &str),
        correlation: Uuid,
        data: serde_json::Value,
    ) -> Result<(), HandlerError> {
        let event = EVENTS.event(topic, aggregate, correlation, &data)?;
        tx.enqueue(&event).await?;
        Ok(())
    }

    async fn set_state(
        &self,
        tx: &mut Tx,
        essay_id: &str,
        from: EssayState,
        event: EssayEvent,
    ) -> Result<EssayState, HandlerError> {
        let to = from
            .apply(event)
            .map_err(|e| HandlerError::poison(format!("essay {essay_id}: {e}")))?;
        tx.execute(
            "UPDATE essays SET state = $2, updated_at = $3 WHERE essay_id = $1",
            params![essay_id, to.as_str(), now_ms()],
        )
        .await?;
        Ok(to)
    }

    async fn essays(
        &self,
        tx: &mut Tx,
        batch_id: &str,
    ) -> Result<Vec<(String, EssayState)>, HandlerError> {
        let rows = tx
            .fetch_all(
                "SELECT essay_id, state FROM essays WHERE batch_id = $1 ORDER BY slot_index",
                params![batch_id],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let state = r.text("state")?;
                let state = EssayState::parse(&state)
                    .ok_or_else(|| HandlerError::retry(format!("unknown stored state {state}")))?;
                Ok((r.text("essay_id")?, state))
            })
            .collect()
    }

    async fn on_registered(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let reg: Registered = env.data()?;
        self.gate(tx, &reg.batch_id).await?;
        let kind = reg.batch_kind.clone().unwrap_or_else(|| {
            if reg.class_id.is_some() {
                "REGULAR".into()
            } else {
                "GUEST".into()
            }
        });
        let inserted = tx
            .execute(
                "INSERT INTO batches (batch_id, expected_count, class_id, kind, course_code,
                                      correlation_id, updated_at, user_id, provisioning_deadline)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (batch_id) DO NOTHING",
                params![
                    &reg.batch_id,
                    reg.essay_ids.len(),
                    reg.class_id.clone(),
                    kind,
                    &reg.course_code,
                    env.correlation_id.to_string(),
                    now_ms(),
                    reg.user_id.clone(),
                    now_ms().saturating_add(self.provisioning_timeout.as_millis() as i64)
                ],
            )
            .await?;
        if inserted == 0 {
            return Ok(());
        }
        for (i, essay_id) in reg.essay_ids.iter().enumerate() {
            tx.execute(
                "INSERT INTO essays (essay_id, batch_id, slot_index, state, updated_at)
                 VALUES ($1, $2, $3, $4, $5)",
                params![
                    essay_id,
                    &reg.batch_id,
                    i,
                    EssayState::AwaitingContent.as_str(),
                    now_ms()
                ],
            )
            .await?;
        }
        // Content that came first is assigned now, in arrival order.
        let parked = tx
            .fetch_all(
                "DELETE FROM pending_content WHERE batch_id = $1 RETURNING envelope, received_at",
                params![&reg.batch_id],
            )
            .await?;
        let mut parked: Vec<(i64, String)> = parked
            .iter()
            .map(|r| Ok((r.int("received_at")?, r.text("envelope")?)))
            .collect::<Result<_, DbError>>()?;
        parked.sort();
        let batch = self
            .lock_batch(tx, &reg.batch_id)
            .await?
            .expect("inserted above");
        for (_, envelope) in parked {
            let env: Envelope = serde_json::from_str(&envelope)
                .map_err(|e| HandlerError::retry(format!("parked envelope: {e}")))?;
            self.assign(tx, &batch, &env.data()?).await?;
        }
        self.check_provisioning(tx, &batch).await
    }

    async fn on_content(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let content: Content = env.data()?;
        self.gate(tx, &content.batch_id).await?;
        let Some(batch) = self.lock_batch(tx, &content.batch_id).await? else {
            tx.execute(
                "INSERT INTO pending_content (file_upload_id, batch_id, envelope, received_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (file_upload_id) DO NOTHING",
                params![
                    &content.file_upload_id,
                    &content.batch_id,
                    serde_json::to_string(env).map_err(HandlerError::retry)?,
                    now_ms()
                ],
            )
            .await?;
            return Ok(());
        };
        self.assign(tx, &batch, &content).await?;
        self.check_provisioning(tx, &batch).await
    }

    /// Puts content (or its failure) into the first free slot; no free slot -> excess.
    async fn assign(
        &self,
        tx: &mut Tx,
        batch: &Batch,
        content: &Content,
    ) -> Result<(), HandlerError> {
        let already = tx
            .fetch_optional(
                "SELECT essay_id FROM essays WHERE file_upload_id = $1",
                params![&content.file_upload_id],
            )
            .await?;
        if already.is_some() {
            return Ok(());
        }
        let free = tx
            .fetch_optional(
                "SELECT essay_id FROM essays WHERE batch_id = $1 AND state = $2
                 ORDER BY slot_index LIMIT 1",
                params![&batch.batch_id, EssayState::AwaitingContent.as_str()],
            )
            .await?;
        let Some(free) = free else {
            if content.text_storage_id.is_some() {
                self.emit(
                    tx,
                    topics::EXCESS_CONTENT,
                    ("batch", &batch.batch_id),
                    batch.correlation_id,
                    json!({"event": "excess.content.provisioned", "batch_id": batch.batch_id,
                           "original_file_name": content.original_file_name,
                           "text_storage_id": content.text_storage_id,
                           "reason": "NO_AVAILABLE_SLOT", "correlation_id": batch.correlation_id,
                           "timestamp": utc_timestamp(),
                           "file_upload_id": content.file_upload_id}),
                )
                .await?;
            }
            return Ok(());
        };
        let essay_id = free.text("essay_id")?;
        let event = if content.text_storage_id.is_some() {
            EssayEvent::ContentAssigned
        } else {
            EssayEvent::ContentInvalid
        };
        self.set_state(tx, &essay_id, EssayState::AwaitingContent, event)
            .await?;
        tx.execute(
            "UPDATE essays SET file_upload_id = $2, filename = $3, text_storage_id = $4, error_code = $5
             WHERE essay_id = $1",
            params![&essay_id, &content.file_upload_id, &content.original_file_name,
                    content.text_storage_id.clone(), content.validation_error_code.clone()],
        )
        .await?;
        if let Some(text_storage_id) = &content.text_storage_id {
            self.emit(
                tx,
                topics::SLOT_ASSIGNED,
                ("essay", &essay_id),
                batch.correlation_id,
                json!({"batch_id": batch.batch_id, "essay_id": essay_id, "entity_id": essay_id,
                       "file_upload_id": content.file_upload_id, "text_storage_id": text_storage_id,
                       "original_file_name": content.original_file_name}),
            )
            .await?;
        }
        Ok(())
    }

    async fn check_provisioning(&self, tx: &mut Tx, batch: &Batch) -> Result<(), HandlerError> {
        if batch.provisioning_completed {
            return Ok(());
        }
        let essays = self.essays(tx, &batch.batch_id).await?;
        if essays
            .iter()
            .any(|(_, s)| *s == EssayState::AwaitingContent)
        {
            return Ok(());
        }
        self.complete_provisioning(tx, batch, &essays, false).await
    }

    /// Announces provisioning complete with the essays whose content is ready; `timed_out`
    /// when the deadline ended the wait.
    async fn complete_provisioning(
        &self,
        tx: &mut Tx,
        batch: &Batch,
        essays: &[(String, EssayState)],
        timed_out: bool,
    ) -> Result<(), HandlerError> {
        tx.execute(
            "UPDATE batches SET provisioning_completed = 1 WHERE batch_id = $1",
            params![&batch.batch_id],
        )
        .await?;
        let ready: Vec<&String> = essays
            .iter()
            .filter(|(_, s)| *s == EssayState::ContentReady)
            .map(|(e, _)| e)
            .collect();
        let texts = tx
            .fetch_all(
                "SELECT essay_id, text_storage_id FROM essays WHERE batch_id = $1 AND state = $2
                 ORDER BY slot_index",
                params![&batch.batch_id, EssayState::ContentReady.as_str()],
            )
            .await?;
        let refs = texts
            .iter()
            .map(|r| Ok(essay_ref(&r.text("essay_id")?, &r.text("text_storage_id")?)))
            .collect::<Result<Vec<_>, DbError>>()?;
        self.emit(
            tx,
            topics::PROVISIONING_COMPLETED,
            ("batch", &batch.batch_id),
            batch.correlation_id,
            json!({"event": "batch.content.provisioning.completed", "batch_id": batch.batch_id,
                   "provisioned_count": ready.len(), "expected_count": essays.len(),
                   "course_code": batch.course_code, "user_id": batch.user_id,
                   "essays_for_processing": refs, "correlation_id": batch.correlation_id,
                   "timestamp": utc_timestamp(),
                   "entity_id": batch.batch_id, "failed_count": essays.len() - ready.len(),
                   "essay_ids": ready, "timed_out": timed_out}),
        )
        .await
    }

    async fn on_matching_initiate(&self, tx: &mut Tx, batch: &Batch) -> Result<(), HandlerError> {
        let rows = tx
            .fetch_all(
                "SELECT essay_id, text_storage_id FROM essays WHERE batch_id = $1 AND state = $2 ORDER BY slot_index",
                params![&batch.batch_id, EssayState::ContentReady.as_str()],
            )
            .await?;
        let essays: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| Ok(json!({"essay_id": r.text("essay_id")?, "text_storage_id": r.text("text_storage_id")?})))
            .collect::<Result<_, DbError>>()?;
        self.emit(
            tx,
            topics::MATCHING_REQUESTED,
            ("batch", &batch.batch_id),
            batch.correlation_id,
            json!({"batch_id": batch.batch_id, "entity_id": batch.batch_id,
                   "class_id": batch.class_id, "course_code": batch.course_code,
                   "essays_to_process": essays}),
        )
        .await
    }

    async fn on_associations(
        &self,
        tx: &mut Tx,
        batch: &Batch,
        env: &Envelope,
    ) -> Result<(), HandlerError> {
        if batch.essays_ready_sent {
            return Ok(());
        }
        let associations: Vec<Association> =
            serde_json::from_value(env.data["associations"].clone())
                .map_err(|e| HandlerError::poison(format!("associations: {e}")))?;
        for a in &associations {
            tx.execute(
                "UPDATE essays SET student_id = $3 WHERE essay_id = $1 AND batch_id = $2",
                params![&a.essay_id, &batch.batch_id, a.student_id.clone()],
            )
            .await?;
        }
        tx.execute(
            "UPDATE batches SET essays_ready_sent = 1 WHERE batch_id = $1",
            params![&batch.batch_id],
        )
        .await?;
        let rows = tx
            .fetch_all(
                "SELECT essay_id, student_id, text_storage_id FROM essays WHERE batch_id = $1 AND state = $2 ORDER BY slot_index",
                params![&batch.batch_id, EssayState::ContentReady.as_str()],
            )
            .await?;
        let ready: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let mut essay = essay_ref(&r.text("essay_id")?, &r.text("text_storage_id")?);
                essay["student_id"] = json!(r.opt_text("student_id")?);
                Ok(essay)
            })
            .collect::<Result<_, DbError>>()?;
        self.emit(
            tx,
            topics::BATCH_ESSAYS_READY,
            ("batch", &batch.batch_id),
            batch.correlation_id,
            json!({"event": "batch.essays.ready", "batch_id": batch.batch_id,
                   "ready_essays": ready,
                   "metadata": system_metadata(&batch.batch_id, "batch", None, "batch.essays.ready", None),
                   "course_code": batch.course_code,
                   "course_language": language_of(&batch.course_code),
                   "student_prompt_ref": null, "class_type": batch.kind,
                   "entity_id": batch.batch_id}),
        )
        .await
    }

    /// Starts a phase unless it is running (a repeated command changes nothing); a phase
    /// that ran before runs again (a retried pipeline). Returns the batch's run number, which
    /// tells a service's repeated request for one run from a new run.
    async fn begin_phase(
        &self,
        tx: &mut Tx,
        batch: &Batch,
        phase: &str,
    ) -> Result<Option<i64>, HandlerError> {
        if batch.current_phase.as_deref() == Some(phase)
            && batch.phase_status.as_deref() == Some("RUNNING")
        {
            return Ok(None);
        }
        let row = tx
            .fetch_optional(
                "UPDATE batches SET current_phase = $2, phase_status = 'RUNNING',
                        phase_runs = phase_runs + 1
                 WHERE batch_id = $1 RETURNING phase_runs",
                params![&batch.batch_id, phase],
            )
            .await?
            .ok_or_else(|| HandlerError::retry("the batch row vanished"))?;
        Ok(Some(row.int("phase_runs")?))
    }

    async fn on_spellcheck_initiate(&self, tx: &mut Tx, batch: &Batch) -> Result<(), HandlerError> {
        if self.begin_phase(tx, batch, "spellcheck").await?.is_none() {
            return Ok(());
        }
        let rows = tx
            .fetch_all(
                "SELECT essay_id, text_storage_id FROM essays WHERE batch_id = $1 AND state = $2 ORDER BY slot_index",
                params![&batch.batch_id, EssayState::ContentReady.as_str()],
            )
            .await?;
        for r in &rows {
            let essay_id = r.text("essay_id")?;
            self.set_state(
                tx,
                &essay_id,
                EssayState::ContentReady,
                EssayEvent::SpellcheckRequested,
            )
            .await?;
            self.emit(
                tx,
                topics::SPELLCHECK_REQUESTED,
                ("essay", &essay_id),
                batch.correlation_id,
                json!({"event_name": "essay.spellcheck.requested", "entity_id": essay_id,
                       "entity_type": "essay", "parent_id": batch.batch_id,
                       "timestamp": utc_timestamp(), "status": "awaiting_spellcheck",
                       "system_metadata": system_metadata(&essay_id, "essay", Some(&batch.batch_id),
                                                          "essay.spellcheck.requested", Some("pending")),
                       "text_storage_id": r.text("text_storage_id")?,
                       "language": language_of(&batch.course_code),
                       "batch_id": batch.batch_id, "essay_id": essay_id}),
            )
            .await?;
        }
        let batch = Batch {
            current_phase: Some("spellcheck".into()),
            phase_status: Some("RUNNING".into()),
            ..batch.clone()
        };
        self.check_phase(tx, &batch).await
    }

    async fn on_spellchecked(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let result: EssayResult = env.data()?;
        let Some(batch) = self.lock_batch(tx, &result.batch_id).await? else {
            return Err(HandlerError::poison(format!(
                "spellcheck result for unknown batch {}",
                result.batch_id
            )));
        };
        let Some(row) = tx
            .fetch_optional(
                "SELECT state FROM essays WHERE essay_id = $1 AND batch_id = $2",
                params![&result.essay_id, &result.batch_id],
            )
            .await?
        else {
            return Err(HandlerError::poison(format!(
                "spellcheck result for unknown essay {}",
                result.essay_id
            )));
        };
        let state = EssayState::parse(&row.text("state")?).unwrap_or(EssayState::AwaitingContent);
        if state != EssayState::SpellcheckRequested {
            return Ok(()); // a late duplicate from a re-sent request: already applied
        }
        let event = if result.status.eq_ignore_ascii_case("completed") {
            EssayEvent::SpellcheckSucceeded
        } else {
            EssayEvent::SpellcheckFailed
        };
        self.set_state(tx, &result.essay_id, state, event).await?;
        tx.execute(
            "UPDATE essays SET spelling_errors = $2, corrected_text_storage_id = $3 WHERE essay_id = $1",
            params![&result.essay_id, result.error_count, result.corrected_text_storage_id.clone()],
        )
        .await?;
        self.check_phase(tx, &batch).await
    }

    /// Starts CJ on the batch's essays; `assignment_id` (the command's) chooses the anchors.
    async fn on_cj_initiate(
        &self,
        tx: &mut Tx,
        batch: &Batch,
        assignment_id: Option<&str>,
    ) -> Result<(), HandlerError> {
        let Some(run) = self.begin_phase(tx, batch, "cj_assessment").await? else {
            return Ok(());
        };
        let rows = tx
            .fetch_all(
                "SELECT essay_id, state, text_storage_id, corrected_text_storage_id, spelling_errors FROM essays
                 WHERE batch_id = $1 AND state IN ($2, $3, $4) ORDER BY slot_index",
                params![
                    &batch.batch_id,
                    EssayState::ContentReady.as_str(),
                    EssayState::Spellchecked.as_str(),
                    EssayState::CjFailed.as_str()
                ],
            )
            .await?;
        let mut essays = Vec::new();
        for r in &rows {
            let essay_id = r.text("essay_id")?;
            let state = EssayState::parse(&r.text("state")?).unwrap_or(EssayState::ContentReady);
            self.set_state(tx, &essay_id, state, EssayEvent::CjRequested)
                .await?;
            // CJ reads the spellchecked text when the spellcheck phase produced one.
            let text = match r.opt_text("corrected_text_storage_id")? {
                Some(corrected) => corrected,
                None => r.text("text_storage_id")?,
            };
            let mut essay = essay_ref(&essay_id, &text);
            essay["spelling_errors"] = json!(r.opt_int("spelling_errors")?);
            essays.push(essay);
        }
        self.emit(
            tx,
            topics::CJ_REQUESTED,
            ("batch", &batch.batch_id),
            batch.correlation_id,
            json!({"event_name": "els.cj_assessment.requested", "entity_id": batch.batch_id,
                   "entity_type": "batch", "parent_id": null, "timestamp": utc_timestamp(),
                   "system_metadata": system_metadata(&batch.batch_id, "batch", None,
                                                      "els.cj_assessment.requested", Some("pending")),
                   "essays_for_cj": essays, "language": language_of(&batch.course_code),
                   "course_code": batch.course_code, "student_prompt_ref": null,
                   "llm_config_overrides": null, "assignment_id": assignment_id,
                   "user_id": batch.user_id, "org_id": null,
                   "batch_id": batch.batch_id, "run": run}),
        )
        .await
    }

    async fn on_cj_result(
        &self,
        tx: &mut Tx,
        batch: &Batch,
        succeeded: bool,
    ) -> Result<(), HandlerError> {
        let event = if succeeded {
            EssayEvent::CjCompleted
        } else {
            EssayEvent::CjFailed
        };
        for (essay_id, state) in self.essays(tx, &batch.batch_id).await? {
            if state == EssayState::CjRequested {
                self.set_state(tx, &essay_id, state, event).await?;
            }
        }
        self.check_phase(tx, batch).await
    }

    /// Emits `batch.phase.outcome` once no essay of the running phase is in flight.
    async fn check_phase(&self, tx: &mut Tx, batch: &Batch) -> Result<(), HandlerError> {
        let (Some(phase), Some("RUNNING")) = (
            batch.current_phase.as_deref(),
            batch.phase_status.as_deref(),
        ) else {
            return Ok(());
        };
        let rows = tx
            .fetch_all(
                "SELECT essay_id, state, text_storage_id, corrected_text_storage_id FROM essays
                 WHERE batch_id = $1 ORDER BY slot_index",
                params![&batch.batch_id],
            )
            .await?;
        let mut processed = Vec::new();
        let mut failed = Vec::new();
        for r in &rows {
            let state = EssayState::parse(&r.text("state")?).unwrap_or(EssayState::AwaitingContent);
            if state.in_flight() {
                return Ok(());
            }
            // Essays without content take part in no phase (a phase command may come from a
            // producer that did not wait for provisioning).
            if matches!(
                state,
                EssayState::ContentFailed
                    | EssayState::ContentMissing
                    | EssayState::AwaitingContent
            ) {
                continue;
            }
            let essay_id = r.text("essay_id")?;
            if state.failed() {
                failed.push(essay_id);
            } else {
                // The text the next phase should read: the corrected one once spellchecked.
                let text = match r.opt_text("corrected_text_storage_id")? {
                    Some(corrected) => corrected,
                    None => r.text("text_storage_id")?,
                };
                processed.push(json!({"essay_id": essay_id, "text_storage_id": text,
                                      "spellcheck_metrics": null}));
            }
        }
        // The original's `BatchStatus` values.
        let status = match (processed.is_empty(), failed.is_empty()) {
            (true, _) => "failed_critically",
            (false, true) => "completed_successfully",
            (false, false) => "completed_with_failures",
        };
        tx.execute(
            "UPDATE batches SET phase_status = 'DONE' WHERE batch_id = $1",
            params![&batch.batch_id],
        )
        .await?;
        self.emit(
            tx,
            topics::PHASE_OUTCOME,
            ("batch", &batch.batch_id),
            batch.correlation_id,
            json!({"batch_id": batch.batch_id, "entity_id": batch.batch_id, "phase_name": phase,
                   "phase_status": status, "processed_essays": processed,
                   "failed_essay_ids": failed, "correlation_id": batch.correlation_id}),
        )
        .await
    }

    /// Per-essay states of a batch, for its owner.
    pub async fn batch_view(
        &self,
        caller: &Caller,
        batch_id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let owner = self
            .db
            .fetch_optional(
                "SELECT user_id FROM batches WHERE batch_id = $1",
                params![batch_id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no batch {batch_id}")))?
            .opt_text("user_id")?;
        caller.must_own(owner.as_deref(), &format!("batch {batch_id}"))?;
        let rows = self
            .db
            .fetch_all(
                "SELECT essay_id, state, filename, spelling_errors, student_id FROM essays
                 WHERE batch_id = $1 ORDER BY slot_index",
                params![batch_id],
            )
            .await?;
        if rows.is_empty() {
            return Err(ApiError::not_found(format!("no batch {batch_id}")));
        }
        let essays = rows
            .iter()
            .map(|r| {
                Ok(
                    json!({"essay_id": r.text("essay_id")?, "state": r.text("state")?,
                               "filename": r.opt_text("filename")?,
                               "spelling_errors": r.opt_int("spelling_errors")?,
                               "student_id": r.opt_text("student_id")?}),
                )
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        Ok(json!({"batch_id": batch_id, "essays": essays}))
    }
}

#[async_trait]
impl Service for EssayLifecycle {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[
            topics::BATCH_ESSAYS_REGISTERED,
            topics::CONTENT_PROVISIONED,
            topics::VALIDATION_FAILED,
            topics::MATCHING_INITIATE,
            topics::ASSOCIATIONS_CONFIRMED,
            topics::SPELLCHECK_INITIATE,
            topics::SPELLCHECK_PHASE_COMPLETED,
            topics::CJ_INITIATE,
            topics::CJ_COMPLETED,
            topics::CJ_FAILED,
        ]
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        match env.event_type.as_str() {
            topics::BATCH_ESSAYS_REGISTERED => return self.on_registered(tx, env).await,
            topics::CONTENT_PROVISIONED | topics::VALIDATION_FAILED => {
                return self.on_content(tx, env).await
            }
            topics::SPELLCHECK_PHASE_COMPLETED => return self.on_spellchecked(tx, env).await,
            _ => {}
        }
        let batch_id = env.batch_id()?;
        let Some(batch) = self.lock_batch(tx, &batch_id).await? else {
            return Err(HandlerError::poison(format!(
                "{} for unknown batch {batch_id}",
                env.event_type
            )));
        };
        match env.event_type.as_str() {
            topics::MATCHING_INITIATE => self.on_matching_initiate(tx, &batch).await,
            topics::ASSOCIATIONS_CONFIRMED => self.on_associations(tx, &batch, env).await,
            topics::SPELLCHECK_INITIATE => self.on_spellcheck_initiate(tx, &batch).await,
            topics::CJ_INITIATE => {
                let assignment = env.data["assignment_id"].as_str();
                self.on_cj_initiate(tx, &batch, assignment).await
            }
            topics::CJ_COMPLETED | topics::CJ_FAILED
                if env.data["run"]
                    .as_i64()
                    .is_some_and(|run| run != batch.phase_runs) =>
            {
                Ok(()) // a late answer to an earlier run of the phase
            }
            topics::CJ_COMPLETED => self.on_cj_result(tx, &batch, true).await,
            topics::CJ_FAILED => self.on_cj_result(tx, &batch, false).await,
            other => {
                tracing::warn!(topic = other, "unexpected topic");
                Ok(())
            }
        }
    }

    fn router(self: Arc<Self>) -> Option<Router> {
        Some(
            Router::new()
                .route("/v1/batches/{batch_id}/essays", get(view))
                .with_state(self),
        )
    }

    async fn background(self: Arc<Self>, shutdown: Shutdown) {
        let tick = essay_common::runtime::tick_for(self.provisioning_timeout);
        essay_common::runtime::every(shutdown, tick, "provisioning deadlines", || {
            self.end_overdue_provisioning()
        })
        .await
    }
}

async fn view(
    State(svc): State<Arc<EssayLifecycle>>,
    caller: Caller,
    Path(batch_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    Ok(Json(svc.batch_view(&caller, &batch_id).await?))
}
