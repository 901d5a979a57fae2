//! MySQL's and MariaDB's dialect of the shared store logic (`outbox-sql`).
//!
//! What differs from PostgreSQL, and how this dialect meets it:
//! - `?` placeholders bound per occurrence (the statement compiler binds a name again);
//! - no `RETURNING` on `UPDATE` (none at all in MySQL): a script updates, then reads back in
//!   the same transaction;
//! - lists as JSON arrays read with `JSON_TABLE` (MariaDB 10.6, MySQL 8.0);
//! - a fenced change first share-locks the leases it relies on (`LOCK IN SHARE MODE`), as
//!   PostgreSQL's `FOR SHARE`: a relay taking a partition over waits for it;
//! - duplicates (inbox records, event ids, idempotency keys) are refused by the unique key
//!   and read as duplicates: `INSERT IGNORE` would also turn other errors into warnings;
//! - counts and times cast to `SIGNED`, so that every column reads back as a 64-bit integer.

use outbox_core::EventId;
use outbox_sql::outbox::{Insert, WriteDialect, WriteSql};
use outbox_sql::schema::{CatalogSql, RowCount};
use outbox_sql::{
    AdminParts, AdminSql, Arg, Dialect, InboxSql, Placeholders, Query, RelaySql, Statement, PARAMS,
    STATS_EXACT_UP_TO,
};
use sqlx::mysql::MySqlRow;
use sqlx::MySql;

/// The current time in milliseconds, as SQL (the database clock; sessions opened by
/// [`crate::connect`] run in UTC, so no daylight-saving hour repeats).
const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)";

/// MySQL 8.0 or MariaDB 10.6 and later, on the outbox tables of the connection's database.
#[derive(Clone, Copy, Debug, Default)]
pub struct MySqlDialect;

fn script(texts: &[&str]) -> outbox_sql::Script {
    MySqlDialect::script_at(NOW_MS, texts)
}

/// Share-locks the partition rows whose leases the statement after it relies on.
fn hold(partitions: &str) -> String {
    format!(
        "SELECT partition_no FROM event_outbox_partition
         WHERE owner = @relay AND partition_no IN ({partitions}) LOCK IN SHARE MODE"
    )
}

const LEASE_PARTITIONS: &str =
    "SELECT l.p FROM JSON_TABLE(@leases, '$[*]' COLUMNS (p INT PATH '$[0]')) AS l";
const FENCED_PARTITIONS: &str =
    "SELECT f.p FROM JSON_TABLE(@fenced, '$[*]' COLUMNS (p INT PATH '$[1]')) AS f";
const FAILED_PARTITIONS: &str =
    "SELECT f.p FROM JSON_TABLE(@failures, '$[*]' COLUMNS (p INT PATH '$[1]')) AS f";

/// Every lease of the batch (`@leases`) is still held by `@relay` under the same fence.
const ALL_HELD: &str = "(SELECT count(*) FROM event_outbox_partition p
          JOIN JSON_TABLE(@leases, '$[*]' COLUMNS (p INT PATH '$[0]', f BIGINT PATH '$[1]')) AS l
            ON p.partition_no = l.p AND p.fence = l.f
          WHERE p.owner = @relay) = JSON_LENGTH(@leases)";

/// The events of `@seqs`, as a join (MariaDB runs `seq IN (SELECT ... JSON_TABLE)` as a
/// scan per row: a fortieth of the rate).
const SEQS: &str = "JSON_TABLE(@seqs, '$[*]' COLUMNS (s BIGINT PATH '$')) AS j
     JOIN event_outbox e ON e.seq = j.s";

/// The events of `@fenced` whose own lease is still held.
const FENCED: &str = "JSON_TABLE(@fenced, '$[*]' COLUMNS (
             s BIGINT PATH '$[0]', p INT PATH '$[1]', fc BIGINT PATH '$[2]')) AS f
     JOIN event_outbox_partition p
       ON p.partition_no = f.p AND p.fence = f.fc AND p.owner = @relay
     JOIN event_outbox e ON e.seq = f.s AND e.partition_no = f.p";

