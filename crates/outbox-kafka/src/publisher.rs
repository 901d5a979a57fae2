//! [`KafkaPublisher`]: the relay's publisher on an idempotent Kafka producer.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use outbox_core::publisher::waves::Verdict;
use outbox_core::{AggregateRef, OutboxMessage, PublishOutcome, Publisher};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::classify::{classify, ErrorClass};
use crate::config::KafkaConfig;

/// Batches in a row whose every message timed out before the publisher checks whether the
/// broker answers at all; if it does and the timeouts span the whole cluster, the producer is
/// stuck (e.g. its producer id was lost in a broker restart) and is rebuilt. Timeouts on
/// some partitions only are those partitions' trouble (no leader): the relay defers their
/// aggregates, and a rebuild would not help.
const STALLED_BATCHES_BEFORE_CHECK: u32 = 2;

/// Stalled batches in a row after which the producer is rebuilt whatever the timeouts
/// spanned (a stuck producer that only writes to one partition looks like a stuck
/// partition; with the relay's deferrals between them this takes minutes, not seconds).
const STALLED_BATCHES_BEFORE_REBUILD_ANYWAY: u32 = 8;

/// Publishes outbox messages with an idempotent producer (`enable.idempotence=true`,
/// `acks=all`): the stored payload as value, the message key as key, and the stored headers
/// plus `event_id` and `event_type` (added when absent) as headers.
///
/// A batch is sent pipelined: every message is handed to librdkafka first, then the delivery
/// reports are awaited together. Once a message of an aggregate is refused before sending,
/// later messages of that aggregate in the batch are [`PublishOutcome::Skipped`].
pub struct KafkaPublisher {
    config: KafkaConfig,
    producer: RwLock<Arc<FutureProducer>>,
    stalled_batches: AtomicU32,
    rebuilds: AtomicU32,
}

impl KafkaPublisher {
    /// Refuses a configuration that overrides `acks` or `enable.idempotence` (see
    /// [`KafkaConfig::check_guarantees`]).
    pub fn new(config: KafkaConfig) -> Result<Self, KafkaError> {
        config
            .check_guarantees()
            .map_err(|e| KafkaError::ClientCreation(e.to_string()))?;
        let producer = build_producer(&config)?;
        Ok(Self {
            config,
            producer: RwLock::new(Arc::new(producer)),
            stalled_batches: AtomicU32::new(0),
            rebuilds: AtomicU32::new(0),
        })
    }

    /// How many times the producer was rebuilt after it stopped making progress.
    pub fn rebuilds(&self) -> u32 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.read().unwrap().clone()
    }

    /// Whether the cluster answers a metadata request (to tell a dead broker from a stuck
    /// producer, and as the relay's probe during an outage).
    async fn broker_answers(&self) -> Result<(), String> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(3))
                .map(|_| ())
                .map_err(|e| format!("metadata request failed: {e}"))
        })
        .await
        .unwrap_or_else(|e| Err(format!("metadata probe panicked: {e}")))
    }

    /// Whether the partitions in `timed_out` have their leaders on every broker of the
    /// cluster and are more than one: the mark of a stuck producer rather than of a stuck
    /// partition. An error when the cluster does not answer.
    async fn timeouts_span_the_cluster(
        &self,
        timed_out: HashSet<(String, i32)>,
    ) -> Result<bool, String> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(None, Duration::from_secs(3))
                .map_err(|e| format!("metadata request failed: {e}"))?;
            let brokers: HashSet<i32> = metadata.brokers().iter().map(|b| b.id()).collect();
            let leaders: HashSet<i32> = metadata
                .topics()
                .iter()
                .flat_map(|t| {
                    t.partitions()
                        .iter()
                        .filter(|p| timed_out.contains(&(t.name().to_owned(), p.id())))
                        .map(|p| p.leader())
                })
                .collect();
            Ok(spans_the_cluster(&brokers, &leaders, timed_out.len()))
        })
        .await
        .unwrap_or_else(|e| Err(format!("metadata probe panicked: {e}")))
    }

    async fn note_stall(&self, stalled_on: Option<HashSet<(String, i32)>>) {
        let Some(timed_out) = stalled_on else {
            self.stalled_batches.store(0, Ordering::Relaxed);
            return;
        };
        let stalled = self.stalled_batches.fetch_add(1, Ordering::Relaxed) + 1;
        if stalled < STALLED_BATCHES_BEFORE_CHECK {
            return;
        }
        match self.timeouts_span_the_cluster(timed_out).await {
            Ok(true) => self.rebuild("the broker answers but deliveries time out everywhere"),
            Ok(false) if stalled >= STALLED_BATCHES_BEFORE_REBUILD_ANYWAY => {
                self.rebuild("the broker answers but deliveries keep timing out")
            }
            // Some partitions only (the relay defers them), or the cluster is down.
            Ok(false) | Err(_) => {}
        }
    }

    /// Replaces the producer; messages in flight on the old one have already been reported.
    fn rebuild(&self, why: &str) {
        match build_producer(&self.config) {
            Ok(fresh) => {
                *self.producer.write().unwrap() = Arc::new(fresh);
                self.stalled_batches.store(0, Ordering::Relaxed);
                self.rebuilds.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(reason = why, "rebuilt the Kafka producer");
            }
            Err(e) => tracing::error!(error = %e, "rebuilding the Kafka producer failed"),
        }
    }
}

/// The rule for a stuck producer: the timed-out partitions are more than one and their
/// leaders include every broker of the cluster.
fn spans_the_cluster(brokers: &HashSet<i32>, leaders: &HashSet<i32>, partitions: usize) -> bool {
    partitions > 1 && !brokers.is_empty() && brokers.is_subset(leaders)
}

