//! The relay publishing to a real Kafka-protocol broker from a real PostgreSQL outbox.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::testing::wait_until as wait_for;
use outbox_core::{
    AggregateRef, EnqueueOutcome, NewEvent, Relay, RelayConfig, RelayReport, RelayStore,
    RetryPolicy, Topic,
};
use outbox_kafka::testing::{read_topics, shared_bootstrap, Received, TestBroker};
use outbox_kafka::{create_topics, KafkaConfig, KafkaPublisher};
use outbox_postgres::testing::TestSchema;
use outbox_postgres::{PgOutbox, PgRelayStore};
use tokio::sync::oneshot;

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

fn unique_topic(name: &str) -> Topic {
    Topic::new(format!("test.{name}.{}", uuid::Uuid::new_v4().simple())).unwrap()
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        service: "kafka-test".into(),
        batch_size: 200,
        poll_min: Duration::from_millis(5),
        poll_max: Duration::from_millis(100),
        lease: Duration::from_secs(3),
        retry: RetryPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(200),
            max_attempts: 3,
        },
        outage_backoff_min: Duration::from_millis(50),
        outage_backoff_max: Duration::from_secs(1),
        ..RelayConfig::default()
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<RelayReport>,
}

impl Running {
    async fn stop(self) -> RelayReport {
        let _ = self.stop.send(());
        self.handle.await.unwrap()
    }
}

fn start_relay(db: &TestSchema, publisher: Arc<KafkaPublisher>, config: RelayConfig) -> Running {
    let store = Arc::new(PgRelayStore::new(db.pool.clone(), &db.schema));
    let relay = Relay::from_shared(store, publisher, config);
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    Running { stop, handle }
}

async fn pending(db: &TestSchema) -> u64 {
    PgRelayStore::new(db.pool.clone(), &db.schema)
        .stats()
        .await
        .unwrap()
        .pending
}

/// An event as written: (aggregate, seq, event).
type Written = (String, i64, NewEvent);

/// Writes one event per call in its own transaction.
async fn write(db: &TestSchema, outbox: &PgOutbox, event: NewEvent) -> Written {
    let mut tx = db.pool.begin().await.unwrap();
    let EnqueueOutcome::Inserted { seq } = outbox.enqueue(&mut tx, &event).await.unwrap() else {
        panic!("duplicate")
    };
    tx.commit().await.unwrap();
    (event.aggregate().id().to_owned(), seq, event)
}

