//! The upload API with real files: a .docx written by a zip library, a .pdf written by a PDF
//! library, plain text, and hostile requests that must change nothing.

use std::io::Write;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use batch_orchestrator::testing::LocalBatchOrchestrator;
use content_service::testing::LocalContentService;
use essay_common::content::StorageId;
use essay_common::identity::Caller;
use file_service::batches::BatchClient;
use file_service::{FileService, MAX_FILE_BYTES};
use outbox::portable::ServiceDb;
use tower::ServiceExt;

const ESSAY: &str =
    "Homework has been part of schooling for generations, but its value is increasingly \
questioned. Research suggests that moderate homework benefits older students, particularly when it \
reinforces skills practiced in class & in groups.";

fn docx(paragraphs: &[&str]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default();
    zip.start_file("[Content_Types].xml", opts).unwrap();
    zip.write_all(br#"<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"/>"#).unwrap();
    zip.start_file("word/document.xml", opts).unwrap();
    let body: String = paragraphs
        .iter()
        .map(|p| {
            format!(
                "<w:p><w:r><w:t>{}</w:t></w:r></w:p>",
                p.replace('&', "&amp;")
            )
        })
        .collect();
    write!(zip, r#"<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body>{body}</w:body></w:document>"#).unwrap();
    zip.finish().unwrap();
    buf.into_inner()
}

fn pdf(lines: &[&str]) -> Vec<u8> {
    use lopdf::content::{Content, Operation};
    use lopdf::{dictionary, Document, Object, Stream};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(
        dictionary! {"Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica"},
    );
    let resources_id = doc.add_object(dictionary! {"Font" => dictionary! {"F1" => font_id}});
    let mut ops = vec![
        Operation::new("BT", vec![]),
        Operation::new("Tf", vec!["F1".into(), 11.into()]),
        Operation::new("Td", vec![50.into(), 780.into()]),
    ];
    for line in lines {
        ops.push(Operation::new("Tj", vec![Object::string_literal(*line)]));
        ops.push(Operation::new("Td", vec![0.into(), (-14).into()]));
    }
    ops.push(Operation::new("ET", vec![]));
    let content_id = doc.add_object(Stream::new(
        dictionary! {},
        Content { operations: ops }.encode().unwrap(),
    ));
    let page_id = doc
        .add_object(dictionary! {"Type" => "Page", "Parent" => pages_id, "Contents" => content_id});
    doc.objects.insert(pages_id, Object::Dictionary(dictionary! {
        "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
        "Resources" => resources_id, "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()]}));
    let catalog_id = doc.add_object(dictionary! {"Type" => "Catalog", "Pages" => pages_id});
    doc.trailer.set("Root", catalog_id);
    let mut out = Vec::new();
    doc.save_to(&mut out).unwrap();
    out
}

fn multipart(files: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, bytes) in files {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A File Service with its Content Service and Batch Orchestrator (both real, over HTTP), and
/// a batch of [`TEACHER`]'s to upload to.
struct Files {
    svc: Arc<FileService>,
    batch: String,
    bos: LocalBatchOrchestrator,
}

const TEACHER: &str = "teacher-1";

fn teacher() -> Caller {
    Caller(TEACHER.into())
}

async fn service_with_content() -> (Files, ServiceDb, std::path::PathBuf, LocalContentService) {
    let dir = std::env::temp_dir().join(format!(
        "file-service-test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let db = ServiceDb::open(
        &format!("sqlite://{}/files.db", dir.display()),
        "file_service",
    )
    .await
    .unwrap();
    let content = LocalContentService::start(&dir).await;
    let bos = LocalBatchOrchestrator::start(&dir).await;
    let batch = bos
        .service
        .register(
            &teacher(),
            serde_json::from_value(
                serde_json::json!({"course_code": "ENG5", "expected_essay_count": 10}),
            )
            .unwrap(),
        )
        .await
        .unwrap()
        .batch_id;
    let batches = BatchClient::new(&bos.url(), essay_common::http::Policy::default()).unwrap();
    let svc = Arc::new(
        FileService::open(db.clone(), content.client(), batches)
            .await
            .unwrap(),
    );
    (Files { svc, batch, bos }, db, dir, content)
}

async fn post(files: &Files, content_type: &str, body: Vec<u8>) -> (StatusCode, serde_json::Value) {
    send_as(files, &files.batch, Some(TEACHER), content_type, body).await
}

async fn send_as(
    files: &Files,
    batch: &str,
    user: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::post(format!("/v1/files/batch/{batch}"))
        .header(header::CONTENT_TYPE, content_type);
    if let Some(user) = user {
        req = req.header("x-user-id", user);
    }
    let req = req.body(Body::from(body)).unwrap();
    let resp = file_service::router(files.svc.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

async fn rows(db: &ServiceDb, table: &str) -> i64 {
    db.fetch_optional(&format!("SELECT COUNT(*) AS n FROM {table}"), &[])
        .await
        .unwrap()
        .unwrap()
        .int("n")
        .unwrap()
}

/// A split point between words (paragraphs and PDF lines break there).
fn cut(before: &str) -> usize {
    ESSAY.find(before).unwrap()
}

#[tokio::test]
async fn txt_docx_and_pdf_are_extracted_and_bad_files_reported() {
    let (svc, db, dir, content) = service_with_content().await;
    let sent: Vec<(&str, Vec<u8>)> = vec![
        ("a.txt", ESSAY.as_bytes().to_vec()),
        (
            "b.docx",
            docx(&[&ESSAY[..cut(" Research")], &ESSAY[cut(" Research")..]]),
        ),
        (
            "c.pdf",
            pdf(&[&ESSAY[..cut(" moderate")], &ESSAY[cut(" moderate")..]]),
        ),
        ("d.exe", b"MZ\x90\x00".to_vec()),
        ("e.txt", b"too short".to_vec()),
        ("f.pdf", b"%PDF-1.7 this is not really a pdf".to_vec()),
        ("g.txt", b"  \n \t ".to_vec()),
    ];
    let (ct, body) = multipart(&sent);
    let (status, reply) = post(&svc, &ct, body).await;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    let files = reply["files"].as_array().unwrap();
    let outcome = |i: usize| {
        (
            files[i]["status"].as_str().unwrap(),
            files[i]["error_code"].as_str(),
        )
    };
    assert_eq!(outcome(0), ("PROVISIONED", None));
    assert_eq!(outcome(1), ("PROVISIONED", None), "{}", files[1]);
    assert_eq!(outcome(2), ("PROVISIONED", None), "{}", files[2]);
    assert_eq!(
        outcome(3),
        ("VALIDATION_FAILED", Some("UNSUPPORTED_FILE_TYPE"))
    );
    assert_eq!(outcome(4), ("VALIDATION_FAILED", Some("CONTENT_TOO_SHORT")));
    assert_eq!(
        outcome(5),
        ("VALIDATION_FAILED", Some("TEXT_EXTRACTION_FAILED"))
    );
    assert_eq!(outcome(6), ("VALIDATION_FAILED", Some("EMPTY_CONTENT")));
    // The extracted text is the essay's words, from every format, stored in the Content
    // Service; the raw file is stored byte for byte, failed ones too.
    for (i, file) in files.iter().enumerate() {
        let id = file["file_upload_id"].as_str().unwrap();
        let row = db
            .fetch_optional(
                "SELECT raw_file_storage_id, text_storage_id FROM files WHERE file_upload_id = $1",
                outbox::portable::params![id],
            )
            .await
            .unwrap()
            .unwrap();
        match row.opt_text("raw_file_storage_id").unwrap() {
            Some(raw) => {
                let raw = StorageId::parse(&raw).unwrap();
                let stored = content.service.load(&raw).await.unwrap().unwrap();
                assert_eq!(stored.bytes, sent[i].1, "file {i} stored as sent");
            }
            None => assert!(
                sent[i].1.is_empty(),
                "only an empty file has no raw content"
            ),
        }
        let Some(text_id) = row.opt_text("text_storage_id").unwrap() else {
            assert!(i >= 3, "file {i} has text");
            continue;
        };
        let text = content.client().fetch_text(&text_id).await.unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            words,
            ESSAY.split_whitespace().collect::<Vec<_>>(),
            "file {i}: {text}"
        );
    }
    assert_eq!(rows(&db, "files").await, 7);
    assert_eq!(
        rows(&db, "event_outbox").await,
        14,
        "file added + outcome per file"
    );
    // Events carry storage ids, never the text.
    let events = db
        .fetch_all("SELECT payload FROM event_outbox", &[])
        .await
        .unwrap();
    for e in &events {
        let payload = String::from_utf8(e.bytes("payload").unwrap()).unwrap();
        assert!(!payload.contains("Homework"), "{payload}");
    }
    assert_eq!(
        content.service.counts().await.unwrap(),
        (10, 10),
        "7 raw files and 3 texts, provisional until the Content Service sees their events"
    );
    content.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn without_the_content_service_an_upload_is_503_and_writes_nothing() {
    let (svc, db, dir, content) = service_with_content().await;
    content.stop().await;
    let (ct, body) = multipart(&[("a.txt", ESSAY.as_bytes().to_vec())]);
    let (status, reply) = post(&svc, &ct, body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("Content Service") && error.contains("send the upload again"),
        "{error}"
    );
    assert_eq!(rows(&db, "files").await, 0);
    assert_eq!(rows(&db, "event_outbox").await, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn malformed_or_oversized_uploads_are_4xx_and_write_nothing() {
    let (svc, db, dir, _content) = service_with_content().await;
    let (ct, mut body) = multipart(&[("a.txt", ESSAY.as_bytes().to_vec())]);
    // Cut off before the closing boundary.
    body.truncate(body.len() - 30);
    let (status, reply) = post(&svc, &ct, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("malformed"),
        "{reply}"
    );

    let (status, _) = post(&svc, "application/json", b"{\"files\": []}".to_vec()).await;
    assert!(status.is_client_error(), "wrong content type: {status}");

    let (ct, body) = multipart(&[
        ("a.txt", ESSAY.as_bytes().to_vec()),
        ("big.txt", vec![b'a'; MAX_FILE_BYTES + 1]),
    ]);
    let (status, reply) = post(&svc, &ct, body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reply}");

    let (ct, body) = multipart(&[]);
    let (status, _) = post(&svc, &ct, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no files");

    let (ct, body) = multipart(&[
        ("a.txt", ESSAY.as_bytes().to_vec()),
        ("empty.txt", Vec::new()),
    ]);
    let (status, reply) = post(&svc, &ct, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("empty.txt is empty"),
        "{reply}"
    );

    let req = Request::post("/v1/files/batch/not-a-uuid")
        .header(header::CONTENT_TYPE, ct)
        .header("x-user-id", TEACHER)
        .body(Body::empty())
        .unwrap();
    let resp = file_service::router(svc.svc.clone())
        .oneshot(req)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    assert_eq!(rows(&db, "files").await, 0, "nothing half-written");
    assert_eq!(rows(&db, "event_outbox").await, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn removing_a_file_announces_it_once() {
    let (svc, db, dir, _content) = service_with_content().await;
    let files = svc
        .svc
        .upload(
            &teacher(),
            &svc.batch,
            uuid::Uuid::new_v4(),
            vec![file_service::UploadedFile {
                filename: "a.txt".into(),
                bytes: ESSAY.as_bytes().to_vec(),
            }],
        )
        .await
        .unwrap();
    let id = &files[0].file_upload_id;
    let other = Caller("teacher-2".into());
    let refused = svc.svc.remove(&other, id).await.unwrap_err();
    assert_eq!(refused.0, StatusCode::FORBIDDEN, "{}", refused.1);
    assert!(svc.svc.remove(&teacher(), id).await.unwrap());
    assert!(
        !svc.svc.remove(&teacher(), id).await.unwrap(),
        "second removal is a no-op"
    );
    let removed = db
        .fetch_all(
            "SELECT topic FROM event_outbox WHERE topic = $1",
            outbox::portable::params![essay_common::topics::FILE_REMOVED],
        )
        .await
        .unwrap();
    assert_eq!(removed.len(), 1);
    assert!(
        svc.svc
            .remove(&teacher(), &uuid::Uuid::new_v4().to_string())
            .await
            .is_err(),
        "unknown file: 404"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Files go only to a batch that exists and is the caller's; a refused upload writes and
/// stores nothing, and an unreachable Batch Orchestrator is an outage (503), not a yes.
#[tokio::test]
async fn uploads_need_the_callers_own_existing_batch() {
    let (files, db, dir, content) = service_with_content().await;
    let (ct, body) = multipart(&[("a.txt", ESSAY.as_bytes().to_vec())]);
    let stored_before = content.service.counts().await.unwrap().0;

    let (status, reply) = send_as(&files, &files.batch, None, &ct, body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reply}");
    let (status, reply) = send_as(&files, &files.batch, Some("teacher-2"), &ct, body.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{reply}");
    let unknown = uuid::Uuid::new_v4().to_string();
    let (status, reply) = send_as(&files, &unknown, Some(TEACHER), &ct, body.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("register it first"),
        "{reply}"
    );

    assert_eq!(
        rows(&db, "files").await,
        0,
        "nothing written for a refused upload"
    );
    assert_eq!(rows(&db, "event_outbox").await, 0);
    assert_eq!(
        content.service.counts().await.unwrap().0,
        stored_before,
        "nothing stored"
    );

    let (status, reply) = post(&files, &ct, body.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{reply}");

    let Files { svc, batch, bos } = files;
    bos.stop().await;
    let down = Files {
        svc,
        batch: batch.clone(),
        bos: LocalBatchOrchestrator::start(&dir.join("other")).await,
    };
    let (status, reply) = send_as(&down, &batch, Some(TEACHER), &ct, body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    assert_eq!(rows(&db, "files").await, 1, "only the accepted upload");
    let _ = std::fs::remove_dir_all(dir);
}
