//! Class Management: classes and students over HTTP, the class roster for the matching
//! service, and essay-student associations for REGULAR batches ([`matching`]): suggestions
//! arrive on `batch.author.matches.suggested`; a teacher confirms or overrides them over HTTP,
//! or the confident ones confirm themselves after a timeout. Either way
//! `student.associations.confirmed` is emitted exactly once per batch.
//!
//! Every class is its creator's (`X-User-ID`, see `essay_common::identity`); its students,
//! roster and the matches of its batches are reached by that user only (403 for others).
//!
//! | HTTP | effect |
//! |---|---|
//! | `GET /v1/classes?limit=20&offset=0` | the caller's classes, newest first (the original's list) |
//! | `POST /v1/classes` `{name, course_code}` | a class of the caller's; `class.created` |
//! | `GET /v1/classes/{id}` | the class, with its student count |
//! | `PUT /v1/classes/{id}` `{name?, course_code?}` | `class.updated` |
//! | `DELETE /v1/classes/{id}` | the class and its students (no event: the original has none) |
//! | `GET /v1/classes/{id}/students?limit&offset` | its students |
//! | `POST /v1/classes/{id}/students` `{first_name, last_name, email?}` | `class.student.created` |
//! | `GET /v1/students/{id}`, `DELETE /v1/students/{id}` | the student (owner of its class) |
//! | `PUT /v1/students/{id}` `{first_name?, last_name?, email?}` | `class.student.updated` |
//! | `GET /v1/classes/{id}/roster` | `{"students": [{student_id, first_name, last_name, full_legal_name, email}]}` (the original's roster; without `X-User-ID` for the matching service, as the original's NLP service reads it) |
//! | `GET /v1/matches/{batch_id}` | suggestions |
//! | `POST /v1/matches/{batch_id}/confirm` `{associations?: [{essay_id, student_id}]}` | `student.associations.confirmed` (students of the batch's class only) |

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::delete;
use axum::routing::{get, post};
use axum::{Json, Router};
use essay_common::identity::{Caller, OptionalCaller};
use essay_common::util::{now_ms, parse_uuid, utc_timestamp, ApiError, JsonBody};
use essay_common::wire::CourseCode;
use essay_common::{topics, Envelope, EventFactory, Service, Shutdown};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

pub mod matching;
mod registry;

use matching::{Association, ConfirmedBy, EssayMatches};

pub const NAME: &str = "class_management_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS classes (
    class_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    course_code TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS students (
    student_id TEXT PRIMARY KEY,
    class_id TEXT NOT NULL REFERENCES classes (class_id),
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    email TEXT
);
CREATE TABLE IF NOT EXISTS matches (
    batch_id TEXT PRIMARY KEY,
    class_id TEXT,
    status TEXT NOT NULL,
    suggestions TEXT NOT NULL,
    associations TEXT,
    correlation_id TEXT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    confirmed_by TEXT
);
";

pub struct ClassManagement {
    db: ServiceDb,
    confirm_timeout: Duration,
}

