//! The write path and the schema on real PostgreSQL: enqueue, batch enqueue, idempotency keys,
//! migrations and the start-up schema check.

mod common;

use common::*;
use outbox_core::{EnqueueOutcome, RelayStore};
use outbox_postgres::{check_schema, migrate, OutboxError, PgOutbox, Schema, WriteOrdering};

#[tokio::test]
async fn enqueue_stores_every_field_verbatim() {
    let db = TestDb::new().await;
    let e = event("o-9", 1)
        .with_header("correlation_id", "c-1")
        .with_key("custom-key")
        .with_event_type("order.placed");
    db.write("o-9", std::slice::from_ref(&e)).await;
    let row: (
        uuid::Uuid,
        String,
        String,
        String,
        String,
        String,
        serde_json::Value,
        Vec<u8>,
        String,
        i32,
    ) = sqlx::query_as(&format!(
        "SELECT event_id, aggregate_type, aggregate_id, event_type, topic, message_key,
                    headers, payload, status, attempts FROM {}",
        db.table("event_outbox")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(row.0, *e.event_id().as_uuid());
    assert_eq!((row.1.as_str(), row.2.as_str()), ("order", "o-9"));
    assert_eq!(row.3, "order.placed");
    assert_eq!(row.4, "test.order.v1");
    assert_eq!(row.5, "custom-key");
    assert_eq!(row.6, serde_json::json!({"correlation_id": "c-1"}));
    assert_eq!(row.7, e.payload().to_vec());
    assert_eq!((row.8.as_str(), row.9), ("pending", 0));
    db.drop().await;
}

#[tokio::test]
async fn idempotency_key_admits_one_event_per_fact_even_after_publishing() {
    let db = TestDb::new().await;
    let outbox = db.outbox();
    let first = event("batch-1", 1).with_idempotency_key("batch-1:finalised");
    let again = event("batch-1", 2).with_idempotency_key("batch-1:finalised");

    let mut tx = db.pool.begin().await.unwrap();
    assert!(outbox.enqueue(&mut tx, &first).await.unwrap().is_inserted());
    tx.commit().await.unwrap();

    // The event is published and its row deleted; the key still refuses a repeat.
    sqlx::query(&format!("DELETE FROM {}", db.table("event_outbox")))
        .execute(&db.pool)
        .await
        .unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert_eq!(
        outbox.enqueue(&mut tx, &again).await.unwrap(),
        EnqueueOutcome::Duplicate
    );
    tx.commit().await.unwrap();
    assert_eq!(db.count("true").await, 0);

    // A rolled-back enqueue does not use the key up.
    let fresh = event("batch-2", 1).with_idempotency_key("batch-2:finalised");
    let mut tx = db.pool.begin().await.unwrap();
    assert!(outbox.enqueue(&mut tx, &fresh).await.unwrap().is_inserted());
    tx.rollback().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    assert!(outbox.enqueue(&mut tx, &fresh).await.unwrap().is_inserted());
    tx.commit().await.unwrap();

    // The same event_id twice is a duplicate too.
    let plain = event("x", 1);
    let mut tx = db.pool.begin().await.unwrap();
    assert!(outbox.enqueue(&mut tx, &plain).await.unwrap().is_inserted());
    assert_eq!(
        outbox.enqueue(&mut tx, &plain).await.unwrap(),
        EnqueueOutcome::Duplicate
    );
    tx.commit().await.unwrap();
    assert_eq!(db.count("true").await, 2);
    db.drop().await;
}

#[tokio::test]
async fn concurrent_finalisations_publish_once() {
    let db = std::sync::Arc::new(TestDb::new().await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let e = event(&format!("cj-{i}"), i).with_idempotency_key("cj-batch-7:completed");
            let mut tx = db.pool.begin().await.unwrap();
            let outcome = db.outbox().enqueue(&mut tx, &e).await.unwrap();
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
    assert_eq!(db.count("true").await, 1);
    std::sync::Arc::try_unwrap(db).ok().unwrap().drop().await;
}

#[tokio::test]
async fn enqueue_all_writes_a_batch_in_order_with_one_statement() {
    for ordering in [
        WriteOrdering::LockAggregate,
        WriteOrdering::CallerSerialises,
    ] {
        let db = TestDb::new().await;
        let outbox = PgOutbox::new(db.schema.clone()).with_ordering(ordering);
        let mut events: Vec<_> = (0..100).map(|i| event(&format!("a{}", i % 7), i)).collect();
        let keyed = event("k", 0).with_idempotency_key("fact-1");
        let keyed_again = event("k", 1).with_idempotency_key("fact-1");
        let repeated = events[3].clone();
        events.extend([keyed, keyed_again, repeated]);

        let mut tx = db.pool.begin().await.unwrap();
        let outcomes = outbox.enqueue_all(&mut tx, &events).await.unwrap();
        tx.commit().await.unwrap();

        assert_eq!(outcomes.len(), 103);
        let seqs: Vec<i64> = outcomes[..101]
            .iter()
            .map(|o| match o {
                EnqueueOutcome::Inserted { seq } => *seq,
                EnqueueOutcome::Duplicate => panic!("{ordering:?}: unexpected duplicate"),
            })
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "sequence follows input order"
        );
        assert_eq!(
            outcomes[101],
            EnqueueOutcome::Duplicate,
            "same idempotency key"
        );
        assert_eq!(outcomes[102], EnqueueOutcome::Duplicate, "same event id");
        assert_eq!(db.count("true").await, 101);

        // Rows come back in the same order through the relay's claim.
        let store = db.store();
        let relay = outbox_core::RelayId::new();
        let leases = store
            .acquire_partitions(relay, 64, std::time::Duration::from_secs(5))
            .await
            .unwrap();
        let claimed = store.claim(&leases, 500).await.unwrap();
        let ids: Vec<_> = claimed.iter().map(|m| m.event_id).collect();
        let expected: Vec<_> = events[..101].iter().map(|e| e.event_id()).collect();
        assert_eq!(ids, expected);
        db.drop().await;
    }
}

#[tokio::test]
async fn migrations_are_idempotent_and_safe_to_run_concurrently() {
    let db = TestDb::new().await;
    assert_eq!(
        migrate(&db.pool, &db.schema).await.unwrap(),
        Vec::<i32>::new()
    );
    check_schema(&db.pool, &db.schema).await.unwrap();

    let fresh = Schema::new(format!("t_{}", uuid::Uuid::new_v4().simple())).unwrap();
    let runs = futures_join(migrate(&db.pool, &fresh), migrate(&db.pool, &fresh)).await;
    let mut applied: Vec<Vec<i32>> = vec![runs.0.unwrap(), runs.1.unwrap()];
    applied.sort();
    assert_eq!(
        applied,
        vec![vec![], vec![1, 2, 3]],
        "exactly one run applies them"
    );
    check_schema(&db.pool, &fresh).await.unwrap();
    sqlx::raw_sql(&format!("DROP SCHEMA \"{}\" CASCADE", fresh.name()))
        .execute(&db.pool)
        .await
        .unwrap();
    db.drop().await;
}

async fn futures_join<A: std::future::Future, B: std::future::Future>(
    a: A,
    b: B,
) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

#[tokio::test]
async fn schema_check_names_what_drifted_and_how_to_fix_it() {
    let db = TestDb::new().await;
    sqlx::raw_sql(&format!(
        "DROP INDEX {s}.event_outbox_pending_idx;
         ALTER TABLE {s}.event_outbox DROP COLUMN retry_at;
         ALTER TABLE {s}.event_outbox ALTER COLUMN attempts TYPE bigint;",
        s = format!("\"{}\"", db.schema.name())
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let err = check_schema(&db.pool, &db.schema).await.unwrap_err();
    let OutboxError::SchemaMismatch(m) = &err else {
        panic!("{err}")
    };
    let text = err.to_string();
    assert_eq!(m.problems.len(), 4, "{text}");
    assert!(
        text.contains("index event_outbox_retry_idx is missing"),
        "{text}"
    );
    assert!(
        text.contains("index event_outbox_pending_idx is missing"),
        "{text}"
    );
    assert!(
        text.contains("column event_outbox.retry_at is missing"),
        "{text}"
    );
    assert!(
        text.contains("event_outbox.attempts has type bigint, expected integer"),
        "{text}"
    );
    assert!(text.contains("outbox migrate"), "{text}");

    let empty = Schema::new(format!("t_{}", uuid::Uuid::new_v4().simple())).unwrap();
    let text = check_schema(&db.pool, &empty)
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("table event_outbox is missing"), "{text}");
    db.drop().await;
}

#[tokio::test]
async fn schema_names_from_configuration_cannot_inject_sql() {
    for bad in ["public; DROP TABLE x", "Public", "a\"b", "", "1x"] {
        assert!(
            matches!(Schema::new(bad), Err(OutboxError::InvalidSchemaName(_))),
            "{bad:?} accepted"
        );
    }
}

/// Two aggregates whose lock keys sort `(low, high)`.
fn aggregates_in_lock_order() -> (String, String) {
    let key = |id: &str| outbox_core::partition::aggregate_lock_key("order", id);
    let (a, b) = ("lock-a".to_owned(), "lock-b".to_owned());
    if key(&a) < key(&b) {
        (a, b)
    } else {
        (b, a)
    }
}

/// `enqueue` locks in call order and `enqueue_all` in lock-key order: a transaction that
/// enqueues `high` then `low` one call at a time deadlocks against an `enqueue_all` of both
/// (PostgreSQL aborts one). With `lock_aggregates` first, both follow the documented order:
/// the second transaction waits, and both commit, in sequence order.
#[tokio::test]
async fn lock_aggregates_gives_separate_enqueues_the_order_enqueue_all_uses() {
    let db = TestDb::new().await;
    let outbox = db.outbox();
    let (low, high) = aggregates_in_lock_order();
    let agg = |id: &str| outbox_core::AggregateRef::new("order", id).unwrap();

    // Without the helper: the documented hazard, to show what the helper is for.
    let mut t1 = db.pool.begin().await.unwrap();
    outbox.enqueue(&mut t1, &event(&high, 1)).await.unwrap();
    let all = {
        let (pool, outbox, low, high) =
            (db.pool.clone(), outbox.clone(), low.clone(), high.clone());
        tokio::spawn(async move {
            let mut t2 = pool.begin().await.unwrap();
            let r = outbox
                .enqueue_all(&mut t2, &[event(&low, 2), event(&high, 2)])
                .await;
            match r {
                Ok(_) => t2.commit().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = outbox.enqueue(&mut t1, &event(&low, 1)).await;
    let first_failed = second.is_err();
    if first_failed {
        drop(t1);
    } else {
        t1.commit().await.unwrap();
    }
    let other = all.await.unwrap();
    let messages = format!("{second:?} {other:?}");
    assert!(
        first_failed || other.is_err(),
        "expected a deadlock: {messages}"
    );
    assert!(messages.contains("deadlock"), "{messages}");
    sqlx::raw_sql(&format!("TRUNCATE {}", db.table("event_outbox")))
        .execute(&db.pool)
        .await
        .unwrap();

    // With it: same calls, no deadlock.
    let mut t1 = db.pool.begin().await.unwrap();
    outbox
        .lock_aggregates(&mut t1, &[agg(&high), agg(&low)])
        .await
        .unwrap();
    outbox.enqueue(&mut t1, &event(&high, 1)).await.unwrap();
    let all = {
        let (pool, outbox, low, high) =
            (db.pool.clone(), outbox.clone(), low.clone(), high.clone());
        tokio::spawn(async move {
            let mut t2 = pool.begin().await.unwrap();
            outbox
                .enqueue_all(&mut t2, &[event(&low, 2), event(&high, 2)])
                .await
                .unwrap();
            t2.commit().await.unwrap();
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !all.is_finished(),
        "the batch waits for the first transaction"
    );
    outbox.enqueue(&mut t1, &event(&low, 1)).await.unwrap();
    t1.commit().await.unwrap();
    all.await.unwrap();
    // Sequence order is commit order per aggregate: the first transaction's events first.
    let rows: Vec<(String, serde_json::Value)> = sqlx::query_as(&format!(
        "SELECT aggregate_id, convert_from(payload, 'UTF8')::jsonb FROM {} ORDER BY seq",
        db.table("event_outbox")
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for id in [&low, &high] {
        let ns: Vec<i64> = rows
            .iter()
            .filter(|(a, _)| a == id)
            .map(|(_, p)| p["n"].as_i64().unwrap())
            .collect();
        assert_eq!(ns, vec![1, 2], "{id}");
    }
    db.drop().await;
}
