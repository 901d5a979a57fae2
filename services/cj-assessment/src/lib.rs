//! CJ Assessment: comparative judgement of a batch's essays. On `els.cj_assessment.requested`
//! it chooses pairs ([`bt::choose_pairs`]: enough comparisons per essay, no pair twice), asks a
//! [`judge::Judge`] about each, fits Bradley-Terry scores with standard errors ([`bt::fit`]),
//! ranks and grades. The CJ batch is marked complete in the same transaction that enqueues
//! `cj_assessment.completed`, `assessment.result.published` and `resource.consumption`, each
//! with an idempotency key derived from the batch: a repeated finalisation publishes nothing
//! (the original published 119 completions for 25 batches). Failure -> `cj_assessment.failed`.
//!
//! The request names each essay's text by `text_storage_id`; `prepare` fetches them all from
//! the Content Service before the transaction (eight at a time), so the request stays a few
//! kilobytes whatever the batch's size.

pub mod anchors;
pub mod bt;
pub mod cache;
pub mod calibration;
mod http;
pub mod judge;
pub mod llm;
pub mod pairing;
pub mod simulation;

use std::sync::Arc;

use async_trait::async_trait;
use essay_common::content::ContentClient;
use essay_common::prepared::Prepared;
use essay_common::util::{now_ms, utc_timestamp};
use essay_common::wire::system_metadata;
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::{params, DbError, ServiceDb, Tx};
use outbox::{HandlerError, NewEvent};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use judge::{Candidate, Judge};

pub const NAME: &str = "cj_assessment_service";
const EVENTS: EventFactory = EventFactory::new(NAME);

/// Comparisons each essay takes part in (fewer when the batch is small).
pub const COMPARISONS_PER_ESSAY: usize = 10;

/// The most comparisons one batch may ask of the judge unless `CJ_MAX_COMPARISONS` says
/// otherwise: ten per essay for a batch of up to 500 essays.
pub const DEFAULT_MAX_COMPARISONS: usize = 2500;

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cj_batches (
    cj_batch_id TEXT PRIMARY KEY,
    batch_id TEXT NOT NULL,
    run BIGINT NOT NULL,
    status TEXT NOT NULL,
    essay_count BIGINT NOT NULL,
    comparisons BIGINT NOT NULL DEFAULT 0,
    failure_reason TEXT,
    created_at BIGINT NOT NULL,
    completed_at BIGINT,
    UNIQUE (batch_id, run)
);
CREATE TABLE IF NOT EXISTS cj_comparisons (
    cj_batch_id TEXT NOT NULL REFERENCES cj_batches (cj_batch_id),
    essay_a TEXT NOT NULL,
    essay_b TEXT NOT NULL,
    winner TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (cj_batch_id, essay_a, essay_b)
);
CREATE TABLE IF NOT EXISTS cj_results (
    cj_batch_id TEXT NOT NULL REFERENCES cj_batches (cj_batch_id),
    essay_id TEXT NOT NULL,
    essay_rank BIGINT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    standard_error DOUBLE PRECISION NOT NULL,
    grade TEXT NOT NULL,
    PRIMARY KEY (cj_batch_id, essay_id)
);
";

pub struct CjAssessment {
    db: ServiceDb,
    judge: Arc<dyn Judge>,
    content: ContentClient,
    /// The batch's essays fetched and judged in `prepare`, outside the transaction, by event id.
    prepared: Prepared<Judged>,
    max_comparisons: usize,
}

#[derive(Deserialize)]
struct EssayIn {
    essay_id: String,
    text_storage_id: String,
    #[serde(default)]
    spelling_errors: Option<u32>,
}

#[derive(Deserialize)]
pub(crate) struct Requested {
    /// `ELS_CJAssessmentRequestV1`: the batch is `entity_id`.
    #[serde(rename = "entity_id")]
    batch_id: String,
    #[serde(default)]
    essays_for_cj: Vec<EssayIn>,
    /// Essay Lifecycle's run of the phase: a retried pipeline is a new run, a re-sent request
    /// of the same run is not (the original's requests carry none: the first run).
    #[serde(default = "first_run")]
    run: i64,
    /// The batch's owner, billed in `resource.consumption`.
    #[serde(default)]
    user_id: Option<String>,
    /// Whose anchor essays grade the batch (the owner's for this assignment).
    #[serde(default)]
    assignment_id: Option<String>,
}

