//! The stream write mode against the table mode, on a private cluster with
//! `wal_level = logical` and durable commits (fsync on):
//! - write cost: business transaction alone (a), plus a table `enqueue` (t), plus a stream
//!   `enqueue` (s), interleaved with rotating order; the slot exists (as in production) and no
//!   relay runs, so only the writers are measured;
//! - drain: the same backlog published by the stream relay and by the table relay to a
//!   publisher that acknowledges at once, beside PostgreSQL's own decoding of that WAL
//!   (`pg_logical_slot_peek_binary_changes`, the stream's limit);
//! - commit-to-ack latency under a steady rate, stream relay against the table relay woken by
//!   its commit watch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::{
    AggregateRef, EventId, NewEvent, OutboxMessage, PublishOutcome, Publisher, Relay, RelayConfig,
    Topic,
};
use outbox_kafka::testing::TestBroker;
use outbox_postgres::stream::{create_slot, SlotName, StreamConfig, StreamRelay};
use outbox_postgres::testing::Cluster;
use outbox_postgres::{migrate, PgOutbox, PgRelayStore, Schema, WriteMode};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::stats::{header, median, row, summarize, Summary};

/// The publisher under the relay: one that acknowledges at once (the relay's own limit), or a
/// real broker's; counts what was delivered and notes when each event first was.
#[derive(Default)]
struct Sink {
    broker: Option<Arc<dyn Publisher>>,
    delivered: AtomicU64,
    arrivals: Mutex<HashMap<EventId, Instant>>,
    track: bool,
}

impl Sink {
    fn new(target: Target, track: bool) -> anyhow::Result<(Arc<Self>, Option<TestBroker>)> {
        let (broker, process) = match target {
            Target::Acknowledging => (None, None),
            Target::Kafka => {
                let b = TestBroker::start();
                let p: Arc<dyn Publisher> = Arc::new(outbox_kafka::KafkaPublisher::new(
                    outbox_kafka::KafkaConfig::new(b.bootstrap()),
                )?);
                (Some(p), Some(b))
            }
        };
        let sink = Self {
            broker,
            track,
            ..Default::default()
        };
        Ok((Arc::new(sink), process))
    }
}

#[async_trait]
impl Publisher for Sink {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let outcomes = match &self.broker {
            Some(b) => b.publish(batch).await,
            None => vec![PublishOutcome::Delivered; batch.len()],
        };
        let now = Instant::now();
        let mut delivered = 0;
        let mut arrivals = self.arrivals.lock().unwrap();
        for (m, o) in batch.iter().zip(&outcomes) {
            if *o == PublishOutcome::Delivered {
                delivered += 1;
                if self.track {
                    arrivals.entry(m.event_id).or_insert(now);
                }
            }
        }
        self.delivered.fetch_add(delivered, Ordering::Relaxed);
        outcomes
    }

    async fn probe(&self) -> Result<(), String> {
        match &self.broker {
            Some(b) => b.probe().await,
            None => Ok(()),
        }
    }
}

/// Where the relay publishes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Acknowledging,
    /// A private, fresh nisshi (memory storage) per measurement.
    Kafka,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Self::Acknowledging => "acknowledging publisher",
            Self::Kafka => "Kafka (nisshi)",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Business,
    Table,
    Stream,
}

const MODES: [Mode; 3] = [Mode::Business, Mode::Table, Mode::Stream];

struct Db {
    pool: PgPool,
    url: String,
    schema: Schema,
    slot: SlotName,
    table: PgOutbox,
    stream: PgOutbox,
}

