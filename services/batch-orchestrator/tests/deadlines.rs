//! No batch waits forever at Batch Orchestrator: provisioning that ends with no essay fails the
//! batch (and the pipeline waiting for it) with a reason; a phase without an outcome by its
//! deadline fails the pipeline with a reason, a late outcome is then ignored, and a retry runs
//! the phase again. Driven through the service's own handler, on SQLite.

use std::time::Duration;

use batch_orchestrator::{BatchOrchestrator, PipelineRequest, RegisterBatch};
use essay_common::identity::Caller;
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::{params, ServiceDb};
use serde_json::{json, Value};
use uuid::Uuid;

fn envelope(topic: &'static str, batch_id: &str, data: Value) -> Envelope {
    let e = EventFactory::new("essay_lifecycle_service")
        .event(topic, ("batch", batch_id), Uuid::new_v4(), &data)
        .unwrap();
    serde_json::from_slice(e.payload()).unwrap()
}

async fn deliver(bos: &BatchOrchestrator, db: &ServiceDb, env: &Envelope) {
    let mut tx = db.begin().await.unwrap();
    bos.handle(&mut tx, env).await.expect("handled");
    tx.commit().await.unwrap();
}

/// The pipeline command as the HTTP endpoint enqueued it (the relay would carry it here).
async fn take_command(db: &ServiceDb) -> Envelope {
    let row = db
        .fetch_optional(
            "SELECT payload FROM event_outbox WHERE topic = $1 ORDER BY seq DESC LIMIT 1",
            params![topics::CLIENT_PIPELINE_REQUEST],
        )
        .await
        .unwrap()
        .expect("a command");
    serde_json::from_slice(&row.bytes("payload").unwrap()).unwrap()
}

async fn published(db: &ServiceDb, topic: &str) -> Vec<Value> {
    db.fetch_all(
        "SELECT payload FROM event_outbox WHERE topic = $1 ORDER BY seq",
        params![topic],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let env: Value = serde_json::from_slice(&r.bytes("payload").unwrap()).unwrap();
        env["data"].clone()
    })
    .collect()
}

async fn open(
    tag: &str,
    phase_timeout: Duration,
) -> (BatchOrchestrator, ServiceDb, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("bos-{tag}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = ServiceDb::open(&format!("sqlite://{}/bos.db", dir.display()), "bos")
        .await
        .unwrap();
    let bos = BatchOrchestrator::open(db.clone())
        .await
        .unwrap()
        .with_phase_timeout(phase_timeout);
    (bos, db, dir)
}

fn register() -> RegisterBatch {
    serde_json::from_value(json!({"course_code": "ENG5", "expected_essay_count": 2})).unwrap()
}

#[tokio::test]
async fn a_phase_without_an_outcome_fails_its_pipeline_and_a_retry_runs_it_again() {
    // A zero timeout: the phase is overdue as soon as it starts.
    let (bos, db, dir) = open("phase", Duration::ZERO).await;
    let teacher = Caller("t1".into());
    let batch = bos.register(&teacher, register()).await.unwrap().batch_id;
    bos.request_pipeline(&teacher, &batch, PipelineRequest::named("spellcheck"))
        .await
        .unwrap();
    deliver(&bos, &db, &take_command(&db).await).await;
    deliver(
        &bos,
        &db,
        &envelope(
            topics::PROVISIONING_COMPLETED,
            &batch,
            json!({"batch_id": batch, "provisioned_count": 2, "expected_count": 2}),
        ),
    )
    .await;
    assert_eq!(published(&db, topics::SPELLCHECK_INITIATE).await.len(), 1);
    let status = bos.status(&teacher, &batch).await.unwrap();
    assert_eq!(status["pipeline"]["status"], "RUNNING");
    assert!(
        status["pipeline"]["phase_deadline_ms"].is_i64(),
        "{status:#}"
    );

    assert_eq!(bos.fail_overdue_phases().await.unwrap(), 1);
    assert_eq!(bos.fail_overdue_phases().await.unwrap(), 0, "once");
    let status = bos.status(&teacher, &batch).await.unwrap();
    assert_eq!(status["pipeline"]["status"], "FAILED");
    let reason = status["pipeline"]["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("spellcheck reported no outcome"),
        "{reason}"
    );
    let completed = published(&db, topics::PIPELINE_COMPLETED).await;
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0]["status"], "FAILED");
    assert_eq!(completed[0]["failure_reason"], reason);

    // The outcome, late: stale, changes nothing.
    let late = envelope(
        topics::PHASE_OUTCOME,
        &batch,
        json!({"batch_id": batch, "phase_name": "spellcheck", "phase_status": "completed_successfully",
               "processed_essays": [], "failed_essay_ids": []}),
    );
    deliver(&bos, &db, &late).await;
    assert_eq!(
        bos.status(&teacher, &batch).await.unwrap()["pipeline"]["status"],
        "FAILED"
    );
    assert_eq!(published(&db, topics::PIPELINE_COMPLETED).await.len(), 1);

    // A retry runs the phase again; its outcome completes the pipeline.
    let retry = PipelineRequest {
        is_retry: true,
        ..PipelineRequest::named("spellcheck")
    };
    bos.request_pipeline(&teacher, &batch, retry).await.unwrap();
    deliver(&bos, &db, &take_command(&db).await).await;
    assert_eq!(published(&db, topics::SPELLCHECK_INITIATE).await.len(), 2);
    let outcome = envelope(
        topics::PHASE_OUTCOME,
        &batch,
        json!({"batch_id": batch, "phase_name": "spellcheck", "phase_status": "completed_successfully",
               "processed_essays": [], "failed_essay_ids": []}),
    );
    deliver(&bos, &db, &outcome).await;
    let status = bos.status(&teacher, &batch).await.unwrap();
    assert_eq!(status["pipeline"]["status"], "COMPLETED", "{status:#}");
    assert_eq!(status["pipeline"]["failure_reason"], Value::Null);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn provisioning_with_no_essay_fails_the_batch_and_its_waiting_pipeline() {
    let (bos, db, dir) = open("empty", Duration::from_secs(3600)).await;
    let teacher = Caller("t1".into());
    let batch = bos.register(&teacher, register()).await.unwrap().batch_id;
    bos.request_pipeline(&teacher, &batch, PipelineRequest::named("cj_assessment"))
        .await
        .unwrap();
    deliver(&bos, &db, &take_command(&db).await).await;
    // Essay Lifecycle's deadline passed with nothing uploaded.
    deliver(
        &bos,
        &db,
        &envelope(
            topics::PROVISIONING_COMPLETED,
            &batch,
            json!({"batch_id": batch, "provisioned_count": 0, "expected_count": 2, "timed_out": true}),
        ),
    )
    .await;
    let status = bos.status(&teacher, &batch).await.unwrap();
    assert_eq!(status["status"], "FAILED");
    let reason = status["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("before the provisioning deadline"),
        "{reason}"
    );
    assert_eq!(status["pipeline"]["status"], "FAILED");
    assert!(
        published(&db, topics::SPELLCHECK_INITIATE).await.is_empty(),
        "nothing ran"
    );
    let completed = published(&db, topics::PIPELINE_COMPLETED).await;
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0]["status"], "FAILED");
    // A failed batch takes no more pipelines: 409 over HTTP, a denial over Kafka.
    let refused = bos
        .request_pipeline(&teacher, &batch, PipelineRequest::named("spellcheck"))
        .await
        .unwrap_err();
    assert_eq!(refused.0.as_u16(), 409, "{}", refused.1);
    let _ = std::fs::remove_dir_all(dir);
}
