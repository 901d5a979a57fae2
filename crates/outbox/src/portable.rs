//! Write a service once, run it on SQLite (embedded), PostgreSQL or MySQL/MariaDB.
//!
//! [`ServiceDb`] opens the service's database by URL, applies the outbox migrations, and hands
//! out [`Tx`] transactions in which business SQL and [`Tx::enqueue`] commit together. SQL is
//! written in the dialect PostgreSQL and SQLite share: `$1`-style placeholders, `BIGINT`,
//! `TEXT`, `DOUBLE PRECISION`, `ON CONFLICT`, `RETURNING`. On MySQL/MariaDB each statement is
//! rewritten once (placeholders, `ON CONFLICT`, `UPDATE ... RETURNING` read back by the
//! `WHERE`'s first condition, which must be the row's key; key columns' types in DDL; see
//! `portable/mysql.rs`). On PostgreSQL each session's `search_path`
//! starts with the service's schema, so unqualified table names resolve to the service's own
//! tables there as they do in its own SQLite file.
//!
//! Consumers implement [`TxHandler`]; [`InboxHandler`] wraps one with the inbox, so each event
//! takes effect once: the `(consumer, event_id)` row, the handler's changes and the events it
//! enqueues commit in one transaction.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::portable::{params, ServiceDb};
//! use outbox::{AggregateRef, NewEvent, Topic};
//!
//! let db = ServiceDb::open("sqlite://orders.db", "orders").await?;
//! db.execute_script("CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, cents BIGINT)").await?;
//! let mut tx = db.begin().await?;
//! tx.execute("INSERT INTO orders (id, cents) VALUES ($1, $2)", params!["o-1", 1250]).await?;
//! let event = NewEvent::json(
//!     Topic::new("shop.order.placed.v1")?,
//!     AggregateRef::new("order", "o-1")?,
//!     &serde_json::json!({"order_id": "o-1"}),
//! )?;
//! tx.enqueue(&event).await?;
//! tx.commit().await?; // the order and its event, or neither
//! # Ok(()) }
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use outbox_core::{
    ConsumerMetrics, EffectHandler, EnqueueOutcome, EventId, Handled, HandlerError, Inbox,
    InboxStore, InboxStoreError, IncomingMessage, MessageHandler, NewEvent, TableMetrics,
    WakeSignal,
};
use outbox_mysql::{MySqlInbox, MySqlOutbox};
use outbox_postgres::{PgInbox, PgOutbox};
use outbox_sqlite::{SqliteInbox, SqliteOutbox};
use sqlx::mysql::MySqlRow;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{
    Column, MySql, MySqlConnection, PgConnection, Postgres, Row as _, Sqlite, SqliteConnection,
    Transaction, TypeInfo, ValueRef,
};

use crate::backend::{BackendError, Database};

mod mysql;

/// A failed database call; the message names the statement's problem.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("column {column:?}: {problem}")]
    Column { column: String, problem: String },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Invalid(String),
}

impl DbError {
    fn column(column: &str, problem: impl Into<String>) -> Self {
        Self::Column {
            column: column.to_owned(),
            problem: problem.into(),
        }
    }
}

impl From<outbox_postgres::OutboxError> for DbError {
    fn from(e: outbox_postgres::OutboxError) -> Self {
        Self::Backend(e.into())
    }
}

impl From<outbox_sql::EnqueueError> for DbError {
    fn from(e: outbox_sql::EnqueueError) -> Self {
        match e {
            outbox_sql::EnqueueError::Database(e) => Self::Sql(e),
            invalid => Self::Invalid(invalid.to_string()),
        }
    }
}

impl From<outbox_sqlite::SqliteOutboxError> for DbError {
    fn from(e: outbox_sqlite::SqliteOutboxError) -> Self {
        Self::Backend(e.into())
    }
}

impl From<DbError> for HandlerError {
    /// Database trouble is worth retrying; bad input is rejected before SQL runs.
    fn from(e: DbError) -> Self {
        HandlerError::retry(e)
    }
}

