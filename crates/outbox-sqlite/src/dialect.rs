//! SQLite's dialect of the shared store logic (`outbox-sql`): its statements, times as
//! integer milliseconds of the database clock, ids as text, lists as JSON arrays read with
//! `json_each`, and `BEGIN IMMEDIATE` for writes.

use futures::future::BoxFuture;
use outbox_core::EventId;
use outbox_sql::outbox::{Insert, WriteDialect, WriteSql};
use outbox_sql::schema::{CatalogSql, RowCount};
use outbox_sql::{AdminParts, AdminSql, Arg, Dialect, InboxSql, Placeholders, Query, RelaySql};
use sqlx::sqlite::SqliteRow;
use sqlx::{Pool, Sqlite, Transaction};

/// The current time in milliseconds, as SQL (the database clock of this store).
pub(crate) const NOW_MS: &str =
    "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)";

/// SQLite, one database file per service (no schema name).
#[derive(Clone, Copy, Debug, Default)]
pub struct SqliteDialect;

fn script(texts: &[&str]) -> outbox_sql::Script {
    SqliteDialect::script_at(NOW_MS, texts)
}

/// Rows of the fenced-events list `@fenced` whose lease is still held by `@relay`.
const FENCED_SEQS: &str = "SELECT json_extract(f.value, '$[0]') FROM json_each(@fenced) f
     JOIN event_outbox_partition p
       ON p.partition_no = json_extract(f.value, '$[1]')
      AND p.fence = json_extract(f.value, '$[2]') AND p.owner = @relay";

/// Every lease of `@leases` is still held by `@relay` under the same fence.
const ALL_HELD: &str = "(SELECT count(*) FROM json_each(@leases) l
      JOIN event_outbox_partition p
        ON p.partition_no = json_extract(l.value, '$[0]')
       AND p.fence = json_extract(l.value, '$[1]') AND p.owner = @relay)
     = json_array_length(@leases)";

const FILTER: &str = "(@topic IS NULL OR topic = @topic)
     AND (@aggregate_id IS NULL OR aggregate_id = @aggregate_id)
     AND (@error_contains IS NULL
          OR instr(lower(coalesce(last_error, '')), lower(@error_contains)) > 0)
     AND (@older_than_ms IS NULL OR dead_at < {now} - @older_than_ms)
     AND (@event_id IS NULL OR event_id = @event_id)";

const RECORD: &str = "seq, event_id, topic, aggregate_type, aggregate_id, event_type, status,
     attempts, last_error, {now} - created_at, headers, payload";

fn claim(partition_filter: &str) -> String {
    format!(
        "SELECT e.seq, e.event_id, e.aggregate_type, e.aggregate_id, e.partition_no,
                e.event_type, e.topic, e.message_key, e.headers, e.payload, e.attempts,
                {{now}} - e.created_at
         FROM event_outbox e
         WHERE e.status = 'pending' {partition_filter}
           AND e.seq NOT IN (SELECT value FROM json_each(@in_flight))
           AND NOT EXISTS (
               SELECT 1 FROM event_outbox b
               WHERE b.status = 'pending' AND b.retry_at IS NOT NULL
                 AND b.aggregate_type = e.aggregate_type
                 AND b.aggregate_id = e.aggregate_id
                 AND b.seq <= e.seq AND b.retry_at > {{now}})
         ORDER BY e.seq
         LIMIT @limit"
    )
}

impl Dialect for SqliteDialect {
    type DB = Sqlite;

    const PLACEHOLDERS: Placeholders = Placeholders::QuestionNumbered;

    fn bind_own<'q>(query: Query<'q, Sqlite>, arg: Arg<'q>) -> Query<'q, Sqlite> {
        outbox_sql::dialect::bind_as_text::<Self>(query, arg)
    }

    fn event_id(row: &SqliteRow, i: usize) -> Result<EventId, String> {
        outbox_sql::dialect::event_id_from_text::<Self>(row, i)
    }

    fn is_unavailable(error: &sqlx::Error) -> bool {
        crate::is_unavailable(error)
    }

