//! RabbitMQ keeps a message only for the queues bound when it arrives. The outbox does not
//! publish into that void: an event of a topic no group has a queue for stays pending (its
//! aggregate deferred, no attempt counted, the reason stored), and goes out once a group
//! declares its queue.

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::stores::SqliteStore;
use outbox_conformance::{init_logs, wait_for};
use outbox_core::{AggregateRef, ConsumerConfig, NewEvent, Relay, RelayConfig, Topic};
use outbox_rabbitmq::testing::shared_url;
use outbox_rabbitmq::{RabbitConfig, RabbitConsumer, RabbitPublisher};

#[tokio::test]
async fn events_of_a_topic_without_a_queue_wait_in_the_outbox_until_a_group_declares_one() {
    init_logs();
    let store = SqliteStore::boxed().await;
    let mut config = RabbitConfig::new(shared_url());
    config.exchange = format!("outbox-unrouted-{}", uuid::Uuid::new_v4().simple());
    config.queue_expires = Some(Duration::from_secs(60));
    let topic = Topic::new(format!("unrouted.{}", uuid::Uuid::new_v4().simple())).unwrap();
    let events: Vec<NewEvent> = (0..6)
        .map(|n| {
            NewEvent::new(
                topic.clone(),
                AggregateRef::new("agg", format!("a{}", n % 2)).unwrap(),
                format!("{{\"n\":{n}}}"),
            )
        })
        .collect();
    store.commit(&events).await;
    let relay = Relay::new(
        store.relay_store(),
        Arc::new(RabbitPublisher::new(config.clone()).unwrap()),
        RelayConfig {
            service: "unrouted".into(),
            poll_min: Duration::from_millis(5),
            poll_max: Duration::from_millis(50),
            defer_min: Duration::from_millis(100),
            defer_max: Duration::from_millis(300),
            ..RelayConfig::default()
        },
    );
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = relay_stopped.await;
    }));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut reasons = Vec::new();
    for e in &events {
        let (status, attempts, error) = store.row(e.event_id()).await.expect("still pending");
        assert_eq!((status.as_str(), attempts), ("pending", 0), "{error:?}");
        reasons.extend(error);
    }
    // The head of each aggregate carries why it waits.
    assert!(
        reasons.len() >= 2 && reasons.iter().all(|r| r.contains("no queue is bound")),
        "{reasons:?}"
    );
    // A group appears: its consumer declares its queue and the outbox lets the events go.
    let (stop_consumer, consumer_stopped) = tokio::sync::oneshot::channel::<()>();
    let consumer = tokio::spawn(
        RabbitConsumer::new(
            config.clone(),
            ConsumerConfig::new("late", &[topic.as_str()]),
        )
        .run(store.inbox_handler("late"), async move {
            let _ = consumer_stopped.await;
        }),
    );
    wait_for(Duration::from_secs(30), "every event applied", || async {
        store.effects().await.len() == events.len()
    })
    .await;
    let _ = stop_consumer.send(());
    let report = consumer.await.unwrap().unwrap();
    assert_eq!(report.processed, 6, "{report:?}");
    let _ = stop_relay.send(());
    let relay = relay.await.unwrap();
    assert_eq!((relay.rejected_attempts, relay.dead_lettered), (0, 0));
    assert!(relay.deferred > 0 || relay.outage_pauses > 0, "{relay:?}");
    let connection = config.connect("cleanup").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let _ = channel
        .exchange_delete(config.exchange.as_str().into(), Default::default())
        .await;
    store.cleanup().await;
}
