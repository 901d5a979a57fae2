//! Where a topic's messages go: one durable topic exchange, routing key = topic, and one
//! durable queue per consumer group and topic.
//!
//! RabbitMQ keeps a message only in the queues bound when it arrives; a topic with no group's
//! queue yet would drop it. The publisher therefore publishes `mandatory`: a message no queue
//! takes comes back and stays pending in the outbox (the relay defers its aggregate, no attempt
//! counted) until some group declares its queue, by starting its consumer or by
//! [`declare_group`] at deploy time.
//!
//! A group's queue is `<group>.<topic>` with `x-single-active-consumer`: all members of the
//! group attach to it, the broker delivers to one at a time and fails over to the next when
//! it goes away, so one aggregate's messages are never handled by two members at once nor out
//! of order. Parked messages go to `<topic>.DLQ` (routing key and queue), shared by groups;
//! the `dlq_consumer_group` header tells them apart.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};
use outbox_core::consume::dead_letter_topic;

use crate::{RabbitConfig, RabbitError};

/// The header that carries the message key (AMQP messages have none of their own).
pub const KEY_HEADER: &str = "Outbox-Key";

/// The queue of `group` for `topic`.
pub fn group_queue(group: &str, topic: &str) -> String {
    format!("{group}.{topic}")
}

/// Declares the outbox's exchange (idempotent).
pub async fn declare_exchange(channel: &Channel, config: &RabbitConfig) -> Result<(), RabbitError> {
    config
        .within(
            "declaring the exchange",
            channel.exchange_declare(
                config.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await
}

fn queue_arguments(single_active: bool, expires: Option<Duration>) -> FieldTable {
    let mut args = FieldTable::default();
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    if let Some(e) = expires {
        let ms = i64::try_from(e.as_millis()).unwrap_or(i64::MAX).max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

async fn declare_bound(
    channel: &Channel,
    config: &RabbitConfig,
    queue: &str,
    routing_key: &str,
    args: FieldTable,
) -> Result<(), RabbitError> {
    config
        .within(
            &format!("declaring queue {queue}"),
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            ),
        )
        .await?;
    config
        .within(
            &format!("binding queue {queue}"),
            channel.queue_bind(
                queue.into(),
                config.exchange.as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
}

/// Declares the exchange, `group`'s queue for each of `topics` and their dead-letter queues
/// (idempotent): from then on nothing published to those topics is dropped for this group.
pub async fn declare_group(
    channel: &Channel,
    config: &RabbitConfig,
    group: &str,
    topics: &[String],
) -> Result<(), RabbitError> {
    declare_exchange(channel, config).await?;
    for topic in topics {
        let args = queue_arguments(true, config.queue_expires);
        declare_bound(channel, config, &group_queue(group, topic), topic, args).await?;
        let dlq = dead_letter_topic(topic);
        let args = queue_arguments(false, config.queue_expires);
        declare_bound(channel, config, &dlq, &dlq, args).await?;
    }
    Ok(())
}

/// What the broker holds in `queue` (ready messages, consumers), read passively: nothing is
/// created; `None` when the queue does not exist.
pub async fn queue_state(
    connection: &Connection,
    config: &RabbitConfig,
    queue: &str,
) -> Result<Option<lapin::Queue>, RabbitError> {
    // A passive declare of a missing queue closes its channel: a channel per queue.
    let channel = config
        .within("opening a channel", connection.create_channel())
        .await?;
    let state = config
        .within(&format!("checking queue {queue}"), async {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await
            {
                Ok(q) => Ok(Some(q)),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await?;
    if state.is_some() {
        let _ = config
            .within("closing a channel", channel.close(200, "checked".into()))
            .await;
    }
    Ok(state)
}

/// The queues of `group` for `topics` that do not exist ([`queue_state`]). A consumer that
/// was attached before checks this when it connects again: a queue missing then was deleted,
/// expired or lost by the broker, and what it held, and what was published while it was
/// missing, never reaches the group.
pub async fn missing_group_queues(
    connection: &Connection,
    config: &RabbitConfig,
    group: &str,
    topics: &[String],
) -> Result<Vec<String>, RabbitError> {
    let mut missing = Vec::new();
    for topic in topics {
        let queue = group_queue(group, topic);
        if queue_state(connection, config, &queue).await?.is_none() {
            missing.push(queue);
        }
    }
    Ok(missing)
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_queue_is_single_active_and_may_expire() {
        assert_eq!(group_queue("svc", "a.b.v1"), "svc.a.b.v1");
        let args = queue_arguments(true, Some(Duration::from_secs(60)));
        assert_eq!(
            args.inner().get("x-single-active-consumer"),
            Some(&AMQPValue::Boolean(true))
        );
        assert_eq!(
            args.inner().get("x-expires"),
            Some(&AMQPValue::LongLongInt(60_000))
        );
        assert!(queue_arguments(false, None).inner().is_empty());
    }
}
