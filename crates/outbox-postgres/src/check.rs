//! Start-up schema verification: fail fast, naming what is wrong and how to fix it, instead of
//! drifting silently (as the original system did).

use std::fmt;

use sqlx::PgPool;

use crate::error::OutboxError;
use crate::migrate::MIGRATIONS;
use crate::Schema;

/// The differences between the database and what this code expects.
#[derive(Debug, thiserror::Error)]
pub struct SchemaMismatch {
    pub schema: String,
    pub problems: Vec<String>,
}

impl fmt::Display for SchemaMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "outbox schema {:?} is not what this version expects:",
            self.schema
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        write!(
            f,
            "fix: run `outbox migrate` (or call outbox_postgres::migrate at start-up), or apply \
             crates/outbox-postgres/migrations/*.sql with search_path set to {:?}",
            self.schema
        )
    }
}

const TIMESTAMPTZ: &str = "timestamp with time zone";

/// Tables and the columns (name, `information_schema` type) the code reads and writes.
const TABLES: &[(&str, &[(&str, &str)])] = &[
    (
        "event_outbox",
        &[
            ("seq", "bigint"),
            ("event_id", "uuid"),
            ("aggregate_type", "text"),
            ("aggregate_id", "text"),
            ("partition_no", "smallint"),
            ("event_type", "text"),
            ("topic", "text"),
            ("message_key", "text"),
            ("headers", "jsonb"),
            ("payload", "bytea"),
            ("idempotency_key", "text"),
            ("status", "text"),
            ("attempts", "integer"),
            ("retry_at", TIMESTAMPTZ),
            ("last_error", "text"),
            ("created_at", TIMESTAMPTZ),
            ("published_at", TIMESTAMPTZ),
            ("dead_at", TIMESTAMPTZ),
        ],
    ),
    (
        "event_outbox_idempotency",
        &[
            ("idempotency_key", "text"),
            ("event_id", "uuid"),
            ("created_at", TIMESTAMPTZ),
        ],
    ),
    (
        "event_outbox_partition",
        &[
            ("partition_no", "smallint"),
            ("owner", "uuid"),
            ("lease_until", TIMESTAMPTZ),
            ("fence", "bigint"),
        ],
    ),
    (
        "event_outbox_relay",
        &[
            ("relay_id", "uuid"),
            ("name", "text"),
            ("started_at", TIMESTAMPTZ),
            ("expires_at", TIMESTAMPTZ),
        ],
    ),
    (
        "event_inbox",
        &[
            ("consumer", "text"),
            ("event_id", "uuid"),
            ("event_type", "text"),
            ("topic", "text"),
            ("partition_no", "integer"),
            ("msg_offset", "bigint"),
            ("processed_at", TIMESTAMPTZ),
        ],
    ),
];

/// Indexes the queries rely on (for speed or for correctness, like the unique `event_id`).
const INDEXES: &[&str] = &[
    "event_outbox_pkey",
    "event_outbox_event_id_key",
    "event_outbox_pending_idx",
    "event_outbox_retry_idx",
    "event_outbox_dead_idx",
    "event_outbox_published_idx",
    "event_outbox_idempotency_pkey",
    "event_outbox_partition_pkey",
    "event_outbox_relay_pkey",
    "event_inbox_pkey",
    "event_inbox_processed_idx",
];

/// Verifies tables, columns, indexes (present and valid), the partition rows, and that every
/// known migration was applied. Returns every problem found, not just the first.
pub async fn check_schema(pool: &PgPool, schema: &Schema) -> Result<(), OutboxError> {
    let mut problems = Vec::new();

    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text
         FROM information_schema.columns WHERE table_schema = $1",
    )
    .bind(schema.name())
    .fetch_all(pool)
    .await?;
    for (table, expected) in TABLES {
        let found: Vec<_> = columns.iter().filter(|(t, _, _)| t == table).collect();
        if found.is_empty() {
            problems.push(format!("table {table} is missing"));
            continue;
        }
        for (column, ty) in *expected {
            match found.iter().find(|(_, c, _)| c == column) {
                None => problems.push(format!("column {table}.{column} is missing")),
                Some((_, _, actual)) if actual != ty => problems.push(format!(
                    "column {table}.{column} has type {actual}, expected {ty}"
                )),
                Some(_) => {}
            }
        }
    }

    let indexes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid
         FROM pg_index i
         JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1",
    )
    .bind(schema.name())
    .fetch_all(pool)
    .await?;
    for name in INDEXES {
        match indexes.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("index {name} is missing")),
            Some((_, false)) => problems.push(format!(
                "index {name} is INVALID (an interrupted CREATE INDEX CONCURRENTLY): \
                 DROP INDEX {}.{name}; then migrate again",
                schema.name()
            )),
            Some(_) => {}
        }
    }

    if problems.is_empty() {
        let partitions: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}",
            schema.table("event_outbox_partition")
        ))
        .fetch_one(pool)
        .await?;
        if partitions != i64::from(outbox_core::PARTITIONS) {
            problems.push(format!(
                "event_outbox_partition has {partitions} rows, expected {}",
                outbox_core::PARTITIONS
            ));
        }
        let applied: Vec<i32> = sqlx::query_scalar(&format!(
            "SELECT version FROM {} ORDER BY version",
            schema.table("outbox_migrations")
        ))
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        for m in MIGRATIONS {
            if !applied.contains(&m.version) {
                problems.push(format!(
                    "migration {} ({}) is not applied",
                    m.version, m.name
                ));
            }
        }
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(SchemaMismatch {
            schema: schema.name().to_owned(),
            problems,
        }
        .into())
    }
}
