//! The NATS adapter's own edges, on a private nats-server: what the publisher refuses and why,
//! parking to the dead-letter subject, and a durable consumer that could not keep order.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use outbox_core::testing::{assert_poison_then_exhausted_parked, outbox_message, ApplyUnlessFail};
use outbox_core::{ConsumerConfig, EventId, PublishOutcome, Publisher};
use outbox_nats::testing::{read_subject, PrivateNats};
use outbox_nats::{NatsConsumer, NatsPublisher};

#[tokio::test]
async fn refusals_name_their_reason_and_stop_only_their_aggregate() {
    let server = PrivateNats::start();
    let config = server.config();
    // An operator's stream with a smaller message limit than the server's.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "SMALL".into(),
        subjects: vec!["small.t".into()],
        max_message_size: 1024,
        ..Default::default()
    })
    .await
    .unwrap();
    let publisher = NatsPublisher::connect(config.clone()).await.unwrap();
    let mut broken = outbox_message("small.t", "h", b"{}");
    broken.headers.insert("note".into(), "two\nlines".into());
    let batch = vec![
        outbox_message("small.t", "big", &[b'x'; 4096]),
        outbox_message("small.t", "big", b"{}"),
        broken,
        outbox_message("small.t", "ok", b"{}"),
        outbox_message("big.t", "huge", &vec![b'y'; 2 * 1024 * 1024]),
    ];
    let out = publisher.publish(&batch).await;
    match &out[0] {
        PublishOutcome::Rejected { reason } => assert!(reason.contains("large"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        out[1],
        PublishOutcome::Skipped,
        "never sent ahead of its predecessor"
    );
    match &out[2] {
        PublishOutcome::Refused { reason } => assert!(reason.contains("line break"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(out[3], PublishOutcome::Delivered);
    match &out[4] {
        PublishOutcome::Rejected { reason } => assert!(reason.contains("large"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let stored = read_subject(&config, "small.t", 1, Duration::from_secs(5)).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].key.as_deref(), Some("ok"));
    assert_eq!(stored[0].headers["event_id"], batch[3].event_id.to_string());
    assert_eq!(
        stored[0].headers["Nats-Msg-Id"],
        batch[3].event_id.to_string()
    );
    // A re-send (a relay that crashed before completing) is stored once.
    assert_eq!(
        publisher.publish(&batch[3..4]).await,
        vec![PublishOutcome::Delivered]
    );
    let info = js
        .get_stream("SMALL")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(info, 1);
    publisher.probe().await.unwrap();
    server.freeze();
    let probe = publisher.probe().await.unwrap_err();
    assert!(
        probe.contains("JetStream") && probe.contains("time"),
        "{probe}"
    );
    server.thaw();
}

#[tokio::test]
async fn poison_and_exhausted_messages_are_parked_with_their_reason_and_the_rest_flows() {
    let server = PrivateNats::start();
    let mut config = server.config();
    config.ack_wait = Duration::from_secs(2);
    let publisher = NatsPublisher::connect(config.clone()).await.unwrap();
    let mut poison = outbox_message("orders.v1", "a", b"{}");
    poison
        .headers
        .insert("event_id".into(), "not-a-uuid".into());
    poison.event_id = EventId::new();
    let failing = outbox_message("orders.v1", "b", b"fail");
    let fine = outbox_message("orders.v1", "c", b"{}");
    // The header names another id than the row: a relay refuses such a row, but a foreign
    // producer may send it. Publish it through a raw client instead.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    outbox_nats::streams::Streams::default()
        .ensure(&js, &config, "orders.v1")
        .await
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("event_id", "not-a-uuid");
    js.publish_with_headers("orders.v1", h, Bytes::from_static(b"{}"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        publisher.publish(&[failing.clone(), fine.clone()]).await,
        vec![PublishOutcome::Delivered; 2]
    );
    let handler = Arc::new(ApplyUnlessFail::default());
    let mut group = ConsumerConfig::new("svc", &["orders.v1"]);
    group.max_attempts = 2;
    group.retry_base = Duration::from_millis(50);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(
        NatsConsumer::new(config.clone(), group).run(handler.clone(), async {
            let _ = stopped.await;
        }),
    );
    let parked = read_subject(&config, "orders.v1.DLQ", 2, Duration::from_secs(20)).await;
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
}

#[tokio::test]
async fn a_durable_consumer_that_could_not_keep_order_is_refused() {
    let server = PrivateNats::start();
    let config = server.config();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let name = outbox_nats::streams::Streams::default()
        .ensure(&js, &config, "orders.v1")
        .await
        .unwrap();
    let stream = js.get_stream(&name).await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some("svc__orders_v1".into()),
            filter_subject: "orders.v1".into(),
            max_ack_pending: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let handler = Arc::new(ApplyUnlessFail::default());
    let err = NatsConsumer::new(config, ConsumerConfig::new("svc", &["orders.v1"]))
        .run(handler, std::future::pending::<()>())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("allows 100 unacknowledged"), "{err}");
    assert!(err.contains("delete the consumer"), "{err}");
}