    /// `BEGIN IMMEDIATE`: the write lock up front, so a write never fails on an upgrade.
    fn begin(
        pool: &Pool<Sqlite>,
    ) -> BoxFuture<'_, Result<Transaction<'static, Sqlite>, sqlx::Error>> {
        Box::pin(pool.begin_with("BEGIN IMMEDIATE"))
    }

    fn relay_sql(&self) -> RelaySql {
        let complete = |set: &str| {
            script(&[&format!(
                "{set} WHERE seq IN ({FENCED_SEQS}) AND status = 'pending'"
            )])
        };
        let gated = |set: &str| {
            script(&[&format!(
                "{set} WHERE seq IN (SELECT value FROM json_each(@seqs)) AND status = 'pending'
                   AND {ALL_HELD}"
            )])
        };
        let delete = "DELETE FROM event_outbox";
        let retain =
            "UPDATE event_outbox SET status = 'published', published_at = {now}, retry_at = NULL";
        RelaySql {
            heartbeat: script(&[
                "INSERT INTO event_outbox_relay (relay_id, name, started_at, expires_at)
                 VALUES (@relay, @name, {now}, {now} + @lease_ms)
                 ON CONFLICT (relay_id) DO UPDATE SET expires_at = excluded.expires_at,
                                                      name = excluded.name",
                "DELETE FROM event_outbox_relay WHERE expires_at < {now} - 3600000",
                "SELECT count(*) + 1 FROM event_outbox_relay
                 WHERE expires_at > {now} AND relay_id <> @relay",
            ]),
            renew: script(&[
                "UPDATE event_outbox_partition SET lease_until = {now} + @lease_ms
                 WHERE owner = @relay RETURNING partition_no, fence",
            ]),
            // One statement under SQLite's single writer: no two relays take the same one.
            acquire: script(&["UPDATE event_outbox_partition
                 SET owner = @relay, lease_until = {now} + @lease_ms, fence = fence + 1
                 WHERE partition_no IN (
                     SELECT partition_no FROM event_outbox_partition
                     WHERE owner IS NULL OR lease_until < {now}
                     ORDER BY partition_no LIMIT @max)
                 RETURNING partition_no, fence"]),
            release: script(&[
                "UPDATE event_outbox_partition SET owner = NULL, lease_until = 0
                 WHERE owner = @relay
                   AND partition_no IN (SELECT value FROM json_each(@partitions))",
            ]),
            deregister: script(&["DELETE FROM event_outbox_relay WHERE relay_id = @relay"]),
            take_over: script(&[
                "UPDATE event_outbox_partition SET owner = NULL, lease_until = 0
                 WHERE owner IN (SELECT relay_id FROM event_outbox_relay
                                 WHERE name = @name AND relay_id <> @relay)",
                "DELETE FROM event_outbox_relay WHERE name = @name AND relay_id <> @relay",
            ])
            .counting(0),
            claim_all: script(&[&claim("")]),
            claim_some: script(&[&claim(
                "AND e.partition_no IN (SELECT value FROM json_each(@partitions))",
            )]),
            bury: script(&[
                "UPDATE event_outbox SET status = 'dead', dead_at = {now}, last_error = @error
                 WHERE seq = @seq AND status = 'pending'",
            ]),
            complete_delete_gated: gated(delete),
            complete_retain_gated: gated(retain),
            complete_delete: complete(delete),
            complete_retain: complete(retain),
            fail: script(&["UPDATE event_outbox AS e SET
                     attempts = f.attempts, last_error = f.error,
                     status = CASE WHEN f.dead THEN 'dead' ELSE 'pending' END,
                     retry_at = CASE WHEN f.dead THEN NULL ELSE {now} + f.delay_ms END,
                     dead_at = CASE WHEN f.dead THEN {now} END
                 FROM (SELECT json_extract(value, '$[0]') AS seq,
                              json_extract(value, '$[1]') AS partition_no,
                              json_extract(value, '$[2]') AS fence,
                              json_extract(value, '$[3]') AS attempts,
                              json_extract(value, '$[4]') AS error,
                              json_extract(value, '$[5]') AS dead,
                              json_extract(value, '$[6]') AS delay_ms
                       FROM json_each(@failures)) AS f
                 JOIN event_outbox_partition p
                   ON p.partition_no = f.partition_no AND p.fence = f.fence AND p.owner = @relay
                 WHERE e.seq = f.seq AND e.partition_no = f.partition_no
                   AND e.status = 'pending'"]),
            purge: script(&["DELETE FROM event_outbox WHERE seq IN (
                     SELECT seq FROM event_outbox
                     WHERE status = 'published' AND published_at < {now} - @retention_ms
                     ORDER BY published_at LIMIT @limit)"]),
            // Exact counts: an embedded database's backlog stays small enough.
            stats: script(&["SELECT
                 (SELECT count(*) FROM event_outbox WHERE status = 'pending'),
                 (SELECT count(*) FROM event_outbox
                  WHERE status = 'pending' AND retry_at IS NOT NULL),
                 (SELECT count(*) FROM event_outbox WHERE status = 'dead'),
                 (SELECT count(*) FROM event_outbox WHERE status = 'published'),
                 {now} - (SELECT min(created_at) FROM event_outbox WHERE status = 'pending'),
                 (SELECT count(*) FROM event_outbox_relay WHERE expires_at > {now}),
                 NULL, NULL, NULL, NULL, NULL, NULL"]),
            report_activity: script(&[
                "UPDATE event_outbox_relay SET activity = @activity WHERE relay_id = @relay",
            ]),
            live_activity: script(&[
                "SELECT activity FROM event_outbox_relay WHERE expires_at > {now}",
            ]),
        }
    }

    fn admin_sql(&self) -> AdminSql {
        AdminSql::from_parts(
            AdminParts {
                table: "event_outbox",
                record: RECORD,
                filter: FILTER,
                replay_match: "status = 'published' AND topic = @topic
                     AND published_at >= {now} - @since_ms
                     AND (@aggregate_id IS NULL OR aggregate_id = @aggregate_id)",
                topic_status: "SELECT topic,
                    sum(status = 'pending'), sum(status = 'dead'), sum(status = 'published'),
                    {now} - min(CASE WHEN status = 'pending' THEN created_at END)
                 FROM event_outbox GROUP BY topic ORDER BY topic",
            },
            script,
        )
    }

    fn inbox_sql(&self) -> InboxSql {
        InboxSql {
            record: script(&[
                "INSERT INTO event_inbox (consumer, event_id, event_type, topic,
                                      partition_no, msg_offset, processed_at)
                 VALUES (@consumer, @event_id, @event_type, @topic, @partition, @offset, {now})
                 ON CONFLICT DO NOTHING",
            ]),
            seen: script(&["SELECT count(*) FROM event_inbox
                 WHERE consumer = @consumer AND event_id = @event_id"]),
            purge: script(&["DELETE FROM event_inbox WHERE rowid IN (
                     SELECT rowid FROM event_inbox WHERE processed_at < {now} - @retention_ms
                     ORDER BY processed_at LIMIT @limit)"]),
        }
    }
}

impl WriteDialect for SqliteDialect {
    fn write_sql(&self) -> WriteSql {
        WriteSql {
            // One writer at a time: sequence order is commit order without a lock.
            lock: None,
            admit: script(&[
                "INSERT INTO event_outbox_idempotency (idempotency_key, event_id, created_at)
                 VALUES (@idempotency_key, @event_id, {now}) ON CONFLICT DO NOTHING",
            ]),
            insert: Insert::Returning(script(&[
                "INSERT INTO event_outbox (event_id, aggregate_type, aggregate_id,
                     partition_no, event_type, topic, message_key, headers, payload,
                     idempotency_key, created_at)
                 VALUES (@event_id, @aggregate_type, @aggregate_id, @partition, @event_type,
                         @topic, @message_key, @headers, @payload, @idempotency_key, {now})
                 ON CONFLICT DO NOTHING RETURNING seq",
            ])),
        }
    }
}

/// How the schema check reads SQLite's catalogue.
pub(crate) fn catalog() -> CatalogSql {
    CatalogSql {
        columns: script(&["SELECT name FROM pragma_table_info(@name)"]),
        indexes: script(&["SELECT name FROM sqlite_master WHERE type = 'index'"]),
        row_counts: vec![RowCount::partitions(script(&[
            "SELECT count(*) FROM event_outbox_partition",
        ]))],
    }
}
