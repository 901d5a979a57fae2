//! Table health: events through the relay leave dead row versions behind (deleted rows); the
//! dead-tuple gauge reports them, vacuum (autovacuum's job, run by hand here so the test is
//! deterministic) reclaims them, and later rounds of the same size reuse the space: the table
//! does not grow without bound.
//!
//! `OUTBOX_TABLE_HEALTH_EVENTS` sets the events per round (CI: 20000; by hand: 1000000).

use std::time::Duration;

use outbox_core::testing::{wait_until, TestPublisher};
use outbox_core::{AggregateRef, NewEvent, OutboxMetrics, Relay, RelayConfig, RelayStore, Topic};
use outbox_postgres::testing::TestSchema;
use outbox_postgres::{PgOutbox, PgRelayStore};

async fn round(db: &TestSchema, store: &PgRelayStore, n: usize, round_no: usize) {
    let outbox = PgOutbox::new(db.schema.clone());
    let topic = Topic::new("health.test").unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let events: Vec<NewEvent> = chunk
            .iter()
            .map(|i| {
                NewEvent::new(
                    topic.clone(),
                    AggregateRef::new("agg", format!("a{}", i % 500)).unwrap(),
                    format!(
                        "{{\"round\":{round_no},\"n\":{i},\"pad\":\"{}\"}}",
                        "x".repeat(200)
                    ),
                )
            })
            .collect();
        let mut tx = db.pool.begin().await.unwrap();
        outbox.enqueue_all(&mut tx, &events).await.unwrap();
        tx.commit().await.unwrap();
    }
    let relay = Relay::new(
        store.clone(),
        TestPublisher::new(),
        RelayConfig {
            poll_min: Duration::from_millis(5),
            poll_max: Duration::from_millis(50),
            ..RelayConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    wait_until(Duration::from_secs(600), "the round drained", || async {
        store.stats().await.unwrap().pending == 0
    })
    .await;
    let _ = stop.send(());
    running.await.unwrap();
}

/// VACUUM until the dead tuples of the drained round are gone. A transaction of another test
/// on the same cluster that began before the round's deletes holds them back (they are still
/// visible to it), so one VACUUM is not always enough; autovacuum would come back too.
async fn vacuum(db: &TestSchema, store: &PgRelayStore, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        sqlx::raw_sql(&format!("VACUUM {}", db.table("event_outbox")))
            .execute(&db.pool)
            .await
            .unwrap();
        let dead = store.stats().await.unwrap().dead_tuples.unwrap_or(u64::MAX) as usize;
        if dead < n / 100 + 10 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vacuum left {dead} dead tuples for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_table_returns_near_its_size_and_dead_tuples_are_reported() {
    let n: usize = std::env::var("OUTBOX_TABLE_HEALTH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let db = TestSchema::create().await;
    // Vacuum by hand at known points instead of whenever autovacuum wakes up.
    sqlx::raw_sql(&format!(
        "ALTER TABLE {} SET (autovacuum_enabled = false)",
        db.table("event_outbox")
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let store = PgRelayStore::new(db.pool.clone(), &db.schema);
    let empty = store
        .stats()
        .await
        .unwrap()
        .table_bytes
        .expect("PostgreSQL reports the size");

    round(&db, &store, n, 1).await;
    wait_until(
        Duration::from_secs(30),
        "the gauge shows the deleted rows as dead tuples",
        || async { store.stats().await.unwrap().dead_tuples.unwrap_or(0) as usize >= n * 9 / 10 },
    )
    .await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = OutboxMetrics::register(&mut registry).table("health", "event_outbox");
    metrics.observe(&store.stats().await.unwrap());
    let text = outbox_core::metrics::encode_text(&registry);
    assert!(
        text.contains("outbox_table_dead_tuples{service=\"health\",table=\"event_outbox\"}"),
        "{text}"
    );
    vacuum(&db, &store, n).await;
    let after_one = store.stats().await.unwrap().table_bytes.unwrap();

    // Index pages freed by one vacuum are recycled only after the next, so the size settles
    // after a couple of rounds; from then on it must stay flat.
    let mut sizes = vec![empty, after_one];
    for r in 2..=5 {
        round(&db, &store, n, r).await;
        vacuum(&db, &store, n).await;
        sizes.push(store.stats().await.unwrap().table_bytes.unwrap());
    }
    println!("outbox table with indexes, bytes: empty, then after each round of {n} events + vacuum: {sizes:?}");
    let settled = sizes[3];
    let last = *sizes.last().unwrap();
    assert!(
        last <= settled + settled / 5 + 256 * 1024,
        "the table keeps growing round after round: {sizes:?}"
    );
    db.drop().await;
}
