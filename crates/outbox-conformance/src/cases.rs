//! The conformance cases. Each takes a store and a transport and asserts on counts and order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use outbox_core::{
    AggregateRef, ConsumerConfig, EventId, Headers, IncomingMessage, NewEvent, Relay, RelayConfig,
    RelayReport, RetryPolicy, Topic,
};
use tokio::sync::oneshot;

use crate::{wait_for, Store, Transport};

pub type Case = for<'a> fn(&'a dyn Store, &'a dyn Transport) -> BoxFuture<'a, ()>;

const LIMIT: Duration = Duration::from_secs(60);

fn topic(name: &str) -> Topic {
    Topic::new(format!(
        "conformance.{name}.{}",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap()
}

fn event(topic: &Topic, aggregate: &str, n: usize) -> NewEvent {
    NewEvent::new(
        topic.clone(),
        AggregateRef::new("agg", aggregate).unwrap(),
        format!("{{\"n\":{n}}}"),
    )
}

/// The relay settings of every case: small batches, short waits, three attempts.
pub fn config() -> RelayConfig {
    RelayConfig {
        service: "conformance".into(),
        batch_size: 50,
        poll_min: Duration::from_millis(5),
        poll_max: Duration::from_millis(50),
        lease: Duration::from_secs(2),
        retry: RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_millis(400),
            max_attempts: 3,
        },
        outage_backoff_min: Duration::from_millis(50),
        outage_backoff_max: Duration::from_millis(500),
        ..RelayConfig::default()
    }
}

struct RunningRelay {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<RelayReport>,
}

impl RunningRelay {
    async fn stop(self) -> RelayReport {
        let _ = self.stop.send(());
        self.handle.await.unwrap()
    }
}

fn relay(store: &dyn Store, transport: &dyn Transport) -> RunningRelay {
    let relay = Relay::new(store.relay_store(), transport.publisher(), config());
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    RunningRelay { stop, handle }
}

async fn pending(store: &dyn Store) -> u64 {
    store.relay_store().stats().await.unwrap().pending
}

/// Every expected event arrived, and per key the first deliveries follow `expected` order.
pub fn assert_delivered_in_order(received: &[IncomingMessage], expected: &[NewEvent]) {
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    for e in expected {
        order
            .entry(e.key().to_owned())
            .or_default()
            .push(e.event_id().to_string());
    }
    let mut seen = HashSet::new();
    let mut next: HashMap<String, usize> = HashMap::new();
    for m in received {
        let id = m.headers.get("event_id").expect("event_id header").clone();
        if !seen.insert(id.clone()) {
            continue;
        }
        let key = m.key.clone().expect("key");
        let i = next.entry(key.clone()).or_default();
        assert_eq!(
            order[&key].get(*i),
            Some(&id),
            "key {key}: event #{i} out of order"
        );
        *i += 1;
    }
    for (key, ids) in &order {
        assert_eq!(
            next.get(key).copied().unwrap_or(0),
            ids.len(),
            "key {key}: events lost"
        );
    }
}

/// Rolled-back events never leave; committed ones all do.
pub fn atomicity<'a>(store: &'a dyn Store, transport: &'a dyn Transport) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("atomicity");
        let kept: Vec<_> = (0..10).map(|i| event(&t, "a", i)).collect();
        let dropped: Vec<_> = (0..10).map(|i| event(&t, "b", i)).collect();
        store.rollback(&dropped).await;
        store.commit(&kept).await;
        let r = relay(store, transport);
        wait_for(LIMIT, "committed events published", || async {
            pending(store).await == 0
        })
        .await;
        r.stop().await;
        let received = transport.received(t.as_str(), 10, LIMIT).await;
        assert_delivered_in_order(&received, &kept);
        let dropped: HashSet<String> = dropped.iter().map(|e| e.event_id().to_string()).collect();
        assert!(received
            .iter()
            .all(|m| !dropped.contains(&m.headers["event_id"])));
        for e in &kept {
            let m = received
                .iter()
                .find(|m| m.headers["event_id"] == e.event_id().to_string())
                .unwrap();
            assert_eq!(&m.payload[..], &e.payload()[..], "payload verbatim");
        }
    })
}

