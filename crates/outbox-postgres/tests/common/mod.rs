//! Shared helpers: every test gets a fresh schema in the real PostgreSQL of `DATABASE_URL`.
#![allow(dead_code, unused_imports)] // each test file uses a different part

use std::time::Duration;

pub use outbox_core::testing::wait_until;
use outbox_core::testing::TestPublisher;
use outbox_core::{AggregateRef, NewEvent, Relay, RelayConfig, RelayReport, RetryPolicy, Topic};
use outbox_postgres::testing::TestSchema;
use outbox_postgres::{PgOutbox, PgRelayStore, Schema};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestDb {
    pub pool: PgPool,
    pub schema: Schema,
    inner: TestSchema,
}

impl TestDb {
    pub async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,outbox_core=info".into()),
            )
            .with_test_writer()
            .try_init();
        let inner = TestSchema::create().await;
        sqlx::raw_sql(&format!(
            "CREATE TABLE {} (id TEXT PRIMARY KEY, note TEXT)",
            inner.table("orders")
        ))
        .execute(&inner.pool)
        .await
        .unwrap();
        Self {
            pool: inner.pool.clone(),
            schema: inner.schema.clone(),
            inner,
        }
    }

    pub fn outbox(&self) -> PgOutbox {
        PgOutbox::new(self.schema.clone())
    }

    pub fn store(&self) -> PgRelayStore {
        PgRelayStore::new(self.pool.clone(), &self.schema)
    }

    pub fn table(&self, name: &str) -> String {
        self.inner.table(name)
    }

    pub async fn count(&self, where_clause: &str) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE {where_clause}",
            self.table("event_outbox")
        ))
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// Commits one business row plus `events` in one transaction.
    pub async fn write(&self, order_id: &str, events: &[NewEvent]) {
        let outbox = self.outbox();
        let mut tx = self.pool.begin().await.unwrap();
        sqlx::query(&format!(
            "INSERT INTO {} (id) VALUES ($1)",
            self.table("orders")
        ))
        .bind(order_id)
        .execute(&mut *tx)
        .await
        .unwrap();
        for e in events {
            outbox.enqueue(&mut tx, e).await.unwrap();
        }
        tx.commit().await.unwrap();
    }

    pub async fn drop(self) {
        self.inner.drop().await;
    }
}

pub fn event(aggregate: &str, n: u32) -> NewEvent {
    NewEvent::json(
        Topic::new("test.order.v1").unwrap(),
        AggregateRef::new("order", aggregate).unwrap(),
        &serde_json::json!({ "aggregate": aggregate, "n": n }),
    )
    .unwrap()
}

/// `n` from an event payload written by [`event`].
pub fn payload_n(payload: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v["n"].as_u64().unwrap()
}

pub fn fast_config() -> RelayConfig {
    RelayConfig {
        service: "test".into(),
        batch_size: 50,
        poll_min: Duration::from_millis(5),
        poll_max: Duration::from_millis(50),
        lease: Duration::from_secs(2),
        retry: RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(400),
            max_attempts: 5,
        },
        outage_backoff_min: Duration::from_millis(20),
        outage_backoff_max: Duration::from_millis(200),
        stats_interval: Duration::from_millis(100),
        ..RelayConfig::default()
    }
}

pub struct RunningRelay {
    pub handle: JoinHandle<RelayReport>,
    stop: Option<oneshot::Sender<()>>,
}

impl RunningRelay {
    /// Graceful shutdown; returns the relay's report.
    pub async fn stop(mut self) -> RelayReport {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("relay did not stop in time")
            .unwrap()
    }

    /// A crash as the database sees it: the task is dropped mid-flight, nothing is released.
    pub fn kill(self) {
        self.handle.abort();
    }
}

pub fn spawn_relay(db: &TestDb, publisher: TestPublisher, config: RelayConfig) -> RunningRelay {
    let relay = Relay::new(db.store(), publisher, config);
    spawn(relay)
}

pub fn spawn<S, P>(relay: Relay<S, P>) -> RunningRelay
where
    S: outbox_core::RelayStore,
    P: outbox_core::Publisher,
{
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async move {
        let _ = rx.await;
    }));
    RunningRelay {
        handle,
        stop: Some(tx),
    }
}
