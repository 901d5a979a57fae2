//! A property of the whole platform: whatever a teacher does, in whatever order, with the
//! Content Service restarting in between, every batch ends terminal (its pipeline completed or
//! failed, or the batch failed with a reason) or waits for the teacher (ready, no pipeline
//! asked) or for a deadline still ahead; nothing is dead-lettered, no essay is left in flight,
//! and each completed pipeline is announced exactly once.
//!
//! Random interleavings of registrations, uploads, removals, pipeline requests (some repeated
//! or retried), match confirmations and Content Service restarts, on the embedded default.

mod common;

use std::time::{Duration, Instant};

use common::*;
use essay_platform::client::Gateway;
use essay_platform::{Options, Platform};
use proptest::prelude::*;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
enum Op {
    /// A batch of `essays` expected essays, of the class (REGULAR) or not (GUEST).
    Register {
        essays: usize,
        with_class: bool,
    },
    Upload {
        batch: usize,
        files: usize,
    },
    RemoveFirstFile {
        batch: usize,
    },
    Pipeline {
        batch: usize,
        pipeline: &'static str,
        retry: bool,
    },
    Confirm {
        batch: usize,
    },
    RestartContentService,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..=3, any::<bool>()).prop_map(|(essays, with_class)| Op::Register { essays, with_class }),
        4 => (0usize..4, 1usize..=3).prop_map(|(batch, files)| Op::Upload { batch, files }),
        1 => (0usize..4).prop_map(|batch| Op::RemoveFirstFile { batch }),
        3 => (0usize..4, prop::sample::select(vec!["spellcheck", "cj_assessment", "nlp"]), any::<bool>())
            .prop_map(|(batch, pipeline, retry)| Op::Pipeline { batch, pipeline, retry }),
        1 => (0usize..4).prop_map(|batch| Op::Confirm { batch }),
        1 => Just(Op::RestartContentService),
    ]
}

struct Run {
    platform: Platform,
    api: Gateway,
    class_id: String,
    essays: Vec<(String, Vec<u8>)>,
    batches: Vec<String>,
    files: Vec<Vec<String>>,
    /// Whether a pipeline request was accepted (202) for each batch: it travels to the Batch
    /// Orchestrator as a command through the outbox, so the batch is not settled before the
    /// orchestrator has either started a pipeline or recorded a denial.
    requested: Vec<bool>,
}

impl Run {
    async fn apply(&mut self, op: &Op) {
        let pick = |i: usize, n: usize| (n > 0).then(|| i % n);
        match op {
            Op::Register { essays, with_class } => {
                let mut body = json!({"course_code": "ENG5", "expected_essay_count": essays});
                if *with_class {
                    body["class_id"] = json!(self.class_id);
                }
                let (code, reg) = self.api.post("/v1/batches", &body).await.unwrap();
                assert_eq!(code, 201, "{reg}");
                self.batches
                    .push(reg["batch_id"].as_str().unwrap().to_owned());
                self.files.push(Vec::new());
                self.requested.push(false);
            }
            Op::Upload { batch, files } => {
                let Some(b) = pick(*batch, self.batches.len()) else {
                    return;
                };
                let start = self.files[b].len() % self.essays.len();
                let chosen: Vec<_> = self
                    .essays
                    .iter()
                    .cycle()
                    .skip(start)
                    .take(*files)
                    .cloned()
                    .collect();
                let (code, body) = self
                    .api
                    .upload(&self.batches[b], None, &chosen)
                    .await
                    .unwrap();
                // Accepted, or refused with a reason (locked; the Content Service restarting).
                assert!(matches!(code.as_u16(), 201 | 409 | 503), "{code} {body}");
                if code == 201 {
                    for f in body["files"].as_array().unwrap() {
                        self.files[b].push(f["file_upload_id"].as_str().unwrap().to_owned());
                    }
                }
            }
            Op::RemoveFirstFile { batch } => {
                let Some(b) = pick(*batch, self.batches.len()) else {
                    return;
                };
                let Some(file) = self.files[b].first().cloned() else {
                    return;
                };
                let (code, body) = self.api.delete(&format!("/v1/files/{file}")).await.unwrap();
                assert!(matches!(code.as_u16(), 204 | 409), "{code} {body}");
            }
            Op::Pipeline {
                batch,
                pipeline,
                retry,
            } => {
                let Some(b) = pick(*batch, self.batches.len()) else {
                    return;
                };
                let (code, body) = self
                    .api
                    .post(
                        &format!("/v1/batches/{}/pipelines", self.batches[b]),
                        &json!({"requested_pipeline": pipeline, "is_retry": retry}),
                    )
                    .await
                    .unwrap();
                // Accepted, or refused at once with a reason.
                assert!(matches!(code.as_u16(), 202 | 400 | 409), "{code} {body}");
                if code == 202 {
                    self.requested[b] = true;
                }
            }
            Op::Confirm { batch } => {
                let Some(b) = pick(*batch, self.batches.len()) else {
                    return;
                };
                let (code, body) = self
                    .api
                    .post(
                        &format!("/v1/matches/{}/confirm", self.batches[b]),
                        &json!({}),
                    )
                    .await
                    .unwrap();
                assert!(matches!(code.as_u16(), 200 | 404), "{code} {body}");
            }
            Op::RestartContentService => {
                self.platform.stop_content_service().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.platform.restart_content_service().await.unwrap();
            }
        }
    }

