//! An assignment's assessment and its anchor essays. What the judge is told (the students'
//! task, the criteria, the rubric) is set per assignment; anchor essays are essays with known
//! grades a teacher registers for an assignment, on one of
//! the original's grade scales. A batch whose CJ request names the assignment is compared
//! with its owner's anchors of that assignment, and its grades are projected onto the scale
//! ([`crate::calibration`]); a batch without anchors is graded relative to itself.
//!
//! | HTTP (`X-User-ID`) | effect |
//! |---|---|
//! | `PUT /v1/assignments/{assignment_id}/assessment` `{student_prompt?, instructions?, rubric?}` | what the judge is told for the caller's batches of it |
//! | `GET /v1/assignments/{assignment_id}/assessment` | the same |
//! | `POST /v1/assignments/{assignment_id}/anchors` `{scale, grade, text}` | an anchor of the caller's; 201 `{anchor_id}` |
//! | `GET /v1/assignments/{assignment_id}/anchors` | the caller's anchors of the assignment |
//! | `DELETE /v1/anchors/{anchor_id}` | the caller's anchor removed |
//!
//! The anchor's text is kept here (it is the teacher's reference material, not a student's
//! upload); every anchor of an assignment is on the same scale.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use essay_common::identity::Caller;
use essay_common::util::{now_ms, parse_uuid, ApiError, JsonBody};
use outbox::portable::params;
use outbox::HandlerError;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::calibration::Scale;
use crate::judge::{Assessment, Candidate};
use crate::{Anchors, CjAssessment, Requested};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cj_anchors (
    anchor_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    assignment_id TEXT NOT NULL,
    scale TEXT NOT NULL,
    grade TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS cj_anchors_by_assignment ON cj_anchors (user_id, assignment_id);
CREATE TABLE IF NOT EXISTS cj_assessments (
    user_id TEXT NOT NULL,
    assignment_id TEXT NOT NULL,
    student_prompt TEXT,
    instructions TEXT,
    rubric TEXT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, assignment_id)
);
";

/// Words an anchor needs to be worth comparing.
const MIN_WORDS: usize = 25;

#[derive(Debug, Deserialize)]
pub struct NewAnchor {
    pub scale: String,
    pub grade: String,
    pub text: String,
}

/// Longest text of an assessment field.
const MAX_ASSESSMENT_CHARS: usize = 20_000;

impl CjAssessment {
    /// Sets what the judge is told for the caller's batches of `assignment_id`.
    pub async fn set_assessment(
        &self,
        caller: &Caller,
        assignment_id: &str,
        assessment: Assessment,
    ) -> Result<(), ApiError> {
        if assignment_id.trim().is_empty() || assignment_id.len() > 200 {
            return Err(ApiError::bad_request(
                "assignment_id must be 1-200 characters",
            ));
        }
        for (name, text) in [
            ("student_prompt", &assessment.student_prompt),
            ("instructions", &assessment.instructions),
            ("rubric", &assessment.rubric),
        ] {
            if text
                .as_ref()
                .is_some_and(|t| t.chars().count() > MAX_ASSESSMENT_CHARS)
            {
                return Err(ApiError::bad_request(format!(
                    "{name} is longer than {MAX_ASSESSMENT_CHARS} characters"
                )));
            }
        }
        self.db
            .execute(
                "INSERT INTO cj_assessments (user_id, assignment_id, student_prompt, instructions,
                                             rubric, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (user_id, assignment_id) DO UPDATE SET
                     student_prompt = excluded.student_prompt,
                     instructions = excluded.instructions, rubric = excluded.rubric,
                     updated_at = excluded.updated_at",
                params![
                    caller.user_id(),
                    assignment_id,
                    assessment.student_prompt,
                    assessment.instructions,
                    assessment.rubric,
                    now_ms()
                ],
            )
            .await?;
        Ok(())
    }

