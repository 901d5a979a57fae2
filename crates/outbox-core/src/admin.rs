//! Operator actions on an outbox table: inspect, requeue and purge dead letters, replay
//! retained events. Stores implement [`OutboxAdmin`]; the `outbox` CLI drives it.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::event::{EventId, Headers};
use crate::store::StoreError;

/// Which events an action applies to; every field set must match (an empty filter matches all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub event_id: Option<EventId>,
    pub topic: Option<String>,
    pub aggregate_id: Option<String>,
    /// Case-insensitive substring of the last error.
    pub error_contains: Option<String>,
    /// Only events that have been dead (or, for replay, published) for at least this long.
    pub older_than: Option<Duration>,
}

impl EventFilter {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One event as an operator sees it.
#[derive(Clone, Debug, Serialize)]
pub struct EventRecord {
    pub seq: i64,
    pub event_id: EventId,
    pub topic: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Seconds since the event was enqueued.
    pub age_seconds: f64,
    pub headers: Headers,
    #[serde(serialize_with = "payload_text")]
    pub payload: Bytes,
}

fn payload_text<S: serde::Serializer>(p: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(p))
}

/// Counts of one topic.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TopicStatus {
    pub topic: String,
    pub pending: u64,
    pub dead: u64,
    pub published_retained: u64,
    pub oldest_pending_age_seconds: Option<f64>,
    /// Being published by a live relay right now (as last reported).
    pub in_flight: u64,
    /// Published by live relays in the last minute (as last reported).
    pub published_last_minute: u64,
}

#[async_trait]
pub trait OutboxAdmin: Send + Sync + 'static {
    /// Pending, dead and retained counts per topic, read from the table.
    async fn topic_status(&self) -> Result<Vec<TopicStatus>, StoreError>;

    /// Dead events matching `filter`, oldest first.
    async fn dead(
        &self,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<EventRecord>, StoreError>;

    /// One event by id, whatever its state (if still in the table).
    async fn event(&self, id: EventId) -> Result<Option<EventRecord>, StoreError>;

    /// Dead events matching `filter` become pending again with attempts reset; `event_id`,
    /// payload and position in their aggregate's order are kept. Returns how many.
    async fn requeue_dead(&self, filter: &EventFilter) -> Result<u64, StoreError>;

    /// Deletes dead events matching `filter`. Returns how many.
    async fn purge_dead(&self, filter: &EventFilter) -> Result<u64, StoreError>;

    /// Published events still retained, of `topic`, published within `since` (and of one
    /// aggregate if given), become pending again and are re-sent with their original
    /// `event_id`. With `dry_run` nothing changes. Returns how many (would be) replayed.
    async fn replay(
        &self,
        topic: &str,
        since: Duration,
        aggregate_id: Option<&str>,
        dry_run: bool,
    ) -> Result<u64, StoreError>;
}

/// Adds the relays' reported activity to per-topic counts (a topic whose events are all
/// published, and so absent from the table, still shows its rate).
pub fn add_activity(status: &mut Vec<TopicStatus>, activity: &crate::store::RelayActivity) {
    for (topic, a) in &activity.0 {
        match status.iter_mut().find(|s| &s.topic == topic) {
            Some(s) => {
                s.in_flight = a.in_flight;
                s.published_last_minute = a.published_last_minute;
            }
            None => status.push(TopicStatus {
                topic: topic.clone(),
                in_flight: a.in_flight,
                published_last_minute: a.published_last_minute,
                ..TopicStatus::default()
            }),
        }
    }
    status.sort_by(|a, b| a.topic.cmp(&b.topic));
}
