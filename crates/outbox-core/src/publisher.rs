//! The [`Publisher`] trait: how the relay hands committed events to a broker.

pub mod waves;

use async_trait::async_trait;

use crate::event::OutboxMessage;

/// The result of publishing one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishOutcome {
    /// The broker acknowledged the message (for Kafka: `acks=all` delivery report).
    Delivered,
    /// The broker refused this message for a reason of its own (too large, invalid topic,
    /// not authorised). Counts as a failed attempt; after the last attempt the event is dead.
    Rejected { reason: String },
    /// The broker could not be reached or did not answer in time. Not the event's fault: the
    /// relay pauses and probes, burning no attempt.
    Unavailable { reason: String },
    /// Can never be delivered as stored (e.g. the relay found the row malformed): dead at
    /// once, without further attempts. Publishers use `Rejected` for the broker's refusals.
    Refused { reason: String },
    /// Not sent, because an earlier message of the same aggregate in this batch was rejected
    /// or not sent: sending it would let it overtake that message. No attempt is counted.
    Skipped,
}

impl PublishOutcome {
    pub fn rejected(reason: impl Into<String>) -> Self {
        Self::Rejected {
            reason: reason.into(),
        }
    }

    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::Unavailable {
            reason: reason.into(),
        }
    }
}

/// A destination for outbox events.
///
/// `publish` sends a whole batch (pipelined, not one round trip per message) and returns one
/// outcome per message, in the batch's order. It must send each message's payload, key and
/// `event_id` exactly as given, in batch order per aggregate. Once a message of an aggregate
/// is rejected before it left the process (too large, invalid), later messages of that
/// aggregate in the batch should be returned [`PublishOutcome::Skipped`] instead of sent.
/// It should not return before every message has an outcome; a
/// message whose fate is unknown when the publisher gives up waiting is `Unavailable`.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome>;

    /// Whether the broker answers now, asked by a relay paused by an outage before it sends a
    /// batch again. A cheap round trip (Kafka: a metadata request) lets the relay probe often
    /// and resume within moments of the broker's return, without claiming a batch per probe.
    /// The default says yes: the next batch is the probe.
    async fn probe(&self) -> Result<(), String> {
        Ok(())
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for std::sync::Arc<P> {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        (**self).publish(batch).await
    }
    async fn probe(&self) -> Result<(), String> {
        (**self).probe().await
    }
}

#[async_trait]
impl<P: Publisher + ?Sized> Publisher for Box<P> {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        (**self).publish(batch).await
    }
    async fn probe(&self) -> Result<(), String> {
        (**self).probe().await
    }
}
