//! The inbox on MySQL/MariaDB beyond the conformance suite: a concurrent first delivery
//! waits for the other and then reads as a duplicate, and the retention sweep deletes only
//! rows older than the retention, in batches.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outbox_core::{EventId, Headers, IncomingMessage};
use outbox_mysql::testing::TestDatabase;
use outbox_mysql::{MySqlDialect, MySqlInbox};

fn message(id: EventId) -> IncomingMessage {
    let mut headers = Headers::new();
    headers.insert("event_id".into(), id.to_string());
    IncomingMessage {
        topic: "mysql.inbox.v1".into(),
        partition: 0,
        offset: 1,
        key: None,
        payload: Bytes::from_static(b"{}"),
        headers,
    }
}

#[tokio::test]
async fn a_concurrent_first_delivery_waits_and_then_is_a_duplicate() {
    let db = Arc::new(TestDatabase::create().await);
    let inbox = MySqlInbox::new(db.pool.clone(), MySqlDialect);
    let id = EventId::new();
    let mut first = db.pool.begin().await.unwrap();
    assert!(inbox
        .try_begin(&mut first, "c", id, &message(id))
        .await
        .unwrap());
    let second = {
        let (db, inbox) = (db.clone(), inbox.clone());
        tokio::spawn(async move {
            let mut tx = db.pool.begin().await.unwrap();
            let recorded = inbox
                .try_begin(&mut tx, "c", id, &message(id))
                .await
                .unwrap();
            tx.rollback().await.unwrap();
            recorded
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second delivery waits for the first"
    );
    assert!(
        !inbox.has_processed("c", id).await.unwrap(),
        "not committed yet"
    );
    first.commit().await.unwrap();
    assert!(!second.await.unwrap(), "then it is a duplicate");
    assert!(inbox.has_processed("c", id).await.unwrap());
    assert!(!inbox.has_processed("other", id).await.unwrap());
    Arc::try_unwrap(db).ok().unwrap().drop().await;
}

#[tokio::test]
async fn retention_deletes_only_old_rows_in_batches() {
    let db = TestDatabase::create().await;
    let inbox = MySqlInbox::new(db.pool.clone(), MySqlDialect);
    for _ in 0..25 {
        let id = EventId::new();
        let mut tx = db.pool.begin().await.unwrap();
        inbox
            .try_begin(&mut tx, "c", id, &message(id))
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    // 15 of them processed eight days ago.
    sqlx::query(
        "UPDATE event_inbox SET processed_at = processed_at - 8 * 86400000
         ORDER BY processed_at LIMIT 15",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let week = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(inbox.purge_older_than(week, 10).await.unwrap(), 10);
    assert_eq!(inbox.purge_older_than(week, 10).await.unwrap(), 5);
    assert_eq!(inbox.purge_older_than(week, 10).await.unwrap(), 0);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM event_inbox")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 10);
    db.drop().await;
}
