//! Configuration with documented defaults, from environment variables and/or a TOML file.
//!
//! Every setting has a file key and an environment variable; the environment wins over the
//! file, the file over the default. Durations are written like `50ms`, `1s`, `5m`.
//!
//! | file key | environment | default | meaning |
//! |---|---|---|---|
//! | `database_url` | `DATABASE_URL` | none | `postgres://...` (or `sqlite://...` where supported) |
//! | `schema` | `OUTBOX_SCHEMA` | `public` | schema holding `event_outbox` (PostgreSQL) |
//! | `broker` | `OUTBOX_BROKER` | `memory` | `memory` (the in-process bus), a Kafka bootstrap list `host:port[,host:port]`, a NATS JetStream URL `nats://host:port` or a RabbitMQ URL `amqp://user:password@host:port/vhost` |
//! | `service` | `OUTBOX_SERVICE` | `outbox` | service name: metrics label and relay name |
//! | `instance` | `OUTBOX_INSTANCE` | none | a stable name for this relay process, unique among the live relays of the table (a pod or host name): a relay restarted under the same name takes its predecessor's partitions at once instead of after the lease |
//! | `wake` | `OUTBOX_WAKE` | `watch` | how a relay in its own process (`outbox relay`) learns of commits besides polling: `watch` (reads the outbox sequence, or SQLite's `data_version`, every `wake_interval`; writers do nothing), `notify` (LISTEN; writers must enqueue with NOTIFY, which costs them throughput), `poll` (polling alone) |
//! | `wake_interval` | `OUTBOX_WAKE_INTERVAL` | `10ms` | how often `watch` looks |
//! | `metrics_addr` | `OUTBOX_METRICS_ADDR` | `127.0.0.1:9464` | where `/metrics` is served |
//! | `batch_size` | `OUTBOX_BATCH_SIZE` | `2000` | events claimed and published per round |
//! | `pipeline` | `OUTBOX_PIPELINE` | `true` | claim the next batch and settle the previous one while a batch is published |
//! | `poll_min` | `OUTBOX_POLL_MIN` | `50ms` | first poll interval after the outbox ran empty |
//! | `poll_max` | `OUTBOX_POLL_MAX` | `1s` | longest poll interval (it doubles while idle) |
//! | `lease` | `OUTBOX_LEASE` | `30s` | partition lease; a crashed relay's work moves after it |
//! | `retry_base` | `OUTBOX_RETRY_BASE` | `1s` | delay after the first rejected attempt |
//! | `retry_cap` | `OUTBOX_RETRY_CAP` | `5m` | longest delay between attempts |
//! | `max_attempts` | `OUTBOX_MAX_ATTEMPTS` | `5` | attempts before an event is dead |
//! | `outage_backoff_min` | `OUTBOX_OUTAGE_BACKOFF_MIN` | `100ms` | first probe delay in an outage |
//! | `outage_backoff_max` | `OUTBOX_OUTAGE_BACKOFF_MAX` | `2s` | longest probe delay in an outage (a probe is one cheap request, see `Publisher::probe`) |
//! | `defer_min` | `OUTBOX_DEFER_MIN` | `1s` | first wait of an aggregate whose event the broker could not take while it took others (one partition unavailable); no attempt is counted |
//! | `defer_max` | `OUTBOX_DEFER_MAX` | `1m` | longest such wait (it doubles while the partition stays unavailable) |
//! | `retention` | `OUTBOX_RETENTION` | `0s` | keep published events this long (`0s`: delete at once) |
//! | `retention_sweep_interval` | `OUTBOX_RETENTION_SWEEP_INTERVAL` | `1m` | how often old published rows are deleted |
//! | `retention_sweep_batch` | `OUTBOX_RETENTION_SWEEP_BATCH` | `1000` | rows deleted per statement |
//! | `stats_interval` | `OUTBOX_STATS_INTERVAL` | `5s` | how often the relay refreshes table gauges |
//! | `write_mode` | `OUTBOX_WRITE_MODE` | `table` | `table` (a row per event) or `stream` (PostgreSQL: a transactional logical message per enqueue, published from a replication slot; needs `wal_level = logical`) |
//! | `stream_slot` | `OUTBOX_STREAM_SLOT` | `outbox_<schema>` | the replication slot (and publication) of the stream mode |
//! | `stream_heartbeat` | `OUTBOX_STREAM_HEARTBEAT` | `10s` | with no event for this long the stream relay emits a heartbeat, so an idle outbox never holds WAL |
//! | `stream_max_retained_wal` | `OUTBOX_STREAM_MAX_RETAINED_WAL` | none | WAL the slot may retain before the relay logs errors and `outbox status` flags it (`512MiB`, `8GiB`, or bytes); exported as a gauge for an alert rule |

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::retry::RetryPolicy;

