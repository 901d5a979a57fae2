//! One teacher's actions read as one trace across the services: every request of a batch
//! continues the caller's W3C `traceparent`, and every event the platform writes for that
//! batch, by whichever service and however many hops later, carries the same trace id in
//! its envelope's `metadata.traceparent` (as the original's `inject_trace_context` writes it)
//! and in a `traceparent` header, each in a span of its own.

mod common;

use std::collections::HashSet;

use common::*;
use essay_platform::{demo, Options};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_trace_across_every_hop() {
    let (platform, dir) = embedded_platform("trace", &Options::default()).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let api = platform
        .gateway()
        .in_trace(&format!("00-{trace_id}-00f067aa0ba902b7-01"));
    let report = demo::run(&api, &quiet(false)).await.expect("a GUEST batch");
    check_results(&report);
    drain_outboxes(&platform, std::time::Duration::from_secs(10)).await;
    let messages = broker_messages(&platform.broker, platform.published() as usize).await;
    let of_batch: Vec<&OnBroker> = messages
        .iter()
        .filter(|m| m.envelope()["data"]["batch_id"] == report.batch_id.as_str())
        .collect();
    assert!(of_batch.len() > 20, "{} messages", of_batch.len());
    let mut services = HashSet::new();
    let mut spans = HashSet::new();
    for m in &of_batch {
        let env: Value = m.envelope();
        let header = m.headers.get("traceparent").map(String::as_str);
        let in_metadata = env["metadata"]["traceparent"].as_str();
        assert_eq!(
            header, in_metadata,
            "{}: header and metadata agree",
            m.topic
        );
        let traceparent = in_metadata.unwrap_or_else(|| panic!("{} carries no trace", m.topic));
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts[1], trace_id, "{} left the trace", m.topic);
        spans.insert(parts[2].to_owned());
        services.insert(env["source_service"].as_str().unwrap().to_owned());
    }
    assert!(
        services.len() >= 5,
        "the trace crosses services: {services:?}"
    );
    assert_eq!(
        spans.len(),
        of_batch.len(),
        "each event is a span of its own"
    );
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
