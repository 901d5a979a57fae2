//! PostgreSQL's dialect of the shared store logic (`outbox-sql`): statements on one schema's
//! tables, `uuid` ids, integer lists as arrays, fenced batches as JSON, and counts that stay
//! cheap with a backlog of millions (capped, then estimated from the statistics).
//!
//! Claims need no row locks: a relay only reads partitions it holds a lease on. Every
//! change to an event share-locks the leases it relies on for the statement's transaction
//! (`held` below): under READ COMMITTED the statement's snapshot may predate another
//! relay's take-over, which (row-locking the lease to take it) must then wait until this
//! change committed, or has committed already and is seen here (the lock reads the newest
//! version of the row and drops it when the owner changed). Without the lock, a relay frozen
//! past its lease could mark an event dead while its new owner publishes it.

use outbox_core::EventId;
use outbox_sql::dialect::json;
use outbox_sql::{
    AdminParts, AdminSql, Arg, Dialect, InboxSql, Placeholders, Query, RelaySql, STATS_EXACT_UP_TO,
};
use sqlx::postgres::PgRow;
use sqlx::Postgres;
use uuid::Uuid;

use crate::Schema;

/// PostgreSQL, on the outbox tables of one schema.
#[derive(Clone, Debug, Default)]
pub struct PgDialect {
    schema: Schema,
}

impl PgDialect {
    pub fn new(schema: &Schema) -> Self {
        Self {
            schema: schema.clone(),
        }
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }
}

impl From<&Schema> for PgDialect {
    fn from(schema: &Schema) -> Self {
        Self::new(schema)
    }
}

impl From<Schema> for PgDialect {
    fn from(schema: Schema) -> Self {
        Self { schema }
    }
}

fn script(texts: &[&str]) -> outbox_sql::Script {
    PgDialect::script(texts)
}

const MS: &str = "* interval '1 millisecond'";

/// Milliseconds since `at`, by the clock of the moment (not of the transaction's start).
fn age_ms(at: &str) -> String {
    format!("(EXTRACT(EPOCH FROM clock_timestamp() - {at}) * 1000)::int8")
}

/// The claim: pending events in sequence order, minus those in flight (a hashed anti-join)
/// and those behind a head waiting for its retry. Columns in the order of `RelaySql`.
fn claim(t: &str, partition_filter: &str) -> String {
    format!(
        "SELECT e.seq, e.event_id, e.aggregate_type, e.aggregate_id, e.partition_no::int8,
                e.event_type, e.topic, e.message_key, e.headers::text, e.payload,
                e.attempts::int8, {age}
         FROM {t} e
         WHERE e.status = 'pending' {partition_filter}
           AND e.seq NOT IN (SELECT unnest(@in_flight::int8[]))
           AND NOT EXISTS (
               SELECT 1 FROM {t} b
               WHERE b.status = 'pending' AND b.retry_at IS NOT NULL
                 AND b.aggregate_type = e.aggregate_type
                 AND b.aggregate_id = e.aggregate_id
                 AND b.seq <= e.seq AND b.retry_at > now())
         ORDER BY e.seq
         LIMIT @limit",
        age = age_ms("e.created_at"),
    )
}

impl Dialect for PgDialect {
    type DB = Postgres;

    const PLACEHOLDERS: Placeholders = Placeholders::Dollar;

    fn bind_own<'q>(query: Query<'q, Postgres>, arg: Arg<'q>) -> Query<'q, Postgres> {
        match arg {
            Arg::Relay(r) => query.bind(r.0),
            Arg::EventId(id) => query.bind(id.map(|id| *id.as_uuid())),
            Arg::Ints(v) => query.bind(v),
            Arg::Partitions(v) => query.bind(v.iter().map(|&p| p as i16).collect::<Vec<_>>()),
            Arg::Leases(v) => query.bind(json::leases(v)),
            Arg::Fenced(v) => query.bind(json::fenced(v)),
            Arg::Failures(v) => query.bind(json::failures(v)),
            plain => outbox_sql::dialect::bind::<Self>(query, plain),
        }
    }

