//! The RabbitMQ adapter's own edges, on the machine's broker with an exchange of the test's
//! own: a topic nobody has a queue for, an oversized message, and parking.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outbox_core::testing::{assert_poison_then_exhausted_parked, outbox_message, ApplyUnlessFail};
use outbox_core::{ConsumerConfig, IncomingMessage, PublishOutcome, Publisher};
use outbox_rabbitmq::testing::{publish_raw, shared_url, Observer};
use outbox_rabbitmq::{RabbitConfig, RabbitConsumer, RabbitPublisher};

fn config() -> RabbitConfig {
    let mut config = RabbitConfig::new(shared_url());
    config.exchange = format!("outbox-edges-{}", uuid::Uuid::new_v4().simple());
    config.max_message_size = 64 * 1024;
    config.queue_expires = Some(Duration::from_secs(60));
    config
}

/// A consumer group of the test's own: group queues are named `<group>.<topic>` on the
/// machine's vhost, whatever the exchange, and a fixed name would meet an earlier run's queue
/// (with what that run left in it).
fn unique_group() -> String {
    format!("svc-{}", uuid::Uuid::new_v4().simple())
}

async fn delete_exchange(config: &RabbitConfig) {
    let connection = config.connect("cleanup").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let _ = channel
        .exchange_delete(config.exchange.as_str().into(), Default::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
}

/// Runs a consumer of `group` until the returned sender fires (or is dropped).
fn spawn_consumer(
    config: &RabbitConfig,
    group: ConsumerConfig,
    handler: Arc<ApplyUnlessFail>,
    metrics: Option<outbox_core::ConsumerMetrics>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<outbox_core::ConsumerReport, outbox_rabbitmq::RabbitError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut consumer = RabbitConsumer::new(config.clone(), group);
    if let Some(m) = metrics {
        consumer = consumer.with_metrics(m);
    }
    let run = tokio::spawn(consumer.run(handler, async {
        let _ = stopped.await;
    }));
    (stop, run)
}

#[tokio::test]
async fn a_topic_without_a_queue_keeps_its_events_and_oversized_ones_are_refused() {
    let config = config();
    let publisher = RabbitPublisher::new(config.clone()).unwrap();
    // A group's queue for one topic only.
    let group = unique_group();
    let connection = config.connect("setup").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    outbox_rabbitmq::topology::declare_group(&channel, &config, &group, &["bound.v1".into()])
        .await
        .unwrap();
    let batch = vec![
        outbox_message("unbound.v1", "u", b"{}"),
        outbox_message("unbound.v1", "u", b"{}"),
        outbox_message("bound.v1", "big", &[b'x'; 70 * 1024]),
        outbox_message("bound.v1", "ok", b"{}"),
    ];
    let out = publisher.publish(&batch).await;
    match &out[0] {
        PublishOutcome::Unavailable { reason } => {
            assert!(
                reason.contains("no queue is bound to topic unbound.v1"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(out[1], PublishOutcome::Skipped);
    match &out[2] {
        PublishOutcome::Rejected { reason } => assert!(reason.contains("too large"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(out[3], PublishOutcome::Delivered);
    let queue = outbox_rabbitmq::topology::group_queue(&group, "bound.v1");
    let queued = outbox_rabbitmq::topology::queue_state(&connection, &config, &queue)
        .await
        .unwrap()
        .expect("the group's queue")
        .message_count();
    assert_eq!(queued, 1, "only the deliverable message is queued");
    publisher.probe().await.unwrap();
    let _ = connection.close(200, "done".into()).await;
    delete_exchange(&config).await;
}

#[tokio::test]
async fn poison_and_exhausted_messages_are_parked_with_their_reason_and_the_rest_flows() {
    let config = config();
    let observer = Observer::declare(&config).await;
    let publisher = RabbitPublisher::new(config.clone()).unwrap();
    let connection = config.connect("setup").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    outbox_rabbitmq::topology::declare_group(&channel, &config, "svc", &["orders.v1".into()])
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    let poison = IncomingMessage {
        topic: "orders.v1".into(),
        partition: 0,
        offset: 0,
        key: Some("p".into()),
        payload: Bytes::from_static(b"{}"),
        headers: [("event_id".to_owned(), "not-a-uuid".to_owned())].into(),
    };
    publish_raw(&config, &poison).await;
    let failing = outbox_message("orders.v1", "b", b"fail");
    let fine = outbox_message("orders.v1", "c", b"{}");
    assert_eq!(
        publisher.publish(&[failing.clone(), fine.clone()]).await,
        vec![PublishOutcome::Delivered; 2]
    );
    let handler = Arc::new(ApplyUnlessFail::default());
    let mut group = ConsumerConfig::new("svc", &["orders.v1"]);
    group.max_attempts = 2;
    group.retry_base = Duration::from_millis(50);
    let (stop, run) = spawn_consumer(&config, group, handler.clone(), None);
    let parked = observer
        .topic("orders.v1.DLQ", 2, Duration::from_secs(20))
        .await;
    assert_poison_then_exhausted_parked(&parked, &failing);
    outbox_core::testing::wait_until(Duration::from_secs(20), "the good one applied", || async {
        handler.applied.lock().unwrap().len() == 1
    })
    .await;
    let _ = stop.send(());
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.processed, report.parked), (1, 2), "{report:?}");
    assert_eq!(
        handler.applied.lock().unwrap()[0],
        fine.event_id.to_string()
    );
    delete_exchange(&config).await;
}

#[tokio::test]
async fn a_group_queue_gone_under_its_consumer_is_declared_anew_and_reported() {
    let config = config();
    let group_id = unique_group();
    let queue = outbox_rabbitmq::topology::group_queue(&group_id, "gone.v1");
    let publisher = RabbitPublisher::new(config.clone()).unwrap();
    let handler = Arc::new(ApplyUnlessFail::default());
    let mut group = ConsumerConfig::new(group_id.clone(), &["gone.v1"]);
    group.retry_base = Duration::from_millis(50);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = outbox_core::InboxMetrics::register(&mut registry);
    let (stop, run) = spawn_consumer(
        &config,
        group,
        handler.clone(),
        Some(metrics.consumer("gone")),
    );
    // Delivered once the consumer's first session declared the queue.
    let deliver = |m: outbox_core::OutboxMessage| {
        let publisher = &publisher;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while publisher.publish(std::slice::from_ref(&m)).await != [PublishOutcome::Delivered] {
                assert!(std::time::Instant::now() < deadline, "no queue took it");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    deliver(outbox_message("gone.v1", "a", b"{}")).await;
    let applied = |n: usize| {
        let handler = handler.clone();
        async move {
            outbox_core::testing::wait_until(Duration::from_secs(20), "applied", || async {
                handler.applied.lock().unwrap().len() == n
            })
            .await
        }
    };
    applied(1).await;
    // An operator (or the broker) removes the queue: the broker cancels the consumer.
    let connection = config.connect("operator").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    deliver(outbox_message("gone.v1", "a", b"{}")).await;
    applied(2).await;
    let _ = stop.send(());
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.processed, report.queues_recreated),
        (2, 1),
        "{report:?}"
    );
    let text = outbox_core::metrics::encode_text(&registry);
    assert!(
        text.contains("inbox_queues_recreated_total{consumer=\"gone\"} 1"),
        "{text}"
    );
    delete_exchange(&config).await;
}
