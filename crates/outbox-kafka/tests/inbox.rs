//! The consumer inbox with the Kafka runner, on a real broker and a real PostgreSQL: effects
//! apply once per event through re-sends, redeliveries, crashes, handler errors, poison and
//! rebalances.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::testing::wait_until;
use outbox_core::{AggregateRef, EventId, HandlerError, IncomingMessage, NewEvent, Topic};
const LIMIT: Duration = Duration::from_secs(90);

use outbox_kafka::testing::{read_topics, shared_bootstrap};
use outbox_kafka::{
    create_topics, ConsumerConfig, ConsumerHooks, ConsumerReport, KafkaConfig, KafkaConsumer,
};
use outbox_postgres::testing::TestSchema;
use outbox_postgres::{InboxEvent, PgInboxHandler, PgOutbox, Schema, SqlHandler};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{Postgres, Transaction};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Applies an effect per event (`applied` counts applications), enqueues a follow-up event in
/// the same transaction, and fails on demand after writing (to prove the rollback).
struct Effects {
    schema: Schema,
    outbox: PgOutbox,
    invocations: AtomicU32,
    fail_next: Mutex<HashMap<EventId, u32>>,
    delay: Mutex<Duration>,
}

impl Effects {
    fn new(schema: &Schema) -> Arc<Self> {
        Arc::new(Self {
            schema: schema.clone(),
            outbox: PgOutbox::new(schema.clone()),
            invocations: AtomicU32::new(0),
            fail_next: Mutex::new(HashMap::new()),
            delay: Mutex::new(Duration::ZERO),
        })
    }
}

struct Shared(Arc<Effects>);

#[async_trait]
impl SqlHandler<sqlx::Postgres> for Shared {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError> {
        let fx = &self.0;
        fx.invocations.fetch_add(1, Ordering::SeqCst);
        let delay = *fx.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        if event.message.payload.starts_with(b"poison") {
            return Err(HandlerError::poison("payload says poison"));
        }
        sqlx::query(&format!(
            "INSERT INTO \"{}\".effects (event_id, applied) VALUES ($1, 1)
             ON CONFLICT (event_id) DO UPDATE SET applied = effects.applied + 1",
            fx.schema.name()
        ))
        .bind(event.event_id.as_uuid())
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::retry)?;
        let follow_up = NewEvent::new(
            Topic::new("test.follow-up.v1").unwrap(),
            AggregateRef::new("effect", event.event_id.to_string()).unwrap(),
            "{}",
        );
        fx.outbox
            .enqueue(tx, &follow_up)
            .await
            .map_err(HandlerError::retry)?;
        let mut fail = fx.fail_next.lock().unwrap();
        if let Some(n) = fail.get_mut(&event.event_id) {
            if *n > 0 {
                *n -= 1;
                return Err(HandlerError::retry("injected failure after writing"));
            }
        }
        Ok(())
    }
}

/// Counts offset commits; can block forever before one (a crash point).
#[derive(Default)]
struct Hooks {
    commits: AtomicU32,
    hang: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl ConsumerHooks for Hooks {
    async fn before_offset_commit(&self, _m: &IncomingMessage) {
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
    }
}

struct Db {
    t: TestSchema,
}

impl Db {
    async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let t = TestSchema::create().await;
        sqlx::raw_sql(&format!(
            "CREATE TABLE {} (event_id UUID PRIMARY KEY, applied INT NOT NULL)",
            t.table("effects")
        ))
        .execute(&t.pool)
        .await
        .unwrap();
        Self { t }
    }

    async fn applied(&self) -> Vec<i32> {
        sqlx::query_scalar(&format!("SELECT applied FROM {}", self.t.table("effects")))
            .fetch_all(&self.t.pool)
            .await
            .unwrap()
    }

    async fn follow_ups(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}",
            self.t.table("event_outbox")
        ))
        .fetch_one(&self.t.pool)
        .await
        .unwrap()
    }
}

fn topic(name: &str) -> String {
    format!("test.inbox.{name}.{}", uuid::Uuid::new_v4().simple())
}

