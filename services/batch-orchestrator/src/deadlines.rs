//! How a batch stops waiting: provisioning that ends with nothing to process fails the batch,
//! and a phase without an outcome by its deadline fails the pipeline. Either way the reason is
//! recorded, shown by `GET /v1/batches/{id}`, and (for a pipeline) carried by
//! `batch.pipeline.completed`; a late outcome of a failed phase is then stale and ignored, and
//! the teacher may retry (`is_retry`), which runs the phases that did not complete.

use essay_common::util::now_ms;
use essay_common::Envelope;
use outbox::portable::{params, DbError, Tx};
use outbox::HandlerError;

use crate::{
    finish_pipeline, lock_batch, set_status, BatchOrchestrator, BatchRow, BatchStatus, Ending,
    Phase,
};

impl BatchOrchestrator {
    /// Provisioning completed with no essay (every file failed, or Essay Lifecycle's
    /// provisioning deadline passed before any arrived): the batch fails, and a pipeline
    /// waiting for it fails with it.
    pub(crate) async fn fail_batch(
        &self,
        tx: &mut Tx,
        batch: &BatchRow,
        env: &Envelope,
    ) -> Result<(), HandlerError> {
        let expected = env.data["expected_count"].as_i64().unwrap_or_default();
        let reason = match env.data["timed_out"].as_bool() {
            Some(true) => format!(
                "no essay of the {expected} expected arrived before the provisioning deadline"
            ),
            _ => format!(
                "none of the {expected} essays could be used (every file failed validation)"
            ),
        };
        set_status(tx, &batch.batch_id, BatchStatus::Failed).await?;
        tx.execute(
            "UPDATE batches SET failure_reason = $2 WHERE batch_id = $1",
            params![&batch.batch_id, &reason],
        )
        .await?;
        tracing::info!(batch_id = batch.batch_id, reason, "batch failed");
        let waiting = tx
            .fetch_optional(
                "SELECT 1 AS one FROM pipelines WHERE batch_id = $1 AND status = 'WAITING'",
                params![&batch.batch_id],
            )
            .await?;
        if waiting.is_some() {
            let ending = Ending {
                completed: &[],
                final_status: "failed_critically",
                successful_essays: 0,
                failed_essays: expected.max(0) as usize,
                reason: Some(&reason),
            };
            finish_pipeline(tx, batch, ending).await?;
        }
        Ok(())
    }

    /// Fails every pipeline whose current phase is past its deadline; how many.
    pub async fn fail_overdue_phases(&self) -> Result<usize, DbError> {
        let due = self
            .db
            .fetch_all(
                "SELECT batch_id FROM pipelines WHERE status = 'RUNNING' AND phase_deadline <= $1",
                params![now_ms()],
            )
            .await?;
        let mut failed = 0;
        for row in due {
            let batch_id = row.text("batch_id")?;
            let mut tx = self.db.begin().await?;
            let Some(batch) = lock_batch(&mut tx, &batch_id).await? else {
                continue;
            };
            // Checked again under the batch's lock: the outcome may have arrived meanwhile.
            let Some(p) = tx
                .fetch_optional(
                    "SELECT phases, next_phase FROM pipelines
                     WHERE batch_id = $1 AND status = 'RUNNING' AND phase_deadline <= $2",
                    params![&batch_id, now_ms()],
                )
                .await?
            else {
                continue;
            };
            let phases: Vec<Phase> = serde_json::from_str(&p.text("phases")?).unwrap_or_default();
            let index = p.int("next_phase")? as usize;
            let phase = phases.get(index).map_or("?", |p| p.as_str());
            let reason = format!(
                "{phase} reported no outcome within {} s",
                self.phase_timeout.as_secs()
            );
            let ran: Vec<&str> = phases.iter().take(index).map(|p| p.as_str()).collect();
            tracing::warn!(batch_id, reason, "phase timed out");
            let ending = Ending {
                completed: &ran,
                final_status: "failed_critically",
                successful_essays: 0,
                failed_essays: batch.essay_count(),
                reason: Some(&reason),
            };
            finish_pipeline(&mut tx, &batch, ending)
                .await
                .map_err(|e| DbError::Invalid(e.to_string()))?;
            tx.commit().await?;
            failed += 1;
        }
        Ok(failed)
    }
}
