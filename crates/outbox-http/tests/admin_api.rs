//! The admin API over real HTTP on a real SQLite outbox: auth, actions, hostile requests.

use std::net::SocketAddr;
use std::sync::Arc;

use outbox_core::{AggregateRef, NewEvent, Topic};
use outbox_http::AdminApi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "s3cret-token";

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let _ = conn.write_all(body).await;
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

async fn serve(api: AdminApi) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = api.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

#[tokio::test]
async fn mutations_need_the_token_and_bad_requests_change_nothing() {
    let path =
        std::env::temp_dir().join(format!("outbox-admin-{}.db", uuid::Uuid::new_v4().simple()));
    let pool = outbox_sqlite::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    outbox_sqlite::migrate(&pool).await.unwrap();
    let event = NewEvent::new(
        Topic::new("admin.api.v1").unwrap(),
        AggregateRef::new("b", "1").unwrap(),
        "{}",
    );
    let mut tx = outbox_sqlite::begin(&pool).await.unwrap();
    outbox_sqlite::SqliteOutbox::new(outbox_sqlite::SqliteDialect)
        .enqueue(&mut tx, &event)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("UPDATE event_outbox SET status = 'dead', last_error = 'boom', dead_at = 0")
        .execute(&pool)
        .await
        .unwrap();
    let dead_count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM event_outbox WHERE status = 'dead'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let store = Arc::new(outbox_sqlite::SqliteRelayStore::new(
        pool.clone(),
        outbox_sqlite::SqliteDialect,
    ));
    let addr = serve(AdminApi::new(
        store.clone(),
        store.clone(),
        Some(TOKEN.into()),
    ))
    .await;
    let json = "application/json";

    // Reads need the token (not configured as open).
    assert_eq!(
        call(addr, "GET", "/api/status", None, json, b"").await.0,
        401
    );
    let (code, body) = call(addr, "GET", "/api/status", Some(TOKEN), json, b"").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"dead\":1"), "{body}");
    let (code, body) = call(addr, "GET", "/api/dead?error=BOOM", Some(TOKEN), json, b"").await;
    assert_eq!(code, 200);
    assert!(body.contains(&event.event_id().to_string()), "{body}");
    assert_eq!(
        call(
            addr,
            "GET",
            "/api/events/not-a-uuid",
            Some(TOKEN),
            json,
            b""
        )
        .await
        .0,
        400
    );
    let id = event.event_id().to_string();
    assert_eq!(
        call(
            addr,
            "GET",
            &format!("/api/events/{id}"),
            Some(TOKEN),
            json,
            b""
        )
        .await
        .0,
        200
    );

    // Mutations: no token, wrong token, no filter, malformed JSON, unknown fields, wrong
    // content type, huge body: all refused, nothing changes.
    let requeue = br#"{"topic":"admin.api.v1"}"#;
    assert_eq!(
        call(addr, "POST", "/api/dead/requeue", None, json, requeue)
            .await
            .0,
        401
    );
    assert_eq!(
        call(
            addr,
            "POST",
            "/api/dead/requeue",
            Some("wrong"),
            json,
            requeue
        )
        .await
        .0,
        401
    );
    assert_eq!(
        call(addr, "POST", "/api/dead/requeue", Some(TOKEN), json, b"{}")
            .await
            .0,
        400
    );
    let malformed = call(
        addr,
        "POST",
        "/api/dead/requeue",
        Some(TOKEN),
        json,
        b"{not json",
    )
    .await
    .0;
    assert!((400..500).contains(&malformed), "{malformed}");
    let unknown = call(
        addr,
        "POST",
        "/api/dead/purge",
        Some(TOKEN),
        json,
        br#"{"topics":"x","all":true}"#,
    )
    .await
    .0;
    assert!((400..500).contains(&unknown), "{unknown}");
    assert_eq!(
        call(
            addr,
            "POST",
            "/api/dead/requeue",
            Some(TOKEN),
            "text/plain",
            requeue
        )
        .await
        .0,
        415
    );
    let huge = vec![b' '; 1_000_000];
    let big = call(addr, "POST", "/api/dead/requeue", Some(TOKEN), json, &huge)
        .await
        .0;
    assert_eq!(big, 413);
    assert_eq!(dead_count().await, 1, "refused calls changed nothing");

    let (code, body) = call(
        addr,
        "POST",
        "/api/dead/requeue",
        Some(TOKEN),
        json,
        requeue,
    )
    .await;
    assert_eq!((code, body.as_str()), (200, r#"{"requeued":1}"#));
    assert_eq!(dead_count().await, 0);

    // Without a configured token, mutations are off; open reads work.
    let open = serve(AdminApi::new(store.clone(), store, None).with_open_reads()).await;
    assert_eq!(
        call(open, "GET", "/api/status", None, json, b"").await.0,
        200
    );
    let (code, body) = call(
        open,
        "POST",
        "/api/dead/purge",
        None,
        json,
        br#"{"all":true}"#,
    )
    .await;
    assert_eq!(code, 403);
    assert!(body.contains("OUTBOX_ADMIN_TOKEN"), "{body}");
    pool.close().await;
    for s in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{s}", path.display()));
    }
}
