//! Running a [`Script`] with named values: on the pool, or in the caller's transaction.

use sqlx::{Database, Pool};

use crate::dialect::{bind, Arg, Dialect};
use crate::engine::{Engine, Query};
use crate::statement::{Script, Statement};

/// Named values for a statement.
pub type Args<'a> = [(&'static str, Arg<'a>)];

pub type Row<D> = <<D as Dialect>::DB as Database>::Row;

/// `statement` with `args` bound in its order.
pub fn bound<'q, D: Dialect>(statement: &'q Statement, args: &Args<'q>) -> Query<'q, D::DB> {
    let mut query = sqlx::query::<D::DB>(&statement.sql);
    for name in &statement.order {
        let arg = args
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no value for @{name} in {:?}", statement.sql));
        query = bind::<D>(query, arg);
    }
    query
}

/// The rows of the script's last step (earlier steps run first, in one transaction).
pub async fn rows<D: Dialect>(
    pool: &Pool<D::DB>,
    script: &Script,
    args: &Args<'_>,
) -> Result<Vec<Row<D>>, sqlx::Error> {
    let (last, before) = script.steps.split_last().expect("a script has a step");
    if before.is_empty() {
        return D::DB::fetch_all(pool, bound::<D>(last, args)).await;
    }
    let mut tx = D::begin(pool).await?;
    for step in before {
        D::DB::execute_on(&mut *tx, bound::<D>(step, args)).await?;
    }
    let rows = D::DB::fetch_all_on(&mut *tx, bound::<D>(last, args)).await?;
    tx.commit().await?;
    Ok(rows)
}

/// Runs every step (in one transaction when there are several); returns the rows changed
/// by the counted step.
pub async fn count<D: Dialect>(
    pool: &Pool<D::DB>,
    script: &Script,
    args: &Args<'_>,
) -> Result<u64, sqlx::Error> {
    if let [only] = script.steps.as_slice() {
        return D::DB::execute(pool, bound::<D>(only, args)).await;
    }
    let mut tx = D::begin(pool).await?;
    let n = count_on::<D>(&mut tx, script, args).await?;
    tx.commit().await?;
    Ok(n)
}

/// Like [`count`], in the caller's transaction.
pub async fn count_on<D: Dialect>(
    conn: &mut <D::DB as Database>::Connection,
    script: &Script,
    args: &Args<'_>,
) -> Result<u64, sqlx::Error> {
    let mut counted = 0;
    for (i, step) in script.steps.iter().enumerate() {
        let n = D::DB::execute_on(conn, bound::<D>(step, args)).await?;
        if i == script.counted {
            counted = n;
        }
    }
    Ok(counted)
}

/// Like [`rows`], in the caller's transaction.
pub async fn rows_on<D: Dialect>(
    conn: &mut <D::DB as Database>::Connection,
    script: &Script,
    args: &Args<'_>,
) -> Result<Vec<Row<D>>, sqlx::Error> {
    let (last, before) = script.steps.split_last().expect("a script has a step");
    for step in before {
        D::DB::execute_on(conn, bound::<D>(step, args)).await?;
    }
    D::DB::fetch_all_on(conn, bound::<D>(last, args)).await
}
