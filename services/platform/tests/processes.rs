//! The platform as nine processes (`essay-platform serve <service>`) against PostgreSQL and a
//! real Kafka-protocol broker, driven over HTTP like any client would; the services find the
//! Content Service by `CONTENT_SERVICE_URL` and Class Management by `CLASS_MANAGEMENT_URL`.

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
    let DataLocation::Postgres { url, schema_prefix } = &location else {
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
    for (short, _, _) in SERVICES {
        let addr = addrs[*short];
        let child = Command::new(env!("CARGO_BIN_EXE_essay-platform"))
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
            .expect("spawn a service");
        children.0.push(child);
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