fn first_run() -> i64 {
    1
}

/// Essays fetched from the Content Service at once.
const FETCH_CONCURRENCY: usize = 8;

/// One essay's place in the batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Ranked {
    pub essay_id: String,
    pub rank: usize,
    pub score: f64,
    pub standard_error: f64,
    pub grade: &'static str,
    pub comparisons: usize,
    /// The score between the batch's lowest (0) and highest (1): relative, no anchors.
    pub normalized_score: f64,
    /// The probability that the grade is right given the score's standard error.
    pub confidence_score: f64,
    pub confidence_label: &'static str,
    /// An anchor essay (known grade), compared with the batch but not one of its essays.
    pub is_anchor: bool,
    /// With anchors: the probability of each anchored grade, lowest first.
    pub grade_probabilities: Vec<(&'static str, f64)>,
}

/// A batch judged: its ranking, the comparisons with a verdict (a, b, winner, reason), the
/// tokens they cost, and how many comparisons got no verdict.
#[derive(Debug)]
pub struct Assessed {
    pub ranked: Vec<Ranked>,
    pub comparisons: Vec<(usize, usize, usize, String)>,
    pub tokens: u64,
    pub lost: usize,
    /// The scale the grades were projected onto by anchors; None: relative to the batch.
    pub calibration: Option<&'static str>,
    pub anchors_used: usize,
}

/// Why a batch could not be judged.
#[derive(Debug, Clone, PartialEq)]
pub enum AssessError {
    /// The judge is unavailable: try again later, fail nothing.
    Unavailable(String),
    /// The batch cannot be judged (the judge refuses, or an essay got no verdict at all).
    Failed(String),
}

/// How the pairs of a batch are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strategy {
    /// [`bt::choose_pairs`]: a fixed round-robin, [`COMPARISONS_PER_ESSAY`] per essay.
    RoundRobin,
    /// [`pairing::Waves`]: by information, until stable.
    Adaptive(pairing::Pairing),
}

/// Anchor essays among the candidates: their indexes and known grades on `scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct Anchors {
    pub scale: calibration::Scale,
    /// (candidate index, grade position on the scale)
    pub known: Vec<(usize, usize)>,
}

/// Verdicts asked of the judge at once within a wave (an LLM answers in seconds).
const JUDGE_CONCURRENCY: usize = 8;

/// Judges adaptively chosen pairs (at most `max_comparisons`) and ranks the essays.
pub async fn assess(
    judge: &dyn Judge,
    essays: &[Candidate],
    max_comparisons: usize,
) -> Result<Assessed, AssessError> {
    assess_with(
        judge,
        essays,
        max_comparisons,
        Strategy::Adaptive(pairing::Pairing::default()),
    )
    .await
}

/// [`assess`], then every essay projected onto the anchors' grade scale
/// ([`calibration::project`]); the anchors themselves come back marked, out of the ranks.
pub async fn assess_calibrated(
    judge: &dyn Judge,
    candidates: &[Candidate],
    max_comparisons: usize,
    strategy: Strategy,
    anchors: Option<&Anchors>,
) -> Result<Assessed, AssessError> {
    let anchor_indexes: Vec<usize> = anchors
        .map(|a| a.known.iter().map(|(i, _)| *i).collect())
        .unwrap_or_default();
    let mut assessed = judge_and_rank(
        judge,
        candidates,
        max_comparisons,
        strategy,
        &anchor_indexes,
    )
    .await?;
    let Some(anchors) = anchors.filter(|a| !a.known.is_empty()) else {
        return Ok(assessed);
    };
    let known: Vec<(f64, usize)> = anchors
        .known
        .iter()
        .filter_map(|(i, g)| {
            assessed
                .ranked
                .iter()
                .find(|r| r.essay_id == candidates[*i].essay_id)
                .map(|r| (r.score, *g))
        })
        .collect();
    let (scores, ses): (Vec<f64>, Vec<f64>) = assessed
        .ranked
        .iter()
        .map(|r| (r.score, r.standard_error))
        .unzip();
    let Some(projections) = calibration::project(anchors.scale, &known, &scores, &ses) else {
        return Ok(assessed);
    };
    let anchor_ids: std::collections::HashSet<&str> = anchors
        .known
        .iter()
        .map(|(i, _)| candidates[*i].essay_id.as_str())
        .collect();
    let mut rank = 0;
    for (r, p) in assessed.ranked.iter_mut().zip(projections) {
        r.is_anchor = anchor_ids.contains(r.essay_id.as_str());
        r.grade = p.grade;
        r.confidence_score = p.confidence;
        r.confidence_label = p.label;
        r.normalized_score = p.normalized;
        r.grade_probabilities = p.probabilities;
        if !r.is_anchor {
            rank += 1;
            r.rank = rank;
        }
    }
    assessed.calibration = Some(anchors.scale.id);
    assessed.anchors_used = anchors.known.len();
    Ok(assessed)
}

