//! The provisioning deadline: a batch does not wait for its files forever. When the deadline
//! passes, the slots still waiting become `CONTENT_MISSING` and provisioning completes with
//! what arrived (`timed_out: true`, `provisioned_count` below `expected_count`), the
//! original's intent; Batch Orchestrator goes on with those essays, or fails the batch with a
//! reason when none arrived.

use essay_common::util::now_ms;
use outbox::portable::{params, DbError};

use crate::state::{EssayEvent, EssayState};
use crate::EssayLifecycle;

impl EssayLifecycle {
    /// Ends provisioning of every batch past its deadline; how many.
    pub async fn end_overdue_provisioning(&self) -> Result<usize, DbError> {
        let due = self
            .db
            .fetch_all(
                "SELECT batch_id FROM batches
                 WHERE provisioning_completed = 0 AND provisioning_deadline <= $1",
                params![now_ms()],
            )
            .await?;
        let mut ended = 0;
        for row in due {
            let batch_id = row.text("batch_id")?;
            let mut tx = self.db.begin().await?;
            let batch = match self.lock_batch(&mut tx, &batch_id).await {
                Ok(Some(b)) if !b.provisioning_completed => b,
                Ok(_) => continue,
                Err(e) => return Err(DbError::Invalid(e.to_string())),
            };
            let result: Result<(), outbox::HandlerError> = async {
                let mut essays = self.essays(&mut tx, &batch_id).await?;
                for (essay_id, state) in essays.iter_mut() {
                    if *state == EssayState::AwaitingContent {
                        *state = self
                            .set_state(&mut tx, essay_id, *state, EssayEvent::ProvisioningDeadline)
                            .await?;
                    }
                }
                let missing = essays
                    .iter()
                    .filter(|(_, s)| *s == EssayState::ContentMissing)
                    .count();
                tracing::warn!(batch_id, missing, "provisioning deadline passed");
                self.complete_provisioning(&mut tx, &batch, &essays, true)
                    .await
            }
            .await;
            result.map_err(|e| DbError::Invalid(e.to_string()))?;
            tx.commit().await?;
            ended += 1;
        }
        Ok(ended)
    }
}
