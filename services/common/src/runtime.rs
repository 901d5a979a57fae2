//! How a service runs: its database (outbox migrated, its own tables created), a relay that
//! publishes its outbox, a consumer group whose deliveries go through its inbox, and its HTTP
//! API. The same code runs one service per process (`serve <service>`) or all of them in one
//! process on the embedded default.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use outbox::backend::{Broker, Database};
use outbox::portable::{InboxHandler, ServiceDb, StreamSource, Tx, TxHandler};
use outbox::postgres::stream::{create_slot, SlotName, StreamConfig, StreamRelay};
use outbox::{
    ConsumerConfig, HandlerError, InboxMetrics, IncomingMessage, OutboxMetrics, Relay, RelayConfig,
    RelayReport, WriteModeSetting,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::contract::{topics, Envelope};
use crate::trace::TraceContext;

/// A service of the platform.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// Its name: `source_service` of its events, its consumer group and inbox consumer name,
    /// its PostgreSQL schema and SQLite file name.
    fn name(&self) -> &'static str;

    /// The topics it consumes.
    fn consumes(&self) -> &'static [&'static str];

    /// Slow work for `event` before its transaction begins (see `TxHandler::prepare`).
    async fn prepare(&self, event: &Envelope) -> Result<(), HandlerError> {
        let _ = event;
        Ok(())
    }

    /// Applies one event: state changes and the events they cause, all in `tx`. Called once
    /// per event in effect (the inbox skips redeliveries).
    async fn handle(&self, tx: &mut Tx, event: &Envelope) -> Result<(), HandlerError>;

    /// Its HTTP API, if it has one.
    fn router(self: Arc<Self>) -> Option<Router> {
        None
    }

    /// Work on a timer (e.g. timeouts), until `shutdown`.
    async fn background(self: Arc<Self>, _shutdown: Shutdown) {}
}

/// A cloneable "stop now" signal.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers every [`Shutdown`] made from it.
pub struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    pub fn new() -> (Self, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (Self(tx), Shutdown(rx))
    }

    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Runs `work` every `tick` until `shutdown` (a service's timers: deadlines, sweeps). A
/// failed round is logged and tried again at the next tick.
pub async fn every<F, Fut, E>(shutdown: Shutdown, tick: Duration, what: &str, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, E>>,
    E: std::fmt::Debug,
{
    let mut stop = std::pin::pin!(shutdown.wait());
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(tick) => match work().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(what, n, "deadline work done"),
                Err(e) => tracing::warn!(what, error = ?e, "deadline work failed; trying again"),
            },
        }
    }
}

