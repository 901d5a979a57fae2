//! Reading and deleting classes and students, for their owner: the original's list (per
//! teacher, paginated), get and delete.

use essay_common::identity::Caller;
use essay_common::util::{iso_from_ms as iso, ApiError};
use outbox::portable::{params, DbError};
use serde_json::{json, Value};

use crate::{class_owner, student_of, ClassManagement, Page};

impl ClassManagement {
    /// The caller's classes, newest first, a page at a time.
    pub async fn list_classes(&self, caller: &Caller, page: &Page) -> Result<Value, ApiError> {
        let (limit, offset) = page.bounds();
        let rows = self
            .db
            .fetch_all(
                "SELECT c.class_id, c.name, c.course_code, c.created_at,
                        (SELECT COUNT(*) FROM students s WHERE s.class_id = c.class_id) AS students
                 FROM classes c WHERE c.user_id = $1
                 ORDER BY c.created_at DESC, c.class_id LIMIT $2 OFFSET $3",
                params![caller.user_id(), limit, offset],
            )
            .await?;
        let classes = rows
            .iter()
            .map(|r| {
                Ok(
                    json!({"id": r.text("class_id")?, "class_id": r.text("class_id")?,
                          "name": r.text("name")?, "course_code": r.text("course_code")?,
                          "student_count": r.int("students")?,
                          "created_at": r.opt_int("created_at")?.map(iso)}),
                )
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        Ok(json!({"classes": classes,
                  "pagination": {"limit": limit, "offset": offset, "returned": classes.len()}}))
    }

    pub async fn get_class(&self, caller: &Caller, class_id: &str) -> Result<Value, ApiError> {
        let mut tx = self.db.begin().await?;
        let owner = class_owner(&mut tx, class_id).await?;
        caller.must_own(owner.as_deref(), &format!("class {class_id}"))?;
        let r = tx
            .fetch_optional(
                "SELECT c.name, c.course_code, c.created_at,
                        (SELECT COUNT(*) FROM students s WHERE s.class_id = c.class_id) AS students
                 FROM classes c WHERE c.class_id = $1",
                params![class_id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no class {class_id}")))?;
        Ok(
            json!({"id": class_id, "class_id": class_id, "name": r.text("name")?,
                  "course_code": r.text("course_code")?, "student_count": r.int("students")?,
                  "created_at": r.opt_int("created_at")?.map(iso)}),
        )
    }

    /// Deletes a class and its students. Matches already confirmed for its batches stay as
    /// they were sent; a batch still waiting for its matching confirms what it has.
    pub async fn delete_class(&self, caller: &Caller, class_id: &str) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        let owner = class_owner(&mut tx, class_id).await?;
        caller.must_own(owner.as_deref(), &format!("class {class_id}"))?;
        tx.execute(
            "DELETE FROM students WHERE class_id = $1",
            params![class_id],
        )
        .await?;
        tx.execute("DELETE FROM classes WHERE class_id = $1", params![class_id])
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_students(
        &self,
        caller: &Caller,
        class_id: &str,
        page: &Page,
    ) -> Result<Value, ApiError> {
        let (limit, offset) = page.bounds();
        let mut tx = self.db.begin().await?;
        let owner = class_owner(&mut tx, class_id).await?;
        caller.must_own(owner.as_deref(), &format!("class {class_id}"))?;
        let rows = tx
            .fetch_all(
                "SELECT student_id, first_name, last_name, email FROM students WHERE class_id = $1
                 ORDER BY last_name, first_name, student_id LIMIT $2 OFFSET $3",
                params![class_id, limit, offset],
            )
            .await?;
        let students = rows
            .iter()
            .map(|r| {
                Ok(
                    json!({"id": r.text("student_id")?, "student_id": r.text("student_id")?,
                          "first_name": r.text("first_name")?, "last_name": r.text("last_name")?,
                          "email": r.opt_text("email")?}),
                )
            })
            .collect::<Result<Vec<_>, DbError>>()?;
        Ok(json!({"class_id": class_id, "students": students,
                  "pagination": {"limit": limit, "offset": offset, "returned": students.len()}}))
    }

    pub async fn get_student(&self, caller: &Caller, student_id: &str) -> Result<Value, ApiError> {
        let mut tx = self.db.begin().await?;
        let class_id = student_of(&mut tx, caller, student_id).await?;
        let r = tx
            .fetch_optional(
                "SELECT first_name, last_name, email FROM students WHERE student_id = $1",
                params![student_id],
            )
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no student {student_id}")))?;
        Ok(json!({"id": student_id, "student_id": student_id,
                  "first_name": r.text("first_name")?, "last_name": r.text("last_name")?,
                  "email": r.opt_text("email")?, "class_ids": [class_id]}))
    }

    pub async fn delete_student(&self, caller: &Caller, student_id: &str) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        student_of(&mut tx, caller, student_id).await?;
        tx.execute(
            "DELETE FROM students WHERE student_id = $1",
            params![student_id],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
