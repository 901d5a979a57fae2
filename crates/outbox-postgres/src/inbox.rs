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
    ConsumerMetrics, EffectHandler, EventId, Handled, HandlerError, Inbox, InboxStore,
    InboxStoreError, IncomingMessage, MessageHandler, WakeSignal,
};
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::OutboxError;
use crate::Schema;

/// The `event_inbox` table of one schema.
#[derive(Clone)]
pub struct PgInbox {
    pool: PgPool,
    insert: String,
    seen: String,
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
            seen: format!(
                "SELECT EXISTS (SELECT 1 FROM {t} WHERE consumer = $1 AND event_id = $2)"
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

    /// Whether `consumer` has processed `event_id` (committed), read outside a transaction.
    pub async fn has_processed(
        &self,
        consumer: &str,
        event_id: EventId,
    ) -> Result<bool, OutboxError> {
        Ok(sqlx::query_scalar(&self.seen)
            .bind(consumer)
            .bind(event_id.as_uuid())
            .fetch_one(&self.pool)
            .await?)
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

#[async_trait]
impl InboxStore for PgInbox {
    type Tx = Transaction<'static, Postgres>;

    async fn seen(&self, consumer: &str, event_id: EventId) -> Result<bool, InboxStoreError> {
        Ok(self.has_processed(consumer, event_id).await?)
    }

    async fn begin(&self) -> Result<Self::Tx, InboxStoreError> {
        Ok(self.pool.begin().await?)
    }

    async fn record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<bool, InboxStoreError> {
        Ok(self.try_begin(tx, consumer, event_id, message).await?)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<(), InboxStoreError> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<(), InboxStoreError> {
        Ok(tx.rollback().await?)
    }

    fn is_unavailable(&self, error: &(dyn std::error::Error + 'static)) -> bool {
        crate::unavailable::in_chain_link(error)
    }
}

/// A [`PgHandler`] as the core inbox flow's handler.
pub struct PgEffects<H>(H);

#[async_trait]
impl<H: PgHandler> EffectHandler<Transaction<'static, Postgres>> for PgEffects<H> {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        self.0.handle(tx, &InboxEvent { event_id, message }).await
    }
}

/// Wraps a [`PgHandler`] with the inbox: begin, record `(consumer, event_id)`, run the
/// handler, commit; a duplicate skips the handler. The flow is `outbox_core::inbox`'s:
/// a lost or refused connection, a pool timeout or a shutting-down server is
/// `HandlerError::Unavailable` (retried without counting attempts), not a handler failure.
pub struct PgInboxHandler<H>(Inbox<PgInbox, PgEffects<H>>);

impl<H: PgHandler> PgInboxHandler<H> {
    pub fn new(pool: PgPool, schema: Schema, consumer: impl Into<String>, handler: H) -> Self {
        Self(Inbox::new(
            PgInbox::new(pool, &schema),
            consumer,
            PgEffects(handler),
        ))
    }

    pub fn with_metrics(self, metrics: ConsumerMetrics) -> Self {
        Self(self.0.with_metrics(metrics))
    }

    /// Wake this relay after each commit (handlers that enqueue events).
    pub fn with_wake_signal(self, wake: WakeSignal) -> Self {
        Self(self.0.with_wake_signal(wake))
    }

    pub fn consumer(&self) -> &str {
        self.0.consumer()
    }

    pub fn handler(&self) -> &H {
        &self.0.handler().0
    }
}

#[async_trait]
impl<H: PgHandler> MessageHandler for PgInboxHandler<H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        self.0.handle(message).await
    }
}
