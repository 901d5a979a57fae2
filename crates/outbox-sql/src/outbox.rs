//! The write path written once for databases whose enqueue is a few plain statements
//! (SQLite, MySQL): an event inserted in the caller's transaction, commits or rolls back
//! with the business change. PostgreSQL has its own (one statement per event or per batch,
//! with advisory locks).

use std::sync::Arc;

use outbox_core::{EnqueueOutcome, NewEvent, TableMetrics, WakeSignal};
use sqlx::Transaction;

use crate::dialect::{Arg, Dialect};
use crate::engine::Engine;
use crate::inbox::is_unique_violation;
use crate::run;
use crate::statement::Script;

/// The statements of the write path.
pub struct WriteSql {
    /// `@lock_key`: serialises the writers of one aggregate until commit, so that sequence
    /// order is commit order (none where the database has one writer at a time). Taken
    /// ahead, in key order, for several aggregates at once (`enqueue_all`,
    /// `lock_aggregates`); a single event's `insert` must take it itself, in its own round
    /// trip.
    pub lock: Option<Script>,
    /// `@idempotency_key, @event_id`: counts 1 when admitted, 0 (or a unique violation)
    /// when the key was used before.
    pub admit: Script,
    /// `@event_id, @aggregate_type, @aggregate_id, @partition, @event_type, @topic,
    /// @message_key, @headers, @payload, @idempotency_key`: the insert, and how its `seq`
    /// comes back.
    pub insert: Insert,
}

/// How an insert of the write path tells the new row's `seq`.
pub enum Insert {
    /// The statement returns `seq` as a row, or no row (or a unique violation) when the
    /// event id is in the table already (`RETURNING`).
    Returning(Script),
    /// The database reports the generated key with the statement's result (MySQL's
    /// `LAST_INSERT_ID`, without a round trip to ask for it); a duplicate event id is a
    /// unique violation. An insert that added no row (its lock row missing) is an error.
    GeneratedKey(crate::statement::Statement),
}

/// A dialect with the write path of [`SqlOutbox`].
pub trait WriteDialect: Dialect {
    fn write_sql(&self) -> WriteSql;
}

/// Why an event was not enqueued.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event {event_id}: {reason}")]
    InvalidEvent { event_id: String, reason: String },
}

/// Enqueues events in the caller's transaction. Cheap to clone.
pub struct SqlOutbox<D: WriteDialect> {
    sql: Arc<WriteSql>,
    wake: Option<WakeSignal>,
    metrics: Option<Arc<TableMetrics>>,
    _dialect: std::marker::PhantomData<D>,
}

impl<D: WriteDialect> Clone for SqlOutbox<D> {
    fn clone(&self) -> Self {
        Self {
            sql: self.sql.clone(),
            wake: self.wake.clone(),
            metrics: self.metrics.clone(),
            _dialect: std::marker::PhantomData,
        }
    }
}

impl<D: WriteDialect> SqlOutbox<D> {
    pub fn new(dialect: impl Into<D>) -> Self {
        Self {
            sql: Arc::new(dialect.into().write_sql()),
            wake: None,
            metrics: None,
            _dialect: std::marker::PhantomData,
        }
    }

