//! # outbox-core
//!
//! The domain and the engine of the outbox framework, free of any database or broker:
//!
//! - [`NewEvent`], [`EventId`], [`Topic`], [`AggregateRef`]: what an application publishes.
//! - [`RelayStore`]: what a database adapter provides (`outbox-postgres`, ...).
//! - [`Publisher`]: what a broker adapter provides (`outbox-kafka`, ...).
//! - [`Relay`]: moves committed events from a store to a publisher, in order per aggregate,
//!   with retries, dead letters, outage pauses and partition leases for several relays.
//! - [`RelayConfig`] / [`Settings`]: configuration with documented defaults.
//! - [`OutboxMetrics`]: Prometheus metrics.
//!
//! The write path lives in each store adapter, because it must take that database's
//! transaction type: there is no way to enqueue an event outside a transaction.
//! The guarantees and their limits are described in [`relay`] and in `docs/guarantees.md`.

pub mod admin;
pub mod config;
pub mod consume;
pub mod event;
pub mod inbox;
pub mod metrics;
pub mod partition;
pub mod publisher;
pub mod relay;
pub mod retry;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use admin::{EventFilter, EventRecord, OutboxAdmin, TopicStatus};
pub use config::{
    BrokerSetting, ConfigError, RelayConfig, Settings, StreamSettings, WakeSetting,
    WriteModeSetting,
};
pub use consume::{
    ConsumerConfig, ConsumerReport, Disposition, Handled, HandlerError, IncomingMessage,
    MessageHandler, Poison,
};
pub use event::{
    AggregateRef, EnqueueOutcome, EventId, Headers, InvalidName, NewEvent, OutboxMessage, Topic,
};
pub use inbox::{EffectHandler, Inbox, InboxStore, InboxStoreError};
pub use metrics::{ConsumerMetrics, InboxMetrics, OutboxMetrics, TableMetrics};
pub use partition::{PartitionNo, PARTITIONS};
pub use publisher::{PublishOutcome, Publisher};
pub use relay::{Relay, RelayReport, WakeSignal};
pub use retry::RetryPolicy;
pub use store::{
    AfterFailure, FailedAttempt, Fenced, OutboxStats, PartitionLease, RelayActivity, RelayId,
    RelayStore, StoreError, TopicActivity,
};
