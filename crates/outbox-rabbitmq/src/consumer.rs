//! [`RabbitConsumer`]: runs a [`MessageHandler`] over a consumer group's queues,
//! acknowledging each message only after the handler succeeded.
//!
//! - The group's queue per topic is declared (with its dead-letter queue) before consuming,
//!   as single-active-consumer queues: every member of the group attaches, one receives, and
//!   the broker fails over to another when it goes (see [`crate::topology`]).
//! - Messages are handled one at a time, in queue order, with `prefetch` held ahead.
//! - A handler error is retried in place with backoff (`run_handler`, shared by every
//!   runner); after `max_attempts`, or at once for poison, the message is parked: published to
//!   `<topic>.DLQ` (confirmed) with the reason in headers, then acknowledged.
//! - Shutdown finishes the message in hand, or gives it back (requeued at its place) if its
//!   retries were abandoned; closing the channel requeues the prefetched ones.
//! - A lost connection is waited out: the runner connects again with backoff and the broker
//!   redelivers what was unacknowledged (the inbox recognises what had committed).

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use outbox_core::consume::{
    dead_letter_headers, dead_letter_topic, run_handler, sleep_unless_stopped, stop_flag,
};
use outbox_core::retry::Backoff;
use outbox_core::{
    ConsumerConfig, ConsumerMetrics, ConsumerReport, Disposition, Headers, IncomingMessage,
    MessageHandler,
};
use tokio::sync::watch;

use crate::topology::{declare_group, group_queue, missing_group_queues, KEY_HEADER};
use crate::{RabbitConfig, RabbitError};

/// A member of a consumer group driving one handler.
pub struct RabbitConsumer {
    rabbit: RabbitConfig,
    config: ConsumerConfig,
    metrics: Option<ConsumerMetrics>,
}

/// Why a session with the broker ended.
enum Ended {
    Stopped,
    Lost(String),
}

impl RabbitConsumer {
    pub fn new(rabbit: RabbitConfig, config: ConsumerConfig) -> Self {
        Self {
            rabbit,
            config,
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ConsumerMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Consumes until `shutdown` completes. Errors only for a bad configuration; broker
    /// trouble while running is waited out.
    pub async fn run<H: MessageHandler>(
        self,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ConsumerReport, RabbitError> {
        self.rabbit.validate()?;
        let (stop, signal) = stop_flag(shutdown);
        let mut run = Run {
            runner: &self,
            stop,
            report: ConsumerReport::default(),
            attached_before: false,
        };
        tokio::select! {
            _ = run.consume(&handler) => {}
            _ = signal => {}
        }
        let report = run.report.clone();
        tracing::info!(group = %self.config.group_id, ?report, "consumer stopped");
        Ok(report)
    }
}

struct Run<'a> {
    runner: &'a RabbitConsumer,
    stop: watch::Receiver<bool>,
    report: ConsumerReport,
    /// A session of this runner was attached to the group's queues: from then on they exist,
    /// and one missing when connecting again means lost messages (see `session`).
    attached_before: bool,
}

impl Run<'_> {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    async fn pause(&self, delay: Duration) {
        sleep_unless_stopped(&self.stop, delay).await
    }

