//! # outbox-rabbitmq
//!
//! RabbitMQ for the outbox framework (AMQP 0.9.1 on `lapin`):
//! - [`RabbitPublisher`]: the relay's [`outbox_core::Publisher`]: persistent messages to one
//!   durable topic exchange (routing key = topic), `mandatory`, counted delivered only on the
//!   broker's publisher confirm; a batch in waves ([`outbox_core::publisher::waves`]).
//! - [`RabbitConsumer`]: runs a [`outbox_core::MessageHandler`] (e.g. an inbox handler) over
//!   a consumer group's single-active-consumer queues, acknowledging a message only after the
//!   handler's transaction committed, with retries and a dead-letter queue `<topic>.DLQ`.
//!
//! ## Order per aggregate, end to end
//! The publisher's waves put an aggregate's messages into every bound queue in outbox order.
//! A queue delivers in order; a single-active-consumer queue delivers to one member of the
//! group at a time, which handles messages one by one and acknowledges each after its
//! transaction; when that member goes, its unacknowledged messages return to their places and
//! the next member starts from them. See [`topology`] for the queues and what happens to a
//! message published before any group declared its queue (it waits in the outbox).
//!
//! ## Outage versus failure
//! See [`classify`]: a lost connection, missed heartbeats, no confirm in time, or no queue yet
//! is an outage (the relay pauses and probes by declaring the exchange again); a message over
//! `max_message_size` is the message's failure.

pub mod classify;
mod config;
mod consumer;
mod publisher;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;

pub use config::{RabbitConfig, RabbitConfigError};
pub use consumer::RabbitConsumer;
pub use outbox_core::{ConsumerConfig, ConsumerReport};
pub use publisher::RabbitPublisher;

/// Why the RabbitMQ adapter could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    #[error(transparent)]
    Config(#[from] RabbitConfigError),
    #[error("RabbitMQ unavailable: {0}")]
    Unavailable(String),
}
