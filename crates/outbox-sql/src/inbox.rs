//! The consumer inbox on any [`Dialect`]: a consumer's effects and its record of having
//! processed an event commit together, so each event takes effect once however often it is
//! delivered. The flow itself is `outbox_core::inbox`'s; this is its store.
//!
//! ```ignore
//! struct CountEssays;
//!
//! #[async_trait::async_trait]
//! impl SqlHandler<sqlx::Postgres> for CountEssays {
//!     async fn handle(
//!         &self,
//!         tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
//!         event: &InboxEvent<'_>,
//!     ) -> Result<(), HandlerError> {
//!         sqlx::query("UPDATE batches SET essays = essays + 1 WHERE id = $1")
//!             .bind(event.message.key.as_deref())
//!             .execute(&mut **tx)
//!             .await
//!             .map_err(HandlerError::retry)?;
//!         Ok(()) // ...and enqueue follow-up events in `tx` here.
//!     }
//! }
//! ```

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{
    ConsumerMetrics, EffectHandler, EventId, Handled, HandlerError, Inbox, InboxStore,
    InboxStoreError, IncomingMessage, MessageHandler, WakeSignal,
};
use sqlx::{Database, Pool, Transaction};

use crate::dialect::{Arg, Dialect, InboxSql};
use crate::engine::Engine;
use crate::millis;
use crate::run;

/// The `event_inbox` table of one database (or schema).
pub struct SqlInbox<D: Dialect> {
    pool: Pool<D::DB>,
    sql: Arc<InboxSql>,
}

impl<D: Dialect> Clone for SqlInbox<D> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            sql: self.sql.clone(),
        }
    }
}

/// Whether `error` is a unique violation (how MySQL reports a duplicate record, which it
/// cannot skip without also ignoring other errors).
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

impl<D: Dialect> SqlInbox<D> {
    pub fn new(pool: Pool<D::DB>, dialect: impl Into<D>) -> Self {
        Self {
            pool,
            sql: Arc::new(dialect.into().inbox_sql()),
        }
    }

    /// Records that `consumer` processes `event_id`, in the caller's transaction. Returns
    /// `false` when it was processed before (the caller should skip its effects). A
    /// concurrent first delivery makes this wait until that one commits or rolls back.
    pub async fn try_begin(
        &self,
        tx: &mut Transaction<'_, D::DB>,
        consumer: &str,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<bool, sqlx::Error> {
        let args = [
            ("consumer", Arg::Text(consumer)),
            ("event_id", Arg::EventId(Some(event_id))),
            ("event_type", Arg::Text(message.event_type())),
            ("topic", Arg::Text(&message.topic)),
            ("partition", Arg::Int(i64::from(message.partition))),
            ("offset", Arg::Int(message.offset)),
        ];
        match run::count_on::<D>(&mut **tx, &self.sql.record, &args).await {
            Ok(n) => Ok(n == 1),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `consumer` has processed `event_id` (committed), read outside a transaction.
    pub async fn has_processed(
        &self,
        consumer: &str,
        event_id: EventId,
    ) -> Result<bool, sqlx::Error> {
        let args = [
            ("consumer", Arg::Text(consumer)),
            ("event_id", Arg::EventId(Some(event_id))),
        ];
        let rows = run::rows::<D>(&self.pool, &self.sql.seen, &args).await?;
        Ok(match rows.first() {
            Some(r) => D::DB::int(r, 0)? > 0,
            None => false,
        })
    }

    /// Deletes up to `limit` inbox rows older than `retention`; returns how many.
    pub async fn purge_older_than(
        &self,
        retention: Duration,
        limit: usize,
    ) -> Result<u64, sqlx::Error> {
        let args = [
            ("retention_ms", Arg::Int(millis(retention))),
            ("limit", Arg::Int(limit as i64)),
        ];
        run::count::<D>(&self.pool, &self.sql.purge, &args).await
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

#[async_trait]
impl<D: Dialect> InboxStore for SqlInbox<D> {
    type Tx = Transaction<'static, D::DB>;

    async fn seen(&self, consumer: &str, event_id: EventId) -> Result<bool, InboxStoreError> {
        Ok(self.has_processed(consumer, event_id).await?)
    }

    async fn begin(&self) -> Result<Self::Tx, InboxStoreError> {
        Ok(D::begin(&self.pool).await?)
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
            .is_some_and(D::is_unavailable)
    }
}

/// An event handed to a [`SqlHandler`].
pub struct InboxEvent<'a> {
    pub event_id: EventId,
    pub message: &'a IncomingMessage,
}

/// A consumer's business logic: change state (and enqueue outgoing events) in `tx`.
/// Returning an error rolls everything back.
#[async_trait]
pub trait SqlHandler<DB: Database>: Send + Sync + 'static {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, DB>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError>;
}

/// A [`SqlHandler`] as the core inbox flow's handler.
pub struct Effects<H>(H);

#[async_trait]
impl<DB: Database, H: SqlHandler<DB>> EffectHandler<Transaction<'static, DB>> for Effects<H> {
    async fn apply(
        &self,
        tx: &mut Transaction<'static, DB>,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        self.0.handle(tx, &InboxEvent { event_id, message }).await
    }
}

/// Wraps a [`SqlHandler`] with the inbox: begin, record `(consumer, event_id)`, run the
/// handler, commit; a duplicate skips the handler. The flow is `outbox_core::inbox`'s: a
/// lost or refused connection, a pool timeout or a shutting-down server is
/// `HandlerError::Unavailable` (retried without counting attempts), not a handler failure.
pub struct SqlInboxHandler<D: Dialect, H>(Inbox<SqlInbox<D>, Effects<H>>);

impl<D: Dialect, H: SqlHandler<D::DB>> SqlInboxHandler<D, H> {
    /// The inbox of `pool` (with `dialect`, e.g. a PostgreSQL schema) around `handler`,
    /// recording under `consumer`.
    pub fn new(
        pool: Pool<D::DB>,
        dialect: impl Into<D>,
        consumer: impl Into<String>,
        handler: H,
    ) -> Self {
        Self(Inbox::new(
            SqlInbox::new(pool, dialect),
            consumer,
            Effects(handler),
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
impl<D: Dialect, H: SqlHandler<D::DB>> MessageHandler for SqlInboxHandler<D, H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        self.0.handle(message).await
    }
}
