//! Quickstart: business rows and their events committed together, relayed in order, consumed.
//!
//! ```text
//! cargo run --release -p outbox --example quickstart
//! ```
//! Runs on the embedded default (SQLite file `outbox-quickstart.db` + the in-process bus), no
//! servers needed. The same program runs distributed by configuration alone:
//! `DATABASE_URL=postgres://postgres@127.0.0.1/test OUTBOX_BROKER=127.0.0.1:9092`.
//!
//! Four writers place orders; each order row and its `shop.order.placed.v1` event commit in
//! one transaction, and one transaction in ten rolls back (its event never leaves). A relay
//! publishes the committed events; a consumer receives them and checks the order per customer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use outbox::backend::{Broker, Database};
use outbox::bus::Bus;
use outbox::{
    AggregateRef, ConsumerConfig, Handled, HandlerError, IncomingMessage, MessageHandler, NewEvent,
    OutboxMetrics, Relay, RelayConfig, Settings, Topic, WakeSignal,
};

const WRITERS: usize = 4;
const ORDERS_PER_WRITER: usize = 250;
const CUSTOMERS: usize = 40;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Receives order events: checks each customer's orders arrive in placement order, and
/// measures commit-to-consume latency.
#[derive(Default)]
struct Receiver {
    seen: Mutex<HashSet<String>>,
    last_n: Mutex<HashMap<String, u64>>,
    latencies: Mutex<Vec<u64>>,
}

#[async_trait]
impl MessageHandler for Receiver {
    async fn handle(&self, m: &IncomingMessage) -> Result<Handled, HandlerError> {
        let id = m.event_id()?.to_string();
        if !self.seen.lock().unwrap().insert(id) {
            return Ok(Handled::Duplicate);
        }
        let body: serde_json::Value = serde_json::from_slice(&m.payload)
            .map_err(|e| HandlerError::poison(format!("not JSON: {e}")))?;
        let customer = body["customer"].as_str().unwrap_or_default().to_owned();
        let n = body["n"].as_u64().unwrap_or_default();
        let prev = self.last_n.lock().unwrap().insert(customer.clone(), n);
        if prev.is_some_and(|p| p >= n) {
            return Err(HandlerError::poison(format!("order broken for {customer}")));
        }
        let created = body["placed_at_ms"].as_u64().unwrap_or_default();
        self.latencies
            .lock()
            .unwrap()
            .push(now_ms().saturating_sub(created));
        Ok(Handled::Processed)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let mut settings = Settings::from_env()?;
    let url = settings
        .database_url
        .clone()
        .unwrap_or_else(|| "sqlite://outbox-quickstart.db".into());
    if std::env::var("OUTBOX_SCHEMA").is_err() {
        settings.schema = "outbox_quickstart".into();
    }
    let db = Database::open(&url, &settings.schema).await?;
    let broker = Broker::from_setting(&settings.broker, Bus::default())?;
    println!(
        "database: {} ({}), broker: {}",
        db.kind(),
        outbox::config::redact_url(&url),
        broker.kind()
    );
    let (orders, counters) = match &db {
        Database::Postgres { schema, .. } => (
            format!("\"{}\".orders", schema.name()),
            format!("\"{}\".customer_counters", schema.name()),
        ),
        Database::Sqlite { .. } | Database::MySql { .. } => {
            ("orders".into(), "customer_counters".into())
        }
    };
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {orders} (
             id TEXT PRIMARY KEY, customer TEXT NOT NULL, amount_cents BIGINT NOT NULL);
         CREATE TABLE IF NOT EXISTS {counters} (customer TEXT PRIMARY KEY, n BIGINT NOT NULL);"
    );
    match &db {
        Database::Postgres { pool, .. } => {
            sqlx::raw_sql(&ddl).execute(pool).await?;
        }
        Database::Sqlite { pool } => {
            sqlx::raw_sql(&ddl).execute(pool).await?;
        }
        Database::MySql { pool, .. } => {
            // MySQL keys no unbounded text.
            sqlx::raw_sql(&ddl.replace("TEXT", "VARCHAR(255)"))
                .execute(pool)
                .await?;
        }
    }

