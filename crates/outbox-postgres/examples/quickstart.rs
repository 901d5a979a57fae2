//! Quickstart: business rows and their events committed together, relayed in order.
//!
//! ```text
//! cargo run --release -p outbox-postgres --example quickstart
//! ```
//! Uses `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`) and the schema
//! `outbox_quickstart`. Four writers place orders; each order row and its `order.placed`
//! event commit in one transaction (one in ten transactions rolls back: its event never
//! leaves). A relay publishes the committed events to a publisher that checks order per
//! aggregate and prints a summary. Metrics are served on 127.0.0.1:9464/metrics meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use outbox_core::{
    AggregateRef, NewEvent, OutboxMessage, OutboxMetrics, PublishOutcome, Publisher, Relay,
    RelayConfig, RelayStore, Topic, WakeSignal,
};
use outbox_postgres::{check_schema, migrate, PgOutbox, PgRelayStore, Schema};
use sqlx::postgres::PgPoolOptions;

const WRITERS: usize = 4;
const ORDERS_PER_WRITER: usize = 500;
const CUSTOMERS: usize = 50;

/// Stands in for a broker: records per-customer order and commit-to-ack latency.
#[derive(Default)]
struct CheckingPublisher {
    last_seq: Mutex<HashMap<String, i64>>,
    latencies: Mutex<Vec<Duration>>,
}

#[async_trait]
impl Publisher for CheckingPublisher {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let mut last = self.last_seq.lock().unwrap();
        let mut lat = self.latencies.lock().unwrap();
        batch
            .iter()
            .map(|m| {
                let prev = last.insert(m.aggregate.id().to_owned(), m.seq);
                assert!(
                    prev.is_none_or(|p| p < m.seq),
                    "order broken for {}",
                    m.aggregate
                );
                lat.push(m.age_at_claim);
                PublishOutcome::Delivered
            })
            .collect()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .with_context(|| {
            format!(
                "cannot connect to {}: is PostgreSQL running? set DATABASE_URL",
                outbox_core::config::redact_url(&url)
            )
        })?;
    let schema = Schema::new("outbox_quickstart")?;
    migrate(&pool, &schema).await?;
    check_schema(&pool, &schema).await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS outbox_quickstart.orders (
             id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount_cents BIGINT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let leftover = PgRelayStore::new(pool.clone(), &schema).stats().await?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = OutboxMetrics::register(&mut registry).table("quickstart", "event_outbox");
    let store = PgRelayStore::new(pool.clone(), &schema);
    let endpoint =
        outbox_http::MetricsEndpoint::new(registry).with_source(store.clone(), metrics.clone());
    match tokio::net::TcpListener::bind("127.0.0.1:9464").await {
        Ok(listener) => {
            tokio::spawn(async move { axum::serve(listener, endpoint.router()).await });
            println!("metrics: http://127.0.0.1:9464/metrics");
        }
        Err(e) => println!("metrics endpoint not started (127.0.0.1:9464: {e})"),
    }

    let wake = WakeSignal::new();
    let outbox = PgOutbox::new(schema.clone())
        .with_wake_signal(wake.clone())
        .with_metrics(metrics.clone());
    let publisher = Arc::new(CheckingPublisher::default());
    let relay = Relay::from_shared(
        Arc::new(store.clone()),
        publisher.clone(),
        RelayConfig::default(),
    )
    .with_wake_signal(wake)
    .with_metrics(metrics);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));

    let started = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = Topic::new("shop.order.placed.v1")?;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (pool, outbox, topic, run) = (pool.clone(), outbox.clone(), topic.clone(), run.clone());
        writers.push(tokio::spawn(async move {
            let mut committed = 0usize;
            for i in 0..ORDERS_PER_WRITER {
                let order = format!("{run}-{w}-{i}");
                let customer = format!("customer-{}", (w * 31 + i) % CUSTOMERS);
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO outbox_quickstart.orders VALUES ($1, $2, $3)")
                    .bind(&order)
                    .bind(&customer)
                    .bind((i * 100) as i64)
                    .execute(&mut *tx)
                    .await?;
                let event = NewEvent::json(
                    topic.clone(),
                    AggregateRef::new("customer", &customer)?,
                    &serde_json::json!({"order_id": order, "customer": customer}),
                )?;
                outbox.enqueue(&mut tx, &event).await?;
                if i % 10 == 9 {
                    tx.rollback().await?; // the order and its event vanish together
                } else {
                    outbox.commit(tx).await?;
                    committed += 1;
                }
            }
            anyhow::Ok(committed)
        }));
    }
    let mut committed = 0;
    for w in writers {
        committed += w.await??;
    }
    let write_time = started.elapsed();
    let expected = committed + leftover.pending as usize;
    while publisher.latencies.lock().unwrap().len() < expected {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_time = started.elapsed();
    let _ = stop.send(());
    let report = relay.await?;
    let stats = store.stats().await?;

    let mut lat = publisher.latencies.lock().unwrap().clone();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    println!("committed {committed} orders with their events in {write_time:.2?} ({WRITERS} writers; every 10th transaction rolled back)");
    println!(
        "relay published {} events in {drain_time:.2?}; order per customer held",
        report.published
    );
    println!(
        "commit-to-claim latency: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "outbox now: {} pending, {} dead, {} live relays",
        stats.pending, stats.dead, stats.live_relays
    );
    Ok(())
}
