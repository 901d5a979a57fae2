//! The consumer inbox on SQLite (see `outbox_postgres::PgInboxHandler` for the pattern).

use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{
    ConsumerMetrics, EffectHandler, EventId, Handled, HandlerError, Inbox, InboxStore,
    InboxStoreError, IncomingMessage, MessageHandler, WakeSignal,
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

    /// Whether `consumer` has processed `event_id` (committed), read outside a transaction.
    pub async fn has_processed(
        &self,
        consumer: &str,
        event_id: EventId,
    ) -> Result<bool, SqliteOutboxError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM event_inbox WHERE consumer = ? AND event_id = ?)",
        )
        .bind(consumer)
        .bind(event_id.to_string())
        .fetch_one(&self.pool)
        .await?)
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

#[async_trait]
impl InboxStore for SqliteInbox {
    type Tx = Transaction<'static, Sqlite>;

    async fn seen(&self, consumer: &str, event_id: EventId) -> Result<bool, InboxStoreError> {
        Ok(self.has_processed(consumer, event_id).await?)
    }

    /// `BEGIN IMMEDIATE`: the write lock up front, so the record never fails on an upgrade.
    async fn begin(&self) -> Result<Self::Tx, InboxStoreError> {
        Ok(crate::begin(&self.pool).await?)
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
        error
            .downcast_ref::<sqlx::Error>()
            .is_some_and(crate::is_unavailable)
    }
}

/// A [`SqliteHandler`] as the core inbox flow's handler.
pub struct SqliteEffects<H>(H);

#[async_trait]
impl<H: SqliteHandler> EffectHandler<Transaction<'static, Sqlite>> for SqliteEffects<H> {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        self.0
            .handle(tx, &SqliteInboxEvent { event_id, message })
            .await
    }
}

/// Wraps a [`SqliteHandler`] with the inbox: begin, record `(consumer, event_id)`, run the
/// handler, commit; a duplicate skips the handler (the flow of `outbox_core::inbox`).
pub struct SqliteInboxHandler<H>(Inbox<SqliteInbox, SqliteEffects<H>>);

impl<H: SqliteHandler> SqliteInboxHandler<H> {
    pub fn new(pool: SqlitePool, consumer: impl Into<String>, handler: H) -> Self {
        Self(Inbox::new(
            SqliteInbox::new(pool),
            consumer,
            SqliteEffects(handler),
        ))
    }

    pub fn with_metrics(self, metrics: ConsumerMetrics) -> Self {
        Self(self.0.with_metrics(metrics))
    }

    pub fn with_wake_signal(self, wake: WakeSignal) -> Self {
        Self(self.0.with_wake_signal(wake))
    }

    pub fn handler(&self) -> &H {
        &self.0.handler().0
    }
}

#[async_trait]
impl<H: SqliteHandler> MessageHandler for SqliteInboxHandler<H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        self.0.handle(message).await
    }
}