/// A setting that could not be used. The message names the key and what would be valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key} = {value:?} is invalid: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config file {path}: unknown key {key:?}; known keys: {known}")]
    UnknownKey {
        path: String,
        key: String,
        known: String,
    },
    #[error("{key} is not set: {hint}")]
    Missing { key: String, hint: String },
}

/// How the relay behaves. See the module docs for each setting's meaning and default.
#[derive(Clone, Debug, PartialEq)]
pub struct RelayConfig {
    pub service: String,
    /// A stable name for this relay process (see the module docs); `None`: a crashed relay's
    /// partitions move after its lease expires.
    pub instance: Option<String>,
    pub batch_size: usize,
    /// Overlap the database work of neighbouring batches with the publish of one (see the
    /// relay's docs); `false` runs claim, publish, settle strictly one after the other.
    pub pipeline: bool,
    pub poll_min: Duration,
    pub poll_max: Duration,
    pub lease: Duration,
    pub retry: RetryPolicy,
    pub outage_backoff_min: Duration,
    pub outage_backoff_max: Duration,
    /// How long an aggregate waits when its event was unavailable while the broker took
    /// others (a partition without a leader): from `defer_min`, doubling to `defer_max`.
    pub defer_min: Duration,
    pub defer_max: Duration,
    pub retention: Duration,
    pub retention_sweep_interval: Duration,
    pub retention_sweep_batch: usize,
    pub stats_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            service: "outbox".into(),
            instance: None,
            batch_size: 2000,
            pipeline: true,
            poll_min: Duration::from_millis(50),
            poll_max: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            outage_backoff_min: Duration::from_millis(100),
            outage_backoff_max: Duration::from_secs(2),
            defer_min: Duration::from_secs(1),
            defer_max: Duration::from_secs(60),
            retention: Duration::ZERO,
            retention_sweep_interval: Duration::from_secs(60),
            retention_sweep_batch: 1000,
            stats_interval: Duration::from_secs(5),
        }
    }
}

/// Which transport carries events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerSetting {
    /// The in-process bus (embedded default: one process, no broker).
    Memory,
    /// Kafka, with this bootstrap list.
    Kafka(String),
    /// NATS JetStream, with this URL (`nats://host:port[,nats://host:port]`).
    Nats(String),
    /// RabbitMQ, with this URL (`amqp://user:password@host:port/vhost`).
    RabbitMq(String),
}

/// How a relay in its own process learns that writers committed (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WakeSetting {
    /// Read the outbox's sequence (PostgreSQL) or `data_version` (SQLite) every
    /// `wake_interval`: low latency, nothing asked of writers.
    #[default]
    Watch,
    /// LISTEN for the NOTIFY that writers opted into (`PgOutbox::with_notify`).
    Notify,
    /// Poll alone (`poll_min` doubling to `poll_max` while idle).
    Poll,
}

/// Where `enqueue` writes events (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteModeSetting {
    /// A row in the outbox table.
    #[default]
    Table,
    /// A transactional logical message, published from a replication slot (PostgreSQL).
    Stream,
}

