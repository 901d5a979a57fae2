//! MariaDB restarts while writers and a relay run: a private server (the machine's
//! `mariadbd`, its own directory and port) is stopped and started again mid-run. Writers see
//! clear errors while it is down, the relay reconnects by itself, and every event whose
//! commit succeeded is published.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::testing::{wait_until, TestPublisher};
use outbox_core::{AggregateRef, EventId, NewEvent, Relay, RelayConfig, Topic};
use outbox_mysql::testing::PrivateServer;
use outbox_mysql::{MySqlDialect, MySqlOutbox, MySqlRelayStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_load_loses_nothing_committed() {
    let server = PrivateServer::create();
    let admin = outbox_mysql::connect_with_size(&server.url(), 1)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE restart_test CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    // A writer waits at most a second for a connection, so that the outage shows as errors
    // rather than as writers waiting it out.
    let pool = outbox_mysql::connect_with(
        &format!("{}/restart_test", server.url()),
        outbox_mysql::pool_options()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    outbox_mysql::migrate(&pool).await.unwrap();

    let publisher = TestPublisher::new();
    let config = RelayConfig {
        poll_min: Duration::from_millis(10),
        poll_max: Duration::from_millis(100),
        lease: Duration::from_secs(3),
        ..RelayConfig::default()
    };
    let relay = Relay::new(
        MySqlRelayStore::new(pool.clone(), MySqlDialect),
        publisher.clone(),
        config,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));

    let committed: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let (halt, halted) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let (pool, committed, errors, halted) = (
            pool.clone(),
            committed.clone(),
            errors.clone(),
            halted.clone(),
        );
        writers.push(tokio::spawn(async move {
            let outbox = MySqlOutbox::new(MySqlDialect);
            let topic = Topic::new("restart.test").unwrap();
            let mut i = 0u64;
            while !*halted.borrow() {
                i += 1;
                let event = NewEvent::new(
                    topic.clone(),
                    AggregateRef::new("agg", format!("a{}", (i * 2 + w) % 30)).unwrap(),
                    format!("{{\"n\":{i}}}"),
                );
                let result = async {
                    let mut tx = pool.begin().await?;
                    outbox
                        .enqueue(&mut tx, &event)
                        .await
                        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
                    tx.commit().await
                }
                .await;
                match result {
                    Ok(()) => committed.lock().unwrap().push(event.event_id()),
                    Err(e) => {
                        errors.lock().unwrap().push(e.to_string());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = committed.lock().unwrap().len();
    assert!(
        before > 50,
        "writers were writing before the restart ({before})"
    );
    server.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.start();
    println!("MariaDB was down for {:.1?}", down.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    halt.send(true).unwrap();
    for w in writers {
        w.await.unwrap();
    }
    let committed = committed.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    assert!(
        committed.len() > before + 50,
        "writers carried on after the restart"
    );
    assert!(
        !errors.is_empty(),
        "writers saw errors while the database was down"
    );
    assert!(errors.iter().all(|e| !e.trim().is_empty()));
    wait_until(
        Duration::from_secs(60),
        "every committed event published after the restart",
        || {
            let all = committed.iter().all(|id| publisher.offered(*id) > 0);
            async move { all }
        },
    )
    .await;
    assert!(
        !relay.is_finished(),
        "the relay kept running through the restart"
    );
    let _ = stop.send(());
    relay.await.unwrap();
    println!(
        "{} committed, {} writer errors, all published",
        committed.len(),
        errors.len()
    );
}
