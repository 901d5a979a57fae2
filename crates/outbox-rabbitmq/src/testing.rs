//! Test support (feature `testing`): private rabbitmq-server processes, the machine's shared
//! broker, and an observer queue that sees every message of an exchange.
//!
//! [`PrivateRabbit::start`] runs RabbitMQ (`/usr/lib/rabbitmq/bin/rabbitmq-server`, or
//! `OUTBOX_TEST_RABBITMQ_BIN`) as a node of its own on free loopback ports with its data in a
//! directory of its own, so a test can freeze it, kill it and start it again on the same port
//! and data without touching the machine's broker. It takes a few seconds to boot, so tests
//! that need no outage use [`shared_url`]. Both fail loudly when missing: these tests need
//! the real thing.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use outbox_core::IncomingMessage;

use crate::topology::{declare_exchange, KEY_HEADER};
use crate::RabbitConfig;

/// The machine's broker (`OUTBOX_TEST_AMQP_URL`, default guest on 127.0.0.1:5672).
pub fn shared_url() -> String {
    std::env::var("OUTBOX_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A RabbitMQ node of the test's own, killed (and its data removed) on drop.
pub struct PrivateRabbit {
    child: Option<Child>,
    pub port: u16,
    dist_port: u16,
    node: String,
    dir: PathBuf,
}

impl PrivateRabbit {
    pub fn binary() -> String {
        std::env::var("OUTBOX_TEST_RABBITMQ_BIN")
            .unwrap_or_else(|_| "/usr/lib/rabbitmq/bin/rabbitmq-server".into())
    }

    /// Starts a node on free ports, with `max_message_size` of 1 MiB (as Kafka's and NATS's
    /// defaults), and waits until it accepts AMQP connections.
    pub fn start() -> Self {
        let stamp = format!(
            "{}{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
        );
        let dir = std::env::temp_dir().join(format!("outbox-rabbit-{stamp}"));
        std::fs::create_dir_all(dir.join("mnesia")).expect("rabbitmq data directory");
        std::fs::create_dir_all(dir.join("log")).expect("rabbitmq log directory");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        std::fs::write(dir.join("env.conf"), "").expect("env file");
        let mut rabbit = Self {
            child: None,
            port: 0,
            dist_port: 0,
            node: format!("outbox{stamp}@localhost"),
            dir,
        };
        // Another test's server may take a free port before the node binds it: then the node
        // stops, and this one tries other ports.
        for _ in 0..3 {
            rabbit.port = free_port();
            rabbit.dist_port = free_port();
            std::fs::write(
                rabbit.dir.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.local = 127.0.0.1:{}\nloopback_users = none\n\
                     max_message_size = 1048576\n",
                    rabbit.port
                ),
            )
            .expect("rabbitmq config");
            if rabbit.launch() {
                return rabbit;
            }
        }
        panic!("rabbitmq-server could not bind free ports in 3 starts");
    }

    /// Starts the node; `false` when it stopped before listening (its ports were taken).
    fn launch(&mut self) -> bool {
        let d = |p: &str| self.dir.join(p);
        // Its own process group (see `group`); its working directory is the data directory,
        // where Mnesia writes a core file if it ever fails.
        let mut child = Command::new(Self::binary())
            .process_group(0)
            .current_dir(&self.dir)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", d("env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d("mnesia/feature_flags"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): these tests need RabbitMQ installed (or \
                     OUTBOX_TEST_RABBITMQ_BIN)",
                    Self::binary()
                )
            });
        let listening = outbox_core::testing::wait_child_listening(
            &mut child,
            self.port,
            Duration::from_secs(60),
            "rabbitmq-server",
        );
        if listening {
            self.child = Some(child);
        } else {
            signal_group(child.id(), "KILL");
            let _ = child.wait();
        }
        listening
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn config(&self) -> RabbitConfig {
        let mut config = RabbitConfig::new(self.url());
        config.max_message_size = 1024 * 1024;
        config
    }

    /// The node's process group: the start script, the Erlang VM it forks and the VM's own
    /// helpers (`launch` starts the script as a group leader). Signalling the group, not a pid
    /// file, reaches the VM even before it wrote one, so no VM outlives its data directory.
    fn group(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Freezes the node (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        if let Some(group) = self.group() {
            signal_group(group, "STOP");
        }
    }

    /// Thaws a frozen node (SIGCONT).
    pub fn thaw(&self) {
        if let Some(group) = self.group() {
            signal_group(group, "CONT");
        }
    }

    /// Kills the node (SIGKILL); its durable queues and persistent messages stay on disk.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), "CONT");
            signal_group(child.id(), "KILL");
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the node again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.launch(),
            "rabbitmq-server could not bind 127.0.0.1:{} again",
            self.port
        );
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // The node's log says what it recovered, crashed or deleted.
            eprintln!(
                "the failed test's RabbitMQ node is kept for inspection: {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

use outbox_core::testing::{free_port, signal_group};

/// A queue bound to every routing key of the configured exchange: it keeps a copy of every
/// message published from its declaration on (expires a minute after its last use).
pub struct Observer {
    config: RabbitConfig,
    queue: String,
    seen: std::sync::Mutex<Vec<IncomingMessage>>,
}

impl Observer {
    pub async fn declare(config: &RabbitConfig) -> Self {
        let queue = format!(
            "observer.{}.{}",
            config.exchange,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        );
        let connection = config
            .connect("outbox-test-observer")
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        declare_exchange(&channel, config).await.expect("exchange");
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("observer queue");
        channel
            .queue_bind(
                queue.as_str().into(),
                config.exchange.as_str().into(),
                "#".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .expect("observer binding");
        let _ = connection.close(200, "declared".into()).await;
        Self {
            config: config.clone(),
            queue,
            seen: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Everything that arrived so far (taken off the queue and kept here).
    pub async fn all(&self) -> Vec<IncomingMessage> {
        let connection = self
            .config
            .connect("outbox-test-observer")
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let mut fresh = Vec::new();
        while let Some(m) = channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            fresh.push(crate::consumer::to_incoming(&m.delivery));
        }
        let _ = connection.close(200, "read".into()).await;
        let mut seen = self.seen.lock().unwrap();
        seen.extend(fresh);
        seen.clone()
    }

    /// The messages of `topic` until `distinct` event ids arrived or `limit` passed.
    pub async fn topic(
        &self,
        topic: &str,
        distinct: usize,
        limit: Duration,
    ) -> Vec<IncomingMessage> {
        let deadline = Instant::now() + limit;
        loop {
            let of_topic: Vec<IncomingMessage> = self
                .all()
                .await
                .into_iter()
                .filter(|m| m.topic == topic)
                .collect();
            let ids: std::collections::HashSet<&String> = of_topic
                .iter()
                .filter_map(|m| m.headers.get("event_id"))
                .collect();
            if ids.len() >= distinct || Instant::now() > deadline {
                return of_topic;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Publishes a raw copy of `message` (no outbox involved), confirmed.
pub async fn publish_raw(config: &RabbitConfig, message: &IncomingMessage) {
    let connection = config
        .connect("outbox-test-producer")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    declare_exchange(&channel, config).await.expect("exchange");
    let mut headers = FieldTable::default();
    for (k, v) in &message.headers {
        headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    if let Some(key) = &message.key {
        headers.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(key.as_str().into()),
        );
    }
    channel
        .basic_publish(
            config.exchange.as_str().into(),
            message.topic.as_str().into(),
            Default::default(),
            &message.payload,
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let _ = connection.close(200, "sent".into()).await;
}
