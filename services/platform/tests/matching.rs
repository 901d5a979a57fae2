//! Student matching end to end: essays whose openings name their authors in the formats the
//! original handles (exam.net, labelled headers with a reordered or misspelt name, an email
//! address), a byline, and one naming nobody. The matching service suggests with the
//! expected confidences; nobody confirms, so at the deadline only the confident suggestions
//! are confirmed and the rest stay unassigned, in Class Management and in Essay Lifecycle.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use essay_common::runtime::DataLocation;
use essay_common::topics;
use essay_platform::{Options, Platform};
use outbox::backend::Broker;
use outbox::bus::Bus;
use serde_json::{json, Value};

const BODY: &str = "Schools should teach students how to manage their time, because homework, \
clubs and family duties compete for the same few hours every evening and nobody shows them how.";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suggestions_then_only_confident_ones_confirm_at_the_deadline() {
    let dir = temp_dir("matching");
    let bus = Bus::default();
    let options = Options {
        match_confirm_timeout: Duration::from_secs(1),
        ..Options::default()
    };
    let platform = Platform::start(
        &DataLocation::SqliteDir(dir.clone()),
        Broker::Memory(bus.clone()),
        &options,
    )
    .await
    .unwrap();
    let api = platform.gateway();
    let (_, class) = api
        .post("/v1/classes", &json!({"name": "9B", "course_code": "ENG5"}))
        .await
        .unwrap();
    let class_id = class["class_id"].as_str().unwrap().to_owned();
    let mut students = HashMap::new();
    for (first, last, email) in [
        ("Maya", "Lindqvist", None),
        ("Omar", "Haddad", None),
        ("Elin", "Berg", None),
        ("Anna-Karin", "Svensson", Some("ak.svensson@school.se")),
        ("Jonas", "Ek", None),
        ("Sara", "Nilsson", None),
    ] {
        let (code, s) = api
            .post(
                &format!("/v1/classes/{class_id}/students"),
                &json!({"first_name": first, "last_name": last, "email": email}),
            )
            .await
            .unwrap();
        assert_eq!(code, 201, "{s}");
        students.insert(last, s["student_id"].as_str().unwrap().to_owned());
    }
    // The roster, as the original's NLP service reads it.
    let (code, roster) = api
        .get(&format!("/v1/classes/{class_id}/roster"))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(roster["students"].as_array().unwrap().len(), 6);
    assert_eq!(roster["students"][0]["full_legal_name"], "Elin Berg");

    let essays: Vec<(String, Vec<u8>)> = [
        ("exam-net.txt", "Omar Haddad 2026-02-09\n\nEnglish 9B"),
        ("reordered.txt", "Time and homework\nName: Lindqvist, Maya"),
        ("misspelt.txt", "Time and homework\nStudent: Elin Bergh"),
        ("guess.txt", "Time and homework\nAuthor: Jonas Eklund"),
        (
            "email.txt",
            "Time and homework, an argument\n\nSent from ak.svensson@school.se",
        ),
        ("byline.txt", "Why Time Matters\nby Sara Nilsson"),
        ("anonymous.txt", "Time and homework, an argument"),
    ]
    .iter()
    .map(|(name, head)| (name.to_string(), format!("{head}\n\n{BODY}").into_bytes()))
    .collect();
    let (_, reg) = api
        .post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": essays.len(),
                    "class_id": class_id, "user_id": "t-1"}),
        )
        .await
        .unwrap();
    let batch_id = reg["batch_id"].as_str().unwrap().to_owned();
    let (code, up) = api.upload(&batch_id, None, &essays).await.unwrap();
    assert_eq!(code, 201, "{up}");

    // Suggestions with the original's confidences, per file.
    let deadline = Instant::now() + Duration::from_secs(30);
    let matches = loop {
        let (code, m) = api.get(&format!("/v1/matches/{batch_id}")).await.unwrap();
        if code == 200 && m["status"] == "CONFIRMED" {
            break m;
        }
        assert!(Instant::now() < deadline, "no confirmation: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(matches["confirmed_by"], "SYSTEM_TIMEOUT");
    let (_, view) = api
        .get(&format!("/v1/batches/{batch_id}/essays"))
        .await
        .unwrap();
    let file_of: HashMap<String, String> = view["essays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["essay_id"].as_str().unwrap().to_owned(),
                e["filename"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let by_file: HashMap<&str, &Value> = matches["suggestions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (file_of[s["essay_id"].as_str().unwrap()].as_str(), s))
        .collect();
    let top = |file: &str| {
        let s = by_file[file];
        (
            s["student_id"].as_str().map(str::to_owned),
            s["confidence_score"].as_f64(),
            s["match_reasons"][0].as_str().map(str::to_owned),
        )
    };
    let id = |last: &str| Some(students[last].clone());
    assert_eq!(
        top("exam-net.txt"),
        (id("Haddad"), Some(0.95), Some("name_exact".into()))
    );
    assert_eq!(
        top("reordered.txt"),
        (id("Lindqvist"), Some(0.95), Some("name_exact".into()))
    );
    // One letter off: 0.75 x 0.947 similarity, just confident enough (0.7).
    assert_eq!(
        top("misspelt.txt"),
        (id("Berg"), Some(0.711), Some("name_fuzzy".into()))
    );
    // Another surname that starts alike: a guess below the threshold.
    let (who, confidence, reason) = top("guess.txt");
    assert_eq!((who, reason.as_deref()), (id("Ek"), Some("name_fuzzy")));
    assert!(confidence.unwrap() < 0.7, "{confidence:?}");
    assert_eq!(
        top("email.txt"),
        (id("Svensson"), Some(0.98), Some("email_exact".into()))
    );
    assert_eq!(
        top("byline.txt"),
        (id("Nilsson"), Some(0.95), Some("name_exact".into()))
    );
    assert_eq!(top("anonymous.txt"), (None, None, None));
    assert!(by_file["anonymous.txt"]["no_match_reason"]
        .as_str()
        .is_some());

    // At the deadline: the confident ones are confirmed, the guess and the anonymous essay
    // stay unassigned, and Essay Lifecycle records exactly that.
    let assigned: HashMap<String, Option<String>> = matches["associations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                file_of[a["essay_id"].as_str().unwrap()].clone(),
                a["student_id"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(assigned["exam-net.txt"], id("Haddad"));
    assert_eq!(assigned["reordered.txt"], id("Lindqvist"));
    assert_eq!(assigned["misspelt.txt"], id("Berg"));
    assert_eq!(assigned["email.txt"], id("Svensson"));
    assert_eq!(assigned["byline.txt"], id("Nilsson"));
    assert_eq!(assigned["guess.txt"], None);
    assert_eq!(assigned["anonymous.txt"], None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, view) = api
            .get(&format!("/v1/batches/{batch_id}/essays"))
            .await
            .unwrap();
        let recorded: HashMap<&str, Option<&str>> = view["essays"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["filename"].as_str().unwrap(), e["student_id"].as_str()))
            .collect();
        if recorded.values().filter(|s| s.is_some()).count() == 5 {
            assert_eq!(recorded["guess.txt"], None);
            assert_eq!(recorded["byline.txt"], Some(students["Nilsson"].as_str()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Essay Lifecycle did not record: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // On the wire: one suggestion event, one confirmation marked as the timeout's.
    let confirmed = bus.messages(topics::ASSOCIATIONS_CONFIRMED);
    assert_eq!(confirmed.len(), 1);
    let confirmed: Value = serde_json::from_slice(&confirmed[0].payload).unwrap();
    assert_eq!(confirmed["data"]["timeout_triggered"], true);
    assert_eq!(
        confirmed["data"]["associations"][0]["validation_method"],
        "timeout"
    );
    assert_eq!(bus.messages(topics::AUTHOR_MATCHES_SUGGESTED).len(), 1);
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The teacher overrides a suggestion; a student of another class is refused and changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_teacher_overrides_with_students_of_the_class_only() {
    let (platform, dir) = embedded_platform("matching-override", &Options::default()).await;
    let api = platform.gateway();
    let mut class_ids = Vec::new();
    let mut student_ids = Vec::new();
    for (class, first, last) in [("9B", "Maya", "Lindqvist"), ("9C", "Omar", "Haddad")] {
        let (_, c) = api
            .post(
                "/v1/classes",
                &json!({"name": class, "course_code": "ENG5"}),
            )
            .await
            .unwrap();
        let class_id = c["class_id"].as_str().unwrap().to_owned();
        let (_, s) = api
            .post(
                &format!("/v1/classes/{class_id}/students"),
                &json!({"first_name": first, "last_name": last}),
            )
            .await
            .unwrap();
        student_ids.push(s["student_id"].as_str().unwrap().to_owned());
        class_ids.push(class_id);
    }
    let essays = vec![(
        "a.txt".to_string(),
        format!("Name: Maya Lindqvist\n\n{BODY}").into_bytes(),
    )];
    let (_, reg) = api
        .post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": 1,
                    "class_id": class_ids[0], "user_id": "t-1"}),
        )
        .await
        .unwrap();
    let batch_id = reg["batch_id"].as_str().unwrap().to_owned();
    api.upload(&batch_id, None, &essays).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        let (code, m) = api.get(&format!("/v1/matches/{batch_id}")).await.unwrap();
        if code == 200 {
            break m;
        }
        assert!(Instant::now() < deadline, "no suggestions");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(pending["status"], "PENDING");
    let essay_id = pending["suggestions"][0]["essay_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        pending["suggestions"][0]["student_id"],
        student_ids[0].as_str()
    );

    let confirm =
        |student: &str| json!({"associations": [{"essay_id": essay_id, "student_id": student}]});
    // Only the teacher whose class it is may confirm or read the matching.
    let stranger = api.as_user("another-teacher");
    let (code, body) = stranger
        .post(
            &format!("/v1/matches/{batch_id}/confirm"),
            &confirm(&student_ids[0]),
        )
        .await
        .unwrap();
    assert_eq!(code, 403, "{body}");
    let (code, _) = stranger
        .get(&format!("/v1/matches/{batch_id}"))
        .await
        .unwrap();
    assert_eq!(code, 403);
    let (code, body) = api
        .post(
            &format!("/v1/matches/{batch_id}/confirm"),
            &confirm(&student_ids[1]),
        )
        .await
        .unwrap();
    assert_eq!(code, 400, "a student of another class: {body}");
    let (_, still) = api.get(&format!("/v1/matches/{batch_id}")).await.unwrap();
    assert_eq!(
        still["status"], "PENDING",
        "a refused confirmation changes nothing"
    );
    // Overriding with no student: the essay stays unassigned, on the teacher's word.
    let (code, body) = api
        .post(
            &format!("/v1/matches/{batch_id}/confirm"),
            &json!({"associations": [{"essay_id": essay_id, "student_id": null}]}),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (_, done) = api.get(&format!("/v1/matches/{batch_id}")).await.unwrap();
    assert_eq!(done["status"], "CONFIRMED");
    assert_eq!(
        done["confirmed_by"],
        essay_platform::client::DEFAULT_USER,
        "the signed-in teacher"
    );
    assert_eq!(done["associations"][0]["student_id"], Value::Null);
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
