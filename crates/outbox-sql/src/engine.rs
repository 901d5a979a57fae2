//! What the shared store logic needs from a sqlx database, stated once.
//!
//! sqlx's generic API asks every generic function to repeat a dozen bounds (an executor for
//! the connection, arguments, encode/decode per type). [`Engine`] states them once, in a
//! blanket implementation for every database that meets them, and gives the store logic the
//! few operations it uses: run a statement, read a column by position.
//!
//! Columns are read *unchecked*: the statements of a dialect fix each result column's type
//! (casts where a database would pick another, e.g. MySQL's `SUM` as `DECIMAL`), and sqlx's
//! per-value type check was a visible share of the relay's CPU on 2,000-row claims.

use futures::future::BoxFuture;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};

/// A query on database `DB` with its arguments.
pub type Query<'q, DB> = sqlx::query::Query<'q, DB, <DB as Database>::Arguments<'q>>;

/// Rows changed by a statement, and the key an insert generated (sqlx has no generic
/// accessor for either).
pub trait Affected {
    fn affected(&self) -> u64;
    /// The auto-increment key of the row an `INSERT` added, where the database reports it
    /// with the statement's result (MySQL, SQLite); `None` elsewhere.
    fn inserted_id(&self) -> Option<i64>;
}

#[cfg(feature = "postgres")]
impl Affected for sqlx::postgres::PgQueryResult {
    fn affected(&self) -> u64 {
        self.rows_affected()
    }
    fn inserted_id(&self) -> Option<i64> {
        None
    }
}

#[cfg(feature = "sqlite")]
impl Affected for sqlx::sqlite::SqliteQueryResult {
    fn affected(&self) -> u64 {
        self.rows_affected()
    }
    fn inserted_id(&self) -> Option<i64> {
        Some(self.last_insert_rowid())
    }
}

#[cfg(feature = "mysql")]
impl Affected for sqlx::mysql::MySqlQueryResult {
    fn affected(&self) -> u64 {
        self.rows_affected()
    }
    fn inserted_id(&self) -> Option<i64> {
        i64::try_from(self.last_insert_id()).ok()
    }
}

/// A database the shared store logic runs on; implemented for every sqlx database that has
/// the executors, types and argument handling it uses (PostgreSQL, SQLite, MySQL).
pub trait Engine: Database + Sized {
    fn execute<'e, 'q: 'e>(
        pool: &'e Pool<Self>,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>>;

    fn execute_on<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>>;

    /// Runs an `INSERT`; returns the key it generated, if it inserted a row and the database
    /// reports the key.
    fn insert_on<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<Option<i64>, sqlx::Error>>;

    fn fetch_all<'e, 'q: 'e>(
        pool: &'e Pool<Self>,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>>;

    fn fetch_all_on<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>>;

    fn bind_int(query: Query<'_, Self>, value: Option<i64>) -> Query<'_, Self>;
    fn bind_text<'q>(query: Query<'q, Self>, value: Option<&'q str>) -> Query<'q, Self>;
    fn bind_string(query: Query<'_, Self>, value: String) -> Query<'_, Self>;
    fn bind_bytes<'q>(query: Query<'q, Self>, value: &'q [u8]) -> Query<'q, Self>;

    fn int(row: &Self::Row, i: usize) -> Result<i64, sqlx::Error>;
    fn opt_int(row: &Self::Row, i: usize) -> Result<Option<i64>, sqlx::Error>;
    fn text(row: &Self::Row, i: usize) -> Result<&str, sqlx::Error>;
    fn opt_text(row: &Self::Row, i: usize) -> Result<Option<&str>, sqlx::Error>;
    fn bytes(row: &Self::Row, i: usize) -> Result<&[u8], sqlx::Error>;
}

impl<DB> Engine for DB
where
    DB: Database,
    DB::QueryResult: Affected,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    usize: ColumnIndex<DB::Row>,
    i64: Type<DB> + for<'r> Decode<'r, DB> + for<'q> Encode<'q, DB>,
    Option<i64>: for<'q> Encode<'q, DB>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    String: Type<DB> + for<'q> Encode<'q, DB>,
    for<'a> &'a str: Type<DB> + Decode<'a, DB> + Encode<'a, DB>,
    for<'a> &'a [u8]: Type<DB> + Decode<'a, DB> + Encode<'a, DB>,
{
    fn execute<'e, 'q: 'e>(
        pool: &'e Pool<Self>,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>> {
        Box::pin(async move { Ok(query.execute(pool).await?.affected()) })
    }

    fn execute_on<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<u64, sqlx::Error>> {
        Box::pin(async move { Ok(query.execute(conn).await?.affected()) })
    }

    fn insert_on<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<Option<i64>, sqlx::Error>> {
        Box::pin(async move {
            let done = query.execute(conn).await?;
            Ok(if done.affected() == 0 {
                None
            } else {
                done.inserted_id()
            })
        })
    }

    fn fetch_all<'e, 'q: 'e>(
        pool: &'e Pool<Self>,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>> {
        Box::pin(query.fetch_all(pool))
    }

    fn fetch_all_on<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        query: Query<'q, Self>,
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>> {
        Box::pin(query.fetch_all(conn))
    }

    fn bind_int(query: Query<'_, Self>, value: Option<i64>) -> Query<'_, Self> {
        query.bind(value)
    }

    fn bind_text<'q>(query: Query<'q, Self>, value: Option<&'q str>) -> Query<'q, Self> {
        query.bind(value)
    }

    fn bind_string(query: Query<'_, Self>, value: String) -> Query<'_, Self> {
        query.bind(value)
    }

    fn bind_bytes<'q>(query: Query<'q, Self>, value: &'q [u8]) -> Query<'q, Self> {
        query.bind(value)
    }

    fn int(row: &Self::Row, i: usize) -> Result<i64, sqlx::Error> {
        row.try_get_unchecked(i)
    }

    fn opt_int(row: &Self::Row, i: usize) -> Result<Option<i64>, sqlx::Error> {
        row.try_get_unchecked(i)
    }

    fn text(row: &Self::Row, i: usize) -> Result<&str, sqlx::Error> {
        row.try_get_unchecked(i)
    }

    fn opt_text(row: &Self::Row, i: usize) -> Result<Option<&str>, sqlx::Error> {
        row.try_get_unchecked(i)
    }

    fn bytes(row: &Self::Row, i: usize) -> Result<&[u8], sqlx::Error> {
        row.try_get_unchecked(i)
    }
}
