//! # outbox-bus
//!
//! An in-process message bus: the transport of the embedded default, for a whole platform in
//! one process and for tests, in the role Watermill's GoChannel plays. It is not a mock; it
//! keeps these guarantees:
//!
//! - **Topics** have a fixed number of partitions (default 6), created on first use.
//! - **Key to partition** by a stable hash of the key (no key: round-robin); per-partition
//!   order is append order.
//! - **Consumer groups**: the partitions of each topic are spread over the group's live
//!   members (re-spread when one joins or leaves); each member resumes a partition at the
//!   group's committed offset; offsets are committed only after the handler succeeded.
//! - **Failures** are treated exactly like the Kafka runner: retries with backoff in place,
//!   poison and out-of-attempts messages parked on `<topic>.DLQ` with the reason in headers.
//! - **Limits**: messages over `max_message_bytes` (default 1 MB) are rejected, as a broker
//!   would; [`Bus::pause`] makes it unavailable (publishes report an outage) until
//!   [`Bus::resume`], for maintenance windows and outage drills.
//!
//! **Durability**: the log lives in memory only and is gone when the process exits. The
//! outbox is the source of truth: an event counts as published once the bus accepted it, so
//! after a restart consumers see only events published after it. Use Kafka where a durable
//! log is needed.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::consume::{dead_letter_headers, dead_letter_topic, run_handler};
use outbox_core::partition::aggregate_hash;
use outbox_core::{
    AggregateRef, ConsumerConfig, ConsumerReport, Disposition, Headers, IncomingMessage,
    MessageHandler, OutboxMessage, PublishOutcome, Publisher,
};
use tokio::sync::watch;

/// Bus settings.
#[derive(Clone, Debug)]
pub struct BusConfig {
    pub partitions: u32,
    pub max_message_bytes: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            partitions: 6,
            max_message_bytes: 1_000_000,
        }
    }
}

/// Why the bus refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("the bus is paused")]
    Paused,
    #[error("message of {size} bytes is larger than max_message_bytes {max}")]
    TooLarge { size: usize, max: usize },
}

#[derive(Clone)]
struct Record {
    key: Option<String>,
    payload: Bytes,
    headers: Headers,
}

#[derive(Default)]
struct Group {
    /// member id -> subscribed topics
    members: BTreeMap<u64, Vec<String>>,
    committed: HashMap<(String, i32), i64>,
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Vec<Vec<Record>>>,
    groups: HashMap<String, Group>,
    paused: bool,
    round_robin: u64,
}

struct Inner {
    config: BusConfig,
    state: Mutex<State>,
    /// Bumped on every append and membership change; consumers wait on it.
    version: watch::Sender<u64>,
    next_member: AtomicU64,
}

/// The bus. Cheap to clone; clones share the log.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl Default for Bus {
    fn default() -> Self {
        Self::new(BusConfig::default())
    }
}

