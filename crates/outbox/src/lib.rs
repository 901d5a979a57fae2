//! # outbox
//!
//! Reliable event publishing for Rust services: the transactional outbox. This crate is the
//! one dependency an application needs; it re-exports the framework and chooses backends
//! from configuration:
//!
//! | setting | value | backend |
//! |---|---|---|
//! | `DATABASE_URL` | `sqlite://file.db` (embedded default) | [`sqlite`] |
//! | `DATABASE_URL` | `postgres://...` (production) | [`postgres`] |
//! | `DATABASE_URL` | `mysql://...` (MySQL 8.0.4+ / MariaDB 10.6+) | [`mysql`] |
//! | `OUTBOX_BROKER` | `memory` (embedded default) | [`bus`], in process |
//! | `OUTBOX_BROKER` | `host:port[,host:port]` (production) | [`kafka`] |
//! | `OUTBOX_BROKER` | `nats://host:port` | [`nats`] (JetStream) |
//! | `OUTBOX_BROKER` | `amqp://user:password@host:port/vhost` (exchange `OUTBOX_RABBITMQ_EXCHANGE`, default `outbox`) | [`rabbitmq`] |
//!
//! See [`backend::Database`] and [`backend::Broker`], and the crate READMEs for the
//! guarantees.

pub mod backend;
pub mod portable;

pub use outbox_bus as bus;
pub use outbox_core::*;
pub use outbox_http as http;
pub use outbox_kafka as kafka;
pub use outbox_mysql as mysql;
pub use outbox_nats as nats;
pub use outbox_postgres as postgres;
pub use outbox_rabbitmq as rabbitmq;
pub use outbox_sqlite as sqlite;
