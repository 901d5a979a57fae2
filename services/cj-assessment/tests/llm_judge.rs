//! The LLM judge against a local OpenAI-compatible server over real HTTP (the real providers
//! are outside this machine): good answers, answers that are not verdicts, 429s then
//! success, timeouts, refusals; and in the service, a redelivered request that does not pay
//! for any comparison twice, token usage reported, an unavailable judge that makes the batch
//! wait instead of failing it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use cj_assessment::judge::{Candidate, Judge, JudgeError};
use cj_assessment::llm::{Assessment, LlmConfig, LlmJudge};
use cj_assessment::CjAssessment;
use content_service::testing::LocalContentService;
use essay_common::{topics, Envelope, EventFactory, Service};
use outbox::portable::{params, ServiceDb};
use serde_json::{json, Value};

/// How the fake model answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Prefers the essay containing "STRONG", confidence 4, 120 tokens.
    Good,
    /// Prose, no verdict.
    Rambling,
    /// 429 (Retry-After: 0) for the first `n` calls, then good.
    Busy(usize),
    /// Answers after 2 s.
    Slow,
    /// 401: a wrong key.
    Refusing,
}

struct Fake {
    mode: Mutex<Mode>,
    calls: AtomicUsize,
    last: Mutex<Option<(Value, Option<String>)>>,
}

