//! File Service: accepts essay files for a batch, extracts and validates their text, and
//! announces each file. A whole upload request is one transaction: every file row and every
//! event of the request commit together, or nothing does.
//!
//! | HTTP (caller in `X-User-ID`) | effect |
//! |---|---|
//! | `POST /v1/files/batch/{batch_id}` (multipart, one part per file) | batch owner, batch not locked: per file `file.batch.file.added` + `essay.content.provisioned` or `essay.validation.failed` |
//! | `DELETE /v1/files/{file_upload_id}` | file owner, batch not locked: `file.batch.file.removed` |
//! | `GET /v1/files/{file_upload_id}/content` | file owner: the extracted text |
//!
//! Before anything is read or stored, Batch Orchestrator is asked whether the batch exists,
//! is the caller's and has not started processing ([`batches`]); otherwise 404, 403 or 409
//! with the reason, and nothing is written or published.
//!
//! Files of the wrong type, unreadable, empty, too short or too long are *accepted* and
//! reported as `essay.validation.failed` (the batch needs to know); a malformed or oversized
//! request is rejected with a 4xx and writes nothing.
//!
//! The raw file and its extracted text go to the Content Service before the transaction
//! begins; rows and events carry their storage ids (`raw_file_storage_id`,
//! `text_storage_id`), never the text. A Content Service that does not answer fails the
//! request with 503 before anything is written here; content stored for a request whose
//! transaction then fails stays provisional and is swept (see `content_service::sweep`).

pub mod batches;
pub mod extract;

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use batches::BatchClient;
use essay_common::content::{ContentClient, ContentError, StorageId};
use essay_common::identity::Caller;
use essay_common::util::{now_ms, parse_uuid, utc_timestamp, ApiError};
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

pub const NAME: &str = "file_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

/// Largest accepted request (all files together).
pub const MAX_UPLOAD_BYTES: usize = 20 * 1024 * 1024;
/// Largest accepted single file.
pub const MAX_FILE_BYTES: usize = 5 * 1024 * 1024;
pub const MAX_FILES_PER_UPLOAD: usize = 200;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    file_upload_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    filename TEXT NOT NULL,
    status TEXT NOT NULL,
    error_code TEXT,
    raw_file_storage_id TEXT,
    text_storage_id TEXT,
    size_bytes BIGINT NOT NULL,
    correlation_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_batch ON files (batch_id);
";

#[derive(Clone)]
pub struct FileService {
    db: ServiceDb,
    content: ContentClient,
    batches: BatchClient,
}

/// How many files of one request are sent to the Content Service at once.
const CONTENT_CONCURRENCY: usize = 8;

/// One file as the client sent it.
#[derive(Clone, Debug)]
pub struct UploadedFile {
    pub filename: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Serialize)]
pub struct FileOutcome {
    pub file_upload_id: String,
    pub filename: String,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl FileService {
    pub async fn open(
        db: ServiceDb,
        content: ContentClient,
        batches: BatchClient,
    ) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        // Added after the first release: a database made by it gains the column.
        db.add_column("files", "user_id", "TEXT").await?;
        Ok(Self {
            db,
            content,
            batches,
        })
    }

