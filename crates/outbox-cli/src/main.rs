//! `outbox`: operate an outbox table from the command line, on PostgreSQL, MySQL/MariaDB or SQLite.
//!
//! Settings come from the environment (and `--config FILE`), as documented in
//! `outbox_core::config` and `outbox_kafka::KafkaConfig`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use outbox::backend::{Broker, Database};
use outbox::bus::Bus;
use outbox::postgres::stream::{self, SlotName, StreamConfig, StreamRelay};
use outbox::{
    BrokerSetting, EventFilter, EventId, OutboxMetrics, Relay, Settings, WakeSetting,
    WriteModeSetting,
};

/// Operate a transactional outbox: migrate and check the schema, inspect status, handle dead
/// letters, replay retained events, and run the relay.
///
/// The database comes from DATABASE_URL (postgres://..., mysql://... or sqlite://FILE) and, on
/// PostgreSQL, OUTBOX_SCHEMA; tuning from OUTBOX_* variables or a TOML file given with
/// --config (the environment wins). The relay publishes to OUTBOX_BROKER (a Kafka bootstrap
/// list, nats://host:port or amqp://user:password@host:port/vhost) or KAFKA_BOOTSTRAP_SERVERS,
/// plus KAFKA_PROPERTY_<NAME> for Kafka's TLS/SASL; it serves /metrics and
/// the admin API (/api, mutations need OUTBOX_ADMIN_TOKEN) on OUTBOX_METRICS_ADDR.
///
/// Examples:
///   outbox status
///   outbox dead list --topic huleedu.els.batch.essays.ready.v1 --error timeout
///   outbox dead requeue --aggregate batch-42
///   outbox replay --topic huleedu.batch.essays.registered.v1 --since 2h --dry-run
#[derive(Parser)]
#[command(name = "outbox", version, verbatim_doc_comment)]
struct Cli {
    /// TOML file with outbox settings (keys as in the docs: database_url, schema, batch_size, ...).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of text (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the embedded migrations (safe to repeat, and to run from several processes).
    Migrate,
    /// Verify tables, columns and indexes; exit 1 naming every problem and its fix.
    Check,
    /// Pending, in flight, dead and retained events per topic, oldest pending age, events
    /// published in the last minute, live relays. In-flight and rate are what the live relays
    /// reported with their last heartbeat (every few seconds).
    Status,
    /// Inspect and fix events that used up their attempts.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Re-publish retained published events (same event_id; consumers deduplicate).
    Replay {
        #[arg(long)]
        topic: String,
        /// How far back, e.g. 30m, 2h, 1d (needs OUTBOX_RETENTION at least that long).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Duration,
        #[arg(long)]
        aggregate: Option<String>,
        /// Count what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run the relay to Kafka until SIGINT/SIGTERM (a sidecar next to any service).
    Relay,
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List dead events, oldest first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one event with its headers, payload and last error.
    Show { event_id: EventId },
    /// Make matching dead events pending again (attempts reset, event_id kept).
    Requeue {
        #[command(flatten)]
        filter: FilterArgs,
        /// Required when no filter is given: requeue every dead event.
        #[arg(long)]
        all: bool,
    },
    /// Delete matching dead events for good.
    Purge {
        #[command(flatten)]
        filter: FilterArgs,
        /// Required when no filter is given: purge every dead event.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args)]
struct FilterArgs {
    /// One event by id.
    #[arg(long)]
    event_id: Option<EventId>,
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    aggregate: Option<String>,
    /// Case-insensitive text the last error contains.
    #[arg(long)]
    error: Option<String>,
    /// Only events dead for at least this long, e.g. 1h.
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
}

impl FilterArgs {
    fn filter(&self) -> EventFilter {
        EventFilter {
            event_id: self.event_id,
            topic: self.topic.clone(),
            aggregate_id: self.aggregate.clone(),
            error_contains: self.error.clone(),
            older_than: self.older_than,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_ref(), |k| std::env::var(k).ok())?;
    let url = settings.require_database_url()?.to_owned();
    let db = Database::connect(&url, &settings.schema).await?;
    let json = cli.json;
    match cli.command {
        Command::Migrate => {
            let applied = db.migrate().await?;
            let slot = match stream_slot(&settings, &db)? {
                Some((pool, slot)) => Some((stream::create_slot(&pool, &slot).await?, slot)),
                None => None,
            };
            say(
                json,
                serde_json::json!({
                    "applied": applied,
                    "stream_slot": slot.as_ref().map(|(_, s)| s.to_string()),
                    "stream_slot_created": slot.as_ref().map(|(c, _)| *c),
                }),
                || {
                    let mut out = format!("applied {} migration(s) {applied:?}", applied.len());
                    if let Some((created, slot)) = &slot {
                        out += &format!(
                            "; stream slot {slot} {}",
                            if *created { "created" } else { "exists" }
                        );
                    }
                    out
                },
            );
        }
        Command::Check => {
            db.check().await?;
            let slot = match stream_slot(&settings, &db)? {
                Some((pool, slot)) => Some(stream::check_slot(&pool, &slot).await?),
                None => None,
            };
            say(json, serde_json::json!({ "ok": true }), || match slot {
                Some(s) => format!(
                    "schema ok; {}",
                    s.describe(settings.stream.max_retained_wal)
                ),
                None => "schema ok".into(),
            });
        }
        Command::Status => {
            db.check().await?;
            let slot = match stream_slot(&settings, &db)? {
                Some((pool, slot)) => {
                    Some(stream::slot_status(&pool, &slot).await?.ok_or_else(|| {
                        anyhow::anyhow!("stream slot {slot} does not exist: run `outbox migrate`")
                    })?)
                }
                None => None,
            };
            let stats = db.relay_store().stats().await?;
            let topics = db.admin().topic_status().await?;
            let value = serde_json::json!({
                "database": db.kind(),
                "pending": stats.pending, "retrying": stats.retrying, "dead": stats.dead,
                "published_retained": stats.published_retained,
                "oldest_pending_age_seconds": stats.oldest_pending_age.map(|d| d.as_secs_f64()),
                "live_relays": stats.live_relays,
                "in_flight": stats.in_flight,
                "published_last_minute": stats.published_last_minute,
                "published_per_second": stats.published_last_minute as f64 / 60.0,
                "topics": topics,
                "stream": slot.as_ref().map(|s| serde_json::json!({
                    "slot": s.slot, "active": s.active, "lag_bytes": s.lag_bytes,
                    "lag_seconds": s.lag_seconds, "retained_wal_bytes": s.retained_bytes,
                    "retained_wal_limit_bytes": settings.stream.max_retained_wal,
                    "wal_status": s.wal_status,
                })),
            });
            say(json, value, || {
                let mut out = format!(
                    "{}: {} pending ({} retrying), {} in flight, {} dead, {} retained; oldest pending {}; \
                     {} published in the last minute ({:.1}/s); {} live relay(s)\n",
                    db.kind(),
                    stats.pending,
                    stats.retrying,
                    stats.in_flight,
                    stats.dead,
                    stats.published_retained,
                    stats
                        .oldest_pending_age
                        .map(|d| format!("{:.1}s", d.as_secs_f64()))
                        .unwrap_or_else(|| "-".into()),
                    stats.published_last_minute,
                    stats.published_last_minute as f64 / 60.0,
                    stats.live_relays
                );
                if let Some(s) = &slot {
                    out += &s.describe(settings.stream.max_retained_wal);
                    out.push('\n');
                }
                for t in &topics {
                    out += &format!(
                        "  {:<60} pending {:>7}  in flight {:>5}  dead {:>5}  retained {:>7}  last minute {:>7}\n",
                        t.topic, t.pending, t.in_flight, t.dead, t.published_retained, t.published_last_minute
                    );
                }
                out.trim_end().to_owned()
            });
        }
        Command::Dead(cmd) => dead(&db, cmd, json).await?,
        Command::Replay {
            topic,
            since,
            aggregate,
            dry_run,
        } => {
            let n = db
                .admin()
                .replay(&topic, since, aggregate.as_deref(), dry_run)
                .await?;
            say(
                json,
                serde_json::json!({ "replayed": n, "dry_run": dry_run }),
                || {
                    if dry_run {
                        format!("would replay {n} event(s) of {topic}")
                    } else {
                        format!("replaying {n} event(s) of {topic}")
                    }
                },
            );
        }
        Command::Relay => relay(settings, db).await?,
    }
    Ok(())
}

fn say(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

async fn dead(db: &Database, cmd: DeadCommand, json: bool) -> anyhow::Result<()> {
    let admin = db.admin();
    let refuse_unfiltered = |f: &EventFilter, all: bool, verb: &str| {
        anyhow::ensure!(
            all || !f.is_empty(),
            "refusing to {verb} every dead event: give a filter (--event-id, --topic, --aggregate, --error, --older-than) or --all"
        );
        Ok(())
    };
    match cmd {
        DeadCommand::List { filter, limit } => {
            let events = admin.dead(&filter.filter(), limit).await?;
            say(json, serde_json::to_value(&events)?, || {
                if events.is_empty() {
                    return "no dead events".into();
                }
                events
                    .iter()
                    .map(|e| {
                        format!(
                            "{}  {}  {}/{}  attempts {}  {}",
                            e.event_id,
                            e.topic,
                            e.aggregate_type,
                            e.aggregate_id,
                            e.attempts,
                            e.last_error.as_deref().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        DeadCommand::Show { event_id } => {
            let event = admin
                .event(event_id)
                .await?
                .with_context(|| format!("no event {event_id} in the outbox (published events are deleted unless retained)"))?;
            say(json, serde_json::to_value(&event)?, || {
                serde_json::to_string_pretty(&event).unwrap_or_default()
            });
        }
        DeadCommand::Requeue { filter, all } => {
            let f = filter.filter();
            refuse_unfiltered(&f, all, "requeue")?;
            let n = admin.requeue_dead(&f).await?;
            say(json, serde_json::json!({ "requeued": n }), || {
                format!("requeued {n} event(s)")
            });
        }
        DeadCommand::Purge { filter, all } => {
            let f = filter.filter();
            refuse_unfiltered(&f, all, "purge")?;
            let n = admin.purge_dead(&f).await?;
            say(json, serde_json::json!({ "purged": n }), || {
                format!("purged {n} event(s)")
            });
        }
    }
    Ok(())
}

async fn relay(settings: Settings, db: Database) -> anyhow::Result<()> {
    db.check().await?;
    let broker_setting = match &settings.broker {
        BrokerSetting::Memory => BrokerSetting::Kafka(
            std::env::var("KAFKA_BOOTSTRAP_SERVERS").context(
                "a standalone relay publishes to a broker: set OUTBOX_BROKER (Kafka host:port, nats://... or amqp://...) or KAFKA_BOOTSTRAP_SERVERS",
            )?,
        ),
        broker => broker.clone(),
    };
    let broker = Broker::from_setting(&broker_setting, Bus::default())?;
    let publisher = broker
        .publisher()
        .context("cannot create the broker's publisher")?;
    tracing::info!(database = db.kind(), "starting relay");

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics =
        OutboxMetrics::register(&mut registry).table(&settings.relay.service, "event_outbox");
    let store = db.relay_store();
    let endpoint =
        outbox::http::MetricsEndpoint::new(registry).with_source(store.clone(), metrics.clone());
    let listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("cannot serve metrics on {}", settings.metrics_addr))?;
    // The admin API shares the (loopback by default) address; mutations need the token.
    let admin = outbox::http::AdminApi::new(
        db.admin(),
        store.clone(),
        std::env::var("OUTBOX_ADMIN_TOKEN").ok(),
    );
    tracing::info!(addr = %settings.metrics_addr, "metrics on /metrics, admin API on /api, dashboard on /");
    let dashboard = outbox::http::Dashboard::new(store.clone(), Some(metrics.clone()));
    tokio::spawn(
        dashboard
            .clone()
            .run_sampler(std::time::Duration::from_secs(2)),
    );
    let app = endpoint
        .router()
        .merge(admin.router())
        .merge(dashboard.router());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let stream_metrics = metrics.clone();
    let relay =
        Relay::new(store, Arc::clone(&publisher), settings.relay.clone()).with_metrics(metrics);
    // Writers in other processes cannot wake this relay directly: watch for their commits.
    let wake = relay.wake_signal();
    let interval = settings.wake_interval;
    let watcher = match (settings.wake, &db) {
        (WakeSetting::Poll, _) => None,
        (WakeSetting::Watch, Database::Postgres { pool, schema }) => Some(tokio::spawn(
            outbox::postgres::watch_for_commits(pool.clone(), schema.clone(), wake, interval),
        )),
        (WakeSetting::Watch, Database::Sqlite { pool }) => Some(tokio::spawn(
            outbox::sqlite::watch_for_commits(pool.clone(), wake, interval),
        )),
        (WakeSetting::Notify, Database::Postgres { pool, schema }) => Some(tokio::spawn(
            outbox::postgres::listen_for_commits(pool.clone(), schema.clone(), wake),
        )),
        (WakeSetting::Notify, Database::Sqlite { .. }) => {
            anyhow::bail!("OUTBOX_WAKE=notify needs PostgreSQL; on SQLite use watch (the default)")
        }
        (WakeSetting::Notify, Database::MySql { .. }) => {
            anyhow::bail!(
                "OUTBOX_WAKE=notify needs PostgreSQL; on MySQL use poll or watch (both poll)"
            )
        }
        // MySQL offers no cheap signal of another session's commit: the relay polls
        // (OUTBOX_POLL_MIN/MAX bound the delay).
        (WakeSetting::Watch, Database::MySql { .. }) => {
            tracing::info!("MySQL: no commit watch; the relay polls");
            None
        }
    };
    tracing::info!(wake = ?settings.wake, ?interval, "relay wake-up");
    let streaming = match stream_slot(&settings, &db)? {
        Some((pool, slot)) => {
            let mut config = StreamConfig::new(slot, settings.relay.clone());
            config.heartbeat = settings.stream.heartbeat;
            config.max_retained_wal = settings.stream.max_retained_wal;
            let url = settings.require_database_url()?.to_owned();
            let schema = outbox::postgres::Schema::new(settings.schema.clone())?;
            Some(
                StreamRelay::new(pool, url, schema, Arc::clone(&publisher), config)
                    .with_metrics(stream_metrics)
                    .with_table_wake(relay.wake_signal()),
            )
        }
        None => None,
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let stopped = |mut stop: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let table = tokio::spawn(relay.run(stopped(stop.clone())));
    let result = match streaming {
        // The stream relay publishes what writers emit; the table relay what it parks.
        Some(s) => {
            tokio::select! {
                r = s.run(stopped(stop.clone())) => r.map(|report| tracing::info!(?report, "stream relay finished")).map_err(anyhow::Error::from),
                _ = async { shutdown_signal().await; let _ = stop_tx.send(true); std::future::pending::<()>().await } => Ok(()),
            }
        }
        None => {
            shutdown_signal().await;
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let report = table.await?;
    if let Some(w) = watcher {
        w.abort();
    }
    tracing::info!(?report, "relay finished");
    result
}

/// The stream slot when the stream write mode is configured, with the pool to reach it;
/// refused (with why) on a database other than PostgreSQL.
fn stream_slot(
    settings: &Settings,
    db: &Database,
) -> anyhow::Result<Option<(sqlx::PgPool, SlotName)>> {
    if settings.write_mode != WriteModeSetting::Stream {
        return Ok(None);
    }
    let Database::Postgres { pool, schema } = db else {
        anyhow::bail!(
            "OUTBOX_WRITE_MODE=stream needs PostgreSQL (logical replication); {} keeps the table mode",
            db.kind()
        );
    };
    let slot = match &settings.stream.slot {
        Some(name) => SlotName::new(name.clone())?,
        None => SlotName::for_schema(schema)?,
    };
    Ok(Some((pool.clone(), slot)))
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested; finishing the batch in flight");
}