/// A parameter or a column value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    /// Binary data: `BYTEA` in the shared DDL (PostgreSQL's type; SQLite stores it as a blob).
    Bytes(Vec<u8>),
    /// A NULL parameter of a known type (from a `None` of that type): PostgreSQL checks a
    /// parameter's type against its column, so an untyped NULL (bound as text) cannot go into
    /// a `BIGINT` column.
    TypedNull(Kind),
}

/// The type of a [`Value::TypedNull`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Text,
    Bytes,
}

/// Types that bind as one [`Kind`] of value (what a `None` of them binds as).
pub trait Typed {
    const KIND: Kind;
}

macro_rules! typed {
    ($($t:ty => $k:ident),* $(,)?) => {$(
        impl Typed for $t { const KIND: Kind = Kind::$k; }
    )*};
}
typed!(i64 => Int, i32 => Int, u32 => Int, usize => Int, bool => Int, f64 => Float,
       String => Text, &str => Text, &String => Text, Vec<u8> => Bytes, &[u8] => Bytes);

macro_rules! value_from {
    ($($t:ty => $v:ident $(as $cast:ty)?),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Self { Value::$v(x $(as $cast)?) }
        }
    )*};
}
value_from!(i64 => Int, i32 => Int as i64, u32 => Int as i64, usize => Int as i64,
            f64 => Float, String => Text);

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Int(b as i64)
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Text(s.clone())
    }
}
impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Self {
        Value::Bytes(b)
    }
}
impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Self {
        Value::Bytes(b.to_vec())
    }
}
impl<T: Into<Value> + Typed> From<Option<T>> for Value {
    fn from(o: Option<T>) -> Self {
        o.map_or(Value::TypedNull(T::KIND), Into::into)
    }
}

/// `params![a, b]` turns values into a `&[Value]` for [`Tx::execute`] and friends.
#[macro_export]
macro_rules! params {
    ($($v:expr),* $(,)?) => { &[$($crate::portable::Value::from($v)),*][..] };
}
pub use crate::params;

/// One result row, read by column name.
#[derive(Clone, Debug)]
pub struct Row {
    columns: Arc<[String]>,
    values: Vec<Value>,
}

impl Row {
    fn get(&self, column: &str) -> Result<&Value, DbError> {
        self.columns
            .iter()
            .position(|c| c == column)
            .map(|i| &self.values[i])
            .ok_or_else(|| DbError::column(column, "not in the result; select it"))
    }

    pub fn int(&self, column: &str) -> Result<i64, DbError> {
        self.opt_int(column)?
            .ok_or_else(|| DbError::column(column, "is NULL"))
    }

    pub fn opt_int(&self, column: &str) -> Result<Option<i64>, DbError> {
        match self.get(column)? {
            Value::Null => Ok(None),
            Value::Int(i) => Ok(Some(*i)),
            other => Err(DbError::column(
                column,
                format!("{other:?} is not an integer"),
            )),
        }
    }

    pub fn float(&self, column: &str) -> Result<f64, DbError> {
        match self.get(column)? {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            other => Err(DbError::column(
                column,
                format!("{other:?} is not a number"),
            )),
        }
    }

    pub fn text(&self, column: &str) -> Result<String, DbError> {
        self.opt_text(column)?
            .ok_or_else(|| DbError::column(column, "is NULL"))
    }

    pub fn opt_text(&self, column: &str) -> Result<Option<String>, DbError> {
        match self.get(column)? {
            Value::Null => Ok(None),
            Value::Text(s) => Ok(Some(s.clone())),
            // MySQL reports text that compares byte for byte (utf8mb4_bin) as binary.
            Value::Bytes(b) => String::from_utf8(b.clone())
                .map(Some)
                .map_err(|_| DbError::column(column, "is binary, not UTF-8 text")),
            other => Err(DbError::column(column, format!("{other:?} is not text"))),
        }
    }

