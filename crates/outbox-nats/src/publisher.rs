//! [`NatsPublisher`]: the relay's publisher on JetStream.

use std::collections::HashMap;
use std::future::IntoFuture;

use async_nats::header::{HeaderMap, HeaderName, NATS_MESSAGE_ID};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{self};
use async_trait::async_trait;
use outbox_core::publisher::waves::{publish_in_waves, Verdict};
use outbox_core::{OutboxMessage, PublishOutcome, Publisher};

use crate::classify::classify;
use crate::streams::{Streams, KEY_HEADER};
use crate::{NatsConfig, NatsError};

/// Publishes outbox messages to JetStream: the stored payload, the stored headers plus
/// `event_id` and `event_type` (added when absent), the key in `Outbox-Key`, and
/// `Nats-Msg-Id` = event id, always (a stored `Nats-Msg-Id`, copied from an incoming message,
/// would make the stream drop this event as that one's duplicate).
pub struct NatsPublisher {
    config: NatsConfig,
    connection: tokio::sync::OnceCell<Connection>,
    streams: Streams,
}

struct Connection {
    client: async_nats::Client,
    js: jetstream::Context,
}

impl NatsPublisher {
    /// Checks the configuration; connects at the first publish or probe.
    pub fn new(config: NatsConfig) -> Result<Self, NatsError> {
        config.validate()?;
        Ok(Self {
            config,
            connection: tokio::sync::OnceCell::new(),
            streams: Streams::default(),
        })
    }

    /// Connects now (in the background if the server is down: see [`NatsConfig::connect`]).
    pub async fn connect(config: NatsConfig) -> Result<Self, NatsError> {
        let publisher = Self::new(config)?;
        publisher.connection().await?;
        Ok(publisher)
    }

    async fn connection(&self) -> Result<&Connection, NatsError> {
        self.connection
            .get_or_try_init(|| async {
                let client = self.config.connect("outbox-relay").await?;
                let js = self.config.jetstream(client.clone());
                Ok(Connection { client, js })
            })
            .await
    }

    /// Makes sure every topic of `batch` has a stream; the topics that have none, with why.
    async fn ensure_streams(
        &self,
        js: &jetstream::Context,
        batch: &[OutboxMessage],
    ) -> HashMap<String, String> {
        let mut failed = HashMap::new();
        for m in batch {
            let topic = m.topic.as_str();
            if self.streams.known(topic) || failed.contains_key(topic) {
                continue;
            }
            if let Err(e) = self.streams.ensure(js, &self.config, topic).await {
                failed.insert(topic.to_owned(), e);
            }
        }
        failed
    }

    async fn send_wave(
        &self,
        js: &jetstream::Context,
        batch: &[OutboxMessage],
        wave: Vec<usize>,
        no_stream: &HashMap<String, String>,
    ) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; wave.len()];
        let mut acks = Vec::with_capacity(wave.len());
        for (slot, &i) in wave.iter().enumerate() {
            let m = &batch[i];
            if let Some(why) = no_stream.get(m.topic.as_str()) {
                verdicts[slot] = Some(PublishOutcome::unavailable(why.clone()).into());
                continue;
            }
            let headers = match headers_of(m) {
                Ok(h) => h,
                Err(why) => {
                    verdicts[slot] = Some(PublishOutcome::Refused { reason: why }.into());
                    continue;
                }
            };
            let publish = Publish::build().payload(m.payload.clone()).headers(headers);
            match js.send_publish(m.topic.as_str().to_owned(), publish).await {
                Ok(ack) => acks.push((slot, ack)),
                Err(e) => verdicts[slot] = Some(classify(&e)),
            }
        }
        let (slots, pending): (Vec<usize>, Vec<_>) = acks.into_iter().unzip();
        for (slot, ack) in slots
            .into_iter()
            .zip(futures::future::join_all(pending.into_iter().map(|a| a.into_future())).await)
        {
            verdicts[slot] = Some(match ack {
                Ok(_) => PublishOutcome::Delivered.into(),
                Err(e) => {
                    if e.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound
                    {
                        self.streams.forget(batch[wave[slot]].topic.as_str());
                    }
                    classify(&e)
                }
            });
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| PublishOutcome::unavailable("no acknowledgement").into()))
            .collect()
    }
}

/// The message's NATS headers; an error for a header NATS cannot carry unchanged (a name with
/// `:` or control characters, a line break in a value), which no retry can fix.
pub(crate) fn headers_of(m: &OutboxMessage) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let mut put = |name: &str, value: &str| -> Result<(), String> {
        let header: HeaderName = name
            .parse()
            .map_err(|_| format!("header name {name:?} cannot be sent over NATS"))?;
        if value.contains(['\r', '\n']) {
            return Err(format!(
                "header {name:?} holds a line break, which NATS cannot carry"
            ));
        }
        headers.insert(header, value);
        Ok(())
    };
    for (k, v) in &m.headers {
        put(k, v)?;
    }
    if !m.headers.contains_key("event_id") {
        put("event_id", &m.event_id.to_string())?;
    }
    if !m.headers.contains_key("event_type") {
        put("event_type", &m.event_type)?;
    }
    put(KEY_HEADER, &m.key)?;
    headers.insert(NATS_MESSAGE_ID, m.event_id.to_string().as_str());
    Ok(headers)
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let js = match self.connection().await {
            Ok(c) => &c.js,
            Err(e) => {
                return vec![PublishOutcome::unavailable(e.to_string()); batch.len()];
            }
        };
        let no_stream = self.ensure_streams(js, batch).await;
        publish_in_waves(batch, |wave| self.send_wave(js, batch, wave, &no_stream)).await
    }

    async fn probe(&self) -> Result<(), String> {
        // The JetStream API's account info: a round trip that needs JetStream itself up.
        // (Its answer is not parsed: its fields vary between server versions.)
        let client = &self.connection().await.map_err(|e| e.to_string())?.client;
        let ask = client.request("$JS.API.INFO", bytes::Bytes::new());
        match tokio::time::timeout(self.config.ack_timeout, ask).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("JetStream API request failed: {e}")),
            Err(_) => Err(format!(
                "JetStream API did not answer within {:?}",
                self.config.ack_timeout
            )),
        }
    }
}
