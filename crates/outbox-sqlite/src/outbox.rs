//! The write path on SQLite: events inserted in the caller's transaction.

use std::sync::Arc;

use outbox_core::{EnqueueOutcome, NewEvent, TableMetrics, WakeSignal};
use sqlx::{Sqlite, Transaction};

use crate::{SqliteOutboxError, NOW_MS};

/// Enqueues events into `event_outbox`. Cheap to clone.
#[derive(Clone, Default)]
pub struct SqliteOutbox {
    wake: Option<WakeSignal>,
    metrics: Option<Arc<TableMetrics>>,
}

impl SqliteOutbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wake this relay when [`SqliteOutbox::commit`] commits.
    pub fn with_wake_signal(mut self, wake: WakeSignal) -> Self {
        self.wake = Some(wake);
        self
    }

    pub fn with_metrics(mut self, metrics: TableMetrics) -> Self {
        self.metrics = Some(Arc::new(metrics));
        self
    }

    /// Inserts `event` in the caller's transaction; it commits or rolls back with it.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        event: &NewEvent,
    ) -> Result<EnqueueOutcome, SqliteOutboxError> {
        let event_id = event.event_id().to_string();
        event
            .check()
            .map_err(|reason| SqliteOutboxError::InvalidEvent {
                event_id: event_id.clone(),
                reason,
            })?;
        if let Some(key) = event.idempotency_key() {
            let admitted = sqlx::query(&format!(
                "INSERT INTO event_outbox_idempotency (idempotency_key, event_id, created_at)
                 VALUES (?, ?, {NOW_MS}) ON CONFLICT DO NOTHING"
            ))
            .bind(key)
            .bind(&event_id)
            .execute(&mut **tx)
            .await?;
            if admitted.rows_affected() == 0 {
                return Ok(EnqueueOutcome::Duplicate);
            }
        }
        let headers = serde_json::to_string(event.headers()).map_err(|e| {
            SqliteOutboxError::InvalidEvent {
                event_id: event_id.clone(),
                reason: format!("headers are not serialisable: {e}"),
            }
        })?;
        let agg = event.aggregate();
        let seq: Option<i64> = sqlx::query_scalar(&format!(
            "INSERT INTO event_outbox (event_id, aggregate_type, aggregate_id, partition_no,
                 event_type, topic, message_key, headers, payload, idempotency_key, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {NOW_MS})
             ON CONFLICT DO NOTHING RETURNING seq"
        ))
        .bind(&event_id)
        .bind(agg.kind())
        .bind(agg.id())
        .bind(i64::from(agg.partition()))
        .bind(event.event_type())
        .bind(event.topic().as_str())
        .bind(event.key())
        .bind(headers)
        .bind(event.payload().as_ref())
        .bind(event.idempotency_key())
        .fetch_optional(&mut **tx)
        .await?;
        Ok(match seq {
            Some(seq) => {
                if let Some(m) = &self.metrics {
                    m.enqueued(1);
                }
                EnqueueOutcome::Inserted { seq }
            }
            None => EnqueueOutcome::Duplicate,
        })
    }

    /// Inserts many events in order (SQLite runs them in-process, so one statement each
    /// costs microseconds).
    pub async fn enqueue_all(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        events: &[NewEvent],
    ) -> Result<Vec<EnqueueOutcome>, SqliteOutboxError> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            out.push(self.enqueue(tx, e).await?);
        }
        Ok(out)
    }

    /// Commits `tx`, then wakes the in-process relay (if one was attached).
    pub async fn commit(&self, tx: Transaction<'_, Sqlite>) -> Result<(), SqliteOutboxError> {
        tx.commit().await?;
        self.wake();
        Ok(())
    }

    pub fn wake(&self) {
        if let Some(w) = &self.wake {
            w.wake();
        }
    }
}