/// The stream write mode's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSettings {
    /// The slot name; `None`: `outbox_<schema>`.
    pub slot: Option<String>,
    pub heartbeat: Duration,
    pub max_retained_wal: Option<u64>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            slot: None,
            heartbeat: Duration::from_secs(10),
            max_retained_wal: None,
        }
    }
}

/// Everything a service or the relay binary reads at start.
#[derive(Clone, PartialEq)]
pub struct Settings {
    pub database_url: Option<String>,
    pub schema: String,
    pub broker: BrokerSetting,
    pub metrics_addr: SocketAddr,
    pub wake: WakeSetting,
    pub wake_interval: Duration,
    pub relay: RelayConfig,
    pub write_mode: WriteModeSetting,
    pub stream: StreamSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: None,
            schema: "public".into(),
            broker: BrokerSetting::Memory,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            wake: WakeSetting::Watch,
            wake_interval: Duration::from_millis(10),
            relay: RelayConfig::default(),
            write_mode: WriteModeSetting::Table,
            stream: StreamSettings::default(),
        }
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("schema", &self.schema)
            .field("broker", &self.broker)
            .field("metrics_addr", &self.metrics_addr)
            .field("wake", &self.wake)
            .field("wake_interval", &self.wake_interval)
            .field("relay", &self.relay)
            .field("write_mode", &self.write_mode)
            .field("stream", &self.stream)
            .finish()
    }
}

/// Replaces the password of a URL (`scheme://user:password@host`) with `***`, for logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// One setting: its file key and environment variable.
struct Key {
    file: &'static str,
    env: &'static str,
}

const KEYS: &[Key] = &[
    key("database_url", "DATABASE_URL"),
    key("schema", "OUTBOX_SCHEMA"),
    key("broker", "OUTBOX_BROKER"),
    key("service", "OUTBOX_SERVICE"),
    key("instance", "OUTBOX_INSTANCE"),
    key("metrics_addr", "OUTBOX_METRICS_ADDR"),
    key("wake", "OUTBOX_WAKE"),
    key("wake_interval", "OUTBOX_WAKE_INTERVAL"),
    key("batch_size", "OUTBOX_BATCH_SIZE"),
    key("pipeline", "OUTBOX_PIPELINE"),
    key("poll_min", "OUTBOX_POLL_MIN"),
    key("poll_max", "OUTBOX_POLL_MAX"),
    key("lease", "OUTBOX_LEASE"),
    key("retry_base", "OUTBOX_RETRY_BASE"),
    key("retry_cap", "OUTBOX_RETRY_CAP"),
    key("max_attempts", "OUTBOX_MAX_ATTEMPTS"),
    key("outage_backoff_min", "OUTBOX_OUTAGE_BACKOFF_MIN"),
    key("outage_backoff_max", "OUTBOX_OUTAGE_BACKOFF_MAX"),
    key("defer_min", "OUTBOX_DEFER_MIN"),
    key("defer_max", "OUTBOX_DEFER_MAX"),
    key("retention", "OUTBOX_RETENTION"),
    key(
        "retention_sweep_interval",
        "OUTBOX_RETENTION_SWEEP_INTERVAL",
    ),
    key("retention_sweep_batch", "OUTBOX_RETENTION_SWEEP_BATCH"),
    key("stats_interval", "OUTBOX_STATS_INTERVAL"),
    key("write_mode", "OUTBOX_WRITE_MODE"),
    key("stream_slot", "OUTBOX_STREAM_SLOT"),
    key("stream_heartbeat", "OUTBOX_STREAM_HEARTBEAT"),
    key("stream_max_retained_wal", "OUTBOX_STREAM_MAX_RETAINED_WAL"),
];

const fn key(file: &'static str, env: &'static str) -> Key {
    Key { file, env }
}

