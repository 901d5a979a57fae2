//! The MySQL/MariaDB write path on the machine's server: fields stored verbatim, duplicates
//! and idempotency keys, writers of one aggregate committing in sequence order, migrations
//! and the schema check. The relay, admin and inbox run the conformance suite.

use std::time::Duration;

use outbox_core::partition::aggregate_lock_key;
use outbox_core::{AggregateRef, EnqueueOutcome, NewEvent, Topic};
use outbox_mysql::testing::TestDatabase;
use outbox_mysql::{MySqlDialect, MySqlOutbox};

fn event(aggregate: &str, n: i64) -> NewEvent {
    NewEvent::json(
        Topic::new("mysql.test.v1").unwrap(),
        AggregateRef::new("order", aggregate).unwrap(),
        &serde_json::json!({ "n": n }),
    )
    .unwrap()
}

fn outbox() -> MySqlOutbox {
    MySqlOutbox::new(MySqlDialect)
}

#[tokio::test]
async fn enqueue_stores_every_field_and_refuses_duplicates() {
    let db = TestDatabase::create().await;
    let e = event("Ördér-1", 1).with_header("traceparent", "00-abc-def-01");
    let mut tx = db.pool.begin().await.unwrap();
    let first = outbox().enqueue(&mut tx, &e).await.unwrap();
    let again = outbox().enqueue(&mut tx, &e).await.unwrap();
    tx.commit().await.unwrap();
    assert!(first.is_inserted());
    assert_eq!(again, EnqueueOutcome::Duplicate, "the same event id twice");

    let (id, agg, topic, headers, payload): (String, String, String, String, Vec<u8>) =
        sqlx::query_as(
            // Text compares byte for byte (utf8mb4_bin), which sqlx reads as binary: cast.
            "SELECT event_id, CAST(aggregate_id AS CHAR), CAST(topic AS CHAR),
                    CAST(headers AS CHAR), payload FROM event_outbox",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(id, e.event_id().to_string());
    assert_eq!(agg, "Ördér-1");
    assert_eq!(topic, "mysql.test.v1");
    assert_eq!(headers, r#"{"traceparent":"00-abc-def-01"}"#);
    assert_eq!(payload, e.payload().as_ref());

    // A rolled-back transaction leaves nothing; the case of an aggregate id matters.
    let mut tx = db.pool.begin().await.unwrap();
    outbox()
        .enqueue(&mut tx, &event("ördér-1", 2))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM event_outbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    db.drop().await;
}

#[tokio::test]
async fn an_idempotency_key_admits_one_event_among_concurrent_writers() {
    let db = std::sync::Arc::new(TestDatabase::create().await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let e = event(&format!("cj-{i}"), i).with_idempotency_key("cj-batch-7:completed");
            let mut tx = db.pool.begin().await.unwrap();
            let outcome = outbox().enqueue(&mut tx, &e).await.unwrap();
            tx.commit().await.unwrap();
            outcome
        }));
    }
    let mut inserted = 0;
    for t in tasks {
        if t.await.unwrap().is_inserted() {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 1);
    let db = std::sync::Arc::try_unwrap(db).ok().unwrap();
    db.drop().await;
}

/// Two aggregates whose writer locks are different bucket rows.
fn two_buckets() -> (String, String) {
    let bucket = |id: &str| aggregate_lock_key("order", id) & 1023;
    let first = "a-0".to_owned();
    let other = (1..)
        .map(|i| format!("a-{i}"))
        .find(|id| bucket(id) != bucket(&first))
        .unwrap();
    (first, other)
}

#[tokio::test]
async fn a_writer_of_the_same_aggregate_waits_for_the_first_to_commit() {
    let db = std::sync::Arc::new(TestDatabase::create().await);
    let (busy, free) = two_buckets();

    let mut first = db.pool.begin().await.unwrap();
    outbox()
        .enqueue(&mut first, &event(&busy, 1))
        .await
        .unwrap();

    let spawn_writer = |aggregate: String, n: i64| {
        let db = db.clone();
        tokio::spawn(async move {
            let mut tx = db.pool.begin().await.unwrap();
            outbox()
                .enqueue(&mut tx, &event(&aggregate, n))
                .await
                .unwrap();
            tx.commit().await.unwrap();
        })
    };
    let second = spawn_writer(busy.clone(), 2);
    let unrelated = spawn_writer(free.clone(), 1);
    // Another aggregate's writer is not held up...
    tokio::time::timeout(Duration::from_secs(10), unrelated)
        .await
        .expect("an unrelated aggregate commits while the first writer is open")
        .unwrap();
    // ...the same aggregate's is, until the first commits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second writer waits for the first"
    );
    first.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second writer goes on after the first commits")
        .unwrap();

    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT CAST(aggregate_id AS CHAR), payload FROM event_outbox ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let ns: Vec<i64> = rows
        .iter()
        .filter(|(a, _)| *a == busy)
        .map(|(_, p)| {
            serde_json::from_slice::<serde_json::Value>(p).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, vec![1, 2], "sequence order is commit order");
    let db = std::sync::Arc::try_unwrap(db).ok().unwrap();
    db.drop().await;
}

#[tokio::test]
async fn migrations_are_idempotent_and_the_check_names_what_drifted() {
    let db = TestDatabase::create().await;
    let again = futures::future::join(
        outbox_mysql::migrate(&db.pool),
        outbox_mysql::migrate(&db.pool),
    )
    .await;
    assert_eq!(again.0.unwrap(), Vec::<i64>::new());
    assert_eq!(again.1.unwrap(), Vec::<i64>::new());

    sqlx::raw_sql("ALTER TABLE event_outbox DROP COLUMN dead_at; DROP INDEX event_inbox_processed_idx ON event_inbox")
        .execute(&db.pool)
        .await
        .unwrap();
    let err = outbox_mysql::check_schema(&db.pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column event_outbox.dead_at is missing"),
        "{err}"
    );
    assert!(
        err.contains("index event_inbox_processed_idx is missing"),
        "{err}"
    );
    assert!(
        err.contains("outbox_mysql::migrate"),
        "says how to fix it: {err}"
    );
    db.drop().await;
}

#[tokio::test]
async fn connection_trouble_is_unavailability_and_bad_sql_is_not() {
    assert!(outbox_mysql::is_unavailable(&sqlx::Error::PoolTimedOut));
    assert!(outbox_mysql::is_unavailable(&sqlx::Error::Io(
        std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
    )));
    let db = TestDatabase::create().await;
    let bad = sqlx::query("SELECT no_such_column FROM event_outbox")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(!outbox_mysql::is_unavailable(&bad));
    db.drop().await;
}
