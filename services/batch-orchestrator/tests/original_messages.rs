//! The original's messages to Batch Orchestrator, as its Essay Lifecycle sends them (its
//! examples re-addressed to a batch registered here), each with the original's effect:
//! provisioning makes a GUEST batch ready and names the essays the first command processes;
//! a phase outcome starts the next phase with the texts that phase produced; excess content is
//! counted; a REGULAR batch asks for student matching, then becomes ready when its essays are.

use batch_orchestrator::{BatchOrchestrator, PipelineRequest, RegisterBatch};
use essay_common::identity::Caller;
use essay_common::original::{envelope, ids};
use essay_common::{topics, Envelope, Service};
use outbox::portable::{params, ServiceDb};
use serde_json::{json, Value};
use uuid::Uuid;

async fn deliver(bos: &BatchOrchestrator, db: &ServiceDb, env: &Envelope) {
    let mut tx = db.begin().await.unwrap();
    bos.handle(&mut tx, env).await.expect("handled");
    tx.commit().await.unwrap();
}

async fn last(db: &ServiceDb, topic: &str) -> Option<Value> {
    db.fetch_optional(
        "SELECT payload FROM event_outbox WHERE topic = $1 ORDER BY seq DESC LIMIT 1",
        params![topic],
    )
    .await
    .unwrap()
    .map(|r| serde_json::from_slice::<Value>(&r.bytes("payload").unwrap()).unwrap())
}

fn texts(command: &Value) -> Vec<String> {
    command["data"]["essays_to_process"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text_storage_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_originals_essay_lifecycle_drives_this_orchestrator() {
    let dir = std::env::temp_dir().join(format!("bos-original-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = ServiceDb::open(&format!("sqlite://{}/bos.db", dir.display()), "bos")
        .await
        .unwrap();
    let bos = BatchOrchestrator::open(db.clone()).await.unwrap();
    let teacher = Caller("d612f8f2-a18d-5b68-b07d-13a9da5dde8b".into());
    let register = |class: Option<&str>| -> RegisterBatch {
        serde_json::from_value(
            json!({"course_code": "ENG5", "expected_essay_count": 2, "class_id": class}),
        )
        .unwrap()
    };

    // GUEST: the pipeline waits for provisioning.
    let b = bos
        .register(&teacher, register(None))
        .await
        .unwrap()
        .batch_id;
    bos.request_pipeline(&teacher, &b, PipelineRequest::named("cj_assessment"))
        .await
        .unwrap();
    let command = last(&db, topics::CLIENT_PIPELINE_REQUEST).await.unwrap();
    deliver(&bos, &db, &serde_json::from_value(command).unwrap()).await;
    deliver(
        &bos,
        &db,
        &envelope(topics::PROVISIONING_COMPLETED, &[(ids::BATCH, &b)]),
    )
    .await;
    let status = bos.status(&teacher, &b).await.unwrap();
    assert_eq!(status["status"], "READY");
    let spellcheck = last(&db, topics::SPELLCHECK_INITIATE).await.unwrap();
    assert_eq!(
        texts(&spellcheck),
        [ids::TEXT_1, ids::TEXT_2],
        "the original's essays"
    );
    assert_eq!(spellcheck["data"]["language"], "en");

    // The spellcheck phase's outcome: CJ starts on the corrected texts.
    deliver(
        &bos,
        &db,
        &envelope(topics::PHASE_OUTCOME, &[(ids::BATCH, &b)]),
    )
    .await;
    let cj = last(&db, topics::CJ_INITIATE).await.expect("CJ started");
    assert_eq!(texts(&cj), [ids::CORRECTED_1, ids::CORRECTED_2]);
    assert_eq!(cj["data"]["class_type"], "GUEST");
    let status = bos.status(&teacher, &b).await.unwrap();
    assert_eq!(status["completed_phases"], json!(["spellcheck"]));

    // Excess content is counted.
    deliver(
        &bos,
        &db,
        &envelope(topics::EXCESS_CONTENT, &[(ids::BATCH, &b)]),
    )
    .await;
    assert_eq!(bos.status(&teacher, &b).await.unwrap()["excess_files"], 1);

    // REGULAR: provisioning asks for student matching with the essays; ready when they are.
    let regular = bos
        .register(&teacher, register(Some(ids::CLASS)))
        .await
        .unwrap()
        .batch_id;
    deliver(
        &bos,
        &db,
        &envelope(topics::PROVISIONING_COMPLETED, &[(ids::BATCH, &regular)]),
    )
    .await;
    assert_eq!(
        bos.status(&teacher, &regular).await.unwrap()["status"],
        "AWAITING_STUDENT_MATCHING"
    );
    let matching = last(&db, topics::MATCHING_INITIATE).await.unwrap();
    assert_eq!(texts(&matching), [ids::TEXT_1, ids::TEXT_2]);
    assert_eq!(matching["data"]["class_id"], ids::CLASS);
    deliver(
        &bos,
        &db,
        &envelope(topics::ASSOCIATIONS_CONFIRMED, &[(ids::BATCH, &regular)]),
    )
    .await;
    deliver(
        &bos,
        &db,
        &envelope(topics::BATCH_ESSAYS_READY, &[(ids::BATCH, &regular)]),
    )
    .await;
    assert_eq!(
        bos.status(&teacher, &regular).await.unwrap()["status"],
        "READY"
    );
    let _ = std::fs::remove_dir_all(dir);
}
