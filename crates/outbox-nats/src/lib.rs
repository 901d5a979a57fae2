//! # outbox-nats
//!
//! NATS JetStream for the outbox framework (`async-nats`):
//! - [`NatsPublisher`]: the relay's [`outbox_core::Publisher`]. Each message goes to the
//!   subject named like its topic, into a stream the publisher creates if none takes it, with
//!   `Nats-Msg-Id` = event id (a re-send within the stream's duplicate window is stored once)
//!   and the key in the `Outbox-Key` header. A batch is sent in waves (see
//!   [`outbox_core::publisher::waves`]) so that JetStream, which acknowledges every message on
//!   its own, never stores an aggregate's messages out of order.
//! - [`NatsConsumer`]: runs a [`outbox_core::MessageHandler`] (e.g. an inbox handler) as a
//!   durable pull consumer per topic, acknowledging a message only after the handler's
//!   transaction committed, with retries and a dead-letter subject `<topic>.DLQ`.
//!
//! ## Order per aggregate, end to end
//! A stream keeps its subject's messages in the order they were stored, and the publisher's
//! waves store an aggregate's messages in outbox order. The consumer is created with
//! `max_ack_pending = 1`: the server hands out the next message only after the previous one
//! was acknowledged, whichever member of the group holds it. So every member of a group can
//! run (each a hot standby), a member that dies mid-message has it handed to another after
//! `ack_wait`, and no message ever overtakes an earlier one. The price is one round trip per
//! message on top of the handler, which on this machine is a fraction of an inbox
//! transaction (BENCHMARKS.md). (nats-server 2.11's pinned consumers would allow a batch in
//! hand; 2.9 and 2.10, still common, have none.)
//!
//! ## Outage versus failure
//! See [`classify`]: no acknowledgement in time, a broken connection or a missing stream is
//! an outage (the relay pauses and probes with a JetStream account request); a message larger
//! than the server's `max_payload`, or one the stream refuses for its own limits, is the
//! message's failure.

pub mod classify;
mod config;
mod consumer;
mod publisher;
pub mod streams;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{NatsConfig, NatsConfigError};
pub use consumer::NatsConsumer;
pub use outbox_core::{ConsumerConfig, ConsumerReport};
pub use publisher::NatsPublisher;

/// Why the NATS adapter could not start.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error(transparent)]
    Config(#[from] NatsConfigError),
    #[error("cannot connect to NATS: {0}")]
    Connect(String),
    #[error("JetStream: {0}; is JetStream enabled on the server (nats-server -js)?")]
    JetStream(String),
}