    fn event_id(row: &PgRow, i: usize) -> Result<EventId, String> {
        use sqlx::Row;
        row.try_get_unchecked::<Uuid, _>(i)
            .map(EventId::from_uuid)
            .map_err(|e| e.to_string())
    }

    fn is_unavailable(error: &sqlx::Error) -> bool {
        crate::unavailable::is_unavailable(error)
    }

    fn relay_sql(&self) -> RelaySql {
        let schema = &self.schema;
        let t = schema.table("event_outbox");
        let p = schema.table("event_outbox_partition");
        let r = schema.table("event_outbox_relay");
        // The leases a fenced statement relies on, share-locked (see the module docs).
        let held = |partitions: &str| {
            format!(
                "WITH held AS MATERIALIZED (
                     SELECT partition_no, fence FROM {p}
                     WHERE owner = @relay AND partition_no IN ({partitions})
                     FOR SHARE)"
            )
        };
        let lease_list = "SELECT (l->>0)::int2 AS partition_no, (l->>1)::int8 AS fence
                          FROM jsonb_array_elements(@leases::jsonb) l";
        let fenced_list = "SELECT (x->>0)::int8 AS seq, (x->>1)::int2 AS partition_no,
                                  (x->>2)::int8 AS fence
                           FROM jsonb_array_elements(@fenced::jsonb) x";
        let held_gated = held("SELECT (l->>0)::int2 FROM jsonb_array_elements(@leases::jsonb) l");
        let held_fenced = held("SELECT (x->>1)::int2 FROM jsonb_array_elements(@fenced::jsonb) x");
        let held_failed =
            held("SELECT (x->>1)::int2 FROM jsonb_array_elements(@failures::jsonb) x");
        let fenced = "held h WHERE e.seq = f.seq AND e.partition_no = f.partition_no
               AND h.partition_no = f.partition_no AND h.fence = f.fence
               AND e.status = 'pending'";
        // Checked once per statement (not joined per event): every lease of the batch is
        // still ours under the same fence. Two to three times cheaper than the per-event
        // join on 2,000 events; when a lease moved, `complete` falls back to the per-event
        // check.
        let all_held = format!(
            "(SELECT count(*) FROM held h JOIN ({lease_list}) f
                ON h.partition_no = f.partition_no AND h.fence = f.fence)
             = jsonb_array_length(@leases::jsonb)"
        );
        let retain = "status = 'published', published_at = now(), retry_at = NULL";
        RelaySql {
            heartbeat: script(&[&format!(
                "WITH beat AS (
                     INSERT INTO {r} (relay_id, name, expires_at)
                     VALUES (@relay, @name, now() + @lease_ms {MS})
                     ON CONFLICT (relay_id) DO UPDATE
                     SET expires_at = EXCLUDED.expires_at, name = EXCLUDED.name),
                 gone AS (DELETE FROM {r} WHERE expires_at < now() - interval '1 hour')
                 SELECT count(*) + 1 FROM {r} WHERE expires_at > now() AND relay_id <> @relay"
            )]),
            renew: script(&[&format!(
                "UPDATE {p} SET lease_until = now() + @lease_ms {MS}
                 WHERE owner = @relay RETURNING partition_no::int8, fence"
            )]),
            acquire: script(&[&format!(
                "UPDATE {p} AS p SET owner = @relay, lease_until = now() + @lease_ms {MS},
                                     fence = p.fence + 1
                 WHERE p.partition_no IN (
                     SELECT partition_no FROM {p}
                     WHERE owner IS NULL OR lease_until < now()
                     ORDER BY partition_no LIMIT @max
                     FOR UPDATE SKIP LOCKED)
                 RETURNING p.partition_no::int8, p.fence"
            )]),
            release: script(&[&format!(
                "UPDATE {p} SET owner = NULL, lease_until = '-infinity'
                 WHERE owner = @relay AND partition_no = ANY(@partitions::int2[])"
            )]),
            deregister: script(&[&format!("DELETE FROM {r} WHERE relay_id = @relay")]),
            take_over: script(&[&format!(
                "WITH old AS (DELETE FROM {r} WHERE name = @name AND relay_id <> @relay
                              RETURNING relay_id)
                 UPDATE {p} SET owner = NULL, lease_until = '-infinity'
                 WHERE owner IN (SELECT relay_id FROM old)"
            )]),
            claim_all: script(&[&claim(&t, "")]),
            claim_some: script(&[&claim(
                &t,
                "AND e.partition_no = ANY(@partitions::int2[])",
            )]),
            bury: script(&[&format!(
                "UPDATE {t} SET status = 'dead', dead_at = now(), last_error = @error
                 WHERE seq = @seq AND status = 'pending'"
            )]),
            complete_delete_gated: script(&[&format!(
                "{held_gated} DELETE FROM {t} e
                 WHERE e.seq = ANY(@seqs::int8[]) AND e.status = 'pending' AND {all_held}"
            )]),
            complete_retain_gated: script(&[&format!(
                "{held_gated} UPDATE {t} e SET {retain}
                 WHERE e.seq = ANY(@seqs::int8[]) AND e.status = 'pending' AND {all_held}"
            )]),
            complete_delete: script(&[&format!(
                "{held_fenced} DELETE FROM {t} e USING ({fenced_list}) AS f, {fenced}"
            )]),
            complete_retain: script(&[&format!(
                "{held_fenced} UPDATE {t} e SET {retain} FROM ({fenced_list}) AS f, {fenced}"
            )]),
            fail: script(&[&format!(
                "{held_failed} UPDATE {t} e SET
                     attempts = f.attempts,
                     last_error = f.error,
                     status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
                     retry_at = CASE WHEN f.dead THEN NULL ELSE now() + f.delay_ms {MS} END,
                     dead_at = CASE WHEN f.dead THEN now() END
                 FROM (SELECT (x->>0)::int8 AS seq, (x->>1)::int2 AS partition_no,
                              (x->>2)::int8 AS fence, (x->>3)::int4 AS attempts,
                              x->>4 AS error, (x->>5)::int4 = 1 AS dead,
                              (x->>6)::int8 AS delay_ms
                       FROM jsonb_array_elements(@failures::jsonb) x) AS f,
                 {fenced}"
            )]),
            purge: script(&[&format!(
                "DELETE FROM {t} WHERE seq IN (
                     SELECT seq FROM {t}
                     WHERE status = 'published' AND published_at < now() - @retention_ms {MS}
                     ORDER BY published_at LIMIT @limit)"
            )]),
            // Bounded work whatever the backlog: each count reads at most
            // `STATS_EXACT_UP_TO` entries of its partial index, in index order (`ORDER BY`
            // the index's columns), so that a planner without fresh statistics cannot pick a
            // scan of the whole table; beyond the cap the count is estimated: pending from
            // the span of pending sequence numbers (an upper bound, close for a backlog),
            // the others from the statistics of their partial indexes. Planner statistics
            // lag a backlog written since the last ANALYZE, and a bitmap scan of the whole
            // pending index then looks cheap: bitmap scans are off for this transaction.
            stats: script(&[
                "SET LOCAL enable_bitmapscan = off",
                &format!(
                    "SELECT (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'pending'
                                                   ORDER BY seq LIMIT {cap}) c),
                            (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'pending'
                                                   AND retry_at IS NOT NULL
                                                   ORDER BY aggregate_type, aggregate_id, seq
                                                   LIMIT {cap}) c),
                            (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'dead'
                                                   ORDER BY seq LIMIT {cap}) c),
                            (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE status = 'published'
                                                   ORDER BY published_at LIMIT {cap}) c),
                            {oldest},
                            (SELECT count(*) FROM {r} WHERE expires_at > now()),
                            pg_stat_get_dead_tuples('{t}'::regclass),
                            pg_total_relation_size('{t}'::regclass),
                            (SELECT seq FROM {t} WHERE status = 'pending' ORDER BY seq DESC LIMIT 1)
                            - (SELECT seq FROM {t} WHERE status = 'pending' ORDER BY seq LIMIT 1) + 1,
                            (SELECT reltuples FROM pg_class WHERE oid = '{retry_idx}'::regclass)::int8,
                            (SELECT reltuples FROM pg_class WHERE oid = '{dead_idx}'::regclass)::int8,
                            (SELECT reltuples FROM pg_class WHERE oid = '{published_idx}'::regclass)::int8",
                    cap = STATS_EXACT_UP_TO,
                    oldest = age_ms(&format!(
                        "(SELECT created_at FROM {t} WHERE status = 'pending' ORDER BY seq LIMIT 1)"
                    )),
                    retry_idx = schema.table("event_outbox_retry_idx"),
                    dead_idx = schema.table("event_outbox_dead_idx"),
                    published_idx = schema.table("event_outbox_published_idx"),
                ),
            ]),
            report_activity: script(&[&format!(
                "UPDATE {r} SET activity = @activity WHERE relay_id = @relay"
            )]),
            live_activity: script(&[&format!(
                "SELECT activity FROM {r} WHERE expires_at > now()"
            )]),
        }
    }

    fn admin_sql(&self) -> AdminSql {
        let t = self.schema.table("event_outbox");
        let filter = format!(
            "(@topic::text IS NULL OR topic = @topic)
             AND (@aggregate_id::text IS NULL OR aggregate_id = @aggregate_id)
             AND (@error_contains::text IS NULL
                  OR strpos(lower(coalesce(last_error, '')), lower(@error_contains)) > 0)
             AND (@older_than_ms::int8 IS NULL OR dead_at < now() - @older_than_ms {MS})
             AND (@event_id::uuid IS NULL OR event_id = @event_id)"
        );
        let record = format!(
            "seq, event_id, topic, aggregate_type, aggregate_id, event_type, status,
             attempts::int8, last_error, {}, headers::text, payload",
            age_ms("created_at")
        );
        let replay_match = format!(
            "status = 'published' AND topic = @topic
             AND published_at >= now() - @since_ms {MS}
             AND (@aggregate_id::text IS NULL OR aggregate_id = @aggregate_id)"
        );
        let topic_status = format!(
            "SELECT topic,
                    count(*) FILTER (WHERE status = 'pending'),
                    count(*) FILTER (WHERE status = 'dead'),
                    count(*) FILTER (WHERE status = 'published'),
                    {}
             FROM {t} GROUP BY topic ORDER BY topic",
            age_ms("min(created_at) FILTER (WHERE status = 'pending')")
        );
        AdminSql::from_parts(
            AdminParts {
                table: &t,
                record: &record,
                filter: &filter,
                replay_match: &replay_match,
                topic_status: &topic_status,
            },
            script,
        )
    }

    fn inbox_sql(&self) -> InboxSql {
        let t = self.schema.table("event_inbox");
        InboxSql {
            record: script(&[&format!(
                "INSERT INTO {t} (consumer, event_id, event_type, topic, partition_no, msg_offset)
                 VALUES (@consumer, @event_id, @event_type, @topic, @partition, @offset)
                 ON CONFLICT DO NOTHING"
            )]),
            seen: script(&[&format!(
                "SELECT count(*) FROM {t} WHERE consumer = @consumer AND event_id = @event_id"
            )]),
            purge: script(&[&format!(
                "DELETE FROM {t} WHERE (consumer, event_id) IN (
                     SELECT consumer, event_id FROM {t}
                     WHERE processed_at < now() - @retention_ms {MS}
                     ORDER BY processed_at LIMIT @limit)"
            )]),
        }
    }
}
