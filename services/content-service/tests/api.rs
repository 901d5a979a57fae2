//! The Content Service over real HTTP, on SQLite and on PostgreSQL: the original's routes,
//! bodies and status codes; provisional content kept once an event names it and swept
//! otherwise.

use std::time::Duration;

use content_service::testing::LocalContentService;
use content_service::{sweep, SweepPolicy};
use essay_common::content::{StorageId, PROVISIONAL_HEADER};
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::ServiceDb;
use serde_json::{json, Value};

async fn on_sqlite() -> (LocalContentService, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("content-api-{}", uuid::Uuid::new_v4().simple()));
    (LocalContentService::start(&dir).await, dir)
}

async fn on_postgres() -> (LocalContentService, String) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!(
        "t{}_content",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let db = ServiceDb::open(&url, &schema).await.expect("PostgreSQL");
    (LocalContentService::start_on(db).await, schema)
}

async fn drop_schema(schema: &str) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let bytes = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Every answer of the API, as the original gives it.
async fn speaks_the_originals_api(content: &LocalContentService) {
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1/content", content.addr);

    let (status, body) = json_of(http.post(&base).send().await.unwrap()).await;
    assert_eq!(
        (status, body),
        (400, json!({"error": "No data provided in request body."}))
    );

    // Any bytes, kept exactly, with their content type.
    let blob: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let (status, body) = json_of(
        http.post(&base)
            .header("content-type", "application/pdf")
            .body(blob.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["storage_id"].as_str().unwrap().to_owned();
    assert!(StorageId::parse(&id).is_ok() && id.len() == 32, "{id}");
    let r = http.get(format!("{base}/{id}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/pdf");
    assert_eq!(r.bytes().await.unwrap().to_vec(), blob);
    // The original accepts either case of hex digits.
    let r = http
        .get(format!("{base}/{}", id.to_uppercase()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    for bad in ["not-hex-at-all", "0123", &format!("{id}0")] {
        let (status, body) = json_of(http.get(format!("{base}/{bad}")).send().await.unwrap()).await;
        assert_eq!(
            (status, body),
            (400, json!({"error": "Invalid content ID format."})),
            "{bad}"
        );
    }
    let unknown = StorageId::new();
    let (status, body) = json_of(http.get(format!("{base}/{unknown}")).send().await.unwrap()).await;
    assert_eq!(
        (status, body),
        (404, json!({"error": "Content not found."}))
    );

    let too_big = vec![b'a'; content_service::MAX_CONTENT_BYTES + 1];
    let r = http.post(&base).body(too_big).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(
        content.service.counts().await.unwrap(),
        (1, 0),
        "nothing else was stored"
    );
}

/// Provisional content named by an event stays; unnamed provisional content goes after the
/// grace period; content stored without the header is never swept.
async fn keeps_what_events_name_and_sweeps_the_rest(content: &LocalContentService) {
    let client = content.client();
    let correlation = uuid::Uuid::new_v4();
    let named = client
        .store(b"an essay".to_vec(), "text/plain", correlation)
        .await
        .unwrap();
    let orphan = client
        .store(b"rolled back".to_vec(), "text/plain", correlation)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let (_, permanent) = json_of(
        http.post(format!("http://{}/v1/content", content.addr))
            .body("an original client's upload")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let permanent = permanent["storage_id"].as_str().unwrap().to_owned();
    let (total, provisional) = content.service.counts().await.unwrap();
    assert_eq!(provisional, 2);

    let event = EventFactory::new("file_service")
        .event(
            topics::CONTENT_PROVISIONED,
            ("file_upload", "f-1"),
            correlation,
            &json!({"batch_id": "b-1", "file_upload_id": "f-1", "text_storage_id": named.as_str(),
                    "raw_file_storage_id": "not-an-id-of-ours"}),
        )
        .unwrap();
    let env: Envelope = serde_json::from_slice(event.payload()).unwrap();
    let db = content.service.db();
    let mut tx = db.begin().await.unwrap();
    content.service.handle(&mut tx, &env).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(content.service.counts().await.unwrap(), (total, 1));

    let long = SweepPolicy {
        grace: Duration::from_secs(3600),
    };
    assert_eq!(
        sweep::sweep(db, long).await.unwrap(),
        0,
        "within the grace period"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let short = SweepPolicy {
        grace: Duration::from_millis(10),
    };
    assert_eq!(sweep::sweep(db, short).await.unwrap(), 1);
    assert_eq!(content.service.counts().await.unwrap(), (total - 1, 0));
    assert!(client.fetch(orphan.as_str()).await.is_err());
    assert_eq!(client.fetch_text(named.as_str()).await.unwrap(), "an essay");
    assert_eq!(
        client.fetch_text(&permanent).await.unwrap(),
        "an original client's upload"
    );
    // The header is what marks content provisional.
    assert_eq!(PROVISIONAL_HEADER, "x-content-provisional");
}

#[tokio::test]
async fn sqlite_content_service() {
    let (content, dir) = on_sqlite().await;
    speaks_the_originals_api(&content).await;
    keeps_what_events_name_and_sweeps_the_rest(&content).await;
    content.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn postgres_content_service() {
    let (content, schema) = on_postgres().await;
    speaks_the_originals_api(&content).await;
    keeps_what_events_name_and_sweeps_the_rest(&content).await;
    content.stop().await;
    drop_schema(&schema).await;
}
