//! Student matching: who wrote each essay of a REGULAR batch. On
//! `batch.student.matching.requested` it reads every essay's opening (from the Content
//! Service) and the class roster (from Class Management), finds names and email addresses
//! ([`extract`]), matches them against the roster with confidences ([`matcher`]) and publishes
//! `batch.author.matches.suggested`, one result per essay with up to three suggestions. Class
//! Management keeps the suggestions for the teacher to confirm or override, and confirms only
//! the confident ones on its own when the teacher does not answer in time.
//!
//! This is what the original's NLP service does in `features/student_matching`, with its
//! formats and confidences; fetching and matching run in `prepare`, outside the transaction.

pub mod extract;
pub mod matcher;
pub mod roster;
pub mod similarity;

use std::sync::Arc;

use async_trait::async_trait;
use essay_common::content::ContentClient;
use essay_common::prepared::Prepared;
use essay_common::util::{now_ms, utc_timestamp};
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::Deserialize;
use serde_json::{json, Value};

pub use roster::RosterClient;

pub const NAME: &str = "student_matching_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS matching_runs (
    batch_id TEXT PRIMARY KEY,
    essays BIGINT NOT NULL,
    matched BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
";

/// Essays read from the Content Service at once.
const FETCH_CONCURRENCY: usize = 8;

#[derive(Deserialize)]
struct EssayRef {
    essay_id: String,
    text_storage_id: String,
}

#[derive(Deserialize)]
struct Requested {
    batch_id: String,
    #[serde(default)]
    class_id: Option<String>,
    #[serde(default)]
    course_code: Option<String>,
    essays_to_process: Vec<EssayRef>,
}

pub struct StudentMatching {
    db: ServiceDb,
    content: ContentClient,
    roster: RosterClient,
    /// Match results computed in `prepare`, by event id.
    prepared: Prepared<Vec<Value>>,
}

/// The match result of one essay (`EssayMatchResult`).
pub fn essay_result(
    essay_id: &str,
    text_storage_id: &str,
    text: &str,
    roster: &[matcher::Student],
) -> Value {
    let found = extract::extract(text);
    let suggestions = matcher::suggest(&found, roster);
    let scores: Vec<f64> = suggestions.iter().map(|s| s.confidence_score).collect();
    let no_match = if suggestions.is_empty() {
        Some(if found.is_empty() {
            "no name or email address found in the essay's opening"
        } else {
            "the names found match no student of the class"
        })
    } else {
        None
    };
    json!({
        "essay_id": essay_id, "text_storage_id": text_storage_id, "filename": "",
        "suggestions": suggestions, "no_match_reason": no_match,
        "extraction_metadata": {"match_status": matcher::match_status(&suggestions),
                                "confidence_scores": scores},
    })
}

impl StudentMatching {
    pub async fn open(
        db: ServiceDb,
        content: ContentClient,
        roster: RosterClient,
    ) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        Ok(Self {
            db,
            content,
            roster,
            prepared: Prepared::new(16),
        })
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// Every essay's match result: roster once, texts eight at a time.
    async fn match_batch(&self, req: &Requested) -> Result<Vec<Value>, HandlerError> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let class_id = req.class_id.as_deref().ok_or_else(|| {
            HandlerError::poison(format!(
                "matching for batch {} names no class",
                req.batch_id
            ))
        })?;
        let roster = Arc::new(self.roster.roster(class_id).await?);
        let work: Vec<(String, String)> = req
            .essays_to_process
            .iter()
            .map(|e| (e.essay_id.clone(), e.text_storage_id.clone()))
            .collect();
        stream::iter(work)
            .map(|(essay_id, storage_id)| {
                let (content, roster) = (self.content.clone(), roster.clone());
                async move {
                    let text = content.fetch_text(&storage_id).await?;
                    Ok::<_, HandlerError>(essay_result(&essay_id, &storage_id, &text, &roster))
                }
            })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await
    }
}

#[async_trait]
impl Service for StudentMatching {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[topics::MATCHING_REQUESTED]
    }

    async fn prepare(&self, env: &Envelope) -> Result<(), HandlerError> {
        let req: Requested = env.data()?;
        let results = self.match_batch(&req).await?;
        self.prepared.put(env.event_id, results);
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let req: Requested = env.data()?;
        let results = match self.prepared.take(&env.event_id) {
            Some(r) => r,
            None => self.match_batch(&req).await?,
        };
        let matched = results
            .iter()
            .filter(|r| r["suggestions"].as_array().is_some_and(|s| !s.is_empty()))
            .count();
        let fresh = tx
            .execute(
                "INSERT INTO matching_runs (batch_id, essays, matched, created_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (batch_id) DO NOTHING",
                params![&req.batch_id, results.len(), matched, now_ms()],
            )
            .await?;
        if fresh == 0 {
            return Ok(()); // matched before (a re-sent request): the suggestions went out then
        }
        let now = utc_timestamp();
        let event = EVENTS.event(
            topics::AUTHOR_MATCHES_SUGGESTED,
            ("batch", &req.batch_id),
            env.correlation_id,
            &json!({
                "event_name": "batch.author.matches.suggested", "entity_id": req.batch_id,
                "entity_type": "batch", "parent_id": null, "timestamp": now,
                "batch_id": req.batch_id, "class_id": req.class_id, "course_code": req.course_code,
                "match_results": results,
                "processing_summary": {"total_essays": results.len(), "processed": results.len(),
                                       "matched": matched, "unmatched": results.len() - matched,
                                       "failed": 0},
                "processing_metadata": {},
            }),
        )?;
        tx.enqueue(&event).await?;
        Ok(())
    }
}
