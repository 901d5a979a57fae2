//! A relay store that counts completed events in memory, so that a benchmark sees its end
//! without polling the table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{
    FailedAttempt, Fenced, OutboxMessage, OutboxStats, PartitionLease, PartitionNo, RelayId,
    RelayStore, StoreError,
};
/// A store, counting completed events in memory: the run's end is seen without polling the
/// table (a `count(*)` every few ms, in parallel workers, took a large share of the
/// database's CPU away from the relay it was measuring).
pub struct CountingStore<S> {
    inner: S,
    completed: AtomicU64,
}

impl<S: RelayStore> CountingStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            completed: AtomicU64::new(0),
        }
    }

    /// Events completed through this store so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl<S: RelayStore> RelayStore for CountingStore<S> {
    async fn heartbeat(
        &self,
        relay: RelayId,
        name: &str,
        lease: Duration,
    ) -> Result<usize, StoreError> {
        self.inner.heartbeat(relay, name, lease).await
    }
    async fn renew_leases(
        &self,
        relay: RelayId,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError> {
        self.inner.renew_leases(relay, lease).await
    }
    async fn acquire_partitions(
        &self,
        relay: RelayId,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<PartitionLease>, StoreError> {
        self.inner.acquire_partitions(relay, max, lease).await
    }
    async fn release_partitions(
        &self,
        relay: RelayId,
        partitions: &[PartitionNo],
    ) -> Result<(), StoreError> {
        self.inner.release_partitions(relay, partitions).await
    }
    async fn deregister(&self, relay: RelayId) -> Result<(), StoreError> {
        self.inner.deregister(relay).await
    }
    async fn take_over_instance(&self, relay: RelayId, name: &str) -> Result<u64, StoreError> {
        self.inner.take_over_instance(relay, name).await
    }
    async fn claim(
        &self,
        partitions: &[PartitionLease],
        limit: usize,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        self.inner.claim(partitions, limit).await
    }
    async fn claim_excluding(
        &self,
        partitions: &[PartitionLease],
        limit: usize,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        self.inner
            .claim_excluding(partitions, limit, in_flight)
            .await
    }
    async fn complete(
        &self,
        relay: RelayId,
        events: &[Fenced],
        retain: bool,
    ) -> Result<u64, StoreError> {
        let n = self.inner.complete(relay, events, retain).await?;
        self.completed.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
    async fn record_failures(
        &self,
        relay: RelayId,
        failures: &[FailedAttempt],
    ) -> Result<u64, StoreError> {
        self.inner.record_failures(relay, failures).await
    }
    async fn purge_published(&self, retention: Duration, limit: usize) -> Result<u64, StoreError> {
        self.inner.purge_published(retention, limit).await
    }
    async fn stats(&self) -> Result<OutboxStats, StoreError> {
        self.inner.stats().await
    }
}
