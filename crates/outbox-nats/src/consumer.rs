//! [`NatsConsumer`]: runs a [`MessageHandler`] over durable JetStream pull consumers,
//! acknowledging each message only after the handler succeeded.
//!
//! - One durable consumer per topic and group (`<group>__<topic>`, dots as `_`) on the topic's
//!   stream, created with `max_ack_pending = 1`: the server hands out one message at a time
//!   per group, so every member of the group may run and order per aggregate still holds (see
//!   the crate docs). A consumer found with another limit is refused with a clear error.
//! - A handler error is retried in place with backoff (`run_handler`, shared by every
//!   runner); the runner reports progress to the server meanwhile, so the message is not
//!   handed to another member while it is in hand. After `max_attempts`, or at once for
//!   poison, the message is parked: published to `<topic>.DLQ` with the reason in headers,
//!   and acknowledged only after the dead-letter stream acknowledged the copy.
//! - Acknowledgements are confirmed by the server (double ack) and retried: a lost one would
//!   hold the group for `ack_wait`.
//! - Shutdown finishes the message in hand, or gives it back (NAK) if its retries were
//!   abandoned, so another member takes it at once.
//! - A lost connection, a deleted consumer or a missing stream is waited out: the runner
//!   builds its consumer again with backoff, counting nothing against any message.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{self, Message};
use async_nats::HeaderMap;
use futures::StreamExt;
use outbox_core::consume::{
    dead_letter_headers, dead_letter_topic, run_handler, sleep_unless_stopped, stop_flag,
};
use outbox_core::retry::Backoff;
use outbox_core::{
    ConsumerConfig, ConsumerMetrics, ConsumerReport, Disposition, Headers, IncomingMessage,
    MessageHandler,
};
use tokio::sync::watch;

use crate::streams::{durable_name, Streams, KEY_HEADER};
use crate::{NatsConfig, NatsError};

/// A member of a consumer group driving one handler.
pub struct NatsConsumer {
    nats: NatsConfig,
    config: ConsumerConfig,
    metrics: Option<ConsumerMetrics>,
}

