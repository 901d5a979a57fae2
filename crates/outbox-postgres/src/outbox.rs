//! The write path: events inserted in the caller's transaction.

use std::collections::HashSet;
use std::sync::Arc;

use outbox_core::partition::aggregate_lock_key;
use outbox_core::{AggregateRef, EnqueueOutcome, EventId, NewEvent, TableMetrics, WakeSignal};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::OutboxError;
use crate::Schema;

/// Advisory lock class of per-aggregate writer locks (two-int key space, separate from the
/// `bigint` one applications usually use).
pub(crate) const AGGREGATE_LOCK_CLASS: i32 = 0x0b0c_0001;

/// How sequence order is made to match commit order within an aggregate.
///
/// # Lock order
/// With [`WriteOrdering::LockAggregate`], writers take one transaction-scoped lock per
/// aggregate. Two transactions that take the locks of the same aggregates in different
/// orders can deadlock (PostgreSQL detects it and aborts one). The order is: ascending
/// `outbox_core::partition::aggregate_lock_key`. [`PgOutbox::enqueue_all`] and
/// [`PgOutbox::lock_aggregates`] follow it; separate [`PgOutbox::enqueue`] calls lock in call
/// order, so a transaction that enqueues for several aggregates one call at a time should
/// call `lock_aggregates` with all of them first (later `enqueue`s find their locks held).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteOrdering {
    /// `enqueue` takes a transaction-scoped advisory lock on the aggregate before the row gets
    /// its sequence number, so writers of one aggregate commit in sequence order.
    #[default]
    LockAggregate,
    /// The application already serialises the writers of an aggregate (e.g. it locks the
    /// aggregate's row first); no extra lock is taken.
    CallerSerialises,
}

/// Where `enqueue` puts an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// A row in `<schema>.event_outbox`, published by the table relay.
    #[default]
    Table,
    /// A transactional logical message in the WAL, published by the stream relay from a
    /// replication slot (see [`crate::stream`]). Needs `wal_level = logical`. Order per
    /// aggregate is commit order, so no writer lock is taken ([`WriteOrdering`] is unused).
    LogicalMessage,
}

/// Enqueues events into `<schema>.event_outbox`, or into the WAL in the stream write mode.
/// Cheap to clone.
#[derive(Clone)]
pub struct PgOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    options: Options,
    insert_one: String,
    insert_many: String,
    lock_many: String,
    emit: Option<crate::stream::emit::Emit>,
}

#[derive(Clone)]
struct Options {
    schema: Schema,
    ordering: WriteOrdering,
    mode: WriteMode,
    notify: bool,
    wake: Option<WakeSignal>,
    metrics: Option<TableMetrics>,
}

/// The LISTEN/NOTIFY channel of a schema's outbox.
pub fn notify_channel(schema: &Schema) -> String {
    format!("outbox_{}", schema.name())
}

impl PgOutbox {
    pub fn new(schema: Schema) -> Self {
        Self::build(Options {
            schema,
            ordering: WriteOrdering::default(),
            mode: WriteMode::default(),
            notify: false,
            wake: None,
            metrics: None,
        })
    }

