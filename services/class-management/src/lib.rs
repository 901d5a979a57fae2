//! Class Management: classes and students over HTTP, and essay-student matching for REGULAR
//! batches. On `student.matching.requested` it suggests a student per essay (a student whose
//! full name appears in the text); a teacher confirms over HTTP, or the suggestions are
//! confirmed automatically after a timeout. Either way `student.associations.confirmed` is
//! emitted exactly once per batch.
//!
//! | HTTP | effect |
//! |---|---|
//! | `POST /v1/classes` `{name, course_code}` | `class.created` |
//! | `PUT /v1/classes/{id}` `{name?, course_code?}` | `class.updated` |
//! | `POST /v1/classes/{id}/students` `{first_name, last_name, email?}` | `class.student.created` |
//! | `PUT /v1/students/{id}` `{first_name?, last_name?, email?}` | `class.student.updated` |
//! | `GET /v1/matches/{batch_id}` | suggestions |
//! | `POST /v1/matches/{batch_id}/confirm` `{associations?: [{essay_id, student_id}]}` | `student.associations.confirmed` |

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use essay_common::content::ContentClient;
use essay_common::prepared::Prepared;
use essay_common::util::{now_ms, parse_uuid, ApiError, JsonBody};
use essay_common::{topics, Envelope, EventFactory, Service, Shutdown};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::HandlerError;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

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
    correlation_id TEXT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    confirmed_by TEXT
);
";

/// One essay's suggested student (none when no name was found).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Suggestion {
    pub essay_id: String,
    pub student_id: Option<String>,
    pub student_name: Option<String>,
}

/// A student's full name as it would appear in an essay.
#[derive(Clone, Debug)]
pub struct StudentName {
    pub student_id: String,
    pub first_name: String,
    pub last_name: String,
}

/// Suggests, per essay, the student whose full name (first and last, case-insensitive) occurs
/// in its text. Each student is suggested for at most one essay (the first that names them).
pub fn suggest(essays: &[(String, String)], students: &[StudentName]) -> Vec<Suggestion> {
    let mut taken = std::collections::HashSet::new();
    essays
        .iter()
        .map(|(essay_id, text)| {
            let text = text.to_lowercase();
            let found = students.iter().find(|s| {
                let full = format!("{} {}", s.first_name, s.last_name).to_lowercase();
                !taken.contains(&s.student_id) && text.contains(&full)
            });
            if let Some(s) = found {
                taken.insert(s.student_id.clone());
            }
            Suggestion {
                essay_id: essay_id.clone(),
                student_id: found.map(|s| s.student_id.clone()),
                student_name: found.map(|s| format!("{} {}", s.first_name, s.last_name)),
            }
        })
        .collect()
}

pub struct ClassManagement {
    db: ServiceDb,
    confirm_timeout: Duration,
    content: ContentClient,
    /// The essays' texts, fetched in `prepare`, by event id.
    prepared: Prepared<Vec<(String, String)>>,
}

#[derive(Deserialize)]
struct EssayRef {
    essay_id: String,
    text_storage_id: String,
}

#[derive(Deserialize)]
struct MatchingRequested {
    batch_id: String,
    class_id: Option<String>,
    essays_to_process: Vec<EssayRef>,
}