/// Interleaved writers and two racing relays keep per-aggregate order and lose nothing.
pub fn order_per_aggregate<'a>(
    store: &'a dyn Store,
    transport: &'a dyn Transport,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("order");
        let relays = [relay(store, transport), relay(store, transport)];
        let mut expected = Vec::new();
        for round in 0..30 {
            let batch: Vec<_> = (0..6)
                .map(|a| event(&t, &format!("agg-{a}"), round))
                .collect();
            store.commit(&batch).await;
            expected.extend(batch);
        }
        wait_for(LIMIT, "all published", || async {
            pending(store).await == 0
        })
        .await;
        let mut published = 0;
        for r in relays {
            published += r.stop().await.published;
        }
        assert_eq!(published as usize, expected.len(), "each completed once");
        let received = transport.received(t.as_str(), expected.len(), LIMIT).await;
        assert_delivered_in_order(&received, &expected);
    })
}

/// A message the broker refuses is retried with backoff, then dead with its error; it holds
/// back its successor meanwhile, and other aggregates flow.
pub fn retry_then_dead_letter<'a>(
    store: &'a dyn Store,
    transport: &'a dyn Transport,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("dead");
        let agg = |id: &str| AggregateRef::new("agg", id).unwrap();
        let too_large = NewEvent::new(t.clone(), agg("big"), vec![b'x'; 1_500_000]);
        let successor = NewEvent::new(t.clone(), agg("big"), "\"after\"");
        let others: Vec<_> = (0..5).map(|i| event(&t, &format!("ok-{i}"), i)).collect();
        let started = Instant::now();
        store
            .commit(&[vec![too_large.clone(), successor.clone()], others.clone()].concat())
            .await;
        let r = relay(store, transport);
        wait_for(LIMIT, "oversized event dead", || async {
            matches!(store.row(too_large.event_id()).await, Some((s, _, _)) if s == "dead")
        })
        .await;
        // Three attempts with 100 ms and 200 ms nominal waits between them (at least half).
        assert!(started.elapsed() >= Duration::from_millis(150));
        wait_for(LIMIT, "the rest published", || async {
            pending(store).await == 0
        })
        .await;
        let report = r.stop().await;
        assert_eq!((report.rejected_attempts, report.dead_lettered), (3, 1));
        let (_, attempts, error) = store.row(too_large.event_id()).await.unwrap();
        assert_eq!(attempts, 3);
        let error = error.unwrap().to_lowercase();
        assert!(error.contains("large"), "{error}");
        let received = transport.received(t.as_str(), 6, LIMIT).await;
        assert_delivered_in_order(&received, &[vec![successor], others].concat());
    })
}

/// An outage pauses the relay without counting attempts; afterwards everything arrives.
pub fn outage<'a>(store: &'a dyn Store, transport: &'a dyn Transport) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("outage");
        let r = relay(store, transport);
        let first: Vec<_> = (0..5)
            .map(|i| event(&t, &format!("a{}", i % 3), i))
            .collect();
        store.commit(&first).await;
        wait_for(LIMIT, "before the outage", || async {
            pending(store).await == 0
        })
        .await;
        transport.start_outage();
        let during: Vec<_> = (5..45)
            .map(|i| event(&t, &format!("a{}", i % 3), i))
            .collect();
        for chunk in during.chunks(5) {
            store.commit(chunk).await;
        }
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(pending(store).await, 40, "nothing leaves during the outage");
        for e in &during {
            let (status, attempts, _) = store.row(e.event_id()).await.unwrap();
            assert_eq!(
                (status.as_str(), attempts),
                ("pending", 0),
                "an outage burnt an attempt"
            );
        }
        transport.end_outage();
        wait_for(LIMIT, "drained after the outage", || async {
            pending(store).await == 0
        })
        .await;
        let report = r.stop().await;
        assert_eq!((report.rejected_attempts, report.dead_lettered), (0, 0));
        assert!(report.outage_pauses > 0);
        let all = [first, during].concat();
        let received = transport.received(t.as_str(), all.len(), LIMIT).await;
        assert_delivered_in_order(&received, &all);
    })
}

/// The same event delivered three times applies once through the store's inbox.
pub fn inbox_dedupe<'a>(store: &'a dyn Store, transport: &'a dyn Transport) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("inbox");
        let twice = EventId::new();
        let once = EventId::new();
        for id in [twice, twice, once, twice] {
            let headers: Headers = [("event_id".to_string(), id.to_string())].into();
            transport
                .produce(t.as_str(), "k", Bytes::from_static(b"{}"), headers)
                .await;
        }
        let consumer = transport.consume(
            ConsumerConfig::new(
                format!("g-{}", uuid::Uuid::new_v4().simple()),
                &[t.as_str()],
            ),
            store.inbox_handler("conformance"),
        );
        wait_for(LIMIT, "both events applied", || async {
            store.effects().await.len() == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let report = consumer.stop().await;
        assert_eq!((report.processed, report.duplicates), (2, 2), "{report:?}");
        let effects = store.effects().await;
        assert!(effects.iter().all(|(_, n)| *n == 1), "{effects:?}");
    })
}

