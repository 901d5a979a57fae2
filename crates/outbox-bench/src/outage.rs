//! Outage drain: a private broker frozen under a steady load; the peak backlog and the time
//! from the broker's return until the backlog is gone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use outbox_core::{AggregateRef, NewEvent, Relay, Topic};
use outbox_kafka::testing::TestBroker;
use outbox_kafka::{KafkaConfig, KafkaPublisher};
use outbox_postgres::{PgOutbox, PgRelayStore};
use serde_json::{json, Value};

use crate::counting::CountingStore;
use crate::db::BenchDb;
use crate::stats::{header, row};

pub async fn run(quick: bool) -> anyhow::Result<Value> {
    if std::env::var("OUTBOX_TEST_BROKER_BIN").is_err() {
        println!("\n(outage drain skipped: OUTBOX_TEST_BROKER_BIN is not set)");
        return Ok(Value::Null);
    }
    let (rate, mut outage) = if quick {
        (200u32, Duration::from_secs(3))
    } else {
        (1000, Duration::from_secs(60))
    };
    // For investigating by hand: a shorter (or longer) outage than the full mode's 60 s.
    if let Some(secs) = std::env::var("OUTBOX_BENCH_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        outage = Duration::from_secs(secs);
    }
    let broker = TestBroker::start();
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.delivery_timeout = Duration::from_secs(5);
    let db = BenchDb::postgres(24).await?;
    let BenchDb::Postgres { pool, schema } = &db else {
        unreachable!()
    };
    // Backlog = written - completed, both counted in memory: polling `count(*)` on the table
    // every few ms competed with the drain it was timing.
    let store = Arc::new(CountingStore::new(PgRelayStore::new(pool.clone(), schema)));
    let written = Arc::new(AtomicU64::new(0));
    let backlog = || {
        written
            .load(Ordering::Relaxed)
            .saturating_sub(store.completed())
    };
    let relay = Relay::new(
        store.clone(),
        Arc::new(KafkaPublisher::new(kafka)?),
        crate::relay_config()?,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let topic = Topic::new(format!("bench.outage.{}", uuid::Uuid::new_v4().simple()))?;
    let (writer_stop, writer_stopped) = tokio::sync::watch::channel(false);
    let writer = {
        let (pool, schema, topic, written) =
            (pool.clone(), schema.clone(), topic.clone(), written.clone());
        tokio::spawn(async move {
            let outbox = PgOutbox::new(schema);
            let mut interval = tokio::time::interval(Duration::from_millis(10));
            let per_tick = (rate / 100).max(1);
            let mut n = 0u64;
            while !*writer_stopped.borrow() {
                interval.tick().await;
                let events: Vec<_> = (0..per_tick)
                    .map(|_| {
                        n += 1;
                        NewEvent::new(
                            topic.clone(),
                            AggregateRef::new("agg", format!("a{}", n % 100)).unwrap(),
                            vec![b'x'; 200],
                        )
                    })
                    .collect();
                let mut tx = pool.begin().await?;
                outbox.enqueue_all(&mut tx, &events).await?;
                tx.commit().await?;
                written.fetch_add(events.len() as u64, Ordering::Relaxed);
            }
            anyhow::Ok(n)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.freeze();
    let frozen = Instant::now();
    let mut peak = 0u64;
    while frozen.elapsed() < outage {
        peak = peak.max(backlog());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    broker.thaw();
    let thawed = Instant::now();
    // Load continues; drained means the backlog is back to what steady state holds.
    // The backlog each second after the thaw, to show where a slow drain spends its time.
    let mut timeline: Vec<u64> = Vec::new();
    let drained = loop {
        let p = backlog();
        peak = peak.max(p);
        if thawed.elapsed().as_secs() as usize >= timeline.len() {
            timeline.push(p);
        }
        if p <= u64::from(rate / 10) {
            break thawed.elapsed();
        }
        if thawed.elapsed() > Duration::from_secs(300) {
            anyhow::bail!("backlog did not drain within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _ = writer_stop.send(true);
    let written = writer.await??;
    let _ = stop.send(());
    let report = relay.await?;
    header(
        &format!(
            "outage drain: broker frozen {}s under {rate} events/s",
            outage.as_secs()
        ),
        &[
            "peak backlog",
            "drain time after return",
            "drain rate (backlog/s)",
            "attempts burnt",
        ],
    );
    let drain_rate = peak as f64 / drained.as_secs_f64();
    println!("backlog each second after the broker returned: {timeline:?}");
    row(&[
        peak.to_string(),
        format!("{:.2} s", drained.as_secs_f64()),
        format!("{drain_rate:.0}"),
        report.rejected_attempts.to_string(),
    ]);
    db.drop().await;
    Ok(
        json!({"rate": rate, "outage_s": outage.as_secs(), "peak_backlog": peak, "drain_s": drained.as_secs_f64(),
              "written": written, "rejected_attempts": report.rejected_attempts,
              "backlog_each_second_after_return": timeline}),
    )
}
