//! The stream write mode and its relay on a private cluster with `wal_level = logical`:
//! atomicity, commit order under concurrent writers, rejected events parked behind the table,
//! broker outages, a relay killed mid-stream with a standby taking over, PostgreSQL crashing,
//! an idle outbox not holding WAL, and the guard rails. A scripted test publisher stands in
//! for the broker (the platform runs the stream on real brokers elsewhere).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::testing::{wait_until, TestPublisher};
use outbox_core::{
    AggregateRef, EnqueueOutcome, EventId, NewEvent, OutboxMessage, Relay, RelayConfig, Topic,
};
use outbox_postgres::stream::{
    check_slot, create_slot, slot_status, SlotName, StreamConfig, StreamError, StreamRelay,
    StreamReport,
};
use outbox_postgres::testing::Cluster;
use outbox_postgres::{migrate, PgOutbox, PgRelayStore, Schema, WriteMode};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(60);

struct StreamDb {
    cluster: Cluster,
    pool: PgPool,
    schema: Schema,
    slot: SlotName,
}

type Running<T> = (oneshot::Sender<()>, JoinHandle<T>);

impl StreamDb {
    async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let cluster = Cluster::create_logical();
        let pool = PgPoolOptions::new()
            .max_connections(12)
            .acquire_timeout(Duration::from_secs(3))
            .connect(&cluster.url())
            .await
            .unwrap();
        let schema = Schema::new("app").unwrap();
        migrate(&pool, &schema).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE app.aggregate (id TEXT PRIMARY KEY, version INT NOT NULL DEFAULT 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let slot = SlotName::for_schema(&schema).unwrap();
        assert!(create_slot(&pool, &slot).await.unwrap(), "created now");
        assert!(!create_slot(&pool, &slot).await.unwrap(), "idempotent");
        Self {
            cluster,
            pool,
            schema,
            slot,
        }
    }

    fn outbox(&self) -> PgOutbox {
        PgOutbox::new(self.schema.clone()).with_write_mode(WriteMode::LogicalMessage)
    }

    fn relay_config() -> RelayConfig {
        common::fast_config()
    }

    fn stream_config(&self) -> StreamConfig {
        let mut c = StreamConfig::new(self.slot.clone(), Self::relay_config());
        c.standby_poll = Duration::from_millis(100);
        c.status_interval = Duration::from_millis(200);
        c.stats_interval = Duration::from_millis(200);
        c
    }

    fn stream_relay(
        &self,
        publisher: &TestPublisher,
        config: StreamConfig,
    ) -> Running<Result<StreamReport, StreamError>> {
        let relay = StreamRelay::new(
            self.pool.clone(),
            self.cluster.url(),
            self.schema.clone(),
            Arc::new(publisher.clone()),
            config,
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        }));
        (stop, run)
    }

    fn table_relay(&self, publisher: &TestPublisher) -> Running<outbox_core::RelayReport> {
        let relay = Relay::new(
            PgRelayStore::new(self.pool.clone(), &self.schema),
            publisher.clone(),
            Self::relay_config(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        }));
        (stop, run)
    }

    /// One transaction: bumps the aggregate's version under its row lock and enqueues an
    /// event carrying the new version; `rollback` throws it all away.
    async fn write(
        &self,
        outbox: &PgOutbox,
        aggregate: &str,
        rollback: bool,
    ) -> Option<(EventId, i32)> {
        db_write(&self.pool, outbox, aggregate, rollback).await
    }

    async fn table_ids(&self, status: &str) -> HashSet<EventId> {
        sqlx::query_scalar::<_, uuid::Uuid>(
            "SELECT event_id FROM app.event_outbox WHERE status = $1",
        )
        .bind(status)
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .map(EventId::from_uuid)
        .collect()
    }
}

fn event(aggregate: &str, version: i32) -> NewEvent {
    NewEvent::json(
        Topic::new("orders.v1").unwrap(),
        AggregateRef::new("order", aggregate).unwrap(),
        &serde_json::json!({ "order": aggregate, "version": version }),
    )
    .unwrap()
    .with_header("trace", format!("{aggregate}-{version}"))
}