/// A raw value and the name to blame when it is wrong.
struct Raw {
    value: String,
    origin: String,
}

impl Settings {
    /// Defaults, overridden by environment variables.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::load(None::<&Path>, |k| std::env::var(k).ok())
    }

    /// Defaults, overridden by the TOML file (if given), overridden by the environment as
    /// read by `env` (pass `|k| std::env::var(k).ok()` for the process environment).
    pub fn load(
        file: Option<impl AsRef<Path>>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw: BTreeMap<&'static str, Raw> = BTreeMap::new();
        if let Some(path) = file {
            let path = path.as_ref();
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.display().to_string(),
                source,
            })?;
            for (k, v) in parse_file(&text, &path.display().to_string())? {
                raw.insert(k, v);
            }
        }
        for k in KEYS {
            if let Some(value) = env(k.env) {
                raw.insert(
                    k.file,
                    Raw {
                        value,
                        origin: k.env.to_owned(),
                    },
                );
            }
        }
        Self::from_raw(raw)
    }

    /// Parses settings from TOML text (as a config file would hold them).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_raw(parse_file(text, "<inline>")?.into_iter().collect())
    }

    /// The database URL, or an error that says how to provide one.
    pub fn require_database_url(&self) -> Result<&str, ConfigError> {
        self.database_url.as_deref().ok_or_else(|| ConfigError::Missing {
            key: "DATABASE_URL".into(),
            hint: "set it (e.g. postgres://user@127.0.0.1:5432/db) or `database_url` in the config file".into(),
        })
    }

    fn from_raw(mut raw: BTreeMap<&'static str, Raw>) -> Result<Self, ConfigError> {
        let mut s = Settings::default();
        let r = &mut s.relay;
        let mut take = |k: &str| raw.remove(k);
        if let Some(v) = take("database_url") {
            s.database_url = Some(v.value);
        }
        if let Some(v) = take("schema") {
            s.schema = parse_identifier(&v)?;
        }
        if let Some(v) = take("broker") {
            s.broker = parse_with(
                &v,
                "`memory`, a Kafka bootstrap list host:port[,host:port], a NATS URL nats://host:port or an AMQP URL amqp://user:password@host:port/vhost",
                |x| {
                    if x == "memory" {
                        Some(BrokerSetting::Memory)
                    } else if x.starts_with("nats://") || x.starts_with("tls://") {
                        Some(BrokerSetting::Nats(x.to_owned()))
                    } else if x.starts_with("amqp://") || x.starts_with("amqps://") {
                        Some(BrokerSetting::RabbitMq(x.to_owned()))
                    } else if x.split(',').all(|b| {
                        b.trim()
                            .rsplit_once(':')
                            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    }) {
                        Some(BrokerSetting::Kafka(x.to_owned()))
                    } else {
                        None
                    }
                },
            )?;
        }
        if let Some(v) = take("service") {
            r.service = parse_label(&v)?;
        }
        if let Some(v) = take("instance") {
            r.instance = Some(parse_label(&v)?);
        }
        if let Some(v) = take("metrics_addr") {
            s.metrics_addr = parse_with(&v, "an address like 127.0.0.1:9464", |x| x.parse().ok())?;
        }
        if let Some(v) = take("wake") {
            s.wake = parse_with(&v, "watch, notify or poll", |x| match x {
                "watch" => Some(WakeSetting::Watch),
                "notify" => Some(WakeSetting::Notify),
                "poll" => Some(WakeSetting::Poll),
                _ => None,
            })?;
        }
        if let Some(v) = take("wake_interval") {
            s.wake_interval = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("batch_size") {
            r.batch_size = parse_count(&v, 1, 10_000)?;
        }
        if let Some(v) = take("pipeline") {
            r.pipeline = parse_with(&v, "true or false", |x| match x {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            })?;
        }
        if let Some(v) = take("poll_min") {
            r.poll_min = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("poll_max") {
            r.poll_max = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("lease") {
            r.lease = parse_duration(&v, Duration::from_secs(1))?;
        }
        if let Some(v) = take("retry_base") {
            r.retry.base = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("retry_cap") {
            r.retry.cap = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("max_attempts") {
            r.retry.max_attempts = parse_count(&v, 1, 1000)? as u32;
        }
        if let Some(v) = take("outage_backoff_min") {
            r.outage_backoff_min = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("outage_backoff_max") {
            r.outage_backoff_max = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("defer_min") {
            r.defer_min = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("defer_max") {
            r.defer_max = parse_duration(&v, Duration::from_millis(1))?;
        }
        if let Some(v) = take("retention") {
            r.retention = parse_duration(&v, Duration::ZERO)?;
        }
        if let Some(v) = take("retention_sweep_interval") {
            r.retention_sweep_interval = parse_duration(&v, Duration::from_millis(10))?;
        }
        if let Some(v) = take("retention_sweep_batch") {
            r.retention_sweep_batch = parse_count(&v, 1, 100_000)?;
        }
        if let Some(v) = take("stats_interval") {
            r.stats_interval = parse_duration(&v, Duration::from_millis(10))?;
        }
        if let Some(v) = take("write_mode") {
            s.write_mode = parse_with(&v, "table or stream", |x| match x {
                "table" => Some(WriteModeSetting::Table),
                "stream" => Some(WriteModeSetting::Stream),
                _ => None,
            })?;
        }
        if let Some(v) = take("stream_slot") {
            s.stream.slot = Some(parse_identifier(&v)?);
        }
        if let Some(v) = take("stream_heartbeat") {
            s.stream.heartbeat = parse_duration(&v, Duration::from_millis(10))?;
        }
        if let Some(v) = take("stream_max_retained_wal") {
            s.stream.max_retained_wal = Some(parse_with(
                &v,
                "a size like 512MiB, 8GiB or a number of bytes",
                parse_size,
            )?);
        }
        s.relay.validate()?;
        Ok(s)
    }
}

/// `123`, `64KiB`, `512MiB`, `8GiB` (binary units; `KB`/`MB`/`GB` mean the same here).
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" | "KB" | "kB" => 10,
        "MiB" | "MB" => 20,
        "GiB" | "GB" => 30,
        "TiB" | "TB" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift).filter(|v| *v > 0)
}

impl RelayConfig {
    /// The name a relay registers with its heartbeat: the service, and the instance when
    /// there is one (`service/instance`).
    pub fn relay_name(&self) -> String {
        match &self.instance {
            Some(instance) => format!("{}/{instance}", self.service),
            None => self.service.clone(),
        }
    }

    /// Checks the relations between settings (each one alone was checked when parsed).
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Name both spellings of a key: it may have come from the file or the environment.
        let both = |key: &str| {
            key.split('/')
                .map(|k| format!("{k} (OUTBOX_{})", k.to_uppercase()))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let invalid = |key: &str, value: String, reason: &str| ConfigError::Invalid {
            key: both(key),
            value,
            reason: reason.into(),
        };
        if self.poll_min > self.poll_max {
            return Err(invalid(
                "poll_min",
                fmt_duration(self.poll_min),
                "must not exceed poll_max (OUTBOX_POLL_MAX)",
            ));
        }
        if self.retry.base > self.retry.cap {
            return Err(invalid(
                "retry_base",
                fmt_duration(self.retry.base),
                "must not exceed retry_cap (OUTBOX_RETRY_CAP)",
            ));
        }
        if self.outage_backoff_min > self.outage_backoff_max {
            return Err(invalid(
                "outage_backoff_min",
                fmt_duration(self.outage_backoff_min),
                "must not exceed outage_backoff_max (OUTBOX_OUTAGE_BACKOFF_MAX)",
            ));
        }
        if self.defer_min > self.defer_max {
            return Err(invalid(
                "defer_min",
                fmt_duration(self.defer_min),
                "must not exceed defer_max (OUTBOX_DEFER_MAX)",
            ));
        }
        if self.batch_size == 0 || self.retry.max_attempts == 0 {
            return Err(invalid(
                "batch_size/max_attempts",
                "0".into(),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn parse_file(text: &str, path: &str) -> Result<Vec<(&'static str, Raw)>, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.into(),
        message: e.message().to_owned(),
    })?;
    let mut out = Vec::new();
    for (k, v) in table {
        let Some(known) = KEYS.iter().find(|key| key.file == k) else {
            return Err(ConfigError::UnknownKey {
                path: path.into(),
                key: k,
                known: KEYS.iter().map(|k| k.file).collect::<Vec<_>>().join(", "),
            });
        };
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(ConfigError::Invalid {
                    key: format!("{k} (in {path})"),
                    value: other.to_string(),
                    reason: "expected a string, an integer or a boolean".into(),
                })
            }
        };
        out.push((
            known.file,
            Raw {
                value,
                origin: format!("{k} (in {path})"),
            },
        ));
    }
    Ok(out)
}

fn parse_with<T>(
    raw: &Raw,
    expected: &str,
    f: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ConfigError> {
    f(raw.value.trim()).ok_or_else(|| ConfigError::Invalid {
        key: raw.origin.clone(),
        value: raw.value.clone(),
        reason: format!("expected {expected}"),
    })
}

fn parse_count(raw: &Raw, min: usize, max: usize) -> Result<usize, ConfigError> {
    parse_with(raw, &format!("a whole number from {min} to {max}"), |s| {
        s.parse::<usize>().ok().filter(|n| (min..=max).contains(n))
    })
}

fn parse_duration(raw: &Raw, min: Duration) -> Result<Duration, ConfigError> {
    parse_with(
        raw,
        &format!(
            "a duration like 50ms, 2s or 5m, at least {}",
            fmt_duration(min)
        ),
        |s| humantime::parse_duration(s).ok().filter(|d| *d >= min),
    )
}

/// Schema names go into SQL text, so only plain lower-case identifiers pass.
fn parse_identifier(raw: &Raw) -> Result<String, ConfigError> {
    parse_with(
        raw,
        "a lower-case SQL identifier: a letter or _, then letters, digits or _, at most 63 bytes",
        |s| is_identifier(s).then(|| s.to_owned()),
    )
}

fn parse_label(raw: &Raw) -> Result<String, ConfigError> {
    parse_with(raw, "1 to 64 characters from [A-Za-z0-9_.-]", |s| {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        ok.then(|| s.to_owned())
    })
}

/// Whether `s` is a plain lower-case SQL identifier (`[a-z_][a-z0-9_]{0,62}`).
pub fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && s.len() <= 63
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_documented_values() {
        let s = Settings::load(None::<&Path>, env_of(&[])).unwrap();
        assert_eq!(s.relay, RelayConfig::default());
        assert_eq!(s.relay.batch_size, 2000);
        assert_eq!(s.relay.retry.max_attempts, 5);
        assert_eq!(s.relay.lease, Duration::from_secs(30));
        assert_eq!(s.schema, "public");
    }

    #[test]
    fn environment_overrides_file() {
        let dir = std::env::temp_dir().join(format!("outbox-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outbox.toml");
        std::fs::write(
            &path,
            "batch_size = 100\npoll_max = \"2s\"\nschema = \"files\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path), env_of(&[("OUTBOX_BATCH_SIZE", "42")])).unwrap();
        assert_eq!(s.relay.batch_size, 42);
        assert_eq!(s.relay.poll_max, Duration::from_secs(2));
        assert_eq!(s.schema, "files");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_stream_mode_settings_are_read_and_checked() {
        let s = Settings::load(
            None::<&Path>,
            env_of(&[
                ("OUTBOX_WRITE_MODE", "stream"),
                ("OUTBOX_STREAM_SLOT", "orders_stream"),
                ("OUTBOX_STREAM_MAX_RETAINED_WAL", "8GiB"),
                ("OUTBOX_STREAM_HEARTBEAT", "2s"),
            ]),
        )
        .unwrap();
        assert_eq!(s.write_mode, WriteModeSetting::Stream);
        assert_eq!(s.stream.slot.as_deref(), Some("orders_stream"));
        assert_eq!(s.stream.max_retained_wal, Some(8 << 30));
        assert_eq!(s.stream.heartbeat, Duration::from_secs(2));
        assert_eq!(Settings::default().write_mode, WriteModeSetting::Table);
        for (key, bad) in [
            ("OUTBOX_WRITE_MODE", "wal"),
            ("OUTBOX_STREAM_SLOT", "Bad-Slot"),
            ("OUTBOX_STREAM_MAX_RETAINED_WAL", "lots"),
            ("OUTBOX_STREAM_MAX_RETAINED_WAL", "0"),
        ] {
            let err = Settings::load(None::<&Path>, env_of(&[(key, bad)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = Settings::load(None::<&Path>, env_of(&[("OUTBOX_BATCH_SIZE", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("OUTBOX_BATCH_SIZE") && err.contains("whole number"),
            "{err}"
        );

        let err = Settings::from_toml_str("lease = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lease (in <inline>)") && err.contains("duration"),
            "{err}"
        );

        let err = Settings::from_toml_str("poll_min = \"2s\"\npoll_max = \"1s\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("poll_min") && err.contains("poll_max"),
            "{err}"
        );

        let err = Settings::from_toml_str("bach_size = 3")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown key \"bach_size\"") && err.contains("batch_size"),
            "{err}"
        );

        let err = Settings::from_toml_str("batch_size = [")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn broker_is_memory_or_a_bootstrap_list() {
        let s = Settings::load(None::<&Path>, env_of(&[])).unwrap();
        assert_eq!(s.broker, BrokerSetting::Memory);
        let s = Settings::load(
            None::<&Path>,
            env_of(&[("OUTBOX_BROKER", "b1:9092,b2:9093")]),
        )
        .unwrap();
        assert_eq!(s.broker, BrokerSetting::Kafka("b1:9092,b2:9093".into()));
        let s = Settings::load(
            None::<&Path>,
            env_of(&[("OUTBOX_BROKER", "nats://127.0.0.1:4222")]),
        )
        .unwrap();
        assert_eq!(
            s.broker,
            BrokerSetting::Nats("nats://127.0.0.1:4222".into())
        );
        let err = Settings::load(None::<&Path>, env_of(&[("OUTBOX_BROKER", "kafka")])).unwrap_err();
        assert!(err.to_string().contains("OUTBOX_BROKER"), "{err}");
    }

    #[test]
    fn schema_names_are_validated_against_injection() {
        for bad in [
            "Public",
            "x; DROP TABLE t",
            "a\"b",
            "1abc",
            "",
            &"a".repeat(64),
        ] {
            let err = Settings::load(None::<&Path>, env_of(&[("OUTBOX_SCHEMA", bad)]));
            assert!(err.is_err(), "{bad:?} accepted");
        }
        assert!(is_identifier("essay_lifecycle"));
        assert!(is_identifier("_x9"));
    }

    #[test]
    fn database_url_is_redacted_in_debug_output() {
        let s = Settings::load(
            None::<&Path>,
            env_of(&[(
                "DATABASE_URL",
                "postgres://app:s3cret@db:5432/x?sslmode=require",
            )]),
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("postgres://app:***@db:5432/x"), "{shown}");
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("sqlite://file.db"), "sqlite://file.db");
        let missing = Settings::default()
            .require_database_url()
            .unwrap_err()
            .to_string();
        assert!(missing.contains("DATABASE_URL"), "{missing}");
    }
}
