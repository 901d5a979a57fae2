//! Kafka client settings: a few named ones plus any librdkafka property passed through, so
//! TLS and SASL work by configuration alone.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;

/// An invalid Kafka setting; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{key} = {value:?} is invalid: {reason}")]
pub struct KafkaConfigError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

/// How to reach the cluster.
///
/// | environment | default | meaning |
/// |---|---|---|
/// | `KAFKA_BOOTSTRAP_SERVERS` | `127.0.0.1:9092` | comma-separated `host:port` list |
/// | `KAFKA_CLIENT_ID` | `outbox` | client id shown in broker logs |
/// | `KAFKA_DELIVERY_TIMEOUT` | `15s` | how long a message may wait for its acknowledgement before the broker counts as unavailable |
/// | `KAFKA_PROPERTY_<NAME>` | none | any librdkafka property; `<NAME>` upper-case with `_` for `.`, e.g. `KAFKA_PROPERTY_SECURITY_PROTOCOL=SASL_SSL`, `KAFKA_PROPERTY_SASL_MECHANISMS=SCRAM-SHA-512`, `KAFKA_PROPERTY_SASL_USERNAME`, `KAFKA_PROPERTY_SASL_PASSWORD`, `KAFKA_PROPERTY_SSL_CA_LOCATION` |
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub client_id: String,
    pub delivery_timeout: Duration,
    /// librdkafka properties, applied last (they win over the settings above).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            client_id: "outbox".into(),
            delivery_timeout: Duration::from_secs(15),
            properties: BTreeMap::new(),
        }
    }
}

/// librdkafka properties the outbox's guarantees rest on, with the values they must keep:
/// `acks=1` acknowledges a message the leader may lose on failover (after the relay deleted
/// its row), and without idempotence a retried send can duplicate or reorder a key's messages.
const GUARANTEED: &[(&str, &[&str], &str)] = &[
    ("acks", &["all", "-1"], "all"),
    ("request.required.acks", &["all", "-1"], "all"),
    ("enable.idempotence", &["true"], "true"),
];

/// Property names whose values are secrets: never logged or printed.
fn is_secret(name: &str) -> bool {
    name.contains("password") || name.contains("secret") || name.ends_with(".key.pem")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret(k) { "***" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("client_id", &self.client_id)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("properties", &props)
            .finish()
    }
}

impl KafkaConfig {
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            ..Self::default()
        }
    }

    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }

    /// Refuses properties that would weaken what the publisher guarantees (see `GUARANTEED`).
    pub fn check_guarantees(&self) -> Result<(), KafkaConfigError> {
        for (name, allowed, needed) in GUARANTEED {
            if let Some(value) = self.properties.get(*name) {
                if !allowed.contains(&value.trim().to_ascii_lowercase().as_str()) {
                    return Err(KafkaConfigError {
                        key: format!("KAFKA_PROPERTY_{}", name.to_ascii_uppercase().replace('.', "_")),
                        value: value.clone(),
                        reason: format!(
                            "the outbox publishes with {name}={needed}: anything else can lose or reorder acknowledged events; remove the setting"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// From the process environment (see the table above).
    pub fn from_env() -> Result<Self, KafkaConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// From `(name, value)` pairs shaped like the environment.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, KafkaConfigError> {
        let mut c = Self::default();
        for (k, v) in vars {
            match k.as_str() {
                "KAFKA_BOOTSTRAP_SERVERS" => {
                    if v.trim().is_empty() || v.split(',').any(|s| !s.trim().contains(':')) {
                        return Err(KafkaConfigError {
                            key: k,
                            value: v,
                            reason: "expected host:port[,host:port...]".into(),
                        });
                    }
                    c.bootstrap_servers = v;
                }
                "KAFKA_CLIENT_ID" => c.client_id = v,
                "KAFKA_DELIVERY_TIMEOUT" => {
                    c.delivery_timeout = humantime::parse_duration(v.trim())
                        .ok()
                        .filter(|d| *d >= Duration::from_secs(1))
                        .ok_or_else(|| KafkaConfigError {
                            key: k.clone(),
                            value: v.clone(),
                            reason: "expected a duration of at least 1s, like 15s or 2m".into(),
                        })?;
                }
                _ => {
                    if let Some(name) = k.strip_prefix("KAFKA_PROPERTY_") {
                        if name.is_empty() {
                            return Err(KafkaConfigError {
                                key: k,
                                value: v,
                                reason: "name the librdkafka property after the prefix".into(),
                            });
                        }
                        c.properties
                            .insert(name.to_ascii_lowercase().replace('_', "."), v);
                    }
                }
            }
        }
        c.check_guarantees()?;
        Ok(c)
    }

    /// The librdkafka configuration for a client of this cluster.
    pub fn client_config(&self) -> ClientConfig {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id);
        for (k, v) in &self.properties {
            cc.set(k, v);
        }
        cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn properties_pass_through_and_secrets_stay_hidden() {
        let c = KafkaConfig::from_vars(vars(&[
            ("KAFKA_BOOTSTRAP_SERVERS", "b1:9093,b2:9093"),
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA_PROPERTY_SASL_MECHANISMS", "SCRAM-SHA-512"),
            ("KAFKA_PROPERTY_SASL_PASSWORD", "hunter2"),
            ("KAFKA_DELIVERY_TIMEOUT", "30s"),
            ("UNRELATED", "x"),
        ]))
        .unwrap();
        assert_eq!(c.bootstrap_servers, "b1:9093,b2:9093");
        assert_eq!(c.properties["security.protocol"], "SASL_SSL");
        assert_eq!(c.properties["sasl.mechanisms"], "SCRAM-SHA-512");
        assert_eq!(c.delivery_timeout, Duration::from_secs(30));
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(
            c.client_config().get("sasl.password"),
            Some("hunter2"),
            "the secret still reaches librdkafka"
        );
    }

    #[test]
    fn settings_that_would_lose_acknowledged_events_are_refused() {
        for (key, value) in [
            ("KAFKA_PROPERTY_ACKS", "1"),
            ("KAFKA_PROPERTY_ACKS", "0"),
            ("KAFKA_PROPERTY_REQUEST_REQUIRED_ACKS", "1"),
            ("KAFKA_PROPERTY_ENABLE_IDEMPOTENCE", "false"),
        ] {
            let e = KafkaConfig::from_vars(vars(&[(key, value)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains("remove the setting"), "{e}");
        }
        // The values the publisher uses anyway are accepted.
        let c = KafkaConfig::from_vars(vars(&[
            ("KAFKA_PROPERTY_ACKS", "all"),
            ("KAFKA_PROPERTY_ENABLE_IDEMPOTENCE", "true"),
        ]))
        .unwrap();
        assert!(c.check_guarantees().is_ok());
        // Set in code rather than the environment: refused when the publisher is built.
        let c = KafkaConfig::new("127.0.0.1:9").with_property("acks", "1");
        assert!(c.check_guarantees().is_err());
    }

    #[test]
    fn invalid_values_name_their_variable() {
        let e = KafkaConfig::from_vars(vars(&[("KAFKA_BOOTSTRAP_SERVERS", "nohostport")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KAFKA_BOOTSTRAP_SERVERS"), "{e}");
        let e = KafkaConfig::from_vars(vars(&[("KAFKA_DELIVERY_TIMEOUT", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("KAFKA_DELIVERY_TIMEOUT"), "{e}");
    }
}
