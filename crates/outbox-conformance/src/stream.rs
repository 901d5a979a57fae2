//! The stream write mode on real brokers: events emitted as logical messages on a private
//! cluster with `wal_level = logical`, published by a stream relay with a table relay beside
//! it (as `outbox relay` runs them), to each transport.
//!
//! One case, in three acts: an oversized event is rejected by the broker on the stream,
//! parked in the table with its successor, retried there to its last attempt and dead, while
//! the successor and every other aggregate arrive in commit order; then a broker outage
//! pauses the stream without parking or burning anything; then everything arrives.

use std::time::Duration;

use outbox_core::{AggregateRef, NewEvent, Relay, RelayConfig, Topic};
use outbox_postgres::stream::{create_slot, slot_status, SlotName, StreamConfig, StreamRelay};
use outbox_postgres::testing::Cluster;
use outbox_postgres::{migrate, PgOutbox, PgRelayStore, Schema, WriteMode};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::cases::assert_delivered_in_order;
use crate::{wait_for, Transport};

const LIMIT: Duration = Duration::from_secs(60);

fn config() -> RelayConfig {
    RelayConfig {
        service: "conformance-stream".into(),
        ..crate::cases::config()
    }
}

async fn commit(pool: &PgPool, outbox: &PgOutbox, events: &[NewEvent]) {
    let mut tx = pool.begin().await.unwrap();
    outbox.enqueue_all(&mut tx, events).await.unwrap();
    tx.commit().await.unwrap();
}

async fn row(pool: &PgPool, event: &NewEvent) -> Option<(String, i32)> {
    sqlx::query_as("SELECT status, attempts FROM app.event_outbox WHERE event_id = $1")
        .bind(event.event_id().as_uuid())
        .fetch_optional(pool)
        .await
        .unwrap()
}

pub async fn stream_mode(transport: &dyn Transport) {
    let cluster = Cluster::create_logical();
    let pool = PgPoolOptions::new()
        .max_connections(6)
        .connect(&cluster.url())
        .await
        .unwrap();
    let schema = Schema::new("app").unwrap();
    migrate(&pool, &schema).await.unwrap();
    let slot = SlotName::for_schema(&schema).unwrap();
    create_slot(&pool, &slot).await.unwrap();
    let outbox = PgOutbox::new(schema.clone()).with_write_mode(WriteMode::LogicalMessage);

    let table = Relay::new(
        PgRelayStore::new(pool.clone(), &schema),
        transport.publisher(),
        config(),
    );
    let stream = StreamRelay::new(
        pool.clone(),
        cluster.url(),
        schema.clone(),
        transport.publisher(),
        StreamConfig::new(slot.clone(), config()),
    )
    .with_table_wake(table.wake_signal());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut s: tokio::sync::watch::Receiver<bool>| async move {
        let _ = s.wait_for(|v| *v).await;
    };
    let table = tokio::spawn(table.run(until(stopped.clone())));
    let stream = tokio::spawn(stream.run(until(stopped.clone())));

    let t = Topic::new(format!(
        "conformance.stream.{}",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap();
    let event = |agg: &str, n: usize| {
        NewEvent::new(
            t.clone(),
            AggregateRef::new("agg", agg).unwrap(),
            format!("{{\"n\":{n}}}"),
        )
    };
    // Act 1: a message too large for every broker here (1 MiB limits), its successor, and
    // other aggregates in the same and later transactions.
    let too_large = NewEvent::new(
        t.clone(),
        AggregateRef::new("agg", "big").unwrap(),
        vec![b'x'; 1_500_000],
    );
    let successor = event("big", 1);
    let a0 = event("a0", 0);
    let mut expected = vec![successor.clone(), a0.clone()];
    commit(&pool, &outbox, &[too_large.clone(), successor.clone(), a0]).await;
    for round in 1..6 {
        let batch: Vec<_> = (0..4).map(|a| event(&format!("a{a}"), round)).collect();
        commit(&pool, &outbox, &batch).await;
        expected.extend(batch);
    }
    wait_for(
        LIMIT,
        "the oversized event dead after its attempts",
        || async { matches!(row(&pool, &too_large).await, Some((s, 3)) if s == "dead") },
    )
    .await;
    // The table relay deletes what it published (no retention): the dead event is all
    // that is left there once the successor went out behind it.
    wait_for(LIMIT, "its successor published from the table", || async {
        row(&pool, &successor).await.is_none()
    })
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM app.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1, "only the dead event stays in the table");

    // Act 2: the broker goes away while writers go on.
    transport.start_outage();
    let during: Vec<_> = (6..26).map(|i| event(&format!("a{}", i % 4), i)).collect();
    for chunk in during.chunks(4) {
        commit(&pool, &outbox, chunk).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows_during: i64 = sqlx::query_scalar("SELECT count(*) FROM app.event_outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows_during, 1, "an outage parks nothing");
    let held = slot_status(&pool, &slot).await.unwrap().unwrap();
    assert!(held.lag_bytes > 0, "the slot keeps what waits");
    transport.end_outage();
    expected.extend(during);

    // Act 3: everything arrives, each aggregate in commit order.
    let received = transport.received(t.as_str(), expected.len(), LIMIT).await;
    assert_delivered_in_order(&received, &expected);
    assert!(
        !received
            .iter()
            .any(|m| m.headers["event_id"] == too_large.event_id().to_string()),
        "the oversized event never arrived"
    );
    let _ = stop.send(true);
    let report = stream.await.unwrap().unwrap();
    let table = table.await.unwrap();
    // Parked: the oversized event and its successor, nothing else.
    assert_eq!((report.rejected, report.parked), (1, 2), "{report:?}");
    assert_eq!((table.published, table.dead_lettered), (1, 1), "{table:?}");
    assert!(report.outage_pauses >= 1, "{report:?}");
    pool.close().await;
    drop(cluster);
}