const FILTER: &str = "(@topic IS NULL OR topic = @topic)
     AND (@aggregate_id IS NULL OR aggregate_id = @aggregate_id)
     AND (@error_contains IS NULL
          OR LOCATE(LOWER(@error_contains), LOWER(COALESCE(last_error, ''))) > 0)
     AND (@older_than_ms IS NULL OR dead_at < {now} - @older_than_ms)
     AND (@event_id IS NULL OR event_id = @event_id)";

const RECORD: &str = "seq, event_id, topic, aggregate_type, aggregate_id, event_type, status,
     CAST(attempts AS SIGNED), last_error, CAST({now} - created_at AS SIGNED), headers, payload";

fn claim(partition_filter: &str) -> String {
    format!(
        "SELECT e.seq, e.event_id, e.aggregate_type, e.aggregate_id,
                CAST(e.partition_no AS SIGNED), e.event_type, e.topic, e.message_key,
                e.headers, e.payload, CAST(e.attempts AS SIGNED),
                CAST({{now}} - e.created_at AS SIGNED)
         FROM event_outbox e
         WHERE e.status = 'pending' {partition_filter}
           AND e.seq NOT IN (
               SELECT j.s FROM JSON_TABLE(@in_flight, '$[*]' COLUMNS (s BIGINT PATH '$')) AS j)
           AND NOT EXISTS (
               SELECT 1 FROM event_outbox b
               WHERE b.retry_at > {{now}} AND b.status = 'pending'
                 AND b.aggregate_type = e.aggregate_type
                 AND b.aggregate_id = e.aggregate_id
                 AND b.seq <= e.seq)
         ORDER BY e.seq
         LIMIT @limit"
    )
}

impl Dialect for MySqlDialect {
    type DB = MySql;

    const PLACEHOLDERS: Placeholders = Placeholders::Question;

    fn bind_own<'q>(query: Query<'q, MySql>, arg: Arg<'q>) -> Query<'q, MySql> {
        outbox_sql::dialect::bind_as_text::<Self>(query, arg)
    }

    fn event_id(row: &MySqlRow, i: usize) -> Result<EventId, String> {
        outbox_sql::dialect::event_id_from_text::<Self>(row, i)
    }

    fn is_unavailable(error: &sqlx::Error) -> bool {
        crate::is_unavailable(error)
    }

