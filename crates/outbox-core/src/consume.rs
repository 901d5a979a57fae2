//! The consuming side: messages as a transport delivers them, and the handler contract that
//! consumer runners (Kafka, the in-process bus) drive.
//!
//! A runner hands each message to a [`MessageHandler`] and moves its offset on only after the
//! handler returned `Ok`. The inbox handlers of the store crates (e.g.
//! `outbox_postgres::PgInboxHandler`) make the effect happen once: they record
//! `(consumer, event_id)` in the same transaction as the handler's changes.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::event::{EventId, Headers};
use crate::retry::Backoff;

/// A message as received from a transport.
#[derive(Clone, Debug)]
pub struct IncomingMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Bytes,
    pub headers: Headers,
}

/// Why a message cannot be processed at all (retrying will not help).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("poison message: {0}")]
pub struct Poison(pub String);

impl IncomingMessage {
    /// The event's id: the `event_id` header when present, else the `event_id` field of the
    /// JSON envelope. A message with neither is poison.
    pub fn event_id(&self) -> Result<EventId, Poison> {
        if let Some(h) = self.headers.get("event_id") {
            return h
                .parse()
                .map_err(|_| Poison(format!("event_id header {h:?} is not a UUID")));
        }
        #[derive(serde::Deserialize)]
        struct Envelope {
            event_id: Option<String>,
        }
        let envelope: Envelope = serde_json::from_slice(&self.payload).map_err(|e| {
            Poison(format!(
                "no event_id header and the payload is not a JSON envelope: {e}"
            ))
        })?;
        let id = envelope
            .event_id
            .ok_or_else(|| Poison("no event_id header and no event_id in the envelope".into()))?;
        id.parse()
            .map_err(|_| Poison(format!("envelope event_id {id:?} is not a UUID")))
    }

    /// The event type: the `event_type` header, else the topic.
    pub fn event_type(&self) -> &str {
        self.headers
            .get("event_type")
            .map(String::as_str)
            .unwrap_or(&self.topic)
    }
}

/// A handler's failure.
#[derive(Debug)]
pub enum HandlerError {
    /// The message can never be processed (undecodable, invalid): park it at once.
    Poison(Poison),
    /// Something went wrong this time (a dependency failed, a conflict): retry with
    /// backoff, park after the runner's maximum attempts.
    Retry(Box<dyn std::error::Error + Send + Sync>),
    /// The consumer's own database (or another dependency without which nothing can be
    /// processed) is unavailable: not the message's fault. Retried with capped backoff for as
    /// long as it lasts, counting no attempt, so the message is never parked for it and
    /// later events of its partition stay behind it. The inbox flow
    /// ([`crate::inbox`]) turns its store's connection errors into this.
    Unavailable(Box<dyn std::error::Error + Send + Sync>),
}

impl HandlerError {
    pub fn poison(reason: impl Into<String>) -> Self {
        Self::Poison(Poison(reason.into()))
    }

    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Retry(error.into())
    }

    pub fn unavailable(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Unavailable(error.into())
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Poison(p) => p.fmt(f),
            Self::Retry(e) => write!(f, "handler failed: {e}"),
            Self::Unavailable(e) => write!(f, "unavailable, retrying until it returns: {e}"),
        }
    }
}

impl std::error::Error for HandlerError {}

impl From<Poison> for HandlerError {
    fn from(p: Poison) -> Self {
        Self::Poison(p)
    }
}

/// What became of a message the handler accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Its effects committed now.
    Processed,
    /// Its effects had committed before (a re-send or a redelivery): nothing was done.
    Duplicate,
}

/// Processes one message. A runner calls it once per delivery and commits the message's
/// offset only after `Ok`.
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError>;
}

#[async_trait]
impl<H: MessageHandler + ?Sized> MessageHandler for Box<H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        (**self).handle(message).await
    }
}

#[async_trait]
impl<H: MessageHandler + ?Sized> MessageHandler for std::sync::Arc<H> {
    async fn handle(&self, message: &IncomingMessage) -> Result<Handled, HandlerError> {
        (**self).handle(message).await
    }
}

/// How a consumer group is run, whatever the transport.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub group_id: String,
    pub topics: Vec<String>,
    /// Handler runs per message before it is parked.
    pub max_attempts: u32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// A stable name for this member of the group (a pod or host name). A broker that knows
    /// static membership (Kafka's `group.instance.id`) hands a restarted member its partitions
    /// back at once instead of waiting out the dead one's session; `None`: a new member each
    /// start. Two live members must never share one.
    pub instance: Option<String>,
}

impl ConsumerConfig {
    pub fn new(group_id: impl Into<String>, topics: &[&str]) -> Self {
        Self {
            group_id: group_id.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            max_attempts: 5,
            retry_base: Duration::from_millis(200),
            retry_cap: Duration::from_secs(10),
            instance: None,
        }
    }

    /// This member's stable name (see [`ConsumerConfig::instance`]).
    pub fn with_instance(mut self, instance: Option<String>) -> Self {
        self.instance = instance;
        self
    }
}

/// The dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.DLQ")
}

/// What a consumer runner did before it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumerReport {
    pub processed: u64,
    pub duplicates: u64,
    pub handler_failures: u64,
    pub parked: u64,
    /// Retries because the consumer's database was unavailable (no attempt counted).
    pub unavailable_retries: u64,
    /// The group's queue was gone when the runner connected again after it had been attached
    /// (deleted, expired or lost by the broker) and was declared anew: what it held and what
    /// was published while it was missing did not reach this group (RabbitMQ).
    pub queues_recreated: u64,
}

