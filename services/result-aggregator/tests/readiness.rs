//! Results ready means ready: `batch.pipeline.completed` and the results it stands for arrive
//! on different topics in either order; `ras.batch.results.ready` goes out once, after both,
//! with every ranked essay counted, or at the deadline naming what is missing.

use std::time::Duration;

use essay_common::identity::Caller;
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::{params, ServiceDb};
use result_aggregator::ResultAggregator;
use serde_json::{json, Value};
use uuid::Uuid;

fn envelope(source: &'static str, topic: &'static str, batch_id: &str, data: Value) -> Envelope {
    let e = EventFactory::new(source)
        .event(topic, ("batch", batch_id), Uuid::new_v4(), &data)
        .unwrap();
    serde_json::from_slice(e.payload()).unwrap()
}

async fn deliver(ras: &ResultAggregator, db: &ServiceDb, env: &Envelope) {
    let mut tx = db.begin().await.unwrap();
    ras.handle(&mut tx, env).await.expect("handled");
    tx.commit().await.unwrap();
}

async fn announcements(db: &ServiceDb) -> Vec<Value> {
    db.fetch_all(
        "SELECT payload FROM event_outbox WHERE topic = $1 ORDER BY seq",
        params![topics::RESULTS_READY],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_slice::<Value>(&r.bytes("payload").unwrap()).unwrap()["data"].clone())
    .collect()
}

/// A batch of two essays: its registration, then (in `order`) its completion and its results.
struct Batch {
    id: String,
    essays: [String; 2],
}

impl Batch {
    fn new() -> Self {
        Self {
            id: Uuid::new_v4().to_string(),
            essays: [Uuid::new_v4().to_string(), Uuid::new_v4().to_string()],
        }
    }

    fn registered(&self) -> Envelope {
        envelope(
            "batch_orchestrator_service",
            topics::BATCH_ESSAYS_REGISTERED,
            &self.id,
            json!({"batch_id": self.id, "essay_ids": self.essays, "course_code": "ENG5",
                   "user_id": "t1"}),
        )
    }

    fn outcomes(&self) -> Vec<Envelope> {
        ["spellcheck", "cj_assessment"]
            .iter()
            .map(|phase| {
                envelope(
                    "essay_lifecycle_service",
                    topics::PHASE_OUTCOME,
                    &self.id,
                    json!({"batch_id": self.id, "phase_name": phase,
                           "phase_status": "completed_successfully",
                           "processed_essays": self.essays.iter().map(|e| json!({"essay_id": e})).collect::<Vec<_>>(),
                           "failed_essay_ids": []}),
                )
            })
            .collect()
    }

    fn spellchecks(&self) -> Vec<Envelope> {
        self.essays
            .iter()
            .map(|e| {
                envelope(
                    "spell_checker_service",
                    topics::SPELLCHECK_RESULTS,
                    &self.id,
                    json!({"batch_id": self.id, "entity_id": e, "corrections_made": 3,
                           "correction_metrics": {"word_count": 200}}),
                )
            })
            .collect()
    }

    fn rankings(&self) -> Envelope {
        envelope(
            "cj_assessment_service",
            topics::ASSESSMENT_RESULT_PUBLISHED,
            &self.id,
            json!({"batch_id": self.id, "essay_results": [
                {"essay_id": self.essays[0], "rank": 1, "bt_score": 1.0, "standard_error": 0.5,
                 "letter_grade": "A", "normalized_score": 1.0, "confidence_score": 0.9,
                 "confidence_label": "HIGH"},
                {"essay_id": self.essays[1], "rank": 2, "bt_score": -1.0, "standard_error": 0.5,
                 "letter_grade": "C", "normalized_score": 0.0, "confidence_score": 0.6,
                 "confidence_label": "MID"}]}),
        )
    }

    fn completed(&self) -> Envelope {
        envelope(
            "batch_orchestrator_service",
            topics::PIPELINE_COMPLETED,
            &self.id,
            json!({"batch_id": self.id, "status": "COMPLETED",
                   "completed_phases": ["spellcheck", "cj_assessment"]}),
        )
    }
}

async fn open(deadline: Duration) -> (ResultAggregator, ServiceDb, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ras-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = ServiceDb::open(&format!("sqlite://{}/ras.db", dir.display()), "ras")
        .await
        .unwrap();
    let ras = ResultAggregator::open(db.clone())
        .await
        .unwrap()
        .with_results_deadline(deadline);
    (ras, db, dir)
}

#[tokio::test]
async fn completion_first_waits_for_the_results() {
    let (ras, db, dir) = open(Duration::from_secs(300)).await;
    let b = Batch::new();
    deliver(&ras, &db, &b.registered()).await;
    deliver(&ras, &db, &b.completed()).await;
    assert!(
        announcements(&db).await.is_empty(),
        "no phase outcome, no results yet"
    );
    for e in b.outcomes() {
        deliver(&ras, &db, &e).await;
    }
    assert!(
        announcements(&db).await.is_empty(),
        "outcomes without results"
    );
    for e in b.spellchecks() {
        deliver(&ras, &db, &e).await;
    }
    assert!(
        announcements(&db).await.is_empty(),
        "spelling without rankings"
    );
    deliver(&ras, &db, &b.rankings()).await;
    let sent = announcements(&db).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["ranked_essays"], 2);
    assert_eq!(sent[0]["missing"], json!([]));
    // Nothing later announces again.
    deliver(&ras, &db, &b.rankings()).await;
    assert_eq!(announcements(&db).await.len(), 1);
    assert_eq!(ras.announce_overdue().await.unwrap(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn results_first_are_announced_at_the_completion() {
    let (ras, db, dir) = open(Duration::from_secs(300)).await;
    let b = Batch::new();
    deliver(&ras, &db, &b.rankings()).await;
    for e in b.spellchecks().into_iter().chain(b.outcomes()) {
        deliver(&ras, &db, &e).await;
    }
    deliver(&ras, &db, &b.registered()).await;
    assert!(announcements(&db).await.is_empty(), "no completion yet");
    deliver(&ras, &db, &b.completed()).await;
    let sent = announcements(&db).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["ranked_essays"], 2);
    let view = ras.results(&Caller("t1".into()), &b.id).await.unwrap();
    assert_eq!(view["status"], "COMPLETED");
    assert_eq!(view["essays"][0]["rank"], 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn missing_results_are_named_at_the_deadline() {
    let (ras, db, dir) = open(Duration::ZERO).await;
    let b = Batch::new();
    deliver(&ras, &db, &b.registered()).await;
    for e in b.outcomes().into_iter().chain(b.spellchecks()) {
        deliver(&ras, &db, &e).await;
    }
    deliver(&ras, &db, &b.completed()).await;
    assert!(
        announcements(&db).await.is_empty(),
        "the rankings never came"
    );
    assert_eq!(ras.announce_overdue().await.unwrap(), 1);
    let sent = announcements(&db).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["ranked_essays"], 0);
    assert_eq!(sent[0]["missing"], json!(["the CJ rankings"]));
    let view = ras.results(&Caller("t1".into()), &b.id).await.unwrap();
    assert_eq!(view["missing_results"], json!(["the CJ rankings"]));
    let refused = ras.results(&Caller("t2".into()), &b.id).await.unwrap_err();
    assert_eq!(refused.0.as_u16(), 403);
    let _ = std::fs::remove_dir_all(dir);
}
