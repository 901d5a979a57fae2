//! The client pipeline command (`huleedu.commands.batch.pipeline.v1`), as the original's API
//! Gateway puts it on the wire, drives Batch Orchestrator; what it cannot run is answered
//! with `huleedu.pipeline.denied.v1` and a reason; a retry after a failed phase runs only
//! that phase again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use essay_common::runtime::DataLocation;
use essay_common::topics;
use essay_platform::client::Gateway;
use essay_platform::{demo, Options, Platform};
use outbox::backend::Broker;
use outbox::bus::Bus;
use serde_json::{json, Value};

fn example() -> Value {
    let path = original_contract_dir().join("examples/huleedu.commands.batch.pipeline.v1.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// The user of the original's example command (its gateway's signed-in teacher).
fn example_user() -> String {
    example()["value"]["data"]["user_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The original's example command, re-addressed to `batch_id` (everything else as sent).
fn original_command(batch_id: &str, pipeline: &str, is_retry: bool) -> OnBroker {
    original_command_as(batch_id, pipeline, is_retry, &example_user())
}

/// The same, sent for another user.
fn original_command_as(batch_id: &str, pipeline: &str, is_retry: bool, user: &str) -> OnBroker {
    let mut envelope = example()["value"].clone();
    envelope["data"]["user_id"] = json!(user);
    envelope["event_id"] = json!(uuid::Uuid::new_v4());
    envelope["data"]["batch_id"] = json!(batch_id);
    envelope["data"]["requested_pipeline"] = json!(pipeline);
    envelope["data"]["is_retry"] = json!(is_retry);
    OnBroker {
        topic: topics::CLIENT_PIPELINE_REQUEST.into(),
        key: Some(batch_id.into()),
        headers: [
            (
                "event_id".to_string(),
                envelope["event_id"].as_str().unwrap().to_string(),
            ),
            (
                "event_type".to_string(),
                topics::CLIENT_PIPELINE_REQUEST.to_string(),
            ),
        ]
        .into(),
        payload: serde_json::to_vec(&envelope).unwrap(),
    }
}

async fn register_and_upload(api: &Gateway, essays: &[(String, Vec<u8>)]) -> String {
    let (code, reg) = api
        .post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": essays.len()}),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{reg}");
    let batch_id = reg["batch_id"].as_str().unwrap().to_owned();
    let (code, up) = api.upload(&batch_id, None, essays).await.unwrap();
    assert_eq!(code, 201, "{up}");
    batch_id
}

async fn status_until(
    api: &Gateway,
    batch_id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = api.get(&format!("/v1/batches/{batch_id}")).await.unwrap();
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "{what}: {status:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Denials on the wire for `batch_id`, as (reason, requested pipeline).
fn denials(bus: &Bus, batch_id: &str) -> Vec<(String, String)> {
    bus.messages(topics::PIPELINE_DENIED)
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap())
        .filter(|e| e["data"]["batch_id"] == batch_id)
        .map(|e| {
            // Every field the original's model requires, with its type.
            let schema_path =
                original_contract_dir().join("schemas/huleedu.pipeline.denied.v1.schema.json");
            let schema: Value =
                serde_json::from_slice(&std::fs::read(schema_path).unwrap()).unwrap();
            for field in schema["required"].as_array().unwrap() {
                let field = field.as_str().unwrap();
                let want = schema["properties"][field]["type"].as_str().unwrap();
                let got = &e["data"][field];
                let ok = match want {
                    "string" => got.is_string(),
                    "integer" => got.is_i64(),
                    other => panic!("unexpected type {other}"),
                };
                assert!(ok, "{field} must be {want}: {}", e["data"]);
            }
            (
                e["data"]["denial_reason"].as_str().unwrap().to_owned(),
                e["data"]["requested_pipeline"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_originals_pipeline_command_runs_a_batch_and_refusals_are_answered() {
    let dir = temp_dir("pipeline-command");
    let bus = Bus::default();
    let broker = Broker::Memory(bus.clone());
    let platform = Platform::start(
        &DataLocation::SqliteDir(dir.clone()),
        broker.clone(),
        &Options::default(),
    )
    .await
    .unwrap();
    // The teacher the original's gateway signed the example command for.
    let api = platform.gateway().as_user(&example_user());
    let essays: Vec<_> = demo::read_essays(&demo::default_essays_dir())
        .unwrap()
        .into_iter()
        .take(VALID)
        .collect();

    // The original's command, sent before the batch is ready: it waits, then runs
    // spellcheck and cj_assessment, as the original's conductor resolves cj_assessment.
    let batch_id = register_and_upload(&api, &essays).await;
    redeliver(
        &broker,
        &[original_command(&batch_id, "cj_assessment", false)],
    )
    .await;
    let status = status_until(&api, &batch_id, "pipeline completes", |s| {
        s["pipeline"]["status"] == "COMPLETED"
    })
    .await;
    assert_eq!(
        status["pipeline"]["phases"],
        json!(["spellcheck", "cj_assessment"])
    );
    assert_eq!(
        status["completed_phases"],
        json!(["cj_assessment", "spellcheck"])
    );

    // What cannot run is answered, never dropped: unknown, unsupported, nothing left to run,
    // an unknown batch, someone else's batch.
    let unknown_batch = uuid::Uuid::new_v4().to_string();
    redeliver(
        &broker,
        &[
            original_command(&batch_id, "astrology", false),
            original_command(&batch_id, "nlp", false),
            original_command(&batch_id, "cj_assessment", false),
            original_command(&unknown_batch, "spellcheck", false),
            original_command_as(&batch_id, "ai_feedback", false, "another-teacher"),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while denials(&bus, &batch_id).len() < 4 || denials(&bus, &unknown_batch).is_empty() {
        assert!(
            Instant::now() < deadline,
            "denials: {:?}",
            denials(&bus, &batch_id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got = denials(&bus, &batch_id);
    got.sort();
    assert_eq!(
        got,
        [
            ("already_completed".to_string(), "cj_assessment".to_string()),
            ("not_batch_owner".to_string(), "ai_feedback".to_string()),
            ("unknown_pipeline".to_string(), "astrology".to_string()),
            ("unsupported_pipeline".to_string(), "nlp".to_string()),
        ]
    );
    assert_eq!(
        denials(&bus, &unknown_batch),
        [("batch_not_found".to_string(), "spellcheck".to_string())]
    );
    let (_, status) = api.get(&format!("/v1/batches/{batch_id}")).await.unwrap();
    assert!(
        status["last_denial"]["detail"].as_str().is_some(),
        "{status:#}"
    );
    // Over HTTP the same refusals are immediate 4xx answers.
    let (code, body) = api
        .post(
            &format!("/v1/batches/{batch_id}/pipelines"),
            &json!({"requested_pipeline": "nlp"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, body) = api
        .post(
            &format!("/v1/batches/{batch_id}/pipelines"),
            &json!({"phases": ["spellcheck", "spellcheck"]}),
        )
        .await
        .unwrap();
    assert_eq!(code, 400, "a repeated phase: {body}");

    // A batch whose comparative judgement fails (one essay cannot be compared): a retry runs
    // cj_assessment again, and only it; spellcheck completed and is not repeated.
    let single = register_and_upload(&api, &essays[..1]).await;
    let (code, body) = api
        .post(
            &format!("/v1/batches/{single}/pipelines"),
            &json!({"requested_pipeline": "cj_assessment"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    let status = status_until(&api, &single, "pipeline fails", |s| {
        s["pipeline"]["status"] == "FAILED"
    })
    .await;
    assert_eq!(status["completed_phases"], json!(["spellcheck"]));
    let spellchecks = |bus: &Bus| {
        bus.messages(topics::SPELLCHECK_INITIATE)
            .iter()
            .filter(|m| m.key.as_deref() == Some(single.as_str()))
            .count()
    };
    assert_eq!(spellchecks(&bus), 1);
    let (code, body) = api
        .post(
            &format!("/v1/batches/{single}/pipelines"),
            &json!({"requested_pipeline": "cj_assessment", "is_retry": true,
                    "retry_reason": "the judge was down"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        body["phases"],
        json!(["cj_assessment"]),
        "only what did not complete"
    );
    let cj_requests = |bus: &Bus| {
        bus.messages(topics::CJ_REQUESTED)
            .iter()
            .filter(|m| m.key.as_deref() == Some(single.as_str()))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while cj_requests(&bus) < 2 {
        assert!(Instant::now() < deadline, "the retry did not reach CJ");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status_until(&api, &single, "the retry ends", |s| {
        s["pipeline"]["status"] == "FAILED" && s["pipeline"]["is_retry"] == true
    })
    .await;
    assert_eq!(status["pipeline"]["phases"], json!(["cj_assessment"]));
    assert_eq!(spellchecks(&bus), 1, "spellcheck is not repeated");
    let failures = bus
        .messages(topics::CJ_FAILED)
        .iter()
        .filter(|m| m.key.as_deref() == Some(single.as_str()))
        .count();
    assert_eq!(failures, 2, "one answer per run");
    assert_eq!(platform.dead_events().await.unwrap(), 0);
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
