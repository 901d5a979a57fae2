//! The stream write mode's side of `enqueue`: events as one transactional logical message
//! per call, idempotency keys still admitted through their table.

use std::collections::HashSet;

use outbox_core::{EnqueueOutcome, NewEvent};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::layout;
use crate::Schema;

pub(crate) struct Emit {
    prefix: String,
    one: String,
    /// One message, no key: also `one`'s fast path.
    many: &'static str,
    admit: String,
}

impl Emit {
    pub(crate) fn new(schema: &Schema) -> Self {
        let idem = schema.table("event_outbox_idempotency");
        Self {
            prefix: layout::event_prefix(schema),
            // With a key: the message is emitted only if the key was admitted; its position
            // doubles as the event's `seq`.
            one: format!(
                "WITH admitted AS (
                     INSERT INTO {idem} (idempotency_key, event_id)
                     SELECT $3, $4 WHERE $3::text IS NOT NULL
                     ON CONFLICT DO NOTHING RETURNING 1)
                 SELECT (pg_logical_emit_message(true, $1, $2) - '0/0'::pg_lsn)::int8
                 WHERE $3::text IS NULL OR EXISTS (SELECT 1 FROM admitted)"
            ),
            many: "SELECT (pg_logical_emit_message(true, $1, $2) - '0/0'::pg_lsn)::int8",
            admit: format!(
                "INSERT INTO {idem} (idempotency_key, event_id)
                 SELECT * FROM unnest($1::text[], $2::uuid[])
                 ON CONFLICT DO NOTHING RETURNING event_id"
            ),
        }
    }

    pub(crate) async fn one(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &NewEvent,
    ) -> Result<EnqueueOutcome, sqlx::Error> {
        let mut content = Vec::with_capacity(event.payload().len() + 128);
        layout::encode(std::iter::once(event), &mut content);
        if event.idempotency_key().is_none() {
            // Without a key the idempotency table is not touched at all (not even opened by
            // an empty modifying CTE): the write is the message alone.
            let seq: i64 = sqlx::query_scalar(self.many)
                .bind(&self.prefix)
                .bind(&content)
                .fetch_one(&mut **tx)
                .await?;
            return Ok(EnqueueOutcome::Inserted { seq });
        }
        let seq: Option<i64> = sqlx::query_scalar(&self.one)
            .bind(&self.prefix)
            .bind(&content)
            .bind(event.idempotency_key())
            .bind(event.event_id().as_uuid())
            .fetch_optional(&mut **tx)
            .await?;
        Ok(match seq {
            Some(seq) => EnqueueOutcome::Inserted { seq },
            None => EnqueueOutcome::Duplicate,
        })
    }

    /// `events` already without in-batch repeats; returns one outcome each.
    pub(crate) async fn many(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        events: &[&NewEvent],
    ) -> Result<Vec<EnqueueOutcome>, sqlx::Error> {
        let keyed: Vec<&&NewEvent> = events
            .iter()
            .filter(|e| e.idempotency_key().is_some())
            .collect();
        let admitted: HashSet<Uuid> = if keyed.is_empty() {
            HashSet::new()
        } else {
            let keys: Vec<&str> = keyed.iter().filter_map(|e| e.idempotency_key()).collect();
            let ids: Vec<Uuid> = keyed.iter().map(|e| *e.event_id().as_uuid()).collect();
            sqlx::query_scalar::<_, Uuid>(&self.admit)
                .bind(&keys)
                .bind(&ids)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .collect()
        };
        let send: Vec<&NewEvent> = events
            .iter()
            .copied()
            .filter(|e| e.idempotency_key().is_none() || admitted.contains(e.event_id().as_uuid()))
            .collect();
        if send.is_empty() {
            return Ok(vec![EnqueueOutcome::Duplicate; events.len()]);
        }
        let mut content =
            Vec::with_capacity(send.iter().map(|e| e.payload().len() + 128).sum::<usize>());
        layout::encode(send.iter().copied(), &mut content);
        let seq: i64 = sqlx::query_scalar(self.many)
            .bind(&self.prefix)
            .bind(&content)
            .fetch_one(&mut **tx)
            .await?;
        Ok(events
            .iter()
            .map(|e| {
                if e.idempotency_key().is_none() || admitted.contains(e.event_id().as_uuid()) {
                    EnqueueOutcome::Inserted { seq }
                } else {
                    EnqueueOutcome::Duplicate
                }
            })
            .collect())
    }
}
