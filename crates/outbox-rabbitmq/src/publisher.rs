//! [`RabbitPublisher`]: the relay's publisher on RabbitMQ with publisher confirms.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use outbox_core::publisher::waves::{publish_in_waves, Verdict};
use outbox_core::{OutboxMessage, PublishOutcome, Publisher};
use tokio::sync::Mutex;

use crate::classify::classify;
use crate::topology::{declare_exchange, KEY_HEADER};
use crate::{RabbitConfig, RabbitError};

/// Publishes outbox messages to the outbox's topic exchange with routing key = topic:
/// persistent (`delivery_mode` 2), `mandatory` (see [`crate::topology`]), `message_id` =
/// event id, the stored headers plus `event_id` and `event_type` (added when absent) and the
/// key in `Outbox-Key`. Each message counts as delivered only once the broker confirmed it
/// (publisher confirms: written to every queue it was routed to). A batch is sent in waves
/// ([`outbox_core::publisher::waves`]) so that a refused or unconfirmed message never has a
/// later message of its aggregate stored ahead of it.
pub struct RabbitPublisher {
    config: RabbitConfig,
    link: Mutex<Option<Link>>,
}

struct Link {
    connection: Connection,
    channel: Channel,
}

impl RabbitPublisher {
    /// Checks the configuration; connects at the first publish or probe (and again after the
    /// connection was lost).
    pub fn new(config: RabbitConfig) -> Result<Self, RabbitError> {
        config.validate()?;
        Ok(Self {
            config,
            link: Mutex::new(None),
        })
    }

    /// A channel in confirm mode, connecting if there is none.
    async fn channel(&self) -> Result<Channel, RabbitError> {
        let mut link = self.link.lock().await;
        if let Some(l) = link.as_ref() {
            if l.channel.status().connected() {
                return Ok(l.channel.clone());
            }
        }
        *link = None;
        let connection = self.config.connect("outbox-relay").await?;
        let channel = self
            .config
            .within("opening a channel", connection.create_channel())
            .await?;
        self.config
            .within(
                "enabling publisher confirms",
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
        declare_exchange(&channel, &self.config).await?;
        *link = Some(Link {
            connection,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// Forgets the connection (its state is unknown after a timeout or an error). Closing
    /// it waits for the broker, which may be the thing that is stuck: that happens aside.
    async fn reset(&self) {
        if let Some(l) = self.link.lock().await.take() {
            tokio::spawn(async move {
                let closing = l.connection.close(200, "reset by the outbox".into());
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), closing).await;
            });
        }
    }

    async fn send_wave(
        &self,
        channel: &Channel,
        batch: &[OutboxMessage],
        wave: Vec<usize>,
    ) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; wave.len()];
        let mut confirms = Vec::with_capacity(wave.len());
        let mut broken = false;
        for (slot, &i) in wave.iter().enumerate() {
            let m = &batch[i];
            if m.payload.len() > self.config.max_message_size {
                verdicts[slot] = Some(
                    PublishOutcome::rejected(format!(
                        "message too large: {} bytes, the limit is {} (max_message_size)",
                        m.payload.len(),
                        self.config.max_message_size
                    ))
                    .into(),
                );
                continue;
            }
            let properties = match properties_of(m) {
                Ok(p) => p,
                Err(reason) => {
                    verdicts[slot] = Some(PublishOutcome::Refused { reason }.into());
                    continue;
                }
            };
            // Bounded: on a connection that died under it a publish never completes.
            let sent = self
                .config
                .within(
                    "publishing",
                    channel.basic_publish(
                        self.config.exchange.as_str().into(),
                        m.topic.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &m.payload,
                        properties,
                    ),
                )
                .await;
            match sent {
                Ok(confirm) => confirms.push((slot, confirm)),
                Err(e) => {
                    broken = true;
                    verdicts[slot] = Some(PublishOutcome::unavailable(e.to_string()).into());
                    break;
                }
            }
        }
        let (slots, pending): (Vec<usize>, Vec<_>) = confirms.into_iter().unzip();
        let answers = tokio::time::timeout(
            self.config.confirm_timeout,
            futures::future::join_all(pending),
        )
        .await;
        match answers {
            Ok(answers) => {
                for (slot, answer) in slots.into_iter().zip(answers) {
                    let topic = batch[wave[slot]].topic.as_str();
                    verdicts[slot] = Some(match answer {
                        Ok(Confirmation::Ack(None)) => PublishOutcome::Delivered.into(),
                        Ok(Confirmation::Ack(Some(_))) => PublishOutcome::unavailable(format!(
                            "no queue is bound to topic {topic} on exchange {}: kept in the \
                             outbox until a consumer group declares its queue",
                            self.config.exchange
                        ))
                        .into(),
                        Ok(Confirmation::Nack(_)) => {
                            Verdict::Unclassified("RabbitMQ refused the message (nack)".into())
                        }
                        Ok(Confirmation::NotRequested) => {
                            broken = true;
                            PublishOutcome::unavailable("the channel lost confirm mode").into()
                        }
                        Err(e) => {
                            broken = true;
                            classify(&e)
                        }
                    });
                }
            }
            Err(_) => {
                broken = true;
                for slot in slots {
                    verdicts[slot] = Some(
                        PublishOutcome::unavailable(format!(
                            "RabbitMQ did not confirm within {:?}",
                            self.config.confirm_timeout
                        ))
                        .into(),
                    );
                }
            }
        }
        if broken {
            self.reset().await;
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| PublishOutcome::unavailable("no confirm").into()))
            .collect()
    }
}

/// The message's AMQP properties; an error for a header AMQP cannot carry (a name longer
/// than 255 bytes), which no retry can fix.
pub(crate) fn properties_of(m: &OutboxMessage) -> Result<BasicProperties, String> {
    let mut headers = FieldTable::default();
    let mut put = |name: &str, value: &str| -> Result<(), String> {
        let name = ShortString::try_new(name)
            .map_err(|_| format!("header name {name:?} is longer than AMQP's 255 bytes"))?;
        headers.insert(name, AMQPValue::LongString(LongString::from(value)));
        Ok(())
    };
    for (k, v) in &m.headers {
        put(k, v)?;
    }
    let event_id = m.event_id.to_string();
    if !m.headers.contains_key("event_id") {
        put("event_id", &event_id)?;
    }
    if !m.headers.contains_key("event_type") {
        put("event_type", &m.event_type)?;
    }
    put(KEY_HEADER, &m.key)?;
    Ok(BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(event_id.into())
        .with_headers(headers))
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let channel = match self.channel().await {
            Ok(c) => c,
            Err(e) => return vec![PublishOutcome::unavailable(e.to_string()); batch.len()],
        };
        publish_in_waves(batch, |wave| self.send_wave(&channel, batch, wave)).await
    }

    async fn probe(&self) -> Result<(), String> {
        // A fresh declaration of the exchange: a round trip through the broker.
        let channel = self.channel().await.map_err(|e| e.to_string())?;
        let answer = declare_exchange(&channel, &self.config).await;
        if answer.is_err() {
            self.reset().await;
        }
        answer.map_err(|e| e.to_string())
    }
}
