//! Which PostgreSQL errors mean the database is unavailable (retry until it returns) rather
//! than that a statement failed (count an attempt).

/// Whether `error` says the database cannot be used now: the connection was lost or refused,
/// the pool gave up waiting, the server is shutting down or starting, out of connections,
/// memory or disk, read-only (a fail-over in progress), or a serialization failure or
/// deadlock (run the same work again and it passes).
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    if outbox_sql::dialect::is_connection_trouble(error) {
        return true;
    }
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // SQLSTATE classes 08 (connection), 53 (insufficient resources), 57P (operator
            // intervention: shutdown, cannot connect now), 58 (system error).
            ["08", "53", "57P", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                || matches!(&*code, "40001" | "40P01" | "25006")
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_trouble_is_unavailability_and_bad_sql_is_not() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused
        ))));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound("x".into())));
    }
}
