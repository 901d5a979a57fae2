//! `outbox` in the stream write mode as real processes, on a private cluster with
//! `wal_level = logical` and a private Kafka-protocol broker: `migrate` creates the slot,
//! `check` and `status` report it, and a relay SIGKILLed mid-stream is replaced by a new
//! process that resumes from the slot: nothing lost, per aggregate in commit order.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{AggregateRef, NewEvent, Topic};
use outbox_kafka::testing::{free_port, read_topics, TestBroker};
use outbox_postgres::testing::Cluster;
use outbox_postgres::{PgOutbox, Schema, WriteMode};
use sqlx::postgres::PgPoolOptions;

fn outbox(args: &[&str], db_url: &str, broker: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox"));
    c.args(args)
        .env("DATABASE_URL", db_url)
        .env("OUTBOX_SCHEMA", "app")
        .env("OUTBOX_WRITE_MODE", "stream")
        .env("OUTBOX_STREAM_MAX_RETAINED_WAL", "1GiB")
        .env("OUTBOX_BROKER", broker)
        .env("OUTBOX_METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn run(args: &[&str], db_url: &str, broker: &str) -> Output {
    let out = outbox(args, db_url, broker).output().expect("run outbox");
    assert!(
        out.status.success(),
        "outbox {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn spawn_relay(db_url: &str, broker: &str) -> Child {
    outbox(&["relay"], db_url, broker)
        .stdout(Stdio::null())
        .spawn()
        .expect("start outbox relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_relay_killed_mid_stream_is_resumed_from_the_slot_by_the_next_process() {
    let broker = TestBroker::start();
    let bootstrap = broker.bootstrap();
    let cluster = Cluster::create_logical();
    let db_url = cluster.url();
    let out = run(&["migrate"], &db_url, &bootstrap);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("stream slot outbox_app created"), "{said}");
    let out = run(&["check"], &db_url, &bootstrap);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("no relay attached"), "{said}");

    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(&db_url)
        .await
        .unwrap();
    let topic = Topic::new("test.stream.kill").unwrap();
    let writer_outbox =
        PgOutbox::new(Schema::new("app").unwrap()).with_write_mode(WriteMode::LogicalMessage);
    // One writer, so commit order is the order of `n` per aggregate.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (pool, topic, stop) = (pool.clone(), topic.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let mut tx = pool.begin().await.unwrap();
                for k in 0..5 {
                    let n = written + k;
                    let e = NewEvent::new(
                        topic.clone(),
                        AggregateRef::new("essay", format!("e{}", n % 20)).unwrap(),
                        format!("{{\"n\":{n}}}"),
                    );
                    writer_outbox.enqueue(&mut tx, &e).await.unwrap();
                }
                tx.commit().await.unwrap();
                written += 5;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            written
        })
    };
    let mut first = spawn_relay(&db_url, &bootstrap);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    first.kill().unwrap(); // SIGKILL: no final status, no goodbye
    first.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = spawn_relay(&db_url, &bootstrap);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 200, "the writer kept writing: {written}");

    let received = read_topics(
        &bootstrap,
        &[topic.as_str()],
        written,
        Duration::from_secs(60),
    )
    .await;
    let out = run(&["status", "--json"], &db_url, &bootstrap);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["stream"]["active"], true, "{status}");
    assert_eq!(status["stream"]["retained_wal_limit_bytes"], 1u64 << 30);
    assert_eq!(status["pending"], 0, "nothing went through the table");
    Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(second.wait().unwrap().success(), "a graceful stop");

    // Every event arrived; per aggregate the first copies are in commit order.
    let mut seen = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &received {
        if !seen.insert(m.headers["event_id"].clone()) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let n = v["n"].as_i64().unwrap();
        let agg = format!("e{}", n % 20);
        let prev = last.insert(agg.clone(), n);
        assert!(prev.is_none_or(|p| p < n), "{agg}: {n} after {prev:?}");
    }
    assert_eq!(seen.len(), written, "no event lost");
}
