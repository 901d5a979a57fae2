//! [`KafkaConsumer`]: runs a [`MessageHandler`] over a consumer group, committing each
//! message's offset only after the handler succeeded.
//!
//! - A handler error is retried in place with exponential backoff (the partition waits, so
//!   order is kept); after `max_attempts` the message is parked.
//! - Poison (no usable `event_id`, a handler's `HandlerError::Poison`) is parked at once.
//! - Parking sends the message verbatim to `<topic>.DLQ` with the reason in headers
//!   (`dlq_reason`, `dlq_original_topic`, `dlq_original_partition`, `dlq_original_offset`,
//!   `dlq_consumer_group`); only after the DLQ acknowledged it does the offset move on.
//! - Shutdown finishes the message in hand (or abandons its retries uncommitted), commits the
//!   processed offsets synchronously and leaves the group.
//! - A rebalance that takes partitions away first commits what was processed on them
//!   (synchronously, in the revocation callback) and forgets them: an offset is only ever
//!   committed for a partition in the current assignment, so a consumer that lost a
//!   partition can never rewind the group's position on it (which would redeliver, and
//!   re-park, everything its new owner did since).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::consume::{
    dead_letter_headers, dead_letter_topic, run_handler, sleep_unless_stopped, stop_flag,
};
use outbox_core::retry::Backoff;
use outbox_core::{
    ConsumerConfig, ConsumerMetrics, ConsumerReport, Disposition, IncomingMessage, MessageHandler,
};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::config::KafkaConfig;
use crate::publisher::kafka_headers;

/// Called by the runner at points tests (and instrumentation) care about.
#[async_trait]
pub trait ConsumerHooks: Send + Sync + 'static {
    /// After a message was processed, found duplicate or parked, before its offset is
    /// committed.
    async fn before_offset_commit(&self, _message: &IncomingMessage) {}
}

#[async_trait]
impl<T: ConsumerHooks> ConsumerHooks for Arc<T> {
    async fn before_offset_commit(&self, message: &IncomingMessage) {
        (**self).before_offset_commit(message).await
    }
}

/// A partition of a topic.
type TopicPartition = (String, i32);

/// What this member holds: its assignment, and the last processed offset per partition.
#[derive(Default)]
struct Positions {
    assigned: HashSet<TopicPartition>,
    done: HashMap<TopicPartition, i64>,
}

impl Positions {
    /// The offsets to commit for `partitions` (`None`: all held), forgetting them.
    fn take(&mut self, partitions: Option<&HashSet<TopicPartition>>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        let keys: Vec<TopicPartition> = match partitions {
            Some(p) => self
                .done
                .keys()
                .filter(|k| p.contains(*k))
                .cloned()
                .collect(),
            None => self.done.keys().cloned().collect(),
        };
        for key in keys {
            if let Some(offset) = self.done.remove(&key) {
                if self.assigned.contains(&key) {
                    let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(offset + 1));
                }
            }
        }
        tpl
    }
}

/// Tracks the assignment through rebalances (librdkafka calls it on the consuming task).
struct Tracking {
    positions: Arc<Mutex<Positions>>,
}

impl ClientContext for Tracking {}

impl ConsumerContext for Tracking {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let revoked: HashSet<TopicPartition> = revoked
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let mut positions = self.positions.lock().expect("positions lock");
        let tpl = positions.take(Some(&revoked));
        positions.assigned.retain(|k| !revoked.contains(k));
        drop(positions);
        if tpl.count() > 0 {
            // Still ours until this callback returns: commit what was processed on them.
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "committing revoked partitions failed; the inbox absorbs the redelivery");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            let mut positions = self.positions.lock().expect("positions lock");
            for e in assigned.elements() {
                positions
                    .assigned
                    .insert((e.topic().to_owned(), e.partition()));
            }
        }
    }
}

/// A consumer group member driving one handler.
pub struct KafkaConsumer {
    kafka: KafkaConfig,
    config: ConsumerConfig,
    metrics: Option<ConsumerMetrics>,
    hooks: Option<Arc<dyn ConsumerHooks>>,
}