    // Metrics on 127.0.0.1:9464 while the example runs.
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = OutboxMetrics::register(&mut registry).table("quickstart", "event_outbox");
    let store = db.relay_store();
    let endpoint =
        outbox::http::MetricsEndpoint::new(registry).with_source(store.clone(), metrics.clone());
    if let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:9464").await {
        tokio::spawn(async move { axum::serve(listener, endpoint.router()).await });
    }

    let leftover = store.stats().await?.pending as usize;
    let wake = WakeSignal::new();
    let relay = Relay::new(store.clone(), broker.publisher()?, RelayConfig::default())
        .with_wake_signal(wake.clone())
        .with_metrics(metrics.clone());
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = relay_stopped.await;
    }));

    let topic = Topic::new("shop.order.placed.v1")?;
    let receiver = Arc::new(Receiver::default());
    let (stop_consumer, consumer_stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = {
        let (broker, receiver, topic) = (broker.clone(), receiver.clone(), topic.clone());
        let group = format!("quickstart-{}", uuid::Uuid::new_v4().simple());
        tokio::spawn(async move {
            broker
                .consume(
                    ConsumerConfig::new(group, &[topic.as_str()]),
                    receiver,
                    async move {
                        let _ = consumer_stopped.await;
                    },
                )
                .await
        })
    };

    let started = Instant::now();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (db, topic, run, orders, counters, wake, metrics) = (
            db.clone(),
            topic.clone(),
            run.clone(),
            orders.clone(),
            counters.clone(),
            wake.clone(),
            metrics.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut committed = 0usize;
            for i in 0..ORDERS_PER_WRITER {
                let c = (w * 7 + i) % CUSTOMERS;
                let customer = format!("customer-{c}");
                let order = format!("{run}-{w}-{i}");
                let rollback = i % 10 == 9;
                let make_event = |n: u64| {
                    NewEvent::json(
                        topic.clone(),
                        AggregateRef::new("customer", &customer).unwrap(),
                        &serde_json::json!({"order_id": order, "customer": customer, "n": n,
                                            "placed_at_ms": now_ms()}),
                    )
                };
                let insert = format!("INSERT INTO {orders} VALUES ($1, $2, $3)");
                // The counter row's lock serialises writers of one customer until commit, so
                // `n` follows commit order (a rolled-back increment vanishes with its event).
                let next_n = format!(
                    "INSERT INTO {counters} (customer, n) VALUES ($1, 1)
                     ON CONFLICT (customer) DO UPDATE SET n = {counters}.n + 1 RETURNING n"
                );
                match &db {
                    Database::Postgres { pool, schema } => {
                        let outbox = outbox::postgres::PgOutbox::new(schema.clone())
                            .with_wake_signal(wake.clone())
                            .with_metrics(metrics.clone());
                        let mut tx = pool.begin().await?;
                        sqlx::query(&insert)
                            .bind(&order)
                            .bind(&customer)
                            .bind(i as i64 * 100)
                            .execute(&mut *tx)
                            .await?;
                        let n: i64 = sqlx::query_scalar(&next_n)
                            .bind(&customer)
                            .fetch_one(&mut *tx)
                            .await?;
                        outbox.enqueue(&mut tx, &make_event(n as u64)?).await?;
                        if rollback {
                            tx.rollback().await?
                        } else {
                            outbox.commit(tx).await?
                        }
                    }
                    Database::Sqlite { pool } => {
                        let outbox =
                            outbox::sqlite::SqliteOutbox::new(outbox::sqlite::SqliteDialect)
                                .with_wake_signal(wake.clone())
                                .with_metrics(metrics.clone());
                        let mut tx = outbox::sqlite::begin(pool).await?;
                        sqlx::query(&insert)
                            .bind(&order)
                            .bind(&customer)
                            .bind(i as i64 * 100)
                            .execute(&mut *tx)
                            .await?;
                        let n: i64 = sqlx::query_scalar(&next_n)
                            .bind(&customer)
                            .fetch_one(&mut *tx)
                            .await?;
                        outbox.enqueue(&mut tx, &make_event(n as u64)?).await?;
                        if rollback {
                            tx.rollback().await?
                        } else {
                            outbox.commit(tx).await?
                        }
                    }
                    Database::MySql { pool, .. } => {
                        let outbox = outbox::mysql::MySqlOutbox::new(outbox::mysql::MySqlDialect)
                            .with_wake_signal(wake.clone())
                            .with_metrics(metrics.clone());
                        let mut tx = pool.begin().await?;
                        sqlx::query(&format!("INSERT INTO {orders} VALUES (?, ?, ?)"))
                            .bind(&order)
                            .bind(&customer)
                            .bind(i as i64 * 100)
                            .execute(&mut *tx)
                            .await?;
                        // No RETURNING in MySQL: upsert, then read back under the row lock.
                        sqlx::query(&format!(
                            "INSERT INTO {counters} (customer, n) VALUES (?, 1)
                             ON DUPLICATE KEY UPDATE n = n + 1"
                        ))
                        .bind(&customer)
                        .execute(&mut *tx)
                        .await?;
                        let n: i64 = sqlx::query_scalar(&format!(
                            "SELECT n FROM {counters} WHERE customer = ?"
                        ))
                        .bind(&customer)
                        .fetch_one(&mut *tx)
                        .await?;
                        outbox.enqueue(&mut tx, &make_event(n as u64)?).await?;
                        if rollback {
                            tx.rollback().await?
                        } else {
                            outbox.commit(tx).await?
                        }
                    }
                }
                if !rollback {
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
    let expected = committed + leftover;
    let deadline = Instant::now() + Duration::from_secs(120);
    while receiver.seen.lock().unwrap().len() < expected {
        anyhow::ensure!(Instant::now() < deadline, "events did not arrive in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done_time = started.elapsed();
    let _ = stop_relay.send(());
    let report = relay.await?;
    let _ = stop_consumer.send(());
    let consumed = consumer.await?.context("consumer")?;
    let stats = store.stats().await?;

    let mut lat = receiver.latencies.lock().unwrap().clone();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    println!("committed {committed} orders with their events in {write_time:.2?} ({WRITERS} writers; every 10th transaction rolled back, its event never left)");
    println!(
        "relay published {} events; consumer received {} in {done_time:.2?}, in order per customer",
        report.published, consumed.processed
    );
    println!(
        "commit-to-consume latency: p50 {} ms, p99 {} ms, max {} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!("outbox now: {} pending, {} dead", stats.pending, stats.dead);
    Ok(())
}