/// [`assess`] with the pairing `strategy`. A comparison whose answer is not a verdict is lost
/// and the others go on; an essay left without any verdict fails the batch, with the reason.
pub async fn assess_with(
    judge: &dyn Judge,
    essays: &[Candidate],
    max_comparisons: usize,
    strategy: Strategy,
) -> Result<Assessed, AssessError> {
    judge_and_rank(judge, essays, max_comparisons, strategy, &[]).await
}

/// Judges and ranks; `anchor_indexes` are compared more (see `Pairing::anchor_factor`).
async fn judge_and_rank(
    judge: &dyn Judge,
    essays: &[Candidate],
    max_comparisons: usize,
    strategy: Strategy,
    anchor_indexes: &[usize],
) -> Result<Assessed, AssessError> {
    use futures::stream::{self, StreamExt};
    let budget = max_comparisons.max(1);
    let mut fixed = match strategy {
        Strategy::RoundRobin => {
            let mut pairs = bt::choose_pairs(essays.len(), COMPARISONS_PER_ESSAY);
            pairs.truncate(budget);
            Some(pairs)
        }
        Strategy::Adaptive(_) => None,
    };
    let mut waves = match strategy {
        Strategy::Adaptive(p) => {
            Some(pairing::Waves::new(essays.len(), p, budget).with_anchors(anchor_indexes))
        }
        Strategy::RoundRobin => None,
    };
    let mut outcomes = Vec::new();
    let mut comparisons = Vec::new();
    let mut per_essay = vec![0; essays.len()];
    let (mut tokens, mut lost, mut last_loss) = (0, 0, String::new());
    loop {
        let wave = match (&mut fixed, &mut waves) {
            (Some(pairs), _) => std::mem::take(pairs),
            (None, Some(w)) => w.next_wave(),
            (None, None) => unreachable!("one strategy"),
        };
        if wave.is_empty() {
            break;
        }
        let answers: Vec<_> = stream::iter(wave.iter().copied())
            .map(|(a, b)| async move { (a, b, judge.compare(&essays[a], &essays[b]).await) })
            .buffered(JUDGE_CONCURRENCY)
            .collect()
            .await;
        let mut verdicts = Vec::new();
        for (a, b, answer) in answers {
            let j = match answer {
                Ok(j) => j,
                Err(judge::JudgeError::Unavailable(e)) => return Err(AssessError::Unavailable(e)),
                Err(judge::JudgeError::Refused(e)) => {
                    return Err(AssessError::Failed(format!("the judge refused: {e}")))
                }
                Err(e @ judge::JudgeError::Unparseable(_)) => {
                    tracing::warn!(a = essays[a].essay_id, b = essays[b].essay_id, error = %e, "comparison lost");
                    lost += 1;
                    last_loss = e.to_string();
                    continue;
                }
            };
            tokens += j.tokens;
            let (w, l) = if j.a_wins { (a, b) } else { (b, a) };
            verdicts.push((w, l));
            comparisons.push((a, b, w, j.reason));
            per_essay[a] += 1;
            per_essay[b] += 1;
        }
        outcomes.extend_from_slice(&verdicts);
        if let Some(w) = &mut waves {
            w.record(&verdicts);
        }
    }
    if let Some(unjudged) = per_essay.iter().position(|n| *n == 0) {
        return Err(AssessError::Failed(format!(
            "essay {} got no verdict ({} of {} comparisons lost{}; budget {max_comparisons})",
            essays[unjudged].essay_id,
            lost,
            lost + comparisons.len(),
            if last_loss.is_empty() {
                String::new()
            } else {
                format!(", last: {last_loss}")
            }
        )));
    }
    let fit = bt::fit(essays.len(), &outcomes);
    let mut order: Vec<usize> = (0..essays.len()).collect();
    order.sort_by(|&x, &y| {
        fit.scores[y]
            .total_cmp(&fit.scores[x])
            .then(essays[x].essay_id.cmp(&essays[y].essay_id))
    });
    let ranked = order
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            let confidence =
                bt::grade_confidence(fit.scores[i], fit.standard_errors[i], &fit.scores);
            Ranked {
                essay_id: essays[i].essay_id.clone(),
                rank: r + 1,
                score: fit.scores[i],
                standard_error: fit.standard_errors[i],
                grade: bt::grade(fit.scores[i], &fit.scores),
                comparisons: per_essay[i],
                normalized_score: bt::normalized(fit.scores[i], &fit.scores),
                confidence_score: confidence,
                confidence_label: bt::confidence_label(confidence),
                is_anchor: false,
                grade_probabilities: Vec::new(),
            }
        })
        .collect();
    Ok(Assessed {
        ranked,
        comparisons,
        tokens,
        lost,
        calibration: None,
        anchors_used: 0,
    })
}

