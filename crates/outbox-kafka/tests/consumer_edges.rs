//! The consumer runner at its failure edges, on a real broker and a real PostgreSQL:
//! - the consumer's own database stops for longer than its retries would last: nothing is
//!   parked, order per key holds, each effect applies once (an outage is not a failure);
//! - a rebalance moves partitions away mid-stream: the old owner never commits them again,
//!   so the group does not rewind (no redelivery, nothing parked twice).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::testing::wait_until;
use outbox_core::{EventId, HandlerError, IncomingMessage};
use outbox_kafka::testing::{read_topics, shared_bootstrap};
use outbox_kafka::{
    create_topics, ConsumerConfig, ConsumerHooks, ConsumerReport, KafkaConfig, KafkaConsumer,
};
use outbox_postgres::testing::{Cluster, TestSchema};
use outbox_postgres::{migrate, InboxEvent, PgInboxHandler, Schema, SqlHandler};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(90);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Records each event's key and number in arrival order; a second application of an event
/// shows as `applied = 2`.
struct Record {
    table: String,
    delay: Duration,
}

#[async_trait]
impl SqlHandler<sqlx::Postgres> for Record {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError> {
        tokio::time::sleep(self.delay).await;
        if event.message.payload.starts_with(b"poison") {
            return Err(HandlerError::poison("payload says poison"));
        }
        let n: i64 = std::str::from_utf8(&event.message.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HandlerError::poison("payload is not a number"))?;
        sqlx::query(&format!(
            "INSERT INTO {} (event_id, key, n, applied) VALUES ($1, $2, $3, 1)
             ON CONFLICT (event_id) DO UPDATE SET applied = {}.applied + 1",
            self.table, self.table
        ))
        .bind(event.event_id.as_uuid())
        .bind(event.message.key.clone().unwrap_or_default())
        .bind(n)
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::retry)?;
        Ok(())
    }
}

