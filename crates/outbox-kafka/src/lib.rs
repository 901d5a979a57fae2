//! # outbox-kafka
//!
//! Kafka for the outbox framework, on librdkafka (`rdkafka`):
//! - [`KafkaPublisher`]: the relay's [`outbox_core::Publisher`] with an idempotent producer,
//!   pipelined batches, and error classification (outage versus message failure, see
//!   [`classify`]).
//! - [`KafkaConsumer`]: runs a [`outbox_core::MessageHandler`] (e.g. an inbox handler) over
//!   a consumer group, committing offsets only after the handler's transaction committed,
//!   with retries and a dead-letter topic for poison.
//! - [`create_topics`]: explicit topic creation with a partition count.
//! - [`KafkaConfig`]: bootstrap servers, client id, delivery timeout, and any librdkafka
//!   property passed through (TLS, SASL).

mod admin;
pub mod classify;
mod config;
mod consumer;
mod publisher;
#[cfg(feature = "testing")]
pub mod testing;

pub use admin::create_topics;
pub use config::{KafkaConfig, KafkaConfigError};
pub use consumer::{ConsumerHooks, KafkaConsumer};
pub use outbox_core::{ConsumerConfig, ConsumerReport};
pub use publisher::KafkaPublisher;
pub use rdkafka::error::KafkaError;
