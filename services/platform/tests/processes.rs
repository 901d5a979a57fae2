//! The platform as nine processes (`essay-platform serve <service>`) against PostgreSQL and a
//! real Kafka-protocol broker, driven over HTTP like any client would; the services find the
//! Content Service by `CONTENT_SERVICE_URL` and Class Management by `CLASS_MANAGEMENT_URL`.
//! Then Essay Lifecycle is killed (SIGKILL) and restarted at once: the time until it consumes
//! and publishes again is measured (BENCHMARKS.md, "restart recovery of a service").

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use essay_common::runtime::DataLocation;
use essay_platform::client::Gateway;
use essay_platform::{demo, SERVICES};
use outbox::portable::ServiceDb;
use outbox_kafka::testing::{free_port, TestBroker};

struct Processes(Vec<Child>);

/// One of the sample essays.
fn report_essay() -> (String, Vec<u8>) {
    demo::read_essays(&demo::default_essays_dir())
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_processes_run_a_batch() {
    let broker = TestBroker::start();
    let location = pg_location("procs");
    let DataLocation::Server { url, schema_prefix } = &location else {
        unreachable!()
    };
    let addrs: HashMap<String, SocketAddr> = SERVICES
        .iter()
        .map(|(short, _, _)| {
            (
                short.to_string(),
                SocketAddr::from(([127, 0, 0, 1], free_port())),
            )
        })
        .collect();
    let content_url = format!("http://{}", addrs["content-service"]);
    let cms_url = format!("http://{}", addrs["class-management"]);
    let bos_url = format!("http://{}", addrs["batch-orchestrator"]);
    let mut children = Processes(Vec::new());
    let spawn = |short: &str| {
        let addr = addrs[short];
        Command::new(env!("CARGO_BIN_EXE_essay-platform"))
            .args(["serve", short, "--addr", &addr.to_string()])
            .env("CONTENT_SERVICE_URL", &content_url)
            .env("CLASS_MANAGEMENT_URL", &cms_url)
            .env("BATCH_ORCHESTRATOR_URL", &bos_url)
            // Nine pools on one PostgreSQL beside other tests: a few connections each suffice.
            .env("OUTBOX_PG_POOL_SIZE", "4")
            .env("DATABASE_URL", url)
            .env("PLATFORM_SCHEMA_PREFIX", schema_prefix)
            .env("OUTBOX_BROKER", broker.bootstrap())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn a service")
    };
    for (short, _, _) in SERVICES {
        children.0.push(spawn(short));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (service, addr) in &addrs {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "{service} did not start listening on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let api = Gateway::remote(addrs.clone());
    let (code, health) = api.get("/metrics").await.unwrap();
    assert_eq!(code, 200, "{health}");
    let report = demo::run(&api, &quiet(true))
        .await
        .expect("the batch runs across processes");
    check_results(&report);

    // Essay Lifecycle killed mid-life and started again within a moment, as a crashed pod
    // would be: it must consume (a new batch's registration) and publish (its provisioning)
    // again within seconds, not after its dead relay's leases and consumer session expire.
    let els = SERVICES
        .iter()
        .position(|(s, _, _)| *s == "essay-lifecycle")
        .unwrap();
    children.0[els].kill().unwrap();
    children.0[els].wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted_at = Instant::now();
    children.0[els] = spawn("essay-lifecycle");
    let (_, reg) = api
        .post(
            "/v1/batches",
            &serde_json::json!({"course_code": "ENG5", "expected_essay_count": 1}),
        )
        .await
        .unwrap();
    let batch = reg["batch_id"].as_str().unwrap().to_owned();
    let consumed = loop {
        // Until the process listens, the request fails: not consumed yet either.
        let answered = api.get(&format!("/v1/batches/{batch}/essays")).await;
        if answered.is_ok_and(|(code, _)| code == 200) {
            break restarted_at.elapsed();
        }
        assert!(
            restarted_at.elapsed() < Duration::from_secs(60),
            "never consumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (code, body) = api.upload(&batch, None, &[report_essay()]).await.unwrap();
    assert_eq!(code, 201, "{body}");
    let published = loop {
        let (_, status) = api.get(&format!("/v1/batches/{batch}")).await.unwrap();
        if status["status"] == "READY" {
            break restarted_at.elapsed();
        }
        assert!(
            restarted_at.elapsed() < Duration::from_secs(60),
            "never published: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "essay-lifecycle SIGKILLed and restarted: first event consumed {consumed:?}, \
         first event published (and consumed by Batch Orchestrator) {published:?} after restart"
    );
    assert!(
        consumed < Duration::from_secs(8),
        "the restarted consumer waited {consumed:?}: its static membership was not honoured"
    );

    // Stop the nine processes first: their pools hold connections the checks below need
    // (PostgreSQL allows 100, shared with the tests running beside this one).
    drop(children);
    let mut dbs = Vec::new();
    for (_, service, _) in SERVICES {
        let db = ServiceDb::open(url, &format!("{schema_prefix}{service}"))
            .await
            .unwrap();
        dbs.push((*service, db));
    }
    assert_effects_once(&dbs, &report.batch_id, true).await;
    drop(dbs);
    drop_schemas(&location).await;
}
