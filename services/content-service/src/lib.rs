//! Content Service: stores essay files and texts once and hands them out by storage id, so
//! events carry 32-character ids instead of whole essays.
//!
//! | HTTP | answer |
//! |---|---|
//! | `POST /v1/content` (raw body; `Content-Type` kept) | `201 {"storage_id": "<32 hex>"}`; `400` for an empty body; `413` above [`MAX_CONTENT_BYTES`] |
//! | `GET /v1/content/{storage_id}` | `200` with the bytes and their content type; `400` for an id that is not 32 hex digits; `404` for an unknown one |
//!
//! The routes, bodies and status codes are the original Content Service's, so its clients work
//! unchanged. What this one adds is the life cycle of *provisional* content: a writer that
//! stores content before its own transaction commits sends
//! [`essay_common::content::PROVISIONAL_HEADER`]; the content counts as kept once an event
//! that names it (`essay.content.provisioned`, `essay.validation.failed`,
//! `essay.spellcheck.results`) arrives here, and [`sweep`] deletes provisional content that no
//! event named within the grace period: the leftovers of transactions that rolled back.
//! Content stored without the header (the original's clients) is never swept.

mod routes;
pub mod sweep;
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use essay_common::content::StorageId;
use essay_common::util::now_ms;
use essay_common::{topics, Envelope, Service, Shutdown};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use uuid::Uuid;

pub use sweep::SweepPolicy;

pub const NAME: &str = "content_service";

/// Largest content accepted in one request.
pub const MAX_CONTENT_BYTES: usize = 32 * 1024 * 1024;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stored_content (
    content_id TEXT PRIMARY KEY,
    content_data BYTEA NOT NULL,
    content_size BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    correlation_id TEXT,
    provisional BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS stored_content_provisional ON stored_content (provisional, created_at);
";

/// The topics whose events name content this service keeps for good.
pub const CONFIRMING: &[&str] = &[
    topics::CONTENT_PROVISIONED,
    topics::VALIDATION_FAILED,
    topics::SPELLCHECK_RESULTS,
];

/// Stored content as it is read back.
#[derive(Clone, Debug, PartialEq)]
pub struct Content {
    pub bytes: Vec<u8>,
    pub content_type: String,
}

pub struct ContentService {
    db: ServiceDb,
    sweep: SweepPolicy,
}

impl ContentService {
    pub async fn open(db: ServiceDb, sweep: SweepPolicy) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        Ok(Self { db, sweep })
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// Stores `bytes` under a new id.
    pub async fn save(
        &self,
        bytes: &[u8],
        content_type: &str,
        correlation_id: Option<Uuid>,
        provisional: bool,
    ) -> Result<StorageId, DbError> {
        let id = StorageId::new();
        self.db
            .execute(
                "INSERT INTO stored_content (content_id, content_data, content_size, content_type,
                                             correlation_id, provisional, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                params![
                    id.as_str(),
                    bytes,
                    bytes.len(),
                    content_type,
                    correlation_id.map(|c| c.to_string()),
                    provisional,
                    now_ms()
                ],
            )
            .await?;
        Ok(id)
    }

    /// The content stored under `id`, if any.
    pub async fn load(&self, id: &StorageId) -> Result<Option<Content>, DbError> {
        // Ids are compared in lowercase: the original accepts either case in a request.
        let Some(row) = self
            .db
            .fetch_optional(
                "SELECT content_data, content_type FROM stored_content WHERE content_id = $1",
                params![id.as_str().to_ascii_lowercase()],
            )
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(Content {
            bytes: row.bytes("content_data")?,
            content_type: row.text("content_type")?,
        }))
    }

    /// How much content is stored, and how much of it is still provisional.
    pub async fn counts(&self) -> Result<(i64, i64), DbError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT COUNT(*) AS n, COUNT(CASE WHEN provisional = 1 THEN 1 END) AS p FROM stored_content",
                &[],
            )
            .await?
            .expect("an aggregate returns a row");
        Ok((row.int("n")?, row.int("p")?))
    }
}

#[async_trait]
impl Service for ContentService {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        CONFIRMING
    }

    /// Keeps for good every content the event names (a `*storage_id` field of its payload).
    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let Some(fields) = env.data.as_object() else {
            return Err(HandlerError::poison(format!(
                "{} payload is not an object",
                env.event_type
            )));
        };
        for (field, value) in fields {
            let Some(id) = value.as_str().filter(|_| field.ends_with("storage_id")) else {
                continue;
            };
            // Ids this service never issued (another store's, a malformed one) name nothing
            // here: nothing to keep.
            if let Ok(id) = StorageId::parse(id) {
                tx.execute(
                    "UPDATE stored_content SET provisional = 0
                     WHERE content_id = $1 AND provisional = 1",
                    params![id.as_str().to_ascii_lowercase()],
                )
                .await?;
            }
        }
        Ok(())
    }

    fn router(self: Arc<Self>) -> Option<Router> {
        Some(routes::router(self))
    }

    async fn background(self: Arc<Self>, shutdown: Shutdown) {
        let every =
            (self.sweep.grace / 8).clamp(Duration::from_millis(100), Duration::from_secs(600));
        let mut stop = std::pin::pin!(shutdown.wait());
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(every) => {
                    match sweep::sweep(&self.db, self.sweep).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(swept = n, "deleted provisional content no event named"),
                        Err(e) => tracing::warn!(error = %e, "content sweep failed; next round retries"),
                    }
                }
            }
        }
    }
}