impl Db {
    async fn open(cluster: &Cluster, connections: u32) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect(&cluster.url())
            .await?;
        let schema = Schema::new("bench")?;
        migrate(&pool, &schema).await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS bench.orders (id BIGSERIAL PRIMARY KEY, customer TEXT, amount BIGINT, note TEXT)",
        )
        .execute(&pool)
        .await?;
        let slot = SlotName::for_schema(&schema)?;
        create_slot(&pool, &slot).await?;
        Ok(Self {
            url: cluster.url(),
            table: PgOutbox::new(schema.clone()),
            stream: PgOutbox::new(schema.clone()).with_write_mode(WriteMode::LogicalMessage),
            pool,
            schema,
            slot,
        })
    }

    /// Empties the tables and moves the slot to the end of the WAL (nothing left to read).
    async fn reset(&self) -> anyhow::Result<()> {
        sqlx::raw_sql("TRUNCATE bench.orders, bench.event_outbox, bench.event_outbox_idempotency")
            .execute(&self.pool)
            .await?;
        sqlx::query("SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())::text")
            .bind(self.slot.as_str())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn write(&self, mode: Mode, events: &[NewEvent]) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO bench.orders (customer, amount, note) VALUES ($1, 42, 'bench')")
            .bind(events[0].aggregate().id())
            .execute(&mut *tx)
            .await?;
        match (mode, events.len()) {
            (Mode::Business, _) => {}
            (Mode::Table, 1) => drop(self.table.enqueue(&mut tx, &events[0]).await?),
            (Mode::Stream, 1) => drop(self.stream.enqueue(&mut tx, &events[0]).await?),
            (Mode::Table, _) => drop(self.table.enqueue_all(&mut tx, events).await?),
            (Mode::Stream, _) => drop(self.stream.enqueue_all(&mut tx, events).await?),
        }
        tx.commit().await?;
        Ok(start.elapsed())
    }
}

fn event(writer: usize, i: usize, payload: usize) -> NewEvent {
    NewEvent::new(
        Topic::new("bench.order.placed.v1").unwrap(),
        AggregateRef::new("customer", format!("c-{writer}-{}", i % 50)).unwrap(),
        vec![b'x'; payload],
    )
}

async fn burst(
    db: &Arc<Db>,
    mode: Mode,
    writers: usize,
    txns: usize,
    payload: usize,
) -> anyhow::Result<Summary> {
    let db = db.clone();
    crate::stats::burst(writers, txns, move |w, i| {
        let db = db.clone();
        async move { db.write(mode, &[event(w, i, payload)]).await }
    })
    .await
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 2000,
        poll_min: Duration::from_millis(5),
        poll_max: Duration::from_millis(20),
        ..RelayConfig::default()
    }
}

pub async fn run(quick: bool) -> anyhow::Result<Value> {
    let cluster = Cluster::create_with(&[
        "wal_level=logical",
        "max_replication_slots=4",
        "max_wal_senders=4",
        "fsync=on",
        "shared_buffers=256MB",
        "max_wal_size=4GB",
    ]);
    let write = write_cost(&cluster, quick).await?;
    let drain = drain(&cluster, quick).await?;
    let latency = latency(&cluster, quick).await?;
    Ok(json!({ "write": write, "drain": drain, "latency": latency }))
}

async fn write_cost(cluster: &Cluster, quick: bool) -> anyhow::Result<Value> {
    let (rounds, txns) = if quick { (1, 60) } else { (5, 1600) };
    header(
        "stream write mode: business transaction (a), + table enqueue (t), + stream enqueue (s)",
        &[
            "writers",
            "payload",
            "a tx/s",
            "t tx/s",
            "s tx/s",
            "a mean µs",
            "t-a mean µs",
            "s-a mean µs",
            "(s-a)/(t-a)",
        ],
    );
    let mut out = Vec::new();
    for writers in [1usize, 4, 16] {
        for payload in [200usize, 1024] {
            let db = Arc::new(Db::open(cluster, writers as u32 + 2).await?);
            burst(&db, Mode::Stream, writers, txns.min(200), payload).await?;
            burst(&db, Mode::Table, writers, txns.min(200), payload).await?;
            let mut runs: Vec<Vec<Summary>> = vec![Vec::new(); 3];
            for round in 0..rounds {
                for k in 0..3 {
                    let mode = MODES[(round + k) % 3];
                    db.reset().await?;
                    let s = burst(&db, mode, writers, txns, payload).await?;
                    runs[MODES.iter().position(|m| *m == mode).unwrap()].push(s);
                }
            }
            let [a, t, s] = [0, 1, 2].map(|i| crate::stats::median_summary(&runs[i]));
            // The added cost per transaction, each round against its own baseline.
            let added = |i: usize| {
                median(
                    (0..rounds)
                        .map(|r| runs[i][r].mean_us - runs[0][r].mean_us)
                        .collect(),
                )
            };
            let (ta, sa) = (added(1), added(2));
            let ratio = if ta > 0.0 { sa / ta } else { f64::NAN };
            row(&[
                writers.to_string(),
                format!("{payload} B"),
                format!("{:.0}", a.per_sec),
                format!("{:.0}", t.per_sec),
                format!("{:.0}", s.per_sec),
                format!("{:.0}", a.mean_us),
                format!("{ta:.0}"),
                format!("{sa:.0}"),
                format!("{ratio:.2}"),
            ]);
            out.push(json!({
                "writers": writers, "payload_bytes": payload, "rounds": rounds, "txns_per_round": txns,
                "business_per_sec": a.per_sec, "table_per_sec": t.per_sec, "stream_per_sec": s.per_sec,
                "business_mean_us": a.mean_us, "table_added_mean_us": ta, "stream_added_mean_us": sa,
                "stream_over_table_added": ratio,
            }));
            db.reset().await?;
            db.pool.close().await;
        }
    }
    Ok(Value::Array(out))
}