/// A pipelined relay claims past the batches it still has in flight: the store leaves those
/// out and keeps sequence order, including events older than some in-flight ones.
pub fn claim_excluding<'a>(store: &'a dyn Store, _: &'a dyn Transport) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("claim");
        let events: Vec<_> = (0..10)
            .map(|i| event(&t, &format!("a{}", i % 4), i))
            .collect();
        store.commit(&events).await;
        let relays = store.relay_store();
        let relay = outbox_core::RelayId::new();
        let held = relays
            .acquire_partitions(relay, usize::from(outbox_core::PARTITIONS), LIMIT)
            .await
            .unwrap();
        let ids = |batch: &[outbox_core::OutboxMessage]| -> Vec<EventId> {
            batch.iter().map(|m| m.event_id).collect()
        };
        let first = relays.claim(&held, 4).await.unwrap();
        assert_eq!(ids(&first), ids_of(&events[..4]));
        let seqs: Vec<i64> = first.iter().map(|m| m.seq).collect();
        let next = relays.claim_excluding(&held, 4, &seqs).await.unwrap();
        assert_eq!(
            ids(&next),
            ids_of(&events[4..8]),
            "in-flight events left out"
        );
        // Out of a gap: the first two and the fifth are in flight.
        let gap = [seqs[0], seqs[1], next[0].seq];
        let mixed = relays.claim_excluding(&held, 4, &gap).await.unwrap();
        let expected = [&events[2..4], &events[5..7]].concat();
        assert_eq!(
            ids(&mixed),
            ids_of(&expected),
            "older events first, in order"
        );
        relays
            .release_partitions(relay, &held.iter().map(|l| l.partition).collect::<Vec<_>>())
            .await
            .unwrap();
    })
}

fn ids_of(events: &[NewEvent]) -> Vec<EventId> {
    events.iter().map(|e| e.event_id()).collect()
}

/// Store-level, with a test publisher: one relay partition's messages time out (a Kafka
/// partition without a leader) while the broker takes everything else. The relay defers only
/// the aggregates behind the stuck messages, counts no attempt, never pauses as a whole, and
/// the other aggregates flow although the stuck backlog alone would fill every batch.
pub fn one_stuck_partition<'a>(store: &'a dyn Store, _: &'a dyn Transport) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        use outbox_core::testing::TestPublisher;
        let t = topic("stuck");
        let stuck = AggregateRef::new("agg", "stuck").unwrap().partition();
        // Committed first and three batches long: claimed first, it fills whole batches.
        let blocked: Vec<_> = (0..60).map(|i| event(&t, "stuck", i)).collect();
        let others: Vec<_> = (0..40)
            .map(|i| format!("free-{i}"))
            .filter(|a| AggregateRef::new("agg", a.as_str()).unwrap().partition() != stuck)
            .flat_map(|a| (0..3).map(move |n| (a.clone(), n)))
            .map(|(a, n)| event(&t, &a, n))
            .collect();
        store.commit(&blocked).await;
        store.commit(&others).await;
        let publisher = TestPublisher::new();
        publisher.set_stuck_partitions([stuck], Duration::from_millis(50));
        let cfg = RelayConfig {
            batch_size: 20,
            defer_min: Duration::from_millis(200),
            defer_max: Duration::from_millis(400),
            ..config()
        };
        let relay = Relay::new(store.relay_store(), publisher.clone(), cfg);
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        }));
        let delivered = |p: &TestPublisher| -> HashSet<EventId> {
            p.delivered().iter().map(|m| m.event_id).collect()
        };
        wait_for(LIMIT, "every other aggregate published", || async {
            let d = delivered(&publisher);
            others.iter().all(|e| d.contains(&e.event_id()))
        })
        .await;
        assert!(
            blocked
                .iter()
                .all(|e| !delivered(&publisher).contains(&e.event_id())),
            "nothing of the stuck partition was delivered"
        );
        let (status, attempts, error) = store.row(blocked[0].event_id()).await.unwrap();
        assert_eq!(
            (status.as_str(), attempts),
            ("pending", 0),
            "no attempt counted"
        );
        assert!(error.unwrap_or_default().contains("deferred"));
        // The partition gets its leader back: the stuck aggregate follows, in order.
        publisher.set_stuck_partitions([], Duration::ZERO);
        wait_for(LIMIT, "the stuck aggregate published", || async {
            pending(store).await == 0
        })
        .await;
        let _ = stop.send(());
        let report = handle.await.unwrap();
        assert_eq!(report.outage_pauses, 0, "the relay never paused as a whole");
        assert!(report.deferred > 0);
        assert_eq!((report.rejected_attempts, report.dead_lettered), (0, 0));
        let received: Vec<IncomingMessage> = publisher
            .delivered()
            .iter()
            .map(|m| IncomingMessage {
                topic: m.topic.as_str().to_owned(),
                partition: 0,
                offset: m.seq,
                key: Some(m.key.clone()),
                payload: m.payload.clone(),
                headers: [("event_id".to_owned(), m.event_id.to_string())].into(),
            })
            .collect();
        assert_delivered_in_order(&received, &[blocked, others].concat());
    })
}