impl NatsConsumer {
    pub fn new(nats: NatsConfig, config: ConsumerConfig) -> Self {
        Self {
            nats,
            config,
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ConsumerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Consumes every topic of the group until `shutdown` completes. Errors only for a bad
    /// configuration or a durable consumer that cannot keep order; server trouble while
    /// running is waited out.
    pub async fn run<H: MessageHandler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ConsumerReport, NatsError> {
        let client = self
            .nats
            .connect(&format!("outbox-consumer-{}", self.config.group_id))
            .await?;
        let js = self.nats.jetstream(client);
        let (stop_rx, signal) = stop_flag(shutdown);
        let streams = Arc::new(Streams::default());
        let runs = self.config.topics.iter().map(|topic| {
            let mut run = TopicRun {
                runner: &self,
                js: &js,
                streams: &streams,
                topic,
                stop: stop_rx.clone(),
                report: ConsumerReport::default(),
            };
            let handler = &handler;
            async move {
                let outcome = run.consume(handler).await;
                outcome.map(|()| run.report)
            }
        });
        let all = futures::future::join_all(runs);
        let results = tokio::select! {
            r = all => r,
            _ = signal => unreachable!("the signal never completes"),
        };
        let mut report = ConsumerReport::default();
        for r in results {
            report.add(&r?);
        }
        tracing::info!(group = %self.config.group_id, ?report, "consumer stopped");
        Ok(report)
    }
}

/// One topic's consumption by this member.
struct TopicRun<'a> {
    runner: &'a NatsConsumer,
    js: &'a jetstream::Context,
    streams: &'a Streams,
    topic: &'a str,
    stop: watch::Receiver<bool>,
    report: ConsumerReport,
}

/// Why a consumer could not be used.
enum Setup {
    /// Server trouble: try again.
    Retry(String),
    /// A configuration the runner must not work with.
    Refuse(NatsError),
}

impl TopicRun<'_> {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Consumes until shutdown; `Err` only for a consumer that cannot keep order.
    async fn consume<H: MessageHandler>(&mut self, handler: &H) -> Result<(), NatsError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        while !self.stopping() {
            let messages = match self.open().await {
                Ok(m) => m,
                Err(Setup::Refuse(e)) => return Err(e),
                Err(Setup::Retry(why)) => {
                    tracing::warn!(topic = self.topic, reason = %why, "NATS consumer not ready; retrying");
                    self.pause(backoff.next_delay()).await;
                    continue;
                }
            };
            backoff.reset();
            if let Err(why) = self.drain(handler, messages).await {
                tracing::warn!(topic = self.topic, reason = %why, "NATS message stream broke; reopening");
                self.pause(backoff.next_delay()).await;
            }
        }
        Ok(())
    }

    async fn pause(&self, delay: Duration) {
        sleep_unless_stopped(&self.stop, delay).await
    }

    /// The group's durable consumer on this topic's stream, and its message stream.
    async fn open(&self) -> Result<pull::Stream, Setup> {
        let cfg = &self.runner.config;
        let stream_name = self
            .streams
            .ensure(self.js, &self.runner.nats, self.topic)
            .await
            .map_err(Setup::Retry)?;
        let stream = self
            .js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| Setup::Retry(format!("stream {stream_name}: {e}")))?;
        let name = durable_name(&format!("{}__{}", cfg.group_id, self.topic));
        let mut consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.topic.to_owned(),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.runner.nats.ack_wait,
                    max_deliver: -1,
                    max_ack_pending: 1,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Setup::Retry(format!("consumer {name} on {stream_name}: {e}")))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| Setup::Retry(format!("consumer {name}: {e}")))?;
        if info.config.max_ack_pending != 1 || info.config.ack_policy != AckPolicy::Explicit {
            return Err(Setup::Refuse(NatsError::JetStream(format!(
                "durable consumer {name} on stream {stream_name} allows {} unacknowledged messages \
                 ({:?} acks); the outbox needs 1 with explicit acks to keep order per aggregate: \
                 delete the consumer (it is created again) or change it",
                info.config.max_ack_pending, info.config.ack_policy
            ))));
        }
        consumer
            .messages()
            .await
            .map_err(|e| Setup::Retry(format!("pulling from {name}: {e}")))
    }

    /// Handles messages until shutdown (`Ok`) or until the stream breaks (`Err`).
    async fn drain<H: MessageHandler>(
        &mut self,
        handler: &H,
        mut messages: pull::Stream,
    ) -> Result<(), String> {
        let mut stop = self.stop.clone();
        while !self.stopping() {
            let next = tokio::select! {
                n = messages.next() => n,
                _ = stop.changed() => return Ok(()),
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the message stream ended".into()),
            };
            self.process(handler, &message).await;
        }
        Ok(())
    }

    async fn process<H: MessageHandler>(&mut self, handler: &H, message: &Message) {
        let incoming = to_incoming(message);
        let cfg = &self.runner.config;
        let mut stop = self.stop.clone();
        let every = (self.runner.nats.ack_wait / 3).max(Duration::from_millis(100));
        let disposition = with_progress(
            message,
            every,
            run_handler(handler, &incoming, cfg, &mut stop, &mut self.report),
        )
        .await;
        let settled = match disposition {
            Disposition::Done(_) => true,
            Disposition::Park(reason) => self.park(message, &incoming, &reason).await,
            Disposition::Abandoned => false,
        };
        if settled {
            self.acknowledge(message, AckKind::Ack).await;
        } else {
            // Shutdown: give it back now rather than after ack_wait.
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Acknowledges, confirmed by the server; retried until it is (or shutdown, after which
    /// the message comes back after `ack_wait` and the inbox recognises it).
    async fn acknowledge(&self, message: &Message, kind: AckKind) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            match message.double_ack_with(kind).await {
                Ok(()) => return,
                Err(e) if self.stopping() => {
                    tracing::warn!(error = %e, "acknowledgement unconfirmed at shutdown; the inbox absorbs the redelivery");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, topic = self.topic, "acknowledgement unconfirmed; retrying");
                    self.pause(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Publishes a copy to `<topic>.DLQ`, retrying until its stream acknowledged it (`true`)
    /// or shutdown (`false`).
    async fn park(&mut self, message: &Message, incoming: &IncomingMessage, reason: &str) -> bool {
        let group = &self.runner.config.group_id;
        let dlq = dead_letter_topic(&incoming.topic);
        let mut headers = HeaderMap::new();
        for (k, v) in dead_letter_headers(incoming, reason, group) {
            if let Ok(name) = k.parse::<async_nats::header::HeaderName>() {
                headers.insert(name, v.replace(['\r', '\n'], " ").as_str());
            }
        }
        if let Some(key) = &incoming.key {
            headers.insert(KEY_HEADER, key.as_str());
        }
        // One copy per original message and group, however often parking is retried.
        let id = format!("{group}:{}:{}", incoming.topic, incoming.offset);
        headers.insert(NATS_MESSAGE_ID, id.as_str());
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let sent = async {
                if !self.streams.known(&dlq) {
                    self.streams
                        .ensure(self.js, &self.runner.nats, &dlq)
                        .await?;
                }
                let publish = Publish::build()
                    .payload(message.payload.clone())
                    .headers(headers.clone());
                let ack = self
                    .js
                    .send_publish(dlq.clone(), publish)
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| e.to_string())
            };
            match with_progress(message, self.runner.nats.ack_wait / 3, sent).await {
                Ok(()) => {
                    self.report.parked += 1;
                    if let Some(m) = &self.runner.metrics {
                        m.parked();
                    }
                    tracing::warn!(topic = %incoming.topic, seq = incoming.offset, %dlq, %reason, "message parked");
                    return true;
                }
                Err(e) => {
                    tracing::error!(error = %e, %dlq, "parking failed; retrying (the message stays unacknowledged)");
                    if self.stopping() {
                        return false;
                    }
                    self.streams.forget(&dlq);
                    self.pause(backoff.next_delay()).await;
                    if self.stopping() {
                        return false;
                    }
                }
            }
        }
    }
}

/// Runs `work`, telling the server every `every` that the message is still in hand.
async fn with_progress<F: Future>(message: &Message, every: Duration, work: F) -> F::Output {
    tokio::pin!(work);
    // The first tick one period from now: awaiting an interval's immediate first tick costs a
    // timer round (about a millisecond), per message.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

fn to_incoming(m: &Message) -> IncomingMessage {
    let mut headers = Headers::new();
    let mut key = None;
    if let Some(h) = &m.headers {
        for (name, values) in h.iter() {
            let Some(value) = values.last() else { continue };
            let name = name.to_string();
            if name == KEY_HEADER {
                key = Some(value.as_str().to_owned());
            } else {
                headers.insert(name, value.as_str().to_owned());
            }
        }
    }
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
    IncomingMessage {
        topic: m.subject.to_string(),
        partition: 0,
        offset: i64::try_from(seq).unwrap_or(i64::MAX),
        key,
        payload: m.payload.clone(),
        headers,
    }
}
