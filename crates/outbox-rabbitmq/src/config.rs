//! [`RabbitConfig`]: where the broker is, the exchange the outbox uses, and its limits.

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::RabbitError;

/// A configuration the outbox cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum RabbitConfigError {
    #[error("AMQP URL {0:?} is not usable: give amqp://user:password@host:port/vhost (amqps:// needs a TLS build this crate does not include)")]
    Url(String),
    #[error("exchange name {0:?} is invalid: use 1 to 127 characters from [A-Za-z0-9._:-], not starting with amq.")]
    Exchange(String),
    #[error("{0} must be more than zero")]
    Zero(&'static str),
}

/// Settings shared by the publisher and the consumer runner.
#[derive(Clone, Debug)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:port/vhost` (vhost `%2f` for `/`).
    pub url: String,
    /// The durable topic exchange every topic is published to (routing key = topic).
    pub exchange: String,
    /// How long a publish waits for the broker's confirm (and a connection or declaration for
    /// its answer) before the message counts as not delivered: an outage, not a failure.
    pub confirm_timeout: Duration,
    /// Messages larger than this are refused before sending (a failure of the message). Set it
    /// to the broker's `max_message_size`: a larger one makes the broker close the channel.
    pub max_message_size: usize,
    /// Messages a consumer holds unacknowledged (it handles them one at a time, in order).
    pub prefetch: u16,
    /// A consumer group's queues are deleted after this long without consumers (`x-expires`);
    /// `None`: kept until deleted (the default: a group's queue keeps its backlog).
    pub queue_expires: Option<Duration>,
}

impl RabbitConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: "outbox".into(),
            confirm_timeout: Duration::from_secs(5),
            max_message_size: 16 * 1024 * 1024,
            prefetch: 32,
            queue_expires: None,
        }
    }

    pub fn validate(&self) -> Result<(), RabbitConfigError> {
        let rest = self.url.strip_prefix("amqp://");
        if !rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace)) {
            return Err(RabbitConfigError::Url(self.url.clone()));
        }
        if self.url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(RabbitConfigError::Url(self.url.clone()));
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || "._:-".contains(c);
        if self.exchange.is_empty()
            || self.exchange.len() > 127
            || !self.exchange.chars().all(valid)
            || self.exchange.starts_with("amq.")
        {
            return Err(RabbitConfigError::Exchange(self.exchange.clone()));
        }
        if self.confirm_timeout.is_zero() {
            return Err(RabbitConfigError::Zero("confirm_timeout"));
        }
        if self.max_message_size == 0 {
            return Err(RabbitConfigError::Zero("max_message_size"));
        }
        if self.prefetch == 0 {
            return Err(RabbitConfigError::Zero("prefetch"));
        }
        Ok(())
    }

    /// Connects within `confirm_timeout`.
    pub async fn connect(&self, name: &str) -> Result<Connection, RabbitError> {
        self.validate()?;
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        match tokio::time::timeout(
            self.confirm_timeout,
            Connection::connect(&self.url, properties),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(RabbitError::Unavailable(format!("connecting: {e}"))),
            Err(_) => Err(RabbitError::Unavailable(format!(
                "connecting: no answer within {:?}",
                self.confirm_timeout
            ))),
        }
    }

    /// Runs an AMQP operation within `confirm_timeout`, any failure as an outage.
    pub(crate) async fn within<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = lapin::Result<T>>,
    ) -> Result<T, RabbitError> {
        match tokio::time::timeout(self.confirm_timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(RabbitError::Unavailable(format!("{what}: {e}"))),
            Err(_) => Err(RabbitError::Unavailable(format!(
                "{what}: no answer within {:?}",
                self.confirm_timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_exchanges_and_limits_are_checked() {
        assert!(RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f")
            .validate()
            .is_ok());
        for bad in ["127.0.0.1:5672", "amqps://h:1", "amqp://", "nats://h:1"] {
            let e = RabbitConfig::new(bad).validate().unwrap_err().to_string();
            assert!(e.contains("amqp://user:password@host"), "{bad}: {e}");
        }
        for bad in ["", "amq.topic", "has space", "a/b"] {
            let mut c = RabbitConfig::new("amqp://h:1/%2f");
            c.exchange = bad.into();
            assert!(c.validate().unwrap_err().to_string().contains("exchange"));
        }
        let mut c = RabbitConfig::new("amqp://h:1/%2f");
        c.prefetch = 0;
        assert!(c.validate().unwrap_err().to_string().contains("prefetch"));
    }
}