async fn create_effects(pool: &PgPool, table: &str) {
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (seq BIGSERIAL, event_id UUID PRIMARY KEY, key TEXT NOT NULL,
                               n BIGINT NOT NULL, applied INT NOT NULL)"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// `(key, n, applied)` in the order the effects committed.
async fn effects(pool: &PgPool, table: &str) -> Vec<(String, i64, i32)> {
    sqlx::query_as(&format!("SELECT key, n, applied FROM {table} ORDER BY seq"))
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

fn producer(bootstrap: &str) -> FutureProducer {
    KafkaConfig::new(bootstrap)
        .client_config()
        .create()
        .unwrap()
}

/// Sends `payload` with a fresh `event_id` (none for poison), to `partition` if given.
async fn send(p: &FutureProducer, topic: &str, key: &str, payload: &str, partition: Option<i32>) {
    let id = EventId::new().to_string();
    let mut headers = OwnedHeaders::new();
    if !payload.starts_with("poison") {
        headers = headers.insert(Header {
            key: "event_id",
            value: Some(id.as_bytes()),
        });
    }
    let mut record = FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .headers(headers);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    p.send(record, Duration::from_secs(10)).await.unwrap();
}

#[derive(Default)]
struct Counting {
    commits: AtomicU32,
}

#[async_trait]
impl ConsumerHooks for Counting {
    async fn before_offset_commit(&self, _m: &IncomingMessage) {
        self.commits.fetch_add(1, Ordering::SeqCst);
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<ConsumerReport>,
}

impl Running {
    fn start(
        bootstrap: &str,
        config: ConsumerConfig,
        handler: PgInboxHandler<Record>,
        hooks: Arc<Counting>,
    ) -> Self {
        let consumer = KafkaConsumer::new(KafkaConfig::new(bootstrap), config).with_hooks(hooks);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            consumer
                .run(handler, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap()
        });
        Self { stop, handle }
    }

    async fn stop(self) -> ConsumerReport {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("consumer stops")
            .unwrap()
    }
}

fn fast(group: &str, topic: &str, max_attempts: u32) -> ConsumerConfig {
    ConsumerConfig {
        max_attempts,
        retry_base: Duration::from_millis(50),
        retry_cap: Duration::from_millis(200),
        ..ConsumerConfig::new(group, &[topic])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumers_database_stopped_longer_than_its_retries_parks_nothing() {
    init_logs();
    let bootstrap = shared_bootstrap();
    let cluster = Cluster::create();
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect(&cluster.url())
        .await
        .unwrap();
    let schema = Schema::new("consumer_outage").unwrap();
    migrate(&pool, &schema).await.unwrap();
    let table = format!("\"{}\".effects", schema.name());
    create_effects(&pool, &table).await;

    let topic = format!("test.edges.outage.{}", uuid::Uuid::new_v4().simple());
    const PER_KEY: i64 = 20;
    let keys = ["a", "b", "c"];
    let p = producer(&bootstrap);
    for n in 0..PER_KEY {
        for key in keys {
            send(&p, &topic, key, &n.to_string(), None).await;
        }
    }
    let handler = PgInboxHandler::new(
        pool.clone(),
        schema.clone(),
        "edges",
        Record {
            table: table.clone(),
            delay: Duration::from_millis(20),
        },
    );
    // Three attempts would be used up in well under a second; the outage lasts four.
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    let consumer = Running::start(
        &bootstrap,
        fast(&group, &topic, 3),
        handler,
        Arc::new(Counting::default()),
    );
    wait_until(LIMIT, "a few effects before the outage", || async {
        effects(&pool, &table).await.len() >= 10
    })
    .await;
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.start();
    let total = PER_KEY as usize * keys.len();
    wait_until(LIMIT, "every effect after the outage", || async {
        effects(&pool, &table).await.len() == total
    })
    .await;
    let report = consumer.stop().await;
    assert_eq!(report.parked, 0, "an outage parked messages: {report:?}");
    assert!(report.unavailable_retries > 0, "{report:?}");
    let done = effects(&pool, &table).await;
    assert!(
        done.iter().all(|(_, _, applied)| *applied == 1),
        "applied twice"
    );
    for key in keys {
        let order: Vec<i64> = done
            .iter()
            .filter(|(k, _, _)| k == key)
            .map(|(_, n, _)| *n)
            .collect();
        assert_eq!(
            order,
            (0..PER_KEY).collect::<Vec<_>>(),
            "key {key} out of order"
        );
    }
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_by_a_rebalance_is_never_committed_by_its_old_owner() {
    init_logs();
    let bootstrap = shared_bootstrap();
    let db = TestSchema::create().await;
    let table = db.table("effects");
    create_effects(&db.pool, &table).await;
    let topic = format!("test.edges.rebalance.{}", uuid::Uuid::new_v4().simple());
    create_topics(&KafkaConfig::new(&bootstrap), &[(&topic, 4)])
        .await
        .unwrap();
    let handler = || {
        PgInboxHandler::new(
            db.pool.clone(),
            db.schema.clone(),
            "edges",
            Record {
                table: table.clone(),
                delay: Duration::ZERO,
            },
        )
    };
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    let p = producer(&bootstrap);
    let mut sent = 0usize;
    let burst = |round: usize| {
        let p = p.clone();
        let topic = topic.clone();
        async move {
            for partition in 0..4 {
                for i in 0..5 {
                    let n = (round * 100 + i) as i64;
                    send(
                        &p,
                        &topic,
                        &format!("k{partition}"),
                        &n.to_string(),
                        Some(partition),
                    )
                    .await;
                }
            }
        }
    };

    // A alone takes every partition and processes a first round.
    let hooks_a = Arc::new(Counting::default());
    let a = Running::start(
        &bootstrap,
        fast(&group, &topic, 3),
        handler(),
        hooks_a.clone(),
    );
    burst(0).await;
    sent += 20;
    wait_until(LIMIT, "A processed the first round", || async {
        effects(&db.pool, &table).await.len() == sent
    })
    .await;
    // B joins: the partitions are shared out; rounds go on until B has worked on its own.
    let hooks_b = Arc::new(Counting::default());
    let b = Running::start(
        &bootstrap,
        fast(&group, &topic, 3),
        handler(),
        hooks_b.clone(),
    );
    let mut round = 1;
    while hooks_b.commits.load(Ordering::SeqCst) == 0 {
        assert!(round < 200, "B never got a partition");
        burst(round).await;
        sent += 20;
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    burst(round).await;
    sent += 20;
    // One poison message per partition: parked once each, by whoever owns the partition.
    for partition in 0..4 {
        send(
            &p,
            &topic,
            &format!("k{partition}"),
            "poison",
            Some(partition),
        )
        .await;
    }
    wait_until(LIMIT, "every message handled", || async {
        effects(&db.pool, &table).await.len() == sent
            && hooks_a.commits.load(Ordering::SeqCst) + hooks_b.commits.load(Ordering::SeqCst)
                >= (sent + 4) as u32
    })
    .await;
    // B leaves (A takes everything back), then A stops: before the fix A's final commit
    // carried its old offsets for B's partitions and rewound the group there.
    let report_b = b.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report_a = a.stop().await;
    assert!(report_b.processed > 0, "{report_b:?}");
    assert_eq!(report_a.parked + report_b.parked, 4);

    // A fresh member of the group must find nothing left to do.
    let hooks_c = Arc::new(Counting::default());
    let c = Running::start(
        &bootstrap,
        fast(&group, &topic, 3),
        handler(),
        hooks_c.clone(),
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let report_c = c.stop().await;
    assert_eq!(
        (report_c.processed, report_c.duplicates, report_c.parked),
        (0, 0, 0),
        "the group was rewound: {report_c:?}"
    );
    let parked = read_topics(
        &bootstrap,
        &[&format!("{topic}.DLQ")],
        5,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(parked.len(), 4, "a poison message was parked twice");
    let done = effects(&db.pool, &table).await;
    assert!(done.iter().all(|(_, _, applied)| *applied == 1));
    db.drop().await;
}
