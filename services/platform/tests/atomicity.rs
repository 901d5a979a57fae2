//! Every critical event is written in the same transaction as its state change, on real
//! PostgreSQL: when the event cannot be written the state change is gone too, a rolled-back
//! handler leaves neither, and repeated deliveries or finalisations add nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use batch_orchestrator::testing::LocalBatchOrchestrator;
use common::*;
use content_service::testing::LocalContentService;
use essay_common::content::ContentClient;
use essay_common::identity::Caller;
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::backend::Database;
use outbox::portable::ServiceDb;
use serde_json::json;
use uuid::Uuid;

struct Schemas {
    prefix: String,
}

impl Schemas {
    fn new() -> Self {
        Self {
            prefix: format!("t{}_atom_", &Uuid::new_v4().simple().to_string()[..8]),
        }
    }

    async fn db(&self, service: &str) -> ServiceDb {
        ServiceDb::open(&database_url(), &format!("{}{service}", self.prefix))
            .await
            .expect("open")
    }

    async fn drop(self) {
        drop_schemas(&essay_common::runtime::DataLocation::Server {
            url: database_url(),
            schema_prefix: self.prefix,
        })
        .await;
    }
}

fn schema_of(db: &ServiceDb) -> String {
    match db.database() {
        Database::Postgres { schema, .. } => schema.name().to_owned(),
        Database::Sqlite { .. } | Database::MySql { .. } => unreachable!("PostgreSQL tests"),
    }
}

/// Makes every outbox insert of `db` fail (as a full disk or a lost connection would).
async fn refuse_events(db: &ServiceDb, refuse: bool) {
    let s = schema_of(db);
    let sql = if refuse {
        format!(
            "CREATE OR REPLACE FUNCTION \"{s}\".refuse_event() RETURNS trigger LANGUAGE plpgsql
               AS $$ BEGIN RAISE EXCEPTION 'injected: the outbox refuses this event'; END $$;
             CREATE TRIGGER refuse_event BEFORE INSERT ON \"{s}\".event_outbox
               FOR EACH ROW EXECUTE FUNCTION \"{s}\".refuse_event();"
        )
    } else {
        format!("DROP TRIGGER refuse_event ON \"{s}\".event_outbox")
    };
    db.execute_script(&sql).await.expect("trigger");
}

async fn n(db: &ServiceDb, sql: &str) -> i64 {
    db.fetch_optional(sql, &[])
        .await
        .unwrap()
        .unwrap()
        .int("n")
        .unwrap()
}