impl ConsumerReport {
    /// Adds another runner's (or topic's) counts to these.
    pub fn add(&mut self, other: &ConsumerReport) {
        self.processed += other.processed;
        self.duplicates += other.duplicates;
        self.handler_failures += other.handler_failures;
        self.parked += other.parked;
        self.unavailable_retries += other.unavailable_retries;
        self.queues_recreated += other.queues_recreated;
    }
}

/// Turns a runner's `shutdown` future into a flag every part of the runner can watch, and a
/// future that raises it when `shutdown` completes (and then never completes itself: race it
/// against the consuming loop, which sees the flag and finishes the message in hand).
pub fn stop_flag(
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> (
    watch::Receiver<bool>,
    impl std::future::Future<Output = ()> + Send,
) {
    let (raise, flag) = watch::channel(false);
    let signal = async move {
        shutdown.await;
        let _ = raise.send(true);
        std::future::pending::<()>().await
    };
    (flag, signal)
}

/// Sleeps for `delay`, or less if the stop flag is raised meanwhile.
pub async fn sleep_unless_stopped(stop: &watch::Receiver<bool>, delay: Duration) {
    let mut stop = stop.clone();
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.wait_for(|stopped| *stopped) => {}
    }
}

/// What to do with a message after [`run_handler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (processed or duplicate): commit its offset.
    Done(Handled),
    /// Poison or out of attempts: park it with this reason, then commit its offset.
    Park(String),
    /// Shutdown came during a retry wait: leave the offset where it is.
    Abandoned,
}

/// Runs `handler` on `message`, retrying failures in place with backoff (the partition
/// waits, which keeps order) up to `config.max_attempts`; [`HandlerError::Unavailable`]
/// counts no attempt and is retried (backoff capped at `retry_cap`) until the dependency
/// returns or shutdown. Shared by every consumer runner so that all transports treat
/// failures alike.
pub async fn run_handler<H: MessageHandler + ?Sized>(
    handler: &H,
    message: &IncomingMessage,
    config: &ConsumerConfig,
    stop: &mut watch::Receiver<bool>,
    report: &mut ConsumerReport,
) -> Disposition {
    let mut backoff = Backoff::new(config.retry_base, config.retry_cap);
    let mut outage = Backoff::new(config.retry_base, config.retry_cap);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match handler.handle(message).await {
            Err(HandlerError::Unavailable(e)) => {
                attempts -= 1;
                report.unavailable_retries += 1;
                let delay = outage.next_delay();
                tracing::warn!(topic = %message.topic, offset = message.offset, error = %e, ?delay, "a dependency is unavailable; retrying without counting an attempt");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Disposition::Abandoned,
                }
            }
            Ok(handled) => {
                match handled {
                    Handled::Processed => report.processed += 1,
                    Handled::Duplicate => report.duplicates += 1,
                }
                return Disposition::Done(handled);
            }
            Err(HandlerError::Poison(p)) => {
                tracing::warn!(topic = %message.topic, offset = message.offset, reason = %p.0, "poison message");
                return Disposition::Park(p.0);
            }
            Err(HandlerError::Retry(e)) => {
                report.handler_failures += 1;
                if attempts >= config.max_attempts {
                    return Disposition::Park(format!(
                        "handler failed {attempts} times; last error: {e}"
                    ));
                }
                let delay = backoff.next_delay();
                tracing::warn!(topic = %message.topic, offset = message.offset, attempts, error = %e, ?delay, "handler failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Disposition::Abandoned,
                }
            }
        }
    }
}

/// Headers for a parked copy of `message`: its own plus the reason and origin.
pub fn dead_letter_headers(message: &IncomingMessage, reason: &str, group: &str) -> Headers {
    let mut h = message.headers.clone();
    h.insert("dlq_reason".into(), reason.into());
    h.insert("dlq_original_topic".into(), message.topic.clone());
    h.insert(
        "dlq_original_partition".into(),
        message.partition.to_string(),
    );
    h.insert("dlq_original_offset".into(), message.offset.to_string());
    h.insert("dlq_consumer_group".into(), group.into());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(headers: &[(&str, &str)], payload: &str) -> IncomingMessage {
        IncomingMessage {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Bytes::from(payload.to_owned()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn event_id_from_header_then_envelope() {
        let id = EventId::new();
        let s = id.to_string();
        assert_eq!(msg(&[("event_id", &s)], "not json").event_id(), Ok(id));
        let body = format!(r#"{{"event_id":"{s}","data":{{}}}}"#);
        assert_eq!(msg(&[], &body).event_id(), Ok(id));
    }

    #[test]
    fn messages_without_an_id_are_poison_with_a_reason() {
        let e = msg(&[], "garbage").event_id().unwrap_err();
        assert!(e.0.contains("not a JSON envelope"), "{e}");
        let e = msg(&[], r#"{"data":1}"#).event_id().unwrap_err();
        assert!(e.0.contains("no event_id"), "{e}");
        let e = msg(&[("event_id", "nope")], "{}").event_id().unwrap_err();
        assert!(e.0.contains("not a UUID"), "{e}");
        let e = msg(&[], r#"{"event_id":"x"}"#).event_id().unwrap_err();
        assert!(e.0.contains("not a UUID"), "{e}");
    }

    #[test]
    fn event_type_falls_back_to_topic() {
        assert_eq!(msg(&[], "").event_type(), "t");
        assert_eq!(msg(&[("event_type", "x.v1")], "").event_type(), "x.v1");
    }
}
