//! The PostgreSQL inbox on its own: dedupe by (consumer, event_id), poison, rollback, retention.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{EventId, Handled, HandlerError, IncomingMessage, MessageHandler};
use outbox_postgres::testing::TestSchema;
use outbox_postgres::{InboxEvent, PgInbox, PgInboxHandler, SqlHandler};
use sqlx::{Postgres, Transaction};

struct Touch {
    table: String,
    fail: bool,
}

#[async_trait]
impl SqlHandler<sqlx::Postgres> for Touch {
    async fn handle(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &InboxEvent<'_>,
    ) -> Result<(), HandlerError> {
        sqlx::query(&format!("INSERT INTO {} VALUES ($1)", self.table))
            .bind(event.event_id.as_uuid())
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::retry)?;
        if self.fail {
            return Err(HandlerError::retry("boom"));
        }
        Ok(())
    }
}

fn message(event_id: Option<EventId>, payload: &str) -> IncomingMessage {
    IncomingMessage {
        topic: "t".into(),
        partition: 0,
        offset: 7,
        key: None,
        payload: Bytes::from(payload.to_owned()),
        headers: event_id
            .map(|id| [("event_id".to_string(), id.to_string())].into())
            .unwrap_or_default(),
    }
}

async fn touched(db: &TestSchema) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("touched")))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn duplicates_are_skipped_per_consumer_and_failures_leave_nothing() {
    let db = TestSchema::create().await;
    sqlx::raw_sql(&format!("CREATE TABLE {} (id UUID)", db.table("touched")))
        .execute(&db.pool)
        .await
        .unwrap();
    let handler = |consumer: &str, fail: bool| {
        PgInboxHandler::new(
            db.pool.clone(),
            db.schema.clone(),
            consumer,
            Touch {
                table: db.table("touched"),
                fail,
            },
        )
    };
    let id = EventId::new();
    let a = handler("a", false);
    assert_eq!(
        a.handle(&message(Some(id), "{}")).await.unwrap(),
        Handled::Processed
    );
    assert_eq!(
        a.handle(&message(Some(id), "{}")).await.unwrap(),
        Handled::Duplicate
    );
    // Another consumer of the same event has its own record.
    let b = handler("b", false);
    assert_eq!(
        b.handle(&message(Some(id), "{}")).await.unwrap(),
        Handled::Processed
    );
    assert_eq!(touched(&db).await, 2);

    // A failing handler rolls back its changes and its inbox row: a retry runs it again.
    let other = EventId::new();
    let failing = handler("a", true);
    assert!(matches!(
        failing.handle(&message(Some(other), "{}")).await,
        Err(HandlerError::Retry(_))
    ));
    assert_eq!(touched(&db).await, 2);
    assert_eq!(
        a.handle(&message(Some(other), "{}")).await.unwrap(),
        Handled::Processed
    );

    // The envelope's event_id serves when there is no header; neither is poison.
    let enveloped = EventId::new();
    let body = format!(r#"{{"event_id":"{enveloped}","data":{{}}}}"#);
    assert_eq!(
        a.handle(&message(None, &body)).await.unwrap(),
        Handled::Processed
    );
    assert_eq!(
        a.handle(&message(Some(enveloped), "x")).await.unwrap(),
        Handled::Duplicate
    );
    assert!(matches!(
        a.handle(&message(None, "not json")).await,
        Err(HandlerError::Poison(_))
    ));
    db.drop().await;
}

#[tokio::test]
async fn retention_deletes_old_inbox_rows_in_small_batches() {
    let db = TestSchema::create().await;
    sqlx::raw_sql(&format!(
        "INSERT INTO {t} (consumer, event_id, processed_at)
         SELECT 'c', gen_random_uuid(), now() - interval '8 days' FROM generate_series(1, 25);
         INSERT INTO {t} (consumer, event_id) SELECT 'c', gen_random_uuid() FROM generate_series(1, 5);",
        t = db.table("event_inbox")
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let inbox = PgInbox::new(db.pool.clone(), &db.schema);
    let week = Duration::from_secs(7 * 24 * 3600);
    assert_eq!(inbox.purge_older_than(week, 10).await.unwrap(), 10);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sweeper = tokio::spawn(inbox.clone().run_retention(
        week,
        Duration::from_millis(50),
        10,
        async move {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    sweeper.await.unwrap();
    let left: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}", db.table("event_inbox")))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, 5, "only recent rows stay");
    db.drop().await;
}