impl ClassManagement {
    /// `confirm_timeout`: how long a teacher has before suggestions confirm themselves;
    /// essays' texts are read from the Content Service through `content`.
    pub async fn open(
        db: ServiceDb,
        confirm_timeout: Duration,
        content: ContentClient,
    ) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        Ok(Self {
            db,
            confirm_timeout,
            content,
            prepared: Prepared::new(16),
        })
    }

    /// (essay id, text) of every essay of the request.
    async fn texts(&self, essays: &[EssayRef]) -> Result<Vec<(String, String)>, HandlerError> {
        let mut out = Vec::with_capacity(essays.len());
        for e in essays {
            out.push((
                e.essay_id.clone(),
                self.content.fetch_text(&e.text_storage_id).await?,
            ));
        }
        Ok(out)
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    pub async fn create_class(&self, name: &str, course_code: &str) -> Result<String, ApiError> {
        if name.trim().is_empty() || course_code.trim().is_empty() {
            return Err(ApiError::bad_request(
                "name and course_code must not be empty",
            ));
        }
        let class_id = Uuid::new_v4().to_string();
        let mut tx = self.db.begin().await?;
        tx.execute(
            "INSERT INTO classes (class_id, name, course_code) VALUES ($1, $2, $3)",
            params![&class_id, name, course_code],
        )
        .await?;
        let e = EVENTS.event(
            topics::CLASS_CREATED,
            ("class", &class_id),
            Uuid::new_v4(),
            &json!({"class_id": class_id, "name": name, "course_code": course_code}),
        )?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(class_id)
    }

    pub async fn update_class(&self, class_id: &str, req: UpdateClass) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
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
        let e = EVENTS.event(topics::CLASS_UPDATED, ("class", class_id), Uuid::new_v4(),
            &json!({"class_id": class_id, "name": row.text("name")?, "course_code": row.text("course_code")?}))?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn add_student(&self, class_id: &str, req: NewStudent) -> Result<String, ApiError> {
        if req.first_name.trim().is_empty() || req.last_name.trim().is_empty() {
            return Err(ApiError::bad_request(
                "first_name and last_name must not be empty",
            ));
        }
        let mut tx = self.db.begin().await?;
        if tx
            .fetch_optional(
                "SELECT 1 AS one FROM classes WHERE class_id = $1",
                params![class_id],
            )
            .await?
            .is_none()
        {
            return Err(ApiError::not_found(format!("no class {class_id}")));
        }
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
            &json!({"class_id": class_id, "student_id": student_id, "first_name": req.first_name,
                    "last_name": req.last_name, "email": req.email}),
        )?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(student_id)
    }

    pub async fn update_student(
        &self,
        student_id: &str,
        req: UpdateStudent,
    ) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
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
        let e = EVENTS.event(topics::STUDENT_UPDATED, ("class", &class_id), Uuid::new_v4(),
            &json!({"class_id": class_id, "student_id": student_id, "first_name": row.text("first_name")?,
                    "last_name": row.text("last_name")?, "email": row.opt_text("email")?}))?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn matches(&self, batch_id: &str) -> Result<serde_json::Value, ApiError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT status, suggestions, class_id FROM matches WHERE batch_id = $1",
                params![batch_id],
            )
            .await?
            .ok_or_else(|| {
                ApiError::not_found(format!("no matching requested for batch {batch_id}"))
            })?;
        let suggestions: serde_json::Value =
            serde_json::from_str(&row.text("suggestions")?).unwrap_or_default();
        Ok(
            json!({"batch_id": batch_id, "class_id": row.opt_text("class_id")?,
                  "status": row.text("status")?, "suggestions": suggestions}),
        )
    }

    /// Confirms a batch's associations (the given ones, else the suggestions). Returns false
    /// when they were confirmed before; the event is emitted once either way.
    pub async fn confirm(
        &self,
        batch_id: &str,
        chosen: Option<Vec<Suggestion>>,
        by: &str,
    ) -> Result<bool, ApiError> {
        let mut tx = self.db.begin().await?;
        let Some(row) = tx
            .fetch_optional(
                "UPDATE matches SET status = 'CONFIRMED', confirmed_by = $2
                 WHERE batch_id = $1 AND status = 'PENDING'
                 RETURNING class_id, suggestions, correlation_id",
                params![batch_id, by],
            )
            .await?
        else {
            drop(tx);
            self.matches(batch_id).await?; // 404 if it never existed
            return Ok(false);
        };
        let suggested: Vec<Suggestion> =
            serde_json::from_str(&row.text("suggestions")?).map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("stored suggestions: {e}"),
                )
            })?;
        let associations = match chosen {
            Some(c) => {
                let known: std::collections::HashSet<_> =
                    suggested.iter().map(|s| &s.essay_id).collect();
                if let Some(bad) = c.iter().find(|a| !known.contains(&a.essay_id)) {
                    return Err(ApiError::bad_request(format!(
                        "essay {} is not in batch {batch_id}",
                        bad.essay_id
                    )));
                }
                c
            }
            None => suggested,
        };
        tx.execute(
            "UPDATE matches SET suggestions = $2 WHERE batch_id = $1",
            params![
                batch_id,
                serde_json::to_string(&associations).expect("serialises")
            ],
        )
        .await?;
        let correlation = Uuid::parse_str(&row.text("correlation_id")?).unwrap_or_default();
        let e = EVENTS.event(topics::ASSOCIATIONS_CONFIRMED, ("batch", batch_id), correlation,
            &json!({"batch_id": batch_id, "entity_id": batch_id, "class_id": row.opt_text("class_id")?,
                    "associations": associations, "confirmed_by": by,
                    "auto_confirmed": by == "timeout"}))?;
        tx.enqueue(&e).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Confirms every pending match whose deadline passed.
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
            if self.confirm(&r.text("batch_id")?, None, "timeout").await? {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[async_trait]
impl Service for ClassManagement {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[topics::MATCHING_REQUESTED]
    }

    async fn prepare(&self, env: &Envelope) -> Result<(), HandlerError> {
        let req: MatchingRequested = env.data()?;
        let texts = self.texts(&req.essays_to_process).await?;
        self.prepared.put(env.event_id, texts);
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let req: MatchingRequested = env.data()?;
        let students = tx
            .fetch_all(
                "SELECT student_id, first_name, last_name FROM students WHERE class_id = $1",
                params![req.class_id.clone()],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(StudentName {
                    student_id: r.text("student_id")?,
                    first_name: r.text("first_name")?,
                    last_name: r.text("last_name")?,
                })
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        let essays = match self.prepared.take(&env.event_id) {
            Some(texts) => texts,
            None => self.texts(&req.essays_to_process).await?,
        };
        let suggestions = suggest(&essays, &students);
        let deadline = now_ms() + self.confirm_timeout.as_millis() as i64;
        tx.execute(
            "INSERT INTO matches (batch_id, class_id, status, suggestions, correlation_id, deadline_ms)
             VALUES ($1, $2, 'PENDING', $3, $4, $5) ON CONFLICT (batch_id) DO NOTHING",
            params![&req.batch_id, req.class_id, serde_json::to_string(&suggestions).expect("serialises"),
                    env.correlation_id.to_string(), deadline],
        )
        .await?;
        Ok(())
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
    pub associations: Option<Vec<Suggestion>>,
}

type Svc = State<Arc<ClassManagement>>;

/// The HTTP API.
pub fn router(svc: Arc<ClassManagement>) -> Router {
    Router::new()
        .route("/v1/classes", post(
            |State(s): Svc, JsonBody(r): JsonBody<NewClass>| async move {
                let id = s.create_class(&r.name, &r.course_code).await?;
                Ok::<_, ApiError>((StatusCode::CREATED, Json(json!({"class_id": id}))))
            }))
        .route("/v1/classes/{class_id}", put(
            |State(s): Svc, Path(id): Path<String>, JsonBody(r): JsonBody<UpdateClass>| async move {
                parse_uuid(&id, "class id")?;
                s.update_class(&id, r).await?;
                Ok::<_, ApiError>(StatusCode::NO_CONTENT)
            }))
        .route("/v1/classes/{class_id}/students", post(
            |State(s): Svc, Path(id): Path<String>, JsonBody(r): JsonBody<NewStudent>| async move {
                parse_uuid(&id, "class id")?;
                let student = s.add_student(&id, r).await?;
                Ok::<_, ApiError>((StatusCode::CREATED, Json(json!({"student_id": student}))))
            }))
        .route("/v1/students/{student_id}", put(
            |State(s): Svc, Path(id): Path<String>, JsonBody(r): JsonBody<UpdateStudent>| async move {
                parse_uuid(&id, "student id")?;
                s.update_student(&id, r).await?;
                Ok::<_, ApiError>(StatusCode::NO_CONTENT)
            }))
        .route("/v1/matches/{batch_id}", get(
            |State(s): Svc, Path(id): Path<String>| async move {
                Ok::<_, ApiError>(Json(s.matches(&id).await?))
            }))
        .route("/v1/matches/{batch_id}/confirm", post(
            |State(s): Svc, Path(id): Path<String>, JsonBody(r): JsonBody<Confirm>| async move {
                let fresh = s.confirm(&id, r.associations, "teacher").await?;
                Ok::<_, ApiError>(Json(json!({"batch_id": id, "confirmed": true, "already_confirmed": !fresh})))
            }))
        .with_state(svc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_the_text_become_suggestions() {
        let students = vec![
            StudentName {
                student_id: "s1".into(),
                first_name: "Ada".into(),
                last_name: "Lovelace".into(),
            },
            StudentName {
                student_id: "s2".into(),
                first_name: "Alan".into(),
                last_name: "Turing".into(),
            },
        ];
        let essays = vec![
            (
                "e1".to_string(),
                "Essay by ALAN TURING about machines".to_string(),
            ),
            ("e2".to_string(), "No name here".to_string()),
            (
                "e3".to_string(),
                "ada lovelace wrote this; Alan Turing too".to_string(),
            ),
        ];
        let s = suggest(&essays, &students);
        assert_eq!(s[0].student_id.as_deref(), Some("s2"));
        assert_eq!(s[1].student_id, None);
        assert_eq!(
            s[2].student_id.as_deref(),
            Some("s1"),
            "Turing was taken by e1"
        );
    }
}