    async fn consume<H: MessageHandler>(&mut self, handler: &H) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        while !self.stopping() {
            match self.session(handler, &mut backoff).await {
                Ended::Stopped => return,
                Ended::Lost(why) => {
                    tracing::warn!(group = %self.runner.config.group_id, reason = %why, "RabbitMQ session lost; connecting again");
                    self.pause(backoff.next_delay()).await;
                }
            }
        }
    }

    /// One connection's life: declare, consume, handle until shutdown or trouble.
    async fn session<H: MessageHandler>(&mut self, handler: &H, backoff: &mut Backoff) -> Ended {
        let rabbit = &self.runner.rabbit;
        let cfg = &self.runner.config;
        let lost = |e: RabbitError| Ended::Lost(e.to_string());
        let connection = match rabbit
            .connect(&format!("outbox-consumer-{}", cfg.group_id))
            .await
        {
            Ok(c) => c,
            Err(e) => return lost(e),
        };
        if self.attached_before {
            match missing_group_queues(&connection, rabbit, &cfg.group_id, &cfg.topics).await {
                Ok(missing) => {
                    for queue in missing {
                        self.report.queues_recreated += 1;
                        if let Some(m) = &self.runner.metrics {
                            m.queue_recreated();
                        }
                        tracing::error!(
                            group = %cfg.group_id,
                            %queue,
                            "the group's queue was gone when the consumer connected again \
                             (deleted, expired or lost by the broker): declaring it anew; what \
                             it held and what was published meanwhile did not reach this group"
                        );
                    }
                }
                Err(e) => return lost(e),
            }
        }
        let setup = async {
            let channel = rabbit
                .within("opening a channel", connection.create_channel())
                .await?;
            declare_group(&channel, rabbit, &cfg.group_id, &cfg.topics).await?;
            rabbit
                .within(
                    "setting the prefetch",
                    channel.basic_qos(rabbit.prefetch, BasicQosOptions::default()),
                )
                .await?;
            let parking = rabbit
                .within("opening a channel", connection.create_channel())
                .await?;
            rabbit
                .within(
                    "enabling publisher confirms",
                    parking.confirm_select(ConfirmSelectOptions::default()),
                )
                .await?;
            let mut consumers = Vec::new();
            for topic in &cfg.topics {
                let queue = group_queue(&cfg.group_id, topic);
                let tag = format!(
                    "{}-{}",
                    cfg.instance.as_deref().unwrap_or("member"),
                    consumer_suffix()
                );
                let consumer = rabbit
                    .within(
                        &format!("consuming {queue}"),
                        channel.basic_consume(
                            queue.as_str().into(),
                            tag.as_str().into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        ),
                    )
                    .await?;
                consumers.push(consumer);
            }
            Ok::<_, RabbitError>((channel, parking, consumers))
        };
        let (channel, parking, consumers) = match setup.await {
            Ok(s) => s,
            Err(e) => return lost(e),
        };
        backoff.reset();
        self.attached_before = true;
        tracing::info!(group = %cfg.group_id, topics = ?cfg.topics, "RabbitMQ consumer attached");
        let mut deliveries = futures::stream::select_all(consumers);
        let mut stop = self.stop.clone();
        // A lost connection does not always end the delivery streams: watch it as well.
        let mut events = Box::pin(connection.events_listener());
        let mut check = tokio::time::interval(Duration::from_secs(1));
        let ended = loop {
            if self.stopping() {
                break Ended::Stopped;
            }
            let next = tokio::select! {
                n = deliveries.next() => n,
                _ = stop.changed() => break Ended::Stopped,
                Some(event) = events.next() => match event {
                    lapin::Event::Error(e) => break Ended::Lost(e.to_string()),
                    _ => continue,
                },
                _ = check.tick() => {
                    if connection.status().connected() && channel.status().connected() {
                        continue;
                    }
                    break Ended::Lost("the connection closed".into());
                }
            };
            match next {
                Some(Ok(delivery)) => {
                    if let Err(why) = self.process(handler, &parking, &delivery).await {
                        break Ended::Lost(why);
                    }
                }
                Some(Err(e)) => break Ended::Lost(e.to_string()),
                None => break Ended::Lost("the broker cancelled the consumer".into()),
            }
        };
        // Closing requeues what was prefetched and not acknowledged, in order. A broker that
        // does not answer gets a few seconds; its side of the channel dies with the socket.
        let close = async {
            let _ = channel.close(200, "consumer stopping".into()).await;
            let _ = parking.close(200, "consumer stopping".into()).await;
            let _ = connection.close(200, "consumer stopping".into()).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), close).await;
        ended
    }

    /// Handles one delivery; `Err` when the channel failed under it (it is redelivered).
    async fn process<H: MessageHandler>(
        &mut self,
        handler: &H,
        parking: &Channel,
        delivery: &Delivery,
    ) -> Result<(), String> {
        let incoming = to_incoming(delivery);
        let mut stop = self.stop.clone();
        let disposition = run_handler(
            handler,
            &incoming,
            &self.runner.config,
            &mut stop,
            &mut self.report,
        )
        .await;
        let settled = match disposition {
            Disposition::Done(_) => true,
            Disposition::Park(reason) => self.park(parking, &incoming, &reason).await?,
            Disposition::Abandoned => false,
        };
        // Bounded: on a connection that died under it an acknowledgement never completes.
        let rabbit = &self.runner.rabbit;
        let answer = if settled {
            rabbit
                .within(
                    "acknowledging",
                    delivery.acker.ack(BasicAckOptions::default()),
                )
                .await
        } else {
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            rabbit
                .within("giving the message back", delivery.acker.nack(requeue))
                .await
        };
        answer.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Publishes a copy to `<topic>.DLQ` and waits for its confirm, retrying on a refusal;
    /// `Ok(false)` at shutdown, `Err` when the channel is gone.
    async fn park(
        &mut self,
        parking: &Channel,
        incoming: &IncomingMessage,
        reason: &str,
    ) -> Result<bool, String> {
        let rabbit = &self.runner.rabbit;
        let group = &self.runner.config.group_id;
        let dlq = dead_letter_topic(&incoming.topic);
        let mut headers = FieldTable::default();
        for (k, v) in dead_letter_headers(incoming, reason, group) {
            if let Ok(name) = ShortString::try_new(k) {
                headers.insert(name, AMQPValue::LongString(LongString::from(v)));
            }
        }
        if let Some(key) = &incoming.key {
            headers.insert(
                KEY_HEADER.into(),
                AMQPValue::LongString(LongString::from(key.as_str())),
            );
        }
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let confirm = rabbit
                .within(
                    "parking",
                    parking.basic_publish(
                        rabbit.exchange.as_str().into(),
                        dlq.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &incoming.payload,
                        BasicProperties::default()
                            .with_delivery_mode(2)
                            .with_headers(headers.clone()),
                    ),
                )
                .await
                .map_err(|e| e.to_string())?;
            match rabbit.within("parking", confirm).await {
                Ok(Confirmation::Ack(None)) => {
                    self.report.parked += 1;
                    if let Some(m) = &self.runner.metrics {
                        m.parked();
                    }
                    tracing::warn!(topic = %incoming.topic, %dlq, %reason, "message parked");
                    return Ok(true);
                }
                Ok(other) => {
                    tracing::error!(?other, %dlq, "parking refused; retrying (the message stays unacknowledged)");
                }
                Err(e) => return Err(e.to_string()),
            }
            self.pause(backoff.next_delay()).await;
            if self.stopping() {
                return Ok(false);
            }
        }
    }
}

fn consumer_suffix() -> String {
    format!(
        "{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    )
}

/// A header value as text (the outbox writes long strings; other producers may not).
pub(crate) fn value_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        _ => return None,
    })
}

/// A delivery as the handler sees it (the key taken out of the headers).
pub(crate) fn to_incoming(d: &Delivery) -> IncomingMessage {
    let mut headers = Headers::new();
    let mut key = None;
    if let Some(table) = d.properties.headers() {
        for (name, value) in table.inner() {
            let Some(text) = value_text(value) else {
                continue;
            };
            if name.as_str() == KEY_HEADER {
                key = Some(text);
            } else {
                headers.insert(name.as_str().to_owned(), text);
            }
        }
    }
    IncomingMessage {
        topic: d.routing_key.as_str().to_owned(),
        partition: 0,
        offset: i64::try_from(d.delivery_tag).unwrap_or(i64::MAX),
        key,
        payload: bytes::Bytes::copy_from_slice(&d.data),
        headers,
    }
}