/// Store-level: an `event_id` header naming another event is refused by `enqueue` (a handler
/// copying incoming headers would make consumers drop the new event as a duplicate), and a
/// row written around `enqueue` with one goes dead at once with the reason, its successor
/// after it, while the relay carries on.
pub fn foreign_event_id_header<'a>(
    store: &'a dyn Store,
    _: &'a dyn Transport,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        use outbox_core::testing::TestPublisher;
        let t = topic("header");
        let copied = event(&t, "h", 0).with_header("event_id", EventId::new().to_string());
        let err = store.try_commit(&[copied]).await.unwrap_err();
        assert!(err.contains("differs from the event's id"), "{err}");
        // Its own id in the header is fine.
        let own = event(&t, "h", 1);
        let own = own
            .clone()
            .with_header("event_id", own.event_id().to_string());
        let forged = event(&t, "h", 2);
        let successor = event(&t, "h", 3);
        let other = event(&t, "k", 0);
        let all = [
            own.clone(),
            forged.clone(),
            successor.clone(),
            other.clone(),
        ];
        store.commit(&all).await;
        let foreign = EventId::new();
        store
            .overwrite_headers(
                forged.event_id(),
                &format!("{{\"event_id\":\"{foreign}\"}}"),
            )
            .await;
        let publisher = TestPublisher::new();
        let relay = Relay::new(store.relay_store(), publisher.clone(), config());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(relay.run(async move {
            let _ = stopped.await;
        }));
        wait_for(LIMIT, "the rest published", || async {
            pending(store).await == 0
        })
        .await;
        let _ = stop.send(());
        let report = handle.await.unwrap();
        let (status, attempts, error) = store.row(forged.event_id()).await.unwrap();
        assert_eq!((status.as_str(), attempts), ("dead", 1), "dead at once");
        assert!(error.unwrap().contains("differs"), "the reason is kept");
        assert_eq!(report.dead_lettered, 1);
        let ids: Vec<EventId> = publisher.delivered().iter().map(|m| m.event_id).collect();
        assert!(!ids.contains(&forged.event_id()) && !ids.contains(&foreign));
        let pos = |id: EventId| ids.iter().position(|x| *x == id).unwrap();
        assert!(pos(own.event_id()) < pos(successor.event_id()));
        assert!(ids.contains(&other.event_id()));
    })
}

