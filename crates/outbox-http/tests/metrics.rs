//! `/metrics` over real HTTP against a real PostgreSQL table: the gauges equal the table.

use std::time::Duration;

use outbox_core::testing::TestPublisher;
use outbox_core::{AggregateRef, NewEvent, OutboxMetrics, Relay, RelayConfig, Topic};
use outbox_http::MetricsEndpoint;
use outbox_postgres::testing::TestSchema;
use outbox_postgres::{PgOutbox, PgRelayStore};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn gauges_match_the_table_and_counters_follow_the_relay() {
    let db = TestSchema::create().await;
    let mut registry = Registry::default();
    let metrics = OutboxMetrics::register(&mut registry);
    let table = metrics.table("file_service", "event_outbox");
    let store = PgRelayStore::new(db.pool.clone(), &db.schema);
    let endpoint = MetricsEndpoint::new(registry).with_source(store.clone(), table.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, endpoint.router()).await });

    let outbox = PgOutbox::new(db.schema.clone()).with_metrics(table.clone());
    let topic = Topic::new("huleedu.test.v1").unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..12 {
        let agg = AggregateRef::new("batch", format!("b{i}")).unwrap();
        outbox
            .enqueue(
                &mut tx,
                &NewEvent::new(topic.clone(), agg, format!("{{\"i\":{i}}}")),
            )
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    sqlx::query(&format!(
        "UPDATE {} SET status = 'dead' WHERE seq IN (SELECT seq FROM {} ORDER BY seq LIMIT 3)",
        db.table("event_outbox"),
        db.table("event_outbox")
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let labels = r#"{service="file_service",table="event_outbox"}"#;
    let response = get(addr, "/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("text/plain; version=0.0.4"), "{response}");
    let (pending, dead): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead') FROM {}",
        db.table("event_outbox")
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((pending, dead), (9, 3));
    assert_eq!(
        sample(&response, &format!("outbox_pending_events{labels}")),
        9.0
    );
    assert_eq!(
        sample(&response, &format!("outbox_dead_events{labels}")),
        3.0
    );
    assert_eq!(
        sample(&response, &format!("outbox_events_enqueued_total{labels}")),
        12.0
    );
    let age = sample(
        &response,
        &format!("outbox_oldest_pending_age_seconds{labels}"),
    );
    assert!((0.1..60.0).contains(&age), "oldest age {age}");

    // Drain with a relay: the gauges follow the table down to zero pending.
    let publisher = TestPublisher::new();
    let config = RelayConfig {
        poll_min: Duration::from_millis(5),
        poll_max: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let relay = Relay::new(store, publisher.clone(), config).with_metrics(table);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        if publisher.delivered_count() == 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    running.await.unwrap();

    let response = get(addr, "/metrics").await;
    assert_eq!(
        sample(&response, &format!("outbox_pending_events{labels}")),
        0.0
    );
    assert_eq!(
        sample(&response, &format!("outbox_dead_events{labels}")),
        3.0
    );
    assert_eq!(
        sample(
            &response,
            &format!("outbox_oldest_pending_age_seconds{labels}")
        ),
        0.0
    );
    assert_eq!(
        sample(&response, &format!("outbox_events_published_total{labels}")),
        9.0
    );
    assert_eq!(
        sample(
            &response,
            &format!("outbox_commit_to_ack_seconds_count{labels}")
        ),
        9.0
    );
    assert!(get(addr, "/healthz").await.ends_with("ok\n"));
    db.drop().await;
}
