//! The transports under test: Kafka (a private real broker per test) and the in-process bus.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use outbox_bus::{Bus, BusConsumer, BusPublisher};
use outbox_core::{ConsumerConfig, Headers, IncomingMessage, MessageHandler, Publisher};
use outbox_kafka::testing::{read_topics, TestBroker};
use outbox_kafka::{KafkaConfig, KafkaConsumer, KafkaPublisher};
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