    fn build(options: Options) -> Self {
        let Options {
            schema, ordering, ..
        } = &options;
        let ordering = *ordering;
        // Opt-in: NOTIFY takes a global lock at commit, which caps write throughput with
        // many writers (see BENCHMARKS.md). The channel name is a validated identifier.
        let notified = if options.notify {
            format!(
                ", (SELECT pg_notify('{}', '')) AS notified",
                notify_channel(schema)
            )
        } else {
            String::new()
        };
        let outbox = schema.table("event_outbox");
        let idem = schema.table("event_outbox_idempotency");
        let lock_one = match ordering {
            WriteOrdering::LockAggregate => {
                format!("SELECT pg_advisory_xact_lock({AGGREGATE_LOCK_CLASS}, $1)")
            }
            WriteOrdering::CallerSerialises => "SELECT $1::int4".to_owned(),
        };
        // The lock CTE is volatile, hence materialised before the INSERT draws its row and
        // thereby its sequence number.
        let insert_one = format!(
            "WITH locked AS ({lock_one}),
                  admitted AS (
                      INSERT INTO {idem} (idempotency_key, event_id)
                      SELECT $11, $2 WHERE $11::text IS NOT NULL
                      ON CONFLICT DO NOTHING RETURNING 1)
             INSERT INTO {outbox} (event_id, aggregate_type, aggregate_id, partition_no,
                                   event_type, topic, message_key, headers, payload,
                                   idempotency_key)
             SELECT $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 FROM locked{notified}
             WHERE $11::text IS NULL OR EXISTS (SELECT 1 FROM admitted)
             ON CONFLICT DO NOTHING
             RETURNING seq"
        );
        // The documented lock order: ascending lock key (see `WriteOrdering`).
        let lock_in_order = format!(
            "SELECT count(*) AS n FROM (
                 SELECT pg_advisory_xact_lock({AGGREGATE_LOCK_CLASS}, k)
                 FROM (SELECT DISTINCT k FROM unnest($1::int4[]) AS k ORDER BY k) AS keys
             ) AS l"
        );
        let lock_many = match ordering {
            WriteOrdering::LockAggregate => lock_in_order.clone(),
            WriteOrdering::CallerSerialises => "SELECT cardinality($1::int4[]) AS n".to_owned(),
        };
        let insert_many = format!(
            "WITH locked AS ({lock_many}),
                  input AS (
                      SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[], $5::int2[],
                                           $6::text[], $7::text[], $8::text[], $9::jsonb[],
                                           $10::bytea[], $11::text[])
                      WITH ORDINALITY AS t(event_id, aggregate_type, aggregate_id,
                                           partition_no, event_type, topic, message_key,
                                           headers, payload, idempotency_key, ord)),
                  admitted AS (
                      INSERT INTO {idem} (idempotency_key, event_id)
                      SELECT idempotency_key, event_id FROM input
                      WHERE idempotency_key IS NOT NULL
                      ON CONFLICT DO NOTHING RETURNING idempotency_key)
             INSERT INTO {outbox} (event_id, aggregate_type, aggregate_id, partition_no,
                                   event_type, topic, message_key, headers, payload,
                                   idempotency_key)
             SELECT i.event_id, i.aggregate_type, i.aggregate_id, i.partition_no, i.event_type,
                    i.topic, i.message_key, i.headers, i.payload, i.idempotency_key
             FROM input i, locked{notified}
             WHERE i.idempotency_key IS NULL
                OR i.idempotency_key IN (SELECT idempotency_key FROM admitted)
             ORDER BY i.ord
             ON CONFLICT DO NOTHING
             RETURNING event_id, seq"
        );
        Self {
            inner: Arc::new(Inner {
                emit: (options.mode == WriteMode::LogicalMessage)
                    .then(|| crate::stream::emit::Emit::new(&options.schema)),
                options,
                insert_one,
                insert_many,
                lock_many: lock_in_order,
            }),
        }
    }

    fn with(&self, change: impl FnOnce(&mut Options)) -> Self {
        let mut options = self.inner.options.clone();
        change(&mut options);
        Self::build(options)
    }

    pub fn with_ordering(self, ordering: WriteOrdering) -> Self {
        self.with(|o| o.ordering = ordering)
    }

    /// Rows in the table (the default) or logical messages for the stream relay.
    pub fn with_write_mode(self, mode: WriteMode) -> Self {
        self.with(|o| o.mode = mode)
    }

    pub fn write_mode(&self) -> WriteMode {
        self.inner.options.mode
    }

    /// Wake this relay when [`PgOutbox::commit`] commits (for relays in the same process).
    pub fn with_wake_signal(self, wake: WakeSignal) -> Self {
        self.with(|o| o.wake = Some(wake))
    }

    pub fn with_metrics(self, metrics: TableMetrics) -> Self {
        self.with(|o| o.metrics = Some(metrics))
    }

    /// Opt-in: every enqueue also sends `NOTIFY outbox_<schema>` (delivered at commit), for
    /// relays in other processes that run [`crate::listen_for_commits`]. It costs write
    /// throughput under many concurrent writers: measure before enabling.
    pub fn with_notify(self, notify: bool) -> Self {
        self.with(|o| o.notify = notify)
    }

    pub fn schema(&self) -> &Schema {
        &self.inner.options.schema
    }

    /// Inserts `event` in the caller's transaction. It becomes visible to relays only when
    /// that transaction commits, and vanishes if it rolls back.
    pub async fn enqueue(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &NewEvent,
    ) -> Result<EnqueueOutcome, OutboxError> {
        let headers = headers_json(event)?;
        if let Some(emit) = &self.inner.emit {
            let outcome = emit.one(tx, event).await?;
            if let (Some(m), EnqueueOutcome::Inserted { .. }) =
                (&self.inner.options.metrics, &outcome)
            {
                m.enqueued(1);
            }
            return Ok(outcome);
        }
        let agg = event.aggregate();
        let seq: Option<i64> = sqlx::query_scalar(&self.inner.insert_one)
            .bind(aggregate_lock_key(agg.kind(), agg.id()))
            .bind(event.event_id().as_uuid())
            .bind(agg.kind())
            .bind(agg.id())
            .bind(agg.partition() as i16)
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
                if let Some(m) = &self.inner.options.metrics {
                    m.enqueued(1);
                }
                EnqueueOutcome::Inserted { seq }
            }
            None => EnqueueOutcome::Duplicate,
        })
    }

    /// Takes the writer locks of `aggregates` in the documented lock order (see
    /// [`WriteOrdering`]), for a transaction that then enqueues for several aggregates in
    /// separate calls: without it, two such transactions (or one and an `enqueue_all`) that
    /// touch the same aggregates in different orders can deadlock. A no-op with
    /// [`WriteOrdering::CallerSerialises`].
    pub async fn lock_aggregates(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        aggregates: &[AggregateRef],
    ) -> Result<(), OutboxError> {
        if self.inner.options.ordering == WriteOrdering::CallerSerialises
            || self.inner.emit.is_some()
            || aggregates.is_empty()
        {
            return Ok(());
        }
        let keys: Vec<i32> = aggregates
            .iter()
            .map(|a| aggregate_lock_key(a.kind(), a.id()))
            .collect();
        sqlx::query(&self.inner.lock_many)
            .bind(keys)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// Inserts many events with one statement, in the given order. Returns one outcome per
    /// event. Within the batch, a repeated `event_id` or idempotency key is a duplicate of its
    /// first occurrence.
    pub async fn enqueue_all(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[NewEvent],
    ) -> Result<Vec<EnqueueOutcome>, OutboxError> {
        let mut seen_ids = HashSet::new();
        let mut seen_keys = HashSet::new();
        let mut send = Vec::with_capacity(events.len());
        for e in events {
            let first_id = seen_ids.insert(e.event_id());
            let first_key = e.idempotency_key().is_none_or(|k| seen_keys.insert(k));
            if first_id && first_key {
                send.push(e);
            }
        }
        if send.is_empty() {
            return Ok(vec![EnqueueOutcome::Duplicate; events.len()]);
        }
        if let Some(emit) = &self.inner.emit {
            for e in &send {
                headers_json(e)?;
            }
            let outcomes = emit.many(tx, &send).await?;
            let inserted: std::collections::HashMap<EventId, EnqueueOutcome> = send
                .iter()
                .zip(outcomes)
                .map(|(e, o)| (e.event_id(), o))
                .collect();
            if let Some(m) = &self.inner.options.metrics {
                let n = inserted
                    .values()
                    .filter(|o| matches!(o, EnqueueOutcome::Inserted { .. }))
                    .count();
                m.enqueued(n as u64);
            }
            let mut reported = HashSet::new();
            return Ok(events
                .iter()
                .map(|e| match inserted.get(&e.event_id()) {
                    Some(o) if reported.insert(e.event_id()) => *o,
                    _ => EnqueueOutcome::Duplicate,
                })
                .collect());
        }
        let mut lock_keys = Vec::with_capacity(send.len());
        let mut ids = Vec::with_capacity(send.len());
        let mut kinds = Vec::with_capacity(send.len());
        let mut agg_ids = Vec::with_capacity(send.len());
        let mut partitions = Vec::with_capacity(send.len());
        let mut types = Vec::with_capacity(send.len());
        let mut topics = Vec::with_capacity(send.len());
        let mut keys = Vec::with_capacity(send.len());
        let mut headers = Vec::with_capacity(send.len());
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(send.len());
        let mut idem = Vec::with_capacity(send.len());
        for e in &send {
            let agg = e.aggregate();
            lock_keys.push(aggregate_lock_key(agg.kind(), agg.id()));
            ids.push(*e.event_id().as_uuid());
            kinds.push(agg.kind());
            agg_ids.push(agg.id());
            partitions.push(agg.partition() as i16);
            types.push(e.event_type());
            topics.push(e.topic().as_str());
            keys.push(e.key());
            headers.push(headers_json(e)?);
            payloads.push(e.payload().as_ref());
            idem.push(e.idempotency_key());
        }
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(&self.inner.insert_many)
            .bind(&lock_keys)
            .bind(&ids)
            .bind(&kinds)
            .bind(&agg_ids)
            .bind(&partitions)
            .bind(&types)
            .bind(&topics)
            .bind(&keys)
            .bind(&headers)
            .bind(&payloads)
            .bind(&idem)
            .fetch_all(&mut **tx)
            .await?;
        if let Some(m) = &self.inner.options.metrics {
            m.enqueued(rows.len() as u64);
        }
        let inserted: std::collections::HashMap<EventId, i64> = rows
            .into_iter()
            .map(|(id, seq)| (EventId::from_uuid(id), seq))
            .collect();
        let mut reported = HashSet::new();
        Ok(events
            .iter()
            .map(|e| match inserted.get(&e.event_id()) {
                // Only the first occurrence of an id in the batch is the inserted one.
                Some(&seq) if reported.insert(e.event_id()) => EnqueueOutcome::Inserted { seq },
                _ => EnqueueOutcome::Duplicate,
            })
            .collect())
    }

    /// Commits `tx`, then wakes the in-process relay (if one was attached).
    pub async fn commit(&self, tx: Transaction<'_, Postgres>) -> Result<(), OutboxError> {
        tx.commit().await?;
        self.wake();
        Ok(())
    }

    /// Wakes the in-process relay (after a commit made without [`PgOutbox::commit`]).
    pub fn wake(&self) {
        if let Some(w) = &self.inner.options.wake {
            w.wake();
        }
    }
}

