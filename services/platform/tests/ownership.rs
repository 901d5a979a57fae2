//! Nobody touches what is not theirs: two teachers signed in through the gateway, each
//! refused (403) on the other's batch, files, class, students, matching and results; nobody
//! signed in is refused (401); files go only to a batch that exists, is the caller's and has
//! not started processing. Refusals change nothing.

mod common;

use common::*;
use essay_platform::Options;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_and_change_is_its_owners() {
    let (platform, dir) = embedded_platform("ownership", &Options::default()).await;
    let anna = platform.gateway().as_user("anna");
    let bo = platform.gateway().as_user("bo");
    let nobody = platform.gateway().anonymous();

    // Classes: each teacher lists only their own, a page at a time.
    let mut anna_classes = Vec::new();
    for name in ["7A", "7B", "7C"] {
        let (code, c) = anna
            .post("/v1/classes", &json!({"name": name, "course_code": "ENG5"}))
            .await
            .unwrap();
        assert_eq!(code, 201, "{c}");
        anna_classes.push(c["class_id"].as_str().unwrap().to_owned());
    }
    let (code, c) = bo
        .post("/v1/classes", &json!({"name": "9B", "course_code": "SV1"}))
        .await
        .unwrap();
    assert_eq!(code, 201, "{c}");
    let bo_class = c["class_id"].as_str().unwrap().to_owned();
    let (code, page) = anna.get("/v1/classes?limit=2&offset=0").await.unwrap();
    assert_eq!(code, 200, "{page}");
    assert_eq!(page["classes"].as_array().unwrap().len(), 2);
    let (_, rest) = anna.get("/v1/classes?limit=2&offset=2").await.unwrap();
    assert_eq!(rest["classes"].as_array().unwrap().len(), 1);
    let (_, bos_list) = bo.get("/v1/classes").await.unwrap();
    let listed: Vec<&str> = bos_list["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["class_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [bo_class.as_str()], "only bo's own class");
    let (code, _) = nobody.get("/v1/classes").await.unwrap();
    assert_eq!(code, 401);

    // A class and its students: get, change and delete are the owner's.
    let class = &anna_classes[0];
    let (code, s) = anna
        .post(
            &format!("/v1/classes/{class}/students"),
            &json!({"first_name": "Maya", "last_name": "Lindqvist"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{s}");
    let student = s["student_id"].as_str().unwrap().to_owned();
    for uri in [
        format!("/v1/classes/{class}"),
        format!("/v1/classes/{class}/students"),
        format!("/v1/classes/{class}/roster"),
        format!("/v1/students/{student}"),
    ] {
        let (code, body) = bo.get(&uri).await.unwrap();
        assert_eq!(code, 403, "{uri}: {body}");
        let (code, body) = anna.get(&uri).await.unwrap();
        assert_eq!(code, 200, "{uri}: {body}");
    }
    let (code, _) = bo
        .post(
            &format!("/v1/classes/{class}/students"),
            &json!({"first_name": "Intruder", "last_name": "X"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 403);
    let (code, _) = bo.delete(&format!("/v1/students/{student}")).await.unwrap();
    assert_eq!(code, 403);
    let (code, _) = bo.delete(&format!("/v1/classes/{class}")).await.unwrap();
    assert_eq!(code, 403);
    let (_, roster) = anna
        .get(&format!("/v1/classes/{class}/roster"))
        .await
        .unwrap();
    assert_eq!(roster["students"].as_array().unwrap().len(), 1, "unchanged");
    let (code, one) = anna.get(&format!("/v1/classes/{class}")).await.unwrap();
    assert_eq!(
        (code.as_u16(), one["student_count"].as_i64()),
        (200, Some(1))
    );
    let (code, _) = anna
        .delete(&format!("/v1/students/{student}"))
        .await
        .unwrap();
    assert_eq!(code, 204);
    let (code, _) = anna.get(&format!("/v1/students/{student}")).await.unwrap();
    assert_eq!(code, 404);
    let (code, _) = anna
        .delete(&format!("/v1/classes/{}", anna_classes[2]))
        .await
        .unwrap();
    assert_eq!(code, 204);
    let (_, after) = anna.get("/v1/classes").await.unwrap();
    assert_eq!(after["classes"].as_array().unwrap().len(), 2);

    // Batches: registered by anna, hers only.
    let essays: Vec<_> =
        essay_platform::demo::read_essays(&essay_platform::demo::default_essays_dir())
            .unwrap()
            .into_iter()
            .take(3)
            .collect();
    let (code, reg) = anna
        .post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": 3}),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{reg}");
    let batch = reg["batch_id"].as_str().unwrap().to_owned();
    let (code, _) = nobody
        .post(
            "/v1/batches",
            &json!({"course_code": "ENG5", "expected_essay_count": 3}),
        )
        .await
        .unwrap();
    assert_eq!(code, 401, "registering needs a user");

    // Files: not to an unknown batch, not to someone else's.
    let unknown = uuid::Uuid::new_v4().to_string();
    let (code, body) = anna.upload(&unknown, None, &essays).await.unwrap();
    assert_eq!(code, 404, "{body}");
    let (code, body) = bo.upload(&batch, None, &essays).await.unwrap();
    assert_eq!(code, 403, "{body}");
    let (code, body) = anna.upload(&batch, None, &essays[..2]).await.unwrap();
    assert_eq!(code, 201, "{body}");
    let file = body["files"][0]["file_upload_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _) = bo.get(&format!("/v1/files/{file}/content")).await.unwrap();
    assert_eq!(code, 403);
    let (code, _) = bo.delete(&format!("/v1/files/{file}")).await.unwrap();
    assert_eq!(code, 403);
    let (code, text) = anna
        .get(&format!("/v1/files/{file}/content"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{text}");

    // Reads of the batch anywhere: the owner's.
    for uri in [
        format!("/v1/batches/{batch}"),
        format!("/v1/batches/{batch}/essays"),
    ] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let (code, body) = anna.get(&uri).await.unwrap();
            if code == 200 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{uri}: {code} {body}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (code, body) = bo.get(&uri).await.unwrap();
        assert_eq!(code, 403, "{uri}: {body}");
        let (code, _) = nobody.get(&uri).await.unwrap();
        assert_eq!(code, 401, "{uri}");
    }
    let (code, _) = bo
        .post(
            &format!("/v1/batches/{batch}/pipelines"),
            &json!({"requested_pipeline": "spellcheck"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 403, "a pipeline on someone else's batch");

    // Once processing starts, the batch's files are locked.
    let (code, body) = anna.upload(&batch, None, &essays[2..]).await.unwrap();
    assert_eq!(code, 201, "the last file: {body}");
    let (code, body) = anna
        .post(
            &format!("/v1/batches/{batch}/pipelines"),
            &json!({"requested_pipeline": "spellcheck"}),
        )
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let results = loop {
        let (code, r) = anna
            .get(&format!("/v1/batches/{batch}/results"))
            .await
            .unwrap();
        if code == 200 && r["status"] == "COMPLETED" {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no results: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(results["essays"].as_array().unwrap().len(), 3);
    let (code, body) = anna.upload(&batch, None, &essays[..1]).await.unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("locked"), "{body}");
    let (code, _) = anna.delete(&format!("/v1/files/{file}")).await.unwrap();
    assert_eq!(code, 409, "a processed file stays");
    let (code, _) = bo
        .get(&format!("/v1/batches/{batch}/results"))
        .await
        .unwrap();
    assert_eq!(code, 403);

    // Refused requests wrote nothing: anna's three files, one event pair each.
    let (_, files_db) = platform
        .databases()
        .into_iter()
        .find(|(name, _)| *name == file_service::NAME)
        .unwrap();
    let n = files_db
        .fetch_optional("SELECT COUNT(*) AS n FROM files", &[])
        .await
        .unwrap()
        .unwrap()
        .int("n")
        .unwrap();
    assert_eq!(n, 3);
    platform.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
