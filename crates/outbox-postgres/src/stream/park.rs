//! The table path of a streamed aggregate: events the stream relay could not publish are
//! written to the outbox table, where the table relay retries them with backoff, dead
//! letters them and lets an operator requeue them, exactly as for events written there.
//! While an aggregate has pending rows the stream relay parks its later events behind them,
//! so its order holds across both paths.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outbox_core::{AggregateRef, OutboxMessage};
use sqlx::PgPool;

use crate::Schema;

/// Why and how an event goes to the table.
#[derive(Clone, Debug)]
pub enum ParkState {
    /// Behind an earlier event of its aggregate: pending, no attempt made.
    Behind,
    /// The broker rejected it: one attempt counted, next try after `retry_in`.
    Rejected { reason: String, retry_in: Duration },
    /// The broker could not take it while it took others (e.g. a partition without a
    /// leader): no attempt counted, next try after `retry_in`.
    Deferred { reason: String, retry_in: Duration },
    /// Never deliverable as it is, or out of attempts: dead, for an operator.
    Dead { reason: String, attempts: u32 },
}

/// One event bound for the table, with its commit time (its `created_at` there).
pub struct Parked<'a> {
    pub message: &'a OutboxMessage,
    pub committed_at: SystemTime,
    pub state: ParkState,
}

pub struct Park {
    aggregates_sql: String,
    insert_sql: String,
}

impl Park {
    pub fn new(schema: &Schema) -> Self {
        let outbox = schema.table("event_outbox");
        Self {
            aggregates_sql: format!(
                "SELECT DISTINCT o.aggregate_type, o.aggregate_id
                 FROM {outbox} o
                 JOIN unnest($1::text[], $2::text[]) AS a(kind, id)
                   ON o.aggregate_type = a.kind AND o.aggregate_id = a.id
                 WHERE o.status = 'pending'"
            ),
            // Rows are numbered in the order given, so the table relay sends them in stream
            // order; a row already there (a batch parked again after a crash) stays as is.
            insert_sql: format!(
                "INSERT INTO {outbox} (event_id, aggregate_type, aggregate_id, partition_no,
                                       event_type, topic, message_key, headers, payload,
                                       status, attempts, retry_at, last_error, created_at,
                                       dead_at)
                 SELECT p.event_id, p.kind, p.id, p.part, p.etype, p.topic, p.mkey, p.headers,
                        p.payload, p.status, p.attempts,
                        CASE WHEN p.retry_ms IS NOT NULL
                             THEN clock_timestamp() + p.retry_ms * interval '1 millisecond' END,
                        p.error, to_timestamp(p.created),
                        CASE WHEN p.status = 'dead' THEN clock_timestamp() END
                 FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int2[], $5::text[],
                             $6::text[], $7::text[], $8::jsonb[], $9::bytea[], $10::text[],
                             $11::int4[], $12::int8[], $13::text[], $14::float8[])
                      WITH ORDINALITY AS p(event_id, kind, id, part, etype, topic, mkey,
                                           headers, payload, status, attempts, retry_ms,
                                           error, created, ord)
                 ORDER BY p.ord
                 ON CONFLICT (event_id) DO NOTHING"
            ),
        }
    }

    /// Which of `aggregates` have pending rows in the table (their stream events must wait
    /// behind them).
    pub async fn aggregates_on_table(
        &self,
        pool: &PgPool,
        aggregates: &HashSet<&AggregateRef>,
    ) -> Result<HashSet<AggregateRef>, sqlx::Error> {
        let kinds: Vec<&str> = aggregates.iter().map(|a| a.kind()).collect();
        let ids: Vec<&str> = aggregates.iter().map(|a| a.id()).collect();
        let rows: Vec<(String, String)> = sqlx::query_as(&self.aggregates_sql)
            .bind(&kinds)
            .bind(&ids)
            .fetch_all(pool)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(k, i)| AggregateRef::new(k, i).ok())
            .collect())
    }

    /// Writes `parked` (in stream order) in one statement.
    pub async fn write(&self, pool: &PgPool, parked: &[Parked<'_>]) -> Result<(), sqlx::Error> {
        if parked.is_empty() {
            return Ok(());
        }
        let n = parked.len();
        let mut ids = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        let mut agg_ids = Vec::with_capacity(n);
        let mut parts = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut retry_ms: Vec<Option<i64>> = Vec::with_capacity(n);
        let mut errors: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        for p in parked {
            let m = p.message;
            ids.push(*m.event_id.as_uuid());
            kinds.push(m.aggregate.kind());
            agg_ids.push(m.aggregate.id());
            parts.push(m.partition as i16);
            types.push(m.event_type.as_str());
            topics.push(m.topic.as_str());
            keys.push(m.key.as_str());
            headers.push(serde_json::to_value(&m.headers).unwrap_or_default());
            payloads.push(m.payload.as_ref());
            let (status, tries, retry, error) = match &p.state {
                ParkState::Behind => ("pending", 0, None, None),
                ParkState::Rejected { reason, retry_in } => {
                    ("pending", 1, Some(retry_in), Some(reason.as_str()))
                }
                ParkState::Deferred { reason, retry_in } => {
                    ("pending", 0, Some(retry_in), Some(reason.as_str()))
                }
                ParkState::Dead { reason, attempts } => {
                    ("dead", *attempts as i32, None, Some(reason.as_str()))
                }
            };
            statuses.push(status);
            attempts.push(tries);
            retry_ms.push(retry.map(|d| d.as_millis() as i64));
            errors.push(error);
            created.push(
                p.committed_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
        }
        sqlx::query(&self.insert_sql)
            .bind(&ids)
            .bind(&kinds)
            .bind(&agg_ids)
            .bind(&parts)
            .bind(&types)
            .bind(&topics)
            .bind(&keys)
            .bind(&headers)
            .bind(&payloads)
            .bind(&statuses)
            .bind(&attempts)
            .bind(&retry_ms)
            .bind(&errors)
            .bind(&created)
            .execute(pool)
            .await?;
        Ok(())
    }
}
