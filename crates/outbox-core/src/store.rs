//! The [`RelayStore`] trait: what the relay needs from a database.
//!
//! A store adapter (PostgreSQL, SQLite) implements these primitives; the relay engine in
//! [`crate::relay`] owns the algorithm (fair share of partitions, ordering, retries), so every
//! store behaves the same way.
//!
//! Every call that changes an event is *fenced*: it names the partition lease (partition and
//! fence number) under which the event was claimed, and the store applies it only while that
//! lease is still held by the calling relay. A relay that was frozen past its lease therefore
//! cannot complete or fail events that another relay has taken over.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::event::OutboxMessage;
use crate::partition::PartitionNo;

/// An error from the database behind a store. The relay logs it, backs off and retries.
#[derive(Debug, thiserror::Error)]
#[error("outbox store: {context}: {source}")]
pub struct StoreError {
    context: &'static str,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    pub fn new(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            context,
            source: source.into(),
        }
    }

    pub fn context(&self) -> &'static str {
        self.context
    }
}

/// The identity of one running relay (one per `Relay::run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RelayId(pub Uuid);

impl RelayId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for RelayId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A partition held by a relay. `fence` grows by one every time the partition changes hands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionLease {
    pub partition: PartitionNo,
    pub fence: i64,
}

/// An event a relay claimed, named with the lease it was claimed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fenced {
    pub seq: i64,
    pub lease: PartitionLease,
}

/// What happens to an event after a rejected attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum AfterFailure {
    /// Try again no earlier than `delay` from now (database clock).
    RetryIn(Duration),
    /// Attempts are used up: park as dead until an operator requeues or purges it.
    Dead,
}

/// A failed attempt to record.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedAttempt {
    pub event: Fenced,
    /// Attempts after this one (the stored count becomes this).
    pub attempts: u32,
    pub error: String,
    pub next: AfterFailure,
}

/// Counts read from the table itself (not from what the relay happened to see).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OutboxStats {
    pub pending: u64,
    /// Pending events waiting for a retry: after a rejected attempt, or deferred (their
    /// partition was unavailable while the broker took others; no attempt counted).
    pub retrying: u64,
    pub dead: u64,
    /// Published events kept for the retention window (0 when published rows are deleted).
    pub published_retained: u64,
    pub oldest_pending_age: Option<Duration>,
    /// Relays that sent a heartbeat within their lease.
    pub live_relays: u64,
    /// Events live relays are publishing right now (as last reported, every few seconds).
    pub in_flight: u64,
    /// Events live relays published in the last minute (as last reported).
    pub published_last_minute: u64,
    /// Dead row versions waiting for vacuum (PostgreSQL's statistics; `None` elsewhere).
    pub dead_tuples: Option<u64>,
    /// The outbox table's size with its indexes, when the store can tell.
    pub table_bytes: Option<u64>,
}

/// What one topic's events are doing in a relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicActivity {
    pub in_flight: u64,
    pub published_last_minute: u64,
}

/// What a relay is doing, per topic; stored with its heartbeat row as JSON so that `status`
/// can show in-flight events and the publish rate without asking the relay.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct RelayActivity(pub std::collections::BTreeMap<String, TopicActivity>);

impl RelayActivity {
    /// Sums the stored activity of several relays (unreadable entries count as none).
    pub fn merge<'a>(stored: impl IntoIterator<Item = &'a str>) -> Self {
        let mut all = Self::default();
        for json in stored {
            let Ok(one) = serde_json::from_str::<Self>(json) else {
                continue;
            };
            for (topic, a) in one.0 {
                let t = all.0.entry(topic).or_default();
                t.in_flight += a.in_flight;
                t.published_last_minute += a.published_last_minute;
            }
        }
        all
    }

    pub fn total(&self) -> TopicActivity {
        self.0
            .values()
            .fold(TopicActivity::default(), |acc, a| TopicActivity {
                in_flight: acc.in_flight + a.in_flight,
                published_last_minute: acc.published_last_minute + a.published_last_minute,
            })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("activity serialises")
    }
}

