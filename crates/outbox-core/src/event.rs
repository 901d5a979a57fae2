//! The event as the application writes it ([`NewEvent`]) and as the relay hands it to a
//! publisher ([`OutboxMessage`]).
//!
//! An event is serialised exactly once, when the application builds it. From then on its
//! bytes and its [`EventId`] travel verbatim: the store keeps them, and every publish attempt
//! sends them unchanged, so a consumer can deduplicate re-sends by `event_id` alone.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::partition::{partition_of, PartitionNo};

/// Message headers: UTF-8 names to UTF-8 values, kept in name order.
pub type Headers = BTreeMap<String, String>;

/// The identity of one event, stable across every publish attempt.
///
/// New ids are UUID v7 (time ordered), which keeps the unique index on `event_id` compact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for EventId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error(
        "topic {0:?} is invalid: use 1 to 249 characters from [A-Za-z0-9._-], not \".\" or \"..\""
    )]
    Topic(String),
    #[error("aggregate {field} must be 1 to {max} bytes long, got {len}")]
    Aggregate {
        field: &'static str,
        max: usize,
        len: usize,
    },
}

/// A Kafka-compatible topic name (1..=249 characters of `[A-Za-z0-9._-]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Topic(String);

impl Topic {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        let valid_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if name.is_empty() || name.len() > 249 || !valid_chars || name == "." || name == ".." {
            return Err(InvalidName::Topic(name));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Topic {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Topic::new(s).map_err(serde::de::Error::custom)
    }
}

/// The aggregate an event belongs to: its type (e.g. `batch`) and its id.
///
/// Events of one aggregate are published in the order they were enqueued; different
/// aggregates are independent of each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AggregateRef {
    kind: String,
    id: String,
}

impl AggregateRef {
    /// Longest aggregate type or id accepted, in bytes.
    pub const MAX_LEN: usize = 512;

    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Result<Self, InvalidName> {
        let (kind, id) = (kind.into(), id.into());
        for (field, value) in [("type", &kind), ("id", &id)] {
            if value.is_empty() || value.len() > Self::MAX_LEN {
                return Err(InvalidName::Aggregate {
                    field,
                    max: Self::MAX_LEN,
                    len: value.len(),
                });
            }
        }
        Ok(Self { kind, id })
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The relay partition this aggregate maps to (stable across versions and machines).
    pub fn partition(&self) -> PartitionNo {
        partition_of(&self.kind, &self.id)
    }
}

impl fmt::Display for AggregateRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.id)
    }
}

/// An event the application wants published, built before it is enqueued.
///
/// `NewEvent` only describes the event; it is written by a store's `enqueue`, which takes the
/// caller's open transaction, so the event commits or rolls back with the business change.
#[derive(Clone, Debug)]
pub struct NewEvent {
    event_id: EventId,
    aggregate: AggregateRef,
    event_type: String,
    topic: Topic,
    key: Option<String>,
    headers: Headers,
    payload: Bytes,
    idempotency_key: Option<String>,
}

impl NewEvent {
    /// An event with a fresh [`EventId`], `event_type` equal to the topic name, and the
    /// aggregate id as message key.
    pub fn new(topic: Topic, aggregate: AggregateRef, payload: impl Into<Bytes>) -> Self {
        Self {
            event_id: EventId::new(),
            event_type: topic.as_str().to_owned(),
            aggregate,
            topic,
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
            idempotency_key: None,
        }
    }

    /// Serialises `payload` to JSON once; those bytes are what every attempt publishes.
    pub fn json<T: Serialize + ?Sized>(
        topic: Topic,
        aggregate: AggregateRef,
        payload: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(topic, aggregate, serde_json::to_vec(payload)?))
    }

    /// Use a known id (for example one already written into the payload's envelope).
    pub fn with_event_id(mut self, event_id: EventId) -> Self {
        self.event_id = event_id;
        self
    }

    pub fn with_event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = event_type.into();
        self
    }

    /// Override the message key (default: the aggregate id).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// At most one event is ever enqueued per idempotency key: a second enqueue with the same
    /// key is skipped and reported as [`EnqueueOutcome::Duplicate`].
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Why this event must not be stored, if it must not: an `event_id` header that names
    /// another id than the event's own. Consumers deduplicate by that header, so a handler
    /// that copied an incoming message's headers onto a new event would make every consumer
    /// drop the new event as a duplicate of the old one. Stores refuse such an event.
    pub fn check(&self) -> Result<(), String> {
        conflicting_event_id_header(&self.headers, self.event_id).map_or(Ok(()), Err)
    }

    pub fn event_id(&self) -> EventId {
        self.event_id
    }
    pub fn aggregate(&self) -> &AggregateRef {
        &self.aggregate
    }
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
    pub fn topic(&self) -> &Topic {
        &self.topic
    }
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(self.aggregate.id())
    }
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }
}