/// Writes `txns` transactions of `per_txn` events each, spread over 1,000 aggregates.
async fn prefill(db: &Db, mode: Mode, txns: usize, per_txn: usize) -> anyhow::Result<()> {
    let db = Arc::new(Db {
        pool: db.pool.clone(),
        url: db.url.clone(),
        schema: db.schema.clone(),
        slot: db.slot.clone(),
        table: db.table.clone(),
        stream: db.stream.clone(),
    });
    let mut tasks = Vec::new();
    for w in 0..4 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..txns).step_by(4) {
                let events: Vec<NewEvent> = (0..per_txn)
                    .map(|k| {
                        NewEvent::new(
                            Topic::new("bench.order.placed.v1").unwrap(),
                            AggregateRef::new(
                                "customer",
                                format!("c-{}", (i * per_txn + k) % 1000),
                            )
                            .unwrap(),
                            vec![b'x'; 200],
                        )
                    })
                    .collect();
                db.write(mode, &events).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // As the relay bench does: fresh statistics for the table relay's claim plan, and the
    // prefill's dirty pages written out for both paths.
    if mode == Mode::Table {
        sqlx::raw_sql("VACUUM ANALYZE bench.event_outbox")
            .execute(&db.pool)
            .await?;
    }
    sqlx::raw_sql("CHECKPOINT").execute(&db.pool).await?;
    Ok(())
}

/// The relay under test, publishing to a sink.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RelayPath {
    Stream,
    /// The table relay, woken by its commit watch (10 ms) as `outbox relay` runs it.
    Table,
}

struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    run: tokio::task::JoinHandle<()>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    fn start(db: &Db, path: RelayPath, sink: Arc<Sink>) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = stopped.await;
        };
        let mut watcher = None;
        let run = match path {
            RelayPath::Stream => {
                let relay = StreamRelay::new(
                    db.pool.clone(),
                    db.url.clone(),
                    db.schema.clone(),
                    sink,
                    StreamConfig::new(db.slot.clone(), relay_config()),
                );
                tokio::spawn(async move {
                    if let Err(e) = relay.run(stopped).await {
                        eprintln!("stream relay: {e}");
                    }
                })
            }
            RelayPath::Table => {
                let relay = Relay::new(
                    PgRelayStore::new(db.pool.clone(), &db.schema),
                    sink,
                    relay_config(),
                );
                watcher = Some(tokio::spawn(outbox_postgres::watch_for_commits(
                    db.pool.clone(),
                    db.schema.clone(),
                    relay.wake_signal(),
                    Duration::from_millis(10),
                )));
                tokio::spawn(async move {
                    relay.run(stopped).await;
                })
            }
        };
        Self { stop, run, watcher }
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.run.await?;
        if let Some(w) = self.watcher {
            w.abort();
        }
        Ok(())
    }
}

/// How long `path` takes to publish the `total` events waiting for it to `target`.
async fn drain_time(
    db: &Db,
    path: RelayPath,
    target: Target,
    total: u64,
) -> anyhow::Result<Duration> {
    let (sink, broker) = Sink::new(target, false)?;
    let started = Instant::now();
    let running = Running::start(db, path, sink.clone());
    while sink.delivered.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    running.stop().await?;
    // The publisher before its broker: no complaints from a client whose broker went away.
    drop(sink);
    drop(broker);
    Ok(took)
}

