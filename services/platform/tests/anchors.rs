//! Anchors over HTTP: a teacher registers essays with known grades for an assignment, a batch
//! of that assignment is compared with them, and its grades come out on the anchors' scale
//! (calibrated, not relative), the anchors themselves out of the results; anchors are their
//! owner's only.

mod common;

use std::time::{Duration, Instant};

use common::*;
use essay_platform::{demo, Options};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_graded_by_its_assignments_anchors() {
    let (platform, dir) = embedded_platform("anchors", &Options::default()).await;
    let api = platform.gateway();
    let essays = demo::read_essays(&demo::default_essays_dir()).unwrap();
    let text = |name: &str| {
        let (_, bytes) = essays.iter().find(|(n, _)| n.starts_with(name)).unwrap();
        String::from_utf8(bytes.clone()).unwrap()
    };
    // The strongest, a middling and the weakest sample essays, as the teacher graded them.
    for (file, grade) in [("01-", "A"), ("09-", "C"), ("10-", "E")] {
        let (code, body) = api
            .post(
                "/v1/assignments/eng5-arguments/anchors",
                &json!({"scale": "swedish_8_anchor", "grade": grade, "text": text(file)}),
            )
            .await
            .unwrap();
        assert_eq!(code, 201, "{body}");
    }
    let (code, body) = api
        .post(
            "/v1/assignments/eng5-arguments/anchors",
            &json!({"scale": "swedish_8_anchor", "grade": "G", "text": text("02-")}),
        )
        .await
        .unwrap();
    assert_eq!(code, 400, "not a grade of the scale: {body}");
    let (code, body) = api
        .post(
            "/v1/assignments/eng5-arguments/anchors",
            &json!({"scale": "eng5_np_national_9_step", "grade": "5", "text": text("02-")}),
        )
        .await
        .unwrap();
    assert_eq!(code, 409, "one scale per assignment: {body}");
    let (_, listed) = api
        .get("/v1/assignments/eng5-arguments/anchors")
        .await
        .unwrap();
    let anchors = listed["anchors"].as_array().unwrap().clone();
    assert_eq!(anchors.len(), 3);
    let stranger = api.as_user("another-teacher");
    let (_, theirs) = stranger
        .get("/v1/assignments/eng5-arguments/anchors")
        .await
        .unwrap();
    assert_eq!(theirs["anchors"], json!([]), "anchors are their owner's");
    let (code, _) = stranger
        .delete(&format!(
            "/v1/anchors/{}",
            anchors[0]["anchor_id"].as_str().unwrap()
        ))
        .await
        .unwrap();
    assert_eq!(code, 403);

    // A batch of the assignment: the other valid essays.
    let batch_files: Vec<_> = essays
        .iter()
        .filter(|(n, _)| {
            !["01-", "09-", "10-", "14-"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .cloned()
        .collect();
    let (code, reg) = api
        .post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": batch_files.len(),
                    "assignment_id": "eng5-arguments"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{reg}");
    let batch = reg["batch_id"].as_str().unwrap().to_owned();
    let (code, body) = api.upload(&batch, None, &batch_files).await.unwrap();
    assert_eq!(code, 201, "{body}");
    let (code, body) = api
        .post(
            &format!("/v1/batches/{batch}/pipelines"),
            &json!({"requested_pipeline": "cj_assessment"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        let (_, v) = api
            .get(&format!("/v1/batches/{batch}/results"))
            .await
            .unwrap();
        let ranked = v["essays"]
            .as_array()
            .map_or(0, |e| e.iter().filter(|e| e["rank"].is_i64()).count());
        if v["status"] == "COMPLETED" && ranked == batch_files.len() {
            break v;
        }
        assert!(Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        view["grades"].as_str().unwrap().contains("anchor"),
        "{view}"
    );
    let essays_out = view["essays"].as_array().unwrap();
    assert_eq!(
        essays_out.len(),
        batch_files.len(),
        "no anchors among the results"
    );
    for e in essays_out {
        let grade = e["grade"].as_str().unwrap();
        assert!(
            ["A", "C", "E"].contains(&grade),
            "projected onto the anchored grades: {e}"
        );
        assert!(e["grade_confidence"]
            .as_f64()
            .is_some_and(|c| (0.0..=1.0).contains(&c)));
    }
    let ranks: Vec<i64> = essays_out
        .iter()
        .map(|e| e["rank"].as_i64().unwrap())
        .collect();
    assert_eq!(ranks, (1..=batch_files.len() as i64).collect::<Vec<_>>());
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
