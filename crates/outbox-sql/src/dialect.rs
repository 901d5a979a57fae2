//! A [`Dialect`]: what one database adds to the shared store logic, and little else.
//!
//! - its statements (the text, with `@name` parameters; see [`crate::statement`]),
//! - its type mapping: how an id, a list or a batch of fenced events is bound ([`Arg`]) and
//!   how an event id is read back,
//! - how a write transaction begins (SQLite's `BEGIN IMMEDIATE`),
//! - which of its errors mean "unavailable" rather than "this statement failed".
//!
//! Every statement returns its columns in the order [`crate::SqlRelayStore`] reads them,
//! integers as 64-bit and times as milliseconds, so that one decoder serves every database.

use futures::future::BoxFuture;
use outbox_core::{EventId, FailedAttempt, Fenced, PartitionLease, PartitionNo, RelayId};
use sqlx::{Database, Pool, Transaction};

use crate::engine::{Engine, Query};
use crate::statement::{Placeholders, Script, Statement};

/// Every parameter name a statement may use.
pub const PARAMS: &[&str] = &[
    "relay",
    "name",
    "lease_ms",
    "max",
    "partitions",
    "limit",
    "in_flight",
    "seq",
    "error",
    "seqs",
    "leases",
    "fenced",
    "failures",
    "retention_ms",
    "activity",
    "topic",
    "aggregate_id",
    "error_contains",
    "older_than_ms",
    "event_id",
    "since_ms",
    "consumer",
    "event_type",
    "partition",
    "offset",
    "lock_key",
    "aggregate_type",
    "message_key",
    "headers",
    "payload",
    "idempotency_key",
];