    /// Stores a file's raw bytes (unless it is empty: the Content Service refuses nothing)
    /// and, when it has one, its text; their storage ids.
    async fn store_content(
        &self,
        file: &UploadedFile,
        text: Option<&str>,
        correlation_id: Uuid,
    ) -> Result<(Option<StorageId>, Option<StorageId>), ContentError> {
        let raw = if file.bytes.is_empty() {
            None
        } else {
            Some(
                self.content
                    .store(
                        file.bytes.clone(),
                        raw_content_type(&file.filename),
                        correlation_id,
                    )
                    .await?,
            )
        };
        let text = match text {
            Some(t) => Some(
                self.content
                    .store(
                        t.as_bytes().to_vec(),
                        "text/plain; charset=utf-8",
                        correlation_id,
                    )
                    .await?,
            ),
            None => None,
        };
        Ok((raw, text))
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// Checks that `caller` may add files to the batch, extracts every file, then records
    /// all of them and their events in one transaction.
    pub async fn upload(
        &self,
        caller: &Caller,
        batch_id: &str,
        correlation_id: Uuid,
        files: Vec<UploadedFile>,
    ) -> Result<Vec<FileOutcome>, ApiError> {
        self.batches.may_change_files(caller, batch_id).await?;
        // Extraction is CPU work (PDF parsing); keep it off the async workers.
        let extracted = tokio::task::spawn_blocking(move || {
            files
                .into_iter()
                .map(|f| {
                    let text = extract::essay_text(&f.filename, &f.bytes);
                    (f, text)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("extraction: {e}"),
            )
        })?;

        // Content first, outside the transaction: a slow Content Service holds no lock here.
        use futures::stream::{self, StreamExt, TryStreamExt};
        // Each file moves through the stream and comes back with its ids (a stream borrowing
        // `extracted` would not be `Send` for axum).
        let stored: Vec<_> = stream::iter(extracted)
            .map(|(file, text)| {
                let this = self.clone();
                async move {
                    let ids = this
                        .store_content(&file, text.as_deref().ok(), correlation_id)
                        .await?;
                    Ok::<_, ContentError>((file, text, ids))
                }
            })
            .buffered(CONTENT_CONCURRENCY)
            .try_collect()
            .await
            .map_err(|e| match e {
                ContentError::Unavailable { .. } => ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{e}; nothing was accepted, send the upload again"),
                ),
                other => ApiError(
                    StatusCode::BAD_GATEWAY,
                    format!("{other}; nothing was accepted"),
                ),
            })?;

        let mut tx = self.db.begin().await?;
        let mut outcomes = Vec::with_capacity(stored.len());
        for (file, text, (raw_id, text_id)) in stored {
            let file_upload_id = Uuid::new_v4().to_string();
            let (status, error_code, reason) = match &text {
                Ok(_) => ("PROVISIONED", None, None),
                Err(e) => (
                    "VALIDATION_FAILED",
                    Some(e.error_code()),
                    Some(e.to_string()),
                ),
            };
            tx.execute(
                "INSERT INTO files (file_upload_id, batch_id, filename, status, error_code,
                                    raw_file_storage_id, text_storage_id, size_bytes,
                                    correlation_id, created_at, user_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                params![
                    &file_upload_id,
                    batch_id,
                    &file.filename,
                    status,
                    error_code,
                    raw_id.as_ref().map(|r| r.to_string()),
                    text_id.as_ref().map(|t| t.to_string()),
                    file.bytes.len(),
                    correlation_id.to_string(),
                    now_ms(),
                    caller.user_id()
                ],
            )
            .await?;
            let now = utc_timestamp();
            let added = EVENTS.event(
                topics::FILE_ADDED,
                ("batch", batch_id),
                correlation_id,
                &json!({"event": "batch.file.added", "batch_id": batch_id,
                        "file_upload_id": file_upload_id, "filename": file.filename,
                        "user_id": caller.user_id(), "correlation_id": correlation_id,
                        "timestamp": now}),
            )?;
            tx.enqueue(&added).await?;
            // The original's models: the batch is `entity_id` (`batch_id` is this platform's
            // extra), the raw file's storage id is always there.
            let raw_file_storage_id = raw_id
                .as_ref()
                .map(StorageId::as_str)
                .ok_or_else(|| ApiError::bad_request(format!("{} is empty", file.filename)))?;
            let outcome = match (&text, &text_id) {
                (Ok(t), Some(text_id)) => EVENTS.event(
                    topics::CONTENT_PROVISIONED,
                    ("file_upload", &file_upload_id),
                    correlation_id,
                    &json!({"event": "essay.content.provisioned", "entity_id": batch_id,
                            "batch_id": batch_id, "file_upload_id": file_upload_id,
                            "original_file_name": file.filename,
                            "raw_file_storage_id": raw_file_storage_id,
                            "text_storage_id": text_id.as_str(),
                            "file_size_bytes": file.bytes.len(),
                            "correlation_id": correlation_id, "timestamp": now,
                            "word_count": t.split_whitespace().count()}),
                )?,
                (Err(e), _) => EVENTS.event(
                    topics::VALIDATION_FAILED,
                    ("file_upload", &file_upload_id),
                    correlation_id,
                    &json!({"event": "essay.validation.failed", "entity_id": batch_id,
                            "batch_id": batch_id, "file_upload_id": file_upload_id,
                            "original_file_name": file.filename,
                            "raw_file_storage_id": raw_file_storage_id,
                            "validation_error_code": e.wire_code(),
                            "validation_error_detail": {
                                "error_code": e.wire_code(), "message": e.to_string(),
                                "correlation_id": correlation_id, "timestamp": now,
                                "service": NAME, "operation": e.operation(),
                                "details": {"file_name": file.filename, "reason": e.error_code()},
                                "stack_trace": null, "trace_id": null, "span_id": null},
                            "validation_error_message": e.to_string(),
                            "file_size_bytes": file.bytes.len(),
                            "correlation_id": correlation_id, "timestamp": now}),
                )?,
                (Ok(_), None) => unreachable!("valid text is always stored"),
            };
            tx.enqueue(&outcome).await?;
            outcomes.push(FileOutcome {
                file_upload_id,
                filename: file.filename,
                status,
                error_code,
                reason,
            });
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// The owner and batch of a file; 404 if there is none.
    async fn file_of(&self, file_upload_id: &str) -> Result<(Option<String>, String), ApiError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT user_id, batch_id FROM files WHERE file_upload_id = $1",
                params![file_upload_id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no file {file_upload_id}")))?;
        Ok((row.opt_text("user_id")?, row.text("batch_id")?))
    }

    /// Marks a file removed and announces it (owner only, while its batch is not locked);
    /// removing twice is a no-op.
    pub async fn remove(&self, caller: &Caller, file_upload_id: &str) -> Result<bool, ApiError> {
        let (owner, batch_id) = self.file_of(file_upload_id).await?;
        caller.must_own(owner.as_deref(), &format!("file {file_upload_id}"))?;
        self.batches.may_change_files(caller, &batch_id).await?;
        let mut tx = self.db.begin().await?;
        let Some(row) = tx
            .fetch_optional(
                "UPDATE files SET status = 'REMOVED' WHERE file_upload_id = $1 AND status <> 'REMOVED'
                 RETURNING batch_id, filename, correlation_id",
                params![file_upload_id],
            )
            .await?
        else {
            let exists = tx
                .fetch_optional("SELECT 1 AS one FROM files WHERE file_upload_id = $1", params![file_upload_id])
                .await?
                .is_some();
            return if exists { Ok(false) } else { Err(ApiError::not_found(format!("no file {file_upload_id}"))) };
        };
        let batch_id = row.text("batch_id")?;
        let correlation = Uuid::parse_str(&row.text("correlation_id")?).unwrap_or_default();
        let event = EVENTS.event(
            topics::FILE_REMOVED,
            ("batch", &batch_id),
            correlation,
            &json!({"event": "batch.file.removed", "batch_id": batch_id,
                    "file_upload_id": file_upload_id, "filename": row.text("filename")?,
                    "user_id": caller.user_id(), "correlation_id": correlation,
                    "timestamp": utc_timestamp()}),
        )?;
        tx.enqueue(&event).await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[async_trait]
impl Service for FileService {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[]
    }

    async fn handle(&self, _tx: &mut Tx, _event: &Envelope) -> Result<(), HandlerError> {
        Ok(())
    }

    fn router(self: Arc<Self>) -> Option<Router> {
        Some(router(self))
    }
}

/// The HTTP API.
pub fn router(svc: Arc<FileService>) -> Router {
    Router::new()
        .route("/v1/files/batch/{batch_id}", post(upload))
        .route("/v1/files/{file_upload_id}", delete(remove))
        .route("/v1/files/{file_upload_id}/content", get(content))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .with_state(svc)
}

/// The flow's correlation id from `X-Correlation-ID`, or a new one.
fn correlation(headers: &HeaderMap) -> Result<Uuid, ApiError> {
    match headers.get("x-correlation-id") {
        Some(v) => parse_uuid(v.to_str().unwrap_or_default(), "X-Correlation-ID"),
        None => Ok(Uuid::new_v4()),
    }
}

async fn upload(
    State(svc): State<Arc<FileService>>,
    caller: Caller,
    Path(batch_id): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    parse_uuid(&batch_id, "batch id")?;
    let correlation_id = correlation(&headers)?;
    let mut multipart = multipart.map_err(|e| ApiError(e.status(), e.body_text()))?;
    // Read the whole request before writing anything: a broken request changes nothing.
    let mut files = Vec::new();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError(e.status(), format!("malformed upload: {}", e.body_text())))?
    {
        let Some(filename) = field.file_name().map(str::to_owned) else {
            return Err(ApiError::bad_request(
                "every part must be a file (with a filename)",
            ));
        };
        let bytes = field
            .bytes()
            .await
            .map_err(|e| ApiError(e.status(), format!("malformed upload: {}", e.body_text())))?;
        if bytes.is_empty() {
            // Nothing to store (the Content Service, like the original's, refuses an empty
            // body), so nothing to announce: the whole request is refused, nothing written.
            return Err(ApiError::bad_request(format!(
                "{filename} is empty (0 bytes); nothing was accepted, send it again without it"
            )));
        }
        if bytes.len() > MAX_FILE_BYTES {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{filename} is {} bytes; files may be at most {MAX_FILE_BYTES}",
                    bytes.len()
                ),
            ));
        }
        files.push(UploadedFile {
            filename,
            bytes: bytes.to_vec(),
        });
        if files.len() > MAX_FILES_PER_UPLOAD {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_FILES_PER_UPLOAD} files per upload"
            )));
        }
    }
    if files.is_empty() {
        return Err(ApiError::bad_request("the upload contains no files"));
    }
    let outcomes = svc
        .upload(&caller, &batch_id, correlation_id, files)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"batch_id": batch_id, "files": outcomes})),
    ))
}