/// How long the outage tests keep the broker away: `default` in CI, `OUTBOX_OUTAGE_SECS` for
/// the long variants.
fn outage_length(default: u64) -> Duration {
    Duration::from_secs(
        std::env::var("OUTBOX_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// The most attempts any event has used (0 while no attempt was burnt).
async fn max_attempts(db: &TestSchema) -> i32 {
    let n: Option<i32> = sqlx::query_scalar(&format!(
        "SELECT max(attempts) FROM {}",
        db.table("event_outbox")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    n.unwrap_or(0)
}

/// Writes one event every 40 ms over 8 aggregates until `stop`; returns each write with the
/// moment it committed.
fn steady_writer(
    db: &TestSchema,
    topic: &Topic,
    mut stop: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<Vec<(Written, Instant)>> {
    let (pool, schema, topic) = (db.pool.clone(), db.schema.clone(), topic.clone());
    tokio::spawn(async move {
        let db = TestSchema { pool, schema };
        let outbox = PgOutbox::new(db.schema.clone());
        let mut written = Vec::new();
        let mut i = 0u32;
        while stop.try_recv().is_err() {
            let agg = AggregateRef::new("batch", format!("b{}", i % 8)).unwrap();
            let e = NewEvent::new(topic.clone(), agg, format!("{{\"n\":{i}}}"));
            written.push((write(&db, &outbox, e).await, Instant::now()));
            i += 1;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        written
    })
}

/// Per key, the first occurrences of event ids read back must follow enqueue order, and every
/// event must be there.
fn assert_complete_and_ordered(received: &[Received], written: &[(String, i64, NewEvent)]) {
    let mut expected: HashMap<&str, Vec<String>> = HashMap::new();
    let mut sorted: Vec<_> = written.iter().collect();
    sorted.sort_by_key(|(_, seq, _)| *seq);
    for (agg, _, e) in sorted {
        expected
            .entry(agg.as_str())
            .or_default()
            .push(e.event_id().to_string());
    }
    let mut seen = HashSet::new();
    let mut next: HashMap<String, usize> = HashMap::new();
    for m in received {
        let id = m.headers["event_id"].clone();
        if !seen.insert(id.clone()) {
            continue;
        }
        let key = m.key.clone().unwrap();
        let i = next.entry(key.clone()).or_default();
        assert_eq!(
            expected[key.as_str()].get(*i),
            Some(&id),
            "key {key}: event #{i} out of order"
        );
        *i += 1;
    }
    for (key, ids) in &expected {
        assert_eq!(
            next.get(*key).copied().unwrap_or(0),
            ids.len(),
            "key {key}: events lost"
        );
    }
}

#[tokio::test]
async fn events_arrive_with_key_headers_verbatim_payload_and_order_per_key() {
    init_logs();
    let bootstrap = shared_bootstrap();
    let db = TestSchema::create().await;
    let topic = unique_topic("order");
    let kafka = KafkaConfig::new(&bootstrap);
    create_topics(&kafka, &[(topic.as_str(), 3)]).await.unwrap();
    let publisher = Arc::new(KafkaPublisher::new(kafka).unwrap());
    let relay = start_relay(&db, publisher, relay_config());

    let outbox = PgOutbox::new(db.schema.clone());
    let mut written = Vec::new();
    for i in 0..300u32 {
        let agg = format!("batch-{}", i % 12);
        let e = NewEvent::new(
            topic.clone(),
            AggregateRef::new("batch", &agg).unwrap(),
            format!("{{\"n\":{i},\"note\":\"caf\u{e9} \u{1F600}\"}}"),
        )
        .with_event_type("huleedu.test.happened.v1")
        .with_header("correlation_id", "c-42")
        .with_header("source_service", "test_service");
        written.push(write(&db, &outbox, e).await);
    }
    wait_for(Duration::from_secs(60), "outbox drained", || async {
        pending(&db).await == 0
    })
    .await;
    let report = relay.stop().await;
    assert_eq!(report.published, 300);

    let received = read_topics(&bootstrap, &[topic.as_str()], 300, Duration::from_secs(60)).await;
    assert_eq!(received.len(), 300, "every event arrives");
    let by_id: HashMap<String, &NewEvent> = written
        .iter()
        .map(|(_, _, e)| (e.event_id().to_string(), e))
        .collect();
    let mut partitions_of_key: HashMap<String, HashSet<i32>> = HashMap::new();
    for m in &received {
        let e = by_id[&m.headers["event_id"]];
        assert_eq!(m.key.as_deref(), Some(e.aggregate().id()));
        assert_eq!(&m.payload[..], &e.payload()[..], "payload verbatim");
        assert_eq!(m.headers["event_type"], "huleedu.test.happened.v1");
        assert_eq!(m.headers["correlation_id"], "c-42");
        assert_eq!(m.headers["source_service"], "test_service");
        partitions_of_key
            .entry(m.key.clone().unwrap())
            .or_default()
            .insert(m.partition);
    }
    assert!(
        partitions_of_key.values().all(|p| p.len() == 1),
        "one partition per key"
    );
    let used: HashSet<i32> = partitions_of_key.values().flatten().copied().collect();
    assert!(used.len() > 1, "keys spread over partitions: {used:?}");
    assert_complete_and_ordered(&received, &written);
    db.drop().await;
}

#[tokio::test]
async fn an_oversized_message_goes_dead_while_other_aggregates_flow() {
    init_logs();
    let bootstrap = shared_bootstrap();
    let db = TestSchema::create().await;
    let topic = unique_topic("large");
    let publisher = Arc::new(KafkaPublisher::new(KafkaConfig::new(&bootstrap)).unwrap());
    let relay = start_relay(&db, publisher, relay_config());
    let outbox = PgOutbox::new(db.schema.clone());

    let agg = |id: &str| AggregateRef::new("essay", id).unwrap();
    let before = write(
        &db,
        &outbox,
        NewEvent::new(topic.clone(), agg("big"), "\"first\""),
    )
    .await;
    // Larger than librdkafka's message.max.bytes (1 MB by default).
    let huge = write(
        &db,
        &outbox,
        NewEvent::new(topic.clone(), agg("big"), vec![b'x'; 1_500_000]),
    )
    .await;
    let after = write(
        &db,
        &outbox,
        NewEvent::new(topic.clone(), agg("big"), "\"after\""),
    )
    .await;
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(
            write(
                &db,
                &outbox,
                NewEvent::new(topic.clone(), agg(&format!("ok-{i}")), "\"fine\""),
            )
            .await,
        );
    }
    wait_for(Duration::from_secs(60), "oversized event dead", || async {
        let dead: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE status = 'dead'",
            db.table("event_outbox")
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        dead == 1 && pending(&db).await == 0
    })
    .await;
    let report = relay.stop().await;
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(report.rejected_attempts, 3, "exactly max_attempts attempts");
    let (attempts, err): (i32, String) = sqlx::query_as(&format!(
        "SELECT attempts, last_error FROM {} WHERE event_id = $1",
        db.table("event_outbox")
    ))
    .bind(huge.2.event_id().as_uuid())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 3);
    assert!(err.to_lowercase().contains("too large"), "{err}");

    let received = read_topics(&bootstrap, &[topic.as_str()], 22, Duration::from_secs(30)).await;
    let ids: Vec<String> = received
        .iter()
        .map(|m| m.headers["event_id"].clone())
        .collect();
    assert_eq!(received.len(), 22, "all but the oversized one");
    assert!(!ids.contains(&huge.2.event_id().to_string()));
    // Its successor was held back until it was dead, then published after its predecessor.
    let pos = |e: &NewEvent| {
        ids.iter()
            .position(|i| *i == e.event_id().to_string())
            .unwrap()
    };
    assert!(pos(&before.2) < pos(&after.2));
    for o in &others {
        pos(&o.2);
    }
    db.drop().await;
}

#[tokio::test]
async fn a_frozen_broker_for_30_seconds_loses_nothing_and_burns_no_attempts() {
    init_logs();
    let broker = TestBroker::start();
    let db = TestSchema::create().await;
    let topic = unique_topic("outage");
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.delivery_timeout = Duration::from_secs(3);
    create_topics(&kafka, &[(topic.as_str(), 2)]).await.unwrap();
    let publisher = Arc::new(KafkaPublisher::new(kafka).unwrap());
    let relay = start_relay(&db, publisher.clone(), relay_config());
    // 32 s in CI; OUTBOX_OUTAGE_SECS=60 for the issue's long variant.
    let outage = outage_length(32);
    let (stop_writing, stop) = oneshot::channel::<()>();
    let writer = steady_writer(&db, &topic, stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.freeze();
    let frozen_at = Instant::now();
    let mut peak_pending = 0;
    while frozen_at.elapsed() < outage {
        assert_eq!(max_attempts(&db).await, 0, "an outage burnt an attempt");
        peak_pending = peak_pending.max(pending(&db).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    broker.thaw();
    // Writes go on for a while after the outage, as before it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_writing.send(());
    let written: Vec<_> = writer.await.unwrap().into_iter().map(|(w, _)| w).collect();
    assert!(
        peak_pending > 300,
        "backlog grew during the outage: {peak_pending}"
    );
    wait_for(
        Duration::from_secs(90),
        "backlog drained after the outage",
        || async { pending(&db).await == 0 },
    )
    .await;
    let report = relay.stop().await;
    assert_eq!(report.rejected_attempts, 0);
    assert_eq!(report.dead_lettered, 0);
    assert!(report.outage_pauses > 0);

    let received = read_topics(
        &broker.bootstrap(),
        &[topic.as_str()],
        written.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_complete_and_ordered(&received, &written);
    db.drop().await;
}

#[tokio::test]
async fn a_restarted_broker_that_lost_its_state_gets_a_rebuilt_producer() {
    init_logs();
    let broker = TestBroker::start();
    let db = TestSchema::create().await;
    let topic = unique_topic("restart");
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.delivery_timeout = Duration::from_secs(2);
    let publisher = Arc::new(KafkaPublisher::new(kafka).unwrap());
    let relay = start_relay(&db, publisher.clone(), relay_config());
    let outbox = PgOutbox::new(db.schema.clone());

    let agg = AggregateRef::new("batch", "r").unwrap();
    let mut written = Vec::new();
    written.push(write(&db, &outbox, NewEvent::new(topic.clone(), agg.clone(), "1")).await);
    wait_for(Duration::from_secs(30), "first event out", || async {
        pending(&db).await == 0
    })
    .await;

    // The broker dies and comes back empty (memory storage): the producer's id is unknown.
    let port = broker.kill();
    let broker = TestBroker::start_on(port);
    for n in 2..=5 {
        written.push(
            write(
                &db,
                &outbox,
                NewEvent::new(topic.clone(), agg.clone(), n.to_string()),
            )
            .await,
        );
    }
    wait_for(
        Duration::from_secs(90),
        "events after the restart delivered",
        || async { pending(&db).await == 0 },
    )
    .await;
    let report = relay.stop().await;
    assert_eq!(report.rejected_attempts, 0);
    let received = read_topics(
        &broker.bootstrap(),
        &[topic.as_str()],
        4,
        Duration::from_secs(30),
    )
    .await;
    assert_complete_and_ordered(&received, &written[1..]);
    assert!(publisher.rebuilds() >= 1, "the stuck producer was replaced");
    db.drop().await;
}

/// The broker process is stopped (killed) for a while under steady writes and started again
/// on the same port. Its memory storage comes back empty, so what it had acknowledged before
/// is gone with it; everything the outbox still held when it died, and everything written
/// while it was down, reaches the new broker, in order per key, with no attempt burnt.
/// 15 s in CI; `OUTBOX_OUTAGE_SECS=60` for the long variant.
#[tokio::test]
async fn a_stopped_broker_loses_nothing_the_outbox_held() {
    init_logs();
    let broker = TestBroker::start();
    let db = TestSchema::create().await;
    let topic = unique_topic("stopped");
    let mut kafka = KafkaConfig::new(broker.bootstrap());
    kafka.delivery_timeout = Duration::from_secs(3);
    let publisher = Arc::new(KafkaPublisher::new(kafka).unwrap());
    let relay = start_relay(&db, publisher.clone(), relay_config());
    let down_for = outage_length(15);
    let (stop_writing, stop) = oneshot::channel::<()>();
    let writer = steady_writer(&db, &topic, stop);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let port = broker.kill();
    // Completions of deliveries acknowledged just before the kill may still land; then the
    // outbox holds exactly what the new broker must receive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let snapshot = Instant::now();
    let held: HashSet<String> = sqlx::query_scalar::<_, uuid::Uuid>(&format!(
        "SELECT event_id FROM {} WHERE status = 'pending'",
        db.table("event_outbox")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|u| u.to_string())
    .collect();
    tokio::time::sleep(down_for).await;
    let broker = TestBroker::start_on(port);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_writing.send(());
    let written = writer.await.unwrap();
    wait_for(
        Duration::from_secs(90),
        "backlog drained after the restart",
        || async { pending(&db).await == 0 },
    )
    .await;
    assert_eq!(max_attempts(&db).await, 0, "an outage burnt an attempt");
    let report = relay.stop().await;
    assert_eq!((report.rejected_attempts, report.dead_lettered), (0, 0));
    assert!(report.outage_pauses > 0);

    // Expected on the new broker: what the outbox held after the kill, and what was committed
    // after that look.
    let expected: Vec<(String, i64, NewEvent)> = written
        .into_iter()
        .filter(|((_, _, e), at)| held.contains(&e.event_id().to_string()) || *at > snapshot)
        .map(|(w, _)| w)
        .collect();
    assert!(
        !held.is_empty() && expected.len() > held.len(),
        "writes went on during the stop"
    );
    let received = read_topics(
        &broker.bootstrap(),
        &[topic.as_str()],
        expected.len(),
        Duration::from_secs(60),
    )
    .await;
    let wanted: HashSet<String> = expected
        .iter()
        .map(|(_, _, e)| e.event_id().to_string())
        .collect();
    let received: Vec<Received> = received
        .into_iter()
        .filter(|m| wanted.contains(&m.headers["event_id"]))
        .collect();
    assert_complete_and_ordered(&received, &expected);
    db.drop().await;
}