/// A value bound to a named parameter.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    Int(i64),
    OptInt(Option<i64>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Bytes(&'a [u8]),
    /// A relay's id (`uuid` in PostgreSQL, text elsewhere).
    Relay(RelayId),
    /// An event id, or NULL.
    EventId(Option<EventId>),
    /// A list of integers (an array in PostgreSQL, a JSON array elsewhere).
    Ints(&'a [i64]),
    Partitions(&'a [PartitionNo]),
    /// `(partition, fence)` pairs.
    Leases(&'a [PartitionLease]),
    /// `(seq, partition, fence)` triples.
    Fenced(&'a [Fenced]),
    /// `(seq, partition, fence, attempts, error, dead, delay_ms)` rows.
    Failures(&'a [FailedAttempt]),
}

/// The statements of the relay's store.
pub struct RelaySql {
    /// `@relay, @name, @lease_ms` -> one row: live relays, this one included.
    pub heartbeat: Script,
    /// `@relay, @lease_ms` -> rows `(partition, fence)` of every lease still held.
    pub renew: Script,
    /// `@relay, @max, @lease_ms` -> rows `(partition, fence)` taken (may include those held).
    pub acquire: Script,
    /// `@relay, @partitions`.
    pub release: Script,
    /// `@relay`.
    pub deregister: Script,
    /// `@relay, @name` -> counts the partitions released.
    pub take_over: Script,
    /// `@limit, @in_flight` (and `@partitions` for `claim_some`) -> claimed rows: seq,
    /// event_id, aggregate_type, aggregate_id, partition, event_type, topic, message_key,
    /// headers (JSON text), payload, attempts, age_ms.
    pub claim_all: Script,
    pub claim_some: Script,
    /// `@seq, @error`: parks a malformed row as dead.
    pub bury: Script,
    /// `@relay, @seqs, @leases`: completes the events if every lease is still held.
    pub complete_delete_gated: Script,
    pub complete_retain_gated: Script,
    /// `@relay, @fenced`: completes each event whose own lease is still held.
    pub complete_delete: Script,
    pub complete_retain: Script,
    /// `@relay, @failures`.
    pub fail: Script,
    /// `@retention_ms, @limit`.
    pub purge: Script,
    /// -> one row: pending, retrying, dead, published, oldest_pending_age_ms, live_relays,
    /// dead_tuples, table_bytes, pending_span, retrying_estimate, dead_estimate,
    /// published_estimate (the last six may be NULL).
    pub stats: Script,
    /// `@relay, @activity`.
    pub report_activity: Script,
    /// -> rows `(activity)` of live relays.
    pub live_activity: Script,
}

/// The statements of operators' actions ([`outbox_core::OutboxAdmin`]). The filter is
/// `@topic, @aggregate_id, @error_contains, @older_than_ms, @event_id`; records are read as
/// seq, event_id, topic, aggregate_type, aggregate_id, event_type, status, attempts,
/// last_error, age_ms, headers, payload.
pub struct AdminSql {
    /// -> rows: topic, pending, dead, published, oldest_pending_age_ms.
    pub topic_status: Script,
    /// filter + `@limit` -> records.
    pub dead: Script,
    /// `@event_id` -> a record.
    pub event: Script,
    /// filter.
    pub requeue: Script,
    /// filter.
    pub purge_dead: Script,
    /// `@topic, @since_ms, @aggregate_id` -> one row: how many.
    pub replay_count: Script,
    /// `@topic, @since_ms, @aggregate_id` -> counts.
    pub replay: Script,
}

/// What differs between databases in the admin statements; [`AdminSql::from_parts`] builds
/// the rest.
pub struct AdminParts<'a> {
    /// The outbox table (schema-qualified where the database has schemas).
    pub table: &'a str,
    /// The record's columns, in the order of [`AdminSql`].
    pub record: &'a str,
    /// The filter condition over `@topic, @aggregate_id, @error_contains, @older_than_ms,
    /// @event_id` (each NULL when not filtered on).
    pub filter: &'a str,
    /// Retained events of `@topic` published within `@since_ms`, of `@aggregate_id` if set.
    pub replay_match: &'a str,
    /// The per-topic counts, in the order of [`AdminSql::topic_status`].
    pub topic_status: &'a str,
}

impl AdminSql {
    /// The admin statements from a dialect's [`AdminParts`], compiled by `script`.
    pub fn from_parts(parts: AdminParts<'_>, script: impl Fn(&[&str]) -> Script) -> Self {
        let AdminParts {
            table: t,
            record,
            filter,
            replay_match,
            topic_status,
        } = parts;
        Self {
            topic_status: script(&[topic_status]),
            dead: script(&[&format!(
                "SELECT {record} FROM {t} WHERE status = 'dead' AND {filter}
                 ORDER BY seq LIMIT @limit"
            )]),
            event: script(&[&format!(
                "SELECT {record} FROM {t} WHERE event_id = @event_id"
            )]),
            requeue: script(&[&format!(
                "UPDATE {t} SET status = 'pending', attempts = 0, retry_at = NULL, dead_at = NULL
                 WHERE status = 'dead' AND {filter}"
            )]),
            purge_dead: script(&[&format!(
                "DELETE FROM {t} WHERE status = 'dead' AND {filter}"
            )]),
            replay_count: script(&[&format!("SELECT count(*) FROM {t} WHERE {replay_match}")]),
            replay: script(&[&format!(
                "UPDATE {t} SET status = 'pending', published_at = NULL, attempts = 0
                 WHERE {replay_match}"
            )]),
        }
    }
}

/// The statements of the consumer inbox.
pub struct InboxSql {
    /// `@consumer, @event_id, @event_type, @topic, @partition, @offset` -> counts 1 when
    /// recorded now, 0 (or a unique violation) when recorded before.
    pub record: Script,
    /// `@consumer, @event_id` -> one row: 1 when recorded.
    pub seen: Script,
    /// `@retention_ms, @limit` -> counts.
    pub purge: Script,
}

/// What a database adds to the shared store logic; see the module docs.
pub trait Dialect: Clone + Send + Sync + 'static {
    type DB: Engine;

    const PLACEHOLDERS: Placeholders;

    /// Binds the values whose representation is this database's own ([`Arg::Relay`],
    /// [`Arg::EventId`] and the lists); the others are bound the same way everywhere.
    fn bind_own<'q>(query: Query<'q, Self::DB>, arg: Arg<'q>) -> Query<'q, Self::DB>;

    /// Reads an event id stored in column `i`.
    fn event_id(row: &<Self::DB as Database>::Row, i: usize) -> Result<EventId, String>;

    /// Whether `error` says the database cannot be used now (connection lost, pool timed
    /// out, shutting down, locked, out of space) rather than that a statement failed.
    fn is_unavailable(error: &sqlx::Error) -> bool;

    /// Begins a transaction for a write.
    fn begin(
        pool: &Pool<Self::DB>,
    ) -> BoxFuture<'_, Result<Transaction<'static, Self::DB>, sqlx::Error>> {
        Box::pin(pool.begin())
    }

    fn relay_sql(&self) -> RelaySql;
    fn admin_sql(&self) -> AdminSql;
    fn inbox_sql(&self) -> InboxSql;

    /// A script of `texts` in this dialect's placeholders.
    fn script(texts: &[&str]) -> Script {
        Script::new(
            texts
                .iter()
                .map(|t| Statement::compile(t, Self::PLACEHOLDERS, PARAMS))
                .collect(),
        )
    }

    /// Like [`Dialect::script`], with `{now}` in the texts replaced by `now` (the database
    /// clock in milliseconds, for stores that keep times as integers).
    fn script_at(now: &str, texts: &[&str]) -> Script {
        let owned: Vec<String> = texts.iter().map(|t| t.replace("{now}", now)).collect();
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        Self::script(&refs)
    }
}

/// [`Dialect::bind_own`] for databases that keep ids as text and read lists as JSON
/// (SQLite, MySQL).
pub fn bind_as_text<'q, D: Dialect>(query: Query<'q, D::DB>, arg: Arg<'q>) -> Query<'q, D::DB> {
    let text = match arg {
        Arg::Relay(r) => r.to_string(),
        Arg::EventId(None) => return D::DB::bind_text(query, None),
        Arg::EventId(Some(id)) => id.to_string(),
        Arg::Ints(v) => json::ints(v),
        Arg::Partitions(v) => json::partitions(v),
        Arg::Leases(v) => json::leases(v),
        Arg::Fenced(v) => json::fenced(v),
        Arg::Failures(v) => json::failures(v),
        plain => return bind::<D>(query, plain),
    };
    D::DB::bind_string(query, text)
}

/// [`Dialect::event_id`] for databases that keep event ids as text.
pub fn event_id_from_text<D: Dialect>(
    row: &<D::DB as Database>::Row,
    i: usize,
) -> Result<EventId, String> {
    let text = D::DB::text(row, i).map_err(|e| e.to_string())?;
    text.parse().map_err(|e| format!("{e}"))
}

/// Whether `error` is trouble with the connection itself rather than with a statement:
/// lost or refused, TLS, the pool closed or timed out, its worker gone.
pub fn is_connection_trouble(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Binds `arg` to `query` for dialect `D`.
pub fn bind<'q, D: Dialect>(query: Query<'q, D::DB>, arg: Arg<'q>) -> Query<'q, D::DB> {
    match arg {
        Arg::Int(v) => D::DB::bind_int(query, Some(v)),
        Arg::OptInt(v) => D::DB::bind_int(query, v),
        Arg::Text(v) => D::DB::bind_text(query, Some(v)),
        Arg::OptText(v) => D::DB::bind_text(query, v),
        Arg::Bytes(v) => D::DB::bind_bytes(query, v),
        own => D::bind_own(query, own),
    }
}

/// The lists as JSON arrays, for databases that read them with `json_each` or `JSON_TABLE`.
pub mod json {
    use outbox_core::{AfterFailure, FailedAttempt, Fenced, PartitionLease, PartitionNo};
    use serde_json::json;

    pub fn ints(values: &[i64]) -> String {
        serde_json::to_string(values).expect("numbers serialise")
    }

    pub fn partitions(values: &[PartitionNo]) -> String {
        serde_json::to_string(values).expect("numbers serialise")
    }

    /// `[[partition, fence], ...]`
    pub fn leases(values: &[PartitionLease]) -> String {
        let rows: Vec<_> = values
            .iter()
            .map(|l| json!([l.partition, l.fence]))
            .collect();
        serde_json::to_string(&rows).expect("numbers serialise")
    }

    /// `[[seq, partition, fence], ...]`
    pub fn fenced(values: &[Fenced]) -> String {
        let rows: Vec<_> = values
            .iter()
            .map(|f| json!([f.seq, f.lease.partition, f.lease.fence]))
            .collect();
        serde_json::to_string(&rows).expect("numbers serialise")
    }

    /// `[[seq, partition, fence, attempts, error, dead (0/1), delay_ms], ...]`
    pub fn failures(values: &[FailedAttempt]) -> String {
        let rows: Vec<_> = values
            .iter()
            .map(|f| {
                let (dead, delay) = match f.next {
                    AfterFailure::Dead => (1, 0),
                    AfterFailure::RetryIn(d) => (0, crate::millis(d)),
                };
                json!([
                    f.event.seq,
                    f.event.lease.partition,
                    f.event.lease.fence,
                    f.attempts,
                    f.error,
                    dead,
                    delay
                ])
            })
            .collect();
        serde_json::to_string(&rows).expect("values serialise")
    }
}