async fn remove(
    State(svc): State<Arc<FileService>>,
    caller: Caller,
    Path(file_upload_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    parse_uuid(&file_upload_id, "file upload id")?;
    svc.remove(&caller, &file_upload_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn content(
    State(svc): State<Arc<FileService>>,
    caller: Caller,
    Path(file_upload_id): Path<String>,
) -> Result<String, ApiError> {
    parse_uuid(&file_upload_id, "file upload id")?;
    let (owner, _) = svc.file_of(&file_upload_id).await?;
    caller.must_own(owner.as_deref(), &format!("file {file_upload_id}"))?;
    let row = svc
        .db
        .fetch_optional(
            "SELECT text_storage_id FROM files WHERE file_upload_id = $1",
            params![&file_upload_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no file {file_upload_id}")))?;
    let id = row
        .opt_text("text_storage_id")?
        .ok_or_else(|| ApiError::not_found("the file has no text (it failed validation)"))?;
    svc.content.fetch_text(&id).await.map_err(|e| {
        let status = if e.is_unavailable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_GATEWAY
        };
        ApiError(status, e.to_string())
    })
}

/// The media type of a raw file, by its extension (what the Content Service hands back).
fn raw_content_type(filename: &str) -> &'static str {
    match extract::FileKind::of(filename) {
        Ok(extract::FileKind::Txt) => "text/plain",
        Ok(extract::FileKind::Docx) => {
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        }
        Ok(extract::FileKind::Pdf) => "application/pdf",
        Err(_) => "application/octet-stream",
    }
}
