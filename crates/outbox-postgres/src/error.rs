use crate::check::SchemaMismatch;

/// Errors of the PostgreSQL outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("schema name {0:?} is invalid: use a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 63 bytes)")]
    InvalidSchemaName(String),
    #[error("outbox migration error: {0}")]
    Migration(String),
    #[error(transparent)]
    SchemaMismatch(#[from] SchemaMismatch),
    #[error("event {event_id}: {reason}")]
    InvalidEvent { event_id: String, reason: String },
}
