//! # The stream write mode and its relay (change data capture)
//!
//! In the stream write mode ([`crate::PgOutbox::with_write_mode`] with
//! [`WriteMode::LogicalMessage`](crate::WriteMode)) `enqueue` does not insert a row: it
//! emits the event as a *transactional logical message*
//! (`pg_logical_emit_message(true, 'outbox:<schema>', ...)`, layout in [`layout`]). The
//! message is part of the caller's transaction: it reaches the WAL with the commit, or never.
//! No row, index entry, delete or vacuum is paid per event.
//!
//! A [`StreamRelay`] reads the messages from a logical replication slot (pgoutput, logical
//! messages on, a publication without tables) over the replication protocol, in commit
//! order, and publishes them. The slot's confirmed position moves past a transaction only
//! once the broker acknowledged its events, so a crashed relay resumes from the slot and
//! loses nothing (delivery is at least once, as for the table).
//!
//! ## Order
//! The stream is in commit order, so per aggregate the events are published in the order
//! their transactions committed: no writer lock is needed (applications that change an
//! aggregate lock its row anyway, which orders the commits).
//!
//! ## Failures keep the table's semantics
//! An event the broker rejects is written to the outbox table with its attempt counted,
//! together with every later event of its aggregate (the relay checks the table before each
//! batch, so this holds across restarts too). The table relay then retries them with backoff,
//! dead-letters them and lets an operator requeue them; once the aggregate has no pending row
//! left, its events flow on the stream again. A broker outage pauses the stream without
//! counting attempts; a database failure ends the session and the next resumes from the slot.
//! A deployment in the stream mode therefore runs both relays (the table relay idles on an
//! empty table).
//!
//! ## Guard rails
//! - [`require_logical_wal`]: the relay and [`create_slot`] refuse to start unless
//!   `wal_level = logical`.
//! - [`create_slot`] (`outbox migrate`) creates the slot and publication; [`check_slot`]
//!   (`outbox check`, and every relay start) verifies them.
//! - Only one relay streams from a slot (the server refuses a second); the others wait as
//!   standbys and take over within `standby_poll` of the active one's death.
//! - [`slot_status`]: lag in bytes and seconds and retained WAL, also as metrics, with a
//!   configurable retained-WAL limit an alert rule watches.
//! - Heartbeats and keepalive confirmation keep an idle outbox from holding WAL.
//!
//! ## Limits
//! The replication connection speaks plain TCP (no TLS); one write mode per outbox (events of
//! one aggregate written in both modes have no defined order between the modes); an
//! `event_id` enqueued twice is published twice (the table mode refuses the second; use an
//! idempotency key, which the stream mode keeps in its table as before).

pub(crate) mod emit;
pub mod layout;
mod lsn;
mod park;
mod pgoutput;
mod reader;
mod relay;
mod slot;
mod wire;

pub use lsn::Lsn;
pub use relay::{StreamConfig, StreamRelay, StreamReport};
pub use slot::{
    check_slot, create_slot, drop_slot, require_logical_wal, slot_status, SlotName, SlotStatus,
};
pub use wire::WireError;

/// Why the stream relay (or its set-up) cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "wal_level is {0:?}, and the stream relay reads logical WAL: set wal_level = logical \
         (ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL), or keep the table \
         write mode"
    )]
    WalLevel(String),
    #[error("{0}")]
    Slot(String),
    #[error("{0}")]
    Config(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(
        "the outbox message at {lsn} cannot be read ({reason}); nothing was confirmed past it: \
         run a relay at least as new as the writers"
    )]
    Layout { lsn: String, reason: String },
}
