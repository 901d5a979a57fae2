//! # outbox-postgres
//!
//! The PostgreSQL store of the outbox framework.
//!
//! - [`PgOutbox::enqueue`] writes an event in the caller's open transaction: the event
//!   commits or rolls back with the business change. There is no way to enqueue outside a
//!   transaction.
//! - [`PgRelayStore`] implements [`outbox_core::RelayStore`] (and `OutboxAdmin`) for the
//!   relay: the shared store logic of `outbox-sql` on [`PgDialect`], this crate's statements.
//! - [`migrate`] applies the embedded migrations (plain SQL in `migrations/`);
//!   [`check_schema`] verifies at start-up that tables, columns and indexes are as expected.
//! - [`PgInboxHandler`] makes a consumer's effects happen once per event: the inbox row and
//!   the handler's changes (and any events it enqueues) commit in one transaction. A
//!   handler implements [`SqlHandler<Postgres>`](SqlHandler).
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_core::{AggregateRef, NewEvent, Topic};
//! use outbox_postgres::{PgOutbox, Schema};
//!
//! let schema = Schema::new("public")?;
//! outbox_postgres::migrate(&pool, &schema).await?;
//! let outbox = PgOutbox::new(schema);
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind("o-1").execute(&mut *tx).await?;
//! let event = NewEvent::json(
//!     Topic::new("shop.order.placed.v1")?,
//!     AggregateRef::new("order", "o-1")?,
//!     &serde_json::json!({"order_id": "o-1"}),
//! )?;
//! outbox.enqueue(&mut tx, &event).await?;
//! outbox.commit(tx).await?; // commits, then wakes an in-process relay
//! # Ok(()) }
//! ```
//!
//! ## Ordering of writers
//! Events of one aggregate are published in sequence order. So that sequence order equals
//! commit order, `enqueue` takes a transaction-scoped advisory lock on the aggregate
//! ([`WriteOrdering::LockAggregate`], the default): two transactions writing events of the
//! same aggregate run their enqueues one after the other. Lock aggregates in a consistent
//! order when one transaction writes several, as with row locks. Choose
//! [`WriteOrdering::CallerSerialises`] when the application already serialises writers of an
//! aggregate (for example with `SELECT ... FOR UPDATE` on the aggregate's row).

mod check;
mod dialect;
mod error;
mod migrate;
mod outbox;
pub mod stream;
#[cfg(feature = "testing")]
pub mod testing;
mod unavailable;
mod watch;

pub use check::{check_schema, SchemaMismatch};
pub use dialect::PgDialect;
pub use error::OutboxError;
pub use migrate::{migrate, Migration, MIGRATIONS};
pub use outbox::{listen_for_commits, notify_channel, PgOutbox, WriteMode, WriteOrdering};
pub use outbox_sql::{InboxEvent, SqlHandler, STATS_EXACT_UP_TO};

/// The relay's (and operators') view of `<schema>.event_outbox`:
/// `PgRelayStore::new(pool, &schema)`. Cheap to clone.
pub type PgRelayStore = outbox_sql::SqlRelayStore<PgDialect>;
/// The `event_inbox` table of one schema: `PgInbox::new(pool, &schema)`.
pub type PgInbox = outbox_sql::SqlInbox<PgDialect>;
/// A [`SqlHandler`] on PostgreSQL with the inbox around it:
/// `PgInboxHandler::new(pool, schema, "consumer", handler)`.
pub type PgInboxHandler<H> = outbox_sql::SqlInboxHandler<PgDialect, H>;
pub use unavailable::is_unavailable;
pub use watch::watch_for_commits;

/// A validated schema name; the only configurable identifier that reaches SQL text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    name: String,
}

impl Schema {
    pub fn new(name: impl Into<String>) -> Result<Self, OutboxError> {
        let name = name.into();
        if !outbox_core::config::is_identifier(&name) {
            return Err(OutboxError::InvalidSchemaName(name));
        }
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted for SQL text (safe: validated to `[a-z_][a-z0-9_]*`).
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.name)
    }

    /// A schema-qualified table name for SQL text.
    pub(crate) fn table(&self, table: &str) -> String {
        format!("\"{}\".{}", self.name, table)
    }
}

impl Default for Schema {
    fn default() -> Self {
        Self {
            name: "public".into(),
        }
    }
}