async fn drain(cluster: &Cluster, quick: bool) -> anyhow::Result<Value> {
    let (txns, per_txn) = if quick { (500, 10) } else { (10_000, 10) };
    let total = (txns * per_txn) as u64;
    header(
        &format!(
            "stream drain: {total} events of 200 B ({per_txn} per transaction, 1,000 aggregates)"
        ),
        &["path", "events/s", "of PostgreSQL's decoding"],
    );
    let db = Db::open(cluster, 8).await?;
    db.reset().await?;
    prefill(&db, Mode::Stream, txns, per_txn).await?;
    // PostgreSQL's own decoding of the same WAL, through the same plugin and options.
    let started = Instant::now();
    let messages: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
             'proto_version', '1', 'publication_names', $1, 'messages', 'true')
         WHERE get_byte(data, 0) = 77",
    )
    .bind(db.slot.as_str())
    .fetch_one(&db.pool)
    .await?;
    let decode = started.elapsed();
    let decode_rate = total as f64 / decode.as_secs_f64();
    anyhow::ensure!(
        messages as usize == txns,
        "decoded {messages} messages, wrote {txns}"
    );
    row(&[
        "PostgreSQL decoding (peek, no publish)".into(),
        format!("{decode_rate:.0}"),
        "1.00".into(),
    ]);
    let mut out = vec![json!({"path": "postgres decoding", "per_sec": decode_rate})];
    for target in [Target::Acknowledging, Target::Kafka] {
        for (name, path, mode) in [
            ("stream relay", RelayPath::Stream, Mode::Stream),
            ("table relay", RelayPath::Table, Mode::Table),
        ] {
            // Each path on its own backlog, written the way it reads it.
            db.reset().await?;
            prefill(&db, mode, txns, per_txn).await?;
            let took = drain_time(&db, path, target, total).await?;
            let rate = total as f64 / took.as_secs_f64();
            row(&[
                format!("{name} -> {}", target.name()),
                format!("{rate:.0}"),
                format!("{:.2}", rate / decode_rate),
            ]);
            out.push(json!({"path": name, "publisher": target.name(), "per_sec": rate}));
        }
    }
    db.reset().await?;
    db.pool.close().await;
    Ok(json!({ "events": total, "per_txn": per_txn, "rates": out }))
}

async fn latency(cluster: &Cluster, quick: bool) -> anyhow::Result<Value> {
    let (rate, seconds) = if quick { (200, 2) } else { (500, 10) };
    header(
        &format!(
            "stream commit-to-ack: {rate} transactions/s for {seconds} s, one 200 B event each"
        ),
        &["path", "p50 ms", "p99 ms", "max ms"],
    );
    let mut out = serde_json::Map::new();
    let cases = [Target::Acknowledging, Target::Kafka]
        .into_iter()
        .flat_map(|target| {
            [
                ("stream relay", RelayPath::Stream, Mode::Stream, target),
                (
                    "table relay (watch wake)",
                    RelayPath::Table,
                    Mode::Table,
                    target,
                ),
            ]
        });
    for (name, relay, mode, target) in cases {
        let path = format!("{name} -> {}", target.name());
        let db = Arc::new(Db::open(cluster, 8).await?);
        db.reset().await?;
        let (sink, broker) = Sink::new(target, true)?;
        let running = Running::start(&db, relay, sink.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut committed = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        for i in 0..rate as usize * seconds {
            tick.tick().await;
            let e = event(0, i, 200);
            let id = e.event_id();
            db.write(mode, &[e]).await?;
            committed.push((id, Instant::now()));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while (sink.delivered.load(Ordering::Relaxed) as usize) < committed.len()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        running.stop().await?;
        let arrivals = sink.arrivals.lock().unwrap().clone();
        drop(sink);
        drop(broker);
        let lat: Vec<Duration> = committed
            .iter()
            .filter_map(|(id, at)| arrivals.get(id).map(|a| a.saturating_duration_since(*at)))
            .collect();
        anyhow::ensure!(
            lat.len() == committed.len(),
            "{path}: {} of {} arrived",
            lat.len(),
            committed.len()
        );
        let s = summarize(lat, Duration::from_secs(seconds as u64));
        row(&[
            path.clone(),
            format!("{:.2}", s.p50_us / 1000.0),
            format!("{:.2}", s.p99_us / 1000.0),
            format!("{:.2}", s.max_us / 1000.0),
        ]);
        out.insert(path, json!({"p50_ms": s.p50_us / 1000.0, "p99_ms": s.p99_us / 1000.0, "max_ms": s.max_us / 1000.0}));
        db.reset().await?;
        db.pool.close().await;
    }
    Ok(Value::Object(out))
}
