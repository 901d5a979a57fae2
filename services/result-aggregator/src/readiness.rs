//! Results ready means ready. `batch.pipeline.completed` and the results of the phases it
//! names arrive on different topics with no order between them, so the completion alone says
//! nothing about what this service has. A completed pipeline is announced
//! (`ras.batch.results.ready`) once, when for every phase it completed the phase outcome is
//! here and so are its results: a spelling count for every essay the spellcheck outcome
//! processed, the CJ rankings for `cj_assessment`. A failed pipeline is announced at once with
//! what there is. If results are still missing `RESULTS_DEADLINE_SECS` after the completion,
//! the announcement goes out anyway and names what is missing (also in the results view).

use essay_common::topics;
use essay_common::util::{now_ms, utc_timestamp};
use essay_common::wire::system_metadata;
use outbox::portable::{params, DbError, Tx};
use outbox::HandlerError;
use serde_json::json;
use uuid::Uuid;

use crate::{ResultAggregator, EVENTS};

impl ResultAggregator {
    /// What the batch's completed pipeline produced and this service does not have yet.
    async fn missing(
        &self,
        tx: &mut Tx,
        batch_id: &str,
        phases: &[String],
    ) -> Result<Vec<String>, DbError> {
        let mut missing = Vec::new();
        for phase in phases {
            let outcome = tx
                .fetch_optional(
                    "SELECT status FROM ra_phases WHERE batch_id = $1 AND phase = $2",
                    params![batch_id, phase],
                )
                .await?;
            if outcome.is_none() {
                missing.push(format!("the {phase} phase outcome"));
                continue;
            }
            match phase.as_str() {
                "spellcheck" => {
                    let row = tx
                        .fetch_optional(
                            "SELECT b.spellcheck_expected AS expected,
                                    (SELECT COUNT(*) FROM ra_essays e
                                     WHERE e.batch_id = b.batch_id AND e.spelling_errors IS NOT NULL) AS have
                             FROM ra_batches b WHERE b.batch_id = $1",
                            params![batch_id],
                        )
                        .await?
                        .expect("the batch row exists");
                    let (expected, have) =
                        (row.opt_int("expected")?.unwrap_or(0), row.int("have")?);
                    if have < expected {
                        missing.push(format!("spellcheck results ({have} of {expected})"));
                    }
                }
                "cj_assessment" => {
                    let row = tx
                        .fetch_optional(
                            "SELECT cj_results FROM ra_batches WHERE batch_id = $1",
                            params![batch_id],
                        )
                        .await?
                        .expect("the batch row exists");
                    if row.int("cj_results")? == 0 {
                        missing.push("the CJ rankings".into());
                    }
                }
                _ => {}
            }
        }
        Ok(missing)
    }

    /// Announces the batch's completed pipeline if its results are here (or `force`, after the
    /// deadline: then what is missing is named).
    pub(crate) async fn announce_if_ready(
        &self,
        tx: &mut Tx,
        batch_id: &str,
        correlation: Uuid,
        force: bool,
    ) -> Result<bool, HandlerError> {
        let Some(row) = tx
            .fetch_optional(
                "SELECT final_status, pipeline_phases FROM ra_batches
                 WHERE batch_id = $1 AND awaiting_since IS NOT NULL",
                params![batch_id],
            )
            .await?
        else {
            return Ok(false);
        };
        let status = match row.opt_text("final_status")?.as_deref() {
            Some("failed_critically") => "FAILED",
            _ => "COMPLETED",
        };
        let phases: Vec<String> = row
            .opt_text("pipeline_phases")?
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or_default();
        let missing = if status == "FAILED" {
            Vec::new()
        } else {
            self.missing(tx, batch_id, &phases).await?
        };
        if !missing.is_empty() && !force {
            return Ok(false);
        }
        if !missing.is_empty() {
            tracing::warn!(batch_id, ?missing, "results announced without everything");
        }
        tx.execute(
            "UPDATE ra_batches SET awaiting_since = NULL, results_ready_sent = results_ready_sent + 1,
                    missing = $2, updated_at = $3, status = $4
             WHERE batch_id = $1",
            params![
                batch_id,
                (!missing.is_empty()).then(|| json!(missing).to_string()),
                now_ms(),
                status
            ],
        )
        .await?;
        let ranked = tx
            .fetch_optional(
                "SELECT COUNT(*) AS n FROM ra_essays WHERE batch_id = $1 AND essay_rank IS NOT NULL",
                params![batch_id],
            )
            .await?
            .map(|r| r.int("n"))
            .transpose()?
            .unwrap_or(0);
        let b = tx
            .fetch_optional(
                "SELECT user_id, expected_count, final_status, pipeline_seconds, successful_essays
                 FROM ra_batches WHERE batch_id = $1",
                params![batch_id],
            )
            .await?
            .expect("the batch row exists");
        let final_status = b
            .opt_text("final_status")?
            .unwrap_or_else(|| "completed_successfully".into());
        let mut phase_results = serde_json::Map::new();
        for p in tx
            .fetch_all(
                "SELECT phase, status, completed_count, failed_count FROM ra_phases
                 WHERE batch_id = $1",
                params![batch_id],
            )
            .await?
        {
            let phase = p.text("phase")?;
            let failed = p.text("status")? == "FAILED_CRITICALLY";
            phase_results.insert(
                phase.clone(),
                json!({"phase_name": phase, "status": if failed { "failed" } else { "completed" },
                       "completed_count": p.opt_int("completed_count")?.unwrap_or(0),
                       "failed_count": p.opt_int("failed_count")?.unwrap_or(0)}),
            );
        }
        // `BatchResultsReadyV1`; `ranked_essays` and `missing` are this platform's extras.
        let e = EVENTS.event(
            topics::RESULTS_READY,
            ("batch", batch_id),
            correlation,
            &json!({"event_name": "batch.results.ready", "entity_id": batch_id,
                    "entity_type": "batch", "parent_id": null, "timestamp": utc_timestamp(),
                    "status": final_status,
                    "system_metadata": system_metadata(batch_id, "batch", None, "results_ready", None),
                    "batch_id": batch_id, "user_id": b.opt_text("user_id")?,
                    "total_essays": b.opt_int("expected_count")?.unwrap_or(0),
                    "completed_essays": b.opt_int("successful_essays")?.unwrap_or(ranked),
                    "phase_results": phase_results, "overall_status": final_status,
                    "processing_duration_seconds": b.float("pipeline_seconds").unwrap_or(0.0),
                    "ranked_essays": ranked, "missing": missing, "pipeline_status": status}),
        )?;
        tx.enqueue(&e).await?;
        Ok(true)
    }

    /// Announces every completed pipeline whose results are overdue; how many.
    pub async fn announce_overdue(&self) -> Result<usize, DbError> {
        let due = self
            .db
            .fetch_all(
                "SELECT batch_id, pipeline_correlation FROM ra_batches WHERE awaiting_since <= $1",
                params![now_ms() - self.results_deadline.as_millis() as i64],
            )
            .await?;
        let mut n = 0;
        for row in due {
            let batch_id = row.text("batch_id")?;
            let mut tx = self.db.begin().await?;
            let correlation = row
                .opt_text("pipeline_correlation")?
                .and_then(|c| Uuid::parse_str(&c).ok())
                .unwrap_or_default();
            let sent = self
                .announce_if_ready(&mut tx, &batch_id, correlation, true)
                .await
                .map_err(|e| DbError::Invalid(e.to_string()))?;
            tx.commit().await?;
            n += usize::from(sent);
        }
        Ok(n)
    }
}
