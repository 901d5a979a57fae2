//! Result Aggregator: builds each batch's result view from registration, slot, spellcheck, CJ
//! and phase events, serves it over HTTP, and announces `ras.batch.results.ready` once per
//! completed pipeline, when the results that pipeline produced are here ([`readiness`]).
//!
//! Events of one batch arrive on different topics in any order, so every write is an upsert
//! of the fields that event owns; nothing assumes the registration came first.
//!
//! `GET /v1/batches/{batch_id}/results` (the batch's owner, `X-User-ID`) -> batch status,
//! phase outcomes, and per essay: rank, score, standard error, grade, spelling errors.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use essay_common::identity::Caller;
use essay_common::util::{now_ms, parse_uuid, ApiError};
use essay_common::{topics, Envelope, EventFactory, Service, Shutdown};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::Deserialize;
use serde_json::json;

pub mod csv;
pub mod readiness;

pub const NAME: &str = "result_aggregator_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

/// How long results may lag behind their pipeline's completion before the announcement goes
/// out with what is missing (unless `RESULTS_DEADLINE_SECS` says otherwise).
pub const DEFAULT_RESULTS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ra_batches (
    batch_id TEXT PRIMARY KEY,
    course_code TEXT,
    expected_count BIGINT,
    status TEXT NOT NULL,
    results_ready_sent BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS ra_essays (
    essay_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    filename TEXT,
    spelling_errors BIGINT,
    word_count BIGINT,
    essay_rank BIGINT,
    score DOUBLE PRECISION,
    standard_error DOUBLE PRECISION,
    grade TEXT,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ra_essays_by_batch ON ra_essays (batch_id);
CREATE TABLE IF NOT EXISTS ra_phases (
    batch_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (batch_id, phase)
);
";

#[derive(Clone)]
pub struct ResultAggregator {
    db: ServiceDb,
    results_deadline: std::time::Duration,
}

impl ResultAggregator {
    pub async fn open(db: ServiceDb) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        // Added after the first release: a database made by it gains them.
        for (column, declaration) in [
            ("user_id", "TEXT"),
            ("pipeline_phases", "TEXT"),
            ("awaiting_since", "BIGINT"),
            ("spellcheck_expected", "BIGINT"),
            ("cj_results", "BIGINT NOT NULL DEFAULT 0"),
            ("missing", "TEXT"),
            ("pipeline_correlation", "TEXT"),
            ("pipeline_event", "TEXT"),
            ("final_status", "TEXT"),
            ("pipeline_seconds", "DOUBLE PRECISION"),
            ("successful_essays", "BIGINT"),
        ] {
            db.add_column("ra_batches", column, declaration).await?;
        }
        db.add_column("ra_phases", "completed_count", "BIGINT")
            .await?;
        db.add_column("ra_batches", "calibration", "TEXT").await?;
        db.add_column("ra_batches", "judge", "TEXT").await?;
        for (column, declaration) in [
            ("normalized_score", "DOUBLE PRECISION"),
            ("grade_confidence", "DOUBLE PRECISION"),
            ("confidence_label", "TEXT"),
            ("student_id", "TEXT"),
            ("student_name", "TEXT"),
            ("corrections", "TEXT"),
            ("grade_probabilities", "TEXT"),
        ] {
            db.add_column("ra_essays", column, declaration).await?;
        }
        db.add_column("ra_phases", "failed_count", "BIGINT").await?;
        Ok(Self {
            db,
            results_deadline: DEFAULT_RESULTS_DEADLINE,
        })
    }

    /// How long to wait for a completed pipeline's results before announcing what is there.
    pub fn with_results_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.results_deadline = deadline;
        self
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    async fn ensure_batch(&self, tx: &mut Tx, batch_id: &str) -> Result<(), DbError> {
        tx.execute(
            "INSERT INTO ra_batches (batch_id, status, updated_at) VALUES ($1, 'PROCESSING', $2)
             ON CONFLICT (batch_id) DO NOTHING",
            params![batch_id, now_ms()],
        )
        .await?;
        Ok(())
    }

    /// Sets the given columns of an essay, creating its row if this event came first.
    async fn upsert_essay(
        &self,
        tx: &mut Tx,
        essay_id: &str,
        batch_id: &str,
        sets: &[(&str, outbox::portable::Value)],
    ) -> Result<(), DbError> {
        tx.execute(
            "INSERT INTO ra_essays (essay_id, batch_id, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (essay_id) DO NOTHING",
            params![essay_id, batch_id, now_ms()],
        )
        .await?;
        for (column, value) in sets {
            // Column names come from this file, never from input.
            let sql =
                format!("UPDATE ra_essays SET {column} = $2, updated_at = $3 WHERE essay_id = $1");
            tx.execute(&sql, &[essay_id.into(), value.clone(), now_ms().into()])
                .await?;
        }
        Ok(())
    }

    /// The batch's results, for its owner.
    pub async fn results(
        &self,
        caller: &Caller,
        batch_id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let batch = self
            .db
            .fetch_optional(
                "SELECT status, course_code, expected_count, user_id, missing, calibration, judge
                 FROM ra_batches
                 WHERE batch_id = $1",
                params![batch_id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no batch {batch_id}")))?;
        caller.must_own(
            batch.opt_text("user_id")?.as_deref(),
            &format!("batch {batch_id}"),
        )?;
        let phases = self
            .db
            .fetch_all(
                "SELECT phase, status FROM ra_phases WHERE batch_id = $1 ORDER BY phase",
                params![batch_id],
            )
            .await?;
        let mut phase_map = serde_json::Map::new();
        for p in &phases {
            phase_map.insert(p.text("phase")?, p.text("status")?.into());
        }
        let essays = self
            .db
            .fetch_all(
                "SELECT essay_id, filename, spelling_errors, word_count, essay_rank, score, standard_error, grade,
                        normalized_score, grade_confidence, confidence_label, student_id, student_name,
                        corrections, grade_probabilities
                 FROM ra_essays WHERE batch_id = $1
                 ORDER BY CASE WHEN essay_rank IS NULL THEN 1 ELSE 0 END, essay_rank, filename",
                params![batch_id],
            )
            .await?;
        let essays = essays
            .iter()
            .map(|r| {
                Ok(json!({
                    "essay_id": r.text("essay_id")?, "filename": r.opt_text("filename")?,
                    "rank": r.opt_int("essay_rank")?,
                    "score": r.float("score").ok(), "standard_error": r.float("standard_error").ok(),
                    "grade": r.opt_text("grade")?, "spelling_errors": r.opt_int("spelling_errors")?,
                    "word_count": r.opt_int("word_count")?,
                    "normalized_score": r.float("normalized_score").ok(),
                    "grade_confidence": r.float("grade_confidence").ok(),
                    "confidence_label": r.opt_text("confidence_label")?,
                    "student_id": r.opt_text("student_id")?,
                    "student_name": r.opt_text("student_name")?,
                    "corrections": r.opt_text("corrections")?
                        .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok()),
                    "grade_probabilities": r.opt_text("grade_probabilities")?
                        .and_then(|c| serde_json::from_str::<serde_json::Value>(&c).ok()),
                }))
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        Ok(json!({
            "batch_id": batch_id, "status": batch.text("status")?,
            "course_code": batch.opt_text("course_code")?,
            "expected_essay_count": batch.opt_int("expected_count")?,
            "missing_results": batch.opt_text("missing")?
                .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok()),
            "judge": batch.opt_text("judge")?,
            // Without anchors a grade places an essay within its batch, not on a fixed scale.
            "grades": match batch.opt_text("calibration")?.as_deref() {
                Some("batch_relative") => Some("relative to this batch (no anchor essays)"),
                Some(_) => Some("calibrated against anchor essays"),
                None => None,
            },
            "phases": phase_map, "essays": essays,
        }))
    }
}

/// `EssayResultV1`: the original's names (`bt_score`, `letter_grade`); the standard error is
/// this platform's extra.
#[derive(Deserialize)]
struct EssayResult {
    essay_id: String,
    rank: i64,
    #[serde(rename = "bt_score")]
    score: f64,
    #[serde(default)]
    standard_error: Option<f64>,
    #[serde(rename = "letter_grade")]
    grade: String,
    /// Anchor essays are compared with the batch but are not its essays.
    #[serde(default)]
    is_anchor: bool,
    #[serde(default)]
    normalized_score: Option<f64>,
    #[serde(default)]
    confidence_score: Option<f64>,
    #[serde(default)]
    confidence_label: Option<String>,
    #[serde(default)]
    grade_probabilities: Option<serde_json::Value>,
}

#[async_trait]
impl Service for ResultAggregator {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[
            topics::BATCH_ESSAYS_REGISTERED,
            topics::SLOT_ASSIGNED,
            topics::SPELLCHECK_RESULTS,
            topics::ASSESSMENT_RESULT_PUBLISHED,
            topics::PHASE_OUTCOME,
            topics::PIPELINE_COMPLETED,
            topics::ASSOCIATIONS_CONFIRMED,
        ]
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let batch_id = env.batch_id()?;
        self.ensure_batch(tx, &batch_id).await?;
        match env.event_type.as_str() {
            topics::BATCH_ESSAYS_REGISTERED => {
                let essay_ids: Vec<String> = serde_json::from_value(env.data["essay_ids"].clone())
                    .map_err(|e| HandlerError::poison(format!("essay_ids: {e}")))?;
                tx.execute(
                    "UPDATE ra_batches SET course_code = $2, expected_count = $3, user_id = $4
                     WHERE batch_id = $1",
                    params![
                        &batch_id,
                        env.data["course_code"].as_str(),
                        essay_ids.len(),
                        env.data["user_id"].as_str()
                    ],
                )
                .await?;
                for id in &essay_ids {
                    self.upsert_essay(tx, id, &batch_id, &[]).await?;
                }
            }
            topics::SLOT_ASSIGNED => {
                let essay_id = env.text("essay_id")?;
                let filename = env.data["original_file_name"].as_str();
                self.upsert_essay(tx, &essay_id, &batch_id, &[("filename", filename.into())])
                    .await?;
            }
            topics::SPELLCHECK_RESULTS => {
                // `SpellcheckResultV1`: the essay is `entity_id`.
                let essay_id = env.text("entity_id")?;
                let corrections = env.data["corrections_made"].as_i64();
                let words = env.data["correction_metrics"]["word_count"].as_i64();
                self.upsert_essay(
                    tx,
                    &essay_id,
                    &batch_id,
                    &[
                        ("spelling_errors", corrections.into()),
                        ("word_count", words.into()),
                        // The corrections themselves, when the spellchecker lists them.
                        (
                            "corrections",
                            env.data
                                .get("corrections")
                                .filter(|c| c.is_array())
                                .map(|c| c.to_string())
                                .into(),
                        ),
                    ],
                )
                .await?;
            }
            topics::ASSESSMENT_RESULT_PUBLISHED => {
                let results: Vec<EssayResult> =
                    serde_json::from_value(env.data["essay_results"].clone())
                        .map_err(|e| HandlerError::poison(format!("essay_results: {e}")))?;
                for r in results.into_iter().filter(|r| !r.is_anchor) {
                    self.upsert_essay(
                        tx,
                        &r.essay_id,
                        &batch_id,
                        &[
                            ("essay_rank", r.rank.into()),
                            ("score", r.score.into()),
                            ("standard_error", r.standard_error.into()),
                            ("grade", r.grade.into()),
                            ("normalized_score", r.normalized_score.into()),
                            ("grade_confidence", r.confidence_score.into()),
                            ("confidence_label", r.confidence_label.into()),
                            (
                                "grade_probabilities",
                                r.grade_probabilities
                                    .filter(|p| p.is_object())
                                    .map(|p| p.to_string())
                                    .into(),
                            ),
                        ],
                    )
                    .await?;
                }
                tx.execute(
                    "UPDATE ra_batches SET cj_results = 1, judge = $2, calibration = $3
                     WHERE batch_id = $1",
                    params![
                        &batch_id,
                        env.data["model_used"].as_str(),
                        env.data["assessment_metadata"]["calibration_method"].as_str()
                    ],
                )
                .await?;
            }
            topics::PHASE_OUTCOME => {
                // The view shows the original's `BatchStatus` in capitals, as it always has.
                let phase = env.text("phase_name")?;
                let status = env.text("phase_status")?.to_uppercase();
                let processed = env.data["processed_essays"].as_array().map_or(0, Vec::len);
                let failed = env.data["failed_essay_ids"].as_array().map_or(0, Vec::len);
                tx.execute(
                    "INSERT INTO ra_phases (batch_id, phase, status, completed_count, failed_count)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (batch_id, phase) DO UPDATE SET status = excluded.status,
                         completed_count = excluded.completed_count,
                         failed_count = excluded.failed_count",
                    params![&batch_id, &phase, status, processed, failed],
                )
                .await?;
                if phase == "spellcheck" {
                    let processed = env.data["processed_essays"]
                        .as_array()
                        .map_or(0, |a| a.len());
                    tx.execute(
                        "UPDATE ra_batches SET spellcheck_expected = $2 WHERE batch_id = $1",
                        params![&batch_id, processed],
                    )
                    .await?;
                }
            }
            topics::PIPELINE_COMPLETED => {
                // Announced once what this pipeline produced is here ([`readiness`]).
                // `BatchPipelineCompletedV1.final_status` (this platform's earlier `status`
                // where it is missing).
                let final_status = match env.data["final_status"].as_str() {
                    Some(f) => f.to_owned(),
                    None if env.data["status"].as_str() == Some("FAILED") => {
                        "failed_critically".into()
                    }
                    None => "completed_successfully".into(),
                };
                let phases = env.data["completed_phases"].clone();
                // The same completion again (a redelivery past the inbox) changes nothing. The
                // view says COMPLETED or FAILED once the results are announced, not before.
                tx.execute(
                    "UPDATE ra_batches SET status = 'AWAITING_RESULTS', pipeline_phases = $2,
                            awaiting_since = $3, updated_at = $3, pipeline_correlation = $4,
                            pipeline_event = $5, final_status = $6, pipeline_seconds = $7,
                            successful_essays = $8
                     WHERE batch_id = $1
                       AND (pipeline_event IS NULL OR pipeline_event <> $5)",
                    params![
                        &batch_id,
                        phases.to_string(),
                        now_ms(),
                        env.correlation_id.to_string(),
                        env.event_id.to_string(),
                        final_status,
                        env.data["processing_duration_seconds"].as_f64(),
                        env.data["successful_essay_count"].as_i64()
                    ],
                )
                .await?;
            }
            topics::ASSOCIATIONS_CONFIRMED => {
                // The students the teacher confirmed; the name where the confirmation has it.
                for a in env.data["associations"].as_array().into_iter().flatten() {
                    let Some(essay_id) = a["essay_id"].as_str() else {
                        continue;
                    };
                    self.upsert_essay(
                        tx,
                        essay_id,
                        &batch_id,
                        &[
                            ("student_id", a["student_id"].as_str().into()),
                            ("student_name", a["student_name"].as_str().into()),
                        ],
                    )
                    .await?;
                }
            }
            other => tracing::warn!(topic = other, "unexpected topic"),
        }
        self.announce_if_ready(tx, &batch_id, env.correlation_id, false)
            .await?;
        Ok(())
    }

    fn router(self: Arc<Self>) -> Option<Router> {
        Some(
            Router::new()
                .route("/v1/batches/{batch_id}/results", get(results))
                .route("/v1/batches/{batch_id}/results.csv", get(results_csv))
                .with_state(self),
        )
    }

    async fn background(self: Arc<Self>, shutdown: Shutdown) {
        let tick = essay_common::runtime::tick_for(self.results_deadline);
        essay_common::runtime::every(shutdown, tick, "results deadlines", || {
            self.announce_overdue()
        })
        .await
    }
}

/// The results as CSV, one essay per row, for a spreadsheet.
async fn results_csv(
    State(svc): State<Arc<ResultAggregator>>,
    caller: Caller,
    Path(batch_id): Path<String>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    let view = svc.results(&caller, &batch_id).await?;
    let disposition = format!("attachment; filename=\"results-{batch_id}.csv\"");
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/csv; charset=utf-8".to_owned(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        csv::of(&view),
    ))
}

async fn results(
    State(svc): State<Arc<ResultAggregator>>,
    caller: Caller,
    Path(batch_id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    Ok(Json(svc.results(&caller, &batch_id).await?))
}