    fn relay_sql(&self) -> RelaySql {
        let owned = "SELECT CAST(partition_no AS SIGNED), fence FROM event_outbox_partition
                     WHERE owner = @relay";
        let retain = "SET e.status = 'published', e.published_at = {now}, e.retry_at = NULL";
        let gated = |delete: bool| {
            let change = if delete {
                format!("DELETE e FROM {SEQS} WHERE e.status = 'pending' AND {ALL_HELD}")
            } else {
                format!("UPDATE {SEQS} {retain} WHERE e.status = 'pending' AND {ALL_HELD}")
            };
            script(&[&hold(LEASE_PARTITIONS), &change]).counting(1)
        };
        let fenced = |delete: bool| {
            let change = if delete {
                format!("DELETE e FROM {FENCED} WHERE e.status = 'pending'")
            } else {
                format!("UPDATE {FENCED} {retain} WHERE e.status = 'pending'")
            };
            script(&[&hold(FENCED_PARTITIONS), &change]).counting(1)
        };
        RelaySql {
            heartbeat: script(&[
                "INSERT INTO event_outbox_relay (relay_id, name, started_at, expires_at, activity)
                 VALUES (@relay, @name, {now}, {now} + @lease_ms, '{}')
                 ON DUPLICATE KEY UPDATE expires_at = VALUES(expires_at), name = VALUES(name)",
                "DELETE FROM event_outbox_relay WHERE expires_at < {now} - 3600000",
                "SELECT CAST(count(*) + 1 AS SIGNED) FROM event_outbox_relay
                 WHERE expires_at > {now} AND relay_id <> @relay",
            ]),
            renew: script(&[
                "UPDATE event_outbox_partition SET lease_until = {now} + @lease_ms
                 WHERE owner = @relay",
                owned,
            ]),
            // Concurrent acquirers wait on each other's rows and re-check them, so no
            // partition is taken twice; the answer lists every lease held (the relay keeps
            // one per partition).
            acquire: script(&[
                "UPDATE event_outbox_partition
                 SET owner = @relay, lease_until = {now} + @lease_ms, fence = fence + 1
                 WHERE owner IS NULL OR lease_until < {now}
                 ORDER BY partition_no LIMIT @max",
                owned,
            ]),
            release: script(&["UPDATE event_outbox_partition SET owner = NULL, lease_until = 0
                 WHERE owner = @relay AND partition_no IN (
                     SELECT j.p FROM JSON_TABLE(@partitions, '$[*]' COLUMNS (p INT PATH '$')) AS j)"]),
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
                "AND e.partition_no IN (
                     SELECT j.p FROM JSON_TABLE(@partitions, '$[*]' COLUMNS (p INT PATH '$')) AS j)",
            )]),
            bury: script(&["UPDATE event_outbox SET status = 'dead', dead_at = {now}, last_error = @error
                 WHERE seq = @seq AND status = 'pending'"]),
            complete_delete_gated: gated(true),
            complete_retain_gated: gated(false),
            complete_delete: fenced(true),
            complete_retain: fenced(false),
            fail: script(&[
                &hold(FAILED_PARTITIONS),
                "UPDATE event_outbox e
                 JOIN JSON_TABLE(@failures, '$[*]' COLUMNS (
                          s BIGINT PATH '$[0]', p INT PATH '$[1]', fc BIGINT PATH '$[2]',
                          attempts INT PATH '$[3]', error MEDIUMTEXT PATH '$[4]',
                          dead INT PATH '$[5]', delay_ms BIGINT PATH '$[6]')) AS f
                   ON e.seq = f.s AND e.partition_no = f.p
                 JOIN event_outbox_partition p
                   ON p.partition_no = f.p AND p.fence = f.fc AND p.owner = @relay
                 SET e.attempts = f.attempts, e.last_error = f.error,
                     e.retry_at = CASE WHEN f.dead = 1 THEN NULL ELSE {now} + f.delay_ms END,
                     e.dead_at = CASE WHEN f.dead = 1 THEN {now} END,
                     e.status = CASE WHEN f.dead = 1 THEN 'dead' ELSE 'pending' END
                 WHERE e.status = 'pending'",
            ])
            .counting(1),
            purge: script(&["DELETE FROM event_outbox
                 WHERE status = 'published' AND published_at < {now} - @retention_ms
                 ORDER BY published_at LIMIT @limit"]),
            // Pending and retrying counts stop at the cap (the pending estimate is the span of
            // pending sequence numbers); dead and retained events are counted exactly.
            stats: script(&[&format!(
                "SELECT
                     (SELECT count(*) FROM (SELECT 1 FROM event_outbox WHERE status = 'pending'
                                            ORDER BY seq LIMIT {cap}) c),
                     (SELECT count(*) FROM (SELECT 1 FROM event_outbox
                                            WHERE retry_at IS NOT NULL AND status = 'pending'
                                            LIMIT {cap}) c),
                     (SELECT count(*) FROM event_outbox WHERE status = 'dead'),
                     (SELECT count(*) FROM event_outbox WHERE status = 'published'),
                     CAST({{now}} - (SELECT created_at FROM event_outbox WHERE status = 'pending'
                                     ORDER BY seq LIMIT 1) AS SIGNED),
                     (SELECT count(*) FROM event_outbox_relay WHERE expires_at > {{now}}),
                     NULL,
                     (SELECT CAST(data_length + index_length AS SIGNED)
                      FROM information_schema.tables
                      WHERE table_schema = DATABASE() AND table_name = 'event_outbox'),
                     CAST((SELECT seq FROM event_outbox WHERE status = 'pending'
                           ORDER BY seq DESC LIMIT 1)
                          - (SELECT seq FROM event_outbox WHERE status = 'pending'
                             ORDER BY seq LIMIT 1) + 1 AS SIGNED),
                     NULL, NULL, NULL",
                cap = STATS_EXACT_UP_TO
            )]),
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
                    CAST(SUM(status = 'pending') AS SIGNED),
                    CAST(SUM(status = 'dead') AS SIGNED),
                    CAST(SUM(status = 'published') AS SIGNED),
                    CAST({now} - MIN(CASE WHEN status = 'pending' THEN created_at END) AS SIGNED)
                 FROM event_outbox GROUP BY topic ORDER BY topic",
            },
            script,
        )
    }

    fn inbox_sql(&self) -> InboxSql {
        InboxSql {
            // A duplicate is refused by the primary key (read as "processed before").
            record: script(&[
                "INSERT INTO event_inbox (consumer, event_id, event_type, topic,
                                      partition_no, msg_offset, processed_at)
                 VALUES (@consumer, @event_id, @event_type, @topic, @partition, @offset, {now})",
            ]),
            seen: script(&["SELECT count(*) FROM event_inbox
                 WHERE consumer = @consumer AND event_id = @event_id"]),
            purge: script(&[
                "DELETE FROM event_inbox WHERE processed_at < {now} - @retention_ms
                 ORDER BY processed_at LIMIT @limit",
            ]),
        }
    }
}

impl WriteDialect for MySqlDialect {
    fn write_sql(&self) -> WriteSql {
        WriteSql {
            // The aggregate's bucket row, locked until commit (see migration 1): by the
            // insert itself (one round trip), or first, in key order, for several aggregates.
            lock: Some(script(&["SELECT bucket FROM event_outbox_write_lock
                 WHERE bucket = (@lock_key & 1023) FOR UPDATE"])),
            admit: script(&[
                "INSERT INTO event_outbox_idempotency (idempotency_key, event_id, created_at)
                 VALUES (@idempotency_key, @event_id, {now})",
            ]),
            // The new row's seq comes back with the insert's result (LAST_INSERT_ID).
            insert: Insert::GeneratedKey(Statement::compile(
                &"INSERT INTO event_outbox (event_id, aggregate_type, aggregate_id, partition_no,
                     event_type, topic, message_key, headers, payload, idempotency_key,
                     created_at)
                 SELECT @event_id, @aggregate_type, @aggregate_id, @partition, @event_type,
                        @topic, @message_key, @headers, @payload, @idempotency_key, {now}
                 FROM event_outbox_write_lock WHERE bucket = (@lock_key & 1023) FOR UPDATE"
                    .replace("{now}", NOW_MS),
                Self::PLACEHOLDERS,
                PARAMS,
            )),
        }
    }
}

/// How the schema check reads the catalogue of the connection's database.
pub(crate) fn catalog() -> CatalogSql {
    CatalogSql {
        columns: script(&[
            "SELECT CAST(column_name AS CHAR) FROM information_schema.columns
                 WHERE table_schema = DATABASE() AND table_name = @name",
        ]),
        indexes: script(&[
            "SELECT DISTINCT CAST(index_name AS CHAR) FROM information_schema.statistics
                 WHERE table_schema = DATABASE()",
        ]),
        row_counts: vec![
            RowCount::partitions(script(&["SELECT count(*) FROM event_outbox_partition"])),
            // Writers lock them (see migration 1); without its bucket a writer inserts nothing.
            RowCount {
                table: "event_outbox_write_lock",
                expected: 1024,
                count: script(&["SELECT count(*) FROM event_outbox_write_lock"]),
            },
        ],
    }
}