async fn produce(
    bootstrap: &str,
    topic: &str,
    key: &str,
    payload: &[u8],
    event_id: Option<EventId>,
) {
    let producer: FutureProducer = KafkaConfig::new(bootstrap)
        .client_config()
        .create()
        .unwrap();
    let mut headers = OwnedHeaders::new();
    let id = event_id.map(|e| e.to_string());
    if let Some(id) = &id {
        headers = headers.insert(Header {
            key: "event_id",
            value: Some(id.as_bytes()),
        });
    }
    producer
        .send(
            FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

struct Running {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<ConsumerReport>,
}

impl Running {
    async fn stop(self) -> ConsumerReport {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("consumer stops")
            .unwrap()
    }
}

fn start(
    bootstrap: &str,
    config: ConsumerConfig,
    db: &Db,
    fx: &Arc<Effects>,
    hooks: &Arc<Hooks>,
) -> Running {
    let handler = PgInboxHandler::new(
        db.t.pool.clone(),
        db.t.schema.clone(),
        "effects",
        Shared(fx.clone()),
    );
    let consumer =
        KafkaConsumer::new(KafkaConfig::new(bootstrap), config).with_hooks(hooks.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        consumer
            .run(handler, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap()
    });
    Running { stop, handle }
}

fn fast(group: &str, topics: &[&str]) -> ConsumerConfig {
    ConsumerConfig {
        retry_base: Duration::from_millis(50),
        retry_cap: Duration::from_millis(200),
        ..ConsumerConfig::new(group, topics)
    }
}

#[tokio::test]
async fn an_event_delivered_three_times_and_redelivered_after_a_crash_applies_once() {
    let bootstrap = shared_bootstrap();
    let db = Db::new().await;
    let t = topic("thrice");
    let event = EventId::new();
    // Three copies, as a relay re-sending after crashes would produce.
    for _ in 0..3 {
        produce(&bootstrap, &t, "k", br#"{"n":1}"#, Some(event)).await;
    }
    let fx = Effects::new(&db.t.schema);
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());

    // The first consumer commits its transaction, then dies before committing the offset.
    let hooks = Arc::new(Hooks::default());
    hooks.hang.store(true, Ordering::SeqCst);
    let crashing = start(&bootstrap, fast(&group, &[&t]), &db, &fx, &hooks);
    wait_until(LIMIT, "first delivery applied", || async {
        db.applied().await == vec![1]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    crashing.handle.abort();
    let _ = crashing.handle.await;

    // The restarted consumer gets all three again and recognises each as a duplicate.
    let hooks = Arc::new(Hooks::default());
    let restarted = start(&bootstrap, fast(&group, &[&t]), &db, &fx, &hooks);
    wait_until(LIMIT, "three deliveries handled", || async {
        hooks.commits.load(Ordering::SeqCst) == 3
    })
    .await;
    let report = restarted.stop().await;
    assert_eq!(report.duplicates, 3, "{report:?}");
    assert_eq!(report.processed, 0);
    assert_eq!(db.applied().await, vec![1], "state changed exactly once");
    assert_eq!(fx.invocations.load(Ordering::SeqCst), 1, "handler ran once");
    assert_eq!(
        db.follow_ups().await,
        1,
        "the follow-up event was enqueued once"
    );
    db.t.drop().await;
}

#[tokio::test]
async fn a_failing_handler_rolls_back_and_its_offset_waits_until_it_succeeds() {
    let bootstrap = shared_bootstrap();
    let db = Db::new().await;
    let t = topic("fail");
    let flaky = EventId::new();
    produce(&bootstrap, &t, "k", br#"{"n":1}"#, Some(flaky)).await;
    let fx = Effects::new(&db.t.schema);
    fx.fail_next.lock().unwrap().insert(flaky, 1_000);
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());

    let hooks = Arc::new(Hooks::default());
    let mut config = fast(&group, &[&t]);
    config.max_attempts = 1_000;
    let failing = start(&bootstrap, config.clone(), &db, &fx, &hooks);
    wait_until(LIMIT, "several failed runs", || async {
        fx.invocations.load(Ordering::SeqCst) >= 3
    })
    .await;
    let report = failing.stop().await;
    assert!(report.handler_failures >= 3);
    assert_eq!(report.processed, 0);
    assert!(db.applied().await.is_empty(), "failed runs leave no state");
    assert_eq!(db.follow_ups().await, 0, "nor events");
    // The group's committed offset has not moved past the message.
    let probe: BaseConsumer = KafkaConfig::new(&bootstrap)
        .client_config()
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&t, 0);
    let committed = probe
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let offset = committed.find_partition(&t, 0).unwrap().offset();
    assert!(
        matches!(offset, Offset::Invalid | Offset::Offset(0)),
        "offset moved on: {offset:?}"
    );

    // The cause is fixed: the redelivered event is processed once.
    fx.fail_next.lock().unwrap().clear();
    let before = fx.invocations.load(Ordering::SeqCst);
    let healthy = start(&bootstrap, config, &db, &fx, &hooks);
    wait_until(LIMIT, "processed after the fix", || async {
        db.applied().await == vec![1]
    })
    .await;
    let report = healthy.stop().await;
    assert_eq!(report.processed, 1);
    assert_eq!(
        fx.invocations.load(Ordering::SeqCst),
        before + 1,
        "one run per delivery"
    );
    assert_eq!(db.follow_ups().await, 1);
    db.t.drop().await;
}

#[tokio::test]
async fn poison_and_exhausted_messages_are_parked_with_their_reason_and_the_rest_flows() {
    let bootstrap = shared_bootstrap();
    let db = Db::new().await;
    let t = topic("poison");
    let good_before = EventId::new();
    let exhausted = EventId::new();
    let good_after = EventId::new();
    produce(&bootstrap, &t, "k", br#"{"n":1}"#, Some(good_before)).await;
    produce(&bootstrap, &t, "k", b"\xff not json, no id", None).await;
    produce(
        &bootstrap,
        &t,
        "k",
        b"poison: the handler refuses",
        Some(EventId::new()),
    )
    .await;
    produce(&bootstrap, &t, "k", br#"{"n":2}"#, Some(exhausted)).await;
    produce(&bootstrap, &t, "k", br#"{"n":3}"#, Some(good_after)).await;
    let fx = Effects::new(&db.t.schema);
    fx.fail_next.lock().unwrap().insert(exhausted, 1_000);

    let hooks = Arc::new(Hooks::default());
    let mut config = fast(&format!("g-{}", uuid::Uuid::new_v4().simple()), &[&t]);
    config.max_attempts = 3;
    let running = start(&bootstrap, config, &db, &fx, &hooks);
    wait_until(LIMIT, "every message handled or parked", || async {
        hooks.commits.load(Ordering::SeqCst) == 5
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.parked, 3, "{report:?}");
    assert_eq!(report.processed, 2);
    assert_eq!(report.handler_failures, 3);
    assert_eq!(db.applied().await, vec![1, 1]);

    let dlq = format!("{t}.DLQ");
    let parked = read_topics(&bootstrap, &[&dlq], 3, Duration::from_secs(30)).await;
    assert_eq!(parked.len(), 3);
    let reasons: Vec<&str> = parked
        .iter()
        .map(|m| m.headers["dlq_reason"].as_str())
        .collect();
    assert!(reasons[0].contains("not a JSON envelope"), "{reasons:?}");
    assert!(reasons[1].contains("payload says poison"), "{reasons:?}");
    assert!(reasons[2].contains("handler failed 3 times"), "{reasons:?}");
    assert_eq!(
        parked[0].payload, b"\xff not json, no id",
        "parked verbatim"
    );
    assert!(parked.iter().all(|m| m.headers["dlq_original_topic"] == t));
    assert_eq!(parked[2].headers["event_id"], exhausted.to_string());
    db.t.drop().await;
}

#[tokio::test]
async fn two_consumers_over_six_partitions_with_rebalances_apply_each_event_once() {
    let bootstrap = shared_bootstrap();
    let db = Db::new().await;
    let t = topic("group");
    create_topics(&KafkaConfig::new(&bootstrap), &[(&t, 6)])
        .await
        .unwrap();
    const EVENTS: usize = 600;
    let producer: FutureProducer = KafkaConfig::new(&bootstrap)
        .client_config()
        .create()
        .unwrap();
    let ids: Vec<String> = (0..EVENTS).map(|_| EventId::new().to_string()).collect();
    let keys: Vec<String> = (0..EVENTS).map(|i| format!("batch-{}", i % 30)).collect();
    let mut sends = Vec::new();
    for (id, key) in ids.iter().zip(&keys) {
        let headers = OwnedHeaders::new().insert(Header {
            key: "event_id",
            value: Some(id.as_bytes()),
        });
        sends.push(producer.send(
            FutureRecord::to(&t).key(key).payload("{}").headers(headers),
            Duration::from_secs(10),
        ));
    }
    for s in futures::future::join_all(sends).await {
        s.unwrap();
    }

    let fx = Effects::new(&db.t.schema);
    // Slow handlers, so that the rebalances happen mid-stream.
    *fx.delay.lock().unwrap() = Duration::from_millis(15);
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    let count = || async { db.applied().await.len() };
    let hooks_a = Arc::new(Hooks::default());
    let hooks_b = Arc::new(Hooks::default());
    let slow = fast(&group, &[&t]);
    let a = start(&bootstrap, slow.clone(), &db, &fx, &hooks_a);
    wait_until(LIMIT, "a quarter processed by one consumer", || async {
        count().await >= EVENTS / 4
    })
    .await;
    let b = start(&bootstrap, slow, &db, &fx, &hooks_b);
    wait_until(LIMIT, "b joined and works", || async {
        hooks_b.commits.load(Ordering::SeqCst) > 0 || count().await == EVENTS
    })
    .await;
    wait_until(LIMIT, "half processed", || async {
        count().await >= EVENTS / 2
    })
    .await;
    let report_a = a.stop().await; // second rebalance: b takes everything
    wait_until(LIMIT, "every event applied", || async {
        count().await == EVENTS
    })
    .await;
    let report_b = b.stop().await;

    let applied = db.applied().await;
    assert_eq!(applied.len(), EVENTS);
    assert!(applied.iter().all(|&n| n == 1), "an effect applied twice");
    assert_eq!(fx.invocations.load(Ordering::SeqCst) as usize, EVENTS);
    assert_eq!((report_a.processed + report_b.processed) as usize, EVENTS);
    assert!(
        report_a.processed > 0 && report_b.processed > 0,
        "{report_a:?} {report_b:?}"
    );
    db.t.drop().await;
}
