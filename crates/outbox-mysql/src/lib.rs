//! # outbox-mysql
//!
//! The MySQL and MariaDB store of the outbox framework, with the same guarantees as the
//! PostgreSQL and SQLite stores: the event row in the caller's transaction, sequence order
//! equal to commit order per aggregate, partition leases on the database clock with fencing,
//! idempotency keys, retries and dead letters, the inbox, retention, admin, schema check
//! and migrations. The store logic is `outbox-sql`'s; this crate is [`MySqlDialect`] (its
//! statements), the session settings and the migrations.
//!
//! Expected to work: MySQL 8.0.4 and later (`JSON_TABLE`), MariaDB 10.6 and
//! later. Tested: MariaDB 10.11.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::{AggregateRef, NewEvent, Topic};
//! use outbox_mysql::{MySqlDialect, MySqlOutbox};
//!
//! let pool = outbox_mysql::connect("mysql://root@127.0.0.1:3306/shop").await?;
//! outbox_mysql::migrate(&pool).await?;
//! let outbox = MySqlOutbox::new(MySqlDialect);
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES (?)").bind("o-1").execute(&mut *tx).await?;
//! let event = NewEvent::new(Topic::new("shop.order.placed.v1")?, AggregateRef::new("order", "o-1")?, "{}");
//! outbox.enqueue(&mut tx, &event).await?;
//! outbox.commit(tx).await?;
//! # Ok(()) }
//! ```
//!
//! ## Sessions
//! [`connect`] opens sessions as the store expects them: `READ COMMITTED` (no gap locks
//! between relays and writers, and each statement sees what committed before it), UTC (the
//! millisecond clock never repeats an hour), strict mode with ANSI quoting and `||` as
//! concatenation (the SQL dialect the essay platform's services share with PostgreSQL and
//! SQLite). A pool opened elsewhere should apply [`SESSION_SETTINGS`].
//!
//! ## Text
//! Text columns compare byte for byte (`utf8mb4_bin`), as in PostgreSQL and SQLite: `Order`
//! and `order` are different aggregates. sqlx reports such columns as binary; read them
//! with `CAST(column AS CHAR)` in queries of your own.
//!
//! ## Ordering of writers
//! `enqueue` locks the aggregate's bucket row (`event_outbox_write_lock`, 1,024 buckets) in
//! the insert itself (`INSERT ... SELECT ... FOR UPDATE`, one round trip) until the
//! transaction ends, so writers of one aggregate commit in sequence order. MySQL's
//! named locks (`GET_LOCK`) would outlive a rolled-back transaction: they belong to the
//! session. A transaction that enqueues for several aggregates should enqueue them with
//! `enqueue_all` or in a consistent order, as with any row locks; InnoDB aborts one of two
//! writers that deadlock (error 1213, which reads as "unavailable": run it again).

mod dialect;
#[cfg(feature = "testing")]
pub mod testing;

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Connection, Executor, MySqlPool};

pub use dialect::MySqlDialect;
pub use outbox_sql::{InboxEvent, SqlHandler};

/// The relay's (and operators') view of `event_outbox`: `MySqlRelayStore::new(pool, MySqlDialect)`.
pub type MySqlRelayStore = outbox_sql::SqlRelayStore<MySqlDialect>;
/// The `event_inbox` table: `MySqlInbox::new(pool, MySqlDialect)`.
pub type MySqlInbox = outbox_sql::SqlInbox<MySqlDialect>;
/// The write path: `MySqlOutbox::new(MySqlDialect)`.
pub type MySqlOutbox = outbox_sql::SqlOutbox<MySqlDialect>;
/// A [`SqlHandler`] on MySQL with the inbox around it.
pub type MySqlInboxHandler<H> = outbox_sql::SqlInboxHandler<MySqlDialect, H>;

/// Errors of the MySQL outbox.
#[derive(Debug, thiserror::Error)]
pub enum MySqlOutboxError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("outbox migration error: {0}")]
    Migration(String),
    #[error("outbox tables in this MySQL database are not what this version expects:\n{}\nfix: call outbox_mysql::migrate at start-up (or run `outbox migrate`)", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    SchemaMismatch(Vec<String>),
    #[error("{0}")]
    Unsupported(String),
}

/// The session settings the store expects (see the module docs), one statement each.
pub const SESSION_SETTINGS: &[&str] = &[
    "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET time_zone = '+00:00', sql_mode = 'STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,\
     ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION,ANSI_QUOTES,PIPES_AS_CONCAT'",
];

/// Pool options with [`SESSION_SETTINGS`] applied to each new connection (16 connections,
/// 10 s to wait for one); change what you need and open the pool with [`connect_with`].
pub fn pool_options() -> MySqlPoolOptions {
    MySqlPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| {
            Box::pin(async move {
                for setting in SESSION_SETTINGS {
                    conn.execute(*setting).await?;
                }
                Ok(())
            })
        })
}

/// Opens a pool with `options` (start from [`pool_options`]) and checks the server's version.
pub async fn connect_with(
    url: &str,
    options: MySqlPoolOptions,
) -> Result<MySqlPool, MySqlOutboxError> {
    connect_to(MySqlConnectOptions::from_str(url)?, options).await
}

