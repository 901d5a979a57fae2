//! Embedded migrations, applied into one schema.
//!
//! The SQL lives as plain files in `crates/outbox-postgres/migrations/` and is compiled into
//! the crate. It is applied with `search_path` set to the configured schema and tracked in
//! `<schema>.outbox_migrations`, a table of its own, so it never collides with the service's
//! own migrations (sqlx's `_sqlx_migrations` table would be shared with them).
//!
//! Policy: migrations only add (tables, nullable columns, indexes) and are safe on a live
//! table. A file whose first line is `-- outbox:no-transaction` runs outside a transaction,
//! which `CREATE INDEX CONCURRENTLY` needs; the schema check reports an index left invalid
//! by an interrupted concurrent build.

use sqlx::{Connection, PgPool};

use crate::error::OutboxError;
use crate::Schema;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    fn no_transaction(&self) -> bool {
        self.sql.starts_with("-- outbox:no-transaction")
    }

    fn checksum(&self) -> String {
        let h = outbox_core::partition::aggregate_hash("migration", self.sql);
        format!("{h:016x}")
    }
}

/// Every migration this crate knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event_outbox",
        sql: include_str!("../migrations/0001_event_outbox.sql"),
    },
    Migration {
        version: 2,
        name: "event_inbox",
        sql: include_str!("../migrations/0002_event_inbox.sql"),
    },
    Migration {
        version: 3,
        name: "relay_activity",
        sql: include_str!("../migrations/0003_relay_activity.sql"),
    },
];

/// Advisory lock class for migrations (the two-int key space is separate from `bigint` keys).
const MIGRATION_LOCK_CLASS: i32 = 0x0b0c_4d01;

/// Applies every migration not yet applied to `schema` (creating the schema if needed).
/// Safe to call from many processes at once: they take turns under an advisory lock.
/// Returns the versions applied by this call.
pub async fn migrate(pool: &PgPool, schema: &Schema) -> Result<Vec<i32>, OutboxError> {
    let mut conn = pool.acquire().await?;
    let lock_key = outbox_core::partition::aggregate_lock_key("schema", schema.name());
    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(MIGRATION_LOCK_CLASS)
        .bind(lock_key)
        .execute(&mut *conn)
        .await?;
    let result = apply_all(&mut conn, schema).await;
    // Runs even when a migration failed, so the connection goes back to the pool clean.
    let unlock = async {
        sqlx::raw_sql("RESET search_path")
            .execute(&mut *conn)
            .await?;
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(MIGRATION_LOCK_CLASS)
            .bind(lock_key)
            .execute(&mut *conn)
            .await
    };
    let unlocked = unlock.await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

async fn apply_all(
    conn: &mut sqlx::PgConnection,
    schema: &Schema,
) -> Result<Vec<i32>, OutboxError> {
    let q = schema.quoted();
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q};
         CREATE TABLE IF NOT EXISTS {q}.outbox_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             checksum   TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         SET search_path TO {q};"
    ))
    .execute(&mut *conn)
    .await?;
    let done: Vec<(i32, String)> = sqlx::query_as(&format!(
        "SELECT version, checksum FROM {q}.outbox_migrations ORDER BY version"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        if let Some((_, checksum)) = done.iter().find(|(v, _)| *v == m.version) {
            if *checksum != m.checksum() {
                return Err(OutboxError::Migration(format!(
                    "migration {} ({}) in schema {} was applied with different SQL; \
                     migrations must never be edited after release: add a new one instead",
                    m.version,
                    m.name,
                    schema.name()
                )));
            }
            continue;
        }
        let record = format!(
            "INSERT INTO {q}.outbox_migrations (version, name, checksum) VALUES ($1, $2, $3)"
        );
        let run = |e: sqlx::Error| {
            OutboxError::Migration(format!(
                "migration {} ({}) failed in schema {}: {e}",
                m.version,
                m.name,
                schema.name()
            ))
        };
        if m.no_transaction() {
            sqlx::raw_sql(m.sql)
                .execute(&mut *conn)
                .await
                .map_err(run)?;
            sqlx::query(&record)
                .bind(m.version)
                .bind(m.name)
                .bind(m.checksum())
                .execute(&mut *conn)
                .await?;
        } else {
            let mut tx = conn.begin().await?;
            sqlx::raw_sql(m.sql).execute(&mut *tx).await.map_err(run)?;
            sqlx::query(&record)
                .bind(m.version)
                .bind(m.name)
                .bind(m.checksum())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        tracing::info!(
            schema = schema.name(),
            version = m.version,
            name = m.name,
            "applied outbox migration"
        );
        applied.push(m.version);
    }
    Ok(applied)
}
