//! Write overhead: (a) business transaction alone, (b) plus a hand-written INSERT of the same
//! outbox row, (c) plus `enqueue`. Interleaved, rotating the order every round.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{AggregateRef, NewEvent, Topic};
use outbox_postgres::PgOutbox;
use outbox_sqlite::SqliteOutbox;
use serde_json::{json, Value};

use crate::db::BenchDb;
use crate::stats::{header, median_summary, row, Summary};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Business,
    RawInsert,
    Enqueue,
}

const MODES: [Mode; 3] = [Mode::Business, Mode::RawInsert, Mode::Enqueue];

fn event(writer: usize, i: usize, payload: usize) -> NewEvent {
    NewEvent::new(
        Topic::new("bench.order.placed.v1").unwrap(),
        AggregateRef::new("customer", format!("c-{}-{}", writer, i % 50)).unwrap(),
        vec![b'x'; payload],
    )
}

async fn one(db: &BenchDb, mode: Mode, e: &NewEvent) -> anyhow::Result<Duration> {
    let start = Instant::now();
    match db {
        BenchDb::Postgres { pool, schema } => {
            let mut tx = pool.begin().await?;
            sqlx::query(&format!(
                "INSERT INTO {} (customer, amount, note) VALUES ($1, $2, $3)",
                db.table("bench_orders")
            ))
            .bind(e.aggregate().id())
            .bind(42_i64)
            .bind("bench")
            .execute(&mut *tx)
            .await?;
            match mode {
                Mode::Business => {}
                Mode::RawInsert => {
                    sqlx::query(&format!(
                        "INSERT INTO {} (event_id, aggregate_type, aggregate_id, partition_no,
                             event_type, topic, message_key, headers, payload)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        db.table("event_outbox")
                    ))
                    .bind(e.event_id().as_uuid())
                    .bind(e.aggregate().kind())
                    .bind(e.aggregate().id())
                    .bind(e.aggregate().partition() as i16)
                    .bind(e.event_type())
                    .bind(e.topic().as_str())
                    .bind(e.key())
                    .bind(serde_json::json!({}))
                    .bind(e.payload().as_ref())
                    .execute(&mut *tx)
                    .await?;
                }
                Mode::Enqueue => {
                    PgOutbox::new(schema.clone()).enqueue(&mut tx, e).await?;
                }
            }
            tx.commit().await?;
        }
        BenchDb::Sqlite { pool, .. } => {
            let mut tx = outbox_sqlite::begin(pool).await?;
            sqlx::query("INSERT INTO bench_orders (customer, amount, note) VALUES (?, ?, ?)")
                .bind(e.aggregate().id())
                .bind(42_i64)
                .bind("bench")
                .execute(&mut *tx)
                .await?;
            match mode {
                Mode::Business => {}
                Mode::RawInsert => {
                    sqlx::query(
                        "INSERT INTO event_outbox (event_id, aggregate_type, aggregate_id,
                             partition_no, event_type, topic, message_key, headers, payload,
                             created_at)
                         VALUES (?, ?, ?, ?, ?, ?, ?, '{}', ?,
                             CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER))",
                    )
                    .bind(e.event_id().to_string())
                    .bind(e.aggregate().kind())
                    .bind(e.aggregate().id())
                    .bind(i64::from(e.aggregate().partition()))
                    .bind(e.event_type())
                    .bind(e.topic().as_str())
                    .bind(e.key())
                    .bind(e.payload().as_ref())
                    .execute(&mut *tx)
                    .await?;
                }
                Mode::Enqueue => {
                    SqliteOutbox::new(outbox_sqlite::SqliteDialect)
                        .enqueue(&mut tx, e)
                        .await?;
                }
            }
            tx.commit().await?;
        }
        BenchDb::MySql { pool, .. } => {
            let mut tx = pool.begin().await?;
            sqlx::query("INSERT INTO bench_orders (customer, amount, note) VALUES (?, ?, ?)")
                .bind(e.aggregate().id())
                .bind(42_i64)
                .bind("bench")
                .execute(&mut *tx)
                .await?;
            match mode {
                Mode::Business => {}
                Mode::RawInsert => {
                    sqlx::query(
                        "INSERT INTO event_outbox (event_id, aggregate_type, aggregate_id,
                             partition_no, event_type, topic, message_key, headers, payload,
                             created_at)
                         VALUES (?, ?, ?, ?, ?, ?, ?, '{}', ?,
                             CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED))",
                    )
                    .bind(e.event_id().to_string())
                    .bind(e.aggregate().kind())
                    .bind(e.aggregate().id())
                    .bind(i64::from(e.aggregate().partition()))
                    .bind(e.event_type())
                    .bind(e.topic().as_str())
                    .bind(e.key())
                    .bind(e.payload().as_ref())
                    .execute(&mut *tx)
                    .await?;
                }
                Mode::Enqueue => {
                    outbox_mysql::MySqlOutbox::new(outbox_mysql::MySqlDialect)
                        .enqueue(&mut tx, e)
                        .await?;
                }
            }
            tx.commit().await?;
        }
    }
    Ok(start.elapsed())
}