    /// Whether `batch` is settled: terminal, or waiting for the teacher or a future deadline.
    async fn settled(&self, batch: &str) -> Result<(), String> {
        let (_, status) = self.api.get(&format!("/v1/batches/{batch}")).await.unwrap();
        let now = essay_common::util::now_ms();
        let pipeline = &status["pipeline"];
        let requested = self
            .batches
            .iter()
            .position(|b| b == batch)
            .is_some_and(|i| self.requested[i]);
        let request_in_flight = requested && status["last_denial"].is_null();
        match (status["status"].as_str(), pipeline["status"].as_str()) {
            (Some("FAILED"), _) if status["failure_reason"].is_string() => Ok(()),
            (Some("READY"), None) if !request_in_flight => Ok(()),
            (_, Some("COMPLETED" | "FAILED")) => Ok(()),
            (_, Some("RUNNING"))
                if pipeline["phase_deadline_ms"]
                    .as_i64()
                    .is_some_and(|d| d > now) =>
            {
                Err(format!("running toward its deadline: {status}"))
            }
            _ => Err(format!("not settled: {status}")),
        }
    }
}

fn check(ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let options = Options {
            provisioning_timeout: Duration::from_secs(2),
            match_confirm_timeout: Duration::from_secs(1),
            phase_timeout: Duration::from_secs(20),
            ..Options::default()
        };
        let (platform, dir) = embedded_platform("lifecycle-property", &options).await;
        let api = platform.gateway();
        let (_, class) = api
            .post("/v1/classes", &json!({"name": "7A", "course_code": "ENG5"}))
            .await
            .unwrap();
        let class_id = class["class_id"].as_str().unwrap().to_owned();
        for (first, last) in [("Maya", "Lindqvist"), ("Omar", "Haddad")] {
            api.post(
                &format!("/v1/classes/{class_id}/students"),
                &json!({"first_name": first, "last_name": last}),
            )
            .await
            .unwrap();
        }
        let essays = essay_platform::demo::read_essays(&essay_platform::demo::default_essays_dir())
            .unwrap()
            .into_iter()
            .take(4)
            .collect();
        let mut run = Run {
            platform,
            api,
            class_id,
            essays,
            batches: Vec::new(),
            files: Vec::new(),
            requested: Vec::new(),
        };
        for op in &ops {
            run.apply(op).await;
        }
        // Everything settles within the deadlines (2 s provisioning, 1 s matching) and the
        // work they start.
        let limit = Instant::now() + Duration::from_secs(45);
        for batch in run.batches.clone() {
            loop {
                match run.settled(&batch).await {
                    Ok(()) => break,
                    Err(why) if Instant::now() > limit => panic!("{why}\nops: {ops:?}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        drain_outboxes(&run.platform, Duration::from_secs(30)).await;
        // No essay left in flight; each completed pipeline announced once.
        let dbs = run.platform.databases();
        let db = |name: &str| dbs.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        for batch in &run.batches {
            let (_, essays) = run
                .api
                .get(&format!("/v1/batches/{batch}/essays"))
                .await
                .unwrap();
            if let Some(list) = essays["essays"].as_array() {
                for e in list {
                    let state = e["state"].as_str().unwrap();
                    assert!(
                        !state.ends_with("_REQUESTED"),
                        "{batch}: {e} in flight; ops: {ops:?}"
                    );
                }
            }
            // Counted on the broker: published outbox rows may already be cleaned up.
            let outbox::backend::Broker::Memory(bus) = &run.platform.broker else {
                unreachable!("the embedded default")
            };
            let completions = bus
                .messages(essay_common::topics::PIPELINE_COMPLETED)
                .iter()
                .filter(|m| {
                    let env: Value = serde_json::from_slice(&m.payload).unwrap();
                    env["data"]["batch_id"] == batch.as_str()
                })
                .count() as i64;
            let announced = db(result_aggregator::NAME)
                .fetch_optional(
                    "SELECT results_ready_sent FROM ra_batches WHERE batch_id = $1",
                    outbox::portable::params![batch],
                )
                .await
                .unwrap()
                .map_or(0, |r| r.int("results_ready_sent").unwrap());
            assert_eq!(
                announced, completions,
                "{batch}: announcements per completion; ops: {ops:?}"
            );
        }
        run.platform.stop().await;
        let _ = std::fs::remove_dir_all(dir);
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, max_shrink_iters: 0, ..ProptestConfig::default() })]
    #[test]
    fn every_batch_settles_and_every_event_counts_once(ops in prop::collection::vec(op(), 4..14)) {
        check(ops);
    }
}
