//! The original's messages to Essay Lifecycle, exactly as its producers send them (their
//! examples, re-addressed to fresh ids), each with the effect the original's Essay Lifecycle
//! has: registration makes slots, content fills them and completes provisioning, the matching
//! command asks for suggestions, confirmed associations name the students and make the batch
//! ready, the phase commands and completions move every essay through spellcheck and CJ, and a
//! CJ failure fails the phase.

use essay_common::identity::Caller;
use essay_common::original::{envelope, ids};
use essay_common::{topics, Envelope, Service};
use essay_lifecycle::EssayLifecycle;
use outbox::portable::{params, ServiceDb};
use serde_json::Value;
use uuid::Uuid;

async fn deliver(els: &EssayLifecycle, db: &ServiceDb, env: &Envelope) {
    let mut tx = db.begin().await.unwrap();
    els.handle(&mut tx, env).await.expect("handled");
    tx.commit().await.unwrap();
}

async fn written(db: &ServiceDb, topic: &str, batch: &str) -> Vec<Value> {
    db.fetch_all(
        "SELECT payload FROM event_outbox WHERE topic = $1 ORDER BY seq",
        params![topic],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_slice::<Value>(&r.bytes("payload").unwrap()).unwrap()["data"].clone())
    .filter(|d| d["batch_id"] == batch || d["entity_id"] == batch || d["parent_id"] == batch)
    .collect()
}

async fn states(els: &EssayLifecycle, teacher: &Caller, batch: &str) -> Vec<(String, Value)> {
    let view = els.batch_view(teacher, batch).await.unwrap();
    view["essays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["state"].as_str().unwrap().to_owned(),
                e["student_id"].clone(),
            )
        })
        .collect()
}

fn fresh() -> String {
    Uuid::new_v4().to_string()
}

