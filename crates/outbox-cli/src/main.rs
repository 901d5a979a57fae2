//! `outbox`: operate an outbox table from the command line.
//!
//! Settings come from the environment (and `--config FILE`), as documented in
//! `outbox_core::config` and `outbox_kafka::KafkaConfig`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use outbox_core::config::redact_url;
use outbox_core::{OutboxMetrics, Relay, Settings};
use outbox_kafka::{KafkaConfig, KafkaPublisher};
use outbox_postgres::{check_schema, migrate, PgRelayStore, Schema};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// Operate a transactional outbox: apply migrations, verify the schema, run the relay.
///
/// Connection and tuning come from environment variables (DATABASE_URL, OUTBOX_SCHEMA,
/// OUTBOX_BATCH_SIZE, KAFKA_BOOTSTRAP_SERVERS, KAFKA_PROPERTY_<NAME>, ...) or a TOML file
/// given with --config; the environment wins.
#[derive(Parser)]
#[command(name = "outbox", version)]
struct Cli {
    /// TOML file with outbox settings (keys as in the docs: database_url, schema, batch_size, ...).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the embedded migrations to the configured schema (safe to repeat, and to run
    /// from several processes at once).
    Migrate,
    /// Verify tables, columns and indexes; exit 1 naming every problem and its fix.
    Check,
    /// Run the relay to Kafka until SIGINT/SIGTERM (a sidecar next to any service).
    Relay,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_ref(), |k| std::env::var(k).ok())?;
    let schema = Schema::new(settings.schema.clone())?;
    match cli.command {
        Command::Migrate => {
            let pool = connect(&settings).await?;
            let applied = migrate(&pool, &schema).await?;
            println!(
                "schema {}: applied {} migration(s) {:?}",
                schema.name(),
                applied.len(),
                applied
            );
        }
        Command::Check => {
            let pool = connect(&settings).await?;
            check_schema(&pool, &schema).await?;
            println!("schema {}: ok", schema.name());
        }
        Command::Relay => relay(settings, schema).await?,
    }
    Ok(())
}

async fn connect(settings: &Settings) -> anyhow::Result<PgPool> {
    let url = settings.require_database_url()?;
    PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to {}", redact_url(url)))
}

async fn relay(settings: Settings, schema: Schema) -> anyhow::Result<()> {
    let pool = connect(&settings).await?;
    check_schema(&pool, &schema).await?;
    let kafka = KafkaConfig::from_env()?;
    tracing::info!(?kafka, schema = schema.name(), "starting relay");
    let publisher = KafkaPublisher::new(kafka).context("cannot create the Kafka producer")?;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics =
        OutboxMetrics::register(&mut registry).table(&settings.relay.service, "event_outbox");
    let store = PgRelayStore::new(pool, &schema);
    let endpoint =
        outbox_http::MetricsEndpoint::new(registry).with_source(store.clone(), metrics.clone());
    let listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("cannot serve metrics on {}", settings.metrics_addr))?;
    tracing::info!(addr = %settings.metrics_addr, "metrics on /metrics");
    tokio::spawn(async move { axum::serve(listener, endpoint.router()).await });

    let relay = Relay::from_shared(Arc::new(store), Arc::new(publisher), settings.relay)
        .with_metrics(metrics);
    let report = relay.run(shutdown_signal()).await;
    tracing::info!(?report, "relay finished");
    Ok(())
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