/// Like [`connect_with`], from parsed connection options (TLS and the rest kept as given).
pub async fn connect_to(
    connection: MySqlConnectOptions,
    options: MySqlPoolOptions,
) -> Result<MySqlPool, MySqlOutboxError> {
    let pool = options.connect_with(connection).await?;
    check_version(&pool).await?;
    Ok(pool)
}

/// Opens a pool of `size` connections with [`SESSION_SETTINGS`] applied to each.
pub async fn connect_with_size(url: &str, size: u32) -> Result<MySqlPool, MySqlOutboxError> {
    connect_with(url, pool_options().max_connections(size)).await
}

/// Opens a pool of 16 connections with [`SESSION_SETTINGS`] applied to each.
pub async fn connect(url: &str) -> Result<MySqlPool, MySqlOutboxError> {
    connect_with(url, pool_options()).await
}

/// Refuses servers without `JSON_TABLE` (MariaDB before 10.6, MySQL before 8.0.4).
async fn check_version(pool: &MySqlPool) -> Result<(), MySqlOutboxError> {
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(pool)
        .await?;
    let numbers: Vec<u32> = version
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .filter_map(|n| n.parse().ok())
        .collect();
    let at_least = |min: &[u32]| numbers.as_slice() >= min;
    let ok = if version.to_ascii_lowercase().contains("mariadb") {
        at_least(&[10, 6])
    } else {
        at_least(&[8, 0, 4])
    };
    if ok {
        Ok(())
    } else {
        Err(MySqlOutboxError::Unsupported(format!(
            "server version {version} is too old for the outbox: use MariaDB 10.6 or later, or MySQL 8.0.4 or later"
        )))
    }
}

/// Whether `error` says the database cannot be used now rather than that a statement failed:
/// the connection lost or refused, the pool timed out, the server shutting down, out of
/// connections, memory or disk, read-only (a fail-over in progress), or a lock wait timeout
/// or deadlock (run the same work again and it passes).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    if outbox_sql::dialect::is_connection_trouble(error) {
        return true;
    }
    match error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
            .is_some_and(|e| {
                matches!(
                    e.number(),
                    // out of memory, disk full, too many connections, shutdown in progress,
                    // lock wait timeout, deadlock, read-only, connection killed, server gone
                    1037 | 1038
                        | 1021
                        | 1040
                        | 1053
                        | 1205
                        | 1213
                        | 1290
                        | 1836
                        | 1927
                        | 2006
                        | 2013
                )
            }),
        _ => false,
    }
}

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
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
];

/// Applies the embedded migrations not yet applied to the connection's database; returns the
/// versions applied now. Safe to call from many processes at once: they take turns under a
/// named lock (MySQL commits each DDL statement by itself, so a transaction cannot do it).
pub async fn migrate(pool: &MySqlPool) -> Result<Vec<i64>, MySqlOutboxError> {
    let mut conn = pool.acquire().await?;
    let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('outbox_migrate', 60)")
        .fetch_one(&mut *conn)
        .await?;
    if locked != Some(1) {
        return Err(MySqlOutboxError::Migration(
            "another process has held the migration lock for 60 s; is a migration stuck?".into(),
        ));
    }
    let applied = apply(&mut conn).await;
    let _ = sqlx::query("DO RELEASE_LOCK('outbox_migrate')")
        .execute(&mut *conn)
        .await;
    applied
}

async fn apply(conn: &mut sqlx::MySqlConnection) -> Result<Vec<i64>, MySqlOutboxError> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS outbox_migrations (
             version BIGINT PRIMARY KEY, name VARCHAR(255) NOT NULL,
             applied_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
    )
    .execute(&mut *conn)
    .await?;
    let done: Vec<i64> = sqlx::query_scalar("SELECT version FROM outbox_migrations")
        .fetch_all(&mut *conn)
        .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        if done.contains(&m.version) {
            continue;
        }
        sqlx::raw_sql(m.sql)
            .execute(&mut *conn)
            .await
            .map_err(|e| {
                MySqlOutboxError::Migration(format!(
                    "migration {} ({}) failed: {e}; MySQL commits DDL statement by statement, so \
                 drop the tables it created before running it again",
                    m.version, m.name
                ))
            })?;
        sqlx::query("INSERT INTO outbox_migrations (version, name) VALUES (?, ?)")
            .bind(m.version)
            .bind(m.name)
            .execute(&mut *conn)
            .await?;
        applied.push(m.version);
    }
    conn.ping().await?;
    Ok(applied)
}

const INDEXES: &[&str] = &[
    "event_outbox_event_id_key",
    "event_outbox_status_idx",
    "event_outbox_retry_idx",
    "event_outbox_published_idx",
    "event_inbox_processed_idx",
];

/// Verifies tables, columns, indexes and partition rows; reports every problem found.
pub async fn check_schema(pool: &MySqlPool) -> Result<(), MySqlOutboxError> {
    let problems =
        outbox_sql::schema::problems::<MySqlDialect>(pool, &dialect::catalog(), INDEXES).await?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(MySqlOutboxError::SchemaMismatch(problems))
    }
}