/// A timer's tick for a deadline of `limit`: often enough to act within a few percent of it,
/// between 100 ms and 5 s.
pub fn tick_for(limit: Duration) -> Duration {
    (limit / 20).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Where services keep their data.
#[derive(Clone, Debug)]
pub enum DataLocation {
    /// One SQLite file per service in this directory (the embedded default).
    SqliteDir(std::path::PathBuf),
    /// One database server, one schema per service (`{schema_prefix}{service}`): on
    /// PostgreSQL a schema of the URL's database, on MySQL/MariaDB a database of its own.
    Server { url: String, schema_prefix: String },
}

impl DataLocation {
    /// `DATABASE_URL` if it is a PostgreSQL or MySQL/MariaDB URL (schemas prefixed by
    /// `PLATFORM_SCHEMA_PREFIX`), else SQLite files under `PLATFORM_DATA_DIR` (default
    /// `platform-data`).
    pub fn from_env() -> Self {
        match std::env::var("DATABASE_URL") {
            Ok(url)
                if ["postgres", "mysql", "mariadb"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme)) =>
            {
                Self::Server {
                    url,
                    schema_prefix: std::env::var("PLATFORM_SCHEMA_PREFIX").unwrap_or_default(),
                }
            }
            _ => Self::SqliteDir(
                std::env::var("PLATFORM_DATA_DIR")
                    .unwrap_or_else(|_| "platform-data".into())
                    .into(),
            ),
        }
    }

    pub fn url_for(&self, service: &str) -> String {
        match self {
            Self::SqliteDir(dir) => format!("sqlite://{}/{service}.db", dir.display()),
            Self::Server { url, .. } => url.clone(),
        }
    }

    /// The PostgreSQL schema of `service` (SQLite ignores it: one file per service).
    pub fn schema_for(&self, service: &str) -> String {
        match self {
            Self::SqliteDir(_) => service.to_owned(),
            Self::Server { schema_prefix, .. } => format!("{schema_prefix}{service}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::SqliteDir(dir) => format!("SQLite files in {}", dir.display()),
            Self::Server { url, schema_prefix } if url.starts_with("postgres") => format!(
                "PostgreSQL {} (one schema per service: {schema_prefix}<service>)",
                outbox::config::redact_url(url)
            ),
            Self::Server { url, schema_prefix } => format!(
                "MySQL {} (one database per service: {schema_prefix}<service>)",
                outbox::config::redact_url(url)
            ),
        }
    }
}

/// Process-wide observability shared by the services it runs.
#[derive(Clone)]
pub struct Observability {
    pub outbox: OutboxMetrics,
    pub inbox: InboxMetrics,
    pub registry: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
}

impl Default for Observability {
    fn default() -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        let outbox = OutboxMetrics::register(&mut registry);
        let inbox = InboxMetrics::register(&mut registry);
        Self {
            outbox,
            inbox,
            registry: Arc::new(std::sync::Mutex::new(registry)),
        }
    }
}

impl Observability {
    pub fn encode(&self) -> String {
        outbox::metrics::encode_text(&self.registry.lock().expect("registry lock"))
    }
}

