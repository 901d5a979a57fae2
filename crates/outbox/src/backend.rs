//! Backends chosen by configuration: the same code runs embedded (SQLite + in-process bus)
//! or distributed (PostgreSQL or MySQL + Kafka, NATS JetStream or RabbitMQ).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use outbox_bus::{Bus, BusConsumer, BusPublisher};
use outbox_core::config::redact_url;
use outbox_core::{
    BrokerSetting, ConsumerConfig, ConsumerReport, MessageHandler, OutboxAdmin, Publisher,
    RelayStore,
};
use outbox_kafka::{KafkaConfig, KafkaConsumer, KafkaPublisher};
use outbox_nats::{NatsConfig, NatsConsumer, NatsPublisher};
use outbox_postgres::{PgRelayStore, Schema};
use outbox_rabbitmq::{RabbitConfig, RabbitConsumer, RabbitPublisher};
pub use outbox_sqlite::Durability;
use sqlx::postgres::PgPoolOptions;
use sqlx::{MySqlPool, PgPool, SqlitePool};

/// Why a backend could not be set up; the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("DATABASE_URL {0:?} is not supported: use sqlite://FILE, postgres://USER@HOST/DB or mysql://USER@HOST/DB")]
    UnsupportedUrl(String),
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Postgres(#[from] outbox_postgres::OutboxError),
    #[error(transparent)]
    Sqlite(#[from] outbox_sqlite::SqliteOutboxError),
    #[error(transparent)]
    MySql(#[from] outbox_mysql::MySqlOutboxError),
    #[error("OUTBOX_PG_POOL_SIZE must be a number of connections from 1 to 1000, got {0:?}")]
    PoolSize(String),
    #[error("NATS: {0}")]
    Nats(#[from] outbox_nats::NatsError),
    #[error("NATS: {0}")]
    NatsConfig(#[from] outbox_nats::NatsConfigError),
    #[error("RabbitMQ: {0}")]
    RabbitMq(#[from] outbox_rabbitmq::RabbitError),
    #[error("RabbitMQ: {0}")]
    RabbitConfig(#[from] outbox_rabbitmq::RabbitConfigError),
    #[error("Kafka: {0}")]
    Kafka(#[from] outbox_kafka::KafkaError),
    #[error(transparent)]
    KafkaConfig(#[from] outbox_kafka::KafkaConfigError),
}

/// Connections per PostgreSQL pool: `OUTBOX_PG_POOL_SIZE`, else 16 (a relay, a consumer and
/// an HTTP API at once, with room). Many services per server want fewer: PostgreSQL's
/// `max_connections` (100 by default) is shared by all of them.
fn pool_size(setting: Option<String>) -> Result<u32, BackendError> {
    match setting {
        None => Ok(16),
        Some(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or(BackendError::PoolSize(s)),
    }
}

/// The service's database, with the outbox tables migrated and checked.
#[derive(Clone)]
pub enum Database {
    Postgres {
        pool: PgPool,
        schema: Schema,
    },
    Sqlite {
        pool: SqlitePool,
    },
    /// MySQL or MariaDB: `database` is where the outbox and the service's tables live.
    MySql {
        pool: MySqlPool,
        database: String,
    },
}

impl Database {
    /// Connects by URL scheme, applies the embedded migrations and verifies the schema.
    /// `schema` applies to PostgreSQL (one schema per service) and MySQL (where a schema is
    /// a database: the service's tables live in the database named `schema`, created if
    /// missing, unless `schema` is `public`, the default, which keeps the URL's database);
    /// SQLite has one file per service.
    /// SQLite commits are durable ([`Durability::Full`]); see [`Database::open_for`].
    pub async fn open(url: &str, schema: &str) -> Result<Self, BackendError> {
        Self::open_with(url, schema, Durability::Full).await
    }

    /// Like [`Database::open`] for a service that publishes to and consumes from `broker`:
    /// SQLite commits are durable unless the broker is the in-process bus, whose log dies
    /// with the process anyway (see [`Durability`]).
    pub async fn open_for(url: &str, schema: &str, broker: &Broker) -> Result<Self, BackendError> {
        Self::open_with(url, schema, broker.sqlite_durability()).await
    }

    /// Like [`Database::open`] with SQLite's commit durability chosen (PostgreSQL ignores it).
    pub async fn open_with(
        url: &str,
        schema: &str,
        durability: Durability,
    ) -> Result<Self, BackendError> {
        let db = Self::connect_with(url, schema, durability).await?;
        db.migrate().await?;
        db.check().await?;
        Ok(db)
    }

    /// Connects by URL scheme, changing nothing (SQLite with durable commits).
    pub async fn connect(url: &str, schema: &str) -> Result<Self, BackendError> {
        Self::connect_with(url, schema, Durability::Full).await
    }

    /// Connects by URL scheme with SQLite's commit durability chosen, changing nothing.
    pub async fn connect_with(
        url: &str,
        schema: &str,
        durability: Durability,
    ) -> Result<Self, BackendError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let schema = Schema::new(schema)?;
            // Unqualified names resolve to the service's schema first (see `portable`). A
            // startup parameter, not a SET: `RESET search_path` (the migrator's) returns to it.
            let options: sqlx::postgres::PgConnectOptions =
                url.parse().map_err(|source| BackendError::Connect {
                    url: redact_url(url),
                    source,
                })?;
            let options = options.options([("search_path", format!("\"{}\"", schema.name()))]);
            let pool = PgPoolOptions::new()
                .max_connections(pool_size(std::env::var("OUTBOX_PG_POOL_SIZE").ok())?)
                .acquire_timeout(std::time::Duration::from_secs(10))
                // Give idle connections back: many services may share one server's limit.
                .idle_timeout(std::time::Duration::from_secs(60))
                .connect_with(options)
                .await
                .map_err(|source| BackendError::Connect {
                    url: redact_url(url),
                    source,
                })?;
            Ok(Self::Postgres { pool, schema })
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite {
                pool: outbox_sqlite::connect_with(url, durability).await?,
            })
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Self::connect_mysql(url, schema).await
        } else {
            Err(BackendError::UnsupportedUrl(redact_url(url)))
        }
    }

    /// MySQL: the database named `schema` (see [`Database::open`]) on the URL's server.
    async fn connect_mysql(url: &str, schema: &str) -> Result<Self, BackendError> {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let connect_error = |source: outbox_mysql::MySqlOutboxError| match source {
            outbox_mysql::MySqlOutboxError::Database(source) => BackendError::Connect {
                url: redact_url(&url),
                source,
            },
            other => other.into(),
        };
        let parsed: sqlx::mysql::MySqlConnectOptions =
            url.parse().map_err(|source| BackendError::Connect {
                url: redact_url(&url),
                source,
            })?;
        let database = match parsed.get_database() {
            Some(own) if schema == "public" && !own.is_empty() => own.to_owned(),
            _ => schema.to_owned(),
        };
        // The only configurable name that reaches SQL text: validated as an identifier.
        Schema::new(database.clone())?;
        let size = pool_size(std::env::var("OUTBOX_PG_POOL_SIZE").ok())?;
        let pool_options = || outbox_mysql::pool_options().idle_timeout(Duration::from_secs(60));
        let admin = outbox_mysql::connect_to(parsed.clone(), pool_options().max_connections(1))
            .await
            .map_err(connect_error)?;
        // Text compares byte for byte, as in PostgreSQL and SQLite (see outbox_mysql).
        sqlx::query(&format!(
            "CREATE DATABASE IF NOT EXISTS {database} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .execute(&admin)
        .await
        .map_err(|source| BackendError::Connect {
            url: redact_url(&url),
            source,
        })?;
        admin.close().await;
        // The URL's other settings (TLS, ...) are kept; only the database is the service's.
        let pool = outbox_mysql::connect_to(
            parsed.database(&database),
            pool_options().max_connections(size),
        )
        .await
        .map_err(connect_error)?;
        Ok(Self::MySql { pool, database })
    }

    /// Applies the embedded migrations not yet applied; returns their versions.
    pub async fn migrate(&self) -> Result<Vec<i64>, BackendError> {
        Ok(match self {
            Self::Postgres { pool, schema } => outbox_postgres::migrate(pool, schema)
                .await?
                .into_iter()
                .map(i64::from)
                .collect(),
            Self::Sqlite { pool } => outbox_sqlite::migrate(pool).await?,
            Self::MySql { pool, .. } => outbox_mysql::migrate(pool).await?,
        })
    }

    /// Verifies tables, columns and indexes; the error names every problem and the fix.
    pub async fn check(&self) -> Result<(), BackendError> {
        match self {
            Self::Postgres { pool, schema } => outbox_postgres::check_schema(pool, schema).await?,
            Self::Sqlite { pool } => outbox_sqlite::check_schema(pool).await?,
            Self::MySql { pool, .. } => outbox_mysql::check_schema(pool).await?,
        }
        Ok(())
    }

    /// Operator actions on this database's outbox.
    pub fn admin(&self) -> Arc<dyn OutboxAdmin> {
        match self {
            Self::Postgres { pool, schema } => Arc::new(PgRelayStore::new(pool.clone(), schema)),
            Self::Sqlite { pool } => Arc::new(outbox_sqlite::SqliteRelayStore::new(
                pool.clone(),
                outbox_sqlite::SqliteDialect,
            )),
            Self::MySql { pool, .. } => Arc::new(outbox_mysql::MySqlRelayStore::new(
                pool.clone(),
                outbox_mysql::MySqlDialect,
            )),
        }
    }

    /// The relay's store over this database.
    pub fn relay_store(&self) -> Arc<dyn RelayStore> {
        match self {
            Self::Postgres { pool, schema } => Arc::new(PgRelayStore::new(pool.clone(), schema)),
            Self::Sqlite { pool } => Arc::new(outbox_sqlite::SqliteRelayStore::new(
                pool.clone(),
                outbox_sqlite::SqliteDialect,
            )),
            Self::MySql { pool, .. } => Arc::new(outbox_mysql::MySqlRelayStore::new(
                pool.clone(),
                outbox_mysql::MySqlDialect,
            )),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Postgres { .. } => "postgres",
            Self::Sqlite { .. } => "sqlite",
            Self::MySql { .. } => "mysql",
        }
    }
}

/// The transport.
#[derive(Clone)]
pub enum Broker {
    /// The in-process bus: every service in this process shares it.
    Memory(Bus),
    Kafka(KafkaConfig),
    Nats(NatsConfig),
    RabbitMq(RabbitConfig),
}

impl Broker {
    /// From the `OUTBOX_BROKER` setting. Kafka takes its other settings (client id, delivery
    /// timeout, `KAFKA_PROPERTY_*`) from the environment; `memory` uses `bus`.
    pub fn from_setting(setting: &BrokerSetting, bus: Bus) -> Result<Self, BackendError> {
        Ok(match setting {
            BrokerSetting::Memory => Self::Memory(bus),
            BrokerSetting::Kafka(bootstrap) => {
                let mut config = KafkaConfig::from_env()?;
                config.bootstrap_servers = bootstrap.clone();
                Self::Kafka(config)
            }
            BrokerSetting::Nats(url) => {
                let config = NatsConfig::new(url.clone());
                config.validate()?;
                Self::Nats(config)
            }
            BrokerSetting::RabbitMq(url) => {
                let mut config = RabbitConfig::new(url.clone());
                if let Ok(exchange) = std::env::var("OUTBOX_RABBITMQ_EXCHANGE") {
                    config.exchange = exchange;
                }
                config.validate()?;
                Self::RabbitMq(config)
            }
        })
    }

    pub fn publisher(&self) -> Result<Arc<dyn Publisher>, BackendError> {
        Ok(match self {
            Self::Memory(bus) => Arc::new(BusPublisher::new(bus.clone())),
            Self::Kafka(config) => Arc::new(KafkaPublisher::new(config.clone())?),
            Self::Nats(config) => Arc::new(NatsPublisher::new(config.clone())?),
            Self::RabbitMq(config) => Arc::new(RabbitPublisher::new(config.clone())?),
        })
    }

    /// Makes sure the broker keeps what is published to the group's topics from now on, before
    /// its consumer runs: RabbitMQ keeps a message only for the queues bound when it arrives,
    /// so the group's queues are declared here (Kafka and JetStream keep their logs anyway).
    pub async fn prepare_consumer(&self, config: &ConsumerConfig) -> Result<(), BackendError> {
        if let Self::RabbitMq(rabbit) = self {
            let connection = rabbit.connect("outbox-prepare").await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| outbox_rabbitmq::RabbitError::Unavailable(e.to_string()))?;
            let declared = outbox_rabbitmq::topology::declare_group(
                &channel,
                rabbit,
                &config.group_id,
                &config.topics,
            )
            .await;
            let _ = connection.close(200, "declared".into()).await;
            declared?;
        }
        Ok(())
    }

    /// Runs a consumer group member until `shutdown`.
    pub async fn consume<H: MessageHandler>(
        &self,
        config: ConsumerConfig,
        handler: H,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<ConsumerReport, BackendError> {
        Ok(match self {
            Self::Memory(bus) => {
                BusConsumer::new(bus.clone(), config)
                    .run(handler, shutdown)
                    .await
            }
            Self::Kafka(kafka) => {
                KafkaConsumer::new(kafka.clone(), config)
                    .run(handler, shutdown)
                    .await?
            }
            Self::Nats(nats) => {
                NatsConsumer::new(nats.clone(), config)
                    .run(handler, shutdown)
                    .await?
            }
            Self::RabbitMq(rabbit) => {
                RabbitConsumer::new(rabbit.clone(), config)
                    .run(handler, shutdown)
                    .await?
            }
        })
    }

    /// The SQLite durability a service on this broker needs: only with the in-process bus
    /// can nothing outside the process have acted on a commit a power loss takes back.
    pub fn sqlite_durability(&self) -> Durability {
        match self {
            Self::Memory(_) => Durability::Normal,
            Self::Kafka(_) | Self::Nats(_) | Self::RabbitMq(_) => Durability::Full,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "in-process bus",
            Self::Kafka(_) => "kafka",
            Self::Nats(_) => "nats",
            Self::RabbitMq(_) => "rabbitmq",
        }
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn the_pool_size_is_checked() {
        assert_eq!(pool_size(None).unwrap(), 16);
        assert_eq!(pool_size(Some("4".into())).unwrap(), 4);
        for bad in ["0", "many", "-3", "5000"] {
            let e = pool_size(Some(bad.into())).unwrap_err().to_string();
            assert!(e.contains("OUTBOX_PG_POOL_SIZE"), "{e}");
        }
    }
}