/// `txns` transactions spread over `writers` concurrent tasks.
async fn burst(
    db: &Arc<BenchDb>,
    mode: Mode,
    writers: usize,
    txns: usize,
    payload: usize,
) -> anyhow::Result<Summary> {
    let db = db.clone();
    crate::stats::burst(writers, txns, move |w, i| {
        let db = db.clone();
        async move { one(&db, mode, &event(w, i, payload)).await }
    })
    .await
}

pub async fn run(quick: bool) -> anyhow::Result<Value> {
    let (rounds, txns) = if quick { (1, 60) } else { (5, 1600) };
    let mut out = Vec::new();
    header(
        "write: business transaction (a), + raw outbox INSERT (b), + enqueue (c)",
        &[
            "db",
            "writers",
            "payload",
            "a tx/s",
            "b tx/s",
            "c tx/s",
            "a p50/p99 µs",
            "c p50/p99 µs",
            "c-a p50 µs",
            "c/b mean latency",
        ],
    );
    // "sqlite" commits durably (synchronous=FULL, the default with an external broker);
    // "sqlite-normal" is synchronous=NORMAL (the in-process bus), to show what durability costs.
    for db_kind in ["postgres", "mysql", "sqlite", "sqlite-normal"] {
        if !crate::store_wanted(db_kind.trim_end_matches("-normal")) {
            continue;
        }
        for writers in [1usize, 4, 16] {
            for payload in [200usize, 2048] {
                if db_kind == "sqlite-normal" && payload != 200 {
                    continue;
                }
                let db = Arc::new(match db_kind {
                    "postgres" => BenchDb::postgres(writers as u32 + 2).await?,
                    "mysql" => BenchDb::mysql(writers as u32 + 2).await?,
                    "sqlite" => BenchDb::sqlite().await?,
                    _ => BenchDb::sqlite_with(outbox_sqlite::Durability::Normal).await?,
                });
                let mut runs: Vec<Vec<Summary>> = vec![Vec::new(); 3];
                // Warm-up: connections, caches, prepared statements.
                burst(&db, Mode::Enqueue, writers, txns.min(200), payload).await?;
                for round in 0..rounds {
                    for k in 0..3 {
                        let mode = MODES[(round + k) % 3];
                        db.reset().await?;
                        let s = burst(&db, mode, writers, txns, payload).await?;
                        runs[MODES.iter().position(|m| *m == mode).unwrap()].push(s);
                    }
                }
                let [a, b, c] = [0, 1, 2].map(|i| median_summary(&runs[i]));
                let added = c.p50_us - a.p50_us;
                let ratio = c.mean_us / b.mean_us;
                row(&[
                    db_kind.into(),
                    writers.to_string(),
                    format!("{payload} B"),
                    format!("{:.0}", a.per_sec),
                    format!("{:.0}", b.per_sec),
                    format!("{:.0}", c.per_sec),
                    format!("{:.0}/{:.0}", a.p50_us, a.p99_us),
                    format!("{:.0}/{:.0}", c.p50_us, c.p99_us),
                    format!("{added:.0}"),
                    format!("{ratio:.3}"),
                ]);
                out.push(json!({
                    "db": db_kind, "writers": writers, "payload_bytes": payload, "rounds": rounds,
                    "txns_per_round": txns,
                    "business": summary_json(&a), "raw_insert": summary_json(&b), "enqueue": summary_json(&c),
                    "enqueue_added_p50_us": added, "enqueue_over_raw_mean_latency": ratio,
                }));
                Arc::try_unwrap(db).ok().expect("tasks done").drop().await;
            }
        }
    }
    Ok(Value::Array(out))
}

pub fn summary_json(s: &Summary) -> Value {
    json!({"per_sec": s.per_sec, "mean_us": s.mean_us, "p50_us": s.p50_us, "p99_us": s.p99_us, "max_us": s.max_us})
}
