//! The wire contract with the original system, measured: every topic this platform
//! publishes is put on the wire by a run (a REGULAR batch through the demo, then the rarer
//! paths: class and student updates, a removed file, excess content, a CJ failure, a denied
//! pipeline command), and every message is checked against the original's JSON Schema of its
//! topic (`shared/contracts/original/schemas`, generated from the original's Pydantic
//! models). A failure names the topic, the field and the rule.

mod common;

use std::time::{Duration, Instant};

use common::*;
use essay_common::topics;
use essay_platform::{demo, Options};
use serde_json::{json, Value};

#[test]
fn the_originals_examples_validate_against_its_schemas() {
    let envelope = original_schema("envelope").expect("the envelope schema");
    let dir = original_contract_dir().join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let example: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let topic = example["topic"].as_str().unwrap();
        assert_eq!(
            schema_violation(&envelope, &example["value"]),
            None,
            "{topic}"
        );
        let validator = original_schema(topic).unwrap_or_else(|| panic!("no schema for {topic}"));
        assert_eq!(
            schema_violation(&validator, &example["value"]["data"]),
            None,
            "{topic}"
        );
        checked += 1;
    }
    assert!(checked > 30, "{checked} examples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_topic_published_speaks_the_originals_models() {
    let options = Options {
        match_confirm_timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let (platform, dir) = embedded_platform("contract", &options).await;
    let api = platform.gateway();
    let report = demo::run(&api, &quiet(true))
        .await
        .expect("a REGULAR batch");
    check_results(&report);

    // The rarer paths. A class and a student changed.
    let (_, classes) = api.get("/v1/classes").await.unwrap();
    let class = classes["classes"][0]["class_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _) = api
        .json(
            axum::http::Method::PUT,
            &format!("/v1/classes/{class}"),
            &json!({"name": "7A (spring)"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 204);
    let (_, students) = api
        .get(&format!("/v1/classes/{class}/students"))
        .await
        .unwrap();
    let student = students["students"][0]["student_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _) = api
        .json(
            axum::http::Method::PUT,
            &format!("/v1/students/{student}"),
            &json!({"email": "maya@example.org"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 204);
    // A batch of one essay given two files (one is excess; a removed one before that), whose
    // comparative judgement fails: one essay cannot be compared.
    let essays = demo::read_essays(&demo::default_essays_dir()).unwrap();
    let (_, reg) = api
        .post(
            "/v1/batches",
            &json!({"course_code": "SV1", "expected_essay_count": 1}),
        )
        .await
        .unwrap();
    let single = reg["batch_id"].as_str().unwrap().to_owned();
    let (code, up) = api.upload(&single, None, &essays[..1]).await.unwrap();
    assert_eq!(code, 201, "{up}");
    let (_, up) = api.upload(&single, None, &essays[1..2]).await.unwrap();
    let extra = up["files"][0]["file_upload_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _) = api.delete(&format!("/v1/files/{extra}")).await.unwrap();
    assert_eq!(code, 204);
    let (code, body) = api
        .post(
            &format!("/v1/batches/{single}/pipelines"),
            &json!({"requested_pipeline": "cj_assessment"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    // A pipeline command for a batch nobody registered: denied on the wire.
    let command = {
        let path = original_contract_dir().join("examples/huleedu.commands.batch.pipeline.v1.json");
        let mut example: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let unknown = uuid::Uuid::new_v4().to_string();
        example["value"]["event_id"] = json!(uuid::Uuid::new_v4());
        example["value"]["data"]["batch_id"] = json!(unknown);
        OnBroker {
            topic: topics::CLIENT_PIPELINE_REQUEST.into(),
            key: Some(unknown.clone()),
            headers: [(
                "event_id".to_string(),
                example["value"]["event_id"].as_str().unwrap().to_owned(),
            )]
            .into(),
            payload: serde_json::to_vec(&example["value"]).unwrap(),
        }
    };
    redeliver(&platform.broker, &[command]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, s) = api.get(&format!("/v1/batches/{single}")).await.unwrap();
        let messages = broker_messages(&platform.broker, 0).await;
        let denied = messages.iter().any(|m| m.topic == topics::PIPELINE_DENIED);
        if s["pipeline"]["status"] == "FAILED" && denied {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the CJ failure and the denial: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drain_outboxes(&platform, Duration::from_secs(10)).await;

    let messages = broker_messages(&platform.broker, platform.published() as usize).await;
    let per_topic = against_the_originals_schemas(&messages);
    println!("{} topics measured:", per_topic.len());
    for (topic, (n, first)) in &per_topic {
        match first {
            None => println!("  ok   {topic} ({n})"),
            Some(v) => println!("  FAIL {topic} ({n}): {v}"),
        }
    }
    let missing: Vec<&&str> = topics::ALL
        .iter()
        .filter(|t| !per_topic.contains_key(**t))
        .collect();
    assert!(missing.is_empty(), "not published in the run: {missing:?}");
    assert_all_conform(&messages);
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
