//! The wire contract with the original system, measured: every message a run of the platform
//! publishes is checked against the original's JSON Schema of its topic
//! (`shared/contracts/original/schemas`, generated from the original's Pydantic models).
//!
//! The topics listed in [`CONFORMING`] must validate, every message of them; that list only
//! grows (drop-in services, part 2, is done when it holds every topic the platform
//! publishes). The run prints each other topic's first violation: the work still to do.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use essay_common::topics;
use essay_platform::{demo, Options};
use serde_json::Value;

/// Topics whose every message validates against the original's model.
const CONFORMING: &[&str] = &[
    topics::AUTHOR_MATCHES_SUGGESTED,
    topics::MATCHING_REQUESTED,
    topics::CLIENT_PIPELINE_REQUEST,
    topics::SLOT_ASSIGNED,
    topics::CONTENT_PROVISIONED,
    topics::PHASE_OUTCOME,
    topics::SPELLCHECK_PHASE_COMPLETED,
];

fn schema(name: &str) -> Option<jsonschema::Validator> {
    let path = original_contract_dir().join(format!("schemas/{name}.schema.json"));
    let schema: Value = serde_json::from_slice(&std::fs::read(path).ok()?).expect("schema JSON");
    Some(jsonschema::validator_for(&schema).expect("a valid schema"))
}

/// The first violation of `value`, if any.
fn violation(validator: &jsonschema::Validator, value: &Value) -> Option<String> {
    validator
        .iter_errors(value)
        .next()
        .map(|e| format!("{} at {}", e, e.instance_path()))
}

#[test]
fn the_originals_examples_validate_against_its_schemas() {
    let envelope = schema("envelope").expect("the envelope schema");
    let dir = original_contract_dir().join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let example: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let topic = example["topic"].as_str().unwrap();
        assert_eq!(violation(&envelope, &example["value"]), None, "{topic}");
        let validator = schema(topic).unwrap_or_else(|| panic!("no schema for {topic}"));
        assert_eq!(
            violation(&validator, &example["value"]["data"]),
            None,
            "{topic}"
        );
        checked += 1;
    }
    assert!(checked > 30, "{checked} examples");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_the_platform_publishes_against_the_originals_models() {
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
    drain_outboxes(&platform, Duration::from_secs(5)).await;
    let messages = broker_messages(&platform.broker, platform.published() as usize).await;
    let envelope = schema("envelope").expect("the envelope schema");
    let mut per_topic: BTreeMap<&str, (usize, Option<String>)> = BTreeMap::new();
    for m in &messages {
        let value = m.envelope();
        assert_eq!(
            violation(&envelope, &value),
            None,
            "the envelope of {}",
            m.topic
        );
        let topic = topics::ALL
            .iter()
            .find(|t| **t == m.topic)
            .expect("a contract topic");
        let validator =
            schema(topic).unwrap_or_else(|| panic!("the original has no schema for {topic}"));
        let entry = per_topic.entry(topic).or_insert((0, None));
        entry.0 += 1;
        if entry.1.is_none() {
            entry.1 = violation(&validator, &value["data"]);
        }
    }
    let conforming: Vec<&str> = per_topic
        .iter()
        .filter(|(_, (_, v))| v.is_none())
        .map(|(t, _)| *t)
        .collect();
    println!(
        "{} of {} topics conform:",
        conforming.len(),
        per_topic.len()
    );
    for (topic, (n, first)) in &per_topic {
        match first {
            None => println!("  ok   {topic} ({n})"),
            Some(v) => println!("  TODO {topic} ({n}): {v}"),
        }
    }
    for topic in CONFORMING {
        assert!(
            per_topic.contains_key(topic),
            "{topic} was not published in the run"
        );
        assert!(
            conforming.contains(topic),
            "{topic} no longer validates: {:?}",
            per_topic[topic].1
        );
    }
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
