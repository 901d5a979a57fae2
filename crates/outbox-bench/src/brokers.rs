//! Every broker the same way, each against its own limit measured in the same run: relay
//! throughput (a prefilled PostgreSQL outbox drained to the broker) over the broker's raw
//! publish rate for the same messages with its own client (acknowledged, pipelined in windows
//! of 2,000), and commit-to-ack latency under a steady load. Kafka needs
//! `OUTBOX_TEST_BROKER_BIN` (a private nisshi); NATS and RabbitMQ run as private servers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{Publisher, Relay, RelayConfig, RelayStore};
use outbox_postgres::PgRelayStore;
use serde_json::{json, Value};

use crate::db::BenchDb;
use crate::latency::{measure, Wake};
use crate::stats::{header, median, row};

const PAYLOAD: usize = 512;
const KEYS: usize = 1000;

/// A broker under test, kept alive while it is measured.
enum Broker {
    Kafka(outbox_kafka::testing::TestBroker),
    Nats(outbox_nats::testing::PrivateNats),
    Rabbit(outbox_rabbitmq::testing::PrivateRabbit),
}

impl Broker {
    fn name(&self) -> &'static str {
        match self {
            Self::Kafka(_) => "Kafka (nisshi)",
            Self::Nats(_) => "NATS JetStream",
            Self::Rabbit(_) => "RabbitMQ",
        }
    }

    fn publisher(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        Ok(match self {
            Self::Kafka(b) => Arc::new(outbox_kafka::KafkaPublisher::new(
                outbox_kafka::KafkaConfig::new(b.bootstrap()),
            )?),
            Self::Nats(n) => Arc::new(outbox_nats::NatsPublisher::new(n.config())?),
            Self::Rabbit(r) => Arc::new(outbox_rabbitmq::RabbitPublisher::new(r.config())?),
        })
    }

    /// Whatever the broker needs before a topic's messages are kept (RabbitMQ: a queue).
    async fn prepare(&self, topic: &str) -> anyhow::Result<()> {
        if let Self::Rabbit(r) = self {
            let config = r.config();
            let connection = config.connect("bench").await?;
            let channel = connection.create_channel().await?;
            outbox_rabbitmq::topology::declare_group(&channel, &config, "bench", &[topic.into()])
                .await?;
            let _ = connection.close(200, "declared".into()).await;
        }
        Ok(())
    }

    /// The broker's own client publishing `events` messages as fast as it confirms them.
    async fn raw_rate(&self, events: usize) -> anyhow::Result<f64> {
        let topic = format!("bench.raw.{}", uuid::Uuid::new_v4().simple());
        match self {
            Self::Kafka(b) => crate::relay::raw_produce(&b.bootstrap(), events, PAYLOAD).await,
            Self::Nats(n) => nats_raw(&n.config(), &topic, events).await,
            Self::Rabbit(r) => {
                self.prepare(&topic).await?;
                rabbit_raw(&r.config(), &topic, events).await
            }
        }
    }
}

async fn nats_raw(
    config: &outbox_nats::NatsConfig,
    topic: &str,
    events: usize,
) -> anyhow::Result<f64> {
    let client = config.connect("bench").await?;
    let js = async_nats::jetstream::new(client);
    outbox_nats::streams::Streams::default()
        .ensure(&js, config, topic)
        .await
        .map_err(anyhow::Error::msg)?;
    let body = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let start = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(2000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                uuid::Uuid::new_v4().to_string().as_str(),
            );
            headers.insert("Outbox-Key", format!("agg-{}", i % KEYS).as_str());
            acks.push(
                js.publish_with_headers(topic.to_owned(), headers, body.clone())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
    }
    Ok(events as f64 / start.elapsed().as_secs_f64())
}

