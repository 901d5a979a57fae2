//! Test support (feature `testing`): real Kafka-protocol brokers for tests.
//!
//! - [`shared_bootstrap`]: the broker `.ci/run` started (`KAFKA_BOOTSTRAP_SERVERS`), for tests
//!   that only produce and consume.
//! - [`TestBroker::start`]: a private broker process on a free loopback port, for tests that
//!   freeze, stop or restart it. Needs the broker binary in `OUTBOX_TEST_BROKER_BIN` (nisshi;
//!   `.ci/run` builds and exports it).
//!
//! Both fail loudly when the broker is missing: these tests need the real thing.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};

use crate::config::KafkaConfig;

/// The shared broker's address, or a panic explaining how to get one.
pub fn shared_bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BOOTSTRAP_SERVERS is not set: these tests need a real Kafka-protocol broker; \
             run `bash .ci/run`, which builds and starts one"
        )
    })
}

/// A broker process of the test's own, killed on drop.
pub struct TestBroker {
    child: Child,
    pub port: u16,
}

impl TestBroker {
    pub fn binary() -> String {
        std::env::var("OUTBOX_TEST_BROKER_BIN").unwrap_or_else(|_| {
            panic!(
                "OUTBOX_TEST_BROKER_BIN is not set: point it at a nisshi binary \
                 (`bash .ci/run` builds one and sets it)"
            )
        })
    }

    /// Starts a broker with in-memory storage on a free port and waits until it listens
    /// itself (another test's broker may win a race for the port: then another port).
    pub fn start() -> Self {
        for _ in 0..5 {
            if let Some(broker) = Self::try_start_on(free_port()) {
                return broker;
            }
        }
        panic!("the test broker could not bind a free port in 5 starts");
    }

    /// Starts a broker on `port` (e.g. again after [`TestBroker::kill`]).
    pub fn start_on(port: u16) -> Self {
        for _ in 0..5 {
            if let Some(broker) = Self::try_start_on(port) {
                return broker;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("the test broker could not bind 127.0.0.1:{port} in 5 starts");
    }

    fn try_start_on(port: u16) -> Option<Self> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut child = Command::new(Self::binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://nisshi/",
                "--group-initial-rebalance-delay",
                "0s",
                "--silent",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the test broker");
        if outbox_core::testing::wait_child_listening(
            &mut child,
            port,
            Duration::from_secs(20),
            "the test broker",
        ) {
            Some(Self { child, port })
        } else {
            let _ = child.wait();
            None
        }
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    /// Thaws a frozen broker (SIGCONT).
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// Kills the broker (its in-memory data is gone).
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        signal(self.pid(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    outbox_core::testing::signal(&pid.to_string(), sig);
}

pub use outbox_core::testing::free_port;

/// A message read back from a topic.
#[derive(Clone, Debug)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

/// Reads `topics` from the beginning with a fresh consumer group until messages with `count`
/// distinct `event_id` headers (re-sends count once) arrived or `limit` passed; returns every
/// message that arrived, re-sends included, in per-partition order.
pub async fn read_topics(
    bootstrap: &str,
    topics: &[&str],
    count: usize,
    limit: Duration,
) -> Vec<Received> {
    let consumer: StreamConsumer = KafkaConfig::new(bootstrap)
        .client_config()
        .set(
            "group.id",
            format!("reader-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("test consumer");
    consumer.subscribe(topics).expect("subscribe");
    let mut out: Vec<Received> = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let deadline = Instant::now() + limit;
    while distinct.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(Received {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            Ok(Err(e)) => tracing::warn!(error = %e, "test consumer error"),
            Err(_) => break,
        }
        if let Some(m) = out.last() {
            let id = m.headers.get("event_id").cloned();
            distinct
                .insert(id.unwrap_or_else(|| format!("{}/{}/{}", m.topic, m.partition, m.offset)));
        }
    }
    out
}
