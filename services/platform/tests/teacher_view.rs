//! What a teacher sees of a judged batch: per essay the rank, the grade with its confidence,
//! the student (from the confirmed matching), the spelling corrections; the judge's
//! justification of every comparison; the results as CSV; and none of it for anyone else.

mod common;

use common::*;
use essay_platform::{demo, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_grades_confidence_students_corrections_justifications_and_csv() {
    let (platform, dir) = embedded_platform("teacher-view", &Options::default()).await;
    let api = platform.gateway();
    let report = demo::run(&api, &quiet(true))
        .await
        .expect("a REGULAR batch");
    check_results(&report);
    let batch = &report.batch_id;
    let (_, view) = api
        .get(&format!("/v1/batches/{batch}/results"))
        .await
        .unwrap();
    let essays = view["essays"].as_array().unwrap();
    let ranked: Vec<_> = essays.iter().filter(|e| e["rank"].is_i64()).collect();
    assert_eq!(ranked.len(), VALID);
    for e in &ranked {
        let c = e["grade_confidence"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&c), "{e}");
        assert!(["HIGH", "MID", "LOW"].contains(&e["confidence_label"].as_str().unwrap()));
        assert!(e["normalized_score"].is_f64(), "{e}");
    }
    let named = ranked
        .iter()
        .filter(|e| e["student_name"].is_string())
        .count();
    assert!(named >= 3, "the matched students are named: {view:#}");
    let corrected = ranked
        .iter()
        .filter(|e| e["corrections"].as_array().is_some_and(|c| !c.is_empty()))
        .count();
    assert!(corrected > 0, "some essays have corrections listed");
    assert_eq!(view["judge"], "feature-judge-v1");
    assert!(
        view["grades"].as_str().unwrap().contains("relative"),
        "{view}"
    );
    let table = demo::results_table(&view);
    assert!(table.contains("judged by feature-judge-v1"), "{table}");

    let (code, comparisons) = api
        .get(&format!("/v1/batches/{batch}/comparisons"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{comparisons}");
    let list = comparisons["comparisons"].as_array().unwrap();
    assert!(list.len() >= VALID, "{}", list.len());
    assert!(list
        .iter()
        .all(|c| c["justification"].as_str().is_some_and(|j| !j.is_empty())));
    assert_eq!(comparisons["essays"].as_array().unwrap().len(), VALID);

    let (code, csv) = api
        .get(&format!("/v1/batches/{batch}/results.csv"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let csv = csv.as_str().unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("rank,grade,grade_confidence"),
        "{}",
        lines[0]
    );
    assert_eq!(lines.len(), 1 + essays.len(), "{csv}");
    assert!(lines[1].starts_with("1,"), "rank order: {}", lines[1]);

    let stranger = api.as_user("another-teacher");
    for uri in [
        format!("/v1/batches/{batch}/comparisons"),
        format!("/v1/batches/{batch}/results.csv"),
    ] {
        let (code, _) = stranger.get(&uri).await.unwrap();
        assert_eq!(code, 403, "{uri}");
    }
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
