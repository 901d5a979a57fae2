//! # outbox-sql
//!
//! The store logic of the outbox framework, written once over sqlx; a database adapter
//! (`outbox-postgres`, `outbox-sqlite`, `outbox-mysql`) supplies its [`Dialect`] and little
//! else. As `sqlx-core` does for drivers, this crate holds what every store shares:
//!
//! - [`SqlRelayStore`]: the relay's [`outbox_core::RelayStore`] (claims, fenced
//!   completions and failures, partition leases, heartbeats, retention, counts) and the
//!   operators' [`outbox_core::OutboxAdmin`];
//! - [`SqlInbox`] / [`SqlInboxHandler`]: the consumer inbox under `outbox_core::inbox`'s flow;
//! - [`SqlOutbox`]: the write path for databases whose enqueue is a few plain statements;
//! - [`schema`]: embedded migrations and the start-up schema check.
//!
//! A dialect's statements name their values (`@relay`, `@seqs`); they are compiled once
//! into the database's placeholders ([`statement`]), and each value is bound in the form
//! the database wants ([`Arg`]: a list is an array in PostgreSQL and a JSON array in
//! SQLite and MySQL). Every statement reads back integers as 64-bit and times as
//! milliseconds, so one decoder serves all. The conformance suite (`outbox-conformance`)
//! pins the behaviour on every store.

pub mod admin;
pub mod dialect;
pub mod engine;
pub mod inbox;
pub mod outbox;
pub mod relay_store;
pub mod run;
pub mod schema;
pub mod statement;

use std::time::Duration;

pub use dialect::{AdminParts, AdminSql, Arg, Dialect, InboxSql, RelaySql, PARAMS};
pub use engine::{Affected, Engine, Query};
pub use inbox::{InboxEvent, SqlHandler, SqlInbox, SqlInboxHandler};
pub use outbox::{EnqueueError, Insert, SqlOutbox, WriteDialect, WriteSql};
pub use relay_store::{SqlRelayStore, STATS_EXACT_UP_TO};
pub use statement::{Placeholders, Script, Statement};

/// A duration as whole milliseconds (saturating).
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