impl KafkaConsumer {
    pub fn new(kafka: KafkaConfig, config: ConsumerConfig) -> Self {
        Self {
            kafka,
            config,
            metrics: None,
            hooks: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ConsumerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn with_hooks(mut self, hooks: impl ConsumerHooks) -> Self {
        self.hooks = Some(Arc::new(hooks));
        self
    }

    /// Consumes until `shutdown` completes. Errors only if the client cannot be created or
    /// subscribed; broker trouble while running is retried.
    pub async fn run<H: MessageHandler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ConsumerReport, KafkaError> {
        let positions = Arc::new(Mutex::new(Positions::default()));
        let mut client = self.kafka.client_config();
        if let Some(instance) = &self.config.instance {
            // Static membership: a restarted member takes its partitions back at once.
            client.set(
                "group.instance.id",
                format!("{}/{instance}", self.config.group_id),
            );
        }
        let consumer: StreamConsumer<Tracking> = client
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .create_with_context(Tracking {
                positions: positions.clone(),
            })?;
        let topics: Vec<&str> = self.config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let dlq: FutureProducer = self
            .kafka
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .create()?;

        let (stop, signal) = stop_flag(shutdown);
        let mut run = Run {
            runner: &self,
            consumer: &consumer,
            dlq: &dlq,
            stop,
            positions: positions.clone(),
            report: ConsumerReport::default(),
        };
        tokio::select! {
            _ = run.consume(&handler) => {}
            _ = signal => {}
        }
        let report = run.report.clone();
        let tpl = positions.lock().expect("positions lock").take(None);
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "final offset commit failed; the inbox absorbs the redelivery");
            }
        }
        consumer.unsubscribe();
        tracing::info!(group = %self.config.group_id, ?report, "consumer stopped");
        Ok(report)
    }
}

struct Run<'a> {
    runner: &'a KafkaConsumer,
    consumer: &'a StreamConsumer<Tracking>,
    dlq: &'a FutureProducer,
    stop: watch::Receiver<bool>,
    /// The assignment and the last processed offset per partition, shared with the
    /// rebalance callbacks.
    positions: Arc<Mutex<Positions>>,
    report: ConsumerReport,
}

impl Run<'_> {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    async fn consume<H: MessageHandler>(&mut self, handler: &H) {
        let mut stop = self.stop.clone();
        while !self.stopping() {
            let received = tokio::select! {
                r = self.consumer.recv() => r,
                _ = stop.changed() => break,
            };
            let message = match received {
                Ok(m) => to_incoming(&m),
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            if self.process(handler, &message).await {
                if let Some(h) = &self.runner.hooks {
                    h.before_offset_commit(&message).await;
                }
                self.commit(&message);
            }
        }
    }

    /// Runs the handler (retrying) or parks the message. Returns whether the offset may move.
    async fn process<H: MessageHandler>(&mut self, handler: &H, message: &IncomingMessage) -> bool {
        let mut stop = self.stop.clone();
        match run_handler(
            handler,
            message,
            &self.runner.config,
            &mut stop,
            &mut self.report,
        )
        .await
        {
            Disposition::Done(_) => true,
            Disposition::Park(reason) => self.park(message, &reason).await,
            Disposition::Abandoned => false,
        }
    }

    /// Sends the message to `<topic>.DLQ`, retrying until the DLQ acknowledges (or shutdown).
    async fn park(&mut self, message: &IncomingMessage, reason: &str) -> bool {
        let dlq_topic = dead_letter_topic(&message.topic);
        let dlq_headers = dead_letter_headers(message, reason, &self.runner.config.group_id);
        let headers = kafka_headers(dlq_headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let mut record = FutureRecord::to(&dlq_topic)
                .payload(&message.payload[..])
                .headers(headers.clone());
            if let Some(k) = &message.key {
                record = record.key(k.as_bytes());
            }
            match self.dlq.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    self.report.parked += 1;
                    if let Some(m) = &self.runner.metrics {
                        m.parked();
                    }
                    tracing::warn!(topic = %message.topic, offset = message.offset, %dlq_topic, %reason, "message parked");
                    return true;
                }
                Err((e, _)) => {
                    tracing::error!(error = %e, %dlq_topic, "parking failed; retrying (the offset stays put)");
                    sleep_unless_stopped(&self.stop, backoff.next_delay()).await;
                    if self.stopping() {
                        return false;
                    }
                }
            }
        }
    }

    fn commit(&mut self, message: &IncomingMessage) {
        let key = (message.topic.clone(), message.partition);
        {
            let mut positions = self.positions.lock().expect("positions lock");
            if !positions.assigned.contains(&key) {
                // Taken away while the message was in hand: its new owner decides the
                // position; an older offset from here would rewind the group.
                tracing::info!(topic = %message.topic, partition = message.partition, offset = message.offset, "partition no longer assigned; not committing");
                return;
            }
            positions.done.insert(key, message.offset);
        }
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(
            &message.topic,
            message.partition,
            Offset::Offset(message.offset + 1),
        );
        // Asynchronous: a commit lost in a crash means a redelivery, which the inbox absorbs.
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offset commit failed; the inbox absorbs the redelivery");
        }
    }
}

fn to_incoming<M: Message>(m: &M) -> IncomingMessage {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    IncomingMessage {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
        headers,
    }
}
