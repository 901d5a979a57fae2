//! The services' HTTP APIs given malformed JSON, wrong content types, huge bodies, bad ids and
//! invalid values: a 4xx with a JSON error, and nothing written.

mod common;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use common::*;
use essay_platform::Options;

fn raw(method: Method, uri: &str, content_type: &str, body: Vec<u8>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_and_change_nothing() {
    let (platform, dir) = embedded_platform("http", &Options::default()).await;
    let api = platform.gateway();
    let batch = uuid::Uuid::new_v4();
    let cases: Vec<(Request<Body>, &str)> = vec![
        (
            raw(
                Method::POST,
                "/v1/batches",
                "application/json",
                b"{not json".to_vec(),
            ),
            "malformed JSON",
        ),
        (
            raw(Method::POST, "/v1/batches", "text/plain", b"{}".to_vec()),
            "wrong content type",
        ),
        (
            raw(
                Method::POST,
                "/v1/batches",
                "application/json",
                br#"{"course_code": "X"}"#.to_vec(),
            ),
            "missing field",
        ),
        (
            raw(
                Method::POST,
                "/v1/batches",
                "application/json",
                br#"{"course_code": "X", "expected_essay_count": 0}"#.to_vec(),
            ),
            "zero essays",
        ),
        (
            raw(
                Method::POST,
                "/v1/batches",
                "application/json",
                br#"{"course_code": "X", "expected_essay_count": -3}"#.to_vec(),
            ),
            "negative count",
        ),
        (
            raw(
                Method::POST,
                "/v1/batches",
                "application/json",
                format!(
                    r#"{{"course_code": "{}", "expected_essay_count": 1}}"#,
                    "x".repeat(3 << 20)
                )
                .into_bytes(),
            ),
            "huge body",
        ),
        (
            raw(
                Method::POST,
                &format!("/v1/batches/{batch}/pipelines"),
                "application/json",
                br#"{"phases": ["astrology"]}"#.to_vec(),
            ),
            "unknown phase",
        ),
        (
            raw(
                Method::POST,
                &format!("/v1/batches/{batch}/pipelines"),
                "application/json",
                br#"{"phases": ["spellcheck"]}"#.to_vec(),
            ),
            "unknown batch",
        ),
        (
            raw(
                Method::POST,
                "/v1/batches/not-a-uuid/pipelines",
                "application/json",
                br#"{"phases": ["spellcheck"]}"#.to_vec(),
            ),
            "bad batch id",
        ),
        (
            raw(
                Method::POST,
                "/v1/classes",
                "application/json",
                br#"{"name": "", "course_code": "X"}"#.to_vec(),
            ),
            "empty class name",
        ),
        (
            raw(
                Method::POST,
                "/v1/classes",
                "application/json",
                b"[]".to_vec(),
            ),
            "JSON of the wrong shape",
        ),
        (
            raw(
                Method::POST,
                &format!("/v1/classes/{batch}/students"),
                "application/json",
                br#"{"first_name": "A", "last_name": "B"}"#.to_vec(),
            ),
            "unknown class",
        ),
        (
            raw(
                Method::POST,
                &format!("/v1/matches/{batch}/confirm"),
                "application/json",
                b"{}".to_vec(),
            ),
            "no match to confirm",
        ),
        (
            raw(
                Method::GET,
                &format!("/v1/batches/{batch}/results"),
                "application/json",
                Vec::new(),
            ),
            "unknown results",
        ),
        (
            raw(
                Method::GET,
                "/v1/batches/../../etc/passwd/results",
                "application/json",
                Vec::new(),
            ),
            "path games",
        ),
    ];
    for (request, what) in cases {
        let (status, body) = api.send(request).await.unwrap();
        assert!(status.is_client_error(), "{what}: {status} {body}");
        if status != StatusCode::NOT_FOUND || body.is_object() {
            assert!(
                body.get("error").is_some() || body.is_null() || body.is_string(),
                "{what}: {body}"
            );
        }
    }
    // Nothing was written anywhere: no rows, no events.
    for (service, db) in platform.databases() {
        let events = db
            .fetch_optional("SELECT COUNT(*) AS n FROM event_outbox", &[])
            .await
            .unwrap()
            .unwrap()
            .int("n")
            .unwrap();
        assert_eq!(events, 0, "{service} enqueued events for bad requests");
    }
    let (_, dbs) = platform
        .databases()
        .into_iter()
        .find(|(n, _)| *n == batch_orchestrator::NAME)
        .unwrap();
    let batches = dbs
        .fetch_optional("SELECT COUNT(*) AS n FROM batches", &[])
        .await
        .unwrap()
        .unwrap()
        .int("n")
        .unwrap();
    assert_eq!(batches, 0);
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
