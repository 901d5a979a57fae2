//! # outbox-conformance
//!
//! One suite, every backend: each case in [`cases`] runs against each store (PostgreSQL,
//! SQLite) with each transport (Kafka on a real broker, the in-process bus). A store or
//! transport that fails a case is not done. The tests live in `tests/conformance.rs`.

pub mod cases;
pub mod stores;
pub mod stream;
pub mod transports;

/// Shared with every other test crate.
pub use outbox_core::testing::wait_until as wait_for;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use outbox_core::{
    ConsumerConfig, ConsumerReport, EventId, Headers, IncomingMessage, MessageHandler, NewEvent,
    OutboxAdmin, Publisher, RelayStore,
};

/// What a case needs from a store.
#[async_trait]
pub trait Store: Send + Sync {
    fn name(&self) -> &'static str;
    fn relay_store(&self) -> Arc<dyn RelayStore>;
    fn admin(&self) -> Arc<dyn OutboxAdmin>;
    /// Commits a business row and `events` in one transaction.
    async fn commit(&self, events: &[NewEvent]);
    /// Writes a business row and `events`, then rolls back.
    async fn rollback(&self, events: &[NewEvent]);
    /// Like `commit`, returning the store's error instead of panicking.
    async fn try_commit(&self, events: &[NewEvent]) -> Result<(), String>;
    /// Overwrites an event's stored headers (JSON object), as a writer going around
    /// `enqueue` would.
    async fn overwrite_headers(&self, id: EventId, headers_json: &str);
    /// `(status, attempts, last_error)` of an event still in the table.
    async fn row(&self, id: EventId) -> Option<(String, i64, Option<String>)>;
    /// A handler that applies one effect per event through this store's inbox.
    fn inbox_handler(&self, consumer: &str) -> Box<dyn MessageHandler>;
    /// How often each event's effect was applied.
    async fn effects(&self) -> Vec<(String, i64)>;
    async fn cleanup(self: Box<Self>);
}

/// What a case needs from a transport.
#[async_trait]
pub trait Transport: Send + Sync {
    fn name(&self) -> &'static str;
    fn publisher(&self) -> Arc<dyn Publisher>;
    /// Messages of `topic` until `distinct` different event ids arrived or `limit` passed.
    async fn received(&self, topic: &str, distinct: usize, limit: Duration)
        -> Vec<IncomingMessage>;
    /// Sends a message as is (for consumer tests).
    async fn produce(&self, topic: &str, key: &str, payload: Bytes, headers: Headers);
    /// Makes the broker unreachable / reachable again.
    fn start_outage(&self);
    fn end_outage(&self);
    /// Kills the broker process and starts it again on the same address and data after
    /// `down_for`; `false` for a transport without a durable broker of its own (Kafka's test
    /// broker keeps nothing across a restart, the bus has no process).
    async fn kill_and_restart(&self, _down_for: Duration) -> bool {
        false
    }
    /// Makes the broker keep messages for `config`'s group from now on, before anything is
    /// published (RabbitMQ keeps a message only for the queues bound when it arrives: the
    /// platform does the same at start, `Broker::prepare_consumer`). Nothing to do for logs.
    async fn prepare_group(&self, _config: &ConsumerConfig) {}
    /// What the broker holds for `config`'s group (messages waiting, consumers attached), for
    /// a failure message; empty where the transport cannot tell.
    async fn group_state(&self, _config: &ConsumerConfig) -> String {
        String::new()
    }
    /// Runs a consumer group member until the returned handle is stopped.
    fn consume(&self, config: ConsumerConfig, handler: Box<dyn MessageHandler>) -> RunningConsumer;
}

/// A consumer started by a transport.
pub struct RunningConsumer {
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub handle: tokio::task::JoinHandle<ConsumerReport>,
}

impl RunningConsumer {
    pub async fn stop(self) -> ConsumerReport {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("consumer stops")
            .expect("consumer task")
    }
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}