/// Opens the database of `service`: connect, migrate the outbox, count into `obs`. SQLite
/// commits are durable unless `broker` is the in-process bus (see `outbox::backend::Durability`).
/// In the stream write mode (PostgreSQL with `wal_level = logical`) the service's slot is
/// created (`outbox_<schema>`) and its events become logical messages.
pub async fn open_database(
    location: &DataLocation,
    service: &str,
    broker: &Broker,
    obs: &Observability,
    write_mode: WriteModeSetting,
) -> Result<ServiceDb, StartError> {
    if let DataLocation::SqliteDir(dir) = location {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    let database = Database::open_for(
        &location.url_for(service),
        &location.schema_for(service),
        broker,
    )
    .await
    .map_err(|e| err(format!("{service}: {e}")))?;
    let metrics = obs.outbox.table(service, "event_outbox");
    let stream = match (write_mode, &database) {
        (WriteModeSetting::Table, _) => None,
        (WriteModeSetting::Stream, Database::Postgres { pool, schema }) => {
            let slot = SlotName::for_schema(schema).map_err(|e| err(format!("{service}: {e}")))?;
            create_slot(pool, &slot)
                .await
                .map_err(|e| err(format!("{service}: {e}")))?;
            Some(StreamSource {
                url: location.url_for(service),
                slot,
            })
        }
        (WriteModeSetting::Stream, other) => {
            return Err(err(format!(
                "{service}: OUTBOX_WRITE_MODE=stream needs PostgreSQL; {} keeps the table mode",
                other.kind()
            )))
        }
    };
    let db = ServiceDb::with_parts(database, outbox::WakeSignal::new(), Some(metrics));
    match stream {
        Some(source) => db
            .streamed(source)
            .map_err(|e| err(format!("{service}: {e}"))),
        None => Ok(db),
    }
}

/// A service could not start; the message names the service and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(String);

fn err(msg: impl Into<String>) -> StartError {
    StartError(msg.into())
}

/// Creates every contract topic on Kafka (4 partitions each); nothing to do on the bus.
pub async fn prepare_broker(broker: &Broker) -> Result<(), StartError> {
    if let Broker::Kafka(config) = broker {
        let wanted: Vec<(&str, i32)> = topics::ALL.iter().map(|t| (*t, 4)).collect();
        outbox::kafka::create_topics(config, &wanted)
            .await
            .map_err(|e| err(format!("creating topics: {e}")))?;
    }
    Ok(())
}

struct Dispatch(Arc<dyn Service>);

/// The trace an incoming message continues (see [`crate::trace`]).
fn trace_of(envelope: &Envelope, message: &IncomingMessage) -> TraceContext {
    TraceContext::of_message(
        envelope.metadata.as_ref(),
        message
            .headers
            .get(crate::trace::TRACEPARENT)
            .map(String::as_str),
    )
}

#[async_trait]
impl TxHandler for Dispatch {
    async fn prepare(&self, message: &IncomingMessage) -> Result<(), HandlerError> {
        let envelope = Envelope::parse(message)?;
        trace_of(&envelope, message)
            .scope("prepare", self.0.prepare(&envelope))
            .await
    }

    async fn handle(&self, tx: &mut Tx, message: &IncomingMessage) -> Result<(), HandlerError> {
        let envelope = Envelope::parse(message)?;
        trace_of(&envelope, message)
            .scope("handle", self.0.handle(tx, &envelope))
            .await
    }
}

/// A running service; [`RunningService::stop`] winds it down.
pub struct RunningService {
    pub name: &'static str,
    pub db: ServiceDb,
    pub http: Option<SocketAddr>,
    trigger: ShutdownTrigger,
    relay: JoinHandle<RelayReport>,
    others: Vec<JoinHandle<()>>,
}

impl RunningService {
    /// Stops consuming, serving and relaying; returns what the relay published.
    pub async fn stop(self) -> RelayReport {
        self.trigger.trigger();
        for t in self.others {
            let _ = t.await;
        }
        self.relay.await.unwrap_or_default()
    }
}

/// The relay settings of `service`: every `OUTBOX_*` relay setting from the environment (see
/// `outbox::config`), the service's name, a 20 ms first poll unless `OUTBOX_POLL_MIN` says
/// otherwise, and `instance` unless `OUTBOX_INSTANCE` names one.
pub fn relay_config(service: &str, instance: Option<String>) -> Result<RelayConfig, StartError> {
    relay_config_from(service, instance, |k| std::env::var(k).ok())
}

/// [`relay_config`] with the environment given as a lookup.
pub fn relay_config_from(
    service: &str,
    instance: Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<RelayConfig, StartError> {
    let poll_min_set = env("OUTBOX_POLL_MIN").is_some();
    let mut config = outbox::Settings::load(None::<&std::path::Path>, env)
        .map_err(|e| err(format!("{service}: {e}")))?
        .relay;
    config.service = service.into();
    if !poll_min_set {
        config.poll_min = Duration::from_millis(20).min(config.poll_max);
    }
    if config.instance.is_none() {
        config.instance = instance;
    }
    Ok(config)
}

/// This machine's name, as the instance name of a service run one process per host
/// (`serve`): a restarted process takes its predecessor's partitions at once.
pub fn host_instance() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    (!name.is_empty()).then_some(name)
}

/// Starts `service`: relay, consumer (through the inbox), background work, and the HTTP API on
/// `http` when given (port 0 picks a free port). `instance` names this process for its relay
/// (see `RelayConfig::instance`); `None` for services sharing one process.
pub async fn start(
    service: Arc<dyn Service>,
    db: ServiceDb,
    broker: &Broker,
    obs: &Observability,
    http: Option<SocketAddr>,
    instance: Option<String>,
) -> Result<RunningService, StartError> {
    let name = service.name();
    let (trigger, shutdown) = ShutdownTrigger::new();
    if !service.consumes().is_empty() {
        let config = ConsumerConfig::new(name, service.consumes());
        // Before anything is published: a broker that keeps messages only for existing
        // queues (RabbitMQ) must have this service's before its peers start sending.
        if let Err(e) = broker.prepare_consumer(&config).await {
            tracing::warn!(service = name, error = %e, "could not declare the consumer's queues yet; its consumer will when the broker answers");
        }
    }
    let publisher = broker
        .publisher()
        .map_err(|e| err(format!("{name}: {e}")))?;
    let relay_config = relay_config(name, instance)?;
    // The consumer's member name is the relay's instance: one per process.
    let member = relay_config.instance.clone();
    let mut others = Vec::new();
    if let (Some(source), Database::Postgres { pool, schema }) = (db.stream_source(), db.database())
    {
        // The stream write mode: this relay publishes what the service emits; the table
        // relay below what it parks (rejected events and those behind them).
        let stream = StreamRelay::new(
            pool.clone(),
            source.url.clone(),
            schema.clone(),
            publisher.clone(),
            StreamConfig::new(source.slot.clone(), relay_config.clone()),
        )
        .with_metrics(obs.outbox.table(name, "event_outbox"))
        .with_table_wake(db.wake_signal());
        let stop = shutdown.clone();
        others.push(tokio::spawn(async move {
            if let Err(e) = stream.run(stop.wait()).await {
                tracing::error!(service = name, error = %e, "stream relay stopped");
            }
        }));
    }
    let relay = Relay::new(db.database().relay_store(), publisher, relay_config)
        .with_wake_signal(db.wake_signal())
        .with_metrics(obs.outbox.table(name, "event_outbox"));
    let relay = tokio::spawn(relay.run(shutdown.clone().wait()));

    if !service.consumes().is_empty() {
        let handler = InboxHandler::new(db.clone(), name, Dispatch(service.clone()))
            .with_metrics(obs.inbox.consumer(name));
        let config = ConsumerConfig::new(name, service.consumes()).with_instance(member);
        let (broker, stop) = (broker.clone(), shutdown.clone());
        others.push(tokio::spawn(async move {
            if let Err(e) = broker.consume(config, handler, stop.wait()).await {
                tracing::error!(service = name, error = %e, "consumer stopped");
            }
        }));
    }
    others.push(tokio::spawn(service.clone().background(shutdown.clone())));
    let mut bound = None;
    if let Some(addr) = http {
        // Every served service also answers /metrics (Prometheus text) and /healthz.
        let metrics = obs.clone();
        let router = service
            .clone()
            .router()
            .unwrap_or_default()
            .route(
                "/metrics",
                axum::routing::get(move || async move { metrics.encode() }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(crate::trace::http_layer));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| err(format!("{name}: cannot listen on {addr}: {e}")))?;
        bound = listener.local_addr().ok();
        let stop = shutdown.clone();
        others.push(tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.wait())
                .await;
        }));
    }
    Ok(RunningService {
        name,
        db,
        http: bound,
        trigger,
        relay,
        others,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn a_served_service_takes_every_relay_setting_from_the_environment() {
        let c = relay_config_from(
            "file_service",
            Some("host-1".into()),
            env(&[("OUTBOX_LEASE", "5s"), ("OUTBOX_BATCH_SIZE", "100")]),
        )
        .unwrap();
        assert_eq!(c.lease, Duration::from_secs(5));
        assert_eq!(c.batch_size, 100);
        assert_eq!(c.service, "file_service");
        assert_eq!(
            c.poll_min,
            Duration::from_millis(20),
            "the platform's default"
        );
        assert_eq!(c.relay_name(), "file_service/host-1");
        let c = relay_config_from(
            "file_service",
            Some("host-1".into()),
            env(&[("OUTBOX_POLL_MIN", "100ms"), ("OUTBOX_INSTANCE", "pod-3")]),
        )
        .unwrap();
        assert_eq!(c.poll_min, Duration::from_millis(100));
        assert_eq!(c.instance.as_deref(), Some("pod-3"));
        let e = relay_config_from("file_service", None, env(&[("OUTBOX_LEASE", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("OUTBOX_LEASE") && e.contains("file_service"),
            "{e}"
        );
    }
}