/// The headers to store, after [`NewEvent::check`] (refusing a foreign `event_id` header).
fn headers_json(event: &NewEvent) -> Result<serde_json::Value, OutboxError> {
    event.check().map_err(|reason| OutboxError::InvalidEvent {
        event_id: event.event_id().to_string(),
        reason,
    })?;
    serde_json::to_value(event.headers()).map_err(|e| OutboxError::InvalidEvent {
        event_id: event.event_id().to_string(),
        reason: format!("headers are not serialisable: {e}"),
    })
}

/// Wakes `wake` whenever a transaction that enqueued with [`PgOutbox::with_notify`] commits.
/// Runs until the task is dropped; reconnects by itself (notifications sent while it was
/// disconnected are missed, which the relay's poll covers).
pub async fn listen_for_commits(pool: PgPool, schema: Schema, wake: WakeSignal) {
    let channel = notify_channel(&schema);
    let mut backoff = outbox_core::retry::Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(5),
    );
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            tracing::warn!(error = %e, %channel, "LISTEN failed; retrying");
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        backoff.reset();
        // A wake-up right after (re)connecting covers anything missed meanwhile.
        wake.wake();
        loop {
            match listener.recv().await {
                Ok(_) => wake.wake(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    break;
                }
            }
        }
    }
}