    /// What the judge is told for `user`'s batches of `assignment_id` (empty if nothing set).
    pub async fn assessment(
        &self,
        user: &str,
        assignment_id: &str,
    ) -> Result<Assessment, outbox::portable::DbError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT student_prompt, instructions, rubric FROM cj_assessments
                 WHERE user_id = $1 AND assignment_id = $2",
                params![user, assignment_id],
            )
            .await?;
        Ok(match row {
            Some(r) => Assessment {
                student_prompt: r.opt_text("student_prompt")?,
                instructions: r.opt_text("instructions")?,
                rubric: r.opt_text("rubric")?,
            },
            None => Assessment::default(),
        })
    }

    pub async fn add_anchor(
        &self,
        caller: &Caller,
        assignment_id: &str,
        anchor: NewAnchor,
    ) -> Result<String, ApiError> {
        let scale = Scale::named(&anchor.scale).map_err(ApiError::bad_request)?;
        scale
            .position(&anchor.grade)
            .map_err(ApiError::bad_request)?;
        let words = anchor.text.split_whitespace().count();
        if words < MIN_WORDS {
            return Err(ApiError::bad_request(format!(
                "an anchor essay needs at least {MIN_WORDS} words, this one has {words}"
            )));
        }
        if assignment_id.trim().is_empty() || assignment_id.len() > 200 {
            return Err(ApiError::bad_request(
                "assignment_id must be 1-200 characters",
            ));
        }
        let mut tx = self.db.begin().await?;
        let other = tx
            .fetch_optional(
                "SELECT scale FROM cj_anchors WHERE user_id = $1 AND assignment_id = $2 LIMIT 1",
                params![caller.user_id(), assignment_id],
            )
            .await?
            .map(|r| r.text("scale"))
            .transpose()?;
        if let Some(other) = other.filter(|o| o != scale.id) {
            return Err(ApiError::conflict(format!(
                "the anchors of {assignment_id} are on {other}; an assignment has one scale"
            )));
        }
        let anchor_id = uuid::Uuid::new_v4().to_string();
        tx.execute(
            "INSERT INTO cj_anchors (anchor_id, user_id, assignment_id, scale, grade, text, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            params![&anchor_id, caller.user_id(), assignment_id, scale.id, &anchor.grade, &anchor.text, now_ms()],
        )
        .await?;
        tx.commit().await?;
        Ok(anchor_id)
    }

    pub async fn list_anchors(
        &self,
        caller: &Caller,
        assignment_id: &str,
    ) -> Result<Value, ApiError> {
        let rows = self
            .db
            .fetch_all(
                "SELECT anchor_id, scale, grade, text FROM cj_anchors
                 WHERE user_id = $1 AND assignment_id = $2 ORDER BY created_at, anchor_id",
                params![caller.user_id(), assignment_id],
            )
            .await?;
        let anchors = rows
            .iter()
            .map(|r| {
                Ok(
                    json!({"anchor_id": r.text("anchor_id")?, "scale": r.text("scale")?,
                          "grade": r.text("grade")?,
                          "words": r.text("text")?.split_whitespace().count()}),
                )
            })
            .collect::<Result<Vec<_>, outbox::portable::DbError>>()?;
        Ok(json!({"assignment_id": assignment_id, "anchors": anchors}))
    }

    pub async fn delete_anchor(&self, caller: &Caller, anchor_id: &str) -> Result<(), ApiError> {
        let owner = self
            .db
            .fetch_optional(
                "SELECT user_id FROM cj_anchors WHERE anchor_id = $1",
                params![anchor_id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no anchor {anchor_id}")))?
            .text("user_id")?;
        caller.must_own(Some(&owner), &format!("anchor {anchor_id}"))?;
        self.db
            .execute(
                "DELETE FROM cj_anchors WHERE anchor_id = $1",
                params![anchor_id],
            )
            .await?;
        Ok(())
    }

    /// The anchors the request's batch is graded by, appended to `candidates`.
    pub(crate) async fn anchors_for(
        &self,
        req: &Requested,
        candidates: &mut Vec<Candidate>,
    ) -> Result<Option<Anchors>, HandlerError> {
        let (Some(user), Some(assignment)) = (&req.user_id, &req.assignment_id) else {
            return Ok(None);
        };
        let rows = self
            .db
            .fetch_all(
                "SELECT anchor_id, scale, grade, text FROM cj_anchors
                 WHERE user_id = $1 AND assignment_id = $2 ORDER BY created_at, anchor_id",
                params![user, assignment],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let scale = Scale::named(&first.text("scale")?).map_err(HandlerError::retry)?;
        let mut known = Vec::with_capacity(rows.len());
        for r in &rows {
            let (id, grade) = (r.text("anchor_id")?, r.text("grade")?);
            let position = scale.position(&grade).map_err(HandlerError::retry)?;
            known.push((candidates.len(), position));
            candidates.push(Candidate {
                essay_id: format!("ANCHOR_{grade}_{}", &id[..8]),
                text_storage_id: format!("anchor:{id}"),
                text: r.text("text")?,
                spelling_errors: None,
            });
        }
        Ok(Some(Anchors { scale, known }))
    }
}

type Svc = State<Arc<CjAssessment>>;

#[derive(Debug, Default, Deserialize)]
struct AssessmentBody {
    #[serde(default)]
    student_prompt: Option<String>,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    rubric: Option<String>,
}

pub fn router(svc: Arc<CjAssessment>) -> Router {
    Router::new()
        .route(
            "/v1/assignments/{assignment_id}/assessment",
            get(
                |State(s): Svc, caller: Caller, Path(a): Path<String>| async move {
                    let found = s.assessment(caller.user_id(), &a).await?;
                    Ok::<_, ApiError>(Json(json!({"assignment_id": a,
                    "student_prompt": found.student_prompt, "instructions": found.instructions,
                    "rubric": found.rubric})))
                },
            )
            .put(
                |State(s): Svc,
                 caller: Caller,
                 Path(a): Path<String>,
                 JsonBody(b): JsonBody<AssessmentBody>| async move {
                    let assessment = Assessment {
                        student_prompt: b.student_prompt.filter(|t| !t.trim().is_empty()),
                        instructions: b.instructions.filter(|t| !t.trim().is_empty()),
                        rubric: b.rubric.filter(|t| !t.trim().is_empty()),
                    };
                    s.set_assessment(&caller, &a, assessment).await?;
                    Ok::<_, ApiError>(StatusCode::NO_CONTENT)
                },
            ),
        )
        .route(
            "/v1/assignments/{assignment_id}/anchors",
            get(
                |State(s): Svc, caller: Caller, Path(a): Path<String>| async move {
                    Ok::<_, ApiError>(Json(s.list_anchors(&caller, &a).await?))
                },
            )
            .post(
                |State(s): Svc,
                 caller: Caller,
                 Path(a): Path<String>,
                 JsonBody(body): JsonBody<NewAnchor>| async move {
                    let id = s.add_anchor(&caller, &a, body).await?;
                    Ok::<_, ApiError>((StatusCode::CREATED, Json(json!({"anchor_id": id}))))
                },
            ),
        )
        .route(
            "/v1/anchors/{anchor_id}",
            delete(
                |State(s): Svc, caller: Caller, Path(id): Path<String>| async move {
                    parse_uuid(&id, "anchor id")?;
                    s.delete_anchor(&caller, &id).await?;
                    Ok::<_, ApiError>(StatusCode::NO_CONTENT)
                },
            ),
        )
        .with_state(svc)
}
