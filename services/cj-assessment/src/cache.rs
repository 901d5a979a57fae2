//! Every verdict remembered, by judge and by the two texts (their Content Service ids, in the
//! order they were shown): a redelivered or retried request asks the judge only about pairs
//! it has not judged, so an LLM is not paid twice for one comparison.

use async_trait::async_trait;
use outbox::portable::{params, DbError, ServiceDb};

use crate::judge::{Assessment, Candidate, Judge, JudgeError, Judgement};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cj_judgements (
    judge TEXT NOT NULL,
    text_a TEXT NOT NULL,
    text_b TEXT NOT NULL,
    a_wins BIGINT NOT NULL,
    reason TEXT NOT NULL,
    confidence DOUBLE PRECISION,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (judge, text_a, text_b)
);
";

pub struct CachingJudge<J> {
    inner: J,
    db: ServiceDb,
}

impl<J: Judge> CachingJudge<J> {
    pub async fn new(inner: J, db: ServiceDb) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        Ok(Self { inner, db })
    }

    /// The judge under an assessment: a verdict is reused only under the same one.
    fn key(&self, assessment: &Assessment) -> String {
        if assessment.is_empty() {
            self.inner.name().to_owned()
        } else {
            format!("{}#{}", self.inner.name(), assessment.fingerprint())
        }
    }

    async fn remembered(
        &self,
        key: &str,
        a: &Candidate,
        b: &Candidate,
    ) -> Result<Option<Judgement>, DbError> {
        let row = self
            .db
            .fetch_optional(
                "SELECT a_wins, reason, confidence, tokens FROM cj_judgements
                 WHERE judge = $1 AND text_a = $2 AND text_b = $3",
                params![key, &a.text_storage_id, &b.text_storage_id],
            )
            .await?;
        row.map(|r| {
            Ok(Judgement {
                a_wins: r.int("a_wins")? != 0,
                reason: r.text("reason")?,
                confidence: r.float("confidence").ok(),
                // Paid when it was first judged; nothing now.
                tokens: 0,
            })
        })
        .transpose()
    }
}

#[async_trait]
impl<J: Judge> Judge for CachingJudge<J> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn costly(&self) -> bool {
        self.inner.costly()
    }

    async fn compare(&self, a: &Candidate, b: &Candidate) -> Result<Judgement, JudgeError> {
        self.compare_in(&Assessment::default(), a, b).await
    }

    async fn compare_in(
        &self,
        assessment: &Assessment,
        a: &Candidate,
        b: &Candidate,
    ) -> Result<Judgement, JudgeError> {
        let unavailable = |e: DbError| JudgeError::Unavailable(format!("the judgement cache: {e}"));
        let key = self.key(assessment);
        if let Some(known) = self.remembered(&key, a, b).await.map_err(unavailable)? {
            return Ok(known);
        }
        let fresh = self.inner.compare_in(assessment, a, b).await?;
        self.db
            .execute(
                "INSERT INTO cj_judgements (judge, text_a, text_b, a_wins, reason, confidence, tokens)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (judge, text_a, text_b) DO NOTHING",
                params![
                    &key,
                    &a.text_storage_id,
                    &b.text_storage_id,
                    fresh.a_wins,
                    &fresh.reason,
                    fresh.confidence,
                    fresh.tokens as i64
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(fresh)
    }
}