/// What `prepare` did for a request: the essays and their judging.
struct Judged {
    candidates: Vec<Candidate>,
    outcome: Result<Assessed, String>,
    seconds: f64,
}

impl CjAssessment {
    pub async fn open(
        db: ServiceDb,
        judge: Arc<dyn Judge>,
        content: ContentClient,
    ) -> Result<Self, DbError> {
        db.execute_script(SCHEMA).await?;
        // Added after the first release: a database made by it gains them.
        db.add_column("cj_batches", "user_id", "TEXT").await?;
        db.add_column("cj_batches", "judge", "TEXT").await?;
        db.execute_script(anchors::SCHEMA).await?;
        // A judge that costs (an LLM) is asked each pair once, whatever is redelivered.
        let judge: Arc<dyn Judge> = if judge.costly() {
            Arc::new(cache::CachingJudge::new(judge, db.clone()).await?)
        } else {
            judge
        };
        Ok(Self {
            db,
            judge,
            content,
            prepared: Prepared::new(16),
            max_comparisons: DEFAULT_MAX_COMPARISONS,
        })
    }

    /// The most comparisons one batch may ask of the judge.
    pub fn with_max_comparisons(mut self, max: usize) -> Self {
        self.max_comparisons = max.max(1);
        self
    }

    /// Fetches and judges the request's essays. An unavailable judge is an outage (the
    /// request is retried later, no attempt counted); a batch that cannot be judged is an
    /// outcome (`cj_assessment.failed` with the reason).
    async fn judge_batch(&self, req: &Requested) -> Result<Judged, HandlerError> {
        let started = std::time::Instant::now();
        let mut candidates = self.fetch(&req.essays_for_cj).await?;
        let anchors = self.anchors_for(req, &mut candidates).await?;
        // The assignment's assessment: what the judge is told (the configured default if none).
        let assessment = match (&req.user_id, &req.assignment_id) {
            (Some(user), Some(assignment)) => self.assessment(user, assignment).await?,
            _ => judge::Assessment::default(),
        };
        let judge = judge::InAssessment {
            judge: self.judge.clone(),
            assessment,
        };
        let outcome = match assess_calibrated(
            &judge,
            &candidates,
            self.max_comparisons,
            Strategy::Adaptive(pairing::Pairing::default()),
            anchors.as_ref(),
        )
        .await
        {
            Ok(assessed) => Ok(assessed),
            Err(AssessError::Unavailable(e)) => {
                return Err(HandlerError::unavailable(format!(
                    "CJ judge {}: {e}; the batch waits for it",
                    self.judge.name()
                )))
            }
            Err(AssessError::Failed(reason)) => Err(reason),
        };
        Ok(Judged {
            candidates,
            outcome,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Every essay of the request with its text.
    async fn fetch(&self, essays: &[EssayIn]) -> Result<Vec<Candidate>, HandlerError> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        // Owned inputs: a stream borrowing `essays` would not be `Send` for the runner.
        let work: Vec<(String, String, Option<u32>)> = essays
            .iter()
            .map(|e| {
                (
                    e.essay_id.clone(),
                    e.text_storage_id.clone(),
                    e.spelling_errors,
                )
            })
            .collect();
        stream::iter(work)
            .map(|(essay_id, storage_id, spelling_errors)| {
                let content = self.content.clone();
                async move {
                    let text = content.fetch_text(&storage_id).await?;
                    Ok::<_, HandlerError>(Candidate {
                        essay_id,
                        text_storage_id: storage_id,
                        text,
                        spelling_errors,
                    })
                }
            })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await
    }

    pub fn db(&self) -> &ServiceDb {
        &self.db
    }

    /// One key per batch and run: a repeated finalisation of a run publishes nothing.
    fn keyed(event: NewEvent, what: &str, batch_id: &str, run: i64) -> NewEvent {
        event.with_idempotency_key(format!("{what}:{batch_id}:{run}"))
    }

    async fn fail(
        &self,
        tx: &mut Tx,
        cj_batch_id: &str,
        req: &Requested,
        correlation: Uuid,
        reason: String,
    ) -> Result<(), HandlerError> {
        let (batch_id, run) = (&req.batch_id, req.run);
        tx.execute("UPDATE cj_batches SET status = 'FAILED', failure_reason = $2, completed_at = $3 WHERE cj_batch_id = $1",
                   params![cj_batch_id, &reason, now_ms()]).await?;
        let e = EVENTS.event(
            topics::CJ_FAILED,
            ("batch", batch_id),
            correlation,
            &json!({"event_name": "cj_assessment.failed", "entity_id": batch_id,
                    "entity_type": "batch", "parent_id": null, "timestamp": utc_timestamp(),
                    "status": "failed_critically",
                    "system_metadata": {
                        "entity_id": batch_id, "entity_type": "batch", "parent_id": null,
                        "timestamp": utc_timestamp(), "processing_stage": "failed",
                        "started_at": null, "completed_at": utc_timestamp(),
                        "event": "cj_assessment.failed", "error_info": {"reason": reason}},
                    "cj_assessment_job_id": cj_batch_id,
                    "batch_id": batch_id, "cj_batch_id": cj_batch_id, "run": run,
                    "reason": reason}),
        )?;
        tx.enqueue(&Self::keyed(e, "cj-failed", batch_id, run))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Service for CjAssessment {
    fn name(&self) -> &'static str {
        NAME
    }

    fn consumes(&self) -> &'static [&'static str] {
        &[topics::CJ_REQUESTED]
    }

    fn router(self: Arc<Self>) -> Option<axum::Router> {
        Some(http::router(self))
    }

    /// Fetching and judging (an LLM: seconds per comparison) run before the transaction.
    async fn prepare(&self, env: &Envelope) -> Result<(), HandlerError> {
        let req: Requested = env.data()?;
        if req.essays_for_cj.len() < 2 {
            return Ok(()); // nothing to judge: `handle` reports it
        }
        let judged = self.judge_batch(&req).await?;
        self.prepared.put(env.event_id, judged);
        Ok(())
    }

    async fn handle(&self, tx: &mut Tx, env: &Envelope) -> Result<(), HandlerError> {
        let req: Requested = env.data()?;
        let essay_count = req.essays_for_cj.len();
        let cj_batch_id = Uuid::new_v4().to_string();
        let fresh = tx
            .execute(
                "INSERT INTO cj_batches (cj_batch_id, batch_id, run, status, essay_count, created_at,
                                         user_id, judge)
                 VALUES ($1, $2, $3, 'RUNNING', $4, $5, $6, $7) ON CONFLICT (batch_id, run) DO NOTHING",
                params![&cj_batch_id, &req.batch_id, req.run, essay_count, now_ms(),
                        req.user_id.clone(), self.judge.name()],
            )
            .await?;
        if fresh == 0 {
            return Ok(()); // this run was assessed before; its results went out then
        }
        if essay_count < 2 {
            let reason =
                format!("comparative judgement needs at least 2 essays, got {essay_count}");
            return self
                .fail(tx, &cj_batch_id, &req, env.correlation_id, reason)
                .await;
        }
        let Judged {
            candidates,
            outcome,
            seconds,
        } = match self.prepared.take(&env.event_id) {
            Some(judged) => judged,
            None => self.judge_batch(&req).await?,
        };
        let Assessed {
            ranked,
            comparisons,
            tokens,
            lost,
            calibration,
            anchors_used,
        } = match outcome {
            Ok(assessed) => assessed,
            Err(reason) => {
                return self
                    .fail(tx, &cj_batch_id, &req, env.correlation_id, reason)
                    .await
            }
        };
        for (a, b, w, reason) in &comparisons {
            tx.execute(
                "INSERT INTO cj_comparisons (cj_batch_id, essay_a, essay_b, winner, reason) VALUES ($1, $2, $3, $4, $5)",
                params![&cj_batch_id, &candidates[*a].essay_id, &candidates[*b].essay_id, &candidates[*w].essay_id, reason],
            )
            .await?;
        }
        for r in ranked.iter().filter(|r| !r.is_anchor) {
            tx.execute(
                "INSERT INTO cj_results (cj_batch_id, essay_id, essay_rank, score, standard_error, grade)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                params![&cj_batch_id, &r.essay_id, r.rank, r.score, r.standard_error, r.grade],
            )
            .await?;
        }
        // Finalise: the status change and its three events commit together, once.
        let finalised = tx
            .execute(
                "UPDATE cj_batches SET status = 'COMPLETED', comparisons = $2, completed_at = $3
                 WHERE cj_batch_id = $1 AND status = 'RUNNING'",
                params![&cj_batch_id, comparisons.len(), now_ms()],
            )
            .await?;
        if finalised == 0 {
            return Ok(());
        }
        let (b, run) = (&req.batch_id, req.run);
        let c = env.correlation_id;
        let ids: Vec<&str> = ranked
            .iter()
            .filter(|r| !r.is_anchor)
            .map(|r| r.essay_id.as_str())
            .collect();
        // The original's `CJAssessmentCompletedV1`, `AssessmentResultV1` and
        // `ResourceConsumptionV1`; `batch_id`, `run`, `cj_batch_id` are this platform's extras.
        let completed = EVENTS.event(topics::CJ_COMPLETED, ("batch", b), c,
            &json!({"event_name": "cj_assessment.completed", "entity_id": b, "entity_type": "batch",
                    "parent_id": null, "timestamp": utc_timestamp(), "status": "completed_successfully",
                    "system_metadata": system_metadata(b, "batch", None, "cj_assessment.completed", Some("completed")),
                    "cj_assessment_job_id": cj_batch_id,
                    "processing_summary": {"total_essays": ids.len(), "successful": ids.len(), "failed": 0,
                                           "successful_essay_ids": ids, "failed_essay_ids": [],
                                           "processing_time_seconds": seconds,
                                           "single_essay_batch": ids.len() == 1},
                    "batch_id": b, "cj_batch_id": cj_batch_id, "run": run, "ranked_essay_ids": ids}))?;
        let essay_results: Vec<serde_json::Value> = ranked
            .iter()
            .map(|r| {
                json!({
            "essay_id": r.essay_id, "normalized_score": r.normalized_score, "letter_grade": r.grade,
            "confidence_score": r.confidence_score, "confidence_label": r.confidence_label,
            "bt_score": r.score, "rank": r.rank, "is_anchor": r.is_anchor, "feedback_uri": null,
            "metrics_uri": null,
            "display_name": r.is_anchor.then(|| format!("ANCHOR GRADE {}", r.grade)),
            "grade_probabilities": (!r.grade_probabilities.is_empty()).then(|| {
                r.grade_probabilities.iter().map(|(g, p)| (g.to_string(), json!(p)))
                    .collect::<serde_json::Map<String, serde_json::Value>>()
            }),
            "score": r.score, "standard_error": r.standard_error, "grade": r.grade,
            "comparisons": r.comparisons})
            })
            .collect();
        let results = EVENTS.event(topics::ASSESSMENT_RESULT_PUBLISHED, ("batch", b), c,
            &json!({"event_name": "assessment.result.published", "entity_id": b, "entity_type": "batch",
                    "parent_id": null, "timestamp": utc_timestamp(), "batch_id": b,
                    "cj_assessment_job_id": cj_batch_id, "assignment_id": req.assignment_id,
                    "assessment_method": "cj_assessment", "model_used": self.judge.name(),
                    "model_provider": "local", "model_version": null, "essay_results": essay_results,
                    "assessment_metadata": {"anchor_essays_used": anchors_used,
                                            "calibration_method": if calibration.is_some() { "anchor" } else { "batch_relative" },
                                            "grade_scale": calibration,
                                            "comparison_count": comparisons.len(),
                                            "comparisons_without_verdict": lost,
                                            "processing_duration_seconds": seconds},
                    "cj_batch_id": cj_batch_id, "judge": self.judge.name(), "comparisons": comparisons.len()}))?;
        let usage = EVENTS.event(topics::RESOURCE_CONSUMPTION, ("batch", b), c,
            &json!({"event_name": "resource.consumption.reported", "entity_id": b, "entity_type": "batch",
                    "parent_id": null, "timestamp": utc_timestamp(), "user_id": req.user_id,
                    "org_id": null, "resource_type": "cj_comparison", "quantity": comparisons.len(),
                    "service_name": NAME, "processing_id": cj_batch_id, "consumed_at": utc_timestamp(),
                    "batch_id": b, "judge": self.judge.name()}))?;
        tx.enqueue(&Self::keyed(completed, "cj-completed", b, run))
            .await?;
        tx.enqueue(&Self::keyed(results, "cj-results", b, run))
            .await?;
        tx.enqueue(&Self::keyed(usage, "cj-usage", b, run)).await?;
        if tokens > 0 {
            // What the judge's model used, for the original's Entitlements Service.
            let spent = EVENTS.event(
                topics::RESOURCE_CONSUMPTION,
                ("batch", b),
                c,
                &json!({"event_name": "resource.consumption.reported", "entity_id": b,
                        "entity_type": "batch", "parent_id": null, "timestamp": utc_timestamp(),
                        "user_id": req.user_id, "org_id": null, "resource_type": "llm_tokens",
                        "quantity": tokens, "service_name": NAME, "processing_id": cj_batch_id,
                        "consumed_at": utc_timestamp(), "batch_id": b, "judge": self.judge.name()}),
            )?;
            tx.enqueue(&Self::keyed(spent, "cj-tokens", b, run)).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ranks_every_essay_once_with_grades() {
        let essays: Vec<Candidate> = (0..6)
            .map(|i| Candidate {
                essay_id: format!("e{i}"),
                text_storage_id: format!("t{i}"),
                // Distinct words in 15-word sentences; longer with fewer errors = better.
                text: (0..20 + i * 30)
                    .map(|k| format!("term{k}"))
                    .collect::<Vec<_>>()
                    .chunks(15)
                    .map(|s| s.join(" ") + ".")
                    .collect::<Vec<_>>()
                    .join(" "),
                spelling_errors: Some(6 - i as u32),
            })
            .collect();
        let Assessed {
            ranked,
            comparisons,
            ..
        } = assess(
            &judge::FeatureJudge::new(),
            &essays,
            DEFAULT_MAX_COMPARISONS,
        )
        .await
        .unwrap();
        assert_eq!(ranked.len(), 6);
        assert_eq!(
            ranked.iter().map(|r| r.rank).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(ranked[0].essay_id, "e5", "longest with fewest errors wins");
        assert_eq!(ranked[5].essay_id, "e0");
        assert!(comparisons.len() >= 6);
        assert!(ranked
            .iter()
            .all(|r| r.standard_error > 0.0 && r.comparisons >= 4));
    }
}
