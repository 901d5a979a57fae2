//! [`NatsConfig`]: where the server is and how long to wait for it.

use std::time::Duration;

/// A configuration the outbox cannot work with.
#[derive(Debug, thiserror::Error)]
pub enum NatsConfigError {
    #[error("NATS URL {0:?} is not usable: give nats://host:port (several separated by commas; tls:// for TLS)")]
    Url(String),
    #[error("{0} must be more than zero")]
    Zero(&'static str),
}

/// Connection and JetStream settings shared by the publisher and the consumer runner.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// `nats://host:port`, several separated by commas.
    pub url: String,
    /// How long a publish waits for JetStream's acknowledgement (and an API request for its
    /// answer) before the message counts as not delivered: an outage, not a failure.
    pub ack_timeout: Duration,
    /// The deduplication window of the streams the outbox creates: a re-send of an event
    /// within it (`Nats-Msg-Id` = event id) is stored once. Consumers' inboxes catch the rest.
    pub duplicate_window: Duration,
    /// Replicas of the streams the outbox creates (1 on a single server).
    pub replicas: usize,
    /// How long a consumer's message may stay unacknowledged before the server offers it
    /// again. The runner reports progress while its handler works, so only a dead member's
    /// message waits this long.
    pub ack_wait: Duration,
}

impl NatsConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ack_timeout: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            ack_wait: Duration::from_secs(30),
        }
    }

    /// Checks the URL and the durations.
    pub fn validate(&self) -> Result<(), NatsConfigError> {
        let usable = |u: &str| {
            let rest = u
                .strip_prefix("nats://")
                .or_else(|| u.strip_prefix("tls://"));
            rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace))
        };
        if self.url.split(',').any(|u| !usable(u.trim())) {
            return Err(NatsConfigError::Url(self.url.clone()));
        }
        if self.ack_timeout.is_zero() {
            return Err(NatsConfigError::Zero("ack_timeout"));
        }
        if self.ack_wait.is_zero() {
            return Err(NatsConfigError::Zero("ack_wait"));
        }
        if self.replicas == 0 {
            return Err(NatsConfigError::Zero("replicas"));
        }
        Ok(())
    }

    /// Connects; a server that is down now is retried in the background (the publisher's
    /// messages meanwhile count as an outage), so a relay can start before its broker.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, crate::NatsError> {
        self.validate()?;
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .request_timeout(Some(self.ack_timeout))
            .connection_timeout(self.ack_timeout)
            .connect(self.url.as_str())
            .await
            .map_err(|e| crate::NatsError::Connect(e.to_string()))?;
        Ok(client)
    }

    pub(crate) fn jetstream(&self, client: async_nats::Client) -> async_nats::jetstream::Context {
        let mut js = async_nats::jetstream::new(client);
        js.set_timeout(self.ack_timeout);
        js
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_durations_are_checked() {
        assert!(NatsConfig::new("nats://127.0.0.1:4222").validate().is_ok());
        assert!(NatsConfig::new("nats://a:1, nats://b:2").validate().is_ok());
        for bad in ["127.0.0.1:4222", "nats://", "http://x:1", "nats://a:1,"] {
            let e = NatsConfig::new(bad).validate().unwrap_err().to_string();
            assert!(e.contains("nats://host:port"), "{bad}: {e}");
        }
        let mut c = NatsConfig::new("nats://a:1");
        c.ack_wait = Duration::ZERO;
        assert!(c.validate().unwrap_err().to_string().contains("ack_wait"));
    }
}