impl ClassManagement {
    /// `confirm_timeout`: how long a teacher has before the confident suggestions confirm
    /// themselves.
    pub async fn open(db: ServiceDb, confirm_timeout: Duration) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        // Added after the first release: a database made by it gains them.
        db.add_column("classes", "user_id", "TEXT").await?;
        db.add_column("classes", "created_at", "BIGINT").await?;
        Ok(Self {
            db,
            confirm_timeout,
        })
    }

    /// The students of a class, as the original's roster endpoint lists them; with a caller,
    /// only its owner may read it.
    pub async fn roster(
        &self,
        caller: Option<&Caller>,
        class_id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        // One transaction: the class and its students as of one moment.
        let mut tx = self.db.begin().await?;
        let owner = class_owner(&mut tx, class_id).await?;
        if let Some(caller) = caller {
            caller.must_own(owner.as_deref(), &format!("class {class_id}"))?;
        }
        let rows = tx
            .fetch_all(
                "SELECT student_id, first_name, last_name, email FROM students
                 WHERE class_id = $1 ORDER BY last_name, first_name",
                params![class_id],
            )
            .await?;
        let students = rows
            .iter()
            .map(|r| {
                let (first, last) = (r.text("first_name")?, r.text("last_name")?);
                Ok(
                    json!({"student_id": r.text("student_id")?, "first_name": first,
                          "last_name": last, "full_legal_name": format!("{first} {last}"),
                          "email": r.opt_text("email")?}),
                )
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        Ok(json!({"students": students}))
    }

    /// Keeps a batch's suggestions, pending until the teacher or the deadline confirms them.
    async fn on_suggested(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        #[derive(Deserialize)]
        struct Suggested {
            batch_id: String,
            #[serde(default)]
            class_id: Option<String>,
            match_results: Vec<EssayMatches>,
        }
        let s: Suggested = env.data()?;
        let deadline = now_ms() + self.confirm_timeout.as_millis() as i64;
        tx.execute(
            "INSERT INTO matches (batch_id, class_id, status, suggestions, correlation_id, deadline_ms)
             VALUES ($1, $2, 'PENDING', $3, $4, $5) ON CONFLICT (batch_id) DO NOTHING",
            params![&s.batch_id, s.class_id, serde_json::to_string(&s.match_results).expect("serialises"),
                    env.correlation_id.to_string(), deadline],
        )
        .await?;
        Ok(())
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    pub async fn create_class(
        &self,
        caller: &Caller,
        name: &str,
        course_code: &str,
    ) -> Result<String, ApiError> {
        if name.trim().is_empty() {
            return Err(ApiError::bad_request("name must not be empty"));
        }
        let course_code = CourseCode::parse(course_code.trim())
            .map_err(ApiError::bad_request)?
            .as_str();
        let class_id = Uuid::new_v4().to_string();
        let mut tx = self.db.begin().await?;
        tx.execute(
            "INSERT INTO classes (class_id, name, course_code, user_id, created_at)
             VALUES ($1, $2, $3, $4, $5)",
            params![&class_id, name, course_code, caller.user_id(), now_ms()],
        )
        .await?;
        let correlation = Uuid::new_v4();
        let e = EVENTS.event(
            topics::CLASS_CREATED,
            ("class", &class_id),
            correlation,
            &class_event(
                "class.created",
                &class_id,
                name,
                course_code,
                caller.user_id(),
                correlation,
            ),
        )?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(class_id)
    }

    pub async fn update_class(
        &self,
        caller: &Caller,
        class_id: &str,
        req: UpdateClass,
    ) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        let owner = class_owner(&mut tx, class_id).await?;
        caller.must_own(owner.as_deref(), &format!("class {class_id}"))?;
        let Some(row) = tx
            .fetch_optional(
                "UPDATE classes SET name = COALESCE($2, name), course_code = COALESCE($3, course_code)
                 WHERE class_id = $1 RETURNING name, course_code",
                params![class_id, req.name, req.course_code],
            )
            .await?
        else {
            return Err(ApiError::not_found(format!("no class {class_id}")));
        };
        let correlation = Uuid::new_v4();
        let e = EVENTS.event(
            topics::CLASS_UPDATED,
            ("class", class_id),
            correlation,
            &class_event(
                "class.updated",
                class_id,
                &row.text("name")?,
                &row.text("course_code")?,
                caller.user_id(),
                correlation,
            ),
        )?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn add_student(
        &self,
        caller: &Caller,
        class_id: &str,
        req: NewStudent,
    ) -> Result<String, ApiError> {
        if req.first_name.trim().is_empty() || req.last_name.trim().is_empty() {
            return Err(ApiError::bad_request(
                "first_name and last_name must not be empty",
            ));
        }
        let mut tx = self.db.begin().await?;
        let owner = class_owner(&mut tx, class_id).await?;
        caller.must_own(owner.as_deref(), &format!("class {class_id}"))?;
        let student_id = Uuid::new_v4().to_string();
        tx.execute(
            "INSERT INTO students (student_id, class_id, first_name, last_name, email) VALUES ($1, $2, $3, $4, $5)",
            params![&student_id, class_id, &req.first_name, &req.last_name, req.email.clone()],
        )
        .await?;
        // Student events are keyed by class: a class's roster changes stay in order.
        let e = EVENTS.event(
            topics::STUDENT_CREATED,
            ("class", class_id),
            Uuid::new_v4(),
            &json!({"event": "student.created", "student_id": student_id,
                    "first_name": req.first_name, "last_name": req.last_name,
                    "student_email": req.email, "class_ids": [class_id],
                    "created_by_user_id": caller.user_id(), "timestamp": utc_timestamp(),
                    "class_id": class_id, "email": req.email}),
        )?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(student_id)
    }

    pub async fn update_student(
        &self,
        caller: &Caller,
        student_id: &str,
        req: UpdateStudent,
    ) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        student_of(&mut tx, caller, student_id).await?;
        let Some(row) = tx
            .fetch_optional(
                "UPDATE students SET first_name = COALESCE($2, first_name),
                        last_name = COALESCE($3, last_name), email = COALESCE($4, email)
                 WHERE student_id = $1 RETURNING class_id, first_name, last_name, email",
                params![student_id, req.first_name, req.last_name, req.email],
            )
            .await?
        else {
            return Err(ApiError::not_found(format!("no student {student_id}")));
        };
        let class_id = row.text("class_id")?;
        let e = EVENTS.event(
            topics::STUDENT_UPDATED,
            ("class", &class_id),
            Uuid::new_v4(),
            &json!({"event": "student.updated", "student_id": student_id,
                    "first_name": row.text("first_name")?, "last_name": row.text("last_name")?,
                    "student_email": row.opt_text("email")?, "add_class_ids": null,
                    "remove_class_ids": null, "updated_by_user_id": caller.user_id(),
                    "timestamp": utc_timestamp(),
                    "class_id": class_id, "email": row.opt_text("email")?}),
        )?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(())
    }

    /// 403 unless the batch's matching belongs to a class of `caller`'s; 404 if there is none.
    async fn check_match_owner(&self, caller: &Caller, batch_id: &str) -> Result<(), ApiError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT c.user_id FROM matches m LEFT JOIN classes c ON c.class_id = m.class_id
                 WHERE m.batch_id = $1",
                params![batch_id],
            )
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!("no matching requested for batch {batch_id}"))
            })?;
        caller.must_own(
            row.opt_text("user_id")?.as_deref(),
            &format!("the matching of batch {batch_id}"),
        )
    }

    /// A batch's matching, for the owner of its class.
    pub async fn matches_for(
        &self,
        caller: &Caller,
        batch_id: &str,
    ) -> Result<serde_json::Value, ApiError> {
        self.check_match_owner(caller, batch_id).await?;
        self.matches(batch_id).await
    }

    /// The teacher's confirmation of a batch's matching (see [`Self::confirm`]).
    pub async fn confirm_as(
        &self,
        caller: &Caller,
        batch_id: &str,
        chosen: Option<Vec<Association>>,
    ) -> Result<bool, ApiError> {
        self.check_match_owner(caller, batch_id).await?;
        self.confirm(batch_id, chosen, ConfirmedBy::Teacher, caller.user_id())
            .await
    }

    /// A batch's matching: per essay the best suggestion (with the others as alternatives)
    /// while pending, the confirmed associations once confirmed.
    pub async fn matches(&self, batch_id: &str) -> Result<serde_json::Value, ApiError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT status, suggestions, associations, class_id, confirmed_by FROM matches
                 WHERE batch_id = $1",
                params![batch_id],
            )
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!("no matching requested for batch {batch_id}"))
            })?;
        let results = stored_results(&row.text("suggestions")?)?;
        let suggestions: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let mut ranked = r.suggestions.clone();
                ranked.sort_by(|a, b| b.confidence_score.total_cmp(&a.confidence_score));
                let best = ranked.first();
                json!({"essay_id": r.essay_id, "student_id": best.map(|b| &b.student_id),
                       "student_name": best.map(|b| &b.student_name),
                       "confidence_score": best.map(|b| b.confidence_score),
                       "match_reasons": best.map(|b| &b.match_reasons),
                       "alternatives": ranked.iter().skip(1).collect::<Vec<_>>(),
                       "no_match_reason": r.no_match_reason})
            })
            .collect();
        let associations: Option<serde_json::Value> = row
            .opt_text("associations")?
            .and_then(|a| serde_json::from_str(&a).ok());
        Ok(
            json!({"batch_id": batch_id, "class_id": row.opt_text("class_id")?,
                  "status": row.text("status")?, "confirmed_by": row.opt_text("confirmed_by")?,
                  "suggestions": suggestions, "associations": associations}),
        )
    }

    /// Confirms a batch's associations: the teacher's choices (`chosen`, students of the
    /// batch's class only; essays left out keep their suggestion), else the suggestions as
    /// `by` accepts them. Returns false when they were confirmed before; the event is emitted
    /// once either way.
    pub async fn confirm(
        &self,
        batch_id: &str,
        chosen: Option<Vec<Association>>,
        by: ConfirmedBy,
        who: &str,
    ) -> Result<bool, ApiError> {
        let mut tx = self.db.begin().await?;
        let Some(row) = tx
            .fetch_optional(
                "UPDATE matches SET status = 'CONFIRMED', confirmed_by = $2
                 WHERE batch_id = $1 AND status = 'PENDING'
                 RETURNING class_id, suggestions, correlation_id",
                params![batch_id, who],
            )
            .await?
        else {
            drop(tx);
            self.matches(batch_id).await?; // 404 if it never existed
            return Ok(false);
        };
        let results = stored_results(&row.text("suggestions")?)?;
        let class_id = row.opt_text("class_id")?;
        let mut associations = matching::from_suggestions(&results, by);
        for choice in chosen.unwrap_or_default() {
            let Some(slot) = associations
                .iter_mut()
                .find(|a| a.essay_id == choice.essay_id)
            else {
                return Err(ApiError::bad_request(format!(
                    "essay {} is not in batch {batch_id}",
                    choice.essay_id
                )));
            };
            let name = match &choice.student_id {
                None => None,
                Some(student) => {
                    let found = tx
                        .fetch_optional(
                            "SELECT first_name, last_name FROM students
                             WHERE student_id = $1 AND class_id = $2",
                            params![student, class_id.clone()],
                        )
                        .await?
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "student {student} is not in the batch's class"
                            ))
                        })?;
                    Some(format!(
                        "{} {}",
                        found.text("first_name")?,
                        found.text("last_name")?
                    ))
                }
            };
            *slot = Association {
                essay_id: choice.essay_id,
                student_id: choice.student_id,
                student_name: name,
                confidence_score: None,
            };
        }
        tx.execute(
            "UPDATE matches SET associations = $2 WHERE batch_id = $1",
            params![
                batch_id,
                serde_json::to_string(&associations).expect("serialises")
            ],
        )
        .await?;
        let now = utc_timestamp();
        let wire: Vec<serde_json::Value> = associations
            .iter()
            .map(|a| {
                json!({"essay_id": a.essay_id, "student_id": a.student_id,
                            // The matcher's confidence; 0.0 where it had none (the original's
                            // value for an essay it could not match).
                            "student_name": a.student_name,
                            "confidence_score": a.confidence_score.unwrap_or(0.0),
                            "validation_method": by.method(), "validated_by": who,
                            "validated_at": now})
            })
            .collect();
        let confirmed = associations
            .iter()
            .filter(|a| a.student_id.is_some())
            .count();
        let correlation = Uuid::parse_str(&row.text("correlation_id")?).unwrap_or_default();
        let course_code = match &class_id {
            Some(class) => tx
                .fetch_optional(
                    "SELECT course_code FROM classes WHERE class_id = $1",
                    params![class],
                )
                .await?
                .map(|r| r.text("course_code"))
                .transpose()?,
            None => None,
        };
        let e = EVENTS.event(
            topics::ASSOCIATIONS_CONFIRMED,
            ("batch", batch_id),
            correlation,
            &json!({"event_name": "student.associations.confirmed", "batch_id": batch_id,
                    "entity_id": batch_id, "class_id": class_id, "course_code": course_code,
                    "associations": wire,
                    "timeout_triggered": by == ConfirmedBy::Timeout, "timestamp": now,
                    "validation_summary": {"total_associations": associations.len(),
                                           "confirmed": confirmed,
                                           "rejected": associations.len() - confirmed}}),
        )?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Confirms every pending match whose deadline passed (confident suggestions only).
    pub async fn confirm_expired(&self) -> Result<usize, ApiError> {
        let due = self
            .db
            .fetch_all(
                "SELECT batch_id FROM matches WHERE status = 'PENDING' AND deadline_ms <= $1",
                params![now_ms()],
            )
            .await?;
        let mut n = 0;
        for r in due {
            if self
                .confirm(
                    &r.text("batch_id")?,
                    None,
                    ConfirmedBy::Timeout,
                    "SYSTEM_TIMEOUT",
                )
                .await?
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// `ClassCreatedV1` / `ClassUpdatedV1`; `name` and `course_code` are this platform's extras.
fn class_event(
    event: &str,
    class_id: &str,
    name: &str,
    course_code: &str,
    user_id: &str,
    correlation: Uuid,
) -> serde_json::Value {
    json!({"event": event, "class_id": class_id, "class_designation": name,
           "course_codes": [course_code], "user_id": user_id, "correlation_id": correlation,
           "timestamp": utc_timestamp(), "name": name, "course_code": course_code})
}

/// The owner of a class; 404 unless the class exists.
async fn class_owner(tx: &mut Tx, class_id: &str) -> Result<Option<String>, ApiError> {
    let row = tx
        .fetch_optional(
            "SELECT user_id FROM classes WHERE class_id = $1",
            params![class_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no class {class_id}")))?;
    Ok(row.opt_text("user_id")?)
}

/// The class of a student of `caller`'s; 404 if there is no such student, 403 if the class is
/// someone else's.
async fn student_of(tx: &mut Tx, caller: &Caller, student_id: &str) -> Result<String, ApiError> {
    let row = tx
        .fetch_optional(
            "SELECT s.class_id, c.user_id FROM students s JOIN classes c ON c.class_id = s.class_id
             WHERE s.student_id = $1",
            params![student_id],
        )
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no student {student_id}")))?;
    caller.must_own(
        row.opt_text("user_id")?.as_deref(),
        &format!("student {student_id}"),
    )?;
    Ok(row.text("class_id")?)
}

fn stored_results(json: &str) -> Result<Vec<EssayMatches>, ApiError> {
    serde_json::from_str(json).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored suggestions: {e}"),
        )
    })
}

#[async_trait]
impl Service for ClassManagement {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[topics::AUTHOR_MATCHES_SUGGESTED]
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        self.on_suggested(tx, env).await
    }

    fn router(self: Arc<Self>) -> Option<Router> {
        Some(router(self))
    }

    async fn background(self: Arc<Self>, shutdown: Shutdown) {
        let tick =
            (self.confirm_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut stop = std::pin::pin!(shutdown.wait());
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(tick) => {
                    if let Err(e) = self.confirm_expired().await {
                        tracing::warn!(error = ?e, "auto-confirm failed; will retry");
                    }
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct NewClass {
    pub name: String,
    pub course_code: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct UpdateClass {
    pub name: Option<String>,
    pub course_code: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct NewStudent {
    pub first_name: String,
    pub last_name: String,
    #[serde(default)]
    pub email: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct UpdateStudent {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Confirm {
    #[serde(default)]
    pub associations: Option<Vec<Association>>,
}

type Svc = State<Arc<ClassManagement>>;

/// `?limit=&offset=` as the original reads them: limit 1-100 (default 20), offset from 0.
#[derive(Debug, Default, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub offset: Option<i64>,
}

impl Page {
    fn bounds(&self) -> (i64, i64) {
        (
            self.limit.filter(|l| *l > 0).unwrap_or(20).min(100),
            self.offset.filter(|o| *o >= 0).unwrap_or(0),
        )
    }
}

/// The HTTP API.
pub fn router(svc: Arc<ClassManagement>) -> Router {
    Router::new()
        .route("/v1/classes", get(
            |State(s): Svc, caller: Caller, Query(page): Query<Page>| async move {
                Ok::<_, ApiError>(Json(s.list_classes(&caller, &page).await?))
            }).post(
            |State(s): Svc, caller: Caller, JsonBody(r): JsonBody<NewClass>| async move {
                let id = s.create_class(&caller, &r.name, &r.course_code).await?;
                Ok::<_, ApiError>((StatusCode::CREATED, Json(json!({"class_id": id, "id": id, "name": r.name}))))
            }))
        .route("/v1/classes/{class_id}", get(
            |State(s): Svc, caller: Caller, Path(id): Path<String>| async move {
                parse_uuid(&id, "class id")?;
                Ok::<_, ApiError>(Json(s.get_class(&caller, &id).await?))
            }).put(
            |State(s): Svc, caller: Caller, Path(id): Path<String>, JsonBody(r): JsonBody<UpdateClass>| async move {
                parse_uuid(&id, "class id")?;
                s.update_class(&caller, &id, r).await?;
                Ok::<_, ApiError>(StatusCode::NO_CONTENT)
            }).delete(
            |State(s): Svc, caller: Caller, Path(id): Path<String>| async move {
                parse_uuid(&id, "class id")?;
                s.delete_class(&caller, &id).await?;
                Ok::<_, ApiError>(StatusCode::NO_CONTENT)
            }))
        .route("/v1/classes/{class_id}/roster", get(
            |State(s): Svc, OptionalCaller(caller): OptionalCaller, Path(id): Path<String>| async move {
                parse_uuid(&id, "class id")?;
                Ok::<_, ApiError>(Json(s.roster(caller.as_ref(), &id).await?))
            }))
        .route("/v1/classes/{class_id}/students", get(
            |State(s): Svc, caller: Caller, Path(id): Path<String>, Query(page): Query<Page>| async move {
                parse_uuid(&id, "class id")?;
                Ok::<_, ApiError>(Json(s.list_students(&caller, &id, &page).await?))
            }).post(
            |State(s): Svc, caller: Caller, Path(id): Path<String>, JsonBody(r): JsonBody<NewStudent>| async move {
                parse_uuid(&id, "class id")?;
                let student = s.add_student(&caller, &id, r).await?;
                Ok::<_, ApiError>((StatusCode::CREATED, Json(json!({"student_id": student, "id": student}))))
            }))
        .route("/v1/students/{student_id}", get(
            |State(s): Svc, caller: Caller, Path(id): Path<String>| async move {
                parse_uuid(&id, "student id")?;
                Ok::<_, ApiError>(Json(s.get_student(&caller, &id).await?))
            }).put(
            |State(s): Svc, caller: Caller, Path(id): Path<String>, JsonBody(r): JsonBody<UpdateStudent>| async move {
                parse_uuid(&id, "student id")?;
                s.update_student(&caller, &id, r).await?;
                Ok::<_, ApiError>(StatusCode::NO_CONTENT)
            }))
        .route("/v1/students/{student_id}", delete(
            |State(s): Svc, caller: Caller, Path(id): Path<String>| async move {
                parse_uuid(&id, "student id")?;
                s.delete_student(&caller, &id).await?;
                Ok::<_, ApiError>(StatusCode::NO_CONTENT)
            }))
        .route("/v1/matches/{batch_id}", get(
            |State(s): Svc, caller: Caller, Path(id): Path<String>| async move {
                Ok::<_, ApiError>(Json(s.matches_for(&caller, &id).await?))
            }))
        .route("/v1/matches/{batch_id}/confirm", post(
            |State(s): Svc, caller: Caller, Path(id): Path<String>, JsonBody(r): JsonBody<Confirm>| async move {
                let fresh = s.confirm_as(&caller, &id, r.associations).await?;
                Ok::<_, ApiError>(Json(json!({"batch_id": id, "confirmed": true, "already_confirmed": !fresh})))
            }))
        .with_state(svc)
}