/// What `enqueue` did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Written; `seq` is its position in the table's sequence.
    Inserted { seq: i64 },
    /// Skipped: an event with the same `event_id` or idempotency key already exists.
    Duplicate,
}

impl EnqueueOutcome {
    pub fn is_inserted(&self) -> bool {
        matches!(self, Self::Inserted { .. })
    }
}

/// The complaint about an `event_id` header that differs from `event_id`, if it does.
fn conflicting_event_id_header(headers: &Headers, event_id: EventId) -> Option<String> {
    let header = headers.get("event_id")?;
    match header.parse::<EventId>() {
        Ok(id) if id == event_id => None,
        _ => Some(format!(
            "header event_id {header:?} differs from the event's id {event_id}: consumers would \
             take it for another event (copied headers?); drop the header, the outbox adds it"
        )),
    }
}

/// A committed event claimed by a relay, as handed to a [`crate::Publisher`].
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    /// Position in the table's sequence; orders the events of one aggregate.
    pub seq: i64,
    pub event_id: EventId,
    pub aggregate: AggregateRef,
    pub event_type: String,
    pub topic: Topic,
    pub key: String,
    pub headers: Headers,
    /// The stored bytes, verbatim.
    pub payload: Bytes,
    /// Failed attempts so far (outages do not count).
    pub attempts: u32,
    pub partition: PartitionNo,
    /// Time from insert to claim, by the database clock.
    pub age_at_claim: Duration,
}

impl OutboxMessage {
    /// Why this stored message can never be published as it is, if it cannot: an `event_id`
    /// header naming another id than the row's (written around `enqueue`, which refuses it).
    pub fn malformed(&self) -> Option<String> {
        conflicting_event_id_header(&self.headers, self.event_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules_follow_kafka() {
        assert!(Topic::new("huleedu.file.batch.file.added.v1").is_ok());
        assert!(Topic::new("a-b_c.D9").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "slash/",
            "ünicode",
            &"x".repeat(250),
        ] {
            assert!(Topic::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Topic::new("x".repeat(249)).is_ok());
    }

    #[test]
    fn aggregate_parts_must_be_non_empty_and_bounded() {
        assert!(AggregateRef::new("batch", "b-1").is_ok());
        assert!(AggregateRef::new("", "b-1").is_err());
        assert!(AggregateRef::new("batch", "").is_err());
        assert!(AggregateRef::new("batch", "x".repeat(513)).is_err());
    }

    #[test]
    fn defaults_key_and_event_type() {
        let topic = Topic::new("t.v1").unwrap();
        let agg = AggregateRef::new("batch", "b-7").unwrap();
        let e = NewEvent::new(topic, agg, &b"{}"[..]);
        assert_eq!(e.key(), "b-7");
        assert_eq!(e.event_type(), "t.v1");
        let e = e.with_key("k").with_event_type("other");
        assert_eq!(e.key(), "k");
        assert_eq!(e.event_type(), "other");
    }

    #[test]
    fn json_payload_is_serialised_once() {
        let topic = Topic::new("t").unwrap();
        let agg = AggregateRef::new("a", "1").unwrap();
        let e = NewEvent::json(topic, agg, &serde_json::json!({"b": 1, "a": 2})).unwrap();
        let bytes = e.payload().clone();
        let cloned = e.clone();
        assert_eq!(cloned.payload(), &bytes);
        assert_eq!(cloned.event_id(), e.event_id());
    }

    #[test]
    fn event_ids_parse_and_order_by_time() {
        let a = EventId::new();
        let b = EventId::new();
        assert!(a < b || a.as_uuid().get_timestamp() == b.as_uuid().get_timestamp());
        assert_eq!(a.to_string().parse::<EventId>().unwrap(), a);
    }
}
