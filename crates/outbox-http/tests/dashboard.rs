//! The dashboard: the page is served from the binary, and the history follows the table.

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{AggregateRef, NewEvent, RelayStore, Topic};
use outbox_http::Dashboard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn history_follows_queue_depth_and_the_page_needs_no_cdn() {
    let path =
        std::env::temp_dir().join(format!("outbox-dash-{}.db", uuid::Uuid::new_v4().simple()));
    let pool = outbox_sqlite::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    outbox_sqlite::migrate(&pool).await.unwrap();
    let store: Arc<dyn RelayStore> = Arc::new(outbox_sqlite::SqliteRelayStore::new(
        pool.clone(),
        outbox_sqlite::SqliteDialect,
    ));
    let dashboard = Dashboard::new(store, None).keeping(500);
    let sampler = tokio::spawn(dashboard.clone().run_sampler(Duration::from_millis(20)));

    for batch in 1..=3 {
        let events: Vec<_> = (0..10)
            .map(|i| {
                NewEvent::new(
                    Topic::new("dash.v1").unwrap(),
                    AggregateRef::new("a", format!("{batch}-{i}")).unwrap(),
                    "{}",
                )
            })
            .collect();
        let mut tx = outbox_sqlite::begin(&pool).await.unwrap();
        outbox_sqlite::SqliteOutbox::new(outbox_sqlite::SqliteDialect)
            .enqueue_all(&mut tx, &events)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    sampler.abort();
    let depths: Vec<u64> = dashboard.history().iter().map(|s| s.pending).collect();
    assert!(
        depths.contains(&10) && depths.contains(&20) && depths.contains(&30),
        "{depths:?}"
    );
    assert!(
        depths.windows(2).all(|w| w[0] <= w[1]),
        "depth only grew: {depths:?}"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = dashboard.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    conn.read_to_string(&mut page).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"));
    assert!(page.contains("queue depth") && page.contains("/api/dead/requeue"));
    assert!(
        !page.contains("https://") && !page.contains("http://"),
        "no external assets"
    );
    pool.close().await;
    for s in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{s}", path.display()));
    }
}