impl Bus {
    pub fn new(config: BusConfig) -> Self {
        assert!(
            config.partitions > 0,
            "a topic needs at least one partition"
        );
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State::default()),
                version: watch::channel(0).0,
                next_member: AtomicU64::new(1),
            }),
        }
    }

    fn bump(&self) {
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Makes the bus unavailable: publishes fail as an outage until [`Bus::resume`].
    pub fn pause(&self) {
        self.inner.state.lock().unwrap().paused = true;
    }

    pub fn resume(&self) {
        self.inner.state.lock().unwrap().paused = false;
        self.bump();
    }

    /// Whether publishes are refused as an outage ([`Bus::pause`]).
    pub fn is_paused(&self) -> bool {
        self.inner.state.lock().unwrap().paused
    }

    fn partition_for(&self, state: &mut State, key: Option<&str>) -> usize {
        let n = u64::from(self.inner.config.partitions);
        let h = match key {
            Some(k) => aggregate_hash("", k),
            None => {
                state.round_robin += 1;
                state.round_robin
            }
        };
        (h % n) as usize
    }

    /// Appends a message; returns its partition and offset.
    pub fn publish(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: Bytes,
        headers: Headers,
    ) -> Result<(i32, i64), BusError> {
        let max = self.inner.config.max_message_bytes;
        if payload.len() > max {
            return Err(BusError::TooLarge {
                size: payload.len(),
                max,
            });
        }
        let (partition, offset) = {
            let mut state = self.inner.state.lock().unwrap();
            if state.paused {
                return Err(BusError::Paused);
            }
            let p = self.partition_for(&mut state, key);
            let partitions = self.inner.config.partitions as usize;
            let log = state
                .topics
                .entry(topic.to_owned())
                .or_insert_with(|| vec![Vec::new(); partitions]);
            log[p].push(Record {
                key: key.map(str::to_owned),
                payload,
                headers,
            });
            (p as i32, (log[p].len() - 1) as i64)
        };
        self.bump();
        Ok((partition, offset))
    }

    /// Every message of `topic`, partition by partition (for inspection and tests).
    pub fn messages(&self, topic: &str) -> Vec<IncomingMessage> {
        let state = self.inner.state.lock().unwrap();
        let Some(log) = state.topics.get(topic) else {
            return Vec::new();
        };
        log.iter()
            .enumerate()
            .flat_map(|(p, records)| {
                records
                    .iter()
                    .enumerate()
                    .map(move |(o, r)| incoming(topic, p as i32, o as i64, r))
            })
            .collect()
    }

    /// The group's committed offset (next to read) of a partition.
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        let state = self.inner.state.lock().unwrap();
        state
            .groups
            .get(group)?
            .committed
            .get(&(topic.to_owned(), partition))
            .copied()
    }

    fn join(&self, group: &str, topics: &[String]) -> u64 {
        let id = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        self.inner
            .state
            .lock()
            .unwrap()
            .groups
            .entry(group.to_owned())
            .or_default()
            .members
            .insert(id, topics.to_vec());
        self.bump();
        id
    }

    fn leave(&self, group: &str, member: u64) {
        if let Some(g) = self.inner.state.lock().unwrap().groups.get_mut(group) {
            g.members.remove(&member);
        }
        self.bump();
    }

    /// The partitions of `topics` assigned to `member`: partition `p` of a topic goes to the
    /// `p mod n`-th of the `n` members subscribed to it.
    fn assignment(&self, group: &str, member: u64, topics: &[String]) -> Vec<(String, i32)> {
        let state = self.inner.state.lock().unwrap();
        let Some(g) = state.groups.get(group) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for t in topics {
            let subscribed: Vec<u64> = g
                .members
                .iter()
                .filter(|(_, ts)| ts.contains(t))
                .map(|(id, _)| *id)
                .collect();
            let Some(me) = subscribed.iter().position(|id| *id == member) else {
                continue;
            };
            for p in 0..self.inner.config.partitions as usize {
                if p % subscribed.len() == me {
                    out.push((t.clone(), p as i32));
                }
            }
        }
        out
    }

    /// The next record at the group's committed offset of a partition, if any.
    fn next(&self, group: &str, topic: &str, partition: i32) -> Option<IncomingMessage> {
        let state = self.inner.state.lock().unwrap();
        let offset = state
            .groups
            .get(group)
            .and_then(|g| g.committed.get(&(topic.to_owned(), partition)))
            .copied()
            .unwrap_or(0);
        let record = state
            .topics
            .get(topic)?
            .get(partition as usize)?
            .get(offset as usize)?;
        Some(incoming(topic, partition, offset, record))
    }

    fn commit(&self, group: &str, topic: &str, partition: i32, next_offset: i64) {
        let mut state = self.inner.state.lock().unwrap();
        let g = state.groups.entry(group.to_owned()).or_default();
        let slot = g
            .committed
            .entry((topic.to_owned(), partition))
            .or_default();
        // Never move backwards (a member that lost the partition may finish late).
        *slot = (*slot).max(next_offset);
    }
}

fn incoming(topic: &str, partition: i32, offset: i64, r: &Record) -> IncomingMessage {
    IncomingMessage {
        topic: topic.to_owned(),
        partition,
        offset,
        key: r.key.clone(),
        payload: r.payload.clone(),
        headers: r.headers.clone(),
    }
}

/// The relay's publisher onto the bus.
#[derive(Clone)]
pub struct BusPublisher {
    bus: Bus,
}

impl BusPublisher {
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }
}

#[async_trait]
impl Publisher for BusPublisher {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let mut blocked: Vec<&AggregateRef> = Vec::new();
        batch
            .iter()
            .map(|m| {
                if blocked.contains(&&m.aggregate) {
                    return PublishOutcome::Skipped;
                }
                let mut headers = m.headers.clone();
                headers
                    .entry("event_id".into())
                    .or_insert_with(|| m.event_id.to_string());
                headers
                    .entry("event_type".into())
                    .or_insert_with(|| m.event_type.clone());
                match self
                    .bus
                    .publish(m.topic.as_str(), Some(&m.key), m.payload.clone(), headers)
                {
                    Ok(_) => PublishOutcome::Delivered,
                    Err(BusError::Paused) => {
                        blocked.push(&m.aggregate);
                        PublishOutcome::unavailable("the in-process bus is paused")
                    }
                    Err(e @ BusError::TooLarge { .. }) => {
                        blocked.push(&m.aggregate);
                        PublishOutcome::rejected(e.to_string())
                    }
                }
            })
            .collect()
    }

    async fn probe(&self) -> Result<(), String> {
        if self.bus.is_paused() {
            Err("the in-process bus is paused".into())
        } else {
            Ok(())
        }
    }
}