    pub fn bytes(&self, column: &str) -> Result<Vec<u8>, DbError> {
        match self.get(column)? {
            Value::Bytes(b) => Ok(b.clone()),
            Value::Text(s) => Ok(s.clone().into_bytes()),
            Value::Null => Err(DbError::column(column, "is NULL")),
            other => Err(DbError::column(column, format!("{other:?} is not binary"))),
        }
    }
}

/// Reads every column of `row`: NULL as [`Value::Null`], anything else by its engine type name
/// through `typed` (which answers `None` for a type that has no portable value).
fn decode_row<R>(
    row: &R,
    columns: &Arc<[String]>,
    typed: fn(&R, usize, &str) -> Result<Option<Value>, sqlx::Error>,
) -> Result<Row, DbError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
{
    let mut values = Vec::with_capacity(columns.len());
    for (i, name) in columns.iter().enumerate() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            values.push(Value::Null);
            continue;
        }
        let ty = raw.type_info().name().to_owned();
        match typed(row, i, &ty)? {
            Some(value) => values.push(value),
            None => {
                return Err(DbError::column(
                    name,
                    format!(
                        "type {ty} is not portable; cast it to BIGINT, DOUBLE PRECISION or TEXT"
                    ),
                ))
            }
        }
    }
    Ok(Row {
        columns: columns.clone(),
        values,
    })
}

fn pg_value(row: &PgRow, i: usize, ty: &str) -> Result<Option<Value>, sqlx::Error> {
    Ok(Some(match ty {
        "INT8" => Value::Int(row.try_get::<i64, _>(i)?),
        "INT4" => Value::Int(row.try_get::<i32, _>(i)?.into()),
        "INT2" => Value::Int(row.try_get::<i16, _>(i)?.into()),
        "BOOL" => Value::Int(row.try_get::<bool, _>(i)? as i64),
        "FLOAT8" => Value::Float(row.try_get::<f64, _>(i)?),
        "FLOAT4" => Value::Float(row.try_get::<f32, _>(i)?.into()),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => Value::Text(row.try_get::<String, _>(i)?),
        "UUID" => Value::Text(row.try_get::<uuid::Uuid, _>(i)?.to_string()),
        "BYTEA" => Value::Bytes(row.try_get::<Vec<u8>, _>(i)?),
        _ => return Ok(None),
    }))
}

fn sqlite_value(row: &SqliteRow, i: usize, ty: &str) -> Result<Option<Value>, sqlx::Error> {
    Ok(Some(match ty {
        "INTEGER" | "BOOLEAN" => Value::Int(row.try_get::<i64, _>(i)?),
        "REAL" => Value::Float(row.try_get::<f64, _>(i)?),
        "TEXT" => Value::Text(row.try_get::<String, _>(i)?),
        "BLOB" => Value::Bytes(row.try_get::<Vec<u8>, _>(i)?),
        _ => return Ok(None),
    }))
}

fn mysql_value(row: &MySqlRow, i: usize, ty: &str) -> Result<Option<Value>, sqlx::Error> {
    Ok(Some(match ty {
        "BOOLEAN" | "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT"
        | "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED"
        | "YEAR" => Value::Int(row.try_get_unchecked::<i64, _>(i)?),
        "BIGINT UNSIGNED" => {
            Value::Int(i64::try_from(row.try_get_unchecked::<u64, _>(i)?).unwrap_or(i64::MAX))
        }
        "DOUBLE" => Value::Float(row.try_get::<f64, _>(i)?),
        "FLOAT" => Value::Float(row.try_get::<f32, _>(i)?.into()),
        // SUM and AVG answer DECIMAL: whole numbers read as integers.
        "DECIMAL" => {
            let text = row.try_get_unchecked::<&str, _>(i)?;
            match text.parse::<i64>() {
                Ok(n) => Value::Int(n),
                Err(_) => {
                    Value::Float(text.parse::<f64>().map_err(|e| {
                        sqlx::Error::Decode(format!("DECIMAL {text:?}: {e}").into())
                    })?)
                }
            }
        }
        "CHAR" | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" | "JSON" | "ENUM" => {
            Value::Text(row.try_get_unchecked::<String, _>(i)?)
        }
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" => {
            Value::Bytes(row.try_get_unchecked::<Vec<u8>, _>(i)?)
        }
        _ => return Ok(None),
    }))
}

