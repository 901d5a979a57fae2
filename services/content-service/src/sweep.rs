//! Deleting what a rolled-back writer left behind.
//!
//! A writer stores content first and commits its transaction (with the event that names the
//! content) afterwards; if the transaction rolls back, or the process dies in between, the
//! content is stored but named by nothing. Such content is harmless (nobody has its id) and is
//! deleted once it has stayed provisional for the grace period. The grace period must exceed
//! the longest time between a writer's commit and this service consuming its event: a relay
//! or broker outage longer than that would let referenced content go. Seven days by default.

use std::time::Duration;

use essay_common::util::now_ms;
use outbox::portable::{params, DbError, ServiceDb};

/// How long provisional content may wait for the event that names it.
#[derive(Clone, Copy, Debug)]
pub struct SweepPolicy {
    pub grace: Duration,
}

impl Default for SweepPolicy {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl SweepPolicy {
    /// `CONTENT_SWEEP_GRACE_SECS`, else seven days.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("CONTENT_SWEEP_GRACE_SECS") {
            Err(_) => Ok(Self::default()),
            Ok(s) => s
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .map(|n| Self {
                    grace: Duration::from_secs(n),
                })
                .ok_or_else(|| {
                    format!(
                        "CONTENT_SWEEP_GRACE_SECS must be a positive number of seconds, got {s:?}"
                    )
                }),
        }
    }
}

/// Deletes provisional content older than the grace period, 500 rows per statement; returns
/// how many.
pub async fn sweep(db: &ServiceDb, policy: SweepPolicy) -> Result<u64, DbError> {
    let cutoff = now_ms() - policy.grace.as_millis() as i64;
    let mut total = 0;
    loop {
        let n = db
            .execute(
                "DELETE FROM stored_content WHERE content_id IN (
                     SELECT content_id FROM stored_content
                     WHERE provisional = 1 AND created_at < $1 LIMIT 500)",
                params![cutoff],
            )
            .await?;
        total += n;
        if n < 500 {
            return Ok(total);
        }
    }
}
