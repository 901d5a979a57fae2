//! The transports under test: Kafka and NATS JetStream (a private real server per test) and
//! the in-process bus.

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
    server: std::sync::Mutex<PrivateNats>,
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
            server: std::sync::Mutex::new(server),
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
        self.server.lock().unwrap().kill();
        tokio::time::sleep(down_for).await;
        self.server.lock().unwrap().restart();
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