async fn outbox_topics(db: &ServiceDb) -> Vec<String> {
    db.fetch_all("SELECT topic FROM event_outbox ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.text("topic").unwrap())
        .collect()
}

fn envelope(
    source: &'static str,
    topic: &'static str,
    aggregate: (&str, &str),
    data: serde_json::Value,
) -> Envelope {
    let e = EventFactory::new(source)
        .event(topic, aggregate, Uuid::new_v4(), &data)
        .unwrap();
    serde_json::from_slice(e.payload()).unwrap()
}

/// Stores `text` in the Content Service; its storage id.
async fn stored(content: &ContentClient, text: &str) -> String {
    content
        .store(text.as_bytes().to_vec(), "text/plain", Uuid::new_v4())
        .await
        .unwrap()
        .to_string()
}

/// Applies `env` in a transaction, then rolls back or commits; `prepare` first, as the inbox
/// calls it.
async fn apply_prepared(service: &dyn Service, db: &ServiceDb, env: &Envelope, commit: bool) {
    service.prepare(env).await.expect("prepare");
    apply(service, db, env, commit).await
}

/// Applies `env` in a transaction, then rolls back or commits.
async fn apply(service: &dyn Service, db: &ServiceDb, env: &Envelope, commit: bool) {
    let mut tx = db.begin().await.unwrap();
    service.handle(&mut tx, env).await.expect("handler");
    if commit {
        tx.commit().await.unwrap()
    } else {
        tx.rollback().await.unwrap()
    }
}

#[tokio::test]
async fn http_writes_commit_with_their_events() {
    let schemas = Schemas::new();
    let content_dir = temp_dir("atomicity-content");
    let content = LocalContentService::start(&content_dir).await;

    let db = schemas.db(batch_orchestrator::NAME).await;
    let bos = Arc::new(
        batch_orchestrator::BatchOrchestrator::open(db.clone())
            .await
            .unwrap(),
    );
    let teacher = Caller("teacher-1".into());
    let req = || batch_orchestrator::RegisterBatch {
        course_code: "ENG5".into(),
        expected_essay_count: 2,
        class_id: None,
        assignment_id: None,
    };
    refuse_events(&db, true).await;
    assert!(bos.register(&teacher, req()).await.is_err());
    assert_eq!(
        n(&db, "SELECT COUNT(*) AS n FROM batches").await,
        0,
        "no batch without its event"
    );
    refuse_events(&db, false).await;
    let registered = bos.register(&teacher, req()).await.unwrap();
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM batches").await, 1);
    assert_eq!(outbox_topics(&db).await, [topics::BATCH_ESSAYS_REGISTERED]);
    // A pipeline request is the client command, enqueued in the orchestrator's outbox.
    let pipeline = || batch_orchestrator::PipelineRequest::named("cj_assessment");
    refuse_events(&db, true).await;
    assert!(bos
        .request_pipeline(&teacher, &registered.batch_id, pipeline())
        .await
        .is_err());
    refuse_events(&db, false).await;
    let accepted = bos
        .request_pipeline(&teacher, &registered.batch_id, pipeline())
        .await
        .unwrap();
    assert_eq!(accepted.phases, ["spellcheck", "cj_assessment"]);
    assert_eq!(
        outbox_topics(&db).await,
        [
            topics::BATCH_ESSAYS_REGISTERED,
            topics::CLIENT_PIPELINE_REQUEST
        ]
    );

    let db = schemas.db(file_service::NAME).await;
    // The files go to a fresh batch: the one above has its pipeline requested, and a pipeline
    // once started locks a batch's files.
    let fresh = bos.register(&teacher, req()).await.unwrap();
    let bos_http = LocalBatchOrchestrator::serve(bos.clone()).await;
    let batches = file_service::batches::BatchClient::new(
        &bos_http.url(),
        essay_common::http::Policy::default(),
    )
    .unwrap();
    let files = file_service::FileService::open(db.clone(), content.client(), batches)
        .await
        .unwrap();
    let upload = || {
        vec![
            file_service::UploadedFile {
                filename: "a.txt".into(),
                bytes: "word ".repeat(40).into_bytes(),
            },
            file_service::UploadedFile {
                filename: "b.exe".into(),
                bytes: b"MZ".to_vec(),
            },
        ]
    };
    refuse_events(&db, true).await;
    assert!(files
        .upload(&teacher, &fresh.batch_id, Uuid::new_v4(), upload())
        .await
        .is_err());
    assert_eq!(
        n(&db, "SELECT COUNT(*) AS n FROM files").await,
        0,
        "nothing half-written"
    );
    refuse_events(&db, false).await;
    files
        .upload(&teacher, &fresh.batch_id, Uuid::new_v4(), upload())
        .await
        .unwrap();
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM files").await, 2);
    assert_eq!(
        outbox_topics(&db).await,
        [
            topics::FILE_ADDED,
            topics::CONTENT_PROVISIONED,
            topics::FILE_ADDED,
            topics::VALIDATION_FAILED
        ]
    );

    let db = schemas.db(class_management::NAME).await;
    let cms = class_management::ClassManagement::open(db.clone(), Duration::ZERO)
        .await
        .unwrap();
    refuse_events(&db, true).await;
    assert!(cms.create_class(&teacher, "9B", "ENG5").await.is_err());
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM classes").await, 0);
    refuse_events(&db, false).await;
    let class_id = cms.create_class(&teacher, "9B", "ENG5").await.unwrap();
    let maya = cms
        .add_student(
            &teacher,
            &class_id,
            class_management::NewStudent {
                first_name: "Maya".into(),
                last_name: "Lindqvist".into(),
                email: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        outbox_topics(&db).await,
        [topics::CLASS_CREATED, topics::STUDENT_CREATED]
    );

    // Matching: the matching service's suggestions, then confirmation by timeout (0 s here)
    // - once only.
    let batch_id = Uuid::new_v4().to_string();
    let roster: Vec<student_matching::matcher::Student> =
        serde_json::from_value(cms.roster(None, &class_id).await.unwrap()["students"].clone())
            .unwrap();
    let text = "Maya Lindqvist 2026-02-09\n\nAn essay.";
    let result =
        student_matching::essay_result("e1", &stored(&content.client(), text).await, text, &roster);
    assert_eq!(result["suggestions"][0]["student_id"], maya.as_str());
    let requested = envelope(
        student_matching::NAME,
        topics::AUTHOR_MATCHES_SUGGESTED,
        ("batch", &batch_id),
        json!({"batch_id": batch_id, "class_id": class_id, "match_results": [result]}),
    );
    apply_prepared(&cms, &db, &requested, false).await;
    assert_eq!(
        n(&db, "SELECT COUNT(*) AS n FROM matches").await,
        0,
        "rolled back"
    );
    apply_prepared(&cms, &db, &requested, true).await;
    refuse_events(&db, true).await;
    assert!(cms.confirm_expired().await.is_err());
    assert_eq!(
        n(
            &db,
            "SELECT COUNT(*) AS n FROM matches WHERE status = 'PENDING'"
        )
        .await,
        1,
        "not confirmed without its event"
    );
    refuse_events(&db, false).await;
    assert_eq!(cms.confirm_expired().await.unwrap(), 1);
    assert_eq!(cms.confirm_expired().await.unwrap(), 0);
    assert!(
        !cms.confirm(
            &batch_id,
            None,
            class_management::matching::ConfirmedBy::Teacher,
            "t-1"
        )
        .await
        .unwrap(),
        "second confirmation is a no-op"
    );
    assert_eq!(
        outbox_topics(&db)
            .await
            .iter()
            .filter(|t| *t == topics::ASSOCIATIONS_CONFIRMED)
            .count(),
        1
    );
    let m = cms.matches(&batch_id).await.unwrap();
    assert_eq!(m["suggestions"][0]["student_name"], "Maya Lindqvist");
    assert_eq!(
        m["associations"][0]["student_id"],
        maya.as_str(),
        "confident: confirmed"
    );
    content.stop().await;
    let _ = std::fs::remove_dir_all(content_dir);
    schemas.drop().await;
}

#[tokio::test]
async fn handlers_roll_back_with_their_events_and_repeat_nothing() {
    let schemas = Schemas::new();
    let content_dir = temp_dir("atomicity-content");
    let content_service = LocalContentService::start(&content_dir).await;
    let client = content_service.client();
    let batch_id = Uuid::new_v4().to_string();
    let essay_id = Uuid::new_v4().to_string();

    // Essay Lifecycle: content into a slot (slot assigned + provisioning completed).
    let db = schemas.db(essay_lifecycle::NAME).await;
    let els = essay_lifecycle::EssayLifecycle::open(db.clone())
        .await
        .unwrap();
    let registered = envelope(
        batch_orchestrator::NAME,
        topics::BATCH_ESSAYS_REGISTERED,
        ("batch", &batch_id),
        json!({"entity_id": batch_id, "batch_id": batch_id, "essay_ids": [essay_id], "course_code": "ENG5", "batch_kind": "GUEST"}),
    );
    let content = envelope(
        file_service::NAME,
        topics::CONTENT_PROVISIONED,
        ("file_upload", "f1"),
        json!({"entity_id": batch_id, "batch_id": batch_id, "file_upload_id": "f1", "original_file_name": "a.txt",
               "text_storage_id": stored(&client, "some text").await}),
    );
    // Content first: parked until the registration arrives.
    apply(&els, &db, &content, true).await;
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM pending_content").await, 1);
    apply(&els, &db, &registered, false).await;
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM essays").await, 0);
    assert!(
        outbox_topics(&db).await.is_empty(),
        "rolled back: no events"
    );
    apply(&els, &db, &registered, true).await;
    assert_eq!(
        n(
            &db,
            "SELECT COUNT(*) AS n FROM essays WHERE state = 'CONTENT_READY'"
        )
        .await,
        1
    );
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM pending_content").await, 0);
    assert_eq!(
        outbox_topics(&db).await,
        [topics::SLOT_ASSIGNED, topics::PROVISIONING_COMPLETED]
    );
    apply(&els, &db, &content, true).await; // the same content again (a re-send): nothing new
    assert_eq!(outbox_topics(&db).await.len(), 2);

    // The original's Spellchecker answers (its example message, addressed to this essay): the
    // essay is spellchecked with the corrected text's id, and the phase outcome names that
    // text for the next phase, in the original's model.
    let initiate = envelope(
        batch_orchestrator::NAME,
        topics::SPELLCHECK_INITIATE,
        ("batch", &batch_id),
        json!({"batch_id": batch_id, "entity_id": batch_id, "phase": "spellcheck"}),
    );
    apply(&els, &db, &initiate, true).await;
    let path =
        original_contract_dir().join("examples/huleedu.batch.spellcheck.phase.completed.v1.json");
    let example: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut original: Envelope = serde_json::from_value(example["value"].clone()).unwrap();
    original.data["entity_id"] = json!(essay_id);
    original.data["batch_id"] = json!(batch_id);
    let corrected = original.data["corrected_text_storage_id"]
        .as_str()
        .unwrap()
        .to_owned();
    apply(&els, &db, &original, true).await;
    let row = db
        .fetch_optional(
            "SELECT state, corrected_text_storage_id, spelling_errors FROM essays WHERE essay_id = $1",
            outbox::portable::params![&essay_id],
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.text("state").unwrap(), "SPELLCHECKED");
    assert_eq!(row.text("corrected_text_storage_id").unwrap(), corrected);
    assert_eq!(
        row.opt_int("spelling_errors").unwrap(),
        None,
        "the original's does not say"
    );
    let outcome = db
        .fetch_optional(
            "SELECT payload FROM event_outbox WHERE topic = $1",
            outbox::portable::params![topics::PHASE_OUTCOME],
        )
        .await
        .unwrap()
        .expect("the phase ended");
    let outcome: serde_json::Value =
        serde_json::from_slice(&outcome.bytes("payload").unwrap()).unwrap();
    assert_eq!(outcome["data"]["phase_name"], "spellcheck");
    assert_eq!(outcome["data"]["phase_status"], "completed_successfully");
    assert_eq!(
        outcome["data"]["processed_essays"][0]["text_storage_id"],
        corrected.as_str()
    );

    // Spellchecker: thin + rich with the result row, once per essay.
    let db = schemas.db(spellchecker::NAME).await;
    let speller = Arc::new(spellchecker::Speller::load(&spellchecker::dictionary_dir()).unwrap());
    let spell = spellchecker::Spellchecker::open(db.clone(), speller.clone(), client.clone())
        .await
        .unwrap();
    let text_id = stored(&client, "A speling mistake.").await;
    let requested = || {
        envelope(
            essay_lifecycle::NAME,
            topics::SPELLCHECK_REQUESTED,
            ("essay", &essay_id),
            json!({"parent_id": batch_id, "entity_id": essay_id, "text_storage_id": text_id}),
        )
    };
    apply_prepared(&spell, &db, &requested(), false).await;
    assert_eq!(
        n(&db, "SELECT COUNT(*) AS n FROM spellcheck_results").await,
        0
    );
    assert!(outbox_topics(&db).await.is_empty());
    apply_prepared(&spell, &db, &requested(), true).await;
    assert_eq!(
        outbox_topics(&db).await,
        [
            topics::SPELLCHECK_PHASE_COMPLETED,
            topics::SPELLCHECK_RESULTS
        ]
    );
    apply_prepared(&spell, &db, &requested(), true).await; // a re-sent request with a new event id
    assert_eq!(outbox_topics(&db).await.len(), 2, "one result per essay");
    // A storage id the Content Service does not know is poison, with its reason, before any
    // transaction begins.
    let unknown = envelope(
        essay_lifecycle::NAME,
        topics::SPELLCHECK_REQUESTED,
        ("essay", "e-unknown"),
        json!({"parent_id": batch_id, "entity_id": "e-unknown",
               "text_storage_id": essay_common::content::StorageId::new().to_string()}),
    );
    match spell.prepare(&unknown).await {
        Err(outbox::HandlerError::Poison(p)) => {
            assert!(p.0.contains("not in the Content Service"), "{}", p.0)
        }
        other => panic!("an unknown storage id must be poison: {other:?}"),
    }
    // The corrected text is in the Content Service under the id the results event names.
    let results = db
        .fetch_optional(
            "SELECT payload FROM event_outbox WHERE topic = $1",
            outbox::portable::params![topics::SPELLCHECK_RESULTS],
        )
        .await
        .unwrap()
        .unwrap();
    let results: serde_json::Value =
        serde_json::from_slice(&results.bytes("payload").unwrap()).unwrap();
    let corrected = results["data"]["corrected_text_storage_id"]
        .as_str()
        .unwrap();
    let expected = speller.check("A speling mistake.").corrected_text;
    assert_ne!(expected, "A speling mistake.");
    assert_eq!(client.fetch_text(corrected).await.unwrap(), expected);
    assert_eq!(
        results["data"]["original_text_storage_id"],
        text_id.as_str()
    );

    // CJ: completion, results and usage with the CJ batch's completion, once.
    let db = schemas.db(cj_assessment::NAME).await;
    let cj = cj_assessment::CjAssessment::open(
        db.clone(),
        Arc::new(cj_assessment::judge::FeatureJudge::new()),
        client.clone(),
    )
    .await
    .unwrap();
    let mut essays = Vec::new();
    for i in 0..3 {
        let text = stored(&client, &"word ".repeat(30 + i * 20)).await;
        essays.push(json!({"essay_id": format!("e{i}"), "text_storage_id": text,
                           "spelling_errors": 3 - i}));
    }
    let cj_requested = || {
        envelope(
            essay_lifecycle::NAME,
            topics::CJ_REQUESTED,
            ("batch", &batch_id),
            json!({"entity_id": batch_id, "essays_for_cj": essays}),
        )
    };
    apply_prepared(&cj, &db, &cj_requested(), false).await;
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM cj_batches").await, 0);
    assert!(outbox_topics(&db).await.is_empty());
    apply_prepared(&cj, &db, &cj_requested(), true).await;
    assert_eq!(
        n(
            &db,
            "SELECT COUNT(*) AS n FROM cj_batches WHERE status = 'COMPLETED'"
        )
        .await,
        1
    );
    assert_eq!(n(&db, "SELECT COUNT(*) AS n FROM cj_results").await, 3);
    assert_eq!(
        outbox_topics(&db).await,
        [
            topics::CJ_COMPLETED,
            topics::ASSESSMENT_RESULT_PUBLISHED,
            topics::RESOURCE_CONSUMPTION
        ]
    );
    apply_prepared(&cj, &db, &cj_requested(), true).await; // finalisation requested again
    assert_eq!(
        outbox_topics(&db).await.len(),
        3,
        "a repeated finalisation publishes nothing"
    );
    let too_few = envelope(
        essay_lifecycle::NAME,
        topics::CJ_REQUESTED,
        ("batch", "other"),
        json!({"entity_id": "other", "essays_for_cj": [essays[0]]}),
    );
    apply_prepared(&cj, &db, &too_few, true).await;
    assert_eq!(outbox_topics(&db).await.last().unwrap(), topics::CJ_FAILED);

    // Result Aggregator: results ready once per batch.
    let db = schemas.db(result_aggregator::NAME).await;
    let ras = result_aggregator::ResultAggregator::open(db.clone())
        .await
        .unwrap();
    let completed = || {
        envelope(
            batch_orchestrator::NAME,
            topics::PIPELINE_COMPLETED,
            ("batch", &batch_id),
            json!({"batch_id": batch_id, "status": "COMPLETED"}),
        )
    };
    let completed = completed();
    apply(&ras, &db, &completed, false).await;
    assert!(outbox_topics(&db).await.is_empty());
    apply(&ras, &db, &completed, true).await;
    apply(&ras, &db, &completed, true).await;
    assert_eq!(
        outbox_topics(&db).await,
        [topics::RESULTS_READY],
        "the same completion twice is announced once"
    );
    content_service.stop().await;
    let _ = std::fs::remove_dir_all(content_dir);
    schemas.drop().await;
}
