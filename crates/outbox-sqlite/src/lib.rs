//! # outbox-sqlite
//!
//! The embedded default store of the outbox framework: one SQLite file per service, in WAL
//! mode, with the same semantics as the PostgreSQL store (transactional enqueue, partition
//! leases, fenced completions, retries, dead letters, retention, inbox, schema check).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::{AggregateRef, NewEvent, Topic};
//! let pool = outbox_sqlite::connect("sqlite://file_service.db").await?;
//! outbox_sqlite::migrate(&pool).await?;
//! let outbox = outbox_sqlite::SqliteOutbox::new(outbox_sqlite::SqliteDialect);
//! let mut tx = outbox_sqlite::begin(&pool).await?; // BEGIN IMMEDIATE: take the write lock up front
//! sqlx::query("INSERT INTO files (id) VALUES (?)").bind("f-1").execute(&mut *tx).await?;
//! let event = NewEvent::new(Topic::new("file.added.v1")?, AggregateRef::new("file", "f-1")?, "{}");
//! outbox.enqueue(&mut tx, &event).await?;
//! outbox.commit(tx).await?;
//! # Ok(()) }
//! ```
//!
//! SQLite has one writer at a time, so sequence order is commit order without extra locks.
//! Times are the machine's clock in milliseconds; relays sharing a file share that clock.
//!
//! The store logic (relay store, admin, inbox, write path) is `outbox-sql`'s, shared with
//! the other stores; this crate is SQLite's [`SqliteDialect`], its connection settings and
//! its migrations.

mod dialect;
mod watch;

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

pub use dialect::SqliteDialect;
pub use outbox_sql::{InboxEvent, SqlHandler};
pub use watch::watch_for_commits;

/// The relay's (and operators') view of `event_outbox`: `SqliteRelayStore::new(pool, SqliteDialect)`.
pub type SqliteRelayStore = outbox_sql::SqlRelayStore<SqliteDialect>;
/// The `event_inbox` table: `SqliteInbox::new(pool, SqliteDialect)`.
pub type SqliteInbox = outbox_sql::SqlInbox<SqliteDialect>;
/// The write path: `SqliteOutbox::new(SqliteDialect)`.
pub type SqliteOutbox = outbox_sql::SqlOutbox<SqliteDialect>;
/// A [`SqlHandler`] on SQLite with the inbox around it.
pub type SqliteInboxHandler<H> = outbox_sql::SqlInboxHandler<SqliteDialect, H>;

/// Errors of the SQLite outbox.
#[derive(Debug, thiserror::Error)]
pub enum SqliteOutboxError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox migration error: {0}")]
    Migration(String),
    #[error("outbox tables in this SQLite database are not what this version expects:\n{}\nfix: call outbox_sqlite::migrate at start-up (or run `outbox migrate`)", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    SchemaMismatch(Vec<String>),
    #[error("event {event_id}: {reason}")]
    InvalidEvent { event_id: String, reason: String },
}

impl From<outbox_sql::EnqueueError> for SqliteOutboxError {
    fn from(e: outbox_sql::EnqueueError) -> Self {
        match e {
            outbox_sql::EnqueueError::Database(e) => Self::Database(e),
            outbox_sql::EnqueueError::InvalidEvent { event_id, reason } => {
                Self::InvalidEvent { event_id, reason }
            }
        }
    }
}

/// How hard a commit holds on to the disk (SQLite's `synchronous` in WAL mode).
///
/// | | a commit survives | costs |
/// |---|---|---|
/// | [`Durability::Full`] (default) | a process crash and a power loss or OS crash | an fsync of the WAL per commit |
/// | [`Durability::Normal`] | a process crash; a power loss may take the last commits back | nothing per commit |
///
/// `Normal` is safe only where nothing outside this file can have acted on a commit that a
/// power loss takes back. With an external broker something can: an event the relay
/// published (and Kafka acknowledged) whose state change then vanishes, or a consumer's inbox
/// row that vanishes after its offset was committed, so the effect is lost for good. Keep
/// `Normal` for the in-process bus, whose log is in memory and dies with the process anyway.
/// BENCHMARKS.md has the write cost of each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    #[default]
    Full,
    Normal,
}

/// Opens (creating if missing) a SQLite database in WAL mode with a busy timeout, suitable
/// for writers and relays in one process, with durable commits ([`Durability::Full`]).
pub async fn connect(url: &str) -> Result<SqlitePool, SqliteOutboxError> {
    connect_with(url, Durability::Full).await
}

/// Like [`connect`], with the durability of commits chosen (see [`Durability`]).
pub async fn connect_with(
    url: &str,
    durability: Durability,
) -> Result<SqlitePool, SqliteOutboxError> {
    let synchronous = match durability {
        Durability::Full => SqliteSynchronous::Full,
        Durability::Normal => SqliteSynchronous::Normal,
    };
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    Ok(SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await?)
}

/// Whether `error` says the database cannot be used now rather than that a statement failed:
/// busy or locked past the busy timeout, out of memory, an I/O error, the disk full, the file
/// unopenable or read-only, or the pool gone or timed out.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Extended result codes carry the primary code in their low byte.
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14)),
        _ => false,
    }
}

/// Begins a write transaction that holds SQLite's write lock from the start
/// (`BEGIN IMMEDIATE`), so it never fails later on a lock upgrade.
pub async fn begin(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "event_outbox",
        include_str!("../migrations/0001_event_outbox.sql"),
    ),
    (
        2,
        "event_inbox",
        include_str!("../migrations/0002_event_inbox.sql"),
    ),
    (
        3,
        "relay_activity",
        include_str!("../migrations/0003_relay_activity.sql"),
    ),
];

/// Applies the embedded migrations not yet applied; returns the versions applied now.
pub async fn migrate(pool: &SqlitePool) -> Result<Vec<i64>, SqliteOutboxError> {
    let mut tx = begin(pool).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS outbox_migrations (
             version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM outbox_migrations")
        .fetch_all(&mut *tx)
        .await?;
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(|e| {
            SqliteOutboxError::Migration(format!("migration {version} ({name}) failed: {e}"))
        })?;
        sqlx::query("INSERT INTO outbox_migrations VALUES (?, ?, datetime('now'))")
            .bind(version)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    Ok(applied)
}

const INDEXES: &[&str] = &[
    "event_outbox_event_id_key",
    "event_outbox_pending_idx",
    "event_outbox_retry_idx",
    "event_outbox_dead_idx",
    "event_outbox_published_idx",
    "event_inbox_processed_idx",
];

/// Verifies tables, columns and indexes; reports every problem found.
pub async fn check_schema(pool: &SqlitePool) -> Result<(), SqliteOutboxError> {
    let problems =
        outbox_sql::schema::problems::<SqliteDialect>(pool, &dialect::catalog(), INDEXES).await?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SqliteOutboxError::SchemaMismatch(problems))
    }
}
