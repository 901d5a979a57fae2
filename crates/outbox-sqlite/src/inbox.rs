//! The consumer inbox on SQLite (see `outbox_postgres::PgInboxHandler` for the pattern).

use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{
    ConsumerMetrics, EventId, Handled, HandlerError, IncomingMessage, MessageHandler, WakeSignal,
};
use sqlx::{Sqlite, SqlitePool, Transaction};

use crate::{SqliteOutboxError, NOW_MS};

/// The `event_inbox` table of one SQLite database.
#[derive(Clone)]
pub struct SqliteInbox {
    pool: SqlitePool,
}

impl SqliteInbox {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Records that `consumer` processes `event_id` in the caller's transaction; `false` when
    /// it was processed before.
    pub async fn try_begin(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        consumer: &str,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<bool, SqliteOutboxError> {
        let done = sqlx::query(&format!(
            "INSERT INTO event_inbox (consumer, event_id, event_type, topic, partition_no,
                                      msg_offset, processed_at)
             VALUES (?, ?, ?, ?, ?, ?, {NOW_MS}) ON CONFLICT DO NOTHING"
        ))
        .bind(consumer)
        .bind(event_id.to_string())
        .bind(message.event_type())
        .bind(&message.topic)
        .bind(message.partition)
        .bind(message.offset)
        .execute(&mut **tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes up to `limit` inbox rows older than `retention`.
    pub async fn purge_older_than(
        &self,
        retention: Duration,
        limit: usize,
    ) -> Result<u64, SqliteOutboxError> {
        let done = sqlx::query(&format!(
            "DELETE FROM event_inbox WHERE rowid IN (
                 SELECT rowid FROM event_inbox WHERE processed_at < {NOW_MS} - ?
                 ORDER BY processed_at LIMIT ?)"
        ))
        .bind(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
        .bind(limit as i64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// An event handed to a [`SqliteHandler`].
pub struct SqliteInboxEvent<'a> {
    pub event_id: EventId,
    pub message: &'a IncomingMessage,
}

/// A consumer's business logic on SQLite: change state (and enqueue events) in `tx`.
#[async_trait]
pub trait SqliteHandler: Send + Sync + 'static {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        event: &SqliteInboxEvent<'_>,
    ) -> Result<(), HandlerError>;
}

/// Wraps a [`SqliteHandler`] with the inbox: begin, record `(consumer, event_id)`, run the
/// handler, commit; a duplicate skips the handler.
pub struct SqliteInboxHandler<H> {
    pool: SqlitePool,
    inbox: SqliteInbox,
    consumer: String,
    handler: H,
    metrics: Option<ConsumerMetrics>,
    wake: Option<WakeSignal>,
}

impl<H: SqliteHandler> SqliteInboxHandler<H> {
    pub fn new(pool: SqlitePool, consumer: impl Into<String>, handler: H) -> Self {
        Self {
            inbox: SqliteInbox::new(pool.clone()),
            pool,
            consumer: consumer.into(),
            handler,
            metrics: None,
            wake: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ConsumerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn with_wake_signal(mut self, wake: WakeSignal) -> Self {
        self.wake = Some(wake);
        self
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }
}

#[async_trait]
impl<H: SqliteHandler> MessageHandler for SqliteInboxHandler<H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        let event_id = message.event_id()?;
        let mut tx = crate::begin(&self.pool)
            .await
            .map_err(HandlerError::retry)?;
        let first = self
            .inbox
            .try_begin(&mut tx, &self.consumer, event_id, message)
            .await
            .map_err(HandlerError::retry)?;
        if !first {
            tx.rollback().await.map_err(HandlerError::retry)?;
            if let Some(m) = &self.metrics {
                m.duplicate();
            }
            return Ok(Handled::Duplicate);
        }
        let event = SqliteInboxEvent { event_id, message };
        match self.handler.handle(&mut tx, &event).await {
            Ok(()) => {
                tx.commit().await.map_err(HandlerError::retry)?;
                if let Some(w) = &self.wake {
                    w.wake();
                }
                if let Some(m) = &self.metrics {
                    m.processed();
                }
                Ok(Handled::Processed)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                if let Some(m) = &self.metrics {
                    m.handler_failure();
                }
                Err(e)
            }
        }
    }
}
