//! The start-up schema check, written once: fail fast, naming what is missing and how to fix
//! it, instead of drifting silently.

use sqlx::Pool;

use crate::dialect::{Arg, Dialect};
use crate::engine::Engine;
use crate::run;
use crate::statement::Script;

/// Tables and the columns the code reads and writes (the same names in every store).
pub const TABLES: &[(&str, &[&str])] = &[
    (
        "event_outbox",
        &[
            "seq",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "partition_no",
            "event_type",
            "topic",
            "message_key",
            "headers",
            "payload",
            "idempotency_key",
            "status",
            "attempts",
            "retry_at",
            "last_error",
            "created_at",
            "published_at",
            "dead_at",
        ],
    ),
    (
        "event_outbox_idempotency",
        &["idempotency_key", "event_id", "created_at"],
    ),
    (
        "event_outbox_partition",
        &["partition_no", "owner", "lease_until", "fence"],
    ),
    (
        "event_outbox_relay",
        &["relay_id", "name", "started_at", "expires_at", "activity"],
    ),
    (
        "event_inbox",
        &[
            "consumer",
            "event_id",
            "event_type",
            "topic",
            "partition_no",
            "msg_offset",
            "processed_at",
        ],
    ),
];

/// How a dialect reads its catalogue.
pub struct CatalogSql {
    /// `@name` (a table) -> rows `(column name)`; none when the table is missing.
    pub columns: Script,
    /// -> rows `(index name)` of the outbox's tables.
    pub indexes: Script,
    /// Tables whose rows the code relies on (the 64 partitions, and a dialect's own).
    pub row_counts: Vec<RowCount>,
}

/// A table that must hold a fixed number of rows.
pub struct RowCount {
    pub table: &'static str,
    pub expected: i64,
    /// -> one row: how many it holds.
    pub count: Script,
}

impl RowCount {
    /// The 64 rows of `event_outbox_partition`, counted with `count`.
    pub fn partitions(count: Script) -> Self {
        Self {
            table: "event_outbox_partition",
            expected: i64::from(outbox_core::PARTITIONS),
            count,
        }
    }
}

/// Verifies tables, columns, `indexes` and the row counts; returns every problem.
pub async fn problems<D: Dialect>(
    pool: &Pool<D::DB>,
    sql: &CatalogSql,
    indexes: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    let mut problems = Vec::new();
    for (table, columns) in TABLES {
        let rows = run::rows::<D>(pool, &sql.columns, &[("name", Arg::Text(table))]).await?;
        let found = rows
            .iter()
            .map(|r| D::DB::text(r, 0).map(str::to_owned))
            .collect::<Result<Vec<_>, _>>()?;
        if found.is_empty() {
            problems.push(format!("table {table} is missing"));
            continue;
        }
        for c in *columns {
            if !found.iter().any(|f| f == c) {
                problems.push(format!("column {table}.{c} is missing"));
            }
        }
    }
    let rows = run::rows::<D>(pool, &sql.indexes, &[]).await?;
    let found = rows
        .iter()
        .map(|r| D::DB::text(r, 0).map(str::to_owned))
        .collect::<Result<Vec<_>, _>>()?;
    for i in indexes {
        if !found.iter().any(|n| n == i) {
            problems.push(format!("index {i} is missing"));
        }
    }
    if !problems.is_empty() {
        return Ok(problems);
    }
    for RowCount {
        table,
        expected,
        count,
    } in &sql.row_counts
    {
        let rows = run::rows::<D>(pool, count, &[]).await?;
        let n = match rows.first() {
            Some(r) => D::DB::int(r, 0)?,
            None => 0,
        };
        if n != *expected {
            problems.push(format!("{table} has {n} rows, expected {expected}"));
        }
    }
    Ok(problems)
}
