//! The relay's table gauges (`RelayStore::stats`, read every `OUTBOX_STATS_INTERVAL`) under a
//! backlog, against a full count of the table by state (what the gauges cost before they
//! were bounded), measured in the same run on the same rows.

use std::time::{Duration, Instant};

use outbox_core::RelayStore;
use outbox_postgres::PgRelayStore;
use serde_json::{json, Value};

use crate::db::BenchDb;
use crate::stats::{header, median, row};

pub async fn run(quick: bool) -> anyhow::Result<Value> {
    let sizes: &[i64] = if quick {
        &[20_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    };
    let rounds = if quick { 3 } else { 9 };
    header(
        "gauges: the relay's stats query under a pending backlog (PostgreSQL, 1 KB payloads)",
        &[
            "pending rows",
            "full count ms",
            "stats ms",
            "full/stats",
            "pending shown",
        ],
    );
    let mut out = Vec::new();
    for &n in sizes {
        let db = BenchDb::postgres(4).await?;
        let BenchDb::Postgres { pool, schema } = &db else {
            unreachable!("postgres")
        };
        let t = db.table("event_outbox");
        // Pending events as a writer leaves them (no relay running): 64 partitions, 1 KB.
        sqlx::query(&format!(
            "INSERT INTO {t} (event_id, aggregate_type, aggregate_id, partition_no, event_type,
                              topic, message_key, payload)
             SELECT gen_random_uuid(), 'bench', 'a-' || (i % 5000), (i % 64)::int2, 'bench.v1',
                    'bench.v1', 'a-' || (i % 5000), convert_to(repeat('x', 1024), 'UTF8')
             FROM generate_series(1, $1) AS i"
        ))
        .bind(n)
        .execute(pool)
        .await?;
        let store = PgRelayStore::new(pool.clone(), schema);
        let full = format!(
            "SELECT count(*) FILTER (WHERE status = 'pending'),
                    count(*) FILTER (WHERE status = 'pending' AND retry_at IS NOT NULL),
                    count(*) FILTER (WHERE status = 'dead'),
                    count(*) FILTER (WHERE status = 'published'),
                    min(created_at) FILTER (WHERE status = 'pending')
             FROM {t}"
        );
        // Interleaved, so both see the same caches and the same machine.
        let mut full_ms = Vec::new();
        let mut stats_ms = Vec::new();
        let mut shown = 0;
        let ms = |since: Instant| since.elapsed().as_secs_f64() * 1e3;
        for _ in 0..rounds {
            let start = Instant::now();
            sqlx::query(&full).fetch_one(pool).await?;
            full_ms.push(ms(start));
            let start = Instant::now();
            shown = store.stats().await?.pending;
            stats_ms.push(ms(start));
        }
        let (f, s) = (median(full_ms), median(stats_ms));
        row(&[
            n.to_string(),
            format!("{f:.1}"),
            format!("{s:.2}"),
            format!("{:.0}", f / s),
            shown.to_string(),
        ]);
        out.push(
            json!({"pending_rows": n, "full_count_ms": f, "stats_ms": s, "pending_shown": shown}),
        );
        db.drop().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Value::Array(out))
}