/// What the relay engine needs from a store.
#[async_trait]
pub trait RelayStore: Send + Sync + 'static {
    /// Records that `relay` is alive (until `lease` from now) and returns how many relays are
    /// alive on this table, itself included. Also forgets relays long gone.
    async fn heartbeat(
        &self,
        relay: RelayId,
        name: &str,
        lease: Duration,
    ) -> Result<usize, StoreError>;

    /// Extends every lease `relay` holds and returns them; a lease lost to another relay is
    /// absent from the answer.
    async fn renew_leases(
        &self,
        relay: RelayId,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError>;

    /// Takes up to `max` partitions that nobody holds (or whose lease expired), raising their
    /// fence. The answer may also list leases the relay held already (the relay keeps one
    /// per partition).
    async fn acquire_partitions(
        &self,
        relay: RelayId,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError>;

    /// Gives partitions up so that other relays can take them at once.
    async fn release_partitions(
        &self,
        relay: RelayId,
        partitions: &[PartitionNo],
    ) -> Result<(), StoreError>;

    /// Removes the relay's heartbeat (on graceful shutdown).
    async fn deregister(&self, relay: RelayId) -> Result<(), StoreError>;

    /// Called once when `relay` starts under a stable instance name (`RelayConfig::instance`,
    /// recorded as its heartbeat name): relays registered under the same name are its
    /// previous incarnations, dead since (one live process per instance name), so their
    /// heartbeats are removed and their partitions released at once for the next acquire,
    /// instead of after their leases expire. Returns how many partitions were released. A
    /// previous incarnation still alive would be fenced out, like any relay past its lease.
    async fn take_over_instance(&self, relay: RelayId, name: &str) -> Result<u64, StoreError> {
        let _ = (relay, name);
        Ok(0)
    }

    /// Up to `limit` committed pending events of the given partitions, in sequence order,
    /// leaving out every aggregate whose head event is waiting for a retry.
    async fn claim(
        &self,
        partitions: &[PartitionLease],
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError>;

    /// Like [`RelayStore::claim`], leaving out the events in `in_flight` (batches a pipelined
    /// relay is still publishing or settling, which are pending until settled).
    ///
    /// The default claims `limit + in_flight.len()` events and drops the excluded ones, which
    /// keeps sequence order; stores override it to filter in the database.
    async fn claim_excluding(
        &self,
        partitions: &[PartitionLease],
        limit: usize,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        if in_flight.is_empty() {
            return self.claim(partitions, limit).await;
        }
        let skip: std::collections::HashSet<i64> = in_flight.iter().copied().collect();
        let mut batch = self.claim(partitions, limit + in_flight.len()).await?;
        batch.retain(|m| !skip.contains(&m.seq));
        batch.truncate(limit);
        Ok(batch)
    }

    /// Marks delivered events published: deletes them, or with `retain` keeps them (status
    /// `published`) for the retention window. Returns how many were changed; events whose
    /// lease is no longer held are left alone.
    async fn complete(
        &self,
        relay: RelayId,
        events: &[Fenced],
        retain: bool,
    ) -> Result<u64, StoreError>;

    /// Records rejected attempts (fenced like `complete`).
    async fn record_failures(
        &self,
        relay: RelayId,
        failures: &[FailedAttempt],
    ) -> Result<u64, StoreError>;

    /// Deletes up to `limit` published events older than `retention`; returns how many.
    async fn purge_published(&self, retention: Duration, limit: usize) -> Result<u64, StoreError>;

    /// Counts from the table.
    async fn stats(&self) -> Result<OutboxStats, StoreError>;

    /// Stores what `relay` is doing now (in flight, published in the last minute) with its
    /// heartbeat row, for operators' `status`. Stores without such a row ignore it.
    async fn report_activity(
        &self,
        relay: RelayId,
        activity: &RelayActivity,
    ) -> Result<(), StoreError> {
        let _ = (relay, activity);
        Ok(())
    }
}

macro_rules! forward_relay_store {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<S: RelayStore + ?Sized> RelayStore for std::sync::$ptr<S> {
            async fn heartbeat(&self, relay: RelayId, name: &str, lease: Duration) -> Result<usize, StoreError> {
                (**self).heartbeat(relay, name, lease).await
            }
            async fn renew_leases(&self, relay: RelayId, lease: Duration) -> Result<Vec<PartitionLease>, StoreError> {
                (**self).renew_leases(relay, lease).await
            }
            async fn acquire_partitions(&self, relay: RelayId, max: usize, lease: Duration) -> Result<Vec<PartitionLease>, StoreError> {
                (**self).acquire_partitions(relay, max, lease).await
            }
            async fn release_partitions(&self, relay: RelayId, partitions: &[PartitionNo]) -> Result<(), StoreError> {
                (**self).release_partitions(relay, partitions).await
            }
            async fn deregister(&self, relay: RelayId) -> Result<(), StoreError> {
                (**self).deregister(relay).await
            }
            async fn take_over_instance(&self, relay: RelayId, name: &str) -> Result<u64, StoreError> {
                (**self).take_over_instance(relay, name).await
            }
            async fn claim(&self, partitions: &[PartitionLease], limit: usize) -> Result<Vec<OutboxMessage>, StoreError> {
                (**self).claim(partitions, limit).await
            }
            async fn claim_excluding(&self, partitions: &[PartitionLease], limit: usize, in_flight: &[i64]) -> Result<Vec<OutboxMessage>, StoreError> {
                (**self).claim_excluding(partitions, limit, in_flight).await
            }
            async fn complete(&self, relay: RelayId, events: &[Fenced], retain: bool) -> Result<u64, StoreError> {
                (**self).complete(relay, events, retain).await
            }
            async fn record_failures(&self, relay: RelayId, failures: &[FailedAttempt]) -> Result<u64, StoreError> {
                (**self).record_failures(relay, failures).await
            }
            async fn purge_published(&self, retention: Duration, limit: usize) -> Result<u64, StoreError> {
                (**self).purge_published(retention, limit).await
            }
            async fn stats(&self) -> Result<OutboxStats, StoreError> {
                (**self).stats().await
            }
            async fn report_activity(&self, relay: RelayId, activity: &RelayActivity) -> Result<(), StoreError> {
                (**self).report_activity(relay, activity).await
            }
        }
    )*};
}

// A shared store (e.g. `Arc<dyn RelayStore>` chosen by configuration) is a store too.
forward_relay_store!(Arc);
