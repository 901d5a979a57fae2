//! No batch waits forever for its files: at the provisioning deadline a batch goes on with
//! the essays that arrived (the empty slots become CONTENT_MISSING, a late file is excess), and
//! a batch that got none fails with the reason; its waiting pipeline fails with it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use essay_platform::client::Gateway;
use essay_platform::Options;
use serde_json::{json, Value};

async fn until(api: &Gateway, uri: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = api.get(uri).await.unwrap();
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: {body:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provisioning_deadline_goes_on_with_what_arrived_or_fails_the_batch() {
    let options = Options {
        provisioning_timeout: Duration::from_secs(2),
        ..Options::default()
    };
    let (platform, dir) = embedded_platform("deadlines", &options).await;
    let api = platform.gateway();
    let essays: Vec<_> =
        essay_platform::demo::read_essays(&essay_platform::demo::default_essays_dir())
            .unwrap()
            .into_iter()
            .take(3)
            .collect();
    let register = |n: usize| json!({"course_code": "ENG5", "expected_essay_count": n});

    // Five announced, three arrive; the pipeline was requested before the deadline.
    let (_, reg) = api.post("/v1/batches", &register(5)).await.unwrap();
    let partial = reg["batch_id"].as_str().unwrap().to_owned();
    let (code, body) = api.upload(&partial, None, &essays).await.unwrap();
    assert_eq!(code, 201, "{body}");
    let (code, body) = api
        .post(
            &format!("/v1/batches/{partial}/pipelines"),
            &json!({"requested_pipeline": "cj_assessment"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    // Nothing announced: none arrive.
    let (_, reg) = api.post("/v1/batches", &register(4)).await.unwrap();
    let empty = reg["batch_id"].as_str().unwrap().to_owned();
    let (code, body) = api
        .post(
            &format!("/v1/batches/{empty}/pipelines"),
            &json!({"requested_pipeline": "spellcheck"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");

    let status = until(
        &api,
        &format!("/v1/batches/{partial}"),
        "the partial batch completes",
        |s| s["pipeline"]["status"] == "COMPLETED",
    )
    .await;
    assert_eq!(status["status"], "READY");
    let (_, essays_view) = api
        .get(&format!("/v1/batches/{partial}/essays"))
        .await
        .unwrap();
    let mut states: Vec<&str> = essays_view["essays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    states.sort();
    assert_eq!(
        states,
        [
            "CJ_COMPLETED",
            "CJ_COMPLETED",
            "CJ_COMPLETED",
            "CONTENT_MISSING",
            "CONTENT_MISSING"
        ]
    );
    // The ranks and the pipeline's completion reach the Result Aggregator on different topics.
    until(
        &api,
        &format!("/v1/batches/{partial}/results"),
        "ranked, completed results",
        |r| {
            r["status"] == "COMPLETED"
                && r["essays"]
                    .as_array()
                    .is_some_and(|e| e.iter().filter(|e| e["rank"].is_i64()).count() == 3)
        },
    )
    .await;

    let status = until(
        &api,
        &format!("/v1/batches/{empty}"),
        "the empty batch fails",
        |s| s["status"] == "FAILED",
    )
    .await;
    assert!(
        status["failure_reason"]
            .as_str()
            .unwrap()
            .contains("before the provisioning deadline"),
        "{status:#}"
    );
    assert_eq!(status["pipeline"]["status"], "FAILED");
    let (code, body) = api
        .post(
            &format!("/v1/batches/{empty}/pipelines"),
            &json!({"requested_pipeline": "spellcheck"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 409, "{body}");
    drain_outboxes(&platform, Duration::from_secs(30)).await;
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
