//! Test support (feature `testing`): private nats-server processes and a subject reader.
//!
//! [`PrivateNats::start`] runs `nats-server -js` (the binary on `PATH`, or
//! `OUTBOX_TEST_NATS_BIN`) on a free loopback port with file storage in a directory of its
//! own, so a test can freeze it, kill it and start it again on the same port and data without
//! touching the machine's own server. It fails loudly when the binary is missing: these tests
//! need the real thing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use outbox_core::IncomingMessage;

use crate::streams::{Streams, KEY_HEADER};
use crate::NatsConfig;

/// A nats-server of the test's own, killed (and its data removed) on drop.
pub struct PrivateNats {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    started_once: bool,
}

impl PrivateNats {
    pub fn binary() -> String {
        std::env::var("OUTBOX_TEST_NATS_BIN").unwrap_or_else(|_| "nats-server".into())
    }

    /// Starts a server with JetStream on a free port and waits until it listens.
    pub fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "outbox-nats-{}-{port}-{}",
            std::process::id(),
            uuid_like()
        ));
        std::fs::create_dir_all(&dir).expect("nats data directory");
        let mut nats = Self {
            child: None,
            port,
            dir,
            started_once: false,
        };
        nats.launch();
        nats
    }

    /// Starts the process and waits until it listens itself (not another test's server that
    /// won a race for the free port). A first start that lost such a race moves to another
    /// port; a restart keeps its port, as the clients expect.
    fn launch(&mut self) {
        for attempt in 0..5 {
            if attempt > 0 && !self.started_once {
                self.port = free_port();
            }
            let mut child = Command::new(Self::binary())
                .args([
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-sd",
                ])
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {} ({e}): these tests need nats-server on PATH or in \
                         OUTBOX_TEST_NATS_BIN",
                        Self::binary()
                    )
                });
            let listening = outbox_core::testing::wait_child_listening(
                &mut child,
                self.port,
                Duration::from_secs(20),
                "nats-server",
            );
            if listening {
                self.child = Some(child);
                self.started_once = true;
                return;
            }
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "nats-server could not bind 127.0.0.1:{} in 5 starts",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn config(&self) -> NatsConfig {
        NatsConfig::new(self.url())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
        }
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
        }
    }

    /// Kills the server (SIGKILL); its stored streams stay on disk.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn signal(pid: u32, sig: &str) {
    outbox_core::testing::signal(&pid.to_string(), sig);
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    )
}

pub use outbox_core::testing::free_port;

/// Reads `subject` from the start of its stream until messages with `count` distinct
/// `event_id` headers arrived or `limit` passed; every message that arrived, in stream order.
pub async fn read_subject(
    config: &NatsConfig,
    subject: &str,
    count: usize,
    limit: Duration,
) -> Vec<IncomingMessage> {
    let client = config.connect("outbox-test-reader").await.expect("connect");
    let js = config.jetstream(client);
    let deadline = Instant::now() + limit;
    let stream = loop {
        match Streams::default().ensure(&js, config, subject).await {
            Ok(name) => break name,
            Err(e) if Instant::now() > deadline => panic!("no stream for {subject}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let stream = js.get_stream_no_info(&stream).await.expect("stream");
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("reader consumer");
    let mut messages = consumer.messages().await.expect("reader messages");
    let mut out = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    while distinct.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, messages.next()).await {
            Ok(Some(Ok(m))) => {
                let m = incoming(&m);
                distinct.insert(
                    m.headers
                        .get("event_id")
                        .cloned()
                        .unwrap_or_else(|| format!("seq {}", m.offset)),
                );
                out.push(m);
            }
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "test reader error"),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// Every message stored now under each of `subjects` (subjects without a stream have none),
/// subject by subject, each in stream order.
pub async fn read_stored(config: &NatsConfig, subjects: &[&str]) -> Vec<IncomingMessage> {
    let client = config.connect("outbox-test-reader").await.expect("connect");
    let js = config.jetstream(client);
    let mut out = Vec::new();
    for subject in subjects {
        let Ok(name) = js.stream_by_subject(*subject).await else {
            continue;
        };
        let stream = js.get_stream_no_info(&name).await.expect("stream");
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: (*subject).to_owned(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                ..Default::default()
            })
            .await
            .expect("reader consumer");
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(Duration::from_millis(300))
                .messages()
                .await
                .expect("fetch");
            let mut got = 0;
            while let Some(Ok(m)) = batch.next().await {
                got += 1;
                out.push(incoming(&m));
            }
            if got == 0 {
                break;
            }
        }
    }
    out
}

/// A raw copy of `message` published again without the outbox's deduplication id, as a
/// broker redelivers (or a producer re-sends after the duplicate window).
pub async fn publish_raw(config: &NatsConfig, message: &IncomingMessage) {
    let client = config
        .connect("outbox-test-producer")
        .await
        .expect("connect");
    let js = config.jetstream(client);
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in &message.headers {
        if k != "Nats-Msg-Id" {
            headers.insert(k.as_str(), v.as_str());
        }
    }
    if let Some(key) = &message.key {
        headers.insert(KEY_HEADER, key.as_str());
    }
    js.publish_with_headers(message.topic.clone(), headers, message.payload.clone())
        .await
        .expect("publish")
        .await
        .expect("acknowledged");
}

fn incoming(m: &async_nats::jetstream::Message) -> IncomingMessage {
    let mut headers = outbox_core::Headers::new();
    let mut key = None;
    for (name, values) in m.headers.iter().flat_map(|h| h.iter()) {
        let value = values
            .last()
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        if name.to_string() == KEY_HEADER {
            key = Some(value);
        } else {
            headers.insert(name.to_string(), value);
        }
    }
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
    IncomingMessage {
        topic: m.subject.to_string(),
        partition: 0,
        offset: seq as i64,
        key,
        payload: m.payload.clone(),
        headers,
    }
}