/// Store-level: a relay process killed (its task aborted: leases and heartbeat left behind)
/// and started again under the same instance name takes its partitions back at once, where
/// any other relay waits for the lease (30 s here) to run out.
pub fn restarted_instance_takes_its_partitions_back<'a>(
    store: &'a dyn Store,
    _: &'a dyn Transport,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        use outbox_core::testing::TestPublisher;
        let t = topic("instance");
        let publisher = TestPublisher::new();
        let with_instance = |instance: &str| RelayConfig {
            instance: Some(instance.into()),
            lease: Duration::from_secs(30),
            ..config()
        };
        let start = |cfg: RelayConfig| {
            let relay = Relay::new(store.relay_store(), publisher.clone(), cfg);
            tokio::spawn(relay.run(std::future::pending::<()>()))
        };
        let first = start(with_instance("pod-7"));
        store.commit(&[event(&t, "a", 0)]).await;
        wait_for(LIMIT, "the first run published", || async {
            pending(store).await == 0
        })
        .await;
        first.abort();
        let _ = first.await;
        let written_meanwhile = event(&t, "a", 1);
        store.commit(std::slice::from_ref(&written_meanwhile)).await;

        // Another instance finds every partition leased to the dead relay. (Stopped gracefully:
        // a live heartbeat would make the restarted relay take only half the partitions.)
        let other = Relay::new(
            store.relay_store(),
            publisher.clone(),
            with_instance("pod-8"),
        );
        let (stop_other, other_stopped) = oneshot::channel::<()>();
        let other = tokio::spawn(other.run(async move {
            let _ = other_stopped.await;
        }));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(publisher.offered(written_meanwhile.event_id()), 0);
        let _ = stop_other.send(());
        other.await.unwrap();

        let restarted_at = Instant::now();
        let restarted = start(with_instance("pod-7"));
        wait_for(
            Duration::from_secs(10),
            "the restarted instance publishes",
            || async { publisher.offered(written_meanwhile.event_id()) == 1 },
        )
        .await;
        println!(
            "{}: restart to first publish {:?} (lease 30 s)",
            store.name(),
            restarted_at.elapsed()
        );
        restarted.abort();
        let _ = restarted.await;
    })
}

/// Records the order in which a handler's effects committed (duplicates left out).
struct Recording {
    inner: Box<dyn outbox_core::MessageHandler>,
    log: std::sync::Arc<std::sync::Mutex<Vec<IncomingMessage>>>,
}

#[async_trait::async_trait]
impl outbox_core::MessageHandler for Recording {
    async fn handle(
        &self,
        message: &IncomingMessage,
    ) -> Result<outbox_core::Handled, outbox_core::HandlerError> {
        let handled = self.inner.handle(message).await?;
        if handled == outbox_core::Handled::Processed {
            self.log.lock().unwrap().push(message.clone());
        }
        Ok(handled)
    }
}

/// End to end: two racing relays publish while two members of one consumer group apply the
/// events through the inbox; one member stops half-way and a third starts. Every event's
/// effect commits exactly once, and per aggregate in commit order.
pub fn consumer_order_across_restart<'a>(
    store: &'a dyn Store,
    transport: &'a dyn Transport,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("consumed");
        let group = format!("g-{}", uuid::Uuid::new_v4().simple());
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let member = |name: &str| {
            transport.consume(
                ConsumerConfig::new(group.clone(), &[t.as_str()])
                    .with_instance(Some(name.to_owned())),
                Box::new(Recording {
                    inner: store.inbox_handler("conformance"),
                    log: log.clone(),
                }),
            )
        };
        // The group's queues exist before the relays publish (a catch-all observer queue
        // would otherwise take round 0 for a group still connecting: the RabbitMQ limit).
        transport
            .prepare_group(&ConsumerConfig::new(group.clone(), &[t.as_str()]))
            .await;
        let relays = [relay(store, transport), relay(store, transport)];
        let mut first = Some(member("m1"));
        let second = member("m2");
        let mut expected = Vec::new();
        for round in 0..15 {
            let batch: Vec<_> = (0..4)
                .map(|a| event(&t, &format!("agg-{a}"), round))
                .collect();
            store.commit(&batch).await;
            expected.extend(batch);
            if let (7, Some(m)) = (round, first.take()) {
                wait_for(LIMIT, "some events applied", || async {
                    !log.lock().unwrap().is_empty()
                })
                .await;
                m.stop().await;
            }
        }
        let third = member("m3");
        wait_for(LIMIT, "every event applied", || async {
            store.effects().await.len() == expected.len()
        })
        .await;
        for r in relays {
            r.stop().await;
        }
        second.stop().await;
        third.stop().await;
        let effects = store.effects().await;
        assert!(effects.iter().all(|(_, n)| *n == 1), "{effects:?}");
        let applied = log.lock().unwrap().clone();
        assert_eq!(applied.len(), expected.len(), "each effect committed once");
        assert_delivered_in_order(&applied, &expected);
    })
}