fn column_names<R: sqlx::Row>(rows: &[R]) -> Arc<[String]> {
    rows.first()
        .map(|r| r.columns().iter().map(|c| c.name().to_owned()).collect())
        .unwrap_or_else(|| Arc::from(Vec::new()))
}

macro_rules! bind_all {
    ($query:expr, $params:expr) => {{
        let mut q = $query;
        for p in $params {
            q = match p {
                Value::Null => q.bind(None::<String>),
                Value::Int(i) => q.bind(*i),
                Value::Float(f) => q.bind(*f),
                Value::Text(s) => q.bind(s.as_str()),
                Value::Bytes(b) => q.bind(b.as_slice()),
                Value::TypedNull(Kind::Int) => q.bind(None::<i64>),
                Value::TypedNull(Kind::Float) => q.bind(None::<f64>),
                Value::TypedNull(Kind::Text) => q.bind(None::<String>),
                Value::TypedNull(Kind::Bytes) => q.bind(None::<Vec<u8>>),
            };
        }
        q
    }};
}

async fn pg_fetch(
    conn: &mut PgConnection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, DbError> {
    let rows = bind_all!(sqlx::query(sql), params).fetch_all(conn).await?;
    let columns = column_names(&rows);
    rows.iter()
        .map(|r| decode_row(r, &columns, pg_value))
        .collect()
}

async fn sqlite_fetch(
    conn: &mut SqliteConnection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, DbError> {
    let rows = bind_all!(sqlx::query(sql), params).fetch_all(conn).await?;
    let columns = column_names(&rows);
    rows.iter()
        .map(|r| decode_row(r, &columns, sqlite_value))
        .collect()
}

/// Whether `error` is a unique violation.
fn is_duplicate(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
}

/// Binds `params` in the order a rewritten MySQL statement uses them.
fn mysql_query<'q>(
    statement: &'q mysql::Statement,
    params: &'q [Value],
) -> Result<sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>, DbError> {
    let mut ordered = Vec::with_capacity(statement.order.len());
    for &i in &statement.order {
        ordered.push(params.get(i).ok_or_else(|| {
            DbError::Invalid(format!(
                "the statement uses ${} but {} parameters were given",
                i + 1,
                params.len()
            ))
        })?);
    }
    Ok(bind_all!(sqlx::query(&statement.sql), ordered))
}

async fn mysql_fetch(
    conn: &mut MySqlConnection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, DbError> {
    let statement = mysql::statement(sql).map_err(DbError::Invalid)?;
    let query = match &statement.read_back {
        Some(read_back) => {
            if mysql_run(conn, &statement, params).await? == 0 {
                return Ok(Vec::new());
            }
            read_back
        }
        None => &statement,
    };
    let rows = match mysql_query(query, params)?.fetch_all(conn).await {
        Ok(rows) => rows,
        Err(e) if query.duplicates_are_nothing && is_duplicate(&e) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let columns = column_names(&rows);
    rows.iter()
        .map(|r| decode_row(r, &columns, mysql_value))
        .collect()
}

async fn mysql_run(
    conn: &mut MySqlConnection,
    statement: &mysql::Statement,
    params: &[Value],
) -> Result<u64, DbError> {
    match mysql_query(statement, params)?.execute(conn).await {
        Ok(done) => Ok(done.rows_affected()),
        Err(e) if statement.duplicates_are_nothing && is_duplicate(&e) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

async fn mysql_execute(
    conn: &mut MySqlConnection,
    sql: &str,
    params: &[Value],
) -> Result<u64, DbError> {
    let statement = mysql::statement(sql).map_err(DbError::Invalid)?;
    mysql_run(conn, &statement, params).await
}

/// `writer` counting its events in `metrics`, if any.
fn counted<W>(writer: W, metrics: Option<TableMetrics>, with: fn(W, TableMetrics) -> W) -> W {
    match metrics {
        Some(m) => with(writer, m),
        None => writer,
    }
}

enum Writer {
    Postgres(PgOutbox),
    Sqlite(SqliteOutbox),
    MySql(MySqlOutbox),
}

/// A service's database: its business tables and its outbox, on any of the engines.
#[derive(Clone)]
pub struct ServiceDb {
    database: Database,
    writer: Arc<Writer>,
    wake: WakeSignal,
    stream: Option<StreamSource>,
}

/// Where a database in the stream write mode is read from: its URL (for the replication
/// connection) and its slot.
#[derive(Clone, Debug)]
pub struct StreamSource {
    pub url: String,
    pub slot: outbox_postgres::stream::SlotName,
}

impl ServiceDb {
    /// Connects (`sqlite://FILE` or `postgres://...`), migrates and checks the outbox tables.
    /// `schema` is the service's PostgreSQL schema (ignored by SQLite: one file per service).
    pub async fn open(url: &str, schema: &str) -> Result<Self, DbError> {
        Ok(Self::new(Database::open(url, schema).await?))
    }

    pub fn new(database: Database) -> Self {
        let wake = WakeSignal::new();
        Self::with_parts(database, wake, None)
    }

    /// Wakes `wake` after each commit (give the same signal to the relay) and counts enqueued
    /// events in `metrics`.
    pub fn with_parts(database: Database, wake: WakeSignal, metrics: Option<TableMetrics>) -> Self {
        let writer = match &database {
            Database::Postgres { schema, .. } => Writer::Postgres(counted(
                PgOutbox::new(schema.clone()).with_wake_signal(wake.clone()),
                metrics,
                PgOutbox::with_metrics,
            )),
            Database::Sqlite { .. } => Writer::Sqlite(counted(
                SqliteOutbox::new(outbox_sqlite::SqliteDialect).with_wake_signal(wake.clone()),
                metrics,
                SqliteOutbox::with_metrics,
            )),
            Database::MySql { .. } => Writer::MySql(counted(
                MySqlOutbox::new(outbox_mysql::MySqlDialect).with_wake_signal(wake.clone()),
                metrics,
                MySqlOutbox::with_metrics,
            )),
        };
        Self {
            database,
            writer: Arc::new(writer),
            wake,
            stream: None,
        }
    }

    /// Switches the outbox to the stream write mode (PostgreSQL only): events become
    /// transactional logical messages, which a stream relay reads from `source.slot`.
    /// Create the slot first (`outbox_postgres::stream::create_slot`).
    pub fn streamed(mut self, source: StreamSource) -> Result<Self, DbError> {
        let Writer::Postgres(outbox) = self.writer.as_ref() else {
            return Err(DbError::Invalid(
                "the stream write mode needs PostgreSQL (logical replication)".into(),
            ));
        };
        let outbox = outbox
            .clone()
            .with_write_mode(outbox_postgres::WriteMode::LogicalMessage);
        self.writer = Arc::new(Writer::Postgres(outbox));
        self.stream = Some(source);
        Ok(self)
    }

    /// Set when the outbox is in the stream write mode: run a stream relay from it.
    pub fn stream_source(&self) -> Option<&StreamSource> {
        self.stream.as_ref()
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    /// The signal woken after each commit; hand it to this database's relay.
    pub fn wake_signal(&self) -> WakeSignal {
        self.wake.clone()
    }

    /// Runs a multi-statement script (the service's own `CREATE TABLE IF NOT EXISTS ...`).
    pub async fn execute_script(&self, sql: &str) -> Result<(), DbError> {
        match &self.database {
            Database::Postgres { pool, .. } => {
                sqlx::raw_sql(sql).execute(pool).await?;
            }
            Database::Sqlite { pool } => {
                sqlx::raw_sql(sql).execute(pool).await?;
            }
            Database::MySql { pool, .. } => {
                for statement in mysql::script(sql) {
                    sqlx::raw_sql(&statement).execute(pool).await?;
                }
            }
        }
        Ok(())
    }

    /// Adds `column` (with its SQL `declaration`, e.g. `TEXT`) to `table` unless it is there:
    /// how a service's table gains a column in a database created by an earlier version.
    /// Names come from the service's code; anything but `[a-z0-9_]` is refused.
    pub async fn add_column(
        &self,
        table: &str,
        column: &str,
        declaration: &str,
    ) -> Result<(), DbError> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        if !plain(table) || !plain(column) || declaration.contains(';') {
            return Err(DbError::Invalid(format!(
                "add_column: {table:?}.{column:?} {declaration:?} is not a plain name and type"
            )));
        }
        match &self.database {
            Database::Postgres { pool, .. } => {
                let sql =
                    format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {declaration}");
                sqlx::query(&sql).execute(pool).await?;
            }
            Database::Sqlite { pool } => {
                let present: Option<(i64,)> =
                    sqlx::query_as("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")
                        .bind(table)
                        .bind(column)
                        .fetch_optional(pool)
                        .await?;
                if present.is_none() {
                    let sql = format!("ALTER TABLE {table} ADD COLUMN {column} {declaration}");
                    sqlx::query(&sql).execute(pool).await?;
                }
            }
            Database::MySql { pool, .. } => {
                let present: Option<(i64,)> = sqlx::query_as(
                    "SELECT 1 FROM information_schema.columns
                     WHERE table_schema = DATABASE() AND table_name = ? AND column_name = ?",
                )
                .bind(table)
                .bind(column)
                .fetch_optional(pool)
                .await?;
                if present.is_none() {
                    let sql = format!(
                        "ALTER TABLE {table} ADD COLUMN {column} {}",
                        mysql::declaration(declaration)
                    );
                    sqlx::query(&sql).execute(pool).await?;
                }
            }
        }
        Ok(())
    }

    /// Starts a transaction (on SQLite an immediate one: it takes the write lock at once).
    pub async fn begin(&self) -> Result<Tx, DbError> {
        let inner = match &self.database {
            Database::Postgres { pool, .. } => TxInner::Postgres(pool.begin().await?),
            Database::Sqlite { pool } => TxInner::Sqlite(outbox_sqlite::begin(pool).await?),
            Database::MySql { pool, .. } => TxInner::MySql(pool.begin().await?),
        };
        Ok(Tx {
            inner,
            writer: self.writer.clone(),
        })
    }

    /// A read outside any transaction.
    pub async fn fetch_all(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match &self.database {
            Database::Postgres { pool, .. } => {
                pg_fetch(&mut *pool.acquire().await?, sql, params).await
            }
            Database::Sqlite { pool } => {
                sqlite_fetch(&mut *pool.acquire().await?, sql, params).await
            }
            Database::MySql { pool, .. } => {
                mysql_fetch(&mut *pool.acquire().await?, sql, params).await
            }
        }
    }

    pub async fn fetch_optional(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Row>, DbError> {
        Ok(self.fetch_all(sql, params).await?.into_iter().next())
    }

    /// One statement in a transaction of its own (a write that enqueues nothing); returns the
    /// rows it affected.
    pub async fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let mut tx = self.begin().await?;
        let n = tx.execute(sql, params).await?;
        tx.commit().await?;
        Ok(n)
    }
}

enum TxInner {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
    MySql(Transaction<'static, MySql>),
}

/// An open transaction: business SQL and enqueued events commit or roll back together.
/// Dropping it without [`Tx::commit`] rolls back.
pub struct Tx {
    inner: TxInner,
    writer: Arc<Writer>,
}

impl Tx {
    /// Runs a statement; returns the number of rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        Ok(match &mut self.inner {
            TxInner::Postgres(tx) => bind_all!(sqlx::query(sql), params)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            TxInner::Sqlite(tx) => bind_all!(sqlx::query(sql), params)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            TxInner::MySql(tx) => mysql_execute(tx, sql, params).await?,
        })
    }

    pub async fn fetch_all(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match &mut self.inner {
            TxInner::Postgres(tx) => pg_fetch(tx, sql, params).await,
            TxInner::Sqlite(tx) => sqlite_fetch(tx, sql, params).await,
            TxInner::MySql(tx) => mysql_fetch(tx, sql, params).await,
        }
    }

    pub async fn fetch_optional(
        &mut self,
        sql: &str,
        params: &[Value],
    ) -> Result<Option<Row>, DbError> {
        Ok(self.fetch_all(sql, params).await?.into_iter().next())
    }

    /// Adds `event` to the outbox in this transaction.
    pub async fn enqueue(&mut self, event: &NewEvent) -> Result<EnqueueOutcome, DbError> {
        Ok(match (&mut self.inner, &*self.writer) {
            (TxInner::Postgres(tx), Writer::Postgres(w)) => w.enqueue(tx, event).await?,
            (TxInner::Sqlite(tx), Writer::Sqlite(w)) => w.enqueue(tx, event).await?,
            (TxInner::MySql(tx), Writer::MySql(w)) => w.enqueue(tx, event).await?,
            _ => unreachable!("a transaction and its writer come from one database"),
        })
    }

    /// Takes the writer locks of `aggregates` in the documented order before a transaction
    /// enqueues for several of them in separate calls (see
    /// `outbox_postgres::WriteOrdering`); SQLite has one writer at a time and needs none.
    pub async fn lock_aggregates(
        &mut self,
        aggregates: &[outbox_core::AggregateRef],
    ) -> Result<(), DbError> {
        match (&mut self.inner, &*self.writer) {
            (TxInner::Postgres(tx), Writer::Postgres(w)) => {
                w.lock_aggregates(tx, aggregates).await?
            }
            (TxInner::MySql(tx), Writer::MySql(w)) => w.lock_aggregates(tx, aggregates).await?,
            _ => {}
        }
        Ok(())
    }

    /// Commits, then wakes the relay.
    pub async fn commit(self) -> Result<(), DbError> {
        match (self.inner, &*self.writer) {
            (TxInner::Postgres(tx), Writer::Postgres(w)) => w.commit(tx).await?,
            (TxInner::Sqlite(tx), Writer::Sqlite(w)) => w.commit(tx).await?,
            (TxInner::MySql(tx), Writer::MySql(w)) => w.commit(tx).await?,
            _ => unreachable!("a transaction and its writer come from one database"),
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), DbError> {
        match self.inner {
            TxInner::Postgres(tx) => tx.rollback().await?,
            TxInner::Sqlite(tx) => tx.rollback().await?,
            TxInner::MySql(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// A consumer's business logic: change state (and enqueue events) in `tx`. An error rolls
/// the whole delivery back, inbox row included.
#[async_trait]
pub trait TxHandler: Send + Sync + 'static {
    /// Slow work to do *before* the transaction begins: CPU-heavy computation or a remote
    /// call. A transaction holds its locks (on SQLite the database's only write lock) for as
    /// long as it is open, so such work inside `handle` delays every other writer, the relay's
    /// bookkeeping included. Keep the result in the handler for `handle`, which runs next for
    /// the same message unless the inbox finds it a duplicate.
    async fn prepare(&self, message: &IncomingMessage) -> Result<(), HandlerError> {
        let _ = message;
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, message: &IncomingMessage) -> Result<(), HandlerError>;
}

#[async_trait]
impl<H: TxHandler + ?Sized> TxHandler for Arc<H> {
    async fn prepare(&self, message: &IncomingMessage) -> Result<(), HandlerError> {
        (**self).prepare(message).await
    }

    async fn handle(&self, tx: &mut Tx, message: &IncomingMessage) -> Result<(), HandlerError> {
        (**self).handle(tx, message).await
    }
}

enum InboxTable {
    Postgres(PgInbox),
    Sqlite(SqliteInbox),
    MySql(MySqlInbox),
}

/// The inbox table of a [`ServiceDb`], as the core inbox flow's store ([`Tx`] transactions).
pub struct ServiceInbox {
    db: ServiceDb,
    table: InboxTable,
}

impl ServiceInbox {
    pub fn new(db: ServiceDb) -> Self {
        let table = match db.database() {
            Database::Postgres { pool, schema } => {
                InboxTable::Postgres(PgInbox::new(pool.clone(), schema))
            }
            Database::Sqlite { pool } => {
                InboxTable::Sqlite(SqliteInbox::new(pool.clone(), outbox_sqlite::SqliteDialect))
            }
            Database::MySql { pool, .. } => {
                InboxTable::MySql(MySqlInbox::new(pool.clone(), outbox_mysql::MySqlDialect))
            }
        };
        Self { db, table }
    }
}

#[async_trait]
impl InboxStore for ServiceInbox {
    type Tx = Tx;

    async fn seen(&self, consumer: &str, event_id: EventId) -> Result<bool, InboxStoreError> {
        Ok(match &self.table {
            InboxTable::Postgres(i) => i.has_processed(consumer, event_id).await?,
            InboxTable::Sqlite(i) => i.has_processed(consumer, event_id).await?,
            InboxTable::MySql(i) => i.has_processed(consumer, event_id).await?,
        })
    }

    async fn begin(&self) -> Result<Tx, InboxStoreError> {
        Ok(self.db.begin().await?)
    }

    async fn record(
        &self,
        tx: &mut Tx,
        consumer: &str,
        event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<bool, InboxStoreError> {
        Ok(match (&self.table, &mut tx.inner) {
            (InboxTable::Postgres(i), TxInner::Postgres(t)) => {
                i.try_begin(t, consumer, event_id, message).await?
            }
            (InboxTable::Sqlite(i), TxInner::Sqlite(t)) => {
                i.try_begin(t, consumer, event_id, message).await?
            }
            (InboxTable::MySql(i), TxInner::MySql(t)) => {
                i.try_begin(t, consumer, event_id, message).await?
            }
            _ => unreachable!("the inbox and the transaction come from one database"),
        })
    }

    /// Commits, then wakes the relay.
    async fn commit(&self, tx: Tx) -> Result<(), InboxStoreError> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Tx) -> Result<(), InboxStoreError> {
        Ok(tx.rollback().await?)
    }

    fn is_unavailable(&self, error: &(dyn std::error::Error + 'static)) -> bool {
        error
            .downcast_ref::<sqlx::Error>()
            .is_some_and(|e| match &self.table {
                InboxTable::Postgres(_) => outbox_postgres::is_unavailable(e),
                InboxTable::Sqlite(_) => outbox_sqlite::is_unavailable(e),
                InboxTable::MySql(_) => outbox_mysql::is_unavailable(e),
            })
    }
}

/// A [`TxHandler`] as the core inbox flow's handler.
pub struct TxEffects<H>(H);

#[async_trait]
impl<H: TxHandler> EffectHandler<Tx> for TxEffects<H> {
    fn prepares(&self) -> bool {
        true
    }

    async fn prepare(&self, message: &IncomingMessage) -> Result<(), HandlerError> {
        self.0.prepare(message).await
    }

    async fn apply(
        &self,
        tx: &mut Tx,
        _event_id: EventId,
        message: &IncomingMessage,
    ) -> Result<(), HandlerError> {
        self.0.handle(tx, message).await
    }
}

/// Wraps a [`TxHandler`] with the inbox (the flow of `outbox_core::inbox`): `prepare` unless
/// the inbox already holds the event, then begin, record `(consumer, event_id)`, run the
/// handler, commit. A redelivered event runs neither `prepare` nor `handle` again; the
/// service database's outages are retried without counting attempts.
pub struct InboxHandler<H>(Inbox<ServiceInbox, TxEffects<H>>);

impl<H: TxHandler> InboxHandler<H> {
    pub fn new(db: ServiceDb, consumer: impl Into<String>, handler: H) -> Self {
        Self(Inbox::new(
            ServiceInbox::new(db),
            consumer,
            TxEffects(handler),
        ))
    }

    pub fn with_metrics(self, metrics: ConsumerMetrics) -> Self {
        Self(self.0.with_metrics(metrics))
    }
}

#[async_trait]
impl<H: TxHandler> MessageHandler for InboxHandler<H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        self.0.handle(message).await
    }
}
