//! The sidecar wake-up on SQLite: a relay whose own pool never sees the writers' commits
//! (another process, as far as it can tell) is woken by `PRAGMA data_version` changing.

use std::time::Duration;

use outbox_core::testing::{wait_until, TestPublisher};
use outbox_core::{AggregateRef, NewEvent, Relay, RelayConfig, Topic, WakeSignal};
use outbox_sqlite::{SqliteOutbox, SqliteRelayStore};

#[tokio::test]
async fn data_version_wakes_a_relay_that_shares_nothing_with_the_writer() {
    let path = std::env::temp_dir().join(format!("watch-{}.db", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}", path.display());
    let relay_pool = outbox_sqlite::connect(&url).await.unwrap();
    outbox_sqlite::migrate(&relay_pool).await.unwrap();
    // The writer has its own pool and no wake signal: only the file connects them.
    let writer_pool = outbox_sqlite::connect(&url).await.unwrap();

    let publisher = TestPublisher::new();
    let config = RelayConfig {
        poll_min: Duration::from_secs(20),
        poll_max: Duration::from_secs(20),
        ..RelayConfig::default()
    };
    let wake = WakeSignal::new();
    let relay = Relay::new(
        SqliteRelayStore::new(relay_pool.clone(), outbox_sqlite::SqliteDialect),
        publisher.clone(),
        config,
    )
    .with_wake_signal(wake.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let watch = tokio::spawn(outbox_sqlite::watch_for_commits(
        relay_pool.clone(),
        wake,
        Duration::from_millis(10),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let write = |n: u32| {
        let writer_pool = writer_pool.clone();
        async move {
            let e = NewEvent::new(
                Topic::new("watch.v1").unwrap(),
                AggregateRef::new("a", "1").unwrap(),
                format!("{n}"),
            );
            let mut tx = outbox_sqlite::begin(&writer_pool).await.unwrap();
            SqliteOutbox::new(outbox_sqlite::SqliteDialect)
                .enqueue(&mut tx, &e)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            e
        }
    };
    for n in 0..3 {
        let e = write(n).await;
        wait_until(
            Duration::from_secs(5),
            "a watched relay publishes",
            || async { publisher.offered(e.event_id()) == 1 },
        )
        .await;
    }
    // Without the watch, the same write waits for the 20 s poll.
    watch.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let silent = write(99).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(publisher.offered(silent.event_id()), 0);
    let _ = stop.send(());
    relay.await.unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
