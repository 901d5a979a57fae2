//! The replication slot and publication the stream relay reads through, and what a DBA
//! wants to know about them: does the server keep logical WAL at all, does the slot exist,
//! is a relay on it, how far behind is it and how much WAL does it hold.

use sqlx::PgPool;

use super::lsn::Lsn;
use super::StreamError;

/// A validated slot name (`[a-z_][a-z0-9_]*`, at most 63 bytes); the publication the relay
/// names has the same name (slots and publications are separate namespaces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotName(String);

impl SlotName {
    pub fn new(name: impl Into<String>) -> Result<Self, StreamError> {
        let name = name.into();
        if !outbox_core::config::is_identifier(&name) || name.len() > 63 {
            return Err(StreamError::Config(format!(
                "slot name {name:?}: use lower-case letters, digits and underscores, at most \
                 63 bytes, starting with a letter or underscore"
            )));
        }
        Ok(Self(name))
    }

    /// The default slot of a schema's outbox: `outbox_<schema>`.
    pub fn for_schema(schema: &crate::Schema) -> Result<Self, StreamError> {
        Self::new(format!("outbox_{}", schema.name()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Refuses (with what to do) unless the server writes logical WAL.
pub async fn require_logical_wal(pool: &PgPool) -> Result<(), StreamError> {
    let level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(pool)
        .await?;
    if level != "logical" {
        return Err(StreamError::WalLevel(level));
    }
    Ok(())
}

async fn publication_exists(pool: &PgPool, slot: &SlotName) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
        .bind(slot.as_str())
        .fetch_one(pool)
        .await
}

/// Creates the publication and the slot if they do not exist (idempotent; `outbox migrate`
/// calls it when a stream slot is configured). Returns whether the slot was created now.
pub async fn create_slot(pool: &PgPool, slot: &SlotName) -> Result<bool, StreamError> {
    require_logical_wal(pool).await?;
    let publication = publication_exists(pool, slot).await?;
    if !publication {
        // An empty publication: the relay wants logical messages only, and a publication
        // without tables makes pgoutput skip every row change instead of sending it.
        // The name is a validated identifier.
        match sqlx::raw_sql(&format!("CREATE PUBLICATION \"{slot}\""))
            .execute(pool)
            .await
        {
            Ok(_) => {}
            // Another process created it meanwhile.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => {}
            Err(e) => return Err(e.into()),
        }
    }
    let created = sqlx::query_scalar::<_, String>(
        "SELECT slot_name::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
    )
    .bind(slot.as_str())
    .fetch_one(pool)
    .await;
    match created {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42710") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Drops the slot and its publication (when a service leaves the stream write mode: a slot
/// nobody reads holds WAL forever). Refused while a relay streams from it.
pub async fn drop_slot(pool: &PgPool, slot: &SlotName) -> Result<(), StreamError> {
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(slot.as_str())
    .fetch_one(pool)
    .await?;
    if exists {
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(slot.as_str())
            .execute(pool)
            .await?;
    }
    sqlx::raw_sql(&format!("DROP PUBLICATION IF EXISTS \"{slot}\""))
        .execute(pool)
        .await?;
    Ok(())
}

/// A slot as `pg_replication_slots` and `pg_stat_replication` show it.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotStatus {
    pub slot: String,
    pub plugin: String,
    pub database: String,
    /// A relay streams from it now.
    pub active: bool,
    pub confirmed_flush: Option<Lsn>,
    /// WAL written since the slot's confirmed position: what the relay still has to read.
    pub lag_bytes: u64,
    /// WAL the server keeps for the slot (from its restart position).
    pub retained_bytes: u64,
    /// How long the confirmed position trails the server (from the active stream's
    /// replies; 0 without an active stream or when caught up).
    pub lag_seconds: f64,
    /// `reserved`, `extended`, `unreserved` or `lost` (the server removed WAL the slot
    /// needed: events were lost and the slot must be recreated).
    pub wal_status: String,
}

impl SlotStatus {
    /// One line for `outbox status`.
    pub fn describe(&self, limit: Option<u64>) -> String {
        let mut line = format!(
            "stream slot {}: {}, {} behind, {} of WAL retained{}, lag {:.1}s, wal {}",
            self.slot,
            if self.active {
                "streaming"
            } else {
                "no relay attached"
            },
            bytes(self.lag_bytes),
            bytes(self.retained_bytes),
            limit
                .map(|l| format!(" (limit {})", bytes(l)))
                .unwrap_or_default(),
            self.lag_seconds,
            self.wal_status,
        );
        if limit.is_some_and(|l| self.retained_bytes > l) {
            line.push_str(" - OVER THE LIMIT: start or fix the stream relay, or the disk fills");
        }
        line
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// A row of the slot query: name, plugin, database, active, confirmed position, lag bytes,
/// retained bytes, lag seconds, WAL status.
type SlotRow = (
    String,
    String,
    String,
    bool,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
    Option<String>,
);

/// The slot's state, or `None` if it does not exist.
pub async fn slot_status(
    pool: &PgPool,
    slot: &SlotName,
) -> Result<Option<SlotStatus>, StreamError> {
    let row: Option<SlotRow> = sqlx::query_as(
        "SELECT s.slot_name::text, coalesce(s.plugin::text, ''), coalesce(s.database::text, ''),
                    s.active, s.confirmed_flush_lsn::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::int8,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::int8,
                    extract(epoch FROM r.flush_lag)::float8,
                    s.wal_status
             FROM pg_replication_slots s
             LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
             WHERE s.slot_name = $1",
    )
    .bind(slot.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(
        |(slot, plugin, database, active, confirmed, lag, retained, lag_s, wal_status)| {
            SlotStatus {
                slot,
                plugin,
                database,
                active,
                confirmed_flush: confirmed.as_deref().and_then(Lsn::parse),
                lag_bytes: lag.unwrap_or(0).max(0) as u64,
                retained_bytes: retained.unwrap_or(0).max(0) as u64,
                lag_seconds: lag_s.unwrap_or(0.0),
                wal_status: wal_status.unwrap_or_default(),
            }
        },
    ))
}

/// What `outbox check` verifies: logical WAL, the slot (pgoutput, this database, WAL not
/// lost) and its publication. Each problem says what to do.
pub async fn check_slot(pool: &PgPool, slot: &SlotName) -> Result<SlotStatus, StreamError> {
    require_logical_wal(pool).await?;
    let Some(status) = slot_status(pool, slot).await? else {
        return Err(StreamError::Slot(format!(
            "replication slot {slot} does not exist: run `outbox migrate` with the stream \
             slot configured (it creates the slot and its publication)"
        )));
    };
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(pool)
        .await?;
    if status.plugin != "pgoutput" || status.database != database {
        return Err(StreamError::Slot(format!(
            "replication slot {slot} uses plugin {:?} on database {:?}; the relay needs \
             pgoutput on {database:?}: choose another slot name or drop that slot",
            status.plugin, status.database
        )));
    }
    if status.wal_status == "lost" {
        return Err(StreamError::Slot(format!(
            "replication slot {slot} lost WAL it needed (max_slot_wal_keep_size): events \
             committed while it lagged are gone from the stream. Drop and recreate the slot \
             (`outbox migrate`) and reconcile from the business tables"
        )));
    }
    let publication = publication_exists(pool, slot).await?;
    if !publication {
        return Err(StreamError::Slot(format!(
            "publication {slot} does not exist: run `outbox migrate` with the stream slot \
             configured"
        )));
    }
    Ok(status)
}