/// The broker process is killed (SIGKILL) while a relay publishes and two consumer groups
/// apply, and started again on its data a few seconds later: nothing committed is lost, no
/// attempt is burnt, each group commits every effect once and in order per aggregate (a
/// group whose queue came back later than the other's must not miss what arrived between).
/// Transports without a durable broker process of their own are skipped (see
/// [`Transport::kill_and_restart`]).
pub fn broker_killed_and_restarted<'a>(
    store: &'a dyn Store,
    transport: &'a dyn Transport,
) -> BoxFuture<'a, ()> {
    killed_and_restarted(store, transport, &["conformance", "conformance-second"])
}

/// [`broker_killed_and_restarted`] with one consumer group on the topic.
pub fn broker_killed_and_restarted_one_group<'a>(
    store: &'a dyn Store,
    transport: &'a dyn Transport,
) -> BoxFuture<'a, ()> {
    killed_and_restarted(store, transport, &["conformance"])
}

/// The kill/restart case with one consumer group per inbox name in `inboxes`.
fn killed_and_restarted<'a>(
    store: &'a dyn Store,
    transport: &'a dyn Transport,
    inboxes: &'static [&'static str],
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let t = topic("restart");
        let groups: Vec<_> = inboxes
            .iter()
            .map(|inbox| {
                let config = ConsumerConfig::new(
                    format!("g-{}", uuid::Uuid::new_v4().simple()),
                    &[t.as_str()],
                );
                let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                (*inbox, config, log)
            })
            .collect();
        let every_group = inboxes.len() as i64;
        for (_, config, _) in &groups {
            transport.prepare_group(config).await;
        }
        let consumers: Vec<_> = groups
            .iter()
            .map(|(inbox, config, log)| {
                transport.consume(
                    config.clone(),
                    Box::new(Recording {
                        inner: store.inbox_handler(inbox),
                        log: log.clone(),
                    }),
                )
            })
            .collect();
        let r = relay(store, transport);
        let mut expected = Vec::new();
        let mut commit_round = |round: usize| {
            let batch: Vec<_> = (0..5)
                .map(|a| event(&t, &format!("agg-{a}"), round))
                .collect();
            expected.extend(batch.clone());
            batch
        };
        for round in 0..10 {
            store.commit(&commit_round(round)).await;
        }
        wait_for(LIMIT, "some effects before the kill", || async {
            groups
                .iter()
                .all(|(_, _, log)| !log.lock().unwrap().is_empty())
        })
        .await;
        let restart = transport.kill_and_restart(Duration::from_secs(3));
        let writes = async {
            for round in 10..20 {
                store.commit(&commit_round(round)).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let (restarted, ()) = tokio::join!(restart, writes);
        if !restarted {
            r.stop().await;
            for c in consumers {
                c.stop().await;
            }
            println!(
                "{}: no broker process to restart; skipped",
                transport.name()
            );
            return;
        }
        let waited = Instant::now();
        let all_applied = |effects: &[(String, i64)]| {
            effects.len() == expected.len() && effects.iter().all(|(_, n)| *n >= every_group)
        };
        while !all_applied(&store.effects().await) {
            let handled: Vec<usize> = groups
                .iter()
                .map(|(_, _, log)| log.lock().unwrap().len())
                .collect();
            if waited.elapsed() > LIMIT {
                let mut brokers = Vec::new();
                for (_, config, _) in &groups {
                    let state = tokio::time::timeout(LIMIT, transport.group_state(config));
                    brokers.push(state.await.unwrap_or_else(|_| "no answer".into()));
                }
                panic!(
                    "every effect in every group after the restart: {} events of {} applied \
                     somewhere, {} by every group; handled per group {:?}; broker {:?}; \
                     outbox {:?}",
                    store.effects().await.len(),
                    expected.len(),
                    store
                        .effects()
                        .await
                        .iter()
                        .filter(|(_, n)| *n >= every_group)
                        .count(),
                    handled,
                    brokers,
                    store.relay_store().stats().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let report = r.stop().await;
        for c in consumers {
            c.stop().await;
        }
        assert_eq!((report.rejected_attempts, report.dead_lettered), (0, 0));
        // Paused, or deferred if the broker was back by the time the relay probed it.
        assert!(
            report.outage_pauses + report.deferred > 0,
            "the relay saw the broker gone: {report:?}"
        );
        let effects = store.effects().await;
        assert!(
            effects.iter().all(|(_, n)| *n == every_group),
            "once per group: {effects:?}"
        );
        for (_, _, log) in &groups {
            let applied = log.lock().unwrap().clone();
            assert_eq!(applied.len(), expected.len(), "each effect committed once");
            assert_delivered_in_order(&applied, &expected);
        }
    })
}