    /// Wake this relay when [`SqlOutbox::commit`] commits.
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
        tx: &mut Transaction<'_, D::DB>,
        event: &NewEvent,
    ) -> Result<EnqueueOutcome, EnqueueError> {
        let invalid = |reason: String| EnqueueError::InvalidEvent {
            event_id: event.event_id().to_string(),
            reason,
        };
        event.check().map_err(invalid)?;
        let headers = serde_json::to_string(event.headers())
            .map_err(|e| invalid(format!("headers are not serialisable: {e}")))?;
        let agg = event.aggregate();
        let args = [
            (
                "lock_key",
                Arg::Int(i64::from(outbox_core::partition::aggregate_lock_key(
                    agg.kind(),
                    agg.id(),
                ))),
            ),
            ("event_id", Arg::EventId(Some(event.event_id()))),
            ("aggregate_type", Arg::Text(agg.kind())),
            ("aggregate_id", Arg::Text(agg.id())),
            ("partition", Arg::Int(i64::from(agg.partition()))),
            ("event_type", Arg::Text(event.event_type())),
            ("topic", Arg::Text(event.topic().as_str())),
            ("message_key", Arg::Text(event.key())),
            ("headers", Arg::Text(&headers)),
            ("payload", Arg::Bytes(event.payload().as_ref())),
            ("idempotency_key", Arg::OptText(event.idempotency_key())),
        ];
        if event.idempotency_key().is_some() {
            match run::count_on::<D>(&mut **tx, &self.sql.admit, &args).await {
                Ok(1) => {}
                Ok(_) => return Ok(EnqueueOutcome::Duplicate),
                Err(e) if is_unique_violation(&e) => return Ok(EnqueueOutcome::Duplicate),
                Err(e) => return Err(e.into()),
            }
        }
        let seq = match &self.sql.insert {
            Insert::Returning(script) => match run::rows_on::<D>(&mut **tx, script, &args).await {
                Ok(rows) => match rows.first() {
                    Some(row) => Some(D::DB::int(row, 0)?),
                    None => None,
                },
                Err(e) if is_unique_violation(&e) => None,
                Err(e) => return Err(e.into()),
            },
            Insert::GeneratedKey(statement) => {
                match D::DB::insert_on(&mut **tx, run::bound::<D>(statement, &args)).await {
                    Ok(Some(seq)) => Some(seq),
                    Ok(None) => {
                        return Err(EnqueueError::Database(sqlx::Error::Protocol(
                            "the outbox row was not inserted: the outbox tables are not as \
                             migrated (its writer-lock row is missing?); run `outbox check`"
                                .into(),
                        )))
                    }
                    Err(e) if is_unique_violation(&e) => None,
                    Err(e) => return Err(e.into()),
                }
            }
        };
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

    /// Takes the writer locks of `aggregates` in ascending key order, for a transaction
    /// that then enqueues for several aggregates in separate calls (a no-op where the
    /// database has one writer at a time).
    pub async fn lock_aggregates(
        &self,
        tx: &mut Transaction<'_, D::DB>,
        aggregates: &[outbox_core::AggregateRef],
    ) -> Result<(), EnqueueError> {
        self.lock_in_order(tx, aggregates.iter()).await
    }

    /// Takes the writer locks of `aggregates` in ascending key order, each once.
    async fn lock_in_order<'a>(
        &self,
        tx: &mut Transaction<'_, D::DB>,
        aggregates: impl Iterator<Item = &'a outbox_core::AggregateRef>,
    ) -> Result<(), EnqueueError> {
        let Some(lock) = &self.sql.lock else {
            return Ok(());
        };
        let mut keys: Vec<i64> = aggregates
            .map(|a| i64::from(outbox_core::partition::aggregate_lock_key(a.kind(), a.id())))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for key in keys {
            run::count_on::<D>(&mut **tx, lock, &[("lock_key", Arg::Int(key))]).await?;
        }
        Ok(())
    }

    /// Inserts many events in order, one statement each. Where writers lock aggregates,
    /// every aggregate's lock is taken first, in ascending key order, so that two batches
    /// touching the same aggregates in different orders cannot deadlock.
    pub async fn enqueue_all(
        &self,
        tx: &mut Transaction<'_, D::DB>,
        events: &[NewEvent],
    ) -> Result<Vec<EnqueueOutcome>, EnqueueError> {
        self.lock_in_order(tx, events.iter().map(NewEvent::aggregate))
            .await?;
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            out.push(self.enqueue(tx, e).await?);
        }
        Ok(out)
    }

    /// Commits `tx`, then wakes the in-process relay (if one was attached).
    pub async fn commit(&self, tx: Transaction<'_, D::DB>) -> Result<(), sqlx::Error> {
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
