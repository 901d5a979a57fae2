//! The relay as a real process (`outbox relay`), killed with SIGKILL mid-drain and restarted.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outbox_core::{AggregateRef, NewEvent, Topic};
use outbox_kafka::testing::{free_port, read_topics, shared_bootstrap};
use outbox_postgres::testing::TestSchema;
use outbox_postgres::PgOutbox;

const EVENTS: usize = 20_000;
const BATCH: usize = 500;

fn spawn_relay(db_url: &str, schema: &str, bootstrap: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .arg("relay")
        .env("DATABASE_URL", db_url)
        .env("OUTBOX_SCHEMA", schema)
        .env("OUTBOX_BATCH_SIZE", BATCH.to_string())
        .env("OUTBOX_LEASE", "2s")
        .env("OUTBOX_METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start outbox relay")
}

async fn pending(db: &TestSchema) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {} WHERE status = 'pending'",
        db.table("event_outbox")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn sigkill_mid_batch_loses_nothing_and_resends_at_most_the_two_batches_in_flight() {
    let bootstrap = shared_bootstrap();
    let db = TestSchema::create().await;
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| outbox_postgres::testing::DEFAULT_TEST_URL.into());
    let topic = Topic::new(format!("test.kill.{}", uuid::Uuid::new_v4().simple())).unwrap();

    let outbox = PgOutbox::new(db.schema.clone());
    let events: Vec<NewEvent> = (0..EVENTS)
        .map(|i| {
            NewEvent::new(
                topic.clone(),
                AggregateRef::new("essay", format!("e{}", i % 100)).unwrap(),
                format!("{{\"n\":{i}}}"),
            )
        })
        .collect();
    let mut tx = db.pool.begin().await.unwrap();
    for chunk in events.chunks(1000) {
        outbox.enqueue_all(&mut tx, chunk).await.unwrap();
    }
    tx.commit().await.unwrap();

    let mut first = spawn_relay(&db_url, db.schema.name(), &bootstrap);
    let start = Instant::now();
    while pending(&db).await > (EVENTS / 2) as i64 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "first relay made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let left = pending(&db).await;
    assert!(left > 0, "killed before the end of the drain");

    let mut second = spawn_relay(&db_url, db.schema.name(), &bootstrap);
    let start = Instant::now();
    while pending(&db).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "second relay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGTERM: graceful stop.
    Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(second.wait().unwrap().success());

    let received = read_topics(
        &bootstrap,
        &[topic.as_str()],
        EVENTS,
        Duration::from_secs(120),
    )
    .await;
    let mut copies: HashMap<String, Vec<&[u8]>> = HashMap::new();
    for m in &received {
        copies
            .entry(m.headers["event_id"].clone())
            .or_default()
            .push(&m.payload);
    }
    assert_eq!(copies.len(), EVENTS, "no event lost");
    let duplicated = copies.values().filter(|c| c.len() > 1).count();
    // With the pipeline two batches are in flight at a kill: one published and not yet
    // written back, one being published.
    assert!(
        duplicated <= 2 * BATCH,
        "only the two batches in flight may be re-sent, {duplicated} events were"
    );
    for c in copies.values() {
        assert!(
            c.windows(2).all(|w| w[0] == w[1]),
            "a re-send carries the same bytes"
        );
    }
    let expected: HashMap<String, &NewEvent> = events
        .iter()
        .map(|e| (e.event_id().to_string(), e))
        .collect();
    for (id, c) in &copies {
        assert_eq!(
            c[0],
            &expected[id].payload()[..],
            "same event_id, same payload"
        );
    }
    db.drop().await;
}

fn signal(child: &Child, sig: &str) {
    Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
}

/// Three relay processes race over one table while one of them is SIGKILLed and restarted
/// every 0.7 s and another is frozen (SIGSTOP) past its lease and then resumed: no event is
/// lost, a re-send carries the same bytes, and per aggregate the events first reach the
/// broker in commit order (the frozen relay's late completions are fenced off).
/// `OUTBOX_RACE_EVENTS` sets the size (CI: 40000; the long run: 100000).
#[tokio::test]
async fn three_racing_relays_killed_and_frozen_lose_nothing_and_keep_order() {
    let total: usize = std::env::var("OUTBOX_RACE_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000);
    let bootstrap = shared_bootstrap();
    let db = TestSchema::create().await;
    let db_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| outbox_postgres::testing::DEFAULT_TEST_URL.into());
    let topic = Topic::new(format!("test.race.{}", uuid::Uuid::new_v4().simple())).unwrap();
    let outbox = PgOutbox::new(db.schema.clone());
    let mut tx = db.pool.begin().await.unwrap();
    for start in (0..total).step_by(1000) {
        let chunk: Vec<NewEvent> = (start..(start + 1000).min(total))
            .map(|i| {
                NewEvent::new(
                    topic.clone(),
                    AggregateRef::new("essay", format!("e{}", i % 200)).unwrap(),
                    format!("{{\"n\":{i}}}"),
                )
            })
            .collect();
        outbox.enqueue_all(&mut tx, &chunk).await.unwrap();
    }
    tx.commit().await.unwrap();

    let schema = db.schema.name().to_owned();
    let mut relays: Vec<Child> = (0..3)
        .map(|_| spawn_relay(&db_url, &schema, &bootstrap))
        .collect();
    // Relay 1 is frozen past its 2 s lease while the others take its partitions over, then
    // resumes with a stale view (its completions must be fenced off).
    let frozen = relays[1].id().to_string();
    let freezer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        Command::new("kill")
            .args(["-STOP", &frozen])
            .status()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        Command::new("kill")
            .args(["-CONT", &frozen])
            .status()
            .unwrap();
    });
    let start = Instant::now();
    let mut kills = 0;
    while pending(&db).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the racing relays did not finish"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        let victim = if kills % 2 == 0 { 0 } else { 2 };
        relays[victim].kill().unwrap(); // SIGKILL
        relays[victim].wait().unwrap();
        relays[victim] = spawn_relay(&db_url, &schema, &bootstrap);
        kills += 1;
    }
    for r in &relays {
        signal(r, "-TERM");
    }
    for mut r in relays {
        let _ = r.wait();
    }
    freezer.join().unwrap();
    assert!(kills >= 2, "the drain outlasted the faults ({kills} kills)");

    let received = read_topics(
        &bootstrap,
        &[topic.as_str()],
        total,
        Duration::from_secs(180),
    )
    .await;
    let mut first_seen: HashMap<String, u64> = HashMap::new();
    let mut last_first_n: HashMap<String, u64> = HashMap::new();
    let mut bytes_of: HashMap<String, Vec<u8>> = HashMap::new();
    for m in &received {
        let id = m.headers["event_id"].clone();
        if let Some(b) = bytes_of.get(&id) {
            assert_eq!(b, &m.payload, "a re-send carries the same bytes");
            continue;
        }
        bytes_of.insert(id.clone(), m.payload.clone());
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let n = v["n"].as_u64().unwrap();
        let agg = m.key.clone().unwrap();
        if let Some(prev) = last_first_n.insert(agg.clone(), n) {
            assert!(
                prev < n,
                "aggregate {agg}: event {n} first arrived after {prev}"
            );
        }
        first_seen.insert(id, n);
    }
    assert_eq!(
        first_seen.len(),
        total,
        "no event lost ({} messages, {kills} kills)",
        received.len()
    );
    println!(
        "{total} events, {} messages ({} re-sends), {kills} kills, one freeze",
        received.len(),
        received.len() - total
    );
    db.drop().await;
}
