//! The other direction of the contract: the original's own messages (its examples, exactly as
//! its producers put them on the wire, re-addressed to fresh ids) consumed by this platform's
//! services, with the effect the original's consumers have. Routed by topic: two of them carry
//! a short `event_type`, and none carries an `event_id` header.

mod common;

use std::time::{Duration, Instant};

use common::*;
use essay_common::content::ContentClient;
use essay_common::original::{self, ids::*};
use essay_common::topics;
use essay_platform::client::Gateway;
use essay_platform::{demo, Options, Platform};
use outbox::backend::Broker;
use serde_json::{json, Value};

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The original's example of `topic`, re-addressed; it sends no headers.
fn example(topic: &str, replace: &[(&str, &str)]) -> (String, Option<String>, Value) {
    let message = original::example(topic, replace);
    let path = original::contract_dir().join(format!("examples/{topic}.json"));
    let raw: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert_eq!(raw["headers"], json!({}), "the original sends no headers");
    message
}

/// Puts a message on the broker as the original's producer would (no headers).
/// Event ids of the original's messages this test sent.
static SENT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

async fn send(broker: &Broker, (topic, key, value): (String, Option<String>, Value)) {
    SENT.lock()
        .unwrap()
        .push(value["event_id"].as_str().unwrap().to_owned());
    let publisher = broker.publisher().unwrap();
    let message = outbox::OutboxMessage {
        seq: 0,
        event_id: value["event_id"].as_str().unwrap().parse().unwrap(),
        aggregate: outbox::AggregateRef::new("original", key.clone().unwrap_or_default()).unwrap(),
        event_type: topic.clone(),
        topic: outbox::Topic::new(topic).unwrap(),
        key: key.unwrap_or_default(),
        headers: Default::default(),
        payload: serde_json::to_vec(&value).unwrap().into(),
        attempts: 0,
        partition: 0,
        age_at_claim: Duration::ZERO,
    };
    let outcome = publisher.publish(&[message]).await;
    assert!(
        matches!(outcome[0], outbox::PublishOutcome::Delivered),
        "{outcome:?}"
    );
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn states(api: &Gateway, batch: &str) -> Vec<String> {
    let (_, view) = api
        .get(&format!("/v1/batches/{batch}/essays"))
        .await
        .unwrap();
    view["essays"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|e| e["state"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Messages of `topic` on the bus whose payload names `batch` as `field`.
fn on_bus(platform: &Platform, topic: &str, field: &str, batch: &str) -> Vec<Value> {
    let Broker::Memory(bus) = &platform.broker else {
        unreachable!("the embedded default")
    };
    bus.messages(topic)
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap())
        .filter(|e| e["data"][field] == batch)
        .collect()
}

/// Borrowed replacements.
fn refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(a, b)| (*a, b.as_str())).collect()
}

async fn store(content: &ContentClient, text: &str) -> String {
    content
        .store(
            text.as_bytes().to_vec(),
            "text/plain; charset=utf-8",
            uuid::Uuid::new_v4(),
        )
        .await
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_originals_messages_have_their_effect_here() {
    let (platform, dir) = embedded_platform("original-messages", &Options::default()).await;
    let broker = platform.broker.clone();
    // The teacher of the original's examples.
    let (_, _, registered) = example(topics::BATCH_ESSAYS_REGISTERED, &[]);
    let teacher = registered["data"]["user_id"].as_str().unwrap().to_owned();
    let api = platform.gateway().as_user(&teacher);
    let content = ContentClient::new(
        &format!("http://{}", platform.content_addr),
        Default::default(),
    )
    .unwrap();
    let essays = demo::read_essays(&demo::default_essays_dir()).unwrap();
    let text = |i: usize| String::from_utf8(essays[i].1.clone()).unwrap();
    let (t1, t2) = (
        store(&content, &text(0)).await,
        store(&content, &text(1)).await,
    );

    // 1. The original's Batch Orchestrator, File Service and commands drive Essay Lifecycle,
    //    whose work this platform's Spellchecker, CJ and Result Aggregator then do.
    let (b, e1, e2, f1, f2) = (uuid(), uuid(), uuid(), uuid(), uuid());
    let ids = |extra: &[(&'static str, String)]| {
        let mut r: Vec<(&'static str, String)> = vec![
            (BATCH, b.clone()),
            (ESSAY_1, e1.clone()),
            (ESSAY_2, e2.clone()),
            (TEXT_1, t1.clone()),
            (TEXT_2, t2.clone()),
            (CORRECTED_1, t1.clone()),
            (CORRECTED_2, t2.clone()),
        ];
        r.extend_from_slice(extra);
        r
    };
    send(
        &broker,
        example(topics::BATCH_ESSAYS_REGISTERED, &refs(&ids(&[]))),
    )
    .await;
    send(
        &broker,
        example(
            topics::CONTENT_PROVISIONED,
            &refs(&ids(&[(FILE_1, f1.clone())])),
        ),
    )
    .await;
    // A second file of the batch: the same message with the second file and text (applied
    // first, before the first text's id would be).
    let mut second = ids(&[(FILE_1, f2.clone()), (TEXT_1, t2.clone())]);
    second.reverse();
    let second = refs(&second);
    send(&broker, example(topics::CONTENT_PROVISIONED, &second)).await;
    until("both slots hold content", async || {
        let s = states(&api, &b).await;
        (s == ["CONTENT_READY", "CONTENT_READY"]).then_some(Value::Null)
    })
    .await;
    let (_, view) = api.get(&format!("/v1/batches/{b}/results")).await.unwrap();
    assert_eq!(
        view["expected_essay_count"], 2,
        "the Result Aggregator took the registration: {view}"
    );

    send(
        &broker,
        example(topics::SPELLCHECK_INITIATE, &refs(&ids(&[]))),
    )
    .await;
    until("spellchecked", async || {
        (states(&api, &b).await == ["SPELLCHECKED", "SPELLCHECKED"]).then_some(Value::Null)
    })
    .await;
    send(&broker, example(topics::CJ_INITIATE, &refs(&ids(&[])))).await;
    let view = until("ranked", async || {
        let (_, v) = api.get(&format!("/v1/batches/{b}/results")).await.unwrap();
        let ranked = v["essays"]
            .as_array()?
            .iter()
            .filter(|e| e["rank"].is_i64())
            .count();
        (ranked == 2).then_some(v)
    })
    .await;
    assert!(view["essays"][0]["spelling_errors"].is_i64(), "{view}");
    // The original's completion (its short event_type) ends it: results announced once.
    send(
        &broker,
        example(topics::PIPELINE_COMPLETED, &refs(&ids(&[]))),
    )
    .await;
    let ready = until("results ready", async || {
        on_bus(&platform, topics::RESULTS_READY, "batch_id", &b).pop()
    })
    .await;
    assert_eq!(ready["data"]["status"], "completed_successfully", "{ready}");
    assert_eq!(ready["data"]["ranked_essays"], 2);
    assert_eq!(ready["data"]["user_id"], teacher.as_str());

    // 2. The original's Essay Lifecycle asks this platform's Spellchecker and CJ.
    let (b2, e3) = (uuid(), uuid());
    send(
        &broker,
        example(
            topics::SPELLCHECK_REQUESTED,
            &[(BATCH, &b2), (ESSAY_1, &e3), (TEXT_1, &t1)],
        ),
    )
    .await;
    let result = until("spellchecked for the original", async || {
        on_bus(&platform, topics::SPELLCHECK_RESULTS, "batch_id", &b2).pop()
    })
    .await;
    assert_eq!(result["data"]["entity_id"], e3.as_str());
    assert_eq!(result["data"]["original_text_storage_id"], t1.as_str());
    let b3 = uuid();
    send(
        &broker,
        example(
            topics::CJ_REQUESTED,
            &[(BATCH, &b3), (CORRECTED_1, &t1), (CORRECTED_2, &t2)],
        ),
    )
    .await;
    let assessed = until("assessed for the original", async || {
        on_bus(
            &platform,
            topics::ASSESSMENT_RESULT_PUBLISHED,
            "batch_id",
            &b3,
        )
        .pop()
    })
    .await;
    assert_eq!(
        assessed["data"]["essay_results"].as_array().unwrap().len(),
        2
    );

    // 3. The original's CJ and Spellchecker report to this platform's Result Aggregator:
    //    anchors are not the batch's essays; spelling counts land on their essays.
    let (b4, e5, e6) = (uuid(), uuid(), uuid());
    let r4 = [
        (BATCH, b4.as_str()),
        (ESSAY_1, e5.as_str()),
        (ESSAY_2, e6.as_str()),
    ];
    send(&broker, example(topics::BATCH_ESSAYS_REGISTERED, &r4)).await;
    send(&broker, example(topics::ASSESSMENT_RESULT_PUBLISHED, &r4)).await;
    send(&broker, example(topics::SPELLCHECK_RESULTS, &r4)).await;
    send(&broker, example(topics::SLOT_ASSIGNED, &r4)).await;
    send(&broker, example(topics::PHASE_OUTCOME, &r4)).await;
    let view = until("the original's results in the view", async || {
        let (_, v) = api.get(&format!("/v1/batches/{b4}/results")).await.unwrap();
        let essays = v["essays"].as_array()?;
        (essays.iter().filter(|e| e["rank"].is_i64()).count() == 2
            && essays.iter().any(|e| e["spelling_errors"] == 7))
        .then_some(v)
    })
    .await;
    assert_eq!(
        view["essays"].as_array().unwrap().len(),
        2,
        "no anchors: {view}"
    );
    assert_eq!(view["essays"][0]["grade"], "B");
    assert_eq!(view["essays"][1]["grade"], "C+");
    let view = until("the slot's file name and the phase outcome", async || {
        let (_, v) = api.get(&format!("/v1/batches/{b4}/results")).await.unwrap();
        (v["essays"][0]["filename"] == "anna_lindqvist_argumentative.docx"
            && v["phases"]["spellcheck"] == "COMPLETED_SUCCESSFULLY")
            .then_some(v)
    })
    .await;
    assert_eq!(view["essays"][0]["essay_id"], e5.as_str());

    // 4. The original's File Service reports a file that failed validation.
    let b5 = uuid();
    send(
        &broker,
        example(
            topics::BATCH_ESSAYS_REGISTERED,
            &[(BATCH, &b5), (ESSAY_1, &uuid()), (ESSAY_2, &uuid())],
        ),
    )
    .await;
    send(
        &broker,
        example(
            topics::VALIDATION_FAILED,
            &[(BATCH, &b5), (FAILED_FILE, &uuid())],
        ),
    )
    .await;
    until("a slot failed", async || {
        states(&api, &b5)
            .await
            .contains(&"CONTENT_FAILED".to_owned())
            .then_some(Value::Null)
    })
    .await;

    // 5. The original's Essay Lifecycle tells this platform's Batch Orchestrator a batch is
    //    provisioned: the batch is ready, and its next command names those essays.
    let (code, reg) = api
        .post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": 2}),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{reg}");
    let b6 = reg["batch_id"].as_str().unwrap().to_owned();
    send(
        &broker,
        example(
            topics::PROVISIONING_COMPLETED,
            &[(BATCH, &b6), (TEXT_1, &t1), (TEXT_2, &t2)],
        ),
    )
    .await;
    until("ready", async || {
        let (_, s) = api.get(&format!("/v1/batches/{b6}")).await.unwrap();
        (s["status"] == "READY").then_some(s)
    })
    .await;
    let (code, body) = api
        .post(
            &format!("/v1/batches/{b6}/pipelines"),
            &json!({"requested_pipeline": "spellcheck"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    let command = until("the spellcheck command", async || {
        on_bus(&platform, topics::SPELLCHECK_INITIATE, "batch_id", &b6).pop()
    })
    .await;
    let named: Vec<&str> = command["data"]["essays_to_process"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text_storage_id"].as_str().unwrap())
        .collect();
    assert_eq!(named, [t1.as_str(), t2.as_str()], "{command}");

    // 6. Matching: the original's Essay Lifecycle asks this platform's Student Matching, and
    //    the original's matching service suggests to this platform's Class Management.
    let (_, class) = api
        .post("/v1/classes", &json!({"name": "9B", "course_code": "ENG5"}))
        .await
        .unwrap();
    let class_id = class["class_id"].as_str().unwrap().to_owned();
    let mut students = Vec::new();
    for (first, last) in demo::STUDENTS {
        let (_, s) = api
            .post(
                &format!("/v1/classes/{class_id}/students"),
                &json!({"first_name": first, "last_name": last}),
            )
            .await
            .unwrap();
        students.push(s["student_id"].as_str().unwrap().to_owned());
    }
    let b7 = uuid();
    let r7 = [
        (BATCH, b7.as_str()),
        (CLASS, class_id.as_str()),
        (TEXT_1, t1.as_str()),
        (TEXT_2, t2.as_str()),
    ];
    send(&broker, example(topics::MATCHING_REQUESTED, &r7)).await;
    let matches = until("suggestions for the original's request", async || {
        let (code, m) = api.get(&format!("/v1/matches/{b7}")).await.unwrap();
        (code == 200).then_some(m)
    })
    .await;
    assert_eq!(
        matches["suggestions"].as_array().unwrap().len(),
        2,
        "{matches}"
    );
    let b8 = uuid();
    let r8 = [
        (BATCH, b8.as_str()),
        (CLASS, class_id.as_str()),
        (STUDENT_1, students[0].as_str()),
        (STUDENT_2, students[1].as_str()),
    ];
    send(&broker, example(topics::AUTHOR_MATCHES_SUGGESTED, &r8)).await;
    let matches = until("the original's suggestions kept", async || {
        let (code, m) = api.get(&format!("/v1/matches/{b8}")).await.unwrap();
        (code == 200).then_some(m)
    })
    .await;
    assert_eq!(matches["status"], "PENDING");
    assert_eq!(
        matches["suggestions"][0]["student_id"],
        students[0].as_str()
    );

    assert_eq!(platform.dead_events().await.unwrap(), 0);
    // Not one poison verdict for the original's messages. (This platform's own answers to
    // the original's Essay Lifecycle, in scenario 2, reach this platform's Essay Lifecycle
    // too, which does not know those batches: a harness with two Essay Lifecycles.)
    let Broker::Memory(bus) = &platform.broker else {
        unreachable!("the embedded default")
    };
    let sent = SENT.lock().unwrap().clone();
    for topic in topics::ALL {
        for parked in bus.messages(&outbox::consume::dead_letter_topic(topic)) {
            let env: Value = serde_json::from_slice(&parked.payload).unwrap();
            assert!(
                !sent.contains(&env["event_id"].as_str().unwrap_or_default().to_owned()),
                "the original's {topic} was parked: {:?}",
                parked.headers
            );
        }
    }
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
