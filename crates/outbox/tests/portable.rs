//! The portable unit of work: `prepare` runs before the inbox transaction (so it can take the
//! write lock itself, proving none is held), `handle` once per event, and a redelivery skips
//! both (a remote judge in `prepare` is not paid twice); poison is recognised before
//! `prepare` runs.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use outbox::backend::Database;
use outbox::portable::{params, InboxHandler, ServiceDb, Tx, TxHandler};
use outbox::{Handled, HandlerError, IncomingMessage, MessageHandler};

struct Recorder {
    db: ServiceDb,
    calls: Mutex<Vec<&'static str>>,
}

#[async_trait]
impl TxHandler for Recorder {
    async fn prepare(&self, _m: &IncomingMessage) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push("prepare");
        // On SQLite a write transaction needs the one write lock: this would wait (and time
        // out) if the inbox's transaction were already open.
        let mut tx = self.db.begin().await?;
        tx.execute("UPDATE effects SET n = n WHERE id = 0", &[])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, _m: &IncomingMessage) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push("handle");
        tx.execute("UPDATE effects SET n = n + 1 WHERE id = $1", params![0])
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn prepare_runs_outside_the_transaction_and_handle_once_per_event() {
    let path = std::env::temp_dir().join(format!("portable-{}.db", uuid::Uuid::new_v4().simple()));
    let db = ServiceDb::open(&format!("sqlite://{}", path.display()), "unused")
        .await
        .unwrap();
    assert!(matches!(db.database(), Database::Sqlite { .. }));
    db.execute_script(
        "CREATE TABLE effects (id BIGINT PRIMARY KEY, n BIGINT NOT NULL);
                       INSERT INTO effects VALUES (0, 0);",
    )
    .await
    .unwrap();
    let recorder = Arc::new(Recorder {
        db: db.clone(),
        calls: Mutex::new(Vec::new()),
    });
    let inbox = InboxHandler::new(db.clone(), "recorder", recorder.clone());
    let message = IncomingMessage {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        key: None,
        payload: bytes::Bytes::from_static(b"{}"),
        headers: [("event_id".to_string(), uuid::Uuid::now_v7().to_string())].into(),
    };
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), inbox.handle(&message))
        .await
        .expect("prepare did not wait for a lock held by the inbox")
        .unwrap();
    assert_eq!(first, Handled::Processed);
    assert_eq!(inbox.handle(&message).await.unwrap(), Handled::Duplicate);
    assert_eq!(
        *recorder.calls.lock().unwrap(),
        ["prepare", "handle"],
        "the redelivery ran neither prepare nor handle"
    );
    let poison = IncomingMessage {
        headers: Default::default(),
        payload: bytes::Bytes::from_static(b"not an envelope"),
        ..message.clone()
    };
    assert!(matches!(
        inbox.handle(&poison).await,
        Err(HandlerError::Poison(_))
    ));
    assert_eq!(
        recorder.calls.lock().unwrap().len(),
        2,
        "poison is refused before prepare runs"
    );
    let n = db
        .fetch_optional("SELECT n FROM effects WHERE id = 0", &[])
        .await
        .unwrap()
        .unwrap()
        .int("n")
        .unwrap();
    assert_eq!(n, 1, "one effect for two deliveries");
    let _ = std::fs::remove_file(path);
}