#[tokio::test]
async fn the_originals_messages_move_essays_as_its_essay_lifecycle_does() {
    let dir = std::env::temp_dir().join(format!("els-original-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = ServiceDb::open(&format!("sqlite://{}/els.db", dir.display()), "els")
        .await
        .unwrap();
    let els = EssayLifecycle::open(db.clone()).await.unwrap();
    let (b, e1, e2) = (fresh(), fresh(), fresh());
    let (s1, s2) = (fresh(), fresh());
    let r = [
        (ids::BATCH, b.as_str()),
        (ids::ESSAY_1, e1.as_str()),
        (ids::ESSAY_2, e2.as_str()),
        (ids::STUDENT_1, s1.as_str()),
        (ids::STUDENT_2, s2.as_str()),
    ];
    let registered = envelope(topics::BATCH_ESSAYS_REGISTERED, &r);
    let teacher = Caller(registered.data["user_id"].as_str().unwrap().to_owned());
    deliver(&els, &db, &registered).await;
    assert_eq!(
        states(&els, &teacher, &b).await,
        [
            ("AWAITING_CONTENT".to_owned(), Value::Null),
            ("AWAITING_CONTENT".to_owned(), Value::Null)
        ]
    );

    // Two files of the original's File Service fill the two slots.
    let (f2, t2) = (fresh(), "0123456789abcdef0123456789abcdef");
    deliver(&els, &db, &envelope(topics::CONTENT_PROVISIONED, &r)).await;
    let mut second = r.to_vec();
    second.extend([(ids::FILE_1, f2.as_str()), (ids::TEXT_1, t2)]);
    second.reverse();
    deliver(&els, &db, &envelope(topics::CONTENT_PROVISIONED, &second)).await;
    assert_eq!(written(&db, topics::SLOT_ASSIGNED, &b).await.len(), 2);
    let provisioned = written(&db, topics::PROVISIONING_COMPLETED, &b).await;
    assert_eq!(provisioned.len(), 1);
    assert_eq!(provisioned[0]["provisioned_count"], 2);
    assert_eq!(provisioned[0]["user_id"], teacher.user_id());

    // Matching: the command asks the matching service; the confirmation names the students.
    deliver(&els, &db, &envelope(topics::MATCHING_INITIATE, &r)).await;
    let requested = written(&db, topics::MATCHING_REQUESTED, &b).await;
    assert_eq!(
        requested[0]["essays_to_process"].as_array().unwrap().len(),
        2
    );
    deliver(&els, &db, &envelope(topics::ASSOCIATIONS_CONFIRMED, &r)).await;
    let view = states(&els, &teacher, &b).await;
    assert_eq!(view[0].1, s1.as_str());
    assert_eq!(view[1].1, s2.as_str());
    let ready = written(&db, topics::BATCH_ESSAYS_READY, &b).await;
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0]["class_type"], "REGULAR");

    // Spellcheck: the command requests each essay; each completion moves it on.
    deliver(&els, &db, &envelope(topics::SPELLCHECK_INITIATE, &r)).await;
    assert_eq!(
        written(&db, topics::SPELLCHECK_REQUESTED, &b).await.len(),
        2
    );
    deliver(&els, &db, &envelope(topics::SPELLCHECK_PHASE_COMPLETED, &r)).await;
    let mut other = r.to_vec();
    other.insert(0, (ids::ESSAY_1, e2.as_str()));
    deliver(
        &els,
        &db,
        &envelope(topics::SPELLCHECK_PHASE_COMPLETED, &other),
    )
    .await;
    assert!(states(&els, &teacher, &b)
        .await
        .iter()
        .all(|(s, _)| s == "SPELLCHECKED"));
    let outcome = written(&db, topics::PHASE_OUTCOME, &b).await;
    assert_eq!(outcome[0]["phase_status"], "completed_successfully");

    // CJ: the command, then the original's completion.
    deliver(&els, &db, &envelope(topics::CJ_INITIATE, &r)).await;
    assert_eq!(written(&db, topics::CJ_REQUESTED, &b).await.len(), 1);
    deliver(&els, &db, &envelope(topics::CJ_COMPLETED, &r)).await;
    assert!(states(&els, &teacher, &b)
        .await
        .iter()
        .all(|(s, _)| s == "CJ_COMPLETED"));
    let outcomes = written(&db, topics::PHASE_OUTCOME, &b).await;
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[1]["phase_name"], "cj_assessment");

    // Another batch whose judgement the original's CJ reports failed.
    let (b2, e3, e4) = (fresh(), fresh(), fresh());
    let f4 = fresh();
    let r2 = [
        (ids::BATCH, b2.as_str()),
        (ids::ESSAY_1, e3.as_str()),
        (ids::ESSAY_2, e4.as_str()),
    ];
    let first = [(ids::FILE_1, f4.as_str()), (ids::BATCH, b2.as_str())];
    deliver(&els, &db, &envelope(topics::BATCH_ESSAYS_REGISTERED, &r2)).await;
    deliver(&els, &db, &envelope(topics::CONTENT_PROVISIONED, &first)).await;
    let mut second = r2.to_vec();
    second.extend([(ids::FILE_1, f2.as_str())]);
    second.reverse();
    let f3 = fresh();
    let second: Vec<(&str, &str)> = second
        .into_iter()
        .map(|(a, b)| {
            if a == ids::FILE_1 {
                (a, f3.as_str())
            } else {
                (a, b)
            }
        })
        .collect();
    deliver(&els, &db, &envelope(topics::CONTENT_PROVISIONED, &second)).await;
    deliver(&els, &db, &envelope(topics::CJ_INITIATE, &r2)).await;
    deliver(&els, &db, &envelope(topics::CJ_FAILED, &r2)).await;
    assert!(states(&els, &teacher, &b2)
        .await
        .iter()
        .all(|(s, _)| s == "CJ_FAILED"));
    let outcome = written(&db, topics::PHASE_OUTCOME, &b2).await;
    assert_eq!(outcome[0]["phase_status"], "failed_critically");
    let _ = std::fs::remove_dir_all(dir);
}
