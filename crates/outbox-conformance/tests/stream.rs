//! The stream write mode (logical messages, a stream relay with the table relay beside it)
//! on every transport: Kafka, NATS JetStream, RabbitMQ (real servers) and the in-process bus.

use outbox_conformance::init_logs;
use outbox_conformance::stream::stream_mode;
use outbox_conformance::transports::{
    BusTransport, KafkaTransport, NatsTransport, RabbitTransport,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_kafka() {
    init_logs();
    stream_mode(KafkaTransport::boxed().as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_nats() {
    init_logs();
    stream_mode(NatsTransport::boxed().await.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_rabbitmq() {
    init_logs();
    // A private node: the outage stops it.
    stream_mode(RabbitTransport::for_case("outage").await.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_bus() {
    init_logs();
    stream_mode(BusTransport::boxed().as_ref()).await;
}
