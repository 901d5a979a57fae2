//! The consumer inbox on PostgreSQL: a consumer's effects and its record of having processed
//! an event commit together, so each event takes effect once however often it is delivered.
//!
//! ```no_run
//! use outbox_core::HandlerError;
//! use outbox_postgres::{InboxEvent, PgHandler, PgInboxHandler};
//! use sqlx::{Postgres, Transaction};
//!
//! struct CountEssays;
//!
//! #[async_trait::async_trait]
//! impl PgHandler for CountEssays {
//!     async fn handle(
//!         &self,
//!         tx: &mut Transaction<'_, Postgres>,
//!         event: &InboxEvent<'_>,
//!     ) -> Result<(), HandlerError> {
//!         let data: serde_json::Value = serde_json::from_slice(&event.message.payload)
//!             .map_err(|e| HandlerError::poison(format!("not JSON: {e}")))?;
//!         sqlx::query("UPDATE batches SET essays = essays + 1 WHERE id = $1")
//!             .bind(data["batch_id"].as_str())
//!             .execute(&mut **tx)
//!             .await
//!             .map_err(HandlerError::retry)?;
//!         // ...and enqueue follow-up events with PgOutbox::enqueue(tx, ...) here.
//!         Ok(())
//!     }
//! }
//! # fn wire(pool: sqlx::PgPool) {
//! let handler = PgInboxHandler::new(pool, outbox_postgres::Schema::default(), "essay_counter", CountEssays);
//! // hand `handler` to a consumer runner, e.g. outbox_kafka::KafkaConsumer::run
//! # }
//! ```

use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{
    ConsumerMetrics, EventId, Handled, HandlerError, IncomingMessage, MessageHandler, WakeSignal,
};
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::OutboxError;
use crate::Schema;

/// The `event_inbox` table of one schema.
#[derive(Clone)]
pub struct PgInbox {
    pool: PgPool,
    insert: String,
    purge: String,
}

impl PgInbox {
    pub fn new(pool: PgPool, schema: &Schema) -> Self {
        let t = schema.table("event_inbox");
        Self {
            pool,
            insert: format!(
                "INSERT INTO {t} (consumer, event_id, event_type, topic, partition_no, msg_offset)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE (consumer, event_id) IN (
                     SELECT consumer, event_id FROM {t}
                     WHERE processed_at < now() - $1 * interval '1 millisecond'
                     ORDER BY processed_at LIMIT $2)"
            ),
        }
    }

    /// Records that `consumer` processes `event_id`, in the caller's transaction. Returns
    /// `false` when it was processed before (the caller should skip its effects). A
    /// concurrent first delivery makes this wait until that one commits or rolls back.
    pub async fn try_begin(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        consumer: &str,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<bool, OutboxError> {
        let done = sqlx::query(&self.insert)
            .bind(consumer)
            .bind(event_id.as_uuid())
            .bind(message.event_type())
            .bind(&message.topic)
            .bind(message.partition)
            .bind(message.offset)
            .execute(&mut **tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes up to `limit` inbox rows older than `retention`; returns how many.
    pub async fn purge_older_than(
        &self,
        retention: Duration,
        limit: usize,
    ) -> Result<u64, OutboxError> {
        let done = sqlx::query(&self.purge)
            .bind(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX))
            .bind(limit as i64)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Sweeps rows older than `retention` (default 7 days) every `interval`, in batches of
    /// `batch`, until `shutdown` completes. Running it in several processes is harmless.
    pub async fn run_retention(
        self,
        retention: Duration,
        interval: Duration,
        batch: usize,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            loop {
                match self.purge_older_than(retention, batch).await {
                    Ok(n) if n as usize >= batch => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "inbox retention sweep failed");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = &mut shutdown => return,
            }
        }
    }
}

/// An event handed to a [`PgHandler`].
pub struct InboxEvent<'a> {
    pub event_id: EventId,
    pub message: &'a IncomingMessage,
}

/// A consumer's business logic: change state (and enqueue outgoing events) in `tx`.
/// Returning an error rolls everything back.
#[async_trait]
pub trait PgHandler: Send + Sync + 'static {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError>;
}

/// Wraps a [`PgHandler`] with the inbox: begin, record `(consumer, event_id)`, run the
/// handler, commit; a duplicate skips the handler.
pub struct PgInboxHandler<H> {
    pool: PgPool,
    inbox: PgInbox,
    consumer: String,
    handler: H,
    metrics: Option<ConsumerMetrics>,
    wake: Option<WakeSignal>,
}

impl<H: PgHandler> PgInboxHandler<H> {
    pub fn new(pool: PgPool, schema: Schema, consumer: impl Into<String>, handler: H) -> Self {
        Self {
            inbox: PgInbox::new(pool.clone(), &schema),
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

    /// Wake this relay after each commit (handlers that enqueue events).
    pub fn with_wake_signal(mut self, wake: WakeSignal) -> Self {
        self.wake = Some(wake);
        self
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }
}

#[async_trait]
impl<H: PgHandler> MessageHandler for PgInboxHandler<H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        let event_id = message.event_id()?;
        let mut tx = self.pool.begin().await.map_err(HandlerError::retry)?;
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
        let event = InboxEvent { event_id, message };
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
                // Dropping the transaction rolls it back; say so explicitly.
                let _ = tx.rollback().await;
                if let Some(m) = &self.metrics {
                    m.handler_failure();
                }
                Err(e)
            }
        }
    }
}
