//! `essay-platform`: the demo (default) or one service (`serve <service>`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use essay_common::runtime::DataLocation;
use essay_platform::demo::{self, DemoOptions};
use essay_platform::{Options, Platform};
use outbox::backend::Broker;
use outbox::bus::Bus;
use outbox::{BrokerSetting, Settings};

/// The essay assessment platform on the transactional outbox.
///
/// Configuration (environment): DATABASE_URL (postgres://... for one schema per service;
/// unset = SQLite files), PLATFORM_DATA_DIR (SQLite folder), OUTBOX_BROKER (`memory` or
/// Kafka `host:port`), MATCH_CONFIRM_TIMEOUT_SECS, SPELLCHECK_DICTIONARY_DIR, CONTENT_SERVICE_URL (where `serve`d services
/// find the Content Service; default http://127.0.0.1:4108), CLASS_MANAGEMENT_URL (where the
/// matching service finds class rosters; default http://127.0.0.1:4104), CONTENT_TIMEOUT_MS,
/// CONTENT_SWEEP_GRACE_SECS, RUST_LOG.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in this process and push the sample essays through them (default).
    Demo {
        /// Folder of essays to upload.
        #[arg(long)]
        essays: Option<PathBuf>,
        /// A GUEST batch: no class, no student matching.
        #[arg(long)]
        guest: bool,
    },
    /// Run one service as this process (needs a shared database server and Kafka).
    Serve {
        /// content-service, class-management, batch-orchestrator, file-service,
        /// essay-lifecycle, student-matching, spellchecker, cj-assessment or result-aggregator.
        service: String,
        /// HTTP address (default 127.0.0.1 and the service's own port, 4101-4109).
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = Cli::parse();
    let settings = Settings::from_env().context("reading the outbox settings")?;
    let broker = Broker::from_setting(&settings.broker, Bus::default())?;
    match cli.command.unwrap_or(Command::Demo {
        essays: None,
        guest: false,
    }) {
        Command::Serve { service, addr } => {
            if settings.broker == BrokerSetting::Memory {
                bail!("serve runs one service per process: set OUTBOX_BROKER=host:port (Kafka), nats://host:port (NATS JetStream) or amqp://... (RabbitMQ); the in-process bus cannot reach other processes");
            }
            essay_platform::serve(&service, &DataLocation::from_env(), broker, addr).await
        }
        Command::Demo { essays, guest } => {
            let location = match DataLocation::from_env() {
                // A fresh folder per run unless one is configured.
                DataLocation::SqliteDir(_) if std::env::var_os("PLATFORM_DATA_DIR").is_none() => {
                    DataLocation::SqliteDir(std::env::temp_dir().join(format!(
                        "essay-platform-demo-{}",
                        uuid::Uuid::new_v4().simple()
                    )))
                }
                other => other,
            };
            println!(
                "essay platform demo: 9 services in one process; data: {}; broker: {}",
                location.describe(),
                broker.kind()
            );
            let platform = Platform::start(&location, broker, &Options::from_env()?).await?;
            let options = DemoOptions {
                essays_dir: essays.unwrap_or_else(demo::default_essays_dir),
                with_class: !guest,
                ..DemoOptions::default()
            };
            let report = demo::run(&platform.gateway(), &options).await;
            let report = match report {
                Ok(r) => r,
                Err(e) => {
                    platform.stop().await;
                    return Err(e);
                }
            };
            println!(
                "\nranked results ({} essays uploaded, {} failed validation):",
                report.uploaded,
                report.failed_validation.len()
            );
            print!("{}", demo::results_table(&report.results));
            // Let the last events (results ready) reach the broker before summarising.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let dead = platform.dead_events().await?;
            let pending: u64 = platform
                .outbox_stats()
                .await?
                .iter()
                .map(|(_, s)| s.pending)
                .sum();
            let latency = demo::commit_to_ack_quantiles(&platform.obs.encode());
            println!(
                "\noutbox: {} events published by {} relays, {pending} pending, {dead} dead letters",
                platform.published(),
                platform.databases().len()
            );
            let (stored, provisional) = platform.content.counts().await?;
            println!(
                "content service: {stored} files and texts stored, {provisional} not yet named by an event"
            );
            if let Some((p50, p99)) = latency {
                println!(
                    "commit-to-ack latency: p50 {:.1} ms, p99 {:.1} ms",
                    p50 * 1e3,
                    p99 * 1e3
                );
            }
            println!("finished in {:.1?}", report.elapsed);
            platform.stop().await;
            Ok(())
        }
    }
}