/// A consumer group member on the bus, with the same contract as the Kafka runner.
pub struct BusConsumer {
    bus: Bus,
    config: ConsumerConfig,
}

impl BusConsumer {
    pub fn new(bus: Bus, config: ConsumerConfig) -> Self {
        Self { bus, config }
    }

    /// Consumes until `shutdown` completes.
    pub async fn run<H: MessageHandler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> ConsumerReport {
        let group = self.config.group_id.clone();
        let member = self.bus.join(&group, &self.config.topics);
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut report = ConsumerReport::default();
        let signal = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = self.consume(&handler, member, stop_rx, &mut report) => {}
            _ = signal => {}
        }
        self.bus.leave(&group, member);
        report
    }

    async fn consume<H: MessageHandler>(
        &self,
        handler: &H,
        member: u64,
        mut stop: watch::Receiver<bool>,
        report: &mut ConsumerReport,
    ) {
        let group = &self.config.group_id;
        let mut changes = self.bus.inner.version.subscribe();
        while !*stop.borrow() {
            changes.borrow_and_update();
            let mut progressed = false;
            // One message per assigned partition per round keeps partitions fair.
            for (topic, partition) in self.bus.assignment(group, member, &self.config.topics) {
                let Some(message) = self.bus.next(group, &topic, partition) else {
                    continue;
                };
                let advance =
                    match run_handler(handler, &message, &self.config, &mut stop, report).await {
                        Disposition::Done(_) => true,
                        Disposition::Park(reason) => {
                            self.park(&message, &reason, report, &mut stop).await
                        }
                        Disposition::Abandoned => return,
                    };
                if advance {
                    self.bus
                        .commit(group, &topic, partition, message.offset + 1);
                    progressed = true;
                }
            }
            if !progressed {
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }

    async fn park(
        &self,
        message: &IncomingMessage,
        reason: &str,
        report: &mut ConsumerReport,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let headers = dead_letter_headers(message, reason, &self.config.group_id);
        let dlq = dead_letter_topic(&message.topic);
        loop {
            match self.bus.publish(
                &dlq,
                message.key.as_deref(),
                message.payload.clone(),
                headers.clone(),
            ) {
                Ok(_) => {
                    report.parked += 1;
                    tracing::warn!(topic = %message.topic, offset = message.offset, %reason, "message parked");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "parking on the bus failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                        _ = stop.changed() => return false,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stick_to_partitions_and_order_is_append_order() {
        let bus = Bus::default();
        for i in 0..30 {
            let key = format!("k{}", i % 3);
            bus.publish("t", Some(&key), Bytes::from(i.to_string()), Headers::new())
                .unwrap();
        }
        let all = bus.messages("t");
        assert_eq!(all.len(), 30);
        for k in ["k0", "k1", "k2"] {
            let of_key: Vec<_> = all.iter().filter(|m| m.key.as_deref() == Some(k)).collect();
            assert!(of_key.windows(2).all(|w| w[0].partition == w[1].partition));
            let ns: Vec<u32> = of_key
                .iter()
                .map(|m| std::str::from_utf8(&m.payload).unwrap().parse().unwrap())
                .collect();
            assert!(ns.windows(2).all(|w| w[0] < w[1]), "{k}: {ns:?}");
        }
    }

    #[test]
    fn limits_and_pause() {
        let bus = Bus::new(BusConfig {
            partitions: 2,
            max_message_bytes: 4,
        });
        assert!(matches!(
            bus.publish("t", None, Bytes::from_static(b"12345"), Headers::new()),
            Err(BusError::TooLarge { size: 5, max: 4 })
        ));
        bus.pause();
        assert_eq!(
            bus.publish("t", None, Bytes::from_static(b"1"), Headers::new()),
            Err(BusError::Paused)
        );
        bus.resume();
        assert!(bus
            .publish("t", None, Bytes::from_static(b"1"), Headers::new())
            .is_ok());
    }

    #[test]
    fn partitions_are_spread_over_group_members() {
        let bus = Bus::default();
        let topics = vec!["t".to_string()];
        let a = bus.join("g", &topics);
        assert_eq!(bus.assignment("g", a, &topics).len(), 6);
        let b = bus.join("g", &topics);
        let (pa, pb) = (
            bus.assignment("g", a, &topics),
            bus.assignment("g", b, &topics),
        );
        assert_eq!((pa.len(), pb.len()), (3, 3));
        assert!(pa.iter().all(|p| !pb.contains(p)));
        bus.leave("g", a);
        assert_eq!(bus.assignment("g", b, &topics).len(), 6);
    }
}
