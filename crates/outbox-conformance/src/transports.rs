//! The transports under test: Kafka and NATS JetStream (a private real server per test),
//! RabbitMQ (the machine's broker, or a private node for the cases that stop it) and the
//! in-process bus.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use outbox_bus::{Bus, BusConsumer, BusPublisher};
use outbox_core::{ConsumerConfig, Headers, IncomingMessage, MessageHandler, Publisher};
use outbox_kafka::testing::{read_topics, TestBroker};
use outbox_kafka::{KafkaConfig, KafkaConsumer, KafkaPublisher};
use outbox_nats::testing::{read_subject, PrivateNats};
use outbox_nats::{NatsConfig, NatsConsumer, NatsPublisher};
use outbox_rabbitmq::testing::{publish_raw, shared_url, Observer, PrivateRabbit};
use outbox_rabbitmq::{RabbitConfig, RabbitConsumer, RabbitPublisher};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{RunningConsumer, Transport};

fn running(
    run: impl FnOnce(
        tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<outbox_core::ConsumerReport>,
) -> RunningConsumer {
    let (stop, stopped) = tokio::sync::oneshot::channel();
    RunningConsumer {
        stop,
        handle: run(stopped),
    }
}

pub struct KafkaTransport {
    broker: TestBroker,
    publisher: Arc<KafkaPublisher>,
}

impl KafkaTransport {
    pub fn boxed() -> Box<dyn Transport> {
        let broker = TestBroker::start();
        let mut config = KafkaConfig::new(broker.bootstrap());
        config.delivery_timeout = Duration::from_secs(2);
        let publisher = Arc::new(KafkaPublisher::new(config).expect("producer"));
        Box::new(Self { broker, publisher })
    }

    fn config(&self) -> KafkaConfig {
        KafkaConfig::new(self.broker.bootstrap())
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    async fn received(
        &self,
        topic: &str,
        distinct: usize,
        limit: Duration,
    ) -> Vec<IncomingMessage> {
        read_topics(&self.broker.bootstrap(), &[topic], distinct, limit)
            .await
            .into_iter()
            .map(|r| IncomingMessage {
                topic: r.topic,
                partition: r.partition,
                offset: r.offset,
                key: r.key,
                payload: Bytes::from(r.payload),
                headers: r.headers,
            })
            .collect()
    }

    async fn produce(&self, topic: &str, key: &str, payload: Bytes, headers: Headers) {
        let producer: FutureProducer = self.config().client_config().create().unwrap();
        let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        });
        producer
            .send(
                FutureRecord::to(topic)
                    .key(key)
                    .payload(&payload[..])
                    .headers(h),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    fn start_outage(&self) {
        self.broker.freeze();
    }

    fn end_outage(&self) {
        self.broker.thaw();
    }

    fn consume(&self, config: ConsumerConfig, handler: Box<dyn MessageHandler>) -> RunningConsumer {
        let consumer = KafkaConsumer::new(self.config(), config);
        running(|stopped| {
            tokio::spawn(async move {
                consumer
                    .run(handler, async move {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("kafka consumer")
            })
        })
    }
}

pub struct NatsTransport {
    server: Arc<std::sync::Mutex<PrivateNats>>,
    url: String,
    publisher: Arc<NatsPublisher>,
}

impl NatsTransport {
    pub async fn boxed() -> Box<dyn Transport> {
        let server = PrivateNats::start();
        let publisher = Arc::new(
            NatsPublisher::connect(Self::config_of(&server))
                .await
                .expect("NATS publisher"),
        );
        Box::new(Self {
            url: server.url(),
            server: Arc::new(std::sync::Mutex::new(server)),
            publisher,
        })
    }

    fn config_of(server: &PrivateNats) -> NatsConfig {
        Self::config_at(server.url())
    }

    fn config_at(url: String) -> NatsConfig {
        let mut config = NatsConfig::new(url);
        config.ack_timeout = Duration::from_secs(2);
        config.ack_wait = Duration::from_secs(5);
        config
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    async fn received(
        &self,
        topic: &str,
        distinct: usize,
        limit: Duration,
    ) -> Vec<IncomingMessage> {
        read_subject(&NatsConfig::new(self.url.clone()), topic, distinct, limit).await
    }

    async fn produce(&self, topic: &str, key: &str, payload: Bytes, headers: Headers) {
        // A producer of its own without the outbox's deduplication id: the same event sent
        // three times must reach the consumer three times.
        let client = async_nats::connect(self.url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        outbox_nats::streams::Streams::default()
            .ensure(&js, &NatsConfig::new(self.url.clone()), topic)
            .await
            .unwrap();
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in &headers {
            h.insert(k.as_str(), v.as_str());
        }
        h.insert(outbox_nats::streams::KEY_HEADER, key);
        js.publish_with_headers(topic.to_owned(), h, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    fn start_outage(&self) {
        self.server.lock().unwrap().freeze();
    }

    fn end_outage(&self) {
        self.server.lock().unwrap().thaw();
    }

    async fn kill_and_restart(&self, down_for: Duration) -> bool {
        // Aside: the server's start blocks until it listens, and the relay, the consumer and
        // the writers must keep running meanwhile.
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || server.lock().unwrap().kill())
            .await
            .unwrap();
        tokio::time::sleep(down_for).await;
        let server = self.server.clone();
        tokio::task::spawn_blocking(move || server.lock().unwrap().restart())
            .await
            .unwrap();
        true
    }

    fn consume(&self, config: ConsumerConfig, handler: Box<dyn MessageHandler>) -> RunningConsumer {
        let consumer = NatsConsumer::new(Self::config_at(self.url.clone()), config);
        running(|stopped| {
            tokio::spawn(async move {
                consumer
                    .run(handler, async move {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("nats consumer")
            })
        })
    }
}

pub struct RabbitTransport {
    /// Only for the cases that stop the broker; the others share the machine's.
    private: Option<Arc<std::sync::Mutex<PrivateRabbit>>>,
    config: RabbitConfig,
    publisher: Arc<RabbitPublisher>,
    /// A queue taking every routing key, for `received`; none where a case reads nothing
    /// back (it would take messages meant for a group whose queue is still recovering).
    observer: Option<Arc<Observer>>,
    /// Messages `produce` was given: RabbitMQ keeps a message only for the queues bound when
    /// it arrives, so they are published once a consumer group declared its queues (as the
    /// outbox's relay keeps an event until some group's queue exists).
    held: Arc<std::sync::Mutex<Vec<IncomingMessage>>>,
}

impl RabbitTransport {
    /// On a private node for the cases that stop the broker, else on the machine's.
    pub async fn for_case(case: &str) -> Box<dyn Transport> {
        let private = matches!(case, "outage" | "broker_killed_and_restarted");
        let (private, mut config) = if private {
            let node = PrivateRabbit::start();
            let config = node.config();
            (Some(Arc::new(std::sync::Mutex::new(node))), config)
        } else {
            let mut config = RabbitConfig::new(shared_url());
            config.exchange = "outbox-conformance".into();
            // As the private nodes and Kafka's default: the oversized case needs a limit.
            config.max_message_size = 1024 * 1024;
            (None, config)
        };
        config.confirm_timeout = Duration::from_secs(2);
        // Test groups leave nothing behind on the machine's broker.
        config.queue_expires = Some(Duration::from_secs(120));
        let observer = if case == "broker_killed_and_restarted" {
            None
        } else {
            Some(Arc::new(Observer::declare(&config).await))
        };
        let publisher = Arc::new(RabbitPublisher::new(config.clone()).expect("publisher"));
        Box::new(Self {
            private,
            config,
            publisher,
            observer,
            held: Arc::default(),
        })
    }

    fn node(&self) -> std::sync::MutexGuard<'_, PrivateRabbit> {
        self.private
            .as_ref()
            .expect("this case stops the broker: it needs a private node (see for_case)")
            .lock()
            .unwrap()
    }
}

#[async_trait]
impl Transport for RabbitTransport {
    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    async fn received(
        &self,
        topic: &str,
        distinct: usize,
        limit: Duration,
    ) -> Vec<IncomingMessage> {
        self.observer
            .as_ref()
            .expect("this transport was made without an observer (see for_case)")
            .topic(topic, distinct, limit)
            .await
    }

    async fn produce(&self, topic: &str, key: &str, payload: Bytes, headers: Headers) {
        self.held.lock().unwrap().push(IncomingMessage {
            topic: topic.to_owned(),
            partition: 0,
            offset: 0,
            key: Some(key.to_owned()),
            payload,
            headers,
        });
    }

    fn start_outage(&self) {
        self.node().freeze();
    }

    fn end_outage(&self) {
        self.node().thaw();
    }

    async fn kill_and_restart(&self, down_for: Duration) -> bool {
        // Aside: the node's boot blocks until it listens (seconds), and the relay, the
        // consumer and the writers must keep running meanwhile.
        let node = self.private.clone().expect("a private node (see for_case)");
        let n = node.clone();
        tokio::task::spawn_blocking(move || n.lock().unwrap().kill())
            .await
            .unwrap();
        tokio::time::sleep(down_for).await;
        tokio::task::spawn_blocking(move || node.lock().unwrap().restart())
            .await
            .unwrap();
        true
    }

    async fn prepare_group(&self, config: &ConsumerConfig) {
        let connection = self.config.connect("conformance").await.expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        outbox_rabbitmq::topology::declare_group(
            &channel,
            &self.config,
            &config.group_id,
            &config.topics,
        )
        .await
        .expect("declare the group's queues");
        let _ = connection.close(200, "declared".into()).await;
    }

    async fn group_state(&self, config: &ConsumerConfig) -> String {
        let Ok(connection) = self.config.connect("conformance-state").await else {
            return "the broker does not answer".into();
        };
        let mut state = Vec::new();
        for topic in &config.topics {
            let queue = outbox_rabbitmq::topology::group_queue(&config.group_id, topic);
            let answer =
                match outbox_rabbitmq::topology::queue_state(&connection, &self.config, &queue)
                    .await
                {
                    Ok(Some(q)) => format!(
                        "{} ready, {} consumers",
                        q.message_count(),
                        q.consumer_count()
                    ),
                    Ok(None) => "missing".into(),
                    Err(e) => e.to_string(),
                };
            state.push(format!("{queue}: {answer}"));
        }
        let _ = connection.close(200, "read".into()).await;
        state.join("; ")
    }

    fn consume(&self, config: ConsumerConfig, handler: Box<dyn MessageHandler>) -> RunningConsumer {
        let rabbit = self.config.clone();
        let held = self.held.clone();
        running(|stopped| {
            tokio::spawn(async move {
                let topics = config.topics.clone();
                let connection = rabbit.connect("conformance").await.expect("connect");
                let channel = connection.create_channel().await.expect("channel");
                outbox_rabbitmq::topology::declare_group(
                    &channel,
                    &rabbit,
                    &config.group_id,
                    &topics,
                )
                .await
                .expect("declare the group's queues");
                let _ = connection.close(200, "declared".into()).await;
                let mine: Vec<IncomingMessage> = {
                    let mut held = held.lock().unwrap();
                    let (mine, rest) = held.drain(..).partition(|m| topics.contains(&m.topic));
                    *held = rest;
                    mine
                };
                for m in &mine {
                    publish_raw(&rabbit, m).await;
                }
                RabbitConsumer::new(rabbit, config)
                    .run(handler, async move {
                        let _ = stopped.await;
                    })
                    .await
                    .expect("rabbitmq consumer")
            })
        })
    }
}

pub struct BusTransport {
    bus: Bus,
}

impl BusTransport {
    pub fn boxed() -> Box<dyn Transport> {
        Box::new(Self {
            bus: Bus::default(),
        })
    }
}

#[async_trait]
impl Transport for BusTransport {
    fn name(&self) -> &'static str {
        "bus"
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(BusPublisher::new(self.bus.clone()))
    }

    async fn received(
        &self,
        topic: &str,
        distinct: usize,
        limit: Duration,
    ) -> Vec<IncomingMessage> {
        let start = Instant::now();
        loop {
            let all = self.bus.messages(topic);
            let ids: std::collections::HashSet<_> = all
                .iter()
                .filter_map(|m| m.headers.get("event_id"))
                .collect();
            if ids.len() >= distinct || start.elapsed() > limit {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn produce(&self, topic: &str, key: &str, payload: Bytes, headers: Headers) {
        self.bus
            .publish(topic, Some(key), payload, headers)
            .unwrap();
    }

    fn start_outage(&self) {
        self.bus.pause();
    }

    fn end_outage(&self) {
        self.bus.resume();
    }

    fn consume(&self, config: ConsumerConfig, handler: Box<dyn MessageHandler>) -> RunningConsumer {
        let consumer = BusConsumer::new(self.bus.clone(), config);
        running(|stopped| {
            tokio::spawn(async move {
                consumer
                    .run(handler, async move {
                        let _ = stopped.await;
                    })
                    .await
            })
        })
    }
}