fn build_producer(config: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    let timeout = config.delivery_timeout.as_millis().max(1000);
    let request_timeout = (timeout / 2).clamp(1000, 30_000);
    let mut cc = config.client_config();
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", timeout.to_string())
        .set("request.timeout.ms", request_timeout.to_string())
        .set("queue.buffering.max.messages", "1000000")
        .set("linger.ms", "2");
    // Explicit properties win over the defaults above, except the guarantees, which
    // `check_guarantees` has refused to change.
    for (k, v) in &config.properties {
        cc.set(k, v);
    }
    cc.set("enable.idempotence", "true").set("acks", "all");
    cc.create()
}

/// Kafka headers from `(name, value)` pairs, in order.
pub(crate) fn kafka_headers<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        })
}

/// The stored headers, plus `event_id` and `event_type` from the row when absent.
fn headers_of(m: &OutboxMessage) -> OwnedHeaders {
    // On the stack: this runs for every message of every batch.
    let mut buf = uuid::Uuid::encode_buffer();
    let event_id = m.event_id.as_uuid().hyphenated().encode_lower(&mut buf);
    let stored = m.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let missing = [
        ("event_id", &*event_id),
        ("event_type", m.event_type.as_str()),
    ]
    .into_iter()
    .filter(|(k, _)| !m.headers.contains_key(*k));
    kafka_headers(stored.chain(missing))
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let producer = self.producer();
        let mut verdicts: Vec<Option<Verdict>> = (0..batch.len()).map(|_| None).collect();
        let mut in_flight = Vec::with_capacity(batch.len());
        let mut blocked: HashSet<&AggregateRef> = HashSet::new();
        let give_up_at = Instant::now() + self.config.delivery_timeout;

        for (i, m) in batch.iter().enumerate() {
            if blocked.contains(&m.aggregate) {
                verdicts[i] = Some(Verdict::Known(PublishOutcome::Skipped));
                continue;
            }
            let mut record = FutureRecord::to(m.topic.as_str())
                .key(m.key.as_bytes())
                .payload(&m.payload[..])
                .headers(headers_of(m));
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => {
                        in_flight.push((i, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                        if Instant::now() < give_up_at =>
                    {
                        // Local back-pressure: let librdkafka drain, then offer it again.
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        let outcome = match classify(&e) {
                            ErrorClass::Outage => PublishOutcome::unavailable(e.to_string()),
                            _ => PublishOutcome::rejected(e.to_string()),
                        };
                        verdicts[i] = Some(Verdict::Known(outcome));
                        blocked.insert(&m.aggregate);
                        break;
                    }
                }
            }
        }

        let sent = in_flight.len();
        let (indexes, deliveries): (Vec<usize>, Vec<_>) = in_flight.into_iter().unzip();
        let reports = futures::future::join_all(deliveries).await;
        let mut delivered = 0usize;
        let mut timed_out = 0usize;
        let mut timed_out_on: HashSet<(String, i32)> = HashSet::new();
        for (i, report) in indexes.into_iter().zip(reports) {
            verdicts[i] = Some(match report {
                Ok(Ok(_)) => {
                    delivered += 1;
                    Verdict::Known(PublishOutcome::Delivered)
                }
                Ok(Err((e, unsent))) => {
                    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
                        timed_out += 1;
                        timed_out_on.insert((unsent.topic().to_owned(), unsent.partition()));
                    }
                    match classify(&e) {
                        ErrorClass::Outage => {
                            Verdict::Known(PublishOutcome::unavailable(e.to_string()))
                        }
                        ErrorClass::Message => {
                            Verdict::Known(PublishOutcome::rejected(e.to_string()))
                        }
                        ErrorClass::Unknown => Verdict::Unclassified(e.to_string()),
                    }
                }
                Err(_canceled) => Verdict::Known(PublishOutcome::unavailable(
                    "delivery report lost: the producer was closed",
                )),
            });
        }
        // A fatal producer (idempotence state lost, e.g. after a broker restart without its
        // data) never recovers by itself: its messages count as an outage and it is replaced.
        if let Some((code, reason)) = producer.client().fatal_error() {
            self.rebuild(&format!("producer fatal error {code:?}: {reason}"));
        } else {
            let stalled = sent > 0 && timed_out == sent;
            self.note_stall(stalled.then_some(timed_out_on)).await;
        }

        verdicts
            .into_iter()
            .map(|v| match v {
                // An unexplained error that spared others is the message's; one that hit
                // everything is the broker's.
                Some(v) => v.into_outcome(delivered > 0),
                None => PublishOutcome::unavailable("no delivery report"),
            })
            .collect()
    }

    async fn probe(&self) -> Result<(), String> {
        self.broker_answers().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_timeouts_on_every_broker_and_several_partitions_mean_a_stuck_producer() {
        let set = |ids: &[i32]| ids.iter().copied().collect::<HashSet<i32>>();
        // One partition without a leader: its trouble, not the producer's.
        assert!(!spans_the_cluster(&set(&[1, 2, 3]), &set(&[2]), 1));
        // Several partitions, all led by one of three brokers: that broker's trouble.
        assert!(!spans_the_cluster(&set(&[1, 2, 3]), &set(&[2]), 4));
        // Every broker's partitions time out: the producer is stuck.
        assert!(spans_the_cluster(&set(&[1, 2, 3]), &set(&[1, 2, 3]), 6));
        // A one-broker cluster: more than one partition is needed to tell.
        assert!(!spans_the_cluster(&set(&[1]), &set(&[1]), 1));
        assert!(spans_the_cluster(&set(&[1]), &set(&[1]), 2));
        assert!(!spans_the_cluster(&set(&[]), &set(&[]), 2));
    }
}