fn version(m: &OutboxMessage) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    v["version"].as_i64().unwrap()
}

/// Per aggregate, the first deliveries must be versions 1, 2, 3, ... (commit order), with no
/// gap and nothing rolled back; returns the number of distinct events.
fn assert_commit_order(
    delivered: &[OutboxMessage],
    committed: &HashMap<EventId, (String, i32)>,
) -> usize {
    let mut seen = HashSet::new();
    let mut next: HashMap<String, i64> = HashMap::new();
    for m in delivered {
        assert!(
            committed.contains_key(&m.event_id),
            "{} was never committed",
            m.event_id
        );
        if !seen.insert(m.event_id) {
            continue;
        }
        let n = next.entry(m.aggregate.id().to_owned()).or_insert(1);
        assert_eq!(
            version(m),
            *n,
            "aggregate {}: out of commit order",
            m.aggregate.id()
        );
        *n += 1;
    }
    seen.len()
}

/// Waits until every committed event was delivered by `publishers` (their deliveries taken
/// one publisher after the other, as they happened), checks commit order per aggregate and
/// returns the deliveries.
async fn wait_all_in_commit_order(
    publishers: &[&TestPublisher],
    committed: &HashMap<EventId, (String, i32)>,
    what: &str,
) -> Vec<OutboxMessage> {
    let delivered =
        || -> Vec<OutboxMessage> { publishers.iter().flat_map(|p| p.delivered()).collect() };
    wait_until(LIMIT, what, || async {
        delivered()
            .iter()
            .map(|m| m.event_id)
            .collect::<HashSet<_>>()
            .len()
            >= committed.len()
    })
    .await;
    let all = delivered();
    assert_eq!(assert_commit_order(&all, committed), committed.len());
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_events_stream_in_commit_order_and_rolled_back_ones_never() {
    let db = StreamDb::new().await;
    let publisher = TestPublisher::new();
    let (stop, run) = db.stream_relay(&publisher, db.stream_config());
    // Eight writers on five shared aggregates; every fifth transaction rolls back. The row
    // lock orders the writers of an aggregate; the stream must follow commit order.
    let committed: Arc<Mutex<HashMap<EventId, (String, i32)>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..8 {
        let (pool, outbox, committed) = (db.pool.clone(), db.outbox(), committed.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..40 {
                let agg = format!("o-{}", (w + i) % 5);
                if let Some((id, v)) = db_write(&pool, &outbox, &agg, i % 5 == 4).await {
                    committed.lock().unwrap().insert(id, (agg, v));
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    // A batch enqueue and an idempotency key, both in the stream mode.
    let mut tx = db.pool.begin().await.unwrap();
    let batch = [
        event("batch", 1).with_idempotency_key("k-1"),
        event("batch", 2),
        event("batch", 3).with_idempotency_key("k-1"),
    ];
    let outcomes = db.outbox().enqueue_all(&mut tx, &batch).await.unwrap();
    assert!(matches!(outcomes[0], EnqueueOutcome::Inserted { .. }));
    assert!(matches!(outcomes[1], EnqueueOutcome::Inserted { .. }));
    assert_eq!(outcomes[2], EnqueueOutcome::Duplicate);
    assert_eq!(
        db.outbox()
            .enqueue(&mut tx, &event("batch", 9).with_idempotency_key("k-1"))
            .await
            .unwrap(),
        EnqueueOutcome::Duplicate
    );
    tx.commit().await.unwrap();
    let committed = {
        let mut c = committed.lock().unwrap().clone();
        for e in &batch[..2] {
            c.insert(e.event_id(), ("batch".into(), version_of(e)));
        }
        c
    };
    let expected = committed.len();
    assert!(expected > 250, "most transactions committed: {expected}");
    let delivered =
        wait_all_in_commit_order(&[&publisher], &committed, "every committed event published")
            .await;
    let first = delivered
        .iter()
        .find(|m| m.aggregate.id() == "o-0")
        .unwrap();
    assert_eq!(first.headers["trace"], "o-0-1", "headers travel");
    assert_eq!(first.topic.as_str(), "orders.v1");
    // Nothing went through the table, and the slot was confirmed up to the end.
    assert_eq!(db.count_rows().await, 0);
    wait_until(LIMIT, "the slot confirmed everything", || async {
        slot_status(&db.pool, &db.slot)
            .await
            .unwrap()
            .unwrap()
            .lag_bytes
            < 64 * 1024
    })
    .await;
    stop.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.published as usize, delivered.len());
    assert_eq!(report.parked, 0);
    let status = slot_status(&db.pool, &db.slot).await.unwrap().unwrap();
    assert!(!status.active, "the slot is free after the relay stopped");
}

fn version_of(e: &NewEvent) -> i32 {
    let v: serde_json::Value = serde_json::from_slice(e.payload()).unwrap();
    v["version"].as_i64().unwrap() as i32
}

async fn db_write(
    pool: &PgPool,
    outbox: &PgOutbox,
    aggregate: &str,
    rollback: bool,
) -> Option<(EventId, i32)> {
    let mut tx = pool.begin().await.ok()?;
    let version: i32 = sqlx::query_scalar(
        "INSERT INTO app.aggregate (id, version) VALUES ($1, 1)
         ON CONFLICT (id) DO UPDATE SET version = aggregate.version + 1 RETURNING version",
    )
    .bind(aggregate)
    .fetch_one(&mut *tx)
    .await
    .ok()?;
    let event = event(aggregate, version);
    outbox.enqueue(&mut tx, &event).await.ok()?;
    if rollback {
        tx.rollback().await.ok()?;
        return None;
    }
    tx.commit().await.ok()?;
    Some((event.event_id(), version))
}

impl StreamDb {
    async fn count_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM app.event_outbox")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_event_and_its_successors_are_parked_and_published_in_order() {
    let db = StreamDb::new().await;
    let publisher = TestPublisher::new();
    let outbox = db.outbox();
    let mut committed = HashMap::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (id, v) = db.write(&outbox, "a", false).await.unwrap();
        committed.insert(id, ("a".to_owned(), v));
        ids.push(id);
    }
    // The second event of `a` is rejected twice; `b` is not held up.
    publisher.reject_times(ids[1], 2);
    for _ in 0..3 {
        let (id, v) = db.write(&outbox, "b", false).await.unwrap();
        committed.insert(id, ("b".to_owned(), v));
    }
    let (stop, run) = db.stream_relay(&publisher, db.stream_config());
    wait_until(
        LIMIT,
        "a's rejected event and its successor parked",
        || async { db.table_ids("pending").await.len() == 2 },
    )
    .await;
    assert_eq!(
        db.table_ids("pending").await,
        HashSet::from([ids[1], ids[2]]),
        "the rejected event and the one behind it, nothing else"
    );
    let (attempts, error): (i32, Option<String>) =
        sqlx::query_as("SELECT attempts, last_error FROM app.event_outbox WHERE event_id = $1")
            .bind(ids[1].as_uuid())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1);
    assert!(error.is_some());
    // While `a` has rows in the table, its new events queue behind them there.
    let (id4, v4) = db.write(&outbox, "a", false).await.unwrap();
    committed.insert(id4, ("a".to_owned(), v4));
    wait_until(LIMIT, "a's next event parked behind", || async {
        db.table_ids("pending").await.contains(&id4)
    })
    .await;
    // b's events flowed meanwhile.
    assert_eq!(
        publisher
            .delivered()
            .iter()
            .filter(|m| m.aggregate.id() == "b")
            .count(),
        3
    );
    // The table relay retries with backoff, in order; then a drains and streams again.
    let (stop_table, table) = db.table_relay(&publisher);
    wait_until(LIMIT, "the parked events published", || async {
        db.table_ids("pending").await.is_empty()
    })
    .await;
    let (id5, v5) = db.write(&outbox, "a", false).await.unwrap();
    committed.insert(id5, ("a".to_owned(), v5));
    wait_until(LIMIT, "a's next event streamed", || async {
        publisher.delivered().iter().any(|m| m.event_id == id5)
    })
    .await;
    wait_all_in_commit_order(&[&publisher], &committed, "everything published").await;
    assert_eq!(
        publisher.offered(ids[1]),
        3,
        "two rejections, then delivered"
    );
    stop.send(()).unwrap();
    stop_table.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    // Parked: the rejected event, the one behind it and the one committed later; the event
    // after the drain went by the stream.
    assert_eq!((report.rejected, report.parked), (1, 3));
    assert_eq!(table.await.unwrap().published, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_pauses_the_stream_without_attempts_or_parking() {
    let db = StreamDb::new().await;
    let publisher = TestPublisher::new();
    publisher.set_unavailable(true);
    let (stop, run) = db.stream_relay(&publisher, db.stream_config());
    let outbox = db.outbox();
    let mut committed = HashMap::new();
    for i in 0..20 {
        let agg = format!("o-{}", i % 3);
        let (id, v) = db.write(&outbox, &agg, false).await.unwrap();
        committed.insert(id, (agg, v));
    }
    wait_until(LIMIT, "the paused relay probing", || async {
        publisher.probes() >= 3
    })
    .await;
    assert_eq!(publisher.delivered_count(), 0);
    assert_eq!(db.count_rows().await, 0, "an outage parks nothing");
    let held = slot_status(&db.pool, &db.slot).await.unwrap().unwrap();
    assert!(held.lag_bytes > 0, "the slot holds the unpublished events");
    publisher.set_unavailable(false);
    wait_all_in_commit_order(
        &[&publisher],
        &committed,
        "everything published after the outage",
    )
    .await;
    stop.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(report.outage_pauses >= 1);
    assert_eq!((report.rejected, report.parked), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_resumes_from_the_slot_through_its_standby() {
    let db = StreamDb::new().await;
    let first = TestPublisher::new();
    first.set_delay(Duration::from_millis(5));
    let second = TestPublisher::new();
    let (_stop_first, run_first) = db.stream_relay(&first, db.stream_config());
    wait_until(LIMIT, "the first relay streaming", || async {
        slot_status(&db.pool, &db.slot)
            .await
            .unwrap()
            .unwrap()
            .active
    })
    .await;
    let (stop_second, run_second) = db.stream_relay(&second, db.stream_config());
    let outbox = db.outbox();
    let committed: Arc<Mutex<HashMap<EventId, (String, i32)>>> = Arc::default();
    let writer = {
        let (pool, outbox, committed) = (db.pool.clone(), outbox.clone(), committed.clone());
        tokio::spawn(async move {
            for i in 0..300 {
                let agg = format!("o-{}", i % 7);
                if let Some((id, v)) = db_write(&pool, &outbox, &agg, false).await {
                    committed.lock().unwrap().insert(id, (agg, v));
                }
            }
        })
    };
    wait_until(LIMIT, "the first relay mid-stream", || async {
        first.delivered_count() >= 50
    })
    .await;
    // A crash: the task dies with its connection, no last status, no goodbye.
    run_first.abort();
    let _ = run_first.await;
    writer.await.unwrap();
    // Written after the crash: only the standby can publish these.
    for i in 0..20 {
        let agg = format!("o-{}", i % 7);
        let (id, v) = db.write(&outbox, &agg, false).await.unwrap();
        committed.lock().unwrap().insert(id, (agg, v));
    }
    let committed = committed.lock().unwrap().clone();
    // In global order (everything the first published came before the second started),
    // each aggregate's first deliveries are in commit order: nothing lost, nothing reordered.
    wait_all_in_commit_order(
        &[&first, &second],
        &committed,
        "the standby took over and caught up",
    )
    .await;
    assert!(
        second.delivered_count() >= 20,
        "the standby published what came after the crash"
    );
    stop_second.send(()).unwrap();
    let report = run_second.await.unwrap().unwrap();
    assert!(
        report.standby_waits >= 1,
        "it waited as a standby first: {report:?}"
    );
    assert_eq!(report.sessions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_crash_and_restart_loses_nothing_committed() {
    let db = StreamDb::new().await;
    let publisher = TestPublisher::new();
    let (stop, run) = db.stream_relay(&publisher, db.stream_config());
    let outbox = db.outbox();
    let mut committed = HashMap::new();
    for i in 0..40 {
        let agg = format!("o-{}", i % 4);
        let (id, v) = db.write(&outbox, &agg, false).await.unwrap();
        committed.insert(id, (agg, v));
    }
    db.cluster.crash();
    assert!(
        db.write(&outbox, "o-0", false).await.is_none(),
        "the database is down"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.cluster.start();
    let mut written = 0;
    while written < 40 {
        let agg = format!("o-{}", written % 4);
        if let Some((id, v)) = db.write(&outbox, &agg, false).await {
            committed.insert(id, (agg, v));
            written += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    wait_all_in_commit_order(
        &[&publisher],
        &committed,
        "everything committed before and after the crash published",
    )
    .await;
    stop.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(
        report.sessions >= 2,
        "a new session after the restart: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_holds_no_wal_and_the_guard_rails_speak() {
    let db = StreamDb::new().await;
    // Guard rails first: a second outbox without its slot is refused with what to do.
    let other = SlotName::new("outbox_missing").unwrap();
    let e = check_slot(&db.pool, &other).await.unwrap_err();
    assert!(e.to_string().contains("outbox migrate"), "{e}");
    let publisher = TestPublisher::new();
    let mut config = db.stream_config();
    config.heartbeat = Duration::from_millis(200);
    config.max_retained_wal = Some(1024);
    let (stop, run) = db.stream_relay(&publisher, config);
    wait_until(LIMIT, "streaming", || async {
        slot_status(&db.pool, &db.slot)
            .await
            .unwrap()
            .unwrap()
            .active
    })
    .await;
    // Another database on the server writes WAL; this outbox writes nothing.
    sqlx::raw_sql("CREATE DATABASE elsewhere")
        .execute(&db.pool)
        .await
        .unwrap();
    let elsewhere = PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "{}/elsewhere",
            db.cluster.url().rsplit_once('/').unwrap().0
        ))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS t FROM generate_series(1, 100000) g",
    )
    .execute(&elsewhere)
    .await
    .unwrap();
    let written: i64 = sqlx::query_scalar(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(db.slot.as_str())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(written > 10 << 20, "the filler wrote WAL: {written}");
    wait_until(
        LIMIT,
        "the idle slot moved past the other database's WAL",
        || async {
            slot_status(&db.pool, &db.slot)
                .await
                .unwrap()
                .unwrap()
                .lag_bytes
                < 1 << 20
        },
    )
    .await;
    let status = slot_status(&db.pool, &db.slot).await.unwrap().unwrap();
    assert!(status.active && status.wal_status != "lost", "{status:?}");
    let line = status.describe(Some(1));
    assert!(
        line.contains("streaming") && line.contains("OVER THE LIMIT"),
        "{line}"
    );
    // Idle for more than two heartbeat intervals.
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.send(()).unwrap();
    let report = run.await.unwrap().unwrap();
    assert!(report.heartbeats >= 1, "{report:?}");
    assert_eq!(publisher.delivered_count(), 0, "heartbeats are not events");
}

#[tokio::test]
async fn without_logical_wal_the_stream_mode_refuses_to_start() {
    // The machine's own cluster keeps wal_level = replica.
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| outbox_postgres::testing::DEFAULT_TEST_URL.into());
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let level: String = sqlx::query_scalar("SHOW wal_level")
        .fetch_one(&pool)
        .await
        .unwrap();
    if level == "logical" {
        eprintln!("this server writes logical WAL; nothing to refuse");
        return;
    }
    let slot = SlotName::new("outbox_refused").unwrap();
    let e = create_slot(&pool, &slot).await.unwrap_err();
    assert!(matches!(e, StreamError::WalLevel(_)), "{e}");
    assert!(e.to_string().contains("wal_level = logical"), "{e}");
    let relay = StreamRelay::new(
        pool.clone(),
        url,
        Schema::new("public").unwrap(),
        Arc::new(TestPublisher::new()),
        StreamConfig::new(slot, RelayConfig::default()),
    );
    let e = relay.run(std::future::pending()).await.unwrap_err();
    assert!(e.to_string().contains("wal_level"), "{e}");
    assert!(SlotName::new("Bad-Name").is_err());
}