async fn completions(
    State(fake): State<Arc<Fake>>,
    headers: axum::http::HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let n = fake.calls.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    *fake.last.lock().unwrap() = Some((body.clone(), auth));
    let mode = *fake.mode.lock().unwrap();
    match mode {
        Mode::Busy(k) if n < k => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "0")],
                "slow down",
            )
                .into_response()
        }
        Mode::Slow => tokio::time::sleep(Duration::from_secs(2)).await,
        Mode::Refusing => return (StatusCode::UNAUTHORIZED, "invalid api key").into_response(),
        _ => {}
    }
    let prompt = body["messages"][1]["content"].as_str().unwrap_or_default();
    let (a, b) = prompt.split_once("**Essay B:**").unwrap_or((prompt, ""));
    let content = if mode == Mode::Rambling {
        "Both essays have merits; it is hard to say.".to_owned()
    } else {
        let winner = if a.contains("STRONG") || !b.contains("STRONG") {
            "Essay A"
        } else {
            "Essay B"
        };
        format!("```json\n{{\"winner\": \"{winner}\", \"justification\": \"a clearer argument\", \"confidence\": 4}}\n```")
    };
    Json(
        json!({"choices": [{"message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}),
    )
    .into_response()
}

async fn fake_server(mode: Mode) -> (Arc<Fake>, String) {
    let fake = Arc::new(Fake {
        mode: Mutex::new(mode),
        calls: AtomicUsize::new(0),
        last: Mutex::new(None),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, format!("http://{addr}/v1"))
}

fn config(url: &str) -> LlmConfig {
    LlmConfig {
        base_url: url.into(),
        model: "test-model".into(),
        api_key: Some("sk-test".into()),
        timeout: Duration::from_millis(500),
        attempts: 3,
        first_backoff: Duration::from_millis(10),
        assessment: Assessment {
            student_prompt: Some("Should phones be banned in class?".into()),
            instructions: Some("Reward a clear thesis.".into()),
            rubric: Some("Argument over style.".into()),
        },
    }
}

fn essay(id: &str, text: &str) -> Candidate {
    Candidate {
        essay_id: id.into(),
        text_storage_id: format!("text-{id}"),
        text: text.into(),
        spelling_errors: None,
    }
}

#[tokio::test]
async fn verdicts_retries_timeouts_and_refusals() {
    let (fake, url) = fake_server(Mode::Good).await;
    let judge = LlmJudge::new(config(&url)).unwrap();
    let (weak, strong) = (essay("w", "A plain essay."), essay("s", "A STRONG essay."));
    let j = judge.compare(&weak, &strong).await.unwrap();
    assert!(!j.a_wins, "B holds the strong essay");
    assert_eq!(j.reason, "a clearer argument");
    assert_eq!(j.confidence, Some(0.75));
    assert_eq!(j.tokens, 120);
    let (body, auth) = fake.last.lock().unwrap().clone().unwrap();
    assert_eq!(body["model"], "test-model");
    assert_eq!(auth.as_deref(), Some("Bearer sk-test"));
    let prompt = body["messages"][1]["content"].as_str().unwrap();
    for part in [
        "Should phones be banned",
        "Reward a clear thesis",
        "Argument over style",
        "A plain essay.",
        "\"winner\"",
    ] {
        assert!(prompt.contains(part), "the prompt lacks {part:?}: {prompt}");
    }

    *fake.mode.lock().unwrap() = Mode::Rambling;
    let e = judge.compare(&weak, &strong).await.unwrap_err();
    assert!(
        matches!(&e, JudgeError::Unparseable(m) if m.contains("hard to say")),
        "{e}"
    );

    fake.calls.store(0, Ordering::SeqCst);
    *fake.mode.lock().unwrap() = Mode::Busy(2);
    let j = judge.compare(&strong, &weak).await.unwrap();
    assert!(j.a_wins);
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        3,
        "two 429s, then the answer"
    );

    fake.calls.store(0, Ordering::SeqCst);
    *fake.mode.lock().unwrap() = Mode::Slow;
    let e = judge.compare(&strong, &weak).await.unwrap_err();
    assert!(
        matches!(&e, JudgeError::Unavailable(m) if m.contains("no answer within")),
        "{e}"
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), 3, "every try timed out");

    *fake.mode.lock().unwrap() = Mode::Refusing;
    let e = judge.compare(&strong, &weak).await.unwrap_err();
    assert!(
        matches!(&e, JudgeError::Refused(m) if m.contains("401")),
        "{e}"
    );

    let e = LlmJudge::new(LlmConfig {
        base_url: "localhost:8000".into(),
        ..config(&url)
    })
    .err()
    .unwrap();
    assert!(e.contains("CJ_LLM_URL"), "{e}");
}

fn request(batch: &str, essays: &[(String, String)]) -> Envelope {
    let e = EventFactory::new("essay_lifecycle_service")
        .event(
            topics::CJ_REQUESTED,
            ("batch", batch),
            uuid::Uuid::new_v4(),
            &json!({"entity_id": batch, "user_id": "t1",
                    "essays_for_cj": essays.iter().map(|(id, text)| json!({"essay_id": id, "text_storage_id": text})).collect::<Vec<_>>()}),
        )
        .unwrap();
    serde_json::from_slice(e.payload()).unwrap()
}

async fn apply(
    cj: &CjAssessment,
    db: &ServiceDb,
    env: &Envelope,
) -> Result<(), outbox::HandlerError> {
    cj.prepare(env).await?;
    let mut tx = db.begin().await.unwrap();
    cj.handle(&mut tx, env).await?;
    tx.commit().await.unwrap();
    Ok(())
}

async fn payloads(db: &ServiceDb, topic: &str) -> Vec<Value> {
    db.fetch_all(
        "SELECT payload FROM event_outbox WHERE topic = $1 ORDER BY seq",
        params![topic],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| serde_json::from_slice::<Value>(&r.bytes("payload").unwrap()).unwrap()["data"].clone())
    .collect()
}

#[tokio::test]
async fn the_service_pays_once_per_pair_and_waits_out_an_unavailable_judge() {
    let dir = std::env::temp_dir().join(format!("cj-llm-{}", uuid::Uuid::new_v4().simple()));
    let content = LocalContentService::start(&dir).await;
    let db = ServiceDb::open(&format!("sqlite://{}/cj.db", dir.display()), "cj")
        .await
        .unwrap();
    let (fake, url) = fake_server(Mode::Good).await;
    let judge = Arc::new(LlmJudge::new(config(&url)).unwrap());
    let cj = CjAssessment::open(db.clone(), judge, content.client())
        .await
        .unwrap();
    let mut essays = Vec::new();
    for (i, text) in [
        "An essay.",
        "Another STRONG essay.",
        "A third essay.",
        "A fourth essay.",
    ]
    .iter()
    .enumerate()
    {
        let id = content
            .client()
            .store(text.as_bytes().to_vec(), "text/plain", uuid::Uuid::new_v4())
            .await
            .unwrap();
        essays.push((format!("e{i}"), id.to_string()));
    }

    // The judge is down: the batch waits (an outage, retried), nothing is failed.
    *fake.mode.lock().unwrap() = Mode::Slow;
    let batch = uuid::Uuid::new_v4().to_string();
    let e = apply(&cj, &db, &request(&batch, &essays))
        .await
        .unwrap_err();
    assert!(matches!(e, outbox::HandlerError::Unavailable(_)), "{e:?}");
    assert!(payloads(&db, topics::CJ_FAILED).await.is_empty());

    // Back: judged, ranked, usage reported.
    *fake.mode.lock().unwrap() = Mode::Good;
    fake.calls.store(0, Ordering::SeqCst);
    apply(&cj, &db, &request(&batch, &essays)).await.unwrap();
    let asked = fake.calls.load(Ordering::SeqCst);
    let results = payloads(&db, topics::ASSESSMENT_RESULT_PUBLISHED).await;
    let pairs = results[0]["assessment_metadata"]["comparison_count"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(asked, pairs, "every chosen pair once");
    assert_eq!(
        pairs, 6,
        "four essays: every pair, the abilities never settle sooner"
    );
    assert_eq!(
        results[0]["essay_results"][0]["essay_id"], "e1",
        "the strong essay first"
    );
    assert_eq!(results[0]["model_used"], "llm:test-model");
    let usage = payloads(&db, topics::RESOURCE_CONSUMPTION).await;
    let tokens: Vec<&Value> = usage
        .iter()
        .filter(|u| u["resource_type"] == "llm_tokens")
        .collect();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["quantity"], pairs * 120);

    // Redelivered (a new event id, the same run), and a retried run of the same essays: no
    // comparison is paid for twice.
    apply(&cj, &db, &request(&batch, &essays)).await.unwrap();
    let mut retried = request(&batch, &essays);
    retried.data["run"] = json!(2);
    apply(&cj, &db, &retried).await.unwrap();
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        asked,
        "all from the judgement cache"
    );
    assert_eq!(
        payloads(&db, topics::ASSESSMENT_RESULT_PUBLISHED)
            .await
            .len(),
        2,
        "two runs"
    );

    // An assignment's own assessment reaches the model, and verdicts given under another one
    // are not reused for it.
    cj.set_assessment(
        &essay_common::identity::Caller("t1".into()),
        "a1",
        Assessment {
            rubric: Some("Judge only the conclusion.".into()),
            ..Assessment::default()
        },
    )
    .await
    .unwrap();
    let mut in_assignment = request(&batch, &essays);
    in_assignment.data["assignment_id"] = json!("a1");
    in_assignment.data["run"] = json!(3);
    apply(&cj, &db, &in_assignment).await.unwrap();
    assert!(
        fake.calls.load(Ordering::SeqCst) > asked,
        "judged again under its rubric"
    );
    let (body, _) = fake.last.lock().unwrap().clone().unwrap();
    let prompt = body["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.contains("Judge only the conclusion."), "{prompt}");
    assert!(
        !prompt.contains("Argument over style."),
        "the assignment's, not the default"
    );
    content.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