async fn rabbit_raw(
    config: &outbox_rabbitmq::RabbitConfig,
    topic: &str,
    events: usize,
) -> anyhow::Result<f64> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let connection = config.connect("bench").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = vec![b'x'; PAYLOAD];
    let start = Instant::now();
    for chunk in (0..events).collect::<Vec<_>>().chunks(2000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for _ in chunk {
            let properties = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(uuid::Uuid::new_v4().to_string().into());
            confirms.push(
                channel
                    .basic_publish(
                        config.exchange.as_str().into(),
                        topic.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        properties,
                    )
                    .await?,
            );
        }
        for c in confirms {
            c.await?;
        }
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    let _ = connection.close(200, "done".into()).await;
    Ok(rate)
}

/// Counts what a consumer hands it: the runner's own cost, without a database.
struct Counting(Arc<std::sync::atomic::AtomicUsize>);

#[async_trait::async_trait]
impl outbox_core::MessageHandler for Counting {
    async fn handle(
        &self,
        _: &outbox_core::IncomingMessage,
    ) -> Result<outbox_core::Handled, outbox_core::HandlerError> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(outbox_core::Handled::Processed)
    }
}

/// `events` published over `KEYS` aggregates, then one consumer group member running a
/// handler that only counts: messages per second from its start to the last.
async fn consume_rate(broker: &Broker, events: usize) -> anyhow::Result<f64> {
    let topic = format!("bench.consume.{}", uuid::Uuid::new_v4().simple());
    broker.prepare(&topic).await?;
    let publisher = broker.publisher()?;
    let messages: Vec<outbox_core::OutboxMessage> = (0..events)
        .map(|i| {
            let aggregate = outbox_core::AggregateRef::new("agg", format!("agg-{}", i % KEYS))
                .expect("aggregate");
            outbox_core::OutboxMessage {
                seq: i as i64,
                event_id: outbox_core::EventId::new(),
                partition: aggregate.partition(),
                key: aggregate.id().to_owned(),
                aggregate,
                event_type: "bench".into(),
                topic: outbox_core::Topic::new(topic.clone()).expect("topic"),
                headers: Default::default(),
                payload: bytes::Bytes::from(vec![b'x'; PAYLOAD]),
                attempts: 0,
                age_at_claim: Duration::ZERO,
            }
        })
        .collect();
    for batch in messages.chunks(500) {
        let outcomes = publisher.publish(batch).await;
        anyhow::ensure!(
            outcomes
                .iter()
                .all(|o| *o == outbox_core::PublishOutcome::Delivered),
            "filling {topic} failed: {:?}",
            outcomes
                .iter()
                .find(|o| **o != outbox_core::PublishOutcome::Delivered)
        );
    }
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handler = Counting(count.clone());
    let config = outbox_core::ConsumerConfig::new("bench", &[topic.as_str()]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let start = Instant::now();
    let run: tokio::task::JoinHandle<anyhow::Result<()>> = match broker {
        Broker::Kafka(b) => {
            let consumer = outbox_kafka::KafkaConsumer::new(
                outbox_kafka::KafkaConfig::new(b.bootstrap()),
                config,
            );
            tokio::spawn(async move { Ok(consumer.run(handler, shutdown).await.map(|_| ())?) })
        }
        Broker::Nats(n) => {
            let consumer = outbox_nats::NatsConsumer::new(n.config(), config);
            tokio::spawn(async move { Ok(consumer.run(handler, shutdown).await.map(|_| ())?) })
        }
        Broker::Rabbit(r) => {
            let consumer = outbox_rabbitmq::RabbitConsumer::new(r.config(), config);
            tokio::spawn(async move { Ok(consumer.run(handler, shutdown).await.map(|_| ())?) })
        }
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while count.load(std::sync::atomic::Ordering::Relaxed) < events {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer did not finish in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    let _ = stop.send(());
    run.await??;
    Ok(rate)
}

/// A prefilled outbox of `events` over `aggregates` drained by one relay to `broker`: events
/// per second.
async fn relay_rate(broker: &Broker, events: usize, aggregates: usize) -> anyhow::Result<f64> {
    let db = BenchDb::postgres(8).await?;
    let BenchDb::Postgres { pool, schema } = &db else {
        unreachable!()
    };
    let topic = format!("bench.relay.{}", uuid::Uuid::new_v4().simple());
    broker.prepare(&topic).await?;
    crate::relay::prefill(&db, events, aggregates, PAYLOAD, &topic).await?;
    let store = PgRelayStore::new(pool.clone(), schema);
    let relay = Relay::new(
        store.clone(),
        broker.publisher()?,
        RelayConfig {
            service: "bench".into(),
            lease: Duration::from_secs(10),
            ..crate::relay_config()?
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let start = Instant::now();
    let handle = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(300);
    while crate::relay::pending(&store).await > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not drain in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = events as f64 / start.elapsed().as_secs_f64();
    let _ = stop.send(());
    let report = handle.await?;
    anyhow::ensure!(
        report.dead_lettered == 0 && report.rejected_attempts == 0,
        "the drain to {} failed messages: {report:?}",
        broker.name()
    );
    let _ = RelayStore::stats(&store).await?;
    db.drop().await;
    Ok(rate)
}

pub async fn run(quick: bool) -> anyhow::Result<Value> {
    let (events, rounds, rate, duration) = if quick {
        (2_000, 1, 200, Duration::from_millis(1500))
    } else {
        (20_000, 3, 1000, Duration::from_secs(10))
    };
    let mut brokers = Vec::new();
    if std::env::var_os("OUTBOX_TEST_BROKER_BIN").is_some() {
        brokers.push(Broker::Kafka(outbox_kafka::testing::TestBroker::start()));
    }
    brokers.push(Broker::Nats(outbox_nats::testing::PrivateNats::start()));
    brokers.push(Broker::Rabbit(
        outbox_rabbitmq::testing::PrivateRabbit::start(),
    ));
    header(
        &format!(
            "brokers: relay drain of {events} events ({PAYLOAD} B, {KEYS} aggregates, PostgreSQL) \
             over the broker's raw publish limit; commit-to-ack at {rate}/s"
        ),
        &[
            "broker",
            "raw limit/s",
            "relay/s",
            "relay / raw",
            "relay/s, 1 aggregate",
            "consumer/s (no database)",
            "p50 ms",
            "p99 ms",
        ],
    );
    let mut out = Vec::new();
    for broker in &brokers {
        // Interleaved rounds: the raw limit and the relay see the same machine state.
        let mut raws = Vec::new();
        let mut relays = Vec::new();
        let mut hot = Vec::new();
        let mut consumed = Vec::new();
        for _ in 0..rounds {
            consumed.push(consume_rate(broker, events / 4).await?);
            raws.push(broker.raw_rate(events).await?);
            relays.push(relay_rate(broker, events, KEYS).await?);
            // One aggregate's backlog: the worst case of waves (a round trip per message).
            hot.push(relay_rate(broker, events / 4, 1).await?);
        }
        let (raw, relay, hot, consumer) = (
            median(raws.clone()),
            median(relays.clone()),
            median(hot.clone()),
            median(consumed.clone()),
        );
        // The latency run's topic is made inside `measure`: RabbitMQ gets a queue taking all.
        broker.prepare("#").await?;
        let (latency, achieved) = measure(rate, duration, Wake::Nudge, broker.publisher()?).await?;
        anyhow::ensure!(
            latency.count > 0,
            "no event of the latency run reached {}",
            broker.name()
        );
        row(&[
            broker.name().into(),
            format!("{raw:.0}"),
            format!("{relay:.0}"),
            format!("{:.2}", relay / raw),
            format!("{hot:.0}"),
            format!("{consumer:.0}"),
            format!("{:.1}", latency.p50_us / 1e3),
            format!("{:.1}", latency.p99_us / 1e3),
        ]);
        out.push(json!({
            "broker": broker.name(), "events": events, "payload": PAYLOAD, "aggregates": KEYS,
            "raw_per_sec": raws, "relay_per_sec": relays, "ratio": relay / raw,
            "one_aggregate_relay_per_sec": hot, "consumer_per_sec": consumed,
            "latency_rate": rate, "latency_achieved": achieved,
            "p50_ms": latency.p50_us / 1e3, "p99_ms": latency.p99_us / 1e3,
            "max_ms": latency.max_us / 1e3,
        }));
    }
    Ok(Value::Array(out))
}
